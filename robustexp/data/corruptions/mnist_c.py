"""The 15 corruptions of MNIST-C (Mu & Gilmer, 2019) as batched, seeded torch operations.

MNIST-C ("MNIST-C: A Robustness Benchmark for Computer Vision", arXiv:1906.02337; code in
google-research/mnist-c, ``corruptions.py``) applies each corruption at one fixed strength. The
released code defines five levels for most corruptions but the benchmark's generation script is
not published; we take each function's *default* ``severity`` argument (the strength its callers,
e.g. the repository's notebook, get) as the benchmark's parameter. Those differ from ImageNet-C's:

==============  =====================================================================  ========
corruption      MNIST-C definition and parameter used here                             default
==============  =====================================================================  ========
shot_noise      clip(Poisson(3 x) / 3)                 (levels 60, 25, 12, 5, 3)        s = 5
impulse_noise   salt & pepper, amount 0.17             (levels .03 .06 .09 .17 .27)     s = 4
glass_blur      sigma 0.7 (rows only), max_delta 1, 2 swap iterations                  s = 1
motion_blur     ImageMagick motion blur radius 10, sigma 3, angle ~ U(-45, 45) deg     s = 1
shear           shear angle +-0.4 rad (random sign) about the centre                   s = 2
scale           inverse-map scale 1/0.7 about the centre (digit shrinks to 0.7x)       s = 3
rotate          +-0.4 rad (22.9 deg, random sign) about the centre                     s = 2
brightness      HSV value + 0.5 (gray images: clip(x + 0.5))                           s = 5
translate       (dx, dy) = (+-3, +-3) px, signs drawn independently                    s = 3
stripe          invert columns [0, 7) and [21, 28)                                     (none)
fog             (x + 3 plasma) * max / (max + 3), plasma wibble decay 1.4              s = 5
spatter         mud: N(.65, .3) field, sigma 1, threshold .65, sigma 1.5, mask >= .8   s = 4
dotted_line     random line from column 0 to 27, 2.3-px profile, every other 2-px dash (none)
zigzag          random zigzag, teeth 2 px long and 2 px high, columns 2 to 25          (none)
canny_edges     skimage.feature.canny (sigma 1, thresholds 0.1 / 0.2) as a 0/1 image   (none)
==============  =====================================================================  ========

``identity`` is accepted as a no-op (the benchmark's clean split).

Each function below documents its reference definition. Where the reference hard-codes the
28x28 geometry (centre 13.5, columns 7/21, line columns 0..27, zigzag columns 2..25) we express
it relative to the image size, so that other sizes work; the pixel-unit parameters (blur radii,
line widths, the 3-px shift, the 1-px glass-blur displacement) stay in pixels as in MNIST-C.

Randomness comes from one ``torch.Generator`` on the input's device, seeded with
``derive_seed(seed, name)``; every random quantity is drawn per image (one angle, shift, line,
noise field... per image), so the images of a batch are corrupted independently. The output is
a function of the images, the corruption, the seed and the device type (CPU and CUDA generators
produce different streams). Outputs are floats in [0, 1], not quantized to 8 bits.

Shared with the ImageNet-C engine rather than copied: the plasma fractal of ``fog``
(:func:`robustexp.data.corruptions.engine.plasma_fractal`) and the Gaussian blur of
``glass_blur``, ``spatter`` and ``canny_edges`` (:func:`robustexp.data.corruptions._ops.gaussian_filter`,
``scipy.ndimage.gaussian_filter`` as two filter-matrix products).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from robustexp.data.corruptions import _ops
from robustexp.data.corruptions.engine import plasma_fractal
from robustexp.data.corruptions.names import MNIST_C_CORRUPTIONS
from robustexp.errors import ConfigError
from robustexp.utils import derive_seed

MNIST_C_NAMES = ("identity",) + MNIST_C_CORRUPTIONS  # every name the engine accepts

# The benchmark's fixed parameters (google-research/mnist-c corruptions.py, default severities).
SHOT_NOISE_RATE = 3.0                     # shot_noise(severity=5): c = 3
IMPULSE_AMOUNT = 0.17                     # impulse_noise(severity=4): c = 0.17
GLASS_SIGMA, GLASS_DELTA, GLASS_ITERATIONS = 0.7, 1, 2  # glass_blur(severity=1)
MOTION_RADIUS, MOTION_SIGMA, MOTION_MAX_ANGLE = 10, 3.0, 45.0  # motion_blur(severity=1)
SHEAR = 0.4                               # shear(severity=2), radians, random sign
ROTATION = 0.4                            # rotate(severity=2), radians, random sign
SCALE = 1 / 0.7                           # scale(severity=3): inverse-map factor
BRIGHTNESS = 0.5                          # brightness(severity=5)
TRANSLATION = 3                           # translate(severity=3), pixels, random signs
FOG_STRENGTH, FOG_WIBBLE_DECAY = 3.0, 1.4  # fog(severity=5)
SPATTER = (0.65, 0.3, 1.0, 0.65, 1.5)     # spatter(severity=4): loc, scale, sigma, threshold, sigma2
SPATTER_MUD = 63 / 255.0
LINE_WIDTH = 2.3                          # line_from_points: log(1 - d / 2.3) + 1
ZIGZAG_TOOTH = 2.0                        # zigzag: a = b = 2
CANNY_SIGMA, CANNY_LOW, CANNY_HIGH = 1.0, 0.1, 0.2  # skimage.feature.canny defaults


# ----------------------------------------------------------------------------- helpers

def _precise(device) -> torch.dtype:
    """float64 for geometry and edge detection, except on devices without it (Apple MPS; also
    inside ``_ops.forced_device_paths("mps")``, how the tests run that path on CPU)."""
    return torch.float32 if _ops.device_type(device) == "mps" else torch.float64


def _uniform(shape, low: float, high: float, gen: torch.Generator, device, dtype=torch.float32):
    return torch.rand(shape, generator=gen, device=device, dtype=dtype) * (high - low) + low


def _random_sign(batch: int, gen: torch.Generator, device) -> torch.Tensor:
    """+1 or -1 per image with probability 1/2 (``np.random.choice([-1, 1])``)."""
    return torch.randint(0, 2, (batch,), generator=gen, device=device).to(_precise(device)).mul(2).sub(1)


def _gather_shifted(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, fill: str) -> torch.Tensor:
    """``out[b, :, y, x] = images[b, :, y + dy[b], x + dx[b]]`` for integer per-image offsets.

    ``fill`` 'edge' clamps the source position to the image, 'zeros' reads 0 outside it.
    Done as a gather along rows, then one along columns.
    """
    b, c, h, w = images.shape
    rows = torch.arange(h, device=images.device).view(1, h) + dy.view(b, 1).long()
    cols = torch.arange(w, device=images.device).view(1, w) + dx.view(b, 1).long()
    out = images.gather(2, rows.clamp(0, h - 1).view(b, 1, h, 1).expand(b, c, h, w))
    out = out.gather(3, cols.clamp(0, w - 1).view(b, 1, 1, w).expand(b, c, h, w))
    if fill == "zeros":
        row_in = ((rows >= 0) & (rows < h)).to(out.dtype).view(b, 1, h, 1)
        col_in = ((cols >= 0) & (cols < w)).to(out.dtype).view(b, 1, 1, w)
        out = out * row_in * col_in
    return out


# ----------------------------------------------------------------------------- affine warps

def affine_warp(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Warp (B, C, H, W) by per-image 2x2 ``matrices`` about the image centre, as MNIST-C does.

    MNIST-C calls ``skimage.transform.warp(x, inverse_map=aff)`` with an affine map whose
    translation keeps the centre (13.5, 13.5) fixed: the output pixel at (col, row) = p reads the
    input at ``A (p - c) + c`` with c the centre, bilinearly (order 1), zero outside. Here A is in
    (x = column, y = row) pixel coordinates and c = ((W - 1) / 2, (H - 1) / 2); the sampling is
    ``grid_sample(bilinear, zeros, align_corners=True)``, the same interpolation.
    """
    b, c, h, w = images.shape
    a = matrices.detach().to("cpu", torch.float64).reshape(b, 2, 2)
    to_norm = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], dtype=torch.float64)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, :, :2] = a * to_norm.view(1, 2, 1) / to_norm.view(1, 1, 2)  # S A S^-1
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=True)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def rotate_images(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """MNIST-C ``rotate`` with per-image ``angles`` (radians): ``AffineTransform(rotation=a)``,
    A = [[cos a, -sin a], [sin a, cos a]] as inverse map, so content at input offset v from the
    centre lands at R(-a) v (x right, y down)."""
    angles = angles.detach().to("cpu", torch.float64)
    cos, sin = torch.cos(angles), torch.sin(angles)
    matrices = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    return affine_warp(images, matrices)


def shear_images(images: torch.Tensor, shears: torch.Tensor) -> torch.Tensor:
    """MNIST-C ``shear`` with per-image shear angles (radians): ``AffineTransform(shear=s)`` of the
    scikit-image the benchmark was made with (<= 0.19), A = [[1, -sin s], [0, cos s]] as inverse map.
    (scikit-image >= 0.20 changed ``shear=s`` to mean [[1, -tan s], [0, 1]]; we keep the original.)"""
    shears = shears.detach().to("cpu", torch.float64)
    one, zero = torch.ones_like(shears), torch.zeros_like(shears)
    matrices = torch.stack([torch.stack([one, -torch.sin(shears)], -1),
                            torch.stack([zero, torch.cos(shears)], -1)], -2)
    return affine_warp(images, matrices)


def scale_images(images: torch.Tensor, factor: float) -> torch.Tensor:
    """MNIST-C ``scale``: ``AffineTransform(scale=(f, f))`` as inverse map about the centre, so the
    content shrinks by 1/f (f = 1/0.7 in the benchmark: the digit becomes 0.7x as large)."""
    b = images.shape[0]
    matrices = torch.eye(2, dtype=torch.float64).expand(b, 2, 2) * float(factor)
    return affine_warp(images, matrices)


def translate_images(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """MNIST-C ``translate``: ``warp(x, inverse_map=AffineTransform(translation=[dx, dy]))``, i.e.
    out(x, y) = in(x + dx, y + dy), zero outside: the content moves by (-dx, -dy). Integer offsets
    make bilinear sampling exact, so this is a gather."""
    return _gather_shifted(images, dy, dx, fill="zeros")


# ----------------------------------------------------------------------------- canny

def canny(images: torch.Tensor, sigma: float = CANNY_SIGMA, low_threshold: float = CANNY_LOW,
          high_threshold: float = CANNY_HIGH) -> torch.Tensor:
    """Canny edges of every channel of (B, C, H, W), following ``skimage.feature.canny``
    (mode 'constant', no mask; float thresholds on the [0, 1] intensity scale):

    1. Gaussian smoothing with zero padding, divided by the smoothed all-ones image (the
       "bleed-over" correction), radius int(4 sigma + 0.5);
    2. Sobel gradients (``ndimage.sobel``, border mode 'reflect': isobel along rows, jsobel along
       columns) and their magnitude;
    3. non-maximum suppression interpolating the magnitude linearly between the two neighbours in
       the gradient direction (skimage's ``_nonmaximum_suppression_bilinear``), on the image minus
       its 1-px border, keeping magnitudes >= the low threshold;
    4. hysteresis: keep the 8-connected components of the surviving pixels that contain one with
       magnitude >= the high threshold.

    Returns a float tensor of 0 / 1 of the input's shape and dtype.
    """
    dtype = images.dtype
    work = _precise(images.device)
    b, c, h, w = images.shape
    x = images.to(work).reshape(b * c, 1, h, w)

    ones = torch.ones_like(x[:1])
    smoothed = _ops.gaussian_filter(x, sigma, mode="constant") / (
        _ops.gaussian_filter(ones, sigma, mode="constant") + torch.finfo(work).eps)

    padded = F.pad(smoothed, (1, 1, 1, 1), mode="replicate")  # ndimage 'reflect' for a 1-px pad
    diff_cols = padded[..., :, 2:] - padded[..., :, :-2]        # [-1, 0, 1] along columns
    jsobel = diff_cols[..., :-2, :] + 2 * diff_cols[..., 1:-1, :] + diff_cols[..., 2:, :]
    diff_rows = padded[..., 2:, :] - padded[..., :-2, :]        # [-1, 0, 1] along rows
    isobel = diff_rows[..., :, :-2] + 2 * diff_rows[..., :, 1:-1] + diff_rows[..., :, 2:]
    magnitude = torch.sqrt(isobel * isobel + jsobel * jsobel)

    mpad = F.pad(magnitude, (1, 1, 1, 1))

    def neighbour(di: int, dj: int) -> torch.Tensor:  # magnitude[x + di, y + dj]
        return mpad[..., 1 + di:1 + di + h, 1 + dj:1 + dj + w]

    abs_i, abs_j = isobel.abs(), jsobel.abs()
    same_sign = (isobel > 0) == (jsobel > 0)      # skimage's cond1; cond2 is its complement
    tiny = torch.finfo(work).tiny
    ratio_ji = abs_j / abs_i.clamp_min(tiny)
    ratio_ij = abs_i / abs_j.clamp_min(tiny)
    i_major = abs_i > abs_j                       # cond1 branch test
    j_major = abs_i < abs_j                       # cond2 branch test

    # cond1 (gradient components of the same sign): neighbours along the main diagonal
    w1 = torch.where(i_major, ratio_ji, ratio_ij)
    n11_1 = torch.where(i_major, neighbour(1, 0), neighbour(0, 1))
    n12_1 = neighbour(1, 1)
    n21_1 = torch.where(i_major, neighbour(-1, 0), neighbour(0, -1))
    n22_1 = neighbour(-1, -1)
    # cond2 (opposite signs): neighbours along the anti-diagonal
    w2 = torch.where(j_major, ratio_ij, ratio_ji)
    n11_2 = torch.where(j_major, neighbour(0, 1), neighbour(-1, 0))
    n12_2 = neighbour(-1, 1)
    n21_2 = torch.where(j_major, neighbour(0, -1), neighbour(1, 0))
    n22_2 = neighbour(1, -1)

    wgt = torch.where(same_sign, w1, w2)
    n11 = torch.where(same_sign, n11_1, n11_2)
    n12 = torch.where(same_sign, n12_1, n12_2)
    n21 = torch.where(same_sign, n21_1, n21_2)
    n22 = torch.where(same_sign, n22_1, n22_2)
    c_plus = (n12 * wgt + n11 * (1.0 - wgt)) <= magnitude
    c_minus = (n22 * wgt + n21 * (1.0 - wgt)) <= magnitude

    interior = torch.zeros(1, 1, h, w, dtype=torch.bool, device=images.device)
    interior[..., 1:-1, 1:-1] = True
    low = float(np.float32(low_threshold)) if low_threshold != 0 else 1e-14  # skimage passes a C float
    low_mask = interior & (magnitude >= low) & c_plus & c_minus & (magnitude > 0)
    high_mask = low_mask & (magnitude >= high_threshold)

    # hysteresis: grow the strong pixels through 8-connected weak ones until nothing changes
    edges = high_mask
    low_f = low_mask.to(torch.float32)
    while True:
        grown = edges
        for _ in range(8):
            grown = (F.max_pool2d(grown.to(torch.float32), 3, stride=1, padding=1) * low_f) > 0
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges.to(dtype).reshape(b, c, h, w)


# ----------------------------------------------------------------------------- lines

def line_from_points(c0: torch.Tensor, r0: torch.Tensor, c1: torch.Tensor, r1: torch.Tensor,
                     height: int, width: int, line_width: float = LINE_WIDTH, device=None) -> torch.Tensor:
    """MNIST-C's ``line_from_points`` for per-image endpoints: (B, H, W) intensities in [0, 1].

    The line through (c0, r0) and (c1, r1) (c = column, r = row) gets ``log(1 - d / 2.3) + 1``
    clipped to [0, 1], where d is the *vertical* distance |row - f(col)| to the line; columns
    < floor(c0) and >= ceil(c1) are zeroed, and a vertical segment (c1 == c0) draws nothing.
    The result is float32 on ``device`` (default: the endpoints' device).
    """
    device = c0.device if device is None else torch.device(device)
    precise = _precise(device)
    c0, r0, c1, r1 = (t.to(device, precise).view(-1, 1, 1) for t in (c0, r0, c1, r1))
    cols = torch.arange(width, device=device, dtype=precise).view(1, 1, width)
    rows = torch.arange(height, device=device, dtype=precise).view(1, height, 1)
    run = c1 - c0
    slope = (r1 - r0) / torch.where(run == 0, torch.ones_like(run), run)
    dist = (rows - (slope * (cols - c0) + r0)).abs().clamp(0, line_width - 1e-10)
    line = (torch.log(1 - dist / line_width) + 1).clamp(0, 1)
    keep = (cols >= torch.floor(c0)) & (cols < torch.ceil(c1)) & (run != 0)
    return (line * keep).to(torch.float32)


def zigzag_vertices(r0: torch.Tensor, r1: torch.Tensor, c0: float, c1: float, tooth_length: float = ZIGZAG_TOOTH,
                    tooth_height: float = ZIGZAG_TOOTH) -> tuple[torch.Tensor, torch.Tensor]:
    """The vertices (cols, rows), each (B, K), of MNIST-C's zigzag from (c0, r0) towards (c1, r1).

    Along the straight line of length d = (c1 - c0) / cos(theta), theta = atan((r1 - r0) / (c1 - c0)),
    the vertices are (0, 0), then ((2i + 1) a, (-1)^i b) for i < (d - a) // (2a) + 1, then, when
    d is not a multiple of 2a, the reference's closing point (d, r_last / (2 (d - 2a (d // 2a))));
    the polyline is rotated by theta and moved to (c0, r0). Images with fewer vertices repeat
    their last one (a zero-length segment draws nothing).
    """
    r0 = r0.to(torch.float64).cpu()
    r1 = r1.to(torch.float64).cpu()
    a, b = float(tooth_length), float(tooth_height)
    theta = torch.atan((r1 - r0) / (c1 - c0))
    d = (c1 - c0) / torch.cos(theta)
    counts = (torch.div(d - a, 2 * a, rounding_mode="floor") + 1).long()
    max_c = 2 * a * torch.div(d, 2 * a, rounding_mode="floor")
    k = int(counts.max()) + 2
    cols = torch.zeros(len(r0), k, dtype=torch.float64)
    rows = torch.zeros(len(r0), k, dtype=torch.float64)
    for n in range(len(r0)):
        points = [(0.0, 0.0)]
        r_i = 0.0
        for i in range(int(counts[n])):
            r_i = (-1) ** i * b
            points.append(((2 * i + 1) * a, r_i))
        if float(d[n]) != float(max_c[n]):
            points.append((float(d[n]), r_i / (2 * (float(d[n]) - float(max_c[n])))))
        points += [points[-1]] * (k - len(points))
        cols[n] = torch.tensor([p[0] for p in points], dtype=torch.float64)
        rows[n] = torch.tensor([p[1] for p in points], dtype=torch.float64)
    cos, sin = torch.cos(theta).view(-1, 1), torch.sin(theta).view(-1, 1)
    return cols * cos - rows * sin + c0, cols * sin + rows * cos + r0.view(-1, 1)


# ----------------------------------------------------------------------------- glass blur

def glass_blur_permutation(coins: np.ndarray, dx: np.ndarray, dy: np.ndarray, height: int, width: int,
                           delta: int) -> np.ndarray:
    """Per-image source indices (B, H*W) of MNIST-C's local pixel shuffling.

    For each iteration, for h from H - delta down to delta + 1 and w from W - delta down to
    delta + 1 (row-major), the pixel (h, w) is swapped with (h + dy, w + dx) when that image's coin
    is heads. ``coins``, ``dx``, ``dy`` are (iterations, steps, B) with dx, dy in [-delta, delta).
    The swaps depend only on the draws, so they are applied to indices, then to all channels.
    """
    iterations, steps, batch = coins.shape
    hs = np.arange(height - delta, delta, -1)
    ws = np.arange(width - delta, delta, -1)
    positions = (hs[:, None] * width + ws[None, :]).ravel()
    assert len(positions) == steps
    offsets = np.where(coins, dy * width + dx, 0).astype(np.int64)
    index = np.tile(np.arange(height * width, dtype=np.int64), (batch, 1))
    rows = np.arange(batch)
    for it in range(iterations):
        for step, p in enumerate(positions):
            q = p + offsets[it, step]
            here = index[:, p].copy()
            index[:, p] = index[rows, q]
            index[rows, q] = here
    return index


# ----------------------------------------------------------------------------- corruptions

def _shot_noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MNIST-C ``shot_noise`` (severity 5): ``clip(Poisson(x * 3) / 3, 0, 1)``, per pixel."""
    return torch.poisson(x * SHOT_NOISE_RATE, generator=gen) / SHOT_NOISE_RATE


def _impulse_noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MNIST-C ``impulse_noise`` (severity 4): ``skimage.util.random_noise(x, 's&p', amount=0.17)``:
    each pixel (and channel) is replaced with probability 0.17, by 1 or 0 with equal odds."""
    hit = torch.rand(x.shape, generator=gen, device=x.device) < IMPULSE_AMOUNT
    salt = torch.rand(x.shape, generator=gen, device=x.device) < 0.5
    return torch.where(hit, salt.to(x.dtype), x)


def _glass_blur(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MNIST-C ``glass_blur`` (severity 1: sigma 0.7, max_delta 1, 2 iterations): Gaussian blur,
    truncation to 8 bits (``np.uint8(x * 255)``), the local pixel swaps of
    :func:`glass_blur_permutation` (coin ~ Bernoulli(1/2), dx, dy ~ randint(-1, 1), i.e. in
    {-1, 0}), and a second Gaussian blur.

    Both blurs are *vertical only* (sigma 0.7 along rows, none along columns, border 'nearest'):
    MNIST-C calls ``gaussian(x, sigma=0.7, multichannel=True)`` on a 2-D gray image, and the
    scikit-image of the time then took the last (column) axis for a channel axis and gave it
    sigma 0. We reproduce what produced the benchmark's images, for every channel count."""
    b, c, h, w = x.shape
    steps = max(h - 2 * GLASS_DELTA, 0) * max(w - 2 * GLASS_DELTA, 0)
    shape = (GLASS_ITERATIONS, steps, b)
    coins = torch.rand(shape, generator=gen, device=x.device) < 0.5
    dx = torch.randint(-GLASS_DELTA, GLASS_DELTA, shape, generator=gen, device=x.device)
    dy = torch.randint(-GLASS_DELTA, GLASS_DELTA, shape, generator=gen, device=x.device)
    blurred = torch.floor(_ops.gaussian_filter(x, (GLASS_SIGMA, 0)).clamp(0, 1) * 255) / 255
    index = glass_blur_permutation(coins.cpu().numpy(), dx.cpu().numpy(), dy.cpu().numpy(), h, w, GLASS_DELTA)
    index = torch.from_numpy(index).to(x.device).unsqueeze(1).expand(b, c, h * w)
    shuffled = blurred.reshape(b, c, h * w).gather(2, index).reshape(b, c, h, w)
    return _ops.gaussian_filter(shuffled, (GLASS_SIGMA, 0))


def _motion_blur(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MNIST-C ``motion_blur`` (severity 1): ImageMagick ``MotionBlurImage(radius=10, sigma=3,
    angle ~ U(-45, 45) degrees)``: a one-sided kernel of width 2 * 10 + 1 = 21 with weights
    exp(-i^2 / (2 * 3^2)) (normalized), tap i reading the pixel at offset
    (ceil(i cos a - 0.5), ceil(i sin a - 0.5)) (columns, rows), edge pixels repeated outside."""
    b = x.shape[0]
    angles = _uniform((b,), -MOTION_MAX_ANGLE, MOTION_MAX_ANGLE, gen, x.device, _precise(x.device))
    radians = torch.deg2rad(angles.to("cpu", torch.float64))
    width = 2 * MOTION_RADIUS + 1
    taps = torch.arange(width, dtype=torch.float64)
    weights = torch.exp(-taps ** 2 / (2 * MOTION_SIGMA ** 2))
    weights = (weights / weights.sum()).tolist()
    out = torch.zeros_like(x)
    for i in range(width):
        ox = torch.ceil(i * torch.cos(radians) - 0.5).to(x.device)
        oy = torch.ceil(i * torch.sin(radians) - 0.5).to(x.device)
        out = out + weights[i] * _gather_shifted(x, oy, ox, fill="edge")
    return out


def _shear(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MNIST-C ``shear`` (severity 2): shear angle 0.4 rad with a random sign per image, about the
    centre; see :func:`shear_images`."""
    return shear_images(x, SHEAR * _random_sign(x.shape[0], gen, x.device))


def _scale(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MNIST-C ``scale`` (severity 3): inverse-map scale 1/0.7 about the centre (no randomness)."""
    return scale_images(x, SCALE)


def _rotate(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MNIST-C ``rotate`` (severity 2): 0.4 rad with a random sign per image, about the centre;
    see :func:`rotate_images`."""
    return rotate_images(x, ROTATION * _random_sign(x.shape[0], gen, x.device))


def _brightness(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MNIST-C ``brightness`` (severity 5): gray -> RGB -> HSV, V + 0.5 clipped to 1, back to gray.
    On gray images this is exactly ``clip(x + 0.5, 0, 1)``; on 3-channel images the HSV value is
    raised the same way, keeping hue and saturation (RGB scaled by V' / V); other channel counts
    are treated channel by channel as gray."""
    if x.shape[1] != 3:
        return x + BRIGHTNESS
    value = x.amax(dim=1, keepdim=True)
    new_value = (value + BRIGHTNESS).clamp(max=1)
    ratio = new_value / value.clamp_min(1e-12)
    return torch.where(value > 0, x * ratio, new_value.expand_as(x))


def _translate(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MNIST-C ``translate`` (severity 3): (dx, dy) = (+-3, +-3) with independent random signs per
    image; see :func:`translate_images` (the content moves by (-dx, -dy))."""
    b = x.shape[0]
    signs = torch.randint(0, 2, (b, 2), generator=gen, device=x.device).mul(2).sub(1)
    return translate_images(x, TRANSLATION * signs[:, 0], TRANSLATION * signs[:, 1])


def _stripe(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MNIST-C ``stripe``: invert (1 - x) the columns [0, 7) and [21, 28), i.e. the left and right
    quarters [0, W // 4) and [W - W // 4, W)."""
    w = x.shape[-1]
    quarter = w // 4
    out = x.clone()
    out[..., :quarter] = 1 - x[..., :quarter]
    out[..., w - quarter:] = 1 - x[..., w - quarter:]
    return out


def _fog(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MNIST-C ``fog`` (severity 5): ``(x + 3.0 * plasma[:H, :W]) * max / (max + 3.0)`` with
    ``plasma = plasma_fractal(256, wibbledecay=1.4)`` one map per image (shared by its channels)
    and ``max`` the image's maximum. Maps are 256 x 256 (the next power of two for larger images).
    The plasma is the ImageNet-C engine's (:func:`robustexp.data.corruptions.engine.plasma_fractal`):
    MNIST-C copies ImageNet-C's ``plasma_fractal``."""
    b, _, h, w = x.shape
    mapsize = max(256, 1 << (max(h, w) - 1).bit_length())
    chunks = []
    for start in range(0, b, 64):  # bounds memory: 64 maps of 256 x 256 at a time
        n = min(64, b - start)
        chunks.append(plasma_fractal(n, mapsize, FOG_WIBBLE_DECAY, gen, x.device)[:, :h, :w])
    plasma = torch.cat(chunks).unsqueeze(1).to(x.dtype)
    top = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + FOG_STRENGTH * plasma) * top / (top + FOG_STRENGTH)


def _spatter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MNIST-C ``spatter`` (severity 4; mud only, as in MNIST-C): liquid ~ N(0.65, 0.3) per pixel,
    Gaussian blur (sigma 1), set to 0 below 0.65; m = [liquid > 0.65] blurred (sigma 1.5), set to 0
    below 0.8; ``x * (1 - m) + 63/255 * m``. One layer per image, shared by its channels."""
    b, _, h, w = x.shape
    loc, scale, sigma, threshold, sigma2 = SPATTER
    liquid = torch.randn((b, 1, h, w), generator=gen, device=x.device, dtype=x.dtype) * scale + loc
    liquid = _ops.gaussian_filter(liquid, sigma)
    liquid = torch.where(liquid < threshold, torch.zeros_like(liquid), liquid)
    mask = _ops.gaussian_filter((liquid > threshold).to(x.dtype), sigma2)
    mask = torch.where(mask < 0.8, torch.zeros_like(mask), mask)
    return x * (1 - mask) + SPATTER_MUD * mask


def _dotted_line(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MNIST-C ``dotted_line``: ``line_from_points(0, r0, 27, r1)`` with r0, r1 ~ randint(0, 27)
    (rows 0..26; here 0..H-2, columns 0..W-1), with the 2-px column blocks [0, 2), [4, 6), ...
    blanked (every other dash), added to the image and clipped."""
    b, _, h, w = x.shape
    r = torch.randint(0, h - 1, (b, 2), generator=gen, device=x.device)
    zero = torch.zeros(b, device=x.device)
    line = line_from_points(zero, r[:, 0], zero + (w - 1), r[:, 1], h, w)
    cols = torch.arange(w, device=x.device)
    line = line * ((cols // 2) % 2 == 1).to(line.dtype)
    return x + line.unsqueeze(1).to(x.dtype)


def _zigzag(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MNIST-C ``zigzag``: from column 2 to 25 (W - 3), r0 ~ randint(0, 27) (rows 0..H-2) and
    r1 = r0 + randint(-5, 5) (-5..4); the zigzag of :func:`zigzag_vertices` drawn segment by segment
    with ``line_from_points``, added to the image and clipped."""
    b, _, h, w = x.shape
    r0 = torch.randint(0, h - 1, (b,), generator=gen, device=x.device)
    r1 = r0 + torch.randint(-5, 5, (b,), generator=gen, device=x.device)
    cols, rows = zigzag_vertices(r0, r1, 2.0, float(w - 3))  # float64, on the CPU
    total = torch.zeros(b, h, w, device=x.device)
    for k in range(1, cols.shape[1]):
        total = total + line_from_points(cols[:, k - 1], rows[:, k - 1], cols[:, k], rows[:, k], h, w,
                                         device=x.device)
    return x + total.unsqueeze(1).to(x.dtype)


def _canny_edges(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MNIST-C ``canny_edges``: ``skimage.feature.canny(x)`` (sigma 1, low 0.1, high 0.2) as a 0/1
    image; see :func:`canny`."""
    return canny(x)


_CORRUPTIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "shot_noise": _shot_noise, "impulse_noise": _impulse_noise, "glass_blur": _glass_blur,
    "motion_blur": _motion_blur, "shear": _shear, "scale": _scale, "rotate": _rotate,
    "brightness": _brightness, "translate": _translate, "stripe": _stripe, "fog": _fog,
    "spatter": _spatter, "dotted_line": _dotted_line, "zigzag": _zigzag, "canny_edges": _canny_edges,
}
assert tuple(_CORRUPTIONS) == MNIST_C_CORRUPTIONS


class MnistCCorruptionEngine:
    """The MNIST-C corruptions on (B, C, H, W) float images in [0, 1], on the images' device.

    ``engine(images, name, severity, seed)`` returns the corrupted batch (same shape, dtype and
    device). MNIST-C has one strength per corruption, so ``severity`` must be None or 1.
    ``name`` is one of :data:`MNIST_C_CORRUPTIONS` or 'identity' (returns a copy).

    ``device_paths`` (for tests): a device type whose algorithms run whatever the images' device;
    the only device-specific choice here is float32 instead of float64 for geometry and edge
    detection on 'mps' (:func:`_precise`). See ``_ops.forced_device_paths``.
    """

    name = "mnist_c"
    family = "mnist_c"

    def __init__(self, device_paths: str | None = None):
        self.device_paths = _ops.check_device_paths(device_paths)

    def __call__(self, images: torch.Tensor, name: str, severity: int | None = None, seed: int = 0) -> torch.Tensor:
        if name not in MNIST_C_NAMES:
            raise ConfigError(f"unknown MNIST-C corruption {name!r}; expected one of {list(MNIST_C_NAMES)}")
        if severity is not None and (isinstance(severity, bool) or severity != 1):
            raise ConfigError(f"MNIST-C corruptions have one fixed strength: severity must be 1 (or None), "
                              f"got {severity!r}")
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"expected float images of shape (B, C, H, W), got {tuple(images.shape)} "
                             f"{images.dtype}")
        if name == "identity":
            return images.clone()
        if images.shape[0] == 0:
            return images.clone()
        generator = torch.Generator(device=images.device)
        generator.manual_seed(derive_seed(seed, name))
        work = images if images.dtype in (torch.float32, torch.float64) else images.float()
        with torch.no_grad(), _ops.forced_device_paths(self.device_paths):
            out = _CORRUPTIONS[name](work.detach(), generator)
        return out.clamp(0, 1).to(images.dtype)

    def close(self) -> None:
        """Nothing to release (kept for the engine interface)."""
