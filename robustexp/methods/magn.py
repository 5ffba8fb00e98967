"""Misclassification-Aware Gaussian Noise smoothing (Tsiligkaridis & Tsiligkaridis 2022, eq. 6,
Algorithm 1), with or without its AugMix Jensen-Shannon term.

    L_T = CE(f(x), y)
          + lambda1 * [p(x)]_y * KL(p(x) || p(x + delta)),  sigma ~ U(0, sigma_max), delta ~ N(0, sigma^2 I)
          + lambda2 * JS(p(x); p(x_a1); p(x_a2))

* ``sigma`` is drawn per example and ``delta`` per pixel (Algorithm 1, lines "Generate sigma ~
  U(0, sigma_max) for each batch example" and "delta ~ N(0, sigma^2 I)"); one draw per step
  ("a single stochastic draw is used to approximate the MAGN regularizer", Sec. 3).
* The KL is ``D_KL(p(x) || p(x + delta)) = sum_c p_c(x) log(p_c(x) / p_c(x + delta))``: the clean
  distribution is the reference (first argument), as in TRADES (Sec. 2, eq. 3).
* Nothing is detached: Algorithm 1 takes ``grad_theta L_T`` of the whole expression, so the
  gradient reaches p(x), p(x + delta) and the weight ``[p(x)]_y`` alike. The weight makes the
  term misclassification-aware (Sec. 3.1, after Theorem 1): small for wrong predictions.
* ``x + delta`` is not clipped to [0, 1] (Algorithm 1: ``x_delta = x + delta``); noise acts in
  pixel space, the normalization is inside the model.
* The paper's setting: sigma_max = 0.2, (lambda1, lambda2) = (3, 12) (Sec. 4 and Table 4).
  ``lambda_jsd = 0`` is MAGN alone (no AugMix images are made).

Clean, noisy (and AugMix) images go through the network as one concatenated batch, as AugMix's
reference implementation does, so BatchNorm normalizes them with shared statistics. Randomness
comes from torch's global RNG (checkpointed by the trainer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustexp.errors import ConfigError
from robustexp.losses import jensen_shannon, magn_regularizer
from robustexp.methods.augmix import augmix_options
from robustexp.methods.base import TrainingMethod


def gaussian_noise_per_example(images: torch.Tensor, sigma_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(delta, sigma)`` with ``sigma ~ U(0, sigma_max)`` per example and ``delta ~ N(0, sigma^2 I)``."""
    sigma = torch.rand(len(images), device=images.device, dtype=images.dtype) * sigma_max
    return torch.randn_like(images) * sigma.view(-1, *([1] * (images.dim() - 1))), sigma


class MAGNTraining(TrainingMethod):
    """The MAGN objective (eq. 6); see the module docstring."""

    def __init__(self, sigma_max: float = 0.2, lambda_noise: float = 3.0, lambda_jsd: float = 0.0,
                 severity: float = 3.0, width: int = 3, depth: int = -1, alpha: float = 1.0,
                 operations: Sequence[str] | None = None):
        if sigma_max < 0:
            raise ConfigError(f"method.sigma_max={sigma_max}; expected a non-negative pixel-space std")
        if lambda_noise < 0 or lambda_jsd < 0:
            raise ConfigError(f"method.lambda_noise={lambda_noise} and method.lambda_jsd={lambda_jsd} must be >= 0")
        self.sigma_max, self.lambda_noise, self.lambda_jsd = float(sigma_max), float(lambda_noise), float(lambda_jsd)
        self.augmix = augmix_options(severity, width, depth, alpha, operations) if lambda_jsd > 0 else None
        self.name = (f"MAGN (sigma_max {sigma_max:g}, lambda1 {lambda_noise:g}"
                     + (f", AugMix JSD lambda2 {lambda_jsd:g})" if self.augmix else ")"))

    def training_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        n = len(images)
        delta, _ = gaussian_noise_per_example(images, self.sigma_max)
        views = [images, images + delta]
        if self.augmix is not None:
            views += [self.augmix(images), self.augmix(images)]
        logits = model(torch.cat(views)).split(n)
        ce = F.cross_entropy(logits[0], labels)
        magn = magn_regularizer(logits[0], logits[1], labels).mean()
        loss = ce + self.lambda_noise * magn
        logs = {"ce": ce.item(), "magn": magn.item()}
        if self.augmix is not None:
            jsd = jensen_shannon([F.log_softmax(logits[i], dim=1) for i in (0, 2, 3)]).mean()
            loss = loss + self.lambda_jsd * jsd
            logs["jsd"] = jsd.item()
        logs.update(loss=loss.item(), acc=(logits[0].argmax(1) == labels).float().mean().item())
        return loss, logs
