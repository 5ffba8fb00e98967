"""Calibration: RMS calibration error, ECE, reliability bins and diagrams, and their place in a run."""

from __future__ import annotations

import math

import pytest
import torch

from robustexp.evaluation.calibration import figure_name, grid_calibration, write_reliability_diagram
from robustexp.evaluation.metrics import (AccuracyMeter, ece_from_reliability, expected_calibration_error,
                                          pool_reliability, reliability_bins, rms_calibration_error)
from robustexp.main import run
from tests.conftest import compose_config


def test_rms_calibration_error_hand_case():
    # 200 examples: the 100 least confident (0.6) are 50 % right, the 100 most confident (0.9) 80 % right
    confidence = torch.tensor([0.6] * 100 + [0.9] * 100)
    correct = torch.tensor([1] * 50 + [0] * 50 + [1] * 80 + [0] * 20)
    expected = 100 * math.sqrt(0.5 * 0.1 ** 2 + 0.5 * 0.1 ** 2)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))     # input order does not matter
    assert rms_calibration_error(confidence[order], correct[order]) == pytest.approx(expected, rel=1e-9)
    # confidence 0.7 and 70 % right in every bin of 100 (ties keep their order): calibrated
    assert rms_calibration_error(torch.full((300,), 0.7), torch.tensor([1] * 7 + [0] * 3).repeat(30)) == \
        pytest.approx(0.0, abs=1e-4)


def test_reliability_bins_hand_case_and_ece():
    confidence = torch.tensor([0.05, 0.08, 0.55, 0.58, 0.95, 1.0])
    correct = torch.tensor([0, 0, 1, 0, 1, 1])
    bins = reliability_bins(confidence, correct, n_bins=10)
    assert bins["count"] == [2, 0, 0, 0, 0, 2, 0, 0, 0, 2]       # bins (lo, hi], the last one holds 1.0
    assert bins["confidence"][0] == pytest.approx(0.065) and bins["accuracy"][5] == pytest.approx(0.5)
    assert bins["accuracy"][1] is None                             # empty bins are None (plain JSON)
    expected = 100 * (2 / 6 * 0.065 + 2 / 6 * abs(0.5 - 0.565) + 2 / 6 * abs(1 - 0.975))
    assert ece_from_reliability(bins) == pytest.approx(expected)
    assert expected_calibration_error(confidence, correct, n_bins=10) == pytest.approx(expected)


def test_pooled_bins_equal_the_bins_of_the_union():
    g = torch.Generator().manual_seed(1)
    parts = [(torch.rand(n, generator=g), torch.rand(n, generator=g) < 0.7) for n in (50, 120, 7)]
    pooled = pool_reliability([reliability_bins(c, k) for c, k in parts])
    union = reliability_bins(torch.cat([c for c, _ in parts]), torch.cat([k for _, k in parts]))
    assert pooled["count"] == union["count"]
    for key in ("confidence", "accuracy"):
        assert all((a is None and b is None) or a == pytest.approx(b) for a, b in zip(pooled[key], union[key]))


def _meter_result(confidence, correct):
    meter = AccuracyMeter()
    p = torch.as_tensor(confidence)
    logits = torch.stack([torch.log(p), torch.log(1 - p)], dim=1)   # 2 classes: confidence p on class 0
    meter.update(logits, torch.where(torch.as_tensor(correct), 0, 1))
    return meter.result()


def test_accuracy_meter_reports_calibration_and_grid_summary():
    a = _meter_result([0.9] * 10, [True] * 9 + [False])           # calibrated: RMS 0
    b = _meter_result([0.8] * 10, [True] * 4 + [False] * 6)       # over-confident by 0.4
    assert a["rms_calibration_error"] == pytest.approx(0.0, abs=1e-4)
    assert b["rms_calibration_error"] == pytest.approx(40.0, rel=1e-5) and b["ece"] == pytest.approx(40.0, rel=1e-5)
    summary = grid_calibration({"fog": {"1": a, "2": b}})
    assert summary["rms_calibration_error_mean"] == pytest.approx(20.0, rel=1e-5)
    assert summary["ece_mean"] == pytest.approx(20.0, rel=1e-5)
    # pooled: 20 images, bins at 0.8 (acc 0.4) and 0.9 (acc 0.9): ECE = 0.5 * 40 + 0.5 * 0
    assert summary["ece_pooled"] == pytest.approx(20.0, rel=1e-5)
    assert sorted(c for c in summary["reliability_pooled"]["count"] if c) == [10, 10]


def test_reliability_diagram_png_and_names_that_never_collide(tmp_path):
    import matplotlib.image

    bins = reliability_bins(torch.rand(500), torch.rand(500) < 0.6)
    path = write_reliability_diagram(bins, tmp_path / "r.png", "test", rms_calibration_error=3.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(path).shape[0] > 200
    written = set()

    class Ctx:
        pass

    assert [figure_name("reliability_clean", Ctx(), written) for _ in range(3)] == \
        ["reliability_clean.png", "reliability_clean_2.png", "reliability_clean_3.png"]


def test_a_run_reports_clean_and_corrupted_calibration_per_evaluation_mode(tmp_path):
    """RSE has two evaluation modes (the noisy ensemble and the single network): both get RMS
    calibration error and ECE, clean and corrupted, and their own reliability diagrams."""
    cfg = compose_config(["+method=rse", "method.ensemble_size=2", "~eval.evaluators.eps_star", "trainer.epochs=1",
                          "dataset.n_train=200", "dataset.n_test=100"])
    metrics = run(cfg, tmp_path)
    summary = metrics["summary"]
    for suffix in ("", "@single"):
        for key in ("clean_rms_calibration_error", "clean_ece", "corrupted_rms_calibration_error", "corrupted_ece",
                    "corrupted_ece_pooled"):
            assert 0 <= summary[key + suffix] <= 100
    assert summary["clean_ece"] != summary["clean_ece@single"]
    names = {metrics["clean"]["reliability_png"], metrics["clean@single"]["reliability_png"],
             metrics["corruptions"]["calibration"]["reliability_png"],
             metrics["corruptions@single"]["calibration"]["reliability_png"]}
    assert len(names) == 4 and all((tmp_path / n).is_file() for n in names)
    assert sum(metrics["corruptions"]["calibration"]["reliability_pooled"]["count"]) == 4 * 100
