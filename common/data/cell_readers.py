"""Readers for the cell-segmentation formats users bring: LIVECell (COCO JSON), Cellpose folders, and
plain image/label folder pairs.

Each reader returns :class:`CellSample` records after checking only file headers, so a converter can
count samples and sizes, and a bad dataset fails in seconds, before any pixels are decoded. Every
problem is raised as :class:`~common.errors.InputDataError` naming the file at fault.

Pixel conventions shared by all formats:

* images become HxWx3 ``uint8``: greyscale is repeated to three channels, alpha is dropped, and
  16-bit or float images are mapped to 0..255 between their own 0.5 and 99.5 percentiles (robust to
  a few hot pixels; microscopy bit depths and exposure vary too much for one fixed scale);
* labels become HxW ``int32`` instance ids, 0 = background. A label image holding a single
  foreground value in several separate regions is a *binary* mask, not instances: it is relabelled
  by connected components (4-connectivity) with a logged warning, so touching cells in it merge.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from common.data.coco import (
    check_segmentation,
    coco_field,
    coco_records,
    load_coco,
    segmentation_to_rle,
)
from common.errors import InputDataError
from common.utils import require_dir

__all__ = [
    "IMAGE_SUFFIXES",
    "LABEL_SUFFIXES",
    "CellSample",
    "image_size",
    "rasterize_coco_instances",
    "read_cellpose_folder",
    "read_image",
    "read_image_label_folders",
    "read_label_image",
    "read_livecell",
    "scale_to_uint8",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
LABEL_SUFFIXES = (".png", ".tif", ".tiff")
_TIFF_SUFFIXES = (".tif", ".tiff")
_LOW_PERCENTILE, _HIGH_PERCENTILE = 0.5, 99.5
# PIL modes whose pixels NumPy takes as they are (16-bit greyscale "I;16*" too); others go via RGB.
_NUMPY_MODES = ("1", "L", "LA", "I", "F", "RGB", "RGBA", "P")


@dataclass(frozen=True)
class CellSample:
    """One image and its instance labels, not yet loaded.

    Attributes:
        name: sample name, unique within a dataset (used for output file names).
        image_path: the image file.
        label_path: where the labels come from (a mask image, or the COCO JSON), named in errors.
        size: (height, width) from the file headers.
        read_labels: returns the HxW int32 labels.
    """

    name: str
    image_path: Path
    label_path: Path
    size: tuple[int, int]
    read_labels: Callable[[], np.ndarray] = field(repr=False, compare=False)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(image HxWx3 uint8, labels HxW int32), checked to be the same size."""
        image = read_image(self.image_path)
        labels = self.read_labels()
        if image.shape[:2] != labels.shape:
            raise InputDataError(
                self.image_path,
                f"image is {_hw(image.shape)} but its labels in {self.label_path} are {_hw(labels.shape)}",
            )
        return image, labels


def _hw(shape: Sequence[int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _require_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "file not found")
    return path



def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image or label file, read from its header only."""
    path = _require_file(path)
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                return series.shape[series.axes.index("Y")], series.shape[series.axes.index("X")]
        with Image.open(path) as img:
            width, height = img.size
            return height, width
    except (OSError, ValueError, IndexError) as err:
        raise InputDataError(path, f"not a readable image ({err})") from err


def _read_tiff(path: Path) -> np.ndarray:
    """TIFF pixels as HxW or HxWxC; singleton page/time/depth axes are dropped, real stacks refused."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        pixels, axes = series.asarray(), series.axes
    keep = []
    for name, length in zip(axes, pixels.shape):
        if name in "YXSC":
            keep.append(name)
        elif length == 1:
            pixels = np.take(pixels, 0, axis=len(keep))
        else:
            raise InputDataError(
                path, f"is a stack of shape {pixels.shape} (axes {axes}); expected one 2-D image"
            )
    channel_axes = [i for i, name in enumerate(keep) if name in "SC"]
    if len(channel_axes) > 1:
        raise InputDataError(
            path, f"has shape {pixels.shape} (axes {axes}); expected at most one channel axis"
        )
    if channel_axes:
        pixels = np.moveaxis(pixels, channel_axes[0], -1)
    return pixels


def _read_pixels(path: str | os.PathLike, palette_to_rgb: bool) -> np.ndarray:
    """Raw pixels as HxW or HxWxC in the file's own dtype. A palette PNG gives its indices unless
    ``palette_to_rgb`` (label PNGs are often palette images whose index is the cell id)."""
    path = _require_file(path)
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            pixels = _read_tiff(path)
        else:
            with Image.open(path) as img:
                native = img.mode in _NUMPY_MODES or img.mode.startswith("I;16")
                if not native or (img.mode == "P" and palette_to_rgb):
                    img = img.convert("RGB")
                pixels = np.asarray(img)
    except InputDataError:
        raise
    except (OSError, ValueError, SyntaxError) as err:
        raise InputDataError(path, f"not a readable image ({err})") from err
    if pixels.size == 0:
        raise InputDataError(path, f"image has no pixels (shape {pixels.shape})")
    return pixels


def scale_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map 0.5..99.5 percentiles to 0..255, falling back to min..max for images that are almost
    all one value (sparse fluorescence), where both percentiles coincide."""
    pixels = pixels.astype(np.float32)
    low, high = np.percentile(pixels, (_LOW_PERCENTILE, _HIGH_PERCENTILE))
    if high <= low:
        low, high = pixels.min(), pixels.max()
    scaled = np.clip((pixels - low) / (high - low), 0.0, 1.0)
    return np.round(scaled * 255.0).astype(np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file (PNG, TIFF or JPEG) as HxWx3 uint8; see the module docstring for conversions.

    Raises:
        InputDataError: missing or unreadable file, no pixels, an unsupported channel count,
            non-finite values, or all pixels equal (an empty image).
    """
    path = Path(path)
    pixels = _read_pixels(path, palette_to_rgb=True)
    if pixels.ndim not in (2, 3):
        raise InputDataError(path, f"image has shape {pixels.shape}; expected HxW or HxWxC")
    if pixels.ndim == 3:
        channels = pixels.shape[2]
        if channels in (1, 2):  # grey, grey + alpha
            pixels = pixels[..., 0]
        elif channels in (3, 4):  # RGB, RGBA
            pixels = pixels[..., :3]
        else:
            raise InputDataError(
                path, f"image has {channels} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)"
            )
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    if np.issubdtype(pixels.dtype, np.floating) and not np.isfinite(pixels).all():
        raise InputDataError(path, "image contains NaN or infinite values")
    if pixels.min() == pixels.max():
        raise InputDataError(path, "image is empty (all pixels equal)")
    if pixels.dtype != np.uint8:
        pixels = scale_to_uint8(pixels)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return np.ascontiguousarray(pixels)


def _as_instance_labels(pixels: np.ndarray, path: Path) -> np.ndarray:
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim != 2:
        raise InputDataError(
            path, f"label image has shape {pixels.shape}; expected one channel of instance ids (HxW)"
        )
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8)
    if not np.issubdtype(pixels.dtype, np.integer) and not (
        np.isfinite(pixels).all() and (pixels == np.round(pixels)).all()
    ):
        raise InputDataError(path, f"label image has non-integer values (dtype {pixels.dtype})")
    if pixels.min() < 0:
        raise InputDataError(path, f"label image has negative values (min {pixels.min()})")
    if pixels.max() > np.iinfo(np.int32).max:
        raise InputDataError(path, f"label ids exceed the int32 range (max {pixels.max()})")
    labels = pixels.astype(np.int32)
    foreground = labels[labels > 0]
    if foreground.size and foreground.min() == foreground.max():
        components, count = ndimage.label(labels > 0)
        if count > 1:
            logger.warning(
                "%s: binary mask (one value, %d separate regions); labelling its connected components "
                "as cells, so touching cells in it are merged",
                path,
                count,
            )
            labels = components.astype(np.int32)
    return labels


def read_label_image(path: str | os.PathLike) -> np.ndarray:
    """An instance label image (PNG or TIFF, 8/16/32-bit) as HxW int32, 0 = background.

    Raises:
        InputDataError: missing or unreadable file, more than one channel, non-integer or negative
            values.
    """
    path = Path(path)
    return _as_instance_labels(_read_pixels(path, palette_to_rgb=False), path)


# ---------------------------------------------------------------------------------------------- COCO


def rasterize_coco_instances(rles: Sequence[dict], height: int, width: int) -> np.ndarray:
    """Instance labels from COCO RLE masks: annotation ``i`` becomes id ``i + 1``.

    Where masks overlap, the smaller cell keeps the pixels: masks are painted largest first, so a
    small cell lying on a large one stays whole instead of vanishing under it.
    """
    labels = np.zeros((height, width), dtype=np.int32)
    if not rles:
        return labels
    areas = mask_utils.area(list(rles))
    for index in np.argsort(-areas, kind="stable"):
        rle = rles[index]
        x, y, w, h = (int(v) for v in mask_utils.toBbox(rle))
        mask = mask_utils.decode(rle)[y : y + h + 1, x : x + w + 1].astype(bool)
        labels[y : y + h + 1, x : x + w + 1][mask] = index + 1
    return labels


def _rasterize_segmentations(segmentations: Sequence[list | dict], height: int, width: int) -> np.ndarray:
    rles = [segmentation_to_rle(s, height, width) for s in segmentations]
    return rasterize_coco_instances(rles, height, width)


def _image_finder(image_dir: Path) -> Callable[[str], Path | None]:
    """Looks a file name up in ``image_dir``, then (once indexed) anywhere below it: LIVECell ships
    its images both flat and in one subfolder per cell type."""
    index: dict[str, Path] = {}

    def find(file_name: str) -> Path | None:
        direct = image_dir / file_name
        if direct.is_file():
            return direct
        if not index:
            index.update((p.name, p) for p in sorted(image_dir.rglob("*")) if p.is_file())
        return index.get(Path(file_name).name)

    return find


def read_livecell(annotation_file: str | os.PathLike, image_dir: str | os.PathLike) -> list[CellSample]:
    """Samples of a LIVECell (or any COCO instance-segmentation) annotation file.

    Args:
        annotation_file: COCO JSON with ``images`` (``id``, ``file_name``, ``height``, ``width``) and
            ``annotations`` (``image_id``, ``segmentation`` as polygons or RLE).
        image_dir: folder holding the images, flat or in subfolders.

    Raises:
        InputDataError: unreadable or malformed JSON, no annotations, an annotation for an unknown
            image, a missing image, or an image whose size differs from the JSON's.
    """
    annotation_file = _require_file(annotation_file)
    image_dir = require_dir(image_dir)
    coco = load_coco(annotation_file)
    images = coco_records(coco, "images", annotation_file)
    annotations = coco_records(coco, "annotations", annotation_file)
    if not annotations:
        raise InputDataError(annotation_file, "has no annotations")

    image_sizes: dict[Any, tuple[int, int]] = {}
    for record in images:
        what = f"image {record.get('id', '?')}"
        image_id = coco_field(record, "id", annotation_file, "an image entry")
        height, width = (coco_field(record, key, annotation_file, what) for key in ("height", "width"))
        if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
            raise InputDataError(annotation_file, f"{what}: height and width must be positive integers")
        image_sizes[image_id] = (height, width)
    per_image: dict[Any, list] = {image_id: [] for image_id in image_sizes}
    for ann in annotations:
        ann_id = ann.get("id", "?")
        image_id = coco_field(ann, "image_id", annotation_file, f"annotation {ann_id}")
        if image_id not in per_image:
            raise InputDataError(
                annotation_file, f"annotation {ann_id} refers to unknown image_id {image_id}"
            )
        segmentation = coco_field(ann, "segmentation", annotation_file, f"annotation {ann_id}")
        check_segmentation(segmentation, *image_sizes[image_id], annotation_file, f"annotation {ann_id}")
        per_image[image_id].append(segmentation)

    find = _image_finder(image_dir)
    samples = []
    for record in images:
        file_name = str(coco_field(record, "file_name", annotation_file, f"image {record['id']}"))
        height, width = image_sizes[record["id"]]
        image_path = find(file_name)
        if image_path is None:
            raise InputDataError(
                image_dir / file_name, f"image listed in {annotation_file} not found under {image_dir}"
            )
        actual = image_size(image_path)
        if actual != (height, width):
            raise InputDataError(
                image_path,
                f"image is {_hw(actual)} but {annotation_file.name} gives height x width {height}x{width}",
            )
        samples.append(
            CellSample(
                name=Path(file_name).stem,
                image_path=image_path,
                label_path=annotation_file,
                size=(height, width),
                read_labels=partial(_rasterize_segmentations, per_image[record["id"]], height, width),
            )
        )
    return samples


# ------------------------------------------------------------------------------------------- folders


def _files_by_name(folder: Path, suffixes: Iterable[str], ending: str) -> dict[str, Path]:
    """``{name: path}`` for files ``<name><ending><suffix>`` in ``folder``; a name twice is an error."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in suffixes or not path.stem.endswith(ending):
            continue
        name = path.stem[: len(path.stem) - len(ending)]
        if name in found:
            raise InputDataError(path, f"two files for sample {name!r}: {found[name].name} and {path.name}")
        found[name] = path
    return found


def _pair(
    images: dict[str, Path], labels: dict[str, Path], label_dir: Path, label_pattern: str
) -> list[CellSample]:
    samples = []
    for name, image_path in images.items():
        label_path = labels.get(name)
        if label_path is None:
            raise InputDataError(
                image_path,
                f"no label image {label_pattern.format(name=name)} "
                f"({'/'.join(LABEL_SUFFIXES)}) in {label_dir}",
            )
        size, label_size = image_size(image_path), image_size(label_path)
        if size != label_size:
            raise InputDataError(
                label_path, f"mask is {_hw(label_size)} but image {image_path.name} is {_hw(size)}"
            )
        samples.append(CellSample(name, image_path, label_path, size, partial(read_label_image, label_path)))
    return samples


def read_cellpose_folder(
    folder: str | os.PathLike, image_filter: str = "_img", mask_filter: str = "_masks"
) -> list[CellSample]:
    """Samples of a Cellpose training folder: ``NAME{image_filter}.png`` with ``NAME{mask_filter}.png``
    (or .tif; masks 8/16-bit instance ids). ``image_filter=""`` takes every image that is not a mask,
    as Cellpose does by default.

    Raises:
        InputDataError: no images, an image without its mask, a mask of another size.
    """
    folder = require_dir(folder)
    images = _files_by_name(folder, IMAGE_SUFFIXES, image_filter)
    masks = _files_by_name(folder, LABEL_SUFFIXES, mask_filter)
    images = {name: path for name, path in images.items() if not path.stem.endswith(mask_filter)}
    if not images:
        raise InputDataError(
            folder, f"no images named NAME{image_filter}.png/.tif/.jpg found (Cellpose layout)"
        )
    return _pair(images, masks, folder, "{name}" + mask_filter)


def read_image_label_folders(
    image_dir: str | os.PathLike, label_dir: str | os.PathLike, label_suffix: str = ""
) -> list[CellSample]:
    """Samples of an image folder and a label folder: ``image_dir/NAME.ext`` with
    ``label_dir/NAME{label_suffix}.ext`` (images PNG/TIFF/JPEG, labels PNG/TIFF).

    Raises:
        InputDataError: no images, an image without its labels, labels of another size, or both
            folders the same with no ``label_suffix`` to tell labels from images.
    """
    image_dir, label_dir = require_dir(image_dir), require_dir(label_dir)
    same_folder = image_dir.resolve() == label_dir.resolve()
    if same_folder and not label_suffix:
        raise InputDataError(
            label_dir, "images and labels share this folder; give a label suffix such as '_masks'"
        )
    images = _files_by_name(image_dir, IMAGE_SUFFIXES, "")
    if same_folder:
        images = {name: path for name, path in images.items() if not name.endswith(label_suffix)}
    if not images:
        raise InputDataError(image_dir, "no images (.png/.tif/.tiff/.jpg/.jpeg) found")
    labels = _files_by_name(label_dir, LABEL_SUFFIXES, label_suffix)
    return _pair(images, labels, label_dir, "{name}" + label_suffix)
