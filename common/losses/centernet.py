"""CenterNet's training loss: a penalty-reduced focal loss on the centre heatmap plus an L1 offset loss.

A 1024 x 1024 image has 65,536 heatmap cells at stride 4 and a few hundred cell centres, so a plain
cross-entropy is dominated by easy background. The focal term ``(1 - p)^alpha`` / ``p^alpha``
down-weights easy cells, and ``(1 - y)^beta`` forgives confident predictions next to a centre, where
the Gaussian target ``y`` is close to 1 and the exact peak position is uncertain anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CenterNetFocalLoss", "CenterNetLoss"]


class CenterNetFocalLoss(nn.Module):
    """Focal loss of Zhou et al. (2019) on heatmap logits, summed and divided by the number of centres.

    With ``p = sigmoid(logits)`` and Gaussian target ``y``: cells where ``y == 1`` contribute
    ``-(1 - p)^alpha log(p)``, all others ``-(1 - y)^beta p^alpha log(1 - p)``. The sum over the
    batch is divided by the number of centres in the batch (at least 1, so images without objects
    still teach the background). Logarithms come from ``logsigmoid``, which is exact for large
    logits where ``log(sigmoid(x))`` would underflow.

    Args:
        alpha: focusing exponent on the predicted probability.
        beta: exponent that reduces the penalty on negatives near a centre.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 4.0) -> None:
        super().__init__()
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha} and {beta}.")
        self.alpha = alpha
        self.beta = beta

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape.")
        logits, target = logits.float(), target.float()
        prob = torch.sigmoid(logits)
        positive = target == 1
        positive_loss = (1 - prob).pow(self.alpha) * F.logsigmoid(logits)
        negative_loss = (1 - target).pow(self.beta) * prob.pow(self.alpha) * F.logsigmoid(-logits)
        total = torch.where(positive, positive_loss, negative_loss).sum()
        return -total / positive.sum().clamp(min=1)


class CenterNetLoss(nn.Module):
    """Heatmap focal loss + ``offset_weight`` x L1 offset loss, for ``loss_function(pred, label)``.

    ``pred`` is the network output (B, 3, h, w) = [heatmap logits, offset x, offset y] and
    ``target`` the (B, 4, h, w) label of :class:`common.transforms.centernet.CenterNetTargetd` =
    [Gaussian heatmap, offset x, offset y, centre mask]. Offsets are only supervised at centre cells;
    their L1 error is averaged over the x and y of every centre in the batch, as in CenterNet.

    Args:
        offset_weight: weight of the offset term (CenterNet uses 1).
        alpha: focal exponent, see :class:`CenterNetFocalLoss`.
        beta: penalty-reduction exponent, see :class:`CenterNetFocalLoss`.
    """

    def __init__(self, offset_weight: float = 1.0, alpha: float = 2.0, beta: float = 4.0) -> None:
        super().__init__()
        if offset_weight < 0:
            raise ValueError(f"offset_weight must be >= 0, got {offset_weight}.")
        self.offset_weight = offset_weight
        self.focal = CenterNetFocalLoss(alpha, beta)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.ndim != 4 or pred.shape[1] != 3 or target.shape != (pred.shape[0], 4, *pred.shape[2:]):
            raise ValueError(
                f"expected pred (B, 3, h, w) and target (B, 4, h, w), got {tuple(pred.shape)} and {tuple(target.shape)}."
            )
        heatmap_loss = self.focal(pred[:, :1], target[:, :1])
        mask = target[:, 3:4].float()
        offset_error = (pred[:, 1:3].float() - target[:, 1:3].float()).abs() * mask
        offset_loss = offset_error.sum() / (2 * mask.sum()).clamp(min=1)
        return heatmap_loss + self.offset_weight * offset_loss
