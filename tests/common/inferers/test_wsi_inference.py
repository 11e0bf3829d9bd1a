from __future__ import annotations

import itertools
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from monai.bundle import ConfigParser
from monai.inferers import sliding_window_inference
from monai.utils import optional_import
from PIL import Image
from scipy import ndimage

from common.data.histopathology import mask_palette
from common.data.tile_reader import TiledTiffLevel
from common.data.wsi import write_pyramid_tiff
from common.errors import InputDataError
from common.inferers.wsi import (
    TissueFilter,
    WholeSlideSegmenter,
    _softmax,
    _StreamedClassMap,
    _strips,
    mode_pool2,
    segment_slide,
)
from tests.common.data.test_tile_reader import corrupt_tile
from tests.common.data.test_wsi import slide_pixels, write_slide, write_svs

BACKGROUND = 4  # five output channels: tissue classes 0..3, background 4
RED, BLUE, GLASS = (200, 60, 60), (60, 60, 200), (255, 255, 255)

pytestmark = pytest.mark.usefixtures("one_thread")


def colour_network() -> torch.nn.Conv2d:
    """Per pixel: the strongest of R, G, B is class 0, 1 or 2 (classes 3 and 4 never win). Each pixel's
    scores ignore its neighbours, so every window and any blending agree on it: the class map is known."""
    network = torch.nn.Conv2d(3, 5, kernel_size=1)
    with torch.no_grad():
        network.weight.copy_(torch.eye(5, 3)[:, :, None, None])
        network.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -10.0, -10.0]))
    return network


def conv_network() -> torch.nn.Module:
    """Two 3x3 convolutions with zero padding: near a window's edge its scores differ from those the same
    pixel gets in the middle of another window, so the result depends on where windows fall and how
    overlapping windows are blended."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 5, 3, padding=1)
    )


def centre(batch: torch.Tensor) -> torch.Tensor:
    return batch / 255.0 - 0.5


def glass_red_blue(height: int = 1024, width: int = 768, glass_columns: int = 256) -> np.ndarray:
    """Glass on the left; on the right, red above row ``height / 2`` and blue below."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:, :glass_columns] = GLASS
    pixels[: height // 2, glass_columns:] = RED
    pixels[height // 2 :, glass_columns:] = BLUE
    return pixels


def expected_classes(height: int = 1024, width: int = 768, glass_columns: int = 256) -> np.ndarray:
    classes = np.full((height, width), BACKGROUND, np.uint8)
    classes[: height // 2, glass_columns:] = 0
    classes[height // 2 :, glass_columns:] = 2
    return classes


def read_levels(path: str | Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [page.asarray() for page in tif.pages]


@pytest.fixture(scope="module")
def known_run(tmp_path_factory):
    """The colour network over glass | red/blue at level 0, 256 px tiles without overlap: the left column
    of tiles is bare glass and skipped, every other tile is pure colour."""
    root = tmp_path_factory.mktemp("known")
    pixels = glass_red_blue()
    slide = write_slide(root / "known.tif", pixels)
    summary = segment_slide(
        slide, colour_network(), root / "out", 5, patch_size=256, overlap=0, tile_size=256, thumbnail_size=256
    )
    return pixels, summary, root / "out"


def test_matches_sliding_window_inference_on_the_full_image(tmp_path):
    """Streaming from the file with PatchInferer + ZarrAvgMerger equals MONAI's in-memory
    sliding_window_inference with the same windows and plain averaging. 512x384 in 128 px windows
    every 64 px fits exactly (no padding), so both place the same windows; with a 3x3-conv network
    the scores at window edges differ between windows, so the equality checks the windows and the
    blending, not just the network (see the last assertion)."""
    pixels = slide_pixels(512, 384)
    network = conv_network()
    summary = segment_slide(
        write_slide(tmp_path / "slide.tif", pixels),
        network,
        tmp_path / "out",
        5,
        patch_size=128,
        overlap=0.5,
        min_tissue_fraction=0.0,
        batch_size=4,
        preprocess=centre,
        keep_probabilities=True,
        tile_size=128,
    )
    image = centre(torch.from_numpy(pixels).permute(2, 0, 1)[None].float())

    def reference(overlap: float) -> torch.Tensor:
        def probabilities(x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(network(x), dim=1)

        with torch.no_grad():
            merged = sliding_window_inference(image, (128, 128), 4, probabilities, overlap, mode="constant")
        return merged[0]

    expected = reference(0.5)
    probabilities = zarr.open_array(summary["outputs"]["probabilities"], mode="r")
    assert probabilities.shape == (1, 5, 512, 384)
    np.testing.assert_allclose(probabilities[0], expected.numpy(), atol=1e-6)
    classes = read_levels(summary["outputs"]["classes"])[0]
    np.testing.assert_array_equal(classes, expected.argmax(0).numpy())
    assert summary["tiles"] == {"processed": 7 * 5, "skipped": 0}
    assert (reference(0.0).argmax(0) != expected.argmax(0)).any()  # where windows fall does matter


def test_skipped_tiles_are_background_not_class_0(tmp_path):
    """A network answering class 0 everywhere, even on glass. Windows of 256 px every 128 px: those at
    x=0 see only glass and are skipped; the ones at x=128 are half tissue and kept. Columns 0..127 are
    covered by skipped windows only and must come out as background; columns 128..255 are glass too,
    but a kept window covers them, so they take its answer."""
    network = torch.nn.Conv2d(3, 5, kernel_size=1)
    with torch.no_grad():
        network.weight.zero_()
        network.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))
    slide = write_slide(tmp_path / "slide.tif", glass_red_blue())
    summary = segment_slide(slide, network, tmp_path / "out", 5, patch_size=256, overlap=0.5, tile_size=256)
    classes = read_levels(summary["outputs"]["classes"])[0]
    assert (classes[:, :128] == BACKGROUND).all() and (classes[:, 128:] == 0).all()
    assert summary["tiles"] == {"processed": 7 * 4, "skipped": 7}


def disc_on_blue(size: int = 512, glass_columns: int = 96) -> np.ndarray:
    """Glass on the left, then blue tissue with a red disc: curved class boundaries."""
    yy, xx = np.mgrid[:size, :size]
    pixels = np.where(((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2)[..., None], RED, BLUE)
    pixels[:, :glass_columns] = GLASS
    return pixels.astype(np.uint8)


def test_blending_at_the_output_stride_agrees_with_full_resolution_blending(tmp_path):
    """A stride-8 network (the colour network's scores averaged over 8x8 blocks) on a red disc in blue
    tissue: blending at its output stride, the default, and at full resolution give class maps that
    differ only along the disc's edge, on under 0.5% of the pixels, with per-class areas within 0.2%;
    glass stays background in both (``mask_glass``). Tiles whose step is no multiple of 8 fall back to
    full-resolution blending."""
    network = torch.nn.Sequential(colour_network(), torch.nn.AvgPool2d(8))
    slide = write_slide(tmp_path / "disc.tif", disc_on_blue())
    settings = {"patch_size": 128, "tile_size": 128, "mask_glass": True, "min_tissue_fraction": 0.0}
    runs = {
        blend: segment_slide(slide, network, tmp_path / blend, 5, overlap=0.25, blend=blend, **settings)
        for blend in ("output_stride", "full")
    }
    assert runs["output_stride"]["blend"] == {"mode": "output_stride", "stride": 8}
    assert runs["full"]["blend"] == {"mode": "full", "stride": 1}
    strided, full = (read_levels(run["outputs"]["classes"])[0] for run in runs.values())
    differ = strided != full
    assert 0 < differ.mean() <= 0.005
    edge = np.zeros_like(differ)
    edge[:-1] |= full[:-1] != full[1:]
    edge[:, :-1] |= full[:, :-1] != full[:, 1:]
    assert ndimage.binary_dilation(edge, iterations=8)[differ].all()  # only along class boundaries
    for name in ("class 0", "class 2", "background"):
        pixels = [run["classes"][name]["pixels"] for run in runs.values()]
        assert abs(pixels[0] - pixels[1]) <= 0.002 * full.size
    assert (full[:, :96] == BACKGROUND).all() and (strided[:, :96] == BACKGROUND).all()
    fallback = segment_slide(slide, network, tmp_path / "fallback", 5, overlap=28, **settings)  # step 100
    assert fallback["blend"] == {"mode": "output_stride", "stride": 1}


def test_mask_glass_labels_glass_in_kept_tiles_as_background(tmp_path):
    """The class-0-everywhere network of the test above: with ``mask_glass`` the glass columns of the
    kept windows (128..255) become background too, read from the slide pixel by pixel."""
    network = torch.nn.Conv2d(3, 5, kernel_size=1)
    with torch.no_grad():
        network.weight.zero_()
        network.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))
    slide = write_slide(tmp_path / "slide.tif", glass_red_blue())
    summary = segment_slide(
        slide, network, tmp_path / "out", 5, patch_size=256, overlap=0.5, tile_size=256, mask_glass=True
    )
    classes = read_levels(summary["outputs"]["classes"])[0]
    assert (classes[:, :256] == BACKGROUND).all() and (classes[:, 256:] == 0).all()


def test_a_slide_of_bare_glass_is_all_background(tmp_path):
    slide = write_slide(tmp_path / "glass.tif", np.full((300, 200, 3), 255, np.uint8), levels=1)
    summary = segment_slide(
        slide, colour_network(), tmp_path / "out", 5, patch_size=128, keep_probabilities=True
    )
    assert (read_levels(summary["outputs"]["classes"])[0] == BACKGROUND).all()
    assert summary["tiles"]["processed"] == 0 and summary["tissue_fraction"] == 0.0
    assert "probabilities" not in summary["outputs"]


def test_areas_json_for_a_known_map(known_run):
    _, summary, out = known_run
    areas = json.loads((out / "known_areas.json").read_text())
    assert areas == {key: value for key, value in summary.items() if key not in ("outputs", "seconds")}
    assert areas["level"] == 0 and areas["shape"] == [1024, 768] and areas["mpp"] == [0.5, 0.5]
    assert areas["tiles"] == {"processed": 8, "skipped": 4}
    quarter = 512 * 512 * 0.5 * 0.5 * 1e-6  # pixels x um^2 per pixel -> mm^2
    expected_pixels = {
        "class 0": 512 * 512,
        "class 1": 0,
        "class 2": 512 * 512,
        "class 3": 0,
        "background": 1024 * 256,
    }
    for name, pixels in expected_pixels.items():
        assert areas["classes"][name]["pixels"] == pixels
        assert areas["classes"][name]["area_mm2"] == pytest.approx(pixels * 0.25e-6)
        assert areas["classes"][name]["fraction"] == pytest.approx(pixels / (1024 * 768))
    assert areas["classes"]["class 0"]["area_mm2"] == pytest.approx(quarter) == pytest.approx(0.065536)
    assert areas["tissue_fraction"] == pytest.approx(2 / 3)
    assert areas["tissue_area_mm2"] == pytest.approx(2 * quarter)


def test_areas_are_null_without_a_resolution(tmp_path):
    slide = write_slide(tmp_path / "bare.tif", glass_red_blue(256, 256, 0), levels=1, mpp=None)
    summary = segment_slide(slide, colour_network(), tmp_path / "out", 5, patch_size=256)
    assert summary["mpp"] is None and summary["tissue_area_mm2"] is None
    expected = {"index": 0, "pixels": 128 * 256, "fraction": 0.5, "area_mm2": None}
    assert summary["classes"]["class 0"] == expected


def test_class_map_is_a_tiled_pyramid_keeping_the_resolution(known_run):
    _, summary, out = known_run
    levels = read_levels(summary["outputs"]["classes"])
    assert [level.shape for level in levels] == [(1024, 768), (512, 384), (256, 192)]
    np.testing.assert_array_equal(levels[0], expected_classes())
    np.testing.assert_array_equal(levels[1], mode_pool2(levels[0]))
    np.testing.assert_array_equal(levels[2], mode_pool2(levels[1]))
    with tifffile.TiffFile(summary["outputs"]["classes"]) as tif:
        for index, page in enumerate(tif.pages):
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
            assert page.dtype == np.uint8
            assert page.subfiletype == (1 if index else 0)
            pixels_per_cm = 1e4 / (0.5 * 2**index)
            assert page.tags["XResolution"].value == (pixels_per_cm, 1) == page.tags["YResolution"].value
            assert page.tags["ResolutionUnit"].value == 3  # centimetre
    written = sorted(p.name for p in out.iterdir())  # and no scratch folder left behind
    assert written == ["known_areas.json", "known_classes.tif", "known_overlay.png"]


def test_class_map_rows_are_streamed_into_the_same_pyramid_as_pooling_the_whole_map(tmp_path):
    """Rows come in blocks of any height (as the merger finalises them); the TIFF gets level 0 and the
    mode-pooled levels that pooling the whole map gives, odd sizes included."""
    rng = np.random.default_rng(0)
    classes = np.repeat(np.repeat(rng.integers(0, 5, (63, 44), dtype=np.uint8), 16, 0), 16, 1)[:1001, :699]
    tops = [0, 5, 130, 131, 400, 777, 1001]
    blocks = (classes[top:bottom] for top, bottom in itertools.pairwise(tops))
    class_map = _StreamedClassMap(classes.shape, blocks, 128, tmp_path)
    path = write_pyramid_tiff(tmp_path / "classes.tif", [class_map, *class_map.reduced], tile_size=128)
    expected = [classes]
    while max(expected[-1].shape) > 128:
        expected.append(mode_pool2(expected[-1]))
    levels = read_levels(path)
    assert [level.shape for level in levels] == [level.shape for level in expected]
    for level, reference in zip(levels, expected):
        np.testing.assert_array_equal(level, reference)


def test_strips_regroup_row_blocks_in_one_reused_buffer():
    blocks = [np.full((rows, 3), index, np.uint8) for index, rows in enumerate([2, 7, 1, 5])]
    strips = list(_strips(iter(blocks), 4, 3))
    assert [len(strip) for strip in strips] == [4, 4, 4, 3]
    assert all(np.shares_memory(strip, strips[0]) for strip in strips)  # one strip held, whatever the height
    copies = [strip.copy() for strip in _strips(iter(blocks), 4, 3)]
    np.testing.assert_array_equal(np.concatenate(copies), np.concatenate(blocks))


def test_memory_held_does_not_grow_with_the_slide_height(tmp_path):
    """The most memory NumPy and Python hold at once (tracemalloc's peak) is about the same for a slide
    eight times taller and as wide: only the tile lists and the low-resolution tissue map grow, while a
    class map held whole would add 2.75 MB. Tiles are read in the calling thread, so the peak does not
    depend on how far the reader ran ahead; a first run warms up what is made once."""
    slides = {}
    for repeats in (1, 8):
        pixels = np.tile(glass_red_blue(768, 512, 128), (repeats, 1, 1))
        slides[repeats] = write_slide(tmp_path / f"slide_{repeats}.tif", pixels, levels=4)
    settings = {"patch_size": 128, "tile_size": 128, "thumbnail_size": 64, "workers": 0}
    peaks = []
    for repeats in (1, 1, 8):
        tracemalloc.start()
        segment_slide(slides[repeats], colour_network(), tmp_path / "out", 5, **settings)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[2] - peaks[1] < 300_000, peaks


def test_on_the_cpu_preprocessing_runs_tile_by_tile(tmp_path):
    seen = []

    def preprocess(batch: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(batch.shape))
        return centre(batch)

    slide = write_slide(tmp_path / "slide.tif", glass_red_blue(), levels=1)
    summary = segment_slide(
        slide,
        colour_network(),
        tmp_path / "out",
        5,
        patch_size=256,
        overlap=0,
        batch_size=4,
        preprocess=preprocess,
    )
    assert seen == [(1, 3, 256, 256)] * summary["tiles"]["processed"]
    np.testing.assert_array_equal(read_levels(summary["outputs"]["classes"])[0], expected_classes())


def test_channels_last_batches_give_the_same_class_map_on_the_cpu(tmp_path):
    slide = write_slide(tmp_path / "slide.tif", slide_pixels(256, 256))
    maps = []
    for channels_last in (False, True):
        summary = segment_slide(
            slide,
            conv_network(),
            tmp_path / f"out_{channels_last}",
            5,
            patch_size=128,
            overlap=0.25,
            min_tissue_fraction=0.0,
            preprocess=centre,
            channels_last=channels_last,
        )
        maps.append(read_levels(summary["outputs"]["classes"])[0])
    np.testing.assert_array_equal(maps[0], maps[1])
    assert len(np.unique(maps[0])) > 1


def test_softmax_matches_torch():
    scores = np.random.default_rng(0).normal(0, 5, (2, 5, 3, 4)).astype(np.float32)
    expected = torch.softmax(torch.from_numpy(scores), dim=1).numpy()
    np.testing.assert_allclose(_softmax(scores), expected, rtol=1e-6, atol=1e-7)


def test_mode_pool2_takes_the_majority_and_breaks_ties_by_the_top_left_pixel():
    labels = np.array(
        [
            [1, 2, 3, 3, 7],
            [2, 2, 4, 5, 7],
            [0, 1, 6, 6, 9],
            [1, 0, 5, 5, 8],
        ],
        dtype=np.uint8,
    )
    # blocks: {1,2,2,2} -> 2; {3,3,4,5} -> 3; {7,7 | padded 7,7} -> 7; {0,1,1,0} tie -> 0 (top left);
    # {6,6,5,5} tie -> 6; {9,8 | padded 9,8} tie -> 9
    np.testing.assert_array_equal(mode_pool2(labels), [[2, 3, 7], [0, 6, 9]])


def test_overlay_blends_tissue_classes_over_the_thumbnail(known_run):
    pixels, summary, _ = known_run
    overlay = np.asarray(Image.open(summary["outputs"]["overlay"]))
    thumbnail = pixels[::4, ::4]  # level 2 of the slide is exactly 256 px long
    classes = expected_classes()[::4, ::4]
    assert overlay.shape == (256, 192, 3)
    palette = mask_palette(5)[:5].astype(float)
    tinted = np.round(thumbnail * 0.6 + palette[classes] * 0.4).astype(np.uint8)
    np.testing.assert_array_equal(overlay, np.where((classes != BACKGROUND)[..., None], tinted, thumbnail))


@pytest.mark.parametrize("resolution", [{"level": 1}, {"mpp": 1.0}])
def test_processing_level_1_gives_a_level_1_map(tmp_path, resolution):
    slide = write_slide(tmp_path / "slide.tif", glass_red_blue())
    network = colour_network()
    summary = segment_slide(slide, network, tmp_path / "out", 5, patch_size=128, overlap=0, **resolution)
    assert summary["level"] == 1 and summary["shape"] == [512, 384] and summary["mpp"] == [1.0, 1.0]
    levels = read_levels(summary["outputs"]["classes"])
    assert levels[0].shape == (512, 384)
    np.testing.assert_array_equal(levels[0], expected_classes()[::2, ::2])
    with tifffile.TiffFile(summary["outputs"]["classes"]) as tif:
        assert tif.pages[0].tags["XResolution"].value == (10000, 1)  # 1 um per pixel
    assert summary["classes"]["class 0"]["area_mm2"] == pytest.approx(256 * 256 * 1e-6)


def test_a_bundle_config_runs_the_segmenter_over_a_list_of_slides(tmp_path):
    slides = [write_slide(tmp_path / f"s{i}.tif", slide_pixels(200, 300, seed=i), levels=1) for i in range(2)]
    parser = ConfigParser(
        {
            "network": {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 5, "kernel_size": 1},
            "segmenter": {
                "_target_": "common.inferers.wsi.WholeSlideSegmenter",
                "network": "@network",
                "output_dir": str(tmp_path / "out"),
                "num_classes": 5,
                "patch_size": 128,
                "class_names": ["tumour", "necrosis", "lymphocyte", "stroma", "background"],
            },
            "slides": [str(s) for s in slides],
            "run": "$[@segmenter(s) for s in @slides]",
        }
    )
    summaries = parser.get_parsed_content("run")
    assert [Path(s["slide"]).name for s in summaries] == ["s0.tif", "s1.tif"]
    assert list(summaries[0]["classes"]) == ["tumour", "necrosis", "lymphocyte", "stroma", "background"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"s{i}_{kind}" for i in range(2) for kind in ("areas.json", "classes.tif", "overlay.png")
    )


def test_tissue_filter_counts_glass_and_black_as_background():
    tissue_filter = TissueFilter(min_tissue_fraction=0.3)
    patch = torch.full((1, 3, 10, 10), 255, dtype=torch.uint8)  # glass
    patch[0, :, :, :2] = 0  # black border: unsaturated, not tissue
    patch[0, :, :2, 2:] = torch.tensor(RED, dtype=torch.uint8)[:, None, None]  # 16 tissue pixels
    assert tissue_filter.tissue_fraction(patch) == pytest.approx(0.16)
    assert not tissue_filter(patch, (0, 0))
    pale_pink = torch.tensor((230, 180, 200), dtype=torch.uint8)[:, None, None]  # tissue too
    patch[0, :, 2:4, 2:] = pale_pink
    assert tissue_filter.tissue_fraction(patch) == pytest.approx(0.32)
    assert tissue_filter(patch, (0, 0))
    assert (tissue_filter.kept, tissue_filter.skipped) == (1, 1)


def test_errors(tmp_path):
    with pytest.raises(InputDataError, match=r"missing\.tif: slide file not found"):
        segment_slide(tmp_path / "missing.tif", colour_network(), tmp_path / "out", 5)
    slide = write_slide(tmp_path / "slide.tif", slide_pixels(128, 128), levels=1)
    with pytest.raises(ValueError, match=r"must return \(B, 4, H, W\) class scores, got \(1, 5, 128, 128\)"):
        segment_slide(slide, colour_network(), tmp_path / "out", 4, patch_size=128)
    assert list((tmp_path / "out").iterdir()) == []  # the scratch folder went with the failure
    with pytest.raises(InputDataError, match=r"slide\.tif: slide has levels 0\.\.0; level 2 does not exist"):
        segment_slide(slide, colour_network(), tmp_path / "out", 5, level=2)
    for bad, message in [
        ({"overlap": 1.0}, "a fractional overlap must be in"),
        ({"overlap": 512}, "an overlap in pixels must be in"),
        ({"patch_size": 0}, "patch_size must be a positive integer"),
        ({"background_index": 5}, r"background_index must be an integer in 0\.\.4, got 5"),
        ({"batch_size": 0}, "batch_size must be an integer at least 1"),
        ({"class_names": ["a", "b"]}, "class_names must be 5 unique names"),
        ({"level": 1, "mpp": 0.5}, "either level or mpp"),
        ({"min_tissue_fraction": 2}, r"min_tissue_fraction must be in \[0, 1\]"),
        ({"tile_size": 100}, "tile_size must be a positive multiple of 16"),
        ({"backend": "cucim"}, "backend must be one of"),
        ({"blend": "logits"}, "blend must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            WholeSlideSegmenter(colour_network(), tmp_path / "out", 5, **bad)


def test_glass_tiles_are_found_on_a_low_level_and_never_decoded(tmp_path, monkeypatch):
    """Tissue is detected once on level 2 of the slide; the 256 px tiles of the glass column are then
    skipped without being read, and every level-0 TIFF tile of the others is decoded exactly once."""
    levels = []
    monkeypatch.setattr(
        "common.inferers.wsi.TiledTiffLevel",
        lambda *args: levels.append(TiledTiffLevel(*args)) or levels[-1],
    )
    slide = write_slide(tmp_path / "slide.tif", glass_red_blue())  # TIFF tiles of 128 px
    summary = segment_slide(
        slide, colour_network(), tmp_path / "out", 5, patch_size=256, overlap=0.25, mask_glass=True
    )
    assert summary["tiles"] == {
        "processed": 5 * 3,
        "skipped": 5,
    }  # starts 0, 192, ... 768 by 0, 192, 384, 576
    assert len(levels) == 1
    assert levels[0].decoded == 8 * 5  # columns 256..767 of 128 px tiles, plus column 128..255 (overlap)
    np.testing.assert_array_equal(read_levels(summary["outputs"]["classes"])[0], expected_classes())


def test_a_corrupt_tile_names_the_slide_and_location_and_writes_nothing(tmp_path):
    slide = write_slide(tmp_path / "slide.tif", glass_red_blue(), levels=1)
    corrupt_tile(slide, page=0, index=3 * 6 + 4)  # tile (3, 4) of 128 px: rows 384..511, columns 512..639
    with pytest.raises(InputDataError, match=r"slide\.tif: tile at \(y, x\) = \(256, 512\) of level 0"):
        segment_slide(slide, colour_network(), tmp_path / "out", 5, patch_size=256, overlap=0)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.skipif(not optional_import("openslide")[1], reason="needs openslide-python and openslide-bin")
def test_backend_auto_segments_an_svs_through_openslide(tmp_path):
    slide = write_svs(tmp_path / "slide.svs", glass_red_blue(), levels=3)
    summary = segment_slide(
        slide,
        colour_network(),
        tmp_path / "out",
        5,
        patch_size=256,
        overlap=0.25,
        backend="auto",
        mask_glass=True,
    )
    assert summary["tiles"] == {"processed": 5 * 3, "skipped": 5} and summary["mpp"] == [0.5, 0.5]
    np.testing.assert_array_equal(read_levels(summary["outputs"]["classes"])[0], expected_classes())
