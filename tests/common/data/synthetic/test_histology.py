from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from monai.data import WSIReader
from PIL import Image

from common.data.histopathology import (
    read_labelled_patch_folder,
    read_mask,
    read_patch_manifest,
    read_segmentation_folder,
)
from common.data.synthetic.histology import (
    MASK_DOWNSAMPLE,
    MIN_CLASS_FRACTION,
    generate_histology_dataset,
    main,
    synthesize_patch,
    write_synthetic_slide,
)
from common.errors import InputDataError

PATCH = 64
SLIDE = (1024, 1152)  # small, not square; the default slide's size is checked separately
TILE = 128
TUMOUR, NECROSIS, LYMPHOCYTE, STROMA, BACKGROUND = range(5)


def generate(path: Path, seed: int = 0, n_train: int = 12) -> Path:
    return generate_histology_dataset(
        path, quick=True, seed=seed, patch_size=PATCH, n_train=n_train, n_val=4, n_test=4,
        slide_size=SLIDE, slide_tile=TILE, workers=1,
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic") / "histology")


def test_train_folder_and_manifest_list_the_same_labelled_patches(dataset):
    folder = read_labelled_patch_folder(dataset / "train", 4)
    manifest = read_patch_manifest(dataset / "train.jsonl", 4)
    assert len(folder) == 12
    assert [(e["image"], e["label"]) for e in folder] == [(e["image"], e["label"]) for e in manifest]
    assert all(e["split"] == "train" and e["mpp"] == 1.0 for e in manifest)
    assert Image.open(folder[0]["image"]).size == (PATCH, PATCH)
    assert all(1 <= sum(e["label"]) <= 3 for e in folder)
    assert np.sum([e["label"] for e in folder], axis=0).min() >= 1  # every class is in the split


def test_validation_and_test_masks_hold_the_classes_their_patches_show(dataset):
    settings = json.loads((dataset / "dataset.json").read_text())
    for split in ("val", "test"):
        entries = read_segmentation_folder(dataset / split / "img", dataset / split / "mask", 4)
        assert len(entries) == settings["splits"][split]["count"] == 4
        for entry in entries:
            mask = read_mask(entry["mask"], 4)
            shares = np.bincount(mask.ravel(), minlength=5) / mask.size
            assert shares[np.flatnonzero(shares)].min() >= MIN_CLASS_FRACTION  # nothing drawn in specks
            assert 1 <= sum(entry["label"]) <= 3


@pytest.mark.parametrize("classes", [[TUMOUR, LYMPHOCYTE], [NECROSIS, STROMA, BACKGROUND], [STROMA]])
def test_patch_classes_are_exactly_those_drawn_above_the_minimum_share(classes):
    for seed in range(4):
        image, class_map = synthesize_patch(np.random.default_rng(seed), 48, classes)
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8
        present = np.flatnonzero(np.bincount(class_map.ravel(), minlength=5))
        assert set(present) <= set(classes) and set(present) - {BACKGROUND}
        assert (np.bincount(class_map.ravel())[present] / class_map.size).min() >= MIN_CLASS_FRACTION
        assert (image[class_map == BACKGROUND].mean(axis=-1) > 200).all()  # background is glass


def test_tissue_classes_look_as_described():
    """Stroma is the pinkest (red over green), lymphocyte sheets the most contrasted, whatever the stain."""
    redness, contrast = np.zeros((4, 6)), np.zeros((4, 6))
    for c in range(4):
        for seed in range(6):
            pixels = synthesize_patch(np.random.default_rng(seed), 96, [c])[0].reshape(-1, 3).astype(float)
            redness[c, seed] = (pixels[:, 0] - pixels[:, 1]).mean()
            contrast[c, seed] = pixels.mean(axis=1).std()
    assert redness[STROMA].min() > np.delete(redness, STROMA, axis=0).max()
    assert contrast[LYMPHOCYTE].min() > np.delete(contrast, LYMPHOCYTE, axis=0).max()


def test_synthesize_patch_checks_its_arguments():
    with pytest.raises(ValueError, match="one tissue class"):
        synthesize_patch(np.random.default_rng(0), 48, [BACKGROUND])
    with pytest.raises(ValueError, match="indices in 0..4"):
        synthesize_patch(np.random.default_rng(0), 48, [7])
    with pytest.raises(ValueError, match="at least 32"):
        synthesize_patch(np.random.default_rng(0), 16, [TUMOUR])


def test_slide_is_a_pyramid_that_monai_reads_with_its_resolution(dataset):
    settings = json.loads((dataset / "dataset.json").read_text())["slide"]
    reader = WSIReader(backend="tifffile")
    wsi = reader.read(str(dataset / settings["image"]))
    try:
        levels = reader.get_level_count(wsi)
        assert levels >= 4
        sizes = [reader.get_size(wsi, level) for level in range(levels)]
        assert sizes[0] == SLIDE and [list(s) for s in sizes] == settings["levels"]
        assert all(sizes[i + 1] == (sizes[i][0] // 2, sizes[i][1] // 2) for i in range(levels - 1))
        assert reader.get_mpp(wsi, 0) == pytest.approx((0.5, 0.5))
        assert reader.get_mpp(wsi, 1) == pytest.approx((1.0, 1.0))
        smallest, _ = reader.get_data(wsi, level=levels - 1)
    finally:
        wsi.close()
    assert smallest.shape == (3, *sizes[-1])


def test_slide_mask_matches_the_slide(dataset):
    """Glass is white and in the border, tissue darker and in the middle, as the class map says."""
    settings = json.loads((dataset / "dataset.json").read_text())["slide"]
    mask = read_mask(dataset / settings["mask"], 4)
    assert settings["mask_downsample"] == MASK_DOWNSAMPLE
    assert mask.shape == (SLIDE[0] // MASK_DOWNSAMPLE, SLIDE[1] // MASK_DOWNSAMPLE)
    assert (mask[0] == BACKGROUND).all() and (mask[:, -1] == BACKGROUND).all()
    assert mask[mask.shape[0] // 2 - 8 : mask.shape[0] // 2 + 8, mask.shape[1] // 2].max() < BACKGROUND
    reader = WSIReader(backend="tifffile")
    wsi = reader.read(str(dataset / settings["image"]))
    try:
        level = 3  # 1/8: one pixel per mask pixel
        pixels, _ = reader.get_data(wsi, level=level)
    finally:
        wsi.close()
    brightness = pixels.astype(float).mean(axis=0)
    assert brightness.shape == mask.shape
    assert brightness[mask == BACKGROUND].mean() > 230
    assert brightness[mask < BACKGROUND].mean() < 215
    shares = np.bincount(mask.ravel(), minlength=5) / mask.size
    assert shares[:4].min() > 0 and shares[:4].sum() > 0.25  # every tissue class is on the slide


def test_slide_regions_do_not_depend_on_the_tiling(tmp_path):
    first, levels = write_synthetic_slide(tmp_path / "a.tif", (512, 640), tile=128, seed=3, workers=2)
    second, _ = write_synthetic_slide(tmp_path / "b.tif", (512, 640), tile=256, seed=3, workers=1)
    np.testing.assert_array_equal(first, second)
    assert levels == [(512, 640), (256, 320), (128, 160)]


def test_default_slide_is_at_least_8000_pixels_square():
    """The full-size slide takes ~20 s to write, so only its declared size is checked here."""
    default = inspect.signature(generate_histology_dataset).parameters["slide_size"].default
    assert min(default) >= 8000
    assert inspect.signature(write_synthetic_slide).parameters["size"].default == default


def test_slide_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="multiples of 8"):
        write_synthetic_slide(tmp_path / "s.tif", (500, 512), tile=128)
    with pytest.raises(ValueError, match="multiple of 16"):
        write_synthetic_slide(tmp_path / "s.tif", (512, 512), tile=100)
    assert not (tmp_path / "s.tif").exists()


def test_generation_is_deterministic_and_reruns_replace_only_their_own_output(dataset, tmp_path):
    again = generate(tmp_path / "again")
    name = sorted((dataset / "train").iterdir())[3].name
    assert (again / "train" / name).read_bytes() == (dataset / "train" / name).read_bytes()
    mask = Path("val", "mask", "val0001.png")
    assert (again / mask).read_bytes() == (dataset / mask).read_bytes()
    other = generate(tmp_path / "again", seed=1, n_train=2)
    assert len(list((other / "train").iterdir())) == 2
    slide_mask = Path("slide", "slide_mask.png")
    assert (other / slide_mask).read_bytes() != (dataset / slide_mask).read_bytes()
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("keep me")
    with pytest.raises(InputDataError, match="refusing to replace"):
        generate(tmp_path / "user")
    assert (tmp_path / "user" / "notes.txt").read_text() == "keep me"


def test_command_line(tmp_path, capsys):
    args = ["--out", str(tmp_path / "cli"), "--quick", "--seed", "2", "--patch-size", "32"]
    main([*args, "--slide-size", "1024", "1024"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    settings = json.loads((tmp_path / "cli" / "dataset.json").read_text())
    assert settings["seed"] == 2 and settings["quick"] and settings["patch_size"] == 32
    assert settings["splits"]["train"]["count"] == len(list((tmp_path / "cli" / "train").iterdir())) == 96
    assert settings["slide"]["levels"][0] == [1024, 1024]
