from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.histopathology import (
    CLASS_COLOURS,
    mask_palette,
    parse_label_vector,
    patch_label_datalist,
    patch_mask_datalist,
    read_labelled_patch_folder,
    read_mask,
    read_patch_manifest,
    read_rgb_patch,
    read_segmentation_folder,
    write_mask,
)
from common.errors import InputDataError

NAMES = ("tumour epithelium", "necrosis", "lymphocyte", "tumour-associated stroma")


def write_rgb(path: Path, height: int = 12, width: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def save_mask(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(path)
    return path


def quadrants(height: int = 12, width: int = 16) -> np.ndarray:
    """Classes 0, 2 and background 4 in three quadrants, ignored pixels in the fourth."""
    mask = np.full((height, width), 4, dtype=np.uint8)
    mask[: height // 2, : width // 2] = 0
    mask[height // 2 :, : width // 2] = 2
    mask[height // 2 :, width // 2 :] = 255
    return mask


# ------------------------------------------------------------------------------- label vectors


@pytest.mark.parametrize(
    "name, expected",
    [
        ("1031280-2300-27920-[1 0 0 1].png", [1, 0, 0, 1]),  # LUAD-HistoSeg
        ("TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png", [1, 1, 0, 1]),  # BCSS-WSSS
        ("patch-[0,1, 1 ,0].png", [0, 1, 1, 0]),
        ("scan[2]-x-[0 0 1 0].jpg", [0, 0, 1, 0]),  # the last group is the label
    ],
)
def test_parse_label_vector_reads_the_dataset_name_styles(name, expected):
    label = parse_label_vector(Path("train") / name, 4)
    assert label.dtype == np.int64 and label.tolist() == expected


@pytest.mark.parametrize(
    "name, message",
    [
        ("patch.png", r"patch\.png: file name has no label vector"),
        ("patch-[1 0 1].png", r"label vector \[1 0 1\] has 3 entries; expected 4"),
        ("patch-[1 2 0 0].png", r"holds 2; entries must be 0 or 1"),
        ("patch-[1 0 0 x].png", r"holds x; entries must be 0 or 1"),
        ("patch-[].png", r"has 0 entries"),
    ],
)
def test_parse_label_vector_names_the_file_and_the_problem(name, message):
    with pytest.raises(InputDataError, match=message):
        parse_label_vector(name, 4)


def test_parse_label_vector_checks_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        parse_label_vector("a-[1].png", 0)
    assert parse_label_vector("a-[1].png", 1).tolist() == [1]


# ------------------------------------------------------------------------------ patch folders


def test_labelled_folder_lists_patches_below_it_sorted_skipping_hidden_and_other_files(tmp_path):
    write_rgb(tmp_path / "b-[0 1 0 0].png")
    write_rgb(tmp_path / "sub" / "a-[1 0 0 1].jpg")
    write_rgb(tmp_path / ".ipynb_checkpoints" / "c-[1 1 1 1].png")
    (tmp_path / "notes.txt").write_text("not a patch")
    entries = read_labelled_patch_folder(tmp_path, 4)
    assert entries == [
        {"image": str(tmp_path / "b-[0 1 0 0].png"), "label": [0, 1, 0, 0], "name": "b-[0 1 0 0]"},
        {"image": str(tmp_path / "sub" / "a-[1 0 0 1].jpg"), "label": [1, 0, 0, 1], "name": "a-[1 0 0 1]"},
    ]
    assert [e["name"] for e in read_labelled_patch_folder(tmp_path, 4, recursive=False)] == ["b-[0 1 0 0]"]


def test_labelled_folder_errors(tmp_path):
    with pytest.raises(InputDataError, match="missing: folder not found"):
        read_labelled_patch_folder(tmp_path / "missing", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match=r"empty: no patches \(.png"):
        read_labelled_patch_folder(tmp_path / "empty", 4)
    write_rgb(tmp_path / "bad" / "unlabelled.png")
    with pytest.raises(InputDataError, match=r"unlabelled\.png: file name has no label vector"):
        read_labelled_patch_folder(tmp_path / "bad", 4)
    write_rgb(tmp_path / "twice" / "x" / "p-[1 0 0 0].png")
    write_rgb(tmp_path / "twice" / "y" / "p-[1 0 0 0].png")
    with pytest.raises(InputDataError, match=r"two patches are named 'p-\[1 0 0 0\]'"):
        read_labelled_patch_folder(tmp_path / "twice", 4)


# ---------------------------------------------------------------------------------- manifests


def write_manifest(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_manifest_resolves_paths_reads_both_label_forms_and_keeps_known_fields(tmp_path):
    a = write_rgb(tmp_path / "data" / "patches" / "a.png")
    elsewhere = write_rgb(tmp_path / "elsewhere" / "b.png")
    save_mask(tmp_path / "data" / "masks" / "a.png", quadrants())
    manifest = write_manifest(
        tmp_path / "data" / "list.jsonl",
        [
            {
                "image": "patches/a.png",
                "label": [1, 0, 0, 1],
                "mask": "masks/a.png",
                "split": "val",
                "mpp": 1.0,
                "origin": "slide-7",
                "level": 1,
                "classes": ["x"],
                "note": "dropped",
            },
            "",
            {"image": str(elsewhere), "label": ["lymphocyte", "necrosis", "lymphocyte"], "name": "bee"},
            {"image": "patches/a.png", "label": [], "name": "glass"},
        ],
    )
    entries = read_patch_manifest(manifest, 4, class_names=NAMES)
    assert entries[0] == {
        "image": str(a),
        "label": [1, 0, 0, 1],
        "name": "a",
        "mask": str(tmp_path / "data" / "masks" / "a.png"),
        "split": "val",
        "origin": "slide-7",
        "level": 1,
        "mpp": 1.0,
        "classes": ["x"],
    }
    assert entries[1] == {"image": str(elsewhere), "label": [0, 1, 1, 0], "name": "bee"}
    assert entries[2]["label"] == [0, 0, 0, 0]


def test_manifest_base_dir_replaces_the_manifest_folder(tmp_path):
    image = write_rgb(tmp_path / "images" / "a.png")
    manifest = write_manifest(tmp_path / "lists" / "m.jsonl", [{"image": "a.png", "label": [0, 0, 1, 0]}])
    assert read_patch_manifest(manifest, 4, base_dir=tmp_path / "images")[0]["image"] == str(image)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"image": "a.png", "label": [1, 0, 0, 0]', r"m\.jsonl: line 2: not valid JSON"),
        ("[1, 2]", r"line 2: expected a JSON object, got list"),
        ({"label": [1, 0, 0, 0]}, r"line 2: no 'image'"),
        ({"image": "a.png"}, r"line 2: no 'label'"),
        ({"image": 3, "label": [1, 0, 0, 0]}, r"line 2: 'image' must be a file path"),
        ({"image": "a.png", "label": "1 0 0 0"}, r"line 2: 'label' must be a list"),
        ({"image": "a.png", "label": [1, 0, 0]}, r"line 2: 'label' has 3 entries; expected 4"),
        ({"image": "a.png", "label": [1, 0, 2, 0]}, r"line 2: 'label' \[1, 0, 2, 0\] must hold only 0 and 1"),
        ({"image": "a.png", "label": ["stroma"]}, r"line 2: unknown class stroma; known classes: tumour"),
        ({"image": "a.png", "label": [1, 0, 0, 0], "name": "a"}, r"two patches are named 'a'"),
    ],
)
def test_manifest_errors_give_the_line(tmp_path, line, message):
    write_rgb(tmp_path / "a.png")
    manifest = write_manifest(tmp_path / "m.jsonl", [{"image": "a.png", "label": [1, 0, 0, 0]}, line])
    with pytest.raises(InputDataError, match=message):
        read_patch_manifest(manifest, 4, class_names=NAMES)


def test_manifest_names_a_missing_image_and_its_line(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"image": "gone.png", "label": [1, 0, 0, 0]}])
    with pytest.raises(InputDataError, match=r"gone\.png: image listed on line 1 of .*m\.jsonl not found"):
        read_patch_manifest(manifest, 4)


def test_manifest_needs_class_names_for_named_labels_and_some_patches(tmp_path):
    write_rgb(tmp_path / "a.png")
    manifest = write_manifest(tmp_path / "m.jsonl", [{"image": "a.png", "label": ["necrosis"]}])
    with pytest.raises(InputDataError, match="lists class names; give class_names"):
        read_patch_manifest(manifest, 4)
    with pytest.raises(ValueError, match="class_names has 2 names but num_classes is 4"):
        read_patch_manifest(manifest, 4, class_names=NAMES[:2])
    empty = write_manifest(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(InputDataError, match="empty.jsonl: manifest lists no patches"):
        read_patch_manifest(empty, 4)
    with pytest.raises(InputDataError, match="absent.jsonl: manifest file not found"):
        read_patch_manifest(tmp_path / "absent.jsonl", 4)


# ------------------------------------------------------------------------------- training datalists


def split_manifest(tmp_path: Path) -> Path:
    """Three patches: one in train, one in val, one without a split (train); all but the val one masked."""
    for name in ("a", "b", "c"):
        write_rgb(tmp_path / "patches" / f"{name}.png")
        save_mask(tmp_path / "masks" / f"{name}.png", quadrants())
    return write_manifest(
        tmp_path / "m.jsonl",
        [
            {"image": "patches/a.png", "label": [1, 0, 1, 0], "mask": "masks/a.png", "split": "train"},
            {"image": "patches/b.png", "label": ["necrosis"], "split": "val"},
            {"image": "patches/c.png", "label": [0, 0, 1, 0], "mask": "masks/c.png"},
        ],
    )


def test_patch_labels_come_from_the_folder_without_a_manifest(tmp_path):
    write_rgb(tmp_path / "train" / "p-[1 0 0 1].png")
    assert patch_label_datalist(tmp_path / "train", 4) == read_labelled_patch_folder(tmp_path / "train", 4)
    assert patch_label_datalist(tmp_path / "train", 4, manifest="") == read_labelled_patch_folder(
        tmp_path / "train", 4
    )


def test_patch_labels_come_from_the_manifest_splits_when_given(tmp_path):
    manifest = split_manifest(tmp_path)
    entries = patch_label_datalist(tmp_path / "absent", 4, manifest=manifest, class_names=NAMES)
    assert [e["name"] for e in entries] == ["a", "c"]  # a line without a split is a training line
    assert entries[0]["label"] == [1, 0, 1, 0] and entries[0]["split"] == "train"
    val = patch_label_datalist(tmp_path / "absent", 4, manifest=manifest, class_names=NAMES, splits="val")
    assert [(e["name"], e["label"]) for e in val] == [("b", [0, 1, 0, 0])]
    both = patch_label_datalist(None, 4, manifest=manifest, class_names=NAMES, splits=["train", "val"])
    assert [e["name"] for e in both] == ["a", "b", "c"]


def test_patch_masks_pair_each_training_patch_with_its_mask(tmp_path):
    manifest = split_manifest(tmp_path)
    assert patch_mask_datalist(manifest, 4, class_names=NAMES) == [
        {"image": str(tmp_path / "patches" / "a.png"), "label": str(tmp_path / "masks" / "a.png")},
        {"image": str(tmp_path / "patches" / "c.png"), "label": str(tmp_path / "masks" / "c.png")},
    ]
    assert len(patch_mask_datalist(manifest, 4, splits=("train",), class_names=NAMES)) == 2


def test_training_datalists_name_what_is_missing(tmp_path):
    manifest = split_manifest(tmp_path)
    with pytest.raises(InputDataError, match=r"b\.png has no 'mask'"):
        patch_mask_datalist(manifest, 4, splits=["train", "val"], class_names=NAMES)
    with pytest.raises(InputDataError, match=r"m\.jsonl: manifest lists no patches of split test"):
        patch_mask_datalist(manifest, 4, splits="test", class_names=NAMES)
    with pytest.raises(InputDataError, match="lists no patches of split test"):
        patch_label_datalist(None, 4, manifest=manifest, class_names=NAMES, splits="test")
    with pytest.raises(ValueError, match="splits must be"):
        patch_mask_datalist(manifest, 4, splits=[], class_names=NAMES)


# -------------------------------------------------------------------------------------- masks


def test_read_mask_accepts_palette_grey_and_16_bit_index_images(tmp_path):
    mask = quadrants()
    palette = write_mask(tmp_path / "p.png", mask)
    assert Image.open(palette).mode == "P"
    for path in (palette, save_mask(tmp_path / "l.png", mask), save_mask(tmp_path / "i.png", mask, "I;16")):
        read = read_mask(path, 4)
        assert read.dtype == np.uint8
        np.testing.assert_array_equal(read, mask)


def test_read_mask_refuses_colour_masks(tmp_path):
    path = save_mask(tmp_path / "rgb.png", np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(InputDataError, match=r"rgb\.png: mask is a RGB image; expected a palette \(P\)"):
        read_mask(path, 4)


def test_read_mask_lists_values_out_of_range(tmp_path):
    mask = quadrants()
    mask[0, :2] = (7, 9)
    path = save_mask(tmp_path / "bad.png", mask)
    with pytest.raises(InputDataError, match=r"bad\.png: mask holds values 7, 9 outside 0\.\.4 and 255"):
        read_mask(path, 4)
    assert read_mask(path, 9).max() == 255  # with ten classes, 7 and 9 are valid


def test_read_mask_reports_missing_and_corrupt_files(tmp_path):
    with pytest.raises(InputDataError, match="none.png: mask file not found"):
        read_mask(tmp_path / "none.png", 4)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InputDataError, match="broken.png: not a readable mask image"):
        read_mask(tmp_path / "broken.png", 4)


def test_write_mask_palette_colours_and_round_trip(tmp_path):
    mask = quadrants()
    path = write_mask(tmp_path / "out" / "m.png", mask)
    colours = np.asarray(Image.open(path).convert("RGB"))
    assert tuple(colours[0, 0]) == CLASS_COLOURS[0] == (205, 51, 51)  # LUAD-HistoSeg's tumour red
    assert tuple(colours[0, -1]) == CLASS_COLOURS[4] == (255, 255, 255)  # background
    assert tuple(colours[-1, -1]) == (0, 0, 0)  # ignored
    np.testing.assert_array_equal(read_mask(path, 4), mask)
    grey = write_mask(tmp_path / "grey.png", mask, palette=False)
    assert Image.open(grey).mode == "L"
    np.testing.assert_array_equal(read_mask(grey, 4), mask)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.png"]  # no temporary files left


def test_write_mask_refuses_values_it_cannot_mean(tmp_path):
    with pytest.raises(ValueError, match=r"mask values must be in 0\.\.4 or 255, got 5"):
        write_mask(tmp_path / "m.png", np.full((4, 4), 5))
    with pytest.raises(ValueError, match="2-D integer array"):
        write_mask(tmp_path / "m.png", np.zeros((4, 4), dtype=np.float32))
    assert not (tmp_path / "m.png").exists()


def test_mask_palette_keeps_many_classes_apart():
    palette = mask_palette(20)
    tissue = {tuple(c) for c in palette[:20]}
    assert len(tissue) == 20 and (255, 255, 255) not in tissue
    assert tuple(palette[20]) == (255, 255, 255) and tuple(palette[255]) == (0, 0, 0)


# ------------------------------------------------------------------------- segmentation pairs


def test_segmentation_folder_pairs_by_name_and_derives_labels(tmp_path):
    for name in ("b", "a"):
        write_rgb(tmp_path / "img" / f"{name}.png")
    write_mask(tmp_path / "mask" / "a.png", quadrants())
    write_mask(tmp_path / "mask" / "b.png", np.full((12, 16), 3, dtype=np.uint8))
    entries = read_segmentation_folder(tmp_path / "img", tmp_path / "mask", 4)
    assert entries == [
        {"image": str(tmp_path / "img" / "a.png"), "mask": str(tmp_path / "mask" / "a.png"),
         "label": [1, 0, 1, 0], "name": "a"},
        {"image": str(tmp_path / "img" / "b.png"), "mask": str(tmp_path / "mask" / "b.png"),
         "label": [0, 0, 0, 1], "name": "b"},
    ]


def test_segmentation_folder_reports_a_missing_mask(tmp_path):
    write_rgb(tmp_path / "img" / "a.png")
    (tmp_path / "mask").mkdir()
    with pytest.raises(InputDataError, match=r"img/a\.png: no mask a\.png in .*mask"):
        read_segmentation_folder(tmp_path / "img", tmp_path / "mask", 4)


def test_segmentation_folder_names_both_files_when_sizes_differ(tmp_path):
    write_rgb(tmp_path / "img" / "a.png", 12, 16)
    write_mask(tmp_path / "mask" / "a.png", np.zeros((16, 12), dtype=np.uint8))
    with pytest.raises(InputDataError, match=r"mask/a\.png: mask is 16x12 but image .*img/a\.png is 12x16"):
        read_segmentation_folder(tmp_path / "img", tmp_path / "mask", 4)


# ------------------------------------------------------------------------------------ patches


def test_read_rgb_patch_converts_grey_alpha_and_palette(tmp_path):
    grey = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)
    rgba = np.random.default_rng(1).integers(0, 255, (12, 16, 4), dtype=np.uint8)
    np.testing.assert_array_equal(read_rgb_patch(save_mask(tmp_path / "g.png", grey)), np.dstack([grey] * 3))
    np.testing.assert_array_equal(read_rgb_patch(save_mask(tmp_path / "a.png", rgba)), rgba[..., :3])
    palette = read_rgb_patch(write_mask(tmp_path / "p.png", quadrants()))
    assert palette.shape == (12, 16, 3) and tuple(palette[0, 0]) == CLASS_COLOURS[0]


def test_read_rgb_patch_refuses_16_bit_and_corrupt_files(tmp_path):
    with pytest.raises(InputDataError, match="deep.png: patch is a I;16"):
        read_rgb_patch(save_mask(tmp_path / "deep.png", np.zeros((4, 4), dtype=np.uint8), "I;16"))
    (tmp_path / "cut.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(InputDataError, match="cut.jpg: not a readable patch image"):
        read_rgb_patch(tmp_path / "cut.jpg")
