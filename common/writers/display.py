"""What every overlay writer shares: a viewable RGB copy of an image, distinct colours, atomic PNGs."""

from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Any

import numpy as np
from monai.utils import convert_to_numpy
from PIL import Image

from common.io.atomic import atomic_write

__all__ = ["display_rgb", "golden_ratio_colours", "write_png"]

_GOLDEN_RATIO_CONJUGATE = 0.618033988749895


def display_rgb(image: Any, stretch: bool = False) -> np.ndarray:
    """An (H, W, 3) uint8 view of an image for drawing on.

    Accepts (H, W), channel-first (C, H, W) as MONAI transforms give, or channel-last (H, W, C), with C
    from 1 to 4: one channel is shown grey, two as red and green, a fourth (alpha) is dropped.
    By default uint8 is kept, values in [0, 1] are scaled by 255 and values in [0, 255] kept, so a
    photograph looks as it is; anything else (an ImageNet-normalised tensor, 16-bit microscopy) is
    stretched per channel from its minimum to its maximum. ``stretch=True`` always stretches, for
    images without a fixed display range (fluorescence, phase contrast).
    """
    image = convert_to_numpy(image, wrap_sequence=True)
    if image.ndim == 2:
        image = image[..., None]
    elif image.ndim == 3 and image.shape[0] <= 4 and image.shape[-1] > 4:
        image = np.moveaxis(image, 0, -1)
    if image.ndim != 3 or not 1 <= image.shape[-1] <= 4:
        raise ValueError(f"expected an image of shape (H, W), (C, H, W) or (H, W, C) with C <= 4, got {image.shape}")
    image = image[..., :3]
    if stretch or image.dtype != np.uint8:
        image = _display_range(image.astype(np.float64), stretch)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 2:
        image = np.concatenate([image, np.zeros_like(image[..., :1])], axis=-1)
    return np.ascontiguousarray(image)


def _display_range(image: np.ndarray, stretch: bool) -> np.ndarray:
    low, high = image.min(initial=0.0), image.max(initial=0.0)
    if not stretch and low >= 0 and high <= 1:
        image = image * 255
    elif stretch or low < 0 or high > 255:
        low = image.min(axis=(0, 1), keepdims=True)
        span = image.max(axis=(0, 1), keepdims=True) - low
        image = np.divide(image - low, span, out=np.zeros_like(image), where=span > 0) * 255
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def golden_ratio_colours(n: int, saturation: float = 0.85, value: float = 1.0) -> np.ndarray:
    """(n, 3) RGB colours in 0..255 whose hues step by the golden ratio, so that neighbours in the
    sequence (adjacent instance labels, consecutive classes) never look alike."""
    hues = (np.arange(n) * _GOLDEN_RATIO_CONJUGATE) % 1.0
    return np.array([colorsys.hsv_to_rgb(h, saturation, value) for h in hues], dtype=np.float64).reshape(-1, 3) * 255


def write_png(pixels: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an (H, W) or (H, W, 3) uint8 (or uint16 grey) array as PNG, atomically."""
    image = Image.fromarray(pixels)
    return atomic_write(path, lambda f: image.save(f, format="PNG"))
