"""Random Self-Ensemble with noise at the input layer only (Liu et al. 2018, as the MAGN paper
uses it as a baseline, Sec. 2 eq. 4 and the sentence after it).

Training: ``min_theta E_{delta ~ N(0, sigma^2 I)} CE(f(x + delta), y)`` with one noise draw per
image and step. Test: ``y_hat(x) = argmax_c (1/n) sum_i p_c(x + delta_i)``, an ensemble of ``n``
noisy predictions. The MAGN paper uses sigma = 0.1 (Sec. 4, "Training Details"); the ensemble
size is not given there, 10 is the RSE paper's. Noise acts in [0, 1] pixel space and is not
clipped (eq. 4 adds it as is); training noise comes from torch's global RNG (checkpointed by the
trainer), test noise from a generator seeded with ``test_seed``, so evaluations are reproducible.

Evaluation modes: ``""`` is the noisy ensemble (so its metrics keep the plain keys, as the
paper reports RSE), ``"single"`` the same network on clean inputs without ensembling (keys
``...@single``), when ``evaluate_single`` is set.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from robustexp.errors import ConfigError
from robustexp.methods.base import TrainingMethod


class NoisyEnsemble(nn.Module):
    """``log((1/n) sum_i softmax(f(x + sigma * n_i)))``: the RSE test-time prediction, returned as
    log-probabilities (so that softmax, argmax and cross-entropy of the output are those of the
    ensemble's averaged distribution). The noise comes from this module's own generator."""

    def __init__(self, model: nn.Module, sigma: float, ensemble_size: int, seed: int = 0):
        super().__init__()
        self.model, self.sigma, self.ensemble_size, self.seed = model, float(sigma), int(ensemble_size), int(seed)
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        generator = self._generator(images.device)
        log_probs = []
        for _ in range(self.ensemble_size):
            noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
            log_probs.append(F.log_softmax(self.model(images + self.sigma * noise).float(), dim=1))
        return torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(self.ensemble_size)


class RandomSelfEnsemble(TrainingMethod):
    """RSE (input-layer noise): Gaussian noise in training, a noisy ensemble at test time."""

    def __init__(self, sigma: float = 0.1, ensemble_size: int = 10, test_sigma: float | None = None,
                 evaluate_single: bool = True, test_seed: int = 0):
        if sigma < 0 or (test_sigma is not None and test_sigma < 0):
            raise ConfigError(f"method.sigma={sigma} / method.test_sigma={test_sigma}; expected non-negative stds")
        if ensemble_size < 1:
            raise ConfigError(f"method.ensemble_size={ensemble_size}; expected at least 1 noisy prediction")
        self.sigma, self.ensemble_size = float(sigma), int(ensemble_size)
        self.test_sigma = self.sigma if test_sigma is None else float(test_sigma)
        self.evaluate_single, self.test_seed = bool(evaluate_single), int(test_seed)
        self.name = f"RSE (input noise sigma {sigma:g}, ensemble of {ensemble_size} at sigma {self.test_sigma:g})"

    def training_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        logits = model(images + self.sigma * torch.randn_like(images))
        loss = F.cross_entropy(logits, labels)
        return loss, {"loss": loss.item(), "acc": (logits.argmax(1) == labels).float().mean().item()}

    def ensemble(self, model: nn.Module) -> NoisyEnsemble:
        return NoisyEnsemble(model, self.test_sigma, self.ensemble_size, self.test_seed)

    def evaluation_modes(self, model: nn.Module):
        modes = {"": lambda: contextlib.nullcontext(self.ensemble(model))}
        if self.evaluate_single:
            modes["single"] = lambda: contextlib.nullcontext(model)
        return modes
