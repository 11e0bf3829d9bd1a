"""Semantic segmentation scores: IoU, Dice, frequency-weighted IoU and boundary IoU from one confusion matrix.

Classes follow the collection's tissue convention: ``num_classes`` tissue classes ``0..C-1``, the
background ``C`` and an ignore index (255) for pixels nobody labelled. Counts are pooled over the
dataset before dividing, as mmsegmentation and the WSSS histology papers do, so that a small image
does not weigh as much as a large one.

- IoU and Dice per class from the (C+1, C+1) confusion matrix (rows: reference, columns: prediction).
  A class absent from both the references and the predictions has no score (NaN) and is left out of
  ``mIoU``/``mDice``; the means run over the classes that appear (the mmseg convention).
- ``fwIoU`` weighs each class's IoU by its share of the reference pixels (Long et al. 2015).
- Boundary IoU (Cheng et al., CVPR 2021) restricts both masks of a class to the band of pixels within
  ``d`` pixels of their own contour (``d`` = ``boundary_ratio`` x the image diagonal, at least 1; the
  image edge counts as contour, as in the authors' code), and pools the band intersections and unions
  over images. Region IoU hardly notices a ragged outline on a large region; boundary IoU does.
- Reference pixels equal to ``ignore_index`` are left out everywhere. Predicted ``ignore_index``
  pixels (pseudo-masks mark uncertain pixels that way) count as missed by default, or are left out
  with ``ignored_predictions="exclude"`` to score only the labelled pixels; ``coverage`` reports the
  share of reference pixels that the prediction labels.
- ``include_background=False`` follows the LUAD-HistoSeg protocol (Han et al. 2022, and the code of
  the papers that report on it): reference background pixels are left out and the means run over the
  tissue classes only, so that the figures compare with published ones.

``python -m common.metrics.semantic_segmentation --pred-dir P --gt-dir G --num-classes 4 --output
report.json`` scores a folder of predicted masks (e.g. pseudo-masks) against reference masks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from common.data.histopathology import read_mask
from common.errors import InputDataError
from common.io.atomic import atomic_write
from common.utils import as_plane, nan_to_none

__all__ = [
    "IGNORED_PREDICTION_MODES",
    "SegmentationConfusion",
    "SegmentationCounts",
    "boundary_band",
    "evaluate_mask_pairs",
    "format_segmentation_report",
    "main",
    "pair_masks_by_stem",
]

IGNORED_PREDICTION_MODES = ("miss", "exclude")


@dataclass(frozen=True, eq=False)
class SegmentationCounts:
    """Pixel counts of one image or a whole dataset over K = C + 1 classes; counts add up.

    Attributes:
        confusion: (K, K) reference-by-prediction pixel counts of the scored pixels.
        missed: (K,) reference pixels of each class predicted as ``ignore_index``.
        boundary_intersection: (K,) pixels in both the reference and the predicted boundary band.
        boundary_union: (K,) pixels in either band.
        images: number of images counted.
    """

    confusion: np.ndarray
    missed: np.ndarray
    boundary_intersection: np.ndarray
    boundary_union: np.ndarray
    images: int = 1

    @classmethod
    def zeros(cls, num_labels: int) -> SegmentationCounts:
        vector = np.zeros(num_labels, np.int64)
        return cls(np.zeros((num_labels, num_labels), np.int64), vector, vector, vector, images=0)

    def __add__(self, other: SegmentationCounts) -> SegmentationCounts:
        return SegmentationCounts(
            self.confusion + other.confusion,
            self.missed + other.missed,
            self.boundary_intersection + other.boundary_intersection,
            self.boundary_union + other.boundary_union,
            self.images + other.images,
        )


def boundary_band(mask: np.ndarray, width: int) -> np.ndarray:
    """The pixels of a binary (H, W) ``mask`` within ``width`` pixels (chessboard distance) of its contour.

    Equivalent to ``mask & ~erode(mask, 3x3, width times)`` with zero padding, the definition of
    Cheng et al.'s reference code, so pixels along the image edge belong to the band. One distance
    transform instead of ``width`` erosions keeps wide bands on large images cheap.
    """
    if width < 1:
        raise ValueError(f"boundary width must be >= 1 pixel, got {width}")
    mask = np.asarray(mask, bool)
    if not mask.any():
        return mask
    distance = ndimage.distance_transform_cdt(np.pad(mask, 1), metric="chessboard")[1:-1, 1:-1]
    return mask & (distance <= width)


class SegmentationConfusion:
    """Accumulate the pixel counts of (prediction, reference) class maps and report the scores.

    Args:
        num_classes: number of tissue classes C; the background is class C, so K = C + 1 classes are
            scored.
        ignore_index: label of unlabelled pixels, outside ``0..C``.
        boundary_ratio: boundary band width as a fraction of the image diagonal (Cheng et al.: 0.02);
            at least 1 pixel.
        include_background: score the background class; ``False`` leaves reference background pixels
            out and the background out of the means (the LUAD-HistoSeg protocol).
        ignored_predictions: ``"miss"`` counts predicted ``ignore_index`` pixels as missed reference
            pixels; ``"exclude"`` leaves them out.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        boundary_ratio: float = 0.02,
        include_background: bool = True,
        ignored_predictions: str = "miss",
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index <= num_classes:
            raise ValueError(
                f"ignore_index {ignore_index} collides with the classes 0..{num_classes} "
                f"(background {num_classes})"
            )
        if not 0 < boundary_ratio < 1:
            raise ValueError(f"boundary_ratio must lie in (0, 1), got {boundary_ratio}")
        if ignored_predictions not in IGNORED_PREDICTION_MODES:
            raise ValueError(
                f"ignored_predictions must be one of {IGNORED_PREDICTION_MODES}, got {ignored_predictions!r}"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.boundary_ratio = boundary_ratio
        self.include_background = include_background
        self.ignored_predictions = ignored_predictions
        self.total = SegmentationCounts.zeros(num_classes + 1)

    @property
    def background_index(self) -> int:
        return self.num_classes

    def reset(self) -> None:
        self.total = SegmentationCounts.zeros(self.num_classes + 1)

    def update(
        self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor
    ) -> SegmentationCounts:
        """Add one image, (H, W) or (1, H, W) class maps; returns its own counts."""
        counts = self.counts(pred, target)
        self.add(counts)
        return counts

    def add(self, counts: SegmentationCounts) -> None:
        """Add counts computed earlier (e.g. gathered from other processes)."""
        if counts.confusion.shape != self.total.confusion.shape:
            raise ValueError(
                f"counts are over {counts.confusion.shape[0]} classes, "
                f"expected {self.total.confusion.shape[0]}"
            )
        self.total = self.total + counts

    def counts(
        self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor
    ) -> SegmentationCounts:
        """The counts of one image, without accumulating them."""
        pred, target = _class_map(pred, "pred"), _class_map(target, "target")
        if pred.shape != target.shape:
            raise ValueError(f"pred has shape {pred.shape} but target has shape {target.shape}")
        labels = self.num_classes + 1
        for name, values in (("pred", pred), ("target", target)):
            bad = np.unique(values[(values < 0) | ((values >= labels) & (values != self.ignore_index))])
            if bad.size:
                raise ValueError(
                    f"{name} has values {bad[:5].tolist()} outside 0..{self.num_classes} "
                    f"and {self.ignore_index}"
                )

        scored = target != self.ignore_index
        if not self.include_background:
            scored &= target != self.background_index
        unlabelled = pred == self.ignore_index
        missed = np.bincount(target[scored & unlabelled], minlength=labels)
        if self.ignored_predictions == "exclude":
            scored &= ~unlabelled
        labelled = scored & ~unlabelled
        confusion = np.bincount(
            target[labelled] * labels + pred[labelled], minlength=labels * labels
        ).reshape(labels, labels)

        height, width = target.shape
        band_width = max(1, round(self.boundary_ratio * math.hypot(height, width)))
        intersection, union = np.zeros(labels, np.int64), np.zeros(labels, np.int64)
        for label in range(labels):
            pred_band = boundary_band(pred == label, band_width) & scored
            target_band = boundary_band(target == label, band_width) & scored
            intersection[label] = np.count_nonzero(pred_band & target_band)
            union[label] = np.count_nonzero(pred_band | target_band)
        return SegmentationCounts(confusion.astype(np.int64), missed.astype(np.int64), intersection, union)

    def report(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Per-class and mean scores of everything added so far; NaN where a class has no pixels.

        Args:
            class_names: see :meth:`label_names`.
        """
        names = self.label_names(class_names)
        counts = self.total
        confusion = counts.confusion.astype(np.float64)
        intersection = np.diag(confusion)
        predicted = confusion.sum(axis=0)
        reference = confusion.sum(axis=1)
        if self.ignored_predictions == "miss":
            reference = reference + counts.missed
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = intersection / (reference + predicted - intersection)
            dice = 2 * intersection / (reference + predicted)
            boundary_iou = counts.boundary_intersection / counts.boundary_union.astype(np.float64)
        if not self.include_background:
            iou[-1] = dice[-1] = boundary_iou[-1] = math.nan

        total_reference = reference.sum()
        weighted = (reference > 0) & ~np.isnan(iou)
        fw_iou = (reference * iou)[weighted].sum() / total_reference if total_reference else math.nan
        labelled_reference = confusion.sum() + counts.missed.sum()
        coverage = 1 - counts.missed.sum() / labelled_reference if labelled_reference else math.nan
        per_class = {
            name: {
                "index": index,
                "iou": float(iou[index]),
                "dice": float(dice[index]),
                "boundary_iou": float(boundary_iou[index]),
                "reference_pixels": int(reference[index]),
                "predicted_pixels": int(predicted[index]),
                "intersection_pixels": int(intersection[index]),
            }
            for index, name in enumerate(names)
        }
        return {
            "mIoU": _nanmean(iou),
            "fwIoU": float(fw_iou),
            "mDice": _nanmean(dice),
            "mBoundaryIoU": _nanmean(boundary_iou),
            "pixel_accuracy": float(intersection.sum() / total_reference) if total_reference else math.nan,
            "coverage": float(coverage),
            "n_images": counts.images,
            "per_class": per_class,
            "class_names": names,
            "num_classes": self.num_classes,
            "background_index": self.background_index,
            "ignore_index": self.ignore_index,
            "include_background": self.include_background,
            "ignored_predictions": self.ignored_predictions,
            "boundary_ratio": self.boundary_ratio,
            "confusion_matrix": counts.confusion.tolist(),
        }

    def label_names(self, class_names: Sequence[str] | None = None) -> list[str]:
        """The names of the C + 1 labels: ``class_names`` (C, or C + 1 ending with the background's),
        completed with ``"background"``; default ``class_0``, ..., ``background``."""
        if class_names is None:
            return [f"class_{i}" for i in range(self.num_classes)] + ["background"]
        names = list(class_names)
        if len(names) == self.num_classes:
            names.append("background")
        if len(names) != self.num_classes + 1:
            raise ValueError(
                f"{len(class_names)} class names for {self.num_classes} tissue classes: give "
                f"{self.num_classes} names, or {self.num_classes + 1} ending with the background's"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"class names must be unique, got {names}")
        return names


def _class_map(value: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """An (H, W) int64 class map from an (H, W) or (1, H, W) array or tensor."""
    array = as_plane(value, f"{name} class map")
    if array.dtype.kind == "f":
        if not np.array_equal(array, np.round(array)):
            raise ValueError(f"{name} must hold class indices, got fractional values")
    elif array.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold class indices, got dtype {array.dtype}")
    return array.astype(np.int64)


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def format_segmentation_report(report: dict[str, Any]) -> str:
    """A fixed-width table of a :meth:`SegmentationConfusion.report`, for logs and the command line."""

    def cell(value: float) -> str:
        return f"{'-':>9}" if math.isnan(value) else f"{value:9.4f}"

    width = max(12, *(len(name) for name in report["per_class"]))
    lines = [
        (
            f"segmentation over {report['n_images']} images: mIoU {cell(report['mIoU']).strip()}, "
            f"fwIoU {cell(report['fwIoU']).strip()}, mDice {cell(report['mDice']).strip()}, "
            f"mBoundaryIoU {cell(report['mBoundaryIoU']).strip()}, pixel accuracy "
            f"{cell(report['pixel_accuracy']).strip()}, coverage {cell(report['coverage']).strip()}"
        ),
        f"{'class':<{width}} {'IoU':>9} {'Dice':>9} {'bIoU':>9} {'reference':>12} {'predicted':>12}",
    ]
    for name, scores in report["per_class"].items():
        lines.append(
            f"{name:<{width}} {cell(scores['iou'])} {cell(scores['dice'])} {cell(scores['boundary_iou'])} "
            f"{scores['reference_pixels']:12d} {scores['predicted_pixels']:12d}"
        )
    return "\n".join(lines)


def evaluate_mask_pairs(
    pairs: Iterable[tuple[str | os.PathLike, str | os.PathLike]],
    num_classes: int,
    class_names: Sequence[str] | None = None,
    **confusion_options: Any,
) -> dict[str, Any]:
    """Score mask files: ``pairs`` of (predicted mask, reference mask) paths read with
    :func:`common.data.histopathology.read_mask`; ``confusion_options`` go to :class:`SegmentationConfusion`.

    Raises:
        InputDataError: a mask is missing or unreadable, or a prediction and its reference differ in size.
    """
    confusion = SegmentationConfusion(num_classes, **confusion_options)
    for pred_path, target_path in pairs:
        pred, target = read_mask(pred_path, num_classes), read_mask(target_path, num_classes)
        if pred.shape != target.shape:
            raise InputDataError(
                pred_path,
                f"prediction is {pred.shape[0]}x{pred.shape[1]} but reference {target_path} is "
                f"{target.shape[0]}x{target.shape[1]}",
            )
        try:
            confusion.update(pred, target)
        except ValueError as err:  # labels outside 0..C and ignore_index
            raise InputDataError(pred_path, f"{err} (reference {target_path})") from err
    if confusion.total.images == 0:
        raise ValueError("no mask pairs to score")
    return confusion.report(class_names)


def pair_masks_by_stem(
    pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, suffix: str = ".png"
) -> list[tuple[Path, Path]]:
    """(prediction, reference) pairs: every ``*suffix`` reference in ``gt_dir`` with the prediction of
    the same stem in ``pred_dir``. Predictions without a reference are not scored.

    Raises:
        InputDataError: a folder is missing or holds no masks, or a reference has no prediction.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder in (pred_dir, gt_dir):
        if not folder.is_dir():
            raise InputDataError(folder, "folder does not exist")
    references = sorted(gt_dir.glob(f"*{suffix}"))
    if not references:
        raise InputDataError(gt_dir, f"no {suffix} reference masks")
    pairs = []
    for reference in references:
        prediction = pred_dir / reference.name
        if not prediction.is_file():
            raise InputDataError(reference, f"no prediction {prediction}")
        pairs.append((prediction, reference))
    return pairs


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: score a folder of predicted masks against reference masks."""
    parser = argparse.ArgumentParser(
        prog="python -m common.metrics.semantic_segmentation",
        description="Score predicted class masks (PNG) against reference masks of the same names.",
    )
    parser.add_argument("--pred-dir", required=True, help="folder of predicted masks (e.g. pseudo-masks)")
    parser.add_argument("--gt-dir", required=True, help="reference masks, each with a prediction of its name")
    parser.add_argument("--num-classes", type=int, required=True, help="tissue classes C (background is C)")
    parser.add_argument("--class-names", nargs="+", help="C names, or C + 1 ending with the background's")
    parser.add_argument("--ignore-index", type=int, default=255)
    parser.add_argument("--boundary-ratio", type=float, default=0.02, help="band width / image diagonal")
    parser.add_argument(
        "--exclude-background",
        action="store_true",
        help="leave reference background out (the LUAD-HistoSeg protocol)",
    )
    parser.add_argument(
        "--ignored-predictions", choices=IGNORED_PREDICTION_MODES, default="miss",
        help="predicted ignore pixels: count as missed, or leave out",
    )
    parser.add_argument("--output", help="JSON report to write")
    args = parser.parse_args(argv)
    try:
        report = evaluate_mask_pairs(
            pair_masks_by_stem(args.pred_dir, args.gt_dir),
            args.num_classes,
            args.class_names,
            ignore_index=args.ignore_index,
            boundary_ratio=args.boundary_ratio,
            include_background=not args.exclude_background,
            ignored_predictions=args.ignored_predictions,
        )
    except (InputDataError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    print(format_segmentation_report(report))
    if args.output:
        text = json.dumps(nan_to_none(report), indent=2) + "\n"
        print(atomic_write(args.output, lambda f: f.write(text.encode("utf-8"))))


if __name__ == "__main__":
    main()
