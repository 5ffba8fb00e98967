"""Datasets read from a local path, never downloaded: MNIST / Fashion-MNIST idx files,
CIFAR-10/100 python batches, and ImageFolder trees (ImageNet and the shifted sets)."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import torch

from robustexp.data.base import Augmentation, DataSplits, TensorImageDataset
from robustexp.data.embedded import MNIST_MEAN, MNIST_STD
from robustexp.errors import DatasetError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)


def _require_root(root: str | None, option: str, layout: str) -> Path:
    if root is None or str(root) in ("", "???"):
        raise DatasetError(f"{option} is not set: pass {option}=/path/to/data, a folder laid out as {layout}")
    path = Path(str(root)).expanduser()
    if not path.exists():
        raise DatasetError(f"{option}={path} does not exist; expected a folder laid out as {layout}")
    return path


# ----------------------------------------------------------------------------- idx (MNIST)

def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (optionally .gz): magic 0x0000 08 <ndim>, big-endian int32 dims, uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path}: not an idx file of unsigned bytes (bad magic number {data[:4]!r})")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != expected:
        raise DatasetError(f"{path}: idx header announces shape {dims} ({expected} bytes) "
                           f"but the file has {len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find_idx(root: Path, folder_name: str, stem: str) -> Path | None:
    for base in (root / folder_name / "raw", root / "raw", root):
        for name in (stem, stem + ".gz"):
            if (base / name).is_file():
                return base / name
    return None


def _idx_dataset(root: str | None, folder_name: str, name: str, mean, std, option: str,
                 augmentation: Augmentation | None = None) -> DataSplits:
    layout = (f"<root>/{folder_name}/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz] "
              "(torchvision's layout; <root>/raw/ or the files directly in <root> also work)")
    path = _require_root(root, option, layout)
    splits = {}
    for split, (image_stem, label_stem) in IDX_FILES.items():
        image_file, label_file = _find_idx(path, folder_name, image_stem), _find_idx(path, folder_name, label_stem)
        if image_file is None or label_file is None:
            missing = image_stem if image_file is None else label_stem
            raise DatasetError(f"{option}={path}: {missing}[.gz] not found; expected {layout}")
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f"{image_file} / {label_file}: expected (N, H, W) images and N labels, "
                               f"got {images.shape} and {labels.shape}")
        splits[split] = (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    height, width = splits["train"][0].shape[-2:]
    return DataSplits(name=name, train=TensorImageDataset(*splits["train"], augment=augmentation or "none"),
                      test=TensorImageDataset(*splits["test"]), num_classes=10,
                      input_shape=(1, int(height), int(width)), mean=mean, std=std)


def mnist(root: str | None, augment="none", crop_padding: int = 4, color_jitter=None,
          rotation_degrees: float | None = None) -> DataSplits:
    """MNIST idx files; ``augment`` and its options as in :class:`~robustexp.data.base.Augmentation`."""
    augmentation = Augmentation.from_config(augment, crop_padding, color_jitter, rotation_degrees)
    return _idx_dataset(root, "MNIST", "mnist", MNIST_MEAN, MNIST_STD, "dataset.root", augmentation)


def fashion_mnist(root: str | None, augment="none", crop_padding: int = 4, color_jitter=None,
                  rotation_degrees: float | None = None) -> DataSplits:
    """Fashion-MNIST idx files; ``augment`` and its options as for :func:`mnist`."""
    augmentation = Augmentation.from_config(augment, crop_padding, color_jitter, rotation_degrees)
    return _idx_dataset(root, "FashionMNIST", "fashion_mnist", FASHION_MEAN, FASHION_STD, "dataset.root",
                        augmentation)


# ----------------------------------------------------------------------------- CIFAR

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what they contain (dicts, lists, numpy arrays),
    so that a malicious file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _load_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            entry = _NumpyOnlyUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DatasetError(f"{path}: not a CIFAR python batch ({exc})") from exc
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or label_key not in entry:
        raise DatasetError(f"{path}: expected keys 'data' and '{label_key}', found {sorted(entry)}")
    data = np.asarray(entry["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{path}: expected 'data' of shape (N, 3072), got {data.shape}")
    return data.reshape(-1, 3, 32, 32), np.asarray(entry[label_key], dtype=np.int64)


def _cifar(root: str | None, num_classes: int, augmentation: Augmentation) -> DataSplits:
    if num_classes == 10:
        folder, train_files, test_files, label_key = (
            "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels")
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    else:
        folder, train_files, test_files, label_key = "cifar-100-python", ["train"], ["test"], "fine_labels"
        mean, std = CIFAR100_MEAN, CIFAR100_STD
    layout = f"<root>/{folder}/{{{','.join(train_files + test_files)}}} (the python version of CIFAR)"
    path = _require_root(root, "dataset.root", layout)
    base = path / folder if (path / folder).is_dir() else path
    splits = {}
    for split, files in (("train", train_files), ("test", test_files)):
        arrays = []
        for name in files:
            if not (base / name).is_file():
                raise DatasetError(f"dataset.root={path}: {base / name} not found; expected {layout}")
            arrays.append(_load_cifar_batch(base / name, label_key))
        images = torch.from_numpy(np.concatenate([a[0] for a in arrays]))
        labels = torch.from_numpy(np.concatenate([a[1] for a in arrays]))
        splits[split] = (images, labels)
    return DataSplits(name=f"cifar{num_classes}", train=TensorImageDataset(*splits["train"], augment=augmentation),
                      test=TensorImageDataset(*splits["test"]), num_classes=num_classes,
                      input_shape=(3, 32, 32), mean=mean, std=std)


def cifar10(root: str | None, augment="crop_flip", crop_padding: int = 4, color_jitter=None,
            rotation_degrees: float | None = None) -> DataSplits:
    """CIFAR-10 python batches; ``augment`` (a preset or a list of operations) and its options as in
    :class:`~robustexp.data.base.Augmentation`, applied to the training split only."""
    return _cifar(root, 10, Augmentation.from_config(augment, crop_padding, color_jitter, rotation_degrees))


def cifar100(root: str | None, augment="crop_flip", crop_padding: int = 4, color_jitter=None,
             rotation_degrees: float | None = None) -> DataSplits:
    """CIFAR-100 python batches; ``augment`` and its options as for :func:`cifar10`."""
    return _cifar(root, 100, Augmentation.from_config(augment, crop_padding, color_jitter, rotation_degrees))


# ----------------------------------------------------------------------------- ImageFolder

def image_folder(root: str | None, train_dir: str = "train", test_dir: str = "val", image_size: int = 224,
                 resize: int | None = 256, augment="crop_flip", name: str = "imagefolder",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_padding: int = 4, color_jitter=None,
                 rotation_degrees: float | None = None) -> DataSplits:
    """ImageNet-style ``<root>/<split>/<class>/<image>`` trees. Test images are resized to
    ``resize`` then center-cropped to ``image_size`` (``resize: null`` for sets already at
    ``image_size``, such as ImageNet-C); training applies ``augment`` with torchvision transforms
    (:meth:`~robustexp.data.base.Augmentation.pil_transforms`: ``crop`` is a random resized crop,
    ``crop_padding`` does not apply; without ``crop`` the training images are sized as the test ones)."""
    from torchvision import datasets, transforms

    augmentation = Augmentation.from_config(augment, crop_padding, color_jitter, rotation_degrees)
    layout = f"<root>/{{{train_dir},{test_dir}}}/<class>/<image>"
    path = _require_root(root, "dataset.root", layout)
    test_tf = [transforms.Resize(resize)] if resize else []
    test_tf += [transforms.CenterCrop(image_size), transforms.ToTensor()]
    train_tf = augmentation.pil_transforms(image_size, resize) + [transforms.ToTensor()]
    folders = {}
    for split, sub, tf in (("train", train_dir, train_tf), ("test", test_dir, test_tf)):
        if not (path / sub).is_dir():
            raise DatasetError(f"dataset.root={path}: folder {path / sub} not found; expected {layout}")
        try:
            folders[split] = datasets.ImageFolder(str(path / sub), transform=transforms.Compose(tf))
        except (FileNotFoundError, RuntimeError) as exc:
            raise DatasetError(f"{path / sub}: {exc}; expected {layout}") from exc
    if folders["train"].classes != folders["test"].classes:
        raise DatasetError(f"{path}: the class folders of {train_dir}/ and {test_dir}/ differ")
    return DataSplits(name=name, train=folders["train"], test=folders["test"],
                      num_classes=len(folders["test"].classes), input_shape=(3, image_size, image_size),
                      mean=tuple(mean), std=tuple(std), class_names=list(folders["test"].classes))
