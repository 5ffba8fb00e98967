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
