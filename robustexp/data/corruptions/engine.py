"""A batched, seeded torch implementation of the 19 ImageNet-C corruptions.

``TorchCorruptionEngine`` has the call interface of
:class:`robustexp.data.corruptions.reference.ReferenceCorruptionEngine`:
``engine(images, name, severity, seed)`` maps a float batch (B, C, H, W) in [0, 1], C in {1, 3},
to the corrupted batch of the same shape, on the same device. Every corruption mirrors the
function of the same name in ``imagecorruptions/corruptions.py`` (severity tables copied from
it), works at any resolution, and runs as batched tensor operations on the input's device.

Structure: each corruption ``X`` is ``_apply_X(x, severity, **draws)`` where ``x`` is the RGB
batch in [0, 1] (float32) and ``draws`` are its random quantities (noise fields, angles, crop
offsets ...), plus ``_draw_X(x, severity, generator)`` that samples them with torch; the table
:data:`CORRUPTIONS` at the end lists both functions of every corruption. Splitting
the two lets the fidelity tests feed the *same* random numbers that the reference draws from
numpy and compare pixel-wise; the engine itself draws with a ``torch.Generator`` seeded from
``derive_seed(seed, name, severity)``, one independent draw per image.

Conventions copied from the reference adapter: 1-channel images are replicated to RGB,
corrupted, and converted back with luma weights (0.299, 0.587, 0.114); NaNs (spatter on an
image without any liquid) become 0; with ``quantize=True`` the output is truncated to 8-bit
levels (``np.uint8(np.clip(v, 0, 255))`` in the reference truncates, it does not round).

Known deviations (see docs/corruption_fidelity.md): the random streams differ from numpy's, so
random corruptions agree in distribution only (given the same random numbers they agree
pixel-wise; the tests replay numpy's draws); spatter (severity 1-3) replaces OpenCV's Canny edges
and mask-5 distance transform by the inner boundary of the liquid mask and an exact (truncated)
Euclidean distance; JPEG on non-CPU devices uses float DCTs instead of libjpeg's integer DCT (on
CPU it runs Pillow's codec, as the reference).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from robustexp.data.corruptions import _ops
from robustexp.data.corruptions._jpeg import jpeg_roundtrip, pil_jpeg_roundtrip
from robustexp.data.corruptions.names import ALL_CORRUPTIONS, check_corruption_request
from robustexp.errors import ConfigError, DatasetError
from robustexp.utils import derive_seed

# ------------------------------------------------------------------ severity tables (verbatim)

GAUSSIAN_NOISE = [.08, .12, 0.18, 0.26, 0.38]
SHOT_NOISE = [60, 25, 12, 5, 3]
IMPULSE_NOISE = [.03, .06, .09, 0.17, 0.27]
SPECKLE_NOISE = [.15, .2, 0.35, 0.45, 0.6]
GAUSSIAN_BLUR = [1, 2, 3, 4, 6]
GLASS_BLUR = [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)]
DEFOCUS_BLUR = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)]
MOTION_BLUR = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)]
ZOOM_BLUR = [(1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03)]
FOG = [(1.5, 2), (2., 2), (2.5, 1.7), (2.5, 1.5), (3., 1.4)]
FROST = [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)]
SNOW = [(0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)]
SPATTER = [(0.65, 0.3, 4, 0.69, 0.6, 0),
           (0.65, 0.3, 3, 0.68, 0.6, 0),
           (0.65, 0.3, 2, 0.68, 0.5, 0),
           (0.65, 0.3, 1, 0.65, 1.5, 1),
           (0.67, 0.4, 1, 0.65, 1.5, 1)]
CONTRAST = [0.4, .3, .2, .1, .05]
BRIGHTNESS = [.1, .2, .3, .4, .5]
SATURATE = [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)]
JPEG_QUALITY = [25, 18, 15, 10, 7]
PIXELATE = [0.6, 0.5, 0.4, 0.3, 0.25]
ELASTIC_ALPHA = [250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12]

FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")  # randint(5): 6th unused


def zoom_factors(severity: int) -> list[float]:
    """``np.arange(start, stop, step)`` of the reference zoom_blur table, as floats."""
    import numpy as np

    start, stop, step = ZOOM_BLUR[severity - 1]
    return [float(z) for z in np.arange(start, stop, step)]


def _uniform(shape, low, high, g, device):
    return torch.rand(shape, generator=g, device=device) * (high - low) + low


# ------------------------------------------------------------------ noise


def _draw_gaussian_noise(x, severity, g):
    return {"z": torch.randn(x.shape, generator=g, device=x.device)}


def _apply_gaussian_noise(x, severity, z):
    """Mirrors ``gaussian_noise``: x + N(0, c^2), c in [.08, .12, .18, .26, .38]; clip to [0, 1]."""
    c = GAUSSIAN_NOISE[severity - 1]
    return torch.add(x, z, alpha=c).clamp_(0, 1)


def _draw_shot_noise(x, severity, g):
    """Poisson(x * c) counts. Images on 8-bit levels (what the reference sees: it converts to uint8
    first) take the exact table sampler ``_ops.poisson_levels`` (256 rates per severity, ~4x faster
    than ``torch.poisson``); other inputs ``torch.poisson`` with the rate x * c as given."""
    c = SHOT_NOISE[severity - 1]
    v = x * 255.0
    levels = torch.round(v)
    if bool(v.sub_(levels).abs_().le_(1e-3).all()):
        return {"counts": _ops.poisson_levels(levels, c, g)}
    return {"counts": torch.poisson(x * c, generator=g)}


def _apply_shot_noise(x, severity, counts):
    """Mirrors ``shot_noise``: Poisson(x * c) / c, c in [60, 25, 12, 5, 3]; clip to [0, 1]."""
    c = SHOT_NOISE[severity - 1]
    return counts.div(float(c)).clamp_(0, 1)


def _draw_impulse_noise(x, severity, g):
    return {"u": torch.rand(x.shape, generator=g, device=x.device)}


def _apply_impulse_noise(x, severity, u):
    """Mirrors ``impulse_noise`` (``skimage.util.random_noise(mode='s&p', amount=c)``, amount in
    [.03, .06, .09, .17, .27]): each channel value independently is flipped with probability
    ``amount``, to 1 (salt) or 0 (pepper) with probability 1/2 each. One uniform per value:
    u < amount/2 -> salt, amount/2 <= u < amount -> pepper (the same joint distribution as
    skimage's two Bernoulli draws)."""
    c = IMPULSE_NOISE[severity - 1]
    out = x.masked_fill(u < c, 0.0)
    return out.masked_fill_(u < c / 2, 1.0)


def _draw_speckle_noise(x, severity, g):
    return {"z": torch.randn(x.shape, generator=g, device=x.device)}


def _apply_speckle_noise(x, severity, z):
    """Mirrors ``speckle_noise``: x + x * N(0, c^2), c in [.15, .2, .35, .45, .6]; clip."""
    c = SPECKLE_NOISE[severity - 1]
    return z.mul(c).add_(1.0).mul_(x).clamp_(0, 1)  # x + x * c z


# ------------------------------------------------------------------ blur


def _apply_gaussian_blur(x, severity):
    """Mirrors ``gaussian_blur``: ``skimage.filters.gaussian(sigma=c)`` per channel (mode
    'nearest', truncate 4), sigma in [1, 2, 3, 4, 6]; clip."""
    return _ops.gaussian_filter(x, GAUSSIAN_BLUR[severity - 1]).clamp_(0, 1)  # sigma >= 1: a new tensor


def _draw_glass_blur(x, severity, g):
    _, delta, iterations = GLASS_BLUR[severity - 1]
    b, _, h, w = x.shape
    shape = (iterations, 2, b, h, w)  # (dy, dx) used when pixel (h, w) is visited
    # int16: the same values as int64 (one 32-bit draw per value either way), a quarter of the memory
    return {"offsets": torch.randint(-delta, delta, shape, generator=g, device=x.device, dtype=torch.int16)}


def glass_shuffle(y: torch.Tensor, delta: int, offsets: torch.Tensor) -> torch.Tensor:
    """The reference's local pixel "shuffling", exactly, without its sequential loop.

    Reference: per iteration, visit (h, w) for h = H - delta ... delta + 1 and
    w = W - delta ... delta + 1 (reverse raster order) and run
    ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` with (h', w') = (h + dy, w + dx),
    dx, dy ~ U{-delta .. delta - 1}. On numpy arrays the right-hand side holds *views*, so this
    is a copy, not a swap: x[h, w] <- x[h', w'], and (h', w') keeps its value. A position is
    written only at its visit, so the value it ends the pass with is the pass-start value of
    ``src(p)``, where src(p) = q = p + d_p if q is not visited later in the pass (q not in the
    visited set, or q at or before p in raster order) and src(p) = src(q) otherwise. The chains
    p -> q -> ... strictly increase in raster order, so src is resolved by pointer jumping on the
    positions whose chain has not ended yet (about log2 of the longest chain rounds, each on fewer
    positions). The passes compose: one gather of the image at the end.
    ``offsets`` (iterations, 2, B, H, W) holds (dy, dx) for each visited position (any integer dtype).
    """
    b, c, h, w = y.shape
    n = h * w
    dev = y.device
    idx = torch.arange(n, device=dev)
    hh, ww = idx // w, idx % w
    visited = (hh > delta) & (hh <= h - delta) & (ww > delta) & (ww <= w - delta)
    base = torch.arange(b, device=dev).view(b, 1) * n
    composed = None
    for it in range(offsets.shape[0]):
        dy = offsets[it, 0].reshape(b, n).long()
        dx = offsets[it, 1].reshape(b, n).long()
        # a visited p reads q = p + (dy, dx) inside the image (|d| <= delta): no wrap-around
        hq, wq = hh + dy, ww + dx
        later = (hq > delta) & (hq <= h - delta) & (wq > delta) & (wq <= w - delta)  # q visited ...
        later &= (dy > 0) | ((dy == 0) & (dx > 0))  # ... after p (q later in raster order)
        later &= visited
        src = torch.where(visited, idx + dy * w + dx, idx).add_(base).view(-1)  # flat over the batch
        done = ~later.view(-1)
        active = later.view(-1).nonzero().squeeze(1)
        while active.numel():  # pointer jumping on the unresolved positions only
            nxt = src[active]
            src[active] = src[nxt]
            ended = done[nxt]
            done[active] = ended
            active = active[~ended]
        local = src.view(b, n) - base
        composed = local if composed is None else composed.gather(1, local)
    flat = y.reshape(b, c, n)
    if composed is None:
        return y
    return flat.gather(2, composed.unsqueeze(1).expand(b, c, n)).view(b, c, h, w)


def _apply_glass_blur(x, severity, offsets):
    """Mirrors ``glass_blur`` (sigma, max_delta, iterations) in [(0.7, 1, 2), (0.9, 2, 1),
    (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)]: Gaussian blur (sigma), truncation to uint8, local pixel
    "shuffling" (``glass_shuffle``: the reference's sequential copy loop, resolved exactly; run as
    ``_ops.glass_shuffle``, the same permutation with less work), Gaussian blur again; clip."""
    sigma, delta, _ = GLASS_BLUR[severity - 1]
    y = _ops.gaussian_filter(x, sigma).mul_(255).add_(1e-4).floor_().clamp_(0, 255)  # np.uint8(... * 255)
    y = _ops.glass_shuffle(y, delta, offsets)
    return _ops.gaussian_filter(y.div_(255.0), sigma).clamp_(0, 1)


@cache
def _disk_kernel(radius: int, alias_blur: float) -> torch.Tensor:
    """``imagecorruptions.disk``: a normalised aliased disk on a (17 x 17 or 2r+1) grid, smoothed by
    ``cv2.GaussianBlur(ksize=3 or 5, sigma=alias_blur)`` (border reflect-101)."""
    if radius <= 8:
        half, ksize = 8, 3
    else:
        half, ksize = radius, 5
    L = torch.arange(-half, half + 1, dtype=torch.float64)
    Y, X = torch.meshgrid(L, L, indexing="ij")
    disk = ((X ** 2 + Y ** 2) <= radius ** 2).to(torch.float32)
    disk = disk / disk.sum()
    t = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    g = torch.exp(-t * t / (2 * alias_blur * alias_blur))
    g = (g / g.sum()).to(torch.float32)
    n = disk.shape[0]
    m = _ops.filter_matrix(n, g.to(torch.float64), "reflect101", "cpu", torch.float64)
    return _ops.apply_axes(disk.to(torch.float64), m, m).to(torch.float32)


def _apply_defocus_blur(x, severity):
    """Mirrors ``defocus_blur`` (radius, alias_blur) in [(3, .1), (4, .5), (6, .5), (8, .5),
    (10, .5)]: ``cv2.filter2D`` with the ``disk`` kernel per channel (border reflect-101), here
    as an FFT correlation; clip."""
    radius, alias = DEFOCUS_BLUR[severity - 1]
    kernel = _disk_kernel(radius, alias).to(x.device)
    return _ops.correlate2d_fft(x, kernel, "reflect101").clamp(0, 1)


def _draw_motion_blur(x, severity, g):
    return {"angles": _uniform((x.shape[0],), -45.0, 45.0, g, x.device)}


def _apply_motion_blur(x, severity, angles):
    """Mirrors ``motion_blur`` / ``_motion_blur`` (radius, sigma) in [(10, 3), (15, 5), (15, 8),
    (15, 12), (20, 15)], one angle ~ U(-45, 45) per image, on the uint8-scaled image; clip."""
    radius, sigma = MOTION_BLUR[severity - 1]
    out = _ops.motion_blur(x * 255.0, radius, sigma, angles, angle_range=(-45.0, 45.0))
    return out.clamp(0, 255).div_(255.0)


def _apply_zoom_blur(x, severity):
    """Mirrors ``zoom_blur``: the mean of the image and its ``clipped_zoom`` by each factor of
    ``np.arange(1, 1.11, .01)`` ... ``np.arange(1, 1.31, .03)`` (scipy zoom, order 1); clip."""
    factors = zoom_factors(severity)
    out = x.clone()
    for z in factors:
        out += _ops.clipped_zoom(x, z)  # factor 1 is x itself (no resampling)
    return out.div_(len(factors) + 1).clamp_(0, 1)


# ------------------------------------------------------------------ weather


def _draw_snow(x, severity, g):
    b, _, h, w = x.shape
    return {"z": torch.randn((b, h, w), generator=g, device=x.device),
            "angles": _uniform((b,), -135.0, -45.0, g, x.device)}


def _apply_snow(x, severity, z, angles):
    """Mirrors ``snow`` (loc, scale, zoom, threshold, blur radius, blur sigma, blend) in the
    reference table: a N(loc, scale) layer, ``clipped_zoom`` (not cut back to H x W before the
    blur, as in the reference), thresholded, motion-blurred at an
    angle ~ U(-135, -45) per image, rounded to 8 bits; the image is brightened towards
    ``max(x, 1.5 * gray + 0.5)`` and the layer and its 180-degree rotation are added; clip."""
    loc, scale, zoom, thr, radius, sigma, blend = SNOW[severity - 1]
    layer = z.to(x.dtype).mul(scale).add_(loc).unsqueeze(1)  # float32: ~1e-7 of a level before the rounding
    layer = _ops.clipped_zoom(layer, zoom, cut=False)  # the reference blurs the uncut zoom
    layer = layer.masked_fill_(layer < thr, 0.0).clamp_(0, 1)
    layer = _ops.motion_blur(layer, radius, sigma, angles, angle_range=(-135.0, -45.0))
    h, w = x.shape[-2:]
    layer = layer[..., :h, :w].mul(255).round_().div_(255).to(x.dtype)
    brightened = torch.maximum(x, _ops.luma(x).mul_(1.5).add_(0.5)).mul_(1 - blend)
    x = x.mul(blend).add_(brightened)  # blend * x + (1 - blend) * max(x, 1.5 gray + 0.5)
    return x.add_(layer).add_(layer.flip(-1, -2)).clamp_(0, 1)


@cache
def _frost_sources() -> tuple[torch.Tensor, ...]:
    """The frost images shipped with ``imagecorruptions`` (read with cv2 like the reference), RGB
    uint8-valued float32 (3, h, w), loaded once."""
    import importlib.util

    import cv2

    spec = importlib.util.find_spec("imagecorruptions")  # located, not imported (its import warns)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("frost needs the frost images of the imagecorruptions package "
                           "(pip install imagecorruptions==1.1.2)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "frost"
    images = []
    for name in FROST_FILES:
        bgr = cv2.imread(str(folder / name))
        if bgr is None:
            raise DatasetError(f"frost image {folder / name} is missing or unreadable (it ships with imagecorruptions)")
        images.append(torch.from_numpy(bgr[..., ::-1].copy()).permute(2, 0, 1).float())
    return tuple(images)


def _frost_scale(frost_hw, x_hw) -> float:
    (fh, fw), (h, w) = frost_hw, x_hw
    if fh >= h and fw >= w:
        s = 1.0
    elif fh < h and fw >= w:
        s = h / fh
    elif fh >= h and fw < w:
        s = w / fw
    else:
        s = max(h / fh, w / fw)
    return s * 1.1


_FROST_CACHE: dict = {}


def _frost_bank(h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For an image size (h, w): the 5 rescaled frost images zero-padded into one tensor
    (5, 3, Hmax, Wmax) and their sizes (5, 2). Cached per (h, w, device)."""
    key = (h, w, str(device))
    if key not in _FROST_CACHE:
        resized = []
        for src in _frost_sources():
            fh, fw = src.shape[1:]
            s = _frost_scale((fh, fw), (h, w))
            nh, nw = int(math.ceil(fh * s)), int(math.ceil(fw * s))
            # cv2.resize(INTER_CUBIC) ~ bicubic (a = -0.75), half-pixel centres, uint8 result
            r = F.interpolate(src.unsqueeze(0), size=(nh, nw), mode="bicubic", align_corners=False)
            resized.append(torch.round(r[0]).clamp(0, 255))
        hmax = max(r.shape[1] for r in resized)
        wmax = max(r.shape[2] for r in resized)
        bank = torch.zeros(len(resized), 3, hmax, wmax)
        for i, r in enumerate(resized):
            bank[i, :, : r.shape[1], : r.shape[2]] = r
        sizes = torch.tensor([list(r.shape[1:]) for r in resized])
        _FROST_CACHE[key] = (bank.to(device), sizes.to(device))
    return _FROST_CACHE[key]


def _draw_frost(x, severity, g):
    b, _, h, w = x.shape
    _, sizes = _frost_bank(h, w, x.device)
    idx = torch.randint(0, len(FROST_FILES), (b,), generator=g, device=x.device)
    hi_h = sizes[idx, 0] - h
    hi_w = sizes[idx, 1] - w
    u = torch.rand((2, b), generator=g, device=x.device, dtype=torch.float64)
    x_start = torch.floor(u[0] * hi_h).long()
    y_start = torch.floor(u[1] * hi_w).long()
    return {"idx": idx, "x_start": x_start, "y_start": y_start}


def _apply_frost(x, severity, idx, x_start, y_start):
    """Mirrors ``frost`` (image weight, frost weight) in [(1, .4), (.8, .6), (.7, .7), (.65, .7),
    (.6, .75)]: one of the first five frost images (index ~ randint(5) per image), resized by
    1.1x (times the upscale needed to cover the image) with bicubic interpolation, randomly
    cropped to the image size, blended as ``clip(a * x + b * frost, 0, 255)``."""
    a, bw = FROST[severity - 1]
    b, c, h, w = x.shape
    bank, _ = _frost_bank(h, w, x.device)
    rows = x_start.view(b, 1) + torch.arange(h, device=x.device).view(1, h)
    cols = y_start.view(b, 1) + torch.arange(w, device=x.device).view(1, w)
    crop = bank[idx.view(b, 1, 1), :, rows.view(b, h, 1), cols.view(b, 1, w)]  # (b, h, w, 3)
    crop = crop.permute(0, 3, 1, 2).to(x.dtype)
    return x.mul(255).mul_(a).add_(crop.mul_(bw)).clamp_(0, 255).div_(255.0)  # (a * 255 x + bw * crop)


def plasma_fractal(batch: int, mapsize: int, wibbledecay: float, g, device) -> torch.Tensor:
    """``imagecorruptions.plasma_fractal`` (diamond-square), batched: (batch, mapsize, mapsize) in
    [0, 1]. The loop runs over the log2(mapsize) scales; each scale is fully vectorised. Also the
    fog of MNIST-C (:mod:`robustexp.data.corruptions.mnist_c`), whose plasma is the same function."""
    if mapsize < 1 or mapsize & (mapsize - 1):
        raise ValueError(f"plasma_fractal mapsize must be a power of two, got {mapsize}")
    m = torch.zeros(batch, mapsize, mapsize, dtype=torch.float32, device=device)
    step = mapsize
    wibble = 100.0

    def wibbled_mean(a):
        u = torch.rand(a.shape, generator=g, device=device)
        return a / 4 + u.mul_(2 * wibble * wibble).sub_(wibble * wibble)

    while step >= 2:
        half = step // 2
        corner = m[:, 0::step, 0::step]
        sq = corner + torch.roll(corner, -1, 1)
        sq = sq + torch.roll(sq, -1, 2)
        m[:, half::step, half::step] = wibbled_mean(sq)
        dr = m[:, half::step, half::step]
        ul = m[:, 0::step, 0::step]
        lt = dr + torch.roll(dr, 1, 1) + ul + torch.roll(ul, -1, 2)
        m[:, 0::step, half::step] = wibbled_mean(lt)
        tt = dr + torch.roll(dr, 1, 2) + ul + torch.roll(ul, -1, 1)
        m[:, half::step, 0::step] = wibbled_mean(tt)
        step //= 2
        wibble /= wibbledecay
    m = m - m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True)


def _fog_mapsize(h: int, w: int) -> int:
    side = max(h, w, 3)  # the reference takes the max over (H, W, 3)
    return 1 if side == 0 else 2 ** (side - 1).bit_length()


def _draw_fog(x, severity, g):
    b, _, h, w = x.shape
    plasma = plasma_fractal(b, _fog_mapsize(h, w), FOG[severity - 1][1], g, x.device)
    return {"plasma": plasma[:, :h, :w]}


def _apply_fog(x, severity, plasma):
    """Mirrors ``fog`` (strength, wibble decay) in [(1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5),
    (3, 1.4)]: adds strength * plasma fractal (map size: next power of two of the largest side),
    rescales by max / (max + strength) with the per-image maximum; clip."""
    strength = FOG[severity - 1][0]
    max_val = x.amax((1, 2, 3), keepdim=True)
    y = x + strength * plasma.to(x.dtype).unsqueeze(1)
    return y.mul_(max_val).div_(max_val + strength).clamp_(0, 1)


def _apply_brightness(x, severity):
    """Mirrors ``brightness``: V += c in HSV (skimage), c in [.1, .2, .3, .4, .5]; clip."""
    c = BRIGHTNESS[severity - 1]
    return _ops.hsv_adjust(x, value=lambda v: (v + c).clamp(0, 1)).clamp_(0, 1)


# ------------------------------------------------------------------ digital


def _apply_contrast(x, severity):
    """Mirrors ``contrast``: (x - m) * c + m with the per-channel mean m, c in [.4, .3, .2, .1,
    .05]; clip."""
    c = CONTRAST[severity - 1]
    means = x.mean((2, 3), keepdim=True)
    return (x - means).mul_(c).add_(means).clamp_(0, 1)


def _apply_saturate(x, severity):
    """Mirrors ``saturate``: S = clip(S * a + b) in HSV (skimage), (a, b) in [(.3, 0), (.1, 0),
    (2, 0), (5, .1), (20, .2)]; clip."""
    a, b = SATURATE[severity - 1]
    return _ops.hsv_adjust(x, saturation=lambda s: (s * a + b).clamp(0, 1)).clamp_(0, 1)


def _apply_jpeg_compression(x, severity):
    """Mirrors ``jpeg_compression``: PIL JPEG save/load at quality in [25, 18, 15, 10, 7]
    (libjpeg, 4:2:0, standard tables). On CPU this *is* Pillow's codec (bit-identical); on other
    devices the torch pipeline of ``_jpeg`` (see there for what is exact and what is not)."""
    q = JPEG_QUALITY[severity - 1]
    v = x.mul(255).round_()
    if _ops.cpu_paths(x.device):
        return pil_jpeg_roundtrip(v, q).div_(255.0)
    return jpeg_roundtrip(v, q) / 255.0


@cache
def _pil_box_matrix(n_in: int, n_out: int, device: str, dtype) -> _ops.BlockedMatrix:
    """``_pil_box_weights`` as a cached ``BlockedMatrix`` (each output averages a few inputs)."""
    return _ops.BlockedMatrix(_pil_box_weights(n_in, n_out, device).to(dtype))


def _pil_box_weights(n_in: int, n_out: int, device) -> torch.Tensor:
    """(n_out, n_in) weights of Pillow's BOX resampling (``precompute_coeffs`` in Resample.c,
    float64 like the C code; the box is ``-0.5 < t <= 0.5``)."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    ss = 1.0 / filterscale
    wts = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        for j in range(lo, hi):
            t = (j - center + 0.5) * ss
            wts[o, j] = 1.0 if -0.5 < t <= 0.5 else 0.0
        wts[o] /= wts[o].sum()
    return wts.to(device)


@cache
def _pil_nearest_index(n_in: int, n_out: int, device) -> torch.Tensor:
    """Source indices of Pillow's NEAREST resize (``ImagingScaleAffine``): the coordinate starts
    at ``scale / 2`` and is *accumulated* in float64, which matters at exact integers."""
    scale = n_in / n_out
    xo = scale * 0.5
    out = []
    for _ in range(n_out):
        out.append(min(int(xo), n_in - 1))
        xo += scale
    return torch.tensor(out, device=device)


def _apply_pixelate(x, severity):
    """Mirrors ``pixelate``: PIL ``resize`` to int(size * c) with BOX, then back with NEAREST,
    c in [.6, .5, .4, .3, .25]. BOX is applied horizontally then vertically with 8-bit rounding
    after each pass, as Pillow does."""
    c = PIXELATE[severity - 1]
    _, _, h, w = x.shape
    sh, sw = int(h * c), int(w * c)
    v = x.mul(255).round_()
    wx = _pil_box_matrix(w, sw, str(x.device), x.dtype)
    wy = _pil_box_matrix(h, sh, str(x.device), x.dtype)
    v = wx.right(v).add_(0.5 + 1e-4).floor_().clamp_(0, 255)
    v = wy.left(v).add_(0.5 + 1e-4).floor_().clamp_(0, 255)
    rows, cols = _pil_nearest_index(sh, h, str(x.device)), _pil_nearest_index(sw, w, str(x.device))
    return _ops.take_rows_cols(v, rows, cols).div_(255.0)


def _draw_elastic_transform(x, severity, g):
    b, _, h, w = x.shape
    m = h * 0.005  # max_dx = max_dy = shape[0] * 0.005 in the reference
    return {"ux": _uniform((b, h, w), -m, m, g, x.device),
            "uy": _uniform((b, h, w), -m, m, g, x.device)}


def _apply_elastic_transform(x, severity, ux, uy):
    """Mirrors ``elastic_transform``: displacement fields U(-H/200, H/200) smoothed by
    ``skimage.filters.gaussian(sigma=(H/100, W/100), mode='reflect', truncate=3)`` times alpha in
    250 * [.05, .065, .085, .1, .12]; bilinear resampling (``map_coordinates(order=1,
    mode='reflect')``) at (y + dy, x + dx); clip."""
    b, c, h, w = x.shape
    alpha = ELASTIC_ALPHA[severity - 1]
    sigma = (h * 0.01, w * 0.01)
    # float32 smoothing: a smoothed displacement of a few pixels is exact to ~1e-6 px
    dx = _ops.gaussian_filter(ux.to(x.dtype), sigma, truncate=3, mode="symmetric").mul_(alpha)
    dy = _ops.gaussian_filter(uy.to(x.dtype), sigma, truncate=3, mode="symmetric").mul_(alpha)
    # map_coordinates(order=1, mode='reflect') == bilinear grid_sample with reflection about the
    # pixel borders (align_corners=False): both extend the image symmetrically
    ys = torch.arange(h, device=x.device, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, device=x.device, dtype=torch.float32).view(1, 1, w)
    gx = dx.add_(xs).mul_(2).add_(1).div_(w).sub_(1)  # (2 * (xs + dx) + 1) / w - 1, in place
    gy = dy.add_(ys).mul_(2).add_(1).div_(h).sub_(1)
    grid = torch.stack((gx, gy), -1).to(x.dtype)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.clamp_(0, 1)


def _draw_spatter(x, severity, g):
    b, _, h, w = x.shape
    return {"z": torch.randn((b, h, w), generator=g, device=x.device)}


_EMBOSS = torch.tensor([[-2., -1., 0.], [-1., 1., 1.], [0., 1., 2.]])
_BOX3 = torch.full((3, 3), 1.0 / 9.0)


def _nearest_1d(edges: torch.Tensor, dim: int) -> torch.Tensor:
    """Distance along ``dim`` to the nearest True of ``edges`` (inf where the line has none)."""
    n = edges.shape[dim]
    shape = [1] * edges.ndim
    shape[dim] = n
    idx = torch.arange(n, device=edges.device, dtype=torch.float32).view(shape)
    inf = torch.tensor(float("inf"), device=edges.device)
    last = torch.where(edges, idx, -inf).cummax(dim).values
    nxt = torch.where(edges, idx, inf).flip(dim).cummin(dim).values.flip(dim)
    return torch.minimum(idx - last, nxt - idx)


def _truncated_edt(edges: torch.Tensor, limit: int) -> torch.Tensor:
    """Euclidean distance to the nearest True of ``edges`` (N, H, W), exact up to ``limit`` and
    ``limit`` beyond: the column pass is a cumulative max/min of edge positions, the row pass a
    min-plus over the +-limit horizontal offsets."""
    n, h, w = edges.shape
    big = float(limit * limit + 1)
    g = _nearest_1d(edges, 1).clamp(max=limit + 1)
    g = (g * g).clamp(max=big)
    padded = F.pad(g, (limit, limit), value=big)
    best = g.clone()
    for d in range(1, limit + 1):
        torch.minimum(best, padded[:, :, limit + d:limit + d + w] + d * d, out=best)
        torch.minimum(best, padded[:, :, limit - d:limit - d + w] + d * d, out=best)
    return best.sqrt_().clamp_(max=float(limit))


def _equalize_hist(v: torch.Tensor) -> torch.Tensor:
    """``cv2.equalizeHist`` per image on integer-valued (N, H, W) in 0..255."""
    n = v.shape[0]
    flat = v.reshape(n, -1).long()
    hist = torch.zeros(n, 256, device=v.device).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    total = flat.shape[1]
    first = (hist > 0).float().argmax(1, keepdim=True)
    hmin = hist.gather(1, first)
    cdf = hist.cumsum(1)
    denom = (total - hmin).clamp(min=1)
    lut = torch.round((cdf - hmin) * (255.0 / denom)).clamp(0, 255)
    lut = torch.where(torch.arange(256, device=v.device).view(1, -1) <= first, torch.zeros_like(lut), lut)
    # all pixels equal: OpenCV returns a constant image equal to the input level
    flat_case = (hmin == total)
    out = lut.gather(1, flat)
    out = torch.where(flat_case, flat.float(), out)
    return out.view_as(v)


def _apply_spatter(x, severity, z):
    """Mirrors ``spatter`` (loc, scale, sigma, threshold, intensity, mode) in the reference table.

    Mode 0 (severity 1-3, water): a N(loc, scale) layer smoothed by ``gaussian(sigma)`` and
    thresholded; the reference then takes ``cv2.Canny`` edges of its uint8 version, the
    (mask-5) distance transform to them truncated at 20, 3x3 blur, histogram equalisation,
    an emboss ``filter2D`` and another blur, multiplies by the liquid layer, normalises by the
    maximum and adds it in pale turquoise. Deviation: the Canny edges are replaced by the inner
    boundary of the liquid mask (4-neighbourhood) and the distance is the exact Euclidean one.
    Mode 1 (severity 4-5, mud): the thresholded mask smoothed by ``gaussian(intensity)``, values
    under 0.8 zeroed, blends the image towards mud brown (exact).
    """
    loc, scale, sigma, thr, intensity, mode = SPATTER[severity - 1]
    b, c, h, w = x.shape
    liquid = _ops.gaussian_filter(z.to(x.dtype).mul(scale).add_(loc), sigma)  # sigma >= 1: a new tensor
    liquid = liquid.masked_fill_(liquid < thr, 0.0)
    if mode == 0:
        l8 = liquid.mul(255).floor_().remainder_(256).float()  # astype(np.uint8)
        mask = l8 > 0
        # erosion by the 4-neighbourhood cross (edge-replicated border) as shifted ANDs
        mp = _ops.pad(mask, 1, 1, 1, 1, "nearest")
        eroded = mask & mp[:, :-2, 1:-1] & mp[:, 2:, 1:-1] & mp[:, 1:-1, :-2] & mp[:, 1:-1, 2:]
        edges = mask & ~eroded
        dist = _ops.truncated_edt(edges, 20)  # _truncated_edt's result, less work
        dist = _ops.correlate2d(dist, _BOX3.to(x.device), "reflect101").add_(1e-4).floor_()
        dist = _equalize_hist(dist)
        dist = _ops.correlate2d(dist, _EMBOSS.to(x.device), "reflect101").round_().clamp_(0, 255)
        dist = _ops.correlate2d(dist, _BOX3.to(x.device), "reflect101")
        m = l8.mul_(dist)
        m = m.div_(m.amax((1, 2), keepdim=True))  # NaN when there is no liquid, as in the reference
        m = m.mul_(intensity).unsqueeze(1).to(x.dtype)
        color = torch.tensor([175 / 255., 238 / 255., 238 / 255.], device=x.device, dtype=x.dtype)
        return (m * color.view(1, 3, 1, 1)).add_(x).clamp_(0, 1)  # x + m * color
    mud = (liquid > thr).float()
    mud = _ops.gaussian_filter(mud, intensity)
    mud = mud.masked_fill_(mud < 0.8, 0.0).unsqueeze(1).to(x.dtype)
    color = torch.tensor([63 / 255., 42 / 255., 20 / 255.], device=x.device, dtype=x.dtype)
    return (x * (1 - mud)).add_(color.view(1, 3, 1, 1) * mud).clamp_(0, 1)


# ------------------------------------------------------------------ registry and engine


@dataclass(frozen=True)
class Corruption:
    """One corruption of the engine: ``apply(x, severity, **draws)`` corrupts the RGB batch ``x``
    given its random quantities, which ``draw(x, severity, generator)`` samples (a dict of the
    keyword arguments of ``apply``); ``draw`` is None for a deterministic corruption."""

    apply: Callable[..., torch.Tensor]
    draw: Callable[..., dict[str, torch.Tensor]] | None = None


CORRUPTIONS: dict[str, Corruption] = {
    # noise
    "gaussian_noise": Corruption(_apply_gaussian_noise, _draw_gaussian_noise),
    "shot_noise": Corruption(_apply_shot_noise, _draw_shot_noise),
    "impulse_noise": Corruption(_apply_impulse_noise, _draw_impulse_noise),
    # blur
    "defocus_blur": Corruption(_apply_defocus_blur),
    "glass_blur": Corruption(_apply_glass_blur, _draw_glass_blur),
    "motion_blur": Corruption(_apply_motion_blur, _draw_motion_blur),
    "zoom_blur": Corruption(_apply_zoom_blur),
    # weather
    "snow": Corruption(_apply_snow, _draw_snow),
    "frost": Corruption(_apply_frost, _draw_frost),
    "fog": Corruption(_apply_fog, _draw_fog),
    "brightness": Corruption(_apply_brightness),
    # digital
    "contrast": Corruption(_apply_contrast),
    "elastic_transform": Corruption(_apply_elastic_transform, _draw_elastic_transform),
    "pixelate": Corruption(_apply_pixelate),
    "jpeg_compression": Corruption(_apply_jpeg_compression),
    # hold-out
    "speckle_noise": Corruption(_apply_speckle_noise, _draw_speckle_noise),
    "gaussian_blur": Corruption(_apply_gaussian_blur),
    "spatter": Corruption(_apply_spatter, _draw_spatter),
    "saturate": Corruption(_apply_saturate),
}


def check_registry(table: dict[str, Corruption], names: tuple[str, ...] = ALL_CORRUPTIONS) -> None:
    """Every corruption of ``names`` has an entry in ``table`` and the table has no other: checked
    at import, so a corruption added to :data:`ALL_CORRUPTIONS` without its functions fails at once
    (not at the first run that asks for it)."""
    missing, unknown = [n for n in names if n not in table], [n for n in table if n not in names]
    if missing or unknown:
        raise RuntimeError(f"robustexp/data/corruptions/engine.py: CORRUPTIONS has no entry for {missing} and "
                          f"entries for unknown corruptions {unknown}; expected exactly the names of "
                          f"names.ALL_CORRUPTIONS, each with its apply (and, if random, draw) function")


check_registry(CORRUPTIONS)
DETERMINISTIC = tuple(name for name in ALL_CORRUPTIONS if CORRUPTIONS[name].draw is None)


def finish(out_rgb: torch.Tensor, channels: int, quantize: bool, out: torch.Tensor | None = None,
           in_place: bool = False) -> torch.Tensor:
    """The reference adapter's tail: NaN -> 0; for 1-channel input luma rounded to 8-bit levels
    (PIL's convert("L")); for RGB 8-bit truncation (np.uint8 in the reference). ``out``: write the
    result there (a float32 tensor of the result's shape); ``in_place``: ``out_rgb`` may be
    overwritten (the engine passes the fresh result of a corruption)."""
    if in_place:
        work = torch.nan_to_num_(out_rgb, nan=0.0, posinf=1.0, neginf=0.0)
    else:
        work = torch.nan_to_num(out_rgb, nan=0.0, posinf=1.0, neginf=0.0)
    if channels == 1:
        work = _ops.luma(work).clamp_(0, 1)
        if quantize:
            work = work.mul_(255).round_()
            return torch.div(work, 255, out=out) if out is not None else work.div_(255)
    else:
        work.clamp_(0, 1)
        if quantize:  # truncation, like np.uint8(...); the margin absorbs float32 rounding
            work = work.mul_(255).add_(1e-3).floor_()
            return torch.div(work, 255, out=out) if out is not None else work.div_(255)
    if out is not None:
        return out.copy_(work)
    return work


def _prepare(chunk: torch.Tensor, device: torch.device, channels: int) -> torch.Tensor:
    """A sub-batch of the engine's input as the corruptions take it: float32 in [0, 1], RGB."""
    x = chunk.detach().to(device=device, dtype=torch.float32).clamp(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous() if channels == 1 else x


# ------------------------------------------------------------------ CPU worker threads

_POOLS: dict[tuple[int, str, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _single_threaded_init(phase: threading.Barrier, seen: list[int]) -> None:
    """Run once in each new pool thread: torch's lazy per-thread setup first (it copies the
    process-wide intra-op thread count into the thread), then one intra-op thread for this thread.
    ``torch.set_num_threads`` sets the calling thread's OpenMP / MKL thread count *and* a
    process-wide default that threads created later copy; :func:`_worker_pool` restores that
    default once every pool thread has set its own."""
    seen.append(torch.get_num_threads())
    phase.wait()
    torch.set_num_threads(1)
    phase.wait()


def _worker_pool(threads: int, kind: str) -> ThreadPoolExecutor:
    """The process's pool of ``threads`` worker threads for ``kind`` ('apply' or 'draw'), each
    running torch on one intra-op thread; created on first use, shared by all engines and reused
    (a bounded number of idle threads, never one per call), created anew in a forked child (whose
    copy of the parent's pool has no threads)."""
    key = (os.getpid(), kind, threads)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = ThreadPoolExecutor(threads, thread_name_prefix=f"corruption-{kind}")
            phase, seen = threading.Barrier(threads + 1), []
            starting = [pool.submit(_single_threaded_init, phase, seen) for _ in range(threads)]
            phase.wait()  # every thread has copied the process-wide count (in seen) ...
            phase.wait()  # ... and set its own to 1 (which also set the process-wide one to 1)
            torch.set_num_threads(seen[0])  # restore the process-wide count (and this thread's, unchanged)
            for f in starting:
                f.result()
            for stale in [k for k in _POOLS if k[0] != key[0]]:
                del _POOLS[stale]  # a parent's pools, copied by fork: no threads behind them
            _POOLS[key] = pool
    return pool


def _run_on_workers(engine: TorchCorruptionEngine, images: torch.Tensor, corruption: Corruption, severity: int,
                    generator: torch.Generator, out: torch.Tensor, starts: range, step: int, workers: int) -> None:
    """The CPU sub-batches of one engine call on ``workers`` threads of one intra-op thread each.

    One thread draws the random quantities of every sub-batch in order from ``generator`` (the
    same numbers as the sequential loop, so the output does not depend on the number of workers or
    on scheduling) and hands each sub-batch with its draws to the worker pool, at most
    ``2 * workers`` ahead of the workers; the workers corrupt and finish the sub-batches into their
    slices of ``out``. Why not torch's intra-op threads: each torch operation ends at a barrier
    that waits for all of them, so on a machine shared with other processes one descheduled thread
    stalls every operation of the batch; here it delays only its own sub-batch while the others
    take the remaining ones. The calling thread only waits (its thread settings are untouched)."""
    device, channels = out.device, images.shape[1]
    paths = engine.device_paths
    apply_pool, draw_pool = _worker_pool(workers, "apply"), _worker_pool(1, "draw")
    slots = threading.BoundedSemaphore(2 * workers)
    submitted: list[Future] = []

    def apply(chunk: torch.Tensor, x: torch.Tensor | None, draws: dict, target: torch.Tensor) -> None:
        with torch.no_grad(), _ops.forced_device_paths(paths):
            if x is None:
                x = _prepare(chunk, device, channels)
            engine._apply_into(x, corruption, severity, draws, target, channels)

    def draw_all() -> None:
        with torch.no_grad(), _ops.forced_device_paths(paths):
            for start in starts:
                chunk = images[start:start + step]
                x, draws = None, {}
                if corruption.draw is not None:
                    x = _prepare(chunk, device, channels)
                    draws = corruption.draw(x, severity, generator)
                slots.acquire()
                future = apply_pool.submit(apply, chunk, x, draws, out[start:start + step])
                future.add_done_callback(lambda _: slots.release())
                submitted.append(future)

    try:
        draw_pool.submit(draw_all).result()
    finally:  # also after an error: no sub-batch is left running when the call returns
        for future in submitted:
            future.exception()
    for future in submitted:
        future.result()


class TorchCorruptionEngine:
    """Batched ImageNet-C corruptions with torch, on the input's device (or ``device``).

    ``engine(images, name, severity, seed)``: images (B, C, H, W) float in [0, 1], C in {1, 3};
    returns the corrupted batch (same shape, dtype and device). The randomness comes from a
    ``torch.Generator`` seeded with ``derive_seed(seed, name, severity)``; each image of the
    batch gets its own draws. ``quantize=True`` truncates to 8-bit levels like the reference.

    On CPU the batch is processed in consecutive sub-batches of about ``cpu_chunk_values`` values
    (at least one image): every corruption is a chain of full-tensor passes, and on a CPU these
    are several times faster when the tensors stay in the caches (and below glibc's mmap
    threshold, so that each temporary does not page-fault fresh memory) than on a whole batch of
    224 px images (38 MB per tensor at B = 64). The sub-batches draw from the same generator in
    order, so the output is a function of (images, name, severity, seed) for a given
    ``cpu_chunk_values``; other devices take the batch in one piece. The CPU sub-batches run on
    ``cpu_workers`` threads (default: torch's intra-op thread count of the calling thread) of one
    intra-op thread each, fed in order by one drawing thread (:func:`_run_on_workers`): the
    output is the sequential loop's, bit for bit, and a thread that the OS deschedules on a busy
    machine delays only its own sub-batch instead of every torch operation.

    ``device_paths`` (for tests): None runs each device's own algorithms; a device type such as
    'cuda' runs that device's algorithms on whatever device the tensors are on (the whole batch in
    one piece, the float-DCT JPEG pipeline of ``_jpeg``, dense matrix products, the unchunked
    Poisson sampler), so that the code a GPU runs is exercised and compared on a CPU; 'cpu' forces
    the CPU algorithms. See ``_ops.forced_device_paths``.
    """

    name = "torch"

    def __init__(self, device: str | None = None, quantize: bool = True, cpu_chunk_values: int = 1 << 19,
                 device_paths: str | None = None, cpu_workers: int | None = None):
        self.device = torch.device(device) if device is not None else None
        self.quantize = bool(quantize)
        self.cpu_chunk_values = int(cpu_chunk_values)
        self.device_paths = _ops.check_device_paths(device_paths)
        self.cpu_workers = None if cpu_workers is None else int(cpu_workers)
        if self.cpu_workers is not None and self.cpu_workers < 1:
            raise ConfigError(f"corruptions.engine.cpu_workers={cpu_workers!r}; expected null (torch's intra-op "
                              "thread count) or an integer >= 1")

    def _sub_batch(self, shape, device: torch.device) -> int:
        b, _, h, w = shape
        if not _ops.cpu_paths(device) or self.cpu_chunk_values <= 0:
            return max(b, 1)
        return max(1, self.cpu_chunk_values // (3 * h * w))

    def _workers(self, n_chunks: int) -> int:
        """Worker threads for ``n_chunks`` CPU sub-batches: ``cpu_workers``, by default the calling
        thread's torch intra-op thread count (1 in DataLoader worker processes), at most one per
        sub-batch."""
        wanted = self.cpu_workers if self.cpu_workers is not None else torch.get_num_threads()
        return max(1, min(wanted, n_chunks))

    def __call__(self, images: torch.Tensor, name: str, severity: int, seed: int) -> torch.Tensor:
        check_corruption_request(images, name, severity)
        device = self.device or images.device
        channels = images.shape[1]
        generator = torch.Generator(device=device)
        generator.manual_seed(derive_seed(seed, name, severity))
        out = torch.empty(images.shape, dtype=torch.float32, device=device)
        corruption = CORRUPTIONS[name]
        with torch.no_grad(), _ops.forced_device_paths(self.device_paths):
            step = self._sub_batch(images.shape, device)
            starts = range(0, images.shape[0], step)
            workers = self._workers(len(starts)) if _ops.cpu_paths(device) and device.type == "cpu" else 1
            if workers > 1:
                _run_on_workers(self, images, corruption, severity, generator, out, starts, step, workers)
            else:
                for start in starts:
                    x = _prepare(images[start:start + step], device, channels)
                    draws = corruption.draw(x, severity, generator) if corruption.draw is not None else {}
                    self._apply_into(x, corruption, severity, draws, out[start:start + step])
        return out.to(device=images.device, dtype=images.dtype if images.is_floating_point() else torch.float32)

    def _apply_into(self, x: torch.Tensor, corruption: Corruption, severity: int, draws: dict,
                    out: torch.Tensor, channels: int | None = None) -> None:
        """Corrupt the prepared RGB sub-batch ``x`` given its draws and write the finished result to
        ``out`` (``channels``: those of the engine's input, by default ``out``'s)."""
        result = corruption.apply(x, severity, **draws).to(torch.float32)
        finish(result, out.shape[1] if channels is None else channels, self.quantize, out=out,
               in_place=result is not x and result.is_contiguous())

    def apply(self, images: torch.Tensor, name: str, severity: int, **draws) -> torch.Tensor:
        """The corruption with explicitly given random draws (for tests against the reference)."""
        x = images.to(torch.float32).clamp(0, 1)
        channels = x.shape[1]
        if channels == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()
        with torch.no_grad(), _ops.forced_device_paths(self.device_paths):
            return finish(CORRUPTIONS[name].apply(x, severity, **draws).to(torch.float32), channels, self.quantize)

    def close(self) -> None:
        """Nothing to release: the CPU worker threads are shared by all engines of the process
        (:func:`_worker_pool`) and idle between calls."""
