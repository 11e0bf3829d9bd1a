import csv
import json
import logging

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator

from common.handlers.classification_report import ClassificationReportHandler

NAMES = ["NILM", "LSIL", "HSIL", "SCC"]
# class 3 (SCC) has no samples and is never predicted
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2]
Y_PRED = [0, 0, 1, 1, 2, 2, 2, 2, 0]
CM = np.array([[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 3, 0], [0, 0, 0, 0]])
BALANCED = (2 / 3 + 1 / 2 + 3 / 4) / 3


def _one_hot(index: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(index), 4).float()


def _logits(index: int) -> torch.Tensor:
    return torch.full((4,), -1.0).index_fill_(0, torch.tensor(index), 2.0)


def test_handler_on_an_engine_writes_the_report(tmp_path, caplog):
    samples = [{"pred": _logits(p), "label": torch.tensor(t)} for t, p in zip(Y_TRUE, Y_PRED)]
    samples[0]["label"] = _one_hot(Y_TRUE[0])  # one-hot labels work too
    batches = [samples[:4], samples[4:]]
    engine = Engine(lambda engine, batch: batch)
    ClassificationReportHandler(NAMES, output_dir=tmp_path).attach(engine)
    with caplog.at_level(logging.INFO, logger="common.handlers.classification_report"):
        engine.run(batches, max_epochs=2)  # the second epoch starts from scratch

    assert engine.state.metrics["val_balanced_accuracy"] == pytest.approx(BALANCED)
    assert engine.state.metrics["val_accuracy"] == pytest.approx(6 / 9)
    assert "HSIL" in caplog.text and "balanced accuracy 0.6389" in caplog.text
    report = json.loads((tmp_path / "classification_report.json").read_text())
    assert report["confusion_matrix"] == CM.tolist()
    with open(tmp_path / "confusion_matrix.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true \\ predicted", *NAMES]
    assert rows[3] == ["HSIL", "1", "0", "3", "0"]
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_prediction_shape_is_reported():
    engine = Engine(lambda engine, batch: batch)
    ClassificationReportHandler(NAMES).attach(engine)
    with pytest.raises(ValueError, match=r"'pred' has shape \(3,\)"):
        engine.run([[{"pred": torch.zeros(3), "label": torch.tensor(0)}]], max_epochs=1)


def test_inside_monai_supervised_evaluator():
    """Inputs that already are logits through an identity network: the handler must find ``pred``
    in MONAI's decollated output and ``label`` beside it."""
    data = [{"image": _logits(p), "label": torch.tensor(t)} for t, p in zip(Y_TRUE, Y_PRED)]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(data), batch_size=4),
        network=torch.nn.Identity(),
    )
    ClassificationReportHandler(NAMES, prefix="").attach(evaluator)
    evaluator.run()
    assert evaluator.state.metrics["balanced_accuracy"] == pytest.approx(BALANCED)
    assert evaluator.state.metrics["accuracy"] == pytest.approx(6 / 9)


def test_screening_view_with_per_image_counts(tmp_path):
    """Through MONAI's evaluator, with image names collated beside the labels as CellCropDataset gives
    them: the screening metrics, the JSON section and the per-image CSV."""
    images = ["a.png"] * 4 + ["b.png"] * 5
    data = [{"image": _logits(p), "label": torch.tensor(t), "name": n} for t, p, n in zip(Y_TRUE, Y_PRED, images)]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(Dataset(data), batch_size=4), network=torch.nn.Identity()
    )
    ClassificationReportHandler(
        NAMES, output_dir=tmp_path, prefix="test", abnormal_classes=["LSIL", "HSIL", "SCC"], image_key="name"
    ).attach(evaluator)
    evaluator.run()
    assert evaluator.state.metrics["test_screening_sensitivity"] == pytest.approx(5 / 6)
    assert evaluator.state.metrics["test_screening_specificity"] == pytest.approx(2 / 3)
    report = json.loads((tmp_path / "classification_report.json").read_text())
    assert report["screening"]["per_image"]["b.png"] == {"cells": 5, "true_abnormal": 5, "predicted_abnormal": 4}
    assert report["screening_sensitivity"] == pytest.approx(5 / 6)
    with open(tmp_path / "screening_per_image.csv", newline="") as f:
        assert list(csv.reader(f)) == [
            ["image", "cells", "true_abnormal", "predicted_abnormal"], ["a.png", "4", "1", "2"], ["b.png", "5", "5", "4"]
        ]


def test_screening_arguments_are_checked():
    with pytest.raises(ValueError, match=r"abnormal classes \['ASCUS'\] are not among"):
        ClassificationReportHandler(NAMES, abnormal_classes=["ASCUS"])
    with pytest.raises(ValueError, match="set abnormal_classes too"):
        ClassificationReportHandler(NAMES, image_key="name")
