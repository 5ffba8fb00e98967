"""The end of a multirun: one table of every job's status and headline numbers.

Registered as a Hydra callback in ``conf/config.yaml``. A job that fails does not stop the sweep
(``robustexp.main`` records the failure in the job's ``metrics.json``, closes its W&B run and
returns); this callback then lists the jobs, writes ``sweep_summary.json`` / ``.md`` into the
sweep directory, and makes the command exit with status 1 if any job failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from robustexp.rendering import format_table
from robustexp.utils import atomic_write_bytes, atomic_write_json

HEADLINE = ("clean_top1", "mCA", "mCE")


def sweep_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job folder of a sweep with its run's status and summary (following the ``run`` links)."""
    jobs = []
    for job in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        metrics_file = job / "run" / "metrics.json"
        if not metrics_file.is_file():
            metrics_file = job / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
        jobs.append({"job": job.name, "run_dir": str(metrics_file.parent.resolve()), "overrides": overrides,
                     "status": metrics.get("status", "missing"), "error": metrics.get("error"),
                     "summary": metrics.get("summary", {})})
    return jobs


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        jobs = sweep_jobs(sweep_dir)
        shared = set.intersection(*(set(j["overrides"]) for j in jobs)) if jobs else set()
        rows = [[j["job"], " ".join(o for o in j["overrides"] if o not in shared), j["status"],
                 *(j["summary"].get(k, "") for k in HEADLINE)] for j in jobs]
        table = format_table(["job", "varied", "status", *HEADLINE], rows, precision=2)
        failed = [j for j in jobs if j["status"] != "complete"]
        text = f"# sweep {sweep_dir.name}\n\n{table}\n"
        if failed:
            text += "\n" + "\n".join(f"- {j['job']}: {j['status']}: {j['error']}" for j in failed) + "\n"
        atomic_write_bytes(sweep_dir / "sweep_summary.md", text.encode())
        atomic_write_json(sweep_dir / "sweep_summary.json", jobs)
        print(f"\n[robustexp] sweep {sweep_dir}: {len(jobs) - len(failed)}/{len(jobs)} jobs complete\n\n{table}")
        if failed:
            print(f"[robustexp] {len(failed)} job(s) did not complete: "
                  + ", ".join(j["job"] for j in failed), file=sys.stderr)
            sys.exit(1)
