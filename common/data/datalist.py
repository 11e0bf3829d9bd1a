"""Datalists of image files for inference on a folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from common.errors import InputDataError

__all__ = ["IMAGE_SUFFIXES", "image_datalist"]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def image_datalist(
    input_dir: str | os.PathLike,
    exclude_suffixes: Sequence[str] = ("_masks", "_mask", "_seg", "_instances", "_overlay"),
    recursive: bool = False,
    key: str = "image",
    suffixes: Sequence[str] = IMAGE_SUFFIXES,
) -> list[dict[str, str]]:
    """``[{key: path}, ...]`` for every image under ``input_dir``, sorted, skipping label files.

    A single image file is accepted too, so a clinician's script can pass one path.

    Args:
        input_dir: a folder of images, or one image file.
        exclude_suffixes: file stems ending with these are labels or outputs, not inputs.
        recursive: look into sub-folders.
        key: the dictionary key of each entry.
        suffixes: file suffixes (lower case) that count as images, e.g. with ``.dcm`` for DICOM.

    Raises:
        InputDataError: the path does not exist or holds no images.
    """
    root = Path(input_dir)
    if root.is_file():
        return [{key: str(root)}]
    if not root.is_dir():
        raise InputDataError(root, "input folder or image not found")
    pattern = "**/*" if recursive else "*"
    files = sorted(
        p
        for p in root.glob(pattern)
        if p.is_file() and p.suffix.lower() in suffixes and not p.stem.endswith(tuple(exclude_suffixes))
    )
    if not files:
        raise InputDataError(root, f"no images with suffix {', '.join(suffixes)} found")
    return [{key: str(p)} for p in files]
