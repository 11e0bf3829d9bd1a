from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from monai.inferers import WSISlidingWindowSplitter
from monai.utils import optional_import

from common.data.wsi import (
    create_wsi_reader,
    list_slides,
    open_slide,
    read_region,
    select_level,
    write_pyramid_tiff,
)
from common.errors import InputDataError


def slide_pixels(height: int = 1024, width: int = 768, seed: int = 0) -> np.ndarray:
    """Distinct RGB values everywhere, so any misplaced pixel shows."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_slide(
    path: Path, pixels: np.ndarray, levels: int = 3, mpp: float | None = 0.5, tile_size: int = 128
) -> Path:
    """A pyramidal tiled TIFF whose level ``k`` is ``pixels[::2**k, ::2**k]`` (exact, so tests can
    compare with NumPy slicing)."""
    return write_pyramid_tiff(
        path, [pixels[:: 2**k, :: 2**k] for k in range(levels)], mpp=mpp, tile_size=tile_size
    )


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return slide_pixels()


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory, pixels) -> Path:
    return write_slide(tmp_path_factory.mktemp("slides") / "slide.tif", pixels)


def test_open_slide_reports_levels_downsamples_and_mpp(slide_path):
    with open_slide(slide_path) as slide:
        info = slide.info
    assert info.backend == "tifffile" and info.path == slide_path
    assert info.level_count == 3
    assert info.level_dimensions == ((1024, 768), (512, 384), (256, 192))
    assert info.downsamples == (1.0, 2.0, 4.0)
    assert info.mpp == pytest.approx((0.5, 0.5))
    assert info.level_mpp(2) == pytest.approx((2.0, 2.0))


def test_mpp_from_inch_resolution_and_unknown_without_one(tmp_path):
    pixels = slide_pixels(64, 96)
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(
        inch,
        pixels,
        tile=(32, 32),
        photometric="rgb",
        resolution=(25400 / 0.25, 25400 / 0.5),
        resolutionunit="INCH",
        metadata=None,
    )  # 0.5 um per pixel in y, 0.25 in x
    with open_slide(inch) as slide:
        assert slide.info.mpp == pytest.approx((0.5, 0.25))
    bare = write_slide(tmp_path / "bare.tif", pixels, levels=1, mpp=None, tile_size=32)
    with open_slide(bare) as slide:
        assert slide.info.mpp is None and slide.info.level_mpp(0) is None


def test_aperio_description_gives_the_mpp(tmp_path):
    path = tmp_path / "aperio.svs"
    description = (
        "Aperio Image Library v12.0.15\r\n96x64 [0,0 96x64] (32x32) JPEG/RGB Q=70|AppMag = 40|MPP = 0.2520"
    )
    tifffile.imwrite(
        path, slide_pixels(64, 96), tile=(32, 32), photometric="rgb", description=description, metadata=None
    )
    with open_slide(path) as slide:
        assert slide.info.mpp == pytest.approx((0.252, 0.252))


def test_subifd_pyramids_are_read_as_levels(tmp_path, pixels):
    path = tmp_path / "subifds.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(pixels, tile=(128, 128), photometric="rgb", subifds=2, metadata=None)
        for k in (1, 2):
            tif.write(pixels[:: 2**k, :: 2**k], tile=(128, 128), photometric="rgb", subfiletype=1)
    with open_slide(path) as slide:
        assert slide.info.level_dimensions == ((1024, 768), (512, 384), (256, 192))
        region = read_region(slide, (400, 200), (16, 24), level=2)
    np.testing.assert_array_equal(region, np.moveaxis(pixels[::4, ::4][100:116, 50:74], -1, 0))


def test_read_region_takes_level_0_locations_and_pads_white(slide_path, pixels):
    with open_slide(slide_path) as slide:
        region = read_region(slide, (100, 200), (300, 400))
        np.testing.assert_array_equal(region, np.moveaxis(pixels[100:400, 200:600], -1, 0))
        assert region.dtype == np.uint8 and region.shape == (3, 300, 400)
        # level 1 at level-0 location (1000, 700) is level-1 pixel (500, 350); the slide ends 12 rows
        # and 34 columns later, the rest of the region is white glass
        region = read_region(slide, (1000, 700), (20, 40), level=1)
    np.testing.assert_array_equal(region[:, :12, :34], np.moveaxis(pixels[::2, ::2][500:, 350:], -1, 0))
    assert (region[:, 12:] == 255).all() and (region[:, :, 34:] == 255).all()


def test_rgba_slides_lose_their_alpha(tmp_path, pixels):
    rgba = np.concatenate([pixels[:64, :64], np.full((64, 64, 1), 7, np.uint8)], axis=-1)
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, rgba, tile=(32, 32), photometric="rgb", extrasamples=["unassalpha"], metadata=None)
    with open_slide(path) as slide:
        region = read_region(slide, (0, 0), (64, 64))
    np.testing.assert_array_equal(region, np.moveaxis(pixels[:64, :64], -1, 0))


@pytest.mark.filterwarnings("ignore:WSIReader with tifffile backend")
def test_patches_are_read_without_decoding_the_level(slide_path, pixels, monkeypatch):
    """MONAI's TiffFileWSIReader decodes a whole level per patch; ours must only touch the tiles."""

    def refuse(*args, **kwargs):
        raise AssertionError("whole level decoded")

    monkeypatch.setattr(tifffile.TiffFile, "asarray", refuse)
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", refuse)
    splitter = WSISlidingWindowSplitter(256, overlap=0.25, reader=create_wsi_reader(level=1), level=1)
    patches = list(splitter(str(slide_path)))
    level1 = np.moveaxis(pixels[::2, ::2], -1, 0)
    # level 1 is 512x384; 256 px windows every 192 px, the last ones reaching into white padding
    assert [location for _, location in patches] == [(y, x) for y in (0, 192, 384) for x in (0, 192)]
    for patch, (y, x) in patches:
        assert patch.shape == (1, 3, 256, 256) and patch.dtype == torch.uint8
        inside = level1[:, y : y + 256, x : x + 256]
        np.testing.assert_array_equal(patch[0, :, : inside.shape[1], : inside.shape[2]].numpy(), inside)
        height, width = inside.shape[1:]
        assert (patch[0, :, height:] == 255).all() and (patch[0, :, :, width:] == 255).all()


def test_select_level_by_level_or_by_mpp(slide_path):
    with open_slide(slide_path) as slide:
        info = slide.info
    assert select_level(info) == 0
    assert select_level(info, level=2) == 2
    assert select_level(info, mpp=1.0) == 1
    assert select_level(info, mpp=1.05) == 1  # within the 10% tolerance of level 1 (1.0) ...
    assert select_level(info, mpp=0.9) == 0  # ... but never coarser than asked: 1.0 > 0.9 * 1.1
    assert select_level(info, mpp=1.5) == 1
    assert select_level(info, mpp=100.0) == 2
    with pytest.raises(ValueError, match="either level or mpp"):
        select_level(info, level=1, mpp=1.0)


def test_level_and_mpp_errors_name_the_slide(tmp_path, slide_path):
    with open_slide(slide_path) as slide:
        info = slide.info
    with pytest.raises(InputDataError, match=r"slide\.tif: slide has levels 0\.\.2; level 3 does not exist"):
        select_level(info, level=3)
    with pytest.raises(InputDataError, match=r"slide\.tif: mpp 0\.2 was requested but the finest level has"):
        select_level(info, mpp=0.2)
    bare = write_slide(tmp_path / "bare.tif", slide_pixels(64, 64), levels=1, mpp=None, tile_size=32)
    with open_slide(bare) as slide:
        with pytest.raises(InputDataError, match=r"bare\.tif: mpp 0\.5 was requested but the slide does not"):
            select_level(slide.info, mpp=0.5)
        with pytest.raises(InputDataError, match=r"bare\.tif: slide has levels 0\.\.0; level 1 does not"):
            read_region(slide, (0, 0), (8, 8), level=1)


def test_open_slide_refuses_missing_corrupt_and_non_rgb_files(tmp_path):
    with pytest.raises(InputDataError, match=r"missing\.tif: slide file not found"):
        open_slide(tmp_path / "missing.tif")
    text = tmp_path / "notes.tif"
    text.write_text("not a slide\n")
    with pytest.raises(InputDataError, match=r"notes\.tif: not a whole-slide image tifffile can read"):
        open_slide(text)
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, np.zeros((64, 64), np.uint8), tile=(32, 32))
    with pytest.raises(InputDataError, match=r"grey\.tif: expected an RGB slide, found a single-channel"):
        open_slide(grey)
    deep = tmp_path / "deep.tif"
    tifffile.imwrite(deep, np.zeros((64, 64, 3), np.uint16), tile=(32, 32), photometric="rgb")
    with pytest.raises(InputDataError, match=r"deep\.tif: expected 8-bit RGB pixels, found uint16"):
        open_slide(deep)


def test_list_slides_takes_a_file_or_the_slides_of_a_folder(tmp_path):
    for name in ("b.SVS", "a.tif", "c.ndpi", "a_classes.tif", "a_overlay.png", "notes.txt", ".hidden.svs"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.tif").mkdir()
    assert list_slides(tmp_path) == [str(tmp_path / name) for name in ("a.tif", "b.SVS", "c.ndpi")]
    assert list_slides(tmp_path / "notes.txt") == [str(tmp_path / "notes.txt")]  # a file is taken as given
    with pytest.raises(InputDataError, match=r"missing: slide file or folder not found"):
        list_slides(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputDataError, match=r"empty: no slides \(\.svs, \.tif"):
        list_slides(empty)


def write_svs(path: Path, pixels: np.ndarray, levels: int = 2, mpp: float = 0.5, power: int = 20) -> Path:
    """An Aperio SVS layout: level 0 tiled JPEG with the Aperio description, a stripped thumbnail, then
    the reduced levels; what OpenSlide's Aperio driver and tifffile's SVS series both read."""
    height, width = pixels.shape[:2]
    description = (
        f"Aperio Image Library v12.0.15\r\n{width}x{height} [0,0 {width}x{height}] (128x128) JPEG/RGB Q=95"
        f"|AppMag = {power}|MPP = {mpp}"
    )
    jpeg = {"photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": 95}, "metadata": None}
    with tifffile.TiffWriter(path) as tif:
        tif.write(pixels, tile=(128, 128), description=description, **jpeg)
        tif.write(pixels[::8, ::8], description="Aperio Image Library v12.0.15\r\nthumbnail", **jpeg)
        for k in range(1, levels):
            tif.write(
                pixels[:: 2**k, :: 2**k], tile=(128, 128), description="Aperio", **jpeg
            )  # not "reduced"
    return path


def test_backends(slide_path, tmp_path):
    has_openslide = optional_import("openslide")[1]
    with open_slide(slide_path, backend="auto") as slide:
        assert slide.info.backend == "tifffile"  # generic pyramidal TIFF
    svs = write_svs(tmp_path / "slide.svs", slide_pixels(256, 384))
    with open_slide(svs, backend="auto") as slide:
        assert slide.info.backend == ("openslide" if has_openslide else "tifffile")  # a vendor format
    with pytest.raises(ValueError, match="backend must be one of"):
        open_slide(slide_path, backend="cucim")
    if not has_openslide:
        with pytest.raises(ValueError, match="needs openslide-python"):
            open_slide(slide_path, backend="openslide")


def test_write_pyramid_tiff_is_tiled_with_reduced_levels_and_resolution(tmp_path):
    labels = np.arange(100 * 70, dtype=np.uint32).reshape(100, 70).astype(np.uint8)
    levels = [labels, labels[::2, ::2]]
    path = write_pyramid_tiff(tmp_path / "labels.tif", levels, mpp=(0.5, 0.25), tile_size=32)
    with tifffile.TiffFile(path) as tif:
        first, second = tif.pages
        assert first.is_tiled and (first.tilelength, first.tilewidth) == (32, 32)
        assert first.subfiletype == 0 and second.subfiletype == 1
        assert first.tags["XResolution"].value == (40000, 1) and first.tags["YResolution"].value == (20000, 1)
        assert second.tags["XResolution"].value == (20000, 1)
        assert second.tags["YResolution"].value == (10000, 1)
        np.testing.assert_array_equal(first.asarray(), labels)
        np.testing.assert_array_equal(second.asarray(), labels[::2, ::2])
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_uniform_label_tiles_are_encoded_once_and_read_back_like_the_others(tmp_path):
    labels = np.full((100, 70), 4, np.uint8)  # 4 x 3 tiles of 32 px, the last row and column partial
    labels[32:64, 32:64] = np.arange(32 * 32).reshape(32, 32) % 5  # one mixed tile
    labels[64:, :32] = 2  # a partial uniform tile of another class
    path = write_pyramid_tiff(tmp_path / "labels.tif", [labels], tile_size=32)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        np.testing.assert_array_equal(page.asarray(), labels)
        sizes = page.databytecounts
        assert sizes[0] == sizes[1] == sizes[3] and sizes[4] > sizes[0]  # background tiles: the same bytes


@pytest.mark.skipif(not optional_import("openslide")[1], reason="needs openslide-python and openslide-bin")
def test_openslide_reads_an_svs_with_its_vendor_metadata(tmp_path):
    pixels = np.zeros((512, 768, 3), np.uint8)
    pixels[:, :256] = 255  # glass
    pixels[:, 256:] = (200, 60, 60)  # solid colours: JPEG keeps them to within a level or two
    path = write_svs(tmp_path / "slide.svs", pixels, levels=3, mpp=0.25, power=40)
    with open_slide(path, backend="openslide") as slide, open_slide(path, backend="tifffile") as tiff:
        for info in (slide.info, tiff.info):
            assert info.level_dimensions == ((512, 768), (256, 384), (128, 192))
            assert info.mpp == pytest.approx((0.25, 0.25)) and info.objective_power == 40
            assert info.vendor == "aperio"
        assert slide.info.backend == "openslide" and tiff.info.backend == "tifffile"
        region = read_region(slide, (100, 200), (64, 128), level=1)  # level-0 location, level-1 size
        expected = np.moveaxis(pixels[::2, ::2][50:114, 100:228], -1, 0)
        assert np.abs(region.astype(int) - expected).max() <= 3
        np.testing.assert_array_equal(region, read_region(tiff, (100, 200), (64, 128), level=1))
        past_edge = read_region(slide, (480, 700), (64, 128))
        assert (past_edge[:, 32:] == 255).all() and (past_edge[:, :, 68:] == 255).all()  # white, not black
