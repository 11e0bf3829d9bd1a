import math

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from common.metrics import ctc
from common.metrics.ctc import CTCScores, aggregate_ctc, ctc_scores, match_instances


def _canvas() -> np.ndarray:
    return np.zeros((32, 48), dtype=np.int32)


def _two_squares(first: int = 1, second: int = 2) -> np.ndarray:
    """Two 10x10 squares (100 px each) far apart."""
    labels = _canvas()
    labels[2:12, 2:12] = first
    labels[2:12, 30:40] = second
    return labels


def test_perfect_match_with_noncontiguous_ids():
    scores = ctc_scores(_two_squares(3, 70000), _two_squares(1, 2))
    assert (scores.seg, scores.det, scores.op_csb) == (1.0, 1.0, 1.0)
    assert (scores.n_reference, scores.n_prediction, scores.aogm_d, scores.aogm_d0) == (2, 2, 0.0, 20.0)


def test_split_into_halves_leaves_reference_unmatched():
    prediction = _two_squares()
    prediction[2:12, 7:12] = 5  # square 1 cut into two 50-pixel halves: neither covers more than half
    scores = ctc_scores(_two_squares(), prediction)
    assert (scores.false_negatives, scores.false_positives, scores.splits) == (1, 2, 0)
    assert scores.aogm_d == 12.0
    assert scores.det == pytest.approx(1 - 12 / 20)
    assert scores.seg == pytest.approx(0.5)


def test_split_with_majority_piece_matches_it():
    prediction = _two_squares()
    prediction[2:12, 8:12] = 5  # 60 / 40 split: the 60-pixel piece matches, the other is a false positive
    scores = ctc_scores(_two_squares(), prediction)
    assert (scores.false_negatives, scores.false_positives, scores.splits) == (0, 1, 0)
    assert scores.det == pytest.approx(1 - 1 / 20)
    assert scores.seg == pytest.approx((0.6 + 1.0) / 2)


def test_merge_needs_one_split():
    reference = _canvas()
    reference[2:12, 2:12] = 1
    reference[2:12, 12:22] = 2
    prediction = (reference > 0).astype(np.int32)
    matching = match_instances(reference, prediction)
    np.testing.assert_array_equal(matching.matched_prediction, [1, 1])
    np.testing.assert_allclose(matching.jaccard, [0.5, 0.5])
    scores = ctc_scores(reference, prediction)
    assert (scores.splits, scores.false_negatives, scores.false_positives) == (1, 0, 0)
    assert scores.aogm_d == 5.0
    assert scores.det == pytest.approx(0.75)
    assert scores.seg == pytest.approx(0.5)
    assert scores.op_csb == pytest.approx(0.625)


def test_missed_cell_is_false_negative():
    prediction = _two_squares()
    prediction[prediction == 2] = 0
    scores = ctc_scores(_two_squares(), prediction)
    assert (scores.false_negatives, scores.false_positives) == (1, 0)
    assert scores.det == pytest.approx(0.5)
    assert scores.seg == pytest.approx(0.5)


def test_extra_object_is_false_positive():
    prediction = _two_squares()
    prediction[20:25, 20:25] = 9
    scores = ctc_scores(_two_squares(), prediction)
    assert (scores.false_negatives, scores.false_positives, scores.n_prediction) == (0, 1, 3)
    assert scores.det == pytest.approx(1 - 1 / 20)
    assert scores.seg == 1.0


def test_empty_prediction_scores_zero():
    scores = ctc_scores(_two_squares(), _canvas())
    assert (scores.seg, scores.det, scores.op_csb) == (0.0, 0.0, 0.0)
    assert scores.false_negatives == 2


def test_partial_overlap_jaccard():
    reference = _canvas()
    reference[0:10, 0:10] = 4
    prediction = _canvas()
    prediction[0:10, 2:12] = 8  # overlap 80 of 100 pixels, union 120
    matching = match_instances(reference, prediction)
    np.testing.assert_array_equal(matching.matched_prediction, [8])
    assert matching.jaccard[0] == pytest.approx(80 / 120)
    assert ctc_scores(reference, prediction).seg == pytest.approx(2 / 3)


def test_no_reference_objects_gives_nan_but_keeps_counts():
    prediction = _canvas()
    prediction[0:4, 0:4] = 1
    scores = ctc_scores(_canvas(), prediction)
    assert math.isnan(scores.seg) and math.isnan(scores.det) and math.isnan(scores.op_csb)
    assert (scores.false_positives, scores.aogm_d, scores.aogm_d0) == (1, 1.0, 0.0)


def test_aggregate_pools_objects_and_costs():
    merged_ref = _canvas()
    merged_ref[2:12, 2:12] = 1
    merged_ref[2:12, 12:22] = 2
    merge = ctc_scores(merged_ref, (merged_ref > 0).astype(np.int32))  # Jaccard sum 1.0, AOGM-D 5
    miss_pred = _two_squares()
    miss_pred[miss_pred == 2] = 0
    miss = ctc_scores(_two_squares(), miss_pred)  # Jaccard sum 1.0, AOGM-D 10
    stray = _canvas()
    stray[0:3, 0:3] = 1
    empty_reference = ctc_scores(_canvas(), stray)  # no reference, one false positive

    overall = aggregate_ctc([merge, miss, empty_reference])
    assert overall.n_reference == 4
    assert overall.seg == pytest.approx(2.0 / 4)
    assert overall.aogm_d == 16.0 and overall.aogm_d0 == 40.0
    assert overall.det == pytest.approx(1 - 16 / 40)
    assert overall.op_csb == pytest.approx((0.5 + 0.6) / 2)
    assert overall.as_dict()["splits"] == 1


def test_aggregate_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="at least one image"):
        aggregate_ctc([])


def test_accepts_channel_first_tensors_and_float_ids():
    reference = torch.from_numpy(_two_squares())[None].float()
    prediction = torch.from_numpy(_two_squares(5, 6))
    assert ctc_scores(reference, prediction).seg == 1.0


def test_shape_mismatch_is_reported():
    expected = r"reference has shape \(32, 48\) but prediction has shape \(32, 47\)"
    with pytest.raises(ValueError, match=expected):
        ctc_scores(_canvas(), np.zeros((32, 47), dtype=np.int32))


@pytest.mark.parametrize("bad", [np.full((32, 48), 0.5), np.full((32, 48), -1)])
def test_rejects_non_integer_or_negative_ids(bad):
    with pytest.raises(ValueError, match="prediction"):
        ctc_scores(_canvas(), bad)


def _random_cells(rng: np.random.Generator, n_cells: int, size: int) -> np.ndarray:
    """Voronoi cells of random seeds, each cut to a disc so that cells both touch and leave gaps."""
    seeds = np.zeros((size, size), dtype=np.int64)
    coords = rng.choice(size * size, n_cells, replace=False)
    seeds.flat[coords] = np.arange(1, n_cells + 1)
    distance, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    labels = seeds[iy, ix]
    labels[distance > rng.uniform(4, 9, size=n_cells + 1)[labels]] = 0
    return labels


def _slow_scores(reference: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """One mask at a time, straight from the CTC definitions."""
    jaccard_sum, false_negatives = 0.0, 0
    matches_per_prediction: dict[int, int] = {int(p): 0 for p in np.unique(prediction) if p}
    ref_ids = [int(r) for r in np.unique(reference) if r]
    for r in ref_ids:
        ref_mask = reference == r
        matched = None
        for p in np.unique(prediction[ref_mask]):
            if p and np.sum(ref_mask & (prediction == p)) > 0.5 * ref_mask.sum():
                matched = int(p)
        if matched is None:
            false_negatives += 1
            continue
        pred_mask = prediction == matched
        jaccard_sum += np.sum(ref_mask & pred_mask) / np.sum(ref_mask | pred_mask)
        matches_per_prediction[matched] += 1
    false_positives = sum(1 for k in matches_per_prediction.values() if k == 0)
    splits = sum(k - 1 for k in matches_per_prediction.values() if k > 1)
    aogm = 5 * splits + 10 * false_negatives + false_positives
    return {
        "seg": jaccard_sum / len(ref_ids),
        "det": 1 - min(aogm, 10 * len(ref_ids)) / (10 * len(ref_ids)),
        "false_negatives": false_negatives,
        "false_positives": false_positives,
        "splits": splits,
    }


@pytest.mark.parametrize("dense_table", [True, False])
def test_matches_slow_reference_on_300_random_cells(monkeypatch, dense_table):
    if not dense_table:
        monkeypatch.setattr(ctc, "_DENSE_TABLE_MIN_LIMIT", 0)
    rng = np.random.default_rng(0)
    reference = _random_cells(rng, 300, 256)
    prediction = np.roll(reference, shift=(1, 2), axis=(0, 1))
    ids = np.unique(prediction)[1:]
    prediction[np.isin(prediction, rng.choice(ids, 15, replace=False))] = 0  # missed cells
    for a in rng.choice(ids, 20, replace=False):  # merges with the cell on the right, where there is one
        ys, xs = np.nonzero(prediction == a)
        if ys.size:
            neighbour = prediction[ys[0], min(xs.max() + 1, 255)]
            if neighbour:
                prediction[prediction == neighbour] = a
    prediction[rng.random(prediction.shape) < 0.002] = 100_000  # scattered false-positive pixels
    prediction = np.where(prediction > 0, prediction * 7919 + 13, 0)  # large, non-contiguous ids

    expected = _slow_scores(reference, prediction)
    scores = ctc_scores(reference, prediction)
    assert scores.n_reference == 300
    assert scores.seg == pytest.approx(expected["seg"], abs=1e-12)
    assert scores.det == pytest.approx(expected["det"], abs=1e-12)
    assert (scores.false_negatives, scores.false_positives, scores.splits) == (
        expected["false_negatives"],
        expected["false_positives"],
        expected["splits"],
    )
    assert scores.splits > 0 and scores.false_negatives > 0 and scores.false_positives > 0
    assert isinstance(scores, CTCScores)
