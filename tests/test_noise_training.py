"""Gaussian and Speckle noise training (Rusak et al. 2020, eq. 1): what the model is trained on."""

from __future__ import annotations

import pytest
import torch

from robustexp.errors import ConfigError
from robustexp.main import run
from robustexp.methods.noise_training import NoiseTraining
from tests.conftest import compose_config


def test_half_of_every_batch_stays_clean_and_the_rest_is_perturbed():
    torch.manual_seed(0)
    images = torch.full((10, 1, 8, 8), 0.5)
    batch = NoiseTraining(sigmas=[0.1]).noisy_batch(images)
    unchanged = [torch.equal(batch[i], images[i]) for i in range(10)]
    assert unchanged == [True] * 5 + [False] * 5
    assert 0 <= batch.min() and batch.max() <= 1
    odd = NoiseTraining(sigmas=[0.1], clean_fraction=0.3).noisy_batch(torch.full((7, 1, 4, 4), 0.5))
    assert sum(torch.equal(odd[i], torch.full((1, 4, 4), 0.5)) for i in range(7)) == 2  # round(0.3 * 7)


def test_gaussian_noise_has_the_configured_sigma_per_image():
    torch.manual_seed(1)
    sigmas = [0.08, 0.12, 0.18, 0.26, 0.38]
    images = torch.full((400, 3, 32, 32), 0.5)
    batch = NoiseTraining(sigmas=sigmas, clean_fraction=0.0).noisy_batch(images)
    per_image_std = (batch - images).flatten(1).std(1)
    # the std of clip(0.5 + sigma n) - 0.5 for each sigma (clipping shrinks the large ones)
    g = torch.Generator().manual_seed(9)
    expected = torch.tensor([float((0.5 + s * torch.randn(10**6, generator=g)).clamp(0, 1).std()) for s in sigmas])
    assert expected[0] == pytest.approx(0.08, rel=0.01) and expected[-1] < 0.38
    which = (per_image_std.view(-1, 1) - expected).abs().argmin(1)
    assert torch.allclose(per_image_std, expected[which], rtol=0.04)
    assert torch.bincount(which, minlength=5).min() > 50  # sigma uniform over the set (80 expected each)


def test_clipping_to_the_input_range():
    torch.manual_seed(2)
    images = torch.rand(64, 3, 16, 16)
    batch = NoiseTraining(sigmas=[0.5], clean_fraction=0.0).noisy_batch(images)
    assert batch.min() == 0 and batch.max() == 1  # large noise saturates, and is clipped


def test_speckle_noise_is_multiplicative():
    torch.manual_seed(3)
    images = torch.zeros(8, 3, 16, 16)
    images[:, :, 8:] = 0.4
    batch = NoiseTraining(sigmas=[0.35], noise="speckle", clean_fraction=0.0).noisy_batch(images)
    assert torch.equal(batch[:, :, :8], images[:, :, :8])  # x = 0 stays 0: noise scales with x
    residual = (batch[:, :, 8:] - 0.4) / 0.4
    assert abs(float(residual.std()) - 0.35) < 0.02


def test_bad_options():
    with pytest.raises(ConfigError, match="method.noise='uniform'"):
        NoiseTraining(noise="uniform")
    with pytest.raises(ConfigError, match="method.clean_fraction"):
        NoiseTraining(clean_fraction=1.5)
    with pytest.raises(ConfigError, match="non-negative"):
        NoiseTraining(sigmas=[-0.1])


@pytest.mark.parametrize("method", ["gnt", "gnt_mult", "speckle"])
def test_noise_training_runs_from_config(tmp_path, method):
    metrics = run(compose_config([f"+method={method}", "trainer.epochs=1"]), tmp_path)
    assert metrics["status"] == "complete" and metrics["train"]["history"][0]["loss"] > 0
    assert metrics["run_id"].startswith(method.replace("_", "-"))
