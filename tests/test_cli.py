"""`python -m robustexp` as a user runs it: single run, multirun, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import TOY

REPO = Path(__file__).resolve().parent.parent


def _cli(args, tmp_path, check=True):
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run([sys.executable, "-m", "robustexp", *args, f"output_root={tmp_path}"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _toy(logger="offline"):
    return [a for a in TOY if not a.startswith("logger.")] + [f"logger.mode={logger}"]


def test_cli_run_with_offline_wandb_inside_the_run_directory(tmp_path):
    result = _cli(_toy(), tmp_path)
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1 and run_dirs[0].name.startswith("standard_small-cnn_mnist5k_s0_")
    run_dir = run_dirs[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["code_version"]
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb")), "W&B files must live in the run directory"
    assert not (REPO / "wandb").exists() or not any((REPO / "wandb").glob("offline-run-*"))
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "config.yaml").is_file()
    assert "| corruption (top-1 %)" in result.stdout and "mCA" in result.stdout


def test_cli_multirun_gives_each_job_its_own_wandb_run_grouped_by_sweep(tmp_path):
    _cli(["-m", "seed=0,1", *_toy()], tmp_path)
    sweeps = list((tmp_path / "sweeps").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [j.name.split("_")[3] for j in jobs] == ["s0", "s1"]
    for job in jobs:
        run_dir = (job / "run").resolve()  # the job's run lives in runs/<run id>, named from its config
        assert run_dir.parent == (tmp_path / "runs").resolve() and run_dir.name == job.name
        assert json.loads((run_dir / "metrics.json").read_text())["status"] == "complete"
        assert (job / ".hydra" / "overrides.yaml").is_file()
        wandb_logs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(wandb_logs) == 1
        assert sweeps[0].name.encode() in wandb_logs[0].read_bytes()  # the W&B group is the sweep's name

    # relaunching the sweep (and widening it) skips the finished jobs and runs only the new one
    again = _cli(["-m", "seed=0,1,2", *_toy()], tmp_path)
    assert again.stdout.count("already holds a complete run") == 2
    assert len(list((tmp_path / "runs").iterdir())) == 3


def test_cli_errors_name_the_option_and_what_was_expected(tmp_path):
    no_dataset_sizes = [a for a in _toy("disabled") if not a.startswith("dataset.")]
    missing = _cli([*no_dataset_sizes, "dataset=mnist", f"dataset.root={tmp_path}/no_such_dir"], tmp_path, check=False)
    assert missing.returncode != 0
    assert f"robustexp: error: dataset.root={tmp_path}/no_such_dir does not exist" in missing.stderr
    assert "MNIST/raw" in missing.stderr

    unknown = _cli([*_toy("disabled"), "model=torchvision", "model.arch=resnet5O"], tmp_path, check=False)
    assert unknown.returncode != 0
    assert "model.arch='resnet5O' is not a torchvision model; did you mean ['resnet50'" in unknown.stderr

    bad_group = _cli([*_toy("disabled"), "model=resnet99"], tmp_path, check=False)
    assert bad_group.returncode != 0 and "Could not find 'model/resnet99'" in bad_group.stderr

    nan = _cli([*_toy("disabled"), "trainer.optimizer.lr=1e30", "trainer.epochs=1"], tmp_path, check=False)
    assert nan.returncode != 0 and "robustexp: error: the training loss is" in nan.stderr
