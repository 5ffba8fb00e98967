"""Projected gradient ascent in an L-inf or L2 ball intersected with the image box [0, 1].

PGD (Madry et al. 2018): ``delta <- Proj(delta + a * step(grad))`` for ``steps`` iterations,
optionally from a random start and with several restarts. The loss is any per-example
function of the perturbed images, so the same routine serves PGD adversarial training
(cross-entropy), TRADES (the KL term) and EoT-PGD on adapted models (a loss averaged over
several adapted copies; Nandy et al. 2021, appendix E).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from robustexp.errors import ConfigError

NORMS = ("linf", "l2")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_norm(norm: str) -> str:
    norm = str(norm).lower()
    if norm not in NORMS:
        raise ConfigError(f"attack norm={norm!r}; expected one of {', '.join(NORMS)}")
    return norm


def _per_image_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(x: torch.Tensor, delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """The perturbation projected onto the ``eps`` ball of ``norm`` and then onto the box
    ``0 <= x + delta <= 1``. Clipping to the box only shrinks each coordinate of ``delta``
    towards 0, so the result stays inside the ball."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_image_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0) - x


def random_start(x: torch.Tensor, norm: str, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform draw from the ``eps`` ball (L-inf: the cube; L2: uniform in volume), then
    projected into the box."""
    if norm == "linf":
        delta = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / _per_image_norm(direction).clamp_min(1e-12)
        dim = x[0].numel()
        radius = torch.rand((len(x),) + (1,) * (x.dim() - 1), generator=generator, device=x.device,
                            dtype=x.dtype) ** (1.0 / dim)
        delta = direction * radius * eps
    return project(x, delta, norm, eps)


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent step of unit size: sign(g) for L-inf, g / ||g||_2 for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_image_norm(grad).clamp_min(1e-12)


def pgd(loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, step_size: float,
        steps: int, random_init: bool = True, restarts: int = 1,
        generator: torch.Generator | None = None, init_std: float | None = None) -> torch.Tensor:
    """Adversarial images ``x + delta`` that maximize ``loss_fn(x + delta, y)`` (a per-example
    loss of shape (B,)) over ``||delta|| <= eps`` and ``x + delta`` in [0, 1].

    Each restart runs ``steps`` steps of size ``step_size`` from a random start (or from 0 when
    ``random_init`` is false); per example, the restart with the highest final loss is kept. The
    random start is uniform in the ball, or ``init_std * N(0, I)`` projected into it when
    ``init_std`` is given (TRADES starts at ``x + 0.001 N(0, I)``, where the KL has a gradient).
    Gradients are taken with respect to the images only: the parameters of the model behind
    ``loss_fn`` receive no ``.grad``.
    """
    norm = check_norm(norm)
    if eps < 0 or step_size < 0 or steps < 0 or restarts < 1:
        raise ConfigError(f"PGD needs eps >= 0, step_size >= 0, steps >= 0 and restarts >= 1; got eps={eps}, "
                          f"step_size={step_size}, steps={steps}, restarts={restarts}")
    x = x.detach()
    best, best_loss = x.clone(), torch.full((len(x),), -torch.inf, device=x.device)
    for _ in range(restarts):
        if not random_init or eps == 0:
            delta = torch.zeros_like(x)
        elif init_std is not None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            delta = project(x, init_std * noise, norm, eps)
        else:
            delta = random_start(x, norm, eps, generator)
        for _ in range(steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                loss = loss_fn(x + delta, y)
                (grad,) = torch.autograd.grad(loss.sum(), delta)
            delta = project(x, delta.detach() + step_size * ascent_direction(grad, norm), norm, eps)
        with torch.no_grad():
            final = loss_fn(x + delta, y).detach().float()
        better = final > best_loss
        best[better] = (x + delta)[better]
        best_loss = torch.where(better, final, best_loss)
    return best.detach()
