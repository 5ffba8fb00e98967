"""What every dataset config builds: train/test splits of images in [0, 1] plus metadata."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
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


# ----------------------------------------------------------------------------- training augmentation
AUGMENT_OPS = ("crop", "flip", "color_jitter", "rotate")
AUGMENT_PRESETS = {"none": (), "flip": ("flip",), "crop_flip": ("crop", "flip")}
AUGMENTATIONS = tuple(AUGMENT_PRESETS)  # the named presets (kept for older imports)
JITTER_KEYS = ("brightness", "contrast", "saturation", "hue")


def parse_augment(augment) -> tuple[str, ...]:
    """The operations named by ``dataset.augment``: a preset (``none``, ``flip``, ``crop_flip``),
    one operation, or a list of operations from :data:`AUGMENT_OPS`, applied in the order given."""
    if augment is None:
        return ()
    if isinstance(augment, str):
        if augment in AUGMENT_PRESETS:
            return AUGMENT_PRESETS[augment]
        items = [augment]
    elif isinstance(augment, Sequence):
        items = list(augment)
    else:
        raise ConfigError(f"dataset.augment={augment!r}: expected a preset {list(AUGMENT_PRESETS)} or a list of "
                          f"operations from {list(AUGMENT_OPS)}")
    unknown = [op for op in items if not isinstance(op, str) or op not in AUGMENT_OPS]
    if unknown:
        raise ConfigError(f"dataset.augment={augment!r}: unknown operation(s) {unknown}; expected a preset "
                          f"{list(AUGMENT_PRESETS)} or a list of operations from {list(AUGMENT_OPS)} "
                          f"(e.g. [crop, flip, color_jitter, rotate])")
    repeated = sorted({op for op in items if items.count(op) > 1})
    if repeated:
        raise ConfigError(f"dataset.augment={augment!r} names {repeated} more than once")
    return tuple(items)


def _jitter_strengths(color_jitter) -> dict[str, float]:
    """``dataset.color_jitter`` as torchvision ``ColorJitter`` strengths. A number ``b`` jitters
    brightness, contrast and saturation by factors in ``[max(0, 1 - b), 1 + b]`` (hue untouched);
    a mapping sets them one by one (``{brightness: 0.25}``; hue in [0, 0.5])."""
    if isinstance(color_jitter, bool) or not isinstance(color_jitter, (int, float, Mapping)):
        raise ConfigError(f"dataset.color_jitter={color_jitter!r}: expected a number >= 0 or a mapping of "
                          f"{list(JITTER_KEYS)} to numbers >= 0")
    if isinstance(color_jitter, Mapping):
        unknown = [k for k in color_jitter if k not in JITTER_KEYS]
        if unknown:
            raise ConfigError(f"dataset.color_jitter: unknown key(s) {unknown}; expected some of {list(JITTER_KEYS)}")
        strengths = {k: float(color_jitter.get(k) or 0.0) for k in JITTER_KEYS}
    else:
        strengths = {"brightness": float(color_jitter), "contrast": float(color_jitter),
                     "saturation": float(color_jitter), "hue": 0.0}
    if any(v < 0 for v in strengths.values()) or strengths["hue"] > 0.5:
        raise ConfigError(f"dataset.color_jitter={color_jitter!r}: strengths must be >= 0 (hue at most 0.5)")
    return strengths


def rotate_nearest(image: torch.Tensor, angle_degrees: float) -> torch.Tensor:
    """Rotate a float image (C, H, W) by ``angle_degrees`` counter-clockwise about its center with
    nearest-neighbour sampling and zeros outside: ``torchvision.transforms.functional.rotate(image,
    angle, fill=0)`` pixel for pixel (its inverse affine grid, computed elementwise; tests compare)."""
    _, h, w = image.shape
    rad = math.radians(-angle_degrees)   # torchvision inverts the rotation by -angle
    theta = torch.tensor([[math.cos(rad), math.sin(rad), 0.0], [-math.sin(rad), math.cos(rad), 0.0]],
                         dtype=image.dtype, device=image.device)
    scaled = theta.T / torch.tensor([0.5 * w, 0.5 * h], dtype=image.dtype, device=image.device)  # (3, 2)
    xs = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w, dtype=image.dtype, device=image.device)
    ys = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h, dtype=image.dtype, device=image.device)[:, None]
    grid = torch.stack([xs * scaled[0, 0] + ys * scaled[1, 0] + scaled[2, 0],
                        xs * scaled[0, 1] + ys * scaled[1, 1] + scaled[2, 1]], dim=-1)
    return torch.nn.functional.grid_sample(image[None], grid[None], mode="nearest", padding_mode="zeros",
                                           align_corners=False)[0]


@dataclass(frozen=True)
class Augmentation:
    """Per-image training augmentation, a composition of operations applied in order:

    * ``crop``: on in-memory images, zero-pad ``crop_padding`` pixels per side and cut a random
      window of the original size (the standard CIFAR crop); on ImageFolder trees, torchvision's
      ``RandomResizedCrop(image_size)``;
    * ``flip``: horizontal flip with probability 1/2;
    * ``color_jitter``: torchvision ``ColorJitter`` with the strengths of ``color_jitter`` (a
      brightness factor ``f ~ U[1 - b, 1 + b]`` multiplies the image; the result is clipped to [0, 1];
      saturation and hue leave gray images unchanged);
    * ``rotate``: torchvision ``RandomRotation(rotation_degrees)``: an angle ~ U[-d, d] degrees about
      the center, nearest-neighbour sampling, zeros where the rotated image has no source pixel.

    Tsiligkaridis & Tsiligkaridis 2022 (Sec. 4, "Training Details") train with "standard random
    cropping, random horizontal flips, color jitter (0.25) and random rotation (2 degrees)": the
    list ``[crop, flip, color_jitter, rotate]`` with ``color_jitter: 0.25`` and ``rotation_degrees: 2``.
    Randomness comes from torch's global RNG only (crop and flip draw exactly as the former
    ``crop_flip`` preset did), so a seeded run, a resumed run and a DataLoader worker are
    reproducible.
    """

    ops: tuple[str, ...] = ()
    crop_padding: int = 4
    jitter: tuple[tuple[str, float], ...] = ()
    rotation_degrees: float = 0.0

    @classmethod
    def from_config(cls, augment="none", crop_padding: int = 4, color_jitter=None,
                    rotation_degrees: float | None = None) -> Augmentation:
        """Build from the dataset options ``augment``, ``crop_padding``, ``color_jitter`` and
        ``rotation_degrees``; the last two are required by (and only allowed with) their operation."""
        if isinstance(augment, Augmentation):
            return augment
        ops = parse_augment(augment)
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ConfigError(f"dataset.crop_padding={crop_padding!r}: expected an integer >= 0")
        for op, option, value, example in (("color_jitter", "color_jitter", color_jitter, "0.25"),
                                           ("rotate", "rotation_degrees", rotation_degrees, "2")):
            if op in ops and value is None:
                raise ConfigError(f"dataset.augment includes {op}: set dataset.{option} (e.g. {example})")
            if op not in ops and value is not None:
                raise ConfigError(f"dataset.{option}={value!r} is set but dataset.augment={augment!r} does not "
                                  f"include {op}; add it to the list or set dataset.{option}=null")
        jitter = tuple(_jitter_strengths(color_jitter).items()) if color_jitter is not None else ()
        if rotation_degrees is not None and (isinstance(rotation_degrees, bool)
                                             or not isinstance(rotation_degrees, (int, float))
                                             or not 0 <= rotation_degrees <= 180):
            raise ConfigError(f"dataset.rotation_degrees={rotation_degrees!r}: expected a number in [0, 180]")
        return cls(ops=ops, crop_padding=int(crop_padding), jitter=jitter,
                   rotation_degrees=float(rotation_degrees or 0.0))

    def __bool__(self) -> bool:
        return bool(self.ops)

    def describe(self) -> str:
        parts = {"crop": f"crop (padding {self.crop_padding})", "flip": "flip",
                 "color_jitter": "color jitter (" + ", ".join(f"{k} {v:g}" for k, v in self.jitter if v) + ")",
                 "rotate": f"rotate (+-{self.rotation_degrees:g} deg)"}
        return " -> ".join(parts[op] for op in self.ops) or "none"

    def _color_jitter(self):
        from torchvision import transforms

        return transforms.ColorJitter(**dict(self.jitter))

    def _rotation(self):
        from torchvision import transforms

        return transforms.RandomRotation(self.rotation_degrees, fill=0)

    def _random_rotation(self, image: torch.Tensor) -> torch.Tensor:
        """``RandomRotation(rotation_degrees, fill=0)`` of a tensor image: the same angle draw and the
        same pixels as torchvision (:func:`rotate_nearest`), without its batched matrix product,
        which costs milliseconds per small image when the intra-op threads are busy."""
        d = self.rotation_degrees
        angle = float(torch.empty(1).uniform_(-d, d).item())   # RandomRotation.get_params
        return rotate_nearest(image, angle)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Augment one image, a float tensor (C, H, W) in [0, 1] (C = 1 or 3); same shape out."""
        for op in self.ops:
            if op == "crop":
                _, h, w = image.shape
                p = self.crop_padding
                padded = torch.nn.functional.pad(image, (p, p, p, p))
                top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
                image = padded[:, top:top + h, left:left + w]
            elif op == "flip":
                if torch.rand(()) < 0.5:
                    image = image.flip(-1)
            elif op == "color_jitter":
                image = self._color_jitter()(image)
            elif op == "rotate":
                image = self._random_rotation(image)
        return image

    def pil_transforms(self, image_size: int, resize: int | None) -> list:
        """The torchvision transforms of an ImageFolder training split (before ``ToTensor``):
        ``crop`` is a ``RandomResizedCrop(image_size)``; without it the images are resized and
        center-cropped as the test split is."""
        from torchvision import transforms

        out = [] if "crop" in self.ops else [*([transforms.Resize(resize)] if resize else []),
                                              transforms.CenterCrop(image_size)]
        for op in self.ops:
            out.append({"crop": lambda: transforms.RandomResizedCrop(image_size),
                        "flip": transforms.RandomHorizontalFlip,
                        "color_jitter": self._color_jitter, "rotate": self._rotation}[op]())
        return out


class TensorImageDataset(Dataset):
    """Images held in memory as a uint8 tensor (N, C, H, W) with integer labels.

    ``augment`` (an :class:`Augmentation`, or a preset / list of operations) is applied per item
    at training time: ``crop_flip`` is the standard CIFAR augmentation (4-pixel zero padding,
    random crop, horizontal flip), ``flip`` only flips. Randomness comes from torch's RNG (the
    main process' state, saved in checkpoints, or a DataLoader worker's seed), so training is
    reproducible and resumable.
    """

    def __init__(self, images_uint8: torch.Tensor, labels: torch.Tensor, augment="none"):
        if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
            raise ValueError(f"expected uint8 images of shape (N, C, H, W), got {images_uint8.dtype} "
                             f"{tuple(images_uint8.shape)}")
        self.augmentation = Augmentation.from_config(augment)
        if len(images_uint8) != len(labels):
            raise ValueError(f"{len(images_uint8)} images but {len(labels)} labels")
        self.images = images_uint8
        self.labels = labels.long()

    @property
    def augment(self) -> tuple[str, ...]:
        return self.augmentation.ops

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index].float().div_(255.0)
        if self.augmentation:
            image = self.augmentation(image)
        return image, self.labels[index]

    def __getitems__(self, indices):
        """The items of a batch, as ``[self[i] for i in indices]`` (the same values, and augmentation
        drawing from the RNG in the same order), converted to float in one operation instead of one
        per image: a DataLoader (and a ``Subset`` of this dataset) fetches its batches through here.
        The conversion runs in numpy (the same IEEE float32 division by 255): torch would split these
        ~10^5 values over its intra-op threads, which costs milliseconds per batch when another
        process keeps a core busy."""
        if type(self).__getitem__ is not TensorImageDataset.__getitem__ or self.images.device.type != "cpu":
            return [self[int(i)] for i in indices]  # a subclass with items of its own
        index = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(self.images.numpy()[index].astype(np.float32) / np.float32(255.0))
        labels = self.labels[torch.from_numpy(index)]
        if self.augmentation:
            return [(self.augmentation(image), label) for image, label in zip(images, labels)]
        return list(zip(images, labels))


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
