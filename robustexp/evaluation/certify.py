"""L2 certification by randomized smoothing (Cohen et al. 2019) of a model whose BN statistics
were adapted on one batch of sigma-noised test images and then frozen (Nandy et al. 2021, Sec. 3
and appendix D).

The smoothed classifier is ``g(x) = argmax_c P(f(x + delta) = c)``, ``delta ~ N(0, sigma^2 I)`` in
[0, 1] pixel space (normalization is inside the model; noisy images are not clipped).

* CERTIFY (Cohen et al., Algorithm "certify"): ``n0`` noisy samples pick the top class c_A;
  ``n`` fresh samples count it; ``pA_lower`` = one-sided (1 - alpha) Clopper-Pearson lower bound
  on P(f(x + delta) = c_A); abstain if ``pA_lower < 0.5``, else certify c_A within the L2 radius
  ``R = sigma * Phi^-1(pA_lower)`` (their Theorem 1 with pB = 1 - pA). With probability at least
  1 - alpha over the noise, a returned (class, radius) is correct for g.
* PREDICT (Cohen et al., Algorithm "predict"): ``n`` samples; abstain unless the two-sided
  binomial test of the two top counts (n_A successes of n_A + n_B, p = 1/2) has p-value <= alpha.

Counting is batched over noise samples and over several images at once: one forward pass sees
(k images x b samples) and the counts of all k images are accumulated with one ``scatter_add_``
over (image, class). The only Python loop is over forward passes; what it does besides the
forward pass costs a few percent of it (``scripts/bench_certify.py`` measures CERTIFY against the
bare forward pass of the same model).

BN statistics (SPEC, "Randomized smoothing"): under a test-time adaptation, the statistics are
set once per sigma from one batch of sigma-noised *distinct* test images (Nandy et al.: "we first
modulate the BN statistics ... by feeding the Gaussian noise augmented test batches ... We then
freeze the parameters for the whole certification process") and frozen, so that a forward pass
of noisy copies of one image never sets them;
:class:`~robustexp.adaptation.freeze.FrozenStatisticsGuard` checks that every BN buffer is unchanged
after certifying. The adaptations of :mod:`robustexp.adaptation.bn` keep the model in eval mode
and write the adapted statistics into the running buffers, so
``model.eval()`` keeps the adaptation (and ``model.train()`` is never called here).
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import beta as beta_distribution
from scipy.stats import binomtest, norm
from torch import nn
from tqdm.auto import tqdm

from robustexp.adaptation.freeze import FrozenStatisticsGuard, check_freezable, frozen_adaptation
from robustexp.data.batches import evaluation_order
from robustexp.errors import ConfigError
from robustexp.evaluation.base import EvalContext, Evaluator
from robustexp.models.folding import fold_frozen_batchnorm
from robustexp.rendering import format_table
from robustexp.utils import MEMORY_FORMATS, derive_seed, model_memory_format

ABSTAIN = -1
# Noisy samples per forward pass on CPU when not configured: the bare forward pass of the SmallCNN
# at 28 px runs about twice as fast in batches of 250 as in batches of 1,000 (activations that stay
# in cache; scripts/bench_certify.py); on a GPU the whole drawn batch is one forward pass.
CPU_FORWARD_BATCH = 250


def forward_batch_for(device: torch.device, batch_size: int, forward_batch_size: int | None = None) -> int:
    """Samples per forward pass: ``forward_batch_size`` if given, else ``batch_size`` on a GPU and
    at most :data:`CPU_FORWARD_BATCH` on CPU."""
    if forward_batch_size:
        return int(forward_batch_size)
    return batch_size if device.type != "cpu" else min(batch_size, CPU_FORWARD_BATCH)


# ---------------------------------------------------------------------------------------- statistics
def clopper_pearson_lower(successes, trials, alpha: float):
    """One-sided (1 - alpha) lower confidence bound on a binomial proportion (Clopper & Pearson
    1934): the alpha quantile of Beta(k, n - k + 1), 0 for k = 0. Equals the lower end of the
    two-sided ``beta`` interval at level 2 alpha that Cohen et al. compute with statsmodels'
    ``proportion_confint``. For k = n it is alpha^(1/n). Vectorized over arrays."""
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    if np.any(k < 0) or np.any(k > n):
        raise ValueError(f"Clopper-Pearson bound needs 0 <= successes <= trials, got {successes} of {trials}")
    with np.errstate(invalid="ignore"):
        bound = beta_distribution.ppf(alpha, np.maximum(k, 1e-300), n - k + 1)
    return np.where(k > 0, bound, 0.0)


def certified_radius(pa_lower, sigma: float):
    """Cohen et al. Theorem 1 with pB = 1 - pA: ``sigma * Phi^-1(pA_lower)``, NaN where
    ``pA_lower < 0.5`` (CERTIFY abstains there)."""
    p = np.asarray(pa_lower, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(p >= 0.5, sigma * norm.ppf(np.clip(p, 0.5, 1.0)), np.nan)


def certified_accuracy(radius, correct, radii) -> list[float]:
    """Cohen et al.: certified accuracy at r = fraction of examples certified for the right
    class with radius >= r (abstentions count as wrong)."""
    radius = np.nan_to_num(np.asarray(radius, dtype=np.float64), nan=-np.inf)
    correct = np.asarray(correct, dtype=bool)
    return [float(np.mean(correct & (radius >= r))) if len(radius) else math.nan for r in radii]


def envelope_radius(radius_by_sigma: np.ndarray, correct_by_sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example upper envelope over sigma (Nandy et al. appendix D, Fig. 3): for every example
    the largest radius among the sigmas that certify its true class (``radius_by_sigma`` and
    ``correct_by_sigma`` of shape (n_sigmas, n_examples)); returns (radius, index of that sigma),
    NaN / -1 where no sigma certifies the true class. An oracle choice (it looks at the label),
    as in the paper: an upper envelope, not the certificate of one classifier."""
    r = np.where(correct_by_sigma, np.nan_to_num(radius_by_sigma, nan=-np.inf), -np.inf)
    best = r.argmax(0)
    value = r[best, np.arange(r.shape[1])]
    ok = np.isfinite(value)
    return np.where(ok, value, np.nan), np.where(ok, best, -1)


# ---------------------------------------------------------------------------------------- sampling
@torch.inference_mode()
def sample_counts(model: nn.Module, images: torch.Tensor, num: int, sigma: float, num_classes: int,
                  batch_size: int, generator: torch.Generator | None = None,
                  memory_format: torch.memory_format = torch.contiguous_format,
                  forward_batch_size: int | None = None) -> torch.Tensor:
    """Counts (k, num_classes) of the base classifier's predictions on ``num`` noisy copies
    ``x + N(0, sigma^2 I)`` of each of the k ``images``. One draw holds ``b = max(1, batch_size // k)``
    copies of every image (``batch_size`` fixes the noise: the same samples whatever the forward
    batch); it is classified in forward passes of at most ``forward_batch_size`` samples
    (:func:`forward_batch_for`: all of it on a GPU, 250 on CPU); the counts of all images are added
    by one ``scatter_add_`` over (image, class).

    Everything but the forward pass is two memory passes over the batch: the noise is drawn
    already scaled (``normal_(0, sigma)``: the same values as ``randn() * sigma`` on CPU and GPU
    for tensors of 16 values or more, one write instead of a write and a read-modify-write), and
    the image is added to it directly into a tensor of the model's memory format (no separate
    layout conversion). Counting stays on the device (no host synchronization per forward pass,
    which ``bincount`` needs on CUDA to size its output)."""
    k = len(images)
    if num <= 0 or k == 0:
        return torch.zeros(k, num_classes, dtype=torch.long, device=images.device)
    per_image = max(1, batch_size // k)
    forward_batch = forward_batch_for(images.device, k * per_image, forward_batch_size)
    counts = torch.zeros(k, num_classes, dtype=torch.long, device=images.device)
    ones = torch.ones(k, per_image, dtype=torch.long, device=images.device)
    shape = images.shape[1:]
    layout = memory_format if (images.dim() == 4 and memory_format is not torch.contiguous_format) else None
    done = 0
    while done < num:
        b = min(per_image, num - done)
        noise = torch.empty((k, b, *shape), device=images.device, dtype=images.dtype)
        noise.normal_(0.0, sigma, generator=generator)
        if layout is None:
            batch = noise.add_(images.unsqueeze(1)).flatten(0, 1)
        else:   # x + noise written straight into the layout the model runs in
            batch = torch.empty((k * b, *shape), device=images.device, dtype=images.dtype, memory_format=layout)
            torch.add(noise, images.unsqueeze(1), out=batch.view(k, b, *shape))
        if len(batch) <= forward_batch:
            predictions = model(batch).argmax(1).view(k, b)
        else:
            predictions = torch.cat([model(chunk).argmax(1) for chunk in batch.split(forward_batch)]).view(k, b)
        counts.scatter_add_(1, predictions, ones[:, :b])
        done += b
    return counts


def certify(model: nn.Module, images: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, num_classes: int,
            batch_size: int, generator: torch.Generator | None = None,
            memory_format: torch.memory_format = torch.contiguous_format,
            forward_batch_size: int | None = None) -> dict[str, np.ndarray]:
    """CERTIFY of Cohen et al. for k images at once: the top class of ``n0`` samples, its count
    among ``n`` fresh samples, ``pA_lower`` (:func:`clopper_pearson_lower`) and the radius
    (:func:`certified_radius`); ``prediction`` is ``ABSTAIN`` (-1) and ``radius`` NaN where
    ``pA_lower < 0.5``."""
    selection = sample_counts(model, images, n0, sigma, num_classes, batch_size, generator, memory_format,
                              forward_batch_size)
    top = selection.argmax(1)
    estimation = sample_counts(model, images, n, sigma, num_classes, batch_size, generator, memory_format,
                               forward_batch_size)
    count_top = estimation.gather(1, top.unsqueeze(1)).squeeze(1).cpu().numpy()
    pa_lower = clopper_pearson_lower(count_top, n, alpha)
    radius = certified_radius(pa_lower, sigma)
    prediction = np.where(np.isnan(radius), ABSTAIN, top.cpu().numpy())
    return {"prediction": prediction, "radius": radius, "pa_lower": pa_lower, "count": count_top}


def predict(model: nn.Module, images: torch.Tensor, sigma: float, n: int, alpha: float, num_classes: int,
            batch_size: int, generator: torch.Generator | None = None,
            memory_format: torch.memory_format = torch.contiguous_format,
            forward_batch_size: int | None = None) -> np.ndarray:
    """PREDICT of Cohen et al. for k images at once: the top class of ``n`` samples, or
    ``ABSTAIN`` unless ``binomtest(n_A, n_A + n_B, 0.5)`` (two-sided) has p-value <= alpha."""
    counts = sample_counts(model, images, n, sigma, num_classes, batch_size, generator, memory_format,
                           forward_batch_size)
    top2 = counts.topk(min(2, num_classes), dim=1)
    first = top2.values[:, 0].cpu().numpy()
    second = top2.values[:, 1].cpu().numpy() if num_classes > 1 else np.zeros_like(first)
    classes = top2.indices[:, 0].cpu().numpy()
    out = np.full(len(first), ABSTAIN, dtype=np.int64)
    for i, (a, b) in enumerate(zip(first.tolist(), second.tolist())):  # one scipy test per image
        if binomtest(a, a + b, 0.5).pvalue <= alpha:
            out[i] = classes[i]
    return out


def file_suffix(ctx: EvalContext) -> str:
    """What the file names of this evaluation carry after ``certify``: the runner's
    ``ctx.suffix`` (``@<mode>+<variant>``, as in metrics.json; empty for the plain model); for a
    context without one but with an adaptation, ``@`` and the adaptation's label
    (``@bn-momentum-rho1-n512``), so that variants evaluated into one directory never collide."""
    given = getattr(ctx, "suffix", "")
    if given:
        return re.sub(r"[^A-Za-z0-9@.+=-]+", "-", str(given))
    label = ctx.adaptation.label() if ctx.adaptation is not None else ""
    return "@" + label if label else ""


def noisy_adaptation_batch(data_test, size: int, sigma: float, seed: int, device: torch.device) -> torch.Tensor:
    """``size`` distinct test images (a seeded random subset) with N(0, sigma^2 I) noise: the batch
    the BN statistics are adapted on before certifying at ``sigma`` (Nandy et al. Sec. 3)."""
    order = torch.randperm(len(data_test), generator=torch.Generator().manual_seed(derive_seed(seed, "adapt")))
    images = torch.stack([data_test[i][0] for i in order[:size].tolist()]).to(device)
    generator = torch.Generator(device=device).manual_seed(derive_seed(seed, "adapt-noise", sigma))
    return images + sigma * torch.randn(images.shape, generator=generator, device=device, dtype=images.dtype)


# ---------------------------------------------------------------------------------------- evaluator
class CertifyEvaluator(Evaluator):
    """Randomized-smoothing certification (Cohen et al. CERTIFY and PREDICT) for every sigma in
    ``sigmas``, with the per-example upper envelope over sigma (Nandy et al. Fig. 3).

    Under a BN adaptation (``+adaptation=...``), before each sigma the statistics are adapted on
    one batch of ``adapt_batch_size`` sigma-noised test images (the adaptation's ``batch_size``
    when it has one) and frozen; afterwards they are reset to the source statistics.

    Writes ``certify<suffix>.csv`` (one row per sigma and image: index, label, prediction,
    radius, correct, time, count, pA_lower, PREDICT's answer), ``certify<suffix>_envelope.csv``
    and ``certify<suffix>.png`` (certified accuracy vs L2 radius, a curve per sigma and the
    envelope) in the run directory, ``<suffix>`` being the variant's ``@...`` of metrics.json
    (:func:`file_suffix`). Finished groups of images are kept in
    ``certify<suffix>_sigma<s>.partial.jsonl`` until the evaluation ends, so a killed run
    resumes where it stopped (same results: the noise is seeded per group).

    Args:
        sigmas: noise levels (pixel space [0, 1]).
        n0, n, alpha: Cohen et al.'s constants (paper: 100, 100,000, 0.001).
        predict_n: samples for PREDICT (0: skip it).
        max_images: a random subset of the test split (:func:`evaluation_order`); null: all.
        batch_size: noisy samples drawn at a time (with ``images_per_batch``, this fixes the noise).
        forward_batch_size: noisy samples per forward pass (null: ``batch_size`` on a GPU, at most
            250 on CPU, where smaller batches run faster; the same samples, so the same counts).
        images_per_batch: images sharing a forward pass (null: ``max(1, batch_size // n0)``).
        radii: radii at which certified accuracy is reported.
        headline_radii: radii of the envelope's certified accuracy in the run summary.
        adapt_batch_size: images in the adaptation batch when the adaptation has no batch size.
        memory_format: ``auto`` (channels_last on CPU), ``channels_last`` or ``contiguous``.
        fold_bn: certify with the frozen BN layers folded into the convolutions before them
            (:func:`fold_frozen_batchnorm`; faster, the same base classifier up to float rounding).
    """

    def __init__(self, sigmas=(0.25, 0.5, 1.0), n0: int = 100, n: int = 1000, alpha: float = 0.001,
                 predict_n: int = 100, max_images: int | None = 100, batch_size: int = 1000,
                 images_per_batch: int | None = None, radii=(0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0),
                 headline_radii=(0.0, 0.5, 1.0), adapt_batch_size: int = 512, seed: int = 0,
                 memory_format: str = "auto", fold_bn: bool = True, plot: bool = True,
                 forward_batch_size: int | None = None):
        self.sigmas = tuple(float(s) for s in sigmas)
        if not self.sigmas or any(s <= 0 for s in self.sigmas):
            raise ConfigError(f"eval certify sigmas={list(sigmas)}: expected a non-empty list of noise levels > 0")
        if int(n0) < 1 or int(n) < 1:
            raise ConfigError(f"eval certify needs n0 >= 1 and n >= 1, got n0={n0}, n={n}")
        if not 0 < alpha < 1:
            raise ConfigError(f"eval certify alpha={alpha}: expected 0 < alpha < 1 (Cohen et al.: 0.001)")
        if int(predict_n) < 0 or int(batch_size) < 1 or int(adapt_batch_size) < 1:
            raise ConfigError(f"eval certify needs predict_n >= 0, batch_size >= 1, adapt_batch_size >= 1; got "
                              f"{predict_n}, {batch_size}, {adapt_batch_size}")
        if forward_batch_size is not None and int(forward_batch_size) < 1:
            raise ConfigError(f"eval certify forward_batch_size={forward_batch_size}: expected >= 1 or null")
        if images_per_batch is not None and int(images_per_batch) < 1:
            raise ConfigError(f"eval certify images_per_batch={images_per_batch}: expected >= 1 or null")
        if memory_format not in MEMORY_FORMATS:
            raise ConfigError(f"eval certify memory_format={memory_format!r}; expected one of {MEMORY_FORMATS}")
        self.n0, self.n, self.alpha, self.predict_n = int(n0), int(n), float(alpha), int(predict_n)
        self.max_images, self.batch_size = max_images, int(batch_size)
        self.images_per_batch = int(images_per_batch) if images_per_batch else max(1, self.batch_size // self.n0)
        self.radii = tuple(float(r) for r in radii)
        self.headline_radii = tuple(float(r) for r in headline_radii)
        self.adapt_batch_size, self.seed = int(adapt_batch_size), seed
        self.memory_format, self.fold_bn, self.plot = memory_format, bool(fold_bn), plot
        self.forward_batch_size = int(forward_batch_size) if forward_batch_size else None

    def evaluate(self, model, data, ctx: EvalContext):
        adaptation = check_freezable(ctx.adaptation, "certify")
        suffix = file_suffix(ctx)
        indices = evaluation_order(len(data.test), self.max_images)
        n_adapt = (adaptation.batch_size or self.adapt_batch_size) if adaptation is not None else 0
        start, sampling_seconds, samples = time.perf_counter(), 0.0, 0
        per_sigma, rows = {}, []
        radius_by_sigma, correct_by_sigma, partials = [], [], []
        Path(ctx.run_dir).mkdir(parents=True, exist_ok=True)
        model.eval()
        with model_memory_format(model, self.memory_format, ctx.device, "eval certify memory_format") as memory_format:
            for sigma in self.sigmas:
                adapt_batch = noisy_adaptation_batch(data.test, min(n_adapt, len(data.test)), sigma, self.seed,
                                                     ctx.device) if adaptation is not None else None
                with frozen_adaptation(model, adaptation, adapt_batch):
                    guard = FrozenStatisticsGuard(model, f"eval certify sigma={sigma:g}")
                    base = fold_frozen_batchnorm(model) if self.fold_bn else model
                    partial = Path(ctx.run_dir) / f"certify{suffix}_sigma{sigma:g}.partial.jsonl"
                    partials.append(partial)
                    out, labels, seconds, count = self._certify_all(base, data.test, indices, data.num_classes,
                                                                    sigma, ctx, memory_format, partial)
                    del base
                    guard.check()
                sampling_seconds += seconds
                samples += count
                correct = out["prediction"] == labels.numpy()
                radius_by_sigma.append(out["radius"])
                correct_by_sigma.append(correct)
                per_sigma[f"{sigma:g}"] = self._summary(out, correct, labels.numpy(), seconds, count)
                for i in range(len(indices)):
                    rows.append({"sigma": sigma, "index": int(indices[i]), "label": int(labels[i]),
                                 "prediction": int(out["prediction"][i]),
                                 "radius": 0.0 if np.isnan(out["radius"][i]) else float(out["radius"][i]),
                                 "correct": int(correct[i]), "time_s": float(out["time_s"][i]),
                                 "count": int(out["count"][i]), "pa_lower": float(out["pa_lower"][i]),
                                 "predict": int(out["predict"][i]) if "predict" in out else ""})
                ctx.log({f"certify/sigma{sigma:g}/certified_acc_r{r:g}": a * 100
                         for r, a in zip(self.radii, per_sigma[f"{sigma:g}"]["certified_accuracy"].values())})
        env_radius, env_sigma = envelope_radius(np.stack(radius_by_sigma), np.stack(correct_by_sigma))
        envelope = {"certified_accuracy": dict(zip((f"{r:g}" for r in self.radii),
                                                   certified_accuracy(env_radius, ~np.isnan(env_radius), self.radii))),
                    "sigma_share": {f"{s:g}": float(np.mean(env_sigma == j)) for j, s in enumerate(self.sigmas)}}
        run_dir = Path(ctx.run_dir)
        csv_path, env_path = run_dir / f"certify{suffix}.csv", run_dir / f"certify{suffix}_envelope.csv"
        _write_csv(csv_path, rows)
        _write_csv(env_path, [{"index": int(indices[i]), "label": int(labels[i]),
                               "sigma": self.sigmas[env_sigma[i]] if env_sigma[i] >= 0 else "",
                               "radius": 0.0 if np.isnan(env_radius[i]) else float(env_radius[i]),
                               "correct": int(not np.isnan(env_radius[i]))} for i in range(len(indices))])
        png_path = None
        if self.plot:
            png_path = run_dir / f"certify{suffix}.png"
            how = adaptation.describe() if adaptation is not None else "no adaptation"
            plot_certified_accuracy(np.stack(radius_by_sigma), np.stack(correct_by_sigma), env_radius, self.sigmas,
                                    png_path, title=f"{data.name}, {how}\nCERTIFY n={self.n}, alpha={self.alpha:g}")
        ctx.log({f"certify/envelope/certified_acc_r{r}": a * 100 for r, a in envelope["certified_accuracy"].items()})
        for partial in partials:  # the CSV files hold everything now
            partial.unlink(missing_ok=True)
        return {"n0": self.n0, "n": self.n, "alpha": self.alpha, "predict_n": self.predict_n, "images": len(indices),
                "adaptation": adaptation.describe() if adaptation is not None else None,
                "adapt_batch_size": n_adapt or None,
                "memory_format": str(memory_format).removeprefix("torch."), "fold_bn": self.fold_bn,
                "forward_batch_size": forward_batch_for(ctx.device, self.batch_size, self.forward_batch_size),
                "sigmas": per_sigma,
                "envelope": envelope, "samples": samples,
                "samples_per_second": samples / sampling_seconds if sampling_seconds else math.nan,
                "seconds": time.perf_counter() - start, "csv": str(csv_path), "envelope_csv": str(env_path),
                "png": str(png_path) if png_path else None}

    def _certify_all(self, model, dataset, indices, num_classes, sigma, ctx, memory_format, partial_path: Path):
        """CERTIFY (and PREDICT) of the test images ``indices`` in groups of ``images_per_batch``
        (loaded group by group); returns the per-image results, the labels, seconds and samples.

        Every finished group is appended to ``partial_path``; a rerun of the same run (same run
        directory, hence same config) reads the groups found there instead of recomputing them.
        The noise of a group is seeded by (seed, sigma, group), so the results are those of an
        uninterrupted run."""
        k = self.images_per_batch
        done = _read_partial(partial_path)
        parts, labels, samples = [], [], 0
        groups = range(0, len(indices), k)
        started = time.perf_counter()
        for g in tqdm(groups, desc=f"certify sigma={sigma:g}", disable=not ctx.progress, mininterval=1.0):
            if g in done:
                parts.append({key: np.asarray(v, dtype=np.float64 if key in ("radius", "pa_lower", "time_s")
                                              else np.int64) for key, v in done[g]["out"].items()})
                labels += done[g]["labels"]
                continue
            items = [dataset[i] for i in indices[g:g + k].tolist()]
            x = torch.stack([image for image, _ in items]).to(ctx.device)
            group_labels = [int(label) for _, label in items]
            labels += group_labels
            generator = torch.Generator(device=ctx.device).manual_seed(derive_seed(self.seed, "certify", sigma, g))
            t = time.perf_counter()
            out = certify(model, x, sigma, self.n0, self.n, self.alpha, num_classes, self.batch_size, generator,
                          memory_format, self.forward_batch_size)
            if self.predict_n:
                out["predict"] = predict(model, x, sigma, self.predict_n, self.alpha, num_classes, self.batch_size,
                                         generator, memory_format, self.forward_batch_size)
            out["time_s"] = np.full(len(x), (time.perf_counter() - t) / len(x))  # the group's time per image
            samples += len(x) * (self.n0 + self.n + self.predict_n)
            parts.append(out)
            with open(partial_path, "a") as fh:
                fh.write(json.dumps({"group": g, "labels": group_labels,
                                     "out": {key: v.tolist() for key, v in out.items()}}) + "\n")
        seconds = time.perf_counter() - started
        return ({key: np.concatenate([p[key] for p in parts]) for key in parts[0]}, torch.as_tensor(labels), seconds,
                samples)

    def _summary(self, out, correct, labels, seconds, samples) -> dict:
        radius = out["radius"]
        summary = {"certified_accuracy": dict(zip((f"{r:g}" for r in self.radii),
                                                  certified_accuracy(radius, correct, self.radii))),
                   "abstain": float(np.mean(np.isnan(radius))),
                   "median_radius_correct": float(np.median(radius[correct])) if correct.any() else math.nan,
                   "samples_per_second": samples / seconds if seconds else math.nan}
        if "predict" in out:
            summary["predict_accuracy"] = float(np.mean(out["predict"] == labels))
            summary["predict_abstain"] = float(np.mean(out["predict"] == ABSTAIN))
        return summary

    def table(self, results):
        radii = list(results["envelope"]["certified_accuracy"])
        rows = []
        for sigma, s in results["sigmas"].items():
            rows.append([f"sigma={sigma}", *(100 * a for a in s["certified_accuracy"].values()), 100 * s["abstain"],
                         100 * s["predict_accuracy"] if "predict_accuracy" in s else "",
                         s["samples_per_second"]])
        rows.append(["envelope (best sigma per image)",
                     *(100 * a for a in results["envelope"]["certified_accuracy"].values()), "", "", ""])
        text = format_table(["certified top-1 % at L2 radius", *(f"r={r}" for r in radii), "abstain %",
                             "PREDICT %", "samples/s"], rows, precision=1)
        adaptation = results["adaptation"] or "no adaptation"
        return (text + f"\nCERTIFY n0={results['n0']}, n={results['n']}, alpha={results['alpha']:g}; PREDICT "
                f"n={results['predict_n']}; {results['images']} images; {adaptation}"
                + (f" (adapted on {results['adapt_batch_size']} noisy test images, then frozen)"
                   if results["adapt_batch_size"] else "")
                + f"; {results['seconds']:.0f} s\n{results['csv']}")

    def headline(self, results):
        acc = results["envelope"]["certified_accuracy"]
        out = {f"certified_acc_r{r:g}": 100 * acc[f"{r:g}"] for r in self.headline_radii if f"{r:g}" in acc}
        for sigma, s in results["sigmas"].items():
            out[f"certified_acc_sigma{sigma}_r0"] = 100 * next(iter(s["certified_accuracy"].values()))
        return out

    def compare_rows(self, results):
        return [(f"certified r={r}", 100 * a) for r, a in results["envelope"]["certified_accuracy"].items()]


def _read_partial(path: Path) -> dict[int, dict]:
    """The groups an interrupted run finished (a torn last line is ignored)."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[int(record["group"])] = record
    return done


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["index"])
        writer.writeheader()
        writer.writerows(rows)


def plot_certified_accuracy(radius_by_sigma: np.ndarray, correct_by_sigma: np.ndarray, envelope: np.ndarray,
                            sigmas, path: Path, title: str = "") -> None:
    """Certified accuracy vs L2 radius: one curve per sigma and the per-example envelope
    (Nandy et al. Fig. 3; Cohen et al. Fig. 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = np.concatenate([radius_by_sigma[np.isfinite(radius_by_sigma)], envelope[np.isfinite(envelope)]])
    top = float(finite.max()) * 1.05 if len(finite) else 1.0
    grid = np.linspace(0.0, max(top, 1e-3), 300)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(sigmas)))
    for color, sigma, radius, correct in zip(colors, sigmas, radius_by_sigma, correct_by_sigma):
        ax.plot(grid, certified_accuracy(radius, correct, grid), color=color, label=f"sigma = {sigma:g}")
    ax.plot(grid, certified_accuracy(envelope, ~np.isnan(envelope), grid), color="k", linestyle="--",
            linewidth=1.5, label="envelope (best sigma per image)")
    ax.set_xlabel("L2 radius (pixel space [0, 1])")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
