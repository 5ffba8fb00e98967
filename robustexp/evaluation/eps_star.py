"""The robustness score eps* of Rusak et al. 2020 (Sec. 3.3, eq. 4): the median over the test set
of the smallest L2 size of a perturbation along a random noise direction that breaks the model."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from robustexp.errors import ConfigError
from robustexp.evaluation.base import EvalContext, Evaluator, test_batches
from robustexp.evaluation.report import format_table
from robustexp.perturbations import clipping_aware_scale, clipped_l2_norm
from robustexp.utils import derive_seed

DIRECTIONS = ("gaussian", "uniform", "adversarial")
CRITERIA = ("misclassified", "changed")


def train_adversarial_generator(model, train_set, device, eps_l2: float, steps: int, batch_size: int = 128,
                                 kernel: str = "1x1", lr: float = 1e-3, seed: int = 0):
    """A new noise generator trained against the final classifier (Rusak et al. Sec. 3.3: "we train
    a new noise generator at the end of the training until convergence"): ``steps`` Adam steps
    maximizing the cross-entropy of the frozen classifier (eval mode) on training images perturbed
    to L2 size ``eps_l2``."""
    from torch.utils.data import DataLoader

    from robustexp.methods.ant import AdversarialNoiseTraining

    ant = AdversarialNoiseTraining(eps_l2=eps_l2, kernel=kernel, generator_lr=lr, replay_every=0, restart_every=0)
    ant.setup(model, device)
    model.eval()
    if len(train_set) == 0:
        raise ConfigError("eps_star: the adversarial noise generator needs training images; the training split is empty")
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=len(train_set) > batch_size,
                        generator=torch.Generator().manual_seed(seed))
    done = 0
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        while done < steps:
            for images, labels in loader:
                images, labels = images.to(device), labels.to(device)
                if ant.generator is None:
                    ant._new_generator(images.shape[1])
                ant.generator_step(model, images, labels)
                done += 1
                if done >= steps:
                    break
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
    return ant.generator.eval()


def noise_direction(kind: str, like: torch.Tensor, generator: torch.Generator, noise_generator=None) -> torch.Tensor:
    """Gaussian N(0, I), uniform U(-1, 1), or the output of a trained noise generator on N(0, I)."""
    if kind == "adversarial":
        z = torch.randn(noise_generator.input_shape(like.shape), generator=generator, device=like.device,
                        dtype=like.dtype)
        with torch.no_grad():
            return noise_generator(z)
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    if kind == "uniform":
        return torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype) * 2 - 1
    raise ConfigError(f"eps_star direction {kind!r}; expected one of {DIRECTIONS}")


@torch.no_grad()
def line_search(model, x: torch.Tensor, y: torch.Tensor, direction: torch.Tensor, grid_points: int = 40,
                bisection_steps: int = 12, criterion: str = "misclassified") -> torch.Tensor:
    """Per image the smallest L2 size eps of ``clip(x + eta d) - x`` at which the model is broken
    (``misclassified``: prediction != label, Rusak et al. eq. 4; ``changed``: prediction differs
    from the prediction on x). A scan of ``grid_points`` sizes up to the largest size the
    direction can reach (every moving pixel saturated) brackets the first break, and bisection
    narrows it; the upper end of the final bracket is returned. ``inf`` when even the largest
    size does not break the model; 0 when x itself is already broken."""
    model.eval()
    clean_prediction = model(x).argmax(1)
    reference = y if criterion == "misclassified" else clean_prediction

    def broken(eps: torch.Tensor) -> torch.Tensor:
        eta = clipping_aware_scale(x, direction, eps)
        moved = (x + eta.view(-1, *[1] * (x.ndim - 1)) * direction).clamp(0, 1)
        return model(moved).argmax(1) != reference

    big = torch.full((len(x),), 1e9, dtype=torch.float64, device=x.device)
    eps_max = clipped_l2_norm(x.double(), direction.double(), clipping_aware_scale(x, direction, big).double())
    result = torch.full((len(x),), math.inf, dtype=torch.float64, device=x.device)
    result[clean_prediction != reference] = 0.0
    low = torch.zeros_like(eps_max)
    high = torch.full_like(eps_max, math.inf)
    pending = result.isinf()
    for i in range(1, grid_points + 1):  # coarse scan
        eps = eps_max * i / grid_points
        hit = pending & broken(eps)
        high[hit] = eps[hit]
        low[pending & ~hit] = eps[pending & ~hit]
        pending &= ~hit
        if not pending.any():
            break
    found = result.isinf() & high.isfinite()
    for _ in range(bisection_steps):
        if not found.any():
            break
        mid = torch.where(found, (low + high) / 2, low)
        hit = found & broken(mid)
        high = torch.where(hit, mid, high)
        low = torch.where(found & ~hit, mid, low)
    result[found] = high[found]
    return result


class EpsStarEvaluator(Evaluator):
    """eps* per noise direction type: the median over the test images of the line-search size
    (``inf`` for images no size breaks; with such images in the upper half the median is inf).
    Directions are drawn per image and batch with seeds from ``(seed, direction, batch)``;
    ``adversarial`` directions are the output of a noise generator newly trained against the
    final classifier (``adversarial_steps`` steps on the training split, :func:`train_adversarial_generator`)
    at L2 size ``adversarial_eps_l2``; null trains it at the median Gaussian breaking size over the
    images that need noise to break (measured first; the model's Gaussian eps* when it is correct
    on most images), the size at which random noise breaks this model: a generator trained at a much larger size
    learns noise that only works at that size (on the embedded digits, trained at 8 it gave
    eps* 3.3 against Gaussian 1.3; trained at 1.5, 0.8)."""

    def __init__(self, directions=DIRECTIONS, batch_size: int = 250, max_images: int | None = None,
                 grid_points: int = 40, bisection_steps: int = 12, criterion: str = "misclassified", seed: int = 0,
                 adversarial_eps_l2: float | None = None, adversarial_steps: int = 500, adversarial_kernel: str = "1x1"):
        self.directions = tuple(directions)
        for kind in self.directions:
            if kind not in DIRECTIONS:
                raise ConfigError(f"eval eps_star directions: {kind!r} is unknown; expected {DIRECTIONS}")
        if criterion not in CRITERIA:
            raise ConfigError(f"eval eps_star criterion={criterion!r}; expected one of {CRITERIA}")
        self.batch_size, self.max_images, self.seed = batch_size, max_images, seed
        self.grid_points, self.bisection_steps, self.criterion = grid_points, bisection_steps, criterion
        self.adversarial_eps_l2, self.adversarial_steps = adversarial_eps_l2, adversarial_steps
        self.adversarial_kernel = adversarial_kernel
        if "adversarial" in self.directions and adversarial_eps_l2 is None:
            if "gaussian" not in self.directions:
                raise ConfigError("eps_star: adversarial_eps_l2=null trains the generator at the Gaussian eps*, "
                                  "so 'gaussian' must be among the directions (or set adversarial_eps_l2)")
            # measure Gaussian first: its eps* is the size the generator is trained at
            self.directions = ("gaussian",) + tuple(d for d in self.directions if d != "gaussian")

    def evaluate(self, model, data, ctx: EvalContext):
        start, results = time.perf_counter(), {}
        noise_generator, generator_size = None, None
        for kind in self.directions:
            if kind == "adversarial":
                size = self.adversarial_eps_l2
                if size is None:  # the typical size at which random (Gaussian) noise breaks this model
                    needs_noise = gaussian_sizes[np.isfinite(gaussian_sizes) & (gaussian_sizes > 0)]
                    size = float(np.median(needs_noise)) if len(needs_noise) else 1.0
                generator_size = size
                noise_generator = train_adversarial_generator(model, data.train, ctx.device, size,
                                                              self.adversarial_steps, kernel=self.adversarial_kernel,
                                                              seed=self.seed)
            values = []
            batches = test_batches(data.test, self.batch_size, ctx, self.max_images)
            for index, (images, labels) in enumerate(tqdm(batches, desc=f"eps* {kind}", disable=not ctx.progress,
                                                          mininterval=1.0)):
                images, labels = images.to(ctx.device), labels.to(ctx.device)
                generator = torch.Generator(device=images.device).manual_seed(derive_seed(self.seed, kind, index))
                direction = noise_direction(kind, images, generator, noise_generator)
                values.append(line_search(model, images, labels, direction, self.grid_points,
                                          self.bisection_steps, self.criterion).cpu())
            eps = torch.cat(values).numpy()
            if kind == "gaussian":
                gaussian_sizes = eps
            finite = eps[np.isfinite(eps)]
            results[kind] = {"eps_star": float(np.median(eps)), "fraction_unbreakable": float(np.isinf(eps).mean()),
                             "fraction_broken_at_0": float((eps == 0).mean()),
                             "mean_finite": float(finite.mean()) if len(finite) else math.inf, "n": int(len(eps))}
            ctx.log({f"eps_star/{kind}": results[kind]["eps_star"]})
        return {"criterion": self.criterion, "seconds": time.perf_counter() - start, "directions": results,
                "adversarial_generator_eps_l2": generator_size}

    def table(self, results):
        rows = [[kind, r["eps_star"], r["fraction_unbreakable"] * 100, r["fraction_broken_at_0"] * 100, r["n"]]
                for kind, r in results["directions"].items()]
        return format_table(["noise direction", "eps* (median L2)", "unbreakable %", "broken at 0 %", "images"],
                            rows, precision=3) + f"\n{results['criterion']} criterion, {results['seconds']:.0f} s"

    def headline(self, results):
        return {f"eps_star_{kind}": r["eps_star"] for kind, r in results["directions"].items()}
