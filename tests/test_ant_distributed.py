"""ANT under ``torchrun --nproc_per_node=2`` on CPU (gloo): one noise generator for the whole run.

Rusak et al. Sec. 3.2 train one generator jointly with the classifier. With K processes the run
must still have one: the same initial generator on every rank, generator gradients averaged over
ranks, the same replayed state chosen everywhere, and the generator trained against the same
classifier (rank 0's BN statistics). Then rank 0's checkpointed generator is every rank's, and a run
interrupted mid-epoch (a preemption signal) and resumed ends exactly like an uninterrupted one.

The worker below is this module run by torchrun (``python -m torch.distributed.run ... -m
tests.test_ant_distributed <run dir> <step to signal at>``): a toy classifier with BatchNorm, 2
epochs of 6 steps per rank, a generator restart and replay inside them; a few seconds per run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _toy_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 3))


def _worker(run_dir: Path, signal_at: int) -> None:
    """One rank of the run; rank 0 sends itself SIGUSR1 at global step ``signal_at`` (0: never)
    and, after training, writes every rank's generator, replay buffer and classifier to result.pt."""
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
    from robustexp import distributed
    from robustexp.methods.ant import AdversarialNoiseTraining
    from robustexp.preemption import Preempted, PreemptionHandler
    from robustexp.training.trainer import TrainContext, Trainer
    from robustexp.utils import derive_seed

    torch.set_num_threads(1)
    env = distributed.detect()
    distributed.init(env, torch.device("cpu"))
    rank = distributed.world()[0]
    torch.manual_seed(0)  # as robustexp.main: the same model on every rank, then per-rank noise
    model = _toy_model()
    if rank:
        torch.manual_seed(derive_seed(0, "rank", rank))
    g = torch.Generator().manual_seed(0)
    train_set = torch.utils.data.TensorDataset(torch.rand(120, 1, 8, 8, generator=g),
                                               torch.randint(0, 3, (120,), generator=g))

    class SignalAt(AdversarialNoiseTraining):
        def training_step(self, model, images, labels):
            if rank == 0 and self.steps + 1 == signal_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            return super().training_step(model, images, labels)

    method = SignalAt(eps_l2=1.5, generator_lr=1e-2, replay_every=2, replay_size=3, restart_every=5, restart_steps=2)
    trainer = Trainer(epochs=2, batch_size=10, optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))
    handler = PreemptionHandler(["SIGUSR1"], requeue=False).install()
    ctx = TrainContext(run_dir=run_dir, device=torch.device("cpu"), seed=0, progress=False, preemption=handler)
    try:
        summary = trainer.fit(model, method, train_set, ctx)
    except Preempted:
        distributed.shutdown()
        sys.exit(3)
    generators = distributed.all_gather_objects(
        {"generator": method.generator.state_dict(), "replay": list(method.replay), "steps": method.steps,
         "model": model.state_dict()})
    if rank == 0:
        torch.save({"ranks": generators, "method": method.state_dict(), "history": summary["history"]},
                   run_dir / "result.pt")
    distributed.shutdown()


def _torchrun(run_dir: Path, signal_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29600 + os.getpid() % 1000)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           env["MASTER_PORT"], "-m", "tests.test_ant_distributed", str(run_dir), str(signal_at)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # two 2-process torchrun runs and a resume: ~30 s on a quiet 2-core machine
def test_two_process_ant_has_one_generator_and_resumes_exactly(tmp_path):
    uninterrupted = _torchrun(tmp_path / "a")
    assert uninterrupted.returncode == 0, uninterrupted.stdout[-3000:] + uninterrupted.stderr[-3000:]
    reference = torch.load(tmp_path / "a" / "result.pt", weights_only=True)
    rank0, rank1 = reference["ranks"]
    assert rank0["steps"] == rank1["steps"] == 12  # 120 images / 2 ranks / batch 10, 2 epochs; restarts at 5, 10
    # one generator: the same weights, and the same replay buffer, on both ranks
    assert _equal_states(rank0["generator"], rank1["generator"])
    assert len(rank0["replay"]) == len(rank1["replay"]) == 3
    assert all(_equal_states(a, b) for a, b in zip(rank0["replay"], rank1["replay"]))
    assert _equal_states(rank0["model"], rank1["model"])  # parameters and (broadcast) BN statistics
    assert _equal_states(reference["method"]["generator"], rank1["generator"])  # what rank 0 checkpointed

    # a preemption signal at global step 4 (epoch 1 of 6 steps): mid-epoch checkpoint, exit; then rerun
    interrupted = _torchrun(tmp_path / "b", signal_at=4)
    assert interrupted.returncode != 0 and not (tmp_path / "b" / "result.pt").exists()
    state = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and state["partial"]["step"] == 4 and state["method"]["steps"] == 4
    resumed = _torchrun(tmp_path / "b")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    result = torch.load(tmp_path / "b" / "result.pt", weights_only=True)
    for rank in (0, 1):
        assert _equal_states(result["ranks"][rank]["generator"], reference["ranks"][rank]["generator"]), rank
        assert _equal_states(result["ranks"][rank]["model"], reference["ranks"][rank]["model"]), rank
        assert all(_equal_states(a, b)
                   for a, b in zip(result["ranks"][rank]["replay"], reference["ranks"][rank]["replay"]))
    # the interrupted epoch (every rank's running sums are checkpointed) and the one after it log the
    # same metrics as the uninterrupted run
    for key in ("loss", "generator_ce"):
        assert result["history"][0][key] == pytest.approx(reference["history"][0][key], rel=1e-6)
    assert result["history"][1]["loss"] == pytest.approx(reference["history"][1]["loss"], rel=1e-6)
    assert result["history"][1]["generator_ce"] == pytest.approx(reference["history"][1]["generator_ce"], rel=1e-6)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]))
