"""Mask R-CNN detections to one CASS label map: best instance per segment, overlaps to the higher score."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.postprocessing.angiography import CassLabelMapd, cass_label_map, select_segments


def _masks() -> np.ndarray:
    masks = np.zeros((4, 1, 6, 6), np.float32)
    masks[0, 0, 0:3, :] = 0.9  # label 1, score 0.6
    masks[1, 0, 2:5, :] = 0.8  # label 2, score 0.9: overlaps row 2 with the first
    masks[2, 0, 5, :] = 0.7  # label 1 again, score 0.3: a weaker duplicate
    masks[3, 0, 4, :] = 0.4  # label 3, soft values below the mask threshold
    return masks


SCORES, LABELS = [0.6, 0.9, 0.3, 0.95], [1, 2, 1, 3]


def test_keeps_the_best_instance_per_segment_and_resolves_overlaps_by_score():
    label_map = cass_label_map(_masks(), SCORES, LABELS)
    expected = np.zeros((6, 6), np.uint8)
    expected[0:2], expected[2:5] = 1, 2  # row 2 goes to the higher score, row 5 (duplicate) stays empty
    np.testing.assert_array_equal(label_map, expected)
    assert select_segments(SCORES, LABELS).tolist() == [0, 1, 3]  # painting order: lowest score first


def test_score_threshold_and_empty_input():
    assert select_segments(SCORES, LABELS, score_threshold=0.7).tolist() == [1, 3]
    label_map = cass_label_map(np.zeros((0, 1, 6, 6)), [], [])
    assert label_map.shape == (6, 6) and not label_map.any()
    with pytest.raises(ValueError, match="4 masks but 3 labels"):
        cass_label_map(_masks(), SCORES, LABELS[:3])


def test_dictionary_transform_keeps_the_image_metadata():
    image = MetaTensor(torch.zeros(3, 6, 6), meta={"filename_or_obj": "/data/a.png"})
    data = {"pred_masks": torch.from_numpy(_masks()), "pred_scores": torch.tensor(SCORES),
            "pred_labels": torch.tensor(LABELS), "image": image}  # fmt: skip
    out = CassLabelMapd(meta_key="image")(data)["label_map"]
    assert out.shape == (1, 6, 6) and out.dtype == torch.uint8
    assert out.meta["filename_or_obj"] == "/data/a.png" and int(out[0, 3, 0]) == 2
