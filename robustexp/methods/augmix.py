"""AugMix training (Hendrycks et al. 2020, eq. in Sec. 3; MAGN paper eq. 5).

    L = CE(f(x), y) + lambda * JS(p(x); p(x_a1); p(x_a2))

with ``x_a1``, ``x_a2`` two independent AugMix draws of the batch (robustexp/data/augmix_ops.py),
``JS(p; q; z) = (KL(p || M) + KL(q || M) + KL(z || M)) / 3``, ``M = (p + q + z) / 3``, and the
cross-entropy on the clean images only. ``lambda = 12`` (the reference's CIFAR setting). As in
the reference implementation, clean and augmented images go through the network as one batch of
3B images, so BatchNorm normalizes them with shared batch statistics; no distribution is
detached (the gradient of the JS term reaches all three).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustexp.data.augmix_ops import OPERATIONS, AugMix
from robustexp.errors import ConfigError
from robustexp.losses import jensen_shannon
from robustexp.methods.base import TrainingMethod


def augmix_options(severity: float, width: int, depth: int, alpha: float, operations) -> AugMix:
    return AugMix(severity=severity, width=width, depth=depth, alpha=alpha,
                  operations=tuple(operations) if operations is not None else OPERATIONS)


class AugMixTraining(TrainingMethod):
    """Cross-entropy on the clean batch plus ``lambda_jsd`` times the Jensen-Shannon consistency
    between the clean batch and two AugMix draws of it (see the module docstring)."""

    def __init__(self, lambda_jsd: float = 12.0, severity: float = 3.0, width: int = 3, depth: int = -1,
                 alpha: float = 1.0, operations: Sequence[str] | None = None):
        if lambda_jsd < 0:
            raise ConfigError(f"method.lambda_jsd={lambda_jsd}; expected >= 0")
        self.lambda_jsd = float(lambda_jsd)
        self.augmix = augmix_options(severity, width, depth, alpha, operations)
        self.name = f"AugMix (JSD lambda {lambda_jsd:g}, severity {severity:g}, width {width}, depth {depth})"

    def training_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        n = len(images)
        logits = model(torch.cat([images, self.augmix(images), self.augmix(images)]))
        clean, aug1, aug2 = logits[:n], logits[n:2 * n], logits[2 * n:]
        ce = F.cross_entropy(clean, labels)
        jsd = jensen_shannon([F.log_softmax(z, dim=1) for z in (clean, aug1, aug2)]).mean()
        loss = ce + self.lambda_jsd * jsd
        return loss, {"loss": loss.item(), "ce": ce.item(), "jsd": jsd.item(),
                      "acc": (clean.argmax(1) == labels).float().mean().item()}
