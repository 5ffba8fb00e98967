"""Calibration of clean and corrupted predictions: summaries over a corruption grid and the
reliability-diagram PNG.

Conventions (SPEC, "Metrics"): the RMS calibration error sorts the examples of one subset by
confidence and cuts them into bins of 100 (Hendrycks et al.; the MAGN paper's Table 3 metric,
Sec. 4), summed over all bins (``rms_binning: paper``, the default) or, as Hendrycks et al.'s
``calib_err`` code does, without the highest-confidence bin (``rms_binning: hendrycks``; see
:func:`robustexp.evaluation.metrics.rms_calibration_error`); the ECE uses 15 equal-width
confidence bins (Guo et al. 2017). Both are in percent. Over a corruption benchmark two
aggregates are reported:

* the mean over the corruption x severity subsets of each subset's RMS error and ECE (the
  calibration counterpart of mCA, and what "corrupt RMS calibration error" means in the MAGN
  paper: one number per subset, averaged);
* the ECE of all corrupted images pooled, from the summed reliability bins (exact).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from robustexp.evaluation.metrics import RMS_BINNINGS, ece_from_reliability, pool_reliability


def grid_calibration(grid: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Calibration summary of ``grid[corruption][severity]`` (results of ``AccuracyMeter``)."""
    cells = [r for by_s in grid.values() for r in by_s.values()]
    if not cells:
        return {}
    pooled = pool_reliability([r["reliability"] for r in cells])
    binnings = sorted({r.get("rms_binning", "paper") for r in cells})
    if len(binnings) != 1:
        raise ValueError(f"the subsets of one corruption grid use different RMS binnings {binnings}")
    by_binning = {b: sum(r[f"rms_calibration_error_{b}"] for r in cells) / len(cells) for b in RMS_BINNINGS
                  if all(f"rms_calibration_error_{b}" in r for r in cells)}
    return {
        "rms_binning": binnings[0],
        "rms_calibration_error_mean": sum(r["rms_calibration_error"] for r in cells) / len(cells),
        "rms_calibration_error_mean_by_binning": by_binning,
        "ece_mean": sum(r["ece"] for r in cells) / len(cells),
        "ece_pooled": ece_from_reliability(pooled),
        "per_corruption_rms": {c: sum(r["rms_calibration_error"] for r in by_s.values()) / len(by_s)
                               for c, by_s in grid.items()},
        "reliability_pooled": pooled,
    }


def figure_name(stem: str, ctx, written: set[str]) -> str:
    """``<stem><suffix>.png`` for the evaluation ``ctx`` belongs to. The runner evaluates once per
    evaluation mode and adaptation variant; with a ``suffix`` on the context (``@mode+variant``)
    the name carries it, otherwise the k-th evaluation of the run gets ``<stem>_<k>.png`` so that
    no figure of the run overwrites another (the result records which file is whose)."""
    suffix = getattr(ctx, "suffix", None)
    name = f"{stem}{suffix}.png" if suffix is not None else f"{stem}.png"
    k = 2
    while name in written:
        name = f"{stem}_{k}.png"
        k += 1
    written.add(name)
    return name


def write_reliability_diagram(bins: Mapping[str, list], path: str | Path, title: str,
                              rms_calibration_error: float | None = None) -> Path:
    """A reliability diagram: accuracy per confidence bin against the diagonal (gaps shaded), the
    ECE (and RMS error, when given) in the legend, and the share of examples per bin below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = list(bins["count"])
    n_bins, total = len(counts), max(sum(counts), 1)
    width = 1.0 / n_bins
    centers = [(i + 0.5) * width for i in range(n_bins)]
    filled = [i for i, c in enumerate(counts) if c]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.2, 5.0), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfect calibration")
    top.bar([centers[i] for i in filled], [bins["accuracy"][i] for i in filled], width=width * 0.95,
            color="tab:blue", edgecolor="black", linewidth=0.4, label="accuracy")
    for i in filled:
        accuracy, confidence = bins["accuracy"][i], bins["confidence"][i]
        top.bar(centers[i], confidence - accuracy, bottom=accuracy, width=width * 0.95, fill=False, hatch="///",
                edgecolor="tab:red", linewidth=0.6, label="gap to mean confidence" if i == filled[0] else None)
    metrics = f"ECE {ece_from_reliability(bins):.2f}%"
    if rms_calibration_error is not None:
        metrics = f"RMS cal. {rms_calibration_error:.2f}%, " + metrics
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_title(f"{title}\n{metrics}", fontsize=9)
    top.legend(fontsize=7, loc="upper left")
    bottom.bar(centers, [c / total for c in counts], width=width * 0.95, color="gray")
    bottom.set_xlabel("confidence (max softmax probability)")
    bottom.set_ylabel("share")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
