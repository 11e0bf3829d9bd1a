"""Turn labels saved through MONAI Label's ``/datastore`` into the training targets of the bundles."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from common.data.cell_readers import read_label_image
from common.data.distance_map import normalized_distance_map

__all__ = ["LoadInstanceDistanceMapd"]


class LoadInstanceDistanceMapd(MapTransform):
    """Replace the path of an instance label image (16-bit PNG or TIFF, 0 background, as the app returns
    and a viewer saves it) by the DINOCell target: a (1, H, W) float32 normalised distance map, computed
    as :mod:`common.data.cell_arrays` does for the bundle's own training arrays."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            target = normalized_distance_map(read_label_image(path)).astype(np.float32)[None]
            d[key] = MetaTensor(torch.from_numpy(target), meta={"filename_or_obj": path})
        return d
