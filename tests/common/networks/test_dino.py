import pytest
import torch
from torch import nn

from common.networks.dino import DINOHead, DINOModel, make_teacher
from common.networks.timm_backbone import create_vit_backbone


class CountingBackbone(nn.Module):
    """A stand-in with timm's forward_features/forward_head split that records each batch it sees."""

    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, self.num_features)
        self.batches: list[tuple[int, ...]] = []

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(tuple(x.shape))
        return x.mean(dim=(-2, -1))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.proj(x)


def test_head_outputs_are_cosines_to_unit_prototypes():
    torch.manual_seed(0)
    head = DINOHead(in_dim=16, out_dim=10, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(5, 16)
    y = head(x)
    assert y.shape == (5, 10) and y.abs().max() <= 1 + 1e-6
    embedding = nn.functional.normalize(head.mlp(x), dim=-1)
    assert torch.allclose(embedding.norm(dim=-1), torch.ones(5))
    with torch.no_grad():
        head.last_layer.weight.mul_(7.0)  # the weight-norm gain is fixed: the scale of v does not matter
    assert torch.allclose(head(x), y, atol=1e-6)


def test_head_layer_count():
    head = DINOHead(in_dim=16, out_dim=10, hidden_dim=32, bottleneck_dim=8, n_layers=3)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [type(m) for m in DINOHead(16, 10, n_layers=1).mlp] == [nn.Linear]
    with pytest.raises(ValueError, match="must be >= 1"):
        DINOHead(16, 0)


def test_crops_of_equal_size_share_one_backbone_pass():
    torch.manual_seed(0)
    backbone = CountingBackbone()
    model = DINOModel(backbone, DINOHead(4, 6, hidden_dim=8, bottleneck_dim=4))
    crops = [torch.rand(2, 3, 32, 32) for _ in range(2)] + [torch.rand(2, 3, 16, 16) for _ in range(3)]
    out = model(crops)
    assert backbone.batches == [(4, 3, 32, 32), (6, 3, 16, 16)]
    assert out.shape == (10, 6)
    one_by_one = torch.cat([model(c) for c in crops])
    assert torch.allclose(out, one_by_one, atol=1e-6)


def test_vit_embedding_is_the_cls_token():
    backbone = create_vit_backbone("vit_small_patch8_224", depth=2, embed_dim=32, num_heads=2)
    model = DINOModel(backbone, DINOHead(32, 8, hidden_dim=16, bottleneck_dim=8)).eval()
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(model.embed(x), backbone.forward_features(x)[:, 0])
        assert model([x, x[:, :, :16, :16]]).shape == (4, 8)


def test_teacher_is_a_frozen_independent_copy():
    student = DINOModel(CountingBackbone(), DINOHead(4, 6, hidden_dim=8, bottleneck_dim=4))
    teacher = make_teacher(student)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for (name, s), t in zip(student.named_parameters(), teacher.parameters()):
        assert torch.equal(s, t) and s.data_ptr() != t.data_ptr(), name
