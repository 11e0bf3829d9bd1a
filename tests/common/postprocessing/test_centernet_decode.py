import numpy as np
import pytest
import torch

from common.postprocessing.centernet import DecodeCentresd, decode_centres, suppress_close_points
from tests.helpers import centernet_oracle_output as oracle_output

SIZE = 128


def test_target_round_trip_gives_back_the_centres():
    centres = np.array([[10.3, 20.7], [64.0, 64.0], [100.9, 5.2], [127.5, 127.5], [0.0, 0.0]])
    [(points, scores)] = decode_centres(oracle_output(centres))
    order = np.lexsort(points.numpy().T[::-1])
    np.testing.assert_allclose(points.numpy()[order], centres[np.lexsort(centres.T[::-1])], atol=1e-4)
    assert points.dtype == torch.float32 and scores.shape == (5,)
    assert scores.min() > 0.99


def test_two_cells_12px_apart_are_two_detections():
    centres = np.array([[40.5, 60.5], [52.5, 60.5]])
    [(points, _)] = decode_centres(oracle_output(centres))
    assert sorted(points[:, 0].tolist()) == pytest.approx([40.5, 52.5], abs=1e-4)


def test_top_k_and_threshold_keep_the_best_peaks_in_order():
    output = torch.zeros(3, 16, 16)
    output[0] = -10.0
    probabilities = [0.9, 0.8, 0.6, 0.4, 0.2]
    for i, p in enumerate(probabilities):
        output[0, 2 + 3 * i, 3] = torch.logit(torch.tensor(p))
    [(points, scores)] = decode_centres(output, top_k=3, threshold=0.1)
    assert scores.tolist() == pytest.approx([0.9, 0.8, 0.6])
    assert points.tolist() == [[12.0, 8.0], [12.0, 20.0], [12.0, 32.0]]  # (col 3, rows 2, 5, 8) x stride 4
    [(_, scores)] = decode_centres(output, threshold=0.5)
    assert scores.tolist() == pytest.approx([0.9, 0.8, 0.6])
    [(points, scores)] = decode_centres(output, threshold=0.95)
    assert points.shape == (0, 2) and scores.shape == (0,)


def test_probability_heatmaps_and_batches():
    output = torch.zeros(2, 3, 8, 8)
    output[1, 0, 4, 5] = 0.7
    output[1, 1:, 4, 5] = torch.tensor([0.25, 0.5])
    results = decode_centres(output, stride=8, threshold=0.5, apply_sigmoid=False)
    assert len(results) == 2 and len(results[0][0]) == 0
    assert results[1][0].tolist() == [[(5 + 0.25) * 8, (4 + 0.5) * 8]] and results[1][1].tolist() == pytest.approx([0.7])
    with pytest.raises(ValueError, match=r"\(3, h, w\) or \(B, 3, h, w\)"):
        decode_centres(torch.zeros(2, 8, 8))


def test_suppress_close_points_is_greedy_by_score():
    points = torch.tensor([[0.0, 0.0], [3.0, 0.0], [6.0, 0.0], [20.0, 20.0], [20.0, 24.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.5, 0.6])
    # (3, 0) falls to (0, 0); (6, 0) survives because its only close neighbour was suppressed;
    # (20, 24) is exactly 4 apart from (20, 20): not closer than 4, both kept
    assert suppress_close_points(points, scores, 4.0).tolist() == [0, 2, 4, 3]
    assert suppress_close_points(points, scores, 4.1).tolist() == [0, 2, 4]
    assert suppress_close_points(points, scores, 0).tolist() == [0, 1, 2, 4, 3]
    assert suppress_close_points(np.zeros((0, 2)), np.zeros(0), 5.0).tolist() == []


def test_decode_centresd_writes_points_and_scores_and_removes_duplicates():
    output = torch.full((3, 16, 16), -10.0)
    output[1:] = 0.5
    output[0, 4, 4] = 5.0
    output[0, 4, 6] = 4.0  # a second peak 8 px away, e.g. the same cell found by two windows
    data = DecodeCentresd(keys="pred", threshold=0.5)({"pred": output})
    assert data["points"].tolist() == [[18.0, 18.0], [26.0, 18.0]] and len(data["scores"]) == 2
    data = DecodeCentresd(keys="pred", threshold=0.5, min_distance=10, points_key="p", scores_key="s")({"pred": output})
    assert data["p"].tolist() == [[18.0, 18.0]] and data["s"].tolist() == pytest.approx([torch.sigmoid(torch.tensor(5.0)).item()])
    with pytest.raises(ValueError, match="one output key"):
        DecodeCentresd(keys=["a", "b"])
