import pytest
import timm
import torch
import torch.nn.functional as F

from common.errors import InputDataError
from common.io.checkpoint import save_checkpoint
from common.networks.deeplab_v2 import ASPPv2, DeepLabV2, create_dilated_backbone
from common.networks.param_groups import param_groups

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"backbone": "resnet10t"}


@pytest.mark.parametrize("output_stride", [8, 16])
def test_logits_at_input_size_and_raw_map_at_output_stride(output_stride):
    torch.manual_seed(0)
    model = DeepLabV2(5, output_stride=output_stride, **SMALL).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        raw = model.forward_logits(x)
        logits = model(x)
    assert raw.shape == (2, 5, 64 // output_stride, 96 // output_stride)
    assert logits.shape == (2, 5, 64, 96)
    assert torch.allclose(logits, F.interpolate(raw, size=(64, 96), mode="bilinear", align_corners=False))
    assert model.output_stride == output_stride


def test_any_input_size_comes_back_at_that_size():
    model = DeepLabV2(3, **SMALL).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 65, 71)).shape == (1, 3, 65, 71)


def test_aspp_sums_one_atrous_conv_per_rate():
    torch.manual_seed(0)
    model = DeepLabV2(4, atrous_rates=(2, 3, 5), **SMALL)
    branches = model.aspp.branches
    assert [b.dilation for b in branches] == [(2, 2), (3, 3), (5, 5)]
    assert [b.padding for b in branches] == [(2, 2), (3, 3), (5, 5)]
    assert all(b.kernel_size == (3, 3) and b.out_channels == 4 and b.in_channels == 512 for b in branches)

    aspp = ASPPv2(6, 3, (1, 2))
    with torch.no_grad():
        for branch in aspp.branches:
            branch.bias.normal_()
        x = torch.randn(2, 6, 9, 9)
        assert torch.allclose(aspp(x), aspp.branches[0](x) + aspp.branches[1](x), atol=1e-6)
        # summing, not concatenating: the output has num_classes channels whatever the number of rates
        assert aspp(x).shape == (2, 3, 9, 9)


def test_aspp_starts_as_deeplab():
    torch.manual_seed(0)
    aspp = ASPPv2(256, 8, (6, 12))
    weights = torch.cat([b.weight.flatten() for b in aspp.branches])
    assert weights.std().item() == pytest.approx(0.01, rel=0.05)
    assert all(torch.count_nonzero(b.bias) == 0 for b in aspp.branches)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 1}, "num_classes must be an integer >= 2"),
        ({"num_classes": 2.5}, "num_classes must be an integer >= 2"),
        ({"atrous_rates": ()}, "non-empty sequence of positive integers"),
        ({"atrous_rates": (6, 0)}, "non-empty sequence of positive integers"),
        ({"output_stride": 32}, r"output_stride must be one of \(8, 16\)"),
        ({"backbone": "not_a_model"}, "not a timm model"),
        ({"backbone": "densenet121"}, "cannot be dilated"),
    ],
)
def test_bad_arguments_are_refused_with_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeepLabV2(**{"num_classes": 3, **SMALL, **kwargs})


def test_pretrained_offline_is_an_error_not_random_weights(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("cannot reach huggingface.co")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="pass a local weights file as `checkpoint`"):
        DeepLabV2(3, pretrained=True, **SMALL)


def test_gradient_step_on_full_size_masks_with_ignored_pixels():
    torch.manual_seed(0)
    model = DeepLabV2(3, **SMALL)
    groups = param_groups(model, 0.1, backbone_lr_scale=0.1)  # ASPP at 10x the backbone, as in DeepLab
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.1])
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.aspp.parameters()}

    optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    target = torch.randint(0, 3, (2, 64, 64))
    target[:, :8] = 255
    loss = F.cross_entropy(model(torch.rand(2, 3, 64, 64)), target, ignore_index=255)
    loss.backward()
    before = model.aspp.branches[0].weight.detach().clone()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.aspp.branches[0].weight)


def test_param_groups_validate_and_skip_frozen_backbone():
    model = DeepLabV2(3, **SMALL)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        param_groups(model, 0.0)
    model.backbone.requires_grad_(False)
    groups = param_groups(model, 0.02, backbone_lr_scale=0.05)
    assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(0.02)


def test_local_backbone_checkpoint_loads(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet10t", num_classes=10)  # a classifier's head is ignored
    path = save_checkpoint({"state_dict": source.state_dict()}, tmp_path / "resnet10t.pt")
    model = DeepLabV2(3, checkpoint=path, **SMALL)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_whole_network_checkpoint_provides_the_backbone(tmp_path):
    torch.manual_seed(2)
    trained = DeepLabV2(3, **SMALL)
    path = save_checkpoint(trained.state_dict(), tmp_path / "deeplab.pt")
    model = DeepLabV2(5, checkpoint=path, **SMALL)
    for key, value in trained.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value)


def test_checkpoint_of_another_architecture_names_the_file(tmp_path):
    path = save_checkpoint(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(InputDataError, match="resnet18.pt"):
        DeepLabV2(3, checkpoint=path, **SMALL)


def test_dilated_backbone_keeps_resolution():
    backbone = create_dilated_backbone("resnet10t", output_stride=8)
    assert backbone(torch.rand(1, 3, 64, 64))[-1].shape == (1, 512, 8, 8)


def test_default_resnet101_builds_at_stride_8():
    model = DeepLabV2(5).eval()
    assert model.output_stride == 8 and model.atrous_rates == (6, 12, 18, 24)
    assert model.backbone.feature_info.channels()[-1] == 2048
    assert sum(p.numel() for p in model.backbone.parameters()) > 40_000_000
    with torch.no_grad():
        assert model.forward_logits(torch.rand(1, 3, 64, 64)).shape == (1, 5, 8, 8)
