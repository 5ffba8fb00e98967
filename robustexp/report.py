"""Paper-style tables and plots from finished runs: ``python -m robustexp.report <run or sweep dirs>``.

Each argument is a run directory (holding ``metrics.json``), a sweep directory (whose job folders
link to their runs), or a folder of runs (``outputs/runs``). Runs that did not complete are
listed and left out. Runs that differ only in their seed are one row: mean, with ``± sd`` when
there are several seeds.

Tables, each written as markdown, CSV and LaTeX (booktabs) into ``--out`` (default
``outputs/report``), and printed:

* ``methods``: one row per training method (the comparisons of Rusak et al. Table 3 and
  Tsiligkaridis & Tsiligkaridis Table 1): clean top-1, mCA (with and without noise), mCE,
  epsilon* along Gaussian / uniform / adversarial noise, RMS calibration error clean / corrupted;
* ``adaptation``: one row per run that was evaluated under test-time adaptation variants, one
  column per variant (Schneider et al. Table 1: mCE, or mCA where there is no AlexNet baseline);
* ``corruptions``: top-1 per corruption (mean over severities), one column per run and variant;
* ``corruption_gap``: one row per run and variant: clean top-1, corrupted top-1 (mCA), their gap,
  mCE and relative mCE (AlexNet- or baseline-normalized) or else the mean unnormalized CE
  (Nandy et al. Table 3);
* ``gaussian_noise``: accuracy under Gaussian noise per sigma, with and without adaptation,
  mean ± 2 sd over runs and seeds (Nandy et al. Table 1);
* ``adversarial``: robust top-1 under PGD (and EoT-PGD with adaptation) per threat model
  (Nandy et al. Table 2);
* ``certified``: certified accuracy at the evaluated radii per sigma (Nandy et al. Fig. 3 /
  Cohen et al. Table 1), and ``certified.png``: certified accuracy against radius for every run.

Plots: ``methods.png`` (mCA and clean top-1 per method), ``corruptions.png`` (per-corruption top-1).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from robustexp.rendering import format_table, save_figure
from robustexp.run_id import NON_IDENTITY_KEYS
from robustexp.utils import atomic_write_bytes

METHOD_COLUMNS = (  # (column label, summary key)
    ("clean top-1", "clean_top1"),
    ("mCA", "mCA"),
    ("mCA w/o noise", "mCA_without_noise"),
    ("mCE", "mCE"),
    ("relative mCE", "relative_mCE"),
    ("eps* Gaussian", "eps_star_gaussian"),
    ("eps* uniform", "eps_star_uniform"),
    ("eps* adversarial", "eps_star_adversarial"),
    ("RMS cal. clean", "clean_rms_calibration_error"),
    ("RMS cal. corrupted", "corrupted_rms_calibration_error"),
)


class ReportError(ValueError):
    pass


@dataclass
class Run:
    path: Path
    metrics: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, Any]:
        return self.metrics.get("summary", {})

    @property
    def method(self) -> str:
        method = self.config.get("method") or {}
        return str(method.get("name", "standard")) if method else "standard"

    @property
    def seed(self) -> int:
        return int(self.metrics.get("seed", self.config.get("seed", 0)))

    @property
    def label(self) -> str:
        """What distinguishes the run, seed aside: method, model, dataset, adaptation, tag."""
        parts = [self.method, str((self.config.get("model") or {}).get("name", "")),
                 str((self.config.get("dataset") or {}).get("name", ""))]
        adaptation = self.config.get("adaptation") or {}
        if adaptation:
            parts.append(str(adaptation.get("name", "adapt")))
        if self.config.get("tag"):
            parts.append(str(self.config["tag"]))
        return " / ".join(p for p in parts if p)

    @property
    def group_key(self) -> str:
        """The config without the seed (and what does not change results): runs that share it are
        seeds of one experiment."""
        ignored = ("seed", *NON_IDENTITY_KEYS)
        blob = json.dumps({k: v for k, v in self.config.items() if k not in ignored}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:6]

    def variants(self) -> list[str]:
        """'none' and the adaptation variants this run was evaluated under (in evaluation order);
        the points of a grid sweep (``+adaptation=schneider_fig1``) are left to its own CSV / plot."""
        sweep = self.metrics.get("adaptation_sweep") or {}
        grid = set(sweep.get("grid_variants", self.metrics.get("adaptation") or {})) if sweep else set()
        names = ["none"]
        for key in self.summary:
            if "@" in key:
                variant = key.split("@", 1)[1]
                if variant not in names and variant not in grid:
                    names.append(variant)
        return names


def _load_run(path: Path) -> Run:
    metrics_file = path / "metrics.json"
    try:
        metrics = json.loads(metrics_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{metrics_file}: cannot read it as JSON ({exc})") from exc
    config_file = path / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    return Run(path, metrics, config or {})


def collect_runs(paths: Iterable[str | Path]) -> tuple[list[Run], list[Run]]:
    """(complete runs, incomplete runs) found under ``paths``: run, sweep or runs directories, or any
    folder with runs deeper below (``output_root``); a run reached twice (a sweep's link) counts once."""
    found: dict[Path, Run] = {}
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise ReportError(f"{path} does not exist (expected a run directory with metrics.json, a sweep "
                              "directory or a folder of runs)")
        candidates = [path] if (path / "metrics.json").is_file() else \
            [p / "run" if (p / "run").is_dir() else p for p in sorted(path.iterdir()) if p.is_dir()]
        candidates = [c for c in candidates if (c / "metrics.json").is_file()]
        if not candidates:  # an output root (runs/ and sweeps/ below it) or a folder of those
            candidates = [m.parent for m in sorted(path.rglob("metrics.json"))]
        if not candidates:
            raise ReportError(f"{path}: no metrics.json in it or in its subfolders")
        for c in candidates:
            found.setdefault(c.resolve(), _load_run(c))
    runs = list(found.values())
    return [r for r in runs if r.metrics.get("status") == "complete"], \
        [r for r in runs if r.metrics.get("status") != "complete"]


# ---------------------------------------------------------------------- aggregation
def _mean_sd(values: Sequence[float], spread: float = 1.0) -> tuple[float, float | None]:
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not values:
        return math.nan, None
    return statistics.fmean(values), spread * statistics.stdev(values) if len(values) > 1 else None


def _cell(values: Sequence[float], spread: float = 1.0, precision: int = 1) -> str:
    mean, sd = _mean_sd(values, spread)
    if math.isnan(mean):
        return ""
    return f"{mean:.{precision}f}" + (f" ± {sd:.{precision}f}" if sd is not None else "")


def _group(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs by experiment (config without the seed), labelled by method / model / dataset /
    adaptation; experiments that share a label get their config hash appended."""
    by_key: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.label, r.group_key, r.seed)):
        by_key.setdefault(run.group_key, []).append(run)
    labels = [group[0].label for group in by_key.values()]
    return {(group[0].label if labels.count(group[0].label) == 1 else f"{group[0].label} [{key}]"): group
            for key, group in by_key.items()}


@dataclass
class Table:
    name: str
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    label_columns: int = 1  # leading columns that name the row rather than hold a result

    def __post_init__(self) -> None:
        self.rows = [r for r in self.rows if any(str(c) for c in r[self.label_columns:])]  # no empty rows

    def markdown(self) -> str:
        text = f"### {self.title}\n\n{format_table(self.headers, self.rows)}\n"
        return text + (f"\n{self.note}\n" if self.note else "")

    def csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(self.headers)
        writer.writerows(self.rows)
        return buffer.getvalue()

    def latex(self) -> str:
        def escape(text: str) -> str:
            for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                         ("±", r"$\pm$"), ("*", r"$^*$")):
                text = text.replace(a, b)
            return text

        spec = "l" + "r" * (len(self.headers) - 1)
        lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{escape(self.title)}}}",
                 rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                 " & ".join(escape(h) for h in self.headers) + r" \\", r"\midrule"]
        lines += [" & ".join(escape(str(c)) for c in row) + r" \\" for row in self.rows]
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        return "\n".join(lines) + "\n"


def methods_table(runs: Sequence[Run]) -> Table | None:
    """One row per method (and model / dataset), the columns any of them has."""
    groups = _group(runs)
    columns = [(label, key) for label, key in METHOD_COLUMNS if any(key in r.summary for r in runs)]
    if not columns or len(groups) < 1:
        return None
    rows = [[label, str(len(group)), *(_cell([r.summary.get(key, math.nan) for r in group],
                                             precision=2 if key.startswith("eps_star") else 1)
                                       for _, key in columns)] for label, group in groups.items()]
    return Table("methods", "Training methods (mean ± sd over seeds; %, eps* in L2 pixel units)",
                 ["run", "seeds", *[label for label, _ in columns]], rows, label_columns=2)


def adaptation_table(runs: Sequence[Run]) -> Table | None:
    """Runs evaluated under several adaptation variants: mCE (or mCA) per variant."""
    adapted = [r for r in runs if len(r.variants()) > 1]
    if not adapted:
        return None
    metric = "mCE" if all("mCE" in r.summary for r in adapted) else "mCA"
    variants: list[str] = []
    for run in adapted:
        variants += [v for v in run.variants() if v not in variants and
                     f"{metric}{'' if v == 'none' else '@' + v}" in run.summary]
    rows = []
    for label, group in _group(adapted).items():
        rows.append([label, str(len(group)), *(
            _cell([r.summary.get(metric if v == "none" else f"{metric}@{v}", math.nan) for r in group])
            for v in variants)])
    return Table("adaptation", f"{metric} (%) without and with test-time adaptation (Schneider et al. Table 1)",
                 ["run", "seeds", *variants], rows, label_columns=2)


def _per_corruption(run: Run, variant: str) -> dict[str, float]:
    key = "corruptions" if variant == "none" else f"corruptions@{variant}"
    result = run.metrics.get(key) or {}
    per = (result.get("summary") or {}).get("per_corruption") or {}
    return {c: v["top1_mean"] for c, v in per.items()}


def corruptions_table(runs: Sequence[Run]) -> Table | None:
    columns: list[tuple[str, list[Run], str]] = []
    for label, group in _group(runs).items():
        for variant in group[0].variants():
            if _per_corruption(group[0], variant):
                columns.append((label if variant == "none" else f"{label} @{variant}", group, variant))
    if not columns:
        return None
    names: list[str] = []
    for _, group, variant in columns:
        names += [c for c in _per_corruption(group[0], variant) if c not in names]
    rows = [[c, *(_cell([_per_corruption(r, v).get(c, math.nan) for r in g]) for _, g, v in columns)]
            for c in names]
    return Table("corruptions", "Top-1 (%) per corruption, mean over severities", ["corruption",
                                                                                    *[c[0] for c in columns]], rows)


def _summary_value(run: Run, key: str, variant: str) -> float:
    """``summary[key]`` of the unadapted model (``variant == 'none'``) or ``summary[key@variant]``."""
    value = run.summary.get(key if variant == "none" else f"{key}@{variant}", math.nan)
    return float(value) if isinstance(value, (int, float)) else math.nan


def _clean_gap(run: Run, variant: str) -> float:
    """Clean top-1 minus mCA (Nandy et al. Table 3, "Gaps"): the run's ``clean_gap`` where the runner
    stored it, else from ``clean_top1`` and ``mCA`` of the same variant."""
    stored = _summary_value(run, "clean_gap", variant)
    return stored if not math.isnan(stored) else \
        _summary_value(run, "clean_top1", variant) - _summary_value(run, "mCA", variant)


CORRUPTION_GAP_COLUMNS = (  # (column label, summary key); None: computed by _clean_gap
    ("clean", "clean_top1"), ("corrupt (mCA)", "mCA"), ("gap", None), ("mCE", "mCE"),
    ("relative mCE", "relative_mCE"), ("mean uCE", "mean_uCE"))


def corruption_gap_table(runs: Sequence[Run]) -> Table | None:
    """Nandy et al. Table 3: per run and adaptation variant, clean top-1, top-1 under corruptions
    (mCA over the evaluated corruptions x severities), the gap between them, mCE and relative mCE
    (where a CE baseline normalized them); without a baseline the mean unnormalized CE instead.
    Mean ± sd over seeds."""
    entries = [(label, group, variant) for label, group in _group(runs).items() for variant in group[0].variants()
               if not math.isnan(_summary_value(group[0], "mCA", variant))]
    if not entries:
        return None
    has_mce = any(not math.isnan(_summary_value(g[0], "mCE", v)) for _, g, v in entries)
    normalized_keys = ("mCE", "relative_mCE") if has_mce else ("mean_uCE",)
    columns = [(label, key) for label, key in CORRUPTION_GAP_COLUMNS
               if key in (None, "clean_top1", "mCA") or key in normalized_keys]
    rows = [[_row_label(label, variant), str(len(group)),
             *(_cell([_clean_gap(r, variant) if key is None else _summary_value(r, key, variant) for r in group])
               for _, key in columns)] for label, group, variant in entries]
    normalized = "mCE and relative mCE normalized by the CE baseline" if has_mce else \
        "mean unnormalized CE (no CE baseline)"
    return Table("corruption_gap", "Top-1 (%) clean and under corruptions, their gap, and "
                 f"{'mCE' if has_mce else 'mean uCE'} (Nandy et al. Table 3)",
                 ["run", "seeds", *[label for label, _ in columns]], rows,
                 note=f"corrupt: mCA over the evaluated corruptions x severities; gap: clean - corrupt; {normalized}; "
                      "mean ± sd over seeds", label_columns=2)


def _results(run: Run, evaluator: str) -> list[tuple[str, dict[str, Any]]]:
    """(variant, result) of one evaluator in a run, the unadapted model first."""
    out = []
    for variant in run.variants():
        key = evaluator if variant == "none" else f"{evaluator}@{variant}"
        if isinstance(run.metrics.get(key), dict):
            out.append((variant, run.metrics[key]))
    return out


def _row_label(label: str, variant: str) -> str:
    return label if variant == "none" else f"{label} @{variant}"


def _keys_of(runs: Sequence[Run], evaluator: str, field: str) -> list[str]:
    """The keys of ``result[field]`` over every result of ``evaluator``, in first-seen order."""
    keys: list[str] = []
    for run in runs:
        for _, result in _results(run, evaluator):
            keys += [k for k in result.get(field, {}) if k not in keys]
    return keys


def gaussian_noise_table(runs: Sequence[Run]) -> Table | None:
    """Top-1 under Gaussian noise per sigma and variant: mean ± 2 sd over every run of every seed
    (Nandy et al. report mean ± 2 sd of 5 runs)."""
    sigmas = _keys_of(runs, "gaussian_noise", "sigmas")
    if not sigmas:
        return None
    rows = []
    for label, group in _group(runs).items():
        for variant, _ in _results(group[0], "gaussian_noise"):
            cells = []
            for sigma in sigmas:
                values = [v for r in group for var, res in _results(r, "gaussian_noise") if var == variant
                          for v in res.get("sigmas", {}).get(sigma, {}).get("top1_runs", [])]
                cells.append(_cell(values, spread=2.0))
            rows.append([_row_label(label, variant), *cells])
    return Table("gaussian_noise", "Top-1 (%) under Gaussian noise, mean ± 2 sd over runs and seeds "
                 "(Nandy et al. Table 1)", ["run", *[f"sigma={s}" for s in sigmas]], rows)


def adversarial_table(runs: Sequence[Run]) -> Table | None:
    """Robust top-1 per attack, without adaptation (PGD) and with it (EoT-PGD) (Nandy et al. Table 2)."""
    attacks = _keys_of(runs, "pgd", "attacks")
    if not attacks:
        return None
    rows = []
    for label, group in _group(runs).items():
        for variant, _ in _results(group[0], "pgd"):
            def values(attack, field, group=group, variant=variant):
                return [res["attacks"][attack][field] for r in group for var, res in _results(r, "pgd")
                        if var == variant and attack in res.get("attacks", {})]
            rows.append([_row_label(label, variant), _cell(values(attacks[0], "clean_top1")),
                         *(_cell(values(a, "robust_top1")) for a in attacks)])
    first = next(res for r in runs for _, res in _results(r, "pgd"))["attacks"]
    headers = [f"{a} eps={first[a]['eps']:g}" if a in first else a for a in attacks]
    return Table("adversarial", "Robust top-1 (%) under PGD; with adaptation, EoT-PGD (Nandy et al. Table 2)",
                 ["run", "clean", *headers], rows)


def certified_table(runs: Sequence[Run]) -> tuple[Table | None, list[tuple[str, list[float], list[float]]]]:
    """Certified accuracy (%) at the evaluated radii per sigma and for the per-image envelope over
    sigma, and the curves (label, radii, accuracy) to plot."""
    rows, curves, radii = [], [], None
    for label, group in _group(runs).items():
        for run in group:
            for variant, result in _results(run, "certify"):
                entries = [(f"sigma={s}", v) for s, v in result.get("sigmas", {}).items()]
                if result.get("envelope"):
                    entries.append(("envelope", result["envelope"]))
                for name, entry in entries:
                    at = entry.get("certified_accuracy") or {}
                    radii = radii or list(at)
                    row_label = f"{_row_label(label, variant)} s{run.seed} {name}"
                    rows.append([row_label, *(f"{100 * at[r]:.1f}" if r in at else "" for r in radii)])
                    curves.append((row_label, [float(r) for r in at], [100 * v for v in at.values()]))
    if not rows:
        return None, curves
    return Table("certified", "Certified top-1 (%) at L2 radius r (randomized smoothing)",
                 ["run", *[f"r={r}" for r in radii]], rows), curves


# ---------------------------------------------------------------------- plots
def _plot_methods(table: Table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headers = table.headers
    wanted = [h for h in ("clean top-1", "mCA") if h in headers]
    if not wanted:
        return
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(table.rows)), 3.2))
    width = 0.8 / len(wanted)
    for j, column in enumerate(wanted):
        i = headers.index(column)
        values = [float(r[i].split(" ±")[0]) if r[i] else 0.0 for r in table.rows]
        ax.bar([k + j * width for k in range(len(values))], values, width=width, label=column)
    ax.set_xticks([k + width * (len(wanted) - 1) / 2 for k in range(len(table.rows))])
    ax.set_xticklabels([r[0].split(" / ")[0] for r in table.rows], rotation=30, ha="right")
    ax.set_ylabel("top-1 %")
    ax.set_ylim(0, 100)
    # above the axes: inside it would cover the bars, which reach 100 %
    ax.legend(fontsize=8, ncols=len(wanted), loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)
    save_figure(fig, path)


def _plot_curves(curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, radius, accuracy in curves:
        ax.step(radius, accuracy, where="post", label=label)
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy %")
    ax.legend(fontsize=6)
    save_figure(fig, path)


# ---------------------------------------------------------------------- command
TABLES = ("methods", "adaptation", "corruptions", "corruption_gap", "gaussian_noise", "adversarial", "certified")


def build_report(paths: Sequence[str | Path], out: str | Path, tables: Sequence[str] = TABLES) -> dict[str, Any]:
    """Write the tables (md / csv / tex) and plots for the runs under ``paths`` into ``out``."""
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise ReportError(f"unknown table(s) {unknown}; expected some of {', '.join(TABLES)}")
    runs, incomplete = collect_runs(paths)
    if not runs:
        raise ReportError(f"no complete run under {', '.join(map(str, paths))} "
                          f"({len(incomplete)} incomplete: {', '.join(r.path.name for r in incomplete)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    built: list[Table] = []
    curves = []
    for name in tables:
        if name == "certified":
            table, curves = certified_table(runs)
        else:
            table = {"methods": methods_table, "adaptation": adaptation_table, "corruptions": corruptions_table,
                     "corruption_gap": corruption_gap_table, "gaussian_noise": gaussian_noise_table,
                     "adversarial": adversarial_table}[name](runs)
        if table is not None:
            built.append(table)
    files = []
    for table in built:
        for suffix, text in (("md", table.markdown()), ("csv", table.csv()), ("tex", table.latex())):
            atomic_write_bytes(out / f"{table.name}.{suffix}", text.encode())
            files.append(str(out / f"{table.name}.{suffix}"))
    by_name = {t.name: t for t in built}
    if "methods" in by_name:
        _plot_methods(by_name["methods"], out / "methods.png")
        files.append(str(out / "methods.png"))
    if curves:
        _plot_curves(curves, out / "certified.png")
        files.append(str(out / "certified.png"))
    text = "\n".join(t.markdown() for t in built)
    if incomplete:
        text += "\nLeft out (not complete): " + ", ".join(f"{r.path.name} ({r.metrics.get('status')})"
                                                         for r in incomplete) + "\n"
    atomic_write_bytes(out / "report.md", f"# robustexp report\n\n{len(runs)} runs\n\n{text}".encode())
    files.append(str(out / "report.md"))
    return {"runs": len(runs), "incomplete": len(incomplete), "tables": [t.name for t in built], "files": files,
            "text": text}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m robustexp.report", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="run directories, sweep directories or folders of runs")
    parser.add_argument("--out", default="outputs/report", help="where the tables and plots go")
    parser.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated subset of {','.join(TABLES)}")
    args = parser.parse_args(argv)
    try:
        result = build_report(args.paths, args.out, [t for t in args.tables.split(",") if t])
    except ReportError as exc:
        print(f"robustexp.report: error: {exc}", file=sys.stderr)
        return 2
    print(result["text"])
    print(f"[robustexp.report] {result['runs']} runs -> {args.out}: "
          + ", ".join(Path(f).name for f in result["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
