"""Gaussian and Speckle noise training (Rusak et al. 2020, Sec. 3.1, eq. 1).

Every batch keeps a fraction of clean images (50 % in the paper, "to maintain high accuracy on
clean data") and perturbs the rest:

* ``gaussian``: ``clip(x + sigma * n)``, n ~ N(0, I) (eq. 1);
* ``speckle``:  ``clip(x + x * sigma * n)`` (the ImageNet-C hold-out corruption, used by the
  paper as a noise that is not among the test corruptions).

``sigma`` is fixed (one value) or drawn per image uniformly from a set (the paper's GNT with
several standard deviations). Noise acts in [0, 1] pixel space (normalization is inside the
model); the result is clipped to [0, 1]. Randomness comes from torch's global RNG, which the
trainer checkpoints, so resumed runs draw the same noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustexp.errors import ConfigError
from robustexp.methods.base import TrainingMethod

NOISES = ("gaussian", "speckle")


def perturb(images: torch.Tensor, sigmas: torch.Tensor, noise: str) -> torch.Tensor:
    """``images`` (B, C, H, W) in [0, 1] with per-image standard deviations ``sigmas`` (B,)."""
    n = torch.randn_like(images) * sigmas.view(-1, 1, 1, 1).to(images)
    return (images + (n if noise == "gaussian" else images * n)).clamp(0, 1)


class NoiseTraining(TrainingMethod):
    """Cross-entropy on a batch whose last ``B - round(clean_fraction * B)`` images are perturbed
    by ``noise`` with a per-image sigma drawn uniformly from ``sigmas`` (the training batches are
    shuffled, so which images stay clean is random)."""

    def __init__(self, sigmas: Sequence[float] = (0.5,), noise: str = "gaussian", clean_fraction: float = 0.5):
        if noise not in NOISES:
            raise ConfigError(f"method.noise={noise!r}; expected one of {NOISES}")
        sigmas = [float(s) for s in (sigmas if isinstance(sigmas, Sequence) and not isinstance(sigmas, str)
                                     else [sigmas])]
        if not sigmas or any(s < 0 for s in sigmas):
            raise ConfigError(f"method.sigmas must be non-negative standard deviations, got {sigmas}")
        if not 0 <= clean_fraction <= 1:
            raise ConfigError(f"method.clean_fraction must be in [0, 1], got {clean_fraction}")
        self.sigmas = torch.tensor(sigmas)
        self.noise, self.clean_fraction = noise, clean_fraction
        self.name = f"{noise} noise training (sigma in {sigmas}, {clean_fraction:.0%} clean)"

    def noisy_batch(self, images: torch.Tensor) -> torch.Tensor:
        n_clean = int(round(self.clean_fraction * len(images)))
        noisy = images[n_clean:]
        choice = torch.randint(len(self.sigmas), (len(noisy),))
        return torch.cat([images[:n_clean], perturb(noisy, self.sigmas[choice], self.noise)])

    def training_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        logits = model(self.noisy_batch(images))
        loss = F.cross_entropy(logits, labels)
        return loss, {"loss": loss.item(), "acc": (logits.argmax(1) == labels).float().mean().item()}
