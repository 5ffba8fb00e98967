"""The reference ImageNet-C implementation (the ``imagecorruptions`` package) behind a
batched tensor interface, for evaluation and as the ground truth of fidelity tests.

Compatibility, kept local to the package's module (nothing global is patched):
* ``glass_blur`` and ``gaussian_blur`` call ``skimage.filters.gaussian(multichannel=True)``,
  removed from scikit-image; we hand the module a ``gaussian`` that maps it to ``channel_axis=-1``.
* ``fog`` uses ``np.float_``, removed in numpy 2; the module sees a numpy proxy that maps it to
  ``np.float64``.
* ``impulse_noise`` calls ``skimage.util.random_noise`` without an ``rng``, which then draws from
  a fresh, unseeded generator; the module sees a ``skimage`` proxy whose ``random_noise`` takes its
  ``rng`` seed from numpy's global RNG, so impulse noise is seeded like the other corruptions.
* ``corrupt()`` refuses images under 32 px; we call the per-corruption functions directly,
  which accept them.

Grayscale images are replicated to RGB, corrupted, and converted back with the ITU-R 601-2
luma weights, rounded to the nearest 8-bit level (as PIL's ``convert("L")``; truncating would
turn an exact gray 100 = 0.299*100 + 0.587*100 + 0.114*100, 99.99999 in floating point, into
99), so that colored corruptions (frost, fog) keep their brightness on one-channel data. RGB
output is truncated to 8 bits as the package does (``np.uint8``).

Randomness: the package draws from numpy's global RNG. Each call seeds it from
``(seed, chunk)``, so the output is a function of the images, the corruption, the severity and
the seed, whatever the number of worker processes.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import torch

from robustexp.data.corruptions.names import ALL_CORRUPTIONS, check_corruption_request
from robustexp.utils import derive_seed

LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)
_CHUNK = 64  # images per seeded chunk; fixed so that results do not depend on the worker count


class _NumpyWithFloat_:
    """numpy, plus the ``float_`` alias that numpy 2 removed (used by imagecorruptions' fog)."""

    float_ = np.float64

    def __getattr__(self, name):
        return getattr(np, name)


def _gaussian_compat(image, sigma, multichannel=None, **kwargs):
    from skimage.filters import gaussian

    if multichannel is not None:
        kwargs.setdefault("channel_axis", -1 if multichannel else None)
    return gaussian(image, sigma=sigma, **kwargs)


class _SeededSkimageUtil:
    def __getattr__(self, name):
        import skimage.util

        return getattr(skimage.util, name)

    @staticmethod
    def random_noise(image, **kwargs):
        import skimage.util

        kwargs.setdefault("rng", int(np.random.randint(0, 2**31 - 1)))
        return skimage.util.random_noise(image, **kwargs)


class _SkimageWithSeededNoise:
    """skimage, whose ``util.random_noise`` draws its seed from numpy's global RNG."""

    util = _SeededSkimageUtil()

    def __getattr__(self, name):
        import skimage

        return getattr(skimage, name)


def _reference_functions():
    """The package's 19 corruption functions, with the compatibility shims installed."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pkg_resources deprecation on import
        import imagecorruptions.corruptions as module
    if not isinstance(module.np, _NumpyWithFloat_):
        module.np = _NumpyWithFloat_()
        module.gaussian = _gaussian_compat
        module.sk = _SkimageWithSeededNoise()
    return {name: getattr(module, name) for name in ALL_CORRUPTIONS}


def corrupt_uint8(images_hwc: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt uint8 images (N, H, W, C) with C in {1, 3}; seeds numpy's RNG once per call."""
    from PIL import Image

    function = _reference_functions()[name]
    np.random.seed(seed)
    channels = images_hwc.shape[-1]
    out = np.empty_like(images_hwc)
    with np.errstate(all="ignore"):
        for i, image in enumerate(images_hwc):
            rgb = np.repeat(image, 3, axis=-1) if channels == 1 else image
            corrupted = np.asarray(function(Image.fromarray(rgb), severity), dtype=np.float64)
            corrupted = np.nan_to_num(corrupted)
            if corrupted.ndim == 2:  # a few functions drop the channel axis for gray input
                corrupted = np.repeat(corrupted[..., None], 3, axis=-1)
            if channels == 1:  # luma, rounded to the nearest level as PIL's convert("L")
                corrupted = np.rint(corrupted[..., :3] @ LUMA_WEIGHTS)[..., None]
            out[i] = np.uint8(np.clip(corrupted, 0, 255))
    return out


def _corrupt_chunk(args):
    images, name, severity, seed = args
    return corrupt_uint8(images, name, severity, seed)


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) float in [0, 1] -> (B, H, W, C) uint8, rounding to the nearest level."""
    return (images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


def from_uint8_hwc(images: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).to(like.device, torch.float32).div_(255.0)


class ReferenceCorruptionEngine:
    """Batched ImageNet-C corruptions computed by the reference package on CPU processes.

    ``engine(images, name, severity, seed)`` takes (B, C, H, W) floats in [0, 1] and returns the
    corrupted batch, quantized to 8 bits as the reference does. ``workers`` > 1 spreads the
    chunks of a batch over processes (spawned once and reused).
    """

    name = "reference"
    family = "imagenet_c"

    def __init__(self, workers: int | None = None):
        self.workers = int(workers) if workers is not None else min(2, os.cpu_count() or 1)
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, images: torch.Tensor, name: str, severity: int, seed: int) -> torch.Tensor:
        check_corruption_request(images, name, severity)
        arrays = to_uint8_hwc(images)
        tasks = [(arrays[i:i + _CHUNK], name, severity, derive_seed(seed, name, severity, i // _CHUNK))
                 for i in range(0, len(arrays), _CHUNK)]
        if self.workers > 1 and len(tasks) > 1:
            results = list(self._executor().map(_corrupt_chunk, tasks))
        else:
            results = [_corrupt_chunk(task) for task in tasks]
        return from_uint8_hwc(np.concatenate(results), images)

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __del__(self):  # best effort; evaluators call close() explicitly
        try:
            self.close()
        except Exception:
            pass
