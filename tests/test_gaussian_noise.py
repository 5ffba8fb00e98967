"""Accuracy under Gaussian noise (Nandy et al. 2021, Table 1): the noise, the repetitions'
mean +- 2 sd, adaptation per shuffled batch, and the Nandy sweeps reporting it (Tables 4-5)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from robustexp.adaptation import BatchNormAdaptation
from robustexp.errors import ConfigError
from robustexp.evaluation.base import EvalContext
from robustexp.evaluation.gaussian_noise import GaussianNoiseEvaluator, mean_two_sd, noisy_test_batches
from robustexp.main import run
from robustexp.utils import derive_seed
from tests.conftest import compose_config, trained_like_cnn
from tests.test_certify import _digits

CTX = dict(device=torch.device("cpu"), seed=0, progress=False)


def _fitted_cnn(data, steps=60):
    """A small CNN fitted to the toy digits (their label is coded in the brightness), BN in eval mode."""
    model = trained_like_cnn()
    model.train()
    images, labels = data.train.tensors
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model.eval()


def _all(batches):
    images, labels = zip(*batches)
    return torch.cat(images), torch.cat(labels)


def test_noise_has_std_sigma_and_does_not_depend_on_the_batch_size(tmp_path):
    data = _digits(300)
    ctx = EvalContext(run_dir=tmp_path, **CTX)
    a_images, a_labels = _all(noisy_test_batches(data.test, 0.5, 0, 0, 7, ctx))
    b_images, b_labels = _all(noisy_test_batches(data.test, 0.5, 0, 0, 128, ctx))
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    clean = torch.stack([data.test[i][0] for i in range(300)])
    # the same images in repetition 0's order, plus noise
    order = torch.randperm(300, generator=torch.Generator().manual_seed(derive_seed(0, "order", 0)))
    residual = a_images - clean[order]
    assert residual.std().item() == pytest.approx(0.5, rel=0.01) and abs(residual.mean().item()) < 0.005
    assert torch.equal(a_labels, data.test.tensors[1][order])
    other_run, _ = _all(noisy_test_batches(data.test, 0.5, 1, 0, 128, ctx))
    assert not torch.equal(other_run, a_images)  # a new shuffle and new noise per repetition
    clipped, _ = _all(noisy_test_batches(data.test, 0.5, 0, 0, 128, ctx, clip=True))
    assert clipped.min() >= 0 and clipped.max() <= 1 and a_images.min() < 0


def test_mean_and_two_sample_sd():
    mean, two_sd = mean_two_sd([70.0, 72.0, 74.0])
    assert mean == 72.0 and two_sd == pytest.approx(4.0)  # sd with ddof = 1 is 2
    assert mean_two_sd([5.0]) == (5.0, 0.0)


def test_unadapted_runs_differ_only_by_noise_and_adapted_runs_by_batches_too(tmp_path):
    data = _digits(120)
    model = _fitted_cnn(data)
    evaluator = GaussianNoiseEvaluator(sigmas=[0.0, 0.5], repetitions=3, batch_size=40)
    plain = evaluator.evaluate(model, data, EvalContext(run_dir=tmp_path, **CTX))
    assert plain["sigmas"]["0"]["top1_2sd"] == 0.0      # reshuffling alone does not change the unadapted model
    assert len(plain["sigmas"]["0.5"]["top1_runs"]) == 3
    with torch.no_grad():
        clean = (model(data.test.tensors[0]).argmax(1) == data.test.tensors[1]).float().mean().item() * 100
    assert plain["sigmas"]["0"]["top1_mean"] == pytest.approx(clean)

    adaptation = BatchNormAdaptation(mode="momentum", momentum=1.0, batch_size=20).attach(model)
    adapted = evaluator.evaluate(model, data, EvalContext(run_dir=tmp_path, adaptation=adaptation, **CTX))
    assert adapted["batch_size"] == 20
    assert adapted["sigmas"]["0"]["top1_2sd"] > 0       # batch statistics change with the shuffle
    assert evaluator.headline(adapted) == {"gaussian_top1_sigma0": adapted["sigmas"]["0"]["top1_mean"],
                                           "gaussian_top1_sigma0.5": adapted["sigmas"]["0.5"]["top1_mean"]}
    # statistics reset after every run: the model is back to its source statistics
    adaptation.detach()
    again = evaluator.evaluate(model, data, EvalContext(run_dir=tmp_path, **CTX))
    assert again["sigmas"] == plain["sigmas"]
    assert "+-" in evaluator.table(adapted)


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="sigmas"):
        GaussianNoiseEvaluator(sigmas=[-0.1])
    with pytest.raises(ConfigError, match="repetitions"):
        GaussianNoiseEvaluator(repetitions=0)


def test_nandy_rho_sweep_reports_accuracy_under_gaussian_noise(tmp_path):
    cfg = compose_config(["eval=gaussian_noise", "+adaptation=nandy_rho", "adaptation.n=50",
                          "adaptation.grid.axes.momentum=[0.0,1.0]", "logger.mode=disabled", "runtime.progress=false",
                          "dataset.n_train=300", "dataset.n_test=100", "trainer.epochs=1", "trainer.batch_size=50",
                          "eval.evaluators.gaussian_noise.sigmas=[0.5]",
                          "eval.evaluators.gaussian_noise.repetitions=2"],
                         toy=False)
    metrics = run(cfg, tmp_path)
    with open(metrics["adaptation_sweep"]["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in rows] == ["rho0.0", "rho1.0"] and "gaussian_top1_sigma0.5" in rows[0]
    assert float(rows[0]["gaussian_top1_sigma0.5"]) == pytest.approx(
        np.mean(metrics["gaussian_noise@rho0.0"]["sigmas"]["0.5"]["top1_runs"]))
    assert Path(metrics["adaptation_sweep"]["png"]).is_file()
