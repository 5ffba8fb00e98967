"""Scale-out and reliability: kill -9 and rerun, checkpoint on SIGTERM / SIGUSR1, a failing job in a
multirun, atomic metrics files, a 2-process torchrun run on CPU, a submitit_local multirun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from robustexp.methods.standard import StandardTraining
from robustexp.preemption import Preempted, PreemptionHandler
from robustexp.training.trainer import TrainContext, Trainer
from robustexp.utils import atomic_write_json
from tests.conftest import TOY, compose_config

REPO = Path(__file__).resolve().parent.parent
# a run long enough to be interrupted: 6 epochs of 20 steps; small eval
LONG = [o for o in TOY if not o.startswith(("trainer.epochs", "dataset.n_train", "eval."))] + [
    "trainer.epochs=6", "dataset.n_train=500", "eval=clean", "runtime.threads=1"]


def _env():
    return {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}


def _cli(args, root, check=True, timeout=300):
    result = subprocess.run([sys.executable, "-m", "robustexp", *args, f"output_root={root}"], cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _only_run(root: Path) -> Path:
    (run_dir,) = list((root / "runs").iterdir())
    return run_dir


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _start_and_wait_for_checkpoint(args, root, epochs_done: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "robustexp", *args, f"output_root={root}"], cwd=REPO,
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        checkpoints = list(root.glob("runs/*/checkpoints/last.pt"))
        if checkpoints:
            try:
                state = torch.load(checkpoints[0], weights_only=True)
                if state["epoch"] >= epochs_done:
                    return process
            except Exception:  # being written: atomic rename, so only a race on the path listing
                pass
        if process.poll() is not None:
            raise AssertionError("the run ended before it could be interrupted:\n" + process.stdout.read()[-3000:])
        time.sleep(0.2)
    process.kill()
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    _cli(LONG, root)
    return _metrics(_only_run(root))


def _same_results(a: dict, b: dict) -> None:
    assert a["status"] == b["status"] == "complete"
    assert a["clean"] == b["clean"]
    assert [e["loss"] for e in a["train"]["history"]] == [e["loss"] for e in b["train"]["history"]]


def test_kill_9_during_training_then_rerun_gives_the_uninterrupted_result(tmp_path, uninterrupted):
    process = _start_and_wait_for_checkpoint(LONG, tmp_path, epochs_done=2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    run_dir = _only_run(tmp_path)
    assert _metrics(run_dir)["status"] == "running"  # killed: nothing could mark it, but the file is whole
    rerun = _cli(LONG, tmp_path)
    assert "resuming from" in rerun.stdout
    _same_results(_metrics(run_dir), uninterrupted)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_signal_writes_a_checkpoint_and_the_rerun_resumes_to_the_same_result(tmp_path, uninterrupted, signame):
    process = _start_and_wait_for_checkpoint(LONG, tmp_path, epochs_done=1)
    process.send_signal(getattr(signal, signame))
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output[-2000:]
    assert f"stopped by {signame}" in output
    run_dir = _only_run(tmp_path)
    metrics = _metrics(run_dir)
    assert metrics["status"] == "preempted" and signame in metrics["error"]
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] >= 1
    rerun = _cli(LONG, tmp_path)
    assert "resuming from" in rerun.stdout
    _same_results(_metrics(run_dir), uninterrupted)


class _SignalAtStep(StandardTraining):
    """Standard training that sends itself a signal at one global step (a deterministic preemption)."""

    def __init__(self, step: int | None):
        super().__init__()
        self.step, self.count = step, 0

    def training_step(self, model, images, labels):
        self.count += 1
        if self.count == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return super().training_step(model, images, labels)


def _fit(run_dir: Path, method, train_set, preemption=None, amp=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 3))
    trainer = Trainer(epochs=3, batch_size=10, optimizer=lambda params: torch.optim.SGD(params, lr=0.1,
                                                                                        momentum=0.9))
    ctx = TrainContext(run_dir=run_dir, device=torch.device("cpu"), seed=0, progress=False, preemption=preemption,
                       amp=amp)
    return model, trainer.fit(model, method, train_set, ctx)


def test_mid_epoch_checkpoint_on_a_signal_resumes_to_identical_weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    train_set = torch.utils.data.TensorDataset(torch.randn(100, 1, 4, 4, generator=g), torch.randint(0, 3, (100,),
                                                                                                     generator=g))
    reference, history = _fit(tmp_path / "a", _SignalAtStep(None), train_set)

    handler = PreemptionHandler(["SIGUSR1"]).install()
    try:
        with pytest.raises(Preempted, match="SIGUSR1"):
            _fit(tmp_path / "b", _SignalAtStep(14), train_set, handler)  # step 4 of epoch 2
    finally:
        handler.uninstall()
    state = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["partial"]["step"] == 4
    resumed, resumed_history = _fit(tmp_path / "b", _SignalAtStep(None), train_set)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in resumed_history["history"]] == pytest.approx([h["loss"] for h in history["history"]])


def test_a_previous_handler_that_returns_is_called_and_the_run_stops_after_the_checkpoint(tmp_path):
    """Under submitit, SIGTERM only gets logged by its handler: we checkpoint, call that handler, and
    stop with SystemExit (no result for the attempt; SLURM requeues a preempted job), instead of
    training on until SLURM's SIGKILL."""
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    handler = PreemptionHandler(["SIGUSR1"]).install()
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(60, 1, 4, 4, generator=g), torch.randint(0, 3, (60,),
                                                                                               generator=g))
    try:
        with pytest.raises(SystemExit, match="SIGUSR1"):
            _fit(tmp_path, _SignalAtStep(2), data, handler)
    finally:
        handler.uninstall()
        signal.signal(signal.SIGUSR1, previous)
    assert calls == [signal.SIGUSR1]
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and state["partial"]["step"] == 2


def _wandb_exit_code(path: Path) -> int | None:
    """The exit code in the exit record that ``run.finish`` writes to an offline W&B file (None
    if the run was never closed); the file is read by :mod:`tests.wandb_records`."""
    from tests import wandb_records

    return wandb_records.exit_code(wandb_records.records(path))


def test_failing_job_in_a_multirun_does_not_stop_the_others_and_its_wandb_run_is_closed(tmp_path):
    # the second job diverges (NaN loss) and fails; the third must still run
    args = ["-m", "trainer.optimizer.lr=0.05,1e12,0.02", *[o for o in TOY if not o.startswith(("logger.", "eval."))],
            "logger.mode=offline", "eval=clean", "trainer.scheduler=null"]
    result = _cli(args, tmp_path, check=False)
    assert result.returncode == 1  # the sweep reports the failure in its exit status...
    assert "2/3 jobs complete" in result.stdout  # ...after running every job
    runs = {d: _metrics(d) for d in (tmp_path / "runs").iterdir()}
    statuses = sorted(m["status"] for m in runs.values())
    assert statuses == ["complete", "complete", "failed"], statuses
    failed = next(d for d, m in runs.items() if m["status"] == "failed")
    assert "NonFiniteLossError" in runs[failed]["error"]
    for run_dir, metrics in runs.items():  # every W&B run was closed, with the job's exit code
        (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
        assert _wandb_exit_code(wandb_file) == (1 if metrics["status"] == "failed" else 0)


def test_metrics_file_is_never_left_truncated(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"status": "running", "values": list(range(10))})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_json(path, {"status": "complete", "values": list(range(100000))})
    assert json.loads(path.read_text()) == {"status": "running", "values": list(range(10))}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left behind


def test_two_process_torchrun_on_cpu_matches_a_single_process_evaluation(tmp_path):
    args = [*[o for o in TOY if not o.startswith(("trainer.epochs", "eval."))], "trainer.epochs=1", "eval=clean",
            "runtime.threads=1", f"output_root={tmp_path}"]
    env = {**_env(), "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port", env["MASTER_PORT"], "-m", "robustexp", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = _only_run(tmp_path)
    metrics = _metrics(run_dir)
    assert metrics["status"] == "complete" and metrics["world_size"] == 2
    assert result.stdout.count("] - epoch 1/1") == 1  # rank 0 logs, rank 1 does not
    # 500 training images over 2 ranks x batch 25 -> 10 steps per rank per epoch
    assert metrics["train"]["history"][0]["images_per_s"] > 0
    # exact totals: the sharded clean evaluation equals a single-process evaluation of the saved weights
    cfg = compose_config(["eval=clean", "dataset.n_train=500", "dataset.n_test=100"], toy=False)
    from robustexp.config import instantiate_component
    from robustexp.evaluation.base import EvalContext
    from robustexp.models.build import build_model

    data = instantiate_component(cfg.dataset)
    model = build_model(cfg.model, data.num_classes, data.mean, data.std)
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "model_final.pt", weights_only=True))
    evaluator = instantiate_component(cfg.eval.evaluators.clean)
    single = evaluator.evaluate(model, data, EvalContext(run_dir=tmp_path, device=torch.device("cpu"), seed=0,
                                                         progress=False))
    assert metrics["clean"]["n"] == single["n"] == 100
    assert metrics["clean"]["top1"] == pytest.approx(single["top1"])
    assert metrics["clean"]["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_submitit_local_multirun(tmp_path):
    args = ["-m", "hydra/launcher=submitit_local", "seed=0,1", *[o for o in TOY if not o.startswith("eval.")],
            "eval=clean", "trainer.epochs=1",
            "hydra.launcher.timeout_min=10"]
    _cli(args, tmp_path, timeout=400)
    runs = [_metrics(d) for d in (tmp_path / "runs").iterdir()]
    assert sorted(m["seed"] for m in runs) == [0, 1] and all(m["status"] == "complete" for m in runs)
    (sweep,) = (tmp_path / "sweeps").iterdir()
    assert list(sweep.glob(".submitit/*/*_log.out")), "submitit wrote no job logs"
    assert [j["status"] for j in json.loads((sweep / "sweep_summary.json").read_text())] == ["complete"] * 2


def test_bf16_autocast_trains_like_fp32(tmp_path):
    """runtime.amp=bf16 (usable on CPU, meant for GPUs): the loss history follows fp32's closely."""
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(100, 1, 4, 4, generator=g), torch.randint(0, 3, (100,),
                                                                                                generator=g))
    _, fp32 = _fit(tmp_path / "fp32", StandardTraining(), data)
    _, bf16 = _fit(tmp_path / "bf16", StandardTraining(), data, amp="bf16")
    losses32, losses16 = ([h["loss"] for h in r["history"]] for r in (fp32, bf16))
    assert losses16 != losses32  # autocast did run in reduced precision
    assert losses16 == pytest.approx(losses32, abs=0.03)


def test_a_signal_during_evaluation_stops_at_once():
    handler = PreemptionHandler(["SIGUSR1"]).install()
    handler.immediate = True
    try:
        with pytest.raises(Preempted, match="SIGUSR1 during evaluation"):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(1)  # the handler runs between bytecodes: before this sleep ends
    finally:
        handler.uninstall()
