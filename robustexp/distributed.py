"""Data-parallel runs on K processes: ``torchrun --nproc_per_node=K -m robustexp ...`` or ``srun``.

Rank and world size come from torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or,
under SLURM without torchrun, from ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID`` (the
rendezvous address is then the job's first node, the port derived from the job id). The backend
is gloo on CPU and nccl on GPU.

What is shared and what is not:

* parameters start identical (broadcast from rank 0) and gradients are averaged over ranks after
  every backward pass, so every rank takes the same optimizer step;
* BatchNorm normalizes each rank's own batch (the per-process batch is ``trainer.batch_size``;
  the effective batch of one step is ``batch_size x world_size``); running statistics are those of
  rank 0, broadcast to all ranks after every epoch and before evaluation (as DDP's
  ``broadcast_buffers`` does). ``runtime.sync_bn=true`` converts BN layers to ``SyncBatchNorm``
  (GPU only), which normalizes with statistics over the batches of all ranks;
* random noise drawn by methods differs per rank (seeds are offset by rank after the model is
  built), so ranks do not train on identical noise;
* only rank 0 writes files and logs to W&B; all ranks share the one run directory.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from robustexp.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _slurm_master_addr() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodes.split(",")[0].split("[")[0]


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    """The process's place in the job, from torchrun or SLURM variables (a single process otherwise)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistEnv()


def init(env: DistEnv, device: torch.device) -> None:
    """Join the process group (nothing to do for a single process)."""
    if not env.enabled or dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:  # launched by srun rather than torchrun
        os.environ["MASTER_ADDR"] = _slurm_master_addr()
        os.environ["MASTER_PORT"] = str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)


def device_for(env: DistEnv, device: torch.device) -> torch.device:
    """One GPU per process (``cuda:<local rank>``) in a multi-process GPU job."""
    if env.enabled and device.type == "cuda" and device.index is None:
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_module(module: nn.Module, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters (unless ``buffers_only``) and buffers to every rank."""
    if not active():
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BN running statistics and counters) to every rank with one flat
    broadcast per dtype: cheap enough to call every step (``broadcast_module`` makes one call per
    tensor)."""
    if not active():
        return
    buffers = list(module.buffers())
    for dtype in dict.fromkeys(b.dtype for b in buffers):  # first-seen order: the same on every rank
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.detach().reshape(-1) for b in group])
        dist.broadcast(flat, src=0)
        offset = 0
        for b in group:
            b.data.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def average_gradients(parameters) -> None:
    """Average ``.grad`` over ranks with one flat all-reduce per dtype.

    Done after ``backward`` instead of wrapping the model in ``DistributedDataParallel``, whose
    reducer expects one forward per backward: our methods run extra forward passes (attacks,
    AugMix views, generator steps) that it would reject. The result is the same gradient; what is
    given up is DDP's overlap of communication with the backward pass."""
    if not active():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    world_size = dist.get_world_size()
    for dtype in dict.fromkeys(g.dtype for g in grads):  # first-seen order: the same on every rank
        group = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` for a single process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The concatenation over ranks (in rank order) of tensors whose first dimension may differ."""
    if not active():
        return tensor
    parts = [p for p in all_gather_objects(tensor.detach().cpu()) if len(p)]  # a rank may have had no batch
    return torch.cat(parts).to(tensor.device) if parts else tensor


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    if device.type != "cuda":
        raise ConfigError("runtime.sync_bn=true needs CUDA devices (SyncBatchNorm does not run on CPU)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
