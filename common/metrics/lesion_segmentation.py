"""Lesion segmentation metrics: COCO box and mask AP of instance predictions, ISIC per-image overlap.

Two views of the same predictions, each computed the way its field reports it:

- COCO AP (pycocotools' ``COCOeval``, ``bbox`` and ``segm``) of the detected lesion instances, so that a
  Mask R-CNN compares with published detection figures.
- The ISIC 2018 Task 1 scores of the lesion area: per image, the union of the predicted lesion masks
  against the union of the reference masks gives the Jaccard index, the Dice coefficient and the
  thresholded Jaccard (a Jaccard below 0.65 counts as 0, because ISIC judged such a segmentation to need
  manual correction). Dataset figures are means over images. An image where prediction and reference
  are both empty scores 1 (nothing to find, nothing found); an empty reference with a non-empty
  prediction scores 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from monai.utils import convert_to_numpy
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from common.errors import InputDataError
from common.metrics.cocoeval import run_cocoeval

__all__ = [
    "COCO_KEYS",
    "ISIC_JACCARD_THRESHOLD",
    "PER_IMAGE_FIELDS",
    "coco_instance_metrics",
    "encode_detections",
    "encode_reference",
    "evaluate_records",
    "lesion_overlap_scores",
    "overlap_counts",
    "overlap_scores",
]

ISIC_JACCARD_THRESHOLD = 0.65
_COCO_FIGURES = {"AP": 0, "AP50": 1, "AP75": 2}  # positions in COCOeval.stats
COCO_KEYS = tuple(f"{iou_type}_{figure}" for iou_type in ("bbox", "segm") for figure in _COCO_FIGURES)
PER_IMAGE_FIELDS = ("jaccard", "dice", "thresholded_jaccard")


def overlap_scores(
    intersection: np.ndarray,
    predicted_area: np.ndarray,
    reference_area: np.ndarray,
    threshold: float = ISIC_JACCARD_THRESHOLD,
) -> dict[str, np.ndarray]:
    """Per-image ``jaccard``, ``dice`` and ``thresholded_jaccard`` from pixel counts, vectorised.

    Both empty scores 1 (the division would be 0/0); an empty reference with a non-empty prediction
    scores 0, as the formulas give.
    """
    intersection = np.asarray(intersection, np.float64)
    total = np.asarray(predicted_area, np.float64) + np.asarray(reference_area, np.float64)
    union = total - intersection
    empty = total == 0
    jaccard = np.where(empty, 1.0, intersection / np.where(empty, 1.0, union))
    dice = np.where(empty, 1.0, 2 * intersection / np.where(empty, 1.0, total))
    return {
        "jaccard": jaccard,
        "dice": dice,
        "thresholded_jaccard": np.where(jaccard < threshold, 0.0, jaccard),
    }


def lesion_overlap_scores(
    predicted: Sequence[Any],
    reference: Sequence[Any],
    threshold: float = ISIC_JACCARD_THRESHOLD,
) -> dict[str, np.ndarray]:
    """ISIC per-image scores of binary lesion masks (see :func:`overlap_scores`).

    Args:
        predicted, reference: one mask per image, (H, W) or a stack (N, H, W) whose union is the lesion
            area (a (1, H, W) channel-first mask is such a stack). Images may differ in size.
        threshold: Jaccard below which ``thresholded_jaccard`` is 0.

    Raises:
        ValueError: different numbers of images, or a prediction and reference of different sizes.
    """
    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} predicted masks for {len(reference)} reference masks.")
    counts = np.array(
        [overlap_counts(p, r, f"image {i}") for i, (p, r) in enumerate(zip(predicted, reference))],
        np.int64,
    ).reshape(-1, 3)
    return overlap_scores(*counts.T, threshold=threshold)


def overlap_counts(predicted: Any, reference: Any, name: str) -> tuple[int, int, int]:
    """(intersection, predicted area, reference area) in pixels of two lesion masks."""
    predicted, reference = _union(predicted), _union(reference)
    if predicted.shape != reference.shape:
        raise InputDataError(name, f"predicted mask is {predicted.shape} but reference is {reference.shape}")
    return int((predicted & reference).sum()), int(predicted.sum()), int(reference.sum())


def _union(mask: Any) -> np.ndarray:
    mask = convert_to_numpy(mask, wrap_sequence=True).astype(bool)
    return mask.any(axis=0) if mask.ndim == 3 else mask


def coco_instance_metrics(
    ground_truth: Sequence[Mapping[str, Any]],
    predictions: Sequence[Mapping[str, Any]],
    category_names: Sequence[str] = ("lesion",),
    mask_threshold: float = 0.5,
) -> dict[str, Any]:
    """COCO AP@[.5:.95], AP@.5 and AP@.75 of predicted instance boxes and masks.

    Args:
        ground_truth: one dict per evaluated image (images without lesions included): ``name``,
            ``instances`` (N, H, W) binary masks, ``labels`` (N,) category indices from 1
            (torchvision's convention: 0 is background).
        predictions: one dict per image with predictions (missing images have none): ``name``,
            ``masks`` (K, H, W) or (K, 1, H, W) binary masks or probabilities, ``boxes`` (K, 4) xyxy in
            pixels, ``scores`` (K,), ``labels`` (K,).
        category_names: names of categories 1, 2, ...
        mask_threshold: probabilities above it are in the mask.

    Returns:
        ``bbox_AP``, ``bbox_AP50``, ``bbox_AP75``, ``segm_AP``, ``segm_AP50``, ``segm_AP75`` (NaN without
        any reference lesion), with several categories ``per_category`` (name -> the same six figures),
        counts, and ``summary``, the text ``COCOeval.summarize`` prints.

    Raises:
        InputDataError: duplicate names, predictions for an unknown image, masks of the wrong size,
            array lengths that disagree, or labels outside ``1..len(category_names)``.
    """
    images: dict[str, dict[str, Any]] = {}
    for item in ground_truth:
        name = _name_of(item)
        if name in images:
            raise InputDataError(name, "image appears twice in the ground truth")
        images[name] = encode_reference(name, item["instances"], item["labels"], len(category_names))
    predicted: set[str] = set()
    for item in predictions:
        name = _name_of(item)
        if name not in images:
            raise InputDataError(name, "predictions for an image that is not in the ground truth")
        if name in predicted:
            raise InputDataError(name, "image appears twice in the predictions")
        predicted.add(name)
        images[name]["detections"] = encode_detections(
            name, item, images[name]["size"], len(category_names), mask_threshold
        )
    return evaluate_records(list(images.values()), list(category_names))


def _name_of(item: Mapping[str, Any]) -> str:
    if "name" not in item:
        raise InputDataError(None, f"every image needs a 'name'; got keys {sorted(item)}")
    return str(item["name"])


def encode_reference(name: str, instances: Any, labels: Any, n_categories: int) -> dict[str, Any]:
    """An image record: its size, and its reference lesions as RLEs (compact enough to gather)."""
    instances = convert_to_numpy(instances, wrap_sequence=True)
    if instances.ndim != 3:
        raise InputDataError(name, f"reference instances must be (N, H, W), got shape {instances.shape}")
    labels = _labels(name, labels, len(instances), n_categories, "reference")
    return {
        "name": name,
        "size": instances.shape[1:],
        "references": [(_rle(mask), int(label)) for mask, label in zip(instances, labels)],
        "detections": [],
    }


def encode_detections(
    name: str, item: Mapping[str, Any], size: tuple[int, int], n_categories: int, mask_threshold: float
) -> list[tuple[dict[str, Any], list[float], float, int]]:
    """(mask RLE, xywh box, score, label) of every detection of an image."""
    masks = convert_to_numpy(item["masks"], wrap_sequence=True)
    masks = masks.reshape(-1, *masks.shape[-2:]) if masks.ndim == 4 else masks
    if masks.ndim != 3 or masks.shape[1:] != tuple(size):
        raise InputDataError(
            name, f"predicted masks of shape {masks.shape} for an image of size {tuple(size)}"
        )
    binary = masks if masks.dtype == bool else masks > mask_threshold
    boxes = convert_to_numpy(item["boxes"], wrap_sequence=True).astype(np.float64).reshape(-1, 4)
    scores = convert_to_numpy(item["scores"], wrap_sequence=True).astype(np.float64).reshape(-1)
    labels = _labels(name, item["labels"], len(masks), n_categories, "predicted")
    if not len(boxes) == len(scores) == len(masks):
        raise InputDataError(name, f"{len(masks)} masks, {len(boxes)} boxes and {len(scores)} scores")
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    return [
        (_rle(mask), box, float(score), int(label))
        for mask, box, score, label in zip(binary, xywh.tolist(), scores, labels)
    ]


def _labels(name: str, labels: Any, count: int, n_categories: int, what: str) -> np.ndarray:
    labels = convert_to_numpy(labels, wrap_sequence=True).astype(np.int64).reshape(-1)
    if len(labels) != count:
        raise InputDataError(name, f"{len(labels)} {what} labels for {count} masks")
    if len(labels) and (labels.min() < 1 or labels.max() > n_categories):
        raise InputDataError(
            name, f"{what} labels must lie in 1..{n_categories}, found {labels.min()}..{labels.max()}"
        )
    return labels


def _rle(mask: np.ndarray) -> dict[str, Any]:
    return mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))


def evaluate_records(images: list[dict[str, Any]], category_names: list[str]) -> dict[str, Any]:
    """COCO box and mask figures of encoded image records."""
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(category_names)]
    image_entries = [
        {"id": i + 1, "height": int(record["size"][0]), "width": int(record["size"][1])}
        for i, record in enumerate(images)
    ]
    references, detections = [], {"bbox": [], "segm": []}
    for image_id, record in enumerate(images, start=1):
        for rle, label in record["references"]:
            references.append(
                {
                    "id": len(references) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
        for rle, box, score, label in record["detections"]:
            common = {"image_id": image_id, "category_id": label, "score": score, "iscrowd": 0}
            # each iouType ranks detections by its own area (COCO.loadRes does the same)
            detections["bbox"].append({**common, "bbox": box, "area": box[2] * box[3]})
            detections["segm"].append(
                {**common, "segmentation": rle, "bbox": box, "area": float(mask_utils.area(rle))}
            )

    results: dict[str, Any] = {}
    per_category: dict[str, dict[str, float]] = {name: {} for name in category_names}
    summaries = []
    for iou_type in ("bbox", "segm"):
        for i, ann in enumerate(detections[iou_type], start=1):
            ann["id"] = i
        evaluation, summary = run_cocoeval(
            image_entries, categories, references, detections[iou_type], iou_type
        )
        summaries.append(f"{iou_type}:\n{summary}")
        for figure, position in _COCO_FIGURES.items():
            results[f"{iou_type}_{figure}"] = _missing_as_nan(float(evaluation.stats[position]))
        for c, name in enumerate(category_names):
            per_category[name].update(_category_figures(evaluation, c, iou_type))
    if len(category_names) > 1:
        results["per_category"] = per_category
    results["n_images"] = len(images)
    results["n_references"] = len(references)
    results["n_detections"] = len(detections["segm"])
    results["summary"] = "\n".join(summaries)
    return results


def _category_figures(evaluation: COCOeval, category: int, iou_type: str) -> dict[str, float]:
    """AP, AP50 and AP75 of one category, NaN when it has no reference lesion."""
    # precision: (IoU thresholds, recall thresholds, categories, area ranges, max detections); -1 = none
    params = evaluation.params
    precision = evaluation.eval["precision"][:, :, category, params.areaRngLbl.index("all"), -1]
    if not (precision > -1).all():
        return {f"{iou_type}_{figure}": math.nan for figure in _COCO_FIGURES}
    at = {iou: int(np.flatnonzero(np.isclose(params.iouThrs, iou))[0]) for iou in (0.5, 0.75)}
    return {
        f"{iou_type}_AP": float(precision.mean()),
        f"{iou_type}_AP50": float(precision[at[0.5]].mean()),
        f"{iou_type}_AP75": float(precision[at[0.75]].mean()),
    }


def _missing_as_nan(value: float) -> float:
    return math.nan if value < 0 else value  # COCOeval reports -1 when there is nothing to score


