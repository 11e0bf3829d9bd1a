"""Logit-adjusted cross-entropy: one correction for class imbalance, applied in the loss alone.

A classifier trained with plain cross-entropy on imbalanced classes learns the class prior into its
logits, so rare classes (ASC-US, ASC-H) are under-predicted. Re-sampling the rare classes or weighting
their loss counters this; doing both counts the correction twice and suppresses the majority class
(NILM) instead. Logit adjustment (Menon et al., 2021) trains on ``logits + tau * log(prior)`` and
predicts with the plain logits: the network is spared from learning the prior, so its argmax
approximates the balanced (per-class averaged) error minimiser. ``tau = 1`` is Balanced Softmax
(Ren et al., 2020). The sampler then stays uniform over the data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LogitAdjustedCrossEntropy"]

logger = logging.getLogger(__name__)


class LogitAdjustedCrossEntropy(nn.Module):
    """Cross-entropy on ``logits + tau * log(class_counts / sum)``, for training only.

    Inference uses the network's logits unchanged (the adjustment would put the prior back).

    Args:
        class_counts: training samples per class (e.g. ``common.data.sampling.class_counts``). A class
            without samples would have prior 0 and no finite adjustment; it is counted as one sample,
            the rarest it could be, with a warning.
        tau: strength of the adjustment; 1 is Balanced Softmax, 0 plain cross-entropy.

    Raises:
        ValueError: counts that are not a 1-D sequence of at least 2 non-negative numbers, or a negative tau.
    """

    def __init__(self, class_counts: Sequence[int] | np.ndarray | torch.Tensor, tau: float = 1.0) -> None:
        super().__init__()
        counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64))
        if counts.ndim != 1 or counts.numel() < 2:
            raise ValueError(f"class_counts must list at least 2 classes, got shape {tuple(counts.shape)}.")
        if (counts < 0).any():
            raise ValueError(f"class_counts must be non-negative, got {counts.tolist()}.")
        if (counts == 0).any():
            logger.warning(
                "classes %s have no training samples: counted as one for the logit adjustment",
                torch.nonzero(counts == 0).flatten().tolist(),
            )
        counts = counts.clamp(min=1)
        if tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau}.")
        self.tau = tau
        self.register_buffer("adjustment", (tau * torch.log(counts / counts.sum())).float())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch; ``logits`` (N, C), ``target`` (N,) class indices."""
        if logits.ndim != 2 or logits.shape[1] != self.adjustment.numel():
            raise ValueError(
                f"logits must be (N, {self.adjustment.numel()}), got shape {tuple(logits.shape)}."
            )
        return F.cross_entropy(logits + self.adjustment.to(logits.dtype), target)
