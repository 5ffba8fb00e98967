"""Wall time of the embedded default (``python -m robustexp``, issue 21: at most 60 s on 2 CPU cores)
and where it goes: startup, building the data and model, training, the clean evaluation, the 75
corruption subsets (the corruption engine separately), eps* (the adversarial generators'
training separately), W&B, and the rest (writing metrics, summary, checkpoints, exit).

Every run is a fresh process of the real command (``python -m robustexp`` with W&B offline, as
``make run``; ``--logger disabled`` leaves W&B out), in a fresh output directory; the phases come
from timers wrapped around the runner's own functions in that process (exclusive times: a phase
nested in another is not counted twice). Side by side: ``--against REF`` exports that git commit
(``git archive``, the working tree is left alone) and runs its code alternately with the
working tree's, round by round, so that load from other jobs hits both alike; the ratio of the
medians is the speedup. The results of the two are compared number by number (the summary of
metrics.json): a faster path must not change them.

``--profile`` adds one cProfile run of the working tree (not timed; the profile's own overhead
inflates it): the functions with the most own time and the most cumulative time go to
bench/results/default_run_profile.txt and the top ones into the Markdown.

Writes bench/results/default_run.json and bench/results/default_run.md.

    .venv/bin/python scripts/bench_default.py                  # 2 rounds against BEFORE_COMMIT + profile, ~10 min quiet
    .venv/bin/python scripts/bench_default.py --quick          # 1 run, recorded before, profile, ~2.5 min
    .venv/bin/python scripts/bench_default.py --against HEAD --rounds 3 --no-profile
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 60.0
# The code before this round's changes of the default (channels_last on CPU, folded BN, the quick
# budget; 2026-11-30), and its run measured from a fresh clone with `make run` at cbe48a6 (the same
# code; load about 2, W&B offline): the numbers shown when no side-by-side baseline runs (--quick).
BEFORE_COMMIT = "dccf2e2"
RECORDED_BEFORE: dict = {"when": "2026-11-30 22:13, fresh clone, load ~2", "commit": "cbe48a6", "wall_s": 290.0,
                         "phases_s": {"corruptions": 56.0, "eps_star": 177.0}}
# Since BEFORE_COMMIT the default trains 4 epochs of 32 (was 10 of 128) and its eps* generators 100 steps
# of 32 images (was 200 of 128): its numbers differ from BEFORE_COMMIT's by design, not by the speed-ups
BUDGET_CHANGED_SINCE_BEFORE = True
PHASES = ("startup", "build", "training", "clean", "corruptions", "corruption engine", "eps_star",
          "eps* generators", "W&B", "other")
SUMMARY_KEYS_IDENTICAL = ("clean_top1", "clean_top5", "mCA", "eps_star_gaussian", "eps_star_uniform",
                          "eps_star_adversarial")


# ----------------------------------------------------------------------------- the timed child process
class _Phases:
    """Exclusive wall time per phase: entering a phase pauses the enclosing one."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.stack: list[list] = []  # [name, start of the current slice]

    def enter(self, name: str) -> None:
        now = time.time()
        if self.stack:
            outer = self.stack[-1]
            self.seconds[outer[0]] = self.seconds.get(outer[0], 0.0) + now - outer[1]
        self.stack.append([name, now])

    def leave(self) -> None:
        now = time.time()
        name, start = self.stack.pop()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - start
        if self.stack:
            self.stack[-1][1] = now

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            self.enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()
        return timed


class _TimedEngine:
    """The corruption engine, timed (every other attribute passes through)."""

    def __init__(self, engine, phases: _Phases):
        self._engine, self._call = engine, phases.wrap("corruption engine", engine.__call__)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def child(args) -> None:
    """Run ``python -m robustexp <overrides>`` from the code tree ``args.tree`` with phase timers."""
    marks = {"t0": args.t0}
    sys.path.insert(0, args.tree)
    phases = _Phases()
    import robustexp.main as runner  # noqa: E402  (after the tree is on the path)

    marks["imported"] = time.time()
    from robustexp import tracking
    from robustexp.evaluation import eps_star

    for method in ("start", "log", "record_run", "finish"):
        setattr(tracking.WandbTracker, method, phases.wrap("W&B", getattr(tracking.WandbTracker, method)))
    eps_star.train_adversarial_generator = phases.wrap("eps* generators", eps_star.train_adversarial_generator)
    build = runner._build

    def timed_build(cfg, device):
        marks.setdefault("run_entered", time.time())
        parts = phases.wrap("build", build)(cfg, device)
        parts.trainer.fit = phases.wrap("training", parts.trainer.fit)
        for key, evaluator in parts.evaluators.items():
            evaluator.evaluate = phases.wrap(key, evaluator.evaluate)
            source = getattr(evaluator, "source", None)
            if source is not None and hasattr(source, "engine"):
                source.engine = _TimedEngine(source.engine, phases)
        return parts

    runner._build = timed_build
    run = runner.run

    def timed_run(*a, **k):  # from here on everything untimed is "other" (record, summary, exit)
        marks["run_entered"] = time.time()
        phases.enter("other")
        try:
            return run(*a, **k)
        finally:
            phases.leave()

    runner.run = timed_run
    sys.argv = ["robustexp", *args.overrides]
    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    runner.main()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.cprofile)
    marks["done"] = time.time()
    Path(args.child).write_text(json.dumps({"marks": marks, "phases": phases.seconds}))


# ----------------------------------------------------------------------------- the parent
def _export(ref: str, into: Path) -> Path:
    """The code of git commit ``ref`` in ``into`` (``git archive``: the checkout is not touched)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _one_run(tree: Path, logger: str, scratch: Path, label: str, cprofile: Path | None = None,
             extra: tuple[str, ...] = ()) -> dict:
    out = scratch / f"out_{label}"
    shutil.rmtree(out, ignore_errors=True)
    report = scratch / f"{label}.json"
    overrides = [f"output_root={out}", "runtime.progress=false", *extra]
    if logger != "offline":
        overrides.append(f"logger.mode={logger}")
    load_before = os.getloadavg()
    t0 = time.time()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(report), "--tree", str(tree),
           "--t0", repr(t0), *(["--cprofile", str(cprofile)] if cprofile else []), "--", *overrides]
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench_default: the run of {tree} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    timed = json.loads(report.read_text())
    marks, seconds = timed["marks"], dict(timed["phases"])
    seconds["startup"] = marks["run_entered"] - t0
    seconds["other"] = seconds.get("other", 0.0) + (t0 + wall - marks["done"])  # interpreter exit
    metrics_files = list(out.glob("runs/*/metrics.json"))
    metrics = json.loads(metrics_files[0].read_text()) if metrics_files else {}
    shutil.rmtree(out, ignore_errors=True)
    train = metrics.get("train", {}).get("history", [])
    return {"wall_s": wall, "phases_s": {p: seconds.get(p, 0.0) for p in PHASES},
            "load_1min_before": load_before[0], "load_1min_after": os.getloadavg()[0],
            "train_images_per_s": [h.get("images_per_s") for h in train], "summary": metrics.get("summary", {}),
            "status": metrics.get("status")}


def _median_run(runs: list[dict]) -> dict:
    return {"wall_s": statistics.median(r["wall_s"] for r in runs),
            "best_wall_s": min(r["wall_s"] for r in runs),
            "phases_s": {p: statistics.median(r["phases_s"][p] for r in runs) for p in PHASES},
            "train_images_per_s": statistics.median(
                statistics.median(r["train_images_per_s"]) for r in runs if r["train_images_per_s"])
            if any(r["train_images_per_s"] for r in runs) else None}


def _compare(after: dict, before: dict) -> dict:
    """Largest absolute difference per summary number (after - before); 0.0 everywhere = same results."""
    out = {}
    for key in sorted(set(after) | set(before)):
        a, b = after.get(key), before.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            out[key] = 0.0 if a == b else abs(a - b)
        elif a != b:
            out[key] = f"{b!r} -> {a!r}"
    return out


def _profile_text(path: Path, top: int) -> tuple[str, str]:
    import io
    import pstats

    full = io.StringIO()
    stats = pstats.Stats(str(path), stream=full)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(40)
    short = io.StringIO()
    pstats.Stats(str(path), stream=short).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in short.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    return full.getvalue(), "\n".join(lines[start:])


def _markdown(result: dict) -> str:
    after, before = result["after"], result.get("before_measured")
    recorded = result.get("before_recorded") or {}
    cols = ["phase"]
    if recorded:
        cols.append(f"before, recorded ({recorded.get('when', '?')}) s")
    if before:
        cols.append(f"before ({result['against']}), this run s")
    cols.append("after s")
    if before:
        cols.append("after / before")
    lines = [f"# The embedded default, wall time by phase ({result['logger']} W&B, {result['threads']} threads, "
             f"median of {result['rounds']} round(s))", "",
             f"command: `{result['command']}`", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def row(name, get):
        cells = [name]
        if recorded:
            cells.append(_fmt(get(recorded)))
        if before:
            cells.append(_fmt(get(before)))
        cells.append(_fmt(get(after)))
        if before:
            a, b = get(after), get(before)
            cells.append(f"{a / b:.2f}" if a is not None and b else "")
        lines.append("| " + " | ".join(cells) + " |")

    row("**total (wall)**", lambda r: r.get("wall_s"))
    for phase in PHASES:
        row(phase, lambda r, p=phase: (r.get("phases_s") or {}).get(p))
    row("training img/s", lambda r: r.get("train_images_per_s"))
    loads = [f"{r['load_1min_before']:.2f}" for r in result["runs"]]
    lines += ["", f"target: {TARGET_SECONDS:.0f} s; after {after['wall_s']:.1f} s (best {after['best_wall_s']:.1f} s)"
              f"; clean top-1 {result['clean_top1']}", f"1-minute load average before each run: {', '.join(loads)}"]
    if result.get("differences") is not None:
        changed = {k: v for k, v in result["differences"].items() if v != 0.0}
        note = (" (expected: the default's training and eps* budget changed since that commit; compare "
                "against a commit with the same budget to check that a speed-up leaves the results alone)"
                if BUDGET_CHANGED_SINCE_BEFORE and result.get("against") == BEFORE_COMMIT else "")
        lines.append("results after vs before: " + ("identical (every summary number)" if not changed else
                                                    f"DIFFERENT: {changed}{note}"))
    if result.get("profile_top"):
        lines += ["", "## cProfile of one run (own time, top functions)", "", "```", result["profile_top"], "```"]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run, no side-by-side baseline")
    parser.add_argument("--rounds", type=int, default=None, help="runs per code version (default 2, --quick 1)")
    parser.add_argument("--against", default=None,
                        help=f"git commit to run side by side (default {BEFORE_COMMIT} if it exists; 'none': no)")
    parser.add_argument("--logger", default="offline", choices=("offline", "disabled"))
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra override of every run (a smoke test of this script: --set trainer.epochs=1)")
    parser.add_argument("--top", type=int, default=25, help="profile lines in the Markdown")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--cprofile", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rounds = args.rounds or (1 if args.quick else 2)
    against = args.against if args.against is not None else (None if args.quick else BEFORE_COMMIT)
    if against in ("none", ""):
        against = None
    if against and subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{against}^{{commit}}"],
                                  capture_output=True).returncode != 0:
        print(f"[bench] {against} is not a commit of this checkout: no side-by-side baseline", flush=True)
        against = None
    scratch = Path(tempfile.mkdtemp(prefix="bench_default_"))
    runs: list[dict] = []
    try:
        trees = {"after": ROOT}
        if against:
            trees["before"] = _export(against, scratch / "before_tree")
        by_version: dict[str, list[dict]] = {v: [] for v in trees}
        for r in range(rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for version in order:
                print(f"[bench] round {r + 1}/{rounds}: {version} ...", flush=True)
                one = _one_run(trees[version], args.logger, scratch, f"{version}{r}", extra=tuple(args.set))
                one.update(version=version, round=r)
                print(f"[bench]   {one['wall_s']:.1f} s (load {one['load_1min_before']:.2f})", flush=True)
                runs.append(one)
                by_version[version].append(one)
        profile_full = profile_top = None
        if args.profile:
            print("[bench] profile run ...", flush=True)
            prof = scratch / "default.prof"
            _one_run(ROOT, args.logger, scratch, "profile", cprofile=prof, extra=tuple(args.set))
            profile_full, profile_top = _profile_text(prof, args.top)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    after = _median_run(by_version["after"])
    result = {"command": " ".join(["python -m robustexp", *([] if args.logger == "offline" else
                                                             [f"logger.mode={args.logger}"]), *args.set]),
              "logger": args.logger, "threads": _threads(), "rounds": rounds, "against": against,
              "after": after, "runs": runs, "before_recorded": RECORDED_BEFORE or None,
              "clean_top1": by_version["after"][-1]["summary"].get("clean_top1"),
              "target_s": TARGET_SECONDS, "machine": platform.platform(), "cpu_count": os.cpu_count(),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "profile_top": profile_top}
    if "before" in by_version:
        result["before_measured"] = _median_run(by_version["before"])
        result["speedup"] = result["before_measured"]["wall_s"] / after["wall_s"]
        result["differences"] = _compare(by_version["after"][0]["summary"], by_version["before"][0]["summary"])
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "default_run.json").write_text(json.dumps(result, indent=2))
    text = _markdown(result)
    (out / "default_run.md").write_text(text)
    if profile_full:
        (out / "default_run_profile.txt").write_text(profile_full)
    print("\n" + text)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
