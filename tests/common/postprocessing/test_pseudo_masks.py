import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.postprocessing.pseudo_masks import (
    CAMToPseudoMaskd,
    GlassToBackgroundd,
    cams_to_pseudo_mask,
    clean_pseudo_mask,
    normalise_cams,
)

IGNORE = 255
WHITE, PINK = (240, 240, 240), (230, 160, 200)


def _image(height: int, width: int, glass_rows: slice | None = None) -> np.ndarray:
    """(H, W, 3) uint8 pink tissue with optional rows of white glass."""
    image = np.empty((height, width, 3), np.uint8)
    image[:] = PINK
    if glass_rows is not None:
        image[glass_rows] = WHITE
    return image


def test_normalise_cams_divides_each_class_by_its_own_maximum():
    cams = np.array([[[0, 2], [4, 1]], [[0, 0], [0, 0]], [[-1, 3], [0.5, 0]]], np.float32)
    normalised = normalise_cams(torch.from_numpy(cams))
    np.testing.assert_allclose(normalised[0], [[0, 0.5], [1, 0.25]])
    np.testing.assert_array_equal(normalised[1], 0)  # an empty map stays empty
    np.testing.assert_allclose(normalised[2], [[0, 1], [1 / 6, 0]])  # negatives are clipped first
    assert normalised.dtype == np.float32
    with pytest.raises(ValueError, match=r"cams must have shape \(C, H, W\), got \(2, 2\)"):
        normalise_cams(np.zeros((2, 2)))


def test_only_classes_of_the_label_appear():
    cams = np.zeros((4, 8, 8), np.float32)
    cams[1] = 10  # strongest everywhere, but absent from the label
    cams[0, :, :4] = 1
    cams[3, :, 4:] = 1
    mask, confidence = cams_to_pseudo_mask(cams, [1, 0, 0, 1])
    expected = np.zeros((8, 8), np.uint8)
    expected[:, 4:] = 3
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(confidence, 1)
    assert mask.dtype == np.uint8 and confidence.dtype == np.float32


def test_weak_pixels_are_uncertain_on_tissue_and_background_on_glass():
    cams = np.zeros((2, 6, 6), np.float32)
    cams[0, :, :3] = 1.0
    cams[1, :, 3:] = 0.8
    cams[1, :, 5] = 0.1  # below the threshold: 0.1 / 0.8 = 0.125
    image = _image(6, 6, glass_rows=slice(4, 6))
    mask, confidence = cams_to_pseudo_mask(cams, [1, 1], image, thresholds=0.3)
    expected = np.array([[0, 0, 0, 1, 1, IGNORE]] * 4 + [[2] * 6] * 2)
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_allclose(confidence[0], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(confidence[4:], 1)  # background from the tissue mask

    # per-class thresholds: class 1 needs 0.1 only
    mask, _ = cams_to_pseudo_mask(cams, [1, 1], image, thresholds=[0.3, 0.1])
    assert mask[0, 5] == 1
    # no image: no glass; a background threshold makes weak pixels background instead of uncertain
    mask, confidence = cams_to_pseudo_mask(cams, [1, 1], thresholds=0.3, background_threshold=0.2)
    np.testing.assert_array_equal(mask[:, 5], 2)
    np.testing.assert_allclose(confidence[:, 5], 1 - 0.125)
    np.testing.assert_array_equal(mask[:, :5], [[0, 0, 0, 1, 1]] * 6)


def test_ignore_band_leaves_close_calls_uncertain():
    cams = np.zeros((2, 1, 3), np.float32)
    cams[0] = [[1.0, 0.9, 0.2]]
    cams[1] = [[0.1, 0.85, 1.0]]
    mask, _ = cams_to_pseudo_mask(cams, [1, 1], thresholds=0.0, ignore_band=0.1)
    np.testing.assert_array_equal(mask, [[0, IGNORE, 1]])
    mask, _ = cams_to_pseudo_mask(cams, [1, 1], thresholds=0.0)
    np.testing.assert_array_equal(mask, [[0, 0, 1]])


def test_single_class_label_fills_the_tissue():
    cams = np.zeros((3, 4, 4), np.float32)
    cams[2, 0, 0] = 1  # a peaky map: most tissue pixels are far below the threshold
    image = _image(4, 4, glass_rows=slice(3, 4))
    mask, confidence = cams_to_pseudo_mask(cams, [0, 0, 1], image)
    np.testing.assert_array_equal(mask, [[2] * 4] * 3 + [[3] * 4])
    np.testing.assert_array_equal(confidence, 1)
    mask, _ = cams_to_pseudo_mask(cams, [0, 0, 1], image, fill_single_class=False)
    assert mask[0, 0] == 2 and (mask[:3].ravel()[1:] == IGNORE).all()


def test_label_without_classes_gives_background_and_uncertain_pixels():
    cams = np.ones((2, 4, 4), np.float32)
    mask, confidence = cams_to_pseudo_mask(cams, [0, 0], _image(4, 4, glass_rows=slice(0, 1)), thresholds=0.0)
    np.testing.assert_array_equal(mask, [[2] * 4] + [[IGNORE] * 4] * 3)
    np.testing.assert_array_equal(confidence[1:], 0)


def test_small_components_become_uncertain():
    cams = np.zeros((2, 8, 8), np.float32)
    cams[0] = 1
    cams[:, 1:3, 1:3] = [[[0]], [[1]]]  # a 2x2 island of class 1 (4 pixels)
    cams[:, 5:8, 4:8] = [[[0]], [[1]]]  # a 3x4 block (12 pixels)
    mask, confidence = cams_to_pseudo_mask(cams, [1, 1], min_area=5)
    assert (mask[1:3, 1:3] == IGNORE).all() and (confidence[1:3, 1:3] == 0).all()
    assert (mask[5:8, 4:8] == 1).all()
    assert (mask == 0).sum() == 64 - 4 - 12


def test_opening_removes_spurs_and_closing_fills_uncertain_gaps():
    mask = np.full((12, 12), 0, np.uint8)
    mask[2:10, 2:8] = 1
    mask[5, 8:12] = 1  # a 1-pixel-wide spur of class 1 reaching the border
    opened = clean_pseudo_mask(mask, 3, opening_radius=1)
    assert (opened[5, 9:12] == IGNORE).all()
    # the bulk stays but for the 4 corners a disk cannot reach; class 0 along the border stays too
    assert np.count_nonzero(opened[2:10, 2:8] != 1) == 4 and (opened[0] == 0).all()

    gappy = mask.copy()
    gappy[5, 8:12] = 0
    gappy[4:6, 4:6] = IGNORE  # a hole of uncertain pixels inside class 1
    gappy[0, 5] = 1  # ... and a class-1 speck in class 0 (not uncertain: closing must not grow into it)
    closed = clean_pseudo_mask(gappy, 3, closing_radius=2)
    assert (closed[4:6, 4:6] == 1).all()
    np.testing.assert_array_equal(closed[0], gappy[0])

    # pixels claimed by the closings of two labels stay uncertain
    stripes = np.array([[0, 0, IGNORE, 1, 1]] * 3, np.uint8)
    np.testing.assert_array_equal(clean_pseudo_mask(stripes, 2, closing_radius=1), stripes)


def test_shape_and_option_errors_name_the_shapes():
    cams = np.zeros((4, 8, 8))
    shapes = r"label has 3 entries \(shape \(3,\)\) but the cams have 4 classes \(shape \(4, 8, 8\)\)"
    with pytest.raises(ValueError, match=shapes):
        cams_to_pseudo_mask(cams, [1, 0, 0])
    with pytest.raises(ValueError, match=r"image is 8x6 \(shape \(3, 8, 6\)\) but the cams are 8x8"):
        cams_to_pseudo_mask(cams, [1, 0, 0, 1], np.zeros((3, 8, 6)))
    with pytest.raises(ValueError, match="label entries must be 0 or 1"):
        cams_to_pseudo_mask(cams, [1, 0, 0, 2])
    with pytest.raises(ValueError, match=r"thresholds must be one number or one per class \(4\)"):
        cams_to_pseudo_mask(cams, [1, 0, 0, 1], thresholds=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"background_threshold must lie in 0..min\(thresholds\)"):
        cams_to_pseudo_mask(cams, [1, 0, 0, 1], thresholds=0.3, background_threshold=0.5)
    with pytest.raises(ValueError, match="ignore_index must lie in 5..255"):
        cams_to_pseudo_mask(cams, [1, 0, 0, 1], ignore_index=4)
    with pytest.raises(ValueError, match="min_area must be a whole number >= 0"):
        CAMToPseudoMaskd(min_area=-1)


def test_dictionary_transform_keeps_the_metadata():
    cams = torch.zeros(2, 6, 6)
    cams[0, :, :3] = 1
    cams[1, :, 3:] = 1
    meta = {"filename_or_obj": "/data/patch-[1 1].png"}
    image = torch.from_numpy(_image(6, 6, glass_rows=slice(5, 6))).permute(2, 0, 1).float()
    data = {"pred": MetaTensor(cams, meta=meta), "label": torch.tensor([1.0, 1.0]), "image": image}
    out = CAMToPseudoMaskd(keys="pred", closing_radius=1)(data)
    mask, confidence = out["pseudo_mask"], out["pseudo_confidence"]
    assert mask.shape == (1, 6, 6) and mask.dtype == torch.uint8
    assert confidence.shape == (1, 6, 6) and confidence.dtype == torch.float32
    assert mask.meta["filename_or_obj"] == meta["filename_or_obj"]
    np.testing.assert_array_equal(mask[0, 0].numpy(), [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(mask[0, 5].numpy(), 2)
    with pytest.raises(KeyError, match="CAMToPseudoMaskd: no 'image' in the data"):
        CAMToPseudoMaskd(keys="pred")({"pred": cams, "label": torch.tensor([1, 1])})
    no_glass = CAMToPseudoMaskd(keys="pred", image_key=None)({"pred": cams, "label": torch.tensor([1, 1])})
    assert (no_glass["pseudo_mask"] < 2).all()


def _glass_left_pink_right() -> torch.Tensor:
    image = torch.empty(3, 4, 6)
    image[:, :, :3] = 250.0  # bright grey: glass
    image[:, :, 3:] = torch.tensor([230.0, 150.0, 200.0])[:, None, None]  # pale pink: stroma
    return image


def test_glass_to_background_on_scores_and_class_maps():
    image = _glass_left_pink_right()
    scores = torch.zeros(5, 4, 6)
    scores[1] = 1.0  # class 1 everywhere, glass included
    out = GlassToBackgroundd(image_key="image", background_index=4)(
        {"pred": MetaTensor(scores, meta={"filename_or_obj": "a.png"}), "image": image}
    )
    expected = torch.tensor([4, 4, 4, 1, 1, 1]).expand(4, 6)
    assert out["pred"].shape == (1, 4, 6) and out["pred"].dtype == torch.int64
    assert torch.equal(out["pred"][0].as_tensor(), expected)
    assert out["pred"].meta["filename_or_obj"] == "a.png"
    class_map = {"pred": torch.full((1, 4, 6), 2), "image": image}
    assert torch.equal(GlassToBackgroundd(background_index=4)(class_map)["pred"][0], expected.where(expected == 4, 2))


def test_glass_to_background_needs_predictions_of_the_image_size():
    with pytest.raises(ValueError, match="image's size"):
        GlassToBackgroundd()({"pred": torch.zeros(5, 2, 2), "image": _glass_left_pink_right()})
