"""CenterNet ("Objects as Points", Zhou et al. 2019) on any timm CNN, for point-like object detection.

When every object has the same size, as cells in a cytology smear annotated with fixed boxes,
detection reduces to finding centres: a heatmap with one peak per object plus a sub-cell offset is
all a detector needs. This follows the paper's ResNet variant: the deepest (stride-32) backbone
feature goes through three upsampling blocks to stride 4, where two small heads predict the centre
heatmap and the offset. The heatmap is the usual sigmoid logit, so a decoder and a focal loss are
all that is needed on top (:mod:`common.losses.centernet`, :mod:`common.postprocessing.centernet`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import timm
import torch
from torch import nn

from common.networks.timm_backbone import create_timm_model, load_backbone_weights

__all__ = ["CenterNet", "UpsamplingBlock"]

def _bilinear_kernel(size: int) -> torch.Tensor:
    """The (size, size) kernel with which a stride-2 transposed convolution upsamples bilinearly."""
    factor = (size + 1) // 2
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    ramp = 1 - (torch.arange(size, dtype=torch.float32) - centre).abs() / factor
    return ramp[:, None] * ramp[None, :]


class UpsamplingBlock(nn.Sequential):
    """3x3 conv + BN + ReLU, then a 4x4 stride-2 transposed conv + BN + ReLU: doubles the resolution.

    The transposed convolution starts as channel-wise bilinear upsampling (as in CenterNet), so an
    untrained decoder passes the backbone's features up smoothly instead of as checkerboard noise.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        up = nn.ConvTranspose2d(out_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=False)
        with torch.no_grad():
            up.weight.zero_()
            diagonal = torch.arange(out_channels)
            up.weight[diagonal, diagonal] = _bilinear_kernel(4)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            up,
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def _head(in_channels: int, hidden_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden_channels, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden_channels, out_channels, kernel_size=1),
    )


class CenterNet(nn.Module):
    """timm CNN backbone + upsampling blocks + heatmap and offset heads, at stride 4 by default.

    ``forward`` maps (B, C, H, W) images to (B, 3, H/s, W/s): channel 0 holds centre-heatmap logits,
    channels 1 and 2 the sub-cell offsets (x, y) of a centre from its cell's top-left corner, in
    output cells. The output stride ``s`` (attribute ``stride``) is the backbone's reduction halved
    once per upsampling block: 32 / 2^3 = 4 with the defaults. H and W must be multiples of the
    reduction (attribute ``reduction``, 32 for ResNets).

    Args:
        backbone: timm model name of a CNN whose deepest feature has stride 32 with ``features_only``
            support, e.g. ``"resnet34"``, ``"resnet50"``, ``"resnet101"``, ``"convnext_tiny"``.
        pretrained: start from timm's ImageNet weights (needs network access or a filled Hugging Face
            cache). Offline, download the weights once and pass them as ``checkpoint``.
        checkpoint: local backbone weights, loaded after construction: a timm state dict of the same
            architecture, or a whole CenterNet checkpoint (its ``backbone.`` entries are used).
            Missing or wrongly shaped tensors raise, naming the file.
        deconv_channels: output channels of the upsampling blocks, one per doubling; three take the
            stride-32 feature to stride 4.
        head_channels: hidden channels of the heatmap and offset heads.
        heatmap_prior: initial centre probability everywhere. Nearly all heatmap cells are background,
            so starting the heatmap bias at ``-log((1 - p) / p)`` (-2.19 for 0.1) keeps the focal loss
            from being swamped by confident background errors in the first iterations.
        checkpoint_key: entry of ``checkpoint`` that holds the state dict (default: autodetect).
        sha256: expected digest of ``checkpoint``.

    Raises:
        ValueError: an argument is out of range, ``backbone`` is not a timm model with ``features_only``
            support, or its reduction is not 2^len(deconv_channels) times a whole output stride.
        RuntimeError: ``pretrained`` is true but the weights cannot be fetched.
        InputDataError: ``checkpoint`` is unreadable or does not fit the backbone.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        pretrained: bool = False,
        checkpoint: str | os.PathLike | None = None,
        deconv_channels: Sequence[int] = (256, 128, 64),
        head_channels: int = 64,
        heatmap_prior: float = 0.1,
        checkpoint_key: str | None = None,
        sha256: str | None = None,
    ) -> None:
        super().__init__()
        deconv_channels = tuple(int(c) for c in deconv_channels)
        if not deconv_channels or any(c < 1 for c in deconv_channels):
            raise ValueError(f"deconv_channels must be positive integers, got {deconv_channels}.")
        if head_channels < 1:
            raise ValueError(f"head_channels must be >= 1, got {head_channels}.")
        if not 0.0 < heatmap_prior < 1.0:
            raise ValueError(f"heatmap_prior is a probability in (0, 1), got {heatmap_prior}.")

        self.backbone = self._create_backbone(backbone, pretrained)
        if checkpoint is not None:
            load_backbone_weights(self.backbone, checkpoint, key=checkpoint_key, sha256=sha256)
        self.reduction = int(self.backbone.feature_info.reduction()[-1])
        self.stride = self.reduction // 2 ** len(deconv_channels)
        if self.stride < 1 or self.stride * 2 ** len(deconv_channels) != self.reduction:
            raise ValueError(
                f"'{backbone}' has stride {self.reduction}, which {len(deconv_channels)} doublings "
                f"(deconv_channels={deconv_channels}) do not divide into a whole output stride."
            )

        in_channels = [int(self.backbone.feature_info.channels()[-1]), *deconv_channels[:-1]]
        self.upsampling = nn.Sequential(*(UpsamplingBlock(i, o) for i, o in zip(in_channels, deconv_channels)))
        self.heatmap_head = _head(deconv_channels[-1], head_channels, 1)
        self.offset_head = _head(deconv_channels[-1], head_channels, 2)
        with torch.no_grad():
            self.heatmap_head[-1].bias.fill_(-math.log((1 - heatmap_prior) / heatmap_prior))
            # small offsets at the start, as in CenterNet's regression heads
            nn.init.normal_(self.offset_head[-1].weight, std=1e-3)
            self.offset_head[-1].bias.zero_()

    @staticmethod
    def _create_backbone(name: str, pretrained: bool) -> nn.Module:
        if not timm.is_model(name):
            raise ValueError(f"'{name}' is not a timm model; list CNNs with e.g. timm.list_models('resnet*').")
        try:
            return create_timm_model(name, pretrained, features_only=True, out_indices=(-1,))
        except (OSError, RuntimeError) as err:
            if pretrained:
                raise
            raise ValueError(f"timm model '{name}' cannot be built with features_only ({err}).") from err

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The stride-4 feature map the heads read, (B, deconv_channels[-1], H/4, W/4)."""
        if x.ndim != 4 or x.shape[-2] % self.reduction or x.shape[-1] % self.reduction:
            raise ValueError(
                f"CenterNet expects (B, C, H, W) images with H and W multiples of {self.reduction}, "
                f"got shape {tuple(x.shape)}; pad or crop the input (e.g. DivisiblePadd(k={self.reduction}))."
            )
        return self.upsampling(self.backbone(x)[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x)
        return torch.cat([self.heatmap_head(features), self.offset_head(features)], dim=1)
