from __future__ import annotations

import csv
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy import ndimage
from skimage.draw import disk

from common.data.distance_map import normalized_distance_map
from common.errors import InputDataError
from common.inferers.band_merger import BandMerger, tile_positions
from common.inferers.wsi_cells import CELL_COLUMNS, WholeSlideCellSegmenter, _mirror_past_edge
from common.postprocessing.band_watershed import WATERSHED_BYTES_PER_PIXEL, BandWatershed
from common.postprocessing.watershed import distance_map_watershed
from tests.common.data.test_tile_reader import corrupt_tile
from tests.common.data.test_wsi import write_slide

pytestmark = pytest.mark.usefixtures("one_thread")

SCALE = 2**24  # a map value k / 2**24 travels exactly in the 24 bits of an RGB pixel


def random_cells(
    height: int, width: int, count: int, seed: int = 0, radii: tuple[int, int] = (4, 12)
) -> np.ndarray:
    """Overlapping disks, some cut by the image's border: touching cells of all shapes."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), np.int32)
    for index in range(1, count + 1):
        centre = (rng.integers(-5, height + 5), rng.integers(-5, width + 5))
        labels[disk(centre, rng.integers(*radii), shape=labels.shape)] = index
    return labels


def tie_free_map(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """The normalised distance map with a little noise, so no two pixels tie in the watershed's flooding
    order (with ties, which of two touching cells takes a tied pixel depends on the order pixels were
    queued in, which no band-wise run can reproduce), quantised to multiples of 2**-24: averaging 1, 2 or
    4 copies of such a value is exact."""
    noise = np.random.default_rng(seed).uniform(0, 1e-3, labels.shape)
    values = np.clip(normalized_distance_map(labels) * 0.998 + noise, 0, 1 - 1 / SCALE)
    return (np.round(values * SCALE) / SCALE).astype(np.float32)


def encode(distance: np.ndarray) -> np.ndarray:
    """The map as an RGB slide: 24 bits per pixel, high byte in red."""
    value = np.round(distance.astype(np.float64) * SCALE).astype(np.int64)
    return np.stack([value >> 16, (value >> 8) & 255, value & 255], axis=-1).astype(np.uint8)


def decoding_network(batch: torch.Tensor) -> torch.Tensor:
    """A fake network that returns exactly the distance map the tile's pixels encode."""
    return ((batch[:, 0:1] * 65536 + batch[:, 1:2] * 256 + batch[:, 2:3]) / SCALE).float()


def in_raster_order(labels: np.ndarray) -> np.ndarray:
    """Instances renumbered 1..n in raster order of their first pixel, as the band watershed numbers them."""
    flat = labels.ravel()
    nonzero = np.flatnonzero(flat)
    unique, first = np.unique(flat[nonzero], return_index=True)
    ids = np.zeros(int(labels.max()) + 1, np.uint32)
    ids[unique[np.argsort(first)]] = np.arange(1, len(unique) + 1)
    return ids[labels]


def push_in_blocks(distance: np.ndarray, band: BandWatershed, seed: int = 1) -> None:
    rng, top = np.random.default_rng(seed), 0
    while top < len(distance):
        rows = int(rng.integers(1, 90))
        band.push(distance[top : top + rows])
        top += rows
    band.finish()


@pytest.mark.parametrize("smooth_sigma", [0.0, 1.5])
def test_band_watershed_equals_the_whole_map_watershed(smooth_sigma):
    """Bands of 64 rows with a 32-row margin, rows pushed in blocks of any height: the instances, their
    ids (raster order) and the cell table are those of one watershed over the whole map."""
    labels = random_cells(700, 300, 400)
    distance = tie_free_map(labels)
    reference = in_raster_order(distance_map_watershed(distance, 0.5, 0.05, 0, smooth_sigma))
    written, tables = [], []
    band = BandWatershed(
        700,
        300,
        lambda top, rows: written.append((top, rows.copy())),
        tables.append,
        0.5,
        0.05,
        0,
        smooth_sigma,
        32,
        64,
    )
    push_in_blocks(distance, band)
    assert [top for top, _ in written] == [0, *np.cumsum([len(rows) for _, rows in written])[:-1]]
    result = np.concatenate([rows for _, rows in written])
    assert result.dtype == np.uint32 and band.cells == reference.max() > 300 and band.cut_cells == 0
    np.testing.assert_array_equal(result, reference)
    table = {name: np.concatenate([t[name] for t in tables]) for name in tables[0]}
    np.testing.assert_array_equal(table["id"], np.arange(1, band.cells + 1))
    np.testing.assert_array_equal(table["area"], np.bincount(reference.ravel())[1:])
    boxes = ndimage.find_objects(reference.astype(np.int32))
    np.testing.assert_array_equal(table["bbox_min_y"], [b[0].start for b in boxes])
    np.testing.assert_array_equal(table["bbox_max_x"], [b[1].stop for b in boxes])
    centres = ndimage.center_of_mass(reference > 0, reference, np.arange(1, band.cells + 1))
    np.testing.assert_allclose(np.stack([table["centroid_y"], table["centroid_x"]], 1), centres, atol=1e-9)


def test_a_cell_taller_than_the_margin_is_cut_and_counted():
    labels = np.zeros((200, 40), np.int32)
    labels[20:120, 10:30] = 1  # 100 rows tall, band 40 + margin 16
    distance = normalized_distance_map(labels)
    written = []
    band = BandWatershed(
        200, 40, lambda top, rows: written.append(rows), lambda cells: None, 0.5, 0.05, 0, 0.0, 16, 40
    )
    push_in_blocks(distance, band)
    result = np.concatenate(written)
    assert band.cut_cells >= 1 and band.cells >= 1
    assert set(np.unique(result[labels == 1])) - {0} == set(range(1, band.cells + 1))  # parts, no overlap


def test_band_watershed_memory_is_bounded_by_its_formula_not_the_height():
    """tracemalloc's peak stays under the docstring's formula and is the same for a map four times taller."""
    width, margin, band_rows, pushed = 600, 32, 128, 100
    peaks = []
    for height in (600, 600, 2400):
        distance = tie_free_map(random_cells(height, width, height * width // 250, seed=height))
        tracemalloc.start()
        band = BandWatershed(
            height, width, lambda top, rows: None, lambda cells: None, 0.5, 0.05, 0, 0.0, margin, band_rows
        )
        for top in range(0, height, pushed):
            band.push(distance[top : top + pushed])
        band.finish()
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    bound = width * (band_rows + margin) * WATERSHED_BYTES_PER_PIXEL + 4 * width * (
        band_rows + 2 * margin + pushed
    )
    assert max(peaks) <= bound and band.peak_bytes <= bound, (peaks, bound)
    assert abs(peaks[2] - peaks[1]) < 0.1 * peaks[1], peaks


def test_merger_hands_on_averaged_rows():
    """``average_rows``: the final rows are the mean of the overlapping tiles' maps, 0 where no kept tile
    covers a pixel."""
    shape, patch, step = (50, 40), (20, 20), (15, 15)
    rows, cols = (tile_positions(n, p, s) for n, p, s in zip(shape, patch, step))
    rng = np.random.default_rng(0)
    sums, counts = np.zeros((1, 60, 60), np.float64), np.zeros((60, 60))
    written = []
    merger = BandMerger(
        shape, patch, rows, cols, 1, 0, lambda top, maps: written.append(maps), average_rows=True
    )
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            if (i, j) == (0, 0):
                continue  # skipped: its pixels that no other tile covers stay 0
            tile = rng.random((1, *patch)).astype(np.float32)
            merger.add(i, j, tile)
            sums[:, top : top + 20, left : left + 20] += tile
            counts[top : top + 20, left : left + 20] += 1
    merger.finish()
    result = np.concatenate(written, axis=1)
    expected = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)[:, :50, :40]
    assert result.dtype == np.float32 and result.shape == (1, 50, 40)
    np.testing.assert_allclose(result, expected, rtol=1e-6)
    assert (result[0, :15, :15] == 0).all() and merger.class_pixels.sum() == 0
    with pytest.raises(ValueError, match="average_rows needs maps at full resolution"):
        BandMerger((16, 16), (8, 8), [0, 8], [0, 8], 1, 0, lambda *a: None, stride=2, average_rows=True)


def test_the_part_of_a_tile_past_the_slide_edge_is_mirrored():
    """Past the slide's edge a tile reads white glass, which a fluorescence network would see as a bright
    cell: it is replaced by the mirror image of the part inside, as the bundle's sliding window pads."""
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    expected = images.clone()
    _mirror_past_edge(images, [(0, 0), (8, 6)], (11, 8))  # the second tile: 3 rows and 2 columns inside
    np.testing.assert_array_equal(images[0], expected[0])
    np.testing.assert_array_equal(images[1], expected[1][:, [0, 1, 2, 1]][:, :, [0, 1, 0, 1]])


@pytest.fixture(scope="module")
def cell_slide(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A 900 x 700 slide of cells (some cut by its border) encoding a known distance map, in 128 px TIFF
    tiles with 3 levels, and the whole-map watershed of that map."""
    root = tmp_path_factory.mktemp("cells")
    distance = tie_free_map(random_cells(900, 700, 600))
    slide = write_slide(root / "cells.tif", encode(distance), levels=3)
    reference = in_raster_order(distance_map_watershed(distance, 0.5, 0.05))
    return slide, distance, reference


def segment(slide: Path, output_dir: Path, **settings) -> dict:
    settings = {"patch_size": 128, "overlap": 0.25, "max_cell_size": 32, "band_rows": 64, "tile_size": 128,
                "thumbnail_size": 256, **settings}  # fmt: skip
    return WholeSlideCellSegmenter(decoding_network, output_dir, **settings)(slide)


def test_instances_of_a_slide_equal_the_whole_image_watershed(cell_slide, tmp_path):
    """Tiles of 128 px with 32 px overlap, bands of 64 rows: cells that straddle tile and band boundaries
    (and the slide's border) are each found once with their whole area; the instances are those of one
    watershed over the whole map; the outputs are complete."""
    slide, _, reference = cell_slide
    summary = segment(slide, tmp_path / "out")
    instances = tifffile.imread(summary["outputs"]["instances"])
    assert instances.dtype == np.uint32
    np.testing.assert_array_equal(instances, reference)
    assert summary["cells"] == reference.max() > 500 and summary["cells_reaching_the_margin"] == 0
    assert summary["tiles"] == {"processed": 10 * 7, "skipped": 0}
    # straddling cells: the cell over the tile corner at (96, 96) and the band boundary at row 64
    for y, x in [(96, 96), (64, 300), (899, 350), (450, 699)]:
        if reference[y, x]:
            assert (instances == instances[y, x]).sum() == (reference == reference[y, x]).sum()
    with open(summary["outputs"]["cells"]) as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CELL_COLUMNS and len(rows) == summary["cells"]
    areas = np.bincount(reference.ravel())[1:]
    assert [int(row["area"]) for row in rows] == areas.tolist()
    assert float(rows[0]["area_um2"]) == pytest.approx(areas[0] * 0.25)  # 0.5 µm/px
    with tifffile.TiffFile(summary["outputs"]["instances"]) as tif:
        shapes = [page.shape for page in tif.pages]
        np.testing.assert_array_equal(tif.pages[1].asarray(), reference[::2, ::2])
        assert tif.pages[0].tags["XResolution"].value == (20000, 1)
    assert shapes == [(900, 700), (450, 350), (225, 175), (113, 88)]
    overlay = np.asarray(Image.open(summary["outputs"]["overlay"]))
    assert overlay.shape == (256, 199, 3)
    written = json.loads(Path(summary["outputs"]["summary"]).read_text())
    assert written["cells"] == summary["cells"] and written["peak_bytes"]["band_watershed"] > 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "cells_cells.csv", "cells_instances.tif", "cells_overlay.png", "cells_summary.json"
    ]  # fmt: skip


def test_memory_held_does_not_grow_with_the_slide_height(tmp_path):
    """tracemalloc's peak for a slide four times taller and as wide is about the same (the thumbnail is
    read from a level no larger than it, whatever the height)."""
    slides = {}
    for repeats in (2, 8):
        distance = tie_free_map(random_cells(256 * repeats, 512, 300 * repeats, seed=repeats))
        slides[repeats] = write_slide(tmp_path / f"slide_{repeats}.tif", encode(distance), levels=4)
    peaks = []
    for repeats in (2, 2, 8):
        tracemalloc.start()
        segment(slides[repeats], tmp_path / f"out_{len(peaks)}", workers=0, thumbnail_size=64)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[2] - peaks[1] < 0.05 * peaks[1], peaks


def test_a_corrupt_tile_names_the_slide_and_location_and_writes_nothing(cell_slide, tmp_path):
    slide = tmp_path / "broken.tif"
    slide.write_bytes(cell_slide[0].read_bytes())
    corrupt_tile(slide, page=0, index=2 * 6 + 3)  # rows 256..383, columns 384..511
    with pytest.raises(InputDataError, match=r"broken\.tif: tile at \(y, x\) = \(\d+, \d+\) of level 0"):
        segment(slide, tmp_path / "out", workers=0)
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_settings_are_named(tmp_path):
    for bad, message in [
        ({"cells_max": 0.1, "cell_fill": 0.2}, "0 <= cell_fill < cells_max <= 1"),
        ({"max_cell_size": 0}, "max_cell_size must be an integer at least 1"),
        ({"tile_size": 100}, "tile_size must be a positive multiple of 16"),
        ({"level": 0, "mpp": 0.5}, "either level or mpp"),
        ({"min_tissue_fraction": -1}, r"min_tissue_fraction must be in \[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            WholeSlideCellSegmenter(decoding_network, tmp_path, **bad)
