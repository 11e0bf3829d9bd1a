from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from common.data.mask_to_coco import build_coco, main, mask_to_instances, split_and_write, split_indices
from common.errors import InputDataError


def lesions() -> np.ndarray:
    """Three lesions: a disc with a square hole, a block on the top border, a diagonal pair of pixels
    (one lesion under 8-connectivity)."""
    mask = np.zeros((64, 80), dtype=bool)
    yy, xx = np.mgrid[:64, :80]
    mask[(yy - 36) ** 2 + (xx - 30) ** 2 < 18**2] = True
    mask[34:38, 28:33] = False
    mask[0:6, 60:75] = True
    mask[50, 70] = mask[51, 71] = True
    return mask


def test_instances_round_trip_through_rle_with_exact_bbox_and_area():
    mask = lesions()
    instances = mask_to_instances(mask)
    assert len(instances) == 3
    decoded = [
        mask_utils.decode({**i["rle"], "counts": i["rle"]["counts"].encode()}).astype(bool) for i in instances
    ]
    np.testing.assert_array_equal(np.logical_or.reduce(decoded), mask)
    border = next(i for i in instances if i["bbox"][1] == 0)
    assert border["bbox"] == [60, 0, 15, 6] and border["area"] == 90
    pair = next(i for i in instances if i["area"] == 2)
    assert pair["bbox"] == [70, 50, 2, 2]
    disc = next(i for i in instances if i["area"] > 100)
    ys, xs = np.nonzero(decoded[instances.index(disc)])
    assert disc["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert disc["area"] == int(decoded[instances.index(disc)].sum())
    json.dumps(instances)  # counts are str, ready for JSON


def test_polygons_are_closed_flat_lists_close_to_the_mask():
    mask = lesions()
    for instance in mask_to_instances(mask):
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in instance["polygons"])
        rle = mask_utils.merge(mask_utils.frPyObjects(instance["polygons"], *mask.shape))
        if instance["area"] > 50:
            filled = instance["area"] + (20 if instance["bbox"][1] > 0 else 0)  # the disc's hole is filled
            assert abs(int(mask_utils.area(rle)) - filled) / filled < 0.05
            overlap = mask_utils.iou([rle], [instance["rle"]], [0])[0, 0]
            assert overlap > 0.9


def test_min_area_drops_specks_and_bad_masks_are_refused():
    mask = lesions()
    disc_area = int(mask.sum()) - 90 - 2
    assert [i["area"] for i in mask_to_instances(mask, min_area=3)] == [90, disc_area]
    with pytest.raises(ValueError, match="2-D bool"):
        mask_to_instances(np.zeros((4, 4), dtype=np.uint8))


def write_sample(folder: Path, name: str, mask: np.ndarray) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(0).integers(0, 255, (*mask.shape, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / f"{name}.jpg")
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{name}_segmentation.png")
    mask_path = folder / f"{name}_segmentation.png"
    return {"image": str(folder / f"{name}.jpg"), "mask": str(mask_path), "name": name}


def test_build_coco_lists_empty_images_and_uses_categories(tmp_path):
    entries = [
        write_sample(tmp_path, "ISIC_0000000", lesions()),
        write_sample(tmp_path, "ISIC_0000001", np.zeros((64, 80), dtype=bool)),
    ]
    entries[0]["category"] = "melanoma"
    coco = build_coco(entries, ("nevus", "melanoma"), image_root=tmp_path)
    assert coco["images"] == [
        {"id": 1, "file_name": "ISIC_0000000.jpg", "height": 64, "width": 80},
        {"id": 2, "file_name": "ISIC_0000001.jpg", "height": 64, "width": 80},
    ]
    assert [a["id"] for a in coco["annotations"]] == [1, 2, 3]
    assert {(a["image_id"], a["category_id"], a["iscrowd"]) for a in coco["annotations"]} == {(1, 2, 0)}
    assert coco["categories"] == [{"id": 1, "name": "nevus"}, {"id": 2, "name": "melanoma"}]
    polygons = build_coco(entries, ("nevus", "melanoma"), segmentation="polygon")
    assert all(isinstance(a["segmentation"], list) for a in polygons["annotations"])
    entries[1]["category"] = "wart"
    with pytest.raises(InputDataError, match=r"ISIC_0000001\.jpg: category 'wart' is not one of"):
        build_coco(entries, ("nevus", "melanoma"))


def test_split_is_deterministic_80_20_and_never_empty():
    train, val = split_indices(10, 0.2, seed=3)
    assert (len(train), len(val)) == (8, 2) and sorted(train + val) == list(range(10))
    assert split_indices(10, 0.2, seed=3) == (train, val)
    assert split_indices(10, 0.2, seed=4) != (train, val)
    assert [len(s) for s in split_indices(2, 0.01, seed=0)] == [1, 1]
    assert [len(s) for s in split_indices(2, 0.99, seed=0)] == [1, 1]
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 1.0, seed=0)


def test_split_and_write_and_cli(tmp_path):
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:20, 10:25] = True
    for i in range(5):
        write_sample(tmp_path / "data", f"ISIC_{i:07d}", mask)
    main(["--images", str(tmp_path / "data"), "--output", str(tmp_path / "coco"), "--polygons"])
    train = json.loads((tmp_path / "coco" / "train.json").read_text())
    val = json.loads((tmp_path / "coco" / "val.json").read_text())
    assert (len(train["images"]), len(val["images"])) == (4, 1)
    assert train["annotations"][0]["bbox"] == [10, 10, 15, 10] and train["annotations"][0]["area"] == 150
    assert isinstance(val["annotations"][0]["segmentation"], list)
    (tmp_path / "data" / "ISIC_0000004_segmentation.png").unlink()
    with pytest.raises(SystemExit, match=r"ISIC_0000004\.jpg: no mask"):
        main(["--images", str(tmp_path / "data"), "--output", str(tmp_path / "coco")])
    assert json.loads((tmp_path / "coco" / "train.json").read_text()) == train  # earlier output kept
    train_json, val_json = split_and_write(
        [write_sample(tmp_path / "two", f"s{i}", mask) for i in range(2)], tmp_path / "out", seed=1
    )
    sizes = [len(json.loads(path.read_text())["images"]) for path in (train_json, val_json)]
    assert sizes == [1, 1]
