"""Replaying the reference's numpy draws for the torch engine (fidelity tests and benchmark).

``numpy_draws(x, name, severity, seed)`` returns the random numbers that
``ReferenceCorruptionEngine`` draws from numpy's global RNG for a batch (one seeded chunk, at
most 64 images), in the reference's order, shaped as the torch engine's ``_draw_*`` output.
``TorchCorruptionEngine.apply(x, name, severity, **draws)`` then reproduces the reference
pixel-wise, which separates the deterministic part of every random corruption from its RNG.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from robustexp.data.corruptions import engine as E
from robustexp.data.corruptions.reference import _reference_functions, to_uint8_hwc
from robustexp.utils import derive_seed

REPLAYABLE = ("gaussian_noise", "shot_noise", "speckle_noise", "glass_blur", "motion_blur", "snow", "frost",
              "fog", "elastic_transform", "spatter")
# impulse_noise is not replayable: skimage's random_noise draws from a fresh, unseeded
# numpy Generator, so the reference itself is not reproducible for it.


def numpy_draws(x: torch.Tensor, name: str, severity: int, seed: int, chunk: int = 0) -> dict:
    """The random numbers ``ReferenceCorruptionEngine`` draws for ``x`` (at most 64 images, its
    seeded chunk number ``chunk``), in the reference's order, shaped as the engine's ``_draw_*`` output."""
    assert x.shape[0] <= 64
    arr = to_uint8_hwc(x)
    _, h, w, _ = arr.shape
    _reference_functions()  # installs the numpy shim plasma_fractal needs
    import imagecorruptions.corruptions as module

    np.random.seed(derive_seed(seed, name, severity, chunk))
    per = []
    for img in arr:
        rgb = np.repeat(img, 3, -1) if img.shape[-1] == 1 else img
        d = {}
        if name in ("gaussian_noise", "speckle_noise"):  # normal(scale=c) = c * standard normal
            d["z"] = np.random.standard_normal(rgb.shape).transpose(2, 0, 1)
        elif name == "shot_noise":
            d["counts"] = np.random.poisson(rgb / 255. * E.SHOT_NOISE[severity - 1]).transpose(2, 0, 1)
        elif name == "motion_blur":
            d["angles"] = np.random.uniform(-45, 45)
        elif name == "snow":
            d["z"] = np.random.standard_normal((h, w))
            d["angles"] = np.random.uniform(-135, -45)
        elif name == "spatter":
            d["z"] = np.random.standard_normal((h, w))
        elif name == "elastic_transform":
            m = h * 0.005
            d["ux"] = np.random.uniform(-m, m, size=(h, w))
            d["uy"] = np.random.uniform(-m, m, size=(h, w))
        elif name == "fog":
            d["plasma"] = module.plasma_fractal(mapsize=E._fog_mapsize(h, w),
                                                wibbledecay=E.FOG[severity - 1][1])[:h, :w]
        elif name == "frost":
            _, sizes = E._frost_bank(h, w, "cpu")
            idx = np.random.randint(5)
            d["idx"] = idx
            d["x_start"] = np.random.randint(0, int(sizes[idx, 0]) - h)
            d["y_start"] = np.random.randint(0, int(sizes[idx, 1]) - w)
        elif name == "glass_blur":  # randint(size=2) -> (dx, dy) per visit, reverse raster order
            _, delta, iterations = E.GLASS_BLUR[severity - 1]
            hs, ws = np.arange(h - delta, delta, -1), np.arange(w - delta, delta, -1)
            off = np.zeros((iterations, 2, h, w), dtype=np.int64)
            for it in range(iterations):
                r = np.random.randint(-delta, delta, size=(len(hs) * len(ws), 2)).reshape(len(hs), len(ws), 2)
                off[it, 0][np.ix_(hs, ws)] = r[..., 1]
                off[it, 1][np.ix_(hs, ws)] = r[..., 0]
            d["offsets"] = off
        else:
            raise KeyError(name)
        per.append(d)
    out = {k: torch.as_tensor(np.stack([np.asarray(d[k]) for d in per])) for k in per[0]}
    if name == "glass_blur":  # (B, iterations, 2, H, W) -> (iterations, 2, B, H, W)
        out["offsets"] = out["offsets"].permute(1, 2, 0, 3, 4).contiguous()
    return out


def natural_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Deterministic natural-ish RGB images, 8-bit levels: smooth multi-scale random fields plus
    a flat rectangle and an inverted disc (sharp edges)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(b, 3, h, w)
    for s, amp in ((4, 1.0), (16, 0.5), (max(h // 4, 2), 0.25)):
        out += amp * F.interpolate(torch.rand(b, 3, s, s, generator=g), size=(h, w), mode="bicubic",
                                   align_corners=False)
    lo, hi = out.amin((2, 3), keepdim=True), out.amax((2, 3), keepdim=True)
    out = (out - lo) / (hi - lo)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for i in range(b):
        r = torch.rand(6, generator=g)
        y0, x0 = int(r[0] * h * 0.5), int(r[1] * w * 0.5)
        out[i, :, y0:y0 + h // 3, x0:x0 + w // 3] = r[2:5].view(3, 1, 1)
        disc = (yy - h * (0.3 + 0.4 * r[5])) ** 2 + (xx - w * 0.6) ** 2 < (min(h, w) / 6) ** 2
        out[i, :, disc] = 1 - out[i, :, disc]
    return (out.clamp(0, 1) * 255).round() / 255
