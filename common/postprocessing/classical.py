"""The classical baseline the learned models are compared against: Otsu threshold + distance watershed.

This is the pipeline a microscopist would assemble by hand in scikit-image or Fiji, tuned to be a fair
opponent rather than a strawman: the image is smoothed before thresholding so noise does not fragment
cells, holes left by dim nuclei or bright halos are filled, touching cells are split by a watershed on
the distance to the background seeded at its local maxima, and debris is removed.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, convert_to_numpy, ensure_tuple
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.measure import label as connected_components
from skimage.segmentation import watershed

from common.postprocessing.watershed import remove_small_instances

__all__ = ["OtsuWatershedd", "otsu_watershed", "to_grayscale"]


def to_grayscale(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """A float64 (H, W) image from (H, W), (H, W, C) or (C, H, W) input with C in {1, 3, 4}.

    Colour channels are averaged rather than weighted for luminance: fluorescence images saved as RGB
    usually carry the signal in a single channel, which luminance weights would shrink (blue to 7%).
    A fourth (alpha) channel is ignored.
    """
    image = convert_to_numpy(image, dtype=np.float64, wrap_sequence=True)
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        image = image[..., :3].mean(axis=-1)
    if image.ndim != 2:
        raise ValueError(
            f"expected an image of shape (H, W), (H, W, C) or (C, H, W) with C in 1/3/4, got {image.shape}"
        )
    return image


def otsu_watershed(
    image: np.ndarray | torch.Tensor,
    min_distance: int = 5,
    min_size: int = 15,
    smoothing_sigma: float = 1.0,
    invert: bool | None = None,
) -> np.ndarray:
    """Segment cells with Otsu thresholding and a distance-transform watershed.

    Args:
        image: grayscale or colour image, see :func:`to_grayscale`.
        min_distance: smallest distance in pixels between two cell centres; roughly the radius of the
            smallest cell. Lower values split more.
        min_size: objects (and watershed fragments) with fewer pixels are dropped.
        smoothing_sigma: standard deviation of the Gaussian applied before thresholding (0: none).
        invert: ``False`` when cells are brighter than the background (fluorescence), ``True`` when they
            are darker (brightfield, some phase contrast). ``None`` picks the side of the Otsu threshold
            that covers the smaller area, since in cell images the cells rarely cover more than half of
            the field while the background is one large region.

    Returns:
        int32 labels of shape (H, W), 0 background, cells numbered 1..N without gaps.
    """
    if min_distance < 1:
        raise ValueError(f"min_distance must be >= 1 pixel, got {min_distance}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    gray = to_grayscale(image)
    if smoothing_sigma > 0:
        gray = gaussian(gray, sigma=smoothing_sigma, preserve_range=True)
    if gray.min() == gray.max():
        return np.zeros(gray.shape, dtype=np.int32)

    bright = gray > threshold_otsu(gray)
    if invert is None:
        invert = bool(bright.mean() > 0.5)
    filled = ndi.binary_fill_holes(~bright if invert else bright)
    components = remove_small_instances(connected_components(filled), min_size)
    foreground = components > 0

    distance = ndi.distance_transform_edt(foreground)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    markers = np.zeros(gray.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return remove_small_instances(watershed(-distance, markers, mask=foreground), min_size)


class OtsuWatershedd(MapTransform):
    """Dictionary transform wrapping :func:`otsu_watershed`, so the baseline runs through the same
    evaluator, writers and metrics as the network (whose "prediction" is then the image itself).

    Args:
        keys: keys of the (C, H, W) images.
        output_key: where the int32 (1, H, W) labels are stored, one key per entry of ``keys``.
        min_distance: see :func:`otsu_watershed`.
        min_size: see :func:`otsu_watershed`.
        smoothing_sigma: see :func:`otsu_watershed`.
        invert: see :func:`otsu_watershed`.
        allow_missing_keys: do not fail when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_key: str | Sequence[str] = "instances",
        min_distance: int = 5,
        min_size: int = 15,
        smoothing_sigma: float = 1.0,
        invert: bool | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_keys = ensure_tuple(output_key)
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"output_key needs one entry per key: got {len(self.keys)} keys and {len(self.output_keys)}")
        self.kwargs = {"min_distance": min_distance, "min_size": min_size, "smoothing_sigma": smoothing_sigma, "invert": invert}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, output_key in self.key_iterator(d, self.output_keys):
            labels = otsu_watershed(d[key], **self.kwargs)
            d[output_key] = convert_to_dst_type(labels[None], d[key], dtype=torch.int32)[0]
        return d
