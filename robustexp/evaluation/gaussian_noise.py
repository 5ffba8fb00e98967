"""Top-1 accuracy under additive Gaussian noise for several sigma, with or without test-time
adaptation, over several repetitions as mean +- 2 sd (Nandy et al. 2021, Table 1; Tables 4-5 at
sigma = 0.5 for the rho and batch-size sweeps).

Noise ``x + N(0, sigma^2 I)`` in [0, 1] pixel space, not clipped to [0, 1] (as in randomized
smoothing, Cohen et al. 2019; ``clip: true`` clips). Every repetition reshuffles the test split
and redraws the noise ("We randomly shuffle the test set and sample the noises to report
(mean +- 2 x sd) of 5 different runs"); under a BN adaptation the batches of a repetition are
the i.i.d. shuffled test batches the statistics are estimated on (one subset per sigma and
repetition, statistics reset before and after, :func:`robustexp.evaluation.base.evaluate_subset`).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from robustexp.data.batches import rebatch
from robustexp.errors import ConfigError
from robustexp.evaluation.base import EvalContext, Evaluator, evaluate_subset
from robustexp.rendering import format_table
from robustexp.utils import derive_seed

NOISE_CHUNK = 250  # noise is drawn per chunk of this many images, so it does not depend on the batch size


def headline_key(sigma: float) -> str:
    """Summary key of the accuracy under noise sigma (``gaussian_top1_sigma0.5``), the metric the
    Nandy sweeps (``conf/adaptation/nandy_rho.yaml``, ``nandy_batch.yaml``) report."""
    return f"gaussian_top1_sigma{sigma:g}"


def noisy_test_batches(dataset, sigma: float, repetition: int, seed: int, batch_size: int, ctx: EvalContext,
                       max_images: int | None = None, clip: bool = False):
    """The test split in the order of repetition ``repetition`` (a seeded permutation, truncated to
    ``max_images``) with N(0, sigma^2 I) noise, in batches of ``batch_size``. The same arguments
    give the same noisy images for any batch size (full adaptation reads the subset twice)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(derive_seed(seed, "order",
                                                                                           repetition)))
    if max_images is not None:
        order = order[:max_images]
    loader = DataLoader(Subset(dataset, order.tolist()), batch_size=NOISE_CHUNK, shuffle=False,
                        num_workers=ctx.num_workers, pin_memory=ctx.device.type == "cuda")

    def chunks():
        for index, (images, labels) in enumerate(loader):
            generator = torch.Generator().manual_seed(derive_seed(seed, "noise", f"{sigma:g}", repetition, index))
            noisy = images + sigma * torch.randn(images.shape, generator=generator, dtype=images.dtype)
            yield (noisy.clamp(0, 1) if clip else noisy), labels

    return rebatch(chunks(), batch_size)


def mean_two_sd(values) -> tuple[float, float]:
    """Mean and 2 x the sample standard deviation (ddof = 1; 0 for a single value), as Nandy et al. report."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(2 * v.std(ddof=1)) if len(v) > 1 else 0.0


class GaussianNoiseEvaluator(Evaluator):
    """Accuracy under Gaussian noise (Nandy et al. Table 1): for each sigma, ``repetitions`` runs
    with a reshuffled test split and fresh noise; top-1 as mean +- 2 sd over the runs.

    Args:
        sigmas: noise standard deviations in pixel space [0, 1] (0: clean, reshuffled only).
        repetitions: runs per sigma (paper: 5).
        batch_size: test batch size without adaptation (the adaptation's ``batch_size`` replaces it).
        max_images: images per run (a random subset, different in every run); null: all.
        clip: clip noisy images to [0, 1] (default false, as in randomized smoothing).
    """

    def __init__(self, sigmas=(0.0, 0.25, 0.5, 0.75), repetitions: int = 5, batch_size: int = 500,
                 max_images: int | None = None, clip: bool = False, seed: int = 0):
        self.sigmas = tuple(float(s) for s in sigmas)
        if not self.sigmas or any(s < 0 for s in self.sigmas):
            raise ConfigError(f"eval gaussian_noise sigmas={list(sigmas)}: expected a non-empty list of values >= 0")
        if int(repetitions) < 1 or int(batch_size) < 1:
            raise ConfigError(f"eval gaussian_noise needs repetitions >= 1 and batch_size >= 1, got "
                              f"repetitions={repetitions}, batch_size={batch_size}")
        self.repetitions, self.batch_size = int(repetitions), int(batch_size)
        self.max_images, self.clip, self.seed = max_images, bool(clip), seed

    def evaluate(self, model, data, ctx: EvalContext):
        start, results = time.perf_counter(), {}
        runs = [(s, r) for s in self.sigmas for r in range(self.repetitions)]
        top1: dict[float, list[float]] = {s: [] for s in self.sigmas}
        for sigma, rep in tqdm(runs, desc="gaussian noise", disable=not ctx.progress, mininterval=1.0):
            result = evaluate_subset(
                model, lambda n, s=sigma, r=rep: noisy_test_batches(data.test, s, r, self.seed, n, ctx,
                                                                    self.max_images, self.clip),
                ctx, self.batch_size)
            top1[sigma].append(result["top1"])
            n_images = result["n"]
        for sigma, values in top1.items():
            mean, two_sd = mean_two_sd(values)
            results[f"{sigma:g}"] = {"top1_mean": mean, "top1_2sd": two_sd, "top1_runs": values}
            ctx.log({f"gaussian_noise/sigma{sigma:g}/top1": mean})
        adaptation = ctx.adaptation
        return {"sigmas": results, "repetitions": self.repetitions, "images": n_images, "clip": self.clip,
                "batch_size": adaptation.batch_size or self.batch_size,
                "adaptation": adaptation.describe() if adaptation.adapts else None,
                "seconds": time.perf_counter() - start}

    def table(self, results):
        rows = [[f"sigma={sigma}", f"{r['top1_mean']:.1f} +- {r['top1_2sd']:.2f}"]
                for sigma, r in results["sigmas"].items()]
        return (format_table(["Gaussian noise", "top-1 % (mean +- 2 sd)"], rows)
                + f"\n{results['repetitions']} runs (reshuffled test split, fresh noise) of {results['images']} "
                  f"images, batch {results['batch_size']}; {results['adaptation'] or 'no adaptation'}; "
                  f"{results['seconds']:.0f} s")

    def headline(self, results):
        return {headline_key(float(sigma)): r["top1_mean"] for sigma, r in results["sigmas"].items()}

    def compare_rows(self, results):
        return [(f"gaussian sigma={sigma}", r["top1_mean"]) for sigma, r in results["sigmas"].items()]


__all__ = ["GaussianNoiseEvaluator", "headline_key", "mean_two_sd", "noisy_test_batches"]
