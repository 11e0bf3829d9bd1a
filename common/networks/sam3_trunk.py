"""SAM3's image trunk (``sam3.model.vitdet.ViT``) built offline at any input size, with local weights.

SAM3 (Meta, 2025) is a segmentation foundation model whose image encoder is a ViT-L/14 with 2-D
rotary embeddings, windowed attention and four global blocks. The trunk is taken from the official
``sam3`` package (PyPI ``sam3``; install it with ``pip install --no-deps sam3`` plus ``iopath``,
``ftfy`` and ``regex``, which its package ``__init__`` imports) and built here from the same
hyper-parameters as ``sam3.model_builder``, but at the size a bundle trains at (672 px by default
for angiograms instead of SAM3's 1008). The rotary tables are then those of that size, and
checkpoint tables are never loaded (see :mod:`common.networks.rope`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import InputDataError
from common.io.checkpoint import extract_state_dict, load_checkpoint
from common.networks.rope import patch_grid, regenerate_rope, rope_state_keys
from common.networks.timm_backbone import STRIP_PREFIXES, architecture_only_enabled

__all__ = ["SAM3_TRUNK_PREFIX", "SAM3_VIT_L", "build_sam3_trunk", "load_sam3_trunk_weights"]

# Where the trunk sits in the official sam3.pt (detector -> SAM3VLBackbone -> Sam3DualViTDetNeck).
SAM3_TRUNK_PREFIX = "detector.backbone.vision_backbone.trunk."

SAM3_HINT = "is this a SAM3 checkpoint of the same architecture (ViT-L/14 unless overridden)?"

# sam3.model_builder's ViT-L/14 at 1008 px, minus training-only switches (compilation, checkpointing).
SAM3_VIT_L: dict[str, Any] = {
    "img_size": 1008,
    "pretrain_img_size": 336,
    "patch_size": 14,
    "in_chans": 3,
    "embed_dim": 1024,
    "depth": 32,
    "num_heads": 16,
    "mlp_ratio": 4.625,
    "norm_layer": "LayerNorm",
    "drop_path_rate": 0.1,
    "qkv_bias": True,
    "use_abs_pos": True,
    "tile_abs_pos": True,
    "global_att_blocks": (7, 15, 23, 31),
    "rel_pos_blocks": (),
    "use_rope": True,
    "use_interp_rope": True,
    "window_size": 24,
    "pretrain_use_cls_token": True,
    "retain_cls_token": False,
    "ln_pre": True,
    "ln_post": False,
    "return_interm_layers": False,
    "bias_patch_embed": False,
    "use_act_checkpoint": False,
}


def _sam3_vit_class() -> type[nn.Module]:
    try:
        with warnings.catch_warnings():  # the package warns about CUDA autocast on import
            warnings.simplefilter("ignore", UserWarning)
            from sam3.model.vitdet import ViT
    except ImportError as err:
        raise ImportError(
            f"the SAM3 trunk needs the official `sam3` package ({err}). Install it without its pinned "
            "dependencies, which would change numpy: `pip install --no-deps sam3==0.1.4 iopath ftfy regex`."
        ) from err
    return ViT


def build_sam3_trunk(
    input_size: int = 1008,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_key: str | None = None,
    sha256: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """SAM3's ``ViT`` trunk for ``input_size`` inputs, optionally with local weights.

    The trunk is built at SAM3's own size (``img_size`` of the configuration), the weights are
    loaded, and the rotary tables of its global blocks are then regenerated for ``input_size``
    (:func:`~common.networks.rope.regenerate_rope`), all before any DistributedDataParallel wrapping.

    Args:
        input_size: side of the square inputs the trunk will see (a multiple of the patch size, 14).
        checkpoint: the official ``sam3.pt``, or a trunk extracted from it by
            ``python -m common.bundle.weight_surgery``.
        checkpoint_key: entry of the checkpoint holding the state dict (default: detect).
        sha256: expected digest of ``checkpoint``.
        overrides: replace entries of :data:`SAM3_VIT_L`, e.g. a tiny ``depth``/``embed_dim`` for tests.
    """
    unknown = set(overrides) - set(SAM3_VIT_L)
    if unknown:
        raise ValueError(f"unknown SAM3 ViT arguments {sorted(unknown)}; allowed: {sorted(SAM3_VIT_L)}.")
    config = {**SAM3_VIT_L, **overrides}
    grid = patch_grid(input_size, config["patch_size"])
    trunk = _sam3_vit_class()(**config)
    trunk.patch_size = int(config["patch_size"])
    trunk.embed_dim = int(config["embed_dim"])
    if checkpoint is not None:
        load_sam3_trunk_weights(trunk, checkpoint, key=checkpoint_key, sha256=sha256)
    regenerate_rope(trunk, input_size)
    trunk.grid_size = grid
    return trunk


def _trunk_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Trunk keys of a full SAM3 checkpoint, or the keys of a trunk-only one without wrapper prefixes."""
    if any(k.startswith(SAM3_TRUNK_PREFIX) for k in state_dict):
        return {
            k[len(SAM3_TRUNK_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(SAM3_TRUNK_PREFIX)
        }
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith(STRIP_PREFIXES + ("trunk.",)):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def load_sam3_trunk_weights(
    trunk: nn.Module, path: str | os.PathLike, key: str | None = None, sha256: str | None = None
) -> None:
    """Load every learned tensor of ``trunk`` from ``path``; rotary tables keep the trunk's own.

    Raises:
        InputDataError: naming ``path``, when it is missing, unsafe, or lacks or misshapes a trunk tensor.
    """
    if architecture_only_enabled():  # common.networks.timm_backbone.architecture_only(): build, read nothing
        return
    if not Path(path).is_file():
        raise InputDataError(
            path, "SAM3 checkpoint not found", "download sam3.pt from Meta and pass its path"
        )
    state_dict = _trunk_state_dict(extract_state_dict(load_checkpoint(path, sha256=sha256), key))
    skip = rope_state_keys(trunk)
    expected = {k: v for k, v in trunk.state_dict().items() if k not in skip}
    missing = [k for k in expected if k not in state_dict]
    wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing:
        raise InputDataError(
            path, f"{len(missing)} trunk tensors are missing (e.g. {missing[:3]}); {SAM3_HINT}"
        )
    if wrong:
        k = wrong[0]
        shapes = f"{tuple(state_dict[k].shape)} in the file but {tuple(expected[k].shape)} in the trunk"
        raise InputDataError(path, f"'{k}' is {shapes}; {SAM3_HINT}")
    with torch.no_grad():
        trunk.load_state_dict({k: state_dict[k] for k in expected}, strict=False)
