"""Datasets: the embedded split, on-disk formats, and clear errors for bad paths."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from robustexp.data.base import TensorImageDataset, stratified_split
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
