from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data.utils import iter_patch_position

from common.data.wsi import open_slide
from common.errors import InputDataError
from common.inferers.slide_tiles import SlideTileStream, check_overlap, check_patch_size, slide_thumbnail
from tests.common.data.test_tile_reader import corrupt_tile
from tests.common.data.test_wsi import slide_pixels, write_slide

GLASS = (255, 255, 255)


def half_glass(height: int = 512, width: int = 384) -> np.ndarray:
    """Random tissue-like colours on the right, glass on the left 128 columns."""
    pixels = slide_pixels(height, width)
    pixels[:, :128] = GLASS
    return pixels


def test_grid_places_tiles_as_monai_splitter():
    """Steps of round(patch * (1 - overlap)), the end padded so that the last tile reaches past it, as
    MONAI's WSISlidingWindowSplitter does; no tile lies wholly in the padding."""
    rows, cols = SlideTileStream(patch_size=(96, 128), overlap=0.25).grid((300, 500))
    for starts, size, patch, step in [(rows, 300, 96, 72), (cols, 500, 128, 96)]:
        padded = size + (patch - size) % step
        assert starts == [p[0] for p in iter_patch_position((padded,), (patch,), overlap=patch - step)]
        assert starts[-1] < size <= starts[-1] + patch
    assert SlideTileStream(patch_size=64, overlap=16).grid((100, 64)) == ([0, 48], [0])


def test_batches_come_in_raster_order_skip_glass_and_hold_the_pixels(tmp_path):
    pixels = half_glass()
    slide_path = write_slide(tmp_path / "slide.tif", pixels, levels=3)
    stream = SlideTileStream(patch_size=128, overlap=0, batch_size=3, min_tissue_fraction=0.5, workers=2)
    with open_slide(slide_path) as slide:
        seen = []
        for batch in stream.batches(slide, 0):
            assert batch.images.shape[1:] == (3, 128, 128) and batch.images.dtype == torch.float32
            for (i, j), (top, left), image, flags in zip(
                batch.indices, batch.origins, batch.images, batch.tissue
            ):
                assert (top, left) == (128 * i, 128 * j) and flags is None
                expected = pixels[top : top + 128, left : left + 128].transpose(2, 0, 1)
                np.testing.assert_array_equal(image.numpy(), expected)
                seen.append((i, j))
    assert seen == [(i, j) for i in range(4) for j in (1, 2)]  # column 0 is glass, never read
    assert (stream.processed, stream.skipped) == (8, 4)


def test_on_the_cpu_batches_reuse_one_buffer_and_preprocess_tile_by_tile(tmp_path):
    slide_path = write_slide(tmp_path / "slide.tif", slide_pixels(256, 256), levels=1)
    shapes = []

    def preprocess(batch: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(batch.shape))
        return batch / 255.0

    stream = SlideTileStream(
        patch_size=128, overlap=0, batch_size=2, min_tissue_fraction=0, preprocess=preprocess
    )
    with open_slide(slide_path) as slide:
        pointers = [batch.images.data_ptr() for batch in stream.batches(slide, 0)]
        assert len(set(pointers)) == 1 and len(pointers) == 2
    assert shapes == [(1, 3, 128, 128)] * 4


def test_tiles_screened_as_read_channels_last_with_tissue_flags(tmp_path):
    pixels = half_glass(256, 256)
    pixels[:, 128:192] = GLASS  # the right column of tiles is half glass
    slide_path = write_slide(tmp_path / "slide.tif", pixels, levels=1)  # no low level: tiles screened as read
    stream = SlideTileStream(patch_size=128, overlap=0, channels_last=True, tissue_flags=True, workers=0)
    with open_slide(slide_path) as slide:
        (batch,) = list(stream.batches(slide, 0))
    assert batch.indices == [(0, 1), (1, 1)] and (stream.processed, stream.skipped) == (2, 2)
    assert batch.images.shape == (2, 3, 128, 128)
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(batch.images[1].permute(1, 2, 0).numpy(), pixels[128:, 128:])
    assert not batch.tissue[0][:, :64].any() and batch.tissue[0][:, 64:].mean() > 0.9


def test_a_corrupt_tile_names_the_slide_and_location(tmp_path):
    slide_path = write_slide(tmp_path / "slide.tif", slide_pixels(384, 384), levels=1)
    corrupt_tile(slide_path, page=0, index=1 * 3 + 2)  # rows 128..255, columns 256..383
    stream = SlideTileStream(patch_size=128, overlap=0, min_tissue_fraction=0)
    with (
        open_slide(slide_path) as slide,
        pytest.raises(InputDataError, match=r"slide\.tif: tile at \(y, x\) = \(128, 256\) of level 0"),
    ):
        list(stream.batches(slide, 0))


def test_thumbnail_is_the_slide_shrunk(tmp_path):
    pixels = np.zeros((256, 128, 3), np.uint8)
    pixels[:128] = 200
    slide_path = write_slide(tmp_path / "slide.tif", pixels, levels=2)
    with open_slide(slide_path) as slide:
        thumbnail = slide_thumbnail(slide, 64)
    assert thumbnail.shape == (64, 32, 3) and (thumbnail[:32] == 200).all() and (thumbnail[32:] == 0).all()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="patch_size must be a positive integer"):
        check_patch_size((0, 4))
    with pytest.raises(ValueError, match=r"an overlap in pixels must be in \[0, 64\)"):
        check_overlap(64, (64, 64))
    with pytest.raises(ValueError, match=r"min_tissue_fraction must be in \[0, 1\]"):
        SlideTileStream(min_tissue_fraction=1.5)
    with pytest.raises(ValueError, match="workers must be an integer at least 0"):
        SlideTileStream(workers=-1)
    with pytest.raises(ValueError, match="leaves no step"):
        SlideTileStream(patch_size=4, overlap=0.9).grid((10, 10))
