"""Tests for common.networks.timm_backbone.architecture_only: networks built without their weights."""

from __future__ import annotations

import pytest
import timm.models._builder

from common.errors import InputDataError
from common.networks.timm_backbone import (
    architecture_only,
    create_timm_model,
    create_vit_backbone,
    load_backbone_weights,
)

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture
def downloads(monkeypatch) -> list[str]:
    """Names of the models whose pretrained weights timm tried to load; every try fails as offline."""
    tried: list[str] = []

    def offline(model, pretrained_cfg=None, *args, **kwargs):
        tried.append(pretrained_cfg["architecture"])
        raise OSError("cannot reach huggingface.co")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    return tried


def test_outside_the_context_pretrained_weights_are_required(downloads):
    with pytest.raises(RuntimeError, match="could not load the pretrained weights of timm model 'resnet18'"):
        create_timm_model("resnet18", pretrained=True, num_classes=2)
    assert downloads == ["resnet18"]


def test_inside_the_context_nothing_is_fetched_or_read(downloads, tmp_path):
    missing = tmp_path / "ssl_backbone.pt"
    with architecture_only():
        create_timm_model("resnet18", pretrained=True, num_classes=2)
        vit = create_vit_backbone("vit_small_patch8_224.dino", pretrained=True, checkpoint=missing, **TINY)
    assert downloads == [] and len(vit.blocks) == 2
    with pytest.raises(InputDataError, match="not found"):
        load_backbone_weights(vit, missing)


def test_context_ends_even_when_the_build_fails(downloads):
    with pytest.raises(ValueError), architecture_only():
        raise ValueError("a constructor rejected its arguments")
    with pytest.raises(RuntimeError, match="pretrained weights"):
        create_timm_model("resnet18", pretrained=True)
    assert downloads == ["resnet18"]
