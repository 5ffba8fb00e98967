"""Adversarial-training baselines of the MAGN paper (Sec. 2 and Sec. 4 "Baselines").

* PGD adversarial training (Madry et al. 2018; MAGN paper eq. 2):
  ``min_theta E max_{||delta|| <= eps} CE(f(x + delta), y)``: the network is trained on the
  adversarial batch only; the inner maximization is PGD from a uniform random start in the ball.
* TRADES (Zhang et al. 2019; MAGN paper eq. 3):
  ``CE(f(x), y) + beta * KL(p(x) || p(x'))`` with ``x'`` maximizing ``KL(p(x) || p(x + delta))``
  over the ball by PGD. As in the TRADES paper (Algorithm 1, ``x' <- x + 0.001 N(0, I)``), the
  search starts from a small Gaussian perturbation ``start_std * N(0, I)`` (projected into the
  ball), because the KL's gradient vanishes at ``delta = 0``. The KL target p(x)
  is fixed (no gradient) during the attack; in the training loss both terms are differentiated,
  as in the TRADES code.

The MAGN paper's setting (from the AT / TRADES papers): L-inf, eps = 8/255, 7 steps of
2.5 * eps / 7; TRADES beta = 3 (SPEC; the TRADES paper uses 6 on CIFAR-10). The same constants
are used on every dataset unless overridden.

Both methods put the model in eval mode while the attack is generated (BatchNorm uses its
running statistics and is not updated by the attack's forward passes) and restore its previous
mode afterwards. Attacks use :func:`robustexp.attacks.pgd` and torch's global RNG (checkpointed
by the trainer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from robustexp.attacks import check_norm, pgd
from robustexp.errors import ConfigError
from robustexp.losses import kl_divergence, trades_kl
from robustexp.methods.base import TrainingMethod

DEFAULT_EPS = 8 / 255


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block, its previous mode restored after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class _AdversarialMethod(TrainingMethod):
    def __init__(self, eps: float, steps: int, step_size: float | None, norm: str):
        self.norm = check_norm(norm)
        if eps <= 0 or steps < 1:
            raise ConfigError(f"method.eps={eps} and method.steps={steps}; expected eps > 0 and at least one step")
        if step_size is not None and step_size <= 0:
            raise ConfigError(f"method.step_size={step_size}; expected > 0 (or null: 2.5 * eps / steps)")
        self.eps, self.steps = float(eps), int(steps)
        self.step_size = float(step_size) if step_size is not None else 2.5 * self.eps / self.steps

    def _attack_description(self) -> str:
        return f"{self.norm} eps {self.eps:.4g}, {self.steps} steps of {self.step_size:.4g}"


class PGDAdversarialTraining(_AdversarialMethod):
    """Madry et al.: cross-entropy on PGD adversarial examples (see the module docstring)."""

    def __init__(self, eps: float = DEFAULT_EPS, steps: int = 7, step_size: float | None = None,
                 norm: str = "linf", random_init: bool = True):
        super().__init__(eps, steps, step_size, norm)
        self.random_init = bool(random_init)
        self.name = f"PGD adversarial training ({self._attack_description()})"

    def adversarial_examples(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """PGD on the per-example cross-entropy, with the model in eval mode."""
        with eval_mode(model):
            return pgd(lambda x, y: F.cross_entropy(model(x), y, reduction="none"), images, labels,
                       norm=self.norm, eps=self.eps, step_size=self.step_size, steps=self.steps,
                       random_init=self.random_init)

    def training_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        adversarial = self.adversarial_examples(model, images, labels)
        logits = model(adversarial)
        loss = F.cross_entropy(logits, labels)
        return loss, {"loss": loss.item(), "adv_acc": (logits.argmax(1) == labels).float().mean().item()}


class TRADES(_AdversarialMethod):
    """TRADES: clean cross-entropy plus ``beta`` times the KL to the prediction at the point
    of the eps-ball that maximizes it (see the module docstring)."""

    def __init__(self, beta: float = 3.0, eps: float = DEFAULT_EPS, steps: int = 7, step_size: float | None = None,
                 norm: str = "linf", start_std: float = 0.001):
        super().__init__(eps, steps, step_size, norm)
        if beta < 0:
            raise ConfigError(f"method.beta={beta}; expected >= 0")
        if start_std <= 0:
            raise ConfigError(f"method.start_std={start_std}; expected > 0 (the KL has no gradient at delta = 0)")
        self.beta, self.start_std = float(beta), float(start_std)
        self.name = f"TRADES (beta {beta:g}, {self._attack_description()})"

    def adversarial_examples(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """``x'`` maximizing ``KL(p(x) || p(x'))`` over the ball, with the model in eval mode."""
        with eval_mode(model), torch.no_grad():
            target = F.log_softmax(model(images), dim=1)

        def kl_to_clean(x: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
            return kl_divergence(target, F.log_softmax(model(x), dim=1))

        with eval_mode(model):
            return pgd(kl_to_clean, images, target, norm=self.norm, eps=self.eps, step_size=self.step_size,
                       steps=self.steps, random_init=True, init_std=self.start_std)

    def training_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        adversarial = self.adversarial_examples(model, images)
        clean_logits = model(images)
        adversarial_logits = model(adversarial)
        ce = F.cross_entropy(clean_logits, labels)
        robust = trades_kl(clean_logits, adversarial_logits).mean()
        loss = ce + self.beta * robust
        return loss, {"loss": loss.item(), "ce": ce.item(), "kl": robust.item(),
                      "acc": (clean_logits.argmax(1) == labels).float().mean().item(),
                      "adv_acc": (adversarial_logits.argmax(1) == labels).float().mean().item()}
