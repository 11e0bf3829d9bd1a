import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    Rand2DElasticd,
    RandAffined,
    RandCoarseDropoutd,
    RandFlipd,
    RandRotate90d,
    RandTorchVisiond,
)

from common.transforms.instances import BoxesFromInstancesd, MaskToInstancesd, instance_boxes, label_instances

SIZE = 96
SPATIAL = ["image", "instances"]


def _lesion_sample() -> dict:
    """Grey noisy skin with two pure-red lesions (an ellipse and a disc) and their binary mask."""
    rows, cols = np.mgrid[:SIZE, :SIZE]
    mask = ((rows - 30) / 16) ** 2 + ((cols - 34) / 22) ** 2 <= 1
    mask |= (rows - 68) ** 2 + (cols - 66) ** 2 <= 13**2
    image = np.random.default_rng(0).uniform(0.4, 0.6, (1, SIZE, SIZE)).repeat(3, axis=0)
    image[:, mask] = np.array([1.0, 0.0, 0.0])[:, None]
    return {
        "image": MetaTensor(torch.as_tensor(image, dtype=torch.float32)),
        "mask": MetaTensor(torch.as_tensor(mask[None], dtype=torch.float32)),
    }


def _training_chain() -> Compose:
    """The augmentation recommended for the dermoscopy Mask R-CNN bundle."""
    return Compose(
        [
            MaskToInstancesd(),
            RandFlipd(SPATIAL, prob=0.5, spatial_axis=0),
            RandFlipd(SPATIAL, prob=0.5, spatial_axis=1),
            RandRotate90d(SPATIAL, prob=0.5, max_k=3),
            RandAffined(
                SPATIAL,
                prob=1.0,
                rotate_range=np.pi,
                translate_range=(8, 8),
                scale_range=(0.15, 0.15),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            Rand2DElasticd(
                SPATIAL,
                prob=1.0,
                spacing=(24, 24),
                magnitude_range=(0, 1),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandTorchVisiond(
                "image", name="ColorJitter", brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02
            ),
            RandCoarseDropoutd(
                "image", holes=2, spatial_size=6, max_spatial_size=12, fill_value=0.0, prob=1.0
            ),
            BoxesFromInstancesd(),
        ]
    )


def _extents(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask)
    return [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_spatial_augmentation_keeps_image_masks_and_boxes_aligned():
    chain = _training_chain().set_random_state(seed=3)
    for _ in range(4):
        out = chain(_lesion_sample())
        image = out["image"].numpy()
        instances = out["instances"].numpy()
        assert instances.dtype == np.uint8 and instances.shape[1:] == (SIZE, SIZE)
        assert len(instances) == len(out["boxes"]) == len(out["labels"]) >= 1
        # pixels zeroed by the dropout or brought in by the padding carry no colour to compare with
        visible = image.any(axis=0)
        red = (image[0] - image[1] > 0.5) & visible
        covered = instances.any(axis=0) & visible
        iou = (red & covered).sum() / (red | covered).sum()
        assert iou > 0.9
        for channel, box in zip(instances, out["boxes"].numpy()):
            np.testing.assert_array_equal(box, _extents(channel))
        assert out["labels"].dtype == torch.int64 and (out["labels"] == 1).all()


def test_chain_handles_an_image_without_lesions():
    sample = _lesion_sample()
    sample["mask"] = sample["mask"] * 0
    out = _training_chain().set_random_state(seed=0)(sample)
    assert out["instances"].shape == (0, SIZE, SIZE)
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)


def test_lesions_are_eight_connected_and_specks_dropped():
    mask = np.zeros((1, 8, 10), dtype=np.uint8)
    mask[0, 1, 1] = mask[0, 2, 2] = 1  # diagonal neighbours: one lesion
    mask[0, 5:7, 5:9] = 1
    mask[0, 0, 9] = 1  # one-pixel speck
    np.testing.assert_array_equal(label_instances(mask).sum(axis=(1, 2)), [1, 2, 8])  # row-major order
    out = MaskToInstancesd(min_area=2, label=3)({"mask": MetaTensor(torch.as_tensor(mask))})
    assert isinstance(out["instances"], MetaTensor) and out["instances"].dtype == torch.uint8
    assert out["instances"].shape == (2, 8, 10)
    np.testing.assert_array_equal(out["labels"], [3, 3])


def test_boxes_are_x_first_on_pixel_edges():
    instances = np.zeros((2, 6, 8), dtype=np.uint8)
    instances[0, 1:3, 2:7] = 1
    instances[1, 5, 0] = 1
    np.testing.assert_array_equal(instance_boxes(instances), [[2, 1, 7, 3], [0, 5, 1, 6]])


def test_vanished_instances_are_dropped_with_their_labels():
    instances = torch.zeros(3, 10, 10)
    instances[0, 2:5, 2:5] = 0.9  # interpolated values are re-binarised at 0.5
    instances[1, 0, 0] = 0.4
    instances[2, 7:9, 6:10] = 1
    data = {"instances": instances, "labels": torch.tensor([1, 2, 3])}
    out = BoxesFromInstancesd(min_area=2)(data)
    assert out["instances"].dtype == torch.uint8 and out["instances"].shape == (2, 10, 10)
    np.testing.assert_array_equal(out["labels"], [1, 3])
    np.testing.assert_array_equal(out["boxes"], [[2, 2, 5, 5], [6, 7, 10, 9]])
    assert out["boxes"].dtype == torch.float32


def test_labels_that_do_not_match_the_instances_are_rejected():
    with pytest.raises(ValueError, match="2 instances but 1 labels"):
        BoxesFromInstancesd()({"instances": torch.ones(2, 4, 4), "labels": torch.tensor([1])})
    with pytest.raises(ValueError, match="label must be >= 1"):
        MaskToInstancesd(label=0)
