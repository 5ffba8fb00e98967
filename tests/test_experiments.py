"""conf/experiment: every paper config composes (with each job of its sweep) and builds its
components; the small size of each runs end to end in the slow suite."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from robustexp.config import instantiate_component
from robustexp.main import CONFIG_DIR
from tests.conftest import compose_config

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
# what the full-size recipes need from the user (data paths, a checkpoint)
USER_PATHS = ["dataset.root=/data/x", "dataset.corrupted.root=/data/x-c"]


def _sweep_jobs(name: str) -> list[list[str]]:
    """The override lists of the jobs its ``hydra.sweeper.params`` expands to (one job if none)."""
    cfg = compose_config([f"+experiment={name}"], toy=False, return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) if cfg.hydra.sweeper.get("params") else {}
    choices = [[f"{key}={value.strip()}" for value in str(values).split(",")] for key, values in params.items()]
    return [list(job) for job in itertools.product(*choices)] or [[]]


def test_every_paper_table_has_a_small_and_a_full_experiment():
    small = {e.removesuffix("_small") for e in EXPERIMENTS if e.endswith("_small")}
    full = {e for e in EXPERIMENTS if not e.endswith("_small")}
    assert small == full and len(small) >= 10, (small, full)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds_every_job(name):
    for job in _sweep_jobs(name):
        overrides = [f"+experiment={name}", *job] + ([] if name.endswith("_small") else USER_PATHS)
        cfg = compose_config(overrides, toy=False, return_hydra_config=True)
        OmegaConf.resolve(cfg.hydra)  # run / sweep directories resolve (run id from the config)
        missing = [k for k in ("model", "dataset", "trainer", "eval") if k not in cfg]
        assert not missing
        if name.endswith("_small"):
            # the embedded size builds everything it will run (data aside: that is the slow test)
            if cfg.get("method"):
                instantiate_component(cfg.method, label="method")
            instantiate_component(cfg.trainer, label="trainer")
            for node in cfg.eval.evaluators.values():
                if node is not None:
                    instantiate_component(node)


def _cli(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "robustexp", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=3 * 3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _small_run_overrides(name: str) -> list[str]:
    return [f"+experiment={name}", "logger.mode=disabled", "runtime.progress=false"]


@pytest.mark.slow
# the sweeps among the small experiments run up to an hour on 2 CPU cores, longer on a shared machine
@pytest.mark.timeout(4 * 3600)
@pytest.mark.parametrize("name", [e for e in EXPERIMENTS if e.endswith("_small")])
def test_small_experiment_runs(name, tmp_path):
    jobs = _sweep_jobs(name)
    args = ["-m"] if len(jobs) > 1 else []
    cfg = compose_config([f"+experiment={name}"], toy=False)
    if cfg.model.get("require_checkpoint"):  # fine-tuning experiments: train the model to start from
        base = tmp_path / "base"
        _cli(["logger.mode=disabled", "runtime.progress=false", "eval=clean", f"output_root={base}"])
        (checkpoint,) = base.glob("runs/*/checkpoints/model_final.pt")
        args.append(f"model.checkpoint={checkpoint}")
    _cli([*args, *_small_run_overrides(name), f"output_root={tmp_path}"])
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == len(jobs)
    assert all(json.loads((r / "metrics.json").read_text())["status"] == "complete" for r in runs)
