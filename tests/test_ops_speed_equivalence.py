"""The fast helpers of the corruption engine's hot spots (issue 21, item 4) against straightforward
reference implementations: each fast path is a reordering of pure copies (or a cached value of the
same computation), so the checks are exact (``torch.equal`` on the bits, including NaN and signed
zeros where they can occur), on odd shapes, every boundary mode the engine uses and pad widths up
to and beyond the image size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustexp.data.corruptions import _ops

NUMPY_MODE = {"nearest": "edge", "reflect101": "reflect", "symmetric": "symmetric"}


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


def index_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int, mode: str) -> torch.Tensor:
    """The previous ``_ops.pad``: one advanced-indexing gather per axis over the whole tensor."""
    h, w = x.shape[-2], x.shape[-1]
    x = x[..., _ops.pad_index(h, top, bottom, mode, x.device), :]
    return x[..., _ops.pad_index(w, left, right, mode, x.device)]


def numpy_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int, mode: str) -> torch.Tensor:
    widths = [(0, 0)] * (x.ndim - 2) + [(top, bottom), (left, right)]
    return torch.from_numpy(np.pad(x.numpy(), widths, mode=NUMPY_MODE[mode]))


SHAPES = [(2, 3, 5, 7), (3, 1, 9), (1, 1, 1, 6), (2, 4, 1), (4, 2, 3, 13, 11)]
PADS = [(0, 0, 0, 0), (1, 1, 1, 1), (0, 2, 3, 0), (4, 1, 0, 6), (12, 7, 9, 15)]


@pytest.mark.parametrize("mode", ["nearest", "reflect101", "symmetric"])
def test_pad_equals_indexing_reference_and_numpy(mode):
    """Every shape x pad width (zero, one-sided, wider than the image) x dtype, contiguous and
    strided inputs: the bits of the previous gather implementation and numpy's ``np.pad``."""
    g = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        base = torch.randn(shape, generator=g)
        base.view(-1)[::5] = -0.0  # signed zeros must be copied, not recomputed
        inputs = [base, base.transpose(-1, -2).contiguous().transpose(-1, -2), base[..., ::2, :],
                  base > 0, (base * 10).long()]
        for x in inputs:
            for top, bottom, left, right in PADS:
                got = _ops.pad(x, top, bottom, left, right, mode)
                want = index_pad(x, top, bottom, left, right, mode)
                assert got.dtype == x.dtype and got.shape == want.shape, (shape, mode)
                assert bits(got) == bits(want), (shape, x.stride(), mode, (top, bottom, left, right))
                if x.dtype != torch.bool:
                    assert bits(got) == bits(numpy_pad(x, top, bottom, left, right, mode)), (shape, mode)
                if x.is_contiguous():
                    assert got.is_contiguous()
                assert got.data_ptr() != x.data_ptr()  # always a new tensor, as before


GLASS = [(1, 2), (2, 1), (2, 3), (3, 2), (4, 2)]  # engine.GLASS_BLUR's (max_delta, iterations)


@pytest.mark.parametrize("delta,iterations", GLASS)
def test_glass_shuffle_equals_pointer_jumping_reference(delta, iterations):
    """``_ops.glass_shuffle`` (pointer doubling) against ``engine.glass_shuffle`` (pointer jumping,
    itself pinned to the reference's sequential loop in test_corruption_engine.py): the same
    permutation for every severity's (delta, iterations), odd and tiny images (no visited position
    at all when a side is <= 2 delta), int16 (the engine's) and int64 offsets, which stay
    unmodified. Offsets are drawn in a narrow band too, so that long chains occur."""
    from robustexp.data.corruptions import engine as E

    g = torch.Generator().manual_seed(delta * 10 + iterations)
    for b, h, w in [(3, 31, 17), (2, 9, 40), (1, 2 * delta, 7), (2, 2 * delta + 1, 2 * delta + 2), (1, 64, 64)]:
        y = torch.rand(b, 3, h, w, generator=g)
        for dtype in (torch.int16, torch.int64):
            offsets = torch.randint(-delta, delta, (iterations, 2, b, h, w), generator=g, dtype=dtype)
            if h == 64:  # mostly the largest step down (delta - 1 rows): long chains, many doubling rounds
                down = torch.rand(offsets[:, 0].shape, generator=g) < 0.9
                offsets[:, 0][down] = delta - 1
            before = offsets.clone()
            got = _ops.glass_shuffle(y, delta, offsets)
            assert torch.equal(offsets, before)
            assert bits(got) == bits(E.glass_shuffle(y, delta, offsets)), (b, h, w, dtype)
    assert _ops.glass_shuffle(y, delta, offsets[:0]) is y  # no iteration: unchanged


def test_take_rows_cols_equals_two_gathers():
    """The nearest-exact resize shortcut of ``take_rows_cols`` against the two gathers it replaces,
    for Pillow's NEAREST indices (pixelate) at sizes where torch's nearest-exact index is Pillow's
    (the shortcut) and where it is not (the gathers), on the CPU and the forced-CUDA paths."""
    from robustexp.data.corruptions.engine import _pil_nearest_index

    g = torch.Generator().manual_seed(0)
    used = {True: 0, False: 0}
    for n_out in (224, 57, 100, 31):
        for c in (0.6, 0.5, 0.4, 0.3, 0.25):
            n_in = max(1, int(n_out * c))
            rows, cols = _pil_nearest_index(n_in, n_out, "cpu"), _pil_nearest_index(n_in + 1, n_out + 3, "cpu")
            x = torch.rand(2, 3, n_in, n_in + 1, generator=g)
            x.view(-1)[::7] = -0.0
            want = x[..., rows, :][..., cols]
            for paths in (None, "cuda"):
                with _ops.forced_device_paths(paths):
                    got = _ops.take_rows_cols(x, rows, cols)
                assert got.shape == want.shape and bits(got) == bits(want), (n_in, n_out, paths)
            used[_ops._is_nearest_exact(n_in, rows) and _ops._is_nearest_exact(n_in + 1, cols)] += 1
    assert used[True] and used[False]  # both branches exercised
    assert _ops._is_nearest_exact(89, _pil_nearest_index(89, 224, "cpu"))  # pixelate severity 3 at 224 px


def test_truncated_edt_equals_engine_reference():
    """``_ops.truncated_edt`` (int16 doubling scans) against ``engine._truncated_edt`` (float32
    cumulative max / min): the same bits for sparse and dense edges, none at all, one-row /
    one-column images, edges farther apart than the limit, and several limits."""
    from robustexp.data.corruptions import engine as E

    g = torch.Generator().manual_seed(2)
    for shape in [(2, 37, 29), (3, 1, 40), (2, 45, 1), (1, 90, 64)]:
        for density in (0.0, 0.002, 0.03, 0.5):
            edges = torch.rand(shape, generator=g) < density
            for limit in (1, 5, 20):
                got, want = _ops.truncated_edt(edges, limit), E._truncated_edt(edges, limit)
                assert got.dtype == want.dtype and bits(got) == bits(want), (shape, density, limit)
