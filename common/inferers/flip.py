"""Horizontal-flip test-time augmentation of CenterNet outputs, as a MONAI inferer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer

__all__ = ["FlipAverageInferer", "flip_average"]


def flip_average(network: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """CenterNet output of ``image`` (B, C, H, W) averaged with that of its horizontal mirror image.

    The mirrored pass is flipped back along the width. A centre at ``x / s = j + o`` in the original
    sits at ``(w - 1 - j) + (1 - o)`` in the mirror (``w`` = map width), so after flipping back the
    mirrored offset x becomes ``1 - offset_x``; offset y is unchanged. The heatmaps are averaged as
    probabilities, as in CenterNet, and returned as logits so the result is a drop-in network output.
    """
    output = network(image)
    mirrored = torch.flip(network(torch.flip(image, dims=(-1,))), dims=(-1,))
    heatmap = (torch.sigmoid(output[:, :1]) + torch.sigmoid(mirrored[:, :1])) / 2
    offset_x = (output[:, 1:2] + 1 - mirrored[:, 1:2]) / 2
    offset_y = (output[:, 2:3] + mirrored[:, 2:3]) / 2
    return torch.cat([torch.logit(heatmap, eps=1e-6), offset_x, offset_y], dim=1)


class FlipAverageInferer(Inferer):
    """MONAI inferer running :func:`flip_average`, optionally through another inferer.

    ``FlipAverageInferer(SlidingWindowInferer(...))`` mirrors each whole image, runs the sliding
    window on both and averages, so the evaluator's ``inferer`` is the only config entry that changes.

    Args:
        inferer: the inferer to run on the image and its mirror; ``None`` calls the network directly.
    """

    def __init__(self, inferer: Inferer | None = None) -> None:
        super().__init__()
        self.inferer = inferer

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.inferer is None:
            return flip_average(lambda x: network(x, *args, **kwargs), inputs)
        return flip_average(lambda x: self.inferer(x, network, *args, **kwargs), inputs)
