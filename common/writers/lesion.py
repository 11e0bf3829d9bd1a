"""Lesion outputs on disk: the ISIC-format mask (0/255 PNG) and an outline overlay, named after the image."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

from common.utils import as_plane
from common.writers.display import display_rgb, write_png
from common.writers.instances import source_stem

__all__ = ["SaveLesionOutputsd", "write_lesion_mask", "write_lesion_overlay"]

_CONTOUR_COLOUR = (0, 158, 115)  # Okabe-Ito bluish green: visible on skin tones and dark lesions


def write_lesion_mask(mask: np.ndarray | torch.Tensor, path: str | os.PathLike) -> Path:
    """Write an (H, W) or (1, H, W) mask as an 8-bit PNG with 0 (skin) and 255 (lesion), the ISIC
    ground-truth format, atomically."""
    pixels = np.where(as_plane(mask, "mask") > 0, 255, 0).astype(np.uint8)
    return write_png(pixels, path)


def write_lesion_overlay(
    image: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    colour: Sequence[int] = _CONTOUR_COLOUR,
    thickness: int = 2,
) -> Path:
    """Draw the outline of ``mask`` on ``image`` and write it as an RGB PNG, atomically.

    ``image`` is (3, H, W), (1, H, W) or (H, W, 3); ImageNet-normalised tensors are stretched per
    channel to be viewable. The outline is the mask's inner border, ``thickness`` pixels wide; a lesion
    cut by the image edge is not outlined along that edge, since its true border lies beyond it.
    """
    if thickness < 1:
        raise ValueError(f"thickness must be >= 1, got {thickness}")
    rgb = display_rgb(image).copy()
    mask = as_plane(mask, "mask") > 0
    if mask.shape != rgb.shape[:2]:
        raise ValueError(
            f"mask is {mask.shape[0]}x{mask.shape[1]} but the image is {rgb.shape[0]}x{rgb.shape[1]}"
        )
    inner = ndimage.binary_erosion(mask, iterations=thickness, border_value=1)
    rgb[mask & ~inner] = colour
    return write_png(rgb, path)


class SaveLesionOutputsd(MapTransform):
    """Write each image's lesion mask (ISIC format: 0/255 PNG) and an outline overlay.

    Files are named after the image's ``filename_or_obj``: ``<stem>_mask.png`` and
    ``<stem>_overlay.png`` in ``output_dir``. With ``output_file`` (one image, e.g. from the
    single-image command line) the mask goes exactly there and the overlay beside it as
    ``<output stem>_overlay.png``. The mask must have the image's size (see ``LesionMaskd(size_key=...)``);
    the written paths are added to the data under ``"<key>_path"`` and ``"<key>_overlay_path"``.

    Args:
        keys: the one key holding the (1, H, W) lesion mask.
        output_dir: folder receiving the files when ``output_file`` is not given.
        image_key: key of the image MetaTensor, at the mask's size, that names the outputs.
        output_file: write the mask to this path (single-image use).
        overlay: also write the overlay.
    """

    def __init__(
        self,
        keys: KeysCollection = "lesion_mask",
        output_dir: str | os.PathLike = "./outputs",
        image_key: str = "image",
        output_file: str | os.PathLike | None = None,
        overlay: bool = True,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"SaveLesionOutputsd writes one mask key, got keys {self.keys}")
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.output_file = None if output_file is None else Path(output_file)
        self.overlay = overlay
        self._output_file_source: Path | None = None

    def _paths(self, image: Any) -> tuple[Path, Path]:
        if self.output_file is not None:
            source = source_stem(image, self.image_key)[0]
            if self._output_file_source not in (None, source):
                raise ValueError(
                    f"output_file {self.output_file} takes one image, but both {self._output_file_source} "
                    f"and {source} were given; use output_dir for several images"
                )
            self._output_file_source = source
            return self.output_file, self.output_file.with_name(f"{self.output_file.stem}_overlay.png")
        stem = source_stem(image, self.image_key)[1]
        return self.output_dir / f"{stem}_mask.png", self.output_dir / f"{stem}_overlay.png"

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[self.image_key]
            mask_path, overlay_path = self._paths(image)
            d[f"{key}_path"] = str(write_lesion_mask(d[key], mask_path))
            if self.overlay:
                d[f"{key}_overlay_path"] = str(write_lesion_overlay(image, d[key], overlay_path))
        return d
