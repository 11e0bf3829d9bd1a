import math

import pytest
import timm
import torch
from torch import nn

from common.networks.cam_classifier import CAMClassifier
from common.networks.centernet import CenterNet
from common.networks.deeplab_v2 import DeepLabV2
from common.networks.dino import DINOHead, DINOModel
from common.networks.mae import MaskedAutoencoderViT
from common.networks.param_groups import param_groups
from common.networks.timm_backbone import create_vit_backbone
from common.networks.vit_unet import ViTUNet
from common.networks.vitdet import vit_mask_rcnn

TINY_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2}


class ViTSegmenter(nn.Module):
    """timm's tiny ViT under a small convolutional head with a BatchNorm."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.backbone = timm.create_model(
            "vit_tiny_patch16_224", img_size=32, pretrained=False, num_classes=0, depth=depth
        )
        self.head = nn.Sequential(nn.Conv2d(192, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1))


def settings(model: nn.Module, groups: list[dict]) -> dict[str, tuple[float, float]]:
    """name -> (lr, weight_decay) of every grouped parameter, checking each trainable one is there once."""
    assert all(group["params"] and {"lr", "weight_decay"} <= group.keys() for group in groups)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups"
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}
    of_id = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    return {name: of_id[id(p)] for name, p in model.named_parameters() if p.requires_grad}


def expected_decay(model: nn.Module, weight_decay: float, exempt: set[str]) -> dict[str, float]:
    """No decay on 1-D parameters (norms, biases) and the named tokens and embeddings."""
    return {
        name: 0.0 if p.ndim <= 1 or name in exempt else weight_decay
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def test_each_trainable_parameter_once_backbone_at_its_scale():
    model = ViTSegmenter()
    got = settings(model, param_groups(model, 1e-3, 0.05, backbone_lr_scale=0.1))
    for name, (lr, _) in got.items():
        assert lr == pytest.approx(1e-4 if name.startswith("backbone.") else 1e-3), name


def test_no_decay_on_norms_biases_position_embedding_and_tokens():
    model = ViTSegmenter()
    got = settings(model, param_groups(model, 1e-3, 0.05))
    exempt = {"backbone.pos_embed", "backbone.cls_token"}
    assert {name: wd for name, (_, wd) in got.items()} == expected_decay(model, 0.05, exempt)
    assert got["head.1.weight"][1] == got["head.0.bias"][1] == got["backbone.norm.weight"][1] == 0.0
    assert got["head.0.weight"][1] == got["backbone.blocks.0.attn.qkv.weight"][1] == 0.05


def test_layer_decay_follows_vitdet_and_grows_with_depth():
    depth, decay = 3, 0.5
    model = ViTSegmenter(depth)
    got = settings(model, param_groups(model, 1.0, 0.05, backbone_lr_scale=0.1, layer_decay=decay))

    def vitdet_scale(name: str) -> float:
        # patch/position embeddings and tokens layer 0, block i layer i + 1, the final norm with the last
        # block; the head is layer depth + 1 and learns at lr
        if not name.startswith("backbone."):
            return 1.0
        parts = name.split(".")
        if parts[1] == "blocks":
            layer = int(parts[2]) + 1
        elif parts[1] == "norm":
            layer = depth
        else:
            layer = 0
        return 0.1 * decay ** (depth + 1 - layer)

    for name, (lr, _) in got.items():
        assert lr == pytest.approx(vitdet_scale(name)), name
    by_depth = [got["backbone.patch_embed.proj.weight"][0]]
    by_depth += [got[f"backbone.blocks.{i}.attn.qkv.weight"][0] for i in range(depth)]
    assert by_depth == sorted(set(by_depth)) and by_depth[-1] < got["head.0.weight"][0]


def test_frozen_parameters_are_left_out():
    model = ViTSegmenter()
    model.backbone.patch_embed.requires_grad_(False)
    model.backbone.blocks[0].requires_grad_(False)
    got = settings(model, param_groups(model, 1e-3, 0.05, backbone_lr_scale=0.1, layer_decay=0.7))
    assert not any(name.startswith(("backbone.patch_embed.", "backbone.blocks.0.")) for name in got)
    model.backbone.requires_grad_(False)
    groups = param_groups(model, 1e-3, 0.05, backbone_lr_scale=0.1)
    assert {g["lr"] for g in groups} == {1e-3}
    model.head.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 1e-3)


def test_schedulers_keep_the_ratios_between_groups():
    model = ViTSegmenter()
    optimizer = torch.optim.SGD(param_groups(model, 0.1, 1e-4, backbone_lr_scale=0.1, layer_decay=0.7))
    initial = [group["lr"] for group in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=10, power=0.9)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    factor = optimizer.param_groups[0]["lr"] / initial[0]
    assert 0 < factor < 1
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr * factor for lr in initial])
    assert all(g["weight_decay"] in (0.0, 1e-4) for g in optimizer.param_groups)


def test_a_data_parallel_wrapper_is_looked_through():
    model = ViTSegmenter()
    wrapped = param_groups(nn.DataParallel(model), 1e-3, 0.05, backbone_lr_scale=0.1)
    plain = param_groups(model, 1e-3, 0.05, backbone_lr_scale=0.1)
    assert settings(model, wrapped) == settings(model, plain)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"lr": math.nan}, "lr must be a positive number"),
        ({"lr": "1e-3"}, "lr must be a positive number"),
        ({"weight_decay": -0.1}, "weight_decay must be a number >= 0"),
        ({"backbone_lr_scale": 0.0}, "requires_grad_"),
        ({"layer_decay": 0.0}, r"layer_decay must be a number in \(0, 1\]"),
        ({"layer_decay": 1.5}, r"layer_decay must be a number in \(0, 1\]"),
        ({"backbone": "encoder"}, "'encoder' is not a submodule of ViTSegmenter"),
        ({"backbone": None, "backbone_lr_scale": 0.1}, "need a backbone"),
        ({"backbone": None, "layer_decay": 0.7}, "need a backbone"),
        ({"backbone": "head", "layer_decay": 0.7}, "group_matcher"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    kwargs = {"lr": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=message):
        param_groups(ViTSegmenter(), **kwargs)


def test_layer_decay_needs_a_timm_vit_not_a_dilated_cnn():
    with pytest.raises(ValueError, match="group_matcher"):
        param_groups(DeepLabV2(3, backbone="resnet10t"), 1e-3, layer_decay=0.7)


def backbone_at_a_tenth(name: str) -> float:
    return 0.01 if name.startswith("backbone.") else 0.1


def vitdet_lr(name: str) -> float:
    """ViTDet at depth 2, decay 0.7: embeddings 0.7^3, block 0 0.7^2, block 1 and final norm 0.7, rest 1."""
    if not name.startswith("backbone.vit."):
        return 0.1
    parts = name.split(".")
    if parts[2] == "blocks":
        return 0.1 * 0.7 ** (2 - int(parts[3]))
    return 0.1 * (0.7 if parts[2] == "norm" else 0.7**3)


def one_rate(name: str) -> float:
    return 0.1


NETWORKS = {
    # the pathology bundle: ImageNet ResNet at the base rate, new classifier / ASPP at 10x
    "deeplab_v2": (
        lambda: DeepLabV2(3, backbone="resnet10t"),
        {"backbone_lr_scale": 0.1},
        backbone_at_a_tenth,
        set(),
    ),
    "cam_classifier": (
        lambda: CAMClassifier(3, backbone="resnet10t"),
        {"backbone_lr_scale": 0.1},
        backbone_at_a_tenth,
        set(),
    ),
    "centernet": (
        lambda: CenterNet("resnet18", deconv_channels=(32, 16, 8), head_channels=8),
        {"backbone_lr_scale": 0.1},
        backbone_at_a_tenth,
        set(),
    ),
    "vit_unet": (
        lambda: ViTUNet("vit_small_patch8_224", decoder_channels=(32, 16, 8, 8), **{**TINY_VIT, "depth": 4}),
        {"backbone_lr_scale": 0.1},
        backbone_at_a_tenth,
        {"backbone.pos_embed", "backbone.cls_token"},
    ),
    "vit_mask_rcnn": (
        lambda: vit_mask_rcnn(vit="vit_base_patch16_224", vit_kwargs=TINY_VIT, min_size=64, max_size=64),
        {"backbone": "backbone.vit", "layer_decay": 0.7},
        vitdet_lr,
        {"backbone.vit.pos_embed", "backbone.vit.cls_token"},
    ),
    # pretraining: one rate for the whole model
    "mae": (
        lambda: MaskedAutoencoderViT(
            img_size=32, decoder_dim=16, decoder_depth=1, decoder_heads=2, **TINY_VIT
        ),
        {"backbone": None},
        one_rate,
        {"mask_token", "encoder.pos_embed", "encoder.cls_token"},
    ),
    "dino": (
        lambda: DINOModel(
            create_vit_backbone("vit_small_patch16_224", **TINY_VIT),
            DINOHead(32, out_dim=16, hidden_dim=16, bottleneck_dim=8),
        ),
        {"backbone": None},
        one_rate,
        {"backbone.pos_embed", "backbone.cls_token"},
    ),
}


@pytest.mark.parametrize("network", NETWORKS)
def test_each_network_gets_its_expected_groups(network):
    build, kwargs, expected_lr, exempt = NETWORKS[network]
    torch.manual_seed(0)
    model = build()
    got = settings(model, param_groups(model, 0.1, 0.05, **kwargs))
    assert {name: wd for name, (_, wd) in got.items()} == expected_decay(model, 0.05, exempt)
    for name, (lr, _) in got.items():
        assert lr == pytest.approx(expected_lr(name)), name
    assert any(wd == 0.05 for _, wd in got.values())
