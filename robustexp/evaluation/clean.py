"""Clean top-1 / top-5 accuracy on the test split."""

from __future__ import annotations

from robustexp.evaluation.base import EvalContext, Evaluator, evaluate_subset, test_batches
from robustexp.evaluation.report import format_table


class CleanEvaluator(Evaluator):
    def __init__(self, batch_size: int = 500, max_images: int | None = None):
        self.batch_size = batch_size
        self.max_images = max_images

    def evaluate(self, model, data, ctx: EvalContext):
        result = evaluate_subset(model, lambda n: test_batches(data.test, n, ctx, self.max_images), ctx,
                                 self.batch_size)
        ctx.log({f"clean/{k}": v for k, v in result.items()})
        return result

    def table(self, results):
        return format_table(["clean", "top-1 %", "top-5 %", "loss", "RMS cal. %", "ECE %", "images"],
                            [["test split", results["top1"], results["top5"], results["loss"],
                              results["rms_calibration_error"], results["ece"], results["n"]]])

    def compare_rows(self, results):
        return [("clean", results["top1"])]

    def headline(self, results):
        return {"clean_top1": results["top1"], "clean_top5": results["top5"]}
