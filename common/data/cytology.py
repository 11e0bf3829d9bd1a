"""Readers for cervical-cytology cell annotations: one CSV row (or COCO box) per cell, 8 Bethesda classes.

A dataset split is laid out as ``ROOT/<split>/images/*.png|jpg|tif`` with ``ROOT/<split>/annotations.csv``
(header ``image_filename,x,y,width,height,class``; ``x, y`` is the box centre in pixels, ``class`` a name
from the class list or its index) or ``ROOT/<split>/annotations.json`` in COCO format.

Readers return one datalist entry per image, ready for MONAI dictionary transforms::

    {"image": "/data/train/images/a.png", "boxes": (N, 4) float32 xyxy, "labels": (N,) int64, "name": "a.png"}

Only file headers are opened (for the image size), so a bad dataset fails in seconds with an
:class:`~common.errors.InputDataError` naming the file and, for CSV rows, the line.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.data.cell_readers import image_size
from common.data.coco import coco_field, coco_records, load_coco
from common.data.datalist import IMAGE_SUFFIXES
from common.errors import InputDataError
from common.utils import require_dir

__all__ = [
    "ANNOTATION_COLUMNS",
    "BETHESDA_CLASSES",
    "class_counts",
    "parse_class",
    "read_cell_csv",
    "read_coco_cells",
    "read_csv_rows",
    "read_split",
]

CYTOLOGY_REMEDY = (
    "lay your data out as DATASET_DIR/{train,val,test}/images with annotations.csv "
    "(image_filename,x,y,width,height,class) or a COCO annotations.json, or write demo smears with "
    "`python -m common.data.synthetic.smears --output DATASET_DIR`"
)

BETHESDA_CLASSES = ("NILM", "ENDO", "INFL", "ASCUS", "LSIL", "HSIL", "ASCH", "SCC")
ANNOTATION_COLUMNS = ("image_filename", "x", "y", "width", "height", "class")


def parse_class(value: str, class_names: Sequence[str]) -> int:
    """Index of ``value`` in ``class_names``: a name (case-insensitive) or an index written as an integer.

    Raises:
        ValueError: neither a known name nor an index in range; the message lists the allowed names.
    """
    text = value.strip()
    folded = [name.casefold() for name in class_names]
    if text.casefold() in folded:
        return folded.index(text.casefold())
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(class_names):
        return int(text)
    allowed = ", ".join(f"{i}={name}" for i, name in enumerate(class_names))
    raise ValueError(f"unknown class {value!r}; expected a name or index among {allowed}")


def read_csv_rows(
    path: str | os.PathLike, columns: Sequence[str], allow_empty: bool = False
) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` for every data row of a CSV whose header holds ``columns``.

    Column names are matched after stripping spaces; a UTF-8 byte-order mark (Excel) is ignored. Blank
    lines are skipped; other columns are kept in the rows but not checked.

    Args:
        path: the CSV file.
        columns: the columns every row must fill.
        allow_empty: accept a header without rows (a detection run that found nothing).

    Raises:
        InputDataError: missing or undecodable file, no header, a missing column (named), an empty value
            in one of ``columns`` (with its line), or no data rows unless ``allow_empty``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            header = next(reader, None)
            if header is None or not any(cell.strip() for cell in header):
                raise InputDataError(path, f"file is empty; expected the header {','.join(columns)}")
            names = [cell.strip() for cell in header]
            missing = [column for column in columns if column not in names]
            if missing:
                raise InputDataError(
                    path, f"missing column(s) {', '.join(missing)}; the header is {','.join(names)}"
                )
            rows = [
                (reader.line_num, dict(zip(names, (cell.strip() for cell in cells))))
                for cells in reader
                if any(cell.strip() for cell in cells)
            ]
    except UnicodeDecodeError as err:
        raise InputDataError(path, f"not a UTF-8 text file ({err})") from err
    except csv.Error as err:
        raise InputDataError(path, f"line {reader.line_num}: malformed CSV ({err})") from err
    if not rows and not allow_empty:
        raise InputDataError(path, "has a header but no data rows")
    for line, row in rows:
        blank = [column for column in columns if not row.get(column)]
        if blank:
            raise InputDataError(path, f"line {line}: no value for {', '.join(blank)}")
    return rows


def _number(row: Mapping[str, str], column: str, path: Path, line: int) -> float:
    try:
        value = float(row[column])
    except ValueError:
        raise InputDataError(path, f"line {line}: {column} must be a number, got {row[column]!r}") from None
    if not math.isfinite(value):
        raise InputDataError(path, f"line {line}: {column} must be finite, got {row[column]!r}")
    return value


class _ImageSizes:
    """Image sizes from file headers, each read once; a missing image is reported against ``source``."""

    def __init__(self, image_dir: Path) -> None:
        self.image_dir = image_dir
        self._sizes: dict[str, tuple[int, int]] = {}

    def __call__(self, name: str, source: Path, where: str) -> tuple[int, int]:
        if name not in self._sizes:
            path = self.image_dir / name
            if not path.is_file():
                raise InputDataError(source, f"{where}: image {name!r} not found in {self.image_dir}")
            try:
                self._sizes[name] = image_size(path)
            except InputDataError as err:
                problem = f"{err.problem} (referenced by {source}, {where})"
                raise InputDataError(path, problem, err.remedy) from err
        return self._sizes[name]


def _check_box(
    centre: tuple[float, float], box_size: tuple[float, float], hw: tuple[int, int], source: Path, where: str
) -> None:
    (x, y), (width, height), (image_height, image_width) = centre, box_size, hw
    if width <= 0 or height <= 0:
        raise InputDataError(source, f"{where}: width and height must be positive, got {width:g}x{height:g}")
    if not (0 <= x < image_width and 0 <= y < image_height):
        raise InputDataError(
            source,
            f"{where}: box centre ({x:g}, {y:g}) lies outside its {image_width}x{image_height} image",
        )


def _image_names(image_dir: Path) -> list[str]:
    """Image files directly in ``image_dir``, hidden files (such as macOS ``._*`` forks) skipped."""
    return sorted(
        p.name
        for p in image_dir.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def _datalist(
    image_dir: Path,
    cells: Mapping[str, list[tuple[float, float, float, float, int]]],
    extra_names: Iterable[str],
) -> list[dict[str, Any]]:
    """Datalist entries sorted by image name; ``cells`` maps a name to (x, y, width, height, class) tuples."""
    entries = []
    for name in sorted(set(cells) | set(extra_names)):
        rows = np.asarray(cells.get(name, []), dtype=np.float64).reshape(-1, 5)
        centres, half = rows[:, :2], rows[:, 2:4] / 2
        entries.append(
            {
                "image": str(image_dir / name),
                "boxes": np.concatenate([centres - half, centres + half], axis=1).astype(np.float32),
                "labels": rows[:, 4].astype(np.int64),
                "name": name,
            }
        )
    return entries



def read_cell_csv(
    csv_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    class_names: Sequence[str] = BETHESDA_CLASSES,
    include_empty: bool = True,
) -> list[dict[str, Any]]:
    """Datalist of a cell-annotation CSV (one row per cell), sorted by image name.

    Boxes are ``(x - width/2, y - height/2, x + width/2, y + height/2)``, not clipped to the image: a cell
    on the border keeps its centre, which is what the detector learns.

    Args:
        csv_file: CSV with the columns ``image_filename,x,y,width,height,class`` (others are ignored, so a
            detections CSV reads as annotations too).
        image_dir: folder holding the images; ``image_filename`` is relative to it.
        class_names: the classes in index order.
        include_empty: also return the images of ``image_dir`` that have no row, with zero cells. A CSV
            cannot otherwise say that an image holds no cell, and such images teach the detector what
            background looks like; set ``False`` when the folder also holds images not yet annotated.

    Raises:
        InputDataError: see :func:`read_csv_rows`; or, naming the line, an unknown class, a missing or
            unreadable image, a non-numeric coordinate, a non-positive size, a centre outside the image.
    """
    csv_file = Path(csv_file)
    image_dir = require_dir(image_dir, "image folder")
    sizes = _ImageSizes(image_dir)
    cells: dict[str, list[tuple[float, float, float, float, int]]] = {}
    for line, row in read_csv_rows(csv_file, ANNOTATION_COLUMNS):
        where = f"line {line}"
        try:
            label = parse_class(row["class"], class_names)
        except ValueError as err:
            raise InputDataError(csv_file, f"{where}: {err}") from None
        x, y, width, height = (_number(row, key, csv_file, line) for key in ("x", "y", "width", "height"))
        name = Path(row["image_filename"]).as_posix()
        _check_box((x, y), (width, height), sizes(name, csv_file, where), csv_file, where)
        cells.setdefault(name, []).append((x, y, width, height, label))
    return _datalist(image_dir, cells, _image_names(image_dir) if include_empty else ())


def read_coco_cells(
    annotation_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    class_names: Sequence[str] = BETHESDA_CLASSES,
    include_empty: bool = True,
) -> list[dict[str, Any]]:
    """Datalist of a COCO detection file, sorted by image name; ``bbox`` ``[x, y, w, h]`` becomes xyxy.

    Categories are matched to ``class_names`` by name (case-insensitive), whatever their ids.

    Args:
        annotation_file: COCO JSON with ``images`` (``id``, ``file_name``), ``annotations`` (``image_id``,
            ``category_id``, ``bbox``) and ``categories`` (``id``, ``name``).
        image_dir: folder holding the images; ``file_name`` is relative to it.
        class_names: the classes in index order.
        include_empty: also return the images listed in the JSON that have no annotation.

    Raises:
        InputDataError: malformed JSON, no annotations, an unknown category name, image or category id,
            a missing image or one whose size differs from the JSON's, a malformed or non-positive box,
            or a box centre outside its image; each names the annotation id.
    """
    path = Path(annotation_file)
    image_dir = require_dir(image_dir, "image folder")
    coco = load_coco(path)
    images, annotations, categories = (
        coco_records(coco, key, path) for key in ("images", "annotations", "categories")
    )
    if not annotations:
        raise InputDataError(path, "has no annotations")

    category_index: dict[Any, int] = {}
    for category in categories:
        name = str(coco_field(category, "name", path, "a category"))
        category_id = coco_field(category, "id", path, f"category {name!r}")
        try:
            category_index[category_id] = parse_class(name, class_names)
        except ValueError as err:
            raise InputDataError(path, f"category {name!r}: {err}") from None

    sizes = _ImageSizes(image_dir)
    names: dict[Any, str] = {}
    for record in images:
        image_id = coco_field(record, "id", path, "an image entry")
        name = Path(str(coco_field(record, "file_name", path, f"image {image_id}"))).as_posix()
        height, width = sizes(name, path, f"image {image_id}")
        if (record.get("height", height), record.get("width", width)) != (height, width):
            raise InputDataError(
                path,
                f"image {image_id} ({name}) is {record['width']}x{record['height']} in the JSON "
                f"but {width}x{height} on disk",
            )
        names[image_id] = name

    cells: dict[str, list[tuple[float, float, float, float, int]]] = {}
    for ann in annotations:
        where = f"annotation {ann.get('id', '?')}"
        image_id, category_id, bbox = (
            coco_field(ann, key, path, where) for key in ("image_id", "category_id", "bbox")
        )
        if image_id not in names:
            raise InputDataError(path, f"{where} refers to unknown image_id {image_id!r}")
        if category_id not in category_index:
            raise InputDataError(path, f"{where} refers to unknown category_id {category_id!r}")
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
        ):
            raise InputDataError(path, f"{where}: bbox must be [x, y, width, height] numbers, got {bbox!r}")
        x0, y0, width, height = (float(v) for v in bbox)
        centre = (x0 + width / 2, y0 + height / 2)
        _check_box(centre, (width, height), sizes(names[image_id], path, where), path, where)
        cells.setdefault(names[image_id], []).append((*centre, width, height, category_index[category_id]))
    return _datalist(image_dir, cells, names.values() if include_empty else ())


def read_split(
    root: str | os.PathLike,
    split: str,
    class_names: Sequence[str] = BETHESDA_CLASSES,
    include_empty: bool = True,
) -> list[dict[str, Any]]:
    """Datalist of ``root/split``: its ``images`` folder with ``annotations.csv`` or a COCO
    ``annotations.json``.

    Raises:
        InputDataError: the split folder, its images or its annotation file is missing, both annotation
            files are present (which one is meant is unclear), or the reader refuses the file.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise InputDataError(
            folder, f"split folder not found; expected {folder}/images and annotations.csv", CYTOLOGY_REMEDY
        )
    csv_file, json_file = folder / "annotations.csv", folder / "annotations.json"
    if csv_file.is_file() and json_file.is_file():
        raise InputDataError(folder, "holds both annotations.csv and annotations.json; keep one")
    if csv_file.is_file():
        return read_cell_csv(csv_file, folder / "images", class_names, include_empty)
    if json_file.is_file():
        return read_coco_cells(json_file, folder / "images", class_names, include_empty)
    raise InputDataError(folder, "no annotations.csv or annotations.json found")


def class_counts(datalist: Iterable[Mapping[str, Any]], n_classes: int) -> np.ndarray:
    """Number of cells of each class over a datalist, as an ``(n_classes,)`` int64 array.

    Raises:
        ValueError: a label is negative or not below ``n_classes``.
    """
    labels = [np.asarray(entry["labels"], dtype=np.int64).reshape(-1) for entry in datalist]
    labels_all = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    if labels_all.size and (labels_all.min() < 0 or labels_all.max() >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}, got {labels_all.min()}..{labels_all.max()}")
    return np.bincount(labels_all, minlength=n_classes).astype(np.int64)
