"""Regenerating rotary tables for a new input size gives exactly the tables of a model built at that size."""

import pytest
import timm
import torch
from torch import nn

from common.networks.rope import patch_grid, regenerate_rope, rope_state_keys

TINY_TIMM = {"num_classes": 0, "depth": 2, "embed_dim": 64, "num_heads": 2}


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


def _assert_same_buffers(model: nn.Module, reference: nn.Module) -> None:
    mine, theirs = _buffers(model), _buffers(reference)
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert mine[name].dtype == theirs[name].dtype, name
        assert torch.equal(mine[name], theirs[name]), name


@pytest.mark.parametrize(
    "name", ["vit_small_patch16_rope_224", "vit_small_patch16_rope_mixed_224", "eva02_tiny_patch14_224"]
)
def test_timm_fixed_size_tables_equal_a_model_built_at_the_new_size(name):
    patch = 14 if name.startswith("eva02") else 16
    small = timm.create_model(name, img_size=4 * patch, **TINY_TIMM)
    large = timm.create_model(name, img_size=(6 * patch, 8 * patch), **TINY_TIMM)
    before = _buffers(small)
    assert regenerate_rope(small, (6 * patch, 8 * patch)) == ["rope"]
    assert any(
        not torch.equal(before[k], v) or before[k].shape != v.shape for k, v in _buffers(small).items()
    )
    _assert_same_buffers(small, large)
    assert small.patch_embed.grid_size == (6, 8)
    small.eval()
    assert small.forward_features(torch.randn(1, 3, 6 * patch, 8 * patch)).shape[1] == 48 + 1


def test_timm_default_with_dynamic_size_caches_no_grid():
    """Our factory builds timm ViTs with dynamic_img_size: tables come from the input at each forward."""
    model = timm.create_model("vit_small_patch16_rope_224", dynamic_img_size=True, **TINY_TIMM)
    reference = timm.create_model(
        "vit_small_patch16_rope_224", dynamic_img_size=True, img_size=672, **TINY_TIMM
    )
    assert regenerate_rope(model, 672) == []
    _assert_same_buffers(model, reference)
    assert model.patch_embed.img_size == (672, 672)
    assert rope_state_keys(model) == set()  # timm's tables are never in the state dict


def test_refuses_models_without_rope_and_ddp_wrappers():
    with pytest.raises(ValueError, match="no 2-D rotary embeddings"):
        regenerate_rope(nn.Linear(2, 2), 224)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        patch_grid(100, 16)
    assert patch_grid((64, 96), 16) == (4, 6)


@pytest.fixture
def sam3_vit() -> type[nn.Module]:
    return pytest.importorskip("sam3.model.vitdet", reason="the optional sam3 package is not installed").ViT


def _sam3(vit: type[nn.Module], img_size: int, cls_token: bool = False) -> nn.Module:
    """A tiny SAM3 trunk: patch 14, windows of 4 patches, global blocks 1 and 3 (all global with a class token)."""
    blocks = {"global_att_blocks": (0, 1, 2, 3)} if cls_token else {"global_att_blocks": (1, 3)}
    return vit(
        img_size=img_size, patch_size=14, embed_dim=32, depth=4, num_heads=2, window_size=4, use_rope=True,
        use_interp_rope=True, rel_pos_blocks=(), pretrain_img_size=56, retain_cls_token=cls_token,
        use_act_checkpoint=False, **blocks,
    )  # fmt: skip


@pytest.mark.parametrize("cls_token", [False, True])
def test_sam3_tables_equal_a_trunk_built_at_the_new_size(sam3_vit, cls_token):
    trunk, reference = _sam3(sam3_vit, 112, cls_token), _sam3(sam3_vit, 224, cls_token)
    windowed_before = trunk.blocks[0].attn.freqs_cis.clone()
    changed = regenerate_rope(trunk, 224)
    assert changed == (["blocks.0.attn", "blocks.1.attn", "blocks.2.attn", "blocks.3.attn"] if cls_token
                       else ["blocks.1.attn", "blocks.3.attn"])  # fmt: skip
    _assert_same_buffers(trunk, reference)
    freqs = trunk.blocks[1].attn.freqs_cis
    assert freqs.is_complex() and freqs.shape[0] == 16 * 16 + cls_token
    if cls_token:  # the class token keeps a zero rotation
        assert torch.equal(freqs[0], torch.ones_like(freqs[0]))
    else:  # windowed blocks are left alone
        assert torch.equal(trunk.blocks[0].attn.freqs_cis, windowed_before)
        assert trunk.eval()(torch.randn(1, 3, 224, 224))[-1].shape == (1, 32, 16, 16)
    assert rope_state_keys(trunk) == {f"blocks.{i}.attn.freqs_cis" for i in range(4)}
