"""Loading transforms for H&E patches and their index masks.

Both read in (H, W) order, so patch and mask stay aligned; MONAI's ``LoadImaged`` would return 2D
PNGs transposed. Image-level labels from :mod:`common.data.histopathology` are lists of ints; turn them
into float vectors for a multi-label loss with
``EnsureTyped(keys="label", dtype=torch.float32, wrap_sequence=True)``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from common.data.histopathology import read_mask, read_rgb_patch

__all__ = ["LoadHistologyImaged", "LoadIndexMaskd"]


def _meta_tensor(pixels: np.ndarray, path: str) -> MetaTensor:
    """Channel-first pixels with the file name that writers use to name their outputs."""
    return MetaTensor(
        torch.from_numpy(pixels), meta={"filename_or_obj": path, "spatial_shape": tuple(pixels.shape[1:])}
    )


class LoadHistologyImaged(MapTransform):
    """Replace a patch path by a (3, H, W) float32 MetaTensor in 0..255, read with
    :func:`common.data.histopathology.read_rgb_patch` (greyscale repeated, alpha dropped, palettes
    applied; a missing or unreadable file raises :class:`~common.errors.InputDataError` naming it)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            # one copy to channel-first float32, which also makes the decoder's read-only buffer writable
            pixels = np.ascontiguousarray(read_rgb_patch(path).transpose(2, 0, 1), dtype=np.float32)
            d[key] = _meta_tensor(pixels, path)
        return d


class LoadIndexMaskd(MapTransform):
    """Replace a mask path by a (1, H, W) uint8 MetaTensor of class indices (``0..C-1`` tissue, ``C``
    background, 255 ignored), read with :func:`common.data.histopathology.read_mask`, which refuses
    colour masks and values out of range. Cast to int64 (``CastToTyped``) before a cross-entropy loss."""

    def __init__(self, keys: KeysCollection, num_classes: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 0 < num_classes < 255:
            raise ValueError(f"num_classes must be an integer in 1..254, got {num_classes!r}")
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            d[key] = _meta_tensor(read_mask(path, self.num_classes)[None], path)
        return d
