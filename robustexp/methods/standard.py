"""Standard training: cross-entropy on clean images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustexp.methods.base import TrainingMethod


class StandardTraining(TrainingMethod):
    """Minimize the cross-entropy of the clean batch (optionally with label smoothing)."""

    name = "standard"

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def training_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(1) == labels).float().mean()
        return loss, {"loss": loss.item(), "acc": accuracy.item()}
