"""Calibration: RMS calibration error, ECE, reliability bins and diagrams, and their place in a run."""

from __future__ import annotations

import math

import pytest
import torch

from robustexp.errors import ConfigError
from robustexp.evaluation.calibration import figure_name, grid_calibration, write_reliability_diagram
from robustexp.evaluation.metrics import (
    AccuracyMeter,
    ece_from_reliability,
    expected_calibration_error,
    pool_reliability,
    reliability_bins,
    rms_calibration_error,
    select_rms_binning,
)
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


def _hendrycks_calib_err(confidence, correct, beta=100):
    """Hendrycks et al.'s ``calib_err(confidence, correct, p='2', beta=100)`` (calibration_tools.py
    of outlier-exposure, the RMS calibration error of the AugMix line), transcribed as a reference."""
    import numpy as np

    idxs = np.argsort(confidence, kind="stable")
    confidence, correct = confidence[idxs], correct[idxs]
    bins = [[i * beta, (i + 1) * beta] for i in range(len(confidence) // beta)]
    bins[-1] = [bins[-1][0], len(confidence)]
    cerr, total_examples = 0.0, len(confidence)
    for i in range(len(bins) - 1):
        bin_confidence, bin_correct = confidence[bins[i][0]:bins[i][1]], correct[bins[i][0]:bins[i][1]]
        if len(bin_confidence) > 0:
            difference = np.abs(np.nanmean(bin_confidence) - np.nanmean(bin_correct))
            cerr += len(bin_confidence) / total_examples * np.square(difference)
    return float(np.sqrt(cerr))


def test_rms_binnings_hand_case_where_the_dropped_top_bin_matters():
    """250 examples, bins of 100: [0, 100) and [100, 250) (the remainder joins the last bin).
    Low bin: confidence 0.5, 40 % right (gap 0.1); top bin: confidence 0.9, 60 % right (gap 0.3)."""
    confidence = torch.tensor([0.5] * 100 + [0.9] * 150, dtype=torch.float64)
    correct = torch.tensor([1] * 40 + [0] * 60 + [1] * 90 + [0] * 60)
    order = torch.randperm(250, generator=torch.Generator().manual_seed(0))
    confidence, correct = confidence[order], correct[order]
    # paper (MAGN Sec. 4 / SPEC): every bin, weights |b| / n
    assert rms_calibration_error(confidence, correct) == \
        pytest.approx(100 * math.sqrt(100 / 250 * 0.1 ** 2 + 150 / 250 * 0.3 ** 2), rel=1e-9)   # 24.083 %
    # hendrycks: the top bin (150 examples) is left out, the weight of the other still 100 / 250
    assert rms_calibration_error(confidence, correct, binning="hendrycks") == \
        pytest.approx(100 * math.sqrt(100 / 250 * 0.1 ** 2), rel=1e-9)                           # 6.325 %
    # a model miscalibrated only on its most confident examples: 0 under hendrycks
    calibrated_low = torch.tensor([1] * 50 + [0] * 50 + [1] * 90 + [0] * 60)[order]
    assert rms_calibration_error(confidence, calibrated_low, binning="hendrycks") == pytest.approx(0.0, abs=1e-9)
    assert rms_calibration_error(confidence, calibrated_low) == \
        pytest.approx(100 * math.sqrt(150 / 250 * 0.3 ** 2), rel=1e-9)


@pytest.mark.parametrize("n", [200, 250, 999, 1000, 2345])
def test_hendrycks_binning_matches_their_calib_err(n):
    g = torch.Generator().manual_seed(n)
    confidence = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.1
    correct = torch.rand(n, generator=g, dtype=torch.float64) < confidence ** 2
    reference = 100 * _hendrycks_calib_err(confidence.numpy(), correct.numpy().astype(float))
    assert rms_calibration_error(confidence, correct, binning="hendrycks") == pytest.approx(reference, rel=1e-9)
    assert rms_calibration_error(confidence, correct) > rms_calibration_error(confidence, correct,
                                                                              binning="hendrycks")


def test_rms_binning_edge_cases_and_bad_names():
    confidence, correct = torch.full((150,), 0.9, dtype=torch.float64), torch.zeros(150)
    assert rms_calibration_error(confidence, correct) == pytest.approx(90.0)                   # one bin of 150
    assert rms_calibration_error(confidence, correct, binning="hendrycks") == 0.0              # its only bin dropped
    assert math.isnan(rms_calibration_error(confidence[:99], correct[:99], binning="hendrycks"))  # no full bin
    assert rms_calibration_error(confidence[:99], correct[:99]) == pytest.approx(90.0)
    with pytest.raises(ConfigError, match="rms_binning='augmix'"):
        rms_calibration_error(confidence, correct, binning="augmix")


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


def test_meter_keeps_both_binnings_and_the_evaluators_option_selects_one():
    confidence = [0.5] * 100 + [0.9] * 150
    correct = [True] * 40 + [False] * 60 + [True] * 90 + [False] * 60
    result = _meter_result(confidence, correct)
    paper, hendrycks = 100 * math.sqrt(0.4 * 0.01 + 0.6 * 0.09), 100 * math.sqrt(0.4 * 0.01)
    assert result["rms_binning"] == "paper" and result["rms_calibration_error"] == pytest.approx(paper, rel=1e-5)
    assert result["rms_calibration_error_paper"] == pytest.approx(paper, rel=1e-5)
    assert result["rms_calibration_error_hendrycks"] == pytest.approx(hendrycks, rel=1e-5)
    select_rms_binning(result, "hendrycks")
    assert result["rms_binning"] == "hendrycks" and result["rms_calibration_error"] == pytest.approx(hendrycks, 1e-5)
    summary = grid_calibration({"fog": {"1": result}})
    assert summary["rms_binning"] == "hendrycks" and summary["rms_calibration_error_mean"] == pytest.approx(hendrycks,
                                                                                                           rel=1e-5)
    assert summary["rms_calibration_error_mean_by_binning"]["paper"] == pytest.approx(paper, rel=1e-5)
    meter = AccuracyMeter("hendrycks")
    meter.update(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    assert meter.result()["rms_binning"] == "hendrycks"
    with pytest.raises(ConfigError, match="rms_binning"):
        AccuracyMeter("quantile")


def test_rms_binning_option_reaches_clean_and_corruption_results(tmp_path):
    """One switch, ``eval.evaluators.clean.rms_binning``, sets the binning of the clean and the
    corruption evaluator; the results name it and hold the value of that binning."""
    from robustexp.config import instantiate_component
    from robustexp.data.base import DataSplits, TensorImageDataset
    from robustexp.evaluation import CleanEvaluator, CorruptionEvaluator
    from robustexp.evaluation.base import EvalContext
    from robustexp.models.build import NormalizedClassifier
    from tests.conftest import trained_like_cnn

    cfg = compose_config(["eval.evaluators.clean.rms_binning=hendrycks",
                          "eval.evaluators.corruptions.corruptions=[fog]", "eval.evaluators.corruptions.severities=[1]",
                          "+eval.evaluators.clean.reliability_diagram=false",
                          "+eval.evaluators.corruptions.reliability_diagram=false"])
    assert cfg.eval.evaluators.corruptions.rms_binning == "hendrycks"
    assert compose_config([]).eval.evaluators.corruptions.rms_binning == "paper"
    clean_eval, corruption_eval = (instantiate_component(cfg.eval.evaluators[k]) for k in ("clean", "corruptions"))
    g = torch.Generator().manual_seed(0)
    split = TensorImageDataset(torch.randint(0, 256, (300, 1, 28, 28), generator=g, dtype=torch.uint8),
                               torch.randint(0, 10, (300,), generator=g))
    data = DataSplits("toy", split, split, 10, (1, 28, 28), (0.5,), (0.25,))
    model = NormalizedClassifier(trained_like_cnn(0), mean=[0.5], std=[0.25])
    ctx = EvalContext(run_dir=tmp_path, device=torch.device("cpu"), seed=0, progress=False)
    clean = clean_eval.evaluate(model, data, ctx)
    corrupted = corruption_eval.evaluate(model, data, ctx)
    for result in (clean, corrupted["grid"]["fog"]["1"]):
        assert result["rms_binning"] == "hendrycks" and result["n"] == 300
        assert result["rms_calibration_error"] == result["rms_calibration_error_hendrycks"]
        assert result["rms_calibration_error_hendrycks"] != result["rms_calibration_error_paper"]
    assert corrupted["calibration"]["rms_binning"] == "hendrycks"
    assert clean_eval.headline(clean)["clean_rms_calibration_error"] == clean["rms_calibration_error_hendrycks"]
    assert "hendrycks bins" in clean_eval.table(clean) and "hendrycks bins" in corruption_eval.table(corrupted)
    with pytest.raises(ConfigError, match="eval.evaluators.clean.rms_binning"):
        CleanEvaluator(rms_binning="top")
    with pytest.raises(ConfigError, match="eval.evaluators.corruptions.rms_binning"):
        CorruptionEvaluator(source=None, rms_binning="top")


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


def test_a_binning_not_in_use_that_is_undefined_for_a_small_subset_is_left_out():
    """Hendrycks' binning needs 100 examples: a 10-image subset evaluated with the paper's binning has
    no NaN in its result (results of small subsets stay comparable), and selecting the undefined
    binning gives NaN for the reported value."""
    result = _meter_result([0.8] * 10, [True] * 4 + [False] * 6)
    assert "rms_calibration_error_hendrycks" not in result
    assert all(v == v for v in result.values() if isinstance(v, float))
    assert result["rms_calibration_error"] == pytest.approx(40.0, rel=1e-5)
    select_rms_binning(result, "hendrycks")
    assert math.isnan(result["rms_calibration_error"]) and result["rms_binning"] == "hendrycks"
