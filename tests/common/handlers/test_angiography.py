"""Ignite handlers of the angiography bundle on a bare engine replaying hand-made outputs."""

import json
import logging

import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor

from common.handlers.angiography import SegmentMetricsHandler, VesselMetricsHandler


def _run(handler, batches, epochs: int = 1) -> Engine:
    engine = Engine(lambda engine, batch: batch)
    handler.attach(engine)
    engine.run(batches, max_epochs=epochs)
    return engine


def _image(name: str, size: int = 12) -> MetaTensor:
    return MetaTensor(torch.zeros(3, size, size), meta={"filename_or_obj": name})


def test_vessel_metrics(tmp_path, caplog):
    reference = torch.zeros(1, 12, 24)
    reference[0, 3:8, 2:22] = 1
    thin = torch.zeros(1, 12, 24)
    thin[0, 4:6, 2:22] = 0.9  # probabilities above the threshold
    batches = [
        [{"image": _image("/d/a.png"), "pred": thin, "label": reference}],
        [{"image": _image("/d/b.png"), "pred": reference, "label": reference}],
        [{"image": _image("/d/a.png"), "pred": thin, "label": reference}],  # DistributedSampler padding
    ]
    with caplog.at_level(logging.INFO, logger="common.handlers.angiography"):
        engine = _run(VesselMetricsHandler(output_dir=tmp_path, prefix="val_"), batches, epochs=2)
    assert engine.state.metrics["val_vessel_dice"] == pytest.approx((4 / 7 + 1) / 2)
    assert engine.state.metrics["val_vessel_cl_dice"] == pytest.approx(1.0)
    report = json.loads((tmp_path / "vessel_metrics.json").read_text())
    assert report["n_images"] == 2 and [r["name"] for r in report["per_image"]] == ["/d/a.png", "/d/b.png"]
    assert "vessels over 2 images" in caplog.text


def test_segment_metrics(tmp_path):
    instances = torch.zeros(2, 12, 12, dtype=torch.uint8)
    instances[0, 0:3], instances[1, 6:9] = 1, 1
    labels = torch.tensor([1, 12])
    label_map = torch.zeros(1, 12, 12, dtype=torch.uint8)
    label_map[0, 0:3] = 1  # left_main (12) missed
    sample = {
        "image": _image("/d/a.png"), "instances": instances, "labels": labels, "label_map": label_map,
        "pred_masks": instances[:1, None].float(), "pred_boxes": torch.tensor([[0.0, 0, 12, 3]]),
        "pred_scores": torch.tensor([0.9]), "pred_labels": torch.tensor([1]),
    }  # fmt: skip
    engine = _run(SegmentMetricsHandler(output_dir=tmp_path), [[sample]])
    metrics = engine.state.metrics
    assert metrics["mean_segment_dice"] == pytest.approx(0.5)  # proximal_rca 1, left_main 0
    assert metrics["mean_f1"] == pytest.approx(2 / 3)  # TP 1, FN 1
    assert metrics["segm_AP50"] == pytest.approx(0.5)  # one of two categories found
    report = json.loads((tmp_path / "segment_metrics.json").read_text())
    assert report["per_category"]["proximal_rca"]["segm_AP"] == pytest.approx(1.0)
    assert report["segment_dice"]["left_main"] == 0.0 and report["segment_dice"]["pda"] is None


def test_missing_keys_and_empty_epochs_are_reported():
    with pytest.raises(KeyError, match="label_map"):
        _run(SegmentMetricsHandler(), [[{"image": _image("/d/a.png")}]])
    with pytest.raises(RuntimeError, match="saw no images"):
        _run(VesselMetricsHandler(), [[]])
