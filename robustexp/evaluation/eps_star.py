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

DIRECTIONS = ("gaussian", "uniform")
CRITERIA = ("misclassified", "changed")


def noise_direction(kind: str, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian N(0, I) or uniform U(-1, 1) noise of the images' shape."""
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
    reference = y if criterion == "misclassified" else model(x).argmax(1)

    def broken(eps: torch.Tensor) -> torch.Tensor:
        eta = clipping_aware_scale(x, direction, eps)
        moved = (x + eta.view(-1, *[1] * (x.ndim - 1)) * direction).clamp(0, 1)
        return model(moved).argmax(1) != reference

    big = torch.full((len(x),), 1e9, dtype=torch.float64, device=x.device)
    eps_max = clipped_l2_norm(x.double(), direction.double(), clipping_aware_scale(x, direction, big).double())
    result = torch.full((len(x),), math.inf, dtype=torch.float64, device=x.device)
    result[model(x).argmax(1) != reference] = 0.0
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
    Directions are drawn per image and batch with seeds from ``(seed, direction, batch)``.
    The learned-adversarial direction of the paper (a noise generator trained against the final
    classifier) comes with Adversarial Noise Training."""

    def __init__(self, directions=DIRECTIONS, batch_size: int = 250, max_images: int | None = None,
                 grid_points: int = 40, bisection_steps: int = 12, criterion: str = "misclassified", seed: int = 0):
        self.directions = tuple(directions)
        for kind in self.directions:
            if kind not in DIRECTIONS:
                raise ConfigError(f"eval eps_star directions: {kind!r} is unknown; expected {DIRECTIONS}")
        if criterion not in CRITERIA:
            raise ConfigError(f"eval eps_star criterion={criterion!r}; expected one of {CRITERIA}")
        self.batch_size, self.max_images, self.seed = batch_size, max_images, seed
        self.grid_points, self.bisection_steps, self.criterion = grid_points, bisection_steps, criterion

    def evaluate(self, model, data, ctx: EvalContext):
        start, results = time.perf_counter(), {}
        for kind in self.directions:
            values = []
            batches = test_batches(data.test, self.batch_size, ctx, self.max_images)
            for index, (images, labels) in enumerate(tqdm(batches, desc=f"eps* {kind}", disable=not ctx.progress,
                                                          mininterval=1.0)):
                images, labels = images.to(ctx.device), labels.to(ctx.device)
                generator = torch.Generator(device=images.device).manual_seed(derive_seed(self.seed, kind, index))
                direction = noise_direction(kind, images, generator)
                values.append(line_search(model, images, labels, direction, self.grid_points,
                                          self.bisection_steps, self.criterion).cpu())
            eps = torch.cat(values).numpy()
            finite = eps[np.isfinite(eps)]
            results[kind] = {"eps_star": float(np.median(eps)), "fraction_unbreakable": float(np.isinf(eps).mean()),
                             "fraction_broken_at_0": float((eps == 0).mean()),
                             "mean_finite": float(finite.mean()) if len(finite) else math.inf, "n": int(len(eps))}
            ctx.log({f"eps_star/{kind}": results[kind]["eps_star"]})
        return {"criterion": self.criterion, "seconds": time.perf_counter() - start, "directions": results}

    def table(self, results):
        rows = [[kind, r["eps_star"], r["fraction_unbreakable"] * 100, r["fraction_broken_at_0"] * 100, r["n"]]
                for kind, r in results["directions"].items()]
        return format_table(["noise direction", "eps* (median L2)", "unbreakable %", "broken at 0 %", "images"],
                            rows, precision=3) + f"\n{results['criterion']} criterion, {results['seconds']:.0f} s"

    def headline(self, results):
        return {f"eps_star_{kind}": r["eps_star"] for kind, r in results["directions"].items()}
