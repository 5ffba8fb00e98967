"""Adaptation sweeps inside one run: a grid of variants over one trained model, and the
curves of Schneider et al. 2020 (Fig. 1: error vs n for several N) or Nandy et al. 2021
(Tables 4 and 5: accuracy vs rho, vs batch size) as a CSV and a PNG."""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robustexp.adaptation.base import NoAdaptation, TestTimeAdaptation
from robustexp.config import instantiate_component
from robustexp.errors import ConfigError


def expand_grid(grid: DictConfig | Mapping) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """``{label: (variant config, {axis: value})}`` for every combination of ``grid.axes``,
    each variant being ``grid.template`` with the axis values set; labels from ``grid.label``
    (a format string over the axis names)."""
    grid = OmegaConf.to_container(grid, resolve=True) if OmegaConf.is_config(grid) else dict(grid)
    axes = grid.get("axes") or {}
    if not axes or any(not isinstance(v, list) or not v for v in axes.values()):
        raise ConfigError(f"adaptation.grid.axes must map parameter names to non-empty lists, got {axes}")
    label = grid.get("label") or "_".join(f"{k}{{{k}}}" for k in axes)
    out = {}
    for values in itertools.product(*axes.values()):
        point = dict(zip(axes, values))
        out[label.format(**point)] = ({**grid["template"], **point}, point)
    return out


def adaptation_variants(node: DictConfig | None) -> tuple[dict[str, TestTimeAdaptation], dict[str, dict]]:
    """The evaluation variants of a run: ``{"none": NoAdaptation()}`` without ``+adaptation``;
    otherwise the config's ``variants`` and the combinations of its ``grid`` (:func:`expand_grid`),
    preceded by the unadapted model (``none``) unless ``evaluate_unadapted: false``. Also returns
    the grid points (``{label: {axis: value}}``) for the sweep's report."""
    if not node:
        return {"none": NoAdaptation()}, {}
    variants: dict[str, TestTimeAdaptation] = {"none": NoAdaptation()} if node.get("evaluate_unadapted", True) else {}
    configs = dict(node.get("variants") or {})
    points = {}
    if node.get("grid"):
        for label, (variant, point) in expand_grid(node.grid).items():
            configs[label], points[label] = variant, point
    for name, variant in configs.items():
        if name == "none":
            raise ConfigError("adaptation variant name 'none' is reserved for the unadapted model")
        adaptation = instantiate_component(variant)
        if not isinstance(adaptation, TestTimeAdaptation):
            raise ConfigError(f"adaptation variant {name!r}: {type(adaptation).__name__} does not implement "
                              "robustexp.adaptation.base.TestTimeAdaptation")
        variants[name] = adaptation
    return variants, points


class SweepReport:
    """Write ``<name>.csv`` (one row per variant: its axis values and ``metric``) and
    ``<name>.png`` (``metric`` against ``x`` with one line per value of ``series``; the
    unadapted model as a dashed line) in the run directory.

    ``metric`` is a key of the run summary computed for every variant (``mean_uCE``: mean
    corruption error; ``mCE`` with a CE baseline; ``mCA``; ``clean_top1``...).
    """

    def __init__(self, x: str, series: str | None = None, metric: str = "mean_uCE", name: str = "adaptation_sweep",
                 title: str = "", log_x: bool = True):
        self.x, self.series, self.metric, self.name, self.title, self.log_x = x, series, metric, name, title, log_x

    def __call__(self, summary: Mapping[str, float], points: Mapping[str, Mapping[str, Any]], run_dir: Path) -> dict:
        rows = []
        for variant, point in points.items():
            key = f"{self.metric}@{variant}"
            if key not in summary:
                raise ConfigError(f"adaptation.report.metric={self.metric!r}: the summary has no {key!r} "
                                  f"(available: {sorted({k.split('@')[0] for k in summary})})")
            rows.append({"variant": variant, **point, self.metric: summary[key]})
        run_dir = Path(run_dir)
        csv_path, png_path = run_dir / f"{self.name}.csv", run_dir / f"{self.name}.png"
        with open(csv_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        self._plot(rows, summary.get(self.metric), png_path)
        best = min(rows, key=lambda r: r[self.metric]) if "CA" not in self.metric and "top1" not in self.metric \
            else max(rows, key=lambda r: r[self.metric])
        # grid_variants: which adaptation variants of the run are points of this sweep (the others, e.g. full
        # adaptation next to a grid, are columns of their own in robustexp.report)
        return {"csv": str(csv_path), "png": str(png_path), "best": best, "grid_variants": list(points)}

    def _plot(self, rows, unadapted, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4))
        groups: dict[Any, list] = {}
        for row in rows:
            groups.setdefault(row.get(self.series) if self.series else None, []).append(row)
        ordered = sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0]))
        colors = plt.cm.viridis([i / max(len(ordered) - 1, 1) for i in range(len(ordered))])
        for color, (value, members) in zip(colors, ordered):
            members = sorted(members, key=lambda r: r[self.x])
            ax.plot([r[self.x] for r in members], [r[self.metric] for r in members], marker="o", markersize=3,
                    color=color, label=f"{self.series}={value}" if self.series else None)
        if unadapted is not None and not math.isnan(unadapted):
            ax.axhline(unadapted, color="k", linestyle="--", linewidth=1, label="no adaptation")
        if self.log_x and all(r[self.x] > 0 for r in rows):
            ax.set_xscale("log", base=2)
        ax.set_xlabel(self.x)
        ax.set_ylabel(f"{self.metric} (%)")
        ax.set_title(self.title, fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
