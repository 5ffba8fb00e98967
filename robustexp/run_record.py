"""The record of one run: ``metrics.json`` (its keys, its status) and ``summary.md``.

One owner for the file every other part reads: the report, the sweep summary, W&B, a rerun.

* ``status``: ``running`` while the run works, then ``complete``, ``preempted`` (stopped by a
  signal after a checkpoint, or SystemExit from a requeueing launcher), ``interrupted``
  (Ctrl-C) or ``failed`` (with ``error`` and ``traceback``).
* the run's own keys (:data:`RUN_KEYS`): identity, where and how it ran, ``summary`` (the
  headline numbers), ``train`` (the training history), ``adaptation`` (the variants' descriptions),
  ``adaptation_sweep`` (a grid report);
* every other key is one evaluation's result, ``<evaluator>[@<mode>+<variant>]``.

The file is rewritten atomically after every evaluation, so an interruption loses nothing
computed; a rerun of an unfinished run takes those evaluations back (:meth:`RunRecord.kept`)
instead of recomputing them, and a rerun of a complete run returns it unchanged.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from robustexp.preemption import Preempted
from robustexp.utils import atomic_write_bytes, atomic_write_json, read_json

METRICS_FILE, SUMMARY_FILE = "metrics.json", "summary.md"
# the keys of metrics.json that describe the run rather than hold one evaluator's result
RUN_KEYS = ("status", "run_id", "run_dir", "seed", "code_version", "device", "world_size", "command", "started",
            "finished", "summary", "train", "adaptation", "adaptation_sweep", "error", "traceback")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class RunRecord:
    """``metrics.json`` of the run in ``run_dir``. Only the writer (rank 0 of a multi-process run)
    writes files; every rank keeps the same record in memory."""

    def __init__(self, run_dir: str | Path, writer: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.writer = writer
        self.previous: dict[str, Any] | None = read_json(self.path) if self.path.is_file() else None
        self.metrics: dict[str, Any] = {}

    # ------------------------------------------------------------------ the previous attempt
    @property
    def complete(self) -> bool:
        """Whether an earlier attempt finished this run."""
        return bool(self.previous) and self.previous.get("status") == "complete"

    def kept(self) -> dict[str, Any]:
        """The evaluations an unfinished earlier attempt computed (none after a complete one)."""
        if not self.previous or self.complete:
            return {}
        return {k: v for k, v in self.previous.items() if k not in RUN_KEYS}

    def previous_summary_text(self) -> str | None:
        summary = self.run_dir / SUMMARY_FILE
        return summary.read_text() if summary.is_file() else None

    # ------------------------------------------------------------------ this attempt
    def start(self, **fields: Any) -> None:
        """A new attempt: status ``running`` with the run's own fields, an empty summary."""
        self.metrics = {"status": "running", **fields, "started": _now(), "summary": {}}
        self.save()

    @property
    def summary(self) -> dict[str, float]:
        return self.metrics["summary"]

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.metrics[key] = value

    def add_evaluation(self, key: str, result: Mapping[str, Any], headline: Mapping[str, float]) -> None:
        """One evaluation's result under ``key`` and its headline numbers in the summary; saved."""
        self.metrics[key] = result
        self.summary.update(headline)
        self.save()

    def save(self) -> None:
        if self.writer:
            atomic_write_json(self.path, self.metrics)

    def fail(self, exc: BaseException) -> str:
        """Record why this attempt stopped (called from an ``except`` block); returns the status."""
        preempted = isinstance(exc, (Preempted, SystemExit))  # SystemExit: a launcher requeued the job
        self.metrics["status"] = "preempted" if preempted else \
            "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        self.metrics["error"] = f"{type(exc).__name__}: {exc}"
        self.metrics["traceback"] = traceback.format_exc()
        self.save()
        return self.metrics["status"]

    def finish(self, title: str, summary_text: str) -> None:
        """Status ``complete``; ``summary.md`` written before metrics.json says so."""
        self.metrics["status"] = "complete"
        self.metrics["finished"] = _now()
        if self.writer:
            atomic_write_bytes(self.run_dir / SUMMARY_FILE, f"# {title}\n\n{summary_text}\n".encode())
        self.save()
