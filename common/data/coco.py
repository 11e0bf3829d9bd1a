"""Checked access to COCO annotation files, shared by every reader of COCO-format data.

Each helper raises :class:`~common.errors.InputDataError` naming the file and the entry at fault, so a
malformed file from an annotation tool is reported once and clearly, whatever the task.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from common.errors import InputDataError

__all__ = ["load_coco", "coco_records", "coco_field"]


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
