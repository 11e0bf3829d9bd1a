"""The angiography backbone factory and its two heads, on tiny trunks."""

import pytest
import torch
from torch import nn

from common.errors import InputDataError
from common.networks.angiography import RopeBackbone, VesselSegmentationNet, angiography_mask_rcnn
from common.networks.timm_backbone import architecture_only, save_backbone
from common.networks.vitdet import ViTDetBackbone

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}
DECODER = (32, 16, 8, 8, 8)
SAM3_TINY = {
    "trunk": "sam3", "img_size": 56, "embed_dim": 32, "depth": 2, "num_heads": 2, "window_size": 4,
    "global_att_blocks": (1,), "pretrain_img_size": 56,
}  # fmt: skip
SAM3_TRUNK = {k: v for k, v in SAM3_TINY.items() if k != "img_size"}


def test_vessel_net_timm_patch16_any_multiple_and_trains_the_backbone():
    net = VesselSegmentationNet(decoder_channels=DECODER, img_size=64, **TINY)
    logits = net(torch.randn(2, 3, 64, 96))
    assert logits.shape == (2, 1, 64, 96)
    logits.mean().backward()
    assert net.backbone.trunk.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(
        k.startswith(("backbone.trunk.", "project.", "stages.", "stem.", "fuse.", "head."))
        for k in net.state_dict()
    )


def test_vessel_net_eva02_patch14_resizes_to_the_input():
    net = VesselSegmentationNet(decoder_channels=DECODER, name="eva02_tiny_patch14_224", img_size=56, **TINY)
    assert net.backbone.patch_size == 14
    assert net(torch.randn(1, 3, 56, 70)).shape == (1, 1, 56, 70)


def test_backbone_rejects_bad_choices(tmp_path):
    with pytest.raises(ValueError, match="no rotary embeddings"):
        RopeBackbone(name="vit_small_patch16_224", img_size=64, **TINY)
    with pytest.raises(ValueError, match="trunk must be one of"):
        RopeBackbone(trunk="dinov2")
    with pytest.raises(ValueError, match="multiples of the patch size"):
        RopeBackbone(img_size=64, **TINY)(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="decoder_channels"):
        VesselSegmentationNet(decoder_channels=(8,), img_size=64, **TINY)
    with pytest.raises(InputDataError, match="not found"):
        RopeBackbone(img_size=64, checkpoint=tmp_path / "missing.pt", **TINY)
    with pytest.raises(ValueError, match="its own constructor"):
        ViTDetBackbone(RopeBackbone(img_size=64, **TINY), checkpoint=tmp_path / "trunk.pt")


def test_backbone_loads_local_weights_unless_architecture_only(tmp_path):
    source = RopeBackbone(img_size=64, **TINY)
    path = save_backbone(source.trunk, tmp_path / "trunk.pt")
    loaded = RopeBackbone(img_size=128, checkpoint=path, **TINY)
    assert all(torch.equal(v, loaded.trunk.state_dict()[k]) for k, v in source.trunk.state_dict().items())
    with architecture_only():
        random = RopeBackbone(img_size=64, checkpoint=tmp_path / "missing.pt", **TINY)
    assert not torch.equal(random.trunk.patch_embed.proj.weight, source.trunk.patch_embed.proj.weight)


def test_mask_rcnn_trains_and_predicts_on_a_rope_backbone():
    torch.manual_seed(0)
    model = angiography_mask_rcnn(
        img_size=64, min_size=64, max_size=64, out_channels=16, backbone_kwargs=TINY, box_detections_per_img=5
    )
    assert model.roi_heads.box_predictor.cls_score.out_features == 15
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 10:20], masks[1, 30:60, 40:50] = 1, 1
    target = {
        "boxes": torch.tensor([[10.0, 10, 20, 40], [40, 30, 50, 60]]),
        "labels": torch.tensor([1, 14]),
        "masks": masks,
    }
    losses = model.train()([torch.rand(3, 64, 64)], [target])
    assert set(losses) == {
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_objectness",
        "loss_rpn_box_reg",
    }
    sum(losses.values()).backward()
    assert model.backbone.vit.trunk.blocks[0].attn.qkv.weight.grad is not None
    (output,) = model.eval()([torch.rand(3, 64, 64)])
    assert output["masks"].shape[1:] == (1, 64, 64)


@pytest.fixture
def sam3_available():
    pytest.importorskip("sam3.model.vitdet", reason="the optional sam3 package is not installed")


def test_sam3_trunk_from_a_full_checkpoint_at_another_size(sam3_available, tmp_path):
    from common.networks.sam3_trunk import SAM3_TRUNK_PREFIX, build_sam3_trunk

    config = {k: v for k, v in SAM3_TRUNK.items() if k != "trunk"}
    native = build_sam3_trunk(56, **config)
    checkpoint = {f"{SAM3_TRUNK_PREFIX}{k}": v for k, v in native.state_dict().items()}
    checkpoint["detector.backbone.language_backbone.weight"] = torch.zeros(3)  # not the trunk: ignored
    torch.save({"model": checkpoint}, tmp_path / "sam3.pt")

    trunk = build_sam3_trunk(112, checkpoint=tmp_path / "sam3.pt", **config)
    reference = build_sam3_trunk(112, **config)
    for name, value in trunk.state_dict().items():
        expected = reference.state_dict()[name] if name.endswith("freqs_cis") else native.state_dict()[name]
        assert torch.equal(value, expected), name
    assert trunk.blocks[1].attn.freqs_cis.shape[0] == 8 * 8  # regenerated for the 112 px grid

    del checkpoint[f"{SAM3_TRUNK_PREFIX}patch_embed.proj.weight"]
    torch.save(checkpoint, tmp_path / "broken.pt")
    with pytest.raises(InputDataError, match="missing"):
        build_sam3_trunk(112, checkpoint=tmp_path / "broken.pt", **config)


def test_sam3_heads_accept_only_their_size(sam3_available):
    net = VesselSegmentationNet(decoder_channels=DECODER, **SAM3_TINY)
    assert net(torch.randn(1, 3, 56, 56)).shape == (1, 1, 56, 56)
    with pytest.raises(ValueError, match="rotary tables for 56 x 56"):
        net(torch.randn(1, 3, 112, 112))
    model = angiography_mask_rcnn(
        img_size=224, out_channels=16, backbone_kwargs=SAM3_TRUNK, box_detections_per_img=5
    )
    assert isinstance(model.backbone.vit, nn.Module) and model.transform.size_divisible == 224
    (output,) = model.eval()([torch.rand(3, 200, 180)])  # resized to the fixed 224 x 224 the trunk accepts
    assert output["masks"].shape[-2:] == (200, 180)
