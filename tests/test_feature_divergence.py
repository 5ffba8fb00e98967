"""Feature divergence (Shu et al. 2021, eqs. 4-5): the formula against hand computations, the
statistics it is built on, and the evaluator on a model with auxiliary BNs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robustexp.data.base import DataSplits, TensorImageDataset
from robustexp.data.corruptions.sources import CorruptionSource
from robustexp.errors import ConfigError
from robustexp.evaluation.base import EvalContext
from robustexp.evaluation.feature_divergence import (
    ChannelMoments,
    FeatureDivergenceEvaluator,
    collect_feature_statistics,
    feature_divergence,
    gaussian_kl,
    symmetric_kl,
)
from robustexp.methods.advbn import AdvBNTraining
from robustexp.models.build import NormalizedClassifier
from robustexp.models.dual_bn import bn_branch
from tests.conftest import trained_like_cnn


def test_kl_of_two_known_gaussians_by_hand():
    # A = N(1, 2^2), B = N(-1, 1^2):
    # KL(A||B) = log(1/2) + (4 + 4) / 2 - 1/2 = 3.5 - log 2
    # KL(B||A) = log(2) + (1 + 4) / 8 - 1/2 = 0.125 + log 2
    mu_a, var_a, mu_b, var_b = (torch.tensor([v], dtype=torch.float64) for v in (1.0, 4.0, -1.0, 1.0))
    assert gaussian_kl(mu_a, var_a, mu_b, var_b).item() == pytest.approx(3.5 - math.log(2), abs=1e-12)
    assert gaussian_kl(mu_b, var_b, mu_a, var_a).item() == pytest.approx(0.125 + math.log(2), abs=1e-12)
    assert symmetric_kl(mu_a, var_a, mu_b, var_b).item() == pytest.approx(3.625, abs=1e-12)
    # eq. (4) averages over channels: a second, identical channel halves the mean
    stats_a = (torch.tensor([1.0, 0.0]), torch.tensor([4.0, 1.0]))
    stats_b = (torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert feature_divergence(stats_a, stats_b) == pytest.approx(3.625 / 2, abs=1e-6)
    assert feature_divergence(stats_a, stats_a) == 0.0
    assert feature_divergence(stats_a, stats_b) == pytest.approx(feature_divergence(stats_b, stats_a))


def test_channel_moments_match_torch_and_sampled_divergence_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 2, 8, 8, generator=g) * torch.tensor([2.0, 1.0]).view(1, 2, 1, 1) + torch.tensor(
        [1.0, 0.0]).view(1, 2, 1, 1)
    b = torch.randn(400, 2, 8, 8, generator=g) * torch.tensor([1.0, 1.0]).view(1, 2, 1, 1) + torch.tensor(
        [-1.0, 0.0]).view(1, 2, 1, 1)
    moments = ChannelMoments()
    for chunk in a.split(37):  # uneven batches
        moments.update(chunk)
    mean, var = moments.result()
    assert torch.allclose(mean.float(), a.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(var.float(), a.var((0, 2, 3), unbiased=False), atol=1e-4)
    model, layer = nn.Sequential(nn.Identity()), {"0": None}
    layer["0"] = model[0]
    stats_a = collect_feature_statistics(model, layer, [(a, None)], torch.device("cpu"))
    stats_b = collect_feature_statistics(model, layer, [(b, None)], torch.device("cpu"))
    assert feature_divergence(stats_a["0"], stats_b["0"]) == pytest.approx(3.625 / 2, rel=0.03)


def test_divergence_is_invariant_to_a_shared_per_channel_affine_map():
    """Why measuring a BN layer's output (eval mode) is the same as measuring its input."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(100, 3, 4, 4, generator=g), torch.randn(100, 3, 4, 4, generator=g) * 1.7 + 0.4
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.3, -2.0, 1.0]))
        bn.running_var.copy_(torch.tensor([0.5, 4.0, 2.0]))
        bn.weight.copy_(torch.tensor([2.0, -0.5, 1.5]))
        bn.bias.copy_(torch.tensor([1.0, 0.0, -3.0]))
    model = nn.Sequential(nn.Identity(), bn)
    layers = {"0": model[0], "1": model[1]}
    stats_a = collect_feature_statistics(model, layers, [(a, None)], torch.device("cpu"))
    stats_b = collect_feature_statistics(model, layers, [(b, None)], torch.device("cpu"))
    assert feature_divergence(stats_a["0"], stats_b["0"]) == pytest.approx(
        feature_divergence(stats_a["1"], stats_b["1"]), rel=1e-6)


class _ScaledCopies(CorruptionSource):
    """A corruption source whose "gaussian_noise" subset is the clean test split times ``scale``."""

    family = "imagenet_c"
    description = "scaled copies of the test split"

    def __init__(self, scale: float):
        self.scale = scale

    def batches(self, data, name, severity, batch_size, ctx, max_images=None):
        from robustexp.data.batches import test_batches

        for images, labels in test_batches(data.test, batch_size, ctx, max_images):
            yield images * self.scale, labels


def _data():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    labels = torch.arange(64) % 10
    split = TensorImageDataset(images, labels)
    return DataSplits(name="toy", train=split, test=split, num_classes=10, input_shape=(1, 28, 28), mean=(0.5,),
                      std=(0.25,))


def test_evaluator_on_a_model_with_auxiliary_bns(tmp_path):
    model = NormalizedClassifier(trained_like_cnn(), mean=[0.5], std=[0.25])
    AdvBNTraining("features.6").setup(model, torch.device("cpu"))
    ctx = EvalContext(run_dir=tmp_path, device=torch.device("cpu"), seed=0, progress=False)
    identical = FeatureDivergenceEvaluator(_ScaledCopies(1.0), corruptions=["gaussian_noise"], severities=[1],
                                           after="features.6", batch_size=16)
    result = identical.evaluate(model, _data(), ctx)
    assert result["layers"] == ["features.8", "features.11"] and result["channels"] == {"features.8": 16,
                                                                                          "features.11": 16}
    assert result["divergence"]["gaussian_noise/s1"] == {"features.8": 0.0, "features.11": 0.0}
    assert result["bn_branch"] == "main" and (tmp_path / "feature_divergence_bn-main.png").is_file()

    shifted = FeatureDivergenceEvaluator(_ScaledCopies(0.3), corruptions=["gaussian_noise"], severities=[1],
                                         after="features.6", batch_size=16, layers=["features.8", "features.11"])
    main = shifted.evaluate(model, _data(), ctx)
    assert all(v > 0.05 for v in main["divergence"]["gaussian_noise/s1"].values())
    assert shifted.headline(main)["fdiv_last_layer"] == main["mean_per_layer"]["features.11"]
    assert "features.8" in shifted.table(main)
    # the auxiliary branch has its own statistics: other features, another divergence, another file
    with torch.no_grad():
        model.net.features[8].aux.running_var.mul_(9.0)
    with bn_branch(model, "aux"):
        aux = shifted.evaluate(model, _data(), ctx)
    assert aux["bn_branch"] == "aux" and (tmp_path / "feature_divergence_bn-aux.csv").is_file()
    last = "features.11"
    assert aux["divergence"]["gaussian_noise/s1"][last] != main["divergence"]["gaussian_noise/s1"][last]
    # the CSV of one run can be drawn in the plot of another (Fig. 5: standard vs AdvBN)
    compare = FeatureDivergenceEvaluator(_ScaledCopies(0.3), corruptions=["gaussian_noise"], severities=[1],
                                         after="features.6", batch_size=16,
                                         compare_with=str(tmp_path / "feature_divergence_bn-main.csv"))
    assert compare.read_mean_curve(compare.compare_with) == pytest.approx(main["mean_per_layer"])
    compare.evaluate(model, _data(), ctx)


def test_bad_options_name_the_option():
    with pytest.raises(ConfigError, match="feature_divergence.layers"):
        FeatureDivergenceEvaluator(_ScaledCopies(1.0), corruptions=["gaussian_noise"], layers="all")
    with pytest.raises(ConfigError, match="needs targets"):
        FeatureDivergenceEvaluator(_ScaledCopies(1.0), corruptions=[])
    evaluator = FeatureDivergenceEvaluator(_ScaledCopies(1.0), corruptions=["gaussian_noise"], severities=[1],
                                           layers=["features.99"])
    ctx = EvalContext(run_dir="/nonexistent", device=torch.device("cpu"), seed=0, progress=False)
    model = NormalizedClassifier(trained_like_cnn(), mean=[0.5], std=[0.25])
    with pytest.raises(ConfigError, match=r"\['features.99'\] are not modules"):
        evaluator.evaluate(model, _data(), ctx)
