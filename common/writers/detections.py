"""Detections as a CSV with one row per cell, written image by image so a long run loses nothing.

The columns are those of the annotation CSV plus ``conf``, so a detections file can be opened in a
spreadsheet, drawn with :mod:`common.writers.detection_overlays`, or read back as annotations (pseudo
labels) by :func:`common.data.cytology.read_cell_csv`, which ignores the extra column.

A run writes ``detections_YYYYmmdd-HHMMSS.csv.partial``: the header at once, then every image's rows
in one write. :meth:`DetectionCSVWriter.close` renames it to ``.csv``. An interrupted run therefore
leaves a valid CSV holding every image finished so far, whose ``.partial`` suffix says it is incomplete.
Images without detections have no row.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy

from common.data.cytology import BETHESDA_CLASSES, parse_class, read_csv_rows
from common.errors import InputDataError
from common.utils import source_file

__all__ = [
    "DETECTION_COLUMNS",
    "PARTIAL_SUFFIX",
    "DetectionCSVWriter",
    "WriteDetectionsd",
    "detection_row",
    "read_detections_csv",
    "source_name",
]

logger = logging.getLogger(__name__)

DETECTION_COLUMNS = ("image_filename", "x", "y", "width", "height", "conf", "class")
PARTIAL_SUFFIX = ".partial"


def detection_row(
    image_filename: str, x: float, y: float, width: float, height: float, conf: float, class_name: str
) -> tuple[str, ...]:
    """One row of :data:`DETECTION_COLUMNS` as text: centres to 2 decimals, confidence to 4, box sides as
    short as they print; the one format of every detections CSV of the collection (images and slides)."""
    return (image_filename, f"{x:.2f}", f"{y:.2f}", f"{width:g}", f"{height:g}", f"{conf:.4f}", class_name)


class DetectionCSVWriter:
    """Append the detections of one image at a time to a new timestamped CSV.

    Args:
        output_dir: folder of the file, created if needed.
        prefix: file name start; the file is ``<prefix>_YYYYmmdd-HHMMSS.csv`` (``_1``, ``_2``... appended
            if a run in the same second already took the name).
        box_size: width and height written for every detection, in pixels (cells are points here).
        class_names: the classes in index order; rows carry the class name.

    Use it as a context manager, or call :meth:`close` at the end of the run (e.g. in a bundle's
    ``finalize``); the file keeps its ``.partial`` suffix until then.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        prefix: str = "detections",
        box_size: float = 100,
        class_names: Sequence[str] = BETHESDA_CLASSES,
    ) -> None:
        if box_size <= 0:
            raise ValueError(f"box_size must be positive, got {box_size}")
        self.box_size = box_size
        self.class_names = tuple(class_names)
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for attempt in itertools.count():
            path = output_dir / f"{prefix}_{stamp}{f'_{attempt}' if attempt else ''}.csv"
            partial = path.with_name(path.name + PARTIAL_SUFFIX)
            if path.exists():
                continue
            try:
                # unbuffered: an image's rows reach the file in one system call, not in buffer-sized pieces
                self._file = open(partial, "xb", buffering=0)  # noqa: SIM115 - open until close()
                break
            except FileExistsError:
                continue
        self.path, self.partial_path = path, partial
        self.n_images = 0
        self.n_detections = 0
        self._write_rows([DETECTION_COLUMNS])

    def _write_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        data = memoryview(text.getvalue().encode("utf-8"))
        while data:  # a raw file may take fewer bytes than offered (e.g. a full disk); write the rest
            data = data[self._file.write(data) :]

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (or the ``with`` block ended)."""
        return self._file.closed

    def write(
        self,
        image_filename: str,
        points: np.ndarray | torch.Tensor,
        scores: np.ndarray | torch.Tensor,
        class_indices: np.ndarray | torch.Tensor,
    ) -> None:
        """Write the rows of one image: ``points`` (K, 2) centres (x, y) in pixels, ``scores`` (K,) in
        [0, 1], ``class_indices`` (K,) into ``class_names``.

        Raises:
            ValueError: the writer is closed, the shapes disagree, or a class index is out of range.
        """
        if self.closed:
            raise ValueError(f"{self.path}: the writer is closed")
        points = convert_to_numpy(points, wrap_sequence=True).astype(np.float64)
        scores = convert_to_numpy(scores, wrap_sequence=True).astype(np.float64).reshape(-1)
        classes = convert_to_numpy(class_indices, wrap_sequence=True).astype(np.int64).reshape(-1)
        if points.size == 0:
            points = points.reshape(0, 2)
        if points.ndim != 2 or points.shape[1] != 2 or not len(points) == len(scores) == len(classes):
            raise ValueError(
                f"expected points (K, 2), scores (K,) and class_indices (K,), got shapes {points.shape}, "
                f"{scores.shape} and {classes.shape}"
            )
        if classes.size and (classes.min() < 0 or classes.max() >= len(self.class_names)):
            raise ValueError(
                f"class indices must lie in 0..{len(self.class_names) - 1}, got {classes.tolist()}"
            )
        size = self.box_size
        self._write_rows(
            [
                detection_row(image_filename, x, y, size, size, score, self.class_names[label])
                for (x, y), score, label in zip(points, scores, classes)
            ]
        )
        self.n_images += 1
        self.n_detections += len(points)

    def close(self) -> Path:
        """Flush to disk and give the file its final ``.csv`` name; does nothing if already closed."""
        if not self.closed:
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.partial_path, self.path)
            logger.info("wrote %d detections in %d images to %s", self.n_detections, self.n_images, self.path)
        return self.path

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the .partial name: the run did not finish
            self._file.close()


def read_detections_csv(
    path: str | os.PathLike, class_names: Sequence[str] = BETHESDA_CLASSES
) -> dict[str, dict[str, np.ndarray]]:
    """Detections per image file name, in file order: ``{"points": (K, 2) float32 (x, y), "boxes": (K, 4)
    float32 xyxy, "scores": (K,) float32, "labels": (K,) int64}``.

    A ``.partial`` file (an interrupted run) is read too, with a warning that it is incomplete.

    Raises:
        InputDataError: see :func:`common.data.cytology.read_csv_rows`; or, naming the line, a non-numeric
            value, a non-positive size, a confidence outside [0, 1], or an unknown class.
    """
    path = Path(path)
    rows = read_csv_rows(path, DETECTION_COLUMNS, allow_empty=True)
    if path.name.endswith(PARTIAL_SUFFIX):
        logger.warning("%s: the run that wrote it did not finish; its detections are incomplete", path)
    per_image: dict[str, list[tuple[float, ...]]] = {}
    for line, row in rows:
        try:
            x, y, width, height, conf = (float(row[key]) for key in ("x", "y", "width", "height", "conf"))
            label = parse_class(row["class"], class_names)
        except ValueError as err:
            raise InputDataError(path, f"line {line}: {err}") from None
        if not np.isfinite([x, y, width, height, conf]).all() or width <= 0 or height <= 0:
            raise InputDataError(path, f"line {line}: x, y must be finite and width, height positive")
        if not 0 <= conf <= 1:
            raise InputDataError(path, f"line {line}: conf must lie in [0, 1], got {conf:g}")
        per_image.setdefault(row["image_filename"], []).append((x, y, width, height, conf, label))
    detections = {}
    for name, values in per_image.items():
        table = np.asarray(values, dtype=np.float64)
        centres, half = table[:, :2], table[:, 2:4] / 2
        detections[name] = {
            "points": centres.astype(np.float32),
            "boxes": np.concatenate([centres - half, centres + half], axis=1).astype(np.float32),
            "scores": table[:, 4].astype(np.float32),
            "labels": table[:, 5].astype(np.int64),
        }
    return detections


def source_name(image: Any, image_key: Hashable, image_root: str | os.PathLike | None = None) -> str:
    """The file name an image was loaded from (its ``filename_or_obj``), relative to ``image_root`` when
    given, so that outputs name the image the way the annotation CSV does."""
    source = source_file(image)
    if source is None:
        raise ValueError(
            f"'{image_key}' carries no 'filename_or_obj' in its metadata, so its detections cannot be named; "
            "load it with LoadImaged so it is a MetaTensor that knows its source file"
        )
    if image_root is None:
        return Path(source).name
    try:
        return Path(source).resolve().relative_to(Path(image_root).resolve()).as_posix()
    except ValueError as err:
        raise ValueError(f"{source} is not inside image_root {image_root}") from err


class WriteDetectionsd(MapTransform):
    """Write each sample's decoded detections with a :class:`DetectionCSVWriter`, in an evaluator's or
    inferer's postprocessing after ``decollate_batch``; the data pass through unchanged.

    Args:
        keys: the keys of the points (K, 2), scores (K,) and class indices (K,), in that order.
        writer: the writer shared by the whole run; close it at the end (``finalize`` in a bundle).
        image_key: the ``MetaTensor`` image whose ``filename_or_obj`` names the rows.
        image_root: when set, rows name the image by its path relative to this folder, not its file name.
    """

    def __init__(
        self,
        keys: KeysCollection = ("points", "scores", "classes"),
        *,
        writer: DetectionCSVWriter,
        image_key: str = "image",
        image_root: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 3:
            raise ValueError(f"keys must name the points, scores and classes, got {self.keys}")
        self.writer = writer
        self.image_key = image_key
        self.image_root = image_root

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        name = source_name(d[self.image_key], self.image_key, self.image_root)
        points, scores, classes = (d[key] for key in self.keys)
        self.writer.write(name, points, scores, classes)
        return d
