"""A U-Net decoder on a plain timm Vision Transformer, for dense per-pixel regression and segmentation.

A ViT sees the image only as a grid of P x P patches, so every block's tokens sit at stride P.
Following UNETR (Hatamizadeh et al. 2022), features from four blocks are taken: the deepest starts
the decoder, the other three are brought to strides P/2, P/4 and P/8 by chains of stride-2
transposed convolutions and joined as skip connections. Cell boundaries are thinner than a patch,
so a small convolutional stem on the image itself provides the full-resolution skip.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch
from monai.networks.blocks import UnetBasicBlock, UnetrPrUpBlock
from torch import nn

from common.networks.timm_backbone import create_vit_backbone, default_block_indices

__all__ = ["ViTUNet"]

OUT_ACTIVATIONS = ("sigmoid", None)
N_VIT_SKIPS = 3  # four ViT blocks: the deepest starts the decoder, the other three are skips


class DecoderStage(nn.Module):
    """Double the resolution, concatenate the skips at that resolution, fuse with two conv-norm-act blocks."""

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, norm_name: str | tuple
    ) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.fuse = UnetBasicBlock(2, out_channels + skip_channels, out_channels, 3, 1, norm_name=norm_name)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        return self.fuse(torch.cat([self.upsample(x)] + skips, dim=1))


class ViTUNet(nn.Module):
    """timm ViT encoder + U-Net decoder with skips from four ViT blocks and a full-resolution conv stem.

    With patch size P = 2^n the decoder has one stage at stride P followed by n upsampling stages
    (strides P/2, ..., 1). The ViT skips join at strides P/2, P/4 and P/8 and the stem at stride 1,
    so for P = 8 the last stage receives both the shallowest ViT block and the stem, and for P = 16
    there is one more stage. Inputs of any height and width that are multiples of P work (timm's
    ``dynamic_img_size``); the bundles use 256 x 256 sliding windows.

    Args:
        backbone: timm model name, e.g. ``"vit_small_patch8_224"`` or ``"vit_small_patch16_dinov3"``.
        pretrained: start from timm's pretrained weights (needs network access).
        backbone_checkpoint: local backbone weights, e.g. from DINO pretraining on your own images.
        in_channels: image channels, for both the ViT patch embedding and the stem.
        out_channels: output maps (1 for a distance map).
        block_indices: four increasing ViT block indices, shallow to deep; default: evenly spaced
            ending at the last block ([2, 5, 8, 11] for 12 blocks).
        decoder_channels: channels of the decoder stages from stride P down to stride 1, so
            log2(P) + 1 entries: 4 for patch 8, 5 for patch 16. Default: 256 at stride P, halved
            per stage down to 32, i.e. (256, 128, 64, 32) for patch 8 and (256, 128, 64, 32, 32) for 16.
        freeze_backbone: train only the decoder; the backbone also stays in eval mode.
        out_activation: ``"sigmoid"`` for maps in [0, 1], or ``None`` for logits.
        norm_name: MONAI normalisation of the decoder, e.g. ``"instance"`` or
            ``("group", {"num_groups": 8})``.
        backbone_kwargs: passed to :func:`~common.networks.timm_backbone.create_vit_backbone`
            (``checkpoint_key``, ``sha256``) and on to timm (``depth``, ``embed_dim``, ``num_heads``, ...).
    """

    def __init__(
        self,
        backbone: str = "vit_small_patch8_224",
        pretrained: bool = False,
        backbone_checkpoint: str | os.PathLike | None = None,
        in_channels: int = 3,
        out_channels: int = 1,
        block_indices: Sequence[int] | None = None,
        decoder_channels: Sequence[int] | None = None,
        freeze_backbone: bool = False,
        out_activation: str | None = "sigmoid",
        norm_name: str | tuple = "instance",
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}."
            )
        if out_activation not in OUT_ACTIVATIONS:
            raise ValueError(f"out_activation must be one of {OUT_ACTIVATIONS}, got {out_activation!r}.")
        if decoder_channels is not None and (not decoder_channels or any(c < 1 for c in decoder_channels)):
            raise ValueError(f"decoder_channels must be positive integers, got {tuple(decoder_channels)}.")

        self.backbone = create_vit_backbone(
            backbone,
            pretrained=pretrained,
            checkpoint=backbone_checkpoint,
            in_chans=in_channels,
            **backbone_kwargs,
        )
        patch_size = self.backbone.patch_embed.patch_size
        if patch_size[0] != patch_size[1] or patch_size[0] < 8 or patch_size[0] & (patch_size[0] - 1):
            raise ValueError(
                f"the ViT patch size must be square and a power of two >= 8, '{backbone}' has {patch_size}."
            )
        n_up = patch_size[0].bit_length() - 1
        if decoder_channels is None:  # 256 at stride P, halving per stage, at least 32
            decoder_channels = [max(256 >> k, 32) for k in range(n_up + 1)]
        if len(decoder_channels) != n_up + 1:
            raise ValueError(
                f"'{backbone}' has patch size {patch_size[0]}, so decoder_channels needs {n_up + 1} entries "
                f"(stride {patch_size[0]} down to stride 1), got {tuple(decoder_channels)}."
            )
        depth = len(self.backbone.blocks)
        if block_indices is None:
            block_indices = default_block_indices(depth)
        block_indices = [int(i) for i in block_indices]
        increasing = all(a < b for a, b in pairwise(block_indices))
        in_range = all(0 <= i < depth for i in block_indices)
        if len(block_indices) != N_VIT_SKIPS + 1 or not increasing or not in_range:
            raise ValueError(
                f"block_indices must be 4 increasing integers in [0, {depth - 1}] (ViT depth {depth}), "
                f"got {block_indices}."
            )
        # drop what the decoder never reads (final norm, head, blocks after the last index): it would
        # cost compute and leave parameters without gradients, which DistributedDataParallel rejects
        self.backbone.prune_intermediate_layers(block_indices, prune_norm=True, prune_head=True)
        self.patch_size = patch_size[0]
        self.block_indices = block_indices
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)

        embed_dim = self.backbone.embed_dim
        channels = [int(c) for c in decoder_channels]
        self.bottleneck = UnetBasicBlock(2, embed_dim, channels[0], 3, 1, norm_name=norm_name)
        # The k-th deepest skip block is upsampled k times and joins stage k (stride P / 2^k); P >= 8
        # guarantees a stage for each.
        self.skip_projections = nn.ModuleList(
            UnetrPrUpBlock(
                2, embed_dim, channels[k], k - 1, 3, 1, 2, norm_name, conv_block=True, res_block=True
            )
            for k in range(1, N_VIT_SKIPS + 1)
        )
        self.stem = UnetBasicBlock(2, in_channels, channels[-1], 3, 1, norm_name=norm_name)
        self.stages = nn.ModuleList()
        for k in range(1, n_up + 1):
            vit_skip_channels = channels[k] if k <= N_VIT_SKIPS else 0
            stem_channels = channels[-1] if k == n_up else 0
            skip_channels = vit_skip_channels + stem_channels
            self.stages.append(DecoderStage(channels[k - 1], skip_channels, channels[k], norm_name))
        self.head = nn.Conv2d(channels[-1], out_channels, kernel_size=1)
        self.out_activation = nn.Sigmoid() if out_activation == "sigmoid" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, H, W); H and W must be multiples of the patch size."""
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(
                f"input height and width must be multiples of {self.patch_size}, "
                f"got {x.shape[-2]} x {x.shape[-1]}."
            )
        features = self.backbone.forward_intermediates(
            x, indices=self.block_indices, output_fmt="NCHW", intermediates_only=True
        )
        vit_skips = [proj(f) for proj, f in zip(self.skip_projections, features[-2::-1])]
        y = self.bottleneck(features[-1])
        for k, stage in enumerate(self.stages, start=1):
            skips = [vit_skips[k - 1]] if k <= len(vit_skips) else []
            if k == len(self.stages):
                skips.append(self.stem(x))
            y = stage(y, skips)
        return self.out_activation(self.head(y))

    def train(self, mode: bool = True) -> ViTUNet:
        """Switch modes, keeping a frozen backbone in eval mode so its dropout and drop-path stay off."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self
