"""Binary lesion masks to COCO instance annotations, for detection models such as Mask R-CNN.

Each 8-connected lesion of a mask becomes one annotation: a dermoscopy image may show two lesions,
and a detector must learn them as two objects. Segmentations are written as compressed RLE by
default (exact, holes included) or as polygons (what some annotation tools require; polygons
cannot hold holes, so a lesion's holes are filled in them).

Command line::

    python -m common.data.mask_to_coco --images data/ISIC2018_Task1-2_Training_Input \\
        --masks data/ISIC2018_Task1_Training_GroundTruth --format isic --output data/isic_coco
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage
from skimage import measure

from common.data.cell_readers import image_size
from common.data.dermoscopy import read_binary_mask, read_image_mask_folders, read_isic_folder
from common.errors import InputDataError
from common.io.atomic import atomic_write

__all__ = [
    "SEGMENTATION_FORMATS",
    "build_coco",
    "main",
    "mask_to_instances",
    "split_and_write",
    "split_indices",
]

SEGMENTATION_FORMATS = ("rle", "polygon")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_POLYGON_TOLERANCE = 0.5  # pixels: drops collinear contour points without moving the outline visibly


def _polygons(component: np.ndarray, x0: int, y0: int) -> list[list[float]]:
    """Outer outlines of one component, cropped at column ``x0`` and row ``y0``, as COCO flat
    ``[x1, y1, x2, y2, ...]`` lists in image coordinates.

    The mask is padded so that outlines along the image border close, holes are filled so that only
    outer outlines remain, and ``fully_connected="high"`` keeps diagonal neighbours in one outline,
    as in the 8-connected labelling.
    """
    padded = np.pad(ndimage.binary_fill_holes(component), 1).astype(np.float32)
    polygons = []
    for contour in measure.find_contours(padded, 0.5, fully_connected="high"):
        contour = measure.approximate_polygon(contour, _POLYGON_TOLERANCE)[:-1]  # closed: last == first
        if len(contour) >= 3:
            # (row, col) of pixel centres in the padded crop -> COCO (x, y), where pixel (0, 0) spans [0, 1)
            xy = contour[:, ::-1] + (x0 - 0.5, y0 - 0.5)
            polygons.append(np.round(xy, 2).ravel().tolist())
    return polygons


def mask_to_instances(mask: np.ndarray, min_area: int = 0) -> list[dict[str, Any]]:
    """One record per 8-connected lesion of ``mask`` (HxW bool), in label order.

    Each record holds ``bbox`` ([x, y, width, height] in pixels), ``area`` (pixel count), ``rle``
    (compressed COCO RLE with ``counts`` as str, ready for JSON) and ``polygons``.
    Lesions smaller than ``min_area`` pixels (annotation specks) are dropped.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != bool:
        raise ValueError(f"mask must be a 2-D bool array, got shape {mask.shape} and dtype {mask.dtype}")
    if min_area < 0:
        raise ValueError(f"min_area must be >= 0, got {min_area}")
    labels, _ = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    instances = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        rows, cols = box
        component = labels == index
        area = int(np.count_nonzero(component[box]))
        if area < min_area:
            continue
        rle = mask_utils.encode(np.asfortranarray(component, dtype=np.uint8))
        rle["counts"] = rle["counts"].decode("ascii")
        instances.append(
            {
                "bbox": [cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start],
                "area": area,
                "rle": rle,
                "polygons": _polygons(component[box], cols.start, rows.start),
            }
        )
    return instances


def _file_name(image: str, image_root: Path | None) -> str:
    """The COCO ``file_name``: relative to ``image_root`` when given, so the JSON moves with the data."""
    if image_root is None:
        return image
    try:
        return Path(image).resolve().relative_to(image_root.resolve()).as_posix()
    except ValueError as err:
        raise InputDataError(image, f"image is not inside the image root {image_root}") from err


def build_coco(
    entries: Sequence[dict[str, str]],
    category_names: Sequence[str] = ("lesion",),
    segmentation: str = "rle",
    image_root: str | os.PathLike | None = None,
    min_area: int = 0,
) -> dict[str, Any]:
    """A COCO instance-segmentation dict from ``{"image", "mask"}`` entries (as the dermoscopy readers
    return them).

    Every lesion takes the entry's ``"category"`` (one of ``category_names``, e.g. a diagnosis from the
    ISIC metadata) or else the first category. Images with an empty mask are listed without
    annotations, so a detector also sees lesion-free examples. Ids start at 1.

    Args:
        segmentation: ``"rle"`` (exact) or ``"polygon"`` (holes filled).
        image_root: write ``file_name`` relative to this folder (as torchvision's ``CocoDetection``
            expects); by default the image paths are written as given.
        min_area: drop lesions smaller than this many pixels.

    Raises:
        InputDataError: an unreadable image or mask, a non-binary mask, a mask of another size than its
            image, or an unknown category.
    """
    if segmentation not in SEGMENTATION_FORMATS:
        raise ValueError(f"segmentation must be one of {SEGMENTATION_FORMATS}, got {segmentation!r}")
    if not category_names:
        raise ValueError("category_names must name at least one category")
    category_ids = {name: i for i, name in enumerate(category_names, start=1)}
    root = None if image_root is None else Path(image_root)
    images, annotations = [], []
    for image_id, entry in enumerate(entries, start=1):
        height, width = image_size(entry["image"])
        mask = read_binary_mask(entry["mask"])
        if mask.shape != (height, width):
            raise InputDataError(
                entry["mask"], f"mask is {mask.shape[0]}x{mask.shape[1]} but its image is {height}x{width}"
            )
        category = entry.get("category", category_names[0])
        if category not in category_ids:
            raise InputDataError(
                entry["image"], f"category {category!r} is not one of {list(category_names)}"
            )
        images.append(
            {"id": image_id, "file_name": _file_name(entry["image"], root), "height": height, "width": width}
        )
        for instance in mask_to_instances(mask, min_area):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_ids[category],
                    "bbox": instance["bbox"],
                    "area": instance["area"],
                    "segmentation": instance["rle"] if segmentation == "rle" else instance["polygons"],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i, "name": name} for name, i in category_ids.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Sorted (train, val) indices of ``n`` items from a seeded permutation; with two or more items,
    each split gets at least one."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    n_val = min(max(round(n * val_fraction), 1), n - 1) if n >= 2 else 0
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def _write_json(path: Path, content: dict[str, Any]) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(content).encode("utf-8")))


def split_and_write(
    entries: Sequence[dict[str, str]],
    output_dir: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    **build_kwargs: Any,
) -> tuple[Path, Path]:
    """Split ``entries`` by a seeded permutation and write ``train.json`` and ``val.json`` (each
    atomically) in ``output_dir``; ``build_kwargs`` go to :func:`build_coco`.

    Both files are built before either is written, so a bad mask leaves earlier outputs untouched.
    """
    if not entries:
        raise ValueError("no entries to convert")
    train, val = split_indices(len(entries), val_fraction, seed)
    train_coco = build_coco([entries[i] for i in train], **build_kwargs)
    val_coco = build_coco([entries[i] for i in val], **build_kwargs)
    output_dir = Path(output_dir)
    return _write_json(output_dir / "train.json", train_coco), _write_json(output_dir / "val.json", val_coco)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: read a dermoscopy dataset and write COCO ``train.json``/``val.json``."""
    parser = argparse.ArgumentParser(
        prog="python -m common.data.mask_to_coco", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--masks", help="mask folder (default: the image folder)")
    parser.add_argument("--format", choices=("isic", "folders"), default="isic", help="dataset layout")
    parser.add_argument("--mask-suffix", default="", help="folders layout: mask name is NAME<suffix>.png")
    parser.add_argument("--output", required=True, help="folder for train.json and val.json")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-area", type=int, default=0, help="drop lesions smaller than this (pixels)")
    parser.add_argument("--polygons", action="store_true", help="write polygons instead of RLE")
    args = parser.parse_args(argv)
    try:
        if args.format == "isic":
            entries = read_isic_folder(args.images, args.masks)
        else:
            entries = read_image_mask_folders(args.images, args.masks or args.images, args.mask_suffix)
        paths = split_and_write(
            entries,
            args.output,
            args.val_fraction,
            args.seed,
            segmentation="polygon" if args.polygons else "rle",
            image_root=args.images,
            min_area=args.min_area,
        )
    except InputDataError as err:
        raise SystemExit(f"error: {err}") from err
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
