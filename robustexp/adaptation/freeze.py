"""Adapt then freeze: the protocol of certification and attacks under adaptive BN (Nandy et al. Sec. 3).

The BN statistics are adapted on one batch of (perturbed) test images with the adaptation's own
rule (prior N, momentum rho or the full batch) and then frozen: the noisy copies of one image that
certification draws, and the iterates of an attack, are classified with those statistics and must
never set them (SPEC). :class:`FrozenStatisticsGuard` checks that; certification
(:mod:`robustexp.evaluation.certify`), the attacks (:mod:`robustexp.evaluation.adversarial`) and
the loss-gradient images (:mod:`robustexp.evaluation.loss_gradient`) all use these functions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from robustexp.adaptation.base import TestTimeAdaptation
from robustexp.adaptation.bn import batchnorm_layers
from robustexp.errors import ConfigError


class FrozenStatisticsGuard:
    """Snapshot of every BN layer's running mean and variance; :meth:`check` raises if any of
    them changed (a batch of noisy copies of one image must never set them, SPEC)."""

    def __init__(self, model: nn.Module, what: str):
        self.what = what
        self.layers = batchnorm_layers(model)
        self.saved = [(layer.running_mean.clone(), layer.running_var.clone()) for _, layer in self.layers
                      if layer.running_mean is not None]

    def check(self) -> None:
        for (name, layer), (mean, var) in zip(self.layers, self.saved):
            if not (torch.equal(layer.running_mean, mean) and torch.equal(layer.running_var, var)):
                raise RuntimeError(f"{self.what}: the BN statistics of layer {name!r} changed while the model "
                                   "was to be frozen (noisy copies or adversarial iterates set them)")


def check_freezable(adaptation: TestTimeAdaptation | None, evaluator: str) -> TestTimeAdaptation | None:
    """The adaptation to adapt-then-freeze with, or None for the unadapted model. Only
    adaptations that can keep what they adapted on one batch (BN statistics) qualify; Tent
    (gradient steps on every batch) does not."""
    if adaptation is None or not adaptation.adapts:
        return None
    if not adaptation.freezable:
        raise ConfigError(f"eval {evaluator}: the adaptation {type(adaptation).__name__} cannot be adapted on one "
                          "batch and frozen; use a BN statistics adaptation (robustexp.adaptation.BatchNormAdaptation)")
    return adaptation


def adapt_and_freeze(model: nn.Module, adaptation: TestTimeAdaptation, images: torch.Tensor) -> None:
    """Nandy et al. Sec. 3: set the BN statistics from one batch of (perturbed) test images with
    the adaptation's rule (prior, momentum rho or full) and freeze them. The model stays in eval
    mode: the adaptation lives in the running buffers."""
    adaptation.reset()
    model.eval()
    with torch.no_grad():
        if adaptation.estimates_subset:
            adaptation.prepare_subset(model, [(images, None)], images.device)  # leaves them frozen
        else:
            model(images)
            adaptation.freeze()


@contextmanager
def frozen_adaptation(model: nn.Module, adaptation: TestTimeAdaptation | None,
                      images: torch.Tensor | None) -> Iterator[None]:
    """``adapt_and_freeze`` on entry (nothing without an adaptation), back to the source
    statistics on exit."""
    if adaptation is None:
        model.eval()
        yield
        return
    try:
        adapt_and_freeze(model, adaptation, images)
        yield
    finally:
        adaptation.reset()
