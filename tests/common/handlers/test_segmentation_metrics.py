import csv
import json
import logging
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator

from common.handlers.segmentation_metrics import SegmentationMetricsHandler

NAMES = ["tumour", "stroma"]  # background (2) is appended
TARGET = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 255], [2, 2, 2, 2]])
PRED = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [2, 2, 0, 0], [2, 2, 2, 2]])
MIOU = (3 / 5 + 4 / 5 + 6 / 7) / 3  # hand-computed in tests/common/metrics/test_semantic_segmentation.py


def _logits(classes: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """(K, H, W) scores whose argmax is ``classes``."""
    return torch.nn.functional.one_hot(classes.clamp(max=channels - 1), channels).permute(2, 0, 1).float()


def _sample(name: str, pred: torch.Tensor, target: torch.Tensor) -> dict:
    meta = {"filename_or_obj": name}
    return {"image": MetaTensor(torch.zeros(3, 4, 4), meta=meta), "pred": pred, "label": target[None]}


def _run(handler: SegmentationMetricsHandler, batches: list) -> Engine:
    engine = Engine(lambda engine, batch: batch)
    handler.attach(engine)
    engine.run(batches, max_epochs=1)
    return engine


def test_metrics_and_report_files(tmp_path, caplog):
    handler = SegmentationMetricsHandler(num_classes=2, class_names=NAMES, output_dir=tmp_path)
    batches = [
        [_sample("/data/a.png", _logits(PRED), TARGET)],  # logits: argmax over channels
        [_sample("/data/b.png", TARGET[None], TARGET)],  # a (1, H, W) class map, a perfect prediction
    ]
    with caplog.at_level(logging.INFO, logger="common.handlers.segmentation_metrics"):
        engine = _run(handler, batches)

    # pooled over both images: reference 8/8/14 pixels, intersections 7/8/13
    iou = [7 / 9, 8 / 9, 13 / 14]
    metrics = engine.state.metrics
    assert metrics["mIoU"] == pytest.approx(np.mean(iou))
    assert metrics["fwIoU"] == pytest.approx((8 * iou[0] + 8 * iou[1] + 14 * iou[2]) / 30)
    assert metrics["pixel_accuracy"] == pytest.approx(28 / 30)
    assert metrics["IoU_tumour"] == pytest.approx(7 / 9)
    assert set(metrics) >= {"mDice", "mBoundaryIoU", "IoU_stroma", "IoU_background"}
    assert "segmentation over 2 images" in caplog.text

    report = json.loads((tmp_path / "segmentation_metrics.json").read_text())
    assert report["mIoU"] == pytest.approx(np.mean(iou))
    assert report["class_names"] == ["tumour", "stroma", "background"]
    assert report["confusion_matrix"] == [[7, 1, 0], [0, 8, 0], [1, 0, 13]]
    with open(tmp_path / "segmentation_metrics_per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["class"] for row in rows] == ["tumour", "stroma", "background"]
    assert float(rows[1]["iou"]) == pytest.approx(8 / 9)


def test_repeated_images_count_once_and_state_resets():
    handler = SegmentationMetricsHandler(num_classes=2)
    batch = [_sample("/data/a.png", PRED, TARGET), _sample("/data/a.png", PRED, TARGET)]
    engine = Engine(lambda engine, batch: batch)
    handler.attach(engine)
    engine.run([batch], max_epochs=2)
    assert engine.state.metrics["mIoU"] == pytest.approx(MIOU)
    assert handler.confusion.total.images == 1


def test_absent_class_is_nan_and_written_as_null(tmp_path):
    handler = SegmentationMetricsHandler(num_classes=3, output_dir=tmp_path, report_name="val")
    target = torch.where(TARGET == 2, 3, TARGET)
    engine = _run(handler, [[_sample("/data/a.png", torch.where(PRED == 2, 3, PRED), target)]])
    assert math.isnan(engine.state.metrics["IoU_class_2"])
    assert engine.state.metrics["mIoU"] == pytest.approx(MIOU)
    report = json.loads((tmp_path / "val.json").read_text())
    assert report["per_class"]["class_2"]["iou"] is None


def test_inside_monai_supervised_evaluator(tmp_path):
    """The network is the identity on images that already are one-hot scores, so every figure is 1."""
    images = [MetaTensor(_logits(TARGET), meta={"filename_or_obj": f"/data/{i}.png"}) for i in range(3)]
    data = [{"image": image, "label": TARGET[None]} for image in images]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(data), batch_size=2),
        network=torch.nn.Identity(),
        val_handlers=[SegmentationMetricsHandler(num_classes=2, output_dir=tmp_path, prefix="val_")],
        key_val_metric=None,
    )
    evaluator.run()
    for key in ("val_mIoU", "val_fwIoU", "val_mDice", "val_mBoundaryIoU", "val_pixel_accuracy"):
        assert evaluator.state.metrics[key] == pytest.approx(1.0), key
    assert json.loads((tmp_path / "segmentation_metrics.json").read_text())["n_images"] == 3


def test_missing_key_and_bad_names_are_reported():
    engine = Engine(lambda engine, _: [{"pred": PRED}])
    SegmentationMetricsHandler(num_classes=2).attach(engine)
    with pytest.raises(KeyError, match="no 'label' in the engine output or batch"):
        engine.run([0], max_epochs=1)
    with pytest.raises(ValueError, match="1 class names for 2 tissue classes"):
        SegmentationMetricsHandler(num_classes=2, class_names=["tumour"])
