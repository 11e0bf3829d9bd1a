from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose
from PIL import Image
from pycocotools import mask as mask_utils

from common.data.angiogram_images import angiogram_size, read_angiogram
from common.data.angiography import (
    CASS_CATEGORIES,
    STENOSIS_CATEGORIES,
    SYNTAX_SEGMENTS,
    SYNTAX_TO_CASS,
    VesselMaskd,
    main,
    read_angiography_coco,
    read_vessel_folders,
    vessel_mask,
)
from common.data.coco_instances import CocoInstancesd
from common.data.synthetic.angiography import _write_dicom
from common.errors import InputDataError
from common.transforms.io import LoadAngiogramd, LoadBinaryMaskd

H, W = 24, 32
LOAD = Compose([LoadAngiogramd("image"), CocoInstancesd()])
ARCADE_NAMES = (*SYNTAX_SEGMENTS, *STENOSIS_CATEGORIES)


def _box(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _polygon(mask: np.ndarray) -> list[list[float]]:
    """The outline of a rectangular mask as a COCO polygon (pixel edges)."""
    rows, cols = np.nonzero(mask)
    x0, x1, y0, y1 = cols.min(), cols.max() + 1, rows.min(), rows.max() + 1
    return [[float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]]


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of the column-major pixels, starting with zeros."""
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": [H, W], "counts": np.diff(np.concatenate([[0], changes])).tolist()}


SEGMENTS = {"a": _box(2, 2, 12, 6), "b": _box(10, 4, 14, 20), "c": _box(20, 10, 30, 14)}


def _write_png(path: Path, pixels: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixels is None:
        pixels = np.random.default_rng(0).integers(0, 255, (H, W), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _coco(
    folder: Path, categories: list[tuple[int, str]], annotations: list[tuple[int, dict | list]], name="a.json"
):
    """A COCO file with one image ``images/a.png`` and ``(category_id, segmentation)`` annotations."""
    _write_png(folder / "images" / "a.png")
    coco = {
        "images": [{"id": 7, "file_name": "images/a.png", "height": H, "width": W}],
        "annotations": [
            {"id": i, "image_id": 7, "category_id": c, "segmentation": s, "iscrowd": 0}
            for i, (c, s) in enumerate(annotations, start=1)
        ],
        "categories": [{"id": i, "name": n} for i, n in categories],
    }
    path = folder / name
    path.write_text(json.dumps(coco))
    return path


def test_cass_categories_are_matched_by_name_whatever_their_ids(tmp_path):
    categories = [
        (100 + i, name) for i, name in enumerate(reversed(CASS_CATEGORIES))
    ]  # other ids, other order
    ids = {n: i for i, n in categories}
    path = _coco(
        tmp_path,
        categories,
        [
            (ids["left_main"], _polygon(SEGMENTS["a"])),
            (ids["ramus"], _rle(SEGMENTS["b"])),
            (ids["pda"], _uncompressed_rle(SEGMENTS["c"])),
        ],
    )
    (entry,) = read_angiography_coco(path)
    labels = [a["label"] for a in entry["annotations"]]
    assert labels == [CASS_CATEGORIES.index(n) + 1 for n in ("left_main", "ramus", "pda")] == [12, 13, 4]
    assert read_angiography_coco(path, format="cass")[0]["annotations"] == entry["annotations"]
    out = LOAD(entry)
    assert out["image"].shape == (3, H, W) and out["labels"].tolist() == [12, 13, 4]
    for got, key in zip(out["instances"].numpy().astype(bool), "abc"):  # polygon, RLE, uncompressed RLE
        np.testing.assert_array_equal(got, SEGMENTS[key])


def test_arcade_syntax_file_is_mapped_onto_cass(tmp_path):
    ids = {name: i for i, name in enumerate(ARCADE_NAMES, start=1)}
    rle_piece = _box(20, 16, 30, 20)
    path = _coco(
        tmp_path,
        [(i, n) for n, i in ids.items()],
        [
            (ids["5"], _polygon(SEGMENTS["a"])),  # left main
            (ids["9"], _polygon(SEGMENTS["b"])),  # diagonal: no CASS category, dropped
            (ids["13"], _polygon(SEGMENTS["c"])),  # distal circumflex in two pieces, one as RLE
            (ids["13"], _rle(rle_piece)),
            (ids["12a"], _polygon(SEGMENTS["b"])),  # first obtuse marginal
            (ids["15"], _polygon(_box(0, 20, 8, 24))),  # PDA from the circumflex
        ],
    )
    (entry,) = read_angiography_coco(path)
    assert read_angiography_coco(path, format="arcade") == [entry]
    out = LOAD(entry)
    named = {
        CASS_CATEGORIES[label - 1]: mask
        for label, mask in zip(out["labels"].tolist(), out["instances"].numpy())
    }
    assert sorted(named) == ["distal_lcx", "left_main", "obtuse_marginal_1", "pda"]
    np.testing.assert_array_equal(named["distal_lcx"], SEGMENTS["c"] | rle_piece)  # one instance, both pieces
    np.testing.assert_array_equal(named["obtuse_marginal_1"], SEGMENTS["b"])


def test_syntax_mapping_table():
    assert set(SYNTAX_TO_CASS) == set(SYNTAX_SEGMENTS) and len(SYNTAX_SEGMENTS) == 25
    assert set(SYNTAX_TO_CASS.values()) - {None} == set(CASS_CATEGORIES) - {"obtuse_marginal_3"}
    dropped = sorted(s for s, c in SYNTAX_TO_CASS.items() if c is None)
    assert dropped == sorted(["9", "9a", "10", "10a", "14", "14a", "14b", "16", "16a", "16b", "16c"])


def test_arcade_stenosis_file_is_read_as_it_is(tmp_path):
    ids = {name: i for i, name in enumerate(ARCADE_NAMES, start=1)}
    path = _coco(tmp_path, [(i, n) for n, i in ids.items()], [(ids["stenosis"], _polygon(SEGMENTS["a"]))])
    (entry,) = read_angiography_coco(path)
    assert [(a["label"], a["category_id"]) for a in entry["annotations"]] == [(1, 1)]
    assert read_angiography_coco(path, format="arcade_stenosis") == [entry]


def _dicom(path: Path, n_frames: int) -> Path:
    """Frames of 12-bit noise, frame ``k`` with a bright square at column ``4 * k``."""
    frames = np.random.default_rng(1).integers(0, 1000, (n_frames, H, W)).astype(np.uint16)
    for k in range(n_frames):
        frames[k, 2:6, 4 * k : 4 * k + 4] = 4000
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_dicom(path, frames, str(path))
    return path


def _bright_column(image: np.ndarray) -> int:
    return int(np.argmax(image[3, :, 0]))


def test_dicom_frame_choice_single_and_multi_frame(tmp_path):
    run, single = _dicom(tmp_path / "run.dcm", 5), _dicom(tmp_path / "single.dcm", 1)
    assert angiogram_size(run) == angiogram_size(single) == (H, W)
    image = read_angiogram(single)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8 and _bright_column(image) == 0
    assert [_bright_column(read_angiogram(run, k)) for k in range(5)] == [0, 4, 8, 12, 16]
    assert _bright_column(read_angiogram(run)) == 8  # the middle frame by default
    loaded = LoadAngiogramd("image")({"image": str(run), "frame": 3})
    assert "frame" not in loaded and loaded["image"].shape == (3, H, W)
    assert int(np.argmax(loaded["image"][0, 3].numpy())) == 12
    with pytest.raises(InputDataError, match=r"frame 5 asked for, but the file holds 5 frame"):
        read_angiogram(run, 5)
    (tmp_path / "fake.dcm").write_text("not DICOM")
    with pytest.raises(InputDataError, match="not a readable DICOM"):
        read_angiogram(tmp_path / "fake.dcm")


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    ramp = np.tile(np.linspace(0, 4000, W), (H, 1)).astype(np.uint16)
    image = read_angiogram(_write_png(tmp_path / "ramp.png", ramp))
    assert image.dtype == np.uint8 and image.shape == (H, W, 3)
    assert image[0, 0, 0] == 0 and image[0, -1, 0] == 255
    assert (np.diff(image[0, :, 0].astype(int)) >= 0).all()


def test_vessel_mask_is_the_union_of_the_segments(tmp_path):
    ids = {name: i for i, name in enumerate(CASS_CATEGORIES, start=1)}
    path = _coco(
        tmp_path,
        [(i, n) for n, i in ids.items()],
        [(1, _polygon(SEGMENTS["a"])), (2, _rle(SEGMENTS["b"]))],
    )
    union = SEGMENTS["a"] | SEGMENTS["b"]
    (entry,) = read_angiography_coco(path)
    np.testing.assert_array_equal(vessel_mask(entry), union)
    out = Compose([LoadAngiogramd("image"), VesselMaskd()])(entry)
    assert out["label"].shape == (1, H, W) and out["label"].dtype == torch.uint8
    np.testing.assert_array_equal(out["label"][0].numpy(), union)
    assert out["label"].meta["filename_or_obj"] == entry["image"]

    main(["vessel-masks", "--input", str(path), "--output", str(tmp_path / "vessels")])
    entries = read_vessel_folders(tmp_path / "images", tmp_path / "vessels")
    assert [e["name"] for e in entries] == ["a"]
    loaded = LoadBinaryMaskd("label")(entries[0])
    np.testing.assert_array_equal(loaded["label"][0].numpy(), union)


def test_convert_arcade_to_cass_round_trip(tmp_path):
    ids = {name: i for i, name in enumerate(ARCADE_NAMES, start=1)}
    path = _coco(
        tmp_path,
        [(i, n) for n, i in ids.items()],
        [(ids["1"], _polygon(SEGMENTS["a"])), (ids["16"], _rle(SEGMENTS["b"]))],
    )
    output = tmp_path / "out" / "cass.json"
    main(["convert", "--input", str(path), "--output", str(output)])
    coco = json.loads(output.read_text())
    assert [c["name"] for c in coco["categories"]] == list(CASS_CATEGORIES)
    assert coco["images"][0]["file_name"] == "../images/a.png"
    assert [(a["category_id"], a["bbox"], a["area"]) for a in coco["annotations"]] == [
        (1, [2.0, 2.0, 10.0, 4.0], 40)
    ]
    assert read_angiography_coco(output, format="cass")[0]["annotations"][0]["label"] == 1


def test_bad_inputs_get_clear_errors(tmp_path):
    cass = [(i, n) for i, n in enumerate(CASS_CATEGORIES, start=1)]
    unknown = _coco(tmp_path, [*cass, (99, "diagonal")], [(1, _polygon(SEGMENTS["a"]))], "unknown.json")
    with pytest.raises(InputDataError, match=r"unknown category names \['diagonal'\]") as err:
        read_angiography_coco(unknown)
    assert str(unknown) in str(err.value) and "matched by name" in err.value.remedy
    with pytest.raises(InputDataError, match=r"unknown category names \['diagonal'\] for format 'cass'"):
        read_angiography_coco(unknown, format="cass")

    no_segmentation = _coco(tmp_path, cass, [(1, _polygon(SEGMENTS["a"]))], "no_segmentation.json")
    coco = json.loads(no_segmentation.read_text())
    del coco["annotations"][0]["segmentation"]
    no_segmentation.write_text(json.dumps(coco))
    with pytest.raises(InputDataError, match='annotation 1 has no "segmentation"'):
        read_angiography_coco(no_segmentation)

    missing = _coco(tmp_path, cass, [], "missing.json")
    (tmp_path / "images" / "a.png").unlink()
    with pytest.raises(InputDataError, match="not found"):
        read_angiography_coco(missing)

    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"images": [')
    with pytest.raises(InputDataError, match="not valid JSON"):
        read_angiography_coco(malformed)


def test_mask_or_image_of_another_size_is_refused(tmp_path):
    _write_png(tmp_path / "images" / "x.png")
    _write_png(tmp_path / "masks" / "x.png", np.zeros((H + 1, W), dtype=np.uint8))
    with pytest.raises(InputDataError, match=rf"mask is {H + 1}x{W} but image x.png is {H}x{W}"):
        read_vessel_folders(tmp_path / "images", tmp_path / "masks")
    (tmp_path / "masks" / "x.png").unlink()
    with pytest.raises(InputDataError, match="no vessel mask x.png"):
        read_vessel_folders(tmp_path / "images", tmp_path / "masks")

    path = _coco(tmp_path, [(1, "pda")], [(1, _polygon(SEGMENTS["a"]))])
    _write_png(
        tmp_path / "images" / "a.png", np.zeros((H, W + 2), dtype=np.uint8) + np.arange(W + 2, dtype=np.uint8)
    )
    (entry,) = read_angiography_coco(path)
    with pytest.raises(InputDataError, match=rf"image is {H}x{W + 2} but .* gives height x width {H}x{W}"):
        VesselMaskd()(LoadAngiogramd("image")(entry))
