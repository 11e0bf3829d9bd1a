import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from common.data.histopathology import write_mask
from common.errors import InputDataError
from common.metrics.semantic_segmentation import (
    SegmentationConfusion,
    boundary_band,
    evaluate_mask_pairs,
    main,
)

IGNORE = 255

# 2 tissue classes (0, 1), background 2, one ignored reference pixel
TARGET = np.array(
    [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 2, IGNORE],
        [2, 2, 2, 2],
    ]
)
PRED = np.array(
    [
        [0, 1, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 0, 0],
        [2, 2, 2, 2],
    ]
)


def _square(size: int, rows: slice, cols: slice, inside: int, outside: int) -> np.ndarray:
    mask = np.full((size, size), outside)
    mask[rows, cols] = inside
    return mask


def test_perfect_prediction_scores_one():
    confusion = SegmentationConfusion(num_classes=2)
    confusion.update(TARGET, TARGET)
    report = confusion.report(["tumour", "stroma"])
    for key in ("mIoU", "fwIoU", "mDice", "mBoundaryIoU", "pixel_accuracy", "coverage"):
        assert report[key] == pytest.approx(1.0), key
    assert list(report["per_class"]) == ["tumour", "stroma", "background"]


def test_hand_computed_confusion_of_a_4x4_example():
    confusion = SegmentationConfusion(num_classes=2)
    confusion.update(torch.from_numpy(PRED)[None], TARGET)  # (1, H, W) tensors are accepted
    report = confusion.report()
    # rows: reference 0, 1, 2 (the ignored reference pixel is left out, whatever its prediction)
    assert report["confusion_matrix"] == [[3, 1, 0], [0, 4, 0], [1, 0, 6]]
    per_class = report["per_class"]
    iou = [per_class[name]["iou"] for name in ("class_0", "class_1", "background")]
    dice = [per_class[name]["dice"] for name in ("class_0", "class_1", "background")]
    assert iou == pytest.approx([3 / 5, 4 / 5, 6 / 7])
    assert dice == pytest.approx([6 / 8, 8 / 9, 12 / 13])
    assert report["mIoU"] == pytest.approx((3 / 5 + 4 / 5 + 6 / 7) / 3)
    assert report["mDice"] == pytest.approx((6 / 8 + 8 / 9 + 12 / 13) / 3)
    # frequency-weighted: reference pixels 4, 4, 7 of 15
    assert report["fwIoU"] == pytest.approx((4 * 3 / 5 + 4 * 4 / 5 + 7 * 6 / 7) / 15)
    assert report["pixel_accuracy"] == pytest.approx(13 / 15)
    assert per_class["background"]["reference_pixels"] == 7
    assert per_class["class_1"]["predicted_pixels"] == 5


def test_absent_class_is_nan_and_left_out_of_the_means():
    confusion = SegmentationConfusion(num_classes=3)  # class 2 never occurs; background is 3
    target = np.where(TARGET == 2, 3, TARGET)
    pred = np.where(PRED == 2, 3, PRED)
    confusion.update(pred, target)
    report = confusion.report()
    absent = report["per_class"]["class_2"]
    assert math.isnan(absent["iou"]) and math.isnan(absent["dice"]) and math.isnan(absent["boundary_iou"])
    assert report["mIoU"] == pytest.approx((3 / 5 + 4 / 5 + 6 / 7) / 3)
    # a class that is only predicted scores 0, and counts
    confusion.reset()
    confusion.update(np.where(pred == 0, 2, pred), target)
    assert confusion.report()["per_class"]["class_2"]["iou"] == 0.0
    assert confusion.report()["per_class"]["class_0"]["iou"] == 0.0


def test_predicted_ignore_pixels_are_missed_or_excluded():
    pred = PRED.copy()
    pred[0, 0] = IGNORE  # a reference-0 pixel the prediction leaves unlabelled
    missed = SegmentationConfusion(num_classes=2)
    missed.update(pred, TARGET)
    report = missed.report()
    # 2 / (4 reference + 3 predicted - 2)
    assert report["per_class"]["class_0"]["iou"] == pytest.approx(2 / 5)
    assert report["pixel_accuracy"] == pytest.approx(12 / 15)
    assert report["coverage"] == pytest.approx(14 / 15)

    excluded = SegmentationConfusion(num_classes=2, ignored_predictions="exclude")
    excluded.update(pred, TARGET)
    report = excluded.report()
    assert report["per_class"]["class_0"]["iou"] == pytest.approx(2 / 4)  # 2 / (3 + 3 - 2)
    assert report["pixel_accuracy"] == pytest.approx(12 / 14)
    assert report["coverage"] == pytest.approx(14 / 15)


def test_background_excluded_like_luad_histoseg():
    confusion = SegmentationConfusion(num_classes=2, include_background=False)
    confusion.update(PRED, TARGET)
    report = confusion.report()
    assert report["confusion_matrix"] == [[3, 1, 0], [0, 4, 0], [0, 0, 0]]
    assert math.isnan(report["per_class"]["background"]["iou"])
    assert report["mIoU"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    assert report["fwIoU"] == pytest.approx((4 * 3 / 4 + 4 * 4 / 5) / 8)


def _reference_band(mask: np.ndarray, width: int) -> np.ndarray:
    """Cheng et al.'s definition: the mask minus its erosion by a 3x3 square, width times, zero-padded."""
    eroded = ndimage.binary_erosion(np.pad(mask, 1), np.ones((3, 3)), iterations=width)[1:-1, 1:-1]
    return mask & ~eroded


@pytest.mark.parametrize("width", [1, 2, 4])
def test_boundary_band_matches_iterated_erosion(width):
    rng = np.random.default_rng(width)
    mask = ndimage.binary_opening(rng.random((40, 50)) > 0.4)
    mask[:3, :] = True  # touches the image edge
    np.testing.assert_array_equal(boundary_band(mask, width), _reference_band(mask, width))
    assert not boundary_band(np.zeros((5, 5), bool), width).any()


def test_boundary_iou_of_a_shifted_square():
    # 10x10 image, diagonal 14.1: a ratio of 0.1 gives a 1-pixel band; class 0 is a 6x6 square
    target = _square(10, slice(2, 8), slice(2, 8), inside=0, outside=1)
    pred = _square(10, slice(2, 8), slice(3, 9), inside=0, outside=1)  # shifted right by one
    confusion = SegmentationConfusion(num_classes=1, boundary_ratio=0.1)
    confusion.update(pred, target)
    report = confusion.report()
    # square rings of 20 pixels overlap on 5 + 5 pixels of the top and bottom rows
    assert report["per_class"]["class_0"]["boundary_iou"] == pytest.approx(10 / 30)
    # background bands: the image-edge ring (36) plus the ring around the square (28, of which the
    # prediction's shares 8 with the edge ring); they share the edge ring and 7 + 7 pixels
    assert report["per_class"]["background"]["boundary_iou"] == pytest.approx(50 / 70)
    assert report["mBoundaryIoU"] == pytest.approx((10 / 30 + 50 / 70) / 2)
    assert report["per_class"]["class_0"]["iou"] == pytest.approx(30 / 42)
    np.testing.assert_array_equal(confusion.total.boundary_intersection, [10, 50])
    np.testing.assert_array_equal(confusion.total.boundary_union, [30, 70])


def test_counts_pool_over_images():
    confusion = SegmentationConfusion(num_classes=2)
    first = confusion.update(PRED, TARGET)
    second = confusion.update(TARGET, TARGET)
    np.testing.assert_array_equal(confusion.total.confusion, first.confusion + second.confusion)
    assert confusion.report()["n_images"] == 2
    pooled = SegmentationConfusion(num_classes=2)
    pooled.add(first + second)
    assert pooled.report()["mIoU"] == confusion.report()["mIoU"]


def test_invalid_input_is_reported():
    confusion = SegmentationConfusion(num_classes=2)
    with pytest.raises(ValueError, match=r"pred has shape \(4, 3\) but target has shape \(4, 4\)"):
        confusion.update(PRED[:, :3], TARGET)
    with pytest.raises(ValueError, match=r"pred has values \[7\] outside 0\.\.2 and 255"):
        confusion.update(np.full((4, 4), 7), TARGET)
    with pytest.raises(ValueError, match=r"target class map must be \(H, W\) or \(1, H, W\)"):
        confusion.update(PRED, np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="4 class names for 2 tissue classes: give 2 names, or 3"):
        confusion.report(["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="ignore_index 2 collides"):
        SegmentationConfusion(num_classes=2, ignore_index=2)
    with pytest.raises(ValueError, match="ignored_predictions must be one of"):
        SegmentationConfusion(num_classes=2, ignored_predictions="drop")
    assert json.dumps(confusion.report(["a", "b", "bg"])["class_names"]) == '["a", "b", "bg"]'


def _write_masks(folder, masks: dict) -> None:
    folder.mkdir(parents=True)
    for name, mask in masks.items():
        write_mask(folder / f"{name}.png", np.asarray(mask), num_classes=2)


def test_command_line_scores_folders_paired_by_name(tmp_path, capsys):
    _write_masks(tmp_path / "gt", {"a-[1 1]": TARGET, "b-[1 1]": TARGET})
    # predictions: one per reference, plus one without a reference (not scored)
    _write_masks(tmp_path / "pred", {"a-[1 1]": PRED, "b-[1 1]": TARGET, "extra": PRED})
    output = tmp_path / "report.json"
    folders = ["--pred-dir", str(tmp_path / "pred"), "--gt-dir", str(tmp_path / "gt"), "--num-classes", "2"]
    main([*folders, "--class-names", "tumour", "stroma", "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["n_images"] == 2
    assert report["confusion_matrix"] == [[7, 1, 0], [0, 8, 0], [1, 0, 13]]
    assert report["per_class"]["tumour"]["iou"] == pytest.approx(7 / 9)
    assert "segmentation over 2 images" in capsys.readouterr().out

    (tmp_path / "pred" / "b-[1 1].png").unlink()
    with pytest.raises(SystemExit, match=r"b-\[1 1\]\.png: no prediction .*pred/b-\[1 1\]\.png"):
        main(folders)


def test_mask_pairs_of_different_sizes_name_both_files(tmp_path):
    _write_masks(tmp_path / "gt", {"a": TARGET})
    _write_masks(tmp_path / "pred", {"a": PRED[:3]})
    pairs = [(tmp_path / "pred" / "a.png", tmp_path / "gt" / "a.png")]
    sizes = r"pred/a\.png: prediction is 3x4 but reference .*gt/a\.png is 4x4"
    with pytest.raises(InputDataError, match=sizes):
        evaluate_mask_pairs(pairs, num_classes=2)
