"""Pieces every dataset-analysis command shares: summary statistics, text tables and figure files.

The analysis commands (``python -m common.data.cytology_analysis``, ``...angiography_analysis``)
print the same kind of report and save the same kind of figures; they take these from here.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from common.io.atomic import atomic_write

__all__ = ["save_figure", "summary_stats", "text_table"]


def summary_stats(values: np.ndarray) -> dict[str, float | None]:
    """Mean, minimum and maximum, ``None`` for an empty array (strict JSON has no NaN)."""
    if values.size == 0:
        return {"mean": None, "min": None, "max": None}
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Text table: first column left-aligned, the others right-aligned, a rule under the header."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join([row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width in zip(row[1:], widths[1:]))])
        for row in [header, *rows]
    ]
    return [lines[0], "-" * len(lines[0]), *lines[1:]]


def save_figure(figure: Figure, path: Path) -> Path:
    """Write a Matplotlib figure as PNG atomically (a reader never sees half a file)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))
