"""A real SLURM cluster driven the way a user drives it: ``python -m robustexp -m ... hydra/launcher=slurm``.

The tests need a controller that answers (``sudo scripts/slurm.sh start`` starts a one-node cluster on
this machine; docs/scale_out.md) and skip otherwise. One sweep of three jobs, shared by most tests, covers
what a user meets on a cluster: the jobs run as one array, each in its ``runs/<run id>``, each W&B run in
the sweep's group; one job is requeued mid-training (``scontrol requeue``, as a preemption) and comes back
to the same result as an uninterrupted run; one job diverges and fails without stopping the others; the
same command launched again skips the finished jobs and reruns only the failed one. A 2-task job trains
data-parallel; a job longer than its time limit checkpoints on submitit's USR2, is requeued and completes
(slow: it waits for SLURM's clock).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from robustexp.run_id import run_id
from tests import wandb_records
from tests.conftest import TOY, compose_config

NO_CLUSTER = ("no SLURM cluster answers here: `sudo scripts/slurm.sh start` installs Debian's SLURM and starts a "
              "one-node cluster (see docs/scale_out.md)")


def _cluster_answers() -> bool:
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    try:
        ping = subprocess.run(["scontrol", "ping"], check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "UP" in ping.stdout


if not _cluster_answers():
    pytest.skip(NO_CLUSTER, allow_module_level=True)

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
PARTITION = os.environ.get("ROBUSTEXP_TEST_PARTITION", "debug")
# the user's command on this one-node cluster: CPU jobs of one core (the partition has 2)
LAUNCHER = ["hydra/launcher=slurm", f"hydra.launcher.partition={PARTITION}", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"]
# a few seconds of training (3 epochs of 40 steps), the clean evaluation, W&B offline
RUN = [o for o in TOY if not o.startswith(("logger.", "trainer.epochs", "dataset.n_train", "eval."))] + [
    "logger.mode=offline", "trainer.epochs=3", "dataset.n_train=1000", "eval=clean", "runtime.threads=1"]
# the shared sweep: job 0 is requeued mid-training, job 1 diverges (NaN loss: fails), job 2 just runs
LRS = {"requeued": "0.1", "failing": "1e12", "plain": "0.05"}
SWEEP = ["trainer.optimizer.lr=" + ",".join(LRS.values())]
SWEEP_TIMEOUT_S = 360


def _env() -> dict[str, str]:
    # sbatch exports this environment to the jobs (--export=ALL)
    return {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}


def _command(overrides, root: Path, multirun: bool = True) -> list[str]:
    return [sys.executable, "-m", "robustexp", *(["-m"] if multirun else []), *overrides, f"output_root={root}"]


def _run_id(overrides) -> str:
    return run_id(compose_config(overrides, toy=False))


def _array_ids(root: Path) -> set[str]:
    """The SLURM job ids of every sweep under ``root``, from submitit's folders: ``<array job id>_<task>`` for
    a sweep of several jobs, ``<job id>`` for a sweep of one."""
    return {p.name.split("_")[0] for p in root.glob("sweeps/*/.submitit/*") if p.is_dir()}


def _cancel(root: Path) -> None:
    ids = sorted(_array_ids(root))
    if ids:
        subprocess.run(["scancel", *ids], check=False, capture_output=True, timeout=60)


def _wait(predicate, timeout_s: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    """Poll ``predicate`` until it returns something true; fail if ``process`` ends first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log is not None and log.is_file() else ""
    raise AssertionError(f"{what}: not seen within {timeout_s:.0f} s"
                         + (f" (the sweep ended with status {process.returncode})" if process is not None
                            and process.poll() is not None else "") + f"\n{tail}")


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def _finish(process: subprocess.Popen, out: Path, err: Path, timeout_s: float, root: Path) -> Finished:
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        process.kill()
        process.wait()
        _cancel(root)
        raise AssertionError(f"the sweep did not end within {timeout_s} s; squeue:\n"
                             + subprocess.run(["squeue"], check=False, capture_output=True, text=True).stdout
                             + out.read_text()[-3000:] + err.read_text()[-3000:]) from exc
    return Finished(process.returncode, out.read_text(), err.read_text())


def _launch(overrides, root: Path, name: str) -> tuple[subprocess.Popen, Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    out, err = root / f"{name}.stdout", root / f"{name}.stderr"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(_command(overrides, root), cwd=REPO, env=_env(), stdout=stdout, stderr=stderr)
    return process, out, err


def _only(paths):
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


def _wandb_runs(run_dir: Path) -> list[dict]:
    """Group, name and exit code (None: never closed) of the W&B run of each attempt of a run directory, in
    order. A file SIGTERM cut short may hold no record at all (wandb-core had not written it yet): group None."""
    runs = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):  # named offline-run-<date>_<time>-<id>
        records = wandb_records.records(path)
        run = next(iter(wandb_records.of_type(records, "run")), None)
        runs.append({"file": path.name, "group": run.run_group if run else None,
                     "name": run.display_name if run else None, "exit_code": wandb_records.exit_code(records)})
    return runs


@dataclass
class Snapshot:
    """What a sweep left behind, read as soon as it ended (a later relaunch changes some of it)."""
    root: Path
    finished: Finished
    sweep_dir: Path
    metrics: dict[str, dict]     # run id -> metrics.json
    main_log: dict[str, str]     # run id -> <run dir>/main.log
    wandb: dict[str, list]       # run id -> W&B runs
    metrics_bytes: dict[str, bytes]
    requeued_job: str = ""       # <array job id>_<task> of the requeued job
    reference: dict | None = None  # metrics of the uninterrupted local run of the requeued job's config


def _snapshot(root: Path, finished: Finished, sweep_dir: Path) -> Snapshot:
    runs = sorted(p for p in (root / "runs").iterdir() if p.is_dir())
    return Snapshot(root, finished, sweep_dir,
                    metrics={p.name: json.loads((p / "metrics.json").read_text()) for p in runs},
                    main_log={p.name: (p / "main.log").read_text() for p in runs},
                    wandb={p.name: _wandb_runs(p) for p in runs},
                    metrics_bytes={p.name: (p / "metrics.json").read_bytes() for p in runs})


def _slurm_job_id(sweep_dir: Path, rid: str) -> str | None:
    """``<array job id>_<task>`` of a sweep's job (Hydra's ``hydra.job.id``, set from submitit's environment)."""
    hydra_file = sweep_dir / rid / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return None
    try:
        return str(OmegaConf.load(hydra_file).hydra.job.id)
    except Exception:  # being written
        return None


IDS = {name: _run_id([*RUN, f"trainer.optimizer.lr={lr}"]) for name, lr in LRS.items()}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The shared sweep, with its requeue: job 0 is requeued as soon as its main.log shows that epoch 1 is
    done; meanwhile the reference (the same config, run locally, uninterrupted) runs in another root."""
    root = tmp_path_factory.mktemp("slurm_sweep")
    reference_root = tmp_path_factory.mktemp("slurm_reference")
    process, out, err = _launch([*SWEEP, *RUN, *LAUNCHER], root, "sweep")
    try:
        main_log = root / "runs" / IDS["requeued"] / "main.log"
        _wait(lambda: main_log.is_file() and "epoch 1/" in main_log.read_text(), 240,
              "epoch 1 of the job to requeue in its main.log", process, err)
        sweep_dir = _only((root / "sweeps").iterdir())
        job = _wait(lambda: _slurm_job_id(sweep_dir, IDS["requeued"]), 30, "its SLURM job id")
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
        # the cluster needs a few seconds before the requeued job starts again: the reference runs meanwhile
        reference = subprocess.run(_command([*RUN, f"trainer.optimizer.lr={LRS['requeued']}"], reference_root,
                                            multirun=False), check=False, cwd=REPO, env=_env(), capture_output=True,
                                   text=True, timeout=300)
        assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
        finished = _finish(process, out, err, SWEEP_TIMEOUT_S, root)
        snapshot = _snapshot(root, finished, sweep_dir)
        snapshot.requeued_job = job
        snapshot.reference = json.loads((reference_root / "runs" / IDS["requeued"] / "metrics.json").read_text())
        yield snapshot
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        _cancel(root)


@pytest.fixture(scope="module")
def relaunch(sweep):
    """The same sweep command again, after the first one ended."""
    process, out, err = _launch([*SWEEP, *RUN, *LAUNCHER], sweep.root, "relaunch")
    try:
        finished = _finish(process, out, err, SWEEP_TIMEOUT_S, sweep.root)
        sweep_dir = _only(d for d in (sweep.root / "sweeps").iterdir() if d != sweep.sweep_dir)
        yield _snapshot(sweep.root, finished, sweep_dir)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        _cancel(sweep.root)


def test_sweep_runs_as_one_slurm_array_each_job_in_its_run_directory(sweep):
    tasks = sorted(p.name for p in sweep.sweep_dir.glob(".submitit/*_*") if p.is_dir())
    assert len(tasks) == 3 and len({t.split("_")[0] for t in tasks}) == 1, tasks  # one array, three tasks
    assert sorted(t.split("_")[1] for t in tasks) == ["0", "1", "2"]
    assert set(sweep.metrics) == set(IDS.values())  # each job in runs/<its run id>, nothing else
    for name, rid in IDS.items():
        job_dir = sweep.sweep_dir / rid
        assert (job_dir / "run").resolve() == (sweep.root / "runs" / rid).resolve()
        assert _slurm_job_id(sweep.sweep_dir, rid) in tasks
        metrics = sweep.metrics[rid]
        assert metrics["run_id"] == rid
        if name != "failing":
            assert metrics["status"] == "complete" and metrics["clean"]["n"] == 100
            assert [e["epoch"] for e in metrics["train"]["history"]] == [1, 2, 3]


def test_sweep_summary_lists_every_job_and_fails_for_the_failed_one(sweep):
    finished = sweep.finished
    assert finished.returncode == 1, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "2/3 jobs complete" in finished.stdout
    rows = {line.split("|")[1].strip(): line for line in finished.stdout.splitlines() if line.startswith("| ")}
    for name, rid in IDS.items():
        assert rid in rows, finished.stdout
        assert ("failed" if name == "failing" else "complete") in rows[rid]
    summary = json.loads((sweep.sweep_dir / "sweep_summary.json").read_text())
    assert {j["job"]: j["status"] for j in summary} == {
        rid: "failed" if name == "failing" else "complete" for name, rid in IDS.items()}


def test_each_wandb_run_is_in_the_sweeps_group(sweep):
    for name, rid in IDS.items():
        runs = sweep.wandb[rid]
        assert len(runs) == (2 if name == "requeued" else 1), runs  # one W&B run per attempt
        last = runs[-1]  # closed, with the job's exit code, in the sweep's group, named after the run
        assert last["group"] == sweep.sweep_dir.name and last["name"] == rid, runs
        assert last["exit_code"] == (1 if name == "failing" else 0), runs
    # the requeued job's first attempt: its W&B file, if wandb-core wrote it before the SIGTERM ended it
    first = sweep.wandb[IDS["requeued"]][0]
    assert first["group"] in (None, sweep.sweep_dir.name) and first["exit_code"] is None, first


def _training(metrics: dict) -> list[dict]:
    """The training history without the timings (which differ between any two runs)."""
    return [{k: v for k, v in epoch.items() if k not in ("images_per_s", "seconds")}
            for epoch in metrics["train"]["history"]]


def test_a_requeued_job_resumes_and_ends_as_an_uninterrupted_run(sweep):
    rid = IDS["requeued"]
    log = sweep.main_log[rid]
    # the story in main.log: epoch 1, the signal and the checkpoint, the second attempt resuming. The requeue
    # is sent once epoch 1 is logged: mostly mid-epoch 2, sometimes still at the epoch boundary
    assert re.search(r"signal received: checkpoint written (at epoch 2, step \d+|after epoch 1)", log), log
    assert "preempted: SystemExit: robustexp: stopped by SIGTERM" in log, log
    assert log.count(f"run {rid} in") == 2, log  # two attempts
    assert re.search(r"resuming from \S+last.pt \(epoch 1/3 done(, \d+ steps into epoch 2)?\)", log), log
    # the job's own streams (submitit's folder): both attempts, SLURM's requeue and our checkpoint message
    task = sweep.sweep_dir / ".submitit" / sweep.requeued_job
    stdout = _only(task.glob("*_0_log.out")).read_text()
    stderr = _only(task.glob("*_0_log.err")).read_text()
    assert stdout.count("Starting with JobEnvironment") == 2 and "Job completed successfully" in stdout, stdout
    assert "DUE TO JOB REQUEUE" in stderr and "stopped by SIGTERM after writing" in stderr, stderr
    # the same results as the uninterrupted run of the same config
    metrics = sweep.metrics[rid]
    assert metrics["status"] == sweep.reference["status"] == "complete"
    assert _training(metrics) == _training(sweep.reference)
    assert metrics["clean"] == sweep.reference["clean"]


def test_a_failing_job_is_reported_and_does_not_stop_the_others(sweep):
    failed = sweep.metrics[IDS["failing"]]
    assert failed["status"] == "failed" and "NonFiniteLossError" in failed["error"]
    assert "failed" in sweep.main_log[IDS["failing"]]
    assert f"{IDS['failing']}: failed: NonFiniteLossError" in (sweep.sweep_dir / "sweep_summary.md").read_text()
    assert sweep.metrics[IDS["plain"]]["status"] == "complete"


def test_relaunching_the_sweep_skips_finished_jobs_and_reruns_the_failed_one(sweep, relaunch):
    assert relaunch.finished.returncode == 1 and "2/3 jobs complete" in relaunch.finished.stdout
    for name in ("requeued", "plain"):  # untouched, and said so
        rid = IDS[name]
        assert relaunch.metrics_bytes[rid] == sweep.metrics_bytes[rid]
        new_lines = relaunch.main_log[rid][len(sweep.main_log[rid]):]
        assert "already holds a complete run of this config" in new_lines, new_lines
        assert f"run {rid} in" not in new_lines
        assert len(relaunch.wandb[rid]) == len(sweep.wandb[rid])  # no new W&B run
    rid = IDS["failing"]  # run again (and failed again, the same way)
    new_lines = relaunch.main_log[rid][len(sweep.main_log[rid]):]
    assert f"run {rid} in" in new_lines and "NonFiniteLossError" in new_lines, new_lines
    assert relaunch.metrics[rid]["started"] > sweep.metrics[rid]["started"]
    assert relaunch.metrics[rid]["status"] == "failed"
    assert [r["group"] for r in relaunch.wandb[rid]] == [sweep.sweep_dir.name, relaunch.sweep_dir.name]


def test_a_two_task_job_trains_data_parallel_into_one_run(tmp_path):
    """tasks_per_node=2: submitit starts 2 tasks with srun; each takes its rank from SLURM_PROCID / SLURM_NTASKS
    and they train as one data-parallel run (gloo on CPU) that writes one metrics.json."""
    overrides = ["seed=0", *[o for o in RUN if not o.startswith(("trainer.epochs", "dataset.n_train"))],
                 "trainer.epochs=1", "dataset.n_train=500", *LAUNCHER, "hydra.launcher.tasks_per_node=2"]
    process, out, err = _launch(overrides, tmp_path, "sweep")
    try:
        finished = _finish(process, out, err, SWEEP_TIMEOUT_S, tmp_path)
    finally:
        _cancel(tmp_path)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "1/1 jobs complete" in finished.stdout
    run_dir = _only((tmp_path / "runs").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["world_size"] == 2 and metrics["clean"]["n"] == 100
    log = (run_dir / "main.log").read_text()
    assert ", 2 processes" in log and log.count("epoch 1/1:") == 1, log  # rank 0 logs, rank 1 does not
    task = _only(p for p in (tmp_path / "sweeps").glob("*/.submitit/*") if p.is_dir())  # one job: no array
    for rank in (0, 1):  # one srun task per rank, each with its own streams
        stdout = _only(task.glob(f"*_{rank}_log.out")).read_text()
        assert f"global_rank={rank}(2)" in stdout, stdout
    assert list(tmp_path.glob("runs/*/metrics.json")) == [run_dir / "metrics.json"]


@pytest.mark.slow
def test_a_job_longer_than_its_time_limit_checkpoints_on_usr2_is_requeued_and_completes(tmp_path):
    """timeout_min=1 with signal_delay_s=5. slurmctld checks time limits every 30 s and sends the signal at
    the first check that is less than delay + 30 s before the limit: here 25 to 55 s after the start, and it
    ends the job at the first check after the limit (60 to 90 s). Our handler checkpoints at the next step
    and hands over to submitit's, which requeues the job; each attempt resumes from the checkpoint until
    training is done, with the uninterrupted run's result. 40,000 training images (over a minute on one
    core here) so that the first attempt is signalled; 2 to 4 attempts, 3 to 5 minutes with the reference."""
    config = [*[o for o in RUN if not o.startswith(("trainer.epochs", "dataset.n_train"))],
              "trainer.epochs=10", "dataset.n_train=4000"]
    launcher = [*LAUNCHER, "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=5"]
    process, out, err = _launch(["seed=0", *config, *launcher], tmp_path / "sweep", "sweep")
    try:
        reference = subprocess.run(_command(config, tmp_path / "reference", multirun=False), check=False, cwd=REPO,
                                   env=_env(), capture_output=True, text=True, timeout=900)
        assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
        finished = _finish(process, out, err, 900, tmp_path / "sweep")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        _cancel(tmp_path / "sweep")
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    rid = _run_id(config)
    run_dir = tmp_path / "sweep" / "runs" / rid
    log = (run_dir / "main.log").read_text()
    attempts = log.count(f"run {rid} in")
    assert attempts >= 2, f"the job was never requeued: it ended before its time limit signal\n{log}"
    assert len(re.findall(r"signal received: checkpoint written at epoch \d+, step \d+", log)) == attempts - 1, log
    assert log.count("stopped by SIGUSR2 after writing") == attempts - 1, log
    assert log.count("resuming from") == attempts - 1, log
    task = _only(p for p in (tmp_path / "sweep" / "sweeps").glob("*/.submitit/*") if p.is_dir())
    stdout = _only(task.glob("*_0_log.out")).read_text()
    # submitit's handler after ours, once per requeue (its own log lines: Hydra's log repeats them)
    assert len(re.findall(r"^submitit WARNING .*Caught signal SIGUSR2 on \S+: this job is timed-out", stdout,
                          re.MULTILINE)) == attempts - 1, stdout
    assert len(re.findall(r"^submitit INFO .*Requeued job", stdout, re.MULTILINE)) == attempts - 1, stdout
    assert stdout.count("Starting with JobEnvironment") == attempts and "Job completed successfully" in stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = json.loads((tmp_path / "reference" / "runs" / rid / "metrics.json").read_text())
    assert metrics["status"] == expected["status"] == "complete"
    assert _training(metrics) == _training(expected)
    assert metrics["clean"] == expected["clean"]
