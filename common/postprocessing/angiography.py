"""Mask R-CNN detections to one CASS label map per angiogram (0 background, 1-14 the segments).

An angiogram shows each artery segment at most once, while a detector may return several scored
masks of one segment and masks of different segments that overlap where vessels cross or meet.
:func:`cass_label_map` keeps the highest-scoring instance of each segment and paints the kept ones
from the least to the most confident, so that a pixel claimed by two segments goes to the higher
score. :class:`CassLabelMapd` does it in a bundle's postprocessing.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, convert_to_numpy

__all__ = ["CassLabelMapd", "cass_label_map", "select_segments"]


def select_segments(scores: Any, labels: Any, score_threshold: float = 0.0) -> np.ndarray:
    """Indices of the highest-scoring detection of each label among those scoring >= ``score_threshold``,
    ordered from the lowest to the highest score (the painting order)."""
    scores = convert_to_numpy(scores, wrap_sequence=True).astype(np.float64).reshape(-1)
    labels = convert_to_numpy(labels, wrap_sequence=True).astype(np.int64).reshape(-1)
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    best: dict[int, int] = {}
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] >= score_threshold:
            best.setdefault(int(labels[i]), int(i))
    return np.array(sorted(best.values(), key=lambda i: scores[i]), np.int64)


def cass_label_map(
    masks: Any, scores: Any, labels: Any, score_threshold: float = 0.0, mask_threshold: float = 0.5
) -> np.ndarray:
    """(H, W) uint8 label map from K soft masks (K, H, W) or (K, 1, H, W) with scores and labels (K,).

    Args:
        masks: Mask R-CNN's soft masks in [0, 1], or binary masks.
        scores: confidences; the best of each label is kept, overlaps go to the higher score.
        labels: segment ids 1..14 (torchvision's convention, 0 being background).
        score_threshold: detections below it are ignored.
        mask_threshold: soft-mask value above which a pixel belongs to the segment.
    """
    masks = convert_to_numpy(masks, wrap_sequence=True)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must be (K, H, W) or (K, 1, H, W), got shape {masks.shape}")
    labels = convert_to_numpy(labels, wrap_sequence=True).astype(np.int64).reshape(-1)
    if len(labels) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(labels)} labels")
    if len(labels) and (labels.min() < 1 or labels.max() > 255):
        raise ValueError(f"labels must lie in 1..255, found {labels.min()}..{labels.max()}")
    label_map = np.zeros(masks.shape[1:], np.uint8)
    for i in select_segments(scores, labels, score_threshold):
        label_map[masks[i] > mask_threshold] = labels[i]
    return label_map


class CassLabelMapd(MapTransform):
    """A (1, H, W) uint8 CASS label map from a detector's masks, scores and labels.

    Args:
        keys: the soft masks (K, 1, H, W), scores (K,) and labels (K,), in that order.
        output_key: where to write the label map.
        score_threshold, mask_threshold: see :func:`cass_label_map`.
        meta_key: optional key of a MetaTensor (e.g. the image) whose metadata the map takes, so MONAI
            writers name the output after the input file.
    """

    def __init__(
        self,
        keys: tuple[str, str, str] = ("pred_masks", "pred_scores", "pred_labels"),
        output_key: str = "label_map",
        score_threshold: float = 0.0,
        mask_threshold: float = 0.5,
        meta_key: str | None = None,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 3:
            raise ValueError(f"keys must name the masks, scores and labels, got {self.keys}")
        self.output_key = output_key
        self.score_threshold = score_threshold
        self.mask_threshold = mask_threshold
        self.meta_key = meta_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        masks, scores, labels = (d[k] for k in self.keys)
        label_map = torch.from_numpy(
            cass_label_map(masks, scores, labels, self.score_threshold, self.mask_threshold)
        )
        out = label_map[None]
        reference = None if self.meta_key is None else d[self.meta_key]
        if isinstance(reference, torch.Tensor):
            out = convert_to_dst_type(out, reference, dtype=torch.uint8)[0]
        d[self.output_key] = out
        return d
