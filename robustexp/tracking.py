"""Weights & Biases logging, with every W&B file inside the run directory.

Modes: ``offline`` (default; no network, sync later with ``wandb sync <run_dir>/wandb/offline-run-*``),
``online`` (needs ``wandb login`` or ``WANDB_API_KEY``) and ``disabled``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from robustexp.errors import ConfigError

MODES = ("offline", "online", "disabled")
log = logging.getLogger(__name__)


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a/b": 1}, keeping only numbers and strings."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "/"))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
    return flat


class WandbTracker:
    """One W&B run per robustexp run; runs of a sweep share the W&B group of the sweep."""

    def __init__(self, mode: str = "offline", project: str = "robustexp", entity: str | None = None,
                 group: str | None = None, tags: list[str] | None = None, notes: str | None = None,
                 job_type: str = "train-eval"):
        if mode not in MODES:
            raise ConfigError(f"logger.mode={mode!r}; expected one of {MODES}")
        self.mode, self.project, self.entity = mode, project, entity
        self.group, self.tags, self.notes, self.job_type = group, list(tags or []), notes, job_type
        self.run = None
        self.lost = False  # W&B failed during this run (see _call)
        self.files: Path | None = None

    def start(self, run_dir: Path, name: str, config: Mapping[str, Any], group: str | None = None) -> None:
        if self.mode == "disabled":
            return
        import wandb

        wandb_dir = self.files = Path(run_dir) / "wandb"
        for variable, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                              ("WANDB_CONFIG_DIR", "config"), ("WANDB_ARTIFACT_DIR", "artifacts")):
            path = Path(run_dir) if variable == "WANDB_DIR" else wandb_dir / sub
            path.mkdir(parents=True, exist_ok=True)
            os.environ[variable] = str(path)
        resume = {"resume": "allow", "id": name[-40:].replace("/", "-")} if self.mode == "online" else {}
        self.run = wandb.init(project=self.project, entity=self.entity, name=name, group=group or self.group,
                              tags=self.tags, notes=self.notes, job_type=self.job_type, config=dict(config),
                              dir=str(run_dir), mode=self.mode, reinit="finish_previous",
                              settings=wandb.Settings(silent=True, console="off"), **resume)

    def _call(self, what: str, call: Callable[[], Any]) -> None:
        """Run one W&B call; if W&B fails, warn once and go on without it.

        A job's SIGTERM (a SLURM preemption, ``scontrol requeue``, the time limit) reaches every
        process of the job, W&B's service process (wandb-core) included, which exits at once; the
        next call then raises ``ConnectionResetError: Connection lost``. The run itself must not
        fail for that: it checkpoints and stops (or finishes), and metrics.json / summary.md hold
        every result. What W&B received before is in this attempt's files under ``wandb/``."""
        if self.run is None:
            return
        try:
            call()
        except Exception as exc:
            log.warning("W&B stopped working while %s (%s: %s); the run goes on without W&B: its results are in "
                        "metrics.json and summary.md, and what W&B received before is under %s. (A job's SIGTERM "
                        "also ends W&B's service process.)", what, type(exc).__name__, exc, self.files)
            self.run, self.lost = None, True
            _discard_service()

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self._call("logging", lambda: self.run.log(flatten(metrics), step=step))

    def summary(self, metrics: Mapping[str, Any]) -> None:
        self._call("writing the summary", lambda: self.run.summary.update(flatten(metrics)))

    def finish(self, exit_code: int = 0) -> None:
        run = self.run
        self._call("finishing the run", lambda: run.finish(exit_code=exit_code))
        self.run = None


def _discard_service() -> None:
    """Forget a W&B service process that has gone (so that neither its exit hook nor the next
    ``wandb.init`` of this process tries to talk to it)."""
    import wandb

    try:
        wandb.teardown(exit_code=1)
    except (Exception, SystemExit):  # tearing down a dead service raises the same connection error
        pass
