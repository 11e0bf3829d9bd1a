"""The angiography writers: segment records, label PNG, overlay with legend, vessel mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image
from pycocotools import mask as mask_utils

from common.data.angiography import CASS_CATEGORIES
from common.writers.angiography import (
    SaveSegmentOutputsd,
    SaveVesselMaskd,
    draw_segment_overlay,
    segment_records,
)


def _detections() -> dict[str, torch.Tensor]:
    """Three detections on a 20 x 30 image: two of mid_rca (label 2), one of left_main (label 12)."""
    masks = torch.zeros(3, 1, 20, 30)
    masks[0, 0, 2:6, 3:10] = 0.9
    masks[1, 0, 10:15, 5:25] = 0.8
    masks[2, 0, 4:8, 8:12] = 0.7
    return {
        "pred_masks": masks,
        "pred_boxes": torch.tensor([[3, 2, 10, 6], [5, 10, 25, 15], [8, 4, 12, 8]], dtype=torch.float32),
        "pred_scores": torch.tensor([0.4, 0.9, 0.6]),
        "pred_labels": torch.tensor([2, 12, 2]),
    }


def test_segment_records_keep_the_best_of_each_segment_most_confident_first():
    d = _detections()
    records = segment_records(d["pred_masks"], d["pred_boxes"], d["pred_scores"], d["pred_labels"])
    assert [(r["name"], r["score"]) for r in records] == [("left_main", 0.9), ("mid_rca", 0.6)]
    decoded = mask_utils.decode(
        {"size": records[1]["rle"]["size"], "counts": records[1]["rle"]["counts"].encode()}
    )
    assert decoded.shape == (20, 30) and decoded.sum() == 4 * 4 and decoded[4:8, 8:12].all()
    assert records[1]["box"] == [8.0, 4.0, 12.0, 8.0]


def test_segment_records_refuse_labels_outside_the_categories():
    d = _detections()
    with pytest.raises(ValueError, match="labels must lie in 1..14"):
        segment_records(d["pred_masks"], d["pred_boxes"], d["pred_scores"], torch.tensor([2, 15, 2]))


def test_overlay_tints_segments_and_adds_a_legend_beside_the_image():
    image = np.full((20, 30), 100, np.uint8)
    labels = np.zeros((20, 30), np.uint8)
    labels[5:10, 5:10] = 3
    overlay = draw_segment_overlay(image, labels[None], CASS_CATEGORIES, {3: 0.5})
    assert overlay.shape[0] >= 20 and overlay.shape[1] > 30 and overlay.dtype == np.uint8
    assert (overlay[0, 0] == 100).all() and not (overlay[7, 7] == 100).all()
    with pytest.raises(ValueError, match="label map is 10x10"):
        draw_segment_overlay(image, labels[:10, :10])


def test_save_segment_outputs_writes_json_labels_and_overlay(tmp_path):
    image = MetaTensor(torch.rand(3, 20, 30), meta={"filename_or_obj": "/data/angio/case_7.dcm"})
    d = _detections()
    label_map = torch.zeros(1, 20, 30, dtype=torch.uint8)
    label_map[0, 10:15, 5:25] = 12
    out = SaveSegmentOutputsd(output_dir=tmp_path)({"image": image, "label_map": label_map, **d})
    with Image.open(out["label_map_path"]) as labels:
        assert labels.size == (30, 20) and set(np.unique(np.asarray(labels)).tolist()) == {0, 12}
    segments = json.loads((tmp_path / "case_7_segments.json").read_text())
    assert segments["image"] == "/data/angio/case_7.dcm" and (segments["height"], segments["width"]) == (
        20,
        30,
    )
    assert [s["name"] for s in segments["segments"]] == ["left_main", "mid_rca"]
    assert (tmp_path / "case_7_overlay.png").is_file()


def test_single_output_file_takes_one_image_only(tmp_path):
    writer = SaveSegmentOutputsd(output_file=tmp_path / "result.png")
    d = _detections()
    label_map = torch.zeros(1, 20, 30, dtype=torch.uint8)
    for name in ("a.png", "b.png"):
        image = MetaTensor(torch.rand(3, 20, 30), meta={"filename_or_obj": f"/data/{name}"})
        if name == "b.png":
            with pytest.raises(ValueError, match="takes one image"):
                writer({"image": image, "label_map": label_map, **d})
        else:
            writer({"image": image, "label_map": label_map, **d})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "result.png",
        "result_overlay.png",
        "result_segments.json",
    ]


def test_vessel_mask_is_written_as_0_and_255(tmp_path):
    image = MetaTensor(torch.rand(3, 8, 8), meta={"filename_or_obj": "/data/run.dcm"})
    pred = torch.zeros(1, 8, 8)
    pred[0, 2:4] = 0.8
    out = SaveVesselMaskd(output_dir=tmp_path)({"image": image, "pred": pred})
    with Image.open(out["pred_path"]) as mask:
        values = np.asarray(mask)
    assert out["pred_path"].endswith("run_vessels.png") and set(np.unique(values).tolist()) == {0, 255}
    assert (values[2:4] == 255).all() and values.sum() == 255 * 16
