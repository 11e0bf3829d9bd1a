import numpy as np
import pytest
import torch

from common.transforms.boxes import RandCropBoxesd


def _data():
    image = torch.zeros(3, 100, 120)
    boxes = np.array([[10, 10, 30, 30], [80, 60, 100, 80], [100, 80, 119, 99]], dtype=np.float32)
    for x1, y1, x2, y2 in boxes.astype(int):
        image[:, (y1 + y2) // 2, (x1 + x2) // 2] = 1
    return {"image": image, "boxes": boxes, "labels": np.array([0, 1, 2])}


def test_boxes_move_with_the_window_and_centres_stay_on_their_pixels():
    crop = RandCropBoxesd("image", box_key="boxes", roi_size=(64, 64), box_label_keys="labels").set_random_state(1)
    for _ in range(20):
        out = crop(_data())
        assert out["image"].shape == (3, 64, 64)
        assert len(out["boxes"]) == len(out["labels"])
        for (x1, y1, x2, y2) in out["boxes"]:
            assert out["image"][0, int((y1 + y2) // 2), int((x1 + x2) // 2)] == 1


def test_boxes_are_shifted_not_clipped_and_outside_centres_dropped():
    crop = RandCropBoxesd("image", box_key="boxes", roi_size=(64, 64), box_label_keys="labels")
    crop._start = (0, 0)
    crop.randomize = lambda size: None
    out = crop(_data())
    np.testing.assert_array_equal(out["boxes"], [[10, 10, 30, 30]])
    np.testing.assert_array_equal(out["labels"], [0])


def test_small_images_are_padded_at_the_end():
    crop = RandCropBoxesd("image", box_key="boxes", roi_size=(128, 128), box_label_keys="labels")
    out = crop(_data())
    assert out["image"].shape == (3, 128, 128)
    np.testing.assert_array_equal(out["boxes"], _data()["boxes"])


def test_invalid_roi():
    with pytest.raises(ValueError, match="roi_size"):
        RandCropBoxesd("image", box_key="boxes", roi_size=(0, 10))
