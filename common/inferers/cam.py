"""Class activation maps as an evaluator's prediction, for writing CAM pseudo-masks with MONAI engines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer

from common.utils import unwrap_module

__all__ = ["CAMInferer"]


class CAMInferer(Inferer):
    """Run ``network.cams(inputs, **cams_kwargs)`` instead of ``network(inputs)``.

    A ``SupervisedEvaluator`` with this inferer puts (B, C, H, W) class activation maps under ``pred``.
    ``cams_kwargs`` are the network's own options, e.g. ``flip=True`` or ``scales=(1.0, 1.5)`` for
    :class:`common.networks.cam_classifier.CAMClassifier`. A network wrapped in
    ``DistributedDataParallel`` or ``DataParallel`` is unwrapped, since the wrapper only forwards
    ``forward``.
    """

    def __init__(self, **cams_kwargs: Any) -> None:
        super().__init__()
        self.cams_kwargs = cams_kwargs

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        model = unwrap_module(network)
        cams = getattr(model, "cams", None)
        if not callable(cams):
            raise TypeError(
                f"CAMInferer needs a network with a cams(x) method; {type(model).__name__} has none"
            )
        return cams(inputs, *args, **{**self.cams_kwargs, **kwargs})
