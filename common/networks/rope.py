"""Change the resolution of a ViT with 2-D rotary position embeddings (RoPE) by regenerating them.

A rotary table is a pure function of the patch grid and the model's configuration (temperature,
head dimension, position scaling), never learned. Changing the input size therefore means
computing the table again for the new grid with the model's own formula, exactly what building the
model at that size would give. Interpolating a stored table instead would rotate tokens by angles
the model never saw. Only global-attention blocks carry a table sized by the whole grid; windowed
blocks rotate within a fixed window and are left alone. Prefix tokens (a class token, registers)
keep a zero rotation: timm skips its ``num_prefix_tokens`` when applying the rotation, and SAM3's
trunk prepends a zero-angle row, which is rebuilt with the table.

Regenerate when the weights are loaded, before the model is wrapped in DistributedDataParallel:
the tables are derived, so checkpoints never provide them (:func:`rope_state_keys`), and every
rank computes the same ones.

Supported trunks:
    * timm RoPE ViTs (``timm.models.eva.Eva``: ``vit_*_rope_*``, ``eva02_*``). Built with
      ``dynamic_img_size=True`` (as :func:`~common.networks.timm_backbone.create_vit_backbone`
      does) they compute the table per forward from the input's grid and cache nothing, so only the
      recorded input size changes; built at a fixed size they cache it, and it is regenerated.
    * SAM3's image trunk (``sam3.model.vitdet.ViT``), whose attention blocks hold complex
      ``freqs_cis`` tables in the state dict.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["patch_grid", "regenerate_rope", "rope_state_keys"]


def patch_grid(img_size: int | Sequence[int], patch_size: int | Sequence[int]) -> tuple[int, int]:
    """The (rows, columns) patch grid of an image, refusing sizes the patches do not tile."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
    patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
    if len(size) != 2 or any(s <= 0 or s % p for s, p in zip(size, patch)):
        raise ValueError(f"img_size {size} must be two positive multiples of the patch size {patch}.")
    return size[0] // patch[0], size[1] // patch[1]


def _is_timm_rope(model: nn.Module) -> bool:
    return getattr(model, "rope", None) is not None and hasattr(model, "set_input_size")


def _sam3_rope_attentions(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """(name, attention, is_global) for every SAM3 block with rotary embeddings, found by its attributes."""
    found = []
    for name, block in model.named_modules():
        attn = getattr(block, "attn", None)
        if hasattr(block, "window_size") and getattr(attn, "use_rope", False) and hasattr(attn, "freqs_cis"):
            found.append((f"{name}.attn" if name else "attn", attn, block.window_size == 0))
    return found


def rope_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys holding rotary tables, which loaders take from the model, never from a checkpoint.

    Empty for timm (its tables are non-persistent buffers); the ``freqs_cis`` of every SAM3 block.
    """
    return {f"{name}.freqs_cis" for name, _, _ in _sam3_rope_attentions(model)}


def regenerate_rope(model: nn.Module, img_size: int | Sequence[int]) -> list[str]:
    """Recompute ``model``'s rotary tables for inputs of ``img_size``, in place; returns what changed.

    Args:
        model: a timm RoPE ViT or SAM3's ``ViT`` trunk (not wrapped in DistributedDataParallel).
        img_size: new input size, an int for square inputs or (height, width), a multiple of the patch.

    Returns:
        Names of the modules whose tables were rebuilt (empty when none caches one for a grid).

    For timm models this is ``set_input_size``, which also records the new size in the patch
    embedding and, for ``*_ape`` variants, resamples their learned absolute position embedding (a
    parameter, unrelated to the rotary tables).

    Raises:
        TypeError: the model is wrapped in DistributedDataParallel.
        ValueError: the model has no rotary embeddings, or a global block also
            has learned relative position tables, which cannot be regenerated.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("regenerate RoPE before wrapping the model in DistributedDataParallel.")
    if _is_timm_rope(model):
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch_grid(size, model.patch_embed.patch_size)
        cached = getattr(model.rope, "feat_shape", None) is not None
        old_grid = tuple(model.patch_embed.grid_size)
        # timm rebuilds a cached table from its frequency bands (``update_feat_shape``), never by resampling
        model.set_input_size(img_size=size)
        return ["rope"] if cached and tuple(model.patch_embed.grid_size) != old_grid else []
    attentions = _sam3_rope_attentions(model)
    if not attentions:
        raise ValueError(
            f"{type(model).__name__} has no 2-D rotary embeddings that can be regenerated; expected a timm "
            "RoPE ViT (vit_*_rope_*, eva02_*) or SAM3's sam3.model.vitdet.ViT."
        )
    grid = patch_grid(img_size, model.patch_embed.proj.kernel_size)
    changed = []
    for name, attn, is_global in attentions:
        if not is_global or tuple(attn.input_size) == grid:
            continue
        if attn.use_rel_pos:
            raise ValueError(
                f"{name} has learned relative position tables for a fixed grid; cannot resize it."
            )
        device = attn.freqs_cis.device
        attn.input_size = grid
        attn._setup_rope_freqs()  # SAM3's own formula: scaled positions, class-token row, same dtype
        attn.freqs_cis = attn.freqs_cis.to(device)
        changed.append(name)
    return changed
