"""Damaged checkpoints (a truncated last.pt after a node died mid-copy or a disk filled up): the
previous checkpoint is kept, the run falls back to it with a warning naming the damaged file and
ends as an uninterrupted run; with no usable checkpoint it stops with a clear error."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robustexp.errors import CheckpointError, ConfigError
from robustexp.evaluation.clean import CleanEvaluator
from robustexp.evaluation.corruptions import CorruptionEvaluator
from robustexp.main import run
from robustexp.methods.standard import StandardTraining
from robustexp.models.build import read_state_dict
from robustexp.preemption import Preempted, PreemptionHandler
from robustexp.run_id import run_directory
from robustexp.training.checkpoints import REQUIRED_KEYS, load_checkpoint, read_checkpoint, save_checkpoint
from robustexp.training.trainer import TrainContext, Trainer
from robustexp.utils import atomic_torch_save
from tests.conftest import TOY, compose_config
from tests.test_reliability import _SignalAtStep
from tests.test_runner import _comparable

REPO = Path(__file__).resolve().parent.parent
RUN = ["trainer.epochs=3", "eval.evaluators.eps_star=null"]  # 3 epochs of 20 steps; clean + corruptions


def _truncate(path: Path) -> None:
    """What an interrupted copy leaves: the first half of the bytes."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _state(epoch: int) -> dict:
    return {**{key: {} for key in REQUIRED_KEYS}, "epoch": epoch, "model": {"w": torch.full((3,), float(epoch))},
            "history": [], "scheduler": None}


def _epoch(path: Path) -> int:
    return read_checkpoint(path)["epoch"]  # also checks the file is intact


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "robustexp.training.checkpoints" and r.levelno == logging.WARNING]


# ---------------------------------------------------------------------------------------- files


def test_each_save_keeps_the_checkpoint_it_replaces_as_previous(tmp_path):
    for epoch in (1, 2, 3):
        save_checkpoint(_state(epoch), tmp_path)
    assert _epoch(tmp_path / "last.pt") == 3 and _epoch(tmp_path / "previous.pt") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]  # no temporary files, no third
    # previous.pt is the old last.pt itself (a hard link moved along), not a copy written again
    inode = (tmp_path / "last.pt").stat().st_ino
    save_checkpoint(_state(4), tmp_path)
    assert (tmp_path / "previous.pt").stat().st_ino == inode and _epoch(tmp_path / "previous.pt") == 3
    # a damaged last.pt is not kept: previous.pt stays the good one it would replace
    _truncate(tmp_path / "last.pt")
    save_checkpoint(_state(5), tmp_path, keep_previous=False)
    assert _epoch(tmp_path / "last.pt") == 5 and _epoch(tmp_path / "previous.pt") == 3


def test_without_hard_links_the_old_file_is_renamed(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    for epoch in (1, 2, 3):
        save_checkpoint(_state(epoch), tmp_path)
    assert _epoch(tmp_path / "last.pt") == 3 and _epoch(tmp_path / "previous.pt") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]


def test_a_failed_save_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "last.pt"
    atomic_torch_save(_state(1), path)
    with pytest.raises(Exception):  # noqa: B017 -- whatever pickling raises for a lambda
        atomic_torch_save({"epoch": 2, "bad": lambda: None}, path)
    assert _epoch(path) == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    for epoch in (1, 2):
        save_checkpoint(_state(epoch), tmp_path)
    _truncate(tmp_path / "last.pt")
    state, path = load_checkpoint(tmp_path)
    assert path == tmp_path / "previous.pt" and state["epoch"] == 1
    (message,) = _warnings(caplog)
    assert f"{tmp_path / 'last.pt'} is damaged (not a complete zip archive" in message
    assert f"resuming from {tmp_path / 'previous.pt'} (epoch 1)" in message

    # one flipped byte inside a tensor: torch.load alone would return wrong weights without a word
    save_checkpoint(_state(3), tmp_path, keep_previous=False)  # as the trainer after a fallback
    data = bytearray((tmp_path / "last.pt").read_bytes())
    offset = bytes(data).index(torch.full((3,), 3.0).numpy().tobytes())
    data[offset + 1] ^= 0xFF
    (tmp_path / "last.pt").write_bytes(bytes(data))
    caplog.clear()
    state, path = load_checkpoint(tmp_path)
    assert path.name == "previous.pt" and state["epoch"] == 1
    assert "is damaged (CRC-32 mismatch in its member" in _warnings(caplog)[0]


def test_a_missing_last_checkpoint_next_to_a_previous_one_is_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    save_checkpoint(_state(1), tmp_path)
    save_checkpoint(_state(2), tmp_path)
    (tmp_path / "last.pt").unlink()  # a crash between renaming last.pt to previous.pt and writing the new one
    state, path = load_checkpoint(tmp_path)
    assert path.name == "previous.pt" and state["epoch"] == 1
    assert f"{tmp_path / 'last.pt'} is missing" in _warnings(caplog)[0]


def test_no_checkpoint_is_a_new_run_and_no_usable_one_is_a_clear_error(tmp_path):
    assert load_checkpoint(tmp_path / "checkpoints") == (None, None)

    save_checkpoint(_state(1), tmp_path)
    _truncate(tmp_path / "last.pt")
    with pytest.raises(CheckpointError) as only_last:
        load_checkpoint(tmp_path)
    text = str(only_last.value)
    assert f"{tmp_path / 'last.pt'} is damaged" in text and "there is no previous.pt to fall back to" in text
    assert f"delete {tmp_path} and rerun the same command" in text and "tag=<name>" in text

    save_checkpoint(_state(2), tmp_path, keep_previous=False)
    save_checkpoint(_state(3), tmp_path)
    _truncate(tmp_path / "last.pt")
    (tmp_path / "previous.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint") as both:
        load_checkpoint(tmp_path)
    assert f"{tmp_path / 'last.pt'} is damaged" in str(both.value)
    assert f"{tmp_path / 'previous.pt'} is damaged" in str(both.value)

    torch.save({"model": {}}, tmp_path / "last.pt")  # loadable, but not a trainer checkpoint (e.g. model_final.pt)
    with pytest.raises(CheckpointError, match=r"not a trainer checkpoint: the keys \['epoch', 'optimizer'"):
        load_checkpoint(tmp_path)


class _Custom:
    """An object torch.load(weights_only=True) refuses to unpickle."""


def test_processes_that_see_different_files_stop_instead_of_diverging(tmp_path, monkeypatch):
    from robustexp import distributed

    save_checkpoint(_state(1), tmp_path)
    save_checkpoint(_state(2), tmp_path)
    # rank 1 on a node whose copy of last.pt is truncated: it would resume from previous.pt
    monkeypatch.setattr(distributed, "all_gather_objects", lambda obj: [obj, "previous.pt"])
    with pytest.raises(CheckpointError, match=r"do not agree on which checkpoint .* \(per rank: \['last.pt', "
                                              r"'previous.pt'\]\); check that every node sees the same files"):
        load_checkpoint(tmp_path)


def test_a_truncated_model_checkpoint_names_the_file_and_what_was_expected(tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(50, 50)}, weights)
    assert torch.equal(read_state_dict(weights)["w"], torch.ones(50, 50))
    _truncate(weights)
    with pytest.raises(ConfigError) as truncated:
        read_state_dict(weights)
    assert f"model.checkpoint={weights}: cannot read it" in str(truncated.value)
    assert "looks truncated or damaged; expected a complete .pt/.pth file written by torch.save" in str(truncated.value)

    from safetensors.torch import save_file

    tensors = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(50, 50)}, str(tensors))
    _truncate(tensors)
    with pytest.raises(ConfigError, match=r"weights.safetensors: cannot read it .*expected a complete .safetensors"):
        read_state_dict(tensors)

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"w": _Custom()}, unsafe)  # a complete file that needs unpickling code: still named as such
    with pytest.raises(ConfigError, match=r"unsafe.pt: cannot load it with weights_only=True"):
        read_state_dict(unsafe)


# ---------------------------------------------------------------------------------------- the trainer


def _fit(run_dir: Path, method, train_set, preemption=None, width: int = 8):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, width), torch.nn.BatchNorm1d(width),
                                torch.nn.ReLU(), torch.nn.Linear(width, 3))
    trainer = Trainer(epochs=3, batch_size=10, optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))
    ctx = TrainContext(run_dir=run_dir, device=torch.device("cpu"), seed=0, progress=False, preemption=preemption)
    return model, trainer.fit(model, method, train_set, ctx)


def test_a_damaged_mid_epoch_checkpoint_resumes_from_the_epoch_before_to_the_same_weights(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    g = torch.Generator().manual_seed(0)
    train_set = torch.utils.data.TensorDataset(torch.randn(100, 1, 4, 4, generator=g),
                                               torch.randint(0, 3, (100,), generator=g))
    reference, history = _fit(tmp_path / "a", _SignalAtStep(None), train_set)

    handler = PreemptionHandler(["SIGUSR1"]).install()
    try:
        with pytest.raises(Preempted):
            _fit(tmp_path / "b", _SignalAtStep(14), train_set, handler)  # step 4 of epoch 2
    finally:
        handler.uninstall()
    checkpoints = tmp_path / "b" / "checkpoints"
    assert read_checkpoint(checkpoints / "last.pt")["partial"]["step"] == 4 and _epoch(checkpoints / "previous.pt") == 1
    _truncate(checkpoints / "last.pt")
    caplog.clear()
    resumed, resumed_history = _fit(tmp_path / "b", _SignalAtStep(None), train_set)
    assert f"{checkpoints / 'last.pt'} is damaged" in _warnings(caplog)[0]
    assert f"resuming from {checkpoints / 'previous.pt'} (epoch 1/3 done)" in caplog.text
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in resumed_history["history"]] == [h["loss"] for h in history["history"]]
    assert _epoch(checkpoints / "last.pt") == 3 and _epoch(checkpoints / "previous.pt") == 2


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    g = torch.Generator().manual_seed(0)
    train_set = torch.utils.data.TensorDataset(torch.randn(40, 1, 4, 4, generator=g),
                                               torch.randint(0, 3, (40,), generator=g))
    _fit(tmp_path, StandardTraining(), train_set)
    with pytest.raises(CheckpointError, match=r"last.pt does not fit this run's model, optimizer or method "
                                              r"\(RuntimeError: Error\(s\) in loading state_dict"):
        _fit(tmp_path, StandardTraining(), train_set, width=5)


# ---------------------------------------------------------------------------------------- the runner


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The toy run of RUN without interruption: its metrics (as stored) and final weights."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run(compose_config(RUN), run_dir)
    checkpoints = run_dir / "checkpoints"
    assert _epoch(checkpoints / "last.pt") == 3 and _epoch(checkpoints / "previous.pt") == 2
    return (json.loads((run_dir / "metrics.json").read_text()),
            torch.load(checkpoints / "model_final.pt", weights_only=True))


class _Interrupt(KeyboardInterrupt):
    pass


def _same_as(run_dir: Path, uninterrupted) -> None:
    metrics, final = uninterrupted
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["status"] == "complete"
    assert _comparable(resumed) == _comparable(metrics)
    weights = torch.load(run_dir / "checkpoints" / "model_final.pt", weights_only=True)
    assert all(torch.equal(weights[k], final[k]) for k in final)


def test_training_resumes_from_the_previous_checkpoint_when_the_last_is_truncated(tmp_path, monkeypatch, caplog,
                                                                                  uninterrupted):
    calls = {"n": 0}
    original_save = Trainer._save_checkpoint

    def save_then_die(self, *args, **kwargs):  # killed right after the checkpoint of epoch 2
        original_save(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Interrupt()

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(compose_config(RUN), tmp_path)
    monkeypatch.setattr(Trainer, "_save_checkpoint", original_save)
    checkpoints = tmp_path / "checkpoints"
    assert _epoch(checkpoints / "last.pt") == 2 and _epoch(checkpoints / "previous.pt") == 1
    _truncate(checkpoints / "last.pt")

    caplog.set_level(logging.INFO)
    run(compose_config(RUN), tmp_path)
    (warning,) = _warnings(caplog)
    assert f"{checkpoints / 'last.pt'} is damaged" in warning and "previous.pt (epoch 1)" in warning
    assert f"resuming from {checkpoints / 'previous.pt'} (epoch 1/3 done)" in caplog.text
    _same_as(tmp_path, uninterrupted)
    assert _epoch(checkpoints / "last.pt") == 3 and _epoch(checkpoints / "previous.pt") == 2


def test_an_interrupted_evaluation_with_a_truncated_checkpoint_retrains_the_last_epoch(tmp_path, monkeypatch, caplog,
                                                                                      uninterrupted):
    def preempted(self, *args, **kwargs):
        raise Preempted("SIGTERM during the corruption evaluation")

    monkeypatch.setattr(CorruptionEvaluator, "evaluate", preempted)
    with pytest.raises(Preempted):
        run(compose_config(RUN), tmp_path)
    interrupted = json.loads((tmp_path / "metrics.json").read_text())
    assert interrupted["status"] == "preempted" and "clean" in interrupted and "corruptions" not in interrupted
    monkeypatch.undo()
    checkpoints = tmp_path / "checkpoints"
    assert _epoch(checkpoints / "last.pt") == 3
    _truncate(checkpoints / "last.pt")

    def must_be_kept(self, *args, **kwargs):
        raise AssertionError("the clean evaluation of the interrupted attempt must be reused")

    monkeypatch.setattr(CleanEvaluator, "evaluate", must_be_kept)
    caplog.set_level(logging.INFO)
    run(compose_config(RUN), tmp_path)
    assert f"{checkpoints / 'last.pt'} is damaged" in _warnings(caplog)[0]
    assert f"resuming from {checkpoints / 'previous.pt'} (epoch 2/3 done)" in caplog.text
    _same_as(tmp_path, uninterrupted)
    # epoch 3 was trained again and saved once: the damaged file was replaced, not kept as previous.pt
    assert _epoch(checkpoints / "last.pt") == 3 and _epoch(checkpoints / "previous.pt") == 2


def test_cli_stops_with_a_clear_error_when_no_checkpoint_is_usable(tmp_path):
    run_dir = run_directory(compose_config([f"output_root={tmp_path}"]))
    save_checkpoint(_state(1), run_dir / "checkpoints")
    _truncate(run_dir / "checkpoints" / "last.pt")
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run([sys.executable, "-m", "robustexp", *TOY, f"output_root={tmp_path}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode != 0
    last = run_dir / "checkpoints" / "last.pt"
    assert f"robustexp: error: no usable checkpoint to resume from: {last} is damaged" in result.stderr
    assert f"delete {run_dir / 'checkpoints'} and rerun the same command" in result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "Invalid argument" not in output  # torch's raw text for a truncated file
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"].startswith("CheckpointError: no usable checkpoint")
    assert last.stat().st_size > 0 and not (run_dir / "checkpoints" / "model_final.pt").exists()  # left as it was


# ---------------------------------------------------------------------------------------- several processes


@pytest.mark.slow  # three 2-process torchrun runs: ~45 s on a quiet 2-core machine
def test_two_processes_fall_back_to_the_same_checkpoint_and_end_as_an_uninterrupted_run(tmp_path):
    from tests.test_ant_distributed import _equal_states, _torchrun

    reference = _torchrun(tmp_path / "a")
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    interrupted = _torchrun(tmp_path / "b", signal_at=8)  # step 2 of epoch 2 (6 steps per epoch)
    assert interrupted.returncode != 0
    checkpoints = tmp_path / "b" / "checkpoints"
    assert read_checkpoint(checkpoints / "last.pt")["partial"]["step"] == 2 and _epoch(checkpoints / "previous.pt") == 1
    _truncate(checkpoints / "last.pt")
    resumed = _torchrun(tmp_path / "b")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (resumed.stdout + resumed.stderr).count(f"{checkpoints / 'last.pt'} is damaged") == 1  # by rank 0 only
    a = torch.load(tmp_path / "a" / "result.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "result.pt", weights_only=True)
    for rank in (0, 1):
        assert _equal_states(a["ranks"][rank]["model"], b["ranks"][rank]["model"]), rank
        assert _equal_states(a["ranks"][rank]["generator"], b["ranks"][rank]["generator"]), rank
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
