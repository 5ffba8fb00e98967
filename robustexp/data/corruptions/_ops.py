"""Low-level batched tensor operations shared by the torch corruption engine.

Everything works on float tensors (..., H, W) on any device; helpers that need a boundary
mode take one of

* ``"nearest"``    scipy ``nearest`` / OpenCV ``BORDER_REPLICATE`` (aaa|abcd|ddd),
* ``"reflect101"`` OpenCV's default ``BORDER_REFLECT_101`` / torch ``reflect`` (cb|abcd|cb),
* ``"symmetric"``  scipy ``reflect`` (ba|abcd|dc),
* ``"constant"``   zeros outside (scipy ``constant`` with cval 0; filter matrices only).

Padding is done with index tensors, so it works for any pad width (pads wider than the image
included, which happens with large blurs on 28x28 images).

Device paths: a few helpers (and the engines) pick a different algorithm on CPU than on other
devices (block-sparse matrix products, chunked sampling, sub-batches, Pillow's JPEG codec). They
ask :func:`device_type` rather than ``tensor.device.type``, so that a test can run the non-CPU
algorithms on CPU tensors inside ``forced_device_paths("cuda")`` (the engines' ``device_paths``
option) and compare them with the CPU ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache

import torch

LUMA = (0.299, 0.587, 0.114)

_FORCED_DEVICE_TYPE: ContextVar[str | None] = ContextVar("forced_device_type", default=None)


def device_type(device) -> str:
    """The device type whose algorithms run on tensors of ``device``: its own type ('cpu', 'cuda',
    'mps' ...), or the one forced by :func:`forced_device_paths` (tests)."""
    forced = _FORCED_DEVICE_TYPE.get()
    if forced is not None:
        return forced
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def cpu_paths(device) -> bool:
    """Whether the CPU-specific algorithms apply to tensors on ``device``."""
    return device_type(device) == "cpu"


def check_device_paths(kind: str | None) -> str | None:
    """``None`` (each tensor's own device) or a device type ('cpu', 'cuda', 'mps' ...)."""
    if kind is None:
        return None
    try:
        return torch.device(kind).type
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device_paths must be None or a device type such as 'cpu' or 'cuda', got {kind!r}") from error


@contextmanager
def forced_device_paths(kind: str | None) -> Iterator[None]:
    """Within the block, run the algorithms of device type ``kind`` whatever the tensors' device
    (``None``: no change). Per thread / task (a ``ContextVar``), so concurrent engines do not mix."""
    kind = check_device_paths(kind)
    if kind is None:
        yield
        return
    token = _FORCED_DEVICE_TYPE.set(kind)
    try:
        yield
    finally:
        _FORCED_DEVICE_TYPE.reset(token)


def pad_index(n: int, before: int, after: int, mode: str, device) -> torch.Tensor:
    """Source indices of a 1-D signal of length ``n`` extended by ``before``/``after`` samples."""
    i = torch.arange(-before, n + after, device=device)
    if mode == "nearest":
        return i.clamp(0, n - 1)
    if mode == "reflect101":
        if n == 1:
            return torch.zeros_like(i)
        period = 2 * (n - 1)
        i = i.remainder(period)
        return torch.where(i >= n, period - i, i)
    if mode == "symmetric":
        period = 2 * n
        i = i.remainder(period)
        return torch.where(i >= n, period - 1 - i, i)
    raise ValueError(mode)


def take(x: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """``x.index_select(dim, idx)`` through advanced indexing (much faster on CPU)."""
    dim = dim % x.ndim
    return x[(slice(None),) * dim + (idx,)]


_TORCH_PAD_MODE = {"nearest": "replicate", "reflect101": "reflect"}


def pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int, mode: str) -> torch.Tensor:
    """Pad the last two axes of ``x`` with any of the boundary modes above, any widths; always a
    new tensor.

    The result is ``x`` gathered at ``pad_index`` along each axis, built by copies only (so the
    bits of every value, NaN and signed zeros included, are those of ``x``): contiguous floating
    inputs take torch's ``replicate`` / ``reflect`` padding where it applies (reflect: pads
    narrower than the axis), other contiguous inputs a copy of ``x`` into the middle of the result
    and of the ``pad_index`` rows / columns into its borders (~30x and ~6x faster on CPU than the
    two whole-tensor gathers that non-contiguous inputs still take, which keep their layout)."""
    h, w = x.shape[-2], x.shape[-1]
    if not x.is_contiguous() or x.ndim < 2:
        x = take(x, -2, pad_index(h, top, bottom, mode, x.device))
        return take(x, -1, pad_index(w, left, right, mode, x.device))
    torch_mode = _TORCH_PAD_MODE.get(mode)
    if (torch_mode is not None and x.is_floating_point() and x.numel() > 0
            and (mode == "nearest" or max(top, bottom) < h and max(left, right) < w)):
        flat = x.reshape(-1, h, w)
        out = torch.nn.functional.pad(flat, (left, right, top, bottom), mode=torch_mode)
        return out.view(x.shape[:-2] + out.shape[-2:])
    out = x.new_empty(x.shape[:-2] + (h + top + bottom, w + left + right))
    out[..., top:top + h, left:left + w] = x
    if top or bottom:
        rows = pad_index(h, top, bottom, mode, x.device)
        if top:
            out[..., :top, left:left + w] = x[..., rows[:top], :]
        if bottom:
            out[..., top + h:, left:left + w] = x[..., rows[top + h:], :]
    if left or right:  # every row of out is filled: the columns gather from its middle block
        cols = pad_index(w, left, right, mode, x.device) + left
        if left:
            out[..., :, :left] = out[..., :, cols[:left]]
        if right:
            out[..., :, left + w:] = out[..., :, cols[left + w:]]
    return out


_NEAREST_EXACT: dict = {}


def _is_nearest_exact(n_in: int, idx: torch.Tensor) -> bool:
    """Whether ``idx`` (output -> source positions along one axis) is the index of torch's
    ``interpolate(mode="nearest-exact")`` from ``n_in`` samples to ``idx.numel()`` (found by
    interpolating the positions themselves; cached)."""
    key = (n_in, tuple(idx.tolist()))
    if key not in _NEAREST_EXACT:
        src = torch.arange(n_in, dtype=torch.float32).view(1, 1, n_in)
        got = torch.nn.functional.interpolate(src, size=idx.numel(), mode="nearest-exact").view(-1)
        _NEAREST_EXACT[key] = bool(torch.equal(got.long(), idx.cpu().long()))
    return _NEAREST_EXACT[key]


def take_rows_cols(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``take(take(x, -2, rows), -1, cols)`` (e.g. a nearest-neighbour resize by precomputed source
    indices). On CPU, for a contiguous 4-D floating ``x`` whose indices are those of torch's
    ``interpolate(mode="nearest-exact")`` (checked once per index), that resize instead: the same
    copies, several times faster than the column gather."""
    if (cpu_paths(x.device) and x.ndim == 4 and x.is_floating_point() and x.is_contiguous() and x.numel()
            and _is_nearest_exact(x.shape[-2], rows) and _is_nearest_exact(x.shape[-1], cols)):
        return torch.nn.functional.interpolate(x, size=(rows.numel(), cols.numel()), mode="nearest-exact")
    return take(take(x, -2, rows), -1, cols)


_MATRIX_CACHE: dict = {}


def filter_matrix(n: int, kernel: torch.Tensor, mode: str, device, dtype) -> torch.Tensor:
    """The (n, n) matrix of a 1-D correlation with ``kernel`` (odd length) under boundary ``mode``."""
    key = ("filter", n, tuple(kernel.tolist()), mode, str(device), dtype)
    if key not in _MATRIX_CACHE:
        k = kernel.numel()
        r = (k - 1) // 2
        rows = torch.arange(n).view(n, 1).expand(n, k)
        weights = kernel.double().repeat(n)
        if mode == "constant":  # taps outside the signal read zeros: drop them
            cols = torch.arange(n).view(n, 1) + torch.arange(-r, r + 1).view(1, k)
            inside = ((cols >= 0) & (cols < n)).reshape(-1)
            rows, cols, weights = rows.reshape(-1)[inside], cols.reshape(-1)[inside], weights[inside]
        else:
            src = pad_index(n, r, r, mode, "cpu")
            cols = src[torch.arange(n).view(n, 1) + torch.arange(k).view(1, k)]
        m = torch.zeros(n, n, dtype=torch.float64)
        m.index_put_((rows.reshape(-1), cols.reshape(-1)), weights, accumulate=True)
        _MATRIX_CACHE[key] = m.to(device=device, dtype=dtype)
    return _MATRIX_CACHE[key]


def apply_axes(x: torch.Tensor, mh: torch.Tensor | None, mw: torch.Tensor | None) -> torch.Tensor:
    """``mh @ x @ mw.T`` over the last two axes (either matrix may be None)."""
    if mh is not None:
        x = torch.matmul(mh, x)
    if mw is not None:
        x = torch.matmul(x, mw.transpose(0, 1))
    return x


def correlate2d_fft(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate (..., H, W) with one 2-D kernel (odd sizes) via FFT, padding with ``mode``."""
    kh, kw = kernel.shape
    h, w = x.shape[-2], x.shape[-1]
    ph, pw = kh // 2, kw // 2
    size = (_fft_size(h + 2 * ph), _fft_size(w + 2 * pw))
    xp = pad(x, ph, size[0] - h - ph, pw, size[1] - w - pw, mode)
    k = torch.zeros(size, dtype=x.dtype, device=x.device)
    # correlation = convolution with the flipped kernel; place its centre at the origin
    flipped = kernel.flip(0, 1).to(x.dtype)
    k[:kh, :kw] = flipped
    k = torch.roll(k, (-ph, -pw), (0, 1))
    out = torch.fft.irfft2(torch.fft.rfft2(xp).mul_(torch.fft.rfft2(k)), s=size)
    return out[..., ph:ph + h, pw:pw + w]


def _fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (fast FFT sizes)."""
    best = 1 << (n - 1).bit_length()
    a = 1
    while a < 2 * n:
        b = a
        while b < 2 * n:
            c = b
            while c < 2 * n:
                if n <= c < best:
                    best = c
                c *= 5
            b *= 3
        a *= 2
    return best


def correlate2d(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Direct correlation of (..., H, W) with a small 2-D kernel (odd sizes), padding with
    ``mode``: a sum of shifted slices (faster than a one-channel convolution on CPU)."""
    kh, kw = kernel.shape
    h, w = x.shape[-2], x.shape[-1]
    xp = pad(x, kh // 2, kh // 2, kw // 2, kw // 2, mode)
    out = torch.zeros_like(x)
    for i in range(kh):
        for j in range(kw):
            k = float(kernel[i, j])
            if k != 0.0:
                out.add_(xp[..., i:i + h, j:j + w], alpha=k)
    return out


@cache
def scipy_gaussian_kernel(sigma: float, truncate: float) -> torch.Tensor:
    """The 1-D kernel of ``scipy.ndimage.gaussian_filter1d`` (radius ``int(truncate*sigma+0.5)``),
    float64, cached (do not modify it in place)."""
    radius = int(truncate * float(sigma) + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * t * t / (float(sigma) ** 2))
    return k / k.sum()


class BlockedMatrix:
    """A resampling or filter matrix (n_out, n_in) whose rows each touch a narrow range of
    columns (separable filters, interpolation, box downsampling), applied over one image axis.

    On CPU, blocks of 32 output rows multiply only the input rows (columns of the matrix) they
    depend on: a dense 224 x 224 product is compute-bound, and skipping the zeros cuts its work
    2.5-7x for the matrices used here. The blocks are found once from the non-zero pattern. Other
    devices (``cpu_paths`` false), and matrices whose blocks would cover most of it, take the dense
    product (the same sums, with the exact zeros included)."""

    block = 32

    def __init__(self, m: torch.Tensor):
        self.m = m
        n_out, n_in = m.shape
        nonzero = (m != 0).cpu()
        blocks, area = [], 0
        for i0 in range(0, n_out, self.block):
            i1 = min(n_out, i0 + self.block)
            cols = nonzero[i0:i1].any(0).nonzero()
            j0, j1 = (int(cols.min()), int(cols.max()) + 1) if cols.numel() else (0, 0)
            blocks.append((i0, i1, j0, j1))
            area += (i1 - i0) * (j1 - j0)
        self.blocks = blocks if area <= 0.6 * n_out * n_in else None

    def _blocked(self, x: torch.Tensor) -> bool:
        return self.blocks is not None and cpu_paths(x.device)

    def left(self, x: torch.Tensor) -> torch.Tensor:
        """``m @ x`` over axis -2."""
        if not self._blocked(x):
            return torch.matmul(self.m, x)
        return torch.cat([torch.matmul(self.m[i0:i1, j0:j1], x[..., j0:j1, :]) for i0, i1, j0, j1 in self.blocks], -2)

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ m.T`` over axis -1."""
        if not self._blocked(x):
            return torch.matmul(x, self.m.transpose(0, 1))
        return torch.cat([torch.matmul(x[..., j0:j1], self.m[i0:i1, j0:j1].transpose(0, 1))
                          for i0, i1, j0, j1 in self.blocks], -1)


def blocked_filter_matrix(n: int, kernel: torch.Tensor, mode: str, device, dtype) -> BlockedMatrix:
    """``filter_matrix`` as a cached ``BlockedMatrix``."""
    key = ("blocked", n, tuple(kernel.tolist()), mode, str(device), dtype)
    if key not in _MATRIX_CACHE:
        _MATRIX_CACHE[key] = BlockedMatrix(filter_matrix(n, kernel, mode, device, dtype))
    return _MATRIX_CACHE[key]


def gaussian_filter(x: torch.Tensor, sigma, truncate: float = 4.0, mode: str = "nearest") -> torch.Tensor:
    """``skimage.filters.gaussian`` / ``scipy.ndimage.gaussian_filter`` over the last two axes,
    as two (block-sparse) matrix products, boundary handling folded into the matrices.

    ``sigma`` is a number or a (sigma_h, sigma_w) pair; an axis with sigma 0 is left alone (as
    scipy does for sigma <= 1e-15). skimage's defaults are mode ``nearest`` and truncate 4.
    """
    sh, sw = (sigma, sigma) if not isinstance(sigma, (tuple, list)) else sigma
    h, w = x.shape[-2], x.shape[-1]
    if sh > 1e-15:
        x = blocked_filter_matrix(h, scipy_gaussian_kernel(sh, truncate), mode, x.device, x.dtype).left(x)
    if sw > 1e-15:
        x = blocked_filter_matrix(w, scipy_gaussian_kernel(sw, truncate), mode, x.device, x.dtype).right(x)
    return x


def zoom_matrix(n: int, zoom: float, cut: bool, device, dtype) -> BlockedMatrix:
    """One axis of ``clipped_zoom`` as a (n_out, n) matrix: crop the centre ``ceil(n / zoom)``
    samples starting at ``(n - ceil(n / zoom)) // 2`` and resample them linearly to
    ``round(ceil(n / zoom) * zoom)`` samples with scipy's ``zoom(order=1, grid_mode=False)``
    coordinates ``i * (in - 1) / (out - 1)`` (float64 weights); ``cut`` keeps the first n rows.
    Cached per (n, zoom, cut, device, dtype)."""
    key = ("zoom", n, float(zoom), bool(cut), str(device), dtype)
    if key not in _MATRIX_CACHE:
        c = int(math.ceil(n / float(zoom)))
        top = (n - c) // 2
        n_zoomed = int(round(c * zoom))
        n_out = min(n, n_zoomed) if cut else n_zoomed
        i = torch.arange(n_out, dtype=torch.float64)
        src = i * ((c - 1) / (n_zoomed - 1)) if n_zoomed > 1 else torch.zeros_like(i)
        lo = src.floor().clamp(0, c - 1)
        frac = src - lo
        hi = (lo + 1).clamp(max=c - 1)
        m = torch.zeros(n_out, n, dtype=torch.float64)
        rows = torch.arange(n_out)
        m.index_put_((rows, lo.long() + top), 1 - frac, accumulate=True)
        m.index_put_((rows, hi.long() + top), frac, accumulate=True)
        _MATRIX_CACHE[key] = BlockedMatrix(m.to(device=device, dtype=dtype))
    return _MATRIX_CACHE[key]


def clipped_zoom(x: torch.Tensor, zoom: float, cut: bool = True) -> torch.Tensor:
    """``imagecorruptions.clipped_zoom``: crop the centre and ``scipy.ndimage.zoom(order=1)`` it
    back (``grid_mode=False``: corner pixels map to corner pixels, i.e. bilinear with
    ``align_corners=True``), as one (block-sparse) matrix product per axis (``zoom_matrix``). The
    zoomed size ``round(ceil(n / zoom) * zoom)`` can exceed n: ``cut=True`` cuts it to (H, W)
    (zoom_blur), ``cut=False`` keeps it (snow, which cuts only after its motion blur). Works on
    (..., H, W); the same grid for the whole batch.
    """
    if float(zoom) == 1.0:  # crop and resampling are both the identity
        return x
    h, w = x.shape[-2], x.shape[-1]
    x = zoom_matrix(h, zoom, cut, x.device, x.dtype).left(x)
    return zoom_matrix(w, zoom, cut, x.device, x.dtype).right(x)


# ---------------------------------------------------------------- glass blur


def glass_shuffle(y: torch.Tensor, delta: int, offsets: torch.Tensor) -> torch.Tensor:
    """``engine.glass_shuffle`` (the reference's sequential pixel-copy loop of glass blur; see there)
    with less work per pixel, the same permutation: a position p reads q = p + d_p; if q is
    visited later in the pass (``later``), p ends with what q ends with, else with q's pass-start
    value. So p's source is ``direct(end(p))``, where ``end`` follows the links p -> q to the end
    of p's chain (chains strictly increase in raster order: no cycles). ``end`` is found by
    pointer doubling over all positions (``J = J[J]`` until nothing changes, about log2 of the
    longest chain rounds, each one 1-D ``index_select``), instead of the pointer jumping over
    shrinking sets of unresolved positions (boolean indexing, ``nonzero``, index writes: about
    3x slower on CPU); "q after p in raster order" is a positive flat step ``dy * W + dx``, and
    the indices are int32 where they fit. Integer logic only: the output (a gather of ``y``) is
    bit-identical. ``offsets`` (iterations, 2, B, H, W), any integer dtype, values in
    ``[-delta, delta - 1]`` as drawn by the engine."""
    b, c, h, w = y.shape
    if offsets.shape[0] == 0:
        return y
    n = h * w
    dev = y.device
    index = torch.int32 if b * n + w * (delta + 1) < 2 ** 31 else torch.int64
    hh = torch.arange(h, device=dev).view(1, h, 1)
    ww = torch.arange(w, device=dev).view(1, 1, w)
    visited = (hh > delta) & (hh <= h - delta) & (ww > delta) & (ww <= w - delta)  # (1, H, W)
    flat_idx = torch.arange(b * n, device=dev, dtype=index).view(b, h, w)  # batch-flat position
    composed = None
    for it in range(offsets.shape[0]):
        # q - p for a visited p (|dy|, |dx| <= delta: q stays in its image); q after p in raster
        # order <=> a positive step (W > delta wherever a position is visited)
        step = torch.mul(offsets[it, 0].to(index), w).add_(offsets[it, 1])
        after = (step > 0).view(-1)
        direct = torch.where(visited, step.add_(flat_idx), flat_idx).view(-1)  # q, or p if unvisited
        # link p -> q where q comes after p. The links need not test whether q is visited (or p):
        # an unvisited position's direct source is itself, so a chain that reaches one ends there
        # with the value it would have taken anyway (an unvisited p links to itself).
        jump = torch.where(after, direct, flat_idx.view(-1))
        while True:  # pointer doubling to the ends of the chains
            nxt = jump.index_select(0, jump)
            if torch.equal(nxt, jump):
                break
            jump = nxt
        src = direct.index_select(0, jump)
        composed = src if composed is None else composed.index_select(0, src)
    local = composed.view(b, n).long() - torch.arange(b, device=dev).view(b, 1) * n
    return y.reshape(b, c, n).gather(2, local.unsqueeze(1).expand(b, c, n)).view(b, c, h, w)


# ---------------------------------------------------------------- spatter


def truncated_edt(edges: torch.Tensor, limit: int) -> torch.Tensor:
    """``engine._truncated_edt``: the Euclidean distance to the nearest True of ``edges`` (N, H, W),
    exact up to ``limit`` and ``limit`` beyond (float32), with the same integers before the final
    square root, in less work: every intermediate is a small integer, so the passes run on int16
    (int32 for a limit over 100) instead of float32, the column pass is a min-plus doubling scan
    (shifts 1, 2, 4 ... up to limit + 1 each way: the distance to the nearest edge up / down
    within 2^k - 1 rows, exact where it matters since it is capped at limit + 1 right after)
    instead of cumulative max / min over the whole column, and the row pass takes the two
    horizontal offsets +-d in one minimum before adding d^2."""
    n, h, w = edges.shape
    dtype = torch.int16 if limit <= 100 else torch.int32
    cap, big = limit + 1, limit * limit + 1
    far = torch.full((), 4 * cap + 64, dtype=dtype, device=edges.device)  # > cap even after the scans
    up = torch.where(edges, torch.zeros((), dtype=dtype, device=edges.device), far)
    down = up.clone()
    shift = 1
    while shift <= cap and shift < h:
        torch.minimum(up[:, shift:], up[:, :-shift] + shift, out=up[:, shift:])
        torch.minimum(down[:, :-shift], down[:, shift:] + shift, out=down[:, :-shift])
        shift *= 2
    g = torch.minimum(up, down).clamp_(max=cap)
    g = g.mul_(g).clamp_(max=big)
    padded = torch.nn.functional.pad(g, (limit, limit), value=big)
    best = g.clone()
    for d in range(1, limit + 1):
        nearest = torch.minimum(padded[:, :, limit + d:limit + d + w], padded[:, :, limit - d:limit - d + w])
        torch.minimum(best, nearest.add_(d * d), out=best)
    return best.float().sqrt_().clamp_(max=float(limit))


# ---------------------------------------------------------------- colour spaces (skimage)


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma of (B, 3, H, W) -> (B, 1, H, W)."""
    w = torch.tensor(LUMA, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb * w).sum(1, keepdim=True)


# ---------------------------------------------------------------- motion blur


def motion_blur_taps(width: int, angles_deg: torch.Tensor):
    """Per-image integer shifts (dy, dx) of ``imagecorruptions._motion_blur`` for each tap.

    Returns two (width, B) int64 tensors. Computed in float64 like the reference.
    """
    a = torch.deg2rad(angles_deg.to(torch.float64))
    py, px = width * torch.sin(a), width * torch.cos(a)
    hyp = torch.sqrt(py * py + px * px)
    i = torch.arange(width, dtype=torch.float64, device=angles_deg.device).view(-1, 1)
    dy = -torch.ceil(i * py / hyp - 0.5)
    dx = -torch.ceil(i * px / hyp - 0.5)
    return dy.long(), dx.long()


@cache
def _motion_blur_padding(width: int, angle_range: tuple[float, float], h: int, w: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): the largest tap shifts of ``motion_blur_taps`` over every angle
    in ``angle_range`` (each shift is monotone in sin or cos of the angle, so the range's ends and
    the multiples of 90 degrees inside it bound them), capped at the image size."""
    lo, hi = angle_range
    candidates = [lo, hi] + [90.0 * k for k in range(-4, 5) if lo < 90.0 * k < hi]
    dy, dx = motion_blur_taps(width, torch.tensor(candidates, dtype=torch.float64))
    top, bottom = min(max(int(dy.max()), 0), h - 1), min(max(-int(dy.min()), 0), h - 1)
    left, right = min(max(int(dx.max()), 0), w - 1), min(max(-int(dx.min()), 0), w - 1)
    return top, bottom, left, right


def motion_blur(x: torch.Tensor, radius: int, sigma: float, angles_deg: torch.Tensor,
                angle_range: tuple[float, float] = (-180.0, 180.0)) -> torch.Tensor:
    """``imagecorruptions._motion_blur`` for a batch (B, C, H, W) with one angle per image.

    The kernel is a one-sided Gaussian of ``2*radius+1`` taps; tap ``i`` adds the image shifted
    by ``(dy_i, dx_i)`` with edge replication (the reference ``shift``). As in the reference,
    the sum stops (without renormalising) at the first tap whose shift reaches the image size.
    Computed as one FFT convolution per image (its own sparse kernel) of the edge-replicated
    image, which equals the sum of clamped shifts. The padding (hence the FFT size) covers every
    angle of ``angle_range`` (the caller's sampling range), not only the batch's angles, so that
    an image's output does not depend on the other images of its batch (float rounding).
    """
    b, c, h, w = x.shape
    width = 2 * radius + 1
    t = torch.arange(width, dtype=torch.float64)
    kernel = torch.exp(-t * t / (2 * sigma * sigma)) / (math.sqrt(2 * math.pi) * sigma)
    kernel = (kernel / kernel.sum()).to(x.device)
    dy, dx = motion_blur_taps(width, angles_deg.to(x.device))
    valid = (dy.abs() < h) & (dx.abs() < w)
    # out[p] = sum_i k_i x[clamp(p - d_i)]: pad (edge-replicated) by the largest shift on each side
    lo, hi = float(angle_range[0]), float(angle_range[1])
    if bool(((angles_deg < lo) | (angles_deg > hi)).any()):
        raise ValueError(f"motion_blur: angles outside angle_range {angle_range}")
    top, bottom, left, right = _motion_blur_padding(width, (lo, hi), h, w)
    size = (_fft_size(h + top + bottom), _fft_size(w + left + right))
    xp = pad(x, top, size[0] - h - top, left, size[1] - w - left, "nearest")
    k = torch.zeros((b,) + size, dtype=x.dtype, device=x.device)
    weights = (kernel.view(-1, 1) * valid).to(x.dtype)  # (width, B)
    bidx = torch.arange(b, device=x.device).view(1, b).expand(width, b)
    k.index_put_((bidx.reshape(-1), dy.remainder(size[0]).reshape(-1), dx.remainder(size[1]).reshape(-1)),
                 weights.reshape(-1), accumulate=True)
    out = torch.fft.irfft2(torch.fft.rfft2(xp).mul_(torch.fft.rfft2(k).unsqueeze(1)), s=size)
    return out[..., top:top + h, left:left + w]


def hsv_adjust(rgb: torch.Tensor, value=None, saturation=None) -> torch.Tensor:
    """skimage's ``hsv2rgb(rgb2hsv(rgb))`` with V (``value``) or S (``saturation``) replaced by a
    function of itself, without computing the hue: in skimage's HSV every channel is
    ``v * (1 - s * a_c)`` with ``a_c`` depending on the hue only, so a new (v', s') gives
    ``v' - (v' - channel * v' / v) * s' / s``. Grey pixels (s = 0, hue 0 in skimage) become
    ``v' * (1, 1 - s', 1 - s')``. Algebraically identical to the round trip (float rounding aside)."""
    v = rgb.amax(1, keepdim=True)
    delta = v - rgb.amin(1, keepdim=True)
    safe_v = torch.where(v == 0, torch.ones_like(v), v)
    s = delta / safe_v  # 0 where v == 0 (delta is 0 there)
    new_v = value(v) if value is not None else v
    new_s = saturation(s) if saturation is not None else s
    grey = delta == 0
    ratio = new_s / torch.where(grey, torch.ones_like(s), s)
    # coloured pixels: new_v - (new_v - x * new_v / v) * ratio = x * (new_v / v * ratio) + new_v * (1 - ratio)
    k1 = torch.where(grey, torch.zeros_like(v), new_v / safe_v * ratio)
    a_grey = torch.tensor([0.0, 1.0, 1.0], dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    k0 = torch.where(grey, new_v * (1 - new_s * a_grey), new_v * (1 - ratio))
    return torch.addcmul(k0, rgb, k1)


# ---------------------------------------------------------------- Poisson noise on 8-bit levels

_POISSON_CACHE: dict = {}
_POISSON_CHUNK = 1 << 16  # values per chunk: keeps the float64 / int64 temporaries in cache


def poisson_pmf_levels(scale: float) -> torch.Tensor:
    """(256, K) float64 Poisson probabilities P(X = k) for the rates ``l / 255. * scale`` of the
    256 8-bit levels l (computed like the reference's ``x / 255. * c``), k = 0 .. K - 1. K is the
    first k at which the float64 CDF of the largest rate rounds to 1; the mass left out beyond it
    (< 2^-52) is given to the last column so that every row sums to 1."""
    rates = (torch.arange(256, dtype=torch.float64) / 255.0 * float(scale)).view(256, 1)
    k_max = int(scale + 12 * math.sqrt(scale) + 40)  # far beyond where the top rate's CDF is 1
    k = torch.arange(k_max + 1, dtype=torch.float64).view(1, -1)
    log_pmf = k * torch.log(rates.clamp(min=1e-300)) - rates - torch.lgamma(k + 1)
    pmf = torch.where(rates > 0, torch.exp(log_pmf), (k == 0).double())
    length = int((pmf[-1].cumsum(0) < 1.0).sum()) + 1
    pmf = pmf[:, :length].clone()
    pmf[:, -1] += (1.0 - pmf.sum(1)).clamp(min=0)
    return pmf


def alias_tables(pmf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Walker's alias tables (Vose's construction) for each row of ``pmf`` (R, K): ``prob`` (R, K)
    float64 and ``alias`` (R, K) int64 such that drawing a column j uniformly and keeping it with
    probability ``prob[r, j]`` (else taking ``alias[r, j]``) samples row r's distribution exactly:
    P(X = j) = (prob[j] + sum over i with alias[i] = j of (1 - prob[i])) / K."""
    rows, k = pmf.shape
    prob = torch.ones(rows, k, dtype=torch.float64)
    alias = torch.arange(k).repeat(rows, 1)
    scaled_all = (pmf * k).tolist()
    for r in range(rows):
        scaled = scaled_all[r]
        small = [j for j in range(k) if scaled[j] < 1.0]
        large = [j for j in range(k) if scaled[j] >= 1.0]
        prob_r, alias_r = prob[r].tolist(), alias[r].tolist()
        while small and large:
            s, g = small.pop(), large.pop()
            prob_r[s], alias_r[s] = scaled[s], g
            scaled[g] = (scaled[g] + scaled[s]) - 1.0
            (small if scaled[g] < 1.0 else large).append(g)
        # leftovers (rounding) keep prob 1 and alias to themselves
        prob[r] = torch.tensor(prob_r, dtype=torch.float64)
        alias[r] = torch.tensor(alias_r)
    return prob, alias


def poisson_level_tables(scale: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The alias tables of ``poisson_pmf_levels(scale)``, flattened ((256 * K,) prob float64 and
    alias as float32 counts), cached per (scale, device)."""
    key = (float(scale), str(device))
    if key not in _POISSON_CACHE:
        prob, alias = alias_tables(poisson_pmf_levels(scale))
        _POISSON_CACHE[key] = (prob.reshape(-1).to(device), alias.reshape(-1).to(device, torch.float32))
    return _POISSON_CACHE[key]


def poisson_levels(levels: torch.Tensor, scale: float, generator) -> torch.Tensor:
    """Poisson(levels / 255 * scale) counts (float32) for integer-valued float ``levels`` in
    0..255, exact in distribution (up to float64 rounding of the probabilities).

    ``torch.poisson`` runs a rejection sampler per value; here the rate takes only 256 values, so
    each level gets Walker alias tables once per scale, and a sample costs one float64 uniform u
    and two table lookups: column j = floor(u K), kept if the fraction u K - j is below
    ``prob[l, j]``, else ``alias[l, j]`` (the fraction of a 53-bit uniform carries 53 - log2 K
    bits). On CPU processed in chunks so that the temporaries stay in cache."""
    prob, alias = poisson_level_tables(scale, levels.device)
    k = prob.numel() // 256
    u = torch.rand(levels.shape, generator=generator, device=levels.device, dtype=torch.float64)
    out = torch.empty(levels.shape, dtype=torch.float32, device=levels.device)
    flat_l, flat_u, flat_out = levels.reshape(-1), u.view(-1), out.view(-1)
    chunk = _POISSON_CHUNK if cpu_paths(levels.device) else max(flat_u.numel(), 1)
    for start in range(0, flat_u.numel(), chunk):
        stop = start + chunk
        uk = flat_u[start:stop].mul_(k)
        col = uk.floor().clamp_(max=k - 1)  # u K rounds up to K for u within 2^-46 of 1
        frac = uk.sub_(col)  # in [0, 1): the keep/alias decision
        col = col.float()
        idx = flat_l[start:stop].mul(k).add_(col).long()
        other = alias.index_select(0, idx)
        keep = (frac < prob.index_select(0, idx)).float()
        flat_out[start:stop] = col.sub_(other).mul_(keep).add_(other)  # keep ? col : alias
    return out
