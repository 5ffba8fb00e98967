"""Entry point: compose the run, train with the method, evaluate, write metrics.

``python -m robustexp [+method=...] [+adaptation=...] [group=option ...] [key=value ...]``

A run is data flowing one way: config -> dataset + model -> trainer(method) -> checkpoint ->
evaluators -> metrics.json + summary.md + W&B. Every component is built from its config's
``_target_``; nothing here branches on a component's name.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from robustexp import distributed
from robustexp.adaptation.sweep import expand_grid
from robustexp.config import group_choices, instantiate_component
from robustexp.errors import ConfigError, RobustexpError
from robustexp.evaluation.base import EvalContext
from robustexp.evaluation.report import format_table
from robustexp.methods.standard import StandardTraining
from robustexp.models.build import build_model
from robustexp.preemption import Preempted, PreemptionHandler
from robustexp.run_id import register_resolvers, run_id
from robustexp.tracking import WandbTracker
from robustexp.training.trainer import TrainContext
from robustexp.utils import atomic_write_bytes, atomic_write_json, derive_seed, git_commit, read_json, \
    resolve_device, seed_everything

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
METRICS_FILE, SUMMARY_FILE, CONFIG_FILE = "metrics.json", "summary.md", "config.yaml"
# the keys of metrics.json that describe the run rather than hold one evaluator's result
RUN_KEYS = ("status", "run_id", "run_dir", "seed", "code_version", "device", "world_size", "command", "started",
            "finished", "summary", "train", "adaptation", "adaptation_sweep", "error", "traceback")
LOG_FILE = "main.log"  # the run's story: options, milestones, results, errors (Hydra's job log file name)
log = logging.getLogger(__name__)
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
                       save: Callable[[], None], kept: Mapping[str, Any]) -> None:
    """Run every evaluator on ``model`` under every adaptation variant, merging results into
    ``metrics`` (saved after each evaluator, so nothing computed is lost if a later one fails).
    Results in ``kept`` (from an interrupted attempt of this run) are reused, not recomputed."""
    once: set[str] = set()  # evaluators independent of the adaptation (per_variant=False) run once per mode
    for variant, adaptation in variants.items():
        suffix = _suffix(mode, variant)
        if adaptation is not None:
            adaptation.attach(model)
            metrics.setdefault("adaptation", {})[variant] = adaptation.describe()
            log.info("evaluating %s with %s: %s", mode or "the model", variant, adaptation.describe())
        elif mode:
            log.info("evaluating %s", mode)
        eval_ctx = make_ctx(suffix)
        eval_ctx.adaptation = adaptation
        try:
            for key, evaluator in evaluators.items():
                if not getattr(evaluator, "per_variant", True):
                    if key in once:
                        continue  # independent of the adaptation: evaluated once per mode
                    once.add(key)
                if key + suffix in kept:
                    result = kept[key + suffix]
                    log.info("%s%s: kept from the interrupted attempt", key, suffix)
                else:
                    result = evaluator.evaluate(model, data, eval_ctx)
                metrics[key + suffix] = result
                metrics["summary"].update({k + suffix: v for k, v in evaluator.headline(result).items()})
                tables.append(f"## {key}{suffix}\n\n{evaluator.table(result)}")
                column = suffix.removeprefix("@") or "none"
                for label, value in evaluator.compare_rows(result):
                    comparison.setdefault(label, {})[column] = value
                save()
        finally:
            if adaptation is not None:
                adaptation.detach()


@contextlib.contextmanager
def _log_to(run_dir: Path):
    """Also write robustexp's log to ``<run dir>/main.log`` (unless Hydra's job log is that file
    already, as in a single run): in a sweep the run directory then keeps its own story across
    relaunches and requeued attempts, next to Hydra's log in the sweep's job folder."""
    path = (run_dir / LOG_FILE).resolve()
    package = logging.getLogger("robustexp")
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)
    handlers = [h for lg in (logging.getLogger(), package) for h in lg.handlers]
    if distributed.world()[0] != 0 or any(getattr(h, "baseFilename", None) == str(path) for h in handlers):
        yield
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    package.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)
        handler.close()


def _headline_table(headline: Mapping[str, float]) -> str:
    return format_table(["summary", "value"], [[k, v] for k, v in headline.items()])


def _train_context(cfg: DictConfig, run_dir: Path, device: torch.device, log, preemption) -> TrainContext:
    rt = cfg.runtime
    return TrainContext(run_dir=run_dir, device=device, seed=cfg.seed, log=log, progress=bool(rt.progress),
                        num_workers=rt.num_workers, pin_memory=rt.get("pin_memory"),
                        persistent_workers=bool(rt.get("persistent_workers", False)), amp=rt.get("amp"),
                        channels_last=bool(rt.get("channels_last", False)), compile=bool(rt.get("compile", False)),
                        preemption=preemption)


def run(cfg: DictConfig, run_dir: str | Path, sweep_group: str | None = None) -> dict[str, Any]:
    """Run one composed config in ``run_dir`` and return its metrics (also in ``metrics.json``).

    In a multi-process run every rank calls this with the same directory; only rank 0 writes
    files and logs to W&B (see :mod:`robustexp.distributed`)."""
    run_dir = Path(run_dir)
    if distributed.world()[0] == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    with _log_to(run_dir):
        return _run(cfg, run_dir, sweep_group)


def _run(cfg: DictConfig, run_dir: Path, sweep_group: str | None) -> dict[str, Any]:
    is_main = distributed.world()[0] == 0
    distributed.barrier()
    metrics_path = run_dir / METRICS_FILE
    kept: dict[str, Any] = {}
    if metrics_path.is_file():
        previous = read_json(metrics_path)
        if previous.get("status") == "complete":
            if is_main:
                summary = run_dir / SUMMARY_FILE
                log.info("%s already holds a complete run of this config; its stored results:\n\n%s\n\n(pass "
                         "tag=<name> to run the same config again in a new directory)", run_dir,
                         summary.read_text() if summary.is_file() else _headline_table(previous.get("summary", {})))
            return previous
        kept = {k: v for k, v in previous.items() if k not in RUN_KEYS}  # evaluations of an interrupted attempt
    distributed.barrier()  # every rank has read the previous state before rank 0 rewrites it

    name = run_id(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    device = distributed.device_for(distributed.detect(), resolve_device(cfg.runtime.device))
    metrics: dict[str, Any] = {"status": "running", "run_id": name, "run_dir": str(run_dir.resolve()),
                               "seed": cfg.seed, "code_version": git_commit(), "device": str(device),
                               "world_size": distributed.world()[1],
                               "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "summary": {}}

    def save() -> None:
        if is_main:
            atomic_write_json(metrics_path, metrics)

    if is_main:
        atomic_write_bytes(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True).encode())
    save()
    tracker = instantiate_component(cfg.logger) if is_main else WandbTracker(mode="disabled")
    tracker.start(run_dir, name=name, config=resolved, group=sweep_group, choices=group_choices(cfg))
    preemption = PreemptionHandler(cfg.runtime.get("preemption_signals") or (),
                                   requeue=bool(cfg.runtime.get("requeue", True))).install()
    # ranks other than 0 evaluate into a scratch directory: plots and tables are written once, by rank 0
    scratch = None if is_main else tempfile.TemporaryDirectory(prefix="robustexp-rank")
    eval_dir = run_dir if is_main else Path(scratch.name)
    progress = bool(cfg.runtime.progress) and is_main
    try:
        seed_everything(cfg.seed)
        data = instantiate_component(cfg.dataset)
        model = build_model(cfg.model, data.num_classes, data.mean, data.std).to(device)
        if cfg.runtime.get("sync_bn") and distributed.active():
            model = distributed.convert_sync_batchnorm(model, device)
        rank = distributed.world()[0]
        if rank:  # the same initial weights on every rank (also broadcast), different noise afterwards
            seed_everything(derive_seed(cfg.seed, "rank", rank))
        method = instantiate_component(cfg.method, label="method") if cfg.get("method") else StandardTraining()
        trainer = instantiate_component(cfg.trainer, label="trainer")
        # built before training, so that a bad eval or adaptation option fails now rather than after training
        evaluators = {key: instantiate_component(node) for key, node in (cfg.eval.get("evaluators") or {}).items()
                      if node is not None}  # an experiment drops an evaluator with `<key>: null`
        variants, grid_points = adaptation_variants(cfg.get("adaptation"))
        report = instantiate_component(cfg.adaptation.report) if cfg.get("adaptation") and \
            cfg.adaptation.get("report") else None
        if is_main:
            log.info("run %s in %s: %s, %d train / %d test images %s, model %s, method %s, device %s%s", name, run_dir,
                     data.name, len(data.train), len(data.test), data.input_shape, cfg.model.name,
                     getattr(method, "name", "custom"), device,
                     f", {distributed.world()[1]} processes" if distributed.active() else "")
            log.info("options: %s", ", ".join(f"{k}={v}" for k, v in group_choices(cfg).items() if v != "none"))
        train_ctx = _train_context(cfg, run_dir, device, tracker.log, preemption)
        metrics["train"] = trainer.fit(model, method, data.train, train_ctx)
        save()
        preemption.immediate = True
        if preemption.requested:  # signalled after the last training step
            raise Preempted(f"stopped by {signal.Signals(preemption.received).name} after training; rerun the "
                            "same command to evaluate")

        tables, comparison = [], {}
        for mode, open_mode in method.evaluation_modes(model).items():
            with open_mode() as eval_model:
                _evaluate_variants(eval_model, data, evaluators, variants, mode, metrics, tables, comparison,
                                   lambda suffix: EvalContext(
                                       run_dir=eval_dir, device=device, seed=cfg.seed, progress=progress,
                                       num_workers=cfg.runtime.num_workers, suffix=suffix,
                                       log=lambda m, sfx=suffix: tracker.log({k + sfx: v for k, v in m.items()})),
                                   save, kept)
        summary = metrics["summary"]
        for key in [k for k in summary if k.split("@")[0] == "mCA"]:  # clean-to-corrupted gap per variant
            suffix = key[len("mCA"):]                                   # (Nandy et al. Table 3)
            if "clean_top1" + suffix in summary:
                summary["clean_gap" + suffix] = summary["clean_top1" + suffix] - summary[key]
        if report is not None:
            metrics["adaptation_sweep"] = report(summary, grid_points, eval_dir)
            if metrics["adaptation_sweep"].get("table"):  # a report's own table (the selected prior N)
                tables.append(metrics["adaptation_sweep"]["table"])
            if is_main:
                log.info("adaptation sweep: %s", metrics["adaptation_sweep"]["png"])
        names = list(next(iter(comparison.values()), {}))
        if len(names) > 1:
            tables.append("## top-1 % by test-time adaptation\n\n" + format_table(
                ["", *names], [[label, *(row.get(v, "") for v in names)] for label, row in comparison.items()],
                precision=1))
    except BaseException as exc:
        preempted = isinstance(exc, (Preempted, SystemExit))  # SystemExit: submitit requeued the job
        metrics["status"] = "preempted" if preempted else \
            "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        metrics["error"] = f"{type(exc).__name__}: {exc}"
        metrics["traceback"] = traceback.format_exc()
        save()
        if metrics["status"] == "failed":  # our own input errors without the traceback (it is in metrics.json)
            log.error("run %s failed: %s%s", name, metrics["error"], "" if isinstance(exc, RobustexpError)
                      else "\n" + metrics["traceback"].rstrip())
        else:
            log.warning("run %s %s: %s", name, metrics["status"], metrics["error"])
        tracker.record_run(run_dir, metrics)  # status, what was computed, metrics.json
        tracker.finish(exit_code=1)
        raise
    finally:
        preemption.uninstall()
        if scratch is not None:
            scratch.cleanup()

    metrics["status"] = "complete"
    metrics["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    summary_text = "\n\n".join(tables + [f"## summary\n\n{_headline_table(metrics['summary'])}"])
    if is_main:
        atomic_write_bytes(run_dir / SUMMARY_FILE, (f"# {name}\n\n{summary_text}\n").encode())
    save()
    tracker.record_run(run_dir, metrics)  # after metrics.json and summary.md are final
    tracker.finish(exit_code=0)
    if is_main:
        log.info("results of %s:\n\n%s\n\nmetrics: %s", name, summary_text, metrics_path)
    distributed.barrier()
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
    env = distributed.detect()
    distributed.init(env, distributed.device_for(env, resolve_device(cfg.runtime.device)))
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if multirun:
        job_dir, run_dir = run_dir, run_directory(cfg)
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            _link_sweep_job(job_dir, run_dir)
    try:
        return run(cfg, run_dir, sweep_group=sweep_group)
    except Preempted as exc:
        if multirun:
            raise  # the whole sweep was signalled: stop it (finished jobs are skipped when it is relaunched)
        raise SystemExit(f"robustexp: {exc}") from None
    except Exception as exc:
        if multirun:  # one failed job does not stop the sweep; run() recorded it and closed its W&B run
            log.error("job failed: %s: %s (continuing with the other jobs)", type(exc).__name__, exc)
            return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        if isinstance(exc, RobustexpError):
            raise SystemExit(f"robustexp: error: {exc}") from None
        raise
    finally:
        if not multirun:
            distributed.shutdown()


if __name__ == "__main__":
    main()
