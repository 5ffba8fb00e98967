"""MAGN (Tsiligkaridis & Tsiligkaridis 2022, eq. 6): the regularizer, the noise and the loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustexp.errors import ConfigError
from robustexp.losses import jensen_shannon, kl_divergence, magn_regularizer
from robustexp.methods.magn import MAGNTraining, gaussian_noise_per_example


def _softmax(logits):
    e = [math.exp(v) for v in logits]
    return [v / sum(e) for v in e]


def test_regularizer_is_true_class_probability_times_kl_clean_to_noisy():
    clean, noisy, label = [2.0, 0.5, -1.0], [1.0, 1.0, 0.0], 1
    p, q = _softmax(clean), _softmax(noisy)
    kl_pq = sum(a * math.log(a / b) for a, b in zip(p, q))
    got = magn_regularizer(torch.tensor([clean]), torch.tensor([noisy]), torch.tensor([label]))
    assert got.item() == pytest.approx(p[label] * kl_pq, rel=1e-6)
    # the direction of the KL matters: KL(p || q), not KL(q || p)
    kl_qp = sum(b * math.log(b / a) for a, b in zip(p, q))
    assert abs(kl_pq - kl_qp) > 1e-3
    # the weight is p_y of the clean prediction: the same pair of predictions, another label
    other = magn_regularizer(torch.tensor([clean]), torch.tensor([noisy]), torch.tensor([0])).item()
    assert other / got.item() == pytest.approx(p[0] / p[1], rel=1e-6)


def test_misclassified_examples_are_barely_regularized():
    clean = torch.tensor([[8.0, 0.0, 0.0], [8.0, 0.0, 0.0]])
    noisy = torch.tensor([[0.0, 8.0, 0.0], [0.0, 8.0, 0.0]])
    reg = magn_regularizer(clean, noisy, torch.tensor([0, 2]))   # correct (p_y ~ 1) vs wrong (p_y ~ 3e-4)
    assert reg[1] < 1e-3 * reg[0]


def test_nothing_is_detached():
    """Algorithm 1 differentiates the whole loss: finite differences of the regularizer in
    both logits (weight p_y included) match its autograd gradient."""
    torch.manual_seed(0)
    clean = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    noisy = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 1, 4])
    assert torch.autograd.gradcheck(lambda a, b: magn_regularizer(a, b, labels), (clean, noisy))
    grad_clean, grad_noisy = torch.autograd.grad(magn_regularizer(clean, noisy, labels).sum(), (clean, noisy))
    assert grad_clean.abs().sum() > 0 and grad_noisy.abs().sum() > 0


def test_regularizer_vanishes_at_sigma_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    images, labels = torch.rand(8, 1, 8, 8), torch.randint(3, (8,))
    loss, logs = MAGNTraining(sigma_max=0.0, lambda_noise=3.0).training_step(model, images, labels)
    assert logs["magn"] == pytest.approx(0.0, abs=1e-7)
    assert loss.item() == pytest.approx(logs["ce"], abs=1e-6)
    torch.manual_seed(0)
    _, noisy_logs = MAGNTraining(sigma_max=0.2).training_step(model, images, labels)
    assert noisy_logs["magn"] > 1e-6


def test_sigma_is_uniform_per_example_and_delta_gaussian():
    torch.manual_seed(1)
    images = torch.zeros(2000, 3, 16, 16)
    delta, sigma = gaussian_noise_per_example(images, sigma_max=0.2)
    assert sigma.min() >= 0 and sigma.max() <= 0.2
    assert sigma.mean().item() == pytest.approx(0.1, abs=0.005)           # U(0, 0.2): mean 0.1
    assert sigma.var().item() == pytest.approx(0.2 ** 2 / 12, rel=0.1)     # and variance sigma_max^2 / 12
    per_image_std = delta.flatten(1).std(1)
    ratio = per_image_std / sigma                                          # delta ~ N(0, sigma_i^2 I):
    assert (ratio - 1).abs().max() < 0.15 and abs(ratio.mean().item() - 1) < 0.005   # 768 pixels: ~2.5 % spread


def test_loss_is_eq6():
    """CE on clean images + lambda1 * mean p_y KL(p(x) || p(x + delta)) + lambda2 * JSD, with the
    noise and AugMix draws reproduced from the same seed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    images, labels = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    method = MAGNTraining(sigma_max=0.2, lambda_noise=3.0, lambda_jsd=12.0)
    torch.manual_seed(7)
    loss, logs = method.training_step(model, images, labels)
    torch.manual_seed(7)
    delta, _ = gaussian_noise_per_example(images, 0.2)
    aug1, aug2 = method.augmix(images), method.augmix(images)
    with torch.no_grad():
        clean, noisy = model(images), model(images + delta)
        reg = magn_regularizer(clean, noisy, labels).mean()
        jsd = jensen_shannon([F.log_softmax(model(v), dim=1) for v in (images, aug1, aug2)]).mean()
    expected = F.cross_entropy(clean, labels) + 3.0 * reg + 12.0 * jsd
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["magn"] == pytest.approx(reg.item(), rel=1e-5)
    assert "jsd" not in MAGNTraining(lambda_jsd=0.0).training_step(model, images, labels)[1]


def test_small_noise_regularizer_matches_the_fisher_trace_approximation():
    """Sec. 3.1, eq. 7: for small sigma, E_delta KL(p(x) || p(x + delta)) ~ sigma^2 / 2 Tr G(x),
    G the Fisher information of p(.|x) in x: for a linear softmax model f(x) = W x,
    Tr G = sum_c p_c ||w_c - sum_k p_k w_k||^2."""
    torch.manual_seed(2)
    weight = torch.randn(3, 10, dtype=torch.float64)
    x = torch.randn(1, 10, dtype=torch.float64)
    sigma = 0.01
    deltas = sigma * torch.randn(20000, 10, dtype=torch.float64)
    log_p = F.log_softmax(x @ weight.T, dim=1)
    kl = kl_divergence(log_p.expand(len(deltas), -1), F.log_softmax((x + deltas) @ weight.T, dim=1)).mean()
    p = log_p.exp()[0]
    centred = weight - p @ weight
    trace = (p * (centred ** 2).sum(1)).sum()
    assert kl.item() == pytest.approx(sigma ** 2 / 2 * trace.item(), rel=0.05)


def test_bad_options_name_the_option():
    with pytest.raises(ConfigError, match="method.sigma_max"):
        MAGNTraining(sigma_max=-0.1)
    with pytest.raises(ConfigError, match="method.lambda_noise"):
        MAGNTraining(lambda_noise=-1)
    with pytest.raises(ConfigError, match="method.operations"):
        MAGNTraining(lambda_jsd=12, operations=["fog"])


# ---------------------------------------------------------------------------- the Table 1 recipes
# The rows of the paper's Table 1 (CIFAR-10-C, Sec. 4): M = 18 corruptions, "The 'gaussian noise'
# corruption is excluded from our evaluations".
TABLE1_CORRUPTIONS = {"brightness", "contrast", "defocus_blur", "elastic_transform", "fog", "frost", "gaussian_blur",
                      "glass_blur", "impulse_noise", "jpeg_compression", "motion_blur", "pixelate", "saturate",
                      "shot_noise", "snow", "spatter", "speckle_noise", "zoom_blur"}


@pytest.mark.parametrize("name", ["tsiligkaridis_table1", "tsiligkaridis_table1_small"])
def test_tsiligkaridis_recipes_use_the_papers_18_corruptions_and_preprocessing(name):
    from robustexp.data.base import Augmentation
    from robustexp.data.corruptions.names import resolve_corruptions
    from tests.conftest import compose_config

    overrides = [f"+experiment={name}"]
    if not name.endswith("_small"):
        overrides += ["dataset.root=/data/x", "dataset.corrupted.root=/data/x-c"]
    cfg = compose_config(overrides, toy=False)
    names = resolve_corruptions(cfg.eval.evaluators.corruptions.corruptions)
    assert len(names) == 18 and set(names) == TABLE1_CORRUPTIONS and "gaussian_noise" not in names
    d = cfg.dataset
    augmentation = Augmentation.from_config(list(d.augment), d.crop_padding, d.color_jitter, d.rotation_degrees)
    # Sec. 4, Training Details: random crop, horizontal flip (not for digits: the small recipe says why),
    # color jitter 0.25, rotation 2 degrees
    expected = ("crop", "color_jitter", "rotate") if name.endswith("_small") else ("crop", "flip", "color_jitter",
                                                                                   "rotate")
    assert augmentation.ops == expected
    assert dict(augmentation.jitter)["brightness"] == 0.25 and augmentation.rotation_degrees == 2.0
    assert augmentation.crop_padding == 4


def test_the_small_recipe_builds_its_augmented_digits():
    from robustexp.config import instantiate_component
    from tests.conftest import compose_config

    data = instantiate_component(compose_config(["+experiment=tsiligkaridis_table1_small"], toy=False).dataset)
    assert data.train.augment == ("crop", "color_jitter", "rotate") and data.test.augment == ()
    torch.manual_seed(0)
    x, _ = data.train[0]
    assert x.shape == (1, 28, 28) and 0 <= x.min() and x.max() <= 1
    assert not torch.equal(x, data.train.images[0].float() / 255)
