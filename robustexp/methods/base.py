"""The interface between the trainer and a training objective."""

from __future__ import annotations

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

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state but the checkpoint holds {sorted(state)}")
