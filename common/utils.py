"""Small helpers that every layer of the collection shares (the bottom layer: imports nothing of ours
but :mod:`common.errors`).

Tensor to NumPy conversion is MONAI's :func:`monai.utils.convert_to_numpy`; what MONAI does not offer
lives here, once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import convert_to_numpy

from common.errors import InputDataError

__all__ = ["as_plane", "file_stem", "nan_to_none", "require_dir", "source_file", "unwrap_module"]

_DOUBLE_SUFFIXES = (".ome", ".nii")  # name.ome.tif, name.nii.gz: the stem drops both suffixes


def as_plane(value: Any, name: str = "array", dtype: Any = None) -> np.ndarray:
    """An (H, W) NumPy array from an (H, W) or channel-first (1, H, W) array or tensor.

    Masks, label and distance maps travel through MONAI transforms with a channel axis of one; the
    writers and post-processing steps work on the plane. ``name`` says what was wrong in the error.
    """
    array = convert_to_numpy(value, dtype=dtype, wrap_sequence=True)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"{name} must be (H, W) or (1, H, W), got shape {array.shape}")
    return array


def nan_to_none(value: Any) -> Any:
    """``value`` with every NaN float (nested in dicts, lists and tuples) replaced by ``None``.

    Strict JSON has no NaN, and a score without references (an image without cells, a class without
    samples) is NaN: it is written as ``null``. NumPy floats are converted to Python floats.
    """
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, Mapping):
        return {key: nan_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_none(item) for item in value]
    return value


def source_file(value: Any) -> str | None:
    """The file a sample was loaded from: a path given as such, or the ``filename_or_obj`` of a
    ``MetaTensor``'s metadata (a batch's first entry when collated); ``None`` when nothing records it."""
    if isinstance(value, MetaTensor):
        value = value.meta.get("filename_or_obj")
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
    if isinstance(value, (str, os.PathLike)) and os.fspath(value):
        return os.fspath(value)
    return None


def file_stem(path: str | os.PathLike) -> str:
    """A file's name without its extension, double ones (``.ome.tif``, ``.nii.gz``) included."""
    stem = Path(Path(path).stem)
    return stem.stem if stem.suffix.lower() in _DOUBLE_SUFFIXES else stem.name


def require_dir(path: str | os.PathLike, what: str = "folder", remedy: str | None = None) -> Path:
    """``path`` as a ``Path``, or an :class:`InputDataError` saying that ``what`` was not found (and
    ``remedy``, how to create it)."""
    path = Path(path)
    if not path.is_dir():
        raise InputDataError(path, f"{what} not found", remedy)
    return path


def unwrap_module(module: Any) -> Any:
    """The module inside ``DataParallel``/``DistributedDataParallel`` (wrappers forward only ``forward``,
    and saved keys must not carry their ``module.`` prefix); anything else unchanged."""
    if isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return module.module
    return module
