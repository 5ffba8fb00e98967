"""PGD / EoT-PGD evaluation (Nandy et al. 2021, appendix E): iterates stay in the threat model and
the image box, the EoT gradient averages over the m BN-adapted copies, robust accuracy of a linear
classifier is its exact value, and the model is left as it was."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustexp.adaptation import BatchNormAdaptation
from robustexp.adaptation.freeze import adapt_and_freeze
from robustexp.attacks import random_start
from robustexp.data.base import DataSplits
from robustexp.errors import ConfigError
from robustexp.evaluation.adversarial import AdversarialEvaluator, attack_batch, build_eot_copies, eot_loss
from robustexp.evaluation.base import EvalContext
from tests.conftest import trained_like_cnn


class Recorder(nn.Module):
    """The model, remembering every input it sees."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.model(x)


def _batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    x[:, :, :4] = 0.0   # saturated pixels: the box binds
    x[:, :, -4:] = 1.0
    return x, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5)])
@pytest.mark.parametrize("adapted", [False, True])
def test_every_iterate_stays_in_the_ball_and_the_box(norm, eps, adapted):
    model = Recorder(trained_like_cnn())
    adaptation = BatchNormAdaptation(mode="momentum", momentum=1.0).attach(model) if adapted else None
    x, y = _batch()
    adversarial, _ = attack_batch(model, adaptation, x, y, norm=norm, eps=eps, step_size=eps / 3, steps=5,
                                  restarts=2, eot_samples=3, generator=torch.Generator().manual_seed(0))
    assert len(adversarial) == 2 and len(model.inputs) >= 2 * 5 * (3 if adapted else 1)
    for seen in model.inputs + adversarial:
        delta = seen - x
        assert seen.min() >= 0 and seen.max() <= 1
        size = delta.abs().flatten(1).amax(1) if norm == "linf" else delta.flatten(1).norm(dim=1)
        assert (size <= eps * (1 + 1e-5)).all()
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    if adapted:
        adaptation.detach()


def _adapted_model():
    model = trained_like_cnn()
    adaptation = BatchNormAdaptation(mode="momentum", momentum=1.0).attach(model)
    return model, adaptation


def test_eot_copies_are_the_statistics_of_the_batch_plus_a_random_delta():
    model, adaptation = _adapted_model()
    x, _ = _batch()
    bank = build_eot_copies(model, adaptation, x, 3, "linf", 0.2, torch.Generator().manual_seed(5))
    bank.restore()
    replay = torch.Generator().manual_seed(5)
    for i in range(3):
        adapt_and_freeze(model, adaptation, x + random_start(x, "linf", 0.2, replay))
        for layer, (mean, var) in zip(bank.layers, bank.sets[i]):
            assert torch.equal(layer.running_mean, mean) and torch.equal(layer.running_var, var)
    assert not torch.allclose(bank.sets[0][0][0], bank.sets[1][0][0])  # different deltas, different copies
    adaptation.detach()


@pytest.mark.parametrize("kind", ["mean_ce", "log_mean_prob"])
def test_the_eot_gradient_averages_over_the_m_copies(kind):
    model, adaptation = _adapted_model()
    x, y = _batch(6)
    bank = build_eot_copies(model, adaptation, x, 4, "l2", 3.0, torch.Generator().manual_seed(1))
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(eot_loss(model, bank, xr, y, kind).sum(), xr)
    per_copy_grads, per_copy_p = [], []
    for i in range(4):  # each copy on its own
        bank.load(i)
        xi = x.clone().requires_grad_(True)
        ce = F.cross_entropy(model(xi), y, reduction="none")
        per_copy_grads.append(torch.autograd.grad(ce.sum(), xi)[0])
        per_copy_p.append(torch.exp(-ce.detach()))
    bank.restore()
    g, p = torch.stack(per_copy_grads), torch.stack(per_copy_p).view(4, -1, 1, 1, 1)
    if kind == "mean_ce":
        expected = g.mean(0)
    else:  # grad -log(mean_i p_i) = sum_i (p_i / sum_j p_j) grad(-log p_i)
        expected = (p / p.sum(0, keepdim=True) * g).sum(0)
    assert not torch.allclose(g[0], g[1], atol=1e-6)   # the copies do differ
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7)
    adaptation.detach()


class LinearTen(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, x):
        return x.flatten(1) @ self.w + self.b


@pytest.mark.parametrize("norm,eps", [("linf", 0.008), ("l2", 0.05)])
def test_robust_accuracy_of_a_binary_linear_classifier_is_exact(norm, eps, tmp_path):
    """Class 1 iff w.x > 0: the worst perturbation of size eps lowers the margin by exactly
    eps ||w||_1 (L-inf) or eps ||w||_2 (L2), with pixels far from the box edges."""
    d, n = 64, 80
    w = torch.randn(d, generator=torch.Generator().manual_seed(4))
    x = 0.5 + 0.1 * torch.randn(n, d, generator=torch.Generator().manual_seed(5)).clamp(-2, 2)
    score = (x - 0.5) @ w
    labels = (score > 0).long()
    labels[:8] = 1 - labels[:8]  # some wrong already
    model = LinearTen(torch.stack([torch.zeros(d), w], 1), torch.tensor([0.0, -float(0.5 * w.sum())]))
    data = DataSplits(name="lin", train=None, test=torch.utils.data.TensorDataset(x.view(n, 1, 1, d), labels),
                      num_classes=2, input_shape=(1, 1, d), mean=(0.0,), std=(1.0,))
    dual = w.abs().sum() if norm == "linf" else w.norm()
    margin = torch.where(labels == 1, score, -score)
    exact = 100.0 * float((margin > eps * dual).float().mean())
    evaluator = AdversarialEvaluator({"a": {"norm": norm, "eps": eps, "steps": 30, "step_size": eps / 4,
                                            "restarts": 2}}, max_images=None, batch_size=32)
    result = evaluator.evaluate(model, data, EvalContext(run_dir=tmp_path, device=torch.device("cpu"), seed=0,
                                                         progress=False))["attacks"]["a"]
    assert result["clean_top1"] == pytest.approx(100.0 * float((margin > 0).float().mean()))
    assert 20 < exact < 80 and result["robust_top1"] == pytest.approx(exact)
    assert result["robust_top1"] <= min(result["robust_top1_per_restart"])
    assert math.isclose(result["step_size"], eps / 4)


def test_evaluator_with_adaptation_reports_eot_and_restores_the_model(tmp_path):
    model, adaptation = _adapted_model()
    source = [b.clone() for b in model.buffers()]
    x, y = _batch(20)
    data = DataSplits(name="toy", train=None, test=torch.utils.data.TensorDataset(x, y), num_classes=10,
                      input_shape=(1, 28, 28), mean=(0.5,), std=(0.25,))
    evaluator = AdversarialEvaluator({"linf": {"norm": "linf", "eps": 0.05, "steps": 3},
                                      "l2": {"norm": "l2", "eps": 0.5, "steps": 3}}, max_images=None, eot_samples=2)
    results = evaluator.evaluate(model, data, EvalContext(run_dir=tmp_path, device=torch.device("cpu"), seed=0,
                                                          progress=False, adaptation=adaptation))
    assert set(results["attacks"]) == {"linf", "l2"} and results["attacks"]["linf"]["eot_samples"] == 2
    assert results["attacks"]["l2"]["step_size"] == pytest.approx(2.5 * 0.5 / 3)   # Madry et al.'s default
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), source))
    assert "EoT-PGD over 2 BN-adapted copies" in evaluator.table(results)
    assert set(evaluator.headline(results)) == {"robust_top1_linf", "robust_top1_l2"}
    adaptation.detach()


def test_bad_attack_options_are_named():
    with pytest.raises(ConfigError, match="attacks.x: unknown option"):
        AdversarialEvaluator({"x": {"norm": "linf", "eps": 0.1, "stepsize": 0.01}})
    with pytest.raises(ConfigError, match="attack norm='l1'"):
        AdversarialEvaluator({"x": {"norm": "l1", "eps": 0.1}})
    with pytest.raises(ConfigError, match="eot_loss"):
        AdversarialEvaluator({"x": {"norm": "l2", "eps": 0.1}}, eot_loss="max")
