"""Angiography metrics against hand-computed values."""

import math

import numpy as np
import pytest

from common.data.angiography import CASS_CATEGORIES
from common.errors import InputDataError
from common.metrics.angiography import cl_dice, segment_coco_metrics, segment_scores, vessel_scores


def _bar(rows: slice, cols: slice, shape=(12, 24)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return mask


def test_cl_dice_rewards_a_complete_centreline_that_dice_punishes():
    thick_reference = _bar(slice(3, 8), slice(2, 22))  # 5 x 20
    thin_prediction = _bar(slice(4, 6), slice(2, 22))  # 2 x 20 along its middle
    scores = vessel_scores([thin_prediction], [thick_reference])
    assert scores["dice"][0] == pytest.approx(2 * 40 / (100 + 40))
    assert scores["cl_dice"][0] == pytest.approx(1.0)


def test_cl_dice_of_one_pixel_lines_is_the_harmonic_mean_of_precision_and_sensitivity():
    reference, half = _bar(5, slice(0, 20)), _bar(5, slice(0, 10))  # a 1-pixel line is its own skeleton
    assert cl_dice(half, reference) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert cl_dice(reference, reference) == 1.0


def test_empty_masks_and_sizes():
    empty = np.zeros((8, 8), bool)
    assert cl_dice(empty, empty) == 1.0 and cl_dice(empty, _bar(2, slice(0, 4), (8, 8))) == 0.0
    scores = vessel_scores([empty[None]], [empty])  # (1, H, W) and (H, W) both accepted
    assert scores["dice"].tolist() == [1.0] and scores["cl_dice"].tolist() == [1.0]
    with pytest.raises(InputDataError, match="image 0: prediction is"):
        vessel_scores([empty], [np.zeros((8, 9))])


def test_segment_dice_counts_only_images_where_the_segment_appears_and_f1_matches_segments():
    reference = np.zeros((10, 10), np.int64)
    reference[0:2, :] = 1  # proximal_rca, 20 px
    reference[5:7, :] = 2  # mid_rca, 20 px: missed
    predicted = np.zeros_like(reference)
    predicted[0:2, :] = 1  # exact
    predicted[9, :] = 3  # distal_rca: not in the reference
    empty = np.zeros((4, 4), np.int64)
    results = segment_scores([predicted, empty], [reference, empty])
    dice = results["segment_dice"]
    assert (dice["proximal_rca"], dice["mid_rca"], dice["distal_rca"]) == (1.0, 0.0, 0.0)
    assert math.isnan(dice["pda"]) and results["segment_images"]["proximal_rca"] == 1
    assert results["mean_segment_dice"] == pytest.approx(1 / 3)
    assert results["f1"].tolist() == [
        pytest.approx(2 * 1 / (2 + 1 + 1)),
        1.0,
    ]  # TP 1, FP 1, FN 1; empty image
    assert results["mean_f1"] == pytest.approx(0.75)


def test_f1_needs_iou_of_one_half():
    reference = np.zeros((10, 10), np.int64)
    reference[0:4, :] = 5  # 40 px
    shifted = np.zeros_like(reference)
    shifted[2:6, :] = 5  # IoU 20 / 60 = 1/3: a false positive and a false negative
    results = segment_scores([shifted], [reference])
    assert results["segment_dice"]["proximal_lad"] == pytest.approx(0.5)
    assert results["f1"].tolist() == [0.0]
    assert segment_scores([shifted], [reference], iou_threshold=0.3)["f1"].tolist() == [1.0]


def test_segment_scores_reject_bad_labels_and_sizes():
    with pytest.raises(InputDataError, match="labels must lie in 0..14"):
        segment_scores([np.full((3, 3), 15)], [np.zeros((3, 3))])
    with pytest.raises(InputDataError, match="prediction is"):
        segment_scores([np.zeros((3, 3))], [np.zeros((3, 4))])


def test_coco_ap_per_segment():
    instances = np.zeros((2, 16, 16), np.uint8)
    instances[0, 2:6, 2:12], instances[1, 8:14, 4:8] = 1, 1
    ground_truth = [{"name": "a", "instances": instances, "labels": [1, 12]}]
    predictions = [
        {
            "name": "a",
            "masks": instances[:, None].astype(np.float32),
            "boxes": [[2, 2, 12, 6], [4, 8, 8, 14]],
            "scores": [0.9, 0.8],
            "labels": [1, 12],
        }
    ]
    results = segment_coco_metrics(ground_truth, predictions)
    assert results["segm_AP"] == pytest.approx(1.0) and results["bbox_AP75"] == pytest.approx(1.0)
    assert list(results["per_category"]) == list(CASS_CATEGORIES)
    assert results["per_category"]["left_main"]["segm_AP"] == pytest.approx(1.0)
    assert math.isnan(results["per_category"]["pda"]["segm_AP"])
