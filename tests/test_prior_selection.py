"""Choosing partial adaptation's prior strength N (Schneider et al. 2020): on the hold-out
corruptions (Sec. 4) or by Proposition 1 (Sec. 6); the Table 1 and Fig. 1 recipes."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from robustexp.adaptation.prior_selection import PriorSelectionReport
from robustexp.adaptation.shift_measures import best_prior_strength
from robustexp.adaptation.sweep import SweepReport, adaptation_variants
from robustexp.config import instantiate_component
from robustexp.errors import ConfigError
from robustexp.evaluation.prior_selection import (
    PAPER_N_GRID,
    HoldoutCorruptionEvaluator,
    Prop1PriorEvaluator,
    argmin_N,
    prop1_curves,
)
from tests.conftest import compose_config

USER_PATHS = ["dataset.root=/data/x", "dataset.corrupted.root=/data/x-c"]


# ---------------------------------------------------------------------- Proposition 1 over a network
def test_prop1_curves_hand_computed_layer_average_normalized_and_raw():
    # n = 2, N in {0, 1000}. Layer a: one channel, mean shifted by 3 source sds (prefers a small N);
    # layer b: one channel of scale 10, no shift (prefers a large N).
    source = {"a": ([0.0], [1.0]), "b": ([0.0], [100.0])}
    target = {"a": ([3.0], [1.0]), "b": ([0.0], [100.0])}
    w, inv = 1000 / 1002, 1 / 1002
    # L = (s_t - sqrt(w var_s + (n-1)/(N+n) var_t))^2 + w^2 (mu_t - mu_s)^2 + n/(N+n)^2 var_t
    L_a = {0: (1 - math.sqrt(0.5)) ** 2 + 0.5,                         # = 2 - sqrt(2)
           1000: (1 - math.sqrt(w + inv)) ** 2 + w ** 2 * 9 + 2 * inv ** 2}
    L_b = {0: (10 - math.sqrt(50)) ** 2 + 50,                          # = 200 - 20 sqrt(50)
           1000: (10 - math.sqrt(100 * w + 100 * inv)) ** 2 + 200 * inv ** 2}
    assert L_a[0] == pytest.approx(2 - math.sqrt(2)) and L_b[0] == pytest.approx(200 - 20 * math.sqrt(50))
    raw_L, raw_U = prop1_curves(source, [target], n=2, N_grid=[0, 1000], normalized=False)
    assert raw_L == pytest.approx([(L_a[0] + L_b[0]) / 2, (L_a[1000] + L_b[1000]) / 2])
    assert np.all(raw_U >= raw_L)
    # normalized: each channel's bounds divided by its source variance (1 and 100)
    norm_L, _ = prop1_curves(source, [target], n=2, N_grid=[0, 1000], normalized=True)
    assert norm_L == pytest.approx([(L_a[0] + L_b[0] / 100) / 2, (L_a[1000] + L_b[1000] / 100) / 2])
    # raw bounds are dominated by the large layer b (large N); normalized ones weigh a and b alike
    assert argmin_N([0, 1000], raw_L) == 1000 and argmin_N([0, 1000], norm_L) == 0


def test_prop1_curves_average_subsets_and_agree_with_best_prior_strength():
    rng = np.random.default_rng(0)
    source = {f"l{i}": (rng.normal(size=3), rng.uniform(0.5, 2, size=3)) for i in range(2)}
    subsets = [{k: (rng.normal(size=3), rng.uniform(0.5, 2, size=3)) for k in source} for _ in range(3)]
    grid = [1, 2, 4, 8, 16, 32]
    L, U = prop1_curves(source, subsets, n=8, N_grid=grid, normalized=False)
    parts = [prop1_curves(source, [s], n=8, N_grid=grid, normalized=False) for s in subsets]
    assert L == pytest.approx(np.mean([p[0] for p in parts], axis=0))
    assert U == pytest.approx(np.mean([p[1] for p in parts], axis=0))
    # one layer, one subset: the argmins are shift.best_prior_strength's
    one = {"l0": source["l0"]}
    L1, U1 = prop1_curves(one, [{"l0": subsets[0]["l0"]}], n=8, N_grid=grid, normalized=False)
    assert (argmin_N(grid, L1), argmin_N(grid, U1)) == best_prior_strength(8, *source["l0"], *subsets[0]["l0"],
                                                                          N_grid=grid)
    # normalization with a BN eps: the bounds of a channel divided by var_s + eps
    eps, mu_s, var_s = 0.25, source["l0"][0][:1], source["l0"][1][:1]
    channel_s, channel_t = {"l0": (mu_s, var_s)}, [{"l0": (mu_s + 1.0, np.array([3.0]))}]
    raw = prop1_curves(channel_s, channel_t, n=8, N_grid=grid, normalized=False)
    scaled = prop1_curves(channel_s, channel_t, n=8, N_grid=grid, normalized=True, eps=eps)
    assert scaled[0] == pytest.approx(raw[0] / (var_s[0] + eps))
    assert scaled[1] == pytest.approx(raw[1] / (var_s[0] + eps))


def test_prop1_evaluator_bad_options():
    from robustexp.data.corruptions.engine import TorchCorruptionEngine
    from robustexp.data.corruptions.sources import GeneratedCorruptions

    source = GeneratedCorruptions(TorchCorruptionEngine())
    with pytest.raises(ConfigError, match="N_grid"):
        Prop1PriorEvaluator(source, N_grid=[])
    with pytest.raises(ConfigError, match="n .*must be >= 1"):
        Prop1PriorEvaluator(source, n=0)
    with pytest.raises(ConfigError, match="alpha"):
        Prop1PriorEvaluator(source, alpha=1.5)


# ---------------------------------------------------------------------- the report step
def _summary(holdout, test_mce, key="holdout_mCE"):
    """A run summary with grid variants partial_N<N>: hold-out scores and test numbers."""
    summary = {"mCE": 76.7, "mCA": 39.2, "mean_uCE": 60.8, "mCE@full": 62.2, "mCA@full": 50.7,
               "mean_uCE@full": 49.3}
    for N, h in holdout.items():
        summary[f"{key}@partial_N{N}"] = h
        summary[f"mCE@partial_N{N}"] = test_mce[N]
        summary[f"mCA@partial_N{N}"] = 100 - test_mce[N] / 2
        summary[f"mean_uCE@partial_N{N}"] = test_mce[N] / 2
        summary[f"clean_top1@partial_N{N}"] = 70.0 + N
    points = {f"partial_N{N}": {"prior_strength": N} for N in holdout}
    return summary, points


def test_report_selects_the_lowest_hold_out_mce_not_the_best_test_mce(tmp_path):
    # the test mCE is lowest at N = 1, the hold-out mCE at N = 16: the paper selects on the hold-out
    holdout = {1: 70.0, 16: 64.0, 1024: 75.0}
    test_mce = {1: 60.0, 16: 65.0, 1024: 76.0}
    summary, points = _summary(holdout, test_mce)
    out = PriorSelectionReport()(summary, points, tmp_path)
    assert out["selected"]["variant"] == "partial_N16" and out["score"] == "holdout_mCE"
    assert summary["mCE@partial_selected"] == 65.0 and summary["prior_N@partial_selected"] == 16
    assert summary["mCA@partial_selected"] == summary["mCA@partial_N16"]
    assert summary["clean_top1@partial_selected"] == 86.0
    assert out["table1"] == {"none": {"mCE": 76.7, "mCA": 39.2, "mean_uCE": 60.8},
                             "full": {"mCE": 62.2, "mCA": 50.7, "mean_uCE": 49.3},
                             "partial_selected": {"mCE": 65.0, "mCA": 67.5, "mean_uCE": 32.5}}
    rows = list(csv.DictReader(open(tmp_path / "prior_selection.csv")))
    assert [r["variant"] for r in rows] == ["partial_N1", "partial_N16", "partial_N1024"]
    assert [r["selected"] for r in rows] == ["False", "True", "False"]
    assert (tmp_path / "prior_selection.png").stat().st_size > 1000
    assert "partial_selected (N=16)" in (tmp_path / "prior_selection.md").read_text() == out["table"]
    assert out["grid_variants"] == list(points)


def test_report_without_alexnet_constants_uses_the_unnormalized_hold_out_ce_and_ties_go_to_small_N(tmp_path):
    summary, points = _summary({1: 30.0, 4: 20.0, 64: 20.0}, {1: 50.0, 4: 40.0, 64: 45.0}, key="holdout_mean_uCE")
    out = PriorSelectionReport()(summary, points, tmp_path)
    assert out["score"] == "holdout_mean_uCE" and out["selected"]["variant"] == "partial_N4"
    # the hold-out mCE wins over the unnormalized CE when the run has it
    summary, points = _summary({1: 30.0, 4: 20.0}, {1: 50.0, 4: 40.0}, key="holdout_mean_uCE")
    summary.update({"holdout_mCE@partial_N1": 10.0, "holdout_mCE@partial_N4": 90.0})
    assert PriorSelectionReport()(summary, points, tmp_path)["selected"]["variant"] == "partial_N1"


def test_report_proposition_1_rules_and_errors(tmp_path):
    summary, points = _summary({1: 70.0, 16: 64.0, 1024: 75.0}, {1: 60.0, 16: 65.0, 1024: 76.0})
    with pytest.raises(ConfigError, match="prop1_N_L.*eval.evaluators.prop1"):
        PriorSelectionReport(select="prop1_L")(dict(summary), points, tmp_path)
    summary.update(prop1_N_L=1.0, prop1_N_U=1024.0)
    assert PriorSelectionReport(select="prop1_L")(dict(summary), points, tmp_path)["selected"]["variant"] == \
        "partial_N1"
    out = PriorSelectionReport(select="prop1_U")(summary, points, tmp_path)
    assert out["selected"]["variant"] == "partial_N1024" and summary["mCE@partial_selected"] == 76.0
    assert out["prop1_N_L"] == 1.0
    summary["prop1_N_L"] = 3.0
    with pytest.raises(ConfigError, match="N=3, which is not a partial-adaptation variant"):
        PriorSelectionReport(select="prop1_L")(summary, points, tmp_path)
    with pytest.raises(ConfigError, match="adaptation.report.select='best'"):
        PriorSelectionReport(select="best")
    with pytest.raises(ConfigError, match="eval.evaluators.holdout"):
        PriorSelectionReport()({"mCE@partial_N1": 1.0}, {"partial_N1": {"prior_strength": 1}}, tmp_path)


def test_holdout_evaluator_prefixes_its_summary_keys():
    results = {"summary": {"mCA": 40.0, "mean_uCE": 60.0, "mCA_without_noise": 41.0, "per_corruption": {
        "spatter": {"top1_mean": 40.0, "uCE": 60.0}}, "holdout": {"corruptions": 1, "mCE": 83.6}}}
    headline = HoldoutCorruptionEvaluator.headline(None, results)
    assert headline == {"holdout_mCA": 40.0, "holdout_mean_uCE": 60.0, "holdout_mCE": 83.6}
    assert ("hold-out mCA", 40.0) in HoldoutCorruptionEvaluator.compare_rows(None, results)


# ---------------------------------------------------------------------- the recipes
@pytest.mark.parametrize("name,extra", [("schneider_table1_small", []), ("schneider_table1", USER_PATHS)])
def test_table1_recipes_select_N_on_the_hold_out_corruptions(name, extra):
    cfg = compose_config([f"+experiment={name}", *extra], toy=False)
    variants, points = adaptation_variants(cfg.adaptation)
    assert list(variants) == ["none", "full", *(f"partial_N{N}" for N in PAPER_N_GRID)]
    assert sorted(p["prior_strength"] for p in points.values()) == [2 ** k for k in range(11)]  # Sec. 4
    assert all(variants[f"partial_N{N}"].batch_size == 8 and variants[f"partial_N{N}"].prior_strength == N
               for N in PAPER_N_GRID)
    report = instantiate_component(cfg.adaptation.report)
    assert isinstance(report, PriorSelectionReport) and report.select == "holdout_mce"
    evaluators = OmegaConf.to_container(cfg.eval.evaluators, resolve=True)
    assert evaluators["corruptions"]["corruptions"] == "common" and evaluators["holdout"]["corruptions"] == "holdout"
    assert evaluators["prop1"]["n"] == 8 and evaluators["prop1"]["N_grid"] == list(PAPER_N_GRID)
    # ImageNet-C: the hold-out score is AlexNet-normalized; the digits have no AlexNet constants
    assert evaluators["holdout"]["ce_baseline"] == ("alexnet" if name == "schneider_table1" else None)


def test_fig1_recipe_plots_mce_on_imagenet_c_and_mean_uce_on_digits(tmp_path):
    full = compose_config(["+experiment=schneider_fig1", *USER_PATHS], toy=False)
    small = compose_config(["+experiment=schneider_fig1_small"], toy=False)
    assert OmegaConf.select(full, "eval.evaluators.corruptions.ce_baseline") == "alexnet"
    report = instantiate_component(full.adaptation.report)
    assert report.metric == "mCE" and instantiate_component(small.adaptation.report).metric == "mean_uCE"
    summary = {"mCE": 76.7, "mean_uCE": 60.8, "mCE@N0_n8": 70.0, "mean_uCE@N0_n8": 55.0}
    out = report(summary, {"N0_n8": {"prior_strength": 0, "batch_size": 8}}, tmp_path)
    assert out["best"]["mCE"] == 70.0 and "mean_uCE" not in out["best"] and out["grid_variants"] == ["N0_n8"]
    assert isinstance(report, SweepReport)


def _tiny_table1(select="holdout_mce"):
    return compose_config(["+experiment=schneider_table1_small", "logger.mode=disabled", "runtime.progress=false",
                           "dataset.n_train=200", "dataset.n_test=48", "trainer.epochs=1", "trainer.batch_size=25",
                           "eval.evaluators.corruptions.corruptions=[gaussian_noise,contrast]",
                           "eval.evaluators.corruptions.severities=[3]",
                           "eval.evaluators.holdout.corruptions=[speckle_noise,saturate]",
                           "eval.evaluators.prop1.corruptions=[speckle_noise,saturate]",
                           "adaptation.grid.axes.prior_strength=[1,1024]", f"adaptation.select={select}"],
                          toy=False)


@pytest.mark.slow  # about 30 s of CPU: 4 variants x (clean, 2 test and 2 hold-out subsets) and training
def test_table1_run_selects_N_and_reports_the_test_numbers_at_it(tmp_path):
    from robustexp.main import run

    metrics = run(_tiny_table1(), tmp_path)
    summary, sweep = metrics["summary"], metrics["adaptation_sweep"]
    scores = {v: summary[f"holdout_mean_uCE@{v}"] for v in ("partial_N1", "partial_N1024")}
    chosen = min(scores, key=lambda v: (scores[v], v != "partial_N1"))
    assert sweep["selected"]["variant"] == chosen and sweep["score"] == "holdout_mean_uCE"
    for key in ("mCA", "mean_uCE", "holdout_mean_uCE", "clean_top1"):
        assert summary[f"{key}@partial_selected"] == summary[f"{key}@{chosen}"]
    # the test numbers are those of the 2 test corruptions only; the hold-out ones are apart
    assert set(metrics[f"corruptions@{chosen}"]["grid"]) == {"gaussian_noise", "contrast"}
    assert set(metrics[f"holdout@{chosen}"]["grid"]) == {"speckle_noise", "saturate"}
    assert summary["mCA"] == metrics["corruptions"]["summary"]["mCA"]
    # Proposition 1 measured once, on the unadapted model, over the grid's N
    assert metrics["prop1"]["N_grid"] == [1.0, 1024.0] and metrics["prop1"]["subsets"] == 2
    assert summary["prop1_N_L"] in (1.0, 1024.0) and "prop1@full" not in metrics
    assert "partial_selected (N=" in (tmp_path / "prior_selection.md").read_text()
