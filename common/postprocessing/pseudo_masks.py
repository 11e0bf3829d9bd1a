"""Class activation maps of a weakly supervised classifier to pixel pseudo-masks for histology patches.

Stage 1 of weakly supervised tissue segmentation trains a classifier on image-level labels; its class
activation maps (CAMs) say roughly where each tissue is. Stage 2 trains a segmentation network on
pseudo-masks made from them, and what stage 2 learns is bounded by their quality. The steps here, each
a small function:

1. :func:`normalise_cams`: each class map divided by its own maximum, so one threshold fits all classes.
2. :func:`common.transforms.tissue.tissue_mask`: glass (grey and bright) and black are background
   whatever the CAMs say; CAMs are coarse and bleed into them.
3. :func:`cams_to_pseudo_mask`: only the classes of the image-level label may appear; each tissue pixel
   takes its strongest class if that class's map is high enough there, and is otherwise left
   uncertain (``ignore_index``), so that stage 2 learns from confident pixels only.
4. :func:`clean_pseudo_mask`: optional opening, closing and removal of specks.

Label convention: tissue classes ``0..C-1`` (the positions of the label vector), background ``C``,
uncertain pixels ``ignore_index`` (255).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, convert_to_numpy
from scipy import ndimage
from skimage.morphology import disk

from common.transforms.tissue import BRIGHTNESS_THRESHOLD, SATURATION_THRESHOLD, tissue_mask

__all__ = [
    "CAMToPseudoMaskd",
    "GlassToBackgroundd",
    "cams_to_pseudo_mask",
    "clean_pseudo_mask",
    "normalise_cams",
]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)



def normalise_cams(cams: np.ndarray | torch.Tensor, eps: float = 1e-5) -> np.ndarray:
    """(C, H, W) float32 maps in 0..1: each class map divided by its own maximum.

    Negative values (a CAM taken before its ReLU) are clipped to 0 first. A map whose maximum does not
    exceed ``eps`` has no evidence anywhere and stays all 0 rather than having its noise blown up to 1.
    """
    cams = convert_to_numpy(cams).astype(np.float32)
    if cams.ndim != 3:
        raise ValueError(f"cams must have shape (C, H, W), got {cams.shape}")
    cams = np.maximum(cams, 0)
    peak = cams.max(axis=(1, 2), keepdims=True) if cams.size else np.zeros((len(cams), 1, 1), np.float32)
    return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > eps)




def _morphology(region: np.ndarray, radius: int, operation: Any) -> np.ndarray:
    """``operation`` (binary opening or closing) with a disk, on an edge-padded copy so that regions
    touching the patch border are neither eaten nor grown by the border itself."""
    padded = np.pad(region, radius, mode="edge")
    return operation(padded, disk(radius).astype(bool))[radius:-radius, radius:-radius]


def clean_pseudo_mask(
    mask: np.ndarray,
    num_labels: int,
    opening_radius: int = 0,
    closing_radius: int = 0,
    min_area: int = 0,
    ignore_index: int = 255,
) -> np.ndarray:
    """Tidy an (H, W) label mask per label ``0..num_labels-1``; removed pixels become ``ignore_index``.

    In order: an opening with a disk of ``opening_radius`` removes thin spurs and specks of every label;
    a closing with a disk of ``closing_radius`` fills gaps, but only uncertain pixels, and only those
    claimed by a single label, so it never overwrites a decision nor depends on the label order; last,
    8-connected components smaller than ``min_area`` pixels are removed. 0 switches a step off.
    """
    _check_cleaning(opening_radius, closing_radius, min_area)
    mask = np.array(mask, dtype=np.uint8)
    labels = [label for label in range(num_labels) if (mask == label).any()]
    if opening_radius:
        for label in labels:
            region = mask == label
            mask[region & ~_morphology(region, opening_radius, ndimage.binary_opening)] = ignore_index
    if closing_radius:
        claims = np.zeros(mask.shape, np.int64)
        claimant = np.full(mask.shape, ignore_index, np.uint8)
        uncertain = mask == ignore_index
        for label in labels:
            grown = _morphology(mask == label, closing_radius, ndimage.binary_closing) & uncertain
            claims += grown
            claimant[grown] = label
        mask[claims == 1] = claimant[claims == 1]
    if min_area:
        for label in labels:
            components, _ = ndimage.label(mask == label, structure=_EIGHT_CONNECTED)
            small = np.bincount(components.ravel()) < min_area
            small[0] = False
            mask[small[components]] = ignore_index
    return mask


def cams_to_pseudo_mask(
    cams: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor | Sequence[int],
    image: np.ndarray | torch.Tensor | None = None,
    thresholds: float | Sequence[float] = 0.3,
    background_threshold: float | None = None,
    ignore_band: float = 0.0,
    opening_radius: int = 0,
    closing_radius: int = 0,
    min_area: int = 0,
    fill_single_class: bool = True,
    saturation_threshold: float = SATURATION_THRESHOLD,
    brightness_threshold: float = BRIGHTNESS_THRESHOLD,
    ignore_index: int = 255,
) -> tuple[np.ndarray, np.ndarray]:
    """A pseudo-mask and its confidence from the CAMs of one image and its image-level label.

    With ``s`` the highest normalised CAM at a pixel among the classes present in ``label`` (the maps
    of absent classes are never used), and ``k`` that class, each pixel is, by the first rule that
    applies:

    1. background ``C`` if ``image`` is given and the pixel is not tissue
       (:func:`common.transforms.tissue.tissue_mask`);
    2. background ``C`` if ``background_threshold`` is set and ``s < background_threshold`` (no class
       claims the pixel; for images without glass, or when no ``image`` is given);
    3. the single present class, when ``label`` has exactly one class and ``fill_single_class``: the
       label says every tissue pixel is that class, so the CAM adds nothing but noise (a common WSSS
       shortcut; it relies on the tissue mask to find the glass);
    4. ``k`` if ``s >= thresholds[k]`` and ``s`` beats the runner-up present class by at least
       ``ignore_band`` (two classes equally active are a coin toss);
    5. ``ignore_index`` otherwise: uncertain tissue, left out of stage 2's loss.

    Then :func:`clean_pseudo_mask` with ``opening_radius``, ``closing_radius`` and ``min_area``. A
    label with no present class gives background and uncertain pixels only.

    Args:
        cams: (C, H, W) class activation maps, non-negative, any scale (normalised here).
        label: (C,) image-level label of 0/1 entries.
        image: the RGB image, (3, H, W) or (H, W, 3), 0..255, the size of the CAMs; ``None`` skips rule 1.
        thresholds: normalised CAM a class needs, one for all classes or one per class, in 0..1; 0
            assigns every tissue pixel to its strongest class (no uncertain pixels).
        background_threshold: see rule 2, in 0..1 and not above any of ``thresholds``; ``None`` skips it.
        ignore_band: see rule 4, in [0, 1).
        opening_radius, closing_radius, min_area: see :func:`clean_pseudo_mask`.
        fill_single_class: see rule 3.
        saturation_threshold, brightness_threshold: see :func:`common.transforms.tissue.tissue_mask`.
        ignore_index: label of uncertain pixels, above ``C`` and at most 255.

    Returns:
        ``mask``: (H, W) uint8 in ``0..C`` or ``ignore_index``; ``confidence``: (H, W) float32 in 0..1,
        how sure the mask is of each pixel: the normalised CAM of the assigned class, 1 for pixels
        assigned by rules 1 and 3, ``1 - s`` for background from rule 2, and 0 for uncertain pixels.

    Raises:
        ValueError: the label does not match the CAMs' classes, the image does not match their size,
            or an option is out of range.
    """
    raw = convert_to_numpy(cams)
    if raw.ndim != 3 or 0 in raw.shape:
        raise ValueError(f"cams must have shape (C, H, W) with C, H, W > 0, got {raw.shape}")
    num_classes, height, width = raw.shape
    present = _present_classes(label, num_classes, raw.shape)
    per_class = _check_options(num_classes, thresholds, background_threshold, ignore_band, ignore_index)
    _check_cleaning(opening_radius, closing_radius, min_area)
    tissue = np.ones((height, width), bool)
    if image is not None:
        image_shape = tuple(image.shape) if hasattr(image, "shape") else np.shape(image)
        tissue = tissue_mask(image, saturation_threshold, brightness_threshold)
        if tissue.shape != (height, width):
            raise ValueError(
                f"image is {tissue.shape[0]}x{tissue.shape[1]} (shape {image_shape}) but the cams are "
                f"{height}x{width} (shape {raw.shape})"
            )

    normalised = normalise_cams(raw)
    scores = np.where(present[:, None, None], normalised, -1.0)  # absent classes never win
    best = scores.argmax(axis=0)
    strongest = np.maximum(np.take_along_axis(scores, best[None], axis=0)[0], 0)
    confident = present.any() & (strongest >= per_class[best])
    if ignore_band > 0 and present.sum() > 1:
        runner_up = np.partition(scores, -2, axis=0)[-2]
        confident &= strongest - runner_up >= ignore_band

    background = num_classes
    mask = np.full((height, width), ignore_index, np.uint8)
    mask[tissue & confident] = best[tissue & confident]
    single_class = fill_single_class and present.sum() == 1
    if single_class:
        mask[tissue] = np.flatnonzero(present)[0]
    weak = np.zeros_like(tissue) if background_threshold is None else strongest < background_threshold
    mask[tissue & weak] = background
    mask[~tissue] = background
    mask = clean_pseudo_mask(mask, num_classes + 1, opening_radius, closing_radius, min_area, ignore_index)

    labelled = mask < background
    assigned = np.take_along_axis(normalised, np.where(labelled, mask, 0)[None].astype(np.intp), axis=0)[0]
    confidence = np.where(labelled, 1.0 if single_class else assigned, 0.0)
    confidence = np.where(mask == background, np.where(tissue, 1 - strongest, 1.0), confidence)
    return mask, confidence.astype(np.float32)


def _present_classes(label: Any, num_classes: int, cams_shape: tuple[int, ...]) -> np.ndarray:
    label = convert_to_numpy(label, wrap_sequence=True).reshape(-1)
    if label.size != num_classes:
        raise ValueError(
            f"label has {label.size} entries (shape {label.shape}) but the cams have {num_classes} classes "
            f"(shape {cams_shape})"
        )
    if not np.isin(label, (0, 1)).all():
        raise ValueError(f"label entries must be 0 or 1, got {label.tolist()}")
    return label.astype(bool)


def _check_options(
    num_classes: int | None,
    thresholds: float | Sequence[float],
    background_threshold: float | None,
    ignore_band: float,
    ignore_index: int,
) -> np.ndarray:
    """Validate the options; the per-class thresholds as an array (one entry when ``num_classes`` is None)."""
    values = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if values.ndim != 1 or ((num_classes is not None) and len(values) not in (1, num_classes)):
        raise ValueError(f"thresholds must be one number or one per class ({num_classes}), got {thresholds}")
    if ((values < 0) | (values > 1)).any():
        raise ValueError(f"thresholds must lie in 0..1, got {thresholds}")
    if background_threshold is not None and not 0 <= background_threshold <= values.min():
        raise ValueError(
            f"background_threshold must lie in 0..min(thresholds) = 0..{values.min()}, "
            f"got {background_threshold}"
        )
    if not 0 <= ignore_band < 1:
        raise ValueError(f"ignore_band must lie in [0, 1), got {ignore_band}")
    if not (num_classes or 0) < ignore_index <= 255:
        raise ValueError(
            f"ignore_index must lie in {(num_classes or 0) + 1}..255, above the classes, got {ignore_index}"
        )
    return values if num_classes is None else np.broadcast_to(values, (num_classes,))


def _check_cleaning(opening_radius: int, closing_radius: int, min_area: int) -> None:
    options = {"opening_radius": opening_radius, "closing_radius": closing_radius, "min_area": min_area}
    for name, value in options.items():
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a whole number >= 0, got {value}")


class CAMToPseudoMaskd(MapTransform):
    """:func:`cams_to_pseudo_mask` on a dictionary, for a bundle's postprocessing.

    Writes the mask as (1, H, W) uint8 under ``mask_key`` and the confidence as (1, H, W) float32 under
    ``confidence_key``; both take the metadata of the CAMs when those are a ``MetaTensor``, so writers
    name the outputs after the input file.

    Args:
        keys: the key of the (C, H, W) CAMs (an evaluator's ``pred`` when its inferer is
            :class:`common.inferers.cam.CAMInferer`).
        label_key: key of the (C,) image-level label.
        image_key: key of the RGB image in 0..255 for the tissue mask; ``None`` does without it. When
            the network's input is intensity-normalised, keep a copy of the loaded image (e.g.
            ``CopyItemsd(keys="image", names="image_raw")`` before normalising) and name that copy:
            an evaluator's postprocessing sees the batch's keys as well as its output.
        mask_key, confidence_key: output keys.
        thresholds, background_threshold, ignore_band, opening_radius, closing_radius, min_area,
        fill_single_class, saturation_threshold, brightness_threshold, ignore_index: see
            :func:`cams_to_pseudo_mask`.
        allow_missing_keys: skip dictionaries without the CAMs key.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        label_key: str = "label",
        image_key: str | None = "image",
        mask_key: str = "pseudo_mask",
        confidence_key: str = "pseudo_confidence",
        thresholds: float | Sequence[float] = 0.3,
        background_threshold: float | None = None,
        ignore_band: float = 0.0,
        opening_radius: int = 0,
        closing_radius: int = 0,
        min_area: int = 0,
        fill_single_class: bool = True,
        saturation_threshold: float = SATURATION_THRESHOLD,
        brightness_threshold: float = BRIGHTNESS_THRESHOLD,
        ignore_index: int = 255,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"keys must name the CAMs only, got {self.keys}")
        _check_options(None, thresholds, background_threshold, ignore_band, ignore_index)
        _check_cleaning(opening_radius, closing_radius, min_area)
        self.label_key, self.image_key = label_key, image_key
        self.mask_key, self.confidence_key = mask_key, confidence_key
        self.options = {
            "thresholds": thresholds,
            "background_threshold": background_threshold,
            "ignore_band": ignore_band,
            "opening_radius": opening_radius,
            "closing_radius": closing_radius,
            "min_area": min_area,
            "fill_single_class": fill_single_class,
            "saturation_threshold": saturation_threshold,
            "brightness_threshold": brightness_threshold,
            "ignore_index": ignore_index,
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            cams = d[key]
            for needed in (self.label_key, self.image_key):
                if needed is not None and needed not in d:
                    raise KeyError(
                        f"CAMToPseudoMaskd: no {needed!r} in the data; found {sorted(map(str, d))}"
                    )
            image = None if self.image_key is None else d[self.image_key]
            mask, confidence = cams_to_pseudo_mask(cams, d[self.label_key], image, **self.options)
            d[self.mask_key] = self._like(torch.from_numpy(mask)[None], cams, torch.uint8)
            d[self.confidence_key] = self._like(torch.from_numpy(confidence)[None], cams, torch.float32)
        return d

    @staticmethod
    def _like(out: torch.Tensor, reference: Any, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(reference, torch.Tensor):
            return convert_to_dst_type(out, reference, dtype=dtype)[0]
        return out


class GlassToBackgroundd(MapTransform):
    """Class maps in which every pixel that :func:`common.transforms.tissue.tissue_mask` calls glass (or
    black) is background.

    Pseudo-masks take their glass from the pixel-level tissue mask, but a segmentation network trained
    on them predicts at its output stride and rounds that outline off; applying the same mask to its
    predictions restores it, so that predictions and pseudo-masks follow one glass convention.

    Args:
        keys: predictions: (K, H, W) class scores (their arg-max is taken) or a (1, H, W) class map; each
            is replaced by a (1, H, W) int64 class map of the same tensor type.
        image_key: the RGB image the predictions belong to, in 0..255 (not normalised).
        background_index: class of glass (the collection's convention: the number of tissue classes).
        saturation_threshold, brightness_threshold: see :func:`common.transforms.tissue.tissue_mask`.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        image_key: str = "image",
        background_index: int = 4,
        saturation_threshold: float = SATURATION_THRESHOLD,
        brightness_threshold: float = BRIGHTNESS_THRESHOLD,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if background_index < 0:
            raise ValueError(f"background_index must be >= 0, got {background_index}")
        self.image_key = image_key
        self.background_index = background_index
        self.saturation_threshold = saturation_threshold
        self.brightness_threshold = brightness_threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        glass = ~tissue_mask(d[self.image_key], self.saturation_threshold, self.brightness_threshold)
        for key in self.key_iterator(d):
            pred = d[key]
            scores = convert_to_numpy(pred, wrap_sequence=True)
            if scores.ndim != 3 or scores.shape[1:] != glass.shape:
                raise ValueError(
                    f"{key!r} must be (K, H, W) scores or a (1, H, W) class map of the image's size "
                    f"{glass.shape}, got shape {scores.shape}"
                )
            classes = scores.argmax(axis=0) if scores.shape[0] > 1 else scores[0].astype(np.int64)
            classes[glass] = self.background_index
            d[key] = convert_to_dst_type(classes[None].astype(np.int64), pred, dtype=torch.int64)[0]
        return d

