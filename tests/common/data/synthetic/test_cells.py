from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from common.data.cell_readers import read_cellpose_folder
from common.data.synthetic.cells import (
    DENSITIES,
    LOOKS,
    generate_cell_dataset,
    main,
    synthesize_cell_image,
    voronoi_labels,
)
from common.errors import InputDataError

SIZE = (96, 112)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    return generate_cell_dataset(root / "cells", 3, 1, 1, SIZE, seed=7, look=["phase", "fluorescence_nuclei"])


def touching_pairs(labels: np.ndarray) -> int:
    """Number of pixel pairs, horizontally or vertically adjacent, in two different cells."""
    pairs = 0
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        pairs += int(((a != b) & (a > 0) & (b > 0)).sum())
    return pairs


def test_every_split_has_image_and_mask_files(dataset):
    for split, count in (("train", 3), ("val", 1), ("test", 1)):
        names = sorted(p.name for p in (dataset / split).iterdir())
        expected = [f"{i:03d}_{kind}.png" for i in range(count) for kind in ("img", "masks")]
        assert names == sorted(expected)
    settings = json.loads((dataset / "dataset.json").read_text())
    assert settings["seed"] == 7 and settings["size"] == list(SIZE) and settings["splits"]["train"] == 3
    train = dataset / "train"
    with Image.open(train / "000_masks.png") as mask, Image.open(train / "000_img.png") as image:
        assert mask.mode.startswith("I;16") and image.mode == "L" and image.size == (SIZE[1], SIZE[0])


@pytest.mark.parametrize("look", LOOKS)
def test_labels_are_contiguous_connected_and_touching(look):
    image, labels = synthesize_cell_image(np.random.default_rng(0), SIZE, look)
    assert image.shape == labels.shape == SIZE and image.dtype == np.uint8
    n = labels.max()
    assert n > 5
    np.testing.assert_array_equal(np.unique(labels), np.arange(n + 1))
    for cell, box in enumerate(ndimage.find_objects(labels), start=1):
        assert ndimage.label(labels[box] == cell)[1] == 1, f"cell {cell} is in pieces"
    assert touching_pairs(labels) > 0
    cells, background = image[labels > 0].mean(), image[labels == 0].mean()
    bright_cells = look.startswith("fluorescence")
    assert (cells > background) if bright_cells else (cells < background)
    if bright_cells:
        assert background < 0.15 * 255  # dark background, as in fluorescence


def test_density_goes_from_sparse_to_confluent():
    covered = [
        (synthesize_cell_image(np.random.default_rng(3), (128, 128), "phase", density)[1] > 0).mean()
        for density in DENSITIES
    ]
    assert covered == sorted(covered) and covered[0] < 0.35 and covered[-1] > 0.6


def test_several_densities_mix_image_by_image_and_one_keeps_its_bytes(tmp_path):
    mixed = generate_cell_dataset(tmp_path / "mixed", 8, 0, 0, SIZE, density=["sparse", "confluent"])
    covered = [(np.asarray(Image.open(path)) > 0).mean() for path in sorted((mixed / "train").glob("*_masks.png"))]
    assert min(covered) < 0.35 and max(covered) > 0.6, covered
    assert json.loads((mixed / "dataset.json").read_text())["density"] == ["sparse", "confluent"]
    single = generate_cell_dataset(tmp_path / "single", 2, 0, 0, SIZE, density="sparse")
    listed = generate_cell_dataset(tmp_path / "listed", 2, 0, 0, SIZE, density=["sparse"])
    for name in ("000_img.png", "001_masks.png"):
        assert (single / "train" / name).read_bytes() == (listed / "train" / name).read_bytes()


def test_16_bit_images_use_the_wider_range_and_read_back(tmp_path):
    image, _ = synthesize_cell_image(np.random.default_rng(0), SIZE, "fluorescence_nuclei", bit_depth=16)
    assert image.dtype == np.uint16 and image.max() > 255
    root = generate_cell_dataset(tmp_path / "deep", 1, 0, 0, SIZE, look="fluorescence_nuclei", bit_depth=16)
    with Image.open(root / "train" / "000_img.png") as saved:
        assert saved.mode.startswith("I;16")
    pixels, _ = read_cellpose_folder(root / "train")[0].load()
    assert pixels.dtype == np.uint8 and pixels.max() == 255  # the reader rescales to 8 bits


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"look": "dic"}, "look must be one of"),
        ({"density": "packed"}, "density"),
        ({"bit_depth": 12}, "bit_depth"),
    ],
)
def test_unknown_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthesize_cell_image(np.random.default_rng(0), SIZE, **kwargs)


def test_same_seed_gives_identical_bytes(dataset, tmp_path):
    again = generate_cell_dataset(
        tmp_path / "again", 3, 1, 1, SIZE, seed=7, look=["phase", "fluorescence_nuclei"]
    )
    for path in sorted(dataset.rglob("*.png")):
        assert (again / path.relative_to(dataset)).read_bytes() == path.read_bytes(), path
    other = generate_cell_dataset(tmp_path / "other", 1, 0, 0, SIZE, seed=8)
    assert (other / "train" / "000_img.png").read_bytes() != (dataset / "train" / "000_img.png").read_bytes()


def test_output_reads_back_through_the_cellpose_reader(dataset):
    samples = read_cellpose_folder(dataset / "train")
    assert [s.name for s in samples] == ["000", "001", "002"]
    image, labels = samples[0].load()
    assert image.shape == (*SIZE, 3)
    np.testing.assert_array_equal(labels, np.asarray(Image.open(dataset / "train" / "000_masks.png")))


def test_regeneration_replaces_only_generated_folders(tmp_path):
    first = generate_cell_dataset(tmp_path / "demo", 2, 0, 0, SIZE)
    generate_cell_dataset(first, 1, 0, 0, SIZE)
    assert len(list((first / "train").glob("*_img.png"))) == 1  # no stale images from the first run
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "patient.tif").write_bytes(b"x")
    with pytest.raises(InputDataError, match="data: exists and is not an earlier synthetic dataset"):
        generate_cell_dataset(tmp_path / "data", 1, 0, 0, SIZE)


def test_command_line(tmp_path, capsys):
    main(
        [
            "--output",
            str(tmp_path / "cli"),
            "--n-train",
            "1",
            "--n-val",
            "1",
            "--n-test",
            "0",
            "--size",
            "64",
            "64",
            "--look",
            "brightfield",
            "fluorescence_cytoplasm",
            "--density",
            "sparse",
            "--bit-depth",
            "16",
        ]
    )
    assert "wrote 1/1/0" in capsys.readouterr().out
    assert (tmp_path / "cli" / "val" / "000_masks.png").is_file()
    settings = json.loads((tmp_path / "cli" / "dataset.json").read_text())
    assert settings["look"] == ["brightfield", "fluorescence_cytoplasm"] and settings["bit_depth"] == 16


def test_voronoi_labels_touch_densely():
    labels = voronoi_labels((64, 64), n_cells=40, seed=0, foreground=0.8)
    assert len(np.unique(labels)) > 30
    assert 0.7 < (labels > 0).mean() < 0.9
    assert touching_pairs(labels) > 100
