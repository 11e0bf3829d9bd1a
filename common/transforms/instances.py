"""Binary lesion masks to per-lesion instance channels and boxes, for Mask R-CNN style training.

A detector needs one mask, one box and one label per lesion. Boxes are not augmented directly:
the lesion masks go through the same spatial transforms as the image (nearest interpolation),
and :class:`BoxesFromInstancesd` recomputes the boxes afterwards, so that rotations, elastic
deformations and zooms leave image, masks and boxes aligned without any box geometry.

A semantic label map whose values are categories (e.g. the CASS segment map an annotator saves in
MONAI Label) becomes instances with :class:`LoadLabelMapInstancesd`: one instance per value present.

Typical training chain::

    MaskToInstancesd()                           # mask (1, H, W) -> instances (N, H, W), labels (N,)
    RandFlipd(["image", "instances"], ...)       # any MONAI spatial transforms on both keys,
    RandAffined(["image", "instances"], mode=("bilinear", "nearest"), ...)   # nearest for instances
    RandAdjustContrastd("image", ...)            # colour and dropout on the image only
    BoxesFromInstancesd()                        # boxes (N, 4), drops lesions pushed out of view
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, convert_to_numpy
from PIL import Image
from scipy import ndimage

from common.errors import InputDataError

__all__ = [
    "BoxesFromInstancesd",
    "LoadLabelMapInstancesd",
    "MaskToInstancesd",
    "instance_boxes",
    "label_instances",
    "label_map_instances",
    "read_label_map",
]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def label_instances(mask: np.ndarray | torch.Tensor, min_area: int = 0) -> np.ndarray:
    """The 8-connected components of a binary (1, H, W) or (H, W) mask as (N, H, W) uint8 channels.

    Components smaller than ``min_area`` pixels (annotation specks) are dropped; components keep
    their label order (row-major order of their first pixel), so the output is deterministic.
    """
    mask = convert_to_numpy(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"mask must be (1, H, W) or (H, W), got shape {mask.shape}")
    if min_area < 0:
        raise ValueError(f"min_area must be >= 0, got {min_area}")
    labels, count = ndimage.label(mask > 0, structure=_EIGHT_CONNECTED)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    kept = np.flatnonzero(areas >= max(min_area, 1)) + 1
    return (labels[None] == kept[:, None, None]).astype(np.uint8)


def instance_boxes(instances: np.ndarray | torch.Tensor) -> np.ndarray:
    """x-first xyxy boxes (N, 4) float32 of (N, H, W) instance masks, on pixel edges.

    ``x2`` and ``y2`` are one past the last column and row, as in torchvision and COCO. Empty
    channels get a zero box; callers drop them by area.
    """
    instances = convert_to_numpy(instances) > 0
    if instances.ndim != 3:
        raise ValueError(f"instances must be (N, H, W), got shape {instances.shape}")
    rows, cols = instances.any(axis=2), instances.any(axis=1)  # (N, H), (N, W)
    filled = rows.any(axis=1)
    height, width = instances.shape[1:]
    y1, x1 = rows.argmax(axis=1), cols.argmax(axis=1)
    y2 = height - rows[:, ::-1].argmax(axis=1)
    x2 = width - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    boxes[~filled] = 0
    return boxes


_LABEL_MAP_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """A label map file (greyscale or palette PNG/TIFF of category values, 0 background) as (H, W) int64.

    Raises:
        InputDataError: missing or unreadable file, or a colour image (categories need one channel).
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "label map file not found")
    try:
        with Image.open(path) as img:
            mode, pixels = img.mode, np.asarray(img)
    except (OSError, ValueError, SyntaxError) as err:
        raise InputDataError(path, f"not a readable label map ({err})") from err
    if mode not in _LABEL_MAP_MODES:
        raise InputDataError(
            path, f"label map is a {mode} image; expected one channel of category values (L, P or I)"
        )
    return pixels.astype(np.int64)


def label_map_instances(
    label_map: np.ndarray | torch.Tensor, num_labels: int, path: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) uint8 masks and (N,) int64 labels, one instance per category value present in a
    (1, H, W) or (H, W) label map, in increasing value order; 0 is background.

    A category is one instance however many pieces it has (a CASS segment cut by a crossing vessel
    is still one segment), unlike :func:`label_instances`, which splits a binary mask into components.

    Raises:
        InputDataError: values outside ``0..num_labels`` (listed), naming ``path``.
    """
    label_map = convert_to_numpy(label_map)
    if label_map.ndim == 3 and label_map.shape[0] == 1:
        label_map = label_map[0]
    if label_map.ndim != 2:
        raise ValueError(f"label map must be (1, H, W) or (H, W), got shape {label_map.shape}")
    values = np.unique(label_map).astype(np.int64)
    bad = values[(values < 0) | (values > num_labels)]
    if bad.size:
        listed = ", ".join(str(v) for v in bad[:10].tolist())
        raise InputDataError(
            path,
            f"label map holds values {listed} outside 0..{num_labels} (0 background, 1..{num_labels} categories)",
        )
    labels = values[values > 0]
    return (label_map[None] == labels[:, None, None]).astype(np.uint8), labels


class MaskToInstancesd(MapTransform):
    """Split a binary lesion mask (1, H, W) into one uint8 channel per 8-connected lesion.

    Writes ``instances_key`` (N, H, W), as the same tensor type as the mask (a MetaTensor keeps the
    mask's metadata, so spatial transforms can be inverted), and ``labels_key`` (N,) int64 filled
    with ``label``. Run it before the spatial augmentation.

    Args:
        mask_key: the binary mask.
        instances_key: where to write the instance channels.
        labels_key: where to write the class labels (torchvision reserves 0 for background).
        label: class of every lesion.
        min_area: drop lesions smaller than this many pixels.
    """

    def __init__(
        self,
        mask_key: str = "mask",
        instances_key: str = "instances",
        labels_key: str = "labels",
        label: int = 1,
        min_area: int = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(mask_key, allow_missing_keys)
        if label < 1:
            raise ValueError(f"label must be >= 1 (0 is background in torchvision), got {label}")
        if min_area < 0:
            raise ValueError(f"min_area must be >= 0, got {min_area}")
        self.instances_key = instances_key
        self.labels_key = labels_key
        self.label = label
        self.min_area = min_area

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[key]
            instances = label_instances(mask, self.min_area)
            if isinstance(mask, torch.Tensor):
                instances = convert_to_dst_type(instances, mask, dtype=torch.uint8)[0]
            else:
                instances = torch.from_numpy(instances)
            d[self.instances_key] = instances
            d[self.labels_key] = torch.full((len(instances),), self.label, dtype=torch.int64)
        return d


class BoxesFromInstancesd(MapTransform):
    """Recompute boxes from (N, H, W) instance masks after spatial augmentation.

    Interpolated masks are re-binarised at 0.5 and stored back as uint8. Lesions left with fewer
    than ``min_area`` pixels (pushed out of view by a shift or zoom) are dropped from the masks and
    from ``labels_key``, so that every box has a mask and a label. Boxes are (N, 4) float32 xyxy,
    x first, on pixel edges.

    Args:
        instances_key: the instance channels.
        boxes_key: where to write the boxes.
        labels_key: per-instance labels, filtered with the instances.
        min_area: smallest lesion (pixels) that is kept; at least 1, since an empty mask has no box.
    """

    def __init__(
        self,
        instances_key: str = "instances",
        boxes_key: str = "boxes",
        labels_key: str = "labels",
        min_area: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(instances_key, allow_missing_keys)
        if min_area < 1:
            raise ValueError(f"min_area must be >= 1, got {min_area}")
        self.boxes_key = boxes_key
        self.labels_key = labels_key
        self.min_area = min_area

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            instances = d[key]
            binary = convert_to_numpy(instances) > 0.5
            if binary.ndim != 3:
                raise ValueError(f"{key!r} must be (N, H, W) instance masks, got shape {binary.shape}")
            kept = binary.sum(axis=(1, 2)) >= self.min_area
            binary = binary[kept]
            labels = torch.as_tensor(d[self.labels_key], dtype=torch.int64)
            if len(labels) != len(kept):
                raise ValueError(f"{len(kept)} instances but {len(labels)} labels in {self.labels_key!r}")
            if isinstance(instances, torch.Tensor):
                d[key] = convert_to_dst_type(binary, instances, dtype=torch.uint8)[0]
            else:
                d[key] = torch.from_numpy(binary.astype(np.uint8))
            d[self.labels_key] = labels[torch.from_numpy(kept)]
            d[self.boxes_key] = torch.from_numpy(instance_boxes(binary))
        return d


class LoadLabelMapInstancesd(MapTransform):
    """Read the label map (0 background, ``1..num_labels`` one category each) whose path is under
    ``keys`` and write its instances: ``instances_key`` (N, H, W) uint8 and ``labels_key`` (N,) int64, as
    :class:`MaskToInstancesd` writes them, one instance per category present (see
    :func:`label_map_instances`). The instances take the metadata of the loaded image under
    ``image_key``, so that MONAI spatial transforms treat both alike. Run it after loading the image
    and before the spatial augmentation.

    Args:
        keys: the label-map path (kept, as :class:`MaskToInstancesd` keeps its mask).
        num_labels: the largest category value.
        image_key: the loaded (C, H, W) image, which must have the label map's size.
        instances_key, labels_key: where to write the instances and their categories.

    Raises:
        InputDataError: naming the label map, when it is unreadable, holds values outside
            ``0..num_labels`` or differs in size from the image.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_labels: int,
        image_key: str = "image",
        instances_key: str = "instances",
        labels_key: str = "labels",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
        self.num_labels = num_labels
        self.image_key = image_key
        self.instances_key = instances_key
        self.labels_key = labels_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            label_map = read_label_map(path)
            image = d[self.image_key]
            if not isinstance(image, (torch.Tensor, np.ndarray)) or image.ndim != 3:
                raise ValueError(f"{self.image_key!r} must be a loaded (C, H, W) image, not {type(image)}")
            if tuple(image.shape[1:]) != label_map.shape:
                raise InputDataError(
                    path,
                    f"label map is {label_map.shape[0]}x{label_map.shape[1]} but its image is "
                    f"{image.shape[1]}x{image.shape[2]} (height x width)",
                )
            instances, labels = label_map_instances(label_map, self.num_labels, path)
            if isinstance(image, torch.Tensor):
                d[self.instances_key] = convert_to_dst_type(instances, image, dtype=torch.uint8)[0]
            else:
                d[self.instances_key] = torch.from_numpy(instances)
            d[self.labels_key] = torch.from_numpy(labels)
        return d
