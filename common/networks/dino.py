"""Student/teacher networks for DINO self-distillation (Caron et al., ICCV 2021).

Unlabelled microscopy is plentiful where annotations are not; DINO pretraining on a lab's own images
gives a ViT backbone that the segmentation bundles then fine-tune through ``backbone_checkpoint``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOHead", "DINOModel", "make_teacher"]


class DINOHead(nn.Module):
    """Projection head: GELU MLP to an l2-normalised bottleneck, then cosines to ``out_dim`` prototypes.

    The last layer is DINO's weight-normalised linear layer with its gain fixed to 1, i.e. a linear
    layer whose weight rows are l2-normalised on every forward: the outputs are cosine similarities
    to the prototypes, which keeps their scale fixed and the softmax temperatures meaningful.

    Args:
        in_dim: backbone feature size (``backbone.num_features``).
        out_dim: number of prototypes K (65536 in the paper; a few thousand suit small datasets).
        hidden_dim: width of the hidden MLP layers.
        bottleneck_dim: size of the normalised embedding fed to the prototypes.
        n_layers: linear layers in the MLP (>= 1).
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, n_layers: int = 3
    ) -> None:
        super().__init__()
        if min(in_dim, out_dim, hidden_dim, bottleneck_dim, n_layers) < 1:
            raise ValueError(
                "in_dim, out_dim, hidden_dim, bottleneck_dim and n_layers must be >= 1, got "
                f"{in_dim}, {out_dim}, {hidden_dim}, {bottleneck_dim}, {n_layers}."
            )
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(pairwise(dims)):
            layers.append(nn.Linear(d_in, d_out))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> (N, out_dim) cosine similarities to the prototypes."""
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=-1))


class DINOModel(nn.Module):
    """Backbone + head applied to a list of crops, batching consecutive crops of the same size.

    Multi-crop gives two large and several small views; running each resolution as one backbone pass
    keeps the number of passes at two instead of one per view.

    Args:
        backbone: a timm ViT built with ``num_classes=0``; its pooled ``forward_head(pre_logits=True)``
            output (the CLS token for timm's default ``global_pool="token"``) is the image embedding.
        head: the projection head.
    """

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, num_features) pooled backbone features."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward(self, crops: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Head outputs of all crops, concatenated in crop order: (sum of batch sizes, out_dim)."""
        if torch.is_tensor(crops):
            crops = [crops]
        embeddings = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            embeddings.append(self.embed(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(embeddings))


def make_teacher(student: DINOModel) -> DINOModel:
    """A frozen copy of ``student`` in eval mode, updated only as its exponential moving average."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()
