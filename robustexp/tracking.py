"""Weights & Biases logging, with every W&B file inside the run directory.

Modes: ``offline`` (default; no network, sync later with ``wandb sync <run_dir>/wandb/offline-run-*``),
``online`` (needs ``wandb login`` or ``WANDB_API_KEY``) and ``disabled``. What a run holds and
which dashboard panels compare the papers' results: docs/wandb.md.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from robustexp.errors import ConfigError

MODES = ("offline", "online", "disabled")
EPOCH_METRIC = "train/epoch"   # the x of every training curve (the trainer logs one entry per epoch)
GRID_TABLE = "corruption_grid"  # one W&B Table of every (variant, evaluator, corruption, severity) subset
CERTIFIED_TABLE = "certified_accuracy"  # certified accuracy against the radius, per sigma and the envelope
GRID_COLUMNS = ["variant", "evaluator", "corruption", "severity", "top1", "top5", "error", "rms_calibration_error",
                "ece", "n"]
CERTIFIED_COLUMNS = ["variant", "evaluator", "sigma", "radius", "certified_accuracy"]
ATTACHED_FILES = ("metrics.json", "summary.md")
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


def run_config(run_id: str, resolved: Mapping[str, Any], choices: Mapping[str, str] | None,
               sweep_group: str | None) -> dict[str, Any]:
    """The W&B config of a run: the chosen option of every config group at the top level
    (``method: gnt``, ``adaptation: bn``, ...), the run's identity (``run_id``, ``seed``, ``tag``,
    ``sweep_group``) and the whole resolved config under ``cfg``.

    Top-level keys are what W&B groups, filters and colours runs by, and a group's choice is the one
    value there that tells runs apart (``method`` as the resolved node would be a dict of the
    method's hyper-parameters). The resolved config cannot stay at the top level as well, because
    its ``method`` / ``model`` / ... nodes would take the same names; under ``cfg`` every value
    stays reachable (``cfg.trainer.epochs``, ``cfg.adaptation.N``) for filters and parallel
    coordinates."""
    return {**dict(choices or {}), "run_id": run_id, "seed": resolved.get("seed"), "tag": resolved.get("tag") or "",
            "sweep_group": sweep_group, "cfg": dict(resolved)}


def _variant(key: str) -> tuple[str, str]:
    """``corruptions@main+bn`` -> (``main+bn``, ``corruptions``); no suffix -> ``none`` (as in summary.md)."""
    evaluator, _, suffix = key.partition("@")
    return suffix or "none", evaluator


def _is_grid(grid: Any) -> bool:
    """A corruption x severity grid of accuracy results (the corruption and mixed evaluators)."""
    return isinstance(grid, Mapping) and bool(grid) and all(
        isinstance(by_s, Mapping) and by_s and all(isinstance(r, Mapping) and "top1" in r for r in by_s.values())
        for by_s in grid.values())


def corruption_grid_rows(metrics: Mapping[str, Any]) -> list[list[Any]]:
    """One row (:data:`GRID_COLUMNS`) per subset of every corruption grid in ``metrics``
    (``metrics["corruptions"]["grid"]``, ``metrics["corruptions@bn"]["grid"]``, the mixed control's
    grid, ...): the per-variant grids of summary.md in one table, told apart by ``variant``."""
    rows = []
    for key, result in metrics.items():
        grid = result.get("grid") if isinstance(result, Mapping) else None
        if not _is_grid(grid):
            continue
        variant, evaluator = _variant(key)
        for corruption, by_severity in grid.items():
            for severity, r in sorted(by_severity.items(), key=lambda item: int(item[0])):
                rows.append([variant, evaluator, corruption, int(severity), float(r["top1"]),
                             float(r.get("top5", math.nan)), 100.0 - float(r["top1"]),
                             float(r.get("rms_calibration_error", math.nan)), float(r.get("ece", math.nan)),
                             int(r.get("n", 0))])
    return rows


def certified_accuracy_rows(metrics: Mapping[str, Any]) -> list[list[Any]]:
    """One row (:data:`CERTIFIED_COLUMNS`, accuracy in percent) per radius of every certification
    result (:class:`robustexp.evaluation.certify.CertifyEvaluator`): each sigma and their envelope,
    the curves of Nandy et al. Fig. 3 as data."""
    rows = []
    for key, result in metrics.items():
        if not (isinstance(result, Mapping) and isinstance(result.get("sigmas"), Mapping)
                and isinstance(result.get("envelope"), Mapping)):
            continue
        variant, evaluator = _variant(key)
        curves = {sigma: r.get("certified_accuracy") for sigma, r in result["sigmas"].items()
                  if isinstance(r, Mapping)}
        curves["envelope"] = result["envelope"].get("certified_accuracy")
        for sigma, curve in curves.items():
            for radius, accuracy in (curve or {}).items():
                rows.append([variant, evaluator, str(sigma), float(radius), 100.0 * float(accuracy)])
    return rows


def run_plots(run_dir: Path) -> dict[str, Path]:
    """Every ``*.png`` the run wrote (not W&B's own files under ``wandb/``), keyed
    ``plots/<path relative to the run directory, without .png>``: a stable name across runs."""
    run_dir = Path(run_dir)
    plots = {}
    for path in sorted(run_dir.rglob("*.png")):
        relative = path.relative_to(run_dir)
        if relative.parts[0] == "wandb" or not path.is_file():
            continue
        plots["plots/" + relative.with_suffix("").as_posix()] = path
    return plots


class WandbTracker:
    """One W&B run per robustexp run; runs of a sweep share the W&B group of the sweep.

    What a run holds, for dashboards without hand work (docs/wandb.md):

    - config: the option of every config group at the top level (``method``, ``adaptation``,
      ``model``, ...), ``run_id``, ``seed``, ``tag``, ``sweep_group``, and the resolved config
      under ``cfg`` (see :func:`run_config` for why it is not at the top level);
    - history: ``train/*`` once per epoch, plotted against ``train/epoch`` (``define_metric``);
      evaluation scalars (``corruption/...``, ``clean/...``) once per run, with their
      ``@<mode>+<variant>`` suffix. Their series over severity or radius are the tables below, not
      history rows: a metric logged once has no x of its own;
    - summary: the run's headline numbers under the names of ``metrics.json``'s ``summary``
      (``clean_top1``, ``mCA@bn``, ``eps_star_gaussian``, ...) and ``status``;
    - tables ``corruption_grid`` and, for certification, ``certified_accuracy``; every PNG of the
      run directory as ``plots/<name>``; ``metrics.json`` and ``summary.md`` as run files.
      All of it from :meth:`record_run`, called once at the end of the run.

    Resumed runs: every attempt of a requeued or rerun run is a new offline W&B run; the final
    attempt's run holds the whole training curve, as :meth:`record_run` logs the epochs of
    ``metrics["train"]["history"]`` that this attempt did not log itself (at their
    ``train/epoch``). Online, the run is resumed by id instead, and the epochs it already holds must
    not be sent twice: at start the tracker reads the last ``train/epoch`` of the resumed run's
    summary (W&B keeps the last logged value there; :meth:`record_run` leaves it at the final epoch)
    and from then on skips every epoch up to it, whether the trainer logs it (an epoch retrained after
    its checkpoint was lost) or it is back-filled. A resumed run retrains such an epoch from the same
    checkpoint and seed, so the skipped values are the ones already sent.
    """

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
        self.logged_epochs: set[int] = set()  # training epochs this attempt has sent
        self.sent_through_epoch: int | None = None  # online resume: epochs up to this one are in the run already

    def start(self, run_dir: Path, name: str, config: Mapping[str, Any], group: str | None = None,
              choices: Mapping[str, str] | None = None) -> None:
        """Open the W&B run of ``run_dir``. ``config`` is the resolved config, ``choices`` the option
        of each config group (:func:`robustexp.config.group_choices`), ``group`` the sweep's name."""
        if self.mode == "disabled":
            return
        import wandb

        wandb_dir = self.files = Path(run_dir) / "wandb"
        for variable, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                              ("WANDB_CONFIG_DIR", "config"), ("WANDB_ARTIFACT_DIR", "artifacts")):
            path = Path(run_dir) if variable == "WANDB_DIR" else wandb_dir / sub
            path.mkdir(parents=True, exist_ok=True)
            os.environ[variable] = str(path)
        group = group or self.group
        # symlink=False: run.save hard-links (or copies) metrics.json / summary.md into the attempt's
        # files/ instead of a symlink; the run replaces those files atomically, so every attempt's
        # W&B run keeps its own version (a symlink would show the last attempt's in all of them).
        resume = {"resume": "allow", "id": name[-40:].replace("/", "-")} if self.mode == "online" else {}
        self.run = wandb.init(project=self.project, entity=self.entity, name=name, group=group,
                              tags=self.tags, notes=self.notes, job_type=self.job_type,
                              config=run_config(name, config, choices, group),
                              dir=str(run_dir), mode=self.mode, reinit="finish_previous",
                              settings=wandb.Settings(silent=True, console="off", symlink=False), **resume)
        self.logged_epochs, self.sent_through_epoch = set(), None
        if self.mode == "online" and self.run.resumed:
            self._call("reading the resumed run's last epoch", self._read_sent_epochs)
        self._call("defining the metrics", self._define_metrics)

    def _read_sent_epochs(self) -> None:
        epoch = self.run.summary.get(EPOCH_METRIC)
        self.sent_through_epoch = int(epoch) if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) \
            else None
        if self.sent_through_epoch is not None:
            log.info("W&B run resumed: it holds training epochs up to %d, which are not sent again",
                     self.sent_through_epoch)

    def _define_metrics(self) -> None:
        self.run.define_metric(EPOCH_METRIC)
        self.run.define_metric("train/*", step_metric=EPOCH_METRIC)

    def _call(self, what: str, call: Callable[[], Any]) -> None:
        """Run one W&B call; if W&B fails, warn once and go on without it.

        A job's SIGTERM (a SLURM preemption, ``scontrol requeue``, the time limit) reaches every
        process of the job, W&B's service process (wandb-core) included, which exits at once; the
        next call then raises ``ConnectionResetError: Connection lost``. The run itself must not
        fail for that: it checkpoints and stops (or finishes), and metrics.json / summary.md hold
        every result. This attempt's W&B file under ``wandb/`` holds what wandb-core wrote before it
        ended, which can be nothing when the signal came early; the next attempt's run logs the
        earlier epochs again, so its training curve is whole."""
        if self.run is None:
            return
        try:
            call()
        except Exception as exc:
            log.warning("W&B stopped working while %s (%s: %s); the run goes on without W&B: its results are in "
                        "metrics.json and summary.md. This attempt's W&B file under %s holds what W&B wrote before "
                        "(possibly nothing); a rerun or requeued attempt logs the whole training curve again. (A "
                        "job's SIGTERM also ends W&B's service process.)", what, type(exc).__name__, exc, self.files)
            self.run, self.lost = None, True
            _discard_service()

    def _epoch_already_sent(self, epoch: Any) -> bool:
        return self.sent_through_epoch is not None and isinstance(epoch, (int, float)) \
            and epoch <= self.sent_through_epoch

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        flat = flatten(metrics)
        epoch = flat.get(EPOCH_METRIC)
        if self._epoch_already_sent(epoch):
            return
        self._call("logging", lambda: self.run.log(flat, step=step))
        if epoch is not None and self.run is not None:
            self.logged_epochs.add(int(epoch))

    def summary(self, metrics: Mapping[str, Any]) -> None:
        self._call("writing the summary", lambda: self.run.summary.update(flatten(metrics)))

    def record_run(self, run_dir: Path, metrics: Mapping[str, Any]) -> None:
        """Everything a dashboard needs from a finished (or failed) run, once, at its end, after
        metrics.json and summary.md are final: the training epochs this attempt did not log, the
        headline numbers and ``status`` in the summary, the corruption grid (and certified accuracy)
        tables, every PNG as ``plots/<name>``, and metrics.json / summary.md attached.

        A table or image that cannot be built (an unreadable PNG) is skipped with a warning; a
        failing W&B call ends W&B for this run, as in :meth:`_call`. Neither fails the run."""
        if self.run is None:
            return
        run_dir = Path(run_dir)
        history = (metrics.get("train") or {}).get("history") or []
        self._backfill(history)
        summary = {**flatten(metrics.get("summary") or {}), "status": metrics.get("status", "unknown")}
        if history:  # back-filled epochs come after the live ones: the summary keeps the final epoch's values
            summary.update(flatten({"train": history[-1]}))
        self.summary(summary)
        media = {}
        for key, columns, rows in ((GRID_TABLE, GRID_COLUMNS, lambda: corruption_grid_rows(metrics)),
                                   (CERTIFIED_TABLE, CERTIFIED_COLUMNS, lambda: certified_accuracy_rows(metrics))):
            table = _build(f"the {key} table", lambda c=columns, r=rows: _table(c, r()))
            if table is not None:
                media[key] = table
        for key, path in (_build(f"the list of PNG files in {run_dir}", lambda: run_plots(run_dir)) or {}).items():
            image = _build(f"the image {path}", lambda p=path: _image(p))
            if image is not None:
                media[key] = image
        if media:
            self._call("logging the tables and plots", lambda: self.run.log(media))
        for name in ATTACHED_FILES:
            path = run_dir / name
            if path.is_file():
                self._call(f"attaching {name}", lambda p=path: self.run.save(str(p), base_path=str(run_dir),
                                                                          policy="now", glob=False))

    def _backfill(self, history: Iterable[Mapping[str, Any]]) -> None:
        """Log the epochs of ``history`` that this attempt neither logged nor finds in the resumed run."""
        missing = [entry for entry in history if "epoch" in entry and int(entry["epoch"]) not in self.logged_epochs
                   and not self._epoch_already_sent(entry["epoch"])]
        if missing:
            log.info("W&B: adding training epochs %s of earlier attempts to this run's curves",
                     ", ".join(str(int(e["epoch"])) for e in missing))
        for entry in sorted(missing, key=lambda e: e["epoch"]):
            self.log({"train/" + k: v for k, v in entry.items()})

    def finish(self, exit_code: int = 0) -> None:
        run = self.run
        self._call("finishing the run", lambda: run.finish(exit_code=exit_code))
        self.run = None


def _build(what: str, make: Callable[[], Any]) -> Any:
    """A W&B object (table, image) or None, with a warning, when it cannot be built: the run goes on."""
    try:
        return make()
    except Exception as exc:
        log.warning("W&B: %s is left out of the run (%s: %s)", what, type(exc).__name__, exc)
        return None


def _table(columns: list[str], rows: list[list[Any]]):
    import wandb

    return wandb.Table(columns=columns, data=rows) if rows else None


def _image(path: Path):
    import wandb

    return wandb.Image(str(path))


def _discard_service() -> None:
    """Forget a W&B service process that has gone (so that neither its exit hook nor the next
    ``wandb.init`` of this process tries to talk to it)."""
    import wandb

    try:
        wandb.teardown(exit_code=1)
    except (Exception, SystemExit):  # tearing down a dead service raises the same connection error
        pass
