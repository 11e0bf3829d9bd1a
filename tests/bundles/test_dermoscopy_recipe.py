"""The dermoscopy bundle's fine-tuning recipe as train.json builds it: ViTDet's layer-wise decay, drop
path and weight-decay exemptions, and an encoder pretrained at another size reaching the detector's grid."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser

from common.networks.timm_backbone import create_vit_backbone, save_backbone
from tests.helpers import REPO_ROOT

TRAIN = REPO_ROOT / "bundles" / "dermoscopy_lesion_maskrcnn" / "configs" / "train.json"
DEPTH = 3


@pytest.fixture
def parser(tmp_path) -> ConfigParser:
    """train.json with a 3-block ViT-Tiny and an encoder saved from MAE-style pretraining at 64 px."""
    torch.manual_seed(0)
    encoder = create_vit_backbone("vit_tiny_patch16_224", img_size=64, depth=DEPTH)
    save_backbone(encoder, tmp_path / "encoder.pt", "vit_tiny_patch16_224")
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.read_meta(str(TRAIN.with_name("metadata.json")))
    parser["vit"] = "vit_tiny_patch16_224"
    parser["vit_kwargs"] = {**parser["vit_kwargs"], "depth": DEPTH}
    parser["backbone_checkpoint"] = str(tmp_path / "encoder.pt")
    parser["train_sizes"] = [64]
    parser["max_size"] = 128
    return parser


def test_optimizer_follows_vitdet_layer_decay_and_exemptions(parser):
    lr, decay, weight_decay = parser["learning_rate"], parser["layer_decay"], parser["weight_decay"]
    assert (decay, weight_decay, parser["vit_kwargs"]["drop_path_rate"]) == (0.7, 0.05, 0.1)  # the model card's
    network = parser.get_parsed_content("network_def")
    optimizer = parser.get_parsed_content("optimizer")
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    got = {name: setting[id(p)] for name, p in network.named_parameters()}
    assert len(setting) == len(got), "every parameter in one group"
    # ViT layers: embeddings 0, block i is i + 1, the rest of the detector L + 1 at the full rate
    assert got["backbone.vit.patch_embed.proj.weight"] == (pytest.approx(lr * decay ** (DEPTH + 1)), weight_decay)
    for block in range(DEPTH):
        assert got[f"backbone.vit.blocks.{block}.mlp.fc1.weight"][0] == pytest.approx(lr * decay ** (DEPTH - block))
    assert got["backbone.pyramid.levels.0.1.weight"] == (pytest.approx(lr), weight_decay)
    assert got["roi_heads.box_predictor.cls_score.weight"][0] == pytest.approx(lr)
    for exempt in ("backbone.vit.pos_embed", "backbone.vit.cls_token", "backbone.vit.blocks.0.norm1.weight",
                   "backbone.vit.blocks.0.attn.qkv.bias", "roi_heads.box_predictor.cls_score.bias"):
        assert got[exempt][1] == 0.0, exempt


def test_drop_path_grows_with_depth(parser):
    vit = parser.get_parsed_content("network_def").backbone.vit
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in vit.blocks]  # 0 is an Identity
    assert rates == pytest.approx([0.0, 0.05, 0.1])


def test_position_embedding_from_64_px_reaches_the_detector_grid(parser, tmp_path):
    network = parser.get_parsed_content("network_def").eval()
    vit = network.backbone.vit
    assert vit.pos_embed.shape == (1, 1 + 14 * 14, 192)  # stored at the 224 px grid, resampled on load
    encoder = torch.load(tmp_path / "encoder.pt", weights_only=True)["state_dict"]
    torch.testing.assert_close(vit.pos_embed[:, 0], encoder["pos_embed"][:, 0])
    # dynamic_img_size: any multiple of 16 goes through, each grid getting its own resampled embedding
    with torch.no_grad():
        maps = network.backbone(torch.zeros(1, 3, 96, 160))
    assert maps["2"].shape[-2:] == (6, 10)
