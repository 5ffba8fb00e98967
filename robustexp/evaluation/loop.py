"""The evaluation of a trained model: every evaluator, in every evaluation mode of the training
method, under every test-time adaptation variant, into the run record.

* Modes come from :meth:`robustexp.methods.base.TrainingMethod.evaluation_modes` (one unnamed
  mode for most methods; AdvBN's ``main`` / ``aux`` BatchNorm branches).
* Evaluators whose result does not depend on the adaptation (``per_variant = False``: the BN
  shift of the model as trained, its feature divergence, Proposition 1's statistics) run once per
  mode on the unadapted model, before any adaptation is attached: unadapted by construction.
* Every other evaluator runs once per variant, with the variant's adaptation attached for the
  whole variant (:class:`robustexp.adaptation.base.TestTimeAdaptation`); the unadapted model is
  the variant ``none`` (:class:`robustexp.adaptation.base.NoAdaptation`).

Results are keyed ``<evaluator>[@<mode>+<variant>]`` (:func:`suffix`), saved after each evaluator,
and taken from ``kept`` instead of recomputed when an interrupted attempt already has them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from robustexp.adaptation.base import NoAdaptation, TestTimeAdaptation
from robustexp.data.base import DataSplits
from robustexp.evaluation.base import EvalContext, Evaluator
from robustexp.rendering import format_table
from robustexp.run_record import RunRecord

log = logging.getLogger(__name__)


def suffix(mode: str, variant: str) -> str:
    """``@mode+variant`` for named evaluation modes and adaptation variants; empty for the plain model."""
    parts = [p for p in (mode, "" if variant == "none" else variant) if p]
    return "@" + "+".join(parts) if parts else ""


@dataclass
class Evaluated:
    """What summary.md shows of the evaluations: one table per evaluation, and the top-1 of every
    comparison row (an evaluator's ``compare_rows``) per mode and variant."""

    tables: list[str] = field(default_factory=list)
    comparison: dict[str, dict[str, float]] = field(default_factory=dict)

    def comparison_table(self) -> str | None:
        """The table that compares adaptation variants, when there is more than one column."""
        names = list(next(iter(self.comparison.values()), {}))
        if len(names) < 2:
            return None
        return "## top-1 % by test-time adaptation\n\n" + format_table(
            ["", *names], [[label, *(row.get(v, "") for v in names)] for label, row in self.comparison.items()],
            precision=1)


def evaluate_all(modes: Mapping[str, Callable[[], AbstractContextManager[nn.Module]]], data: DataSplits,
                 evaluators: Mapping[str, Evaluator], variants: Mapping[str, TestTimeAdaptation], record: RunRecord,
                 make_context: Callable[[str, TestTimeAdaptation], EvalContext],
                 kept: Mapping[str, Any] | None = None) -> Evaluated:
    """Run the evaluation plan (module docstring) and return what summary.md shows of it."""
    kept = kept or {}
    evaluated = Evaluated()
    independent = {k: e for k, e in evaluators.items() if not e.per_variant}
    dependent = {k: e for k, e in evaluators.items() if e.per_variant}
    for mode, open_mode in modes.items():
        with open_mode() as model:
            if independent:
                _evaluate(model, data, independent, suffix(mode, "none"), NoAdaptation(), record, make_context,
                          kept, evaluated)
            for variant, adaptation in variants.items():
                if not dependent:
                    break
                adaptation.attach(model)
                try:
                    if adaptation.adapts:  # described once attached (Tent counts the layers it adapts)
                        record.metrics.setdefault("adaptation", {})[variant] = adaptation.describe()
                        log.info("evaluating %s with %s: %s", mode or "the model", variant, adaptation.describe())
                    elif mode:
                        log.info("evaluating %s", mode)
                    _evaluate(model, data, dependent, suffix(mode, variant), adaptation, record, make_context, kept,
                              evaluated)
                finally:
                    adaptation.detach()
    return evaluated


def _evaluate(model: nn.Module, data: DataSplits, evaluators: Mapping[str, Evaluator], key_suffix: str,
              adaptation: TestTimeAdaptation, record: RunRecord,
              make_context: Callable[[str, TestTimeAdaptation], EvalContext], kept: Mapping[str, Any],
              evaluated: Evaluated) -> None:
    ctx = make_context(key_suffix, adaptation)
    column = key_suffix.removeprefix("@") or "none"
    for key, evaluator in evaluators.items():
        if key + key_suffix in kept:
            result = kept[key + key_suffix]
            log.info("%s%s: kept from the interrupted attempt", key, key_suffix)
        else:
            log.info("%s%s: evaluating", key, key_suffix)
            start = time.perf_counter()
            result = evaluator.evaluate(model, data, ctx)
            log.info("%s%s: done in %.0f s%s", key, key_suffix, time.perf_counter() - start, "".join(
                f", {k} {v:.4g}" for k, v in evaluator.headline(result).items() if isinstance(v, (int, float))))
        headline = {k + key_suffix: v for k, v in evaluator.headline(result).items()}
        record.add_evaluation(key + key_suffix, result, headline)
        evaluated.tables.append(f"## {key}{key_suffix}\n\n{evaluator.table(result)}")
        for label, value in evaluator.compare_rows(result):
            evaluated.comparison.setdefault(label, {})[column] = value
    for evaluator in evaluators.values():  # numbers derived from several evaluations (clean_gap)
        derived = evaluator.derived(record.summary, key_suffix)
        if derived:
            record.summary.update(derived)
            record.save()
