"""The runner's fast CPU paths (issue 21): channels_last convolutions, BatchNorm folded into the
convolutions for evaluation with frozen statistics, CPU forward passes in chunks. Each must compute
the same function as the plain path (up to float rounding) and must not reach the evaluations whose
result depends on the batch (test-time BN adaptation) or on hooks of the BN layers."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from robustexp.adaptation import BatchNormAdaptation
from robustexp.errors import ConfigError
from robustexp.evaluation import base as evaluation_base
from robustexp.evaluation.base import EvalContext, evaluate_batches, evaluate_subset, forward_in_chunks
from robustexp.evaluation.eps_star import train_adversarial_generator
from robustexp.models.folding import fold_frozen_batchnorm
from robustexp.models.noise_generator import NoiseGenerator
from robustexp.utils import channels_last_for, derive_seed, model_memory_format
from tests.conftest import trained_like_cnn

CPU = torch.device("cpu")


def _batches(x, y, batch_size):
    return lambda size: iter([(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)])


def _conv_layouts(model):
    """Per 4-D weight with more than one input channel (for one, both layouts are the same
    strides): whether it is in the default (NCHW) layout."""
    return [p.is_contiguous() for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1]


def test_channels_last_choice():
    assert channels_last_for("auto", CPU) is True
    assert channels_last_for("auto", torch.device("cuda")) is False  # a device object, no GPU needed
    assert channels_last_for("channels_last", torch.device("cuda")) is True
    assert channels_last_for("contiguous", CPU) is False
    assert channels_last_for(True, torch.device("cuda")) is True and channels_last_for(False, CPU) is False
    with pytest.raises(ConfigError, match=r"runtime.channels_last='nhwc'; expected one of"):
        channels_last_for("nhwc", CPU)


def test_memory_format_context_restores_the_layout_and_keeps_the_function():
    model = trained_like_cnn().eval()
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    with model_memory_format(model, "auto", CPU) as layout:
        assert layout == torch.channels_last
        assert not any(_conv_layouts(model))
        with torch.no_grad():
            assert torch.allclose(model(x), expected, atol=1e-5)
    assert all(_conv_layouts(model))
    with model_memory_format(model, "contiguous", CPU) as layout:
        assert layout == torch.contiguous_format and all(_conv_layouts(model))
    model.to(memory_format=torch.channels_last)  # a model that is channels_last already stays so
    with model_memory_format(model, "auto", CPU):
        pass
    assert not any(_conv_layouts(model))


def test_plain_evaluation_folds_batchnorm_and_equals_the_unfolded_model(monkeypatch):
    model = trained_like_cnn()
    before = copy.deepcopy(model.state_dict())
    x, y = torch.rand(300, 1, 28, 28), torch.randint(0, 10, (300,))
    folded_models = []
    real_fold = evaluation_base.fold_frozen_batchnorm

    def spy(m):
        folded_models.append(real_fold(m))
        return folded_models[-1]

    monkeypatch.setattr(evaluation_base, "fold_frozen_batchnorm", spy)
    ctx = EvalContext(run_dir=Path("."), device=CPU, seed=0, progress=False)
    result = evaluate_subset(model, _batches(x, y, 300), ctx, batch_size=300)
    unfolded = evaluate_batches(model, _batches(x, y, 300)(300), CPU)
    assert len(folded_models) == 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded_models[0].modules())  # folded away
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the model itself is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert result["top1"] == unfolded["top1"] and result["top5"] == unfolded["top5"]
    assert result["loss"] == pytest.approx(unfolded["loss"], rel=1e-5)


def test_forward_in_chunks_is_the_whole_batch_forward():
    model = fold_frozen_batchnorm(trained_like_cnn().eval())
    x = torch.rand(300, 1, 28, 28)
    calls = []
    model.register_forward_pre_hook(lambda m, inputs: calls.append(len(inputs[0])))
    with torch.no_grad():
        expected = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    calls.clear()
    out = forward_in_chunks(model, x)
    assert calls == [128, 128, 44]
    assert torch.allclose(out, expected, atol=1e-5)


def test_batch_statistics_adaptation_sees_the_evaluators_whole_batch():
    """Not folded, not chunked: partial adaptation with N = 0 over a batch of 300 equals train-mode
    BN on those 300 images (chunks of 128 would normalize each chunk by its own statistics)."""
    model = trained_like_cnn()
    x, y = torch.rand(300, 1, 28, 28) + 0.3, torch.randint(0, 10, (300,))
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        logits = reference(x)
    expected_top1 = 100.0 * (logits.argmax(1) == y).float().mean().item()
    adaptation = BatchNormAdaptation(mode="prior", prior_strength=0).attach(model)
    try:
        ctx = EvalContext(run_dir=Path("."), device=CPU, seed=0, progress=False, adaptation=adaptation)
        result = evaluate_subset(model, _batches(x, y, 300), ctx, batch_size=300)
    finally:
        adaptation.detach()
    assert result["top1"] == pytest.approx(expected_top1)
    assert result["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-4)


def test_the_folded_classifier_has_the_input_gradient_of_the_unfolded_one():
    """What the eps* generators are trained with: the gradient of the loss w.r.t. the input. Equal up
    to float rounding, except where rounding moves an activation across a kink of ReLU / max-pooling
    (a few positions here; oneDNN on and off differ there in the same way): in float64 the two are
    identical, in float32 almost every element agrees and the directions agree."""
    model = trained_like_cnn().eval()
    x, y = torch.rand(8, 1, 28, 28, requires_grad=True), torch.randint(0, 10, (8,))
    grads = {}
    for dtype in (torch.float64, torch.float32):
        net, inputs = copy.deepcopy(model).to(dtype), x.detach().to(dtype).requires_grad_(True)
        for name, candidate in (("plain", net), ("folded", fold_frozen_batchnorm(net))):
            (grads[name, dtype],) = torch.autograd.grad(nn.functional.cross_entropy(candidate(inputs), y), inputs)
    plain, folded = grads["plain", torch.float64], grads["folded", torch.float64]
    assert plain.abs().max() > 0 and torch.allclose(plain, folded, rtol=1e-9, atol=1e-12 * plain.abs().max().item())
    plain, folded = grads["plain", torch.float32], grads["folded", torch.float32]
    close = torch.isclose(plain, folded, rtol=1e-3, atol=1e-5 * plain.abs().max().item())
    assert close.float().mean() > 0.95
    assert nn.functional.cosine_similarity(plain.flatten(), folded.flatten(), dim=0) > 0.98


def test_the_eps_star_generator_trains_against_the_folded_classifier_unless_bn_is_adapted(monkeypatch):
    from robustexp.evaluation import eps_star

    model = trained_like_cnn()
    before = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(32, 1, 28, 28, generator=g),
                                          torch.randint(0, 10, (32,), generator=g))
    seen = []

    def spy(m):
        seen.append(m)
        return fold_frozen_batchnorm(m)

    monkeypatch.setattr(eps_star, "fold_frozen_batchnorm", spy)
    trained = train_adversarial_generator(model, data, CPU, 3.0, steps=4, batch_size=16, seed=1, fold_bn=True)
    assert seen == [model]
    start = NoiseGenerator(1, seed=derive_seed(1, "init"))
    assert any(not torch.allclose(a, b) for a, b in zip(trained.parameters(), start.parameters()))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the classifier is left as it was
    train_adversarial_generator(model, data, CPU, 3.0, steps=2, batch_size=16, seed=1, fold_bn=False)
    assert seen == [model]


def test_the_quick_budget_is_the_embedded_defaults_only():
    """The embedded default trains 4 epochs of 32 and its light eps* trains 100-step generators on
    batches of 32; the *_small paper recipes keep the standard trainer (10 epochs of 128) and
    eval=eps_star the full generator budget (500 steps of 128)."""
    from tests.conftest import compose_config

    default = compose_config([], toy=False)
    assert (default.trainer.epochs, default.trainer.batch_size) == (4, 32)
    eps = default.eval.evaluators.eps_star
    assert (eps.adversarial_steps, eps.adversarial_batch_size, eps.adversarial_generators) == (100, 32, 4)
    full = compose_config(["eval=eps_star"], toy=False).eval.evaluators.eps_star
    assert (full.adversarial_steps, full.adversarial_batch_size, full.adversarial_generators) == (500, 128, 4)
    recipes = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*_small.yaml"))
    assert len(recipes) == 12
    for name in recipes:
        trainer = compose_config([f"+experiment={name}"], toy=False).trainer
        if name == "shu_table1_small":  # fine-tunes a given model (trainer=finetune_fast)
            assert trainer.epochs == 4 and trainer.optimizer.lr != default.trainer.optimizer.lr
            continue
        assert (trainer.epochs, trainer.batch_size) == (10, 128), name


def test_bad_generator_batch_size():
    from robustexp.evaluation.eps_star import EpsStarEvaluator

    with pytest.raises(ConfigError, match=r"adversarial_batch_size=0; expected an integer >= 1"):
        EpsStarEvaluator(adversarial_batch_size=0)


def test_full_adaptation_predicts_with_its_subset_statistics_folded(monkeypatch):
    """Full adaptation fixes the statistics of the whole subset before predicting: the predictions
    run on a folded copy and equal train-mode BN's normalization by the subset's statistics."""
    model = trained_like_cnn()
    x, y = torch.rand(96, 1, 28, 28) + 0.3, torch.randint(0, 10, (96,))
    reference = copy.deepcopy(model).train()
    for layer in reference.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.momentum = None  # cumulative average over the one batch = the subset's statistics
            layer.reset_running_stats()
    with torch.no_grad():
        reference(x)  # running statistics = the whole subset's (unbiased variance, as BN stores it)
    folded_models = []
    real_fold = evaluation_base.fold_frozen_batchnorm
    monkeypatch.setattr(evaluation_base, "fold_frozen_batchnorm", lambda m: folded_models.append(real_fold(m))
                        or folded_models[-1])
    adaptation = BatchNormAdaptation(mode="full", test_variance="unbiased").attach(model)
    try:
        ctx = EvalContext(run_dir=Path("."), device=CPU, seed=0, progress=False, adaptation=adaptation)
        result = evaluate_subset(model, _batches(x, y, 32), ctx, batch_size=32)
    finally:
        adaptation.detach()
    with torch.no_grad():
        logits = reference.eval()(x)
    assert len(folded_models) == 1
    assert result["top1"] == pytest.approx(100.0 * (logits.argmax(1) == y).float().mean().item())
    assert result["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-4)
