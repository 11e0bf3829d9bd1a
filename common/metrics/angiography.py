"""Coronary angiography metrics: vessel overlap and centrelines (phase 1), artery segments (phase 2).

Computed on arrays (no Ignite), each the way its community reports it:

- **Vessel Dice** of binary vessel masks, per image (both empty scores 1).
- **clDice** (Shit et al., CVPR 2021): the harmonic mean of topology precision, the fraction of the
  predicted skeleton inside the reference mask, and topology sensitivity, the fraction of the
  reference skeleton inside the predicted mask. Skeletons are ``skimage.morphology.skeletonize``'s.
  Thin vessels barely move a Dice but break a centreline, which is what downstream QCA follows.
- **Per-segment Dice** of CASS label maps (0 background, 1-14 the segments): for each segment, the
  mean Dice over the images where it appears in the reference or the prediction (images where it
  is absent from both say nothing about it). ``mean_segment_dice`` averages the segments that
  appeared at all.
- **ARCADE-style F1.** ARCADE (MICCAI 2023) scores each image by an F1 and ranks by the mean over
  images. Our definition on label maps, where each segment is one instance: a segment present in
  both maps whose masks overlap with IoU >= 0.5 is a true positive, a predicted segment that is not
  is a false positive, a reference segment that is not is a false negative; F1 = 2TP / (2TP + FP + FN),
  and an image with no segment in either map scores 1.
- **COCO box and mask AP, AP50, AP75**, overall and per segment: :func:`segment_coco_metrics`
  (pycocotools through :mod:`common.metrics.cocoeval`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from skimage.morphology import skeletonize

from common.data.angiography import CASS_CATEGORIES
from common.errors import InputDataError
from common.metrics.lesion_segmentation import coco_instance_metrics, overlap_counts, overlap_scores
from common.utils import as_plane

__all__ = [
    "ARCADE_IOU_THRESHOLD",
    "cl_dice",
    "image_segment_scores",
    "segment_coco_metrics",
    "segment_scores",
    "summarize_segment_scores",
    "vessel_scores",
]

ARCADE_IOU_THRESHOLD = 0.5


def _pair(predicted: Any, reference: Any, name: str, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    predicted, reference = as_plane(predicted, "prediction", dtype), as_plane(reference, "reference", dtype)
    if predicted.shape != reference.shape:
        raise InputDataError(name, f"prediction is {predicted.shape} but reference is {reference.shape}")
    return predicted, reference


def cl_dice(predicted: Any, reference: Any, name: str = "image") -> float:
    """clDice of two binary (H, W) vessel masks; 1 when both are empty, 0 when only one is."""
    predicted, reference = _pair(predicted, reference, name, bool)
    if not predicted.any() and not reference.any():
        return 1.0
    if not predicted.any() or not reference.any():
        return 0.0
    skeleton_p, skeleton_r = skeletonize(predicted), skeletonize(reference)
    precision = (skeleton_p & reference).sum() / max(skeleton_p.sum(), 1)
    sensitivity = (skeleton_r & predicted).sum() / max(skeleton_r.sum(), 1)
    total = precision + sensitivity
    return float(2 * precision * sensitivity / total) if total else 0.0


def vessel_scores(predicted: Sequence[Any], reference: Sequence[Any]) -> dict[str, np.ndarray]:
    """Per-image ``dice`` and ``cl_dice`` of binary (H, W) vessel masks (images may differ in size)."""
    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} predicted masks for {len(reference)} reference masks.")
    pairs = [_pair(p, r, f"image {i}", bool) for i, (p, r) in enumerate(zip(predicted, reference))]
    counts = np.array([overlap_counts(p, r, "") for p, r in pairs], np.int64).reshape(-1, 3)
    return {
        "dice": overlap_scores(*counts.T)["dice"],
        "cl_dice": np.array([cl_dice(p, r) for p, r in pairs], np.float64),
    }


def image_segment_scores(
    predicted: Any,
    reference: Any,
    n_categories: int = len(CASS_CATEGORIES),
    iou_threshold: float = ARCADE_IOU_THRESHOLD,
    name: str = "image",
) -> tuple[np.ndarray, float]:
    """(C,) Dice of each segment (NaN where absent from both maps) and the ARCADE-style F1 of one image.

    Raises:
        InputDataError: the maps differ in size, or hold labels outside 0..C.
    """
    predicted, reference = _pair(predicted, reference, name, np.int64)
    for labels, what in ((predicted, "predicted"), (reference, "reference")):
        if labels.size and (labels.min() < 0 or labels.max() > n_categories):
            raise InputDataError(
                name, f"{what} labels must lie in 0..{n_categories}, found {labels.min()}..{labels.max()}"
            )
    dice = np.full(n_categories, np.nan)
    tp = fp = fn = 0
    for c in np.union1d(np.unique(predicted), np.unique(reference)):
        if c == 0:
            continue
        in_p, in_r = predicted == c, reference == c
        intersection, area_p, area_r = int((in_p & in_r).sum()), int(in_p.sum()), int(in_r.sum())
        dice[c - 1] = 2 * intersection / (area_p + area_r)
        matched = bool(area_p and area_r) and intersection / (area_p + area_r - intersection) >= iou_threshold
        tp += matched
        fp += bool(area_p) and not matched
        fn += bool(area_r) and not matched
    return dice, 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def summarize_segment_scores(
    dice: np.ndarray, f1: np.ndarray, category_names: Sequence[str] = CASS_CATEGORIES
) -> dict[str, Any]:
    """Dataset figures from per-image results of :func:`image_segment_scores`, (I, C) and (I,).

    Returns:
        ``segment_dice`` (name -> mean Dice over the images where the segment appears, NaN if never),
        ``segment_images`` (name -> that number of images), ``mean_segment_dice`` (mean over the
        segments that appeared, NaN if none) and ``mean_f1`` (mean over images, NaN without images).
    """
    dice = np.asarray(dice, np.float64).reshape(-1, len(category_names))
    seen = (~np.isnan(dice)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_segment = np.where(seen > 0, np.nansum(dice, axis=0) / seen, np.nan)
    return {
        "segment_dice": dict(zip(category_names, per_segment.tolist())),
        "segment_images": dict(zip(category_names, seen.tolist())),
        "mean_segment_dice": float(np.nanmean(per_segment)) if seen.any() else float("nan"),
        "mean_f1": float(np.mean(f1)) if len(f1) else float("nan"),
    }


def segment_scores(
    predicted: Sequence[Any],
    reference: Sequence[Any],
    category_names: Sequence[str] = CASS_CATEGORIES,
    iou_threshold: float = ARCADE_IOU_THRESHOLD,
) -> dict[str, Any]:
    """Per-segment Dice and ARCADE-style F1 of (H, W) label maps (0 background, 1..C segments).

    Returns :func:`summarize_segment_scores`'s figures and ``f1``, the per-image F1.
    """
    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} predicted label maps for {len(reference)} reference maps.")
    n = len(category_names)
    results = [
        image_segment_scores(p, r, n, iou_threshold, f"image {i}")
        for i, (p, r) in enumerate(zip(predicted, reference))
    ]
    dice = np.array([d for d, _ in results]).reshape(-1, n)
    f1 = np.array([f for _, f in results], np.float64)
    return {**summarize_segment_scores(dice, f1, category_names), "f1": f1}


def segment_coco_metrics(
    ground_truth: Sequence[Mapping[str, Any]],
    predictions: Sequence[Mapping[str, Any]],
    category_names: Sequence[str] = CASS_CATEGORIES,
    mask_threshold: float = 0.5,
) -> dict[str, Any]:
    """COCO box and mask AP, AP50, AP75 of the segment instances, overall and ``per_category``.

    The inputs are those of :func:`common.metrics.lesion_segmentation.coco_instance_metrics` (per
    image ``name``, reference ``instances``/``labels``; predicted ``masks``/``boxes``/``scores``/``labels``
    as Mask R-CNN returns them), with labels 1..14 the CASS segments.
    """
    return coco_instance_metrics(ground_truth, predictions, category_names, mask_threshold)
