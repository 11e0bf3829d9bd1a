from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from common.data.distance_map import (
    instance_distance_transform,
    normalized_distance_map,
    normalized_distance_map_per_cell,
)
from common.data.synthetic.cells import voronoi_labels


def assert_matches_reference(labels: np.ndarray) -> np.ndarray:
    fast = normalized_distance_map(labels)
    assert fast.dtype == np.float32 and fast.shape == labels.shape
    np.testing.assert_allclose(fast, normalized_distance_map_per_cell(labels), atol=1e-6, rtol=0)
    return fast


def test_touching_squares_match_reference():
    labels = np.zeros((12, 20), dtype=np.int32)
    labels[2:9, 2:9] = 1
    labels[2:9, 9:16] = 2  # shares an edge with 1
    labels[9:11, 16:19] = 3  # touches 2 only diagonally
    dist = assert_matches_reference(labels)
    # 7x7 square: the centre is 4 pixels from the outside in either square
    assert dist[5, 5] == 1.0 and dist[5, 12] == 1.0
    assert dist[5, 8] == pytest.approx(0.25)  # the column next to cell 2 is one pixel from it


def test_known_values_of_a_single_square():
    labels = np.zeros((7, 7), dtype=np.uint8)
    labels[1:6, 1:6] = 5
    dist = normalized_distance_map(labels)
    expected = np.zeros((7, 7), dtype=np.float32)
    expected[1:6, 1:6] = 1 / 3
    expected[2:5, 2:5] = 2 / 3
    expected[3, 3] = 1.0
    np.testing.assert_allclose(dist, expected, atol=1e-6)


def test_cells_touching_the_border_match_reference():
    labels = np.zeros((10, 10), dtype=np.int64)
    labels[:4, :] = 1  # three sides on the image border: distance only to row 4
    labels[4:, :3] = 2
    labels[6:, 6:] = 3
    dist = assert_matches_reference(labels)
    np.testing.assert_allclose(dist[:4, 5], [1.0, 0.75, 0.5, 0.25])


def test_non_contiguous_and_large_ids_match_reference():
    labels = np.zeros((16, 16), dtype=np.int64)
    labels[1:7, 1:7] = 7
    labels[7:14, 1:9] = 1_000_000_007  # above the image size: exercises the sorted relabelling
    labels[1:7, 7:15] = 42
    assert_matches_reference(labels)
    assert_matches_reference(labels.astype(np.uint32) % 1000)


def test_voronoi_image_with_about_100_touching_cells_matches_reference():
    labels = voronoi_labels((128, 128), n_cells=110, seed=3, foreground=0.8)
    assert len(np.unique(labels)) > 80
    dist = assert_matches_reference(labels)
    peaks = ndimage.maximum(dist, labels, np.unique(labels[labels > 0]))
    np.testing.assert_array_equal(peaks, 1.0)
    assert dist.min() >= 0 and dist.max() <= 1
    assert (dist[labels == 0] == 0).all() and (dist[labels > 0] > 0).all()


def test_empty_image_and_single_pixel_cells():
    assert not normalized_distance_map(np.zeros((8, 9), dtype=np.int32)).any()
    labels = np.zeros((5, 5), dtype=np.int32)
    labels[0, 0], labels[2, 2], labels[2, 3] = 1, 2, 3
    dist = assert_matches_reference(labels)
    assert dist[0, 0] == dist[2, 2] == dist[2, 3] == 1.0


def test_cell_filling_the_whole_image_is_flat_and_finite():
    labels = np.full((6, 6), 3, dtype=np.int32)
    np.testing.assert_array_equal(normalized_distance_map(labels), 1.0)
    np.testing.assert_array_equal(normalized_distance_map_per_cell(labels), 1.0)
    assert np.isinf(instance_distance_transform(labels)).all()


def test_raw_distances_equal_each_cells_own_transform():
    labels = voronoi_labels((64, 64), n_cells=30, seed=1)
    distance = instance_distance_transform(labels)
    for cell in (1, 5, 17):
        mask = labels == cell
        np.testing.assert_allclose(distance[mask], ndimage.distance_transform_edt(mask)[mask], atol=1e-5)


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.zeros((2, 3, 4), dtype=np.int32), "2-D"),
        (np.zeros((4, 4), dtype=np.float32), "integer"),
        (np.zeros((4, 4), dtype=bool), "integer"),
        (np.full((4, 4), -1, dtype=np.int32), "non-negative"),
    ],
)
def test_bad_labels_are_refused(labels, message):
    with pytest.raises(ValueError, match=message):
        normalized_distance_map(labels)
