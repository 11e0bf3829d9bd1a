"""Mirror-pad the image before inference so that no prediction comes from a window's edge.

A sliding-window inferer blends overlapping windows, so inside the image the unreliable edge of one
window (zero padding, truncated receptive fields, position embeddings never trained there) is
outweighed by the centre of its neighbour. At the image's own border no neighbour exists: the
network's edge response stands alone and turns into thin false instances along the edge. Padding the
image with its mirror image by a margin and cropping the margin off afterwards moves that response
outside the image, where it is discarded; cells cut by the border keep their mirrored continuation,
so they are predicted as in the interior and found once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import Inferer

__all__ = ["EdgePaddedInferer"]


class EdgePaddedInferer(Inferer):
    """Run ``inferer`` on the image mirror-padded by ``margin`` pixels per side, then crop the margin.

    ``EdgePaddedInferer(SlidingWindowInferer(...), margin=32)`` is a drop-in replacement for the
    sliding-window inferer in a config. Inputs are (B, C, *spatial); every spatial axis is padded.

    Args:
        inferer: the inferer to wrap; ``None`` calls the network directly.
        margin: pixels added on every side; a few times the network's edge effect (for a ViT, one
            or two patches, e.g. 16 pixels for patch size 8), at most the image size minus one.
        mode: ``"reflect"`` (mirror without repeating the edge pixel) or ``"replicate"``.
    """

    def __init__(self, inferer: Inferer | None = None, margin: int = 16, mode: str = "reflect") -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be >= 0 pixels, got {margin}")
        if mode not in ("reflect", "replicate"):
            raise ValueError(f"mode must be 'reflect' or 'replicate', got {mode!r}")
        self.inferer = inferer
        self.margin = margin
        self.mode = mode

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        spatial = inputs.shape[2:]
        # reflect needs the margin below each size; smaller images get what they can hold
        margin = min(self.margin, *(size - 1 for size in spatial)) if self.mode == "reflect" else self.margin
        if margin <= 0:
            return self._infer(inputs, network, *args, **kwargs)
        padded = F.pad(inputs, [margin] * (2 * len(spatial)), mode=self.mode)
        output = self._infer(padded, network, *args, **kwargs)
        crop = (slice(None), slice(None)) + tuple(slice(margin, margin + size) for size in spatial)
        return output[crop]

    def _infer(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        if self.inferer is None:
            return network(inputs, *args, **kwargs)
        return self.inferer(inputs, network, *args, **kwargs)
