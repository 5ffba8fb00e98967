"""Test-time BN adaptation: the mathematics of Schneider et al. eq. 3 and Nandy et al.'s
momentum, against train-mode BN, the unadapted model and hand computations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from robustexp.adaptation import BatchNormAdaptation
from robustexp.errors import ConfigError
from robustexp.evaluation.base import EvalContext
from robustexp.main import run
from tests.conftest import compose_config, subset_b_alone_and_after_a, trained_like_cnn


def _adapted_output(model, x, **kwargs):
    adaptation = BatchNormAdaptation(**kwargs).attach(model)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        adaptation.detach()


def test_N0_equals_train_mode_batchnorm_on_that_batch():
    model = trained_like_cnn()
    x = torch.rand(16, 1, 28, 28) + 0.3  # shifted inputs
    adapted = _adapted_output(model, x, mode="prior", prior_strength=0, batch_size=16)
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        expected = reference(x)
    assert torch.allclose(adapted, expected, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(model(x), expected, atol=1e-3)  # the shift matters


def test_huge_N_equals_the_unadapted_model_and_source_stats_are_restored():
    model = trained_like_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(8, 1, 28, 28) + 0.3
    with torch.no_grad():
        unadapted = model(x)
    assert torch.allclose(_adapted_output(model, x, mode="prior", prior_strength=1e12), unadapted, atol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # detach restores the source statistics


def test_prior_mixing_on_one_layer_equals_a_hand_computation():
    bn = nn.BatchNorm2d(2, eps=0.0)
    bn.running_mean.copy_(torch.tensor([1.0, -2.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25]))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.5, 0.0]))
    model = nn.Sequential(bn).eval()
    # n = 2 images, 1 pixel each: channel 0 values {3, 5} -> mean 4, biased var 1; channel 1 {0, 0} -> 0, 0
    x = torch.tensor([[[[3.0]], [[0.0]]], [[[5.0]], [[0.0]]]])
    out = _adapted_output(model, x, mode="prior", prior_strength=6, batch_size=2)
    # N = 6, n = 2: weights 6/8 on source, 2/8 on target
    mean0, var0 = 0.75 * 1 + 0.25 * 4, 0.75 * 4 + 0.25 * 1          # 1.75, 3.25
    mean1, var1 = 0.75 * -2 + 0.25 * 0, 0.75 * 0.25 + 0.25 * 0        # -1.5, 0.1875
    expected = torch.tensor([[2 * (3 - mean0) / var0 ** 0.5 + 0.5, (0 - mean1) / var1 ** 0.5],
                             [2 * (5 - mean0) / var0 ** 0.5 + 0.5, (0 - mean1) / var1 ** 0.5]])
    assert torch.allclose(out.view(2, 2), expected, atol=1e-6)
    # unbiased test variance: channel 0 var 2 instead of 1
    out_unbiased = _adapted_output(model, x, mode="prior", prior_strength=6, batch_size=2, test_variance="unbiased")
    var0_u = 0.75 * 4 + 0.25 * 2
    assert torch.allclose(out_unbiased.view(2, 2)[0, 0], torch.tensor(2 * (3 - mean0) / var0_u ** 0.5 + 0.5))
    # Nandy's std mixing, rho = 0.25 on the target: s = .25 * 1 + .75 * 2 = 1.75 for channel 0
    out_std = _adapted_output(model, x, mode="momentum", momentum=0.25, mix="std")
    assert torch.allclose(out_std.view(2, 2)[0, 0], torch.tensor(2 * (3 - mean0) / 1.75 + 0.5), atol=1e-6)


@pytest.mark.parametrize("mix", ["variance", "std"])
def test_momentum_rho_0_and_1_are_the_unadapted_and_the_batch_adapted_model(mix):
    model = trained_like_cnn()
    x = torch.rand(16, 1, 28, 28) * 0.7 + 0.2
    with torch.no_grad():
        unadapted = model(x)
        batch_adapted = copy.deepcopy(model).train()(x)
    assert torch.allclose(_adapted_output(model, x, mode="momentum", momentum=0.0, mix=mix), unadapted, atol=1e-5)
    assert torch.allclose(_adapted_output(model, x, mode="momentum", momentum=1.0, mix=mix), batch_adapted,
                          atol=1e-5)


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_works_for_library_models(library):
    cfg = compose_config([f"model={library}", "model.arch=resnet18"])
    from robustexp.models.build import build_model

    model = build_model(cfg.model, 5, (0.5,) * 3, (0.25,) * 3)
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, 32, 32))
    model.eval()
    x = torch.rand(8, 3, 32, 32) * 0.5 + 0.5
    with torch.no_grad():
        expected = copy.deepcopy(model).train()(x)
    assert torch.allclose(_adapted_output(model, x, mode="prior", prior_strength=0), expected, atol=1e-4)


def test_full_adaptation_uses_the_statistics_of_the_whole_subset():
    model = trained_like_cnn()
    images = torch.rand(40, 1, 28, 28) + 0.5
    def batches(n):
        return ((images[i:i + n], torch.zeros(len(images[i:i + n]), dtype=torch.long))
                             for i in range(0, len(images), n))
    adaptation = BatchNormAdaptation(mode="full").attach(model)
    adaptation.estimate_full(model, batches(16), torch.device("cpu"))
    first_bn = model.features[1]
    with torch.no_grad():
        conv_out = model.features[0](images)  # the first BN's input does not depend on upstream BN
    assert torch.allclose(first_bn.running_mean, conv_out.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(first_bn.running_var, conv_out.var((0, 2, 3), unbiased=False), atol=1e-5)
    # frozen: predictions no longer depend on the batch they come in
    with torch.no_grad():
        assert torch.allclose(model(images[:3]), model(images)[:3], atol=1e-5)
    adaptation.detach()


def test_adapt_then_freeze_keeps_the_first_batch_statistics():
    model = trained_like_cnn()
    first, second = torch.rand(16, 1, 28, 28) + 0.3, torch.rand(16, 1, 28, 28) * 0.2
    adaptation = BatchNormAdaptation(mode="prior", prior_strength=0, freeze_after=True).attach(model)
    with torch.no_grad():
        model(first)
        adaptation.freeze()
        frozen_on_second = model(second)
        adapted_buffers = copy.deepcopy(model.state_dict())
    adaptation.detach()
    # an eval-mode copy holding the statistics adapted on the first batch predicts the same
    holder = copy.deepcopy(model)
    holder.load_state_dict(adapted_buffers)
    first_bn = holder.features[1]
    with torch.no_grad():
        conv_out = holder.features[0](first)
        assert torch.allclose(first_bn.running_mean, conv_out.mean((0, 2, 3)), atol=1e-5)
        assert torch.allclose(holder(second), frozen_on_second, atol=1e-6)
    # and differs from adapting on the second batch itself
    assert not torch.allclose(frozen_on_second, _adapted_output(model, second, mode="prior", prior_strength=0),
                              atol=1e-3)


def test_statistics_do_not_leak_between_subsets():
    model = trained_like_cnn()
    ctx = EvalContext(run_dir=".", device=torch.device("cpu"), seed=0, progress=False,
                      adaptation=BatchNormAdaptation(mode="prior", prior_strength=4, batch_size=8).attach(model))
    b_alone, b_after_a = subset_b_alone_and_after_a(model, ctx, batch_size=500)
    assert b_alone == b_after_a
    ctx.adaptation.detach()
    full = BatchNormAdaptation(mode="full").attach(model)
    ctx.adaptation = full
    b_full_alone, b_full_after_a = subset_b_alone_and_after_a(model, ctx, batch_size=16)
    assert b_full_after_a == b_full_alone
    full.detach()


def test_bad_adaptation_options():
    with pytest.raises(ConfigError, match="prior_strength N >= 0"):
        BatchNormAdaptation(mode="prior")
    with pytest.raises(ConfigError, match=r"momentum rho in \[0, 1\]"):
        BatchNormAdaptation(mode="momentum", momentum=1.5)
    with pytest.raises(ConfigError, match="has none"):
        BatchNormAdaptation(mode="full").attach(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_runner_compares_no_partial_and_full_adaptation(tmp_path):
    metrics = run(compose_config(["+adaptation=compare"]), tmp_path)
    assert {"corruptions", "corruptions@partial", "corruptions@full", "clean@partial"} <= set(metrics)
    assert set(metrics["adaptation"]) == {"partial", "full"}
    assert "mCA@full" in metrics["summary"] and "clean_top1@partial" in metrics["summary"]
    out = (tmp_path / "summary.md").read_text()
    assert "## top-1 % by test-time adaptation" in out and "| none |" in out.replace("  ", " ").replace("  ", " ")
    # the unadapted evaluation is the same as a run without adaptation
    plain = run(compose_config(), tmp_path / "plain")
    assert plain["corruptions"]["grid"] == metrics["corruptions"]["grid"]


def test_grid_expansion_labels_and_values():
    from robustexp.adaptation.sweep import expand_grid

    grid = {"template": {"_target_": "x", "mode": "prior"}, "axes": {"prior_strength": [0, 8], "batch_size": [1, 4]},
            "label": "N{prior_strength}_n{batch_size}"}
    expanded = expand_grid(grid)
    assert list(expanded) == ["N0_n1", "N0_n4", "N8_n1", "N8_n4"]
    assert expanded["N8_n1"] == ({"_target_": "x", "mode": "prior", "prior_strength": 8, "batch_size": 1},
                                 {"prior_strength": 8, "batch_size": 1})
    with pytest.raises(ConfigError, match="non-empty lists"):
        expand_grid({"template": {}, "axes": {"batch_size": []}})


def test_schneider_sweep_writes_csv_and_curves(tmp_path):
    import csv

    cfg = compose_config(["+adaptation=schneider_fig1", "adaptation.grid.axes.prior_strength=[0,100000]",
                          "adaptation.grid.axes.batch_size=[10,50]",
                          "eval.evaluators.corruptions.corruptions=[contrast]",
                          "eval.evaluators.corruptions.severities=[3]"])
    metrics = run(cfg, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "adaptation_sweep.csv")))
    assert [r["variant"] for r in rows] == ["N0_n10", "N0_n50", "N100000_n10", "N100000_n50"]
    assert (tmp_path / "adaptation_sweep.png").stat().st_size > 1000
    summary = metrics["summary"]
    # a prior of 100000 pseudo-samples against n <= 50 is the unadapted model
    for n in (10, 50):
        assert summary[f"mean_uCE@N100000_n{n}"] == pytest.approx(summary["mean_uCE"], abs=1e-9)
    assert metrics["adaptation_sweep"]["best"]["variant"] in {r["variant"] for r in rows}


def test_adhoc_is_the_unadapted_model_and_single_image_is_bn_adaptation_at_n1():
    """Schneider et al. Sec. 2: the ad hoc scenario is n = 1, "not allowed to adapt": the model as
    trained. BN adaptation to single images with an N = 16 prior (their Fig. 1) is single_image."""
    from robustexp.adaptation import NoAdaptation
    from robustexp.adaptation.sweep import adaptation_variants
    from robustexp.evaluation.base import evaluate_subset

    variants, _ = adaptation_variants(compose_config(["+adaptation=adhoc"]).adaptation)
    assert list(variants) == ["adhoc"] and isinstance(variants["adhoc"], NoAdaptation)
    single, _ = adaptation_variants(compose_config(["+adaptation=single_image"]).adaptation)
    assert list(single) == ["none", "bn"] and (single["bn"].prior_strength, single["bn"].batch_size) == (16, 1)
    # evaluated under adhoc, a model gives the unadapted model's predictions; under single_image it does not
    model = trained_like_cnn()
    images, labels = torch.rand(32, 1, 28, 28) + 0.5, torch.arange(32) % 10

    def make(n):
        return ((images[i:i + n], labels[i:i + n]) for i in range(0, 32, n))

    def loss(adaptation):
        ctx = EvalContext(run_dir=".", device=torch.device("cpu"), seed=0, progress=False, adaptation=adaptation)
        if adaptation is not None:
            adaptation.attach(model)
        try:
            return evaluate_subset(model, make, ctx, batch_size=16)["loss"]
        finally:
            if adaptation is not None:
                adaptation.detach()

    assert loss(variants["adhoc"]) == pytest.approx(loss(None), abs=1e-6)
    assert loss(single["bn"]) != pytest.approx(loss(None), abs=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "flat"])
def test_batch_statistics_equal_a_float64_computation_even_when_the_mean_dominates(layout):
    """The two-pass float32 mean and variance (mean, then mean squared deviation) are within float32
    rounding of float64, also where E[x^2] - mean^2 would cancel (mean 1000 x the spread)."""
    from robustexp.adaptation.bn import batch_statistics

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, 7, 9, generator=g) * torch.tensor([1e-3, 1.0, 10.0, 0.1, 2.0]).view(1, 5, 1, 1) \
        + torch.tensor([1.0, -3.0, 100.0, 0.0, 5.0]).view(1, 5, 1, 1)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "flat":
        x = x.permute(0, 2, 3, 1).reshape(-1, 5)   # BatchNorm1d's (N, C)
    dims = [d for d in range(x.ndim) if d != 1]
    reference = x.double()
    for unbiased in (False, True):
        mean, var = batch_statistics(x, unbiased=unbiased)
        assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (5,)
        mean_error = (mean.double() - reference.mean(dims)).abs()
        assert (mean_error <= 1e-6 * reference.mean(dims).abs() + 1e-6 * reference.std(dims)).all(), mean_error
        torch.testing.assert_close(var.double(), reference.var(dims, unbiased=unbiased), rtol=2e-6, atol=0)


def test_full_statistics_over_many_uneven_batches_equal_a_float64_computation():
    """Per-batch statistics combined in float64 (Chan et al.): the subset's mean and variance of the
    first BN input equal those of all its values at once, to float32 rounding, with a mean far from
    zero against the spread and batches of different sizes."""
    model = trained_like_cnn()
    images = torch.rand(53, 1, 28, 28) * 0.01 + 0.9
    adaptation = BatchNormAdaptation(mode="full").attach(model)
    adaptation.estimate_full(model, ((images[i:i + 8], None) for i in range(0, 53, 8)), torch.device("cpu"))
    with torch.no_grad():
        conv_out = model.features[0](images).double()
    first_bn = model.features[1]
    torch.testing.assert_close(first_bn.running_mean.double(), conv_out.mean((0, 2, 3)), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(first_bn.running_var.double(), conv_out.var((0, 2, 3), unbiased=False),
                               rtol=1e-5, atol=0)
    adaptation.detach()
    unbiased = BatchNormAdaptation(mode="full", test_variance="unbiased").attach(model)
    unbiased.estimate_full(model, ((images[i:i + 8], None) for i in range(0, 53, 8)), torch.device("cpu"))
    torch.testing.assert_close(first_bn.running_var.double(), conv_out.var((0, 2, 3), unbiased=True),
                               rtol=1e-5, atol=0)
    unbiased.detach()


@pytest.mark.parametrize("mode,kwargs", [("prior", {"prior_strength": 16}), ("prior", {"prior_strength": 0}),
                                         ("momentum", {"momentum": 0.3}),
                                         ("momentum", {"momentum": 0.3, "mix": "std"})])
def test_the_statistics_written_are_exactly_the_mixture_of_mix_statistics(mode, kwargs):
    """The buffers hold bit for bit ``mix_statistics(source, batch statistics, w)``, batch after batch
    (the last one smaller: another w)."""
    from robustexp.adaptation.bn import batch_statistics, mix_statistics

    model = trained_like_cnn()
    layer = model.features[1]
    source = (layer.running_mean.clone(), layer.running_var.clone())
    adaptation = BatchNormAdaptation(mode=mode, batch_size=8, **kwargs).attach(model)
    seen = []
    layer.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach().clone()))
    with torch.no_grad():
        for x in (torch.rand(8, 1, 28, 28) + 0.3, torch.rand(8, 1, 28, 28), torch.rand(3, 1, 28, 28) * 2):
            model(x)
            mean_t, var_t = batch_statistics(seen[-1])
            expected = mix_statistics(*source, mean_t, var_t, adaptation.weight_on_target(len(x)),
                                      kwargs.get("mix", "variance"))
            assert torch.equal(layer.running_mean, expected[0]) and torch.equal(layer.running_var, expected[1])
    adaptation.detach()
    assert torch.equal(layer.running_mean, source[0]) and torch.equal(layer.running_var, source[1])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "flat"])
def test_batch_statistics_of_a_batch_summed_in_chunks_equal_a_float64_computation(layout):
    """Inputs larger than one chunk of squared deviations (several chunks of images, the last one
    shorter): mean and biased / unbiased variance within float32 rounding of float64, in the
    layouts the models hand to BN (contiguous, channels_last, BatchNorm1d's (N, C))."""
    from robustexp.adaptation import bn

    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([1e-3, 1.0, 10.0]).view(1, 3, 1, 1)
    shift = torch.tensor([1.0, -3.0, 100.0]).view(1, 3, 1, 1)
    x = (torch.randn(45, 3, 64, 64, generator=g) * scale + shift).relu_()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "flat":
        x = x.permute(0, 2, 3, 1).reshape(-1, 3)
    per_image = x[0].numel()
    assert x.numel() > 2 * bn._DEVIATION_CHUNK and len(x) % (bn._DEVIATION_CHUNK // per_image) != 0  # 3+ chunks
    dims = [d for d in range(x.ndim) if d != 1]
    reference = x.double()
    for unbiased in (False, True):
        mean, var = bn.batch_statistics(x, unbiased=unbiased)
        assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (3,)
        torch.testing.assert_close(mean.double(), reference.mean(dims), rtol=1e-6, atol=0)
        torch.testing.assert_close(var.double(), reference.var(dims, unbiased=unbiased), rtol=2e-6, atol=0)


@pytest.mark.parametrize("mix", ["variance", "std"])
def test_mix_statistics_equal_a_float64_mixture(mix):
    """(1 - w) source + w target on the mean and on the variance (or on the std), to float32 rounding."""
    from robustexp.adaptation.bn import mix_statistics

    g = torch.Generator().manual_seed(2)
    source = (torch.randn(64, generator=g), torch.rand(64, generator=g) + 0.1)
    target = (torch.randn(64, generator=g) * 3, torch.rand(64, generator=g) * 4)
    for w in (0.0, 8 / 24, 0.9, 1.0):
        mean, var = mix_statistics(*source, *target, w, mix)
        s = [t.double() for t in source]
        t = [t.double() for t in target]
        expected_mean = (1 - w) * s[0] + w * t[0]
        expected_var = (1 - w) * s[1] + w * t[1] if mix == "variance" else \
            ((1 - w) * s[1].sqrt() + w * t[1].sqrt()) ** 2
        torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(var.double(), expected_var, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kwargs", [{"mode": "prior", "prior_strength": 16},
                                    {"mode": "momentum", "momentum": 0.3, "mix": "std"},
                                    {"mode": "prior", "prior_strength": 4, "test_variance": "unbiased"}])
def test_adaptation_of_a_channels_last_model_equals_a_float64_hand_computation_per_layer(kwargs):
    """The model in channels_last (as the runner runs it on CPU): every layer normalizes with the
    mixture of its source statistics and the float64 statistics of its own input, computed here by
    hand, and the logits equal those of the contiguous model."""
    model = trained_like_cnn()
    model.features[0].weight.data += 0.2   # BN inputs with a mean far from zero
    x = torch.rand(12, 1, 28, 28) * 0.8 + 0.4
    with torch.no_grad():
        contiguous = _adapted_output(model, x, batch_size=12, **kwargs)
    model.to(memory_format=torch.channels_last)
    adaptation = BatchNormAdaptation(batch_size=12, **kwargs)
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    source = [(m.running_mean.double(), m.running_var.double()) for m in layers]
    seen = {}
    handles = [m.register_forward_hook(lambda m, i, o: seen.__setitem__(m, (i[0].double(), o.double())))
               for m in layers]
    adaptation.attach(model)
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        adaptation.detach()
        for h in handles:
            h.remove()
    torch.testing.assert_close(logits, contiguous, rtol=1e-4, atol=1e-5)
    w = adaptation.weight_on_target(12)
    for layer, (mean_s, var_s) in zip(layers, source):
        inputs, outputs = seen[layer]
        assert inputs.is_contiguous(memory_format=torch.channels_last) and not inputs.is_contiguous()
        mean_t = inputs.mean((0, 2, 3))
        var_t = inputs.var((0, 2, 3), unbiased=kwargs.get("test_variance") == "unbiased")
        mean = (1 - w) * mean_s + w * mean_t
        var = (1 - w) * var_s + w * var_t if kwargs.get("mix", "variance") == "variance" else \
            ((1 - w) * var_s.sqrt() + w * var_t.sqrt()) ** 2
        expected = (inputs - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + layer.eps).sqrt() \
            * layer.weight.double().view(1, -1, 1, 1) + layer.bias.double().view(1, -1, 1, 1)
        torch.testing.assert_close(outputs, expected, rtol=1e-5, atol=1e-5)
