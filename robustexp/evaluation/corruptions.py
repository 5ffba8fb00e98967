"""Accuracy under corruptions: every (corruption, severity) subset, or all of them shuffled
together (the "mixed" control of Schneider et al. 2020, Table 4)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from robustexp.data.batches import test_batches
from robustexp.data.corruptions.names import FAMILY_SEVERITIES, TEST_CORRUPTIONS, resolve_corruptions
from robustexp.data.corruptions.sources import CorruptionSource
from robustexp.errors import ConfigError
from robustexp.evaluation.base import EvalContext, Evaluator, evaluate_subset
from robustexp.evaluation.metrics import (
    ALEXNET_CLEAN_ERROR,
    ALEXNET_ERRORS,
    AccuracyMeter,
    check_rms_binning,
    corruption_errors,
    corruption_summary,
    mean_corruption_error,
    select_rms_binning,
)
from robustexp.rendering import format_table
from robustexp.utils import read_json


def _subsets(source: CorruptionSource, corruptions, severities) -> tuple[tuple[str, ...], tuple[int, ...]]:
    names = resolve_corruptions(corruptions, source.family)
    allowed = FAMILY_SEVERITIES[source.family]
    levels = allowed if severities is None else tuple(int(s) for s in severities)
    if not levels or any(s not in allowed for s in levels):
        raise ConfigError(f"severities={list(severities)} do not exist in {source.family}; expected a subset of "
                          f"{list(allowed)} (or null for all)")
    return names, levels


def load_baseline(spec: str) -> tuple[dict[str, dict[str, float]], float | None]:
    """Errors (percent) per corruption and severity, and clean error, of a baseline run given
    as its directory or its metrics.json."""
    path = Path(spec).expanduser()
    path = path / "metrics.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"ce_baseline={spec}: no metrics.json there (expected a finished run directory, "
                          f"'alexnet' or null)")
    metrics = read_json(path)
    grid = (metrics.get("corruptions") or {}).get("grid")
    if not grid:
        raise ConfigError(f"ce_baseline={path} holds no corruption grid")
    errors = {c: {s: 100.0 - r["top1"] for s, r in by_s.items()} for c, by_s in grid.items()}
    clean = metrics.get("clean", {}).get("top1")
    return errors, (100.0 - clean if clean is not None else None)


class CorruptionEvaluator(Evaluator):
    """Top-1 / top-5 / calibration on each (corruption, severity) subset from ``source``
    (generated or on disk), with the summaries of :func:`corruption_summary` (mCA, mCA without
    noise, unnormalized CE) and, with ``ce_baseline``, CE / mCE and relative mCE normalized by
    AlexNet (``alexnet``, ImageNet-C only) or by a baseline run (its directory).

    ``preview_images`` > 0 writes ``corruption_preview.png`` in the run directory: a grid of
    corruptions x severities on the first test images.

    Calibration (:func:`robustexp.evaluation.calibration.grid_calibration`): the RMS calibration
    error and ECE of every subset, their means over the subsets, the ECE of all corrupted images
    pooled, and with ``reliability_diagram`` the pooled ``reliability_corrupted.png``. The RMS
    error of each subset uses ``rms_binning`` (``paper`` | ``hendrycks``, see
    :func:`robustexp.evaluation.metrics.rms_calibration_error`); the results name it.
    """

    def __init__(self, source: CorruptionSource, corruptions="common", severities=None, batch_size: int = 500,
                 max_images: int | None = None, ce_baseline: str | None = None, preview_images: int = 0,
                 reliability_diagram: bool = True, rms_binning: str = "paper"):
        self.rms_binning = check_rms_binning(rms_binning, "eval.evaluators.corruptions.rms_binning")
        self.source = source
        self.corruptions, self.severities = _subsets(source, corruptions, severities)
        self.batch_size = batch_size
        self.max_images = max_images
        if ce_baseline == "alexnet" and source.family != "imagenet_c":
            raise ConfigError("ce_baseline=alexnet normalizes by AlexNet's ImageNet-C errors; for "
                              f"{source.family} give a baseline run directory instead")
        self.baseline = None if ce_baseline in (None, "alexnet") else load_baseline(ce_baseline)
        self.ce_baseline = ce_baseline
        self.preview_images = preview_images
        self.reliability_diagram = reliability_diagram
        self._figures: set[str] = set()

    def evaluate(self, model, data, ctx: EvalContext):
        if self.preview_images > 0:
            from robustexp.evaluation.preview import write_preview

            write_preview(self.source, data, self.corruptions, self.severities, self.preview_images,
                          Path(ctx.run_dir) / "corruption_preview.png")
        grid: dict[str, dict[str, dict]] = {}
        subsets = [(c, s) for c in self.corruptions for s in self.severities]
        start = time.perf_counter()
        bar = tqdm(subsets, desc="corruptions", disable=not ctx.progress, mininterval=1.0)
        try:
            for name, severity in bar:
                bar.set_postfix_str(f"{name} s{severity}")
                result = evaluate_subset(
                    model, lambda n, c=name, s=severity: self.source.batches(data, c, s, n, ctx, self.max_images),
                    ctx, self.batch_size)
                grid.setdefault(name, {})[str(severity)] = select_rms_binning(result, self.rms_binning)
                ctx.log({f"corruption/{name}/s{severity}/top1": result["top1"]})
        finally:
            bar.close()
            self.source.close()
        summary = corruption_summary({c: {s: r["top1"] for s, r in by_s.items()} for c, by_s in grid.items()})
        results = {"source": self.source.description, "seconds": time.perf_counter() - start, "grid": grid,
                   "summary": summary}
        if self.ce_baseline:
            results["summary"].update(self._normalized(model, data, ctx, grid))
        results["calibration"] = self._calibration(grid, data, ctx)
        ctx.log({"corruption/mCA": summary["mCA"], "corruption/mean_uCE": summary["mean_uCE"],
                 **{f"corruption/{k}": v for k, v in results["calibration"].items() if isinstance(v, float)}})
        return results

    def _calibration(self, grid, data, ctx) -> dict:
        from robustexp.evaluation.calibration import figure_name, grid_calibration, write_reliability_diagram

        calibration = grid_calibration(grid)
        if self.reliability_diagram and calibration and sum(calibration["reliability_pooled"]["count"]):
            name = figure_name("reliability_corrupted", ctx, self._figures)
            n_subsets = sum(len(by_s) for by_s in grid.values())
            write_reliability_diagram(
                calibration["reliability_pooled"], Path(ctx.run_dir) / name,
                f"{data.name}, {n_subsets} corruption x severity subsets pooled\n"
                f"(mean RMS cal. over subsets {calibration['rms_calibration_error_mean']:.2f}%)")
            calibration["reliability_png"] = name
        return calibration

    def _normalized(self, model, data, ctx, grid) -> dict:
        errors = {c: {s: 100.0 - r["top1"] for s, r in by_s.items()} for c, by_s in grid.items()}
        clean = evaluate_subset(model, lambda n: test_batches(data.test, n, ctx, self.max_images), ctx,
                                self.batch_size)
        clean_error = 100.0 - clean["top1"]
        if self.baseline is None:  # AlexNet: constants are mean errors over the 5 severities
            if set(self.severities) != {1, 2, 3, 4, 5}:
                raise ConfigError("AlexNet-normalized CE needs all 5 severities (the constants are their mean)")
            baseline, baseline_clean = {c: 100.0 * e for c, e in ALEXNET_ERRORS.items()}, 100.0 * ALEXNET_CLEAN_ERROR
        else:
            baseline, baseline_clean = self.baseline
        per = corruption_errors(errors, baseline, clean_error, baseline_clean)
        names = TEST_CORRUPTIONS if self.source.family == "imagenet_c" else self.corruptions
        out = {"ce_baseline": self.ce_baseline, "clean_error": clean_error, "CE": per,
               **mean_corruption_error(per, names)}
        holdout = [c for c in per if c not in names]
        if holdout:
            out["holdout"] = mean_corruption_error(per, holdout)
        return out

    def table(self, results):
        severities = sorted({s for by_s in results["grid"].values() for s in by_s}, key=int)
        s = results["summary"]
        ce = s.get("CE", {})
        rows = []
        for name, by_s in results["grid"].items():
            row = [name, *(by_s[x]["top1"] if x in by_s else "" for x in severities),
                   s["per_corruption"][name]["top1_mean"]]
            if ce:
                row.append(ce[name]["CE"] if name in ce else "")
            rows.append(row)
        mean_row = ["mean (mCA)", *[sum(r[i + 1] for r in rows) / len(rows) for i in range(len(severities))], s["mCA"]]
        if ce:
            mean_row.append(s.get("mCE", ""))
        rows.append(mean_row)
        headers = ["corruption (top-1 %)", *(f"s{x}" for x in severities), "mean"] + (["CE %"] if ce else [])
        text = format_table(headers, rows, precision=1)
        text += (f"\n\nmCA {s['mCA']:.2f}%  |  mCA without noise {s['mCA_without_noise']:.2f}%  |  "
                 f"mean unnormalized CE {s['mean_uCE']:.2f}%")
        if "mCE" in s:
            text += f"  |  mCE {s['mCE']:.1f}%  |  relative mCE {s.get('relative_mCE', float('nan')):.1f}% " \
                    f"(baseline {s['ce_baseline']})"
        cal = results.get("calibration")
        if cal:
            text += (f"\nRMS calibration error {cal['rms_calibration_error_mean']:.2f}% "
                     f"({cal.get('rms_binning', 'paper')} bins) and ECE {cal['ece_mean']:.2f}% "
                     f"(means over subsets)  |  ECE of all corrupted images {cal['ece_pooled']:.2f}%")
        return text + f"\n{results['source']}, {results['seconds']:.0f} s"

    def headline(self, results):
        s = results["summary"]
        keys = ("mCA", "mCA_without_noise", "mean_uCE", "mCE", "relative_mCE")
        headline = {k: s[k] for k in keys if k in s}
        cal = results.get("calibration")
        if cal:
            headline.update(corrupted_rms_calibration_error=cal["rms_calibration_error_mean"],
                            corrupted_ece=cal["ece_mean"], corrupted_ece_pooled=cal["ece_pooled"])
        return headline

    def derived(self, summary, suffix):
        """The clean-to-corrupted gap, clean top-1 - mCA (Nandy et al. Table 3), where the clean
        evaluator ran under the same mode and variant."""
        if "mCA" + suffix in summary and "clean_top1" + suffix in summary:
            return {"clean_gap" + suffix: summary["clean_top1" + suffix] - summary["mCA" + suffix]}
        return {}

    def compare_rows(self, results):
        s = results["summary"]
        rows = [(name, p["top1_mean"]) for name, p in s["per_corruption"].items()]
        rows.append(("mCA", s["mCA"]))
        if "mCE" in s:
            rows.append(("mCE", s["mCE"]))
        return rows


class MixedCorruptionEvaluator(Evaluator):
    """The "mixed" control (Schneider et al. 2020, Table 4): the images of all (corruption,
    severity) subsets are pooled and shuffled, so every batch mixes corruptions and severities
    (which takes away the systematic shift BN adaptation relies on). Reports the accuracy over
    the pooled set, and per subset."""

    def __init__(self, source: CorruptionSource, corruptions="common", severities=None, batch_size: int = 500,
                 max_images: int | None = None, seed: int = 0, rms_binning: str = "paper"):
        self.rms_binning = check_rms_binning(rms_binning, "eval.evaluators.mixed.rms_binning")
        self.source = source
        self.corruptions, self.severities = _subsets(source, corruptions, severities)
        self.batch_size, self.max_images, self.seed = batch_size, max_images, seed

    def _mixed_batches(self, data, subsets, subset_of, index_in, order, batch_size, progress):
        """(images, labels, subset index per image) batches of the pooled, shuffled subsets."""
        n_batches = (len(order) + batch_size - 1) // batch_size
        for b in tqdm(range(n_batches), desc="mixed corruptions", disable=not progress, mininterval=1.0):
            positions = order[b * batch_size:(b + 1) * batch_size]
            images, labels, owners = [], [], []
            for k in torch.unique(subset_of[positions]).tolist():
                chosen = positions[subset_of[positions] == k]
                x, y = self.source.load(data, *subsets[k], index_in[chosen].tolist(), seed=b * 10007 + k)
                images.append(x.cpu())
                labels.append(y)
                owners.append(torch.full((len(y),), k))
            # a random order within the batch too
            images, labels, owners = torch.cat(images), torch.cat(labels), torch.cat(owners)
            perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed + b))
            yield images[perm], labels[perm], owners[perm]

    @torch.no_grad()
    def evaluate(self, model, data, ctx: EvalContext):
        start = time.perf_counter()
        subsets = [(c, s) for c in self.corruptions for s in self.severities]
        sizes = [self.source.size(data, c, s) for c, s in subsets]
        sizes = [min(n, self.max_images) if self.max_images else n for n in sizes]
        subset_of = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
        index_in = torch.cat([torch.arange(n) for n in sizes])
        order = torch.randperm(len(subset_of), generator=torch.Generator().manual_seed(self.seed))
        overall = AccuracyMeter(self.rms_binning)
        per_subset = [AccuracyMeter(self.rms_binning) for _ in subsets]
        adaptation = ctx.adaptation
        batch_size = adaptation.batch_size or self.batch_size

        def batches(n):
            return self._mixed_batches(data, subsets, subset_of, index_in, order, n, ctx.progress)

        model.eval()
        try:
            adaptation.reset()
            # full: statistics of the whole pooled set
            adaptation.prepare_subset(model, ((x, y) for x, y, _ in batches(self.batch_size)), ctx.device)
            for index, (images, labels, owners) in enumerate(batches(batch_size)):
                images = images.to(ctx.device)
                if adaptation.updates_weights:
                    with torch.enable_grad():
                        logits = adaptation.predict(model, images).detach()
                else:
                    logits = model(images)
                if index == 0 and adaptation.freeze_after:
                    adaptation.freeze()
                overall.update(logits, labels.to(ctx.device))
                for k in torch.unique(owners).tolist():
                    mask = owners == k
                    per_subset[k].update(logits[mask.to(logits.device)], labels[mask].to(ctx.device))
        finally:
            adaptation.reset()
            self.source.close()
        grid: dict[str, dict[str, dict]] = {}
        for (c, s), meter in zip(subsets, per_subset):
            grid.setdefault(c, {})[str(s)] = meter.result()
        result = overall.result()
        ctx.log({f"mixed/{k}": v for k, v in result.items() if k != "reliability"})
        return {"source": self.source.description, "seconds": time.perf_counter() - start, "overall": result,
                "grid": grid}

    def table(self, results):
        r = results["overall"]
        binning = r.get("rms_binning", "paper")
        return format_table(["mixed corruptions", "top-1 %", "top-5 %", f"RMS cal. % ({binning} bins)", "ECE %",
                             "images"],
                            [["all subsets shuffled", r["top1"], r["top5"], r["rms_calibration_error"], r["ece"],
                              r["n"]]]) + f"\n{results['source']}, {results['seconds']:.0f} s"

    def headline(self, results):
        return {"mixed_top1": results["overall"]["top1"]}

    def compare_rows(self, results):
        return [("mixed", results["overall"]["top1"])]
