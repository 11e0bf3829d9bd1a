import math

import pytest
import timm
import torch

from common.errors import InputDataError
from common.io.checkpoint import save_checkpoint
from common.networks import centernet
from common.networks.centernet import CenterNet
from common.networks.param_groups import param_groups

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"backbone": "resnet18", "deconv_channels": (32, 16, 8), "head_channels": 8}


def test_resnet34_output_is_heatmap_and_offsets_at_stride_4():
    torch.manual_seed(0)
    model = CenterNet("resnet34").eval()
    with torch.no_grad():
        y = model(torch.rand(2, 3, 128, 128))
    assert y.shape == (2, 3, 32, 32)
    assert model.stride == 4


def test_non_square_input_and_heatmap_prior():
    torch.manual_seed(0)
    model = CenterNet(heatmap_prior=0.01, **SMALL).eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, 64, 96))
    assert y.shape == (1, 3, 16, 24)
    assert model.heatmap_head[-1].bias.item() == pytest.approx(-math.log(99))
    # the prior dominates the untrained heatmap; offsets start near zero
    assert torch.sigmoid(y[:, 0]).mean() < 0.05
    assert y[:, 1:].abs().max() < 0.1


def test_default_prior_bias_is_minus_2_19():
    model = CenterNet(**SMALL)
    assert model.heatmap_head[-1].bias.item() == pytest.approx(-2.1972, abs=1e-4)


def test_upsampling_starts_as_bilinear():
    block = centernet.UpsamplingBlock(4, 4)
    up = block[3]
    x = torch.ones(1, 4, 6, 6)
    # an interior pixel of a constant map stays constant under bilinear upsampling
    assert torch.allclose(up(x)[..., 2:-2, 2:-2], torch.ones(1, 4, 8, 8))


def test_input_size_must_be_a_multiple_of_32():
    model = CenterNet(**SMALL)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 3, 64, 80))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backbone": "not_a_model"}, "not a timm model"),
        ({"heatmap_prior": 0.0}, "heatmap_prior"),
        ({"deconv_channels": ()}, "deconv_channels"),
        ({"head_channels": 0}, "head_channels"),
        ({"deconv_channels": (8, 8, 8, 8, 8, 8)}, "whole output stride"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CenterNet(**{**SMALL, **kwargs})


def test_pretrained_offline_is_an_error_not_random_weights(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("cannot reach huggingface.co")

    monkeypatch.setattr(centernet.timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="pass a local weights file as `checkpoint`"):
        CenterNet("resnet18", pretrained=True)


def test_param_groups_cover_every_parameter_once_with_slower_backbone():
    model = CenterNet(**SMALL)
    groups = param_groups(model, 1e-3, 1e-4, backbone_lr_scale=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    for group in groups:
        in_backbone = {id(p) in backbone_ids for p in group["params"]}
        assert len(in_backbone) == 1
        assert group["lr"] == pytest.approx(1e-4 if in_backbone.pop() else 1e-3)
        no_decay = {p.ndim <= 1 for p in group["params"]}
        assert no_decay in ({True}, {False})
        assert group["weight_decay"] == (0.0 if no_decay.pop() else 1e-4)

    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    loss = model(torch.rand(1, 3, 64, 64)).square().mean()
    loss.backward()
    before = model.heatmap_head[0].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.heatmap_head[0].weight)


def test_local_backbone_checkpoint_loads(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet18", num_classes=10)  # a classifier's head is ignored
    path = save_checkpoint({"state_dict": source.state_dict()}, tmp_path / "resnet18.pt")
    model = CenterNet(checkpoint=path, **SMALL)
    assert torch.equal(model.backbone.state_dict()["layer4.1.conv2.weight"], source.state_dict()["layer4.1.conv2.weight"])


def test_whole_centernet_checkpoint_provides_the_backbone(tmp_path):
    torch.manual_seed(2)
    trained = CenterNet(**SMALL)
    path = save_checkpoint(trained.state_dict(), tmp_path / "centernet.pt")
    model = CenterNet(checkpoint=path, **SMALL)
    for key, value in trained.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value)


def test_checkpoint_of_another_architecture_names_the_file(tmp_path):
    path = save_checkpoint(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(InputDataError, match="resnet18.pt"):
        CenterNet("resnet34", checkpoint=path, deconv_channels=(8, 8, 8), head_channels=8)
