import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.transforms.intensity import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NormalizeImageNet,
    NormalizeImageNetd,
    RandInvertIntensityd,
)


def test_invert_applies_same_draw_to_all_keys():
    data = {"a": torch.full((1, 2, 2), 55.0), "b": torch.full((1, 2, 2), 5.0)}
    always = RandInvertIntensityd(keys=["a", "b"], prob=1.0, max_value=255.0)
    out = always(data)
    assert torch.all(out["a"] == 200) and torch.all(out["b"] == 250)
    never = RandInvertIntensityd(keys=["a", "b"], prob=0.0)
    assert torch.equal(never(data)["a"], data["a"])


def test_invert_probability_is_respected():
    transform = RandInvertIntensityd(keys="a", prob=0.5).set_random_state(seed=0)
    inverted = [bool(transform({"a": np.zeros(1)})["a"][0] == 255) for _ in range(400)]
    assert 0.4 < np.mean(inverted) < 0.6


def _rgb(value_r: float, value_g: float, value_b: float) -> np.ndarray:
    return np.stack([np.full((2, 3), v, np.float32) for v in (value_r, value_g, value_b)])


@pytest.mark.parametrize("input_max", [255, 1.0])
def test_imagenet_mean_colour_maps_to_zero_and_mean_plus_std_to_one(input_max):
    mean = _rgb(*IMAGENET_MEAN) * input_max
    one_std = (_rgb(*IMAGENET_MEAN) + _rgb(*IMAGENET_STD)) * input_max
    normalize = NormalizeImageNetd("image", input_max=input_max)
    np.testing.assert_allclose(np.asarray(normalize({"image": mean})["image"]), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(normalize({"image": one_std})["image"]), 1.0, atol=1e-5)


def test_8bit_and_unit_range_inputs_give_the_same_result():
    image = np.random.default_rng(0).integers(0, 256, (3, 8, 9)).astype(np.uint8)
    from_8bit = NormalizeImageNet(input_max=255)(image)
    from_unit = NormalizeImageNet(input_max=1)(image.astype(np.float32) / 255)
    assert from_8bit.dtype == torch.float32
    np.testing.assert_allclose(np.asarray(from_8bit), np.asarray(from_unit), atol=1e-5)
    expected = (image / 255.0 - np.reshape(IMAGENET_MEAN, (3, 1, 1))) / np.reshape(IMAGENET_STD, (3, 1, 1))
    np.testing.assert_allclose(np.asarray(from_8bit), expected, atol=1e-5)


def test_batches_are_normalised_per_channel_and_plain_tensors_stay_plain():
    batch = torch.rand(2, 3, 4, 4) * 255
    out = NormalizeImageNet(input_max=255)(batch)
    assert type(out) is torch.Tensor and out.shape == batch.shape
    torch.testing.assert_close(out[1], NormalizeImageNet(input_max=255)(batch[1]))


def test_metadata_is_kept():
    image = MetaTensor(torch.full((3, 2, 2), 128, dtype=torch.uint8), meta={"filename_or_obj": "a.png"})
    out = NormalizeImageNetd("image", input_max=255)({"image": image})["image"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    assert out.meta["filename_or_obj"] == "a.png"


@pytest.mark.parametrize("input_max", [0, -1.0, True, "255"])
def test_input_max_must_be_a_positive_number(input_max):
    with pytest.raises(ValueError, match="input_max"):
        NormalizeImageNet(input_max=input_max)


def test_non_rgb_images_are_refused():
    with pytest.raises(ValueError, match="3 \\(R, G, B\\) channels"):
        NormalizeImageNet(input_max=255)(np.zeros((1, 4, 4), np.float32))
