"""Evaluations: ``conf/eval/<name>.yaml`` lists evaluators by ``_target_``."""

from robustexp.evaluation.base import EvalContext, Evaluator
from robustexp.evaluation.clean import CleanEvaluator
from robustexp.evaluation.corruptions import CorruptionEvaluator, MixedCorruptionEvaluator
from robustexp.evaluation.covariate_shift import ShiftEvaluator

__all__ = ["CleanEvaluator", "CorruptionEvaluator", "EvalContext", "Evaluator", "MixedCorruptionEvaluator",
           "ShiftEvaluator"]
