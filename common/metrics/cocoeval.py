"""pycocotools' ``COCOeval`` on annotations held in memory, as the COCO benchmarks compute it."""

from __future__ import annotations

import contextlib
import io

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["in_memory_coco", "run_cocoeval"]


def in_memory_coco(images: list[dict], categories: list[dict], annotations: list[dict]) -> COCO:
    """A ``COCO`` index built from lists, with no JSON file."""
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    coco.createIndex()
    return coco


def run_cocoeval(
    images: list[dict],
    categories: list[dict],
    references: list[dict],
    detections: list[dict],
    iou_type: str,
    max_detections: int | None = None,
) -> tuple[COCOeval, str]:
    """Evaluate, accumulate and summarise; returns the evaluation and its printed summary.

    Both annotation sets are indexed directly, since ``COCO.loadRes`` cannot take an empty detection
    list; pycocotools' progress messages are dropped. ``max_detections`` replaces COCO's largest
    per-image detection limit (100).
    """
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = in_memory_coco(images, categories, references)
        coco_dt = in_memory_coco(images, categories, detections)
        evaluation = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if max_detections is not None:
            evaluation.params.maxDets = [1, 10, max_detections]
        evaluation.evaluate()
        evaluation.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluation.summarize()
    return evaluation, summary.getvalue().rstrip()
