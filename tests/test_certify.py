"""Randomized smoothing (Cohen et al. 2019): Clopper-Pearson against statsmodels, radii of
classifiers whose smoothed probabilities are known, soundness on a linear classifier, batched
counting, and frozen BN statistics under adaptation (Nandy et al. 2021)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from robustexp.adaptation import BatchNormAdaptation, TentAdaptation
from robustexp.adaptation.freeze import FrozenStatisticsGuard, adapt_and_freeze
from robustexp.data.base import DataSplits
from robustexp.errors import ConfigError
from robustexp.evaluation.base import EvalContext
from robustexp.evaluation.certify import (
    ABSTAIN,
    CertifyEvaluator,
    certified_accuracy,
    certify,
    clopper_pearson_lower,
    envelope_radius,
    fold_frozen_batchnorm,
    predict,
    sample_counts,
)
from robustexp.main import run
from robustexp.models.build import NormalizedClassifier
from tests.conftest import compose_config, trained_like_cnn


class Constant(nn.Module):
    def __init__(self, label: int, num_classes: int = 10):
        super().__init__()
        self.label, self.num_classes = label, num_classes

    def forward(self, x):
        logits = torch.zeros(len(x), self.num_classes)
        logits[:, self.label] = 1.0
        return logits


class CoinFlip(nn.Module):
    """Class 0 if the first pixel moved up, class 1 if down: under noise, each half the time."""

    def __init__(self, centre: float = 0.5):
        super().__init__()
        self.centre = centre

    def forward(self, x):
        up = x.flatten(1)[:, 0] > self.centre
        return torch.stack([up.float(), (~up).float()], 1)


class LinearBinary(nn.Module):
    """Class 1 iff w.x + b > 0: the smoothed classifier has the same decision boundary and its
    exact L2 robust radius at x is |w.x + b| / ||w||_2 (Cohen et al., Sec. 3.1)."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        score = x.flatten(1) @ self.w + self.b
        return torch.stack([-score, score], 1)


@pytest.mark.parametrize("k,n,alpha", [(0, 10, 0.001), (3, 10, 0.05), (990, 1000, 0.001), (1000, 1000, 0.001),
                                       (51234, 100000, 0.001), (100000, 100000, 0.001), (7, 7, 0.2)])
def test_clopper_pearson_matches_statsmodels(k, n, alpha):
    from statsmodels.stats.proportion import proportion_confint

    expected = proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]  # Cohen et al.'s call
    assert float(clopper_pearson_lower(k, n, alpha)) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    many = clopper_pearson_lower(np.array([k, 0]), np.array([n, n]), alpha)
    assert many[0] == pytest.approx(expected, rel=1e-9, abs=1e-12) and many[1] == 0.0


@pytest.mark.parametrize("sigma,n", [(0.25, 100), (0.5, 1000)])
def test_a_constant_classifier_gets_sigma_times_phi_inverse_of_the_n_of_n_bound(sigma, n):
    alpha = 0.001
    out = certify(Constant(3), torch.rand(5, 1, 4, 4), sigma, n0=10, n=n, alpha=alpha, num_classes=10,
                  batch_size=64, generator=torch.Generator().manual_seed(0))
    lower_n_of_n = alpha ** (1.0 / n)  # Clopper-Pearson lower bound for n successes of n
    assert (out["prediction"] == 3).all() and (out["count"] == n).all()
    np.testing.assert_allclose(out["pa_lower"], lower_n_of_n, rtol=1e-10)
    np.testing.assert_allclose(out["radius"], sigma * norm.ppf(lower_n_of_n), rtol=1e-10)


def test_a_classifier_answering_two_classes_half_the_time_abstains():
    images = torch.full((40, 1, 3, 3), 0.5)
    generator = torch.Generator().manual_seed(1)
    out = certify(CoinFlip(), images, 0.3, n0=100, n=1000, alpha=0.001, num_classes=2, batch_size=2000,
                  generator=generator)
    counts = out["count"]
    assert (np.abs(counts - 500) < 100).all()  # the classifier does flip a coin
    assert (out["prediction"] == ABSTAIN).all() and np.isnan(out["radius"]).all()
    assert (out["pa_lower"] < 0.5).all()
    assert (predict(CoinFlip(), images, 0.3, 1000, 0.001, 2, 2000, generator) == ABSTAIN).all()
    # and a classifier that always answers predicts it
    assert (predict(Constant(1, 2), images, 0.3, 100, 0.001, 2, 2000, generator) == 1).all()


def test_certified_radius_of_a_linear_classifier_is_at_most_the_exact_one_with_probability_1_minus_alpha():
    """Each of 600 independent CERTIFY runs (one call, batched over images) may exceed the exact
    radius with probability <= alpha; the bound must also be tight enough to be useful."""
    d, sigma, n, alpha, trials = 16, 0.5, 300, 0.05, 600
    w = torch.randn(d, generator=torch.Generator().manual_seed(2))
    distances = torch.linspace(0.1, 1.2, trials)            # exact radius of each trial's image
    x0 = torch.full((d,), 0.5)
    b = -float(w @ x0)
    images = (x0 + distances[:, None] * w / w.norm()).view(trials, 1, 1, d)
    out = certify(LinearBinary(w, b), images, sigma, n0=50, n=n, alpha=alpha, num_classes=2, batch_size=4000,
                  generator=torch.Generator().manual_seed(3))
    exact = distances.numpy()
    certified = ~np.isnan(out["radius"])
    assert (out["prediction"][certified] == 1).all()
    violations = int(np.sum(certified & (out["radius"] > exact + 1e-9)))
    assert violations <= binom.ppf(0.999, trials, alpha), violations
    # not vacuous: where the true pA is high, the radius is a good part of the exact one
    sure = exact > 0.6
    assert certified[sure].all() and np.mean(out["radius"][sure] / exact[sure]) > 0.5


def test_batched_counts_keep_images_apart_and_count_every_sample():
    class Brightness(nn.Module):
        def forward(self, x):
            return nn.functional.one_hot((x.flatten(1).mean(1) * 9).round().long().clamp(0, 9), 10).float()

    images = torch.stack([torch.full((1, 5, 5), c / 9) for c in (0, 3, 9, 4, 7, 1, 2)])
    counts = sample_counts(Brightness(), images, 23, 1e-4, 10, batch_size=50, generator=torch.Generator())
    assert counts.shape == (7, 10) and (counts.sum(1) == 23).all()
    assert counts.argmax(1).tolist() == [0, 3, 9, 4, 7, 1, 2] and (counts.max(1).values == 23).all()


def test_certified_accuracy_and_per_example_envelope_by_hand():
    radius = np.array([[0.3, np.nan, 0.1, 0.9], [0.5, 0.2, np.nan, 0.1]])
    correct = np.array([[True, False, True, False], [True, True, False, True]])
    env, which = envelope_radius(radius, correct)
    np.testing.assert_allclose(env, [0.5, 0.2, 0.1, 0.1])
    assert which.tolist() == [1, 1, 0, 1]
    assert certified_accuracy(radius[0], correct[0], [0.0, 0.2, 0.35]) == [0.5, 0.25, 0.0]
    assert certified_accuracy(env, ~np.isnan(env), [0.0, 0.15, 0.45]) == [1.0, 0.5, 0.25]


def _digits(n_test=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_test) % 10
    images = (torch.rand(n_test, 1, 28, 28, generator=g) * 0.3 + labels.view(-1, 1, 1, 1) / 15).clamp(0, 1)
    test = torch.utils.data.TensorDataset(images, labels)
    return DataSplits(name="toy", train=test, test=test, num_classes=10, input_shape=(1, 28, 28), mean=(0.5,),
                      std=(0.25,))


def test_certify_evaluator_adapts_on_a_noisy_batch_freezes_and_resets(tmp_path):
    model = trained_like_cnn()
    source = [layer.running_mean.clone() for layer in model.modules() if isinstance(layer, nn.BatchNorm2d)]
    adaptation = BatchNormAdaptation(mode="momentum", momentum=1.0, batch_size=16).attach(model)
    first_bn = next(layer for layer in model.modules() if isinstance(layer, nn.BatchNorm2d))
    seen = []  # (batch size, running mean) at every forward pass of the first BN layer
    first_bn.register_forward_hook(lambda m, i, o: seen.append((len(i[0]), m.running_mean.clone())))
    evaluator = CertifyEvaluator(sigmas=[0.25, 0.5], n0=10, n=40, alpha=0.01, predict_n=20, max_images=6,
                                 batch_size=60, radii=[0.0, 0.1, 0.2], adapt_batch_size=99, seed=0,
                                 memory_format="channels_last", fold_bn=False)  # BN layers stay in the model
    ctx = EvalContext(run_dir=tmp_path, device=torch.device("cpu"), seed=0, progress=False, adaptation=adaptation)
    results = evaluator.evaluate(model, _digits(), ctx)

    adapt_calls = [i for i, (size, _) in enumerate(seen) if size == 16]   # the adaptation's batch size wins
    assert len(adapt_calls) == 2                                           # once per sigma
    for start, end in zip(adapt_calls, adapt_calls[1:] + [len(seen)]):
        adapted = seen[start][1]
        assert not torch.allclose(adapted, source[0], atol=1e-3)
        assert all(torch.equal(mean, adapted) for _, mean in seen[start + 1:end])  # frozen while certifying
    assert torch.equal(first_bn.running_mean, source[0])                   # reset afterwards
    assert all(p.is_contiguous() for p in model.parameters())              # layout put back

    suffix = "@bn-momentum-rho1-n16"  # no runner suffix on this context: one from the adaptation
    with open(tmp_path / f"certify{suffix}.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 and {"index", "label", "prediction", "radius", "correct", "time_s"} <= set(rows[0])
    assert (tmp_path / f"certify{suffix}.png").stat().st_size > 0
    assert (tmp_path / f"certify{suffix}_envelope.csv").is_file()
    env = results["envelope"]["certified_accuracy"]
    for s in results["sigmas"].values():
        assert all(env[r] >= a for r, a in s["certified_accuracy"].items())
    assert results["adapt_batch_size"] == 16 and "momentum rho=1" in results["adaptation"]
    assert "envelope" in evaluator.table(results) and "certified_acc_r0" in evaluator.headline(results)
    adaptation.detach()


@pytest.mark.parametrize("wrapped", [False, True])
def test_folding_the_frozen_bn_layers_keeps_the_adapted_function_and_leaves_the_model_alone(wrapped):
    model = trained_like_cnn()
    if wrapped:
        model = NormalizedClassifier(model, (0.4,), (0.3,)).eval()
    adaptation = BatchNormAdaptation(mode="momentum", momentum=1.0).attach(model)
    x = torch.rand(32, 1, 28, 28) + 0.3
    with torch.no_grad():
        unadapted = model(x)
        adapt_and_freeze(model, adaptation, torch.rand(64, 1, 28, 28) * 0.5 + 0.4)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        modules = dict(model.named_modules())
        frozen = model(x)
        folded = fold_frozen_batchnorm(model)
        out = folded(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())  # every BN follows a conv here
    torch.testing.assert_close(out, frozen, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, unadapted, atol=1e-2)                    # the adapted statistics are baked in
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(dict(model.named_modules())[k] is m for k, m in modules.items())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    adaptation.detach()


def test_noisy_copies_of_one_image_setting_the_statistics_are_caught():
    model = trained_like_cnn()
    adaptation = BatchNormAdaptation(mode="prior", prior_strength=0).attach(model)  # adapting, not frozen
    guard = FrozenStatisticsGuard(model, "test")
    with torch.no_grad():
        model(torch.rand(1, 1, 28, 28).repeat(32, 1, 1, 1) + 0.1 * torch.randn(32, 1, 28, 28))
    with pytest.raises(RuntimeError, match="BN statistics of layer"):
        guard.check()
    adaptation.detach()


def test_bad_options_and_unfreezable_adaptations_are_named(tmp_path):
    with pytest.raises(ConfigError, match="alpha"):
        CertifyEvaluator(alpha=0.0)
    with pytest.raises(ConfigError, match="sigmas"):
        CertifyEvaluator(sigmas=[0.5, -1])
    with pytest.raises(ConfigError, match="memory_format"):
        CertifyEvaluator(memory_format="nhwc")
    model = trained_like_cnn()
    tent = TentAdaptation().attach(model)
    ctx = EvalContext(run_dir=tmp_path, device=torch.device("cpu"), seed=0, progress=False, adaptation=tent)
    with pytest.raises(ConfigError, match="TentAdaptation cannot be adapted on one batch and frozen"):
        CertifyEvaluator(n=10, max_images=2).evaluate(model, _digits(), ctx)
    tent.detach()


def test_runner_certifies_with_and_without_adaptation(tmp_path):
    cfg = compose_config(["eval=certify", "+adaptation=momentum", "adaptation.rho=1", "adaptation.n=32",
                          "logger.mode=disabled", "runtime.progress=false", "dataset.n_train=300", "dataset.n_test=60",
                          "trainer.epochs=1", "trainer.batch_size=50", "eval.evaluators.certify.n=50",
                          "eval.evaluators.certify.predict_n=0", "eval.evaluators.certify.max_images=4",
                          "eval.evaluators.certify.sigmas=[0.25,0.5]"], toy=False)
    metrics = run(cfg, tmp_path)
    assert {"certify", "certify@momentum"} <= set(metrics)
    assert metrics["certify"]["adaptation"] is None and metrics["certify@momentum"]["adapt_batch_size"] == 32
    assert "certified_acc_r0@momentum" in metrics["summary"]
    assert (tmp_path / "certify.csv").is_file() and (tmp_path / "certify@momentum.png").is_file()  # as metrics.json


def test_an_interrupted_certification_resumes_with_the_same_results(tmp_path, monkeypatch):
    import robustexp.evaluation.certify as module

    model, data = trained_like_cnn(), _digits()
    evaluator = CertifyEvaluator(sigmas=[0.5], n0=10, n=30, alpha=0.01, predict_n=0, max_images=8,
                                 images_per_batch=3, batch_size=30, radii=[0.0], plot=False)

    def ctx(path):
        return EvalContext(run_dir=path, device=torch.device("cpu"), seed=0, progress=False)

    uninterrupted = evaluator.evaluate(model, data, ctx(tmp_path / "a"))
    real, calls, killed = module.certify, [], []

    def dies_on_the_second_group(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and not killed:
            killed.append(1)
            raise SystemExit("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "certify", dies_on_the_second_group)
    with pytest.raises(SystemExit, match="killed"):
        evaluator.evaluate(model, data, ctx(tmp_path / "b"))
    assert (tmp_path / "b" / "certify_sigma0.5.partial.jsonl").is_file()
    calls.clear()
    resumed = evaluator.evaluate(model, data, ctx(tmp_path / "b"))
    assert len(calls) == 2                                   # groups 2 and 3 of 3; group 1 was read back

    def rows(path):
        with open(path / "certify.csv") as fh:
            return [{k: v for k, v in r.items() if k != "time_s"} for r in csv.DictReader(fh)]

    assert rows(tmp_path / "b") == rows(tmp_path / "a")
    assert resumed["sigmas"]["0.5"]["certified_accuracy"] == uninterrupted["sigmas"]["0.5"]["certified_accuracy"]
    assert not list((tmp_path / "b").glob("*.partial.jsonl"))


def _counts_randn_mul_add_bincount(model, images, num, sigma, num_classes, batch_size, generator, memory_format):
    """sample_counts as first written: randn, times sigma, plus the image, layout conversion, bincount."""
    k = len(images)
    per_image = max(1, batch_size // k)
    offsets = (torch.arange(k) * num_classes).unsqueeze(1)
    counts = torch.zeros(k * num_classes, dtype=torch.long)
    done = 0
    while done < num:
        b = min(per_image, num - done)
        noisy = torch.randn((k, b, *images.shape[1:]), generator=generator, dtype=images.dtype)
        noisy.mul_(sigma).add_(images.unsqueeze(1))
        batch = noisy.flatten(0, 1).contiguous(memory_format=memory_format)
        predictions = model(batch).argmax(1).view(k, b)
        counts += torch.bincount((predictions + offsets).flatten(), minlength=k * num_classes)
        done += b
    return counts.view(k, num_classes)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_sample_counts_draw_the_same_noise_as_randn_times_sigma_plus_the_image(memory_format):
    """The scaled draw (normal_(0, sigma)), the add into the model's layout and the on-device
    counting give the counts of the plain formulation, sample for sample: a classifier that reads
    the noise (the sign pattern of a random projection of each noisy image) sees the same images."""

    class Hash(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.w = torch.randn(d, 7, generator=torch.Generator().manual_seed(5))

        def forward(self, x):
            return (x.flatten(1) - 0.5) @ self.w      # a class per noisy image, depending on every value

    for shape in [(3, 6, 6), (1, 28, 28)]:
        images = torch.rand(5, *shape, generator=torch.Generator().manual_seed(1))
        model = Hash(images[0].numel())
        for sigma, num, batch, forward_batch in [(0.5, 37, 40, None), (0.12, 100, 1000, None), (1.0, 9, 3, None),
                                                 (0.5, 100, 1000, 7), (0.25, 30, 50, 1)]:
            # forward_batch: the drawn batch classified in forward passes of that many samples
            got = sample_counts(model, images, num, sigma, 7, batch, torch.Generator().manual_seed(2), memory_format,
                                forward_batch_size=forward_batch)
            expected = _counts_randn_mul_add_bincount(model, images, num, sigma, 7, batch,
                                                      torch.Generator().manual_seed(2), memory_format)
            assert torch.equal(got, expected) and (got.sum(1) == num).all()
            assert (got > 0).sum() > 5     # the noise does move the predictions
