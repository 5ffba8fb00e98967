"""Clean top-1 / top-5 accuracy and calibration on the test split."""

from __future__ import annotations

from pathlib import Path

from robustexp.data.batches import test_batches
from robustexp.evaluation.base import EvalContext, Evaluator, evaluate_subset
from robustexp.evaluation.metrics import check_rms_binning, select_rms_binning
from robustexp.rendering import format_table


class CleanEvaluator(Evaluator):
    """Top-1 / top-5, loss, RMS calibration error and ECE on the test split; with
    ``reliability_diagram`` also ``reliability_clean.png`` in the run directory (one file per
    evaluation mode and adaptation variant, see :func:`robustexp.evaluation.calibration.figure_name`).

    ``rms_binning`` (``paper`` | ``hendrycks``, see
    :func:`robustexp.evaluation.metrics.rms_calibration_error`) chooses the binning behind
    ``rms_calibration_error``; the result names it and keeps both values."""

    def __init__(self, batch_size: int = 500, max_images: int | None = None, reliability_diagram: bool = True,
                 rms_binning: str = "paper"):
        self.batch_size = batch_size
        self.max_images = max_images
        self.reliability_diagram = reliability_diagram
        self.rms_binning = check_rms_binning(rms_binning, "eval.evaluators.clean.rms_binning")
        self._figures: set[str] = set()

    def evaluate(self, model, data, ctx: EvalContext):
        result = evaluate_subset(model, lambda n: test_batches(data.test, n, ctx, self.max_images), ctx,
                                 self.batch_size)
        select_rms_binning(result, self.rms_binning)
        if self.reliability_diagram and result["n"]:
            from robustexp.evaluation.calibration import figure_name, write_reliability_diagram

            name = figure_name("reliability_clean", ctx, self._figures)
            write_reliability_diagram(result["reliability"], Path(ctx.run_dir) / name,
                                      f"{data.name} clean test split ({result['n']} images)",
                                      result["rms_calibration_error"])
            result["reliability_png"] = name
        ctx.log({f"clean/{k}": v for k, v in result.items() if k != "reliability"})
        return result

    def table(self, results):
        binning = results.get("rms_binning", "paper")
        return format_table(["clean", "top-1 %", "top-5 %", "loss", f"RMS cal. % ({binning} bins)", "ECE %", "images"],
                            [["test split", results["top1"], results["top5"], results["loss"],
                              results["rms_calibration_error"], results["ece"], results["n"]]])

    def compare_rows(self, results):
        return [("clean", results["top1"])]

    def headline(self, results):
        return {"clean_top1": results["top1"], "clean_top5": results["top5"],
                "clean_rms_calibration_error": results["rms_calibration_error"], "clean_ece": results["ece"]}
