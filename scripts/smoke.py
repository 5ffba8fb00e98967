"""``make smoke``: every job of every full paper recipe end to end with ``debug=smoke``, then its report.

A full recipe is a ``conf/experiment/*.yaml`` without ``_small`` (found in the folder, so new recipes
are included). Each one runs as its user would start it, plus ``debug=smoke``
(conf/debug/smoke.yaml: synthetic images of the recipe's shape, untrained weights, one short epoch,
cut budgets, generated corruptions, the local basic launcher), ``-m`` when its
``hydra.sweeper.params`` give more than one job; then ``python -m robustexp.report`` on its output
root. A recipe passes when the command and the report exit 0 and every job left a complete run.
The table at the end: experiment, jobs, status, wall time; the exit status is 1 if any failed.
THE NUMBERS OF THESE RUNS ARE MEANINGLESS: the point is that nothing crashes before a cluster job.

Measured 2026-11-30 on 2 CPU cores: 69 min for the 12 recipes (28 jobs) while five other jobs shared
the cores (load 5-12); on the quiet machine schneider_table1 took 108 s, nandy_table1 12 s and the
7 jobs of tsiligkaridis_table1 136 s, which puts the whole run at roughly 15 min there (estimated).

    .venv/bin/python scripts/smoke.py                          # all full recipes
    .venv/bin/python scripts/smoke.py nandy_table1 rusak_table3
    .venv/bin/python scripts/smoke.py --root /tmp/smoke -- runtime.device=cuda   # overrides for every run after --
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing it

from robustexp.main import CONFIG_DIR  # noqa: E402
from robustexp.rendering import format_table  # noqa: E402

BANNER = ("SMOKE TEST (debug=smoke): synthetic images, untrained weights, cut budgets. THE NUMBERS ARE MEANINGLESS; "
          "this checks that every job of every full recipe runs end to end.")


def full_experiments(config_dir: str | Path = CONFIG_DIR) -> list[str]:
    """The full-size paper recipes: ``conf/experiment/*.yaml`` without the ``_small`` ones."""
    return sorted(p.stem for p in (Path(config_dir) / "experiment").glob("*.yaml") if not p.stem.endswith("_small"))


def sweep_jobs(name: str, overrides: list[str] = ()) -> list[list[str]]:
    """The override lists of the jobs the recipe's ``hydra.sweeper.params`` expand to (one job if none)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={name}", "debug=smoke", *overrides], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) if cfg.hydra.sweeper.get("params") else {}
    choices = [[f"{key}={value.strip()}" for value in str(values).split(",")] for key, values in params.items()]
    return [list(job) for job in itertools.product(*choices)] or [[]]


@dataclass
class Result:
    experiment: str
    jobs: int
    status: str
    seconds: float
    log: Path

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_recipe(name: str, out: Path, overrides: list[str], timeout_s: float) -> Result:
    """Run every job of recipe ``name`` with debug=smoke into ``out``, then its report."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "smoke.log"
    start = time.perf_counter()
    try:
        jobs = len(sweep_jobs(name, overrides))
    except Exception as exc:  # the recipe does not compose
        log.write_text(f"{type(exc).__name__}: {exc}\n")
        return Result(name, 0, f"does not compose: {type(exc).__name__}", time.perf_counter() - start, log)
    command = [sys.executable, "-m", "robustexp", *(["-m"] if jobs > 1 else []), f"+experiment={name}", "debug=smoke",
               f"output_root={out}", "runtime.progress=false", *overrides]
    report = [sys.executable, "-m", "robustexp.report", str(out), "--out", str(out / "report")]
    status = "ok"
    with open(log, "w") as fh:
        for step, argv in (("run", command), ("report", report)):
            fh.write(f"$ {' '.join(argv)}\n")
            fh.flush()
            remaining = timeout_s - (time.perf_counter() - start)
            try:
                code = subprocess.run(argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=max(1, remaining)
                                      ).returncode
            except subprocess.TimeoutExpired:
                status = f"{step}: timed out after {timeout_s:.0f} s"
                break
            if code != 0:
                status = f"{step}: exit {code}"
                break
            if step == "run":
                runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/metrics.json"))]
                complete = sum(r.get("status") == "complete" for r in runs)
                if complete != jobs or not all(r.get("smoke", {}).get("meaningless") for r in runs):
                    status = f"{complete}/{jobs} runs complete" + \
                        ("" if all(r.get("smoke") for r in runs) else ", a run is not marked as a smoke test")
                    break
    return Result(name, jobs, status, time.perf_counter() - start, log)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="scripts/smoke.py", description=__doc__.split("\n")[0])
    parser.add_argument("experiments", nargs="*", help="recipes to run (default: every full recipe)")
    parser.add_argument("--root", default=None, help="output root (default: outputs/smoke/make_<time>)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per recipe, report included")
    args = parser.parse_args(argv)
    known = full_experiments()
    names = args.experiments or known
    unknown = [n for n in names if not (Path(CONFIG_DIR) / "experiment" / f"{n}.yaml").is_file()]
    if unknown:
        parser.error(f"unknown experiment(s) {unknown}; the full recipes are: {', '.join(known)}")
    root = Path(args.root or ROOT / "outputs" / "smoke" / time.strftime("make_%Y-%m-%d_%H-%M-%S")).resolve()
    print(f"{'=' * 100}\n[smoke] {BANNER}\n[smoke] {len(names)} recipes -> {root}\n{'=' * 100}", flush=True)
    results = []
    for name in names:
        print(f"[smoke] {name} ...", flush=True)
        result = run_recipe(name, root / name, extra, args.timeout)
        results.append(result)
        print(f"[smoke] {name}: {result.status}, {result.jobs} job(s), {result.seconds:.0f} s (log {result.log})",
              flush=True)
        if not result.ok:
            print("".join(result.log.read_text().splitlines(keepends=True)[-40:]), flush=True)
    rows = [[r.experiment, r.jobs, r.status, f"{r.seconds:.0f} s"] for r in results]
    total = sum(r.seconds for r in results)
    print(f"\n{format_table(['experiment', 'jobs', 'status', 'wall time'], rows)}\n\n"
          f"[smoke] {sum(r.ok for r in results)}/{len(results)} recipes ok in {total / 60:.1f} min; outputs in {root}\n"
          f"{'=' * 100}\n[smoke] {BANNER}\n{'=' * 100}", flush=True)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
