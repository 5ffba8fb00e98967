"""A batched JPEG encode/decode round trip in torch, modelled on libjpeg(-turbo) as used by
Pillow's ``Image.save(format="JPEG", quality=q)`` followed by ``Image.open``.

Pipeline (baseline, RGB input, Pillow defaults):

* RGB -> YCbCr with libjpeg's 16-bit fixed-point tables (exact integer arithmetic here);
* 4:2:0 chroma subsampling: 2x2 box average with libjpeg's alternating 1/2 rounding bias,
  after replicating the right/bottom edge to a multiple of 16;
* 8x8 DCT, quantisation with the standard (Annex K) tables scaled by ``jpeg_quality_scaling``
  and clamped to 1..255 (baseline), rounding half away from zero;
* dequantisation, inverse DCT, +128, rounding and clamping to 0..255;
* "fancy" (triangular) h2v2 chroma upsampling with libjpeg's 8/7 rounding biases;
* YCbCr -> RGB with libjpeg's fixed-point tables (exact integer arithmetic here).

The forward and inverse DCTs are exact float DCTs, whereas libjpeg uses the integer "islow"
DCT; a coefficient that lies within a rounding error of a quantisation boundary can therefore
land in the neighbouring bin, so the output is close to, not bit-identical with, Pillow's.

On CPU tensors ``pil_jpeg_roundtrip`` runs Pillow's own codec instead (the reference's code path,
bit-identical, and 2-3x faster than the torch pipeline on CPU); ``jpeg_roundtrip`` serves
other devices.
"""

from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from robustexp.data.corruptions._ops import take

_LUMA_Q = [
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
]
_CHROMA_Q = [
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
] + [99] * 32


def quant_table(quality: int, chroma: bool) -> torch.Tensor:
    """libjpeg ``jpeg_set_quality(quality, force_baseline=TRUE)`` table, (8, 8) natural order."""
    quality = min(max(int(quality), 1), 100)
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    base = _CHROMA_Q if chroma else _LUMA_Q
    vals = [min(max((b * scale + 50) // 100, 1), 255) for b in base]
    return torch.tensor(vals, dtype=torch.float32).view(8, 8)


def _dct_matrix() -> torch.Tensor:
    d = torch.zeros(8, 8, dtype=torch.float64)
    for u in range(8):
        cu = math.sqrt(1 / 8) if u == 0 else math.sqrt(2 / 8)
        for x in range(8):
            d[u, x] = cu * math.cos((2 * x + 1) * u * math.pi / 16)
    return d


_DCT = _dct_matrix()
_DCT2 = torch.kron(_DCT, _DCT)
_FIX = lambda v: int(v * 65536 + 0.5)  # noqa: E731  libjpeg FIX() with SCALEBITS = 16


def _shr16(v: torch.Tensor) -> torch.Tensor:
    return torch.floor(v * (1.0 / 65536))  # exact: |v| < 2^24 is an integer-valued float32


_RGB2YCC = [[_FIX(0.29900), _FIX(0.58700), _FIX(0.11400)],
            [-_FIX(0.16874), -_FIX(0.33126), _FIX(0.5)],
            [_FIX(0.5), -_FIX(0.41869), -_FIX(0.08131)]]
_RGB2YCC_BIAS = [1 << 15, (1 << 15) - 1, (1 << 15) - 1]


def _mix(m, v: torch.Tensor) -> torch.Tensor:
    """Per-pixel 3x3 channel mix of (B, 3, H, W) as a matrix product (exact for integers < 2^24)."""
    mat = torch.tensor(m, dtype=v.dtype, device=v.device)
    return torch.einsum("oc,bchw->bohw", mat, v)


def _rgb_to_ycc(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) integer-valued float32 0..255 -> YCbCr, libjpeg jccolor.c rgb_ycc_convert.

    Integer arithmetic in float32 is exact here: every partial sum stays below 2^24 in magnitude
    (the +128 offset of the chroma is added after the shift, which is the same thing)."""
    bias = torch.tensor(_RGB2YCC_BIAS, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    out = _shr16(_mix(_RGB2YCC, rgb) + bias)
    out[:, 1:] += 128
    return out


def _ycc_to_rgb(ycc: torch.Tensor) -> torch.Tensor:
    """libjpeg jdcolor.c ycc_rgb_convert (integer-valued float32 in and out, 0..255; exact):
    R = Y + round(1.402 Cr), G = Y + ((-0.34414 Cb - 0.71414 Cr + 1/2) >> 16), B = Y + round(1.772 Cb)
    with the coefficients in 16-bit fixed point."""
    y = ycc[:, :1]
    c = ycc[:, 1:] - 128
    m = [[0, _FIX(1.40200)], [-_FIX(0.34414), -_FIX(0.71414)], [_FIX(1.77200), 0]]
    mat = torch.tensor(m, dtype=ycc.dtype, device=ycc.device)
    out = _shr16(torch.einsum("oc,bchw->bohw", mat, c) + (1 << 15)) + y
    return out.clamp_(0, 255)


def _blocks_roundtrip(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(N, H, W) float samples 0..255, H and W multiples of 8 -> decoded samples (float, int-valued)."""
    n, h, w = plane.shape
    d2 = _DCT2.to(plane.device, torch.float32)  # (64, 64): vec(D X D^T) = kron(D, D) vec(X)
    q = table.to(plane.device).reshape(64)
    blocks = (plane.float() - 128.0).view(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4).reshape(-1, 64)
    coef = blocks @ d2.T
    coef = torch.sign(coef) * torch.floor(coef.abs() / q + 0.5) * q
    rec = coef @ d2
    rec = torch.floor(rec + 0.5 + 128.0).clamp(0, 255)
    return rec.view(n, h // 8, w // 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(n, h, w)


def _fancy_upsample_1d(x: torch.Tensor, dim: int, n_out: int, vertical: bool) -> torch.Tensor:
    """One axis of libjpeg's h2v2 fancy upsampling. Vertical: 3*near + far (no rounding);
    horizontal: (3*this + neighbour + 8 or 7) >> 4 with the edge columns using 4*this."""
    n = x.shape[dim]
    idx = torch.arange(n, device=x.device)
    prev = take(x, dim, (idx - 1).clamp(0, n - 1))
    nxt = take(x, dim, (idx + 1).clamp(0, n - 1))
    if vertical:
        even, odd = 3 * x + prev, 3 * x + nxt
    else:
        even = torch.floor((3 * x + prev + 8) / 16)
        odd = torch.floor((3 * x + nxt + 7) / 16)
    out = torch.stack((even, odd), dim + 1 if dim >= 0 else dim)
    shape = list(x.shape)
    shape[dim] = 2 * n
    out = out.reshape(shape)
    return out.narrow(dim, 0, n_out)


def jpeg_roundtrip(rgb255: torch.Tensor, quality: int) -> torch.Tensor:
    """(B, 3, H, W) float, integer values 0..255 -> JPEG-decoded (B, 3, H, W) float 0..255."""
    b, _, h, w = rgb255.shape
    dev = rgb255.device
    ph, pw = -(-h // 16) * 16, -(-w // 16) * 16
    rgb = rgb255.round().to(torch.float32)
    if ph != h:
        rgb = take(rgb, 2, torch.arange(ph, device=dev).clamp(max=h - 1))
    if pw != w:
        rgb = take(rgb, 3, torch.arange(pw, device=dev).clamp(max=w - 1))
    ycc = _rgb_to_ycc(rgb)
    # luma at full resolution
    y = _blocks_roundtrip(ycc[:, 0].float(), quant_table(quality, False))[:, :h, :w]
    # chroma: 2x2 average with libjpeg's alternating bias (1, 2, 1, 2, ... along the row)
    c = ycc[:, 1:].reshape(b * 2, ph // 2, 2, pw // 2, 2).sum((2, 4))
    bias = (torch.arange(pw // 2, device=dev) % 2 + 1).view(1, 1, -1)
    c = torch.floor((c + bias) / 4)
    c = _blocks_roundtrip(c.float(), quant_table(quality, True))
    hc, wc = -(-h // 2), -(-w // 2)
    c = c[:, :hc, :wc]
    # the vertical pass keeps the 3*near + far sums (x4 scale), the horizontal pass rounds
    c = _fancy_upsample_1d(c, 1, h, vertical=True)
    if wc == 1:  # a single chroma column: both outputs use 4*this (libjpeg's special case)
        c = torch.floor((4 * c + 8) / 16).expand(-1, -1, w)
    else:
        c = _edge_fixed_horizontal(c, w)
    ycc_out = torch.cat((y.unsqueeze(1), c.reshape(b, 2, h, w)), 1)
    return _ycc_to_rgb(ycc_out).to(rgb255.dtype)


def _edge_fixed_horizontal(colsum: torch.Tensor, w_out: int) -> torch.Tensor:
    """Horizontal fancy pass on column sums with libjpeg's edge rules: first output
    (4*this + 8) >> 4, last output (4*this + 7) >> 4."""
    n = colsum.shape[-1]
    idx = torch.arange(n, device=colsum.device)
    prev = take(colsum, -1, (idx - 1).clamp(0, n - 1))
    nxt = take(colsum, -1, (idx + 1).clamp(0, n - 1))
    even = torch.floor((3 * colsum + prev + 8) / 16)
    odd = torch.floor((3 * colsum + nxt + 7) / 16)
    # with clamped neighbours, the first even is (4*this + 8) >> 4 and the last odd (4*this + 7) >> 4
    out = torch.stack((even, odd), -1).reshape(*colsum.shape[:-1], 2 * n)
    return out[..., :w_out]


_POOL: dict = {}


def _pil_roundtrip_into(image: np.ndarray, quality: int, out: np.ndarray) -> None:
    """Pillow's JPEG save at ``quality`` and load of one (H, W, 3) uint8 image, decoded into ``out``
    (the reference's ``x.save(output, 'JPEG', quality=c)`` and ``Image.open(output)``)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer, formats=("JPEG",)) as decoded:
        out[...] = np.asarray(decoded)


def pil_jpeg_roundtrip(rgb255: torch.Tensor, quality: int) -> torch.Tensor:
    """(B, 3, H, W) CPU float, integer values 0..255 -> Pillow's JPEG save (``quality``) and load,
    as the reference does, (B, 3, H, W) float 0..255.

    One conversion each way (float NCHW -> uint8 NHWC, uint8 NHWC -> float NCHW); every image is
    decoded straight into the output buffer. The images are coded on ``torch.get_num_threads()``
    threads (Pillow releases the GIL while it encodes and decodes), the same thread budget as the
    engine's torch operations, each thread taking a contiguous share of the batch."""
    b, _, h, w = rgb255.shape
    arr = torch.empty((b, h, w, 3), dtype=torch.uint8)
    arr.copy_(rgb255.permute(0, 2, 3, 1))  # values are integers in 0..255 (the caller rounds)
    src = arr.numpy()
    out = np.empty_like(src)

    def code(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            _pil_roundtrip_into(src[i], quality, out[i])

    threads = max(1, min(torch.get_num_threads(), b))
    if threads == 1:
        code(0, b)
    else:
        if threads not in _POOL:
            _POOL[threads] = ThreadPoolExecutor(threads, thread_name_prefix="jpeg")
        bounds = [b * k // threads for k in range(threads + 1)]
        list(_POOL[threads].map(code, bounds[:-1], bounds[1:]))
    result = torch.empty((b, 3, h, w), dtype=rgb255.dtype)
    result.copy_(torch.from_numpy(out).permute(0, 3, 1, 2))
    return result
