"""Box-aware cropping for point-like detection targets."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, SpatialPad

__all__ = ["RandCropBoxesd"]


class RandCropBoxesd(Randomizable, MapTransform):
    """Crop a random ``roi_size`` window of a (C, H, W) image and move the x-first xyxy boxes with it.

    Boxes are shifted, not clipped: clipping a cell cut by the window edge would move its centre,
    which is the detection target. Boxes whose centre leaves the window are dropped, together with
    the matching entries of ``box_label_keys``. Images smaller than ``roi_size`` are padded at the
    end (bottom/right), which keeps box coordinates valid.

    Args:
        keys: images cropped with the same window.
        box_key: boxes (N, 4) as x1, y1, x2, y2 in pixels.
        roi_size: (height, width) of the window.
        box_label_keys: per-box arrays (N, ...) filtered with the boxes, e.g. class labels.
    """

    def __init__(
        self,
        keys: KeysCollection,
        box_key: str,
        roi_size: Sequence[int],
        box_label_keys: KeysCollection = (),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(roi_size) != 2 or min(roi_size) < 1:
            raise ValueError(f"roi_size must be (height, width) with positive sides, got {roi_size}.")
        self.box_key = box_key
        self.roi_size = (int(roi_size[0]), int(roi_size[1]))
        self.box_label_keys = (box_label_keys,) if isinstance(box_label_keys, str) else tuple(box_label_keys)
        self._start = (0, 0)

    def randomize(self, image_size: Sequence[int]) -> None:
        self._start = tuple(int(self.R.randint(0, max(s - r, 0) + 1)) for s, r in zip(image_size, self.roi_size))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = d[self.first_key(d)]
        self.randomize(first.shape[1:])
        (y0, x0), (h, w) = self._start, self.roi_size
        pad = SpatialPad(spatial_size=self.roi_size, method="end")
        for key in self.key_iterator(d):
            d[key] = pad(d[key][:, y0 : y0 + h, x0 : x0 + w])
        boxes = d[self.box_key]
        offset = [x0, y0, x0, y0]
        if isinstance(boxes, torch.Tensor):
            boxes = boxes - torch.as_tensor(offset, dtype=boxes.dtype, device=boxes.device)
        else:
            boxes = boxes - np.asarray(offset, dtype=boxes.dtype)
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        keep = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
        d[self.box_key] = boxes[keep]
        for key in self.box_label_keys:
            d[key] = d[key][keep]
        return d
