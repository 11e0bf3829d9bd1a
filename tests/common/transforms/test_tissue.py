import numpy as np
import pytest
import torch

from common.inferers.wsi import TissueFilter
from common.transforms.tissue import tissue_fraction, tissue_mask

GLASS, PINK, DEBRIS, STROMA, WHITE, BLACK = (240, 240, 240), (230, 160, 200), (100, 100, 100), (240, 200, 225), (255, 255, 255), (5, 5, 5)


def test_tissue_mask_separates_glass_and_black_from_stained_tissue():
    pixels = np.array([[GLASS, PINK, DEBRIS, STROMA, WHITE, BLACK]], np.uint8)
    # glass, eosin pink, dark grey debris (grey but not bright), pale stroma (bright but pink), pure white,
    # a black scanner border
    expected = [[False, True, True, True, False, False]]
    np.testing.assert_array_equal(tissue_mask(pixels), expected)
    channel_first = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)
    np.testing.assert_array_equal(tissue_mask(channel_first), expected)
    # a higher saturation threshold turns the pale stroma (saturation 0.17) into glass
    assert not tissue_mask(pixels, saturation_threshold=0.2)[0, 3]
    assert tissue_mask(pixels, black_threshold=0.0)[0, 5]
    with pytest.raises(ValueError, match=r"image must be RGB, .* got shape \(4, 5\)$"):
        tissue_mask(np.zeros((4, 5)))
    with pytest.raises(ValueError, match="image values must lie in 0..255"):
        tissue_mask(np.full((2, 2, 3), -1.5))  # an intensity-normalised image
    with pytest.raises(ValueError, match="black_threshold must lie in 0..1"):
        tissue_mask(pixels, black_threshold=2)


def test_tile_filter_and_pixel_mask_decide_alike():
    """One definition: the share of tissue a tile filter sees is the share of the pixel mask."""
    rng = np.random.default_rng(0)
    colours = np.array([GLASS, PINK, DEBRIS, STROMA, WHITE, BLACK], np.uint8)
    tile = colours[rng.integers(0, len(colours), (32, 32))]
    channel_first = torch.from_numpy(tile).permute(2, 0, 1)
    expected = tissue_mask(tile).mean()
    assert TissueFilter().tissue_fraction(channel_first[None]) == pytest.approx(expected)
    assert tissue_fraction(channel_first) == pytest.approx(expected)
    with pytest.raises(ValueError, match="saturation_threshold must lie in 0..1"):
        TissueFilter(saturation_threshold=-0.1)
