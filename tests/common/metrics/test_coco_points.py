import json
import logging
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from pycocotools import mask as mask_utils

from common.handlers.point_detection import CocoPointsEvaluationHandler
from common.metrics.coco_points import evaluate_point_detections, fixed_box_iou

NAMES = ["NILM", "ENDO", "INFL", "ASCUS", "LSIL", "HSIL", "ASCH", "SCC"]
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)

GROUND_TRUTH = [
    # NILM, HSIL, NILM
    {"name": "a.png", "points": np.array([[100.0, 100], [400, 120], [250, 300]]), "labels": [0, 5, 0]},
    {"name": "b.png", "points": np.array([[60.0, 70.0]]), "labels": np.array([7])},
    {"name": "empty.png", "points": np.zeros((0, 2)), "labels": np.zeros(0, np.int64)},
]


def _perfect() -> list[dict]:
    return [{**gt, "scores": np.linspace(0.9, 0.8, len(gt["labels"]))} for gt in GROUND_TRUTH]


def test_fixed_box_iou_matches_pycocotools():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 300, (5, 2)), rng.uniform(0, 300, (4, 2))
    boxes = lambda p: np.concatenate([p - 50, np.full_like(p, 100)], axis=1)
    expected = mask_utils.iou(boxes(a).tolist(), boxes(b).tolist(), [0] * 4)
    np.testing.assert_allclose(fixed_box_iou(a, b, 100), expected, rtol=1e-9)
    assert fixed_box_iou([[0, 0]], [[10, 0]], 100)[0, 0] == pytest.approx(90 / 110)


def test_perfect_predictions_score_one_and_absent_classes_are_excluded():
    results = evaluate_point_detections(GROUND_TRUTH, _perfect(), NAMES)
    for key in ("mAP", "mAP50", "agnostic_mAP", "agnostic_mAP50", "recall", "precision"):
        assert results[key] == pytest.approx(1.0), key
    hsil = {"AP": 1, "AP50": 1, "n_ground_truth": 1, "n_predictions": 1}
    assert results["per_class"]["HSIL"] == pytest.approx(hsil)
    assert math.isnan(results["per_class"]["ENDO"]["AP"])
    assert (results["n_images"], results["n_ground_truth"], results["n_predictions"]) == (3, 4, 4)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in results["summary"]
    assert "class-agnostic detection" in results["summary"]


@pytest.mark.parametrize("shift", [3.0, 10.0, 20.0, 40.0])
def test_a_shifted_detection_counts_at_the_iou_thresholds_it_reaches(shift):
    ground_truth = [{"name": "x", "points": [[200.0, 200.0]], "labels": [2]}]
    predictions = [{"name": "x", "points": [[200.0 + shift, 200.0]], "labels": [2], "scores": [0.9]}]
    results = evaluate_point_detections(ground_truth, predictions, NAMES)
    iou = (100 - shift) / (100 + shift)  # boxes of side 100 offset by `shift` along one axis
    assert results["mAP"] == pytest.approx(np.mean(IOU_THRESHOLDS <= iou))
    assert results["agnostic_mAP"] == pytest.approx(results["mAP"])
    assert results["mAP50"] == pytest.approx(1.0 if iou >= 0.5 else 0.0)


def test_a_wrong_class_lowers_classified_but_not_agnostic_map():
    ground_truth = [{"name": "x", "points": [[100, 100], [300, 100]], "labels": [0, 1]}]
    predictions = [{"name": "x", "points": [[100, 100], [300, 100]], "labels": [0, 0], "scores": [0.9, 0.8]}]
    results = evaluate_point_detections(ground_truth, predictions, NAMES)
    assert results["per_class"]["NILM"]["AP"] == pytest.approx(1.0)  # its one cell is found first
    assert results["per_class"]["ENDO"]["AP"] == pytest.approx(0.0)
    assert results["mAP"] == pytest.approx(0.5)
    assert results["agnostic_mAP"] == pytest.approx(1.0)


def test_recall_and_precision_at_the_score_threshold():
    points = [[100, 100], [300, 100], [100, 300], [300, 300]]
    ground_truth = [{"name": "x", "points": points, "labels": [0] * 4}]
    predictions = [
        {
            "name": "x",
            # hits scoring .9, .5 and .2 (below the threshold), a duplicate of the first hit, a miss
            "points": [[102, 100], [300, 95], [100, 300], [98, 101], [600, 600]],
            "labels": [0] * 5,
            "scores": [0.9, 0.5, 0.2, 0.4, 0.8],
        }
    ]
    results = evaluate_point_detections(ground_truth, predictions, NAMES, score_threshold=0.3)
    assert results["recall"] == pytest.approx(2 / 4)
    assert results["precision"] == pytest.approx(2 / 4)
    assert evaluate_point_detections(ground_truth, predictions, NAMES, score_threshold=0.1)["recall"] == 0.75


def test_images_without_predictions():
    results = evaluate_point_detections(GROUND_TRUTH, _perfect()[:1], NAMES)
    assert results["per_class"]["SCC"]["AP"] == 0.0  # b.png's only cell is missed
    assert results["recall"] == pytest.approx(3 / 4)
    nothing = evaluate_point_detections(GROUND_TRUTH, [], NAMES)
    assert nothing["mAP"] == 0.0 and nothing["agnostic_mAP"] == 0.0 and nothing["recall"] == 0.0
    assert math.isnan(nothing["precision"])


def test_crowded_images_warn_about_max_detections(caplog):
    points = [[60.0 * i, 0.0] for i in range(12)]
    ground_truth = [{"name": "x", "points": points, "labels": [0] * 12}]
    predictions = [{"name": "x", "points": points, "labels": [0] * 12, "scores": [0.5] * 12}]
    with caplog.at_level(logging.WARNING, logger="common.handlers.point_detection"):
        capped = evaluate_point_detections(ground_truth, predictions, NAMES, max_detections=10)
    assert capped["agnostic_mAP"] == pytest.approx(10 / 12, abs=0.01)
    assert "raise max_detections" in caplog.text


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="'c.png', which is not in the ground truth"):
        evaluate_point_detections(GROUND_TRUTH, [{"name": "c.png", "points": [], "labels": []}], NAMES)
    with pytest.raises(ValueError, match=r"class indices must lie in 0\.\.7"):
        evaluate_point_detections([{"name": "x", "points": [[1, 1]], "labels": [8]}], [], NAMES)
    with pytest.raises(ValueError, match="1 scores for 2 points"):
        two_points_one_score = {"name": "a.png", "points": [[1, 1], [2, 2]], "labels": [0, 0], "scores": [1]}
        evaluate_point_detections(GROUND_TRUTH, [two_points_one_score], NAMES)
    with pytest.raises(ValueError, match="appears twice"):
        evaluate_point_detections(GROUND_TRUTH + GROUND_TRUTH[:1], [], NAMES)


def _boxes(points: np.ndarray) -> torch.Tensor:
    points = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
    return torch.cat([points - 50, points + 50], dim=1)


def test_handler_on_an_engine(tmp_path, caplog):
    # detections in the engine output; references, as loaded with the image, in the batch
    outputs, batches = [], []
    for gt, pred in zip(GROUND_TRUTH, _perfect()):
        detections = {"points": pred["points"], "scores": pred["scores"], "classes": pred["labels"]}
        outputs.append({key: torch.as_tensor(value) for key, value in detections.items()})
        reference_labels = torch.tensor(gt["labels"])
        batches.append({"name": gt["name"], "boxes": _boxes(gt["points"]), "labels": reference_labels})
    # b.png's SCC cell called NILM, with a score below both true NILM cells
    outputs[1]["classes"], outputs[1]["scores"] = torch.tensor([0]), torch.tensor([0.5])
    iterations = [(batches[:2], outputs[:2]), (batches[2:], outputs[2:])]

    def step(engine, data):
        engine.state.batch, output = data
        return output

    engine = Engine(step)
    CocoPointsEvaluationHandler(NAMES, output_dir=tmp_path).attach(engine)
    with caplog.at_level(logging.INFO, logger="common.handlers.point_detection"):
        engine.run(iterations, max_epochs=1)

    metrics = engine.state.metrics
    # NILM: AP 1 (the false NILM ranks last); HSIL: AP 1; SCC: missed, AP 0
    assert metrics["mAP"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)
    assert metrics["agnostic_mAP"] == pytest.approx(1.0) and metrics["recall"] == pytest.approx(1.0)
    assert "detection over 3 images" in caplog.text
    saved = json.loads((tmp_path / "detection_metrics.json").read_text())
    assert saved["mAP"] == pytest.approx(2 / 3)
    assert saved["per_class"]["ENDO"]["AP"] is None
