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
from monai.data import MetaTensor
from monai.transforms import MapTransform
from PIL import Image
from skimage.color import hsv2rgb
from skimage.measure import regionprops_table
from skimage.segmentation import find_boundaries

from common.io.atomic import atomic_write

__all__ = [
    "CELL_TABLE_COLUMNS",
    "write_instance_labels",
    "write_overlay",
    "write_cell_table",
    "SaveInstanceOutputsd",
    "source_stem",
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
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895


def _label_array(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Instance labels as a 2-D int64 array, a leading channel axis of size 1 dropped."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim == 3 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.ndim != 2:
        raise ValueError(f"instance labels must have shape (H, W) or (1, H, W), got {labels.shape}")
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


def _display_rgb(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """An (H, W, 3) uint8 view of an image of any intensity range, each channel stretched to 0..255.

    Accepts (H, W), channel-first (C, H, W) as MONAI transforms produce, or channel-last (H, W, C), with
    C from 1 to 4; one channel is shown as gray, two as red and green, a fourth (alpha) is ignored.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        image = image[..., None]
    elif image.ndim == 3 and image.shape[0] <= 4 and image.shape[-1] > 4:
        image = np.moveaxis(image, 0, -1)
    if image.ndim != 3 or not 1 <= image.shape[-1] <= 4:
        raise ValueError(
            f"expected an image of shape (H, W), (C, H, W) or (H, W, C) with C <= 4, got {image.shape}"
        )
    image = image[..., :3]
    low = image.min(axis=(0, 1), keepdims=True)
    span = image.max(axis=(0, 1), keepdims=True) - low
    image = np.divide(image - low, span, out=np.zeros_like(image), where=span > 0) * 255.0
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 2:
        image = np.concatenate([image, np.zeros_like(image[..., :1])], axis=-1)
    return image.round().astype(np.uint8)


def _instance_colours(n: int) -> np.ndarray:
    """(n + 1, 3) RGB colours in 0..255, background first; golden-ratio hue steps keep neighbours apart."""
    hues = (np.arange(n + 1) * _GOLDEN_RATIO_CONJUGATE) % 1.0
    hsv = np.stack([hues, np.full_like(hues, 0.85), np.ones_like(hues)], axis=-1)
    return hsv2rgb(hsv[None])[0] * 255.0


def write_overlay(
    image: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, path: str | os.PathLike
) -> Path:
    """Write an RGB PNG of ``image`` with each instance lightly filled and outlined in its own colour.

    The image may be normalised (e.g. ImageNet mean/std): each channel is stretched to 0..255 first.

    Raises:
        ValueError: image and labels differ in height and width.
    """
    labels = _label_array(labels)
    rgb = _display_rgb(image).astype(np.float64)
    if rgb.shape[:2] != labels.shape:
        raise ValueError(f"{path}: image is {rgb.shape[:2]} but instance labels are {labels.shape}")
    colours = _instance_colours(int(labels.max(initial=0)))[labels]
    cells = labels > 0
    rgb[cells] = (1.0 - _FILL_OPACITY) * rgb[cells] + _FILL_OPACITY * colours[cells]
    edges = find_boundaries(labels, mode="inner")
    rgb[edges] = colours[edges]
    overlay = Image.fromarray(rgb.round().astype(np.uint8))
    return atomic_write(path, lambda f: overlay.save(f, format="PNG"))


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
    source = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source):
        raise ValueError(
            f"'{image_key}' carries no 'filename_or_obj' in its metadata, so output files cannot be named; "
            "load it with LoadImaged so it is a MetaTensor that knows its source file"
        )
    source = Path(source)
    stem = Path(source.stem)
    if stem.suffix.lower() in (".ome", ".nii"):
        stem = Path(stem.stem)
    return source, stem.name


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
