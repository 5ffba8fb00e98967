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
