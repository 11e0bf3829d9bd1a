"""Intensity transforms MONAI does not ship: ImageNet normalisation with an explicit input range, and
a random inversion for microscopy.

The ImageNet channel statistics live here once; every config and module that normalises images for an
ImageNet- (or MAE-, DINO-) pretrained backbone goes through :class:`NormalizeImageNet` /
:class:`NormalizeImageNetd` or reads :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import get_track_meta
from monai.transforms import MapTransform, RandomizableTransform, Transform
from monai.utils import TransformBackends, convert_to_tensor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NormalizeImageNet", "NormalizeImageNetd", "RandInvertIntensityd"]

#: Per-channel (R, G, B) mean and standard deviation of ImageNet, for images scaled to 0..1.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class NormalizeImageNet(Transform):
    """``(x / input_max - IMAGENET_MEAN[c]) / IMAGENET_STD[c]`` on every channel ``c`` of an RGB image.

    The channel axis is the third from last, so one (3, H, W) image and a (B, 3, H, W) batch (e.g. the
    tiles a whole-slide inferer feeds the network) are both accepted. The result is a float32 tensor on
    the input's device: a MetaTensor input keeps its metadata, a plain tensor stays plain, and a NumPy
    array becomes a MetaTensor when MONAI tracks metadata, as with MONAI's own intensity transforms.

    Args:
        input_max: the value of full intensity in the input, stated explicitly because the two
            conventions differ by a factor 255: ``255`` for 8-bit images as loaded, ``1`` for images
            already scaled to 0..1 (e.g. after ``ScaleIntensityRanged`` and a colour jitter that needs
            that range). Values are not clipped.

    Raises:
        ValueError: ``input_max`` is not positive, or the image does not have 3 channels on axis -3.
    """

    backend: ClassVar[list[TransformBackends]] = [TransformBackends.TORCH]

    def __init__(self, input_max: float) -> None:
        if isinstance(input_max, bool) or not isinstance(input_max, (int, float)) or not input_max > 0:
            raise ValueError(
                f"input_max must be a positive number (255 for 8-bit images, 1 for 0..1), got {input_max!r}."
            )
        self.input_max = float(input_max)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        if img.ndim < 3 or img.shape[-3] != 3:
            raise ValueError(
                "ImageNet normalisation needs 3 (R, G, B) channels on axis -3, "
                f"got an image of shape {tuple(img.shape)}."
            )
        if isinstance(img, torch.Tensor):
            image = img.to(torch.float32)
        else:
            image = convert_to_tensor(img, dtype=torch.float32, track_meta=get_track_meta())
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).mul(self.input_max).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64).mul(self.input_max).view(3, 1, 1)
        return (image - mean.to(image)).div_(std.to(image))  # in place: one full-size temporary fewer


class NormalizeImageNetd(MapTransform):
    """Dictionary version of :class:`NormalizeImageNet`.

    Args:
        keys: the (3, H, W) images to normalise.
        input_max: ``255`` for 8-bit images as loaded, ``1`` for images already scaled to 0..1.
        allow_missing_keys: do not fail when a key is absent.
    """

    backend = NormalizeImageNet.backend

    def __init__(self, keys: KeysCollection, input_max: float, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalize = NormalizeImageNet(input_max)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalize(d[key])
        return d


class RandInvertIntensityd(RandomizableTransform, MapTransform):
    """With probability ``prob``, replace every value ``v`` by ``max_value - v``.

    Phase-contrast cells are dark on grey and fluorescence cells bright on black; inverting half of
    the training images teaches the network both polarities. Apply it before normalisation.

    Args:
        keys: images to invert (all with the same draw).
        prob: probability of inverting.
        max_value: the intensity that maps to zero (255 for 8-bit data).
    """

    def __init__(
        self, keys: KeysCollection, prob: float = 0.5, max_value: float = 255.0, allow_missing_keys: bool = False
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.max_value = max_value

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = self.max_value - d[key]
        return d
