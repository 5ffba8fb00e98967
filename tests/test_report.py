"""The report command: paper tables (markdown / CSV / LaTeX) from run directories."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from robustexp.report import ReportError, build_report, main


def _run(root: Path, name: str, method: str, seed: int, summary: dict, status: str = "complete",
         adaptation: dict | None = None, extra: dict | None = None) -> Path:
    run = root / "runs" / name
    run.mkdir(parents=True)
    config = {"seed": seed, "method": {"name": method} if method != "standard" else None,
              "model": {"name": "small_cnn"}, "dataset": {"name": "mnist5k"}, "tag": "",
              "runtime": {"threads": seed}}  # runtime differs between seeds: not part of the experiment
    if adaptation:
        config["adaptation"] = adaptation
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.json").write_text(json.dumps({"status": status, "seed": seed, "summary": summary,
                                                  **(extra or {})}))
    return run


def _per_corruption(values):
    return {"summary": {"per_corruption": {c: {"top1_mean": v} for c, v in values.items()}}}


def test_methods_table_averages_seeds_and_writes_md_csv_tex(tmp_path):
    _run(tmp_path, "std0", "standard", 0, {"clean_top1": 97.0, "mCA": 30.0})
    _run(tmp_path, "std1", "standard", 1, {"clean_top1": 98.0, "mCA": 34.0})
    _run(tmp_path, "gnt0", "gnt", 0, {"clean_top1": 96.0, "mCA": 60.0, "eps_star_gaussian": 12.25})
    _run(tmp_path, "broken", "ant", 0, {}, status="failed")
    result = build_report([tmp_path / "runs"], tmp_path / "out", ["methods"])
    assert result["runs"] == 3 and result["incomplete"] == 1
    rows = list(csv.reader(open(tmp_path / "out" / "methods.csv")))
    assert rows[0] == ["run", "seeds", "clean top-1", "mCA", "eps* Gaussian"]
    by_run = {r[0]: r for r in rows[1:]}
    # mean and sample sd of (97, 98) and (30, 34): 97.5 ± 0.7, 32.0 ± 2.8
    assert by_run["standard / small_cnn / mnist5k"][1:] == ["2", "97.5 ± 0.7", "32.0 ± 2.8", ""]
    assert by_run["gnt / small_cnn / mnist5k"][1:] == ["1", "96.0", "60.0", "12.25"]
    tex = (tmp_path / "out" / "methods.tex").read_text()
    assert r"\toprule" in tex and r"97.5 $\pm$ 0.7" in tex and r"small\_cnn" in tex
    assert "broken (failed)" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "methods.png").stat().st_size > 1000


def test_adaptation_and_per_corruption_tables(tmp_path):
    summary = {"mCA": 29.4, "mCA@partial": 66.6, "mCA@full": 70.6, "clean_top1": 97.6}
    _run(tmp_path, "bn", "standard", 0, summary, adaptation={"name": "bn-compare"},
         extra={"corruptions": _per_corruption({"fog": 10.0, "snow": 20.0}),
                "corruptions@full": _per_corruption({"fog": 80.0, "snow": 90.0})})
    build_report([tmp_path / "runs" / "bn"], tmp_path / "out", ["adaptation", "corruptions"])
    adaptation = list(csv.reader(open(tmp_path / "out" / "adaptation.csv")))
    assert adaptation == [["run", "seeds", "none", "partial", "full"],
                          ["standard / small_cnn / mnist5k / bn-compare", "1", "29.4", "66.6", "70.6"]]
    corruptions = list(csv.reader(open(tmp_path / "out" / "corruptions.csv")))
    assert corruptions[0][1:] == ["standard / small_cnn / mnist5k / bn-compare",
                                  "standard / small_cnn / mnist5k / bn-compare @full"]
    assert corruptions[1:] == [["fog", "10.0", "80.0"], ["snow", "20.0", "90.0"]]


def test_sweep_directories_are_followed_through_their_run_links(tmp_path):
    run = _run(tmp_path, "std0", "standard", 0, {"clean_top1": 97.0})
    job = tmp_path / "sweeps" / "2026-01-01_00-00-00" / "std0"
    job.mkdir(parents=True)
    (job / "run").symlink_to(run)
    result = build_report([job.parent], tmp_path / "out", ["methods"])
    assert result["runs"] == 1
    # the output root itself: its runs/ and the sweep's link to the same run count once
    assert build_report([tmp_path], tmp_path / "out2", ["methods"])["runs"] == 1


def test_errors_name_the_path_or_option(tmp_path, capsys):
    with pytest.raises(ReportError, match="no_such_dir does not exist"):
        build_report([tmp_path / "no_such_dir"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no metrics.json"):
        build_report([tmp_path / "empty"], tmp_path / "out")
    _run(tmp_path, "std0", "standard", 0, {"clean_top1": 97.0})
    with pytest.raises(ReportError, match="unknown table"):
        build_report([tmp_path / "runs"], tmp_path / "out", ["mce"])
    assert main([str(tmp_path / "no_such_dir")]) == 2
    assert "robustexp.report: error:" in capsys.readouterr().err


def test_gaussian_noise_adversarial_and_certified_tables(tmp_path):
    for seed, runs_by_variant in ((0, ([10.0, 12.0], [40.0, 44.0])), (1, ([14.0], [42.0]))):
        plain, adapted = runs_by_variant
        _run(tmp_path, f"n{seed}", "pgd_at", seed, {"clean_top1@momentum": 97.0, "clean_top1": 97.0},
             adaptation={"name": "momentum"}, extra={
                 "gaussian_noise": {"sigmas": {"0.5": {"top1_runs": plain}}},
                 "gaussian_noise@momentum": {"sigmas": {"0.5": {"top1_runs": adapted}}},
                 "pgd": {"attacks": {"linf": {"eps": 0.1, "clean_top1": 98.0, "robust_top1": 4.0 + seed}}},
                 "pgd@momentum": {"attacks": {"linf": {"eps": 0.1, "clean_top1": 99.0, "robust_top1": 6.0}}},
                 "certify@momentum": {"sigmas": {"0.25": {"certified_accuracy": {"0": 0.96, "0.5": 0.22}}},
                                      "envelope": {"certified_accuracy": {"0": 0.96, "0.5": 0.3}}}})
    result = build_report([tmp_path / "runs"], tmp_path / "out", ["gaussian_noise", "adversarial", "certified"])
    assert result["tables"] == ["gaussian_noise", "adversarial", "certified"]
    noise = {r[0]: r[1] for r in csv.reader(open(tmp_path / "out" / "gaussian_noise.csv"))}
    # pooled runs of both seeds: (10, 12, 14) -> 12.0 ± 2 x 2.0; (40, 44, 42) -> 42.0 ± 2 x 2.0
    assert noise["pgd_at / small_cnn / mnist5k / momentum"] == "12.0 ± 4.0"
    assert noise["pgd_at / small_cnn / mnist5k / momentum @momentum"] == "42.0 ± 4.0"
    adversarial = list(csv.reader(open(tmp_path / "out" / "adversarial.csv")))
    assert adversarial[0] == ["run", "clean", "linf eps=0.1"]
    assert adversarial[1][1:] == ["98.0 ± 0.0", "4.5 ± 0.7"] and adversarial[2][1:] == ["99.0 ± 0.0", "6.0 ± 0.0"]
    certified = list(csv.reader(open(tmp_path / "out" / "certified.csv")))
    assert certified[0] == ["run", "r=0", "r=0.5"]
    assert certified[1][1:] == ["96.0", "22.0"] and certified[2][0].endswith("envelope")
    assert (tmp_path / "out" / "certified.png").stat().st_size > 1000


def test_corruption_gap_table_is_nandy_table3_per_variant(tmp_path):
    """Nandy et al. Table 3: clean, corrupt (mCA), gap = clean - corrupt, mCE and relative mCE per
    variant; the gap is taken from the summary where the runner stored it, else computed."""
    for seed, (clean, mca, mce, rmce) in enumerate([(75.0, 39.0, 77.0, 103.0), (75.4, 39.0, 77.0, 103.6)]):
        _run(tmp_path, f"in{seed}", "standard", seed,
             {"clean_top1": clean, "mCA": mca, "clean_gap": clean - mca, "mCE": mce, "relative_mCE": rmce,
              "mean_uCE": 100 - mca,
              # adapted variant: no clean_gap@momentum in the summary (the runner stores only the plain one)
              "clean_top1@momentum": 74.4, "mCA@momentum": 49.0 + seed, "mCE@momentum": 64.3,
              "relative_mCE@momentum": 70.8, "mean_uCE@momentum": 51.0 - seed},
             adaptation={"name": "momentum"})
    _run(tmp_path, "digits", "pgd_at", 0, {"clean_top1": 98.0, "mCA": 30.0, "mean_uCE": 70.0,
                                           "clean_top1@momentum": 97.0, "mCA@momentum": 66.0,
                                           "mean_uCE@momentum": 34.0}, adaptation={"name": "momentum"})
    # every table of the command includes it; a run without corruption results is left out of it
    _run(tmp_path, "noise_only", "gnt", 0, {"clean_top1": 90.0})
    result = build_report([tmp_path / "runs"], tmp_path / "out", ["corruption_gap"])
    assert result["tables"] == ["corruption_gap"]
    rows = list(csv.reader(open(tmp_path / "out" / "corruption_gap.csv")))
    assert rows[0] == ["run", "seeds", "clean", "corrupt (mCA)", "gap", "mCE", "relative mCE"]
    by_run = {r[0]: r[1:] for r in rows[1:]}
    # seeds pooled: clean (75.0, 75.4) -> 75.2 ± 0.3; gaps (36.0, 36.4) -> 36.2 ± 0.3; rmCE (103, 103.6) -> 103.3
    assert by_run["standard / small_cnn / mnist5k / momentum"] == \
        ["2", "75.2 ± 0.3", "39.0 ± 0.0", "36.2 ± 0.3", "77.0 ± 0.0", "103.3 ± 0.4"]
    # adapted: gap computed from clean_top1@momentum - mCA@momentum = (25.4, 24.4) -> 24.9 ± 0.7
    assert by_run["standard / small_cnn / mnist5k / momentum @momentum"] == \
        ["2", "74.4 ± 0.0", "49.5 ± 0.7", "24.9 ± 0.7", "64.3 ± 0.0", "70.8 ± 0.0"]
    assert by_run["pgd_at / small_cnn / mnist5k / momentum @momentum"][:4] == ["1", "97.0", "66.0", "31.0"]
    assert not any(r.startswith("gnt") for r in by_run)
    # without a CE baseline (digits) the table shows the mean unnormalized CE instead of mCE
    _run(tmp_path / "d", "digits", "pgd_at", 0, {"clean_top1": 98.0, "mCA": 30.0, "mean_uCE": 70.0,
                                                 "clean_top1@momentum": 97.0, "mCA@momentum": 66.0,
                                                 "mean_uCE@momentum": 34.0}, adaptation={"name": "momentum"})
    assert main([str(tmp_path / "d" / "runs"), "--out", str(tmp_path / "out_d"), "--tables", "corruption_gap"]) == 0
    digits = list(csv.reader(open(tmp_path / "out_d" / "corruption_gap.csv")))
    assert digits == [["run", "seeds", "clean", "corrupt (mCA)", "gap", "mean uCE"],
                      ["pgd_at / small_cnn / mnist5k / momentum", "1", "98.0", "30.0", "68.0", "70.0"],
                      ["pgd_at / small_cnn / mnist5k / momentum @momentum", "1", "97.0", "66.0", "31.0", "34.0"]]


def test_adaptation_table_keeps_the_variants_that_are_not_points_of_the_grid(tmp_path):
    """Schneider Table 1 in one run: the grid of partial_N* variants stays in its own files, the full
    adaptation and the selected partial variant are columns of the adaptation table."""
    summary = {"mCA": 29.0, "mCA@full": 70.0, "mCA@partial_N1": 60.0, "mCA@partial_N16": 65.0,
               "mCA@partial_selected": 65.0}
    _run(tmp_path, "t1", "standard", 0, summary, adaptation={"name": "schneider-table1"},
         extra={"adaptation": {"full": "full", "partial_N1": "N1", "partial_N16": "N16"},
                "adaptation_sweep": {"grid_variants": ["partial_N1", "partial_N16"]}})
    build_report([tmp_path / "runs" / "t1"], tmp_path / "out", ["adaptation"])
    rows = list(csv.reader(open(tmp_path / "out" / "adaptation.csv")))
    assert rows[0] == ["run", "seeds", "none", "full", "partial_selected"]
    assert rows[1][2:] == ["29.0", "70.0", "65.0"]
