"""The interface between the runner and an evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from robustexp import distributed
from robustexp.data.base import DataSplits
from robustexp.evaluation.metrics import AccuracyMeter


@dataclass
class EvalContext:
    run_dir: Path
    device: torch.device
    seed: int
    progress: bool = True
    num_workers: int = 0
    log: Callable[[dict[str, Any]], None] = lambda metrics: None
    adaptation: Any = None   # a test-time adaptation attached to the model (robustexp.adaptation), or None
    suffix: str = ""         # "@<mode>+<variant>" of this evaluation in metrics.json ("" for the plain model)


class Evaluator:
    """An evaluation. ``evaluate`` returns a JSON-able dict that the runner merges into
    ``metrics.json`` under the evaluator's key; ``table`` renders it for the console.
    ``per_variant = False`` marks an evaluation whose result does not depend on the test-time
    adaptation (it is then run once, not once per adaptation variant)."""

    per_variant = True

    def evaluate(self, model: nn.Module, data: DataSplits, ctx: EvalContext) -> dict[str, Any]:
        raise NotImplementedError

    def table(self, results: dict[str, Any]) -> str:
        return ""

    def headline(self, results: dict[str, Any]) -> dict[str, float]:
        """The few numbers that go into the run's summary (and W&B's run summary)."""
        return {}

    def compare_rows(self, results: dict[str, Any]) -> list[tuple[str, float]]:
        """(label, top-1 %) rows for the table that compares adaptation variants."""
        return []


EVALUATION_ORDER_SEED = 20201  # fixed: every run, evaluator and corrupted subset sees the same order


def evaluation_order(n_images: int, max_images: int | None = None) -> torch.Tensor:
    """The order in which every evaluator visits a test set of ``n_images``: one fixed random
    permutation, truncated to ``max_images`` (a random subset, not the first images).

    Test sets are often stored sorted by class (ImageFolder trees, the embedded digits); batches
    drawn in that order would hold one class each, which test-time adaptation would normalize
    away. The papers adapt on shuffled, i.i.d. test batches; so do we, in every evaluation."""
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(EVALUATION_ORDER_SEED))
    return order[:max_images] if max_images is not None else order


def test_batches(dataset: Dataset, batch_size: int, ctx: EvalContext, max_images: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test split (or a corrupted copy of it, item for item) in :func:`evaluation_order`."""
    subset = torch.utils.data.Subset(dataset, evaluation_order(len(dataset), max_images).tolist())
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=ctx.num_workers,
                        pin_memory=ctx.device.type == "cuda")
    yield from loader


def rebatch(batches, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Regroup a stream of (images, labels) batches into batches of exactly ``batch_size``
    (the last one may be smaller)."""
    pending_x, pending_y, count = [], [], 0
    for images, labels in batches:
        pending_x.append(images)
        pending_y.append(labels)
        count += len(labels)
        while count >= batch_size:
            x, y = torch.cat(pending_x), torch.cat(pending_y)
            yield x[:batch_size], y[:batch_size]
            pending_x, pending_y, count = [x[batch_size:]], [y[batch_size:]], count - batch_size
    if count:
        yield torch.cat(pending_x), torch.cat(pending_y)


def evaluate_batches(model: nn.Module, batches, device: torch.device,
                     after_first_batch: Callable[[], None] | None = None,
                     predict: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                     shard: bool = False) -> dict[str, float]:
    """Top-1 / top-5 / loss / calibration of ``model`` in eval mode over ``batches``.
    ``predict(model, images)`` replaces the plain forward pass (an adaptation that updates the
    model while it predicts, such as Tent, runs its own gradient steps there).

    ``shard=True`` in a multi-process run: rank r predicts batches r, r + K, r + 2K, ... (the same
    batches a single process would form, so batch-dependent adaptation is unchanged), and the
    logits of all ranks are gathered before the metrics are computed: the totals are exact and
    every rank returns the same result."""
    model.eval()
    meter = AccuracyMeter()
    rank, world_size = distributed.world() if shard else (0, 1)
    gathered: list[tuple[torch.Tensor, torch.Tensor]] = []
    for index, (images, labels) in enumerate(batches):
        if index % world_size != rank:
            continue
        images = images.to(device, non_blocking=True)
        if predict is not None:
            logits = predict(model, images).detach()
        else:
            with torch.no_grad():
                logits = model(images)
        if world_size > 1:
            gathered.append((logits.float().cpu(), labels.cpu()))
        else:
            meter.update(logits, labels.to(device))
        if index == 0 and after_first_batch is not None:
            after_first_batch()
    if world_size > 1:
        logits = torch.cat([g[0] for g in gathered]) if gathered else torch.empty(0, 0)
        labels = torch.cat([g[1] for g in gathered]) if gathered else torch.empty(0, dtype=torch.long)
        logits_all, labels_all = distributed.all_gather_tensor(logits), distributed.all_gather_tensor(labels)
        meter.update(logits_all.reshape(len(labels_all), -1), labels_all)
    return meter.result()


def evaluate_subset(model: nn.Module, make_batches: Callable[[int], Iterator], ctx: EvalContext,
                    batch_size: int) -> dict[str, float]:
    """Evaluate one subset (the clean test split, or one corruption at one severity) under the
    context's test-time adaptation: statistics are reset before and after, so nothing leaks
    between subsets; the adaptation's batch size n replaces the evaluator's; full adaptation
    first estimates the statistics over the whole subset (on every rank, over all of it).
    In a multi-process run the predictions are sharded over ranks (see :func:`evaluate_batches`)."""
    adaptation = ctx.adaptation
    if adaptation is None:
        return evaluate_batches(model, make_batches(batch_size), ctx.device, shard=True)
    n = getattr(adaptation, "batch_size", None) or batch_size
    adaptation.reset()
    try:
        if getattr(adaptation, "full", False):
            adaptation.estimate_full(model, make_batches(batch_size), ctx.device)
        freeze = adaptation.freeze if getattr(adaptation, "freeze_after", False) else None
        predict = getattr(adaptation, "predict", None)
        # batches are independent unless the adaptation carries state from batch to batch
        # (adapt-then-freeze, Tent): those run whole on every rank, so results never depend on K
        return evaluate_batches(model, make_batches(n), ctx.device, after_first_batch=freeze, predict=predict,
                                shard=freeze is None and predict is None)
    finally:
        adaptation.reset()
