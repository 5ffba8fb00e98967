"""Seeding, atomic file writes and small helpers shared by the whole runner."""

from __future__ import annotations

import json
import os
import random
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from robustexp.errors import ConfigError


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and all GPUs) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_dataloader_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and python in each worker from torch's
    per-worker seed (itself derived from the loader's generator), so augmentations that use
    numpy or ``random`` are reproducible and differ between workers."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any tuple of strings and ints (no Python hash salting)."""
    import hashlib

    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """``write(file)`` into a temporary file next to ``path``, ``fsync``, then ``os.replace``: a
    crash or a full disk leaves the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that a crash leaves either the old or the new file, never a torn one."""
    _atomic_write(path, lambda fh: fh.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` written atomically (as :func:`atomic_write_bytes`), straight into the
    temporary file: no in-memory copy of the whole checkpoint."""
    _atomic_write(path, lambda fh: torch.save(obj, fh))


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as fh:
        return json.load(fh)


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The code version: commit hash, with '+dirty' when the tree has uncommitted changes."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not commit:
        return None
    return commit + ("+dirty" if dirty else "")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def channels_last_for(choice, device: torch.device, option: str = "runtime.channels_last") -> bool:
    """Whether to run convolutions in channels_last (NHWC): ``auto`` on CPU, where oneDNN's
    convolutions are 1.1x (CIFAR ResNet-18) to 2.3x (the small CNN, eval) faster in that layout
    (``scripts/bench_default.py``); on CUDA only when asked (a gain with AMP on tensor cores).
    ``choice``: auto | channels_last | contiguous, or a bool (true = channels_last)."""
    if isinstance(choice, bool):
        return choice
    if choice is None or choice not in MEMORY_FORMATS:
        raise ConfigError(f"{option}={choice!r}; expected one of {MEMORY_FORMATS} or true / false")
    return choice == "channels_last" or (choice == "auto" and torch.device(device).type == "cpu")


@contextmanager
def model_memory_format(model: nn.Module, choice, device: torch.device,
                        option: str = "runtime.channels_last") -> Iterator[torch.memory_format]:
    """Run the model in channels_last where :func:`channels_last_for` says so and put its 4-D
    parameters back in their layout afterwards. Same weights, same function (up to the float
    rounding of another convolution kernel); only the memory layout changes. Inputs need no
    conversion: a convolution with channels_last weights returns channels_last activations."""
    use = channels_last_for(choice, device, option)
    weights = [p for p in model.parameters() if p.dim() == 4]
    if not use or not weights:
        yield torch.contiguous_format
        return
    # a weight with one input channel (or 1x1 kernels) has the same strides in both layouts: ask another
    telling = [p for p in weights if p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1]
    was_channels_last = bool(telling) and not telling[0].is_contiguous()
    model.to(memory_format=torch.channels_last)
    try:
        yield torch.channels_last
    finally:
        if not was_channels_last:
            model.to(memory_format=torch.contiguous_format)
