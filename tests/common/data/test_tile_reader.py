from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

from common.data.tile_reader import PrefetchingTileReader, TiledTiffLevel
from common.errors import InputDataError
from tests.common.data.test_wsi import slide_pixels, write_slide


def corrupt_tile(path: Path, page: int, index: int) -> tuple[int, int]:
    """Overwrite the compressed bytes of one TIFF tile with garbage; returns the tile's (row, column)."""
    with tifffile.TiffFile(path) as tif:
        tiff_page = tif.pages[page]
        offset, count = tiff_page.dataoffsets[index], tiff_page.databytecounts[index]
        across = -(-tiff_page.imagewidth // tiff_page.tilewidth)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * count)
    return divmod(index, across)


def test_tiled_tiff_level_reads_regions_decoding_each_planned_tile_once(tmp_path):
    pixels = slide_pixels(300, 200)
    path = write_slide(tmp_path / "slide.tif", pixels, levels=2, tile_size=64)
    plan = [(top, left, 96, 96) for top in range(-32, 300, 72) for left in range(-32, 200, 72)]
    padded = np.pad(pixels, ((96, 96), (96, 96), (0, 0)), constant_values=255)
    with tifffile.TiffFile(path) as tif:
        level = TiledTiffLevel(tif, 0, plan)
        held = []  # (tiles kept, bytes kept) after each region
        for top, left, height, width in plan:
            region = level.read(top, left, height, width)
            np.testing.assert_array_equal(region, padded[top + 96 : top + 96 + height, left + 96 : left + 96 + width])
            held.append((level.cached_tiles, level.cached_bytes))
        assert level.decoded == 5 * 4  # 300 x 200 in 64 px tiles, each decoded once
        assert level.cached_tiles == 0  # all released after their last planned region
        # kept tiles are cut to the rows later regions need: 24 overlapping rows of a 96 px region every
        # 72 px fall in one or two tile rows, never whole tiles across the width
        assert max(size for _, size in held) < 0.75 * max(tiles for tiles, _ in held) * 64 * 64 * 3
        np.testing.assert_array_equal(TiledTiffLevel(tif, 1).read(10, 20, 30, 40), pixels[::2, ::2][10:40, 20:60])


def test_untiled_levels_are_refused(tmp_path):
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, slide_pixels(64, 64), photometric="rgb")
    with tifffile.TiffFile(path) as tif, pytest.raises(ValueError, match="only tiled"):
        TiledTiffLevel(tif, 0)


def test_prefetching_reader_yields_in_order_from_worker_threads():
    threads: set[str] = set()

    def read(location: tuple[int, int]) -> int:
        threads.add(threading.current_thread().name)
        return location[0] * 10 + location[1]

    locations = [(y, x) for y in range(4) for x in range(5)]
    for workers in (0, 2):
        results = list(PrefetchingTileReader(read, locations, "slide.tif", workers=workers, depth=3))
        assert results == [(location, location[0] * 10 + location[1]) for location in locations]
    assert any(name.startswith("tile-reader") for name in threads)


def test_a_failed_read_names_the_slide_level_and_location():
    def read(location: tuple[int, int]) -> tuple[int, int]:
        if location == (512, 1024):
            raise ValueError("corrupt JPEG data")
        return location

    locations = [(0, 0), (512, 1024), (1024, 0)]
    reader = PrefetchingTileReader(read, locations, "/data/case7.svs", level=1, workers=2)
    seen = []
    with pytest.raises(InputDataError) as raised:
        for location, _ in reader:
            seen.append(location)
    assert seen == [(0, 0)]
    assert str(raised.value) == (
        "/data/case7.svs: tile at (y, x) = (512, 1024) of level 1 could not be read "
        "(ValueError: corrupt JPEG data)"
    )
    assert isinstance(raised.value.__cause__, ValueError)


def test_a_corrupt_tiff_tile_names_the_slide_and_location(tmp_path):
    path = write_slide(tmp_path / "slide.tif", slide_pixels(256, 256), levels=1, tile_size=64)
    row, column = corrupt_tile(path, page=0, index=6)  # tile (1, 2) of a 4 x 4 grid
    with tifffile.TiffFile(path) as tif:
        level = TiledTiffLevel(tif, 0)
        locations = [(y, x) for y in range(0, 256, 128) for x in range(0, 256, 128)]
        reader = PrefetchingTileReader(lambda loc: level.read(*loc, 128, 128), locations, path, workers=2)
        with pytest.raises(InputDataError, match=r"slide\.tif: tile at \(y, x\) = \(0, 128\) of level 0"):
            list(reader)
    assert (row, column) == (1, 2)  # inside the tile at (0, 128)
