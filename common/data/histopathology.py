"""Datalists and index masks for weakly supervised tissue segmentation of H&E patches, in the layouts
of LUAD-HistoSeg and BCSS-WSSS and as JSONL manifests.

Class convention, shared by every module of the histopathology bundle: ``C`` tissue classes have
indices ``0..C-1``, which are also the positions of the image-level label vector; the background
(glass, no tissue) is ``C``; ``255`` marks ignored pixels. Segmentation networks therefore have
``C + 1`` outputs.

Layouts::

    train/1031280-2300-27920-[1 0 0 1].png      LUAD-HistoSeg: image-level labels in the file name
    train/TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png     BCSS-WSSS: compact vector
    val/img/NAME.png + val/mask/NAME.png        palette masks, 0..C-1 tissue, C background

The class *order* is the dataset's: LUAD-HistoSeg is (tumour epithelium, necrosis, lymphocyte,
tumour-associated stroma), BCSS-WSSS is (tumour, stroma, lymphocytic infiltrate, necrosis).

A JSONL manifest lists one patch per line, for data that is not in either layout::

    {"image": "patches/a.png", "label": [1, 0, 0, 1]}
    {"image": "patches/b.png", "label": ["necrosis"], "mask": "masks/b.png", "split": "val"}

Relative paths are resolved against the manifest's folder. Every problem is raised as
:class:`~common.errors.InputDataError` naming the file at fault.
"""

from __future__ import annotations

import colorsys
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.data.cell_readers import IMAGE_SUFFIXES, LABEL_SUFFIXES, image_size
from common.errors import InputDataError
from common.io.atomic import atomic_write
from common.utils import require_dir

__all__ = [
    "BACKGROUND",
    "CLASS_COLOURS",
    "DEFAULT_CLASS_NAMES",
    "IGNORE_INDEX",
    "mask_palette",
    "parse_label_vector",
    "patch_label_datalist",
    "patch_mask_datalist",
    "read_labelled_patch_folder",
    "read_mask",
    "read_patch_manifest",
    "read_rgb_patch",
    "read_segmentation_folder",
    "write_mask",
]

PATCHES_REMEDY = (
    "put LUAD-HistoSeg or BCSS-WSSS patches under DATASET_DIR/{training,val,test} (or point --train_dir "
    "at your labelled patches), or write demo patches with "
    "`python -m common.data.synthetic.histology --out DATASET_DIR`"
)
PSEUDO_MASKS_REMEDY = (
    "stage 2 trains on stage 1's pseudo-masks: train the CAM classifier (train_cam.json), then write "
    "them with `python -m monai.bundle run pseudo_labelling --config_file \"['<bundle>/configs/train_cam.json',"
    "'<bundle>/configs/pseudo_masks.json']\"` and the same --dataset_dir and --bundle_root"
)

DEFAULT_CLASS_NAMES = ("tumour epithelium", "necrosis", "lymphocyte", "tumour-associated stroma")
BACKGROUND = "background"
IGNORE_INDEX = 255
# Tissue colours by class index: the first four are LUAD-HistoSeg's palette, so masks written here
# look like the dataset's own; more classes get the next colours, then evenly spread hues.
_TISSUE_COLOURS = (
    (205, 51, 51),
    (0, 255, 0),
    (65, 105, 225),
    (255, 165, 0),
    (153, 0, 255),
    (0, 206, 209),
    (255, 20, 147),
    (139, 69, 19),
)
_BACKGROUND_COLOUR = (255, 255, 255)
_IGNORE_COLOUR = (0, 0, 0)
_UNUSED_COLOUR = (128, 128, 128)
#: Colour of each index of a default (4-class) mask: tissue 0..3, background 4 (white); 255 is black.
CLASS_COLOURS = (*_TISSUE_COLOURS[: len(DEFAULT_CLASS_NAMES)], _BACKGROUND_COLOUR)

_MANIFEST_FIELDS = ("split", "origin", "level", "mpp", "classes")
_LABEL_VECTOR = re.compile(r"\[([^\[\]]*)\]")
_MAX_LISTED = 8
_MAX_CLASSES = IGNORE_INDEX - 1  # the background index C must stay below the ignore index


def _check_num_classes(num_classes: int) -> None:
    is_count = isinstance(num_classes, (int, np.integer)) and not isinstance(num_classes, bool)
    if not is_count or not 0 < num_classes <= _MAX_CLASSES:
        raise ValueError(f"num_classes must be an integer in 1..{_MAX_CLASSES}, got {num_classes!r}")


def _listed(values: Sequence[Any]) -> str:
    shown = ", ".join(str(v) for v in values[:_MAX_LISTED])
    return shown + (f" and {len(values) - _MAX_LISTED} more" if len(values) > _MAX_LISTED else "")


def mask_palette(num_classes: int = len(DEFAULT_CLASS_NAMES)) -> np.ndarray:
    """The (256, 3) uint8 colour of every mask index: tissue ``0..C-1`` in fixed colours (LUAD-HistoSeg's
    for the first four), background ``C`` white, ignore ``255`` black, unused indices grey."""
    _check_num_classes(num_classes)
    palette = np.array([_UNUSED_COLOUR] * 256, dtype=np.uint8)
    for index in range(num_classes):
        if index < len(_TISSUE_COLOURS):
            palette[index] = _TISSUE_COLOURS[index]
        else:  # golden-ratio hue steps keep any number of extra classes apart
            hue = (index - len(_TISSUE_COLOURS)) * 0.618034 % 1.0
            palette[index] = np.round(np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.85)) * 255)
    palette[num_classes] = _BACKGROUND_COLOUR
    palette[IGNORE_INDEX] = _IGNORE_COLOUR
    return palette


def parse_label_vector(path: str | os.PathLike, num_classes: int) -> np.ndarray:
    """The image-level label vector in a patch's file name, as an int64 array of 0/1 of length ``C``.

    The last ``[...]`` group of the name is read; entries are separated by spaces or commas
    (``name-[1 0 0 1].png``, ``name-[1,0,0,1].png``) or, as in BCSS-WSSS, written without separator
    (``name+0[1101].png``).

    Raises:
        InputDataError: the name has no ``[...]`` group, or it has the wrong number of entries, or
            entries other than 0 and 1.
    """
    _check_num_classes(num_classes)
    path = Path(path)
    groups = _LABEL_VECTOR.findall(path.stem)
    if not groups:
        raise InputDataError(
            path,
            f"file name has no label vector; expected NAME-[a b ...].png with {num_classes} entries "
            "of 0 or 1",
        )
    text = groups[-1]
    entries = [e for e in re.split(r"[\s,]+", text.strip()) if e]
    if len(entries) == 1 and num_classes > 1 and len(entries[0]) == num_classes:
        entries = list(entries[0])  # compact BCSS-WSSS form, [1101]
    if len(entries) != num_classes:
        raise InputDataError(
            path, f"label vector [{text}] has {len(entries)} entries; expected {num_classes}, one per class"
        )
    bad = [e for e in entries if e not in ("0", "1")]
    if bad:
        raise InputDataError(path, f"label vector [{text}] holds {_listed(bad)}; entries must be 0 or 1")
    return np.array([int(e) for e in entries], dtype=np.int64)



def _is_visible(path: Path, root: Path) -> bool:
    """Hidden files and folders (``.ipynb_checkpoints``, macOS ``._*`` forks) hold no patches."""
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _check_unique_names(entries: list[dict[str, Any]], source: Path) -> None:
    """Outputs such as pseudo-masks are written by patch name, so two patches must not share one."""
    seen: dict[str, str] = {}
    for entry in entries:
        if entry["name"] in seen:
            raise InputDataError(
                source,
                f"two patches are named {entry['name']!r} ({seen[entry['name']]} and {entry['image']}); "
                "outputs are written by name, so names must be unique",
            )
        seen[entry["name"]] = entry["image"]


def read_labelled_patch_folder(
    folder: str | os.PathLike, num_classes: int, recursive: bool = True
) -> list[dict[str, Any]]:
    """Entries ``{"image", "label", "name"}`` of a training folder whose patches carry their
    image-level labels in their names (LUAD-HistoSeg, BCSS-WSSS); ``label`` is a list of ``C`` ints.

    Only names are read, so a folder of tens of thousands of patches is listed in a second; an
    unreadable image is reported when it is loaded. Hidden files and folders are skipped.

    Raises:
        InputDataError: missing folder, no patches, a name without a valid label vector, or two
            patches with the same name (in different subfolders).
    """
    _check_num_classes(num_classes)
    folder = require_dir(folder, remedy=PATCHES_REMEDY)
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    paths = sorted(
        p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and _is_visible(p, folder)
    )
    if not paths:
        where = "in this folder or below" if recursive else "in this folder"
        raise InputDataError(folder, f"no patches ({'/'.join(IMAGE_SUFFIXES)}) found {where}")
    entries = [
        {"image": str(p), "label": parse_label_vector(p, num_classes).tolist(), "name": p.stem} for p in paths
    ]
    _check_unique_names(entries, folder)
    return entries


def _manifest_label(
    value: Any, num_classes: int, class_names: Sequence[str] | None, where: str, manifest: Path
) -> list[int]:
    """A manifest ``label``: a list of ``C`` zeros and ones, or a list of class names."""
    if not isinstance(value, list):
        raise InputDataError(
            manifest, f"{where}: 'label' must be a list of {num_classes} zeros and ones or of class names"
        )
    if all(isinstance(v, str) for v in value):  # [] too: a patch without tissue
        if value and class_names is None:
            raise InputDataError(
                manifest, f"{where}: 'label' lists class names; give class_names to read them"
            )
        index = {name: i for i, name in enumerate(class_names or ())}
        unknown = sorted({v for v in value if v not in index})
        if unknown:
            raise InputDataError(
                manifest,
                f"{where}: unknown class {_listed(unknown)}; known classes: {', '.join(class_names or ())}",
            )
        label = [0] * num_classes
        for name in value:
            label[index[name]] = 1
        return label
    if len(value) != num_classes:
        raise InputDataError(manifest, f"{where}: 'label' has {len(value)} entries; expected {num_classes}")
    if not all(not isinstance(v, str) and isinstance(v, (int, float)) and v in (0, 1) for v in value):
        raise InputDataError(
            manifest, f"{where}: 'label' {value} must hold only 0 and 1 (or only class names)"
        )
    return [int(v) for v in value]


def _manifest_path(value: Any, key: str, root: Path, where: str, manifest: Path) -> str:
    if not isinstance(value, str) or not value:
        raise InputDataError(manifest, f"{where}: {key!r} must be a file path")
    path = Path(value) if Path(value).is_absolute() else root / value
    if not path.is_file():
        raise InputDataError(path, f"{key} listed on {where} of {manifest} not found")
    return str(path)


def read_patch_manifest(
    path: str | os.PathLike,
    num_classes: int,
    base_dir: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    remedy: str | None = None,
) -> list[dict[str, Any]]:
    """Entries of a JSONL manifest, one patch per line (format in the module docstring).

    Each entry has ``image`` (absolute), ``label`` (``C`` ints), ``name`` (the record's ``name`` or the
    image's stem) and, where the record has them, ``mask`` (absolute) and the fields ``split``,
    ``origin``, ``level``, ``mpp`` and ``classes`` as given. Other fields are ignored; blank lines too.

    Args:
        path: the ``.jsonl`` file.
        num_classes: ``C``, the number of tissue classes.
        base_dir: folder that relative paths are resolved against (default: the manifest's folder).
        class_names: the ``C`` class names, in label order, for labels written as names.

    Raises:
        InputDataError: a line that is not a JSON object (its number is given), a missing or
            malformed ``image`` or ``label``, an unknown class name, a missing image or mask file,
            an empty manifest, or two patches with the same name.
    """
    _check_num_classes(num_classes)
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "manifest file not found", remedy)
    root = path.parent if base_dir is None else Path(base_dir)
    entries = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputDataError(path, f"{where}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise InputDataError(path, f"{where}: expected a JSON object, got {type(record).__name__}")
            for key in ("image", "label"):
                if key not in record:
                    raise InputDataError(path, f"{where}: no {key!r}")
            image = _manifest_path(record["image"], "image", root, where, path)
            entry: dict[str, Any] = {
                "image": image,
                "label": _manifest_label(record["label"], num_classes, class_names, where, path),
                "name": str(record.get("name") or Path(image).stem),
            }
            if "mask" in record:
                entry["mask"] = _manifest_path(record["mask"], "mask", root, where, path)
            entry.update({key: record[key] for key in _MANIFEST_FIELDS if key in record})
            entries.append(entry)
    if not entries:
        raise InputDataError(path, "manifest lists no patches")
    _check_unique_names(entries, path)
    return entries


def _split_names(splits: str | Sequence[str]) -> tuple[str, ...]:
    names = (splits,) if isinstance(splits, str) else tuple(splits)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"splits must be a split name or a non-empty list of them, got {splits!r}")
    return names


def _manifest_splits(
    manifest: str | os.PathLike,
    num_classes: int,
    splits: str | Sequence[str],
    class_names: Sequence[str] | None = None,
    remedy: str | None = None,
) -> list[dict[str, Any]]:
    """The entries of ``manifest`` of ``splits``; a line without a ``split`` counts as ``train``."""
    names = _split_names(splits)
    entries = [
        entry
        for entry in read_patch_manifest(manifest, num_classes, class_names=class_names, remedy=remedy)
        if entry.get("split", "train") in names
    ]
    if not entries:
        raise InputDataError(manifest, f"manifest lists no patches of split {_listed(list(names))}")
    return entries


def patch_label_datalist(
    train_dir: str | os.PathLike,
    num_classes: int,
    manifest: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    splits: str | Sequence[str] = "train",
) -> list[dict[str, Any]]:
    """The patches with image-level labels that a patch classifier (the CAM stage) trains on.

    With a ``manifest``, its lines of ``splits`` (a line without ``split`` counts as ``train``), read by
    :func:`read_patch_manifest`, and ``train_dir`` is not looked at; without one, every patch of
    ``train_dir``, with its labels in its name, read by :func:`read_labelled_patch_folder`.

    Args:
        train_dir: folder of ``NAME-[a b ...].png`` patches (LUAD-HistoSeg, BCSS-WSSS).
        num_classes: ``C``, the number of tissue classes.
        manifest: a JSONL manifest to read instead of ``train_dir``; ``None`` (or empty) for the folder.
        class_names: the ``C`` class names, for manifest labels written as names.
        splits: the manifest split (or splits) to keep.

    Returns:
        Entries ``{"image", "label", "name", ...}``; ``label`` is a list of ``C`` ints.

    Raises:
        InputDataError: as the reader raises, or a manifest with no line of ``splits``.
    """
    if manifest:
        return _manifest_splits(manifest, num_classes, splits, class_names)
    return read_labelled_patch_folder(train_dir, num_classes)


def patch_mask_datalist(
    manifest: str | os.PathLike,
    num_classes: int,
    splits: str | Sequence[str] = "train",
    class_names: Sequence[str] | None = None,
    remedy: str | None = PSEUDO_MASKS_REMEDY,
) -> list[dict[str, Any]]:
    """The patches with pixel masks that a segmentation network trains on, from a JSONL manifest such as
    the one :class:`~common.handlers.pseudo_masks.PseudoMaskWriter` writes next to the pseudo-masks.

    Args:
        manifest: the ``.jsonl`` file; each line of ``splits`` must carry a ``mask``.
        num_classes: ``C``, the number of tissue classes.
        splits: the split (or splits) to keep; a line without ``split`` counts as ``train``.
        class_names: the ``C`` class names, for image-level labels written as names.
        remedy: what a missing manifest's error tells the user to do (by default, write the pseudo-masks).

    Returns:
        Entries ``{"image": patch path, "label": mask path}``, in manifest order: the mask is the
        training label.

    Raises:
        InputDataError: as :func:`read_patch_manifest` raises, a manifest with no line of ``splits``, or
            a line of ``splits`` without a ``mask`` (its patch is named).
    """
    entries = _manifest_splits(manifest, num_classes, splits, class_names, remedy)
    for entry in entries:
        if "mask" not in entry:
            raise InputDataError(
                manifest, f"patch {entry['image']} has no 'mask'; training a segmentation network needs one"
            )
    return [{"image": entry["image"], "label": entry["mask"]} for entry in entries]


def _open_image(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise InputDataError(path, f"{what} file not found")
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise InputDataError(path, f"not a readable {what} image ({err})") from err
    return img


def read_rgb_patch(path: str | os.PathLike) -> np.ndarray:
    """An 8-bit patch as (H, W, 3) uint8: greyscale is repeated, alpha dropped, palettes applied.

    Raises:
        InputDataError: missing or unreadable file, or a 16-bit/float image (H&E scans are 8-bit RGB).
    """
    path = Path(path)
    with _open_image(path, "patch") as img:
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):
            raise InputDataError(path, f"patch is a {img.mode} (16/32-bit) image; expected 8-bit RGB")
        pixels = np.asarray(img.convert("RGB"))
    if pixels.size == 0:
        raise InputDataError(path, "patch has no pixels")
    return pixels


def read_mask(path: str | os.PathLike, num_classes: int) -> np.ndarray:
    """An index mask (palette "P" or greyscale "L"/"I" PNG) as (H, W) uint8 with values in
    ``0..C`` (``C`` = background) or 255 (ignored).

    Raises:
        InputDataError: missing or unreadable file, a colour (RGB) mask, or values outside
            ``0..C`` and 255 (listed in the message).
    """
    _check_num_classes(num_classes)
    path = Path(path)
    with _open_image(path, "mask") as img:
        if img.mode not in ("P", "L", "1", "I") and not img.mode.startswith("I;16"):
            raise InputDataError(
                path,
                f"mask is a {img.mode} image; expected a palette (P) or greyscale (L) image of class "
                f"indices: 0..{num_classes - 1} tissue, {num_classes} background, 255 ignored",
            )
        pixels = np.asarray(img)
    values = np.unique(pixels).astype(np.int64)
    bad = values[((values < 0) | (values > num_classes)) & (values != IGNORE_INDEX)]
    if bad.size:
        raise InputDataError(
            path,
            f"mask holds values {_listed(bad.tolist())} outside 0..{num_classes} and 255 "
            f"(0..{num_classes - 1} tissue, {num_classes} background, 255 ignored)",
        )
    return pixels.astype(np.uint8)


def read_segmentation_folder(
    image_dir: str | os.PathLike, mask_dir: str | os.PathLike, num_classes: int
) -> list[dict[str, Any]]:
    """Entries ``{"image", "mask", "label", "name"}`` pairing ``image_dir/NAME.png`` with
    ``mask_dir/NAME.png`` (LUAD-HistoSeg/BCSS-WSSS ``val/img`` + ``val/mask``); ``label`` lists the
    tissue classes present in the mask, so these patches can also evaluate a patch classifier.

    Masks are decoded here (validation and test sets are small), so a bad mask fails before training.

    Raises:
        InputDataError: a missing folder, no images, an image without a mask, a mask whose size
            differs from its image's (both named), or a bad mask (see :func:`read_mask`).
    """
    _check_num_classes(num_classes)
    image_dir = require_dir(image_dir, remedy=PATCHES_REMEDY)
    mask_dir = require_dir(mask_dir, remedy=PATCHES_REMEDY)
    images = sorted(
        p
        for p in image_dir.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and _is_visible(p, image_dir)
    )
    if not images:
        raise InputDataError(image_dir, f"no images ({'/'.join(IMAGE_SUFFIXES)}) found")
    masks = {
        p.stem: p
        for p in sorted(mask_dir.iterdir(), reverse=True)  # .png wins over .tif when both exist
        if p.is_file() and p.suffix.lower() in LABEL_SUFFIXES and _is_visible(p, mask_dir)
    }
    entries = []
    for image_path in images:
        mask_path = masks.get(image_path.stem)
        if mask_path is None:
            raise InputDataError(image_path, f"no mask {image_path.stem}.png in {mask_dir}")
        mask = read_mask(mask_path, num_classes)
        size = image_size(image_path)
        if mask.shape != size:
            raise InputDataError(
                mask_path,
                f"mask is {mask.shape[0]}x{mask.shape[1]} but image {image_path} is {size[0]}x{size[1]} "
                "(height x width)",
            )
        present = np.bincount(mask.ravel(), minlength=256)[:num_classes] > 0
        entries.append(
            {
                "image": str(image_path),
                "mask": str(mask_path),
                "label": present.astype(int).tolist(),
                "name": image_path.stem,
            }
        )
    return entries


def write_mask(
    path: str | os.PathLike,
    mask: np.ndarray,
    palette: bool = True,
    num_classes: int = len(DEFAULT_CLASS_NAMES),
) -> Path:
    """Write an (H, W) index mask atomically as PNG: a palette image in the colours of
    :func:`mask_palette` (viewable as is), or a greyscale image when ``palette`` is False.
    Either reads back with :func:`read_mask`.

    Raises:
        ValueError: ``mask`` is not 2-D integer data with values in ``0..num_classes`` and 255.
    """
    _check_num_classes(num_classes)
    mask = np.asarray(mask)
    if mask.ndim != 2 or not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise ValueError(f"mask must be a 2-D integer array, got shape {mask.shape} and dtype {mask.dtype}")
    values = np.unique(mask).astype(np.int64)
    bad = values[((values < 0) | (values > num_classes)) & (values != IGNORE_INDEX)]
    if bad.size:
        raise ValueError(f"mask values must be in 0..{num_classes} or 255, got {_listed(bad.tolist())}")
    image = Image.fromarray(mask.astype(np.uint8))
    if palette:
        image.putpalette(mask_palette(num_classes).ravel().tolist())
    return atomic_write(path, lambda f: image.save(f, format="PNG"))
