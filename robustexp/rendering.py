"""How results are shown: plain-text tables for the console and the README, and figure files.

Used by every layer that reports something (evaluators, adaptation reports such as the prior
selection, the runner, the sweep summary and ``python -m robustexp.report``), so it sits at the
top of the package, below all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _cell(value, precision: int) -> str:
    if isinstance(value, float):
        return f"{value:.{precision}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence], precision: int = 2) -> str:
    """A markdown-compatible table with right-aligned numbers."""
    cells = [[_cell(v, precision) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(headers)]
    def line(values):
        return "| " + " | ".join(v.ljust(w) if i == 0 else v.rjust(w)
                                 for i, (v, w) in enumerate(zip(values, widths))) + " |"
    sep = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line([str(h) for h in headers]), sep, *(line(r) for r in cells)])


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write and close a matplotlib figure (closing frees it: runs make many plots)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)
