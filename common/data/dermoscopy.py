"""Datalists for dermoscopy lesion segmentation: ISIC challenge folders, image/mask folder pairs, and
unlabelled image collections for self-supervised pretraining.

The readers check file names and image headers only, so a dataset of thousands of full-resolution
dermoscopy photographs is listed in seconds and a missing or mis-sized mask fails before training
starts. Mask *values* are checked when a mask is decoded, by :func:`read_binary_mask`. Every problem
is raised as :class:`~common.errors.InputDataError` naming the file at fault.

ISIC layout (ISIC 2016-2018 task 1): ``ISIC_0000000.jpg`` with ``ISIC_0000000_segmentation.png``
(0 = skin, 255 = lesion), images and masks in one folder or in two.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from common.data.cell_readers import IMAGE_SUFFIXES, LABEL_SUFFIXES, image_size
from common.errors import InputDataError
from common.utils import require_dir

__all__ = [
    "ISIC_MASK_SUFFIX",
    "read_binary_mask",
    "read_image_mask_folders",
    "read_isic_folder",
    "read_unlabelled_images",
]

ISIC_MASK_SUFFIX = "_segmentation"
_ISIC_IMAGE = re.compile(r"ISIC_\d+")
_BINARY_VALUE_SETS = ({0, 1}, {0, 255})
_MAX_LISTED_VALUES = 8



def _visible_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files of ``folder`` with one of ``suffixes``, sorted; hidden files (macOS ``._*`` resource
    forks copied along with ISIC archives) are skipped, as they are not images."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    )


def read_binary_mask(path: str | os.PathLike) -> np.ndarray:
    """A lesion mask file as HxW bool; pixel values 0/255 or 0/1 (or all one of them) are accepted.

    Raises:
        InputDataError: missing or unreadable file, a colour mask whose channels differ, or values
            other than 0/255 or 0/1 (e.g. a mask saved as JPEG, whose edges hold in-between values).
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "mask file not found")
    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("L") if img.mode == "P" else img)
    except (OSError, ValueError, SyntaxError) as err:
        raise InputDataError(path, f"not a readable mask image ({err})") from err
    if pixels.ndim == 3:
        if pixels.shape[2] in (2, 4):  # drop alpha
            pixels = pixels[..., :-1]
        if (pixels != pixels[..., :1]).any():
            raise InputDataError(
                path, f"mask has {pixels.shape[2]} differing colour channels; expected a grey mask"
            )
        pixels = pixels[..., 0]
    values = np.unique(pixels)
    if not any(set(values.tolist()) <= allowed for allowed in _BINARY_VALUE_SETS):
        listed = ", ".join(str(v) for v in values[:_MAX_LISTED_VALUES])
        more = f" and {len(values) - _MAX_LISTED_VALUES} more" if len(values) > _MAX_LISTED_VALUES else ""
        raise InputDataError(
            path, f"mask is not binary: it holds {len(values)} values ({listed}{more}); expected 0/255 or 0/1"
        )
    return pixels > 0


def _entry(image_path: Path, mask_path: Path, name: str, mask_pattern: str, mask_dir: Path) -> dict[str, str]:
    """A checked ``{"image", "mask", "name"}`` entry: the mask exists and has the image's size."""
    if not mask_path.is_file():
        raise InputDataError(image_path, f"no mask {mask_pattern} in {mask_dir}")
    size, mask_size = image_size(image_path), image_size(mask_path)
    if size != mask_size:
        raise InputDataError(
            mask_path,
            f"mask is {mask_size[0]}x{mask_size[1]} but image {image_path.name} is {size[0]}x{size[1]} "
            "(height x width)",
        )
    return {"image": str(image_path), "mask": str(mask_path), "name": name}


def read_isic_folder(
    image_dir: str | os.PathLike, mask_dir: str | os.PathLike | None = None
) -> list[dict[str, str]]:
    """Entries ``{"image", "mask", "name"}`` of an ISIC folder: ``ISIC_<digits>.jpg`` (or .png) with
    ``ISIC_<digits>_segmentation.png`` in ``mask_dir`` (default: ``image_dir``).

    Other files (licence texts, superpixel maps, metadata CSVs) are ignored.

    Raises:
        InputDataError: no ISIC images, an image without its mask, a mask of another size, or an
            unreadable image header.
    """
    image_dir = require_dir(image_dir)
    mask_dir = image_dir if mask_dir is None else require_dir(mask_dir)
    images = [p for p in _visible_files(image_dir, IMAGE_SUFFIXES) if _ISIC_IMAGE.fullmatch(p.stem)]
    if not images:
        raise InputDataError(image_dir, "no ISIC images (ISIC_<digits>.jpg/.png) found")
    entries = []
    for image_path in images:
        mask_name = f"{image_path.stem}{ISIC_MASK_SUFFIX}.png"
        entries.append(_entry(image_path, mask_dir / mask_name, image_path.stem, mask_name, mask_dir))
    return entries


def read_image_mask_folders(
    image_dir: str | os.PathLike, mask_dir: str | os.PathLike, mask_suffix: str = ""
) -> list[dict[str, str]]:
    """Entries ``{"image", "mask", "name"}`` pairing ``image_dir/NAME.ext`` with
    ``mask_dir/NAME{mask_suffix}.png`` (or .tif/.tiff).

    Raises:
        InputDataError: no images, both folders the same with no ``mask_suffix``, an image without its
            mask, a mask of another size, or an unreadable image header.
    """
    image_dir, mask_dir = require_dir(image_dir), require_dir(mask_dir)
    same_folder = image_dir.resolve() == mask_dir.resolve()
    if same_folder and not mask_suffix:
        raise InputDataError(
            mask_dir, "images and masks share this folder; give a mask suffix such as '_mask'"
        )
    images = _visible_files(image_dir, IMAGE_SUFFIXES)
    if same_folder:
        images = [p for p in images if not p.stem.endswith(mask_suffix)]
    if not images:
        raise InputDataError(image_dir, f"no images ({'/'.join(IMAGE_SUFFIXES)}) found")
    masks = {p.stem: p for p in _visible_files(mask_dir, LABEL_SUFFIXES)}
    entries = []
    for image_path in images:
        mask_stem = image_path.stem + mask_suffix
        mask_path = masks.get(mask_stem, mask_dir / f"{mask_stem}.png")
        entries.append(_entry(image_path, mask_path, image_path.stem, f"{mask_stem}.png/.tif", mask_dir))
    return entries


def read_unlabelled_images(root: str | os.PathLike) -> list[dict[str, str]]:
    """Entries ``{"image"}`` for every image below ``root`` (recursively), for self-supervised
    pretraining. ISIC ``*_segmentation`` masks and hidden files are skipped; each header is read once
    so that a corrupt download fails here and not hours into pretraining.

    Raises:
        InputDataError: ``root`` missing or holding no images, or an unreadable image header.
    """
    root = require_dir(root)
    paths = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and not p.stem.endswith(ISIC_MASK_SUFFIX)
    )
    if not paths:
        raise InputDataError(root, f"no images ({'/'.join(IMAGE_SUFFIXES)}) found in this folder or below")
    for path in paths:
        image_size(path)
    return [{"image": str(p)} for p in paths]
