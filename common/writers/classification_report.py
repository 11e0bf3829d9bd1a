"""A classification report on disk: JSON figures, the confusion matrix as CSV and as a picture, and
with a screening view, the abnormal cells of every image as CSV."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from csv import writer as csv_writer
from pathlib import Path
from typing import Any

import numpy as np

from common.io.atomic import atomic_write

__all__ = ["plot_confusion_matrix", "write_classification_report"]


def write_classification_report(report: Mapping[str, Any], output_dir: str | os.PathLike) -> None:
    """Write ``classification_report.json``, ``confusion_matrix.csv`` and ``confusion_matrix.png`` of a
    :func:`common.metrics.classification.classification_report` into ``output_dir``, each atomically;
    ``screening_per_image.csv`` too when the report's screening view has per-image counts."""
    output_dir = Path(output_dir)
    class_names = list(report["class_names"])
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(output_dir / "classification_report.json", lambda f: f.write(text.encode("utf-8")))
    csv_bytes = _confusion_csv(report["confusion_matrix"], class_names).encode("utf-8")
    atomic_write(output_dir / "confusion_matrix.csv", lambda f: f.write(csv_bytes))
    figure = plot_confusion_matrix(np.asarray(report["confusion_matrix"]), class_names)
    atomic_write(output_dir / "confusion_matrix.png", lambda f: figure.savefig(f, format="png"))
    per_image = report.get("screening", {}).get("per_image")
    if per_image is not None:
        screening_bytes = _per_image_csv(per_image).encode("utf-8")
        atomic_write(output_dir / "screening_per_image.csv", lambda f: f.write(screening_bytes))


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str]) -> Any:
    """A matplotlib ``Figure`` of the row-normalised confusion matrix with the counts written in.

    Built without pyplot, so it needs no display and leaves no global figure state behind.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    support = cm.sum(axis=1, keepdims=True)
    fractions = np.divide(cm, support, out=np.zeros(cm.shape, dtype=np.float64), where=support > 0)
    size = 1.5 + 0.6 * len(class_names)
    figure = Figure(figsize=(size + 1.5, size), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(fractions, vmin=0, vmax=1, cmap="Blues")
    figure.colorbar(image, ax=axes, label="fraction of the true class")
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, labels=class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, labels=class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    for (row, col), count in np.ndenumerate(cm):
        colour = "white" if fractions[row, col] > 0.5 else "black"
        axes.text(col, row, str(count), ha="center", va="center", color=colour, fontsize=8)
    figure.tight_layout()
    return figure


def _confusion_csv(cm: Sequence[Sequence[int]], class_names: Sequence[str]) -> str:
    """The confusion matrix as CSV with class names on both axes (rows: true, columns: predicted)."""
    table = io.StringIO()
    writer = csv_writer(table, lineterminator="\n")
    writer.writerow(["true \\ predicted", *class_names])
    for name, row in zip(class_names, cm):
        writer.writerow([name, *row])
    return table.getvalue()


def _per_image_csv(per_image: Mapping[str, Mapping[str, int]]) -> str:
    """One row per image: its cells and its true and predicted abnormal cells."""
    table = io.StringIO()
    writer = csv_writer(table, lineterminator="\n")
    writer.writerow(["image", "cells", "true_abnormal", "predicted_abnormal"])
    for image, counts in per_image.items():
        writer.writerow([image, counts["cells"], counts["true_abnormal"], counts["predicted_abnormal"]])
    return table.getvalue()
