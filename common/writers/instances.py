"""Writers for instance segmentation results: label images, overlays and per-cell tables.

Inference must leave files a user can open in Fiji, QuPath or a spreadsheet: the labels as a 16-bit
TIFF (the Cell Tracking Challenge format) or PNG, an RGB overlay to check the result by eye, and a CSV
with one row per cell. Every file is written to a temporary name in its folder and then renamed, so an
interrupted run never leaves a truncated file that looks complete.
"""

from __future__ import annotations

import io
import os
from collections.abc import Hashable, Mapping
from csv import writer as csv_writer
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from PIL import Image
from skimage.measure import regionprops_table
from skimage.segmentation import find_boundaries

from common.io.atomic import atomic_write
from common.utils import as_plane, file_stem, source_file
from common.writers.display import display_rgb, golden_ratio_colours, write_png

__all__ = [
    "CELL_TABLE_COLUMNS",
    "SaveInstanceOutputsd",
    "source_stem",
    "write_cell_table",
    "write_instance_labels",
    "write_overlay",
]

CELL_TABLE_COLUMNS = (
    "id",
    "area",
    "centroid_y",
    "centroid_x",
    "bbox_min_y",
    "bbox_min_x",
    "bbox_max_y",
    "bbox_max_x",
)
_FILL_OPACITY = 0.3


def _label_array(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Instance labels as a 2-D int64 array, a leading channel axis of size 1 dropped."""
    labels = as_plane(labels, "instance labels")
    if labels.size and labels.min() < 0:
        raise ValueError("instance labels must be non-negative")
    return labels.astype(np.int64, copy=False)


def write_instance_labels(labels: np.ndarray | torch.Tensor, path: str | os.PathLike) -> Path:
    """Write instance labels as ``.tif``/``.tiff`` (uint16, or int32 beyond 65535 cells) or 16-bit ``.png``.

    Raises:
        ValueError: the suffix is not one of these, or a PNG would need more than 65535 ids.
    """
    path = Path(path)
    labels = _label_array(labels)
    max_id = int(labels.max(initial=0))
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        data = labels.astype(np.uint16 if max_id <= np.iinfo(np.uint16).max else np.int32)
        return atomic_write(path, lambda f: tifffile.imwrite(f, data, compression="zlib"))
    if suffix == ".png":
        if max_id > np.iinfo(np.uint16).max:
            raise ValueError(f"{path}: a 16-bit PNG holds at most 65535 instances, got id {max_id}; use .tif")
        image = Image.fromarray(labels.astype(np.uint16))
        return atomic_write(path, lambda f: image.save(f, format="PNG"))
    raise ValueError(f"{path}: instance labels are written as .tif, .tiff or .png, not {path.suffix!r}")



def write_overlay(
    image: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, path: str | os.PathLike
) -> Path:
    """Write an RGB PNG of ``image`` with each instance lightly filled and outlined in its own colour.

    The image may be normalised (e.g. ImageNet mean/std): each channel is stretched to 0..255 first.

    Raises:
        ValueError: image and labels differ in height and width.
    """
    labels = _label_array(labels)
    rgb = display_rgb(image, stretch=True).astype(np.float64)
    if rgb.shape[:2] != labels.shape:
        raise ValueError(f"{path}: image is {rgb.shape[:2]} but instance labels are {labels.shape}")
    colours = golden_ratio_colours(int(labels.max(initial=0)) + 1)[labels]
    cells = labels > 0
    rgb[cells] = (1.0 - _FILL_OPACITY) * rgb[cells] + _FILL_OPACITY * colours[cells]
    edges = find_boundaries(labels, mode="inner")
    rgb[edges] = colours[edges]
    return write_png(rgb.round().astype(np.uint8), path)


def write_cell_table(labels: np.ndarray | torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a CSV with one row per instance: id, area, centroid and bounding box in pixels.

    Bounding boxes follow the Python slice convention: ``bbox_max_*`` is one past the last pixel.
    """
    labels = _label_array(labels)
    props = regionprops_table(labels, properties=("label", "area", "centroid", "bbox"))
    columns = zip(
        props["label"],
        props["area"],
        props["centroid-0"],
        props["centroid-1"],
        props["bbox-0"],
        props["bbox-1"],
        props["bbox-2"],
        props["bbox-3"],
    )
    text = io.StringIO()
    writer = csv_writer(text, lineterminator="\n")
    writer.writerow(CELL_TABLE_COLUMNS)
    for cell_id, area, cy, cx, y0, x0, y1, x1 in columns:
        writer.writerow([int(cell_id), int(area), f"{cy:.3f}", f"{cx:.3f}", *map(int, (y0, x0, y1, x1))])
    return atomic_write(path, lambda f: f.write(text.getvalue().encode("utf-8")))


def source_stem(image: Any, image_key: Hashable) -> tuple[Path, str]:
    """The source file of ``image`` and its name without extension (``.ome.tif``/``.nii.gz`` included)."""
    source = source_file(image)
    if source is None:
        raise ValueError(
            f"'{image_key}' carries no 'filename_or_obj' in its metadata, so output files cannot be named; "
            "load it with LoadImaged so it is a MetaTensor that knows its source file"
        )
    return Path(source), file_stem(source)


class SaveInstanceOutputsd(MapTransform):
    """Write the instance labels of each sample, with an overlay and a per-cell CSV, named after its image.

    Runs in an inference or evaluation postprocessing chain after ``decollate_batch``: it expects the
    (1, H, W) labels under ``keys`` and the (C, H, W) ``MetaTensor`` image, whose ``filename_or_obj``
    gives the file names: ``<stem>_<output_postfix>.tif|png``, ``<stem>_overlay.png`` and
    ``<stem>_cells.csv``. The data are returned unchanged, with the label file's path added under
    ``"<key>_path"``.

    Args:
        keys: the one key holding instance labels.
        output_dir: folder receiving the files.
        image_key: key of the image the labels were predicted from.
        label_format: ``"tif"`` (16-bit TIFF, the Cell Tracking Challenge format) or ``"png"`` (16-bit).
        overlay: also write the RGB overlay.
        csv: also write the per-cell table.
        output_postfix: appended to the image stem in the label file name.
        data_root_dir: when set, an image's folder relative to it is recreated under ``output_dir``, so
            images with the same name in different folders (``01/t000.tif``, ``02/t000.tif``) do not
            overwrite each other's outputs.
        allow_missing_keys: do not fail when the label key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection = "instances",
        output_dir: str | os.PathLike = "./outputs",
        image_key: str = "image",
        label_format: str = "tif",
        overlay: bool = True,
        csv: bool = True,
        output_postfix: str = "instances",
        data_root_dir: str | os.PathLike | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"SaveInstanceOutputsd writes one label key per instance, got keys {self.keys}")
        if label_format not in ("tif", "png"):
            raise ValueError(f"label_format must be 'tif' or 'png', got {label_format!r}")
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.label_format = label_format
        self.overlay = overlay
        self.csv = csv
        self.output_postfix = output_postfix
        self.data_root_dir = None if data_root_dir is None else Path(data_root_dir).resolve()

    def _folder_for(self, source: Path) -> Path:
        if self.data_root_dir is None:
            return self.output_dir
        try:
            return self.output_dir / source.resolve().parent.relative_to(self.data_root_dir)
        except ValueError as err:
            raise ValueError(f"{source} is not inside data_root_dir {self.data_root_dir}") from err

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[self.image_key]
            source, stem = source_stem(image, self.image_key)
            folder = self._folder_for(source)
            label_name = f"{stem}_{self.output_postfix}.{self.label_format}"
            label_path = write_instance_labels(d[key], folder / label_name)
            if self.overlay:
                write_overlay(image, d[key], folder / f"{stem}_overlay.png")
            if self.csv:
                write_cell_table(d[key], folder / f"{stem}_cells.csv")
            d[f"{key}_path"] = str(label_path)
        return d
