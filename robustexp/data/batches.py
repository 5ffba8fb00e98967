"""The order and the batches in which test sets are read: one fixed order for every evaluator and
every corrupted copy of the test split, and regrouping of batch streams.

These live in ``data/`` (not ``evaluation/``) because the corruption sources
(:mod:`robustexp.data.corruptions.sources`) stream their subsets through them; the evaluators
import them from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

EVALUATION_ORDER_SEED = 20201  # fixed: every run, evaluator and corrupted subset sees the same order


def evaluation_order(n_images: int, max_images: int | None = None) -> torch.Tensor:
    """The order in which every evaluator visits a test set of ``n_images``: one fixed random
    permutation, truncated to ``max_images`` (a random subset, not the first images).

    Test sets are often stored sorted by class (ImageFolder trees, the embedded digits); batches
    drawn in that order would hold one class each, which test-time adaptation would normalize
    away. The papers adapt on shuffled, i.i.d. test batches; so do we, in every evaluation."""
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(EVALUATION_ORDER_SEED))
    return order[:max_images] if max_images is not None else order


def test_batches(dataset: Dataset, batch_size: int, ctx, max_images: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test split (or a corrupted copy of it, item for item) in :func:`evaluation_order`.
    ``ctx``: the evaluation context (:class:`robustexp.evaluation.base.EvalContext`), of which the
    loader uses ``num_workers`` and ``device`` (pinned memory for CUDA)."""
    subset = torch.utils.data.Subset(dataset, evaluation_order(len(dataset), max_images).tolist())
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=ctx.num_workers,
                        pin_memory=ctx.device.type == "cuda")
    yield from loader


test_batches.__test__ = False  # a data helper, not a pytest test (tests import it by name)


def rebatch(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], batch_size: int
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
