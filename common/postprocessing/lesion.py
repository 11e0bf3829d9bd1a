"""Mask R-CNN detections to one binary lesion mask per dermoscopy image (written by
:mod:`common.writers.lesion`).

Lesion segmentation is scored (ISIC task 1: Jaccard, Dice) on one binary mask per image, while a
detector returns K scored soft masks. :func:`select_lesions` chooses among them (the best one, or
the union of the confident ones), :func:`clean_lesion_mask` fills holes and smooths the jagged
outline that a 28x28 mask head leaves after upsampling, and :class:`LesionMaskd` chains both for a
bundle's postprocessing.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, convert_to_numpy
from scipy import ndimage
from skimage.morphology import disk

from common.utils import as_plane

__all__ = [
    "SELECTION_MODES",
    "LesionMaskd",
    "clean_lesion_mask",
    "select_lesions",
]

SELECTION_MODES = ("best", "threshold")


def select_lesions(
    masks: np.ndarray | torch.Tensor,
    scores: np.ndarray | torch.Tensor,
    mode: str = "best",
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    output_size: Sequence[int] | None = None,
) -> np.ndarray:
    """The lesion pixels (H, W) bool chosen from K scored masks (K, H, W) or (K, 1, H, W).

    Args:
        masks: soft masks in [0, 1] (torchvision's Mask R-CNN output) or binary masks.
        scores: one confidence per mask.
        mode: ``"best"`` keeps the highest-scoring mask whatever its score, since nearly every
            dermoscopy image shows a lesion; ``"threshold"`` keeps the union of all masks scoring at
            least ``score_threshold``, for images with several lesions.
        score_threshold: confidence a mask needs in ``"threshold"`` mode.
        mask_threshold: soft-mask value above which a pixel is lesion.
        output_size: (height, width) to resize to, e.g. the original image size when the network saw
            a resized image. The soft mask is resized bilinearly before thresholding, so the outline
            is interpolated rather than made of blocks.

    Without any (selected) mask the result is all False.
    """
    if mode not in SELECTION_MODES:
        raise ValueError(f"mode must be one of {SELECTION_MODES}, got {mode!r}")
    masks = torch.as_tensor(convert_to_numpy(masks, wrap_sequence=True)).float()
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must be (K, H, W) or (K, 1, H, W), got shape {tuple(masks.shape)}")
    scores = torch.as_tensor(convert_to_numpy(scores, wrap_sequence=True)).float().reshape(-1)
    if len(scores) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(scores)} scores")
    if mode == "best":
        chosen = masks[scores.argmax()][None] if len(scores) else masks
    else:
        chosen = masks[scores >= score_threshold]
    probability = chosen.amax(dim=0) if len(chosen) else masks.new_zeros(masks.shape[1:])
    if output_size is not None and tuple(output_size) != tuple(probability.shape):
        size = (int(output_size[0]), int(output_size[1]))
        probability = F.interpolate(probability[None, None], size=size, mode="bilinear", align_corners=False)
        probability = probability[0, 0]
    return (probability > mask_threshold).numpy()


def _smooth(mask: np.ndarray, radius: int) -> np.ndarray:
    """Opening then closing with a disk; edge padding keeps lesions that touch the border from
    being eaten or grown by the border itself."""
    footprint = disk(radius).astype(bool)
    padded = np.pad(mask, radius, mode="edge")
    smoothed = ndimage.binary_closing(ndimage.binary_opening(padded, footprint), footprint)
    return smoothed[radius:-radius, radius:-radius]


def clean_lesion_mask(
    mask: np.ndarray | torch.Tensor, fill_holes: bool = True, smoothing_radius: int = 3
) -> np.ndarray:
    """A tidier (H, W) bool lesion mask: holes filled, outline smoothed.

    The opening removes spurs and specks and the closing fills notches, both at the scale of
    ``smoothing_radius`` pixels (0: no smoothing). When the lesion is too small to survive the
    opening, the unsmoothed mask is returned rather than an empty one: a missed lesion costs more
    than a jagged one.
    """
    if smoothing_radius < 0:
        raise ValueError(f"smoothing_radius must be >= 0, got {smoothing_radius}")
    mask = as_plane(mask, "mask") > 0
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    if smoothing_radius == 0 or not mask.any():
        return mask
    smoothed = _smooth(mask, smoothing_radius)
    return smoothed if smoothed.any() else mask


class LesionMaskd(MapTransform):
    """One (1, H, W) uint8 0/1 lesion mask from a detector's scored masks.

    Args:
        keys: the soft masks (K, 1, H, W) and their scores (K,), in that order.
        output_key: where to write the lesion mask.
        mode, score_threshold, mask_threshold: see :func:`select_lesions`.
        fill_holes, smoothing_radius: see :func:`clean_lesion_mask`.
        size_key: optional key of an array whose last two dimensions give the output size (e.g. a
            copy of the image taken before it was resized); when it holds a MetaTensor, the mask
            takes its metadata, so MONAI writers name the output after the input file.
    """

    def __init__(
        self,
        keys: KeysCollection = ("pred_masks", "pred_scores"),
        output_key: str = "lesion_mask",
        mode: str = "best",
        score_threshold: float = 0.5,
        mask_threshold: float = 0.5,
        fill_holes: bool = True,
        smoothing_radius: int = 3,
        size_key: str | None = None,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys must name the masks and the scores, got {self.keys}")
        if mode not in SELECTION_MODES:
            raise ValueError(f"mode must be one of {SELECTION_MODES}, got {mode!r}")
        if smoothing_radius < 0:
            raise ValueError(f"smoothing_radius must be >= 0, got {smoothing_radius}")
        self.output_key = output_key
        self.mode = mode
        self.score_threshold = score_threshold
        self.mask_threshold = mask_threshold
        self.fill_holes = fill_holes
        self.smoothing_radius = smoothing_radius
        self.size_key = size_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        masks_key, scores_key = self.keys
        reference = None if self.size_key is None else d[self.size_key]
        lesion = select_lesions(
            d[masks_key],
            d[scores_key],
            self.mode,
            self.score_threshold,
            self.mask_threshold,
            output_size=None if reference is None else reference.shape[-2:],
        )
        lesion = clean_lesion_mask(lesion, self.fill_holes, self.smoothing_radius)
        out = torch.from_numpy(lesion.astype(np.uint8))[None]
        if isinstance(reference, torch.Tensor):
            out = convert_to_dst_type(out, reference, dtype=torch.uint8)[0]
        d[self.output_key] = out
        return d



