"""Fidelity of the batched torch ImageNet-C engine against the reference package.

Three kinds of agreement are tested (numbers: docs/corruption_fidelity.md):

* deterministic corruptions: pixel-wise, PSNR >= 35 dB on the same images;
* random corruptions whose numpy draws can be replayed: the random numbers the reference draws
  (same seeding as ``ReferenceCorruptionEngine``) are fed to the engine's ``apply`` and the
  outputs compared pixel-wise (PSNR >= 35 dB; spatter severities 1-3, whose edge detection is
  approximated, >= 27 dB);
* all random corruptions with the engine's own torch RNG: residual statistics (mean, std,
  mean |r|, fraction of changed values of r = corrupted - clean) within stated tolerances.

Each check is paired with a negative control showing that the tolerance rejects a wrong severity.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from robustexp.data.corruptions import engine as E
from robustexp.data.corruptions._replay import REPLAYABLE, natural_images, numpy_draws
from robustexp.data.corruptions.engine import DETERMINISTIC, TorchCorruptionEngine
from robustexp.data.corruptions.names import ALL_CORRUPTIONS
from robustexp.data.corruptions.reference import ReferenceCorruptionEngine, _reference_functions
from robustexp.errors import ConfigError

SEVERITIES = (1, 2, 3, 4, 5)
RANDOM = tuple(n for n in ALL_CORRUPTIONS if n not in DETERMINISTIC)
PSNR_MIN = 35.0


# ------------------------------------------------------------------ images


_CACHE: dict = {}


def images(kind: str, b: int) -> torch.Tensor:
    key = (kind, b)
    if key not in _CACHE:
        if kind == "mnist28":
            from robustexp.data.embedded import load_mnist5k

            _CACHE[key] = load_mnist5k()[0][:b].float() / 255.0
        else:
            size = int(kind.removeprefix("rgb"))
            _CACHE[key] = natural_images(b, size, size, seed=size)
    return _CACHE[key]


@pytest.fixture(scope="module")
def ref():
    engine = ReferenceCorruptionEngine(workers=1)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def eng():
    return TorchCorruptionEngine()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


# ------------------------------------------------------------------ replaying the reference's numpy draws


# ------------------------------------------------------------------ pixel-wise: deterministic corruptions


def _check_pixelwise(outputs_ref, outputs_eng, minimum):
    """outputs_*[s] for s in 1..5: matched PSNR >= minimum, and the matched severity beats every
    wrong one by 3 dB (the negative control: a wrong severity would fail). Severities whose
    reference outputs coincide (saturate 1 and 2 on gray images) are not told apart."""
    report = {}
    for s in SEVERITIES:
        matched = psnr(outputs_ref[s], outputs_eng[s])
        floor = minimum[s] if isinstance(minimum, dict) else minimum
        others = [t for t in SEVERITIES if t != s and psnr(outputs_ref[s], outputs_ref[t]) < matched - 3.0]
        wrong = max((psnr(outputs_ref[s], outputs_eng[t]) for t in others), default=-math.inf)
        report[s] = (round(matched, 1), round(wrong, 1))
        assert matched >= floor, report
        assert len(others) >= 2 and matched > wrong + 3.0, report
    return report


@pytest.mark.parametrize("kind,batch", [("mnist28", 8), ("rgb32", 8)])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_pixelwise(ref, eng, name, kind, batch):
    x = images(kind, batch)
    outputs_ref = {s: ref(x, name, s, 0) for s in SEVERITIES}
    outputs_eng = {s: eng(x, name, s, 0) for s in SEVERITIES}
    _check_pixelwise(outputs_ref, outputs_eng, PSNR_MIN)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_pixelwise_224_severity3(ref, eng, name):
    x = images("rgb224", 2)
    matched = psnr(ref(x, name, 3, 0), eng(x, name, 3, 0))
    wrong = psnr(ref(x, name, 3, 0), eng(x, name, 5, 0))
    assert matched >= PSNR_MIN and matched > wrong + 3.0, (matched, wrong)


@pytest.mark.slow
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_pixelwise_224(ref, eng, name):
    x = images("rgb224", 4)
    _check_pixelwise({s: ref(x, name, s, 0) for s in SEVERITIES}, {s: eng(x, name, s, 0) for s in SEVERITIES},
                     PSNR_MIN)


# ------------------------------------------------------------------ pixel-wise: replayed random draws


def _replay_minimum(name):
    if name == "spatter":  # Canny + distance transform approximated for severities 1-3
        return {1: 27.0, 2: 27.0, 3: 27.0, 4: PSNR_MIN, 5: PSNR_MIN}
    return PSNR_MIN


def _replay(ref, eng, x, name):
    outputs_ref, outputs_eng = {}, {}
    for s in SEVERITIES:
        outputs_ref[s] = ref(x, name, s, 7)
        draws = numpy_draws(x, name, s, 7)
        outputs_eng[s] = eng.apply(x, name, s, **draws)
    return outputs_ref, outputs_eng


@pytest.mark.parametrize("kind,batch", [("mnist28", 8), ("rgb32", 8)])
@pytest.mark.parametrize("name", REPLAYABLE)
def test_replayed_draws_pixelwise(ref, eng, name, kind, batch):
    x = images(kind, batch)
    outputs_ref, outputs_eng = _replay(ref, eng, x, name)
    # the negative control compares against other severities' outputs computed with their own draws
    _check_pixelwise(outputs_ref, outputs_eng, _replay_minimum(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", REPLAYABLE)
def test_replayed_draws_pixelwise_224(ref, eng, name):
    x = images("rgb224", 3)
    outputs_ref, outputs_eng = _replay(ref, eng, x, name)
    _check_pixelwise(outputs_ref, outputs_eng, _replay_minimum(name))


# ------------------------------------------------------------------ distribution: the engine's own RNG


def residual_stats(clean: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
    """mean, std, mean |r| and fraction of values changed by more than one 8-bit level.

    Images turned all-black are left out: spatter (severity 1-3) blackens an image that gets no
    liquid at all (0/0 -> NaN -> 0 in the reference adapter, reproduced by the engine); with a
    few small images, one such event dominates the statistics of either side."""
    keep = corrupted.flatten(1).amax(1) > 0
    r = (corrupted[keep] - clean[keep]).double()
    return torch.stack([r.mean(), r.std(), r.abs().mean(), (r.abs() > 1.5 / 255).double().mean()])


# (absolute, relative) tolerance on every statistic: |engine - reference| <= abs + rel * |reference|
TOLERANCE = {
    "gaussian_noise": (0.004, 0.05), "shot_noise": (0.004, 0.05), "impulse_noise": (0.004, 0.05),
    "speckle_noise": (0.004, 0.05), "motion_blur": (0.006, 0.06), "elastic_transform": (0.006, 0.06),
    "glass_blur": (0.004, 0.05), "snow": (0.015, 0.12), "frost": (0.015, 0.12), "fog": (0.03, 0.08),
    "spatter": (0.015, 0.25),
}
# severities of these corruptions are not separable from residual statistics of a few images (the
# per-image randomness of the plasma / the liquid layer dominates); their severity dependence is
# checked on the random layer itself (test_plasma_fractal_statistics) or pixel-wise (replay tests)
NO_SEVERITY_CONTROL = ("fog",)


def within(stats_eng, stats_ref, name) -> bool:
    a, r = TOLERANCE[name]
    return bool(((stats_eng - stats_ref).abs() <= a + r * stats_ref.abs()).all())


def _distribution(ref, eng, x, name):
    stats_ref = {s: residual_stats(x, ref(x, name, s, 11)) for s in SEVERITIES}
    stats_eng = {s: residual_stats(x, eng(x, name, s, 11)) for s in SEVERITIES}
    for s in SEVERITIES:
        assert within(stats_eng[s], stats_ref[s], name), (s, stats_eng[s].tolist(), stats_ref[s].tolist())
        # negative control: the tolerance tells this severity from at least one other
        if name not in NO_SEVERITY_CONTROL:
            assert any(not within(stats_eng[s], stats_ref[t], name) for t in SEVERITIES if t != s), s
    return stats_ref, stats_eng


@pytest.mark.parametrize("kind,batch", [("mnist28", 32), ("rgb32", 32)])
@pytest.mark.parametrize("name", RANDOM)
def test_random_distribution(ref, eng, name, kind, batch):
    _distribution(ref, eng, images(kind, batch), name)


@pytest.mark.slow
@pytest.mark.parametrize("name", RANDOM)
def test_random_distribution_224(ref, eng, name):
    # frost (which of 5 frost images) and fog (the plasma's mean) vary a lot from image to image
    _distribution(ref, eng, images("rgb224", 32 if name in ("frost", "fog") else 8), name)


# ------------------------------------------------------------------ seeds, shapes, devices, conventions


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_seed_determinism_and_independence(eng, name):
    x = natural_images(2, 24, 20, seed=3)
    x = torch.cat([x[:1], x[:1], x[1:]])  # two identical images in the batch
    a, b = eng(x, name, 3, 5), eng(x, name, 3, 5)
    assert torch.equal(a, b)
    c = eng(x, name, 3, 6)
    if name in DETERMINISTIC:
        assert torch.equal(a, c)
        assert torch.equal(a[0], a[1])
    else:
        assert not torch.equal(a, c)  # another seed, other noise
        assert not torch.equal(a[0], a[1])  # each image of the batch gets its own draws


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (2, 3, 40, 56), (2, 3, 17, 9)])
def test_shape_range_levels(eng, name, shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(shape, generator=g) * 255).round() / 255
    out = eng(x, name, 5, 0)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    levels = out * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3)


def test_unquantized_output_and_errors(eng):
    x = natural_images(2, 32, 32)
    raw = TorchCorruptionEngine(quantize=False)(x, "gaussian_blur", 2, 0)
    assert not torch.allclose(raw * 255, (raw * 255).round(), atol=1e-3)
    assert torch.equal(torch.floor(raw * 255 + 1e-3) / 255, eng(x, "gaussian_blur", 2, 0))
    with pytest.raises(ConfigError):
        eng(x, "rain", 1, 0)
    with pytest.raises(ConfigError):
        eng(x, "fog", 6, 0)
    with pytest.raises(ValueError):
        eng(x[:, :2], "fog", 1, 0)
    assert eng.name == "torch"
    eng.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_cuda_matches_cpu(eng, name):
    x = natural_images(2, 32, 32)
    out = eng(x.cuda(), name, 3, 0)
    assert out.is_cuda and out.shape == x.shape
    if name == "jpeg_compression":  # CPU runs Pillow's codec; CUDA the torch pipeline, same on both
        assert psnr(out.cpu(), _torch_jpeg(x, 3)) >= 45
    elif name in DETERMINISTIC:
        assert psnr(out.cpu(), eng(x, name, 3, 0)) >= 45


def _torch_jpeg(x: torch.Tensor, severity: int) -> torch.Tensor:
    """The engine's torch JPEG pipeline (used off CPU) on a CPU batch, with the engine's tail."""
    from robustexp.data.corruptions._jpeg import jpeg_roundtrip

    channels = x.shape[1]
    rgb = x.expand(-1, 3, -1, -1)
    out = jpeg_roundtrip(torch.round(rgb * 255), E.JPEG_QUALITY[severity - 1]) / 255.0
    return E.finish(out, channels, True)


@pytest.mark.parametrize("kind,batch", [("mnist28", 8), ("rgb32", 8)])
def test_torch_jpeg_pipeline_matches_reference(ref, kind, batch):
    """The torch JPEG pipeline, which the engine runs on CUDA (on CPU it calls Pillow), against the
    reference's Pillow codec, pixel-wise (float DCT vs libjpeg's integer DCT: >= 35 dB)."""
    x = images(kind, batch)
    _check_pixelwise({s: ref(x, "jpeg_compression", s, 0) for s in SEVERITIES},
                     {s: _torch_jpeg(x, s) for s in SEVERITIES}, PSNR_MIN)


def test_cpu_jpeg_is_pillows_codec(ref, eng):
    """On CPU the engine's jpeg_compression is the reference's codec: identical 8-bit outputs."""
    x = images("rgb32", 8)
    for s in SEVERITIES:
        assert torch.equal(eng(x, "jpeg_compression", s, 0), ref(x, "jpeg_compression", s, 0))


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_one_channel_convention(name):
    """Gray input = replicate to RGB, corrupt, luma (0.299, 0.587, 0.114), round to 8-bit levels."""
    gray = images("mnist28", 4)
    rgb_out = TorchCorruptionEngine(quantize=False)(gray.expand(-1, 3, -1, -1), name, 4, 9)
    luma = (rgb_out * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    expected = torch.round(luma.clamp(0, 1) * 255) / 255
    out = TorchCorruptionEngine()(gray, name, 4, 9)
    assert out.shape == gray.shape
    assert torch.allclose(out, expected, atol=1e-6)
    if name in ("frost", "spatter"):  # coloured corruptions: a plain channel mean would differ
        mean = torch.round(rgb_out.mean(1, keepdim=True).clamp(0, 1) * 255) / 255
        assert not torch.allclose(out, mean, atol=1e-6)


def test_one_channel_matches_reference_adapter(ref, eng):
    """The reference adapter's gray path on a coloured corruption, pixel-wise."""
    gray = images("mnist28", 6)
    draws = numpy_draws(gray, "frost", 3, 7)
    assert psnr(ref(gray, "frost", 3, 7), eng.apply(gray, "frost", 3, **draws)) >= 45


def test_frost_assets():
    sources = E._frost_sources()
    assert len(sources) == 5 and all(s.shape[0] == 3 and s.shape[1] >= 300 for s in sources)
    bank, sizes = E._frost_bank(32, 32, "cpu")
    # the reference's new_shape for a small image: ceil(size * 1.1)
    assert [tuple(map(int, s)) for s in sizes] == [(math.ceil(s.shape[1] * 1.1), math.ceil(s.shape[2] * 1.1))
                                                   for s in sources]


@pytest.mark.parametrize("delta,iterations", [(1, 2), (2, 3), (4, 2)])
def test_glass_shuffle_equals_sequential_loop(delta, iterations):
    """The pointer-jumping shuffle equals the reference's sequential loop, whose tuple "swap"
    on numpy views is a copy, for the same offsets (negative control: a true swap differs)."""
    h, w = 23, 19
    rng = np.random.default_rng(delta)
    image = rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)
    offsets = rng.integers(-delta, delta, size=(iterations, 2, h, w))

    def loop(x, true_swap):
        x = x.copy()
        for it in range(iterations):
            for hh in range(h - delta, delta, -1):
                for ww in range(w - delta, delta, -1):
                    hp, wp = hh + offsets[it, 0, hh, ww], ww + offsets[it, 1, hh, ww]
                    if true_swap:
                        x[hh, ww], x[hp, wp] = x[hp, wp].copy(), x[hh, ww].copy()
                    else:
                        x[hh, ww], x[hp, wp] = x[hp, wp], x[hh, ww]  # the reference statement
        return x

    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    out = E.glass_shuffle(tensor, delta, torch.from_numpy(offsets)[:, :, None])[0].permute(1, 2, 0).numpy()
    assert np.array_equal(out, loop(image, False))
    assert not np.array_equal(out, loop(image, True))


@pytest.mark.parametrize("severity", SEVERITIES)
def test_plasma_fractal_statistics(severity):
    """The batched diamond-square against the reference's plasma_fractal: mean, std and
    roughness (mean |difference| of horizontal neighbours) over 48 maps of 32 x 32. The roughness
    depends on the wibble decay, i.e. on the fog severity (negative control)."""
    _reference_functions()
    import imagecorruptions.corruptions as module

    def stats(maps):
        maps = torch.as_tensor(maps, dtype=torch.float64)
        rough = (maps[:, :, 1:] - maps[:, :, :-1]).abs().mean()
        return torch.stack([maps.mean(), maps.std(), rough])

    decay = E.FOG[severity - 1][1]
    np.random.seed(severity)
    ref_stats = stats(np.stack([module.plasma_fractal(32, decay) for _ in range(48)]))
    g = torch.Generator().manual_seed(severity)
    eng_stats = stats(E.plasma_fractal(48, 32, decay, g, "cpu"))
    assert ((eng_stats - ref_stats).abs() <= 0.1 * ref_stats).all(), (eng_stats, ref_stats)
    other = 2.0 if decay != 2.0 else 1.4  # another severity's decay
    wrong = stats(E.plasma_fractal(48, 32, other, g, "cpu"))
    assert not ((wrong - ref_stats).abs() <= 0.1 * ref_stats).all()


# ------------------------------------------------------------------ the table-driven Poisson sampler (shot noise)


@pytest.mark.parametrize("scale", [E.SHOT_NOISE[0], E.SHOT_NOISE[4]])
def test_poisson_alias_tables_encode_the_poisson_pmf(scale):
    """The alias tables give back, for every 8-bit level, scipy's Poisson pmf of the reference's
    rate l / 255. * c (the truncated tail lies below float64 resolution)."""
    from scipy.stats import poisson

    from robustexp.data.corruptions import _ops

    pmf = _ops.poisson_pmf_levels(scale)
    prob, alias = _ops.alias_tables(pmf)
    rows, k = prob.shape
    implied = prob.clone()
    implied.scatter_add_(1, alias, 1.0 - prob)  # column j receives (1 - prob[i]) for every alias[i] = j
    implied /= k
    rates = np.arange(256) / 255. * scale
    expected = poisson.pmf(np.arange(k)[None, :], rates[:, None])
    assert np.abs(implied.numpy() - expected).max() < 1e-13
    assert float(poisson.sf(k - 1, rates.max())) < 1e-15  # nothing left out beyond the table


def _chi_square_pvalue(counts: np.ndarray, rate: float) -> float:
    """Pearson chi-square of integer samples against Poisson(rate), bins pooled to >= 20 expected."""
    from scipy.stats import chi2, poisson

    n = counts.size
    edges, lo = [], 0
    while poisson.sf(lo - 1, rate) * n >= 40:  # pool the upper tail into the last bin
        hi = lo
        while poisson.cdf(hi, rate) - poisson.cdf(lo - 1, rate) < 20 / n:
            hi += 1
        edges.append((lo, hi))
        lo = hi + 1
    observed = [((counts >= a) & (counts <= b)).sum() for a, b in edges] + [(counts >= lo).sum()]
    expected = [n * (poisson.cdf(b, rate) - poisson.cdf(a - 1, rate)) for a, b in edges]
    expected.append(n * poisson.sf(lo - 1, rate))
    observed, expected = np.array(observed, float), np.array(expected)
    stat = float(((observed - expected) ** 2 / expected).sum())
    return float(chi2.sf(stat, len(observed) - 1))


@pytest.mark.parametrize("scale,level", [(60, 255), (60, 37), (25, 128), (3, 200), (3, 20)])
def test_poisson_levels_sampler_chi_square(scale, level):
    """200,000 draws at one level against scipy's Poisson (chi-square, p > 1e-4 with a fixed seed),
    mean and variance within 4 standard errors; negative control: a rate 5% off is rejected."""
    from robustexp.data.corruptions import _ops

    g = torch.Generator().manual_seed(level)
    levels = torch.full((200_000,), float(level))
    counts = _ops.poisson_levels(levels, scale, g).numpy()
    assert np.array_equal(counts, np.round(counts))
    rate = level / 255. * scale
    n = counts.size
    assert abs(counts.mean() - rate) < 4 * math.sqrt(rate / n)
    assert abs(counts.var() - rate) < 4 * rate * math.sqrt(2 / n + 1 / (rate * n))
    assert _chi_square_pvalue(counts, rate) > 1e-4
    assert _chi_square_pvalue(counts, rate * 1.05) < 1e-4


def test_shot_noise_sampler_choice():
    """8-bit images take the table sampler, others torch.poisson; both give Poisson(x c) counts:
    mean and variance of the counts per level group match the rate."""
    g = torch.Generator().manual_seed(0)
    on_levels = torch.randint(0, 256, (4, 3, 64, 64), generator=g).float() / 255
    off_levels = on_levels + 0.3 / 255
    for x in (on_levels, off_levels):
        counts = E._draw_shot_noise(x, 2, torch.Generator().manual_seed(1))["counts"].double()
        rate = (x * E.SHOT_NOISE[1]).double()
        assert abs(float((counts - rate).mean())) < 4 * math.sqrt(float(rate.mean()) / rate.numel())
        assert abs(float((counts - rate).var()) / float(rate.mean()) - 1) < 0.02
    # the table path is seeded and differs from torch.poisson's stream
    a = E._draw_shot_noise(on_levels, 2, torch.Generator().manual_seed(1))["counts"]
    b = E._draw_shot_noise(on_levels, 2, torch.Generator().manual_seed(1))["counts"]
    c = torch.poisson(on_levels * E.SHOT_NOISE[1], generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------ device paths, forced on CPU (issue 21)
# The engine picks other algorithms off CPU: the whole batch in one piece (CPU: sub-batches of
# cpu_chunk_values), the float-DCT JPEG pipeline (CPU: Pillow's codec), dense filter / resampling
# matrix products (CPU: block-sparse), the Poisson table sampler unchunked. device_paths="cuda" runs
# those algorithms on CPU tensors, so that what a GPU runs is tested on every machine.

DEVICE_PATHS = "cuda"
# Random corruptions whose draws are a single tensor laid out image by image, so that the draws of
# consecutive sub-batches are the slices of the whole batch's draws (torch's CPU samplers fill
# values in order; the normal sampler in blocks of 16, and every image below has a multiple of 16
# values). The others (glass_blur, snow, frost, fog, elastic_transform) draw several tensors per
# sub-batch: their random streams depend on cpu_chunk_values (their distribution does not).
SPLIT_STREAMS = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "motion_blur", "spatter")


def _draws_for(x, name, severity, seed):
    corruption = E.CORRUPTIONS[name]
    if corruption.draw is None:
        return {}
    rgb = x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x
    return corruption.draw(rgb, severity, torch.Generator().manual_seed(seed))


def _slice_draws(draws, lo, hi, batch):
    """The draws of images lo..hi-1: each tensor cut along its (unique) axis of length ``batch``."""
    out = {}
    for key, value in draws.items():
        axes = [i for i, n in enumerate(value.shape) if n == batch]
        assert len(axes) == 1, (key, value.shape)
        out[key] = value.narrow(axes[0], lo, hi - lo)
    return out


def test_device_paths_option():
    assert TorchCorruptionEngine(device_paths="cuda:1").device_paths == "cuda"
    assert TorchCorruptionEngine().device_paths is None
    with pytest.raises(ValueError, match="device_paths"):
        TorchCorruptionEngine(device_paths="gpu-please")
    from robustexp.data.corruptions import _ops

    with _ops.forced_device_paths("cuda"):
        assert not _ops.cpu_paths(torch.device("cpu")) and _ops.device_type("cpu") == "cuda"
    assert _ops.cpu_paths(torch.device("cpu"))  # restored on exit


@pytest.mark.parametrize("paths", ["cpu", DEVICE_PATHS])
@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_whole_batch_equals_sub_batches_given_the_draws(name, paths):
    """Every corruption treats each image on its own: the whole batch (how a GPU runs it) and
    sub-batches (how the CPU runs it) give identical outputs for the same draws, on both paths."""
    b = 5
    x = natural_images(b, 96, 128, seed=4)
    engine = TorchCorruptionEngine(device_paths=paths)
    for s in (2, 5):
        draws = _draws_for(x, name, s, seed=s)
        whole = engine.apply(x, name, s, **draws)
        parts = torch.cat([engine.apply(x[lo:hi], name, s, **_slice_draws(draws, lo, hi, b))
                           for lo, hi in ((0, 2), (2, 3), (3, 5))])
        assert torch.equal(whole, parts), (s, float((whole - parts).abs().max()))


@pytest.mark.parametrize("name", [n for n in ALL_CORRUPTIONS if n != "jpeg_compression"])
def test_device_algorithms_equal_cpu_algorithms_given_the_draws(name):
    """The non-CPU algorithms give the CPU's 8-bit outputs for the same draws. The dense and the
    block-sparse matrix products add the same non-zero terms in another grouping (float32 rounding,
    ~1e-7), which can move a value across an 8-bit truncation threshold: at most one level, on at
    most 0.1 % of the values (0 measured on these images)."""
    x = natural_images(3, 96, 128, seed=5)
    cpu, device = TorchCorruptionEngine(device_paths="cpu"), TorchCorruptionEngine(device_paths=DEVICE_PATHS)
    for s in SEVERITIES:
        draws = _draws_for(x, name, s, seed=s)
        diff = (cpu.apply(x, name, s, **draws) - device.apply(x, name, s, **draws)).abs() * 255
        assert float(diff.max()) <= 1.0 + 1e-3 and float((diff > 0.5).float().mean()) <= 1e-3, s


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_engine_sub_batches_and_device_paths(name):
    """engine(...) end to end: CPU sub-batches (2 images each) against the whole batch on the CPU
    algorithms and on the device ones. Identical where the draws split by image (deterministic
    corruptions, SPLIT_STREAMS); the other random corruptions draw per sub-batch (another stream,
    same distribution, tested above with shared draws). JPEG: the device path is the float-DCT
    pipeline (next test)."""
    b, h, w = 5, 40, 56
    x = natural_images(b, h, w, seed=6)
    split = TorchCorruptionEngine(cpu_chunk_values=2 * 3 * h * w)(x, name, 3, 7)
    whole = TorchCorruptionEngine(cpu_chunk_values=0)(x, name, 3, 7)
    device = TorchCorruptionEngine(device_paths=DEVICE_PATHS)(x, name, 3, 7)
    if name in DETERMINISTIC or name in SPLIT_STREAMS:
        assert torch.equal(split, whole)
        if name != "jpeg_compression":
            assert float((device - whole).abs().max()) <= 1 / 255 + 1e-6
    else:
        assert not torch.equal(split, whole)  # the documented exception (see SPLIT_STREAMS)


# PSNR (dB) of the float-DCT pipeline against Pillow's codec at 224 px, per JPEG quality. Measured
# (4 images): 52.1, 51.0, 50.9, 50.6, 50.5 dB; the differences are whole-coefficient bin flips of
# coefficients that lie within the integer DCT's error of a quantisation boundary (4.2 % to 0.8 %
# of the values differ at all, fewer at lower quality). The bounds leave ~4 dB of margin and lie
# 15-20 dB above the PSNR between Pillow's outputs at neighbouring qualities (25-30 dB), so a
# wrong table, subsampling or rounding rule fails them (negative control in the test).
FLOAT_DCT_JPEG_PSNR_MIN = {25: 48.0, 18: 47.0, 15: 47.0, 10: 46.5, 7: 46.5}


def test_float_dct_jpeg_agrees_with_pillow_per_quality():
    """(issue 21) The JPEG a GPU runs (device_paths='cuda': libjpeg's colour conversion, subsampling
    and upsampling in exact integer arithmetic, float DCTs) against Pillow's codec on CPU, which is
    bit-identical to the reference (test_cpu_jpeg_is_pillows_codec), at 224 px for every quality."""
    x = images("rgb224", 4)
    pillow, device = TorchCorruptionEngine(), TorchCorruptionEngine(device_paths=DEVICE_PATHS)
    outputs = {s: pillow(x, "jpeg_compression", s, 0) for s in SEVERITIES}
    for s in SEVERITIES:
        quality = E.JPEG_QUALITY[s - 1]
        out = device(x, "jpeg_compression", s, 0)
        matched = psnr(outputs[s], out)
        assert matched >= FLOAT_DCT_JPEG_PSNR_MIN[quality], (quality, matched)
        diff = (outputs[s] - out).abs() * 255
        assert float((diff > 0.5).float().mean()) < 0.06, quality  # bin flips only: most values equal
        wrong = max(psnr(outputs[t], out) for t in SEVERITIES if t != s)
        assert wrong < matched - 15, (quality, matched, wrong)


# ------------------------------------------------------------------ CPU worker threads (issue 21, item 4)


class _Corrupt(torch.utils.data.Dataset):
    """A dataset whose items are corrupted in ``__getitem__``: the engine in DataLoader workers."""

    def __init__(self, x, name, cpu_workers):
        self.x, self.name, self.cpu_workers = x, name, cpu_workers

    def __len__(self):
        return 1

    def __getitem__(self, i):
        engine = TorchCorruptionEngine(cpu_chunk_values=3 * 40 * 56, cpu_workers=self.cpu_workers)
        return engine(self.x, self.name, 3, 7), torch.get_num_threads()


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_cpu_workers_give_the_sequential_output(name):
    """The CPU sub-batches on worker threads (random draws made in order by one thread) give the
    sequential loop's output bit for bit, for any number of workers and sub-batch size, RGB and
    1-channel, 8-bit and float outputs; the sequential loop runs on this thread's intra-op threads,
    the workers on one each, so this also checks that no result depends on the thread count."""
    rgb = natural_images(7, 40, 56, seed=6)
    gray = images("mnist28", 9)
    for x, chunk in ((rgb, 3 * 40 * 56), (rgb, 2 * 3 * 40 * 56), (gray, 2 * 3 * 28 * 28)):
        for quantize in (True, False):
            sequential = TorchCorruptionEngine(quantize=quantize, cpu_chunk_values=chunk, cpu_workers=1)(x, name, 3, 7)
            for workers in (2, 3):
                threaded = TorchCorruptionEngine(quantize=quantize, cpu_chunk_values=chunk,
                                                 cpu_workers=workers)(x, name, 3, 7)
                assert torch.equal(sequential.nan_to_num(-1), threaded.nan_to_num(-1)), (x.shape, chunk, quantize,
                                                                                        workers)


def test_cpu_workers_threads_and_settings(monkeypatch):
    """The sub-batches run on the shared worker threads, each with one intra-op thread; the calling
    thread's and the process-wide intra-op thread counts are unchanged (a thread started afterwards
    gets the usual count); repeated calls and new engines add no threads; other devices' paths
    and ``cpu_workers=1`` run on the calling thread; invalid ``cpu_workers`` is refused."""
    import threading

    seen = []
    apply = E.CORRUPTIONS["contrast"].apply

    def spy(x, severity, **draws):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return apply(x, severity, **draws)

    monkeypatch.setitem(E.CORRUPTIONS, "contrast", E.Corruption(spy))
    x = natural_images(6, 32, 32, seed=3)
    before = torch.get_num_threads()
    TorchCorruptionEngine(cpu_chunk_values=3 * 32 * 32, cpu_workers=2)(x, "contrast", 2, 0)
    assert len(seen) == 6 and all(n.startswith("corruption-apply") and t == 1 for n, t in seen), seen
    assert torch.get_num_threads() == before
    fresh = []
    t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert fresh == [before]
    threads = threading.active_count()
    for _ in range(3):
        TorchCorruptionEngine(cpu_chunk_values=3 * 32 * 32, cpu_workers=2)(x, "gaussian_noise", 2, 0)
    assert threading.active_count() == threads
    seen.clear()
    TorchCorruptionEngine(cpu_chunk_values=3 * 32 * 32, cpu_workers=1)(x, "contrast", 2, 0)
    TorchCorruptionEngine(cpu_workers=2, device_paths=DEVICE_PATHS)(x, "contrast", 2, 0)
    assert len(seen) == 7 and {n for n, _ in seen} == {threading.current_thread().name}
    with pytest.raises(ConfigError, match=r"corruptions.engine.cpu_workers=0; expected null"):
        TorchCorruptionEngine(cpu_workers=0)


def test_engine_in_dataloader_workers():
    """In a DataLoader worker process (forked after this process's worker pool exists; torch runs
    one intra-op thread there) the engine gives the same output, by default on the calling thread
    and with ``cpu_workers=2`` on a pool of its own, and does not hang."""
    x = natural_images(5, 40, 56, seed=6)
    name = "glass_blur"
    expected = TorchCorruptionEngine(cpu_chunk_values=3 * 40 * 56, cpu_workers=2)(x, name, 3, 7)  # pool exists
    for workers in (None, 2):
        loader = torch.utils.data.DataLoader(_Corrupt(x, name, workers), batch_size=None, num_workers=1, timeout=60)
        out, threads = next(iter(loader))
        assert threads == 1 and torch.equal(out, expected), workers
