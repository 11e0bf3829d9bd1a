"""Per-class accuracy, balanced accuracy and the confusion matrix of a classifier, as an Ignite handler.

With imbalanced classes (Bethesda: mostly NILM) overall accuracy rewards a model that ignores the
rare, clinically important classes. Balanced accuracy, the mean of the per-class recalls, weighs every
class equally and is the score to select models on; the confusion matrix shows which classes are
confused (e.g. ASC-US with LSIL). Classes without samples in the evaluation set have no recall and are
left out of the mean, not counted as 0.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from csv import writer as csv_writer
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine

from common.engines.samples import EpochAccumulator, iteration_samples
from common.io.atomic import atomic_write

__all__ = [
    "confusion_matrix",
    "per_class_accuracy",
    "balanced_accuracy",
    "classification_report",
    "format_report",
    "plot_confusion_matrix",
    "ClassificationReportHandler",
]


def confusion_matrix(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, n_classes: int
) -> np.ndarray:
    """(n_classes, n_classes) int64 counts; row = true class, column = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} values but y_pred has {y_pred.size}.")
    for name, values in (("y_true", y_true), ("y_pred", y_pred)):
        if values.size and (values.min() < 0 or values.max() >= n_classes):
            raise ValueError(f"{name} must lie in 0..{n_classes - 1}, found {values.min()}..{values.max()}.")
    counts = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of every class (correct / samples of that class); NaN for a class without samples."""
    cm = np.asarray(cm, dtype=np.float64)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / support, np.nan)


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes that have samples; NaN when there are none."""
    recalls = per_class_accuracy(cm)
    present = ~np.isnan(recalls)
    return float(recalls[present].mean()) if present.any() else math.nan


def classification_report(cm: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Overall and per-class figures of a confusion matrix, as a JSON-ready dict (NaN as ``None``).

    Per class: support (true samples), recall (= per-class accuracy), precision and F1; a class never
    predicted has no precision (``None``).
    """
    cm = np.asarray(cm, dtype=np.int64)
    if cm.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix is {cm.shape} for {len(class_names)} class names.")
    total = int(cm.sum())
    correct = np.diag(cm).astype(np.float64)
    recall = per_class_accuracy(cm)
    predicted = cm.sum(axis=0)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, correct / predicted, np.nan)
        # 2 TP / (2 TP + FP + FN): 0 for a class that is missed or only falsely predicted
        f1 = np.where(support + predicted > 0, 2 * correct / (support + predicted), np.nan)
    per_class = {
        name: {
            "support": int(support[i]),
            "recall": _finite_or_none(recall[i]),
            "precision": _finite_or_none(precision[i]),
            "f1": _finite_or_none(f1[i]),
        }
        for i, name in enumerate(class_names)
    }
    return {
        "n_samples": total,
        "accuracy": _finite_or_none(correct.sum() / total if total else math.nan),
        "balanced_accuracy": _finite_or_none(balanced_accuracy(cm)),
        "per_class": per_class,
        "class_names": list(class_names),
        "confusion_matrix": cm.tolist(),
    }


class ClassificationReportHandler(EpochAccumulator):
    """Score a classifier over an evaluation epoch: accuracy, balanced accuracy, per-class figures.

    Attach to a MONAI ``SupervisedEvaluator``. Every iteration, the argmax of each sample's ``pred``
    (logits or probabilities, or an already-argmaxed index) and its ``label`` (an index or one-hot)
    are kept; at the end of the epoch ``{prefix}_balanced_accuracy`` and ``{prefix}_accuracy`` go into
    ``engine.state.metrics``, a table is logged, and with ``output_dir`` the files
    ``classification_report.json``, ``confusion_matrix.csv`` and ``confusion_matrix.png`` are written
    atomically. Under DDP the predictions of all ranks are gathered first (samples that
    ``DistributedSampler`` repeats to even out the ranks count twice) and rank 0 writes. Handlers that
    read these metrics (best-model saver, early stopping) must be attached after this one.

    Args:
        class_names: names in class-index order.
        output_dir: folder for the report files; ``None`` writes nothing.
        pred_key: key of the predictions in each output dict.
        label_key: key of the reference labels (looked up in the output, then in the batch).
        prefix: prefix of the metric names; ``""`` gives ``balanced_accuracy`` and ``accuracy``.
        logger_name: logger receiving the table.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        output_dir: str | os.PathLike | None = None,
        pred_key: str = "pred",
        label_key: str = "label",
        prefix: str = "val",
        logger_name: str = __name__,
    ) -> None:
        if len(class_names) < 2:
            raise ValueError(f"need at least 2 class names, got {list(class_names)}.")
        self.class_names = list(class_names)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.pred_key = pred_key
        self.label_key = label_key
        self.prefix = f"{prefix}_" if prefix else ""
        self.logger = logging.getLogger(logger_name)
        self._true: list[int] = []
        self._pred: list[int] = []

    def reset(self, engine: Engine | None = None) -> None:
        self._true, self._pred = [], []

    def update(self, engine: Engine) -> None:
        """Keep the predicted and true class of every sample of the iteration."""
        for sample in iteration_samples(engine):
            if self.pred_key not in sample or self.label_key not in sample:
                raise KeyError(
                    f"ClassificationReportHandler needs {self.pred_key!r} and {self.label_key!r} in the "
                    f"engine output or batch; found {list(sample)}"
                )
            self._pred.append(self._class_index(sample[self.pred_key], self.pred_key))
            self._true.append(self._class_index(sample[self.label_key], self.label_key))

    def _class_index(self, value: Any, key: str) -> int:
        """A class index from an index (any shape with one element) or a per-class vector (argmax)."""
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if array.size == 1:
            return int(array.reshape(-1)[0])
        if array.size == len(self.class_names):
            return int(np.argmax(array.reshape(-1)))
        raise ValueError(
            f"{key!r} has shape {array.shape}: expected a class index or one value per class "
            f"({len(self.class_names)})."
        )

    def complete(self, engine: Engine) -> None:
        """Gather all ranks' samples, compute the figures, publish, log and write them."""
        y_true = np.concatenate([np.asarray(t, dtype=np.int64) for t in idist.all_gather(self._true)])
        y_pred = np.concatenate([np.asarray(p, dtype=np.int64) for p in idist.all_gather(self._pred)])
        cm = confusion_matrix(y_true, y_pred, len(self.class_names))
        report = classification_report(cm, self.class_names)
        for name in ("balanced_accuracy", "accuracy"):
            engine.state.metrics[self.prefix + name] = math.nan if report[name] is None else report[name]
        self.logger.info("%s", format_report(report))
        if self.output_dir is not None and idist.get_rank() == 0:
            self._write(report)

    def _write(self, report: dict[str, Any]) -> None:
        text = json.dumps(report, indent=2) + "\n"
        atomic_write(self.output_dir / "classification_report.json", lambda f: f.write(text.encode("utf-8")))
        csv_bytes = _confusion_csv(report["confusion_matrix"], self.class_names).encode("utf-8")
        atomic_write(self.output_dir / "confusion_matrix.csv", lambda f: f.write(csv_bytes))
        figure = plot_confusion_matrix(np.asarray(report["confusion_matrix"]), self.class_names)
        atomic_write(self.output_dir / "confusion_matrix.png", lambda f: figure.savefig(f, format="png"))


def format_report(report: Mapping[str, Any]) -> str:
    """A fixed-width table of a :func:`classification_report`, for logs."""

    def cell(value: float | None) -> str:
        return f"{value:9.4f}" if value is not None else f"{'-':>9}"

    width = max(12, *(len(name) for name in report["per_class"]))
    lines = [
        f"classification over {report['n_samples']} samples: accuracy {cell(report['accuracy']).strip()}, "
        f"balanced accuracy {cell(report['balanced_accuracy']).strip()}",
        f"{'class':<{width}} {'support':>9} {'recall':>9} {'precision':>9} {'f1':>9}",
    ]
    for name, figures in report["per_class"].items():
        lines.append(
            f"{name:<{width}} {figures['support']:9d} {cell(figures['recall'])} "
            f"{cell(figures['precision'])} {cell(figures['f1'])}"
        )
    return "\n".join(lines)


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


def _finite_or_none(value: float) -> float | None:
    """Strict JSON has no NaN: a figure without samples is written as ``null``."""
    return None if math.isnan(value) else float(value)
