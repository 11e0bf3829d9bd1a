"""Build timm Vision Transformers by name and move their weights in and out of local files.

Every ViT-based bundle (DINOCell, MAE pretraining, ViTDet-style detectors) gets its backbone here, so
that one function decides how models are named, that ``dynamic_img_size`` is on (any input whose
sides are multiples of the patch size works, without hand-resizing position embeddings), and that
weights from our own pretraining runs are loaded safely and completely. Hospitals often train
offline, so asking for pretrained weights that cannot be fetched is an error, never a silent fall
back to random initialisation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from common.errors import InputDataError
from common.io.checkpoint import extract_state_dict, load_checkpoint, save_checkpoint

__all__ = [
    "architecture_only",
    "architecture_only_enabled",
    "backbone_config",
    "create_timm_model",
    "create_vit_backbone",
    "default_block_indices",
    "load_backbone_weights",
    "save_backbone",
]

BACKBONE_REMEDY = (
    "write it first with the bundle's self-supervised pretraining (`python -m monai.bundle run pretraining "
    "--config_file <bundle>/configs/pretrain.json` with the same --bundle_root), or start from timm's "
    "weights instead with `--backbone_checkpoint \"\"`"
)

logger = logging.getLogger(__name__)

# Wrappers that prefix backbone keys: DistributedDataParallel, DINO/MAE models, encoder-decoder nets.
STRIP_PREFIXES = ("module.", "backbone.", "encoder.")

_ARCHITECTURE_ONLY: ContextVar[bool] = ContextVar("architecture_only", default=False)


@contextlib.contextmanager
def architecture_only() -> Iterator[None]:
    """Build networks without their weights: no pretrained download, no local checkpoint read.

    For tools that check a network's shapes and export (``common.bundle.verify``), which must work
    offline and in a fresh clone that lacks the weights of earlier training stages. Networks built
    inside are randomly initialised whatever their config says, so never train or infer with them.
    """
    token = _ARCHITECTURE_ONLY.set(True)
    try:
        yield
    finally:
        _ARCHITECTURE_ONLY.reset(token)


def architecture_only_enabled() -> bool:
    """True inside :func:`architecture_only`: loaders must not read weight files."""
    return _ARCHITECTURE_ONLY.get()


def create_timm_model(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with one clear error when pretrained weights cannot be fetched.

    Hospitals often train offline; a failed download must say what to do instead of surfacing a
    network stack trace, and must never fall back to random weights silently; a local weights file
    (``pretrained_cfg_overlay={"file": ...}``) that does not exist is named as such. Under
    :func:`architecture_only`, ``pretrained`` is ignored.
    """
    pretrained = pretrained and not architecture_only_enabled()
    weights_file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
    if pretrained and weights_file and not Path(weights_file).is_file():
        raise InputDataError(
            weights_file,
            f"pretrained weights file for timm model '{name}' not found",
            "pass the path of a timm state dict (e.g. --classifier_weights /models/resnet18.pth)",
        )
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as err:
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load the pretrained weights of timm model '{name}' ({err}). If this machine is "
            "offline, pass a local weights file as `checkpoint` (or `backbone_checkpoint`) and set "
            "pretrained to false."
        ) from err


def create_vit_backbone(
    name: str = "vit_small_patch8_224",
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_key: str | None = None,
    sha256: str | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """A headless timm ViT (``num_classes=0``, ``dynamic_img_size=True``), optionally with local weights.

    Args:
        name: timm model name, optionally with a pretrained tag, e.g. ``"vit_small_patch8_224.dino"``
            or ``"vit_small_patch16_dinov3"``. The model must implement ``forward_intermediates``.
        pretrained: download timm's pretrained weights (needs network access or a filled HF cache).
        checkpoint: local weights file (e.g. from :func:`save_backbone`) loaded after construction.
        checkpoint_key: entry of the checkpoint that holds the state dict (default: autodetect).
        sha256: expected digest of ``checkpoint``.
        timm_kwargs: passed to ``timm.create_model``, e.g. ``depth``, ``embed_dim``, ``num_heads``,
            ``in_chans``, ``drop_path_rate``.

    Raises:
        ValueError: ``name`` is not a timm model or not a ViT-style one.
        RuntimeError: ``pretrained`` is true but the weights cannot be fetched.
        InputDataError: ``checkpoint`` is unreadable or does not fit the model.
    """
    if not timm.is_model(name):
        raise ValueError(f"'{name}' is not a timm model; list ViTs with timm.list_models('vit_*').")
    try:
        model = create_timm_model(name, pretrained, num_classes=0, dynamic_img_size=True, **timm_kwargs)
    except TypeError as err:
        raise ValueError(
            f"timm model '{name}' does not accept dynamic_img_size/{sorted(timm_kwargs)}; "
            f"only ViT-style models are supported ({err})"
        ) from err
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(f"timm model '{name}' has no forward_intermediates(); use a ViT-style model.")
    if checkpoint is not None:
        load_backbone_weights(model, checkpoint, key=checkpoint_key, sha256=sha256)
    return model


def _strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith(STRIP_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def _resample_position_embedding(
    model: nn.Module, state_dict: dict[str, Any], path: str | os.PathLike
) -> dict[str, Any]:
    """Interpolate a ViT's absolute position embedding to the model's patch grid.

    Encoders are pretrained at one image size (MAE and DINO at 224) and fine-tuned at another, and
    with ``dynamic_img_size`` the model resamples the embedding per input anyway; only the stored
    grid has to match the model's for the load to be exact elsewhere.
    """
    stored, target = state_dict.get("pos_embed"), getattr(model, "pos_embed", None)
    if stored is None or target is None or stored.shape == target.shape or stored.shape[-1] != target.shape[-1]:
        return state_dict
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
    grid = math.isqrt(stored.shape[1] - prefix)
    if grid * grid != stored.shape[1] - prefix:
        return state_dict  # not a square grid: reported as a shape mismatch below
    resampled = resample_abs_pos_embed(
        stored, new_size=list(model.patch_embed.grid_size), old_size=[grid, grid], num_prefix_tokens=prefix
    )
    logger.info("%s: resampled the position embedding from a %dx%d grid to %s", path, grid, grid,
                tuple(model.patch_embed.grid_size))
    return {**state_dict, "pos_embed": resampled}


def load_backbone_weights(
    model: nn.Module, path: str | os.PathLike, key: str | None = None, sha256: str | None = None
) -> None:
    """Load a local checkpoint into ``model``, refusing partial loads.

    Keys may carry ``module.``, ``backbone.`` or ``encoder.`` prefixes. A ViT position embedding
    stored for another image size is interpolated to the model's grid. Entries the backbone does not
    have (a DINO head, a decoder) are ignored and logged; a backbone tensor that is missing or has a
    different shape raises, because fine-tuning a half-initialised backbone fails silently.

    Under :func:`architecture_only` the file is not read and ``model`` keeps its weights.

    Raises:
        InputDataError: naming ``path``, when the file is unsafe, unreadable or does not fit ``model``.
    """
    if architecture_only_enabled():
        return
    if not Path(path).is_file():
        raise InputDataError(path, "backbone checkpoint not found", BACKBONE_REMEDY)
    checkpoint = load_checkpoint(path, sha256=sha256)
    try:
        state_dict = extract_state_dict(checkpoint, key)
    except (KeyError, TypeError) as err:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise InputDataError(path, f"has no entry '{key}' (found {found})") from err
    if not isinstance(state_dict, Mapping) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise InputDataError(path, "does not hold a state dict (a mapping of parameter names to tensors)")
    state_dict = _resample_position_embedding(model, _strip_prefixes(state_dict), path)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    mismatched = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing:
        raise InputDataError(
            path,
            f"{len(missing)} of {len(expected)} backbone tensors are missing (e.g. {missing[:3]}); "
            "is this a checkpoint of a different architecture?",
        )
    if mismatched:
        k = mismatched[0]
        raise InputDataError(
            path,
            f"{len(mismatched)} tensors have the wrong shape, e.g. '{k}' is {tuple(state_dict[k].shape)} "
            f"in the file but {tuple(expected[k].shape)} in the model; check the backbone name and its "
            "depth, embed_dim, patch_size, img_size and in_channels",
        )
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        logger.info("%s: ignored %d non-backbone entries, e.g. %s", path, len(unexpected), unexpected[:3])
    model.load_state_dict({k: state_dict[k] for k in expected})


def default_block_indices(depth: int, n: int = 4) -> list[int]:
    """``n`` evenly spaced block indices ending at the last block, e.g. [2, 5, 8, 11] for 12 blocks."""
    if not 1 <= n <= depth:
        raise ValueError(f"cannot take {n} distinct blocks from a ViT of depth {depth}; need 1 <= n <= depth")
    return [(i + 1) * depth // n - 1 for i in range(n)]


def _unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DataParallel/DistributedDataParallel wrapper, so saved keys have no ``module.``."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return module.module if isinstance(module, wrappers) else module


def backbone_config(backbone: nn.Module) -> dict[str, Any]:
    """The timm keyword arguments that rebuild ``backbone``'s shape (it may differ from the named default)."""
    backbone = _unwrap(backbone)
    return {
        "embed_dim": int(backbone.embed_dim),
        "depth": len(backbone.blocks),
        "num_heads": int(backbone.blocks[0].attn.num_heads),
        "patch_size": int(backbone.patch_embed.patch_size[0]),
        "img_size": [int(s) for s in backbone.patch_embed.img_size],
        "in_chans": int(backbone.patch_embed.proj.in_channels),
    }


def save_backbone(backbone: nn.Module, path: str | os.PathLike, timm_name: str | None = None) -> Path:
    """Save a backbone atomically as ``{"state_dict", "timm_name", "config"}``.

    The state dict has timm's own key names, so both
    ``timm.create_model(timm_name, num_classes=0, **config)`` + strict ``load_state_dict`` and
    :func:`create_vit_backbone` with ``checkpoint=path`` accept it.

    Args:
        backbone: timm ViT, possibly wrapped in (Distributed)DataParallel.
        path: destination file.
        timm_name: model name to record; default: the architecture timm recorded when building it.
    """
    backbone = _unwrap(backbone)
    name = timm_name or backbone.pretrained_cfg["architecture"]
    state_dict = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    checkpoint = {"state_dict": state_dict, "timm_name": name, "config": backbone_config(backbone)}
    return save_checkpoint(checkpoint, path)
