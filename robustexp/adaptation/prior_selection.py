"""Choosing the prior strength N of partial adaptation (Schneider et al. 2020).

Partial adaptation (Sec. 2) estimates the BN statistics from n = 8 test images and mixes them with
the source statistics as N pseudo-samples (eq. 3). The paper picks N, Sec. 4: "For partial
adaptation, we choose N in {2^0, ..., 2^10} and select the optimal value on the holdout corruption
mCE", and reports the mCE of the 15 test corruptions at that N (Table 1). Sec. 6 offers a
second rule: the N that minimizes the lower (L) or upper (U) bound of Proposition 1 on the
expected squared W2 distance between the true and the estimated target statistics.

A recipe (``conf/adaptation/schneider_table1.yaml``, ``conf/experiment/schneider_table1*.yaml``)
evaluates, in one run, the unadapted model, full adaptation and a grid of partial-adaptation
variants ``partial_N<N>`` at n = 8, with three evaluators:

* ``corruptions`` (:class:`~robustexp.evaluation.corruptions.CorruptionEvaluator`): the 15 test
  corruptions, whose mCE / mCA / mean_uCE are the reported numbers;
* ``holdout`` (:class:`robustexp.evaluation.prior_selection.HoldoutCorruptionEvaluator`): the 4
  hold-out corruptions (speckle noise,
  gaussian blur, spatter, saturate) with summary keys prefixed ``holdout_`` so that they do not
  overwrite the test corruptions' (together the two evaluate all 19 corruptions);
* ``prop1`` (:class:`robustexp.evaluation.prior_selection.Prop1PriorEvaluator`): source and hold-out
  target BN statistics of the
  unadapted model and the N of Proposition 1 (once per run).

:class:`PriorSelectionReport` (the adaptation config's ``report``) then picks N by the chosen rule
and writes the headline numbers ``<key>@partial_selected`` into the run summary.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from robustexp.errors import ConfigError
from robustexp.rendering import format_table

RULES = ("holdout_mce", "prop1_L", "prop1_U")


# ---------------------------------------------------------------------- the report step
class PriorSelectionReport:
    """Select the prior strength N of partial adaptation (Schneider et al. 2020) among the grid
    variants of the run, and report the test corruptions' numbers at it.

    Rules (``select``):

    * ``holdout_mce`` (Sec. 4, the paper's Table 1): the N with the lowest hold-out score, which is
      the summary's ``holdout_mCE@<variant>`` (mean CE over speckle noise, gaussian blur, spatter and
      saturate, AlexNet-normalized on ImageNet-C) when the run has it, else
      ``holdout_mean_uCE@<variant>`` (the unnormalized mean CE, 100 - mean hold-out top-1: datasets
      without AlexNet constants or a baseline run); ties go to the smaller N;
    * ``prop1_L`` / ``prop1_U`` (Sec. 6, Proposition 1): the N that minimizes the lower / upper
      bound, the summary's ``prop1_N_L`` / ``prop1_N_U`` (:class:`Prop1PriorEvaluator`); it must be
      one of the grid's N (give the evaluator the same N grid).

    Every summary key ``<k>@<selected variant>`` is copied to ``<k>@<selected>`` (``mCE`` /
    ``mCA`` / ``mean_uCE`` of the test corruptions, ``clean_top1``, ...), and
    ``prior_N@<selected>`` holds N; these are the run's headline numbers (``mCE@partial_selected``).
    Writes ``<name>.csv`` (one row per N: hold-out score and test metrics), ``<name>.png`` (both
    against N, the selected N marked) and ``<name>.md`` (Table 1: the unadapted model, the other
    variants such as full adaptation, and partial adaptation at the selected N).
    """

    def __init__(self, select: str = "holdout_mce", axis: str = "prior_strength", selected: str = "partial_selected",
                 name: str = "prior_selection", title: str = ""):
        if select not in RULES:
            raise ConfigError(f"adaptation.report.select={select!r}; expected one of {list(RULES)}")
        self.select, self.axis, self.selected, self.name, self.title = select, axis, selected, name, title

    # -------------------------------------------------------------- selection
    @staticmethod
    def holdout_key(summary: Mapping[str, float], variants: Sequence[str]) -> str:
        """``holdout_mCE`` when every variant has it, else ``holdout_mean_uCE``."""
        for key in ("holdout_mCE", "holdout_mean_uCE"):
            if all(f"{key}@{v}" in summary for v in variants):
                return key
        raise ConfigError("adaptation.report.select=holdout_mce needs the hold-out corruptions evaluated for every "
                          "grid variant (summary keys holdout_mCE@<variant> or holdout_mean_uCE@<variant>): add the "
                          "evaluator eval.evaluators.holdout (robustexp.evaluation.prior_selection."
                          "HoldoutCorruptionEvaluator), as conf/experiment/schneider_table1.yaml does")

    def choose(self, summary: Mapping[str, float], points: Mapping[str, Mapping[str, Any]]) -> tuple[str, dict]:
        """(selected variant, details) by the rule ``select``."""
        if not points:
            raise ConfigError("adaptation.report (prior selection) needs a grid of partial-adaptation variants "
                              "(adaptation.grid)")
        if any(self.axis not in p for p in points.values()):
            raise ConfigError(f"adaptation.report.axis={self.axis!r} is not an axis of adaptation.grid "
                              f"(axes: {sorted({k for p in points.values() for k in p})})")
        N_of = {v: float(p[self.axis]) for v, p in points.items()}
        if self.select == "holdout_mce":
            key = self.holdout_key(summary, list(points))
            scores = {v: float(summary[f"{key}@{v}"]) for v in points}
            best = min(points, key=lambda v: (scores[v], N_of[v]))
            return best, {"rule": self.select, "score": key, "scores": scores}
        key = "prop1_N_L" if self.select == "prop1_L" else "prop1_N_U"
        if key not in summary:
            raise ConfigError(f"adaptation.report.select={self.select} needs {key!r} in the run summary: add the "
                              "evaluator eval.evaluators.prop1 (robustexp.evaluation.prior_selection."
                              "Prop1PriorEvaluator), as conf/experiment/schneider_table1.yaml does")
        target = float(summary[key])
        matches = [v for v in points if N_of[v] == target]
        if not matches:
            raise ConfigError(f"Proposition 1 chose N={target:g}, which is not a partial-adaptation variant of this "
                              f"run (grid N: {sorted(N_of.values())}); give eval.evaluators.prop1.N_grid the grid's "
                              "values")
        return matches[0], {"rule": self.select, "score": key, "N": target}

    # -------------------------------------------------------------- report
    def __call__(self, summary: dict[str, float], points: Mapping[str, Mapping[str, Any]], run_dir: Path) -> dict:
        """Select, add the headline keys to ``summary`` (the run summary, changed in place) and write
        the files; returns what goes to ``metrics.json`` under ``adaptation_sweep``."""
        variant, details = self.choose(summary, points)
        N = float(points[variant][self.axis])
        suffix = f"@{variant}"
        for key in [k for k in summary if k.endswith(suffix)]:
            summary[key.removesuffix(suffix) + f"@{self.selected}"] = summary[key]
        summary[f"prior_N@{self.selected}"] = N

        test_keys = [k for k in ("mCE", "mCA", "mean_uCE") if all(f"{k}@{v}" in summary for v in points)]
        score_key = details["score"] if self.select == "holdout_mce" else None
        holdout_keys = [k for k in ("holdout_mCE", "holdout_mean_uCE")
                        if all(f"{k}@{v}" in summary for v in points)]
        rows = []
        for v, point in points.items():
            rows.append({"variant": v, **point, **{k: summary[f"{k}@{v}"] for k in holdout_keys + test_keys},
                         "selected": v == variant})
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        csv_path, png_path, md_path = (run_dir / f"{self.name}.{ext}" for ext in ("csv", "png", "md"))
        with open(csv_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        self._plot(rows, holdout_keys, test_keys, N, png_path)

        grid_variants = set(points)
        others = []
        for key in summary:
            if "@" in key:
                v = key.split("@", 1)[1]
                if v not in grid_variants and v != self.selected and v not in others:
                    others.append(v)
        columns = ["none", *others, self.selected]
        table1 = {c: {k: summary.get(k if c == "none" else f"{k}@{c}") for k in test_keys} for c in columns}
        rule_text = (f"lowest {score_key} (hold-out corruptions; Schneider et al. Sec. 4)" if score_key else
                     f"argmin of Proposition 1's {'L' if self.select == 'prop1_L' else 'U'} (Sec. 6)")
        table = format_table(["variant", *(f"{k} %" for k in test_keys)],
                             [[c if c != self.selected else f"{c} (N={N:g})", *(table1[c][k] if table1[c][k] is not None
                                                                                 else "" for k in test_keys)]
                              for c in columns], precision=1)
        candidates = ", ".join(f"{float(p[self.axis]):g}" for p in points.values())
        text = (f"## Schneider et al. Table 1: partial adaptation at the selected N\n\n{table}\n\n"
                f"N = {N:g} ({variant}) chosen by {rule_text} among N in {{{candidates}}}; "
                f"test numbers over the corruptions of the `corruptions` evaluator.\n")
        if "prop1_N_L" in summary:
            text += (f"Proposition 1 would choose N = {summary['prop1_N_L']:g} (argmin L) / "
                     f"{summary['prop1_N_U']:g} (argmin U).\n")
        md_path.write_text(text)  # the runner adds the text to summary.md and prints it with the run's tables
        out = {"rule": self.select, "selected": {"variant": variant, self.axis: N,
                                                 **{k: summary[f"{k}@{variant}"] for k in holdout_keys + test_keys}},
               "candidates": rows, "table1": table1, "grid_variants": list(points), "csv": str(csv_path),
               "png": str(png_path), "md": str(md_path), "table": text}
        if score_key:
            out["score"] = score_key
        for key in ("prop1_N_L", "prop1_N_U"):
            if key in summary:
                out[key] = summary[key]
        return out

    def _plot(self, rows, holdout_keys, test_keys, N_selected, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4))
        rows = sorted(rows, key=lambda r: r[self.axis])
        xs = [r[self.axis] for r in rows]
        for key, style in [*((k, "--") for k in holdout_keys[:1]), *((k, "-") for k in test_keys if k != "mCA")]:
            label = f"{key} (hold-out)" if key.startswith("holdout") else f"{key} (test corruptions)"
            ax.plot(xs, [r[key] for r in rows], style, marker="o", markersize=3, label=label)
        ax.axvline(N_selected, color="k", linewidth=1, linestyle=":", label=f"selected N={N_selected:g}")
        if all(x > 0 for x in xs):
            ax.set_xscale("log", base=2)
        ax.set_xlabel(f"{self.axis} N")
        ax.set_ylabel("error (%)")
        ax.set_title(self.title or f"partial adaptation: N selected by {self.select}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
