"""Tent (Wang et al. 2021): entropy minimization over the BN affine parameters, checked against
hand-computed gradients, train-mode BN, batch-statistics BN adaptation and the evaluators."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from robustexp.adaptation import BatchNormAdaptation
from robustexp.adaptation.tent import TentAdaptation
from robustexp.errors import ConfigError
from robustexp.evaluation.base import EvalContext
from robustexp.losses import softmax_entropy
from robustexp.main import run
from tests.conftest import compose_config, subset_b_alone_and_after_a, trained_like_cnn


def _two_bn_model(seed=0):
    """BN2d -> conv -> BN2d -> ReLU -> pool -> linear: the first BN's gradient passes through the
    second BN's batch statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
    with torch.no_grad():
        for bn in (model[0], model[2]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return model.eval()


def _bn_params(model):
    return {k for k, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for k in (f"{k}.weight", f"{k}.bias")}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_only_the_bn_affine_parameters_change():
    model = trained_like_cnn()
    before = _state(model)
    tent = TentAdaptation(optimizer="adam", lr=1e-2).attach(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == _bn_params(model) == set(tent.parameter_names)
    with torch.no_grad():  # Tent enables gradients itself (the mixed evaluator runs under no_grad)
        tent.predict(model, torch.rand(16, 1, 28, 28) + 0.3)
    after = _state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == _bn_params(model)  # every BN weight and bias moved; conv, linear, running buffers did not
    tent.detach()


def test_one_sgd_step_on_one_bn_layer_equals_the_closed_form_gradient():
    # logits z = gamma * xhat + beta (C = 3 classes); dH_i/dz_ic = -p_ic (log p_ic + H_i);
    # L = mean_i H_i, so dL/dgamma_c = mean_i dH_i/dz_ic xhat_ic and dL/dbeta_c = mean_i dH_i/dz_ic
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
        bn.running_mean.fill_(5.0)   # would be used without batch statistics
    model = nn.Sequential(bn).eval()
    x = torch.tensor([[0.1, 2.0, -1.0], [1.5, 0.3, 0.4], [-0.7, 1.1, 2.2], [0.9, -1.4, 0.0],
                      [2.0, 0.5, -0.3], [-1.2, -0.6, 1.3]])
    xhat = (x - x.mean(0)) / (x.var(0, unbiased=False) + bn.eps).sqrt()
    gamma, beta = bn.weight.detach().clone(), bn.bias.detach().clone()
    z = gamma * xhat + beta
    p = z.softmax(1)
    entropy = -(p * p.log()).sum(1, keepdim=True)
    g = -p * (p.log() + entropy) / len(x)
    lr = 0.1
    expected_gamma, expected_beta = gamma - lr * (g * xhat).sum(0), beta - lr * g.sum(0)

    tent = TentAdaptation(optimizer="sgd", lr=lr, momentum=0.0).attach(model)
    logits = tent.predict(model, x)
    assert torch.allclose(logits, z, atol=1e-6)  # the prediction made before the update
    assert torch.allclose(bn.weight.detach(), expected_gamma, atol=1e-6)
    assert torch.allclose(bn.bias.detach(), expected_beta, atol=1e-6)
    assert not torch.allclose(expected_gamma, gamma, atol=1e-3)  # the step is not negligible
    tent.detach()
    assert torch.equal(bn.weight.detach(), gamma) and torch.equal(bn.bias.detach(), beta)


def test_one_sgd_step_equals_autograd_through_train_mode_batchnorm():
    model = _two_bn_model()
    x = torch.randn(8, 2, 5, 5) * 2 + 1
    lr = 0.5
    # reference: train-mode BN (batch statistics, gradient through them, as the official Tent)
    reference = copy.deepcopy(model).train()
    params = [reference[0].weight, reference[0].bias, reference[2].weight, reference[2].bias]
    grads = torch.autograd.grad(softmax_entropy(reference(x)).mean(), params)
    expected = [p.detach() - lr * g for p, g in zip(params, grads)]
    # what it would be with the batch statistics treated as constants (detached): not Tent's gradient
    frozen = copy.deepcopy(model)
    adapt = BatchNormAdaptation(mode="prior", prior_strength=0).attach(frozen)
    frozen_params = [frozen[0].weight, frozen[0].bias, frozen[2].weight, frozen[2].bias]
    frozen_grads = torch.autograd.grad(softmax_entropy(frozen(x)).mean(), frozen_params)
    adapt.detach()
    assert not torch.allclose(frozen_grads[0], grads[0], atol=1e-4)

    tent = TentAdaptation(optimizer="sgd", lr=lr, momentum=0.0).attach(model)
    tent.predict(model, x)
    updated = [model[0].weight, model[0].bias, model[2].weight, model[2].bias]
    for got, want, p in zip(updated, expected, params):
        assert torch.allclose(got.detach(), want, atol=1e-6)
        assert not torch.allclose(want, p.detach(), atol=1e-4)
    tent.detach()


def test_first_adam_step_moves_every_parameter_by_lr_against_its_gradient_sign():
    model = _two_bn_model()
    x = torch.randn(8, 2, 5, 5) * 2 + 1
    reference = copy.deepcopy(model).train()
    grad = torch.autograd.grad(softmax_entropy(reference(x)).mean(), reference[2].weight)[0]
    before = model[2].weight.detach().clone()
    tent = TentAdaptation(optimizer="adam", lr=1e-3).attach(model)
    tent.predict(model, x)
    assert torch.allclose(model[2].weight.detach() - before, -1e-3 * grad.sign(), atol=1e-6)
    tent.detach()


def test_entropy_decreases_on_the_same_batch():
    model = trained_like_cnn()
    x = torch.rand(32, 1, 28, 28) * 0.8 + 0.2
    tent = TentAdaptation(optimizer="adam", lr=1e-2).attach(model)
    entropies = [softmax_entropy(tent.predict(model, x)).mean().item() for _ in range(6)]
    assert entropies[-1] < entropies[0] - 0.02, entropies
    assert all(b < a for a, b in zip(entropies, entropies[1:])), entropies
    tent.detach()


def test_first_batch_predictions_are_those_of_batch_statistics_adaptation():
    model = trained_like_cnn()
    x = torch.rand(16, 1, 28, 28) + 0.3
    norm = BatchNormAdaptation(mode="prior", prior_strength=0).attach(model)
    with torch.no_grad():
        expected = model(x)
    norm.detach()
    with torch.no_grad():
        unadapted = model(x)
    tent = TentAdaptation(optimizer="adam", lr=1e-2).attach(model)
    first = tent.predict(model, x)
    assert torch.allclose(first, expected, atol=1e-5)
    assert not torch.allclose(first, unadapted, atol=1e-3)   # batch statistics matter
    second = tent.predict(model, x)
    assert not torch.allclose(second, expected, atol=1e-4)   # the first call did update the model
    tent.detach()


@pytest.mark.parametrize("episodic", [True, False])
def test_episodic_predictions_do_not_depend_on_earlier_batches_continual_ones_do(episodic):
    model = trained_like_cnn()
    earlier, batch = torch.rand(16, 1, 28, 28) + 0.5, torch.rand(16, 1, 28, 28) * 0.3
    tent = TentAdaptation(optimizer="adam", lr=1e-2, episodic=episodic).attach(model)
    alone = tent.predict(model, batch)
    tent.reset()
    for _ in range(3):
        tent.predict(model, earlier)
    after_earlier = tent.predict(model, batch)
    if episodic:
        assert torch.equal(after_earlier, alone)
    else:
        assert not torch.allclose(after_earlier, alone, atol=1e-4)
    tent.detach()


def test_reset_restores_parameters_and_optimizer_state_so_nothing_leaks_between_subsets():
    model = trained_like_cnn()
    tent = TentAdaptation(optimizer="sgd", lr=0.05, momentum=0.9).attach(model)
    initial_params, initial_opt = _state(model), copy.deepcopy(tent.optimizer.state_dict())
    for _ in range(2):
        tent.predict(model, torch.rand(16, 1, 28, 28) + 0.4)
    assert tent.optimizer.state_dict()["state"]  # momentum buffers exist
    tent.reset()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in initial_params.items())
    assert tent.optimizer.state_dict() == initial_opt
    assert all(p.grad is None for p in model.parameters())

    ctx = EvalContext(run_dir=".", device=torch.device("cpu"), seed=0, progress=False, adaptation=tent)
    b_alone, b_after_a = subset_b_alone_and_after_a(model, ctx, batch_size=8)
    assert b_alone == b_after_a
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in initial_params.items())  # reset after too
    tent.detach()


def test_detach_restores_requires_grad_flags_buffers_grads_and_removes_hooks():
    model = trained_like_cnn()
    model.fc.weight.requires_grad_(False)           # a mixed set of flags to restore
    model.features[1].weight.grad = torch.ones(8)   # a leftover gradient from training
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    before = _state(model)
    x = torch.rand(16, 1, 28, 28) + 0.3
    with torch.no_grad():
        unadapted = model(x)
    tent = TentAdaptation(optimizer="adam", lr=1e-2).attach(model)
    for _ in range(2):
        tent.predict(model, x)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    tent.detach()
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.running_mean is not None for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.equal(model.features[1].weight.grad, torch.ones(8))
    with torch.no_grad():
        assert torch.equal(model(x), unadapted)  # running statistics again, hooks gone
    tent.detach()  # a second detach is harmless


def test_bad_options_and_models():
    for kwargs, message in [({"optimizer": "rmsprop"}, "optimizer='rmsprop'"), ({"lr": 0}, "lr=0"),
                            ({"steps": 0}, "steps=0"), ({"momentum": 1.5}, "momentum=1.5"),
                            ({"weight_decay": -1}, "weight_decay=-1"), ({"episodic": "yes"}, "episodic"),
                            ({"batch_size": 0}, "batch_size=0")]:
        with pytest.raises(ConfigError, match=message):
            TentAdaptation(**kwargs)
    with pytest.raises(ConfigError, match="has none"):
        TentAdaptation().attach(nn.Sequential(nn.Conv2d(1, 1, 1)))
    with pytest.raises(ConfigError, match="affine=True"):
        TentAdaptation().attach(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, affine=False)))
    model = _two_bn_model()
    tent = TentAdaptation().attach(model)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        tent.predict(model, torch.rand(4, 2, 5, 5))
    tent.detach()


def test_runner_evaluates_tent_next_to_the_unadapted_model(tmp_path):
    metrics = run(compose_config(["+adaptation=tent", "adaptation.n=25"]), tmp_path)
    assert {"corruptions", "corruptions@tent", "clean@tent"} <= set(metrics)
    assert metrics["adaptation"]["tent"].startswith("Tent (entropy minimization), Adam lr=0.001")
    assert metrics["corruptions@tent"]["grid"] != metrics["corruptions"]["grid"]
