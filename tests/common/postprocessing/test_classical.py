import numpy as np
import pytest
import torch

from common.metrics.ctc import ctc_scores
from common.postprocessing.classical import otsu_watershed, to_grayscale


def _discs(centres: list[tuple[int, int]], radius: float, shape: tuple[int, int] = (96, 128)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, dtype=np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        labels[np.hypot(yy - cy, xx - cx) <= radius] = i
    return labels


def _render(labels: np.ndarray, cell: float, background: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.where(labels > 0, cell, background) + rng.normal(0, 8, labels.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def test_two_bright_discs_on_dark_background():
    reference = _discs([(30, 30), (60, 90)], radius=12)
    labels = otsu_watershed(_render(reference, cell=200, background=30))
    assert labels.dtype == np.int32 and labels.max() == 2
    scores = ctc_scores(reference, labels)
    assert scores.det == 1.0 and scores.seg > 0.85


def test_dark_cells_on_bright_background_found_automatically():
    reference = _discs([(30, 30), (60, 90), (25, 100)], radius=10)
    image = _render(reference, cell=40, background=220)
    labels = otsu_watershed(image)
    assert labels.max() == 3
    assert ctc_scores(reference, labels).det == 1.0
    assert otsu_watershed(image, invert=False).max() <= 1  # the wrong polarity finds the background


def test_touching_discs_are_split():
    reference = _discs([(48, 50), (48, 72)], radius=13)
    labels = otsu_watershed(_render(reference, cell=200, background=30), min_distance=6)
    assert labels.max() == 2
    assert ctc_scores(reference, labels).seg > 0.8


def test_rgb_channel_first_and_channel_last_agree():
    gray = _render(_discs([(30, 30), (60, 90)], radius=12), cell=200, background=30)
    rgb_last = np.stack([gray, np.zeros_like(gray), np.zeros_like(gray)], axis=-1)  # signal in one channel
    rgb_first = torch.from_numpy(np.moveaxis(rgb_last, -1, 0).copy())
    np.testing.assert_allclose(to_grayscale(rgb_last), gray / 3.0)
    np.testing.assert_array_equal(otsu_watershed(rgb_last), otsu_watershed(rgb_first))
    assert otsu_watershed(rgb_last).max() == 2


def test_debris_smaller_than_min_size_is_removed():
    reference = _discs([(30, 30)], radius=12)
    reference[70:73, 100:103] = 2  # 9-pixel speck
    image = _render(reference, cell=200, background=30)
    assert otsu_watershed(image, min_size=15, smoothing_sigma=0).max() == 1
    assert otsu_watershed(image, min_size=0, smoothing_sigma=0).max() == 2


def test_flat_image_has_no_cells():
    assert otsu_watershed(np.full((32, 32), 7, dtype=np.uint8)).max() == 0


def test_rejects_unknown_layout():
    with pytest.raises(ValueError, match="expected an image of shape"):
        otsu_watershed(np.zeros((5, 32, 32)))


def test_otsu_watershed_transform_keeps_meta():
    from monai.data import MetaTensor

    from common.postprocessing.classical import OtsuWatershedd

    image = np.zeros((3, 64, 64), dtype=np.float32)
    yy, xx = np.mgrid[:64, :64]
    for cy, cx in ((16, 16), (44, 44)):
        image[:, (yy - cy) ** 2 + (xx - cx) ** 2 < 64] = 200.0
    out = OtsuWatershedd(keys="pred", output_key="pred_instances")(
        {"pred": MetaTensor(image, meta={"filename_or_obj": "x.png"})}
    )
    labels = out["pred_instances"]
    assert labels.shape == (1, 64, 64) and labels.dtype == torch.int32
    assert labels.meta["filename_or_obj"] == "x.png"
    assert len(np.unique(labels.numpy())) == 3
