from dataclasses import dataclass

import pytest
import timm
import torch
from torch import nn

from common.errors import InputDataError
from common.networks import timm_backbone
from common.networks.timm_backbone import (
    backbone_config,
    create_vit_backbone,
    default_block_indices,
    load_backbone_weights,
    save_backbone,
)

TINY = {"depth": 4, "embed_dim": 48, "num_heads": 2}


@dataclass
class Payload:
    """Any class instance: a weights-only loader must refuse to unpickle it."""

    note: str


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return create_vit_backbone("vit_small_patch8_224", **TINY)


def test_default_block_indices():
    assert default_block_indices(12) == [2, 5, 8, 11]
    assert default_block_indices(24) == [5, 11, 17, 23]
    assert default_block_indices(4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="depth 2"):
        default_block_indices(2)


@pytest.mark.parametrize("name, patch", [("vit_small_patch8_224", 8), ("vit_small_patch16_dinov3", 16)])
def test_any_multiple_of_the_patch_size_works(name, patch):
    model = create_vit_backbone(name, **TINY)
    features = model.forward_intermediates(
        torch.rand(1, 3, 4 * patch, 6 * patch), indices=[1, 3], output_fmt="NCHW", intermediates_only=True
    )
    assert [tuple(f.shape) for f in features] == [(1, 48, 4, 6)] * 2


def test_not_a_vit_is_rejected():
    with pytest.raises(ValueError, match="not a timm model"):
        create_vit_backbone("no_such_model")
    with pytest.raises(ValueError, match="ViT-style"):
        create_vit_backbone("resnet18")


def test_pretrained_offline_is_an_error_not_random_weights(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("cannot reach huggingface.co")

    monkeypatch.setattr(timm_backbone.timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="pass a local weights file as `checkpoint`"):
        create_vit_backbone("vit_small_patch8_224.dino", pretrained=True)


def test_saved_backbone_loads_strictly_into_timm(tiny_vit, tmp_path):
    path = save_backbone(nn.DataParallel(tiny_vit), tmp_path / "backbone.pt")
    saved = torch.load(path, weights_only=True)
    assert saved["timm_name"] == "vit_small_patch8_224"
    assert saved["config"] == backbone_config(tiny_vit)
    assert not any(k.startswith("module.") for k in saved["state_dict"])

    rebuilt = timm.create_model(saved["timm_name"], num_classes=0, **saved["config"])
    rebuilt.load_state_dict(saved["state_dict"], strict=True)
    x = torch.rand(1, 3, 224, 224)  # a plain timm ViT takes only its native size
    assert torch.allclose(rebuilt.eval().forward_features(x), tiny_vit.eval().forward_features(x))


def test_prefixed_checkpoint_with_extra_entries_loads(tiny_vit, tmp_path):
    state = {f"module.backbone.{k}": v for k, v in tiny_vit.state_dict().items()}
    state["module.head.last_layer.weight"] = torch.zeros(4, 4)
    torch.save({"teacher": state}, tmp_path / "dino.pt")
    model = create_vit_backbone(
        "vit_small_patch8_224", checkpoint=tmp_path / "dino.pt", checkpoint_key="teacher", **TINY
    )
    assert torch.equal(model.pos_embed, tiny_vit.pos_embed)


def test_missing_tensors_name_the_file(tiny_vit, tmp_path):
    path = tmp_path / "partial.pt"
    state = tiny_vit.state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("blocks.3.")}, path)
    with pytest.raises(InputDataError, match="missing") as err:
        load_backbone_weights(create_vit_backbone("vit_small_patch8_224", **TINY), path)
    assert str(path) in str(err.value)


def test_wrong_shapes_name_the_file(tiny_vit, tmp_path):
    path = save_backbone(tiny_vit, tmp_path / "tiny.pt")
    with pytest.raises(InputDataError, match="wrong shape") as err:
        create_vit_backbone("vit_small_patch8_224", checkpoint=path, depth=4, embed_dim=64, num_heads=2)
    assert str(path) in str(err.value)


def test_position_embedding_of_another_image_size_is_resampled(tmp_path):
    small = create_vit_backbone("vit_small_patch8_224", img_size=64, **TINY)  # 8x8 grid, as MAE at 64 px
    path = save_backbone(small, tmp_path / "small.pt")
    large = create_vit_backbone("vit_small_patch8_224", checkpoint=path, img_size=128, **TINY)  # 16x16 grid
    assert large.pos_embed.shape == (1, 1 + 16 * 16, 48)
    torch.testing.assert_close(large.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)
    # the class token's embedding is kept; the patch grid is interpolated, so its mean barely moves
    torch.testing.assert_close(large.pos_embed[:, 0], small.pos_embed[:, 0])
    torch.testing.assert_close(large.pos_embed[:, 1:].mean(1), small.pos_embed[:, 1:].mean(1), atol=2e-3, rtol=0)


def test_missing_key_and_non_state_dicts_are_input_errors(tiny_vit, tmp_path):
    path = save_backbone(tiny_vit, tmp_path / "tiny.pt")
    with pytest.raises(InputDataError, match="no entry 'teacher'"):
        load_backbone_weights(tiny_vit, path, key="teacher")
    torch.save({"epoch": 3}, tmp_path / "not_weights.pt")
    with pytest.raises(InputDataError, match="state dict"):
        load_backbone_weights(tiny_vit, tmp_path / "not_weights.pt")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "object.pt"
    torch.save({"state_dict": Payload("not a tensor")}, path)
    with pytest.raises(InputDataError, match="refused to load") as err:
        create_vit_backbone("vit_small_patch8_224", checkpoint=path, **TINY)
    assert str(path) in str(err.value)
