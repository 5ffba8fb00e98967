"""Helpers shared by the benchmark scripts (run as ``python scripts/bench_*.py``: this folder is on sys.path)."""

from __future__ import annotations

import importlib.util
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_average() -> str:
    """The 1 / 5 / 15-minute load averages, recorded next to every absolute number."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run_meta(script: str, quick: bool, argv: list[str] | None) -> dict:
    """What every benchmark records with its numbers: date, machine, torch and its thread count,
    --quick, the load average before the run and the command line."""
    import torch

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "quick": quick, "load_before": load_average(),
            "command": " ".join([f"scripts/{script}", *(argv if argv is not None else sys.argv[1:])])}


def module_at_revision(path: str, ref: str, name: str) -> ModuleType:
    """The module ``path`` (relative to the repository) as it is at git revision ``ref``, imported
    under ``name``: the baseline a benchmark times side by side with the working tree's code."""
    source = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
