"""Instance masks from a predicted per-cell normalised distance map.

The network predicts, for every pixel, its distance to the cell border divided by the largest such
distance in the same cell, so every cell peaks near 1 in its centre whatever its size, and touching
cells are separated by a valley. Two thresholds turn the map into instances: regions above
``cells_max`` are the seeds (one per cell), pixels above ``cell_fill`` are cell, and a watershed on the
negated map grows each seed over its cell until it meets a neighbour in the valley. A network trained on
few images predicts a noisy map whose threshold contours are ragged; smoothing the map with a Gaussian
of ``smooth_sigma`` pixels first gives outlines as smooth as the cells (the threshold search picks the
width by SEG on the validation split).

The best thresholds depend on the data, so :mod:`common.postprocessing.threshold_search` tunes them on
the validation split and writes them to a JSON file that :func:`load_watershed_thresholds` reads back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, ensure_tuple
from scipy.ndimage import gaussian_filter
from skimage.measure import label as connected_components
from skimage.segmentation import relabel_sequential, watershed

from common.errors import InputDataError
from common.utils import as_plane

__all__ = [
    "DistanceMapWatershedd",
    "check_smooth_sigma",
    "check_thresholds",
    "distance_map_watershed",
    "load_watershed_thresholds",
    "remove_small_instances",
]


def check_thresholds(cells_max: float, cell_fill: float) -> None:
    """Raise ``ValueError`` unless ``0 <= cell_fill < cells_max <= 1`` (seeds must sit inside the cells)."""
    if not 0.0 <= cell_fill < cells_max <= 1.0:
        raise ValueError(
            f"watershed thresholds must satisfy 0 <= cell_fill < cells_max <= 1, "
            f"got cell_fill={cell_fill} and cells_max={cells_max}"
        )


def remove_small_instances(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Drop objects with fewer than ``min_size`` pixels and renumber the rest 1..N as int32."""
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if min_size > 0:
        small = np.bincount(labels.ravel()) < min_size
        small[0] = False
        labels = np.where(small[labels], 0, labels)
    return relabel_sequential(labels)[0].astype(np.int32, copy=False)


def check_smooth_sigma(smooth_sigma: float) -> None:
    """Raise ``ValueError`` for a negative smoothing width."""
    if smooth_sigma < 0:
        raise ValueError(f"smooth_sigma must be >= 0 pixels, got {smooth_sigma}")


def distance_map_watershed(
    dist_map: np.ndarray | torch.Tensor,
    cells_max: float = 0.5,
    cell_fill: float = 0.05,
    min_size: int = 0,
    smooth_sigma: float = 0.0,
) -> np.ndarray:
    """Split a normalised distance map into cell instances.

    Args:
        dist_map: predicted map in [0, 1], shape (H, W) or (1, H, W), NumPy or torch.
        cells_max: seeds are the connected regions above this value, one per cell.
        cell_fill: pixels above this value belong to a cell.
        min_size: objects with fewer pixels are removed (0 keeps everything).
        smooth_sigma: standard deviation in pixels of the Gaussian applied to the map first (0: none).

    Returns:
        int32 labels of shape (H, W): 0 is background, cells are numbered 1..N without gaps.
    """
    check_thresholds(cells_max, cell_fill)
    check_smooth_sigma(smooth_sigma)
    dist = as_plane(dist_map, "distance map", dtype=np.float32)
    if smooth_sigma > 0:
        dist = gaussian_filter(dist, smooth_sigma, mode="nearest")
    markers = connected_components(dist > cells_max)
    return remove_small_instances(watershed(-dist, markers, mask=dist > cell_fill), min_size)


class DistanceMapWatershedd(MapTransform):
    """Dictionary transform wrapping :func:`distance_map_watershed` for MONAI postprocessing chains.

    It reads a (1, H, W) prediction (the sigmoid output, after ``decollate_batch``) and stores the
    int32 (1, H, W) instance labels under ``output_key``; when the prediction is a ``MetaTensor`` its
    metadata is carried over so writers still know the source file.

    Args:
        keys: keys of the distance-map predictions.
        cells_max: seed threshold, see :func:`distance_map_watershed`.
        cell_fill: foreground threshold.
        min_size: smallest object kept, in pixels.
        smooth_sigma: Gaussian smoothing of the map before thresholding, in pixels.
        output_key: where the labels are stored, one key per entry of ``keys``.
        allow_missing_keys: do not fail when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        cells_max: float = 0.5,
        cell_fill: float = 0.05,
        min_size: int = 0,
        smooth_sigma: float = 0.0,
        output_key: str | Sequence[str] = "instances",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        check_thresholds(cells_max, cell_fill)
        check_smooth_sigma(smooth_sigma)
        if min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {min_size}")
        self.cells_max = cells_max
        self.cell_fill = cell_fill
        self.min_size = min_size
        self.smooth_sigma = smooth_sigma
        self.output_keys = ensure_tuple(output_key)
        if len(self.output_keys) != len(self.keys):
            raise ValueError(
                f"output_key needs one entry per key: got {len(self.keys)} keys "
                f"and {len(self.output_keys)} output keys"
            )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, output_key in self.key_iterator(d, self.output_keys):
            labels = distance_map_watershed(
                d[key], self.cells_max, self.cell_fill, self.min_size, self.smooth_sigma
            )
            d[output_key] = convert_to_dst_type(labels[None], d[key], dtype=torch.int32)[0]
        return d


def load_watershed_thresholds(
    path: str | os.PathLike, default: Mapping[str, float | int]
) -> dict[str, float | int]:
    """Thresholds tuned by the threshold search, or ``default`` when they have not been tuned yet.

    Args:
        path: JSON file written by :func:`common.postprocessing.threshold_search.save_watershed_thresholds`.
        default: the thresholds to use without a file; its keys (e.g. ``cells_max``, ``cell_fill``,
            ``min_size``, ``smooth_sigma``) are the ones read from the file, each converted to the type
            of its default. ``smooth_sigma`` alone may be absent (files from before smoothing: 0.0).

    Raises:
        InputDataError: the file exists but is not valid JSON, lacks one of the keys, holds a
            non-numeric value or thresholds outside ``0 <= cell_fill < cells_max <= 1``.
    """
    path = Path(path)
    if not path.exists():
        return dict(default)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputDataError(path, f"not a readable JSON file of watershed thresholds ({err})") from err
    if not isinstance(content, dict):
        raise InputDataError(path, f"expected a JSON object of thresholds, found {type(content).__name__}")
    content.setdefault("smooth_sigma", 0.0)
    missing = [key for key in default if key not in content]
    if missing:
        raise InputDataError(path, f"missing watershed threshold(s) {missing}; found {sorted(content)}")
    thresholds: dict[str, float | int] = {}
    for key, fallback in default.items():
        value = content[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputDataError(path, f"{key!r} must be a number, found {value!r}")
        if isinstance(fallback, int) and not float(value).is_integer():
            raise InputDataError(path, f"{key!r} must be a whole number, found {value!r}")
        thresholds[key] = type(fallback)(value)
    try:
        if "cells_max" in thresholds and "cell_fill" in thresholds:
            check_thresholds(thresholds["cells_max"], thresholds["cell_fill"])
        check_smooth_sigma(thresholds.get("smooth_sigma", 0.0))
    except ValueError as err:
        raise InputDataError(path, str(err)) from err
    return thresholds
