from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils

from common.data.cell_readers import (
    image_size,
    read_cellpose_folder,
    read_image,
    read_image_label_folders,
    read_label_image,
    read_livecell,
)
from common.errors import InputDataError


def ramp(height: int = 24, width: int = 32, dtype=np.uint8, top: int = 255) -> np.ndarray:
    return (np.arange(height * width).reshape(height, width) * top // (height * width - 1)).astype(dtype)


def square_labels(height: int = 24, width: int = 32) -> np.ndarray:
    labels = np.zeros((height, width), dtype=np.uint16)
    labels[2:10, 2:10] = 1
    labels[12:20, 5:30] = 300
    return labels


def save_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


# ------------------------------------------------------------------------------------------- images


def test_grey_png_is_repeated_to_three_channels(tmp_path):
    grey = ramp()
    image = read_image(save_png(tmp_path / "a.png", grey))
    assert image.shape == (24, 32, 3) and image.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], grey)


def test_rgba_drops_alpha(tmp_path):
    constant, transparent = np.full((24, 32), 7, np.uint8), np.zeros((24, 32), np.uint8)
    rgba = np.stack([ramp(), 255 - ramp(), constant, transparent], axis=-1)
    image = read_image(save_png(tmp_path / "a.png", rgba))
    np.testing.assert_array_equal(image, rgba[..., :3])


def test_16bit_tiff_is_scaled_between_percentiles(tmp_path):
    pixels = ramp(40, 50, np.uint16, 60000)
    pixels[0, 0] = 65535  # a hot pixel must not set the scale
    tifffile.imwrite(tmp_path / "a.tif", pixels)
    image = read_image(tmp_path / "a.tif")
    assert image.shape == (40, 50, 3)
    assert image[..., 0].ravel()[1:10].tolist() == [0] * 9  # below the 0.5 percentile
    assert image[-1, -1, 0] == 255
    middle = image[20, 25, 0]
    assert 120 <= middle <= 135  # the ramp's median maps to the middle of 0..255


def test_channel_first_tiff_becomes_rgb(tmp_path):
    rgb = np.stack([ramp(), ramp() // 2, 255 - ramp()])
    tifffile.imwrite(tmp_path / "a.tif", rgb, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif"), rgb.transpose(1, 2, 0))


def test_constant_image_is_reported_as_empty(tmp_path):
    path = save_png(tmp_path / "flat.png", np.full((16, 16), 9, np.uint8))
    with pytest.raises(InputDataError, match="flat.png: image is empty \\(all pixels equal\\)"):
        read_image(path)


def test_corrupt_and_missing_images_name_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 20)
    with pytest.raises(InputDataError, match="broken.png: not a readable image"):
        read_image(tmp_path / "broken.png")
    (tmp_path / "broken.tif").write_bytes(b"garbage" * 20)
    with pytest.raises(InputDataError, match="broken.tif: not a readable image"):
        image_size(tmp_path / "broken.tif")
    with pytest.raises(InputDataError, match="nothere.png: file not found"):
        read_image(tmp_path / "nothere.png")


def test_tiff_stack_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 8, 8, 5), np.uint8))
    with pytest.raises(InputDataError, match="stack.tif"):
        read_image(tmp_path / "stack.tif")


# ------------------------------------------------------------------------------------------- labels


def test_16bit_label_png_round_trips(tmp_path):
    labels = square_labels()
    read = read_label_image(save_png(tmp_path / "m.png", labels))
    assert read.dtype == np.int32
    np.testing.assert_array_equal(read, labels)
    assert image_size(tmp_path / "m.png") == (24, 32)


def test_label_image_with_channels_is_refused(tmp_path):
    path = save_png(tmp_path / "rgb_mask.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(InputDataError, match="rgb_mask.png: label image has shape \\(8, 8, 3\\)"):
        read_label_image(path)


def test_non_integer_labels_are_refused(tmp_path):
    tifffile.imwrite(tmp_path / "m.tif", np.full((8, 8), 0.5, np.float32))
    with pytest.raises(InputDataError, match="m.tif: label image has non-integer values"):
        read_label_image(tmp_path / "m.tif")


def test_binary_mask_is_split_into_connected_components(tmp_path, caplog):
    mask = np.zeros((12, 12), np.uint8)
    mask[1:4, 1:4] = 255
    mask[6:10, 6:10] = 255
    with caplog.at_level(logging.WARNING):
        labels = read_label_image(save_png(tmp_path / "binary.png", mask))
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2]
    assert labels[2, 2] != labels[7, 7]
    assert "binary.png: binary mask" in caplog.text


# ----------------------------------------------------------------------------------------- cellpose


def write_pair(folder: Path, name: str, image_shape=(24, 32), mask_shape=(24, 32)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_png(folder / f"{name}_img.png", ramp(*image_shape))
    save_png(folder / f"{name}_masks.png", square_labels(*mask_shape))


def test_cellpose_folder_pairs_images_with_masks(tmp_path):
    write_pair(tmp_path, "001")
    write_pair(tmp_path, "000")
    samples = read_cellpose_folder(tmp_path)
    assert [s.name for s in samples] == ["000", "001"]
    assert samples[0].size == (24, 32)
    image, labels = samples[1].load()
    assert image.shape == (24, 32, 3) and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, square_labels())


def test_cellpose_image_without_mask_names_the_image(tmp_path):
    write_pair(tmp_path, "000")
    save_png(tmp_path / "001_img.png", ramp())
    with pytest.raises(InputDataError, match="001_img.png: no label image 001_masks"):
        read_cellpose_folder(tmp_path)


def test_cellpose_mask_of_another_size_gives_both_sizes(tmp_path):
    write_pair(tmp_path, "000", image_shape=(24, 32), mask_shape=(20, 32))
    with pytest.raises(InputDataError, match="000_masks.png: mask is 20x32 but image 000_img.png is 24x32"):
        read_cellpose_folder(tmp_path)


def test_empty_or_missing_folder_is_refused(tmp_path):
    with pytest.raises(InputDataError, match="no images named NAME_img"):
        read_cellpose_folder(tmp_path)
    with pytest.raises(InputDataError, match="missing: folder not found"):
        read_cellpose_folder(tmp_path / "missing")


def test_cellpose_default_filter_takes_every_non_mask_image(tmp_path):
    save_png(tmp_path / "a.png", ramp())
    save_png(tmp_path / "a_masks.png", square_labels())
    assert [s.name for s in read_cellpose_folder(tmp_path, image_filter="")] == ["a"]


# ------------------------------------------------------------------------------------- plain folders


def test_image_and_label_folders_with_suffix(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    save_png(tmp_path / "images" / "x.png", ramp())
    tifffile.imwrite(tmp_path / "labels" / "x_label.tif", square_labels())
    (sample,) = read_image_label_folders(tmp_path / "images", tmp_path / "labels", label_suffix="_label")
    assert sample.name == "x" and sample.label_path.name == "x_label.tif"
    np.testing.assert_array_equal(sample.load()[1], square_labels())


def test_same_folder_needs_a_suffix_and_missing_labels_are_named(tmp_path):
    save_png(tmp_path / "x.png", ramp())
    with pytest.raises(InputDataError, match="give a label suffix"):
        read_image_label_folders(tmp_path, tmp_path)
    with pytest.raises(InputDataError, match="x.png: no label image x_seg"):
        read_image_label_folders(tmp_path, tmp_path, label_suffix="_seg")


# ----------------------------------------------------------------------------------------- LIVECell


def livecell(tmp_path: Path, annotations=None, images=None) -> Path:
    """Two 24x32 images (one in a cell-type subfolder, as LIVECell ships them) and a COCO file."""
    (tmp_path / "images" / "A172").mkdir(parents=True)
    save_png(tmp_path / "images" / "a.png", ramp())
    save_png(tmp_path / "images" / "A172" / "b.png", ramp())
    big = [[2, 2, 20, 2, 20, 20, 2, 20]]  # polygon covering x, y in 2..19
    small = [[10, 10, 14, 10, 14, 14, 10, 14]]  # inside big, drawn before it
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((4, 4), np.uint8), ((1, 19), (25, 3)))))
    rle["counts"] = rle["counts"].decode()
    coco = {
        "images": images
        if images is not None
        else [
            {"id": 1, "file_name": "a.png", "height": 24, "width": 32},
            {"id": 2, "file_name": "b.png", "height": 24, "width": 32},
        ],
        "annotations": annotations
        if annotations is not None
        else {
            "10": {"id": 10, "image_id": 1, "segmentation": small},
            "11": {"id": 11, "image_id": 1, "segmentation": big},
            "12": {"id": 12, "image_id": 1, "segmentation": rle},
            "13": {"id": 13, "image_id": 2, "segmentation": big},
        },
    }
    path = tmp_path / "livecell_coco_train.json"
    path.write_text(json.dumps(coco))
    return path


def test_livecell_rasterises_polygons_and_rle_keeping_the_smaller_cell(tmp_path):
    samples = read_livecell(livecell(tmp_path), tmp_path / "images")
    assert [s.name for s in samples] == ["a", "b"]
    assert samples[1].image_path == tmp_path / "images" / "A172" / "b.png"
    image, labels = samples[0].load()
    assert image.shape == (24, 32, 3) and labels.shape == (24, 32)
    assert labels[12, 12] == 1  # the small cell survives the larger one drawn after it
    assert labels[4, 4] == 2 and labels[3, 27] == 3 and labels[0, 0] == 0
    assert (labels == 1).sum() == 16  # polygon 10..14 covers 4x4 pixels
    assert set(np.unique(samples[1].load()[1]).tolist()) == {0, 1}


def test_livecell_errors_name_the_file(tmp_path):
    images = tmp_path / "images"
    with pytest.raises(InputDataError, match="nothere.json: file not found"):
        read_livecell(tmp_path / "nothere.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputDataError, match="bad.json: not valid JSON"):
        read_livecell(bad, tmp_path)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(InputDataError, match='bad.json: not a COCO annotation file: no "annotations"'):
        read_livecell(bad, tmp_path)
    with pytest.raises(InputDataError, match="livecell_coco_train.json: has no annotations"):
        read_livecell(livecell(tmp_path, annotations=[]), images)


def test_livecell_unknown_image_id(tmp_path):
    path = livecell(tmp_path, annotations=[{"id": 5, "image_id": 99, "segmentation": [[1, 1, 5, 1, 5, 5]]}])
    with pytest.raises(InputDataError, match="annotation 5 refers to unknown image_id 99"):
        read_livecell(path, tmp_path / "images")


def test_livecell_missing_image_and_wrong_size(tmp_path):
    ann = [{"id": 1, "image_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5]]}]
    gone = [{"id": 1, "file_name": "gone.png", "height": 24, "width": 32}]
    path = livecell(tmp_path / "x", annotations=ann, images=gone)
    with pytest.raises(InputDataError, match="gone.png: image listed in .* not found"):
        read_livecell(path, tmp_path / "x" / "images")
    wrong_size = [{"id": 1, "file_name": "a.png", "height": 520, "width": 704}]
    path = livecell(tmp_path / "y", annotations=ann, images=wrong_size)
    with pytest.raises(InputDataError, match="a.png: image is 24x32 but livecell_coco_train.json .* 520x704"):
        read_livecell(path, tmp_path / "y" / "images")


def test_livecell_malformed_polygon(tmp_path):
    path = livecell(tmp_path, annotations=[{"id": 3, "image_id": 1, "segmentation": [[1, 1, 5]]}])
    with pytest.raises(InputDataError, match="annotation 3: segmentation must be polygons"):
        read_livecell(path, tmp_path / "images")
