"""DeepLab-v2 (Chen et al., TPAMI 2018) on a dilated timm ResNet, for semantic segmentation.

Weakly supervised segmentation trains its second stage on pseudo-masks, and the field reports that
stage with DeepLab-v2 on ResNet-101, so results compare with published ones only if the network is
the same: the last two ResNet stages keep their resolution through dilation (output stride 8), and
atrous spatial pyramid pooling (ASPP) is four parallel 3x3 convolutions with dilation rates 6, 12,
18 and 24 that each predict class scores directly and are **summed**, not concatenated and fused as
in DeepLab-v3. ``forward`` returns logits at the input size, so a cross-entropy on full-size masks and
MONAI's sliding-window inference work on the network as it is.

:func:`create_dilated_backbone` also serves the CAM classifier (:mod:`common.networks.cam_classifier`),
which needs the same dilated backbone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from common.networks.timm_backbone import create_timm_model, load_backbone_weights

__all__ = ["OUTPUT_STRIDES", "ASPPv2", "DeepLabV2", "create_dilated_backbone"]

OUTPUT_STRIDES = (8, 16)


def create_dilated_backbone(
    name: str,
    pretrained: bool = False,
    output_stride: int = 8,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_key: str | None = None,
    sha256: str | None = None,
) -> nn.Module:
    """A timm CNN that returns its deepest feature map only, at output stride 8 or 16.

    timm replaces the strides of the last stage (16) or last two stages (8) with dilation, so the
    deepest features keep the resolution dense prediction needs while the pretrained weights still
    fit. Calling the returned module gives a list holding one (B, F, H/s, W/s) map; its channel count
    is ``module.feature_info.channels()[-1]``.

    Args:
        name: timm CNN that accepts ``output_stride``, e.g. ``"resnet101"``, ``"resnet50"``,
            ``"wide_resnet50_2"``, ``"resnest50d"``, ``"resnet18"``.
        pretrained: start from timm's ImageNet weights (needs network access or a filled Hugging Face
            cache). Offline, download them once and pass the file as ``checkpoint``.
        output_stride: 8 or 16.
        checkpoint: local backbone weights loaded after construction: a timm state dict of the same
            architecture, or a whole network checkpoint whose ``backbone.`` entries are used. Missing
            or wrongly shaped tensors raise, naming the file.
        checkpoint_key: entry of ``checkpoint`` that holds the state dict (default: autodetect).
        sha256: expected digest of ``checkpoint``.

    Raises:
        ValueError: ``output_stride`` is not 8 or 16, or ``name`` is not a timm CNN that can be dilated.
        RuntimeError: ``pretrained`` is true but the weights cannot be fetched.
        InputDataError: ``checkpoint`` is unreadable or does not fit the backbone.
    """
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}.")
    if not timm.is_model(name):
        raise ValueError(f"'{name}' is not a timm model; list CNNs with e.g. timm.list_models('resnet*').")
    try:
        backbone = create_timm_model(
            name, pretrained, features_only=True, out_indices=(-1,), output_stride=output_stride
        )
    except TypeError as err:
        raise ValueError(
            f"timm model '{name}' cannot be dilated to output stride {output_stride} ({err}); "
            "use a CNN that accepts output_stride, e.g. resnet101, resnet50 or resnest50d."
        ) from err
    reduction = int(backbone.feature_info.reduction()[-1])
    if reduction != output_stride:
        raise ValueError(
            f"timm model '{name}' has output stride {reduction}, not the requested {output_stride}; "
            "use a CNN that supports dilation, e.g. resnet101, resnet50 or resnest50d."
        )
    if checkpoint is not None:
        load_backbone_weights(backbone, checkpoint, key=checkpoint_key, sha256=sha256)
    return backbone


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class ASPPv2(nn.Module):
    """DeepLab-v2 ASPP: parallel 3x3 atrous convolutions straight to class scores, summed.

    Each branch sees the same features with a different field of view; summing class scores (rather
    than concatenating features as DeepLab-v3 does) keeps the head a single linear layer per rate.
    Weights start as N(0, 0.01) and biases at zero, as in DeepLab.

    Args:
        in_channels: channels of the backbone features.
        num_classes: output channels.
        atrous_rates: one dilation rate per branch.
    """

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=rate, dilation=rate)
            for rate in atrous_rates
        )
        for branch in self.branches:
            nn.init.normal_(branch.weight, std=0.01)
            nn.init.zeros_(branch.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(x) for branch in self.branches]).sum(dim=0)


class DeepLabV2(nn.Module):
    """Dilated timm ResNet + summed ASPP; logits bilinearly upsampled to the input size.

    ``forward`` maps (B, 3, H, W) images to (B, num_classes, H, W) logits; ``forward_logits`` gives the
    raw map at the output stride, (B, num_classes, ceil(H/s), ceil(W/s)). Any H and W work.

    Args:
        num_classes: output channels, background included (C tissue classes + 1 in the WSSS bundle).
        backbone: timm CNN that accepts ``output_stride``; DeepLab-v2 uses ``"resnet101"``.
        pretrained: start from timm's ImageNet weights (needs network access or a filled Hugging Face
            cache). Offline, download them once and pass the file as ``checkpoint``.
        output_stride: 8 (DeepLab-v2) or 16 (a quarter of the memory, coarser boundaries).
        atrous_rates: dilation rate of each ASPP branch, at the backbone's output stride.
        checkpoint: local backbone weights: a timm state dict of the same architecture, or a whole
            network checkpoint (e.g. of the CAM classifier) whose ``backbone.`` entries are used.
        checkpoint_key: entry of ``checkpoint`` that holds the state dict (default: autodetect).
        sha256: expected digest of ``checkpoint``.

    Raises:
        ValueError: an argument is out of range or ``backbone`` cannot be dilated.
        RuntimeError: ``pretrained`` is true but the weights cannot be fetched.
        InputDataError: ``checkpoint`` is unreadable or does not fit the backbone.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101",
        pretrained: bool = False,
        output_stride: int = 8,
        atrous_rates: Sequence[int] = (6, 12, 18, 24),
        checkpoint: str | os.PathLike | None = None,
        checkpoint_key: str | None = None,
        sha256: str | None = None,
    ) -> None:
        super().__init__()
        if not _is_positive_int(num_classes) or num_classes < 2:
            raise ValueError(
                f"num_classes must be an integer >= 2 (classes + background), got {num_classes!r}."
            )
        atrous_rates = tuple(atrous_rates)
        if not atrous_rates or not all(_is_positive_int(r) for r in atrous_rates):
            raise ValueError(
                f"atrous_rates must be a non-empty sequence of positive integers, got {atrous_rates}."
            )
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.atrous_rates = atrous_rates
        self.backbone = create_dilated_backbone(
            backbone, pretrained, output_stride, checkpoint, checkpoint_key=checkpoint_key, sha256=sha256
        )
        self.aspp = ASPPv2(int(self.backbone.feature_info.channels()[-1]), num_classes, atrous_rates)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the output stride, (B, num_classes, ceil(H/s), ceil(W/s))."""
        if x.ndim != 4:
            raise ValueError(f"DeepLabV2 expects (B, C, H, W) images, got shape {tuple(x.shape)}.")
        return self.aspp(self.backbone(x)[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward_logits(x)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
