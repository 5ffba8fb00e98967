"""Datasets: the embedded split, on-disk formats, and clear errors for bad paths."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from robustexp.data.base import Augmentation, TensorImageDataset, parse_augment, stratified_split
from robustexp.data.embedded import mnist5k
from robustexp.data.ondisk import cifar10, cifar100, fashion_mnist, image_folder, mnist, read_idx
from robustexp.errors import ConfigError, DatasetError


def test_embedded_split_is_stratified_seeded_and_disjoint():
    a, b = mnist5k(split_seed=0), mnist5k(split_seed=0)
    assert len(a.train) == 4000 and len(a.test) == 1000
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.train.labels, b.train.labels)
    assert torch.bincount(a.test.labels).tolist() == [100] * 10
    assert torch.bincount(a.train.labels).tolist() == [400] * 10
    train_rows = {bytes(x.numpy()) for x in a.train.images}
    assert not any(bytes(x.numpy()) in train_rows for x in a.test.images)
    image, label = a.test[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    c = mnist5k(split_seed=1)
    assert not torch.equal(a.test.images, c.test.images)


def test_stratified_split_hand_case():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    train, test = stratified_split(labels, n_train=5, n_test=3, seed=0)
    # frequencies .6/.3/.1: train quotas 3/1.5/0.5 -> floors 3,1,0, the one left goes to the
    # first of the tied remainders (class 1) -> 3,2,0; test quotas 1.8/.9/.3 -> 1,0,0 + two -> 2,1,0
    assert torch.bincount(labels[train], minlength=3).tolist() == [3, 2, 0]
    assert torch.bincount(labels[test], minlength=3).tolist() == [2, 1, 0]
    assert not set(train.tolist()) & set(test.tolist())
    with pytest.raises(ConfigError, match="exceeds"):
        stratified_split(labels, 8, 3, 0)


def test_crop_flip_augmentation_keeps_shape_and_values():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    ds = TensorImageDataset(images, torch.arange(4), augment="crop_flip")
    torch.manual_seed(0)
    x, _ = ds[0]
    assert x.shape == (3, 32, 32)
    with pytest.raises(ConfigError, match="dataset.augment"):
        TensorImageDataset(images, torch.arange(4), augment="mixup")


def _write_idx(path, array: np.ndarray, compress=False):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def _fake_mnist(root, folder="MNIST", compress=False):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, compress)
    return root


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files_load(tmp_path, compress):
    data = mnist(str(_fake_mnist(tmp_path, compress=compress)))
    assert len(data.train) == 20 and len(data.test) == 10 and data.input_shape == (1, 28, 28)
    assert data.test[3][1] == 3
    raw = tmp_path / "MNIST" / "raw" / ("t10k-images-idx3-ubyte" + (".gz" if compress else ""))
    assert torch.equal(data.test.images[:, 0], torch.from_numpy(read_idx(raw).copy()))


def test_fashion_mnist_uses_its_folder(tmp_path):
    data = fashion_mnist(str(_fake_mnist(tmp_path, folder="FashionMNIST")))
    assert data.name == "fashion_mnist" and len(data.train) == 20


def test_missing_dataset_path_names_the_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=r"dataset.root=.*nowhere does not exist.*MNIST/raw"):
        mnist(str(missing))
    with pytest.raises(DatasetError, match="dataset.root is not set"):
        cifar10("???")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*not found"):
        mnist(str(tmp_path / "empty"))


def test_malformed_idx_file_is_reported(tmp_path):
    root = _fake_mnist(tmp_path)
    bad = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte: idx header announces shape \(10, 28, 28\)"):
        mnist(str(root))
    bad.write_bytes(b"not an idx file at all")
    with pytest.raises(DatasetError, match="bad magic"):
        mnist(str(root))


def _fake_cifar(root, n_classes=10):
    rng = np.random.default_rng(0)
    if n_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        names, key = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels"
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        names, key = ["train", "test"], "fine_labels"
    for name in names:
        entry = {b"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8), key.encode(): [1, 2, 3, 4]}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
    return root


def test_cifar_batches_load_in_channel_first_layout(tmp_path):
    data = cifar10(str(_fake_cifar(tmp_path)))
    assert len(data.train) == 20 and len(data.test) == 4 and data.num_classes == 10
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as fh:
        raw = pickle.load(fh)
    expected = torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(data.test[0][0], expected)
    c100 = cifar100(str(_fake_cifar(tmp_path / "c100", 100)))
    assert c100.num_classes == 100 and len(c100.train) == 4


def test_cifar_loader_refuses_code_in_pickles(tmp_path):
    root = _fake_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as fh:
        pickle.dump({"data": Evil(), "labels": [0]}, fh)
    with pytest.raises(DatasetError, match="refusing to load builtins.print"):
        cifar10(str(root))


def test_image_folder_tree(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    data = image_folder(str(tmp_path), train_dir="train", test_dir="val", image_size=32, resize=36)
    assert data.num_classes == 2 and data.class_names == ["cat", "dog"]
    image, label = data.test[2]
    assert image.shape == (3, 32, 32) and label == 1
    with pytest.raises(DatasetError, match="folder .*missing_split not found"):
        image_folder(str(tmp_path), test_dir="missing_split")


# ----------------------------------------------------------------------------- composable augmentation
# Tsiligkaridis & Tsiligkaridis 2022, Sec. 4: random crop, horizontal flip, color jitter (0.25),
# random rotation (2 degrees); see robustexp.data.base.Augmentation.
MAGN_AUGMENT = ["crop", "flip", "color_jitter", "rotate"]


def _images(channels, size, seed=0, high=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (6, channels, size, size), generator=g, dtype=torch.uint8)


def test_presets_keep_working_and_lists_compose_in_order():
    assert parse_augment("none") == () and parse_augment(None) == ()
    assert parse_augment("crop_flip") == ("crop", "flip") and parse_augment("flip") == ("flip",)
    assert parse_augment(MAGN_AUGMENT) == tuple(MAGN_AUGMENT) and parse_augment("rotate") == ("rotate",)
    # the crop_flip preset draws exactly as before: randint(0, 9, (2,)) for the window, then rand() for the flip
    images = _images(3, 32)
    torch.manual_seed(3)
    x, _ = TensorImageDataset(images, torch.arange(6), augment="crop_flip")[2]
    torch.manual_seed(3)
    padded = torch.nn.functional.pad(images[2].float() / 255, (4, 4, 4, 4))
    top, left = torch.randint(0, 9, (2,)).tolist()
    expected = padded[:, top:top + 32, left:left + 32]
    expected = expected.flip(-1) if torch.rand(()) < 0.5 else expected
    assert torch.equal(x, expected)


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_rotation_by_zero_and_jitter_zero_are_the_identity(channels, size):
    images = _images(channels, size)
    for options in ({"augment": ["rotate"], "rotation_degrees": 0},
                    {"augment": ["color_jitter"], "color_jitter": 0.0},
                    {"augment": ["color_jitter", "rotate"], "color_jitter": {"brightness": 0, "hue": 0},
                     "rotation_degrees": 0.0},
                    {"augment": ["crop"], "crop_padding": 0}):
        ds = TensorImageDataset(images, torch.arange(6), augment=Augmentation.from_config(**options))
        for i in range(len(images)):
            assert torch.equal(ds[i][0], images[i].float() / 255), options


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_flip_gives_the_exact_mirror_image_or_the_image(channels, size):
    images = _images(channels, size)
    ds = TensorImageDataset(images, torch.arange(6), augment=["flip"])
    torch.manual_seed(0)
    outcomes = []
    for _ in range(20):
        x, _ = ds[1]
        original = images[1].float() / 255
        assert torch.equal(x, original.flip(-1)) or torch.equal(x, original)
        outcomes.append(torch.equal(x, original.flip(-1)))
        assert torch.equal(x[..., 0], original[..., -1]) == outcomes[-1]   # a true mirror: first column = last
    assert any(outcomes) and not all(outcomes)


@pytest.mark.parametrize("channels", [1, 3])
def test_brightness_jitter_scales_the_image_by_a_factor_within_the_strength(channels):
    b = 0.25
    images = _images(channels, 16, high=128)   # <= 0.5: never clipped at 1 + b
    ds = TensorImageDataset(images, torch.arange(6), augment=Augmentation.from_config(
        ["color_jitter"], color_jitter={"brightness": b}))
    torch.manual_seed(0)
    factors = []
    for i in range(30):
        x, _ = ds[i % 6]
        original = images[i % 6].float() / 255
        mask = original > 0.05
        ratio = x[mask] / original[mask]
        assert torch.allclose(ratio, ratio.mean().expand_as(ratio), atol=1e-5)   # one factor for the whole image
        factors.append(ratio.mean().item())
    assert all(1 - b - 1e-6 <= f <= 1 + b + 1e-6 for f in factors)
    assert min(factors) < 0.85 and max(factors) > 1.15                       # it does draw across the range
    bright = TensorImageDataset(torch.full((1, channels, 8, 8), 250, dtype=torch.uint8), torch.zeros(1),
                                augment=Augmentation.from_config(["color_jitter"], color_jitter={"brightness": 0.9}))
    assert all(0 <= bright[0][0].min() and bright[0][0].max() <= 1 for _ in range(10))


def test_rotation_is_torchvisions_rotation_by_an_angle_uniform_in_the_range():
    from torchvision.transforms import functional as TF

    images = _images(3, 32)
    ds = TensorImageDataset(images, torch.arange(6), augment=Augmentation.from_config(["rotate"],
                                                                                        rotation_degrees=30))
    angles = []
    for seed in range(8):
        torch.manual_seed(seed)
        x, _ = ds[0]
        torch.manual_seed(seed)
        angles.append(float(torch.empty(1).uniform_(-30, 30)))
        assert torch.equal(x, TF.rotate(images[0].float() / 255, angles[-1], fill=[0.0] * 3))
        if abs(angles[-1]) > 5:   # nearest-neighbour sampling: a tiny angle may move no pixel of a 32 px image
            assert not torch.equal(x, images[0].float() / 255)
    assert max(angles) > 5 and min(angles) < -5


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 17)])
def test_rotate_nearest_equals_torchvisions_rotate_pixel_for_pixel(channels, size):
    from torchvision.transforms import functional as TF

    from robustexp.data.base import rotate_nearest

    g = torch.Generator().manual_seed(size)
    image = torch.rand(channels, size, size, generator=g)
    for angle in (0.0, 2.0, -2.0, 0.5, 45.0, -90.0, 90.0, 137.3, -1.7):
        assert torch.equal(rotate_nearest(image, angle), TF.rotate(image, angle, fill=[0.0] * channels)), angle
    # a quarter turn of a square image is exact: torch.rot90 (counter-clockwise)
    assert torch.equal(rotate_nearest(image, 90.0), torch.rot90(image, 1, dims=(1, 2))) if size % 2 == 0 else True


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_the_magn_preprocessing_keeps_shape_and_range_and_is_seeded(channels, size):
    images = _images(channels, size)
    augmentation = Augmentation.from_config(MAGN_AUGMENT, crop_padding=4, color_jitter=0.25, rotation_degrees=2)
    ds = TensorImageDataset(images, torch.arange(6), augment=augmentation)
    torch.manual_seed(7)
    first = [ds[i][0] for i in range(6)]
    torch.manual_seed(7)
    again = [ds[i][0] for i in range(6)]
    torch.manual_seed(8)
    other = [ds[i][0] for i in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert all(x.shape == (channels, size, size) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
               for x in first)


def test_bad_augmentation_options_name_the_option():
    images = _images(3, 8)
    for augment in ("mixup", ["crop", "blur"], ["flip", "flip"], 3):
        with pytest.raises(ConfigError, match="dataset.augment"):
            TensorImageDataset(images, torch.arange(6), augment=augment)
    with pytest.raises(ConfigError, match="dataset.augment includes rotate: set dataset.rotation_degrees"):
        Augmentation.from_config(["rotate"])
    with pytest.raises(ConfigError, match="dataset.augment includes color_jitter: set dataset.color_jitter"):
        Augmentation.from_config(["crop", "color_jitter"])
    with pytest.raises(ConfigError, match="dataset.color_jitter=0.25 is set but dataset.augment"):
        Augmentation.from_config("crop_flip", color_jitter=0.25)
    with pytest.raises(ConfigError, match="dataset.color_jitter: unknown key"):
        Augmentation.from_config(["color_jitter"], color_jitter={"gamma": 0.1})
    with pytest.raises(ConfigError, match="dataset.color_jitter"):
        Augmentation.from_config(["color_jitter"], color_jitter=-0.1)
    with pytest.raises(ConfigError, match="dataset.rotation_degrees"):
        Augmentation.from_config(["rotate"], rotation_degrees=400)
    with pytest.raises(ConfigError, match="dataset.crop_padding"):
        Augmentation.from_config(["crop"], crop_padding=-1)


def test_dataset_factories_take_the_composed_augmentation(tmp_path):
    data = cifar10(str(_fake_cifar(tmp_path)), augment=MAGN_AUGMENT, color_jitter=0.25, rotation_degrees=2)
    assert data.train.augment == tuple(MAGN_AUGMENT) and data.test.augment == ()
    assert dict(data.train.augmentation.jitter) == {"brightness": 0.25, "contrast": 0.25, "saturation": 0.25,
                                                    "hue": 0.0}
    assert data.train.augmentation.rotation_degrees == 2.0
    digits = mnist(str(_fake_mnist(tmp_path / "m")), augment=["crop", "rotate"], rotation_degrees=2)
    assert digits.train.augment == ("crop", "rotate")
    x, _ = digits.train[0]
    assert x.shape == (1, 28, 28) and 0 <= x.min() and x.max() <= 1
    with pytest.raises(ConfigError, match="dataset.augment"):
        cifar10(str(tmp_path), augment="autoaugment")


def test_image_folder_training_transforms_follow_the_augment_list(tmp_path):
    from torchvision import transforms

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                pixels = np.random.default_rng(i).integers(0, 256, (40, 50, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")

    def kinds(**options):
        data = image_folder(str(tmp_path), train_dir="train", test_dir="val", image_size=32, resize=36, **options)
        return data, [type(t) for t in data.train.transform.transforms]

    _, default = kinds()
    assert default == [transforms.RandomResizedCrop, transforms.RandomHorizontalFlip, transforms.ToTensor]
    # "flip" flips (it used to fall back to no augmentation at all); images are sized as the test split's
    _, flip = kinds(augment="flip")
    assert flip == [transforms.Resize, transforms.CenterCrop, transforms.RandomHorizontalFlip, transforms.ToTensor]
    data, magn = kinds(augment=MAGN_AUGMENT, color_jitter=0.25, rotation_degrees=2)
    assert magn == [transforms.RandomResizedCrop, transforms.RandomHorizontalFlip, transforms.ColorJitter,
                    transforms.RandomRotation, transforms.ToTensor]
    jitter, rotation = data.train.transform.transforms[2:4]
    assert jitter.brightness == (0.75, 1.25) and jitter.saturation == (0.75, 1.25) and jitter.hue is None
    assert rotation.degrees == [-2.0, 2.0]
    torch.manual_seed(0)
    a = data.train[0][0]
    torch.manual_seed(0)
    assert torch.equal(a, data.train[0][0]) and a.shape == (3, 32, 32) and 0 <= a.min() and a.max() <= 1
    with pytest.raises(ConfigError, match="dataset.augment includes rotate"):
        image_folder(str(tmp_path), test_dir="val", augment=["rotate"])


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_batched_items_equal_item_by_item_also_through_a_subset_and_a_loader(augment):
    """Issue 21: ``TensorImageDataset.__getitems__`` (how a DataLoader fetches a batch) gives the
    values of ``[ds[i] for i in indices]``, with augmentation drawing from the RNG in the same order."""
    g = torch.Generator().manual_seed(0)
    ds = TensorImageDataset(torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=g),
                            torch.arange(40) % 10, augment=augment)
    indices = [5, 3, 39, 0, 5, 17]
    torch.manual_seed(1)
    one_by_one = [ds[i] for i in indices]
    torch.manual_seed(1)
    batched = ds.__getitems__(indices)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(one_by_one, batched))

    class ItemByItem(torch.utils.data.Dataset):  # the DataLoader's path without __getitems__
        __len__, __getitem__ = ds.__len__, ds.__getitem__

    loaded = []
    for dataset in (ds, ItemByItem()):
        torch.manual_seed(1)
        loaded.append(list(torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=4)))
    for (x, y), (u, v) in zip(*loaded):
        assert torch.equal(x, u) and torch.equal(y, v) and y.dtype == torch.long


def test_embedded_csv_reader_equals_loadtxt(tmp_path):
    from robustexp.data.embedded import _read_integer_csv, embedded_csv_path

    path = embedded_csv_path()
    assert np.array_equal(_read_integer_csv(path), np.loadtxt(path, delimiter=",", dtype=np.float32))
    for name, text in [("plain", b"1,22,333\n4,5,6\n"), ("no_final_newline", b"1,2\n3,4"),
                       ("not_integers", b"1.5,2\n3,4\n")]:  # the last one goes through loadtxt
        file = tmp_path / f"{name}.csv.gz"
        file.write_bytes(gzip.compress(text))
        assert np.array_equal(_read_integer_csv(file), np.loadtxt(file, delimiter=",", dtype=np.float32, ndmin=2))
    for name, text in [("ragged", b"1,2,3\n4,5\n6\n"), ("empty_field", b"1,,2\n3,4,5\n")]:
        file = tmp_path / f"{name}.csv.gz"
        file.write_bytes(gzip.compress(text))
        with pytest.raises(ValueError):  # loadtxt's error, naming the row
            _read_integer_csv(file)


def test_generated_corruptions_read_the_clean_split_once_and_give_the_same_subsets():
    from types import SimpleNamespace

    from robustexp.data.corruptions.engine import TorchCorruptionEngine
    from robustexp.data.corruptions.sources import GeneratedCorruptions

    g = torch.Generator().manual_seed(0)
    test = TensorImageDataset(torch.randint(0, 256, (30, 1, 28, 28), dtype=torch.uint8, generator=g),
                              torch.arange(30) % 10)
    reads = []
    original = test.__getitems__
    test.__getitems__ = lambda indices: reads.append(len(indices)) or original(indices)
    data, ctx = SimpleNamespace(test=test), SimpleNamespace(num_workers=0, device=torch.device("cpu"))
    cached = GeneratedCorruptions(TorchCorruptionEngine(), chunk_size=8)
    fresh = GeneratedCorruptions(TorchCorruptionEngine(), chunk_size=8, cache_mb=0)   # nothing cached
    for name, severity in [("gaussian_noise", 1), ("contrast", 3), ("gaussian_noise", 2)]:
        a = list(cached.batches(data, name, severity, 7, ctx))
        b = list(fresh.batches(data, name, severity, 7, ctx))
        assert all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b)) and len(a) == len(b)
    assert sum(reads) == 30 * (1 + 3)  # the cached source read the 30 clean images once, the other per subset
