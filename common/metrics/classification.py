"""Per-class accuracy, balanced accuracy and the confusion matrix of a classifier.

With imbalanced classes (Bethesda: mostly NILM) overall accuracy rewards a model that ignores the
rare, clinically important classes. Balanced accuracy, the mean of the per-class recalls, weighs every
class equally and is the score to select models on; the confusion matrix shows which classes are
confused (e.g. ASC-US with LSIL). Classes without samples in the evaluation set have no recall and are
left out of the mean, not counted as 0.

Screening asks a coarser question than the 8 classes: is a cell abnormal at all? A slide is referred
for review when it holds abnormal cells, so :func:`screening_report` collapses the confusion matrix to
negative vs abnormal (sensitivity: abnormal cells flagged; specificity: negative cells passed) and
:func:`abnormal_counts_per_image` counts the abnormal cells of each image, true and predicted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.utils import nan_to_none

__all__ = [
    "abnormal_counts_per_image",
    "balanced_accuracy",
    "classification_report",
    "confusion_matrix",
    "format_report",
    "per_class_accuracy",
    "screening_report",
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
    predicted has no precision (``None``). The recalls are repeated as flat ``recall_<name>`` entries,
    for tables that read one level of figures.
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
            "recall": nan_to_none(recall[i]),
            "precision": nan_to_none(precision[i]),
            "f1": nan_to_none(f1[i]),
        }
        for i, name in enumerate(class_names)
    }
    return {
        "n_samples": total,
        "accuracy": nan_to_none(correct.sum() / total if total else math.nan),
        "balanced_accuracy": nan_to_none(balanced_accuracy(cm)),
        "per_class": per_class,
        **{f"recall_{name}": figures["recall"] for name, figures in per_class.items()},
        "class_names": list(class_names),
        "confusion_matrix": cm.tolist(),
    }


def _abnormal_indices(class_names: Sequence[str], abnormal: Sequence[str]) -> np.ndarray:
    unknown = sorted(set(abnormal) - set(class_names))
    if unknown or not abnormal:
        raise ValueError(f"abnormal classes must be a non-empty subset of {list(class_names)}, got {list(abnormal)}.")
    return np.isin(np.asarray(class_names), list(abnormal))


def screening_report(cm: np.ndarray, class_names: Sequence[str], abnormal: Sequence[str]) -> dict[str, Any]:
    """Negative vs abnormal figures of a confusion matrix, as a JSON-ready dict (NaN as ``None``).

    A prediction counts as a flag when it names any abnormal class: an HSIL called LSIL is still
    referred, so it is a true positive here although an error in the 8-class figures.

    Args:
        cm: (C, C) confusion matrix, rows true, columns predicted.
        class_names: names in class-index order.
        abnormal: the classes that make a cell abnormal (Bethesda: ASC-US and above); all others are
            negative.

    Returns:
        ``abnormal_classes``, ``true_positives``, ``false_negatives``, ``true_negatives``,
        ``false_positives``, ``sensitivity`` (recall of abnormal cells) and ``specificity`` (recall of
        negative cells); a rate without cells is ``None``.
    """
    cm = np.asarray(cm, dtype=np.int64)
    is_abnormal = _abnormal_indices(class_names, abnormal)
    tp = int(cm[np.ix_(is_abnormal, is_abnormal)].sum())
    fn = int(cm[np.ix_(is_abnormal, ~is_abnormal)].sum())
    tn = int(cm[np.ix_(~is_abnormal, ~is_abnormal)].sum())
    fp = int(cm[np.ix_(~is_abnormal, is_abnormal)].sum())
    return {
        "abnormal_classes": [name for name, flag in zip(class_names, is_abnormal) if flag],
        "true_positives": tp,
        "false_negatives": fn,
        "true_negatives": tn,
        "false_positives": fp,
        "sensitivity": nan_to_none(tp / (tp + fn) if tp + fn else math.nan),
        "specificity": nan_to_none(tn / (tn + fp) if tn + fp else math.nan),
    }


def abnormal_counts_per_image(
    images: Sequence[str],
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    abnormal: Sequence[str],
) -> dict[str, dict[str, int]]:
    """Per image (in order of first appearance): ``cells``, ``true_abnormal`` and ``predicted_abnormal``
    counts of the cells whose true and predicted classes are in ``abnormal``."""
    is_abnormal = _abnormal_indices(class_names, abnormal)
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if not len(images) == len(y_true) == len(y_pred):
        raise ValueError(f"got {len(images)} image names for {len(y_true)} labels and {len(y_pred)} predictions.")
    counts: dict[str, dict[str, int]] = {}
    for image, true, pred in zip(images, is_abnormal[y_true], is_abnormal[y_pred]):
        entry = counts.setdefault(str(image), {"cells": 0, "true_abnormal": 0, "predicted_abnormal": 0})
        entry["cells"] += 1
        entry["true_abnormal"] += int(true)
        entry["predicted_abnormal"] += int(pred)
    return counts


def format_report(report: Mapping[str, Any]) -> str:
    """A fixed-width table of a :func:`classification_report`, for logs."""

    def cell(value: float | None) -> str:
        return f"{value:9.4f}" if value is not None else f"{'-':>9}"

    width = max(12, *(len(name) for name in report["per_class"]))
    lines = [
        (
            f"classification over {report['n_samples']} samples: accuracy {cell(report['accuracy']).strip()}, "
            f"balanced accuracy {cell(report['balanced_accuracy']).strip()}"
        ),
        f"{'class':<{width}} {'support':>9} {'recall':>9} {'precision':>9} {'f1':>9}",
    ]
    for name, figures in report["per_class"].items():
        lines.append(
            f"{name:<{width}} {figures['support']:9d} {cell(figures['recall'])} "
            f"{cell(figures['precision'])} {cell(figures['f1'])}"
        )
    if "screening" in report:
        screening = report["screening"]
        lines.append(
            f"screening ({', '.join(screening['abnormal_classes'])} abnormal): sensitivity "
            f"{cell(screening['sensitivity']).strip()}, specificity {cell(screening['specificity']).strip()}"
        )
    return "\n".join(lines)
