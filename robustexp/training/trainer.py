"""The training loop: optimizer and schedule from config, a checkpoint every epoch, resume."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from robustexp import distributed
from robustexp.errors import CheckpointError, ConfigError, NonFiniteLossError
from robustexp.methods.base import TrainingMethod
from robustexp.preemption import PreemptionHandler
from robustexp.training.checkpoints import LAST_NAME, load_checkpoint, save_checkpoint
from robustexp.utils import atomic_torch_save, derive_seed, seed_dataloader_worker

log = logging.getLogger(__name__)

CHECKPOINT_NAME = LAST_NAME
FINAL_WEIGHTS_NAME = "model_final.pt"


@dataclass
class TrainContext:
    """What the trainer needs to know about the run it belongs to."""

    run_dir: Path
    device: torch.device
    seed: int
    log: Callable[[dict[str, Any], int | None], None] = lambda metrics, step=None: None
    progress: bool = True
    num_workers: int = 0
    pin_memory: bool | None = None        # None: on CUDA devices
    persistent_workers: bool = False      # keep DataLoader workers alive across epochs
    amp: str | None = None                # None | "bf16" | "fp16": autocast for the training forward pass
    channels_last: bool = False           # NHWC memory format for model and images (faster convs on GPU)
    compile: bool = False                 # torch.compile the model for training
    preemption: PreemptionHandler | None = None  # checkpoint and stop on SIGTERM / SIGUSR1 / SIGUSR2

    @property
    def is_main(self) -> bool:
        return distributed.world()[0] == 0


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class EpochSampler(DistributedSampler):
    """The shuffled order of one epoch, this rank's share of it, from a given position on.

    The order of epoch ``e`` is a permutation seeded from ``(seed, e)``, the order a fresh
    ``DataLoader(shuffle=True, generator=Generator().manual_seed(that seed))`` gives (tested), and
    independent of the global RNG. With K ranks the permutation is padded
    to a multiple of K and rank r takes every K-th index from r (``DistributedSampler``'s
    convention). ``start`` skips the first indices of the epoch: a run resumed from a mid-epoch
    checkpoint continues with exactly the images it had not seen yet."""

    def __init__(self, dataset: Dataset, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def __iter__(self):
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "shuffle", self.epoch))
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's base-seed draw
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        if self.num_replicas > 1:
            order += order[:self.total_size - len(order)]
            order = order[self.rank:self.total_size:self.num_replicas]
        return iter(order[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def _accepts(factory: Callable, parameter: str) -> bool:
    """Whether a (partial) callable takes ``parameter``."""
    import inspect

    target = getattr(factory, "func", factory)
    try:
        return parameter in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": random.getstate()[0], "state": list(random.getstate()[1])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate((state["python"]["version"], tuple(state["python"]["state"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Mini-batch training of ``model`` with a :class:`TrainingMethod`.

    Args:
        epochs: number of passes over the training split (0 skips training).
        batch_size: images per step.
        optimizer: a partial optimizer (``_partial_: true`` in the config), called with the parameters.
        scheduler: a partial LR scheduler called with the optimizer, or None.
        scheduler_interval: ``epoch`` or ``step``: when ``scheduler.step()`` is called.
        grad_clip_norm: clip the gradient norm to this value (None: no clipping).
        checkpoint_every: write ``checkpoints/last.pt`` every this many epochs (and always at the end);
            the checkpoint it replaces is kept as ``checkpoints/previous.pt``.
        keep_epoch_checkpoints: also keep ``checkpoints/epoch_XXX.pt`` for every checkpointed epoch.

    Reproducibility and resume: the shuffling of epoch ``e`` uses a generator seeded from
    ``(seed, e)``, and the checkpoint stores model, optimizer, scheduler, method state and the
    python / numpy / torch RNG states. Rerunning an interrupted run therefore continues from
    its last checkpoint and ends with the same weights as an uninterrupted run; from
    ``previous.pt`` when ``last.pt`` is damaged (:mod:`robustexp.training.checkpoints`).
    """

    def __init__(self, epochs: int, batch_size: int, optimizer: Callable, scheduler: Callable | None = None,
                 scheduler_interval: str = "epoch", grad_clip_norm: float | None = None,
                 checkpoint_every: int = 1, keep_epoch_checkpoints: bool = False, drop_last: bool = True):
        if scheduler_interval not in ("epoch", "step"):
            raise ConfigError(f"trainer.scheduler_interval={scheduler_interval!r}; expected 'epoch' or 'step'")
        if epochs < 0 or batch_size < 1:
            raise ConfigError(f"trainer.epochs must be >= 0 and trainer.batch_size >= 1, got {epochs}, {batch_size}")
        self.epochs = epochs
        self.batch_size = batch_size
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.grad_clip_norm = grad_clip_norm
        self.checkpoint_every = max(1, checkpoint_every)
        self.keep_epoch_checkpoints = keep_epoch_checkpoints
        self.drop_last = drop_last
        self._keep_previous = True  # False while last.pt is a damaged file (fit fell back to previous.pt)

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def checkpoint_path(run_dir: Path) -> Path:
        return Path(run_dir) / "checkpoints" / CHECKPOINT_NAME

    def _save_checkpoint(self, ctx: TrainContext, epoch: int, model, optimizer, scheduler, scaler, method, history,
                         partial: dict | None = None) -> None:
        """``epoch`` complete epochs, plus ``partial`` progress into the next one (a mid-epoch
        checkpoint on a preemption signal). Only rank 0 writes; it stores every rank's RNG states."""
        rng_ranks = distributed.all_gather_objects(_rng_state())
        if partial is not None:  # every rank's running sums of the interrupted epoch (each logs its own share)
            partial = {**partial, "sums_ranks": distributed.all_gather_objects(partial["sums"])}
        if not ctx.is_main:
            distributed.barrier()
            return
        state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "method": method.state_dict(), "rng": rng_ranks[0], "rng_ranks": rng_ranks, "history": history,
                 "partial": partial}
        save_checkpoint(state, self.checkpoint_path(ctx.run_dir).parent, keep_previous=self._keep_previous)
        self._keep_previous = True
        if self.keep_epoch_checkpoints and partial is None:
            atomic_torch_save(state, ctx.run_dir / "checkpoints" / f"epoch_{epoch:03d}.pt")
        distributed.barrier()

    # ------------------------------------------------------------------ loop
    def _loader(self, dataset: Dataset, ctx: TrainContext) -> DataLoader:
        rank, world_size = distributed.world()
        sampler = EpochSampler(dataset, ctx.seed, rank, world_size)
        pin = ctx.device.type == "cuda" if ctx.pin_memory is None else ctx.pin_memory
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                          drop_last=self.drop_last and sampler.num_samples > self.batch_size,
                          num_workers=ctx.num_workers, worker_init_fn=seed_dataloader_worker, pin_memory=pin,
                          persistent_workers=ctx.persistent_workers and ctx.num_workers > 0,
                          generator=torch.Generator())  # worker seeds drawn from it, not from the global RNG

    @staticmethod
    def _set_epoch(loader: DataLoader, ctx: TrainContext, epoch: int, start_step: int = 0) -> None:
        loader.sampler.set_epoch(epoch)
        loader.sampler.start = start_step * loader.batch_size
        loader.generator.manual_seed(derive_seed(ctx.seed, "workers", epoch))

    def fit(self, model: nn.Module, method: TrainingMethod, train_set: Dataset, ctx: TrainContext) -> dict[str, Any]:
        """Train (or resume training) and return a summary of the training history."""
        if ctx.amp is not None and ctx.amp not in AMP_DTYPES:
            raise ConfigError(f"runtime.amp={ctx.amp!r}; expected null, 'bf16' or 'fp16'")
        if ctx.amp == "fp16" and ctx.device.type != "cuda":
            raise ConfigError("runtime.amp=fp16 needs a CUDA device; use bf16 on CPU")
        model.to(ctx.device)
        if ctx.channels_last:
            model.to(memory_format=torch.channels_last)
        method.setup(model, ctx.device)
        distributed.broadcast_module(model)  # every rank starts from rank 0's weights
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=parameters)
        scaler = torch.amp.GradScaler(ctx.device.type) if ctx.amp == "fp16" else None
        loader = self._loader(train_set, ctx)
        steps_per_epoch = len(loader)
        scheduler = None
        if self.scheduler_factory is not None:
            kwargs = {}
            if _accepts(self.scheduler_factory, "total_steps") and "total_steps" not in getattr(
                    self.scheduler_factory, "keywords", {}):
                kwargs["total_steps"] = max(1, self.epochs * steps_per_epoch)
            scheduler = self.scheduler_factory(optimizer=optimizer, **kwargs)
        history: list[dict[str, float]] = []
        start_epoch, partial = 0, None
        state, path = load_checkpoint(self.checkpoint_path(ctx.run_dir).parent)  # on the CPU; raises CheckpointError
        self._keep_previous = path is None or path.name == LAST_NAME  # never keep a damaged last.pt as previous.pt
        if state is not None:
            try:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                if scheduler is not None and state["scheduler"] is not None:
                    scheduler.load_state_dict(state["scheduler"])
                if scaler is not None and state.get("scaler"):
                    scaler.load_state_dict(state["scaler"])
                method.load_state_dict(state["method"])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise CheckpointError(
                    f"{path} does not fit this run's model, optimizer or method ({type(exc).__name__}: {exc}); was "
                    f"the code changed since it was written? To train this run from scratch, delete {path.parent} "
                    "and rerun the same command; to keep it, add tag=<name> to the command") from exc
            rank, world_size = distributed.world()
            rng_ranks = state.get("rng_ranks") or [state["rng"]]
            _set_rng_state(rng_ranks[rank] if len(rng_ranks) == world_size else state["rng"])
            history = list(state["history"])
            start_epoch, partial = int(state["epoch"]), state.get("partial")
            where = f", {partial['step']} steps into epoch {start_epoch + 1}" if partial else ""
            if ctx.is_main:
                log.info("resuming from %s (epoch %d/%d done%s)", path, start_epoch, self.epochs, where)

        train_model = torch.compile(model) if ctx.compile else model
        try:
            for epoch in range(start_epoch + 1, self.epochs + 1):
                history.append(self._train_epoch(train_model, model, method, optimizer, scheduler, scaler, loader,
                                                 ctx, epoch, steps_per_epoch, history,
                                                 partial if epoch == start_epoch + 1 else None))
                if scheduler is not None and self.scheduler_interval == "epoch":
                    scheduler.step()
                distributed.broadcast_module(model, buffers_only=True)  # rank 0's BN running statistics
                ctx.log({"train/" + k: v for k, v in history[-1].items()}, None)
                stop = self._stop_requested(ctx.preemption) and epoch < self.epochs
                if epoch % self.checkpoint_every == 0 or epoch == self.epochs or stop:
                    self._save_checkpoint(ctx, epoch, model, optimizer, scheduler, scaler, method, history)
                if stop:
                    if ctx.is_main:
                        log.info("signal received: checkpoint written after epoch %d", epoch)
                    ctx.preemption.hand_over(str(self.checkpoint_path(ctx.run_dir)))
        finally:
            if ctx.channels_last:
                model.to(memory_format=torch.contiguous_format)
        if self.epochs > 0 and ctx.is_main:
            atomic_torch_save(model.state_dict(), ctx.run_dir / "checkpoints" / FINAL_WEIGHTS_NAME)
        distributed.barrier()
        return {"epochs": self.epochs, "history": history, "final": history[-1] if history else {}}

    def _stop_requested(self, preemption: PreemptionHandler | None) -> bool:
        """Whether any rank received a preemption signal (ranks agree, so they stop at the same step)."""
        flag = preemption is not None and preemption.requested
        if distributed.active():
            return any(distributed.all_gather_objects(flag))
        return flag

    def _train_epoch(self, train_model, model, method, optimizer, scheduler, scaler, loader, ctx: TrainContext,
                     epoch: int, steps_per_epoch: int, history, partial: dict | None) -> dict[str, float]:
        model.train()
        start_step = int(partial["step"]) if partial else 0
        self._set_epoch(loader, ctx, epoch, start_step)
        sums: dict[str, float] = {}
        if partial:  # this rank's running sums (older checkpoints hold rank 0's only)
            ranks = partial.get("sums_ranks")
            sums = dict(ranks[distributed.world()[0]] if ranks else partial["sums"])
        n_steps, n_images = start_step, int(partial["n_images"]) if partial else 0
        elapsed_before, start = float(partial["seconds"]) if partial else 0.0, time.perf_counter()
        autocast = torch.autocast(ctx.device.type, dtype=AMP_DTYPES[ctx.amp]) if ctx.amp else None
        bar = tqdm(loader, total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch}/{self.epochs}",
                   leave=False, disable=not (ctx.progress and ctx.is_main), mininterval=1.0)
        for images, labels in bar:
            images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
            if ctx.channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            if autocast is not None:
                with autocast:
                    loss, logs = method.training_step(train_model, images, labels)
            else:
                loss, logs = method.training_step(train_model, images, labels)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"the training loss is {loss.item()} at epoch {epoch}, step {n_steps + 1} "
                    f"(method {method.name}, lr {optimizer.param_groups[0]['lr']:.3g}); lower trainer.optimizer.lr "
                    f"or set trainer.grad_clip_norm. The last checkpoint "
                    f"({self.checkpoint_path(ctx.run_dir)}) is kept.")
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.unscale_(optimizer)
            distributed.average_gradients(p for group in optimizer.param_groups for p in group["params"])
            if self.grad_clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if scheduler is not None and self.scheduler_interval == "step":
                scheduler.step()
            n_steps += 1
            n_images += len(labels)
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + value
            if n_steps % 20 == 0:
                bar.set_postfix(loss=f"{sums.get('loss', math.nan) / n_steps:.3f}")
            if self._stop_requested(ctx.preemption) and n_steps < steps_per_epoch:
                seconds = elapsed_before + time.perf_counter() - start
                self._save_checkpoint(ctx, epoch - 1, model, optimizer, scheduler, scaler, method, history,
                                      partial={"step": n_steps, "sums": sums, "n_images": n_images,
                                               "seconds": seconds})
                if ctx.is_main:
                    log.info("signal received: checkpoint written at epoch %d, step %d", epoch, n_steps)
                ctx.preemption.hand_over(str(self.checkpoint_path(ctx.run_dir)))
        bar.close()
        totals = distributed.all_gather_objects((sums, n_steps, n_images))
        summary = {key: sum(t[0].get(key, 0.0) for t in totals) / max(sum(t[1] for t in totals), 1) for key in sums}
        seconds = elapsed_before + time.perf_counter() - start
        summary.update(epoch=epoch, lr=optimizer.param_groups[0]["lr"],
                       images_per_s=sum(t[2] for t in totals) / max(seconds, 1e-9))
        if ctx.is_main:
            log.info("epoch %d/%d: %s", epoch, self.epochs,
                     ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if k != "epoch"))
        return summary
