"""What every dataset config builds: train/test splits of images in [0, 1] plus metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from robustexp.errors import ConfigError


@dataclass
class DataSplits:
    """Train and test splits of one dataset.

    Items of ``train`` and ``test`` are ``(image, label)`` with ``image`` a float tensor of
    shape ``input_shape`` = (C, H, W) in [0, 1] pixel space: corruptions, noise and attacks
    all act there, and normalization by ``mean``/``std`` happens inside the model.
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] = field(default_factory=list)


AUGMENTATIONS = ("none", "crop_flip", "flip")


class TensorImageDataset(Dataset):
    """Images held in memory as a uint8 tensor (N, C, H, W) with integer labels.

    ``augment`` is applied per item at training time: ``crop_flip`` is the standard CIFAR
    augmentation (4-pixel zero padding, random crop, horizontal flip), ``flip`` only flips.
    Randomness comes from torch's RNG (the main process' state, saved in checkpoints, or a
    DataLoader worker's seed), so training is reproducible and resumable.
    """

    def __init__(self, images_uint8: torch.Tensor, labels: torch.Tensor, augment: str = "none"):
        if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
            raise ValueError(f"expected uint8 images of shape (N, C, H, W), got {images_uint8.dtype} "
                             f"{tuple(images_uint8.shape)}")
        if augment not in AUGMENTATIONS:
            raise ConfigError(f"dataset.augment={augment!r} is unknown; expected one of {AUGMENTATIONS}")
        if len(images_uint8) != len(labels):
            raise ValueError(f"{len(images_uint8)} images but {len(labels)} labels")
        self.images = images_uint8
        self.labels = labels.long()
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index].float().div_(255.0)
        if self.augment == "crop_flip":
            _, h, w = image.shape
            padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
            top, left = torch.randint(0, 9, (2,)).tolist()
            image = padded[:, top:top + h, left:left + w]
        if self.augment in ("crop_flip", "flip") and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, self.labels[index]


def stratified_split(labels: torch.Tensor, n_train: int, n_test: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a seeded stratified split: each class contributes to train and test in
    proportion to its frequency (largest-remainder rounding), independent of the run seed."""
    labels = labels.long()
    n_total = len(labels)
    if n_train + n_test > n_total:
        raise ConfigError(f"n_train + n_test = {n_train + n_test} exceeds the {n_total} examples available")
    generator = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    counts = torch.stack([(labels == c).sum() for c in classes]).double()

    def allocate(n: int) -> torch.Tensor:
        exact = counts / n_total * n
        base = exact.floor().long()
        remainder = n - int(base.sum())
        order = torch.argsort(exact - base, descending=True, stable=True)
        base[order[:remainder]] += 1
        return base

    train_per_class, test_per_class = allocate(n_train), allocate(n_test)
    train_idx, test_idx = [], []
    for c, k_train, k_test in zip(classes, train_per_class, test_per_class):
        if k_train + k_test > (labels == c).sum():
            raise ConfigError(f"class {int(c)} has too few examples for a stratified split of "
                              f"{n_train}/{n_test}; lower n_train or n_test")
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        train_idx.append(members[:k_train])
        test_idx.append(members[k_train:k_train + k_test])
    train = torch.cat(train_idx)
    test = torch.cat(test_idx)
    return train[torch.randperm(len(train), generator=generator)], test.sort().values
