import pytest
import torch
from torchvision.ops import nms, roi_align

from common.errors import InputDataError
from common.networks.timm_backbone import create_vit_backbone, save_backbone
from common.networks.vitdet import SimpleFeaturePyramid, ViTDetBackbone, vit_mask_rcnn

VIT = "vit_base_patch16_224"
TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}
SIZE = 128


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_mask_rcnn(**kwargs):
    return vit_mask_rcnn(
        vit=VIT, vit_kwargs=TINY, min_size=SIZE, max_size=SIZE, out_channels=16, **kwargs
    )


def lesion_targets():
    """Two images, one with a single lesion and one with two, as boxes, labels and binary masks."""
    targets = []
    for boxes in ([[20, 30, 70, 90]], [[10, 10, 50, 40], [60, 64, 120, 110]]):
        masks = torch.zeros(len(boxes), SIZE, SIZE, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes):
            mask[y0:y1, x0:x1] = 1
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.ones(len(boxes), dtype=torch.int64),
                "masks": masks,
            }
        )
    return targets


def test_pyramid_strides_names_and_channels():
    pyramid = SimpleFeaturePyramid(32, out_channels=24)
    maps = pyramid(torch.randn(2, 32, SIZE // 16, SIZE // 16))
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    assert pyramid.strides == {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}
    for name, feature in maps.items():
        side = SIZE // pyramid.strides[name]
        assert feature.shape == (2, 24, side, side)


def test_pyramid_pool_level_subsamples_the_coarsest_map():
    pyramid = SimpleFeaturePyramid(32, out_channels=8).eval()
    maps = pyramid(torch.randn(1, 32, 8, 8))
    torch.testing.assert_close(maps["pool"], maps["3"][..., ::2, ::2])


def test_pyramid_subset_without_top_block_or_norm():
    pyramid = SimpleFeaturePyramid(32, out_channels=8, scale_factors=(2.0, 1.0), top_block=False, norm=None)
    maps = pyramid(torch.randn(1, 32, 4, 4))
    assert pyramid.strides == {"0": 8, "1": 16}
    assert [m.shape[-1] for m in maps.values()] == [8, 4]
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in pyramid.modules())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scale_factors": (1.0, 2.0)}, "strictly decreasing"),
        ({"scale_factors": (8.0,)}, "subset"),
        ({"scale_factors": ()}, "non-empty"),
        ({"norm": "BN"}, "norm must be one of"),
    ],
)
def test_pyramid_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimpleFeaturePyramid(32, **kwargs)


def test_backbone_maps_and_vit_unaware_of_pyramid():
    backbone = ViTDetBackbone(VIT, out_channels=16, **TINY)
    plain = create_vit_backbone(VIT, **TINY)
    assert backbone.vit.state_dict().keys() == plain.state_dict().keys()
    assert backbone.out_channels == 16
    maps = backbone(torch.randn(1, 3, SIZE, 96))
    for name, stride in {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}.items():
        assert maps[name].shape == (1, 16, SIZE // stride, -(-96 // stride))  # the pool level rounds up


def test_backbone_rejects_other_patch_sizes_and_input_sizes():
    with pytest.raises(ValueError, match="patch16"):
        ViTDetBackbone("vit_small_patch8_224", **TINY)
    with pytest.raises(ValueError, match="multiples of 16"):
        ViTDetBackbone(VIT, out_channels=16, **TINY)(torch.randn(1, 3, 72, 64))


def test_mask_rcnn_train_losses_are_finite_and_reach_every_vit_weight():
    model = tiny_mask_rcnn().train()
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)]
    losses = model(images, lesion_targets())
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_mask"}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.backbone.vit.parameters())


def test_mask_rcnn_eval_returns_masks_of_the_input_size():
    model = tiny_mask_rcnn(box_score_thresh=0.0, box_detections_per_img=5).eval()
    with torch.no_grad():
        outputs = model([torch.rand(3, 96, SIZE), torch.rand(3, 80, 64)])
    assert len(outputs) == 2
    for output, (h, w) in zip(outputs, [(96, SIZE), (80, 64)]):
        assert set(output) == {"boxes", "labels", "scores", "masks"}
        n = len(output["boxes"])
        assert n > 0
        assert output["masks"].shape == (n, 1, h, w)
        assert output["labels"].shape == output["scores"].shape == (n,)


def test_mask_rcnn_configuration():
    model = tiny_mask_rcnn(num_classes=3)
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3
    assert model.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert model.rpn.anchor_generator.num_anchors_per_location() == [3] * 5
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    assert model.transform.image_mean == [0.485, 0.456, 0.406]
    default_sizes = vit_mask_rcnn(vit=VIT, vit_kwargs=TINY, out_channels=16).transform
    assert default_sizes.min_size == (512, 576, 640, 704, 768) and default_sizes.max_size == 1024
    with pytest.raises(ValueError, match="background"):
        tiny_mask_rcnn(num_classes=1)


def test_mask_rcnn_loads_encoder_saved_with_save_backbone(tmp_path):
    encoder = create_vit_backbone(VIT, **TINY)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(1.0)
    path = save_backbone(encoder, tmp_path / "mae_encoder.pt")
    model = tiny_mask_rcnn(checkpoint=path)
    loaded = model.backbone.vit.state_dict()
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(loaded[key], value)


def test_mask_rcnn_checkpoint_of_another_architecture_names_the_file(tmp_path):
    path = save_backbone(create_vit_backbone(VIT, depth=1, embed_dim=32, num_heads=2), tmp_path / "other.pt")
    with pytest.raises(InputDataError, match="other.pt"):
        tiny_mask_rcnn(checkpoint=path)


def test_torchvision_ops_available():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5).tolist() == [0, 2]
    pooled = roi_align(torch.ones(1, 1, 8, 8), [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], output_size=2)
    torch.testing.assert_close(pooled, torch.ones(1, 1, 2, 2))


def test_anchor_sizes_must_give_one_size_per_pyramid_level():
    """Anchors matched to small objects (coronary segments) are one size per level of the pyramid."""
    model = vit_mask_rcnn(vit=VIT, vit_kwargs=TINY, out_channels=16, anchor_sizes=(8, 16, 32, 64, 128))
    assert [s[0] for s in model.rpn.anchor_generator.sizes] == [8, 16, 32, 64, 128]
    with pytest.raises(ValueError, match="anchor_sizes"):
        vit_mask_rcnn(vit=VIT, vit_kwargs=TINY, out_channels=16, anchor_sizes=(8, 16))
