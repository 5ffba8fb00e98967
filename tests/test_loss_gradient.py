"""Loss-gradient images (Nandy et al. 2021, appendix C, Fig. 2): the input gradient of the
cross-entropy against its closed form, BN statistics adapted on the noisy batch and frozen while the
gradient is taken, the visualization, and the evaluator in a run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustexp.adaptation import BatchNormAdaptation
from robustexp.adaptation.tent import TentAdaptation
from robustexp.data.base import DataSplits
from robustexp.data.batches import evaluation_order
from robustexp.errors import ConfigError
from robustexp.evaluation.base import EvalContext
from robustexp.evaluation.loss_gradient import LossGradientEvaluator, alignment, input_gradient, visualize_gradient
from robustexp.main import run
from tests.conftest import compose_config, trained_like_cnn

CTX = dict(device=torch.device("cpu"), seed=0, progress=False)
SHAPE = (1, 2, 3)  # six "pixels"
D, C = 6, 4


def _data(n=8, seed=0) -> DataSplits:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, *SHAPE, generator=g) * 2.0 + 0.5   # far from the source statistics below
    labels = torch.arange(n) % C
    test = torch.utils.data.TensorDataset(images, labels)
    return DataSplits(name="toy", train=test, test=test, num_classes=C, input_shape=SHAPE, mean=(0.0,), std=(1.0,))


def _bn_linear(seed=0) -> nn.Sequential:
    """Flatten -> BatchNorm1d (known source statistics, affine) -> Linear: a model whose loss gradient
    has a closed form for any BN statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(D), nn.Linear(D, C))
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.linspace(-0.2, 0.3, D))
        bn.running_var.copy_(torch.linspace(0.05, 0.4, D))
        bn.weight.copy_(torch.linspace(0.5, 2.0, D))
        bn.bias.copy_(torch.linspace(-0.1, 0.1, D))
    return model.eval()


def _closed_form(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, mean, var) -> torch.Tensor:
    """grad_x CE for logits = W (gamma (x - mean) / sqrt(var + eps) + beta) + b:
    (softmax - onehot(y)) W, times gamma / sqrt(var + eps) per feature."""
    bn, linear = model[1], model[2]
    scale = bn.weight / torch.sqrt(var + bn.eps)
    z = (x.flatten(1) - mean) * scale + bn.bias
    p = torch.softmax(z @ linear.weight.T + linear.bias, dim=1)
    return (((p - F.one_hot(y, C)) @ linear.weight) * scale).detach().view_as(x)


def test_input_gradient_of_a_linear_model_is_softmax_minus_onehot_times_w():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, C)).eval()
    x, y = torch.randn(5, *SHAPE), torch.tensor([0, 3, 1, 2, 3])
    gradient, losses = input_gradient(model, x, y)
    w, b = model[1].weight, model[1].bias
    p = torch.softmax(x.flatten(1) @ w.T + b, dim=1)
    expected = ((p - F.one_hot(y, C)) @ w).view_as(x)
    assert torch.allclose(gradient, expected.detach(), atol=1e-6)
    assert torch.allclose(losses, -torch.log(p[torch.arange(5), y]).detach(), atol=1e-6)
    assert all(param.grad is None for param in model.parameters())  # only the input's gradient is taken


def _by_image(result, sigma, which, key):
    return torch.tensor(result["sigmas"][sigma][which][key])


@pytest.mark.parametrize("rho, mix", [(1.0, "std"), (0.5, "std"), (0.5, "variance")])
def test_adapted_gradient_uses_the_statistics_of_the_whole_noisy_batch_frozen(tmp_path, rho, mix):
    """sigma = 0: the batch is the 8 clean test images; the BN statistics are adapted on all 8 with
    Nandy's rule and frozen, the gradients of the first 3 are then those of that fixed network."""
    data, model = _data(), _bn_linear()
    bn = model[1]
    source_mean, source_var = bn.running_mean.clone(), bn.running_var.clone()
    adaptation = BatchNormAdaptation(mode="momentum", momentum=rho, batch_size=8, mix=mix).attach(model)
    evaluator = LossGradientEvaluator(sigmas=[0.0], n_images=3, plot=False)
    result = evaluator.evaluate(model, data, EvalContext(run_dir=tmp_path, adaptation=adaptation, **CTX))
    adaptation.detach()

    order = evaluation_order(8).tolist()
    x_all, y_all = data.test.tensors[0][order], data.test.tensors[1][order]
    x, y = x_all[:3], y_all[:3]
    assert result["indices"] == order[:3] and result["labels"] == y.tolist() and result["adapt_batch_size"] == 8
    # the batch statistics: mean and biased variance over the 8 images, mixed with weight rho
    mean_t, var_t = x_all.flatten(1).mean(0), x_all.flatten(1).var(0, unbiased=False)
    mean = rho * mean_t + (1 - rho) * source_mean
    var = (rho * var_t.sqrt() + (1 - rho) * source_var.sqrt()) ** 2 if mix == "std" else \
        rho * var_t + (1 - rho) * source_var
    adapted = _closed_form(model, x, y, mean, var)
    unadapted = _closed_form(model, x, y, source_mean, source_var)
    assert torch.allclose(_by_image(result, "0", "adapted", "grad_norm"), adapted.flatten(1).norm(dim=1), rtol=1e-5)
    assert torch.allclose(_by_image(result, "0", "unadapted", "grad_norm"), unadapted.flatten(1).norm(dim=1),
                          rtol=1e-5)
    assert torch.allclose(_by_image(result, "0", "adapted", "alignment"), alignment(x, adapted), atol=1e-5)
    # adaptation changes the gradient here (the test images are far from the source statistics)
    assert not torch.allclose(adapted, unadapted, rtol=1e-2)
    # the source statistics are back after the evaluation
    assert torch.equal(bn.running_mean, source_mean) and torch.equal(bn.running_var, source_var)


def test_rho_0_leaves_the_gradient_unchanged_and_without_adaptation_there_is_one_row(tmp_path):
    data, model = _data(), _bn_linear()
    adaptation = BatchNormAdaptation(mode="momentum", momentum=0.0, batch_size=8, mix="std").attach(model)
    evaluator = LossGradientEvaluator(sigmas=[0.0, 0.5], n_images=2, plot=False)
    adapted = evaluator.evaluate(model, data, EvalContext(run_dir=tmp_path, adaptation=adaptation, **CTX))
    adaptation.detach()
    for sigma in ("0", "0.5"):
        assert adapted["sigmas"][sigma]["adapted"]["grad_norm"] == \
            pytest.approx(adapted["sigmas"][sigma]["unadapted"]["grad_norm"], rel=1e-6)
    plain = evaluator.evaluate(model, data, EvalContext(run_dir=tmp_path, **CTX))
    assert set(plain["sigmas"]["0.5"]) == {"unadapted"} and plain["adaptation"] is None
    # the same noise with and without an adaptation attached: the unadapted rows agree
    assert plain["sigmas"]["0.5"]["unadapted"]["grad_norm"] == \
        pytest.approx(adapted["sigmas"]["0.5"]["unadapted"]["grad_norm"], rel=1e-6)
    assert plain["sigmas"]["0.5"]["unadapted"]["grad_norm"] != plain["sigmas"]["0"]["unadapted"]["grad_norm"]
    assert set(evaluator.headline(adapted)) == {f"grad_alignment_{w}_sigma{s}" for w in ("unadapted", "adapted")
                                                for s in ("0", "0.5")}


def test_alignment_and_visualization_by_hand():
    x = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [0.0, 0.0]]]])
    g = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]], [[[-1.0, 0.0], [0.0, 1.0]]]])
    # |<x, g>| / (||x|| ||g||): 2 / (1 * 2) = 1; |-1| / (sqrt 2 * sqrt 2) = 0.5
    assert alignment(x, g).tolist() == pytest.approx([1.0, 0.5])
    assert alignment(x, torch.zeros_like(g)).tolist() == [0.0, 0.0]
    gradient = torch.tensor([[[-3.0, -1.0, 0.0, 1.0, 3.0]]])
    sd = gradient.std().item()   # 2.0
    picture = visualize_gradient(gradient, clip_std=1.0)   # 0.5 + g / (2 sd), clipped
    assert picture.flatten().tolist() == pytest.approx([0.0, 0.5 - 1 / (2 * sd), 0.5, 0.5 + 1 / (2 * sd), 1.0])
    assert torch.equal(visualize_gradient(torch.zeros(1, 2, 2)), torch.full((1, 2, 2), 0.5))


def test_writes_the_grid_and_names_bad_options(tmp_path):
    model = trained_like_cnn()
    from tests.test_certify import _digits

    adaptation = BatchNormAdaptation(mode="momentum", momentum=1.0, batch_size=16, mix="std").attach(model)
    evaluator = LossGradientEvaluator(sigmas=[0.0, 0.5], n_images=2)
    result = evaluator.evaluate(model, _digits(), EvalContext(run_dir=tmp_path, adaptation=adaptation,
                                                               suffix="@momentum", **CTX))
    adaptation.detach()
    assert result["png"] == "loss_gradient@momentum.png" and (tmp_path / result["png"]).stat().st_size > 1000
    assert "alignment with" in evaluator.table(result)
    with pytest.raises(ConfigError, match="sigmas"):
        LossGradientEvaluator(sigmas=[-0.5])
    with pytest.raises(ConfigError, match="n_images"):
        LossGradientEvaluator(n_images=0)
    with pytest.raises(ConfigError, match="clip_std"):
        LossGradientEvaluator(clip_std=0)
    tent = TentAdaptation().attach(model)
    with pytest.raises(ConfigError, match="cannot be adapted on one batch and frozen"):
        evaluator.evaluate(model, _digits(), EvalContext(run_dir=tmp_path, adaptation=tent, **CTX))
    tent.detach()


def test_runner_writes_loss_gradients_with_and_without_adaptation(tmp_path):
    cfg = compose_config(["eval=loss_gradient", "+adaptation=momentum", "adaptation.rho=1", "adaptation.n=32",
                          "logger.mode=disabled", "runtime.progress=false", "dataset.n_train=300", "dataset.n_test=60",
                          "trainer.epochs=1", "trainer.batch_size=50", "eval.evaluators.loss_gradient.n_images=2",
                          "eval.evaluators.loss_gradient.sigmas=[0.0,0.5]"], toy=False)
    metrics = run(cfg, tmp_path)
    assert metrics["loss_gradient"]["adaptation"] is None
    adapted = metrics["loss_gradient@momentum"]
    assert adapted["adapt_batch_size"] == 32 and "std" in adapted["adaptation"]
    assert "grad_alignment_adapted_sigma0.5@momentum" in metrics["summary"]
    assert (tmp_path / "loss_gradient.png").is_file() and (tmp_path / "loss_gradient@momentum.png").is_file()
