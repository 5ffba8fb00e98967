"""Covariate shift vs error (Schneider et al. 2020, Sec. 5 and Fig. 3): for every (corruption,
severity) subset, the Wasserstein distance between the source BatchNorm statistics and the
statistics of the subset, and the top-1 error of the unadapted and of the fully adapted model."""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from robustexp.adaptation.base import require_unadapted
from robustexp.adaptation.bn import BatchNormAdaptation, batchnorm_layers
from robustexp.adaptation.shift_measures import layer_shift, mean_shift
from robustexp.data.corruptions.names import CORRUPTION_CATEGORIES
from robustexp.data.corruptions.sources import CorruptionSource
from robustexp.errors import ConfigError
from robustexp.evaluation.base import EvalContext, Evaluator, evaluate_batches, evaluate_subset
from robustexp.evaluation.corruptions import _subsets
from robustexp.rendering import format_table, save_figure

log = logging.getLogger(__name__)

# the four ImageNet-C hold-out corruptions belong to these categories (Hendrycks & Dietterich 2019)
HOLDOUT_CATEGORIES = {"speckle_noise": "noise", "gaussian_blur": "blur", "spatter": "weather", "saturate": "digital"}
CATEGORY_OF = {**{c: cat for cat, names in CORRUPTION_CATEGORIES.items() for c in names}, **HOLDOUT_CATEGORIES}
CATEGORY_ORDER = (*CORRUPTION_CATEGORIES, "other")
CSV_FILE, SCATTER_FILE, LAYER_FILE = "shift.csv", "shift_vs_error.png", "shift_per_layer.png"
NORMALIZED = ("per BN layer sqrt(mean_c W2_c^2), W2_c between N(0,1) and N((mu_t-mu_s)/sigma_s, var_t/var_s) "
              "(the target statistics after the source normalization, sigma_s = sqrt(var_s + BN eps)); "
              "w2_mean: mean over layers")


def category(name: str) -> str:
    return CATEGORY_OF.get(name, "other")


def pearson(x, y) -> float | None:
    """Pearson correlation, None when undefined (fewer than 2 points or a constant variable)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    if denominator == 0.0:
        return None
    return float(np.clip((dx * dy).sum() / denominator, -1.0, 1.0))


def spearman(x, y) -> float | None:
    """Spearman rank correlation (Pearson of the ranks, ties averaged)."""
    from scipy.stats import rankdata

    if len(x) < 2:
        return None
    return pearson(rankdata(x), rankdata(y))


def linear_fit(x, y) -> tuple[float, float] | None:
    """Least-squares ``y = slope * x + intercept``; None when x is constant or has < 2 points."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) == 0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


class ShiftEvaluator(Evaluator):
    """Covariate shift and error on each (corruption, severity) subset (Schneider et al. 2020,
    Sec. 5, Fig. 3).

    For every subset from ``source`` (the same sources as :class:`CorruptionEvaluator`):

    * target statistics: ``BatchNormAdaptation(mode="full")`` estimates the mean and (biased)
      variance of every BN layer's input over the whole subset (upstream layers normalized by
      batch statistics, as in full adaptation); source statistics: the layers' running buffers
      before adaptation;
    * ``w2_per_layer``: normalized W2 per BN layer (:func:`robustexp.adaptation.shift_measures.layer_shift`,
      the BN layer's ``eps`` in the source normalization), ``w2_mean`` its mean over layers
      (``w2_mean_unnormalized``: the same without normalization);
    * ``error_unadapted`` / ``error_adapted``: top-1 error (%) of the model as trained and of
      the fully adapted model (statistics of the whole subset, then frozen) on the subset.

    Summary: Pearson and Spearman correlations (and a linear fit) between ``w2_mean`` and each
    error over all subsets and per corruption category (noise, blur, weather, digital; the
    hold-out corruptions in their category, others in ``other``); per-layer W2 averaged over
    corruptions (Fig. 3 iv-v), overall and per severity. ``plot``: ``shift_vs_error.png``,
    ``shift_per_layer.png`` and ``shift.csv`` (one row per subset) in the run directory.

    With ``+adaptation=...`` the evaluator still measures the shift of the *unadapted* model: it
    does not depend on the variant (``per_variant = False``), so the runner runs it once per
    evaluation mode on the model as trained (:mod:`robustexp.evaluation.loop`).
    """

    per_variant = False  # measures the unadapted model: once per run, whatever the adaptation variants

    def __init__(self, source: CorruptionSource, corruptions="common", severities=None, batch_size: int = 500,
                 max_images: int | None = None, plot: bool = True):
        self.source = source
        self.corruptions, self.severities = _subsets(source, corruptions, severities)
        self.batch_size, self.max_images, self.plot = batch_size, max_images, plot

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model, data, ctx: EvalContext):
        start = time.perf_counter()
        require_unadapted(ctx.adaptation, "shift")
        layers = batchnorm_layers(model)
        if not layers:
            raise ConfigError(f"the shift evaluator measures BatchNorm statistics; {type(model).__name__} has no "
                              f"BatchNorm layer")
        source_stats = {name: (layer.running_mean.detach().cpu().clone(), layer.running_var.detach().cpu().clone())
                        for name, layer in layers}
        eps = {name: float(layer.eps) for name, layer in layers}
        plain = dataclasses.replace(ctx, adaptation=None)
        grid: dict[str, dict[str, dict]] = {}
        subsets = [(c, s) for c in self.corruptions for s in self.severities]
        bar = tqdm(subsets, desc="shift", disable=not ctx.progress, mininterval=1.0)
        try:
            for name, severity in bar:
                bar.set_postfix_str(f"{name} s{severity}")
                def make(n, c=name, s=severity):
                    return self.source.batches(data, c, s, n, ctx, self.max_images)
                unadapted = evaluate_subset(model, make, plain, self.batch_size)
                full = BatchNormAdaptation(mode="full").attach(model)
                try:
                    full.estimate_full(model, make(self.batch_size), ctx.device)
                    target_stats = {n: (layer.running_mean.detach().cpu().clone(),
                                        layer.running_var.detach().cpu().clone()) for n, layer in layers}
                    adapted = evaluate_batches(model, make(self.batch_size), ctx.device)
                finally:
                    full.detach()  # back to the source statistics
                per_layer = layer_shift(source_stats, target_stats, normalized=True, eps=eps)
                unnormalized = layer_shift(source_stats, target_stats, normalized=False)
                result = {"category": category(name), "w2_mean": mean_shift(per_layer),
                          "w2_mean_unnormalized": mean_shift(unnormalized), "w2_per_layer": per_layer,
                          "error_unadapted": 100.0 - unadapted["top1"], "error_adapted": 100.0 - adapted["top1"],
                          "n": unadapted["n"]}
                grid.setdefault(name, {})[str(severity)] = result
                ctx.log({f"shift/{name}/s{severity}/{k}": result[k]
                         for k in ("w2_mean", "error_unadapted", "error_adapted")})
        finally:
            bar.close()
            self.source.close()
        summary = self._summary(grid, [n for n, _ in layers])
        results = {"source": self.source.description, "seconds": time.perf_counter() - start,
                   "distance": NORMALIZED, "layers": [n for n, _ in layers], "grid": grid, "summary": summary}
        if self.plot:
            run_dir = Path(ctx.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            results["files"] = [str(p.name) for p in (self.write_csv(results, run_dir / CSV_FILE),
                                                      self.plot_scatter(results, run_dir / SCATTER_FILE),
                                                      self.plot_layers(results, run_dir / LAYER_FILE))]
        overall = summary["correlation"]["overall"]
        ctx.log({f"shift/pearson_{which}": overall[which]["pearson"] for which in ("unadapted", "adapted")
                 if overall[which]["pearson"] is not None})
        return results

    @staticmethod
    def _rows(grid):
        return [(c, int(s), r) for c, by_s in grid.items() for s, r in by_s.items()]

    def _summary(self, grid, layer_names) -> dict:
        rows = self._rows(grid)
        groups = {"overall": rows}
        for cat in CATEGORY_ORDER:
            members = [row for row in rows if row[2]["category"] == cat]
            if members:
                groups[cat] = members
        correlation = {}
        for group, members in groups.items():
            w2 = [r["w2_mean"] for _, _, r in members]
            correlation[group] = {"n": len(members)}
            for which in ("unadapted", "adapted"):
                errors = [r[f"error_{which}"] for _, _, r in members]
                fit = linear_fit(w2, errors)
                correlation[group][which] = {"pearson": pearson(w2, errors), "spearman": spearman(w2, errors),
                                             "slope": fit[0] if fit else None, "intercept": fit[1] if fit else None}
        per_layer = {n: float(np.mean([r["w2_per_layer"][n] for _, _, r in rows])) for n in layer_names}
        by_severity = {}
        for severity in sorted({s for _, s, _ in rows}):
            members = [r for _, s, r in rows if s == severity]
            by_severity[str(severity)] = {n: float(np.mean([r["w2_per_layer"][n] for r in members]))
                                          for n in layer_names}
        return {"correlation": correlation, "w2_mean": float(np.mean([r["w2_mean"] for _, _, r in rows])),
                "w2_per_layer": per_layer, "w2_per_layer_by_severity": by_severity}

    # ------------------------------------------------------------------ files
    def write_csv(self, results, path: Path) -> Path:
        layers = results["layers"]
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["corruption", "category", "severity", "w2_mean", "w2_mean_unnormalized",
                             "error_unadapted", "error_adapted", "n", *(f"w2:{n}" for n in layers)])
            for c, s, r in self._rows(results["grid"]):
                writer.writerow([c, r["category"], s, r["w2_mean"], r["w2_mean_unnormalized"], r["error_unadapted"],
                                 r["error_adapted"], r["n"], *(r["w2_per_layer"][n] for n in layers)])
        return path

    def plot_scatter(self, results, path: Path) -> Path:
        """Fig. 3 (i-ii): top-1 error against the mean W2, unadapted and fully adapted model,
        colored by corruption category, with a linear fit per category and overall."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self._rows(results["grid"])
        correlation = results["summary"]["correlation"]
        colors = dict(zip(CATEGORY_ORDER, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:gray")))
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
        for ax, which, title in zip(axes, ("unadapted", "adapted"), ("unadapted model", "fully adapted model")):
            for cat in CATEGORY_ORDER:
                members = [r for _, _, r in rows if r["category"] == cat]
                if not members:
                    continue
                x = np.array([r["w2_mean"] for r in members])
                y = np.array([r[f"error_{which}"] for r in members])
                r_cat = correlation[cat][which]["pearson"]
                label = cat + (f" (r={r_cat:.2f})" if r_cat is not None else "")
                ax.scatter(x, y, s=18, color=colors[cat], label=label, alpha=0.85)
                fit = correlation[cat][which]
                if fit["slope"] is not None:
                    xs = np.linspace(x.min(), x.max(), 2)
                    ax.plot(xs, fit["slope"] * xs + fit["intercept"], color=colors[cat], lw=1)
            overall = correlation["overall"][which]
            if overall["slope"] is not None:
                x_all = np.array([r["w2_mean"] for _, _, r in rows])
                xs = np.linspace(x_all.min(), x_all.max(), 2)
                ax.plot(xs, overall["slope"] * xs + overall["intercept"], color="black", lw=1, ls="--",
                        label="all (fit)")
            r_all = overall["pearson"]
            ax.set_title(f"{title}" + (f": Pearson r = {r_all:.2f}" if r_all is not None else ""), fontsize=9)
            ax.set_xlabel("mean normalized W2 over BN layers")
            ax.set_ylabel("top-1 error (%)")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.suptitle(f"covariate shift vs error ({results['source']})", fontsize=9)
        return save_figure(fig, path)

    def plot_layers(self, results, path: Path) -> Path:
        """Fig. 3 (iv-v): W2 per BN layer, averaged over corruptions, one line per severity."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = results["layers"]
        summary = results["summary"]
        x = np.arange(len(layers))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(layers) + 2), 4.2))
        by_severity = summary["w2_per_layer_by_severity"]
        cmap = plt.get_cmap("viridis")
        for i, (severity, values) in enumerate(by_severity.items()):
            ax.plot(x, [values[n] for n in layers], marker=".", lw=1,
                    color=cmap(i / max(len(by_severity) - 1, 1)), label=f"severity {severity}")
        ax.plot(x, [summary["w2_per_layer"][n] for n in layers], color="black", lw=2, label="mean")
        ax.set_xticks(x)
        ax.set_xticklabels(layers, rotation=90, fontsize=6 if len(layers) > 20 else 8)
        ax.set_ylabel("normalized W2 (mean over corruptions)")
        ax.set_title("covariate shift per BN layer", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        return save_figure(fig, path)

    # ------------------------------------------------------------------ reporting
    def table(self, results):
        rows = [[c, s, r["w2_mean"], r["error_unadapted"], r["error_adapted"]]
                for c, s, r in self._rows(results["grid"])]
        text = format_table(["corruption", "severity", "W2 (mean over layers)", "error %", "error % (full adapt.)"],
                            rows, precision=3)

        def fmt(value):
            return "" if value is None else value

        correlation = results["summary"]["correlation"]
        corr_rows = [[group, c["n"], fmt(c["unadapted"]["pearson"]), fmt(c["unadapted"]["spearman"]),
                      fmt(c["adapted"]["pearson"]), fmt(c["adapted"]["spearman"])]
                     for group, c in correlation.items()]
        text += "\n\n" + format_table(["W2 vs error", "subsets", "Pearson", "Spearman", "Pearson (adapted)",
                                       "Spearman (adapted)"], corr_rows, precision=3)
        text += f"\n{results['source']}, {results['seconds']:.0f} s"
        return text

    def headline(self, results):
        overall = results["summary"]["correlation"]["overall"]
        out = {"shift_w2_mean": results["summary"]["w2_mean"]}
        for which in ("unadapted", "adapted"):
            if overall[which]["pearson"] is not None:
                out[f"shift_pearson_{which}"] = overall[which]["pearson"]
        return out

    def compare_rows(self, results):
        """None: the shift evaluator measures the unadapted model (and full adaptation itself)
        whatever the adaptation variant, so its numbers would be the same in every column."""
        return []
