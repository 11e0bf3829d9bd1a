from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, RandFlipd
from PIL import Image
from pycocotools import mask as mask_utils

from common.data.coco_instances import CocoInstancesd, decode_segmentations, read_coco_instances
from common.data.mask_to_coco import split_and_write
from common.errors import InputDataError
from common.transforms.instances import BoxesFromInstancesd, instance_boxes, label_instances
from common.transforms.io import LoadCellImaged

HEIGHT, WIDTH = 8, 10
IMAGE_A = {"id": 1, "file_name": "a.png", "height": HEIGHT, "width": WIDTH}
LOAD = Compose([LoadCellImaged("image"), CocoInstancesd()])


def _write_image(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _two_lesions(shift: int) -> np.ndarray:
    """A disc and a rectangle, apart, on a 48x64 mask."""
    rows, cols = np.mgrid[:48, :64]
    mask = (rows - 20) ** 2 + (cols - 18 - shift) ** 2 <= 10**2
    mask[30:44, 40 + shift : 58] = True
    return mask


def _dataset(folder: Path) -> list[dict]:
    """Three ISIC-style samples (with their ``truth`` masks): two with two lesions each, one lesion-free."""
    masks = [_two_lesions(0), _two_lesions(4), np.zeros((48, 64), dtype=bool)]
    entries = []
    for i, mask in enumerate(masks):
        image, mask_path = folder / f"ISIC_{i:07d}.png", folder / f"ISIC_{i:07d}_segmentation.png"
        _write_image(image, *mask.shape)
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        entries.append({"image": str(image), "mask": str(mask_path), "name": image.stem, "truth": mask})
    return entries


@pytest.mark.parametrize("segmentation", ["rle", "polygon"])
def test_round_trip_through_mask_to_coco(tmp_path, segmentation):
    images = tmp_path / "images"
    samples = _dataset(images)
    truth = {s["name"]: label_instances(s.pop("truth")) for s in samples}
    paths = split_and_write(samples, tmp_path / "coco", 0.34, segmentation=segmentation, image_root=images)
    seen = []
    for path in paths:
        entries = read_coco_instances(path, image_root=images)
        json.dumps(entries)  # plain JSON values: cacheable and picklable
        for entry in entries:
            assert entry["coco"] == str(path) and (entry["height"], entry["width"]) == (48, 64)
            assert Path(entry["image"]).is_absolute() and entry["image"].endswith(f"{entry['name']}.png")
            out = LOAD(entry)
            expected, instances = truth[entry["name"]], out["instances"]
            assert isinstance(instances, MetaTensor) and instances.dtype == torch.uint8
            assert instances.meta["filename_or_obj"] == entry["image"]
            assert instances.shape == expected.shape and out["labels"].tolist() == [1] * len(expected)
            if segmentation == "rle":
                np.testing.assert_array_equal(instances.numpy(), expected)
            for got, want in zip(instances.numpy().astype(bool), expected.astype(bool)):
                assert (got & want).sum() / (got | want).sum() > 0.9
            seen.append(entry["name"])
    assert sorted(seen) == sorted(truth)


def _coco_file(folder: Path, **changes) -> Path:
    """A hand-made COCO file: image 1 with a nevus (polygon) and a melanoma (RLE), image 2 lesion-free."""
    for name in ("a.png", "sub/b.png"):
        _write_image(folder / "images" / name, HEIGHT, WIDTH)
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((2, 3), np.uint8), ((5, 1), (6, 1)))))
    rle["counts"] = rle["counts"].decode()
    polygon = [[1, 1, 5, 1, 5, 4, 1, 4]]
    nevus = {"id": 1, "image_id": 1, "category_id": 3, "segmentation": polygon, "iscrowd": 0}
    melanoma = {"id": 2, "image_id": 1, "category_id": 7, "segmentation": rle, "iscrowd": 0}
    coco = {
        "images": [IMAGE_A, {"id": 2, "file_name": "sub/b.png", "height": HEIGHT, "width": WIDTH}],
        "annotations": [{**nevus, "bbox": [1, 1, 4, 3]}, {**melanoma, "bbox": [6, 5, 3, 2]}],
        "categories": [{"id": 7, "name": "melanoma"}, {"id": 3, "name": "nevus"}],
    }
    coco.update(changes)
    path = folder / "annotations" / "train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco))
    return path


def test_labels_follow_category_ids_or_class_names(tmp_path):
    path = _coco_file(tmp_path)
    entries = read_coco_instances(path, image_root=tmp_path / "images")
    assert [e["name"] for e in entries] == ["a", "b"]
    assert entries[1]["image"] == str((tmp_path / "images" / "sub" / "b.png").absolute())
    assert [(a["category_id"], a["label"]) for a in entries[0]["annotations"]] == [(3, 1), (7, 2)]
    entries = read_coco_instances(path, tmp_path / "images", class_names=["melanoma", "nevus"])
    assert [a["label"] for a in entries[0]["annotations"]] == [2, 1]
    out = LOAD(entries[0])
    assert out["labels"].tolist() == [2, 1]
    np.testing.assert_array_equal(instance_boxes(out["instances"])[1], [6, 5, 9, 7])  # RLE decoded exactly
    message = f"{path}: category 3 'nevus' is not one of ['melanoma']"
    with pytest.raises(InputDataError, match=re.escape(message)):
        read_coco_instances(path, tmp_path / "images", class_names=["melanoma"])


def test_crowd_annotations_are_dropped_unless_kept(tmp_path):
    counts = [HEIGHT + 2, 2, HEIGHT * WIDTH - HEIGHT - 4]  # uncompressed RLE, as crowd regions often are
    segmentation = {"size": [HEIGHT, WIDTH], "counts": counts}
    crowd = {"id": 9, "image_id": 2, "category_id": 3, "iscrowd": 1, "segmentation": segmentation}
    path = _coco_file(tmp_path, annotations=[crowd])
    assert read_coco_instances(path, tmp_path / "images")[1]["annotations"] == []
    kept = read_coco_instances(path, tmp_path / "images", keep_crowd=True)[1]
    assert kept["annotations"][0]["iscrowd"] == 1
    expected = np.zeros((1, HEIGHT, WIDTH), dtype=np.uint8)
    expected[0, 2:4, 1] = 1  # uncompressed RLE runs down the columns
    np.testing.assert_array_equal(LOAD(kept)["instances"].numpy(), expected)


def test_lesion_free_image_gives_empty_targets(tmp_path):
    entry = read_coco_instances(_coco_file(tmp_path), tmp_path / "images")[1]
    out = Compose([LOAD, BoxesFromInstancesd()])(entry)
    assert isinstance(out["instances"], MetaTensor) and out["instances"].shape == (0, HEIGHT, WIDTH)
    assert out["labels"].shape == (0,) and out["labels"].dtype == torch.int64
    assert out["boxes"].shape == (0, 4)
    assert decode_segmentations([], 3, 4).shape == (0, 3, 4)


def test_flip_moves_image_instances_and_boxes_together(tmp_path):
    entry = read_coco_instances(_coco_file(tmp_path), tmp_path / "images")[0]
    loaded = LOAD(entry)
    boxes = instance_boxes(loaded["instances"])
    flip = Compose([RandFlipd(["image", "instances"], prob=1.0, spatial_axis=1), BoxesFromInstancesd()])
    out = flip(loaded)
    np.testing.assert_array_equal(out["image"].numpy(), loaded["image"].numpy()[:, :, ::-1])
    np.testing.assert_array_equal(out["instances"].numpy(), loaded["instances"].numpy()[:, :, ::-1])
    mirrored = np.stack([WIDTH - boxes[:, 2], boxes[:, 1], WIDTH - boxes[:, 0], boxes[:, 3]], axis=1)
    np.testing.assert_array_equal(out["boxes"].numpy(), mirrored)
    assert out["labels"].tolist() == [1, 2]


def test_image_of_another_size_than_the_json_is_refused(tmp_path):
    path = _coco_file(tmp_path)
    entry = read_coco_instances(path, tmp_path / "images")[0]
    entry["height"] = HEIGHT + 1
    loaded = LoadCellImaged("image")(entry)
    message = f"{tmp_path / 'images' / 'a.png'}: image is {HEIGHT}x{WIDTH} but {path} gives"
    with pytest.raises(InputDataError, match=re.escape(message)):
        CocoInstancesd()(loaded)


def _annotation(**changes) -> dict:
    annotation = {"id": 5, "image_id": 1, "category_id": 3, "segmentation": [[1, 1, 5, 1, 5, 4]]}
    return {"annotations": [{**annotation, **changes}]}


NOT_POLYGONS = "annotation 5: segmentation must be polygons"


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"images": []}, "lists no images"),
        ({"images": [IMAGE_A, IMAGE_A]}, "image id 1 is listed twice"),
        ({"images": [{"id": "1", "file_name": "a.png"}]}, 'an image entry: "id" must be an integer'),
        (_annotation(image_id=4), "annotation 5 refers to unknown image_id 4"),
        (_annotation(category_id=4), "annotation 5 refers to unknown category_id 4"),
        (_annotation(segmentation=[[1, 1, 5, 1]]), NOT_POLYGONS),  # two points: pycocotools would read a box
        (_annotation(segmentation="mask.png"), NOT_POLYGONS),
        (_annotation(segmentation={"counts": "0", "size": [4, 4]}), "annotation 5: RLE size [4, 4] differs"),
        (_annotation(iscrowd="no"), 'annotation 5: "iscrowd" must be 0 or 1'),
    ],
)
def test_malformed_files_are_refused_with_their_name(tmp_path, changes, problem):
    path = _coco_file(tmp_path, **changes)
    with pytest.raises(InputDataError, match=re.escape(f"{path}: {problem}")):
        read_coco_instances(path, tmp_path / "images")


def test_missing_files_and_invalid_json_are_refused(tmp_path):
    path = _coco_file(tmp_path, images=[{"id": 1, "file_name": "gone.png", "height": 8, "width": 10}])
    with pytest.raises(InputDataError, match=f"gone.png' listed in {re.escape(str(path))} not found"):
        read_coco_instances(path, tmp_path / "images")
    with pytest.raises(InputDataError, match="a.png' listed in .*train.json not found"):
        read_coco_instances(_coco_file(tmp_path))  # image_root defaults to the JSON's folder
    path.write_text('{"images": [')
    with pytest.raises(InputDataError, match=re.escape(f"{path}: not valid JSON")):
        read_coco_instances(path)
    with pytest.raises(InputDataError, match=re.escape(f"{tmp_path / 'none.json'}: file not found")):
        read_coco_instances(tmp_path / "none.json")
