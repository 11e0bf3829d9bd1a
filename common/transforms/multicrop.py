"""Multi-crop views for DINO self-supervised pretraining on microscopy images.

DINO (Caron et al. 2021) trains a student to match, from small local crops, what a teacher sees in
large global crops of the same image. The augmentations follow the paper's recipe (random resized
crops, colour jitter, Gaussian blur with view-dependent probabilities, solarisation on the second
global view), adapted to microscopy: cells have no canonical orientation, so views are also rotated
by multiples of 90 degrees; hue jitter is dropped because channel colours are arbitrary; instead,
a *per-channel view* shows a single input channel as grey, so features do not depend on which
stain or fluorescence channel is present.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_tensor

from common.errors import InputDataError
from common.transforms.intensity import NormalizeImageNet

__all__ = ["MultiCropViewsd"]

JITTER_PROB = 0.8
BRIGHTNESS, CONTRAST, SATURATION = 0.4, 0.4, 0.2
BLUR_SIGMA = (0.1, 2.0)
LOCAL_BLUR_PROB = 0.5
SOLARIZE_PROB = 0.2
_NORMALIZE = NormalizeImageNet(input_max=1.0)  # views are in 0..1 after the colour operations


@dataclass
class _ViewParams:
    """Everything random about one view, drawn before any pixel is touched."""

    size: int
    box: tuple[int, int, int, int]  # top, left, height, width
    channel: int | None  # None: all channels
    hflip: bool
    vflip: bool
    rot90: int
    jitter: tuple[float, float, float] | None  # brightness, contrast, saturation factors
    blur_sigma: float | None
    solarize: bool


class MultiCropViewsd(MapTransform, Randomizable):
    """Turn ``data["image"]`` (C, H, W) into ``n_global`` global and ``n_local`` local DINO views.

    Outputs ``"global_0"``, ..., ``"local_0"``, ...: float tensors (3, size, size) with ImageNet
    normalisation, ready for a timm ViT. Images with 1 channel are repeated to 3, with 2 channels
    get an empty third channel (as in RGB composites of two stains), with 3 are kept.

    Args:
        keys: the one image key.
        n_global: global views (DINO: 2).
        n_local: local views (DINO: 6 to 10; 0 disables multi-crop).
        global_size: side of global views (224 in DINO; 128 for small demos).
        local_size: side of local views (96 in DINO; 48 for small demos).
        global_scale: range of the crop area fraction of global views.
        local_scale: range of the crop area fraction of local views.
        p_channel: probability that a view shows one random input channel, replicated to 3.
        max_value: intensity that maps to 1; ``None`` means 255 if the image has values above 1,
            else 1. Normalise 16-bit images beforehand (e.g. ``ScaleIntensityRangePercentilesd``).
        keep_image: keep ``data["image"]`` in the output.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        n_global: int = 2,
        n_local: int = 6,
        global_size: int = 224,
        local_size: int = 96,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        p_channel: float = 0.5,
        max_value: float | None = None,
        keep_image: bool = False,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"MultiCropViewsd takes exactly one image key, got {self.keys}.")
        if n_global < 1 or n_local < 0:
            raise ValueError(f"need n_global >= 1 and n_local >= 0, got {n_global} and {n_local}.")
        if global_size < 1 or local_size < 1:
            raise ValueError(f"view sizes must be >= 1, got {global_size} and {local_size}.")
        for name, scale in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {tuple(scale)}.")
        if not 0 <= p_channel <= 1:
            raise ValueError(f"p_channel must be in [0, 1], got {p_channel}.")
        if max_value is not None and max_value <= 0:
            raise ValueError(f"max_value must be positive, got {max_value}.")
        self.n_global = n_global
        self.n_local = n_local
        self.global_size = global_size
        self.local_size = local_size
        self.global_scale = tuple(global_scale)
        self.local_scale = tuple(local_scale)
        self.p_channel = p_channel
        self.max_value = max_value
        self.keep_image = keep_image
        self._views: list[_ViewParams] = []

    def _crop_box(self, height: int, width: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
        """A box covering a random area fraction in ``scale`` with aspect ratio in [3/4, 4/3] (the
        RandomResizedCrop recipe); after 10 misses, the largest centred box of admissible ratio."""
        area = height * width
        for _ in range(10):
            target_area = area * self.R.uniform(*scale)
            ratio = math.exp(self.R.uniform(math.log(3 / 4), math.log(4 / 3)))
            w = round(math.sqrt(target_area * ratio))
            h = round(math.sqrt(target_area / ratio))
            if 0 < w <= width and 0 < h <= height:
                return int(self.R.randint(0, height - h + 1)), int(self.R.randint(0, width - w + 1)), h, w
        ratio = min(max(width / height, 3 / 4), 4 / 3)
        if width / height >= ratio:
            h, w = height, min(width, round(height * ratio))
        else:
            h, w = min(height, round(width / ratio)), width
        return (height - h) // 2, (width - w) // 2, h, w

    def _draw_view(
        self,
        shape: tuple[int, int, int],
        size: int,
        scale: tuple[float, float],
        p_blur: float,
        p_solarize: float,
    ) -> _ViewParams:
        channels, height, width = shape
        box = self._crop_box(height, width, scale)
        channel = int(self.R.randint(channels)) if self.R.rand() < self.p_channel else None
        jitter = None
        if self.R.rand() < JITTER_PROB:
            jitter = tuple(float(self.R.uniform(1 - s, 1 + s)) for s in (BRIGHTNESS, CONTRAST, SATURATION))
        blur_sigma = float(self.R.uniform(*BLUR_SIGMA)) if self.R.rand() < p_blur else None
        return _ViewParams(
            size=size,
            box=box,
            channel=channel,
            hflip=bool(self.R.rand() < 0.5),
            vflip=bool(self.R.rand() < 0.5),
            rot90=int(self.R.randint(4)),
            jitter=jitter,
            blur_sigma=blur_sigma,
            solarize=bool(self.R.rand() < p_solarize),
        )

    def randomize(self, data: tuple[int, int, int]) -> None:
        """Draw the parameters of every view for an image of shape ``data`` = (C, H, W).

        Blur and solarisation probabilities follow DINO: first global view always blurred, second
        rarely blurred but sometimes solarised, local views blurred half the time.
        """
        self._views = []
        for i in range(self.n_global):
            p_blur = (1.0, 0.1)[i] if i < 2 else LOCAL_BLUR_PROB
            p_solarize = SOLARIZE_PROB if i == 1 else 0.0
            self._views.append(self._draw_view(data, self.global_size, self.global_scale, p_blur, p_solarize))
        for _ in range(self.n_local):
            self._views.append(self._draw_view(data, self.local_size, self.local_scale, LOCAL_BLUR_PROB, 0.0))

    @staticmethod
    def _to_three_channels(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return x.expand(3, -1, -1)
        if x.shape[0] == 2:
            return torch.cat([x, torch.zeros_like(x[:1])])
        return x

    @staticmethod
    def _render(image: torch.Tensor, p: _ViewParams) -> torch.Tensor:
        x = image if p.channel is None else image[p.channel : p.channel + 1]
        x = TF.resized_crop(x, *p.box, size=[p.size, p.size], antialias=True)
        x = MultiCropViewsd._to_three_channels(x).clamp(0, 1)
        if p.hflip:
            x = x.flip(-1)
        if p.vflip:
            x = x.flip(-2)
        x = torch.rot90(x, p.rot90, dims=(-2, -1))
        if p.jitter is not None:
            brightness, contrast, saturation = p.jitter
            x = TF.adjust_brightness(x, brightness)
            x = TF.adjust_contrast(x, contrast)
            x = TF.adjust_saturation(x, saturation)
        if p.blur_sigma is not None:
            kernel = min(2 * math.ceil(3 * p.blur_sigma) + 1, 2 * ((p.size - 1) // 2) + 1)
            x = TF.gaussian_blur(x, kernel_size=[kernel, kernel], sigma=[p.blur_sigma, p.blur_sigma])
        if p.solarize:
            x = TF.solarize(x, threshold=0.5)
        return _NORMALIZE(x)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        raw = d[key]
        meta = getattr(raw, "meta", None) or {}
        path = meta.get("filename_or_obj")
        image = convert_to_tensor(raw, dtype=torch.float32, track_meta=False)
        if image.ndim != 3 or not 1 <= image.shape[0] <= 3 or min(image.shape[1:]) < 1:
            raise InputDataError(
                path,
                f"'{key}' has shape {tuple(image.shape)}; multi-crop needs (C, H, W) with 1 to 3 channels",
            )
        max_value = self.max_value or (255.0 if float(image.max()) > 1 else 1.0)
        image = image / max_value

        self.randomize(tuple(image.shape))
        for i, params in enumerate(self._views):
            name = f"global_{i}" if i < self.n_global else f"local_{i - self.n_global}"
            d[name] = self._render(image, params)
        if not self.keep_image:
            del d[key]
        return d
