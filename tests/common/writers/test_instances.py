import csv
import os

import numpy as np
import pytest
import tifffile
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from PIL import Image

from common.io.atomic import atomic_write
from common.writers.instances import (
    CELL_TABLE_COLUMNS,
    SaveInstanceOutputsd,
    write_cell_table,
    write_instance_labels,
    write_overlay,
)


def _two_cells() -> np.ndarray:
    labels = np.zeros((40, 60), dtype=np.int32)
    labels[5:15, 10:20] = 3  # 100 px, centroid (9.5, 14.5)
    labels[20:30, 30:50] = 8  # 200 px, centroid (24.5, 39.5)
    return labels


def _read_table(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiff_round_trip_is_exact(tmp_path):
    labels = _two_cells()
    labels[0, 0] = 70000  # beyond uint16: stored as int32
    path = write_instance_labels(torch.from_numpy(labels)[None], tmp_path / "a.tif")
    np.testing.assert_array_equal(tifffile.imread(path), labels)
    small = write_instance_labels(_two_cells(), tmp_path / "b.tif")
    assert tifffile.imread(small).dtype == np.uint16


def test_png_is_16_bit_and_exact(tmp_path):
    labels = _two_cells() * 1000  # ids up to 8000 need 16 bits
    path = write_instance_labels(labels, tmp_path / "a.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), labels)


def test_png_refuses_ids_beyond_16_bit_and_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match="65535"):
        write_instance_labels(np.full((4, 4), 70000), tmp_path / "a.png")
    with pytest.raises(ValueError, match="not '.jpg'"):
        write_instance_labels(_two_cells(), tmp_path / "a.jpg")


def test_cell_table_has_one_row_per_cell(tmp_path):
    rows = _read_table(write_cell_table(_two_cells(), tmp_path / "cells.csv"))
    assert tuple(rows[0]) == CELL_TABLE_COLUMNS
    assert [(r["id"], r["area"], r["centroid_y"], r["centroid_x"]) for r in rows] == [
        ("3", "100", "9.500", "14.500"),
        ("8", "200", "24.500", "39.500"),
    ]
    bbox = [rows[1][k] for k in ("bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x")]
    assert bbox == ["20", "30", "30", "50"]  # max is exclusive


def test_overlay_stretches_normalised_image_and_colours_cells(tmp_path):
    image = np.random.default_rng(0).normal(0, 1, (3, 40, 60))  # ImageNet-normalised values, negative too
    path = write_overlay(image, _two_cells(), tmp_path / "overlay.png")
    overlay = np.asarray(Image.open(path))
    assert overlay.shape == (40, 60, 3) and overlay.dtype == np.uint8
    stretched = (image[:, 0, 0] - image.min(axis=(1, 2))) / np.ptp(image, axis=(1, 2)) * 255
    assert overlay[0, 0].tolist() == np.round(stretched).tolist()  # a background pixel keeps its grey value
    assert overlay[5, 15].tolist() != overlay[20, 40].tolist()  # edges of two cells differ in colour


def test_overlay_rejects_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"image is \(40, 50\) but instance labels are \(40, 60\)"):
        write_overlay(np.zeros((40, 50)), _two_cells(), tmp_path / "overlay.png")


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")

    def fail(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_atomic_write_respects_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "cells.csv", lambda f: f.write(b"id\n"))
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def _sample(folder: str = "/data/01") -> dict:
    image = MetaTensor(torch.rand(3, 40, 60), meta={"filename_or_obj": f"{folder}/t000.ome.tif"})
    instances = MetaTensor(torch.from_numpy(_two_cells())[None], meta=dict(image.meta))
    return {"image": image, "instances": instances}


def test_transform_writes_all_files_named_after_the_image(tmp_path):
    data = _sample()
    out = Compose([SaveInstanceOutputsd(keys="instances", output_dir=tmp_path)])(data)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["t000_cells.csv", "t000_instances.tif", "t000_overlay.png"]
    assert out["instances_path"] == str(tmp_path / "t000_instances.tif")
    assert out["instances"] is data["instances"]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "t000_instances.tif"), _two_cells())
    assert len(_read_table(tmp_path / "t000_cells.csv")) == 2


def test_transform_png_without_extras_and_with_data_root(tmp_path):
    writer = SaveInstanceOutputsd(
        output_dir=tmp_path / "out", label_format="png", overlay=False, csv=False, data_root_dir="/data"
    )
    writer(_sample("/data/01"))
    writer(_sample("/data/02"))
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.*")) == [
        "01/t000_instances.png",
        "02/t000_instances.png",
    ]


def test_transform_needs_the_source_file_name(tmp_path):
    data = {"image": torch.rand(3, 40, 60), "instances": torch.from_numpy(_two_cells())[None]}
    with pytest.raises(ValueError, match="'image' carries no 'filename_or_obj'"):
        SaveInstanceOutputsd(output_dir=tmp_path)(data)
