"""Optimizer parameter groups for fine-tuning a pretrained backbone under a new decoder or head.

Every bundle fine-tunes a pretrained encoder beneath freshly initialised layers, and each wants the
same three things from its optimizer: a smaller learning rate for the backbone, so that the new
layers' large early gradients do not erase what pretraining learnt; no weight decay on parameters that
decay only distorts (norm weights, biases, position embeddings and learnt tokens); and, for a ViT,
layer-wise learning-rate decay (BEiT, ViTDet), which changes the shallow, generic blocks least.
:func:`param_groups` provides all three with one convention, built on timm's
``param_groups_weight_decay`` and ``param_groups_layer_decay``, so an optimizer reads the same in every
config::

    "optimizer": {
        "_target_": "torch.optim.AdamW",
        "params": {
            "_target_": "common.networks.param_groups.param_groups",
            "model": "@network_def",
            "lr": "@learning_rate",
            "weight_decay": "@weight_decay",
            "backbone_lr_scale": "@backbone_lr_scale"
        }
    }
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from common.utils import unwrap_module

__all__ = ["param_groups"]


def _no_weight_decay_names(module: nn.Module) -> set[str]:
    """Names, relative to ``module``, that any of its submodules lists in timm's ``no_weight_decay()``."""
    names = set()
    for prefix, submodule in module.named_modules():
        no_weight_decay = getattr(submodule, "no_weight_decay", None)
        if callable(no_weight_decay):
            names.update(f"{prefix}.{name}" if prefix else name for name in no_weight_decay())
    return names


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    backbone: str | None = "backbone",
    backbone_lr_scale: float = 1.0,
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for any ``torch.optim`` optimizer, each with its own ``lr`` and ``weight_decay``.

    Each group states its absolute learning rate, so schedulers, which scale every group from its own
    initial ``lr``, keep the ratios between groups. Frozen parameters (``requires_grad=False``) are left
    out, every trainable parameter is in exactly one group, and empty groups are dropped.

    Args:
        model: the network; a ``DataParallel`` or ``DistributedDataParallel`` wrapper is looked through.
        lr: learning rate of every parameter outside the backbone (decoder, neck, heads).
        weight_decay: decay of the remaining weights. Norm weights, biases and other 1-D parameters,
            and whatever a submodule lists in timm's ``no_weight_decay()`` (a ViT's ``pos_embed`` and
            ``cls_token``), get none.
        backbone: dotted name of the pretrained submodule, e.g. ``"backbone"`` or ``"backbone.vit"``
            (:func:`~common.networks.vitdet.vit_mask_rcnn`); ``None`` treats the whole model alike.
        backbone_lr_scale: the backbone learns at ``lr * backbone_lr_scale`` (0.1 is the usual choice
            for a pretrained backbone under a new head). Freeze a backbone with ``requires_grad_(False)``
            instead of a scale of 0.
        layer_decay: layer-wise learning-rate decay in (0, 1] for a timm backbone with
            ``group_matcher()`` (a ViT), or ``None`` for none. With the backbone's layers numbered as
            timm numbers them, for a ViT of depth L: 0 for the patch and position embeddings and tokens,
            i + 1 for block i (the final norm with the last block), and the rest of the model as layer
            L + 1, a backbone parameter of layer l learns at
            ``lr * backbone_lr_scale * layer_decay ** (L + 1 - l)``. This is ViTDet's rule; it uses
            0.7 for ViT-B, 0.8 for ViT-L and 0.9 for ViT-H.

    Returns:
        A list of ``{"params": [...], "lr": float, "weight_decay": float}``, backbone groups first.

    Raises:
        ValueError: a number is out of range, ``backbone`` is not a submodule of ``model``, a backbone
            option is given without a backbone, ``layer_decay`` is given for a backbone without
            ``group_matcher()``, or ``model`` has no trainable parameters.
    """
    if not (_is_number(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}.")
    if not (_is_number(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}.")
    if not (_is_number(backbone_lr_scale) and backbone_lr_scale > 0):
        raise ValueError(
            f"backbone_lr_scale must be a positive number, got {backbone_lr_scale!r}; "
            "to freeze the backbone, call requires_grad_(False) on it instead."
        )
    if layer_decay is not None and not (_is_number(layer_decay) and 0 < layer_decay <= 1):
        raise ValueError(f"layer_decay must be a number in (0, 1] or None, got {layer_decay!r}.")
    model = unwrap_module(model)

    backbone_groups: list[dict[str, Any]] = []
    if backbone is None:
        if backbone_lr_scale != 1.0 or layer_decay is not None:
            raise ValueError("backbone_lr_scale and layer_decay need a backbone; backbone is None.")
        backbone_params: set[int] = set()
    else:
        try:
            backbone_module = model.get_submodule(backbone)
        except AttributeError as err:
            children = [name for name, _ in model.named_children()]
            raise ValueError(
                f"backbone '{backbone}' is not a submodule of {type(model).__name__} (children: {children}); "
                "pass its dotted name, or backbone=None for a model without one."
            ) from err
        backbone_params = {id(p) for p in backbone_module.parameters()}
        no_decay = _no_weight_decay_names(backbone_module)
        if layer_decay is None:
            backbone_groups = param_groups_weight_decay(
                backbone_module, weight_decay, no_weight_decay_list=no_decay
            )
            for group in backbone_groups:
                group["lr"] = lr * backbone_lr_scale
        else:
            if not callable(getattr(backbone_module, "group_matcher", None)):
                raise ValueError(
                    f"layer_decay needs a timm backbone with group_matcher() (e.g. a ViT) to number its "
                    f"layers; '{backbone}' is a {type(backbone_module).__name__}."
                )
            backbone_groups = param_groups_layer_decay(
                backbone_module, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay
            )
            for group in backbone_groups:
                # timm gives the backbone's deepest layer scale 1; the rest of the model sits one layer above
                group["lr"] = lr * backbone_lr_scale * layer_decay * group.pop("lr_scale")

    rest_groups = param_groups_weight_decay(
        model, weight_decay, no_weight_decay_list=_no_weight_decay_names(model)
    )
    for group in rest_groups:
        group["params"] = [p for p in group["params"] if id(p) not in backbone_params]
        group["lr"] = lr
    groups = [group for group in backbone_groups + rest_groups if group["params"]]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimize.")
    return groups
