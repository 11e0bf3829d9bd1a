"""Intensity augmentations MONAI does not ship."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

__all__ = ["RandInvertIntensityd"]


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
