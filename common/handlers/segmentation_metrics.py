"""Ignite handler scoring a semantic segmentation evaluation: mIoU, fwIoU, mDice and boundary IoU.

The scores pool pixel counts over the whole dataset (see :mod:`common.metrics.semantic_segmentation`),
so they cannot be averaged batch by batch: the handler keeps each image's counts (a few dozen integers),
combines them when the epoch ends, and publishes the figures for model selection.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from csv import writer as csv_writer
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine

from common.handlers.samples import EpochAccumulator, gather_by_name, iteration_samples, sample_name
from common.io.atomic import atomic_write
from common.metrics.semantic_segmentation import (
    SegmentationConfusion,
    SegmentationCounts,
    format_segmentation_report,
)
from common.utils import nan_to_none

__all__ = ["SUMMARY_METRICS", "SegmentationMetricsHandler"]

SUMMARY_METRICS = ("mIoU", "fwIoU", "mDice", "mBoundaryIoU", "pixel_accuracy")
_CSV_COLUMNS = (
    "iou", "dice", "boundary_iou", "reference_pixels", "predicted_pixels", "intersection_pixels"
)


class SegmentationMetricsHandler(EpochAccumulator):
    """Score an evaluation epoch with :class:`~common.metrics.semantic_segmentation.SegmentationConfusion`.

    Attach to a MONAI ``SupervisedEvaluator`` whose ``pred`` is, per image, (K, H, W) logits or
    probabilities (argmax over channels) or a (1, H, W) class map, and whose ``label`` is the (1, H, W)
    reference mask (K = C + 1 channels: tissue classes and background). At the end of the epoch the
    figures of :data:`SUMMARY_METRICS` and one ``IoU_<class name>`` per class go into
    ``engine.state.metrics`` (NaN for a class without pixels), a table is logged, and with
    ``output_dir`` the full report (JSON, NaN written as ``null``) and a per-class CSV are written
    atomically. Handlers that read the metrics, such as a ``CheckpointSaver`` or ``BestModelSaver``
    with ``key_metric_name="mIoU"`` or early stopping, must be attached after this one.

    Under DDP every rank counts its own images and the per-image counts are gathered before pooling;
    an image met twice (``DistributedSampler`` pads the ranks) counts once. Only rank 0 writes files.

    Args:
        num_classes: number of tissue classes C; the background is class C.
        class_names: C names, or C + 1 ending with the background's (see
            :meth:`~common.metrics.semantic_segmentation.SegmentationConfusion.label_names`).
        output_dir: folder of the report files; ``None`` writes nothing.
        report_name: the files are ``<report_name>.json`` and ``<report_name>_per_class.csv``.
        pred_key, label_key: keys of the prediction and the reference mask (output, then batch).
        ignore_index, boundary_ratio, include_background, ignored_predictions: see
            :class:`~common.metrics.semantic_segmentation.SegmentationConfusion`.
        prefix: prefix of the metric names in ``engine.state.metrics``, e.g. ``"val_"``.
        name_key, image_key: what names an image for de-duplication: the ``name_key`` entry, else the
            ``filename_or_obj`` of the ``image_key`` metadata, else its position on the rank.
        logger_name: logger receiving the table.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        output_dir: str | os.PathLike | None = None,
        report_name: str = "segmentation_metrics",
        pred_key: str = "pred",
        label_key: str = "label",
        ignore_index: int = 255,
        boundary_ratio: float = 0.02,
        include_background: bool = True,
        ignored_predictions: str = "miss",
        prefix: str = "",
        name_key: str = "name",
        image_key: str = "image",
        logger_name: str = __name__,
    ) -> None:
        self.confusion = SegmentationConfusion(
            num_classes, ignore_index, boundary_ratio, include_background, ignored_predictions
        )
        self.class_names = self.confusion.label_names(class_names)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.report_name = report_name
        self.pred_key, self.label_key = pred_key, label_key
        self.prefix = prefix
        self.name_key, self.image_key = name_key, image_key
        self.logger = logging.getLogger(logger_name)
        self._records: list[tuple[str, SegmentationCounts]] = []

    def reset(self, engine: Engine | None = None) -> None:
        self._records = []

    def update(self, engine: Engine) -> None:
        """Count the pixels of every sample of the iteration."""
        for sample in iteration_samples(engine):
            for key in (self.pred_key, self.label_key):
                if key not in sample:
                    raise KeyError(
                        f"SegmentationMetricsHandler: no {key!r} in the engine output or batch; "
                        f"found {sorted(sample)}"
                    )
            name = sample_name(sample, self.name_key, self.image_key, position=len(self._records))
            pred = _class_map(sample[self.pred_key])
            target = _class_map(sample[self.label_key])
            self._records.append((name, self.confusion.counts(pred, target)))

    def complete(self, engine: Engine) -> None:
        """Pool all ranks' counts, publish the figures, log them and write the report."""
        unique = gather_by_name(self._records, lambda record: record[0])
        if not unique:
            raise RuntimeError("SegmentationMetricsHandler saw no images during the epoch; nothing to score")
        self.confusion.reset()
        for _, counts in unique.values():
            self.confusion.add(counts)
        report = self.confusion.report(self.class_names)
        for key in SUMMARY_METRICS:
            engine.state.metrics[self.prefix + key] = report[key]
        for name, scores in report["per_class"].items():
            engine.state.metrics[f"{self.prefix}IoU_{name}"] = scores["iou"]
        self.logger.info("%s", format_segmentation_report(report))
        if self.output_dir is not None and idist.get_rank() == 0:
            self._write(report)

    def _write(self, report: dict[str, Any]) -> None:
        text = json.dumps(nan_to_none(report), indent=2) + "\n"
        atomic_write(self.output_dir / f"{self.report_name}.json", lambda f: f.write(text.encode("utf-8")))
        table = io.StringIO()
        writer = csv_writer(table, lineterminator="\n")
        writer.writerow(("class", "index", *_CSV_COLUMNS))
        for name, scores in report["per_class"].items():
            values = (scores[column] for column in _CSV_COLUMNS)
            writer.writerow([name, scores["index"], *nan_to_none(list(values))])
        data = table.getvalue().encode("utf-8")
        atomic_write(self.output_dir / f"{self.report_name}_per_class.csv", lambda f: f.write(data))


def _class_map(value: Any) -> np.ndarray:
    """(H, W) class indices from (K, H, W) scores (argmax), a (1, H, W) or an (H, W) class map."""
    value = torch.as_tensor(value)
    if value.ndim == 3 and value.shape[0] > 1:
        value = value.argmax(dim=0)  # on the device: only the class map is copied to the host
    return value.detach().cpu().numpy()


