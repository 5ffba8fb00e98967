"""Evaluators for choosing the prior strength N of partial adaptation (Schneider et al. 2020,
Sec. 4 and Sec. 6): the hold-out corruptions with their own summary keys, and Proposition 1's N
from the source and hold-out BN statistics. The selection itself is the adaptation report
:class:`robustexp.adaptation.prior_selection.PriorSelectionReport`; the recipe is
``conf/experiment/schneider_table1*.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from robustexp.adaptation.base import require_unadapted
from robustexp.adaptation.bn import BatchNormAdaptation, batchnorm_layers
from robustexp.adaptation.shift_measures import prop1_bounds
from robustexp.data.corruptions.sources import CorruptionSource
from robustexp.errors import ConfigError
from robustexp.evaluation.base import EvalContext, Evaluator
from robustexp.evaluation.corruptions import CorruptionEvaluator, _subsets
from robustexp.rendering import format_table

PAPER_N_GRID = tuple(2 ** k for k in range(11))  # Sec. 4: N in {2^0, ..., 2^10}


# ---------------------------------------------------------------------- hold-out corruptions
class HoldoutCorruptionEvaluator(CorruptionEvaluator):
    """The hold-out corruptions on which Schneider et al. (Sec. 4) select N: a
    :class:`CorruptionEvaluator` (defaults: the 4 ImageNet-C hold-out corruptions, no reliability
    diagram) whose run-summary keys are prefixed ``holdout_``, so that it runs next to the test
    corruptions' evaluator without overwriting their ``mCA@<variant>``...

    Summary keys: ``holdout_mCE`` (mean CE over the hold-out corruptions, normalized by AlexNet on
    ImageNet-C or by a baseline run; only with ``ce_baseline``), ``holdout_mean_uCE`` (mean
    unnormalized CE = 100 - mean hold-out top-1), ``holdout_mCA``."""

    def __init__(self, source: CorruptionSource, corruptions="holdout", severities=None, batch_size: int = 500,
                 max_images: int | None = None, ce_baseline: str | None = None, reliability_diagram: bool = False):
        super().__init__(source, corruptions=corruptions, severities=severities, batch_size=batch_size,
                         max_images=max_images, ce_baseline=ce_baseline, preview_images=0,
                         reliability_diagram=reliability_diagram)

    def evaluate(self, model, data, ctx: EvalContext):
        log = ctx.log  # W&B keys of this evaluator under holdout_..., apart from the test corruptions'
        return super().evaluate(model, data, dataclasses.replace(
            ctx, log=lambda m: log({f"holdout_{k}": v for k, v in m.items()})))

    def table(self, results):
        return ("hold-out corruptions (Schneider et al. Sec. 4: N of partial adaptation is selected on these)\n\n"
                + super().table(results))

    def headline(self, results):
        s = results["summary"]
        out = {"holdout_mCA": s["mCA"], "holdout_mean_uCE": s["mean_uCE"]}
        holdout_mce = (s.get("holdout") or {}).get("mCE")
        if holdout_mce is not None:
            out["holdout_mCE"] = holdout_mce
        return out

    def compare_rows(self, results):
        s = results["summary"]
        return [(name, p["top1_mean"]) for name, p in s["per_corruption"].items()] + [("hold-out mCA", s["mCA"])]


# ---------------------------------------------------------------------- Proposition 1
def _standardized(mu_s, var_s, mu_t, var_t, eps: float):
    """The statistics after the source normalization z -> (z - mu_s) / sqrt(var_s + eps)."""
    scale = np.sqrt(np.asarray(var_s, dtype=np.float64) + eps)
    return (np.zeros_like(scale), np.asarray(var_s, dtype=np.float64) / scale ** 2,
            (np.asarray(mu_t, dtype=np.float64) - np.asarray(mu_s, dtype=np.float64)) / scale,
            np.asarray(var_t, dtype=np.float64) / scale ** 2)


def prop1_curves(source_stats: Mapping[str, Sequence], target_stats: Sequence[Mapping[str, Sequence]], n: int,
                 N_grid: Sequence[float], alpha: float = 0.05, normalized: bool = True,
                 eps: float | Mapping[str, float] = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Proposition 1's bounds L(N), U(N) (Schneider et al. Sec. 6) averaged over a network and over
    target subsets, for every N of ``N_grid``.

    ``source_stats[layer] = (mu_s, var_s)`` per channel; ``target_stats`` one such mapping per
    target subset (e.g. per hold-out corruption x severity). For each subset and BN layer,
    :func:`robustexp.adaptation.shift_measures.prop1_bounds` gives the bounds averaged over the layer's
    channels; they are then averaged over layers (plain mean) and over subsets (plain mean).

    ``normalized=True`` applies the proposition to the statistics after the source normalization
    ``z -> (z - mu_s) / sqrt(var_s + eps)`` (the normalized W2 of Sec. 6 / Fig. 3); the bounds are
    homogeneous of degree 2 in (mu, sigma) and depend on mu only through mu_t - mu_s, so this is
    each channel's L and U divided by ``var_s + eps``: channels and layers of any scale weigh alike.
    ``normalized=False`` averages the raw bounds (layers with large activations dominate).
    ``eps``: one value or one per layer (a BN layer's ``eps``)."""
    if not target_stats:
        raise ValueError("no target subsets to average Proposition 1's bounds over")
    grid = np.asarray(N_grid, dtype=np.float64)
    L_sum, U_sum = np.zeros_like(grid), np.zeros_like(grid)
    for subset in target_stats:
        missing = [name for name in source_stats if name not in subset]
        if missing:
            raise KeyError(f"no target statistics for layers {missing}")
        L_layers, U_layers = [], []
        for name, (mu_s, var_s) in source_stats.items():
            mu_t, var_t = subset[name]
            stats = [np.asarray(v.detach().cpu().double() if hasattr(v, "detach") else v, dtype=np.float64)
                     for v in (mu_s, var_s, mu_t, var_t)]
            if normalized:
                stats = _standardized(*stats, eps=eps[name] if isinstance(eps, Mapping) else eps)
            L, U = prop1_bounds(grid, n, *stats, alpha=alpha)
            L_layers.append(L)
            U_layers.append(U)
        L_sum += np.mean(L_layers, axis=0)
        U_sum += np.mean(U_layers, axis=0)
    return L_sum / len(target_stats), U_sum / len(target_stats)


def argmin_N(N_grid: Sequence[float], values: Sequence[float]) -> float:
    """The N of the grid with the smallest value (the first, i.e. the smallest N, on ties)."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.asarray(N_grid, dtype=np.float64)[int(np.nanargmin(values))])


class Prop1PriorEvaluator(Evaluator):
    """Proposition 1's prior strength N (Schneider et al. Sec. 6) from the hold-out corruptions.

    Statistics (of the *unadapted* model; under an adaptation variant it works on a copy of the
    model without the adaptation, like the shift evaluator, and runs once per run):

    * source: every BN layer's running mean and running variance as trained (PyTorch's running
      variance averages *unbiased* batch variances);
    * target ("true" mu_t, sigma_t^2 of the proposition): per hold-out (corruption, severity)
      subset, the mean and biased variance of every BN layer's input over the whole subset, the
      upstream layers normalized by batch statistics of ``batch_size`` images (exactly the
      statistics of full adaptation, :meth:`BatchNormAdaptation.estimate_full`);
    * n: the partial-adaptation batch size (8 in the paper), i.e. the number of images the biased
      estimates of eq. 3 are computed from; alpha: the confidence level of U.

    L(N) and U(N) for every N of ``N_grid`` are averaged over channels, BN layers and subsets as in
    :func:`prop1_curves` (``normalized``: per channel divided by the source variance); the
    summary gets ``prop1_N_L`` and ``prop1_N_U``, the grid values that minimize them.
    """

    per_variant = False  # the runner evaluates it once per mode, on the model as trained

    def __init__(self, source: CorruptionSource, corruptions="holdout", severities=None, batch_size: int = 500,
                 max_images: int | None = None, n: int = 8, N_grid: Sequence[float] = PAPER_N_GRID,
                 alpha: float = 0.05, normalized: bool = True):
        self.source = source
        self.corruptions, self.severities = _subsets(source, corruptions, severities)
        self.batch_size, self.max_images = batch_size, max_images
        if int(n) < 1:
            raise ConfigError(f"prop1 evaluator: n (the partial-adaptation batch size) must be >= 1, got {n}")
        grid = [float(v) for v in (N_grid or [])]
        if not grid or any(v < 0 or math.isnan(v) for v in grid):
            raise ConfigError(f"prop1 evaluator: N_grid must be a non-empty list of prior strengths >= 0, got {N_grid}")
        if not 0 < alpha < 1:
            raise ConfigError(f"prop1 evaluator: alpha must be in (0, 1), got {alpha}")
        self.n, self.N_grid, self.alpha, self.normalized = int(n), grid, float(alpha), bool(normalized)

    def evaluate(self, model, data, ctx: EvalContext):
        start = time.perf_counter()
        require_unadapted(ctx.adaptation, "prop1")  # the source statistics of the model as trained
        layers = batchnorm_layers(model)
        if not layers:
            raise ConfigError(f"the prop1 evaluator needs BatchNorm statistics; {type(model).__name__} has no "
                              "BatchNorm layer")
        source_stats = {name: (layer.running_mean.detach().cpu().clone(), layer.running_var.detach().cpu().clone())
                        for name, layer in layers}
        eps = {name: float(layer.eps) for name, layer in layers}
        subsets = [(c, s) for c in self.corruptions for s in self.severities]
        targets, per_subset = [], {}
        bar = tqdm(subsets, desc="prop1 statistics", disable=not ctx.progress, mininterval=1.0)
        try:
            for name, severity in bar:
                full = BatchNormAdaptation(mode="full").attach(model)
                try:
                    full.estimate_full(model, self.source.batches(data, name, severity, self.batch_size, ctx,
                                                                  self.max_images), ctx.device)
                    stats = {n: (layer.running_mean.detach().cpu().clone(), layer.running_var.detach().cpu().clone())
                             for n, layer in layers}
                finally:
                    full.detach()  # back to the source statistics
                targets.append(stats)
                L, U = prop1_curves(source_stats, [stats], self.n, self.N_grid, self.alpha, self.normalized, eps)
                per_subset.setdefault(name, {})[str(severity)] = {"N_L": argmin_N(self.N_grid, L),
                                                                  "N_U": argmin_N(self.N_grid, U)}
        finally:
            bar.close()
            self.source.close()
        L, U = prop1_curves(source_stats, targets, self.n, self.N_grid, self.alpha, self.normalized, eps)
        return {"source": self.source.description, "seconds": time.perf_counter() - start, "n": self.n,
                "alpha": self.alpha, "normalized": self.normalized, "N_grid": self.N_grid,
                "L": L.tolist(), "U": U.tolist(), "N_L": argmin_N(self.N_grid, L), "N_U": argmin_N(self.N_grid, U),
                "per_subset": per_subset, "layers": len(layers), "subsets": len(subsets),
                "statistics": ("source: BN running mean / running (unbiased) variance; target: mean and biased "
                               "variance of each BN input over each whole hold-out subset (upstream layers "
                               "normalized by batch statistics, as full adaptation); bounds per channel"
                               + (" divided by var_s + BN eps" if self.normalized else "")
                               + ", averaged over channels, then BN layers, then subsets")}

    def table(self, results):
        rows = [[N, L, U] for N, L, U in zip(results["N_grid"], results["L"], results["U"])]
        return (format_table(["N", "L (mean)", "U (mean)"], rows, precision=4)
                + f"\nProposition 1 (Schneider et al. Sec. 6) at n={results['n']}, alpha={results['alpha']}: "
                  f"argmin L: N={results['N_L']:g}, argmin U: N={results['N_U']:g} ({results['subsets']} hold-out "
                  f"subsets, {results['layers']} BN layers; {results['statistics']})\n{results['source']}, "
                  f"{results['seconds']:.0f} s")

    def headline(self, results):
        return {"prop1_N_L": results["N_L"], "prop1_N_U": results["N_U"]}
