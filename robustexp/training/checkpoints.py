"""The training checkpoints of a run: ``checkpoints/last.pt`` and the one before it, ``previous.pt``.

A checkpoint can be damaged after it was written: a node dying while the run directory is copied,
a full disk on a shared filesystem, a file truncated by a quota. Saving therefore keeps the
previous checkpoint (a hard link, so no second copy is written), and loading checks each file
(a complete zip archive whose CRC-32 checksums match, loadable with ``weights_only=True``, with
the keys the trainer needs) and falls back from ``last.pt`` to ``previous.pt`` with a warning
naming the damaged file. Only when neither is usable does it stop, with a :class:`CheckpointError`
that names the files and says how to start over.

Resuming from ``previous.pt`` retrains what ``last.pt`` held on top of it; since the data order
and every RNG state are in the checkpoint, the run still ends with the weights and metrics of an
uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from robustexp import distributed
from robustexp.errors import CheckpointError
from robustexp.utils import atomic_torch_save

log = logging.getLogger(__name__)

LAST_NAME = "last.pt"
PREVIOUS_NAME = "previous.pt"
# what Trainer.fit reads from a checkpoint (rng_ranks, partial and scaler are optional: older checkpoints lack them)
REQUIRED_KEYS = ("epoch", "model", "optimizer", "scheduler", "method", "rng", "history")


class UnusableCheckpoint(Exception):
    """A checkpoint file that cannot be resumed from; the message says why."""


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The state in ``path``, on the CPU, or :class:`UnusableCheckpoint` saying why the file is not usable.

    ``torch.load`` alone does not notice a flipped byte inside a tensor (it does not check the
    archive's CRC-32 sums) and reports a truncated file as ``OSError: [Errno 22] Invalid argument``
    or an empty ``EOFError``, hence the zip check first. The state is loaded on the CPU: RNG states
    must be CPU tensors for ``torch.set_rng_state``, and ``load_state_dict`` moves the rest."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
    except (zipfile.BadZipFile, EOFError) as exc:
        raise UnusableCheckpoint(f"not a complete zip archive, the format torch.save writes "
                                 f"({path.stat().st_size} bytes; truncated?): {exc}") from exc
    if bad_member is not None:
        raise UnusableCheckpoint(f"CRC-32 mismatch in its member {bad_member!r} (the bytes changed after writing)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to read it makes the file unusable, whatever torch raises
        raise UnusableCheckpoint(f"torch.load(weights_only=True) failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, Mapping):
        raise UnusableCheckpoint(f"expected a trainer checkpoint (a dict), found {type(state).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise UnusableCheckpoint(f"not a trainer checkpoint: the keys {missing} are missing")
    return dict(state)


def _how_to_start_over(directory: Path) -> str:
    return (f"To train this run from scratch, delete {directory} and rerun the same command; to keep these files "
            "and run the same config in a new directory, add tag=<name> to the command")


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any] | None, Path | None]:
    """The newest usable checkpoint in ``directory`` (``last.pt``, else ``previous.pt``) and its path;
    ``(None, None)`` when there is none (a new run).

    A damaged or missing ``last.pt`` next to a usable ``previous.pt`` is logged as a warning. When
    checkpoint files exist but none is usable, raises :class:`CheckpointError`. In a multi-process
    run every rank calls this, applies the same rule to the same files, and the ranks check that
    they chose the same one (a filesystem that shows ranks different bytes is an error, not a
    silent divergence)."""
    directory = Path(directory)
    last, previous = directory / LAST_NAME, directory / PREVIOUS_NAME
    problems: list[str] = []
    state, chosen = None, None
    for path in (last, previous):
        if not path.is_file():
            if path == last and previous.is_file():
                problems.append(f"{path} is missing")  # a crash between keeping previous.pt and writing last.pt
            continue
        try:
            state, chosen = read_checkpoint(path), path
            break
        except UnusableCheckpoint as exc:
            problems.append(f"{path} is damaged ({exc})")
    choices = distributed.all_gather_objects(chosen.name if chosen is not None else None)
    if len(set(choices)) > 1:
        raise CheckpointError(f"the processes of this run do not agree on which checkpoint in {directory} is usable "
                              f"(per rank: {choices}); check that every node sees the same files. "
                              + _how_to_start_over(directory))
    if chosen is None:
        if problems:
            raise CheckpointError(f"no usable checkpoint to resume from: {'; '.join(problems)}"
                                  f"{'' if previous.is_file() else f'; there is no {previous.name} to fall back to'}. "
                                  + _how_to_start_over(directory))
        return None, None
    if problems and distributed.world()[0] == 0:
        log.warning("%s; resuming from %s (epoch %s) instead: what came after it is trained again, to the same "
                    "result; last.pt is written anew at the next checkpoint", "; ".join(problems), chosen,
                    state["epoch"])
    return state, chosen


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike, keep_previous: bool = True) -> Path:
    """Write ``state`` as ``directory/last.pt`` (atomically: a crash or a full disk leaves the old
    file), after keeping the current ``last.pt`` as ``previous.pt`` when ``keep_previous``.

    ``previous.pt`` is a hard link to the old ``last.pt`` (no bytes copied; ``os.replace`` of the new
    ``last.pt`` then only moves the name). Where hard links are not supported the old file is
    renamed instead, which leaves a moment with ``previous.pt`` and no ``last.pt``: loading handles
    it. Pass ``keep_previous=False`` when ``last.pt`` is known to be damaged, so that the good
    ``previous.pt`` is not replaced by it. Call on one process only (rank 0)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    last, previous = directory / LAST_NAME, directory / PREVIOUS_NAME
    if keep_previous and last.is_file():
        link = directory / f".{PREVIOUS_NAME}.link.tmp"
        link.unlink(missing_ok=True)  # left by a crash between the two steps below
        try:
            os.link(last, link)
            os.replace(link, previous)
        except OSError:  # no hard links on this filesystem
            link.unlink(missing_ok=True)
            os.replace(last, previous)
    atomic_torch_save(state, last)
    try:  # make the renames durable (a crash right after could otherwise lose them); not possible everywhere
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return last
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return last
