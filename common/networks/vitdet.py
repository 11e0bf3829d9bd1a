"""Mask R-CNN on a plain timm Vision Transformer, with the ViTDet simple feature pyramid.

Li et al. 2022 ("Exploring Plain Vision Transformer Backbones for Object Detection") showed that a
plain, non-hierarchical ViT detects well when a light neck turns its single stride-16 map into a
pyramid: transposed convolutions up to strides 8 and 4, max-pooling down to stride 32, no top-down
fusion. Keeping the ViT untouched is what lets an encoder pretrained as a masked autoencoder (or
with DINO) on unlabelled images be fine-tuned here as it is: :class:`ViTDetBackbone` loads it via
:func:`~common.networks.timm_backbone.create_vit_backbone`, and the pyramid lives beside it.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from common.networks.timm_backbone import create_vit_backbone
from common.transforms.intensity import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["SimpleFeaturePyramid", "ViTDetBackbone", "vit_mask_rcnn"]

SCALE_FACTORS = (4.0, 2.0, 1.0, 0.5)  # strides 4, 8, 16, 32 from a stride-16 map
NORMS = ("LN", None)
VIT_PATCH_SIZE = 16
ANCHOR_SIZES = (32, 64, 128, 256, 512)  # one size per pyramid level, strides 4 to 64
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def _norm(norm: str | None, channels: int) -> nn.Module:
    """LayerNorm over the channels of an NCHW map (as ViTDet uses), or nothing."""
    return LayerNorm2d(channels) if norm == "LN" else nn.Identity()


def _resampler(scale: float, channels: int, norm: str | None) -> tuple[nn.Module, int]:
    """Layers bringing a map to ``scale`` times its resolution, and the channels they output.

    Each 2x upsampling halves the channels, as in ViTDet, which keeps the stride-4 level affordable.
    """
    if scale == 4.0:
        half, quarter = channels // 2, channels // 4
        layers = nn.Sequential(
            nn.ConvTranspose2d(channels, half, kernel_size=2, stride=2),
            _norm(norm, half),
            nn.GELU(),
            nn.ConvTranspose2d(half, quarter, kernel_size=2, stride=2),
        )
        return layers, quarter
    if scale == 2.0:
        return nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2), channels // 2
    if scale == 1.0:
        return nn.Identity(), channels
    return nn.MaxPool2d(kernel_size=2, stride=2), channels


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's neck: one stride-16 map in, named maps at strides 4, 8, 16, 32 (and 64) out.

    Every level is resampled from the same input (no top-down pathway), then projected to
    ``out_channels`` by a 1x1 and a 3x3 convolution, each followed by the channel norm. The extra
    ``"pool"`` level subsamples the coarsest one by 2, like torchvision's ``LastLevelMaxPool``, so the
    output plugs into torchvision's detectors in place of a ResNet-FPN.

    Args:
        in_channels: channels of the input map (the ViT's embedding dimension); at least 4.
        out_channels: channels of every output map.
        scale_factors: resolution of each level relative to the input, fine to coarse; a strictly
            decreasing subset of ``(4.0, 2.0, 1.0, 0.5)``.
        top_block: add the ``"pool"`` level at twice the coarsest stride.
        norm: ``"LN"`` (channel LayerNorm) or ``None`` (no normalisation; convolutions get biases).
        in_stride: stride of the input map, used to report :attr:`strides`.

    Attributes:
        strides: output name -> stride in input pixels, e.g. ``{"0": 4, ..., "3": 32, "pool": 64}``.
        out_channels: channels of every output map.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        scale_factors: Sequence[float] = SCALE_FACTORS,
        top_block: bool = True,
        norm: str | None = "LN",
        in_stride: int = VIT_PATCH_SIZE,
    ) -> None:
        super().__init__()
        scales = [float(s) for s in scale_factors]
        allowed = all(s in SCALE_FACTORS for s in scales)
        if not scales or not allowed or scales != sorted(set(scales), reverse=True):
            raise ValueError(
                f"scale_factors must be a strictly decreasing, non-empty subset of {SCALE_FACTORS}, "
                f"got {tuple(scale_factors)}."
            )
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
        if in_channels < 4 or out_channels < 1:
            raise ValueError(
                f"need in_channels >= 4 and out_channels >= 1, got {in_channels} and {out_channels}."
            )
        if any(not (in_stride / s).is_integer() for s in scales):
            raise ValueError(
                f"in_stride {in_stride} divided by scale_factors {tuple(scales)} must give whole strides."
            )

        self.levels = nn.ModuleList()
        for scale in scales:
            resample, channels = _resampler(scale, in_channels, norm)
            self.levels.append(
                nn.Sequential(
                    resample,
                    nn.Conv2d(channels, out_channels, kernel_size=1, bias=norm is None),
                    _norm(norm, out_channels),
                    nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=norm is None),
                    _norm(norm, out_channels),
                )
            )
        strides = [int(in_stride / s) for s in scales]
        names = [str(i) for i in range(len(scales))]
        if top_block:
            strides.append(2 * strides[-1])
            names.append("pool")
        self.strides: dict[str, int] = dict(zip(names, strides))
        self.top_block = top_block
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """(B, in_channels, h, w) -> OrderedDict of (B, out_channels, h * scale, w * scale) maps."""
        maps = [level(x) for level in self.levels]
        if self.top_block:
            maps.append(F.max_pool2d(maps[-1], kernel_size=1, stride=2))
        return OrderedDict(zip(self.strides, maps))


class ViTDetBackbone(nn.Module):
    """A plain ViT followed by :class:`SimpleFeaturePyramid`, as torchvision detectors expect.

    The ViT's last block tokens, after its final norm, form the stride-16 map. Using the final norm
    keeps every ViT parameter in use (DistributedDataParallel rejects unused ones) and leaves the
    ViT's state dict exactly that of :func:`~common.networks.timm_backbone.create_vit_backbone`, so
    encoders saved with :func:`~common.networks.timm_backbone.save_backbone` load unchanged.

    ``vit`` may also be a built module that maps an image to one feature map at its patch stride and
    has ``embed_dim`` and ``patch_size`` attributes (e.g.
    :class:`~common.networks.angiography.RopeBackbone`, a timm RoPE ViT or SAM3's trunk). Its map is
    resampled bilinearly to stride 16 when its patch is not 16 (SAM3 and EVA-02 use 14), because
    torchvision's anchors and RoI pooling assume power-of-two strides.

    Args:
        vit: timm ViT name with patch size 16, e.g. ``"vit_base_patch16_224"`` or ``"vit_small_patch16_224"``,
            or a built module as above (then ``pretrained``, ``checkpoint`` and ``vit_kwargs`` stay unset).
        pretrained: start from timm's pretrained weights (needs network access).
        checkpoint: local encoder weights, e.g. from MAE pretraining on your own images.
        out_channels: channels of every pyramid level.
        vit_kwargs: passed to ``create_vit_backbone`` (``checkpoint_key``, ``sha256``) and on to timm
            (``depth``, ``embed_dim``, ``num_heads``, ``drop_path_rate``, ...).

    Attributes:
        out_channels: channels of every output map (torchvision's detectors read it).
        strides: output name -> stride, ``{"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}``.
    """

    def __init__(
        self,
        vit: str | nn.Module = "vit_base_patch16_224",
        pretrained: bool = False,
        checkpoint: str | os.PathLike | None = None,
        out_channels: int = 256,
        **vit_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(vit, nn.Module):
            if pretrained or checkpoint is not None or vit_kwargs:
                raise ValueError("give a built `vit` its weights and options in its own constructor.")
            self.vit, self.patch_size, self.external_vit = vit, int(vit.patch_size), True
        else:
            self.vit = create_vit_backbone(vit, pretrained=pretrained, checkpoint=checkpoint, **vit_kwargs)
            patch_size = tuple(self.vit.patch_embed.patch_size)
            if patch_size != (VIT_PATCH_SIZE, VIT_PATCH_SIZE):
                raise ValueError(
                    f"the simple feature pyramid expects a stride-16 ViT map, but '{vit}' has patch size "
                    f"{patch_size}; choose a *_patch16_* model."
                )
            self.patch_size, self.external_vit = VIT_PATCH_SIZE, False
        self.pyramid = SimpleFeaturePyramid(self.vit.embed_dim, out_channels, in_stride=VIT_PATCH_SIZE)
        self.out_channels = out_channels
        self.strides = self.pyramid.strides

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """(B, C, H, W), H and W multiples of 16 and of the patch -> OrderedDict of maps at ``strides``."""
        multiple = math.lcm(VIT_PATCH_SIZE, self.patch_size)
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(
                f"input height and width must be multiples of {multiple}, got {x.shape[-2]} x {x.shape[-1]}."
            )
        if not self.external_vit:
            (last,) = self.vit.forward_intermediates(
                x, indices=[len(self.vit.blocks) - 1], norm=True, output_fmt="NCHW", intermediates_only=True
            )
            return self.pyramid(last)
        last = self.vit(x)
        if self.patch_size != VIT_PATCH_SIZE:
            grid = (x.shape[-2] // VIT_PATCH_SIZE, x.shape[-1] // VIT_PATCH_SIZE)
            last = F.interpolate(last, size=grid, mode="bilinear", align_corners=False)
        return self.pyramid(last)


def vit_mask_rcnn(
    num_classes: int = 2,
    vit: str | nn.Module = "vit_base_patch16_224",
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    min_size: int | Sequence[int] = (512, 576, 640, 704, 768),
    max_size: int = 1024,
    out_channels: int = 256,
    vit_kwargs: dict[str, Any] | None = None,
    anchor_sizes: Sequence[int] = ANCHOR_SIZES,
    aspect_ratios: Sequence[float] = ASPECT_RATIOS,
    **kwargs: Any,
) -> MaskRCNN:
    """torchvision Mask R-CNN on a :class:`ViTDetBackbone`, ready to fine-tune a pretrained encoder.

    One anchor size per pyramid level (by default 32 at stride 4 to 512 at stride 64) with aspect
    ratios 0.5, 1 and 2; boxes and masks are pooled from levels ``"0"`` to ``"3"``. Images are normalised with the
    ImageNet mean and std, which MAE and DINO pretraining use too.

    Args:
        num_classes: classes including background, e.g. 2 for a single lesion class.
        vit: timm ViT name with patch size 16, or a built backbone (see :class:`ViTDetBackbone`).
        pretrained: start the ViT from timm's pretrained weights (needs network access).
        checkpoint: encoder weights saved by :func:`~common.networks.timm_backbone.save_backbone`.
        min_size: shorter image side after resizing; a sequence is sampled per training batch
            (multi-scale training) and its last entry is used at inference.
        max_size: cap on the longer image side after resizing.
        out_channels: channels of the pyramid, RPN and RoI heads.
        vit_kwargs: passed to :class:`ViTDetBackbone`, e.g. ``{"drop_path_rate": 0.1}``.
        anchor_sizes: one anchor side in pixels per pyramid level, fine to coarse (5 levels, "pool"
            included); smaller than the default for small or thin objects, which no 32-px anchor
            overlaps well enough to become a positive.
        aspect_ratios: height / width ratios of the anchors, the same at every level.
        kwargs: passed to ``torchvision.models.detection.MaskRCNN`` (``box_detections_per_img``,
            ``box_score_thresh``, ``image_mean``, ...). ``size_divisible`` defaults to a multiple of
            32 and of the patch size, so padded batches tile into patches.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too, so it must be >= 2, got {num_classes}.")
    backbone = ViTDetBackbone(vit, pretrained, checkpoint, out_channels, **(vit_kwargs or {}))
    levels = [name for name in backbone.strides if name != "pool"]
    if len(anchor_sizes) != len(backbone.strides):
        raise ValueError(
            f"anchor_sizes needs one size per pyramid level ({len(backbone.strides)}), got {tuple(anchor_sizes)}."
        )
    kwargs.setdefault("image_mean", list(IMAGENET_MEAN))
    kwargs.setdefault("image_std", list(IMAGENET_STD))
    kwargs.setdefault("size_divisible", math.lcm(32, backbone.patch_size))
    return MaskRCNN(
        backbone,
        num_classes=num_classes,
        min_size=tuple(min_size) if isinstance(min_size, Sequence) else min_size,
        max_size=max_size,
        rpn_anchor_generator=AnchorGenerator(
            tuple((int(size),) for size in anchor_sizes),
            (tuple(float(r) for r in aspect_ratios),) * len(anchor_sizes),
        ),
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
        **kwargs,
    )
