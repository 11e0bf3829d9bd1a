from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.dermoscopy import (
    read_binary_mask,
    read_image_mask_folders,
    read_isic_folder,
    read_unlabelled_images,
)
from common.errors import InputDataError


def write_rgb(path: Path, height: int = 32, width: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def write_mask(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def disc(height: int = 32, width: int = 48, scale: int = 255) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return ((yy - 16) ** 2 + (xx - 20) ** 2 < 64).astype(np.uint8) * scale


def test_read_binary_mask_accepts_0_255_and_0_1(tmp_path):
    for scale in (255, 1):
        mask = read_binary_mask(write_mask(tmp_path / f"m{scale}.png", disc(scale=scale)))
        assert mask.dtype == bool and mask.shape == (32, 48)
        np.testing.assert_array_equal(mask, disc() > 0)


def test_read_binary_mask_names_the_extra_values(tmp_path):
    pixels = disc()
    pixels[0, :3] = (7, 128, 200)
    path = write_mask(tmp_path / "bad.png", pixels)
    expected = r"bad\.png: mask is not binary: it holds 5 values \(0, 7, 128, 200, 255\)"
    with pytest.raises(InputDataError, match=expected):
        read_binary_mask(path)


def test_read_binary_mask_refuses_an_unreadable_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with pytest.raises(InputDataError, match="broken.png: not a readable mask"):
        read_binary_mask(path)


def test_read_isic_folder_pairs_images_with_masks_in_separate_folders(tmp_path):
    for name in ("ISIC_0000001", "ISIC_0000000"):
        write_rgb(tmp_path / "img" / f"{name}.jpg")
        write_mask(tmp_path / "gt" / f"{name}_segmentation.png", disc())
    (tmp_path / "img" / "LICENSE.txt").write_text("licence")
    write_rgb(tmp_path / "img" / "ISIC_0000000_superpixels.png")
    (tmp_path / "img" / "._ISIC_0000002.jpg").write_bytes(b"resource fork")
    entries = read_isic_folder(tmp_path / "img", tmp_path / "gt")
    assert [e["name"] for e in entries] == ["ISIC_0000000", "ISIC_0000001"]
    assert entries[0] == {
        "image": str(tmp_path / "img" / "ISIC_0000000.jpg"),
        "mask": str(tmp_path / "gt" / "ISIC_0000000_segmentation.png"),
        "name": "ISIC_0000000",
    }


def test_read_isic_folder_reports_a_missing_mask(tmp_path):
    write_rgb(tmp_path / "ISIC_0000000.jpg")
    with pytest.raises(InputDataError, match=r"ISIC_0000000\.jpg: no mask ISIC_0000000_segmentation\.png"):
        read_isic_folder(tmp_path)


def test_read_isic_folder_reports_both_sizes(tmp_path):
    write_rgb(tmp_path / "ISIC_0000000.jpg", 32, 48)
    write_mask(tmp_path / "ISIC_0000000_segmentation.png", np.zeros((30, 48)))
    expected = r"_segmentation\.png: mask is 30x48 but image ISIC_0000000\.jpg is 32x48"
    with pytest.raises(InputDataError, match=expected):
        read_isic_folder(tmp_path)


def test_read_isic_folder_reports_an_unreadable_image_and_an_empty_folder(tmp_path):
    (tmp_path / "ISIC_0000000.jpg").write_bytes(b"\xff\xd8 truncated")
    write_mask(tmp_path / "ISIC_0000000_segmentation.png", disc())
    with pytest.raises(InputDataError, match=r"ISIC_0000000\.jpg: not a readable image"):
        read_isic_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match=r"empty: no ISIC images"):
        read_isic_folder(tmp_path / "empty")


def test_read_image_mask_folders_with_a_suffix_in_one_folder(tmp_path):
    write_rgb(tmp_path / "a.png")
    write_mask(tmp_path / "a_mask.png", disc())
    entries = read_image_mask_folders(tmp_path, tmp_path, "_mask")
    assert entries == [{"image": str(tmp_path / "a.png"), "mask": str(tmp_path / "a_mask.png"), "name": "a"}]
    write_rgb(tmp_path / "b.jpg")
    with pytest.raises(InputDataError, match=r"b\.jpg: no mask b_mask"):
        read_image_mask_folders(tmp_path, tmp_path, "_mask")
    with pytest.raises(InputDataError, match="give a mask suffix"):
        read_image_mask_folders(tmp_path, tmp_path)


def test_read_unlabelled_images_is_recursive_and_skips_masks(tmp_path):
    write_rgb(tmp_path / "b" / "deep" / "x.png")
    write_rgb(tmp_path / "a.jpg")
    write_mask(tmp_path / "a_segmentation.png", disc())
    (tmp_path / "notes.txt").write_text("not an image")
    assert read_unlabelled_images(tmp_path) == [
        {"image": str(tmp_path / "a.jpg")},
        {"image": str(tmp_path / "b" / "deep" / "x.png")},
    ]
    (tmp_path / "b" / "corrupt.tif").write_bytes(b"II*\x00junk")
    with pytest.raises(InputDataError, match=r"corrupt\.tif: not a readable image"):
        read_unlabelled_images(tmp_path)
    (tmp_path / "none").mkdir()
    with pytest.raises(InputDataError, match="none: no images"):
        read_unlabelled_images(tmp_path / "none")
