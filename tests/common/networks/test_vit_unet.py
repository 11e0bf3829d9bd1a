from dataclasses import dataclass

import pytest
import torch

from common.errors import InputDataError
from common.networks.param_groups import param_groups
from common.networks.timm_backbone import create_vit_backbone, save_backbone
from common.networks.vit_unet import ViTUNet

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"depth": 4, "embed_dim": 48, "num_heads": 2}
PATCH8 = {"backbone": "vit_small_patch8_224", "decoder_channels": (32, 16, 8, 8), **TINY}
PATCH16 = {"backbone": "vit_small_patch16_dinov3", "decoder_channels": (32, 16, 8, 8, 8), **TINY}


@dataclass
class Payload:
    """Any class instance: a weights-only loader must refuse to unpickle it."""

    note: str


@pytest.mark.parametrize("config", [PATCH8, PATCH16], ids=["patch8", "patch16_dinov3"])
@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_output_matches_input_size_and_lies_in_unit_interval(config, size):
    torch.manual_seed(0)
    model = ViTUNet(**config).eval()
    with torch.no_grad():
        y = model(torch.rand(2, 3, *size))
    assert y.shape == (2, 1, *size)
    assert 0 <= y.min() and y.max() <= 1


def test_stage_count_follows_patch_size():
    assert len(ViTUNet(**PATCH8).stages) == 3
    assert len(ViTUNet(**PATCH16).stages) == 4


def test_logits_without_activation_and_multi_channel_io():
    torch.manual_seed(0)
    logit_model = ViTUNet(in_channels=2, out_channels=3, out_activation=None, **PATCH8).eval()
    sigmoid_model = ViTUNet(in_channels=2, out_channels=3, **PATCH8).eval()
    sigmoid_model.load_state_dict(logit_model.state_dict())
    x = torch.rand(1, 2, 32, 32)
    with torch.no_grad():
        logits = logit_model(x)
        assert logits.shape == (1, 3, 32, 32)
        assert torch.allclose(torch.sigmoid(logits), sigmoid_model(x), atol=1e-6)


def test_frozen_backbone_gets_no_gradients_and_stays_in_eval():
    model = ViTUNet(freeze_backbone=True, **PATCH8)
    model.train()
    assert not model.backbone.training and model.stem.training
    model(torch.rand(1, 3, 32, 32)).mean().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.weight.grad is not None
    groups = param_groups(model, 1e-3)
    assert {id(p) for g in groups for p in g["params"]}.isdisjoint(id(p) for p in model.backbone.parameters())


def test_param_groups_cover_each_trainable_parameter_once():
    model = ViTUNet(**PATCH8)
    groups = param_groups(model, 1e-4, weight_decay=0.05, backbone_lr_scale=0.1)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert lr_of[id(p)] == pytest.approx(1e-5 if name.startswith("backbone.") else 1e-4), name
    assert decay_of[id(model.backbone.pos_embed)] == decay_of[id(model.backbone.cls_token)] == 0.0
    assert decay_of[id(model.head.bias)] == 0.0 and decay_of[id(model.head.weight)] == 0.05
    assert {g["lr"] for g in param_groups(model, 1e-4)} == {1e-4}  # backbone_lr_scale defaults to 1
    torch.optim.AdamW(groups).step()


def test_backbone_checkpoint_sets_the_weights(tmp_path):
    torch.manual_seed(1)
    source = create_vit_backbone("vit_small_patch8_224", **TINY)
    path = save_backbone(source, tmp_path / "backbone.pt")
    fresh = ViTUNet(**PATCH8)
    loaded = ViTUNet(backbone_checkpoint=str(path), **PATCH8)
    kept = loaded.backbone.state_dict()  # the unused final norm is pruned
    assert kept and set(kept) <= set(source.state_dict())
    for key, value in kept.items():
        assert torch.equal(value, source.state_dict()[key]), key
    assert not torch.equal(fresh.backbone.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_incompatible_checkpoints_name_the_file(tmp_path):
    wide_vit = create_vit_backbone("vit_small_patch8_224", depth=4, embed_dim=64, num_heads=2)
    wide = save_backbone(wide_vit, tmp_path / "wide.pt")
    with pytest.raises(InputDataError, match="wrong shape") as err:
        ViTUNet(backbone_checkpoint=wide, **PATCH8)
    assert str(wide) in str(err.value)

    shallow_vit = create_vit_backbone("vit_small_patch8_224", depth=3, embed_dim=48, num_heads=2)
    shallow = save_backbone(shallow_vit, tmp_path / "shallow.pt")
    with pytest.raises(InputDataError, match="missing") as err:
        ViTUNet(backbone_checkpoint=shallow, **PATCH8)
    assert str(shallow) in str(err.value)

    pickled = tmp_path / "object.pt"
    torch.save({"state_dict": Payload("code could hide here")}, pickled)
    with pytest.raises(InputDataError, match="refused to load") as err:
        ViTUNet(backbone_checkpoint=pickled, **PATCH8)
    assert str(pickled) in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"out_activation": "relu"}, r"one of \('sigmoid', None\)"),
        ({"decoder_channels": (32, 16, 8)}, "needs 4 entries"),
        ({"decoder_channels": (32, 16, 0, 8)}, "positive integers"),
        ({"block_indices": (0, 2, 1, 3)}, r"4 increasing integers in \[0, 3\]"),
        ({"block_indices": (0, 1, 2, 4)}, r"4 increasing integers in \[0, 3\]"),
        ({"patch_size": 4, "decoder_channels": (8, 8, 8)}, "power of two >= 8"),
        ({"in_channels": 0}, "must be >= 1"),
    ],
)
def test_invalid_arguments_say_what_is_allowed(overrides, message):
    with pytest.raises(ValueError, match=message):
        ViTUNet(**{**PATCH8, **overrides})


def test_input_not_a_multiple_of_the_patch_is_rejected():
    with pytest.raises(ValueError, match="multiples of 8"):
        ViTUNet(**PATCH8)(torch.rand(1, 3, 36, 32))


def test_every_trainable_parameter_gets_a_gradient():
    """DistributedDataParallel fails on parameters unused in the forward pass (e.g. an unread final norm)."""
    net = ViTUNet("vit_small_patch8_224", depth=4, embed_dim=32, num_heads=2, decoder_channels=(16, 16, 8, 8))
    net(torch.randn(1, 3, 32, 32)).mean().backward()
    unused = [name for name, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused


@pytest.mark.parametrize("config, channels", [(PATCH8, [256, 128, 64, 32]), (PATCH16, [256, 128, 64, 32, 32])])
def test_default_decoder_channels_follow_the_patch_size(config, channels):
    net = ViTUNet(**{k: v for k, v in config.items() if k != "decoder_channels"})
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)
    assert [stage.upsample.out_channels for stage in net.stages] == channels[1:]
