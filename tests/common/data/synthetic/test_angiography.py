from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from monai.transforms import Compose
from PIL import Image

from common.data.angiography import CASS_CATEGORIES, read_angiography_coco, read_vessel_folders, vessel_mask
from common.data.coco_instances import CocoInstancesd
from common.data.synthetic.angiography import (
    BRANCHES,
    cass_labels,
    generate_angiography_dataset,
    main,
    split_counts,
    synthesize_angiogram,
)
from common.errors import InputDataError
from common.transforms.io import LoadAngiogramd, LoadBinaryMaskd

SIZE = 128
LOAD = Compose([LoadAngiogramd("image"), CocoInstancesd()])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_angiography_dataset(tmp_path_factory.mktemp("synthetic") / "angio", 12, SIZE, seed=3)


def test_layout_and_file_formats(dataset):
    settings = json.loads((dataset / "dataset.json").read_text())
    assert settings["splits"] == split_counts(12) == {"train": 8, "val": 2, "test": 2}
    images = dataset / "train" / "images"
    assert sorted(p.name for p in images.iterdir()) == [
        f"{i:03d}.{'dcm' if i in (3, 6) else 'png'}" for i in range(8)
    ]
    with Image.open(images / "000.png") as eight, Image.open(images / "001.png") as sixteen:
        assert eight.mode == "L" and sixteen.mode.startswith("I;16") and eight.size == (SIZE, SIZE)
    single, run = pydicom.dcmread(images / "003.dcm"), pydicom.dcmread(images / "006.dcm")
    assert single.Modality == run.Modality == "XA" and single.pixel_array.shape == (SIZE, SIZE)
    assert run.pixel_array.shape == (3, SIZE, SIZE)
    records = {r["file_name"]: r for r in json.loads((dataset / "train" / "cass.json").read_text())["images"]}
    assert records["images/006.dcm"]["frame"] == 1 and "frame" not in records["images/003.dcm"]
    # the labelled frame is the most opacified one of the run
    frames = run.pixel_array.astype(float)
    vessels = np.asarray(Image.open(dataset / "train" / "vessel_masks" / "006.png")) > 0
    assert np.argmin([f[vessels].mean() - f[~vessels].mean() for f in frames]) == 1


def test_every_split_loads_through_the_real_readers(dataset):
    for split, count in split_counts(12).items():
        entries = read_angiography_coco(dataset / split / "cass.json")
        assert len(entries) == count
        vessels = read_vessel_folders(dataset / split / "images", dataset / split / "vessel_masks")
        for entry, vessel in zip(entries, vessels):
            out = LOAD(entry)
            assert (
                out["image"].shape == (3, SIZE, SIZE) and len(out["labels"]) == len(entry["annotations"]) > 0
            )
            mask = LoadBinaryMaskd("label")(vessel)["label"][0].numpy().astype(bool)
            segments = out["instances"].numpy().astype(bool).any(axis=0)
            assert (segments & ~mask).sum() <= 0.05 * segments.sum()  # polygons follow the drawn segments
            image = out["image"][0].numpy()
            assert image[mask].mean() < image[~mask].mean() - 20  # contrast-filled vessels are dark


def test_segments_vary_as_in_real_views(dataset):
    present = [
        {CASS_CATEGORIES[a["label"] - 1] for a in e["annotations"]}
        for split in ("train", "val", "test")
        for e in read_angiography_coco(dataset / split / "cass.json")
    ]
    assert any("left_main" not in p for p in present) and any("proximal_rca" not in p for p in present)
    assert any("ramus" not in p and "left_main" in p for p in present)
    for segments in present:  # a tree is drawn whole from its ostium or not at all
        assert ("left_main" in segments) == bool(segments & {"proximal_lad", "proximal_lcx"})
        assert ("proximal_rca" in segments) == ("mid_rca" in segments)


def test_arcade_file_maps_back_onto_the_cass_segments(dataset):
    for cass, arcade in zip(
        read_angiography_coco(dataset / "train" / "cass.json"),
        read_angiography_coco(dataset / "train" / "arcade_syntax.json"),
    ):
        expected = {a["label"]: a["segmentation"] for a in cass["annotations"]}
        expected.pop(CASS_CATEGORIES.index("obtuse_marginal_3") + 1, None)  # no SYNTAX number
        assert {a["label"]: a["segmentation"] for a in arcade["annotations"]} == expected
        assert (vessel_mask(arcade) <= vessel_mask(cass)).all()


def test_branch_map_is_consistent():
    frames, branches = synthesize_angiogram(np.random.default_rng(0), 160, "both", contrast=(0.3, 1.0))
    assert frames.shape == (2, 160, 160) and 0 <= frames.min() and frames.max() <= 1
    named = {BRANCHES[i - 1].name for i in np.unique(branches) if 0 < i <= len(BRANCHES)}
    assert {"left_main", "proximal_rca", "distal_lcx", "mid_lad"} <= named
    assert (branches == len(BRANCHES) + 1).any()  # unnamed side branches
    cass = cass_labels(branches)
    left_main = [b.name for b in BRANCHES].index("left_main") + 1
    assert (cass[branches == left_main] == CASS_CATEGORIES.index("left_main") + 1).all()
    assert set(np.unique(cass)) <= set(range(15)) and not cass[branches == len(BRANCHES) + 1].any()
    vessels = branches > 0
    assert frames[1][vessels].mean() < frames[0][vessels].mean()  # more contrast, darker lumen


def test_same_seed_same_bytes_and_user_folders_are_kept(tmp_path):
    first = generate_angiography_dataset(tmp_path / "a", 3, 64, seed=1)
    main(["--output_dir", str(tmp_path / "b"), "--num_images", "3", "--size", "64", "--seed", "1"])
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files and all((first / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    generate_angiography_dataset(first, 3, 64, seed=2)  # its own earlier output is replaced
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(InputDataError, match="refusing to replace"):
        generate_angiography_dataset(tmp_path / "user", 3, 64)
    assert (tmp_path / "user" / "notes.txt").read_text() == "mine"
