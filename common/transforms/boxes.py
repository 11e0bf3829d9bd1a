"""Box-aware transforms for point-like detection targets: a cropping that keeps box centres, and the
way to run MONAI's box transforms on our x-first boxes.

Boxes here are x-first (``x1, y1, x2, y2``, as in COCO, the CSV readers, :class:`CenterNetTargetd` and the
writers) on (C, H, W) images. MONAI's box transforms (``monai.apps.detection.transforms``) read box
coordinate ``k`` along spatial axis ``k`` of the image, i.e. y first; :class:`ImageAxisBoxCompose` runs
them in that order.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform, Randomizable, SpatialPad

from common.transforms.centernet import SwapBoxXYd

__all__ = ["ImageAxisBoxCompose", "RandCropBoxesd"]


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


class ImageAxisBoxCompose(Compose):
    """Run MONAI's box transforms (``RandFlipBoxd``, ``RandRotateBox90d``, ``RandZoomBoxd``, ...) on x-first
    boxes of (C, H, W) images.

    MONAI's box transforms read box coordinate ``k`` as a position along spatial axis ``k`` of the image,
    so on a (C, H, W) image they need y-first boxes. This ``Compose`` swaps the boxes of ``box_keys`` to
    y-first (:class:`~common.transforms.centernet.SwapBoxXYd`), runs ``transforms`` and swaps them back, so
    a config lists MONAI's transforms unchanged, with ``spatial_axis`` 0 meaning rows (y) and 1 columns
    (x), for the boxes as for the image. Being a ``Compose``, it seeds its transforms from its own random
    state (``set_random_state``) and inverts them (``inverse``) in the same axis order.

    Args:
        transforms: MONAI box-aware dictionary transforms, applied in order to one data dictionary.
        box_keys: the (N, 4) x-first boxes the transforms move.
        kwargs: other arguments of ``monai.transforms.Compose`` (``log_stats``, ``lazy``, ...).
    """

    def __init__(
        self, transforms: Sequence[Callable] | Callable, box_keys: KeysCollection = "boxes", **kwargs: Any
    ) -> None:
        super().__init__(transforms, **kwargs)
        self.swap = SwapBoxXYd(box_keys)

    def __call__(
        self, input_: Mapping[Hashable, Any], start: int = 0, end: int | None = None, threading: bool = False,
        lazy: bool | None = None,
    ) -> dict[Hashable, Any]:
        data = super().__call__(self.swap(input_), start=start, end=end, threading=threading, lazy=lazy)
        return self.swap(data)

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return self.swap(super().inverse(self.swap(data)))
