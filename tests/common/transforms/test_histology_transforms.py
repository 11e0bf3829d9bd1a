from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from common.data.histopathology import write_mask
from common.errors import InputDataError
from common.transforms.histology import LoadHistologyImaged, LoadIndexMaskd


def test_rgb_patch_becomes_channel_first_float_in_height_width_order(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    path = tmp_path / "patch-[1 0 0 1].png"
    Image.fromarray(pixels).save(path)
    out = LoadHistologyImaged("image")({"image": str(path), "label": [1, 0, 0, 1]})
    image = out["image"]
    assert image.shape == (3, 12, 20) and image.dtype == torch.float32
    np.testing.assert_array_equal(image.numpy(), pixels.transpose(2, 0, 1).astype(np.float32))
    assert image.meta["filename_or_obj"] == str(path) and out["label"] == [1, 0, 0, 1]


def test_grey_and_rgba_patches_become_three_channels(tmp_path):
    grey = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    rgba = np.random.default_rng(1).integers(0, 256, (12, 20, 4), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    out = LoadHistologyImaged(["a", "b"])({"a": str(tmp_path / "grey.png"), "b": str(tmp_path / "rgba.png")})
    assert all((out["a"][c].numpy() == grey).all() for c in range(3))
    np.testing.assert_array_equal(out["b"].numpy(), rgba[..., :3].transpose(2, 0, 1))


def test_unreadable_patch_is_named(tmp_path):
    with pytest.raises(InputDataError, match="absent.png: patch file not found"):
        LoadHistologyImaged("image")({"image": str(tmp_path / "absent.png")})
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(InputDataError, match="cut.png: not a readable patch image"):
        LoadHistologyImaged("image")({"image": str(tmp_path / "cut.png")})


def test_index_mask_keeps_the_patch_orientation_and_the_ignore_value(tmp_path):
    mask = np.full((12, 20), 4, dtype=np.uint8)
    mask[2:5, 3:15] = 1
    mask[-1, -1] = 255
    path = write_mask(tmp_path / "mask.png", mask)
    loaded = LoadIndexMaskd("mask", num_classes=4)({"mask": str(path)})["mask"]
    assert loaded.shape == (1, 12, 20) and loaded.dtype == torch.uint8
    np.testing.assert_array_equal(loaded[0].numpy(), mask)
    assert loaded.meta["filename_or_obj"] == str(path)


def test_index_mask_refuses_colour_masks_and_values_beyond_the_classes(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(InputDataError, match="rgb.png: mask is a RGB image"):
        LoadIndexMaskd("mask", 4)({"mask": str(tmp_path / "rgb.png")})
    path = write_mask(tmp_path / "five.png", np.full((4, 4), 5, dtype=np.uint8), num_classes=5)
    with pytest.raises(InputDataError, match=r"five.png: mask holds values 5 outside 0\.\.4"):
        LoadIndexMaskd("mask", 4)({"mask": str(path)})
    with pytest.raises(ValueError, match="num_classes"):
        LoadIndexMaskd("mask", 0)
