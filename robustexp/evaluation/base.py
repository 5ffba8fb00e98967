"""The interface between the runner and an evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

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


class Evaluator:
    """An evaluation. ``evaluate`` returns a JSON-able dict that the runner merges into
    ``metrics.json`` under the evaluator's key; ``table`` renders it for the console."""

    def evaluate(self, model: nn.Module, data: DataSplits, ctx: EvalContext) -> dict[str, Any]:
        raise NotImplementedError

    def table(self, results: dict[str, Any]) -> str:
        return ""

    def headline(self, results: dict[str, Any]) -> dict[str, float]:
        """The few numbers that go into the run's summary (and W&B's run summary)."""
        return {}


def test_batches(dataset: Dataset, batch_size: int, ctx: EvalContext, max_images: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test split in a fixed order, optionally truncated to its first ``max_images``."""
    if max_images is not None and max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(max_images))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=ctx.num_workers,
                        pin_memory=ctx.device.type == "cuda")
    yield from loader


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches, device: torch.device,
                     transform: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> dict[str, float]:
    """Top-1 / top-5 / loss of ``model`` in eval mode over ``batches``; ``transform(images, index)``
    is applied to each batch first (a corruption, noise)."""
    model.eval()
    meter = AccuracyMeter()
    for index, (images, labels) in enumerate(batches):
        if transform is not None:
            images = transform(images, index)
        meter.update(model(images.to(device, non_blocking=True)), labels.to(device))
    return meter.result()
