import json

import numpy as np
import pytest

from common.postprocessing.threshold_search import (
    save_watershed_thresholds,
    search_watershed_thresholds,
    widen_grid,
)
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
    result = search_watershed_thresholds(
        dist_maps, references, [0.3, 0.5, 0.7], [0.02, 0.1, 0.5], max_widenings=0
    )
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
    default = {"cells_max": 0.5, "cell_fill": 0.1, "min_size": 0, "smooth_sigma": 0.0}
    loaded = load_watershed_thresholds(path, default)
    assert loaded == {"cells_max": result["cells_max"], "cell_fill": 0.05, "min_size": 5, "smooth_sigma": 0.0}
    assert not list(path.parent.glob("*.tmp"))


def test_rejects_grid_without_valid_pair():
    dist_maps, references = _dataset()
    with pytest.raises(ValueError, match="no threshold pair"):
        search_watershed_thresholds(dist_maps, references, [0.2], [0.3, 0.5])


def test_rejects_mismatched_inputs():
    dist_maps, references = _dataset()
    with pytest.raises(ValueError, match="one reference per distance map"):
        search_watershed_thresholds(dist_maps, references[:1], [0.5], [0.1])


def test_widen_grid_adds_one_step_past_the_edge_within_limits():
    grid = [0.1, 0.2, 0.3]
    assert widen_grid(grid, 0.3, 0.0, 0.99) and grid == [0.1, 0.2, 0.3, 0.4]
    assert not widen_grid(grid, 0.2, 0.0, 0.99)  # inside: nothing to widen
    assert widen_grid(grid, 0.1, 0.05, 0.99) and grid[0] == 0.05  # clipped to the limit
    assert not widen_grid(grid, 0.05, 0.05, 0.99)  # already at the limit


def _floored_dataset():
    """Maps whose background rises from 0 to 0.45 across the image and cells span 0.5..1: the higher
    cell_fill, the less background joins the cells, up to 0.45..0.5 where the cells are exact."""
    dist_maps, references = _dataset()
    ramp = np.linspace(0.0, 0.45, dist_maps[0].shape[1])[None, :]
    floored = [np.where(ref > 0, 0.5 + 0.5 * dist, ramp) for dist, ref in zip(dist_maps, references)]
    return [m.astype(np.float32) for m in floored], references


def test_search_widens_the_grid_when_the_best_value_is_on_its_edge():
    dist_maps, references = _floored_dataset()
    narrow = search_watershed_thresholds(dist_maps, references, [0.8, 0.9], [0.1, 0.2, 0.3], max_widenings=0)
    assert narrow["cell_fill"] == 0.3 and narrow["SEG"] < 0.9  # background joins the cells
    wide = search_watershed_thresholds(dist_maps, references, [0.8, 0.9], [0.1, 0.2, 0.3])
    assert 0.3 < wide["cell_fill"] < 0.5 + 1e-9 and wide["cell_fill"] < max(wide["cell_fill_grid"])
    assert wide["OP_CSB"] > 0.95 > narrow["OP_CSB"]
    assert len(wide["grid"]) > len(narrow["grid"])


def test_smoothing_width_is_chosen_by_seg_on_ragged_maps():
    dist_maps, references = _dataset()
    rng = np.random.default_rng(0)
    ragged = [np.clip(d + rng.normal(0, 0.2, d.shape), 0, 1).astype(np.float32) for d in dist_maps]
    result = search_watershed_thresholds(
        ragged, references, [0.5, 0.6, 0.7], [0.05, 0.1, 0.2], smooth_sigma_grid=[0.0, 2.0]
    )
    assert result["smooth_sigma"] == 2.0
    best_unsmoothed = max((r for r in result["grid"] if r["smooth_sigma"] == 0.0), key=lambda r: r["OP_CSB"])
    assert result["SEG"] > best_unsmoothed["SEG"]
    with pytest.raises(ValueError, match="smooth_sigma"):
        search_watershed_thresholds(ragged, references, [0.5], [0.1], smooth_sigma_grid=[-1.0])
