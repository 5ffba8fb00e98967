"""Entry point: compose the run, train with the method, evaluate, write metrics.

``python -m robustexp [+method=...] [+adaptation=...] [group=option ...] [key=value ...]``

A run is data flowing one way: config -> dataset + model -> trainer(method) -> checkpoint ->
evaluators -> metrics.json + summary.md + W&B. Every component is built from its config's
``_target_``; nothing here branches on a component's name.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from robustexp.adaptation.sweep import expand_grid
from robustexp.config import instantiate_component
from robustexp.errors import ConfigError, RobustexpError
from robustexp.evaluation.base import EvalContext
from robustexp.evaluation.report import format_table
from robustexp.methods.standard import StandardTraining
from robustexp.models.build import build_model
from robustexp.run_id import register_resolvers, run_id
from robustexp.training.trainer import TrainContext
from robustexp.utils import atomic_write_bytes, atomic_write_json, git_commit, read_json, resolve_device, \
    seed_everything

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
METRICS_FILE, SUMMARY_FILE, CONFIG_FILE = "metrics.json", "summary.md", "config.yaml"
register_resolvers()


def adaptation_variants(node: DictConfig | None) -> tuple[dict[str, Any], dict[str, dict]]:
    """``{"none": None}`` without ``+adaptation``; otherwise the config's ``variants`` and the
    combinations of its ``grid`` (see :func:`robustexp.adaptation.sweep.expand_grid`), preceded
    by the unadapted model unless ``evaluate_unadapted: false``. Also returns the grid points."""
    if not node:
        return {"none": None}, {}
    variants = {"none": None} if node.get("evaluate_unadapted", True) else {}
    configs = dict(node.get("variants") or {})
    points = {}
    if node.get("grid"):
        for label, (variant, point) in expand_grid(node.grid).items():
            configs[label], points[label] = variant, point
    for name, variant in configs.items():
        if name == "none":
            raise ConfigError("adaptation variant name 'none' is reserved for the unadapted model")
        variants[name] = instantiate_component(variant)
    return variants, points


def _suffix(mode: str, variant: str) -> str:
    """``@mode+variant`` for named evaluation modes and adaptation variants; empty for the plain model."""
    parts = [p for p in (mode, "" if variant == "none" else variant) if p]
    return "@" + "+".join(parts) if parts else ""


def _evaluate_variants(model, data, evaluators, variants, mode, metrics, tables, comparison, make_ctx,
                       metrics_path) -> None:
    """Run every evaluator on ``model`` under every adaptation variant, merging results into
    ``metrics`` (saved after each evaluator, so nothing computed is lost if a later one fails)."""
    for variant, adaptation in variants.items():
        suffix = _suffix(mode, variant)
        if adaptation is not None:
            adaptation.attach(model)
            metrics.setdefault("adaptation", {})[variant] = adaptation.describe()
            print(f"[robustexp] evaluating {mode or 'the model'} with {variant}: {adaptation.describe()}")
        elif mode:
            print(f"[robustexp] evaluating {mode}")
        eval_ctx = make_ctx(suffix)
        eval_ctx.adaptation = adaptation
        try:
            for key, evaluator in evaluators.items():
                if key + _suffix(mode, "none") in metrics and not getattr(evaluator, "per_variant", True):
                    continue  # independent of the adaptation: evaluated once per mode
                result = evaluator.evaluate(model, data, eval_ctx)
                metrics[key + suffix] = result
                metrics["summary"].update({k + suffix: v for k, v in evaluator.headline(result).items()})
                tables.append(f"## {key}{suffix}\n\n{evaluator.table(result)}")
                column = suffix.removeprefix("@") or "none"
                for label, value in evaluator.compare_rows(result):
                    comparison.setdefault(label, {})[column] = value
                atomic_write_json(metrics_path, metrics)
        finally:
            if adaptation is not None:
                adaptation.detach()


def _headline_table(headline: Mapping[str, float]) -> str:
    return format_table(["summary", "value"], [[k, v] for k, v in headline.items()])


def run(cfg: DictConfig, run_dir: str | Path, sweep_group: str | None = None) -> dict[str, Any]:
    """Run one composed config in ``run_dir`` and return its metrics (also in ``metrics.json``)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.is_file():
        previous = read_json(metrics_path)
        if previous.get("status") == "complete":
            print(f"[robustexp] {run_dir} already holds a complete run of this config; its stored results:\n")
            summary = run_dir / SUMMARY_FILE
            print(summary.read_text() if summary.is_file() else _headline_table(previous.get("summary", {})))
            print("\n(pass tag=<name> to run the same config again in a new directory)")
            return previous

    name = run_id(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    atomic_write_bytes(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True).encode())
    device = resolve_device(cfg.runtime.device)
    metrics: dict[str, Any] = {"status": "running", "run_id": name, "run_dir": str(run_dir.resolve()),
                               "seed": cfg.seed, "code_version": git_commit(), "device": str(device),
                               "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "summary": {}}
    atomic_write_json(metrics_path, metrics)

    tracker = instantiate_component(cfg.logger)
    tracker.start(run_dir, name=name, config=resolved, group=sweep_group)
    progress = bool(cfg.runtime.progress)
    try:
        seed_everything(cfg.seed)
        data = instantiate_component(cfg.dataset)
        model = build_model(cfg.model, data.num_classes, data.mean, data.std).to(device)
        method = instantiate_component(cfg.method, label="method") if cfg.get("method") else StandardTraining()
        trainer = instantiate_component(cfg.trainer, label="trainer")
        # built before training, so that a bad eval or adaptation option fails now rather than after training
        evaluators = {key: instantiate_component(node) for key, node in (cfg.eval.get("evaluators") or {}).items()}
        variants, grid_points = adaptation_variants(cfg.get("adaptation"))
        report = instantiate_component(cfg.adaptation.report) if cfg.get("adaptation") and \
            cfg.adaptation.get("report") else None
        print(f"[robustexp] run {name}\n[robustexp] dir {run_dir}\n[robustexp] {data.name}: "
              f"{len(data.train)} train / {len(data.test)} test images {data.input_shape}, "
              f"model {cfg.model.name}, method {getattr(method, 'name', 'custom')}, device {device}")
        train_ctx = TrainContext(run_dir=run_dir, device=device, seed=cfg.seed, log=tracker.log, progress=progress,
                                 num_workers=cfg.runtime.num_workers)
        metrics["train"] = trainer.fit(model, method, data.train, train_ctx)
        atomic_write_json(metrics_path, metrics)

        tables, comparison = [], {}
        for mode, open_mode in method.evaluation_modes(model).items():
            with open_mode() as eval_model:
                _evaluate_variants(eval_model, data, evaluators, variants, mode, metrics, tables, comparison,
                                   lambda suffix: EvalContext(
                                       run_dir=run_dir, device=device, seed=cfg.seed, progress=progress,
                                       num_workers=cfg.runtime.num_workers,
                                       log=lambda m, sfx=suffix: tracker.log({k + sfx: v for k, v in m.items()})),
                                   metrics_path)
        summary = metrics["summary"]
        if "clean_top1" in summary and "mCA" in summary:
            summary["clean_gap"] = summary["clean_top1"] - summary["mCA"]
        if report is not None:
            metrics["adaptation_sweep"] = report(summary, grid_points, run_dir)
            print(f"[robustexp] adaptation sweep: {metrics['adaptation_sweep']['png']}")
        names = list(next(iter(comparison.values()), {}))
        if len(names) > 1:
            tables.append("## top-1 % by test-time adaptation\n\n" + format_table(
                ["", *names], [[label, *(row.get(v, "") for v in names)] for label, row in comparison.items()],
                precision=1))
    except BaseException as exc:
        metrics["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        metrics["error"] = f"{type(exc).__name__}: {exc}"
        metrics["traceback"] = traceback.format_exc()
        atomic_write_json(metrics_path, metrics)
        tracker.finish(exit_code=1)
        raise

    metrics["status"] = "complete"
    metrics["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    summary_text = "\n\n".join(tables + [f"## summary\n\n{_headline_table(metrics['summary'])}"])
    atomic_write_bytes(run_dir / SUMMARY_FILE, (f"# {name}\n\n{summary_text}\n").encode())
    atomic_write_json(metrics_path, metrics)
    tracker.summary(metrics["summary"])
    tracker.finish(exit_code=0)
    print(f"\n{summary_text}\n\n[robustexp] metrics: {metrics_path}")
    return metrics


def run_directory(cfg: DictConfig) -> Path:
    """``<output_root>/runs/<run id>``: the one directory of this config, in single runs and sweeps alike."""
    return Path(cfg.output_root) / "runs" / run_id(cfg)


def _link_sweep_job(job_dir: Path, run_dir: Path) -> None:
    """A sweep's job directory (Hydra's ``.hydra`` files) points at the run directory via ``run``."""
    link = job_dir / "run"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(run_dir.resolve(), target_is_directory=True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Runs live in ``<output_root>/runs/<run id>`` whether launched alone or in a sweep, so that a
    relaunched sweep finds its finished jobs and skips them (and resumes the interrupted ones).
    A sweep's own directory (``<output_root>/sweeps/<date_time>``) holds one folder per job with
    Hydra's files and a ``run`` link to the run directory; its name is the W&B group."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep_group = Path(hydra_cfg.sweep.dir).name if multirun else None
    if cfg.runtime.get("threads"):
        torch.set_num_threads(cfg.runtime.threads)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if multirun:
        job_dir, run_dir = run_dir, run_directory(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        _link_sweep_job(job_dir, run_dir)
    try:
        return run(cfg, run_dir, sweep_group=sweep_group)
    except RobustexpError as exc:
        if multirun:
            raise
        raise SystemExit(f"robustexp: error: {exc}") from None


if __name__ == "__main__":
    main()
