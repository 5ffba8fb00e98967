"""Weights & Biases logging, with every W&B file inside the run directory.

Modes: ``offline`` (default; no network, sync later with ``wandb sync <run_dir>/wandb/offline-run-*``),
``online`` (needs ``wandb login`` or ``WANDB_API_KEY``) and ``disabled``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from robustexp.errors import ConfigError

MODES = ("offline", "online", "disabled")


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

    def start(self, run_dir: Path, name: str, config: Mapping[str, Any], group: str | None = None) -> None:
        if self.mode == "disabled":
            return
        import wandb

        wandb_dir = Path(run_dir) / "wandb"
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

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(flatten(metrics), step=step)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(flatten(metrics))

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
