"""AugMix (Hendrycks et al. 2020, Sec. 3, Algorithm 1) as batched tensor code.

Every image gets ``width`` augmentation chains of ``depth`` operations (``depth = -1``: 1 to 3,
drawn per chain and image), each operation drawn uniformly from :data:`OPERATIONS` with a
severity level ``~ U(0.1, severity)`` (the reference's ``sample_level``). The chains are mixed
with weights ``w ~ Dirichlet(alpha)`` and the mixture is combined with the original image by a
skip connection ``m ~ Beta(alpha, alpha)``:

    x_augmix = (1 - m) * x + m * sum_i w_i * chain_i(x)

(AugMix's ``augment_and_mix`` mixes after normalization; the normalization is affine and the
weights sum to one, so mixing in [0, 1] pixel space, with normalization inside the model, is the
same.) The operations are the ones of the reference that do not overlap the ImageNet-C test
corruptions (no contrast, color, brightness, sharpness), with the reference's parameter scales:

* ``autocontrast``: stretch each channel of each image to [0, 1];
* ``equalize``: histogram equalization per channel (on 8-bit levels);
* ``posterize``: keep ``4 - int(level * 4 / 10)`` bits of the 8-bit levels;
* ``solarize``: invert pixels at or above ``(256 - int(level * 256 / 10)) / 255``;
* ``rotate``: ``int(level * 30 / 10)`` degrees, random sign, about the centre;
* ``shear_x`` / ``shear_y``: shear factor ``level * 0.3 / 10``, random sign, about the centre
  (PIL's affine transform in the reference shears about the top-left corner);
* ``translate_x`` / ``translate_y``: ``int(level * size / 3 / 10)`` pixels, random sign.

Geometric operations resample bilinearly and fill with black, as the reference does with PIL.
Images are (B, C, H, W) floats in [0, 1], any number of channels and any size, on any device;
operations that work on 8-bit levels (equalize, posterize) quantize their input. All random
draws come from torch's global CPU RNG (then move to the images' device), so a seed fixes the
result on every device, and the trainer's checkpointed RNG state makes resumed runs identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from robustexp.errors import ConfigError

OPERATIONS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y",
              "translate_x", "translate_y")
MAX_LEVEL = 10.0   # the reference's PARAMETER_MAX: levels are in (0, 10]


def _to_levels(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _from_levels(levels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return levels.to(dtype) / 255


def _random_sign(n: int, device: torch.device) -> torch.Tensor:
    return (torch.randint(0, 2, (n,)) * 2 - 1).to(device=device, dtype=torch.float32)


def _affine(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample ``images`` at ``theta @ (x, y, 1)`` (normalized output -> input coordinates,
    per image), bilinear, black outside the image."""
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _identity_theta(n: int, device) -> torch.Tensor:
    return torch.eye(2, 3, device=device).repeat(n, 1, 1)


def autocontrast(images: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return TF.autocontrast(images)


def equalize(images: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return _from_levels(TF.equalize(_to_levels(images)), images.dtype)


def posterize(images: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    bits = 4 - (levels * 4 / MAX_LEVEL).long()                     # 4 .. 0 bits kept
    drop = (8 - bits).to(images.device).view(-1, 1, 1, 1)
    quantized = (_to_levels(images).long() >> drop) << drop
    return _from_levels(quantized, images.dtype)


def solarize(images: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    threshold = (256 - (levels * 256 / MAX_LEVEL).long()).to(images.device, images.dtype) / 255
    threshold = threshold.view(-1, 1, 1, 1)
    return torch.where(images >= threshold, 1 - images, images)


def rotate(images: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    degrees = (levels * 30 / MAX_LEVEL).long().float().to(images.device) * _random_sign(len(images), images.device)
    angle = degrees * math.pi / 180
    h, w = images.shape[-2:]
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = _identity_theta(len(images), images.device)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    return _affine(images, theta)


def _shear(images: torch.Tensor, levels: torch.Tensor, axis: int) -> torch.Tensor:
    factor = (levels * 0.3 / MAX_LEVEL).float().to(images.device) * _random_sign(len(images), images.device)
    h, w = images.shape[-2:]
    theta = _identity_theta(len(images), images.device)
    if axis == 0:   # x_in = x + factor * y (pixels)
        theta[:, 0, 1] = factor * h / w
    else:           # y_in = y + factor * x
        theta[:, 1, 0] = factor * w / h
    return _affine(images, theta)


def shear_x(images: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return _shear(images, levels, 0)


def shear_y(images: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return _shear(images, levels, 1)


def _translate(images: torch.Tensor, levels: torch.Tensor, axis: int) -> torch.Tensor:
    size = images.shape[-1] if axis == 0 else images.shape[-2]
    pixels = (levels * (size / 3) / MAX_LEVEL).long().float().to(images.device)
    pixels = pixels * _random_sign(len(images), images.device)
    theta = _identity_theta(len(images), images.device)
    theta[:, axis, 2] = 2 * pixels / size   # the output at x shows the input at x + pixels
    return _affine(images, theta)


def translate_x(images: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return _translate(images, levels, 0)


def translate_y(images: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return _translate(images, levels, 1)


Operation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OPERATION_FUNCTIONS: dict[str, Operation] = {
    "autocontrast": autocontrast, "equalize": equalize, "posterize": posterize, "rotate": rotate,
    "solarize": solarize, "shear_x": shear_x, "shear_y": shear_y, "translate_x": translate_x,
    "translate_y": translate_y,
}


class AugMix:
    """The AugMix augmentation of a batch (see the module docstring). Defaults are the
    reference's CIFAR settings: severity 3, width 3, depth 1-3 (``-1``), alpha 1."""

    def __init__(self, severity: float = 3.0, width: int = 3, depth: int = -1, alpha: float = 1.0,
                 operations: Sequence[str] = OPERATIONS, option_prefix: str = "method."):
        unknown = [op for op in operations if op not in OPERATION_FUNCTIONS]
        if unknown or not operations:
            raise ConfigError(f"{option_prefix}operations={list(operations)}: {unknown or 'empty'}; expected a "
                              f"non-empty subset of {list(OPERATIONS)}")
        if not 0 < severity <= MAX_LEVEL:
            raise ConfigError(f"{option_prefix}severity={severity}; expected a level in (0, {MAX_LEVEL:g}]")
        if width < 1:
            raise ConfigError(f"{option_prefix}width={width}; expected at least one augmentation chain")
        if depth == 0 or depth < -1:
            raise ConfigError(f"{option_prefix}depth={depth}; expected -1 (1 to 3 per chain) or a positive depth")
        if alpha <= 0:
            raise ConfigError(f"{option_prefix}alpha={alpha}; expected > 0 (Dirichlet / Beta concentration)")
        self.severity, self.width, self.depth, self.alpha = float(severity), int(width), int(depth), float(alpha)
        self.operations = tuple(operations)

    def chain(self, images: torch.Tensor) -> torch.Tensor:
        """One augmentation chain per image: ``depth`` operations (per image 1 to 3 with
        ``depth = -1``), each drawn uniformly, with a level ~ U(0.1, severity) per image."""
        n = len(images)
        depths = torch.randint(1, 4, (n,)) if self.depth < 0 else torch.full((n,), self.depth)
        out = images
        for step in range(int(depths.max())):
            choice = torch.randint(len(self.operations), (n,))
            levels = torch.empty(n).uniform_(0.1, self.severity)
            active = depths > step
            new = out.clone()
            for k, name in enumerate(self.operations):
                members = torch.nonzero(active & (choice == k)).squeeze(1)
                if len(members):
                    index = members.to(images.device)
                    new[index] = OPERATION_FUNCTIONS[name](out[index], levels[members])
            out = new
        return out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"AugMix expects a batch (B, C, H, W), got shape {tuple(images.shape)}")
        n = len(images)
        weights = torch.distributions.Dirichlet(torch.full((self.width,), self.alpha)).sample((n,))
        skip = torch.distributions.Beta(self.alpha, self.alpha).sample((n,))
        weights, skip = weights.to(images.device, images.dtype), skip.to(images.device, images.dtype)
        mixture = torch.zeros_like(images)
        for i in range(self.width):
            mixture += weights[:, i].view(-1, 1, 1, 1) * self.chain(images)
        mixed = (1 - skip).view(-1, 1, 1, 1) * images + skip.view(-1, 1, 1, 1) * mixture
        return mixed.clamp(0, 1)   # convex combination of [0, 1] images: only rounding can leave the box
