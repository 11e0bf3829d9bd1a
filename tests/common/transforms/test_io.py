import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import InputDataError
from common.transforms.io import LoadCellImaged


def test_grayscale_png_becomes_three_channel_float_with_its_file_name(tmp_path):
    pixels = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)
    path = tmp_path / "cells.png"
    Image.fromarray(pixels).save(path)
    image = LoadCellImaged("image")({"image": str(path)})["image"]
    assert image.shape == (3, 12, 16) and image.dtype.is_floating_point
    assert all((image[c].numpy() == pixels).all() for c in range(3))
    assert image.meta["filename_or_obj"] == str(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(InputDataError, match="absent.png"):
        LoadCellImaged("image")({"image": str(tmp_path / "absent.png")})


def test_binary_mask_keeps_the_image_orientation(tmp_path):
    from common.transforms.io import LoadBinaryMaskd

    mask = np.zeros((12, 16), dtype=np.uint8)
    mask[2:5, 3:11] = 255
    path = tmp_path / "lesion_segmentation.png"
    Image.fromarray(mask).save(path)
    loaded = LoadBinaryMaskd("mask")({"mask": str(path)})["mask"]
    assert loaded.shape == (1, 12, 16) and loaded.dtype == torch.uint8
    assert (loaded[0].numpy() == (mask > 0)).all()


def test_non_binary_mask_is_refused(tmp_path):
    from common.transforms.io import LoadBinaryMaskd

    path = tmp_path / "soft.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(path)
    with pytest.raises(InputDataError, match="soft.png"):
        LoadBinaryMaskd("mask")({"mask": str(path)})
