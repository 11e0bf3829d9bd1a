import json

import numpy as np
import pytest

from common.postprocessing.threshold_search import save_watershed_thresholds, search_watershed_thresholds
from common.postprocessing.watershed import load_watershed_thresholds

RADIUS = 15.0


def _touching_cells(centres: list[tuple[int, int]], shape: tuple[int, int] = (64, 96)):
    """Cone-shaped maps (1 at each centre, 0 at distance RADIUS) and the matching nearest-centre cells.

    Centres 18 px apart meet at 9 / 15 = 0.6 of the radius, where both cones are 0.4: the maps of the
    two cells only separate above 0.4.
    """
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    distances = np.stack([np.hypot(yy - cy, xx - cx) for cy, cx in centres])
    nearest = distances.argmin(axis=0)
    closest = distances.min(axis=0)
    dist_map = np.clip(1.0 - closest / RADIUS, 0.0, 1.0).astype(np.float32)
    reference = np.where(closest < RADIUS, nearest + 1, 0).astype(np.int32)
    return dist_map, reference


def _dataset():
    first = _touching_cells([(32, 30), (32, 48)])
    second = _touching_cells([(20, 20), (38, 20), (32, 70)])
    return [first[0], second[0]], [first[1], second[1]]


def test_search_picks_thresholds_that_separate_touching_cells():
    dist_maps, references = _dataset()
    result = search_watershed_thresholds(dist_maps, references, [0.3, 0.5, 0.7], [0.02, 0.1, 0.5])
    assert result["cells_max"] >= 0.5
    assert result["cell_fill"] == 0.02  # the lowest foreground threshold recovers the most of each cell
    assert result["DET"] == 1.0
    assert result["OP_CSB"] == max(row["OP_CSB"] for row in result["grid"])
    assert len(result["grid"]) == 7  # 9 pairs less (0.3, 0.5) and (0.5, 0.5), where cell_fill >= cells_max
    merged = next(row for row in result["grid"] if row["cells_max"] == 0.3 and row["cell_fill"] == 0.02)
    assert merged["DET"] < 1.0  # below 0.4 the two seeds fuse: a merge
    assert result["min_size"] == 0


def test_saved_result_round_trips_through_loader(tmp_path):
    dist_maps, references = _dataset()
    result = search_watershed_thresholds(dist_maps, references, [0.3, 0.6], [0.05], min_size=5)
    path = save_watershed_thresholds(result, tmp_path / "models" / "watershed_thresholds.json")
    assert json.loads(path.read_text())["grid"] == result["grid"]
    loaded = load_watershed_thresholds(path, {"cells_max": 0.5, "cell_fill": 0.1, "min_size": 0})
    assert loaded == {"cells_max": 0.6, "cell_fill": 0.05, "min_size": 5}
    assert not list(path.parent.glob("*.tmp"))


def test_rejects_grid_without_valid_pair():
    dist_maps, references = _dataset()
    with pytest.raises(ValueError, match="no threshold pair"):
        search_watershed_thresholds(dist_maps, references, [0.2], [0.3, 0.5])


def test_rejects_mismatched_inputs():
    dist_maps, references = _dataset()
    with pytest.raises(ValueError, match="one reference per distance map"):
        search_watershed_thresholds(dist_maps, references[:1], [0.5], [0.1])
