"""X-ray angiograms as pixels: PNG/JPEG/TIFF (8 or 16 bit) and DICOM X-ray angiography runs.

A catheterisation lab exports a run as a DICOM file holding every frame of a contrast injection
(multi-frame XA) or a single frame; core labs and challenge datasets ship single frames as PNG. Both
become one HxWx3 ``uint8`` frame here, as :func:`common.data.cell_readers.read_image` makes every
other image of the collection (grey repeated to three channels, more than 8 bits stored mapped to
0..255 between the frame's 0.5 and 99.5 percentiles), so that a network sees a DICOM frame and its
PNG export alike.

The frame of a multi-frame run is chosen by index; by default the middle one, as the contrast has
usually filled the arteries mid-run and not yet washed out. ``MONOCHROME1`` files (white = no
attenuation) are inverted so that vessels are dark in every image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from common.data.cell_readers import IMAGE_SUFFIXES, image_size, read_image, scale_to_uint8
from common.errors import InputDataError

__all__ = ["ANGIOGRAM_SUFFIXES", "DICOM_SUFFIXES", "angiogram_size", "is_dicom", "read_angiogram"]

DICOM_SUFFIXES = (".dcm", ".dicom")
ANGIOGRAM_SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES


def is_dicom(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM file, by suffix or, for suffix-less exports, by the ``DICM`` marker."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix or not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def _read_dicom(path: Path, stop_before_pixels: bool) -> pydicom.Dataset:
    if not path.is_file():
        raise InputDataError(path, "file not found")
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise InputDataError(path, f"not a readable DICOM file ({err})") from err


def _frame_count(ds: pydicom.Dataset) -> int:
    return int(getattr(ds, "NumberOfFrames", 1) or 1)


def angiogram_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an angiogram, read from its header only (DICOM ``Rows``/``Columns``)."""
    path = Path(path)
    if not is_dicom(path):
        return image_size(path)
    ds = _read_dicom(path, stop_before_pixels=True)
    if "Rows" not in ds or "Columns" not in ds:
        raise InputDataError(path, "DICOM file has no Rows/Columns: not an image")
    return int(ds.Rows), int(ds.Columns)


def _dicom_frame(path: Path, frame: int | None) -> np.ndarray:
    """One frame of a DICOM file as HxW (grey) or HxWx3 pixels in the file's own dtype."""
    ds = _read_dicom(path, stop_before_pixels=False)
    n_frames = _frame_count(ds)
    index = n_frames // 2 if frame is None else frame
    if not 0 <= index < n_frames:
        raise InputDataError(
            path, f"frame {frame} asked for, but the file holds {n_frames} frame(s) (0..{n_frames - 1})"
        )
    try:
        pixels = ds.pixel_array
    except (AttributeError, ValueError, NotImplementedError, RuntimeError) as err:
        raise InputDataError(path, f"DICOM pixel data cannot be decoded ({err})") from err
    if n_frames > 1:
        pixels = pixels[index]
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = ((1 << int(ds.BitsStored)) - 1 - pixels.astype(np.int64)).astype(pixels.dtype)
    return pixels


def read_angiogram(path: str | os.PathLike, frame: int | None = None) -> np.ndarray:
    """An angiogram frame as HxWx3 ``uint8``; see the module docstring for the conversions.

    Args:
        path: a PNG, JPEG or TIFF image, or a DICOM file (single or multi-frame).
        frame: DICOM frame index (0-based); ``None`` takes the middle frame. Ignored for other formats.

    Raises:
        InputDataError: a missing or unreadable file, a frame index outside the run, pixel data that
            cannot be decoded, or an image with all pixels equal.
    """
    path = Path(path)
    if not is_dicom(path):
        return read_image(path)
    pixels = _dicom_frame(path, frame)
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        pixels = pixels.mean(axis=2)
    if pixels.ndim != 2:
        raise InputDataError(path, f"DICOM frame has shape {pixels.shape}; expected HxW or HxWx3")
    if pixels.min() == pixels.max():
        raise InputDataError(path, "DICOM frame is empty (all pixels equal)")
    if pixels.dtype != np.uint8:
        pixels = scale_to_uint8(pixels)
    return np.repeat(pixels[..., None], 3, axis=2)
