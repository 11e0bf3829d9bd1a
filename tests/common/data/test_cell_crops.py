import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from common.data.cell_crops import CellCropDataset, extract_crops
from common.errors import InputDataError


def _image(channels: int = 3, height: int = 64, width: int = 80) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (channels, height, width), generator=generator).float()


def test_integer_centres_give_the_annotated_box():
    image = _image()
    crops = extract_crops(image, torch.tensor([[40, 30], [21, 17]]), crop_size=20, output_size=20)
    assert crops.shape == (2, 3, 20, 20)
    torch.testing.assert_close(crops[0], image[:, 20:40, 30:50], atol=1e-3, rtol=0)
    torch.testing.assert_close(crops[1], image[:, 7:27, 11:31], atol=1e-3, rtol=0)


def test_half_pixel_centre_averages_neighbours():
    image = _image()
    crop = extract_crops(image, np.array([[40.5, 30.0]]), crop_size=4, output_size=4)[0]
    expected = (image[:, 28:32, 38:42] + image[:, 28:32, 39:43]) / 2
    torch.testing.assert_close(crop, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize(("mode", "numpy_mode"), [("constant", "constant"), ("reflect", "symmetric")])
def test_border_padding(mode, numpy_mode):
    image = _image()
    padded = torch.from_numpy(np.pad(image.numpy(), ((0, 0), (10, 10), (10, 10)), mode=numpy_mode))
    # top-left corner and bottom-right corner cells: crops reach 7 and 10 pixels past the border
    crops = extract_crops(image, [[3, 5], [75, 59]], crop_size=20, output_size=20, padding_mode=mode)
    torch.testing.assert_close(crops[0], padded[:, 5:25, 3:23], atol=1e-3, rtol=0)
    torch.testing.assert_close(crops[1], padded[:, 59:79, 75:95], atol=1e-3, rtol=0)
    if mode == "constant":
        assert (crops[0, :, :5, :] == 0).all()


def test_resize_to_output_size_keeps_a_constant_region_constant():
    image = torch.zeros(1, 64, 64)
    image[:, 10:30, 20:40] = 7.0  # the crop around (30, 20) of size 20 is all 7
    crops = extract_crops(image.to(torch.uint8), [[30, 20]], crop_size=20, output_size=56)
    assert crops.shape == (1, 1, 56, 56) and crops.dtype == torch.float32
    torch.testing.assert_close(crops[0, 0, 1:-1, 1:-1], torch.full((54, 54), 7.0))


def test_upsampled_crop_matches_a_bilinear_resize_inside():
    image = _image(1)
    crop = extract_crops(image, [[40, 30]], crop_size=10, output_size=40)[0]
    reference = torch.nn.functional.interpolate(
        image[None, :, 25:35, 35:45], size=(40, 40), mode="bilinear", align_corners=False
    )[0]
    # equal away from the crop's edge, where resize clamps and the crop samples the true neighbours
    torch.testing.assert_close(crop[:, 2:-2, 2:-2], reference[:, 2:-2, 2:-2], atol=1e-3, rtol=0)


def test_metatensor_image_gives_plain_tensor_crops():
    image = MetaTensor(_image(), meta={"filename_or_obj": "a.png"})
    crops = extract_crops(image, torch.tensor([[40.0, 30.0]]), crop_size=20, output_size=20)
    assert type(crops) is torch.Tensor
    torch.testing.assert_close(crops[0], image.as_tensor()[:, 20:40, 30:50], atol=1e-3, rtol=0)


def test_no_points_and_bad_arguments():
    image = _image()
    assert extract_crops(image, np.zeros((0, 2)), crop_size=8, output_size=16).shape == (0, 3, 16, 16)
    with pytest.raises(ValueError, match="padding_mode"):
        extract_crops(image, [[1, 1]], padding_mode="wrap")
    with pytest.raises(ValueError, match=r"\(K, 2\)"):
        extract_crops(image, [1, 1])
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        extract_crops(image[0], [[1, 1]])


def _entry(path, boxes, labels, **extra) -> dict:
    return {"image": str(path), "boxes": np.asarray(boxes, np.float32), "labels": np.asarray(labels), **extra}


def _write_png(path, height=60, width=70, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_dataset_items_follow_the_boxes_in_order(tmp_path):
    first = _write_png(tmp_path / "a.png", seed=1)
    _write_png(tmp_path / "b.png", seed=2)
    _write_png(tmp_path / "c.png", seed=3)
    datalist = [
        _entry(tmp_path / "a.png", [[10, 10, 30, 30], [40, 20, 60, 40]], [5, 2], name="a.png"),
        _entry(tmp_path / "b.png", np.zeros((0, 4)), np.zeros(0, np.int64)),  # an image without cells
        _entry(tmp_path / "c.png", [[0, 0, 20, 20]], [7]),
    ]
    dataset = CellCropDataset(datalist, crop_size=20, output_size=20)
    assert len(dataset) == 3
    assert dataset.labels.tolist() == [5, 2, 7]
    item = dataset[1]
    assert isinstance(item["image"], MetaTensor) and item["image"].shape == (3, 20, 20)
    assert item["image"].meta["filename_or_obj"] == str(tmp_path / "a.png")
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 2
    assert item["name"] == "a.png" and item["point"].tolist() == [50.0, 30.0]
    expected = torch.from_numpy(first[20:40, 40:60]).permute(2, 0, 1).float()
    torch.testing.assert_close(item["image"].as_tensor(), expected, atol=1e-3, rtol=0)
    assert dataset[2]["name"] == "c.png"  # defaults to the file name


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_dataset_crops_near_borders_equal_crops_of_the_whole_image(tmp_path, mode):
    """Items are cut from a window around the centre: it must not change the padding at borders."""
    pixels = _write_png(tmp_path / "a.png", height=60, width=70)
    centres = np.array([[3.0, 5.0], [68.0, 58.0], [0.4, 30.7], [35.5, 0.0]])
    boxes = np.concatenate([centres - 10, centres + 10], axis=1)
    datalist = [_entry(tmp_path / "a.png", boxes, [0] * 4)]
    dataset = CellCropDataset(datalist, crop_size=30, output_size=45, padding_mode=mode)
    image = torch.from_numpy(pixels).permute(2, 0, 1)
    expected = extract_crops(image, centres, crop_size=30, output_size=45, padding_mode=mode)
    for i in range(len(centres)):
        # float32 grid coordinates differ in the last bits between the window and the whole image
        torch.testing.assert_close(dataset[i]["image"].as_tensor(), expected[i], atol=1e-2, rtol=0)


def test_dataset_loads_each_image_once_for_consecutive_crops(tmp_path):
    _write_png(tmp_path / "a.png")
    calls = []

    def loader(path):
        calls.append(path)
        return np.asarray(Image.open(path))

    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [30, 30, 50, 50]], np.float32)
    datalist = [{"image": str(tmp_path / "a.png"), "boxes": boxes, "labels": np.array([0, 1, 2])}]
    dataset = CellCropDataset(datalist, transform=lambda item: item["image"].mean(), image_loader=loader)
    values = [dataset[i] for i in range(len(dataset))]
    assert len(calls) == 1
    assert all(v.ndim == 0 for v in values)  # the transform ran on every item


def test_dataset_errors_name_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    datalist = [_entry(tmp_path / "broken.png", [[0, 0, 10, 10]], [1])]
    with pytest.raises(InputDataError, match="broken.png"):
        CellCropDataset(datalist)[0]
    with pytest.raises(InputDataError, match=r"broken.png: labels have shape \(2,\) for 1 boxes"):
        CellCropDataset([{**datalist[0], "labels": np.array([1, 2])}])
    with pytest.raises(InputDataError, match=r"boxes have shape \(1, 3\)"):
        CellCropDataset([{**datalist[0], "boxes": np.array([[0, 0, 10]])}])
    _write_png(tmp_path / "small.png", height=20, width=20)
    outside = _entry(tmp_path / "small.png", [[30, 0, 40, 10]], [0])
    with pytest.raises(InputDataError, match=r"small.png: cell centre \(35, 5\) lies outside the 20x20"):
        CellCropDataset([outside])[0]
