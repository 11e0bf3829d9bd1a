import numpy as np
import pytest
import torch
from PIL import Image

from common.writers.display import display_rgb, golden_ratio_colours, write_png


def test_photographs_keep_their_range_and_other_ranges_are_stretched():
    np.testing.assert_array_equal(display_rgb(np.full((4, 5, 3), 0.5)), 128)  # [0, 1] floats
    grey = np.full((4, 5, 3), 77, np.uint8)
    np.testing.assert_array_equal(display_rgb(grey), grey)
    normalised = torch.linspace(-2, 2, 3 * 4 * 5).reshape(3, 4, 5)
    rgb = display_rgb(normalised)
    assert rgb.shape == (4, 5, 3) and rgb.min() == 0 and rgb.max() == 255


def test_stretch_shows_a_dim_fluorescence_image_and_16_bit_images():
    dim = np.zeros((1, 6, 6), np.float32)
    dim[0, 2:4, 2:4] = 0.05
    assert display_rgb(dim).max() == 13  # 0.05 of the 0..1 range
    assert display_rgb(dim, stretch=True).max() == 255
    sixteen = np.arange(36, dtype=np.uint16).reshape(6, 6) * 1000
    assert display_rgb(sixteen).max() == 255 and display_rgb(sixteen)[0, 0, 0] == 0


def test_channel_layouts():
    assert display_rgb(np.zeros((6, 7))).shape == (6, 7, 3)
    two = display_rgb(np.stack([np.ones((6, 7)), np.zeros((6, 7))]), stretch=True)
    assert two.shape == (6, 7, 3) and (two[..., 2] == 0).all()
    assert display_rgb(np.zeros((6, 7, 4), np.uint8)).shape == (6, 7, 3)
    with pytest.raises(ValueError, match=r"got \(5, 6, 7, 8\)"):
        display_rgb(np.zeros((5, 6, 7, 8)))


def test_golden_ratio_colours_are_distinct_neighbours(tmp_path):
    colours = golden_ratio_colours(12)
    assert colours.shape == (12, 3) and colours.min() >= 0 and colours.max() <= 255
    assert (np.abs(np.diff(colours, axis=0)).max(axis=1) > 40).all()
    path = write_png(colours.astype(np.uint8)[None], tmp_path / "c.png")
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.asarray(image)[0], colours.astype(np.uint8))
