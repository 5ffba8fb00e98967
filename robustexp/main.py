"""Entry point: compose the run, train with the method, evaluate, write metrics.

``python -m robustexp [+method=...] [+adaptation=...] [group=option ...] [key=value ...]``

A run is data flowing one way: config -> dataset + model -> trainer(method) -> checkpoint ->
evaluators (:mod:`robustexp.evaluation.loop`) -> run record (metrics.json + summary.md,
:mod:`robustexp.run_record`) + W&B. Every component is built from its config's ``_target_``;
nothing here branches on a component's name.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from robustexp import distributed
from robustexp.adaptation.base import TestTimeAdaptation
from robustexp.adaptation.sweep import adaptation_variants
from robustexp.config import group_choices, instantiate_component
from robustexp.data.base import DataSplits
from robustexp.errors import RobustexpError
from robustexp.evaluation.base import EvalContext, Evaluator
from robustexp.evaluation.loop import evaluate_all
from robustexp.methods.base import TrainingMethod
from robustexp.methods.standard import StandardTraining
from robustexp.models.build import build_model
from robustexp.preemption import Preempted, PreemptionHandler
from robustexp.rendering import format_table
from robustexp.run_id import register_resolvers, run_directory, run_id
from robustexp.run_record import RunRecord
from robustexp.tracking import WandbTracker
from robustexp.training.trainer import TrainContext
from robustexp.utils import (
    atomic_write_bytes,
    channels_last_for,
    derive_seed,
    git_commit,
    model_memory_format,
    resolve_device,
    seed_everything,
)

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
CONFIG_FILE = "config.yaml"
LOG_FILE = "main.log"  # the run's story: options, milestones, results, errors (Hydra's job log file name)
log = logging.getLogger(__name__)
register_resolvers()


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
    record = RunRecord(run_dir, writer=is_main)
    if record.complete:  # a finished run is reported, not recomputed
        if is_main:
            log.info("%s already holds a complete run of this config; its stored results:\n\n%s\n\n(pass "
                     "tag=<name> to run the same config again in a new directory)", run_dir,
                     record.previous_summary_text() or _headline_table(record.previous.get("summary", {})))
        return record.previous
    kept = record.kept()  # evaluations of an interrupted attempt
    distributed.barrier()  # every rank has read the previous state before rank 0 rewrites it

    name = run_id(cfg)
    device = distributed.device_for(distributed.detect(), resolve_device(cfg.runtime.device))
    record.start(run_id=name, run_dir=str(run_dir.resolve()), seed=cfg.seed, code_version=git_commit(),
                 device=str(device), world_size=distributed.world()[1], command=" ".join(sys.argv))
    if is_main:
        atomic_write_bytes(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True).encode())
    tracker = instantiate_component(cfg.logger) if is_main else WandbTracker(mode="disabled")
    tracker.start(run_dir, name=name, config=OmegaConf.to_container(cfg, resolve=True), group=sweep_group,
                  choices=group_choices(cfg))
    preemption = PreemptionHandler(cfg.runtime.get("preemption_signals") or (),
                                   requeue=bool(cfg.runtime.get("requeue", True))).install()
    # ranks other than 0 evaluate into a scratch directory: plots and tables are written once, by rank 0
    scratch = None if is_main else tempfile.TemporaryDirectory(prefix="robustexp-rank")
    eval_dir = run_dir if is_main else Path(scratch.name)
    try:
        parts = _build(cfg, device)
        if is_main:
            _log_start(cfg, name, run_dir, parts, device)
        record["train"] = parts.trainer.fit(parts.model, parts.method, parts.data.train,
                                            _train_context(cfg, run_dir, device, tracker.log, preemption))
        record.save()
        preemption.immediate = True  # from here on a signal stops the run at once (evaluations are kept)
        if preemption.requested:  # signalled after the last training step
            raise Preempted(f"stopped by {signal.Signals(preemption.received).name} after training; rerun the "
                            "same command to evaluate")

        def context(suffix: str, adaptation: TestTimeAdaptation) -> EvalContext:
            return EvalContext(run_dir=eval_dir, device=device, seed=cfg.seed, adaptation=adaptation,
                               progress=bool(cfg.runtime.progress) and is_main, num_workers=cfg.runtime.num_workers,
                               suffix=suffix, log=lambda m: tracker.log({k + suffix: v for k, v in m.items()}))

        with model_memory_format(parts.model, cfg.runtime.get("channels_last", "auto"), device):
            evaluated = evaluate_all(parts.method.evaluation_modes(parts.model), parts.data, parts.evaluators,
                                     parts.variants, record, context, kept)
        tables = evaluated.tables
        if parts.report is not None:  # a report over the adaptation grid (curves, the selected prior N)
            record["adaptation_sweep"] = parts.report(record.summary, parts.grid_points, eval_dir)
            if record["adaptation_sweep"].get("table"):
                tables.append(record["adaptation_sweep"]["table"])
            log.info("adaptation sweep: %s", record["adaptation_sweep"]["png"])
        if evaluated.comparison_table():
            tables.append(evaluated.comparison_table())
    except BaseException as exc:
        status = record.fail(exc)
        if status == "failed":  # our own input errors without the traceback (it is in metrics.json)
            log.error("run %s failed: %s%s", name, record["error"],
                      "" if isinstance(exc, RobustexpError) else "\n" + record["traceback"].rstrip())
        else:
            log.warning("run %s %s: %s", name, status, record["error"])
        tracker.record_run(run_dir, record.metrics)  # status, what was computed, metrics.json
        tracker.finish(exit_code=1)
        raise
    finally:
        preemption.uninstall()
        if scratch is not None:
            scratch.cleanup()

    summary_text = "\n\n".join(tables + [f"## summary\n\n{_headline_table(record.summary)}"])
    record.finish(name, summary_text)
    tracker.record_run(run_dir, record.metrics)  # after metrics.json and summary.md are final
    tracker.finish(exit_code=0)
    if is_main:
        log.info("results of %s:\n\n%s\n\nmetrics: %s", name, summary_text, record.path)
    distributed.barrier()
    return record.metrics


@dataclass
class _Parts:
    """The components of a run, all built before training (a bad eval or adaptation option fails
    now rather than after hours of training)."""

    data: DataSplits
    model: torch.nn.Module
    method: TrainingMethod
    trainer: Any
    evaluators: dict[str, Evaluator]
    variants: dict[str, TestTimeAdaptation]
    grid_points: dict[str, dict]
    report: Any


def _build(cfg: DictConfig, device: torch.device) -> _Parts:
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
    evaluators = {key: instantiate_component(node) for key, node in (cfg.eval.get("evaluators") or {}).items()
                  if node is not None}  # an experiment drops an evaluator with `<key>: null`
    variants, grid_points = adaptation_variants(cfg.get("adaptation"))
    adaptation = cfg.get("adaptation")
    report = instantiate_component(adaptation.report) if adaptation and adaptation.get("report") else None
    return _Parts(data, model, method, trainer, evaluators, variants, grid_points, report)


def _log_start(cfg: DictConfig, name: str, run_dir: Path, parts: _Parts, device: torch.device) -> None:
    data = parts.data
    log.info("run %s in %s: %s, %d train / %d test images %s, model %s, method %s, device %s%s", name, run_dir,
             data.name, len(data.train), len(data.test), data.input_shape, cfg.model.name,
             getattr(parts.method, "name", "custom"), device,
             f", {distributed.world()[1]} processes" if distributed.active() else "")
    log.info("options: %s", ", ".join(f"{k}={v}" for k, v in group_choices(cfg).items() if v != "none"))


def _train_context(cfg: DictConfig, run_dir: Path, device: torch.device, log_metrics, preemption) -> TrainContext:
    rt = cfg.runtime
    return TrainContext(run_dir=run_dir, device=device, seed=cfg.seed, log=log_metrics, progress=bool(rt.progress),
                        num_workers=rt.num_workers, pin_memory=rt.get("pin_memory"),
                        persistent_workers=bool(rt.get("persistent_workers", False)), amp=rt.get("amp"),
                        channels_last=channels_last_for(rt.get("channels_last", "auto"), device),
                        compile=bool(rt.get("compile", False)),
                        preemption=preemption)


def _headline_table(headline: Mapping[str, float]) -> str:
    return format_table(["summary", "value"], [[k, v] for k, v in headline.items()])


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
