"""COCO mAP of point detections scored as fixed-size boxes, and the detector's recall.

Cytology datasets annotate every cell with a box of one size (100x100 pixels), so a detection is a
centre and a class. Drawing the same fixed box around predicted and reference centres and running
pycocotools' ``COCOeval`` gives the mAP@[.5:.95] and mAP@.5 that the field reports, for the classified
detections and for class-agnostic detection. The detector's recall at one score threshold (greedy
matching at IoU 0.5) tells how many cells reach the classifier at all.

For two boxes of side ``s`` whose centres differ by (dx, dy), the overlap is
``max(0, s - |dx|) * max(0, s - |dy|)`` and IoU = overlap / (2 s^2 - overlap): IoU >= 0.5 needs the
centres within s/3 of each other along one axis, IoU 0.95 within about 2.6 % of ``s``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from monai.utils import convert_to_numpy

from common.metrics.cocoeval import run_cocoeval

__all__ = ["evaluate_point_detections", "fixed_box_iou"]

logger = logging.getLogger(__name__)


def fixed_box_iou(points_a: np.ndarray, points_b: np.ndarray, box_size: float) -> np.ndarray:
    """(N, K) IoU of ``box_size`` squares centred on (N, 2) and (K, 2) points."""
    points_a, points_b = np.asarray(points_a, np.float64), np.asarray(points_b, np.float64)
    delta = np.abs(points_a[:, None, :] - points_b[None, :, :])
    overlap = np.prod(np.clip(box_size - delta, 0, None), axis=-1)
    return overlap / (2 * box_size**2 - overlap)


def evaluate_point_detections(
    ground_truth: Sequence[Mapping[str, Any]],
    predictions: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    box_size: float = 100,
    score_threshold: float = 0.3,
    max_detections: int = 100,
) -> dict[str, Any]:
    """COCO metrics of classified point detections, class-agnostic metrics, and detector recall.

    Args:
        ground_truth: one dict per image: ``name`` (or ``image_id``), ``points`` (N, 2) as (x, y),
            ``labels`` (N,) class indices. Every evaluated image must be listed, even without cells.
        predictions: one dict per image with predictions: ``name`` (or ``image_id``), ``points``
            (K, 2), ``labels`` (K,), ``scores`` (K,). Images may be missing (no detections).
        class_names: names in class-index order.
        box_size: side of the square drawn around every point, in pixels.
        score_threshold: detections scoring at least this count for ``recall``/``precision``
            (COCO AP uses every detection, ranked by score).
        max_detections: COCO's per-image detection limit (``maxDets``): the top-scoring detections
            beyond it are ignored (at least 10). 100 is COCO's value; raise it for images with more cells.

    Returns:
        ``mAP``, ``mAP50`` (mean over classes present in the ground truth), ``agnostic_mAP``,
        ``agnostic_mAP50``, ``recall`` and ``precision`` at ``score_threshold`` (IoU 0.5, classes
        ignored), ``per_class`` (name -> ``AP``, ``AP50``, ``n_ground_truth``, ``n_predictions``;
        NaN AP for a class absent from the ground truth), counts, and ``summary``, the text of
        ``COCOeval.summarize`` for both evaluations.

    Raises:
        ValueError: duplicate image names, predictions for an image not in the ground truth,
            mismatched array lengths, or class indices outside ``class_names``.
    """
    if max_detections < 10:
        raise ValueError(f"max_detections must be >= 10, got {max_detections}.")
    n_classes = len(class_names)
    references = _references(ground_truth, n_classes)
    detections = _detections(predictions, references, n_classes)
    crowded = [key for key, (points, _) in references.items() if len(points) > max_detections]
    if crowded:
        logger.warning(
            "%d images have more than max_detections=%d reference cells (e.g. %s): their AP is capped, "
            "raise max_detections",
            len(crowded),
            max_detections,
            crowded[0],
        )

    classified, classified_summary = _coco_average_precision(
        references, detections, n_classes, box_size, max_detections
    )
    agnostic, agnostic_summary = _coco_average_precision(
        {key: (points, np.zeros_like(labels)) for key, (points, labels) in references.items()},
        {key: (pts, np.zeros_like(labels), scores) for key, (pts, labels, scores) in detections.items()},
        1,
        box_size,
        max_detections,
    )
    recall, precision = _recall_precision(references, detections, box_size, score_threshold)
    n_reference = _class_counts([labels for _, labels in references.values()], n_classes)
    n_predicted = _class_counts([labels for _, labels, _ in detections.values()], n_classes)
    return {
        "mAP": _nanmean(classified[:, 0]),
        "mAP50": _nanmean(classified[:, 1]),
        "agnostic_mAP": float(agnostic[0, 0]),
        "agnostic_mAP50": float(agnostic[0, 1]),
        "recall": recall,
        "precision": precision,
        "score_threshold": score_threshold,
        "box_size": box_size,
        "per_class": {
            name: {
                "AP": float(classified[i, 0]),
                "AP50": float(classified[i, 1]),
                "n_ground_truth": int(n_reference[i]),
                "n_predictions": int(n_predicted[i]),
            }
            for i, name in enumerate(class_names)
        },
        "n_images": len(references),
        "n_ground_truth": int(n_reference.sum()),
        "n_predictions": int(n_predicted.sum()),
        "summary": f"{n_classes}-class detection:\n{classified_summary}\n"
        f"class-agnostic detection:\n{agnostic_summary}",
    }


def _references(
    ground_truth: Sequence[Mapping[str, Any]], n_classes: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Image name -> (points, labels), checked."""
    references = {}
    for item in ground_truth:
        key = _image_key(item)
        if key in references:
            raise ValueError(f"image {key!r} appears twice in the ground truth.")
        references[key] = _points_and_labels(item, key, n_classes)
    return references


def _detections(
    predictions: Sequence[Mapping[str, Any]], references: Mapping[str, Any], n_classes: int
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Image name -> (points, labels, scores), checked against the reference images."""
    detections = {}
    for item in predictions:
        key = _image_key(item)
        if key not in references:
            raise ValueError(f"predictions for image {key!r}, which is not in the ground truth.")
        if key in detections:
            raise ValueError(f"image {key!r} appears twice in the predictions.")
        points, labels = _points_and_labels(item, key, n_classes)
        scores = convert_to_numpy(item.get("scores", ()), np.float64, wrap_sequence=True).reshape(-1)
        if len(scores) != len(points):
            raise ValueError(f"image {key!r}: {len(scores)} scores for {len(points)} points.")
        detections[key] = (points, labels, scores)
    return detections


def _coco_average_precision(
    references: Mapping[str, tuple[np.ndarray, np.ndarray]],
    detections: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    n_classes: int,
    box_size: float,
    max_detections: int,
) -> tuple[np.ndarray, str]:
    """Per-class (AP@[.5:.95], AP@.5) as an (n_classes, 2) array, NaN for classes without references,
    and the printed summary of ``COCOeval``."""
    image_ids = {key: i + 1 for i, key in enumerate(references)}
    categories = [{"id": c + 1, "name": str(c)} for c in range(n_classes)]
    images = [{"id": i} for i in image_ids.values()]

    def annotations(items: Mapping[str, tuple[np.ndarray, ...]]) -> list[dict[str, Any]]:
        """A box of ``box_size`` around every point; detections (which carry scores) keep their score."""
        anns: list[dict[str, Any]] = []
        for key, (points, labels, *scores) in items.items():
            corners = points - box_size / 2
            for j, ((x, y), label) in enumerate(zip(corners.tolist(), labels.tolist())):
                ann = {
                    "id": len(anns) + 1,
                    "image_id": image_ids[key],
                    "category_id": label + 1,
                    "bbox": [x, y, box_size, box_size],
                    "area": box_size**2,
                    "iscrowd": 0,
                }
                if scores:
                    ann["score"] = float(scores[0][j])
                anns.append(ann)
        return anns

    evaluation, summary = run_cocoeval(
        images, categories, annotations(references), annotations(detections), "bbox", max_detections
    )

    # precision: (IoU thresholds, recall thresholds, classes, area ranges, max dets), -1 = no references
    precision = evaluation.eval["precision"][:, :, :, evaluation.params.areaRngLbl.index("all"), -1]
    iou_50 = int(np.flatnonzero(np.isclose(evaluation.params.iouThrs, 0.5))[0])
    per_class = np.full((n_classes, 2), np.nan)
    for c in range(n_classes):
        values = precision[:, :, c]
        if (values > -1).all():
            per_class[c] = values.mean(), values[iou_50].mean()
    return per_class, summary


def _recall_precision(
    references: Mapping[str, tuple[np.ndarray, np.ndarray]],
    detections: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    box_size: float,
    score_threshold: float,
    iou_threshold: float = 0.5,
) -> tuple[float, float]:
    """Class-agnostic recall and precision of the detections scoring at least ``score_threshold``.

    Matching is greedy as in COCO: detections in decreasing score order each take the unmatched
    reference they overlap most, if the IoU reaches ``iou_threshold``.
    """
    matched = kept = 0
    for key, (ref_points, _) in references.items():
        points, _, scores = detections.get(key, (np.zeros((0, 2)), None, np.zeros(0)))
        order = np.argsort(-scores, kind="stable")
        order = order[scores[order] >= score_threshold]
        kept += len(order)
        if not len(order) or not len(ref_points):
            continue
        iou = fixed_box_iou(points[order], ref_points, box_size)
        iou[iou < iou_threshold] = -1
        for row in iou:
            best = int(np.argmax(row))
            if row[best] < 0:
                continue
            matched += 1
            iou[:, best] = -1  # each reference matches once
    n_reference = sum(len(points) for points, _ in references.values())
    recall = matched / n_reference if n_reference else math.nan
    precision = matched / kept if kept else math.nan
    return recall, precision


def _image_key(item: Mapping[str, Any]) -> str:
    key = item.get("name", item.get("image_id"))
    if key is None:
        raise ValueError(f"every image needs a 'name' or 'image_id'; got keys {sorted(item)}.")
    return str(key)


def _points_and_labels(item: Mapping[str, Any], key: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    points = convert_to_numpy(item.get("points", np.zeros((0, 2))), np.float64, wrap_sequence=True).reshape(-1, 2)
    labels = convert_to_numpy(item.get("labels", ()), np.int64, wrap_sequence=True).reshape(-1)
    if len(labels) != len(points):
        raise ValueError(f"image {key!r}: {len(labels)} labels for {len(points)} points.")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"image {key!r}: class indices must lie in 0..{n_classes - 1}, "
            f"found {labels.min()}..{labels.max()}."
        )
    if not np.isfinite(points).all():
        raise ValueError(f"image {key!r}: points contain NaN or infinite coordinates.")
    return points, labels


def _class_counts(labels: list[np.ndarray], n_classes: int) -> np.ndarray:
    return np.bincount(np.concatenate([np.zeros(0, np.int64), *labels]), minlength=n_classes)


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


