import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from common.errors import InputDataError
from common.transforms.multicrop import MultiCropViewsd

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def _image(channels: int = 3, height: int = 64, width: int = 80, seed: int = 0) -> np.ndarray:
    """Channels with different content, in 0..255 like an 8-bit image loaded by MONAI."""
    rng = np.random.default_rng(seed)
    brightness = np.arange(1, channels + 1, dtype=np.float32)[:, None, None] / channels
    return rng.random((channels, height, width), dtype=np.float32) * 255 * brightness


def _views(out: dict) -> list[torch.Tensor]:
    return [v for k, v in out.items() if k.startswith(("global_", "local_"))]


def test_output_keys_and_shapes():
    transform = MultiCropViewsd(n_global=2, n_local=3, global_size=32, local_size=16)
    out = transform({"image": _image(), "label": 1})
    assert sorted(out) == ["global_0", "global_1", "label", "local_0", "local_1", "local_2"]
    assert all(out[f"global_{i}"].shape == (3, 32, 32) for i in range(2))
    assert all(out[f"local_{i}"].shape == (3, 16, 16) for i in range(3))
    for view in _views(out):
        pixels = view * STD + MEAN
        assert view.dtype == torch.float32 and pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert "image" in MultiCropViewsd(n_local=0, global_size=16, keep_image=True)({"image": _image()})


def test_per_channel_views_repeat_one_channel():
    transform = MultiCropViewsd(n_global=2, n_local=4, global_size=32, local_size=16, p_channel=1.0)
    out = transform({"image": _image()})
    for view in _views(out):
        pixels = view * STD + MEAN
        assert torch.allclose(pixels[0], pixels[1], atol=1e-5)
        assert torch.allclose(pixels[0], pixels[2], atol=1e-5)


def test_all_channel_views_keep_channels_apart():
    transform = MultiCropViewsd(n_global=2, n_local=4, global_size=32, local_size=16, p_channel=0.0)
    out = transform({"image": _image()})
    differs = [not torch.allclose((v * STD + MEAN)[0], (v * STD + MEAN)[1], atol=1e-3) for v in _views(out)]
    assert any(differs)


@pytest.mark.parametrize("channels", [1, 2])
def test_one_and_two_channel_images_become_three_channels(channels):
    out = MultiCropViewsd(n_local=1, global_size=16, local_size=8)({"image": _image(channels)})
    assert all(v.shape[0] == 3 for v in _views(out))


def test_seeded_transforms_are_deterministic():
    def run(seed: int) -> list[torch.Tensor]:
        transform = MultiCropViewsd(n_global=2, n_local=2, global_size=24, local_size=16)
        transform.set_random_state(seed)
        return _views(transform({"image": _image()}))

    first, again, other = run(7), run(7), run(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_unit_range_and_8_bit_range_give_the_same_views():
    image = _image()

    def run(data: np.ndarray) -> list[torch.Tensor]:
        transform = MultiCropViewsd(n_global=2, n_local=2, global_size=24, local_size=16)
        transform.set_random_state(3)
        return _views(transform({"image": data}))

    for a, b in zip(run(image), run(image / 255)):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("shape", [(4, 32, 32), (32, 32), (1, 3, 32, 32)])
def test_wrong_shapes_name_the_file(shape):
    image = MetaTensor(torch.rand(shape), meta={"filename_or_obj": "/data/plate1/img_003.tif"})
    with pytest.raises(InputDataError, match="img_003.tif: 'image' has shape") as err:
        MultiCropViewsd()({"image": image})
    assert "1 to 3 channels" in str(err.value)


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="p_channel"):
        MultiCropViewsd(p_channel=1.5)
    with pytest.raises(ValueError, match="local_scale"):
        MultiCropViewsd(local_scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="exactly one image key"):
        MultiCropViewsd(keys=["image", "label"])
