"""Per-class accuracy, balanced accuracy and the confusion matrix of a classifier over an evaluation
epoch, as an Ignite handler: the figures are :mod:`common.metrics.classification`, the files
:func:`common.writers.classification_report.write_classification_report`."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
from ignite.engine import Engine
from monai.utils import convert_to_numpy

from common.handlers.samples import EpochAccumulator, iteration_samples
from common.metrics.classification import (
    abnormal_counts_per_image,
    classification_report,
    confusion_matrix,
    format_report,
    screening_report,
)
from common.writers.classification_report import write_classification_report

__all__ = ["ClassificationReportHandler"]


class ClassificationReportHandler(EpochAccumulator):
    """Score a classifier over an evaluation epoch: accuracy, balanced accuracy, per-class figures.

    Attach to a MONAI ``SupervisedEvaluator``. Every iteration, the argmax of each sample's ``pred``
    (logits or probabilities, or an already-argmaxed index) and its ``label`` (an index or one-hot)
    are kept; at the end of the epoch ``{prefix}_balanced_accuracy`` and ``{prefix}_accuracy`` go into
    ``engine.state.metrics``, a table is logged, and with ``output_dir`` the files
    ``classification_report.json``, ``confusion_matrix.csv`` and ``confusion_matrix.png`` are written
    atomically. With ``abnormal_classes`` the report gains the screening view (negative vs abnormal
    sensitivity and specificity, ``{prefix}_screening_sensitivity`` and ``_specificity`` metrics), and
    with ``image_key`` also the true and predicted abnormal cells of every image
    (``screening_per_image.csv``). Under DDP the predictions of all ranks are gathered first (samples that
    ``DistributedSampler`` repeats to even out the ranks count twice) and rank 0 writes. Handlers that
    read these metrics (best-model saver, early stopping) must be attached after this one.

    Args:
        class_names: names in class-index order.
        output_dir: folder for the report files; ``None`` writes nothing.
        pred_key: key of the predictions in each output dict.
        label_key: key of the reference labels (looked up in the output, then in the batch).
        prefix: prefix of the metric names; ``""`` gives ``balanced_accuracy`` and ``accuracy``.
        abnormal_classes: the classes a screen flags (Bethesda: ASC-US and above); ``None``: no
            screening view.
        image_key: key of each sample's image name (``CellCropDataset`` items: ``"name"``), for the
            per-image counts; needs ``abnormal_classes``.
        logger_name: logger receiving the table.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        output_dir: str | os.PathLike | None = None,
        pred_key: str = "pred",
        label_key: str = "label",
        prefix: str = "val",
        abnormal_classes: Sequence[str] | None = None,
        image_key: str | None = None,
        logger_name: str = __name__,
    ) -> None:
        if len(class_names) < 2:
            raise ValueError(f"need at least 2 class names, got {list(class_names)}.")
        unknown = sorted(set(abnormal_classes or ()) - set(class_names))
        if unknown:
            raise ValueError(f"abnormal classes {unknown} are not among the class names {list(class_names)}.")
        if image_key is not None and not abnormal_classes:
            raise ValueError("image_key gives per-image abnormal counts: set abnormal_classes too.")
        self.abnormal_classes = list(abnormal_classes) if abnormal_classes else None
        self.image_key = image_key
        self.class_names = list(class_names)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.pred_key = pred_key
        self.label_key = label_key
        self.prefix = f"{prefix}_" if prefix else ""
        self.logger = logging.getLogger(logger_name)
        self._true: list[int] = []
        self._pred: list[int] = []
        self._images: list[str] = []

    def reset(self, engine: Engine | None = None) -> None:
        self._true, self._pred, self._images = [], [], []

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
            if self.image_key is not None:
                if self.image_key not in sample:
                    raise KeyError(f"ClassificationReportHandler needs {self.image_key!r}; found {list(sample)}")
                self._images.append(str(sample[self.image_key]))

    def _class_index(self, value: Any, key: str) -> int:
        """A class index from an index (any shape with one element) or a per-class vector (argmax)."""
        array = convert_to_numpy(value, wrap_sequence=True)
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
        names = ["balanced_accuracy", "accuracy"]
        if self.abnormal_classes:
            screening = screening_report(cm, self.class_names, self.abnormal_classes)
            if self.image_key is not None:
                images = [name for part in idist.all_gather(self._images) for name in part]
                screening["per_image"] = abnormal_counts_per_image(
                    images, y_true, y_pred, self.class_names, self.abnormal_classes
                )
            report["screening"] = screening
            report["screening_sensitivity"] = screening["sensitivity"]
            report["screening_specificity"] = screening["specificity"]
            names += ["screening_sensitivity", "screening_specificity"]
        for name in names:
            engine.state.metrics[self.prefix + name] = math.nan if report[name] is None else report[name]
        self.logger.info("%s", format_report(report))
        if self.output_dir is not None and idist.get_rank() == 0:
            write_classification_report(report, self.output_dir)
