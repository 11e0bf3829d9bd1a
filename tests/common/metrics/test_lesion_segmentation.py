import csv
import json
import logging
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from common.errors import InputDataError
from common.handlers.lesion_segmentation import LesionSegmentationEvaluationHandler
from common.metrics.lesion_segmentation import (
    coco_instance_metrics,
    lesion_overlap_scores,
    overlap_scores,
)

SIZE = 64
COCO_KEYS = ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75")


def _square(x0: int, y0: int, side: int = 20) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    return mask


def _box(mask: np.ndarray) -> list[float]:
    """xyxy box of a mask, in pixel edges (a one-pixel mask at x=3 spans 3..4)."""
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def _reference(name: str, *masks: np.ndarray) -> dict:
    instances = np.stack(masks) if masks else np.zeros((0, SIZE, SIZE), bool)
    return {"name": name, "instances": instances, "labels": np.ones(len(masks), np.int64)}


def _prediction(name: str, *masks: np.ndarray) -> dict:
    return {
        "name": name,
        "masks": np.stack(masks) if masks else np.zeros((0, SIZE, SIZE), bool),
        "boxes": np.array([_box(m) for m in masks], np.float32).reshape(-1, 4),
        "scores": np.linspace(0.9, 0.8, len(masks)),
        "labels": np.ones(len(masks), np.int64),
    }


def test_perfect_predictions_score_one():
    a, b, c = _square(5, 5), _square(35, 30, 15), _square(20, 10, 30)
    ground_truth = [_reference("one.png", a, b), _reference("two.png", c), _reference("empty.png")]
    predictions = [_prediction("one.png", a, b), _prediction("two.png", c), _prediction("empty.png")]
    results = coco_instance_metrics(ground_truth, predictions)
    for key in COCO_KEYS:
        assert results[key] == pytest.approx(1.0), key
    assert (results["n_images"], results["n_references"], results["n_detections"]) == (3, 3, 3)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in results["summary"]
    assert "per_category" not in results
    scores = lesion_overlap_scores([p["masks"] for p in predictions], [g["instances"] for g in ground_truth])
    for values in scores.values():
        np.testing.assert_array_equal(values, [1.0, 1.0, 1.0])  # the empty-empty image scores 1


@pytest.mark.parametrize("shift", [4, 5])
def test_a_shifted_prediction_has_the_known_overlap(shift):
    reference, predicted = _square(20, 20), _square(20 + shift, 20)
    iou = (20 - shift) / (20 + shift)  # squares of side 20 offset along x
    scores = lesion_overlap_scores([predicted], [reference[None]])
    assert scores["jaccard"][0] == pytest.approx(iou)
    assert scores["dice"][0] == pytest.approx((20 - shift) / 20)
    assert scores["thresholded_jaccard"][0] == (pytest.approx(iou) if iou >= 0.65 else 0.0)
    if shift == 4:  # IoU 2/3 reaches the COCO thresholds 0.50..0.65, 4 out of 10
        results = coco_instance_metrics([_reference("x", reference)], [_prediction("x", predicted)])
        for iou_type in ("bbox", "segm"):
            assert results[f"{iou_type}_AP"] == pytest.approx(0.4)
            assert results[f"{iou_type}_AP50"] == pytest.approx(1.0)
            assert results[f"{iou_type}_AP75"] == pytest.approx(0.0)


def test_a_missed_lesion():
    found, missed = _square(5, 5), _square(40, 40, 10)
    results = coco_instance_metrics([_reference("x", found, missed)], [_prediction("x", found)])
    # precision 1 up to recall 0.5, nothing beyond: 51 of COCO's 101 recall points
    assert results["segm_AP"] == pytest.approx(51 / 101)
    assert results["bbox_AP50"] == pytest.approx(51 / 101)
    scores = lesion_overlap_scores([found[None]], [np.stack([found, missed])])
    assert scores["jaccard"][0] == pytest.approx(400 / 500)
    assert scores["dice"][0] == pytest.approx(800 / 900)


def test_images_without_predictions_and_empty_references():
    lesion = _square(10, 10)
    # the second image is not listed in the predictions at all
    ground_truth = [_reference("a", lesion), _reference("b", lesion)]
    results = coco_instance_metrics(ground_truth, [_prediction("a", lesion)])
    assert results["segm_AP50"] == pytest.approx(51 / 101)
    no_lesions = coco_instance_metrics([_reference("a")], [])
    assert all(math.isnan(no_lesions[key]) for key in COCO_KEYS)


def test_overlap_scores_edge_cases():
    # both empty, reference empty but prediction not, prediction empty, partial overlap
    scores = overlap_scores([0, 0, 0, 3], [0, 5, 0, 4], [0, 0, 5, 5])
    np.testing.assert_allclose(scores["jaccard"], [1, 0, 0, 0.5])
    np.testing.assert_allclose(scores["dice"], [1, 0, 0, 6 / 9])
    np.testing.assert_allclose(scores["thresholded_jaccard"], [1, 0, 0, 0])


def test_probability_masks_are_thresholded_and_categories_reported():
    lesion, other = _square(5, 5), _square(35, 35)
    probabilities = np.where(np.stack([lesion, other]), 0.7, 0.3).astype(np.float32)[:, None]
    prediction = {**_prediction("x", lesion, other), "masks": probabilities, "labels": [1, 2]}
    reference = {**_reference("x", lesion, other), "labels": [1, 2]}
    results = coco_instance_metrics([reference], [prediction], category_names=("nevus", "melanoma", "other"))
    assert results["segm_AP"] == pytest.approx(1.0)
    assert results["per_category"]["melanoma"]["segm_AP"] == pytest.approx(1.0)
    assert math.isnan(results["per_category"]["other"]["bbox_AP"])
    above = coco_instance_metrics([reference], [prediction], ("nevus", "melanoma"), mask_threshold=0.8)
    assert above["segm_AP"] == 0.0 and above["bbox_AP"] == pytest.approx(1.0)


def test_bad_inputs_name_the_image():
    lesion = _square(5, 5)
    small = {**_prediction("x.png", lesion), "masks": np.zeros((1, 32, 32), bool)}
    with pytest.raises(InputDataError, match=r"^x\.png: predicted masks of shape \(1, 32, 32\)"):
        coco_instance_metrics([_reference("x.png", lesion)], [small])
    background = {**_reference("x.png", lesion), "labels": [0]}
    with pytest.raises(InputDataError, match=r"x\.png: reference labels must lie in 1\.\.1"):
        coco_instance_metrics([background], [])
    with pytest.raises(InputDataError, match="y.png: predictions for an image that is not in the ground"):
        coco_instance_metrics([_reference("x.png", lesion)], [_prediction("y.png", lesion)])
    with pytest.raises(InputDataError, match="image 0: predicted mask is"):
        lesion_overlap_scores([np.zeros((8, 8))], [lesion])


def test_handler_on_an_engine(tmp_path, caplog):
    a, b = _square(5, 5), _square(20, 20)
    shifted = _square(26, 20)  # IoU 14/26 with b
    cases = [("a.png", [a], [a], a), ("b.png", [b], [shifted], shifted), ("empty.png", [], [], None)]
    iterations = []
    for name, references, predicted, lesion in cases:
        pred = _prediction(name, *predicted)
        output = {
            "pred_masks": torch.as_tensor(pred["masks"], dtype=torch.float32).unsqueeze(1),
            "pred_boxes": torch.as_tensor(pred["boxes"]),
            "pred_scores": torch.as_tensor(pred["scores"]) * (0.5 if name == "b.png" else 1.0),
            "pred_labels": torch.as_tensor(pred["labels"]),
            "lesion_mask": torch.as_tensor(np.zeros((SIZE, SIZE), bool) if lesion is None else lesion)[None],
        }
        ref = _reference(name, *references)
        instances, labels = torch.as_tensor(ref["instances"]), torch.as_tensor(ref["labels"])
        batch = {"name": name, "instances": instances, "labels": labels}
        iterations.append(([batch], [output]))

    def step(engine, data):
        engine.state.batch, output = data
        return output

    engine = Engine(step)
    LesionSegmentationEvaluationHandler(output_dir=tmp_path).attach(engine)
    with caplog.at_level(logging.INFO, logger="common.handlers.lesion_segmentation"):
        engine.run(iterations, max_epochs=1)

    metrics = engine.state.metrics
    assert metrics["jaccard"] == pytest.approx((1 + 14 / 26 + 1) / 3)
    assert metrics["dice"] == pytest.approx((1 + 0.7 + 1) / 3)
    assert metrics["thresholded_jaccard"] == pytest.approx(2 / 3)
    # a (score 0.9) matches at every IoU threshold; b (score 0.45) at 0.5 only: recall 1/2 elsewhere
    expected_ap = (1 + 9 * 51 / 101) / 10
    assert metrics["segm_AP50"] == pytest.approx(1.0)
    assert metrics["segm_AP"] == pytest.approx(expected_ap)
    assert metrics["bbox_AP"] == pytest.approx(expected_ap)
    assert "lesion segmentation over 3 images" in caplog.text

    saved = json.loads((tmp_path / "lesion_metrics.json").read_text())
    assert saved["segm_AP"] == pytest.approx(metrics["segm_AP"])
    assert saved["thresholded_jaccard"] == pytest.approx(2 / 3)
    with open(tmp_path / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["name"] for row in rows] == ["a.png", "b.png", "empty.png"]
    assert float(rows[1]["jaccard"]) == pytest.approx(14 / 26, abs=1e-6)
    assert float(rows[1]["thresholded_jaccard"]) == 0
    assert rows[2]["n_references"] == "0" and float(rows[2]["dice"]) == 1.0
    assert not list(tmp_path.glob(".*.tmp"))
