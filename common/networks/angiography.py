"""Networks of the coronary angiography bundle: one RoPE ViT backbone, two heads.

The reference recipe adapts a segmentation foundation model to X-ray angiograms in two phases:
binary vessel segmentation first (:class:`VesselSegmentationNet`), then the 14 CASS artery segments
as instances (:func:`angiography_mask_rcnn`, the ViTDet pyramid and Mask R-CNN of
:mod:`common.networks.vitdet`), started from the phase-1 backbone by
``python -m common.bundle.weight_surgery``. Both heads hold the same :class:`RopeBackbone` as
``backbone``; its trunk is a timm RoPE ViT by default (CPU-friendly, tested everywhere) or SAM3's
image trunk. Rotary tables follow the input size (:mod:`common.networks.rope`), so no position
embedding is ever interpolated when the resolution changes between phases.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetBasicBlock
from torch import nn
from torchvision.models.detection import MaskRCNN

from common.data.angiography import CASS_CATEGORIES
from common.networks.rope import patch_grid
from common.networks.timm_backbone import create_vit_backbone
from common.networks.vitdet import vit_mask_rcnn

__all__ = ["TRUNKS", "RopeBackbone", "VesselSegmentationNet", "angiography_mask_rcnn"]

TRUNKS = ("timm", "sam3")


class RopeBackbone(nn.Module):
    """A plain ViT with 2-D rotary embeddings as one feature map at the patch stride.

    Args:
        trunk: ``"timm"`` (a timm RoPE ViT by name) or ``"sam3"`` (SAM3's image trunk, needs the
            ``sam3`` package, see :mod:`common.networks.sam3_trunk`).
        name: timm model name for ``trunk="timm"``, e.g. ``"vit_small_patch16_rope_224"``,
            ``"vit_base_patch16_rope_mixed_224"`` or ``"eva02_small_patch14_224"``; ignored for SAM3.
        img_size: training input side; SAM3's global blocks only accept this size, timm trunks any
            multiple of the patch size.
        pretrained: start a timm trunk from timm's pretrained weights (needs network access or cache).
        checkpoint: local weights: a timm backbone file (keys may carry ``module.``/``backbone.``), or
            SAM3's ``sam3.pt`` / a trunk extracted from it.
        sha256: expected digest of ``checkpoint``.
        trunk_kwargs: passed to timm (``depth``, ``embed_dim``, ``num_heads``, ``drop_path_rate``,
            ``checkpoint_key``) or to :func:`~common.networks.sam3_trunk.build_sam3_trunk`.

    Attributes:
        embed_dim: channels of the output map.
        patch_size: its stride in input pixels.
    """

    def __init__(
        self,
        trunk: str = "timm",
        name: str = "vit_small_patch16_rope_224",
        img_size: int = 672,
        pretrained: bool = False,
        checkpoint: str | os.PathLike | None = None,
        sha256: str | None = None,
        **trunk_kwargs: Any,
    ) -> None:
        super().__init__()
        if trunk not in TRUNKS:
            raise ValueError(f"trunk must be one of {TRUNKS}, got {trunk!r}.")
        self.kind = trunk
        if trunk == "sam3":
            if pretrained:
                raise ValueError("SAM3 weights are not downloaded; pass the local sam3.pt as `checkpoint`.")
            from common.networks.sam3_trunk import build_sam3_trunk

            self.trunk = build_sam3_trunk(img_size, checkpoint=checkpoint, sha256=sha256, **trunk_kwargs)
        else:
            self.trunk = create_vit_backbone(
                name,
                pretrained=pretrained,
                checkpoint=checkpoint,
                sha256=sha256,
                img_size=img_size,
                **trunk_kwargs,
            )
            if getattr(self.trunk, "rope", None) is None:
                raise ValueError(
                    f"timm model '{name}' has no rotary embeddings; choose a *_rope_* or eva02_* model."
                )
            # built with dynamic_img_size, the trunk computes its rotary table from each input's grid:
            # nothing to regenerate (regenerate_rope would only record img_size again)
        self.embed_dim = int(self.trunk.embed_dim)
        patch = self.trunk.patch_size if trunk == "sam3" else self.trunk.patch_embed.patch_size[0]
        self.patch_size = int(patch)
        self.img_size = int(img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, embed_dim, H / patch, W / patch): the last block's tokens, normalised
        where the trunk has a final norm (timm's; SAM3's trunk has none)."""
        grid = patch_grid(tuple(x.shape[-2:]), self.patch_size)
        if self.kind == "sam3":
            if grid != tuple(self.trunk.grid_size):
                raise ValueError(
                    f"the SAM3 trunk has rotary tables for {self.img_size} x {self.img_size} inputs, got "
                    f"{x.shape[-2]} x {x.shape[-1]}; resize the images or rebuild with that img_size."
                )
            return self.trunk(x)[-1]
        (last,) = self.trunk.forward_intermediates(
            x, indices=[len(self.trunk.blocks) - 1], norm=True, output_fmt="NCHW", intermediates_only=True
        )
        return last


class VesselSegmentationNet(nn.Module):
    """Phase 1: :class:`RopeBackbone` + a light upsampling decoder, binary vessel logits.

    The decoder doubles the resolution of the patch map per stage (bilinear upsampling, then a
    conv-norm-act block), resizes to the input, and fuses a full-resolution convolutional stem:
    coronary branches are a few pixels wide, thinner than any patch. Output: logits (use a loss
    with ``sigmoid=True``).

    Args:
        in_channels: image channels (3: grey angiograms are repeated, as the pretrained trunks expect).
        out_channels: output maps (1 for vessel vs background).
        decoder_channels: channels after the projection of the patch map, then after each 2x stage;
            the last one is also the stem's. 4 stages (5 entries) bring a 16-pixel patch to full size.
        norm_name: MONAI normalisation of the decoder.
        backbone_kwargs: :class:`RopeBackbone` arguments (``trunk``, ``name``, ``img_size``,
            ``pretrained``, ``checkpoint``, timm or SAM3 keyword arguments).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        norm_name: str | tuple = "instance",
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in decoder_channels]
        if len(channels) < 2 or any(c < 1 for c in channels):
            raise ValueError(f"decoder_channels needs >= 2 positive entries, got {tuple(decoder_channels)}.")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}.")
        self.backbone = RopeBackbone(in_chans=in_channels, **backbone_kwargs)
        self.project = nn.Conv2d(self.backbone.embed_dim, channels[0], kernel_size=1)
        self.stages = nn.ModuleList(
            UnetBasicBlock(2, c_in, c_out, 3, 1, norm_name=norm_name)
            for c_in, c_out in itertools.pairwise(channels)
        )
        self.stem = UnetBasicBlock(2, in_channels, channels[-1], 3, 1, norm_name=norm_name)
        self.fuse = UnetBasicBlock(2, 2 * channels[-1], channels[-1], 3, 1, norm_name=norm_name)
        self.head = nn.Conv2d(channels[-1], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, H, W) logits; H, W multiples of the patch size."""
        y = self.project(self.backbone(x))
        for stage in self.stages:
            y = stage(F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False))
        if y.shape[-2:] != x.shape[-2:]:
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.fuse(torch.cat([y, self.stem(x)], dim=1)))


def angiography_mask_rcnn(
    num_classes: int = len(CASS_CATEGORIES) + 1,
    img_size: int = 672,
    min_size: int | Sequence[int] = 672,
    max_size: int = 672,
    out_channels: int = 256,
    backbone_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> MaskRCNN:
    """Phase 2: Mask R-CNN with the ViTDet pyramid on a :class:`RopeBackbone`, for the 14 CASS segments.

    Args:
        num_classes: classes including background (15 for the 14 CASS segments).
        img_size: size the backbone's rotary tables are built for (SAM3 accepts only this size).
        min_size: shorter side after resizing; a sequence means multi-scale training (timm trunks
            only: SAM3's global blocks have tables for ``img_size`` alone, so it gets fixed-size inputs).
        max_size: cap on the longer side.
        out_channels: channels of the pyramid and heads.
        backbone_kwargs: :class:`RopeBackbone` arguments other than ``img_size``.
        kwargs: passed to :func:`~common.networks.vitdet.vit_mask_rcnn` and on to torchvision's ``MaskRCNN``.
    """
    backbone = RopeBackbone(img_size=img_size, **(backbone_kwargs or {}))
    if backbone.kind == "sam3":
        kwargs.setdefault("fixed_size", (img_size, img_size))
    return vit_mask_rcnn(
        num_classes, vit=backbone, min_size=min_size, max_size=max_size, out_channels=out_channels, **kwargs
    )
