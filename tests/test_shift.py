"""Covariate-shift statistics of Schneider et al. 2020: the Gaussian W2 distance against hand
computations, Proposition 1 against a Monte-Carlo simulation, and the shift evaluator on a toy
model and on the embedded default run."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch

from robustexp.adaptation import BatchNormAdaptation
from robustexp.adaptation.shift_measures import (
    best_prior_strength,
    gaussian_w2,
    layer_shift,
    layer_w2,
    mean_shift,
    prop1_bounds,
)
from robustexp.data.corruptions.sources import CorruptionSource
from robustexp.errors import ConfigError
from robustexp.evaluation.base import EvalContext, evaluate_subset
from robustexp.evaluation.covariate_shift import ShiftEvaluator, pearson, spearman
from robustexp.main import run
from robustexp.models.small_cnn import SmallCNN
from tests.conftest import compose_config


# ---------------------------------------------------------------------------- Gaussian W2
def test_w2_of_identical_statistics_is_zero():
    mu, var = np.array([0.5, -1.0, 3.0]), np.array([1.0, 0.25, 4.0])
    assert np.array_equal(gaussian_w2(mu, var, mu, var), np.zeros(3))
    assert np.array_equal(gaussian_w2(mu, var, mu, var, normalized=False), np.zeros(3))
    assert layer_w2(torch.tensor(mu), torch.tensor(var), torch.tensor(mu), torch.tensor(var)) == 0.0


def test_w2_pure_mean_shift_and_pure_scale_change():
    # mean 1 -> 3 with sigma 2: W2 = |3 - 1| = 2; after the source normalization the shift is 2 / 2 = 1
    assert gaussian_w2(1.0, 4.0, 3.0, 4.0, normalized=False) == pytest.approx(2.0)
    assert gaussian_w2(1.0, 4.0, 3.0, 4.0) == pytest.approx(1.0)
    # sigma 2 -> 3 at the same mean: W2 = |3 - 2| = 1; normalized: N(0,1) vs N(0, 9/4), |1.5 - 1| = 0.5
    assert gaussian_w2(5.0, 4.0, 5.0, 9.0, normalized=False) == pytest.approx(1.0)
    assert gaussian_w2(5.0, 4.0, 5.0, 9.0) == pytest.approx(0.5)


def test_w2_normalized_vs_unnormalized_and_layer_reduction():
    # mu 0 -> 6, sigma 2 -> 4: W2^2 = 36 + 4 = 40; normalized: (6/2)^2 + (4/2 - 1)^2 = 10 = 40 / var_s
    mu_s, var_s, mu_t, var_t = torch.tensor([0.0, 1.0]), torch.tensor([4.0, 1.0]), torch.tensor([6.0, 1.0]), \
        torch.tensor([16.0, 4.0])
    assert np.allclose(gaussian_w2(mu_s, var_s, mu_t, var_t, normalized=False), [math.sqrt(40), 1.0])
    assert np.allclose(gaussian_w2(mu_s, var_s, mu_t, var_t), [math.sqrt(10), 1.0])
    # a layer: sqrt of the mean over channels of W2^2
    assert layer_w2(mu_s, var_s, mu_t, var_t) == pytest.approx(math.sqrt((10 + 1) / 2))
    assert layer_w2(mu_s, var_s, mu_t, var_t, normalized=False) == pytest.approx(math.sqrt((40 + 1) / 2))
    # a BN eps enters the source normalization only
    assert gaussian_w2(0.0, 3.0, 2.0, 3.0, eps=1.0) == pytest.approx(2.0 / 2.0)
    shifts = layer_shift({"a": (mu_s, var_s), "b": (mu_s, var_s)}, {"a": (mu_t, var_t), "b": (mu_s, var_s)})
    assert shifts == pytest.approx({"a": math.sqrt(5.5), "b": 0.0})
    assert mean_shift(shifts) == pytest.approx(math.sqrt(5.5) / 2)


# ---------------------------------------------------------------------------- Proposition 1
def _monte_carlo_w2sq(N, n, mu_s, var_s, mu_t, var_t, trials=200_000, seed=0):
    """E[W2^2(mu_bar, sigma_bar, mu_t, sigma_t)] by simulation: n samples of the target, biased
    estimates, combined with the source statistics by eq. 3 (weights N/(N+n), n/(N+n))."""
    rng = np.random.default_rng(seed)
    samples = rng.normal(mu_t, math.sqrt(var_t), size=(trials, n))
    mean_hat, var_hat = samples.mean(1), samples.var(1)  # biased: divided by n
    w = N / (N + n)
    mu_bar, var_bar = w * mu_s + (1 - w) * mean_hat, w * var_s + (1 - w) * var_hat
    w2sq = (mu_bar - mu_t) ** 2 + (np.sqrt(var_bar) - math.sqrt(var_t)) ** 2
    return w2sq.mean(), w2sq.std() / math.sqrt(trials)


@pytest.mark.parametrize("N", [0, 4, 16])
def test_prop1_bounds_contain_the_monte_carlo_expectation(N):
    n, mu_s, var_s, mu_t, var_t = 8, 0.0, 1.0, 1.0, 4.0
    expected, stderr = _monte_carlo_w2sq(N, n, mu_s, var_s, mu_t, var_t)
    L, U = prop1_bounds(N, n, mu_s, var_s, mu_t, var_t)
    # far from the bounds compared to the simulation's standard error
    assert L + 10 * stderr < expected < U - 10 * stderr
    if N == 16:
        assert U < 1.3 * L  # informative: the interval is narrow here
    # vectorized over N gives the same numbers
    Ls, Us = prop1_bounds(np.array([0.0, 4.0, 16.0]), n, mu_s, var_s, mu_t, var_t)
    assert Ls[[0, 4, 16].index(N)] == pytest.approx(L) and Us[[0, 4, 16].index(N)] == pytest.approx(U)


def test_prop1_hand_cases_and_channel_average():
    # n = 1, N = 0: mu_bar = the single sample, sigma_bar = 0, so E[W2^2] = var_t + var_t exactly
    assert prop1_bounds(0, 1, 0.0, 1.0, 0.3, 2.5) == pytest.approx((5.0, 5.0))
    # arrays of channel statistics: the mean over channels of the per-channel bounds
    a, b = prop1_bounds(4, 8, 0.0, 1.0, 1.0, 4.0), prop1_bounds(4, 8, 0.5, 2.0, -1.0, 0.5)
    both = prop1_bounds(4, 8, np.array([0.0, 0.5]), np.array([1.0, 2.0]), np.array([1.0, -1.0]), np.array([4.0, 0.5]))
    assert both == pytest.approx(((a[0] + b[0]) / 2, (a[1] + b[1]) / 2))
    grid = np.array([0.0, 2.0, 8.0])
    L, U = prop1_bounds(grid, 8, np.array([0.0, 0.5]), np.array([1.0, 2.0]), np.array([1.0, -1.0]),
                        np.array([4.0, 0.5]))
    assert L.shape == U.shape == (3,) and np.all(L <= U)
    # a smaller alpha: a smaller chi-square left tail value, a larger upper bound
    assert prop1_bounds(4, 8, 0.0, 1.0, 1.0, 4.0, alpha=0.001)[1] > prop1_bounds(4, 8, 0.0, 1.0, 1.0, 4.0)[1]


def test_prop1_bounds_tend_to_the_source_target_distance_as_N_grows():
    mu_s, var_s, mu_t, var_t, n = 0.5, 1.0, 2.0, 6.25, 16
    distance = (math.sqrt(var_t) - math.sqrt(var_s)) ** 2 + (mu_t - mu_s) ** 2  # 1.5^2 + 1.5^2 = 4.5
    assert prop1_bounds(np.inf, n, mu_s, var_s, mu_t, var_t) == pytest.approx((distance, distance))
    L, U = prop1_bounds(np.array([1e2, 1e4, 1e8]), n, mu_s, var_s, mu_t, var_t)
    assert np.all(np.diff(np.abs(L - distance)) < 0) and np.all(np.diff(np.abs(U - distance)) < 0)
    assert L[-1] == pytest.approx(distance, rel=1e-5) and U[-1] == pytest.approx(distance, rel=1e-5)


def test_best_prior_strength_is_the_minimum_of_the_grid():
    grid = np.array([0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 1024.0])
    args = (8, 0.0, 1.0, 0.5, 1.5)
    N_L, N_U = best_prior_strength(*args, N_grid=grid)
    L, U = prop1_bounds(grid, *args)
    assert N_L in grid and N_U in grid
    assert L[list(grid).index(N_L)] == L.min() and U[list(grid).index(N_U)] == U.min()
    assert 0 < N_L < 1024  # an interior trade-off for a moderate shift
    # no shift: rely on the source as much as possible; a huge shift: on the target batch alone
    assert best_prior_strength(8, 0.0, 1.0, 0.0, 1.0, N_grid=grid) == (1024.0, 1024.0)
    assert best_prior_strength(8, 0.0, 1.0, 50.0, 1.0, N_grid=grid) == (0.0, 0.0)


def test_correlation_helpers():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 1, 2]) == pytest.approx(-0.5)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson([1, 2, 3], [5, 5, 5]) is None and pearson([1], [2]) is None


# ---------------------------------------------------------------------------- the evaluator
class _ToySource(CorruptionSource):
    """In-memory 'corruptions' of fixed images: contrast scales towards gray, noise adds Gaussian noise."""

    description = "toy source"

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(48, 1, 28, 28, generator=generator)
        self.labels = torch.arange(48) % 10
        self.closed = 0

    def _subset(self, name, severity):
        if name == "contrast":
            return 0.5 + (self.images - 0.5) * (1 - 0.18 * severity)
        noise = torch.randn(self.images.shape, generator=torch.Generator().manual_seed(severity))
        return self.images + 0.15 * severity * noise

    def batches(self, data, name, severity, batch_size, ctx, max_images=None):
        images = self._subset(name, severity)
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size], self.labels[i:i + batch_size]

    def size(self, data, name, severity):
        return len(self.images)

    def close(self):
        self.closed += 1


def _trained_like_cnn():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10, in_channels=1, width=8)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.rand(32, 1, 28, 28))
    return model.eval()


def test_evaluator_against_a_hand_computed_first_layer_and_full_adaptation(tmp_path):
    model, source = _trained_like_cnn(), _ToySource()
    before = copy.deepcopy(model.state_dict())
    ctx = EvalContext(run_dir=tmp_path, device=torch.device("cpu"), seed=0, progress=False)
    evaluator = ShiftEvaluator(source, corruptions=["contrast", "gaussian_noise"], severities=[1, 4], batch_size=16,
                               plot=False)
    results = evaluator.evaluate(model, None, ctx)
    assert source.closed == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # source statistics restored
    assert not list(tmp_path.iterdir())  # plot=False writes nothing
    # the first BN layer sees the conv output directly: W2 between its running buffers and the subset's statistics
    bn = model.features[1]
    with torch.no_grad():
        conv = model.features[0](source._subset("contrast", 4)).double()
    mu_t, var_t = conv.mean((0, 2, 3)), conv.var((0, 2, 3), unbiased=False)
    mu_s, var_s = bn.running_mean.double(), bn.running_var.double()
    expected = torch.sqrt((((mu_t - mu_s) ** 2 + (var_t.sqrt() - var_s.sqrt()) ** 2) / (var_s + bn.eps)).mean())
    record = results["grid"]["contrast"]["4"]
    assert record["w2_per_layer"]["features.1"] == pytest.approx(float(expected), rel=1e-4)
    assert record["w2_mean"] == pytest.approx(np.mean(list(record["w2_per_layer"].values())))
    assert set(record["w2_per_layer"]) == set(results["layers"]) == {"features.1", "features.4", "features.8",
                                                                      "features.11"}
    # errors: the unadapted model, and full adaptation as the corruption evaluators compute it
    def make(n):
        return source.batches(None, "contrast", 4, n, ctx)
    assert record["error_unadapted"] == 100.0 - evaluate_subset(model, make, ctx, 16)["top1"]
    full = BatchNormAdaptation(mode="full").attach(model)
    adapted_ctx = EvalContext(run_dir=tmp_path, device=torch.device("cpu"), seed=0, progress=False, adaptation=full)
    assert record["error_adapted"] == 100.0 - evaluate_subset(model, make, adapted_ctx, 16)["top1"]
    # the shift is a property of the model as trained: handed an adapted model, the evaluator refuses
    # (the runner runs it on the unadapted model, see test_runner's per_variant tests)
    with pytest.raises(ConfigError, match="eval shift measures the model as trained"):
        evaluator.evaluate(model, None, adapted_ctx)
    full.detach()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    summary = results["summary"]
    assert set(summary["correlation"]) == {"overall", "noise", "digital"}
    assert summary["correlation"]["overall"]["n"] == 4
    assert set(summary["w2_per_layer_by_severity"]) == {"1", "4"}
    layer = "features.1"
    assert summary["w2_per_layer"][layer] == pytest.approx(
        np.mean([results["grid"][c][s]["w2_per_layer"][layer] for c in results["grid"] for s in ("1", "4")]))


def test_shift_evaluator_in_the_embedded_default_run(tmp_path):
    cfg = compose_config(["eval=shift", "trainer.epochs=1", "eval.evaluators.corruptions.severities=[1,5]"])
    assert cfg.eval.evaluators.shift.severities == [1, 5]  # follows the corruption evaluator's subsets
    metrics = run(cfg, tmp_path)
    shift = metrics["shift"]
    assert {"source", "distance", "layers", "grid", "summary", "files"} <= set(shift)
    assert set(shift["grid"]) == {"gaussian_noise", "contrast"}
    assert set(shift["summary"]) >= {"correlation", "w2_mean", "w2_per_layer", "w2_per_layer_by_severity"}
    assert set(shift["summary"]["correlation"]) == {"overall", "noise", "digital"}
    assert set(shift["summary"]["correlation"]["overall"]["unadapted"]) == {"pearson", "spearman", "slope",
                                                                           "intercept"}
    assert "shift_w2_mean" in metrics["summary"]
    for name in ("shift_vs_error.png", "shift_per_layer.png", "shift.csv"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "shift.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["corruption"] for r in rows} == {"gaussian_noise", "contrast"}
    for corruption, by_severity in shift["grid"].items():
        assert set(by_severity) == {"1", "5"}
        record = by_severity["1"]
        assert set(record) >= {"w2_mean", "w2_per_layer", "error_unadapted", "error_adapted"}
        # a stronger corruption shifts the statistics more
        assert by_severity["5"]["w2_mean"] > by_severity["1"]["w2_mean"] > 0
        for severity, record in by_severity.items():
            # the same subset, the same unadapted model: the corruption evaluator's error
            assert record["error_unadapted"] == 100.0 - metrics["corruptions"]["grid"][corruption][severity]["top1"]
