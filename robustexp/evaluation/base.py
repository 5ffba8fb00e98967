"""The interface between the runner and an evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustexp import distributed
from robustexp.adaptation.base import NoAdaptation, TestTimeAdaptation
from robustexp.data.base import DataSplits
from robustexp.evaluation.metrics import AccuracyMeter
from robustexp.models.folding import fold_frozen_batchnorm


@dataclass
class EvalContext:
    run_dir: Path
    device: torch.device
    seed: int
    progress: bool = True
    num_workers: int = 0
    log: Callable[[dict[str, Any]], None] = lambda metrics: None
    # the test-time adaptation attached to the model for this evaluation (NoAdaptation: the model as trained)
    adaptation: TestTimeAdaptation = field(default_factory=NoAdaptation)
    suffix: str = ""         # "@<mode>+<variant>" of this evaluation in metrics.json ("" for the plain model)

    def __post_init__(self):
        if self.adaptation is None:  # accepted for the model as trained
            self.adaptation = NoAdaptation()


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

    def derived(self, summary: dict[str, float], suffix: str) -> dict[str, float]:
        """Summary numbers this evaluator derives from the summary of one mode and variant (keys
        end in ``suffix``), computed after every evaluator of that variant has run: numbers that
        combine several evaluations, such as the clean-to-corrupted gap."""
        return {}


# CPU forward passes of an evaluation take at most this many images: the activations of a batch
# of 500 digits (50 MB per layer) leave the caches and exceed glibc's mmap threshold, so every layer
# page-faults fresh memory; chunks of 128 run 1.2-1.7x faster (small CNN, eval; the images and
# their order are the evaluator's, and in eval mode an image's logits do not depend on its batch)
CPU_FORWARD_CHUNK = 128


@torch.no_grad()
def forward_in_chunks(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``model(images)`` in chunks of :data:`CPU_FORWARD_CHUNK` images on CPU (whole on a GPU).
    Only for a model whose output for an image does not depend on the rest of its batch (frozen
    statistics): batch-statistics adaptation sees the evaluator's whole batch."""
    if images.device.type != "cpu" or len(images) <= CPU_FORWARD_CHUNK:
        return model(images)
    return torch.cat([model(chunk) for chunk in images.split(CPU_FORWARD_CHUNK)])


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
    if not adaptation.adapts:  # frozen statistics: BN folded into the convolutions (one memory pass less)
        return evaluate_batches(fold_frozen_batchnorm(model.eval()), make_batches(batch_size), ctx.device,
                                predict=forward_in_chunks, shard=True)
    adaptation.reset()
    try:
        adaptation.prepare_subset(model, make_batches(batch_size), ctx.device)  # full: the whole subset first
        if adaptation.estimates_subset and not (adaptation.freeze_after or adaptation.updates_weights):
            # the statistics are fixed for every prediction now: fold them as the plain model's
            return evaluate_batches(fold_frozen_batchnorm(model.eval()),
                                    make_batches(adaptation.batch_size or batch_size), ctx.device,
                                    predict=forward_in_chunks, shard=True)
        # batches are independent unless the adaptation carries state from batch to batch
        # (adapt-then-freeze, Tent): those run whole on every rank, so results never depend on K
        return evaluate_batches(model, make_batches(adaptation.batch_size or batch_size), ctx.device,
                                after_first_batch=adaptation.freeze if adaptation.freeze_after else None,
                                predict=adaptation.predict if adaptation.updates_weights else None,
                                shard=adaptation.independent_batches)
    finally:
        adaptation.reset()
