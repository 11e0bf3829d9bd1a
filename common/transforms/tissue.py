"""Where the tissue is on an H&E image: the one definition of glass that tile filtering, pseudo-masks
and the glass mask of predictions share.

A pixel is not tissue when it is glass, bright and grey (HSV saturation below ``saturation_threshold``
and brightness, max(R, G, B) / 255, above ``brightness_threshold``), or black, darker than
``black_threshold`` (scanner borders, the padding some readers give past a slide's edge). Both glass
conditions are needed: pale eosin-stained stroma is bright but pink (saturation about 0.15 to 0.3),
and dark debris or pen marks are grey but not bright. The defaults keep faint stroma as tissue and the
glass of scanned H&E slides as background; raise ``saturation_threshold`` for faded stains.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from monai.utils import convert_to_numpy

__all__ = ["BLACK_THRESHOLD", "BRIGHTNESS_THRESHOLD", "SATURATION_THRESHOLD", "tissue_fraction", "tissue_mask"]

SATURATION_THRESHOLD = 0.1
BRIGHTNESS_THRESHOLD = 0.85  # max(R, G, B) > 217
BLACK_THRESHOLD = 0.1  # max(R, G, B) < 26


def tissue_mask(
    image: Any,
    saturation_threshold: float = SATURATION_THRESHOLD,
    brightness_threshold: float = BRIGHTNESS_THRESHOLD,
    black_threshold: float = BLACK_THRESHOLD,
) -> np.ndarray:
    """(H, W) bool, ``True`` on tissue, of an RGB image (3, H, W) or (H, W, 3), uint8 or float in 0..255.

    The image must not be intensity-normalised (a float image in 0..1 would be all black).
    """
    for name, value in (
        ("saturation_threshold", saturation_threshold),
        ("brightness_threshold", brightness_threshold),
        ("black_threshold", black_threshold),
    ):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must lie in 0..1, got {value}")
    rgb = _rgb(image)
    brightest, darkest = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = np.divide(brightest - darkest, brightest, out=np.zeros_like(brightest), where=brightest > 0)
    glass = (saturation < saturation_threshold) & (brightest > brightness_threshold * 255)
    black = brightest < black_threshold * 255
    return ~(glass | black)


def tissue_fraction(image: Any, **thresholds: float) -> float:
    """Share of tissue pixels (:func:`tissue_mask`) in one RGB image or a batch (B, 3, H, W)."""
    array = convert_to_numpy(image)
    planes = array.reshape(-1, 3, *array.shape[-2:]) if array.ndim == 4 else [array]
    return float(np.mean([tissue_mask(plane, **thresholds).mean() for plane in planes]))


def _rgb(image: Any) -> np.ndarray:
    """An (H, W, 3) float64 view of a (3, H, W) or (H, W, 3) 0..255 image; channel-first wins if both fit."""
    image = convert_to_numpy(image, wrap_sequence=True)
    if image.ndim == 3 and image.shape[0] == 3:
        image = np.moveaxis(image, 0, -1)
    elif not (image.ndim == 3 and image.shape[-1] == 3):
        raise ValueError(f"image must be RGB, (3, H, W) or (H, W, 3), got shape {image.shape}")
    image = image.astype(np.float64)
    if image.size and (image.min() < 0 or image.max() > 255):
        raise ValueError(
            f"image values must lie in 0..255 (the image as loaded, before intensity normalisation), "
            f"found {image.min():.3g}..{image.max():.3g}"
        )
    return image
