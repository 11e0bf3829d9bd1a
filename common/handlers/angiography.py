"""Ignite handlers scoring the angiography bundle's evaluations (maths in :mod:`common.metrics.angiography`).

:class:`VesselMetricsHandler` scores phase 1 (vessel Dice, clDice), :class:`SegmentMetricsHandler`
phase 2 (COCO box/mask AP, AP50, AP75 overall and per segment, per-segment Dice, ARCADE-style F1).
Both score each image as it comes and keep only small per-image records (numbers, RLEs), gather
them over DDP ranks at the end of the epoch (an image repeated by DistributedSampler counts once),
publish the figures in ``engine.state.metrics`` for model selection, and with ``output_dir`` write a
JSON report atomically on rank 0.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
from ignite.engine import Engine
from monai.utils import convert_to_numpy

from common.data.angiography import CASS_CATEGORIES
from common.handlers.samples import EpochAccumulator, gather_by_name, iteration_samples, sample_name
from common.io.atomic import atomic_write
from common.metrics.angiography import (
    ARCADE_IOU_THRESHOLD,
    image_segment_scores,
    summarize_segment_scores,
    vessel_scores,
)
from common.metrics.lesion_segmentation import (
    COCO_KEYS,
    encode_detections,
    encode_reference,
    evaluate_records,
)
from common.utils import as_plane, nan_to_none

__all__ = ["SegmentMetricsHandler", "VesselMetricsHandler", "reference_label_map"]


def _require(sample: Mapping[str, Any], keys: Sequence[str], handler: str) -> None:
    missing = [key for key in keys if key not in sample]
    if missing:
        raise KeyError(f"{handler}: no {missing} in the engine output or batch; found {sorted(sample)}")


def _write_json(output_dir: Path | None, file_name: str, report: dict[str, Any]) -> None:
    if output_dir is not None and idist.get_rank() == 0:
        text = json.dumps(nan_to_none(report), indent=2) + "\n"
        atomic_write(output_dir / file_name, lambda f: f.write(text.encode("utf-8")))


def reference_label_map(instances: Any, labels: Any) -> np.ndarray:
    """(H, W) CASS label map painted from reference instances (N, H, W) and their labels (N,)."""
    instances = convert_to_numpy(instances, wrap_sequence=True)
    labels = convert_to_numpy(labels, wrap_sequence=True).astype(np.int64).reshape(-1)
    label_map = np.zeros(instances.shape[-2:], np.int64)
    for mask, label in zip(instances.reshape(-1, *instances.shape[-2:]), labels):
        label_map[mask > 0] = label
    return label_map


class VesselMetricsHandler(EpochAccumulator):
    """Mean vessel Dice and clDice of an evaluation epoch (phase 1).

    Args:
        output_dir: folder of ``metrics_file``; ``None`` writes nothing.
        threshold: prediction values above it are vessel (0.5 for sigmoid probabilities or 0/1 masks).
        pred_key, label_key: the (1, H, W) prediction and reference vessel mask.
        prefix: prefix of the names in ``engine.state.metrics`` (``vessel_dice``, ``vessel_cl_dice``).
        name_key, image_key: what names an image (see :func:`~common.handlers.samples.sample_name`).
        metrics_file: name of the JSON report (means and per-image scores).
        logger_name: logger receiving the summary.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        threshold: float = 0.5,
        pred_key: str = "pred",
        label_key: str = "label",
        prefix: str = "",
        name_key: str = "name",
        image_key: str = "image",
        metrics_file: str = "vessel_metrics.json",
        logger_name: str = __name__,
    ) -> None:
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.threshold = threshold
        self.pred_key, self.label_key, self.prefix = pred_key, label_key, prefix
        self.name_key, self.image_key = name_key, image_key
        self.metrics_file = metrics_file
        self.logger = logging.getLogger(logger_name)
        self._records: list[tuple[str, float, float]] = []

    def reset(self, engine: Engine | None = None) -> None:
        self._records = []

    def update(self, engine: Engine) -> None:
        """Score every image of the iteration."""
        for sample in iteration_samples(engine):
            _require(sample, (self.pred_key, self.label_key), type(self).__name__)
            name = sample_name(sample, self.name_key, self.image_key, position=len(self._records))
            predicted = as_plane(sample[self.pred_key], "prediction", np.float32) > self.threshold
            reference = as_plane(sample[self.label_key], "reference", np.float32) > 0
            scores = vessel_scores([predicted], [reference])
            self._records.append((name, float(scores["dice"][0]), float(scores["cl_dice"][0])))

    def complete(self, engine: Engine) -> None:
        """Gather, publish, log and write the means."""
        records = list(gather_by_name(self._records, lambda record: record[0]).values())
        if not records:
            raise RuntimeError(f"{type(self).__name__} saw no images during the epoch; nothing to score")
        dice, cl_dice = (np.array([r[i] for r in records]) for i in (1, 2))
        report = {"vessel_dice": float(dice.mean()), "vessel_cl_dice": float(cl_dice.mean())}
        for key, value in report.items():
            engine.state.metrics[self.prefix + key] = value
        self.logger.info("vessels over %d images: Dice %.4f, clDice %.4f", len(records), *report.values())
        per_image = [{"name": n, "dice": d, "cl_dice": c} for n, d, c in records]
        _write_json(
            self.output_dir, self.metrics_file, {**report, "n_images": len(records), "per_image": per_image}
        )


class SegmentMetricsHandler(EpochAccumulator):
    """COCO AP of the segment instances, per-segment Dice and ARCADE-style F1 of an epoch (phase 2).

    Attach to the evaluator whose postprocessing leaves, per image, Mask R-CNN's ``masks_key``
    (K, 1, H, W), ``boxes_key`` (K, 4) xyxy, ``scores_key`` and ``pred_labels_key``, and the CASS label
    map under ``label_map_key`` (:class:`~common.postprocessing.angiography.CassLabelMapd`); the
    references ``instances_key`` (N, H, W) and ``labels_key`` (N,) come from the output or the batch.
    Published: ``bbox_AP``, ``bbox_AP50``, ``bbox_AP75``, ``segm_AP``, ``segm_AP50``, ``segm_AP75``,
    ``mean_segment_dice`` and ``mean_f1``; the report adds the figures of every segment.

    Args:
        category_names: names of labels 1, 2, ... (the 14 CASS segments).
        output_dir: folder of ``metrics_file``; ``None`` writes nothing.
        mask_threshold: predicted mask probabilities above it are in the instance mask.
        iou_threshold: mask IoU at which a predicted segment matches the reference (ARCADE-style F1).
        prefix: prefix of the names in ``engine.state.metrics``.
        metrics_file: name of the JSON report.
        logger_name: logger receiving the summary.
    """

    def __init__(
        self,
        category_names: Sequence[str] = CASS_CATEGORIES,
        output_dir: str | os.PathLike | None = None,
        mask_threshold: float = 0.5,
        iou_threshold: float = ARCADE_IOU_THRESHOLD,
        masks_key: str = "pred_masks",
        boxes_key: str = "pred_boxes",
        scores_key: str = "pred_scores",
        pred_labels_key: str = "pred_labels",
        label_map_key: str = "label_map",
        instances_key: str = "instances",
        labels_key: str = "labels",
        prefix: str = "",
        name_key: str = "name",
        image_key: str = "image",
        metrics_file: str = "segment_metrics.json",
        logger_name: str = __name__,
    ) -> None:
        self.category_names = list(category_names)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.mask_threshold, self.iou_threshold = mask_threshold, iou_threshold
        self.detection_keys = (masks_key, boxes_key, scores_key, pred_labels_key)
        self.label_map_key, self.instances_key, self.labels_key = label_map_key, instances_key, labels_key
        self.prefix, self.name_key, self.image_key = prefix, name_key, image_key
        self.metrics_file = metrics_file
        self.logger = logging.getLogger(logger_name)
        self._records: list[dict[str, Any]] = []

    def reset(self, engine: Engine | None = None) -> None:
        self._records = []

    def update(self, engine: Engine) -> None:
        """Encode the instances and score the label map of every image of the iteration."""
        n = len(self.category_names)
        keys = (*self.detection_keys, self.label_map_key, self.instances_key, self.labels_key)
        for sample in iteration_samples(engine):
            _require(sample, keys, type(self).__name__)
            name = sample_name(sample, self.name_key, self.image_key, position=len(self._records))
            instances, labels = sample[self.instances_key], sample[self.labels_key]
            record = encode_reference(name, instances, labels, n)
            detections = dict(
                zip(("masks", "boxes", "scores", "labels"), (sample[k] for k in self.detection_keys))
            )
            record["detections"] = encode_detections(name, detections, record["size"], n, self.mask_threshold)
            reference = reference_label_map(instances, labels)
            record["dice"], record["f1"] = image_segment_scores(
                sample[self.label_map_key], reference, n, self.iou_threshold, name
            )
            self._records.append(record)

    def complete(self, engine: Engine) -> None:
        """Gather all ranks' images, evaluate, publish, log and write the figures."""
        images = list(gather_by_name(self._records, lambda record: record["name"]).values())
        if not images:
            raise RuntimeError(f"{type(self).__name__}: the epoch produced no images to score.")
        results = evaluate_records(images, self.category_names)
        segments = summarize_segment_scores(
            np.array([r["dice"] for r in images]), np.array([r["f1"] for r in images]), self.category_names
        )
        results.update(segments, iou_threshold=self.iou_threshold)
        for key in (*COCO_KEYS, "mean_segment_dice", "mean_f1"):
            engine.state.metrics[self.prefix + key] = results[key]
        self.logger.info(
            "segments over %d images: segm AP %.4f, AP50 %.4f, AP75 %.4f, segment Dice %.4f, F1 %.4f\n%s",
            len(images), results["segm_AP"], results["segm_AP50"], results["segm_AP75"],
            results["mean_segment_dice"], results["mean_f1"], results["summary"],
        )  # fmt: skip
        _write_json(self.output_dir, self.metrics_file, results)
