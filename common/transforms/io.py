"""Loading transforms that read images exactly as the training data was prepared."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from common.data.angiogram_images import read_angiogram
from common.data.cell_readers import read_image
from common.data.dermoscopy import read_binary_mask

__all__ = ["LoadAngiogramd", "LoadBinaryMaskd", "LoadCellImaged"]


class LoadCellImaged(MapTransform):
    """Replace a path by a (3, H, W) float MetaTensor in 0..255, read with
    :func:`common.data.cell_readers.read_image`.

    Inference must see images the way ``common.data.cell_arrays`` stored them for training
    (grayscale repeated to three channels, 16-bit data scaled by percentiles), so both use one reader.
    ``filename_or_obj`` is kept in the meta data so writers can name their outputs.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            # one copy to channel-first float32, which also makes the decoder's read-only buffer writable
            pixels = torch.from_numpy(np.ascontiguousarray(read_image(path).transpose(2, 0, 1), dtype=np.float32))
            d[key] = MetaTensor(pixels, meta={"filename_or_obj": path, "spatial_shape": tuple(pixels.shape[1:])})
        return d


class LoadBinaryMaskd(MapTransform):
    """Replace a mask path by a (1, H, W) uint8 0/1 MetaTensor, read with
    :func:`common.data.dermoscopy.read_binary_mask` (which refuses masks that are not binary).

    Reads in (H, W) order like :class:`LoadCellImaged`, so image and mask stay aligned; MONAI's
    ``LoadImaged`` would return 2D PNGs transposed.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            mask = torch.from_numpy(read_binary_mask(path).astype(np.uint8))[None]
            d[key] = MetaTensor(mask, meta={"filename_or_obj": path, "spatial_shape": tuple(mask.shape[1:])})
        return d


class LoadAngiogramd(MapTransform):
    """Replace an angiogram path (PNG, JPEG, TIFF or DICOM) by a (3, H, W) float MetaTensor in 0..255,
    read with :func:`common.data.angiogram_images.read_angiogram`, as :class:`LoadCellImaged` does for
    other images.

    The DICOM frame is the entry's ``frame_key`` value when present (the labelled frame a COCO image
    record names), else ``frame`` (``None``: the middle frame). The entry's ``frame_key`` is consumed,
    so that batches mixing DICOM runs and PNG frames have the same keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        frame: int | None = None,
        frame_key: str = "frame",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.frame = frame
        self.frame_key = frame_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        frame = d.pop(self.frame_key, None)
        frame = self.frame if frame is None else int(frame)
        for key in self.key_iterator(d):
            path = str(d[key])
            pixels = read_angiogram(path, frame).transpose(2, 0, 1)
            pixels = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
            d[key] = MetaTensor(pixels, meta={"filename_or_obj": path, "spatial_shape": tuple(pixels.shape[1:])})
        return d
