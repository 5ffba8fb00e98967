"""The interface between the evaluators and a test-time adaptation.

An evaluation variant is one :class:`TestTimeAdaptation` attached to the model for the whole
variant: the runner calls :meth:`~TestTimeAdaptation.attach` once, the evaluators call
:meth:`~TestTimeAdaptation.reset` before and after every subset (a corruption at a severity, the
clean test split) so that nothing adapted on one subset reaches the next, and the runner calls
:meth:`~TestTimeAdaptation.detach` at the end, which leaves the model exactly as it was.

Between those calls an evaluator asks only what this class declares; no evaluator probes an
adaptation for attributes. The unadapted model is :class:`NoAdaptation`, which adapts nothing.

Implementations: :class:`robustexp.adaptation.bn.BatchNormAdaptation` (Schneider et al. eq. 3,
Nandy et al. Sec. 3, full statistics) and :class:`robustexp.adaptation.tent.TentAdaptation`
(Wang et al. 2021). The adapt-then-freeze protocol of certification and attacks lives in
:mod:`robustexp.adaptation.freeze`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from robustexp.errors import ConfigError


class TestTimeAdaptation:
    """A test-time adaptation of a model's BatchNorm layers.

    Attributes an evaluator may read (class or instance attributes):

    * ``batch_size``: n, the images per test batch the adaptation is defined for (the evaluators
      use it as their batch size); ``None``: the evaluator's.
    * ``adapts``: False only for the unadapted model (:class:`NoAdaptation`).
    * ``freezable``: the adaptation can adapt on one batch and keep what it adapted
      (:meth:`freeze`); BN statistics can, Tent (gradient steps on every batch) cannot.
    * ``freeze_after``: adapt on the first batch of every subset, then freeze.
    * ``estimates_subset``: the statistics of the whole subset are estimated in one pass
      (:meth:`prepare_subset`) before any prediction, which all use them unchanged ("full"
      adaptation; the evaluation then folds them into the convolutions, as for the plain model).
    * ``updates_weights``: every prediction takes gradient steps, so a batch depends on the ones
      before it (Tent).
    """

    __test__ = False  # not a pytest test class, whatever its name

    batch_size: int | None = None
    adapts = True
    freezable = False
    freeze_after = False
    estimates_subset = False
    updates_weights = False

    def attach(self, model: nn.Module) -> TestTimeAdaptation:
        """Install the adaptation on ``model`` (once per evaluation variant); returns self."""
        raise NotImplementedError

    def detach(self) -> None:
        """Remove the adaptation and leave the model exactly as before :meth:`attach`."""
        raise NotImplementedError

    def reset(self) -> None:
        """Back to the model as trained, ready to adapt to a new subset."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for logs and metrics.json: what is adapted and how."""
        raise NotImplementedError

    def label(self) -> str:
        """A short, file-name safe name from the adaptation's parameters (``bn-prior-N16-n8``):
        what evaluations outside the runner's variants put in their file names."""
        return type(self).__name__.lower()

    @property
    def independent_batches(self) -> bool:
        """Whether the batches of a subset can be predicted in any order and on any process (a
        multi-process evaluation shards them): not after a freeze, not with weight updates."""
        return not (self.freeze_after or self.updates_weights)

    def prepare_subset(self, model: nn.Module, batches: Iterable, device: torch.device) -> None:
        """Before the first prediction on a subset: estimate what needs the whole subset
        (``estimates_subset``); nothing otherwise."""

    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The logits of ``images`` under the adaptation (a plain forward pass unless the
        adaptation updates the model while it predicts)."""
        return model(images)

    def freeze(self) -> None:
        """Keep what was adapted on the last batch for every following batch."""
        raise ConfigError(f"the adaptation {type(self).__name__} cannot be adapted on one batch and frozen")


class NoAdaptation(TestTimeAdaptation):
    """The model as trained: the ``none`` variant of every evaluation."""

    adapts = False
    freezable = True  # freezing nothing is a no-op

    def attach(self, model: nn.Module) -> NoAdaptation:
        return self

    def detach(self) -> None:
        pass

    def reset(self) -> None:
        pass

    def freeze(self) -> None:
        pass

    def describe(self) -> str:
        return "no adaptation"

    def label(self) -> str:
        return ""


def require_unadapted(adaptation: TestTimeAdaptation | None, evaluator: str) -> None:
    """For evaluations of the model as trained (``per_variant = False``): the runner gives them the
    unadapted model (:mod:`robustexp.evaluation.loop`); refuse an attached adaptation rather than
    measure the adapted model by mistake."""
    if adaptation is not None and adaptation.adapts:
        raise ConfigError(f"eval {evaluator} measures the model as trained and must run without a test-time "
                          f"adaptation; got {adaptation.describe()}")
