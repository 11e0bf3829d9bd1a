"""Training patches from the regions annotators label on whole slides.

A region label is saved through ``/datastore/label`` for the slide, with ``params`` ``{"location": [x,
y], "size": [width, height]}`` in level-0 pixels (what the region inference answered) and the (height,
width) index mask as the file. :func:`slide_region_patches` cuts each region from its slide at the level
the bundle trains at and writes it as a patch with its mask resized to match, so that the bundle's own
patch loaders read them like any other labelled patch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.data.histopathology import read_mask
from common.data.wsi import open_slide, read_region, select_level
from common.errors import InputDataError
from common.utils import file_stem
from common.writers.display import write_png

__all__ = ["read_slide_region", "region_box", "slide_region_patches", "tile_boxes"]


def region_box(path: str | os.PathLike, location: Any, size: Any) -> tuple[int, int, int, int]:
    """``(x, y, width, height)`` of a region given as MONAI Label's ``location`` and ``size``, checked."""
    try:
        (x, y), (width, height) = (int(v) for v in location), (int(v) for v in size)
    except (TypeError, ValueError) as err:
        raise InputDataError(
            path, f"a region needs location [x, y] and size [width, height], got {location}, {size}"
        ) from err
    if x < 0 or y < 0 or width <= 0 or height <= 0:
        raise InputDataError(path, f"region x={x}, y={y}, {width}x{height} lies outside the slide")
    return x, y, width, height


def tile_boxes(location: Any, size: Any, tile_size: Any) -> list[tuple[int, int, int, int]]:
    """``(x, y, width, height)`` of the ``tile_size`` tiles covering a region, row by row; the last
    column and row are cut to the region."""
    x, y, width, height = region_box(None, location, size)
    try:
        tile_width, tile_height = (int(v) for v in tile_size)
    except (TypeError, ValueError) as err:
        raise InputDataError(None, f"tile_size must be [width, height], got {tile_size}") from err
    if tile_width <= 0 or tile_height <= 0:
        raise InputDataError(None, f"tile_size must be positive, got {tile_size}")
    return [
        (tx, ty, min(tile_width, x + width - tx), min(tile_height, y + height - ty))
        for ty in range(y, y + height, tile_height)
        for tx in range(x, x + width, tile_width)
    ]


def read_slide_region(
    path: str | os.PathLike, location: Any, size: Any, mpp: float, backend: str = "tifffile"
) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """The region's ``(x, y, width, height)`` and its (3, h, w) uint8 pixels, read with
    :func:`common.data.wsi.open_slide` at the level matching ``mpp`` (level 0 when the slide does not
    record its resolution).

    Raises:
        InputDataError: the slide is unreadable or the region is not inside it.
    """
    x, y, width, height = region_box(path, location, size)
    with open_slide(path, backend) as slide:
        level0_height, level0_width = slide.info.level_dimensions[0]
        if x + width > level0_width or y + height > level0_height:
            raise InputDataError(
                path,
                f"region x={x}, y={y}, {width}x{height} lies outside the slide ({level0_width}x{level0_height} "
                "pixels at level 0)",
            )
        level = select_level(slide.info, mpp=None if slide.info.mpp is None else mpp)
        scale = slide.info.downsamples[level]
        shape = (max(round(height / scale), 1), max(round(width / scale), 1))
        return (x, y, width, height), read_region(slide, (y, x), shape, level=level)


def slide_region_patches(
    datalist: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    num_classes: int,
    mpp: float,
    backend: str = "tifffile",
) -> list[dict[str, Any]]:
    """``datalist`` with every entry that carries ``location`` and ``size`` replaced by a patch of its
    slide read at the level matching ``mpp`` and the label mask resized (nearest) to it; other entries
    (labelled patches) are kept as they are.

    Raises:
        InputDataError: a region outside its slide, or a mask that is not ``height x width``.
    """
    output_dir = Path(output_dir)
    patches = []
    for item in datalist:
        if "location" not in item:
            patches.append(dict(item))
            continue
        (x, y, width, height), pixels = read_slide_region(
            item["image"], item["location"], item["size"], mpp, backend
        )
        mask = read_mask(item["label"], num_classes)
        if mask.shape != (height, width):
            raise InputDataError(
                item["label"], f"mask is {mask.shape[1]}x{mask.shape[0]} but the region is {width}x{height}"
            )
        mask = np.asarray(Image.fromarray(mask).resize(pixels.shape[:0:-1], Image.Resampling.NEAREST))
        stem = f"{file_stem(item['image'])}_x{x}_y{y}_{width}x{height}"
        patches.append(
            {
                "image": str(
                    write_png(np.ascontiguousarray(pixels.transpose(1, 2, 0)), output_dir / f"{stem}.png")
                ),
                "label": str(write_png(mask, output_dir / f"{stem}_mask.png")),
            }
        )
    return patches
