"""The training loop: optimizer and schedule from config, a checkpoint every epoch, resume."""

from __future__ import annotations

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
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from robustexp.errors import ConfigError, NonFiniteLossError
from robustexp.methods.base import TrainingMethod
from robustexp.utils import atomic_torch_save, derive_seed, seed_dataloader_worker

CHECKPOINT_NAME = "last.pt"
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
        checkpoint_every: write ``checkpoints/last.pt`` every this many epochs (and always at the end).
        keep_epoch_checkpoints: also keep ``checkpoints/epoch_XXX.pt`` for every checkpointed epoch.

    Reproducibility and resume: the shuffling of epoch ``e`` uses a generator seeded from
    ``(seed, e)``, and the checkpoint stores model, optimizer, scheduler, method state and the
    python / numpy / torch RNG states. Rerunning an interrupted run therefore continues from
    its last checkpoint and ends with the same weights as an uninterrupted run.
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

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def checkpoint_path(run_dir: Path) -> Path:
        return Path(run_dir) / "checkpoints" / CHECKPOINT_NAME

    def _save_checkpoint(self, ctx: TrainContext, epoch: int, model, optimizer, scheduler, method, history) -> None:
        state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "method": method.state_dict(), "rng": _rng_state(), "history": history}
        atomic_torch_save(state, self.checkpoint_path(ctx.run_dir))
        if self.keep_epoch_checkpoints:
            atomic_torch_save(state, ctx.run_dir / "checkpoints" / f"epoch_{epoch:03d}.pt")

    # ------------------------------------------------------------------ loop
    def _loader(self, dataset: Dataset, ctx: TrainContext, epoch: int) -> DataLoader:
        generator = torch.Generator().manual_seed(derive_seed(ctx.seed, "shuffle", epoch))
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, generator=generator,
                          drop_last=self.drop_last and len(dataset) > self.batch_size,
                          num_workers=ctx.num_workers, worker_init_fn=seed_dataloader_worker,
                          pin_memory=ctx.device.type == "cuda", persistent_workers=False)

    def fit(self, model: nn.Module, method: TrainingMethod, train_set: Dataset, ctx: TrainContext) -> dict[str, Any]:
        """Train (or resume training) and return a summary of the training history."""
        model.to(ctx.device)
        method.setup(model, ctx.device)
        optimizer = self.optimizer_factory(params=[p for p in model.parameters() if p.requires_grad])
        steps_per_epoch = len(self._loader(train_set, ctx, 0))
        scheduler = None
        if self.scheduler_factory is not None:
            kwargs = {}
            if _accepts(self.scheduler_factory, "total_steps") and "total_steps" not in getattr(
                    self.scheduler_factory, "keywords", {}):
                kwargs["total_steps"] = max(1, self.epochs * steps_per_epoch)
            scheduler = self.scheduler_factory(optimizer=optimizer, **kwargs)
        history: list[dict[str, float]] = []
        start_epoch = 0
        path = self.checkpoint_path(ctx.run_dir)
        if path.is_file():
            state = torch.load(path, map_location=ctx.device, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state["scheduler"] is not None:
                scheduler.load_state_dict(state["scheduler"])
            method.load_state_dict(state["method"])
            _set_rng_state(state["rng"])
            history = list(state["history"])
            start_epoch = int(state["epoch"])
            print(f"[robustexp] resuming from {path} (epoch {start_epoch}/{self.epochs} done)")

        for epoch in range(start_epoch + 1, self.epochs + 1):
            history.append(self._train_epoch(model, method, optimizer, scheduler, train_set, ctx, epoch,
                                             steps_per_epoch))
            if scheduler is not None and self.scheduler_interval == "epoch":
                scheduler.step()
            ctx.log({"train/" + k: v for k, v in history[-1].items()}, None)
            if epoch % self.checkpoint_every == 0 or epoch == self.epochs:
                self._save_checkpoint(ctx, epoch, model, optimizer, scheduler, method, history)
        if self.epochs > 0:
            atomic_torch_save(model.state_dict(), ctx.run_dir / "checkpoints" / FINAL_WEIGHTS_NAME)
        return {"epochs": self.epochs, "history": history, "final": history[-1] if history else {}}

    def _train_epoch(self, model, method, optimizer, scheduler, train_set, ctx: TrainContext, epoch: int,
                     steps_per_epoch: int) -> dict[str, float]:
        model.train()
        sums: dict[str, float] = {}
        n_steps, n_images, start = 0, 0, time.perf_counter()
        bar = tqdm(self._loader(train_set, ctx, epoch), total=steps_per_epoch, desc=f"epoch {epoch}/{self.epochs}",
                   leave=False, disable=not ctx.progress, mininterval=1.0)
        for images, labels in bar:
            images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
            loss, logs = method.training_step(model, images, labels)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"the training loss is {loss.item()} at epoch {epoch}, step {n_steps + 1} "
                    f"(method {method.name}, lr {optimizer.param_groups[0]['lr']:.3g}); lower trainer.optimizer.lr "
                    f"or set trainer.grad_clip_norm. The last checkpoint "
                    f"({self.checkpoint_path(ctx.run_dir)}) is kept.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip_norm)
            optimizer.step()
            if scheduler is not None and self.scheduler_interval == "step":
                scheduler.step()
            n_steps += 1
            n_images += len(labels)
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + value
            if n_steps % 20 == 0:
                bar.set_postfix(loss=f"{sums.get('loss', math.nan) / n_steps:.3f}")
        bar.close()
        summary = {key: value / max(n_steps, 1) for key, value in sums.items()}
        summary.update(epoch=epoch, lr=optimizer.param_groups[0]["lr"],
                       images_per_s=n_images / max(time.perf_counter() - start, 1e-9))
        print(f"[robustexp] epoch {epoch}/{self.epochs}: " +
              ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if k != "epoch"))
        return summary
