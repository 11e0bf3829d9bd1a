"""CenterNet training targets from boxes, and the box-axis swap MONAI's box transforms need.

Coordinates are continuous pixel coordinates, as in MONAI's box utilities: pixel (row i, column j)
covers [j, j + 1) x [i, i + 1), so boxes ``x1, y1, x2, y2`` and their centres need no half-pixel
corrections under flips, rotations and zooms. At output stride ``s`` a centre ``c`` falls in cell
``floor(c / s)`` and the offset target is ``c / s - floor(c / s)``, so decoding ``(cell + offset) * s``
(:func:`common.postprocessing.centernet.decode_centres`) returns ``c`` exactly.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy

from common.errors import InputDataError
from common.utils import source_file

__all__ = ["CenterNetTargetd", "SwapBoxXYd", "centernet_target", "draw_gaussian", "gaussian_kernel", "gaussian_radius"]


def gaussian_radius(
    height: float | np.ndarray, width: float | np.ndarray, min_overlap: float = 0.7
) -> float | np.ndarray:
    """Radius by which a corner of a ``height`` x ``width`` box may move while the moved box keeps an
    IoU of at least ``min_overlap`` with the original: the smallest root of CornerNet's three cases
    (both corners inside, both outside, one of each). Element-wise for arrays.

    This reproduces the formula as CornerNet and CenterNet implement it, where the second and third
    roots are divided by 2 rather than 2a, so heatmaps match those of the published models.
    """
    height, width = np.asarray(height, dtype=np.float64), np.asarray(width, dtype=np.float64)
    if (height <= 0).any() or (width <= 0).any() or not 0 < min_overlap < 1:
        raise ValueError(f"need height, width > 0 and 0 < min_overlap < 1, got {height}, {width}, {min_overlap}.")
    area, perimeter = height * width, height + width
    # case 1: both corners move inward
    b1, c1 = perimeter, area * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + np.sqrt(b1**2 - 4 * c1)) / 2
    # case 2: both corners move outward
    a2, b2, c2 = 4, 2 * perimeter, (1 - min_overlap) * area
    r2 = (b2 + np.sqrt(b2**2 - 4 * a2 * c2)) / 2
    # case 3: one corner inward, one outward
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * perimeter, (min_overlap - 1) * area
    r3 = (b3 + np.sqrt(b3**2 - 4 * a3 * c3)) / 2
    radius = np.minimum(np.minimum(r1, r2), r3)
    return float(radius) if radius.ndim == 0 else radius


def gaussian_kernel(radius: int) -> np.ndarray:
    """(2r+1, 2r+1) float32 Gaussian with peak 1 and sigma = (2r+1)/6, negligible tails set to 0."""
    diameter = 2 * radius + 1
    sigma = diameter / 6
    ramp = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(ramp[:, None] ** 2 + ramp[None, :] ** 2) / (2 * sigma**2))
    kernel[kernel < np.finfo(np.float64).eps * kernel.max()] = 0
    return kernel.astype(np.float32)


def _splat(heatmap: np.ndarray, kernel: np.ndarray, x: int, y: int) -> None:
    """Element-wise maximum of ``heatmap`` and the square odd-sized ``kernel`` centred at cell (x, y), cut at the borders."""
    radius = kernel.shape[0] // 2
    height, width = heatmap.shape
    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)
    region = heatmap[y - top : y + bottom, x - left : x + right]
    np.maximum(region, kernel[radius - top : radius + bottom, radius - left : radius + right], out=region)


def draw_gaussian(heatmap: np.ndarray, centre: tuple[int, int], radius: int) -> np.ndarray:
    """Splat :func:`gaussian_kernel` (``radius``) at the integer cell ``centre = (x, y)`` of the 2D
    ``heatmap``, in place, by element-wise maximum, so overlapping objects each keep a peak of 1.
    Parts outside the map are cut off. Returns ``heatmap``."""
    x, y = int(centre[0]), int(centre[1])
    height, width = heatmap.shape
    if radius < 0 or not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"need radius >= 0 and a centre inside the {width}x{height} map, got {radius} and {centre}.")
    _splat(heatmap, gaussian_kernel(radius), x, y)
    return heatmap


def centernet_target(
    boxes: np.ndarray, image_size: tuple[int, int], stride: int = 4, min_overlap: float = 0.7, min_radius: int = 0
) -> np.ndarray:
    """The (4, H/s, W/s) float32 CenterNet target of xyxy ``boxes`` on an (H, W) image.

    Channels: Gaussian centre heatmap in [0, 1] (1 at each centre cell), offset x, offset y (the
    centre's position inside its cell, in [0, 1)), and a mask that is 1 at each centre cell. Boxes
    whose centre lies outside the image are dropped. Objects sharing a centre cell share one offset
    (the last one's). Each Gaussian's radius is :func:`gaussian_radius` of the box size in output
    cells (rounded up, as CenterNet does), rounded down and at least ``min_radius``; degenerate
    (zero-size) boxes get ``min_radius``.
    """
    height, width = image_size
    if height % stride or width % stride:
        raise ValueError(f"image size {height}x{width} is not a multiple of the stride {stride}; pad the image first.")
    target = np.zeros((4, height // stride, width // stride), dtype=np.float32)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    inside = (centres[:, 0] >= 0) & (centres[:, 0] < width) & (centres[:, 1] >= 0) & (centres[:, 1] < height)
    centres, sizes = centres[inside] / stride, (boxes[inside, 2:] - boxes[inside, :2]) / stride
    cells = np.floor(centres).astype(np.int64)
    target[1:3, cells[:, 1], cells[:, 0]] = (centres - cells).T
    target[3, cells[:, 1], cells[:, 0]] = 1.0

    radii = np.zeros(len(cells), dtype=np.int64)
    sized = (sizes > 0).all(axis=1)
    if sized.any():
        radii[sized] = gaussian_radius(np.ceil(sizes[sized, 1]), np.ceil(sizes[sized, 0]), min_overlap).astype(np.int64)
    radii = np.maximum(radii, min_radius)
    for radius in np.unique(radii):  # one kernel per size: all boxes share one in fixed-size annotations
        kernel = gaussian_kernel(int(radius))
        for x, y in cells[radii == radius].tolist():
            _splat(target[0], kernel, x, y)
    return target



class CenterNetTargetd(MapTransform):
    """Write the (4, H/s, W/s) CenterNet target of the image's boxes to ``label_key``; see :func:`centernet_target`.

    Run it last, after every spatial augmentation, so the target follows the transformed image.

    Args:
        box_key: (N, 4) xyxy boxes in image pixels (numpy or tensor), N may be 0.
        image_key: the (C, H, W) image the boxes belong to; H and W must be multiples of ``stride``.
        label_key: where the target tensor is written.
        stride: output stride of the network.
        min_overlap: IoU that sets the Gaussian radius, see :func:`gaussian_radius`.
        min_radius: smallest Gaussian radius in output cells.

    Raises:
        InputDataError: naming the image file, when the boxes are not an (N, 4) array of finite
            coordinates with x2 >= x1 and y2 >= y1.
    """

    def __init__(
        self,
        box_key: str = "boxes",
        image_key: str = "image",
        label_key: str = "label",
        stride: int = 4,
        min_overlap: float = 0.7,
        min_radius: int = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__([box_key, image_key], allow_missing_keys)
        if stride < 1 or min_radius < 0 or not 0 < min_overlap < 1:
            raise ValueError(f"need stride >= 1, min_radius >= 0, 0 < min_overlap < 1, got {stride}, {min_radius}, {min_overlap}.")
        self.box_key, self.image_key, self.label_key = box_key, image_key, label_key
        self.stride, self.min_overlap, self.min_radius = stride, min_overlap, min_radius

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        boxes = convert_to_numpy(d[self.box_key], dtype=np.float64)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise InputDataError(source_file(image), f"boxes must be an (N, 4) x1, y1, x2, y2 array, got shape {boxes.shape}")
        if not np.isfinite(boxes).all() or (boxes[:, 2:] < boxes[:, :2]).any():
            raise InputDataError(source_file(image), "boxes must be finite with x2 >= x1 and y2 >= y1")
        target = centernet_target(boxes, tuple(image.shape[-2:]), self.stride, self.min_overlap, self.min_radius)
        d[self.label_key] = torch.from_numpy(target)
        return d


class SwapBoxXYd(MapTransform):
    """Swap the x and y coordinates of 2D boxes: x1, y1, x2, y2 <-> y1, x1, y2, x2.

    MONAI's box transforms (``RandFlipBoxd``, ``RandRotateBox90d``, ``RandZoomBoxd``, ...) read box
    coordinate k as a position along spatial axis k of the image. Our images are (C, H, W), so axis
    0 is y, while the datalist boxes are x-first. Apply this before and after those transforms; it is
    its own inverse.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key][:, [1, 0, 3, 2]]
        return d
