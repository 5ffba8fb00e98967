"""The interface between the trainer and a training objective."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn


class TrainingMethod:
    """A training objective. The trainer owns the classifier's optimizer and loop; a method
    turns a batch into a loss. Methods with state of their own (a noise generator, a replay
    buffer) set it up in :meth:`setup` and expose it through ``state_dict`` so that it is
    checkpointed and restored on resume."""

    name = "base"

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Called once before training (and before a checkpoint is restored)."""

    def training_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimize on one batch, and scalars to log."""
        raise NotImplementedError

    def evaluation_modes(self, model: nn.Module) -> dict[str, Callable[[], AbstractContextManager[nn.Module]]]:
        """How the trained model is evaluated: ``{mode name: opener}``, where ``opener()`` is a
        context manager that yields the module the evaluators see and undoes any change on exit.

        The default is the trained model itself under the empty name (metrics keep their plain
        keys). A method that evaluates differently overrides it: AdvBN switches between its main
        and auxiliary BatchNorms, RSE wraps the model in a noisy test-time ensemble. Named modes
        suffix every metric with ``@<mode>``; every adaptation variant runs inside every mode."""
        return {"": lambda: contextlib.nullcontext(model)}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state but the checkpoint holds {sorted(state)}")
