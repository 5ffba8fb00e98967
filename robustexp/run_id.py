"""Run directories named from the config: ``<method>_<model>_<dataset>_s<seed>[_<tag>]_<hash>``.

The hash covers everything that changes results (model, dataset, method, adaptation,
trainer, eval, seed, tag) and nothing that does not (logger, runtime, output_root). Rerunning
the same command therefore lands in the same directory: an interrupted run resumes there, and
a finished one is reported instead of recomputed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# the top-level config keys that are not part of a run's identity (how it runs and where it logs, not
# what it computes): the one list, used by the run id and by the report's grouping of seeds
NON_IDENTITY_KEYS = ("hydra", "logger", "runtime", "output_root")


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The part of the config that determines the results."""
    return {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
            for key in cfg if key not in NON_IDENTITY_KEYS}


def config_hash(cfg: DictConfig, length: int = 8) -> str:
    blob = json.dumps(identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def _slug(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(text)).strip("-") or "x"


def run_id(cfg: DictConfig) -> str:
    method = cfg.get("method")
    parts = [method.get("name", "custom") if method else "standard",
             cfg.model.get("name", "model"), cfg.dataset.get("name", "data")]
    adaptation = cfg.get("adaptation")
    if adaptation:
        parts.append(adaptation.get("name", "adapt"))
    parts.append(f"s{cfg.get('seed', 0)}")
    if cfg.get("tag"):
        parts.append(cfg.tag)
    return "_".join(_slug(p) for p in parts) + "_" + config_hash(cfg)


def run_directory(cfg: DictConfig) -> Path:
    """``<output_root>/runs/<run id>``: the one directory of this config, in single runs and sweeps alike."""
    return Path(cfg.output_root) / "runs" / run_id(cfg)


def register_resolvers() -> None:
    """``${run_id:}`` in ``hydra.run.dir`` / ``hydra.sweep.subdir`` names the run from its config."""
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", lambda *, _root_: run_id(_root_), use_cache=False)
