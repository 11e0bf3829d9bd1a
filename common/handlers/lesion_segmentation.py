"""COCO box/mask AP and the ISIC per-image lesion scores of an evaluation run, as an Ignite handler
(the maths is :mod:`common.metrics.lesion_segmentation`)."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
from ignite.engine import Engine

from common.handlers.samples import EpochAccumulator, gather_by_name, iteration_samples, sample_name
from common.io.atomic import atomic_write
from common.metrics.lesion_segmentation import (
    COCO_KEYS,
    ISIC_JACCARD_THRESHOLD,
    PER_IMAGE_FIELDS,
    encode_detections,
    encode_reference,
    evaluate_records,
    overlap_counts,
    overlap_scores,
)
from common.utils import nan_to_none

__all__ = ["LesionSegmentationEvaluationHandler"]


class LesionSegmentationEvaluationHandler(EpochAccumulator):
    """Score an evaluation run with COCO box/mask AP and the ISIC per-image lesion scores.

    Attach to the evaluator whose postprocessing puts, per image, the instance predictions under
    ``masks_key`` (K, 1, H, W) probabilities, ``boxes_key`` (K, 4) xyxy, ``scores_key`` and
    ``pred_labels_key``, and the final binary lesion mask under ``lesion_mask_key`` (1, H, W); the
    references ``instances_key`` (N, H, W) and ``labels_key`` (N,) come from the output or the batch.
    Each iteration's masks are encoded as RLEs at once, so memory grows with the lesions, not the
    pixels. At the end of the epoch ``bbox_AP``, ``bbox_AP50``, ``bbox_AP75``, ``segm_AP``,
    ``segm_AP50``, ``segm_AP75``, ``jaccard``, ``dice`` and ``thresholded_jaccard`` go into
    ``engine.state.metrics``, a summary is logged, and with ``output_dir`` ``metrics_file`` (JSON) and
    ``per_image_file`` (CSV) are written atomically. Under DDP every rank's images are gathered (an
    image met twice, as DistributedSampler pads, counts once) and rank 0 writes.

    Args:
        category_names: names of categories 1, 2, ...
        output_dir: folder of the written files; ``None`` writes nothing.
        mask_threshold: predicted mask probabilities above it are in the instance mask.
        jaccard_threshold: Jaccard below which an image's ``thresholded_jaccard`` is 0 (ISIC: 0.65).
        masks_key, boxes_key, scores_key, pred_labels_key: keys of the instance predictions.
        lesion_mask_key: key of the post-processed binary lesion mask.
        instances_key, labels_key: keys of the reference instance masks and their labels.
        name_key: key of the image name; without it the ``filename_or_obj`` of ``image_key``'s
            metadata, else the position on the rank.
        image_key: key of the image MetaTensor.
        metrics_file, per_image_file: names of the written files.
        logger_name: logger receiving the summary.
    """

    def __init__(
        self,
        category_names: Sequence[str] = ("lesion",),
        output_dir: str | os.PathLike | None = None,
        mask_threshold: float = 0.5,
        jaccard_threshold: float = ISIC_JACCARD_THRESHOLD,
        masks_key: str = "pred_masks",
        boxes_key: str = "pred_boxes",
        scores_key: str = "pred_scores",
        pred_labels_key: str = "pred_labels",
        lesion_mask_key: str = "lesion_mask",
        instances_key: str = "instances",
        labels_key: str = "labels",
        name_key: str = "name",
        image_key: str = "image",
        metrics_file: str = "lesion_metrics.json",
        per_image_file: str = "per_image.csv",
        logger_name: str = __name__,
    ) -> None:
        self.category_names = list(category_names)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.mask_threshold = mask_threshold
        self.jaccard_threshold = jaccard_threshold
        self.masks_key, self.boxes_key, self.scores_key = masks_key, boxes_key, scores_key
        self.pred_labels_key, self.lesion_mask_key = pred_labels_key, lesion_mask_key
        self.instances_key, self.labels_key = instances_key, labels_key
        self.name_key, self.image_key = name_key, image_key
        self.metrics_file, self.per_image_file = metrics_file, per_image_file
        self.logger = logging.getLogger(logger_name)
        self._records: list[dict[str, Any]] = []

    def reset(self, engine: Engine | None = None) -> None:
        self._records = []

    def update(self, engine: Engine) -> None:
        """Encode the predictions and references of every image of the iteration."""
        keys = (
            self.masks_key, self.boxes_key, self.scores_key, self.pred_labels_key,
            self.lesion_mask_key, self.instances_key, self.labels_key,
        )
        for sample in iteration_samples(engine):
            missing = [key for key in keys if key not in sample]
            if missing:
                raise KeyError(
                    f"LesionSegmentationEvaluationHandler: no {missing} in the engine output or batch; "
                    f"found {sorted(sample)}"
                )
            name = self._name(sample)
            n_categories = len(self.category_names)
            references = sample[self.instances_key]
            record = encode_reference(name, references, sample[self.labels_key], n_categories)
            detections = {
                "masks": sample[self.masks_key],
                "boxes": sample[self.boxes_key],
                "scores": sample[self.scores_key],
                "labels": sample[self.pred_labels_key],
            }
            record["detections"] = encode_detections(
                name, detections, record["size"], n_categories, self.mask_threshold
            )
            record["counts"] = overlap_counts(sample[self.lesion_mask_key], references, name)
            self._records.append(record)

    def _name(self, sample: Mapping[str, Any]) -> str:
        return sample_name(sample, self.name_key, self.image_key, position=len(self._records))

    def complete(self, engine: Engine) -> None:
        """Gather all ranks' images, evaluate, publish, log and write the figures."""
        images = list(gather_by_name(self._records, lambda record: record["name"]).values())
        if not images:
            raise RuntimeError("LesionSegmentationEvaluationHandler: the epoch produced no images to score.")
        results = evaluate_records(images, self.category_names)
        counts = np.array([record["counts"] for record in images], np.int64)
        per_image = overlap_scores(*counts.T, threshold=self.jaccard_threshold)
        for field in PER_IMAGE_FIELDS:
            results[field] = float(per_image[field].mean())
        results["jaccard_threshold"] = self.jaccard_threshold

        for key in (*COCO_KEYS, *PER_IMAGE_FIELDS):
            engine.state.metrics[key] = results[key]
        self.logger.info(
            "lesion segmentation over %d images: jaccard %.4f, dice %.4f, thresholded jaccard %.4f, "
            "bbox AP %.4f, segm AP %.4f, segm AP50 %.4f\n%s",
            len(images), results["jaccard"], results["dice"], results["thresholded_jaccard"],
            results["bbox_AP"], results["segm_AP"], results["segm_AP50"], results["summary"],
        )
        if self.output_dir is not None and idist.get_rank() == 0:
            text = json.dumps(nan_to_none(results), indent=2) + "\n"
            atomic_write(self.output_dir / self.metrics_file, lambda f: f.write(text.encode("utf-8")))
            table = _per_image_table(images, counts, per_image)
            atomic_write(self.output_dir / self.per_image_file, lambda f: f.write(table.encode("utf-8")))


def _per_image_table(images: list[dict[str, Any]], counts: np.ndarray, scores: dict[str, np.ndarray]) -> str:
    """CSV text: one row per image with its scores, pixel counts and lesion counts."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(
        ["name", *PER_IMAGE_FIELDS, "predicted_pixels", "reference_pixels", "n_detections", "n_references"]
    )
    for i, record in enumerate(images):
        writer.writerow(
            [
                record["name"],
                *(f"{scores[field][i]:.6f}" for field in PER_IMAGE_FIELDS),
                int(counts[i, 1]),
                int(counts[i, 2]),
                len(record["detections"]),
                len(record["references"]),
            ]
        )
    return text.getvalue()
