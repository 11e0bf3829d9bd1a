"""Checked access to COCO annotation files, shared by every reader of COCO-format data.

Each helper raises :class:`~common.errors.InputDataError` naming the file and the entry at fault, so a
malformed file from an annotation tool is reported once and clearly, whatever the task.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from common.errors import InputDataError

__all__ = ["check_segmentation", "coco_field", "coco_records", "load_coco", "segmentation_to_rle"]


def load_coco(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed JSON object of a COCO file."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "file not found")
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputDataError(path, f"not valid JSON ({err})") from err
    if not isinstance(coco, dict):
        raise InputDataError(path, "not a COCO annotation file: top level is not an object")
    return coco


def coco_records(coco: dict[str, Any], key: str, path: str | os.PathLike) -> list[dict[str, Any]]:
    """``coco[key]`` ("images", "annotations", "categories") as a list of objects.

    LIVECell's per-cell-type files store records as ``{id: record}``; those are accepted too.
    """
    if key not in coco:
        raise InputDataError(path, f'not a COCO annotation file: no "{key}" entry')
    value = coco[key]
    records = list(value.values()) if isinstance(value, dict) else value
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise InputDataError(path, f'"{key}" must be a list of objects')
    return records


def coco_field(record: dict[str, Any], key: str, path: str | os.PathLike, what: str) -> Any:
    """``record[key]``, where ``what`` names the record in the error (e.g. ``"annotation 12"``)."""
    if key not in record:
        raise InputDataError(path, f'{what} has no "{key}"')
    return record[key]


def _is_polygon(polygon: Any) -> bool:
    """A flat ``[x1, y1, x2, y2, ...]`` list of at least 3 points (pycocotools reads 2 points as a box)."""
    return (
        isinstance(polygon, list)
        and len(polygon) >= 6
        and len(polygon) % 2 == 0
        and all(isinstance(v, (int, float)) for v in polygon)
    )


def check_segmentation(segmentation: Any, height: int, width: int, path: str | os.PathLike, what: str) -> None:
    """Refuse a ``segmentation`` that is neither polygons nor an RLE of its image's size; ``what`` names
    the annotation in the error (e.g. ``"annotation 12"``)."""
    if isinstance(segmentation, list) and segmentation and all(_is_polygon(p) for p in segmentation):
        return
    if not (isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, list))):
        raise InputDataError(
            path,
            f"{what}: segmentation must be polygons (flat [x1, y1, x2, y2, ...] lists of at least "
            'three points) or an RLE object with "counts" and "size"',
        )
    if list(segmentation.get("size") or []) != [height, width]:
        raise InputDataError(
            path, f"{what}: RLE size {segmentation.get('size')} differs from its image's [{height}, {width}]"
        )


def segmentation_to_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """A checked COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as one compressed RLE;
    the polygons of one object are merged."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation
