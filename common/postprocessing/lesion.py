"""Mask R-CNN detections to one binary lesion mask per dermoscopy image, and writers for it.

Lesion segmentation is scored (ISIC task 1: Jaccard, Dice) on one binary mask per image, while a
detector returns K scored soft masks. :func:`select_lesions` chooses among them (the best one, or
the union of the confident ones), :func:`clean_lesion_mask` fills holes and smooths the jagged
outline that a 28x28 mask head leaves after upsampling, and :class:`LesionMaskd` chains both for a
bundle's postprocessing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type
from PIL import Image
from scipy import ndimage
from skimage.morphology import disk

from common.io.atomic import atomic_write
from common.writers.detection_overlays import display_rgb
from common.writers.instances import source_stem

__all__ = [
    "SELECTION_MODES",
    "select_lesions",
    "clean_lesion_mask",
    "LesionMaskd",
    "write_lesion_mask",
    "write_lesion_overlay",
    "SaveLesionOutputsd",
]

SELECTION_MODES = ("best", "threshold")
_CONTOUR_COLOUR = (0, 158, 115)  # Okabe-Ito bluish green: visible on skin tones and dark lesions


def _numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def _plane(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """An (H, W) view of an (H, W) or (1, H, W) mask."""
    mask = _numpy(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) or (1, H, W) mask, got shape {mask.shape}")
    return mask


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
    masks = torch.as_tensor(_numpy(masks)).float()
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must be (K, H, W) or (K, 1, H, W), got shape {tuple(masks.shape)}")
    scores = torch.as_tensor(_numpy(scores)).float().reshape(-1)
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
    mask = _plane(mask) > 0
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


def _png_writer(pixels: np.ndarray) -> Callable[[BinaryIO], None]:
    return lambda f: Image.fromarray(pixels).save(f, format="PNG")


def write_lesion_mask(mask: np.ndarray | torch.Tensor, path: str | os.PathLike) -> Path:
    """Write an (H, W) or (1, H, W) mask as an 8-bit PNG with 0 (skin) and 255 (lesion), the ISIC
    ground-truth format, atomically."""
    pixels = np.where(_plane(mask) > 0, 255, 0).astype(np.uint8)
    return atomic_write(path, _png_writer(pixels))


def write_lesion_overlay(
    image: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    colour: Sequence[int] = _CONTOUR_COLOUR,
    thickness: int = 2,
) -> Path:
    """Draw the outline of ``mask`` on ``image`` and write it as an RGB PNG, atomically.

    ``image`` is (3, H, W), (1, H, W) or (H, W, 3); ImageNet-normalised tensors are stretched per
    channel to be viewable. The outline is the mask's inner border, ``thickness`` pixels wide; a lesion
    cut by the image edge is not outlined along that edge, since its true border lies beyond it.
    """
    if thickness < 1:
        raise ValueError(f"thickness must be >= 1, got {thickness}")
    rgb = display_rgb(image).copy()
    mask = _plane(mask) > 0
    if mask.shape != rgb.shape[:2]:
        raise ValueError(
            f"mask is {mask.shape[0]}x{mask.shape[1]} but the image is {rgb.shape[0]}x{rgb.shape[1]}"
        )
    inner = ndimage.binary_erosion(mask, iterations=thickness, border_value=1)
    rgb[mask & ~inner] = colour
    return atomic_write(path, _png_writer(rgb))


class SaveLesionOutputsd(MapTransform):
    """Write each image's lesion mask (ISIC format: 0/255 PNG) and an outline overlay.

    Files are named after the image's ``filename_or_obj``: ``<stem>_mask.png`` and
    ``<stem>_overlay.png`` in ``output_dir``. With ``output_file`` (one image, e.g. from the
    single-image command line) the mask goes exactly there and the overlay beside it as
    ``<output stem>_overlay.png``. The mask must have the image's size (see ``LesionMaskd(size_key=...)``);
    the written paths are added to the data under ``"<key>_path"`` and ``"<key>_overlay_path"``.

    Args:
        keys: the one key holding the (1, H, W) lesion mask.
        output_dir: folder receiving the files when ``output_file`` is not given.
        image_key: key of the image MetaTensor, at the mask's size, that names the outputs.
        output_file: write the mask to this path (single-image use).
        overlay: also write the overlay.
    """

    def __init__(
        self,
        keys: KeysCollection = "lesion_mask",
        output_dir: str | os.PathLike = "./outputs",
        image_key: str = "image",
        output_file: str | os.PathLike | None = None,
        overlay: bool = True,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"SaveLesionOutputsd writes one mask key, got keys {self.keys}")
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.output_file = None if output_file is None else Path(output_file)
        self.overlay = overlay
        self._output_file_source: Path | None = None

    def _paths(self, image: Any) -> tuple[Path, Path]:
        if self.output_file is not None:
            source = source_stem(image, self.image_key)[0]
            if self._output_file_source not in (None, source):
                raise ValueError(
                    f"output_file {self.output_file} takes one image, but both {self._output_file_source} "
                    f"and {source} were given; use output_dir for several images"
                )
            self._output_file_source = source
            return self.output_file, self.output_file.with_name(f"{self.output_file.stem}_overlay.png")
        stem = source_stem(image, self.image_key)[1]
        return self.output_dir / f"{stem}_mask.png", self.output_dir / f"{stem}_overlay.png"

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[self.image_key]
            mask_path, overlay_path = self._paths(image)
            d[f"{key}_path"] = str(write_lesion_mask(d[key], mask_path))
            if self.overlay:
                d[f"{key}_overlay_path"] = str(write_lesion_overlay(image, d[key], overlay_path))
        return d
