"""A saved category label map (e.g. CASS segments 1-14) as one instance per category present."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from common.errors import InputDataError
from common.transforms.instances import BoxesFromInstancesd, LoadLabelMapInstancesd, label_map_instances

SHAPE = (24, 32)


def _sample(tmp_path, label_map: np.ndarray, name: str = "map.png") -> dict:
    path = tmp_path / name
    Image.fromarray(label_map.astype(np.uint8)).save(path)
    image = MetaTensor(torch.zeros((3, *label_map.shape)), meta={"filename_or_obj": "angiogram.png"})
    return {"image": image, "label": str(path)}


def test_each_category_present_becomes_one_instance_even_in_pieces(tmp_path):
    label_map = np.zeros(SHAPE, np.uint8)
    label_map[2:5, 1:30] = 14
    label_map[10:12, 3:6] = 5
    label_map[20:22, 25:28] = 5  # a second piece of segment 5: still one instance
    out = LoadLabelMapInstancesd("label", num_labels=14)(_sample(tmp_path, label_map))
    assert out["labels"].tolist() == [5, 14] and out["labels"].dtype == torch.int64
    instances = out["instances"]
    assert isinstance(instances, MetaTensor) and instances.dtype == torch.uint8
    assert instances.shape == (2, *SHAPE) and instances.meta["filename_or_obj"] == "angiogram.png"
    np.testing.assert_array_equal(instances[0].numpy(), label_map == 5)
    np.testing.assert_array_equal(instances[1].numpy(), label_map == 14)
    boxes = BoxesFromInstancesd()(out)["boxes"]
    assert boxes.tolist() == [[3.0, 10.0, 28.0, 22.0], [1.0, 2.0, 30.0, 5.0]]


def test_a_map_without_segments_gives_no_instances(tmp_path):
    out = LoadLabelMapInstancesd("label", num_labels=14)(_sample(tmp_path, np.zeros(SHAPE, np.uint8)))
    assert out["instances"].shape == (0, *SHAPE) and out["labels"].shape == (0,)


def test_values_outside_the_categories_and_wrong_sizes_name_the_file(tmp_path):
    label_map = np.zeros(SHAPE, np.uint8)
    label_map[:3, :3], label_map[5:8, 5:8] = 15, 255
    sample = _sample(tmp_path, label_map, "bad.png")
    with pytest.raises(InputDataError, match=r"bad\.png: label map holds values 15, 255 outside 0\.\.14"):
        LoadLabelMapInstancesd("label", num_labels=14)(sample)
    small = _sample(tmp_path, np.zeros((8, 8), np.uint8), "small.png") | {"image": sample["image"]}
    with pytest.raises(InputDataError, match=r"small\.png: label map is 8x8 but its image is 24x32"):
        LoadLabelMapInstancesd("label", num_labels=14)(small)
    colour = tmp_path / "colour.png"
    Image.new("RGB", (4, 4)).save(colour)
    with pytest.raises(InputDataError, match=r"colour\.png: label map is a RGB image"):
        LoadLabelMapInstancesd("label", num_labels=14)({**sample, "label": str(colour)})
    with pytest.raises(InputDataError, match=r"missing\.png: label map file not found"):
        LoadLabelMapInstancesd("label", num_labels=14)({**sample, "label": str(tmp_path / "missing.png")})


def test_label_map_instances_takes_a_channel_first_tensor():
    instances, labels = label_map_instances(torch.tensor([[[0, 3], [3, 1]]]), num_labels=3)
    assert labels.tolist() == [1, 3] and instances.tolist() == [[[0, 0], [0, 1]], [[0, 1], [1, 0]]]
    with pytest.raises(ValueError, match="num_labels must be a positive integer"):
        LoadLabelMapInstancesd("label", num_labels=0)
