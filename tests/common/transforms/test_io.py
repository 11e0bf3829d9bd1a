import numpy as np
import pytest
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
