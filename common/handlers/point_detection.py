"""COCO mAP and recall of a detect-and-classify evaluation run, as an Ignite handler (the maths is
:mod:`common.metrics.coco_points`)."""

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

from common.handlers.samples import EpochAccumulator, gather_by_name, iteration_samples, sample_name
from common.io.atomic import atomic_write
from common.metrics.coco_points import evaluate_point_detections
from common.utils import nan_to_none

__all__ = ["CocoPointsEvaluationHandler"]


class CocoPointsEvaluationHandler(EpochAccumulator):
    """Score a detect-and-classify evaluation run with :func:`evaluate_point_detections`.

    Attach to the evaluator whose postprocessing puts, per image, the detections under ``points_key``
    (K, 2), ``scores_key`` (K,) and ``classes_key`` (K,), and whose data carry the reference
    ``boxes_key`` (N, 4 xyxy; their centres are the reference points) and ``labels_key`` (N,), in the
    output or the batch. At the end of the epoch ``mAP``, ``mAP50``, ``agnostic_mAP``,
    ``agnostic_mAP50`` and ``recall`` go into ``engine.state.metrics``, the COCO summary is logged, and
    with ``output_dir`` ``summary_file`` is written atomically. Under DDP the images of all ranks are
    gathered (an image met twice is counted once) and rank 0 writes.

    Args:
        class_names: names in class-index order.
        output_dir: folder of ``summary_file``; ``None`` writes nothing.
        box_size: side of the fixed box drawn around every point.
        score_threshold: minimum score of the detections counted in ``recall``.
        max_detections: COCO's per-image detection limit.
        points_key, scores_key, classes_key: keys of the detections.
        boxes_key, labels_key: keys of the reference boxes and class indices.
        name_key: key of the image name; without it, the ``filename_or_obj`` of ``image_key``'s
            metadata, else the position on the rank.
        image_key: key of the image MetaTensor.
        summary_file: JSON file name.
        logger_name: logger receiving the summary.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        output_dir: str | os.PathLike | None = None,
        box_size: float = 100,
        score_threshold: float = 0.3,
        max_detections: int = 100,
        points_key: str = "points",
        scores_key: str = "scores",
        classes_key: str = "classes",
        boxes_key: str = "boxes",
        labels_key: str = "labels",
        name_key: str = "name",
        image_key: str = "image",
        summary_file: str = "detection_metrics.json",
        logger_name: str = __name__,
    ) -> None:
        self.class_names = list(class_names)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.box_size = box_size
        self.score_threshold = score_threshold
        self.max_detections = max_detections
        self.points_key, self.scores_key, self.classes_key = points_key, scores_key, classes_key
        self.boxes_key, self.labels_key = boxes_key, labels_key
        self.name_key, self.image_key = name_key, image_key
        self.summary_file = summary_file
        self.logger = logging.getLogger(logger_name)
        self._ground_truth: list[dict[str, Any]] = []
        self._predictions: list[dict[str, Any]] = []

    def reset(self, engine: Engine | None = None) -> None:
        self._ground_truth, self._predictions = [], []

    def update(self, engine: Engine) -> None:
        """Keep the detections and references of every image of the iteration, as NumPy arrays."""
        for sample in iteration_samples(engine):
            keys = (self.points_key, self.scores_key, self.classes_key, self.boxes_key, self.labels_key)
            missing = [k for k in keys if k not in sample]
            if missing:
                raise KeyError(
                    f"CocoPointsEvaluationHandler: no {missing} in the engine output or batch; "
                    f"found {list(sample)}"
                )
            name = self._name(sample)
            boxes = convert_to_numpy(sample[self.boxes_key], np.float64, wrap_sequence=True).reshape(-1, 4)
            points = convert_to_numpy(sample[self.points_key], np.float64, wrap_sequence=True)
            scores = convert_to_numpy(sample[self.scores_key], np.float64, wrap_sequence=True)
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            labels = self._labels(sample, self.labels_key)
            self._ground_truth.append({"name": name, "points": centres, "labels": labels})
            self._predictions.append(
                {
                    "name": name,
                    "points": points.reshape(-1, 2),
                    "labels": self._labels(sample, self.classes_key),
                    "scores": scores.reshape(-1),
                }
            )

    @staticmethod
    def _labels(sample: Mapping[str, Any], key: str) -> np.ndarray:
        return convert_to_numpy(sample[key], np.int64, wrap_sequence=True).reshape(-1)

    def _name(self, sample: Mapping[str, Any]) -> str:
        return sample_name(sample, self.name_key, self.image_key, position=len(self._ground_truth))

    def complete(self, engine: Engine) -> None:
        """Gather all ranks' images, evaluate, publish, log and write the figures."""
        ground_truth = gather_by_name(self._ground_truth, lambda record: record["name"])
        predictions = gather_by_name(self._predictions, lambda record: record["name"])
        results = evaluate_point_detections(
            list(ground_truth.values()),
            list(predictions.values()),
            self.class_names,
            box_size=self.box_size,
            score_threshold=self.score_threshold,
            max_detections=self.max_detections,
        )
        for name in ("mAP", "mAP50", "agnostic_mAP", "agnostic_mAP50", "recall"):
            engine.state.metrics[name] = results[name]
        self.logger.info(
            "detection over %d images: mAP %.4f, mAP50 %.4f, agnostic mAP %.4f, agnostic mAP50 %.4f, "
            "recall %.4f at score >= %g\n%s",
            results["n_images"], results["mAP"], results["mAP50"], results["agnostic_mAP"],
            results["agnostic_mAP50"], results["recall"], self.score_threshold, results["summary"],
        )
        if self.output_dir is not None and idist.get_rank() == 0:
            text = json.dumps(nan_to_none(results), indent=2) + "\n"
            atomic_write(self.output_dir / self.summary_file, lambda f: f.write(text.encode("utf-8")))
