import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.errors import InputDataError
from common.transforms.centernet import (
    CenterNetTargetd,
    SwapBoxXYd,
    draw_gaussian,
    gaussian_kernel,
    gaussian_radius,
)


def box(cx: float, cy: float, size: float = 100.0) -> list[float]:
    return [cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2]


def test_gaussian_radius_of_a_100px_box_at_stride_4():
    # h = w = 25 cells, IoU 0.7. Case 1: b = 50, c = 625 * 0.3 / 1.7 -> (50 + sqrt(2058.82)) / 2 = 47.687
    # case 2: a = 4, b = 100, c = 187.5 -> (100 + sqrt(7000)) / 2 = 91.833
    # case 3: a = 2.8, b = -70, c = -187.5 -> (-70 + sqrt(4900 + 2100)) / 2 = 6.833
    assert gaussian_radius(25, 25, 0.7) == pytest.approx(6.8330, abs=1e-4)
    # a flat 40 x 10 box: case 3 = (-70 + sqrt(4900 + 4 * 2.8 * 120)) / 2 = 4.5095
    assert gaussian_radius(10, 40) == pytest.approx(4.5095, abs=1e-4)


def test_gaussian_radius_is_elementwise_and_validated():
    radii = gaussian_radius(np.array([25.0, 10.0]), np.array([25.0, 40.0]))
    assert radii == pytest.approx([gaussian_radius(25, 25), gaussian_radius(10, 40)])
    with pytest.raises(ValueError, match="min_overlap"):
        gaussian_radius(0, 10)


def test_gaussian_kernel_peak_and_sigma():
    kernel = gaussian_kernel(6)
    assert kernel.shape == (13, 13) and kernel[6, 6] == 1.0 and kernel.max() == 1.0
    sigma = 13 / 6
    assert kernel[6, 7] == pytest.approx(math.exp(-1 / (2 * sigma**2)), rel=1e-6)
    assert kernel[8, 9] == pytest.approx(math.exp(-(4 + 9) / (2 * sigma**2)), rel=1e-6)
    np.testing.assert_array_equal(kernel, kernel.T)
    assert gaussian_kernel(0).tolist() == [[1.0]]


def test_draw_gaussian_keeps_the_maximum_and_clips_at_borders():
    heatmap = np.zeros((10, 12), np.float32)
    draw_gaussian(heatmap, (3, 4), 2)
    draw_gaussian(heatmap, (5, 4), 2)
    kernel = gaussian_kernel(2)
    assert heatmap[4, 3] == heatmap[4, 5] == 1.0
    assert heatmap[4, 4] == kernel[2, 3]  # both kernels give the same value halfway: max, not sum
    assert heatmap[4, 1] == kernel[2, 0] and heatmap[4, 7] == kernel[2, 4]
    assert heatmap[4, 8] == 0.0
    corner = draw_gaussian(np.zeros((5, 5), np.float32), (0, 0), 2)
    np.testing.assert_array_equal(corner[:3, :3], kernel[2:, 2:])
    with pytest.raises(ValueError, match="inside"):
        draw_gaussian(heatmap, (12, 0), 2)


def test_target_channels_for_one_box():
    data = {"image": torch.zeros(3, 128, 128), "boxes": np.array([box(50.5, 70.25)], np.float32)}
    target = CenterNetTargetd()(data)["label"]
    assert target.shape == (4, 32, 32) and target.dtype == torch.float32
    # centre / 4 = (12.625, 17.5625): cell x = 12, y = 17
    assert torch.nonzero(target[3]).tolist() == [[17, 12]]
    assert target[0, 17, 12] == 1.0 and (target[0] == 1).sum() == 1
    assert target[1, 17, 12] == pytest.approx(0.625) and target[2, 17, 12] == pytest.approx(0.5625)
    assert target[1:3].abs().sum() == pytest.approx(0.625 + 0.5625)  # offsets only at the centre
    # radius int(6.83) = 6: the Gaussian of gaussian_kernel(6) around the centre, zero beyond
    np.testing.assert_allclose(target[0, 11:24, 6:19].numpy(), gaussian_kernel(6))
    assert target[0].sum() == pytest.approx(gaussian_kernel(6).sum())


def test_two_close_cells_have_two_peaks():
    boxes = np.array([box(40.5, 60.5), box(52.5, 60.5)], np.float32)  # 12 px apart
    target = CenterNetTargetd()({"image": torch.zeros(1, 128, 128), "boxes": boxes})["label"]
    assert torch.nonzero(target[3]).tolist() == [[15, 10], [15, 13]]
    assert target[0, 15, 10] == target[0, 15, 13] == 1.0
    assert target[0, 15, 11] < 1 and target[0, 15, 12] < 1


def test_centres_outside_the_image_are_dropped_and_border_boxes_kept():
    boxes = np.array([box(-10, 50), box(60, 130), box(2, 3), box(127.9, 127.9)], np.float32)
    target = CenterNetTargetd()({"image": torch.zeros(1, 128, 128), "boxes": boxes})["label"]
    assert torch.nonzero(target[3]).tolist() == [[0, 0], [31, 31]]


def test_no_boxes_gives_an_empty_target():
    data = {"image": torch.zeros(3, 64, 64), "boxes": np.zeros((0, 4), np.float32)}
    target = CenterNetTargetd(label_key="target", stride=8)(data)["target"]
    assert target.shape == (4, 8, 8) and target.abs().sum() == 0


def test_min_radius_and_degenerate_boxes():
    boxes = np.array([[20, 20, 20, 20]], np.float32)  # a point annotation
    target = CenterNetTargetd(min_radius=1)({"image": torch.zeros(1, 64, 64), "boxes": boxes})["label"]
    assert (target[0] > 0).sum() == 9


def test_malformed_boxes_name_the_image_file():
    image = MetaTensor(torch.zeros(3, 64, 64), meta={"filename_or_obj": "/data/smear_01.png"})
    with pytest.raises(InputDataError, match="smear_01.png: boxes must be an \\(N, 4\\)"):
        CenterNetTargetd()({"image": image, "boxes": np.array([1.0, 2.0, 3.0])})
    with pytest.raises(InputDataError, match="smear_01.png: .*x2 >= x1"):
        CenterNetTargetd()({"image": image, "boxes": np.array([[10.0, 10.0, 5.0, 20.0]])})


def test_image_size_must_be_a_multiple_of_the_stride():
    with pytest.raises(ValueError, match="multiple of the stride 4"):
        CenterNetTargetd()({"image": torch.zeros(1, 66, 64), "boxes": np.zeros((0, 4))})


def test_swap_box_xy_is_its_own_inverse():
    boxes = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32)
    swapped = SwapBoxXYd("boxes")({"boxes": boxes})
    assert swapped["boxes"].tolist() == [[2, 1, 4, 3], [6, 5, 8, 7]]
    np.testing.assert_array_equal(SwapBoxXYd("boxes")(swapped)["boxes"], boxes)
    assert SwapBoxXYd("boxes")({"boxes": torch.zeros(0, 4)})["boxes"].shape == (0, 4)
