import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from scipy import ndimage as ndi

from common.errors import InputDataError
from common.metrics.ctc import ctc_scores
from common.postprocessing.watershed import (
    DistanceMapWatershedd,
    distance_map_watershed,
    load_watershed_thresholds,
    remove_small_instances,
)


def _touching_discs() -> np.ndarray:
    """Two discs of radius 12 whose centres are 20 px apart, the overlap split by the nearer centre."""
    yy, xx = np.mgrid[:64, :80]
    d1 = np.hypot(yy - 32, xx - 30)
    d2 = np.hypot(yy - 32, xx - 50)
    labels = np.zeros((64, 80), dtype=np.int32)
    labels[(d1 <= 12) & (d1 <= d2)] = 1
    labels[(d2 <= 12) & (d2 < d1)] = 2
    return labels


def _normalised_distance(labels: np.ndarray) -> np.ndarray:
    """Each cell's distance transform divided by that cell's maximum, as the network is trained to predict."""
    out = np.zeros(labels.shape, dtype=np.float32)
    for cell in range(1, labels.max() + 1):
        edt = ndi.distance_transform_edt(labels == cell)
        out[labels == cell] = edt[labels == cell] / edt.max()
    return out


def test_touching_discs_become_two_instances_with_their_areas():
    reference = _touching_discs()
    labels = distance_map_watershed(_normalised_distance(reference), cells_max=0.5, cell_fill=0.05)
    assert labels.dtype == np.int32
    assert labels.max() == 2
    assert sorted(np.bincount(labels.ravel())[1:]) == sorted(np.bincount(reference.ravel())[1:])
    assert ctc_scores(reference, labels).seg == 1.0


def test_min_size_drops_small_objects_and_relabels():
    dist = _normalised_distance(_touching_discs())
    dist[2:5, 2:5] = 0.9  # a 9-pixel speck, numbered first by the watershed
    assert distance_map_watershed(dist, min_size=0).max() == 3
    labels = distance_map_watershed(dist, min_size=10)
    assert labels[3, 3] == 0
    np.testing.assert_array_equal(np.unique(labels), [0, 1, 2])


def test_remove_small_instances_renumbers_contiguously():
    labels = np.array([[0, 5, 5, 9], [7, 7, 7, 0]])
    np.testing.assert_array_equal(remove_small_instances(labels, 2), [[0, 1, 1, 0], [2, 2, 2, 0]])


@pytest.mark.parametrize("cells_max, cell_fill", [(0.3, 0.3), (0.2, 0.5), (1.2, 0.1), (0.5, -0.1)])
def test_rejects_inconsistent_thresholds(cells_max, cell_fill):
    with pytest.raises(ValueError, match="0 <= cell_fill < cells_max <= 1"):
        distance_map_watershed(np.zeros((8, 8)), cells_max=cells_max, cell_fill=cell_fill)


def test_rejects_multichannel_map():
    with pytest.raises(ValueError, match=r"\(1, H, W\)"):
        distance_map_watershed(np.zeros((2, 8, 8)))


def test_transform_keeps_metadata_inside_compose():
    dist = torch.from_numpy(_normalised_distance(_touching_discs()))[None]
    pred = MetaTensor(dist, meta={"filename_or_obj": "/data/t000.tif"})
    post = Compose([DistanceMapWatershedd(keys="pred", cells_max=0.5, cell_fill=0.05)])
    out = post({"pred": pred})
    instances = out["instances"]
    assert isinstance(instances, MetaTensor)
    assert instances.shape == (1, 64, 80) and instances.dtype == torch.int32
    assert instances.meta["filename_or_obj"] == "/data/t000.tif"
    assert int(instances.max()) == 2
    assert out["pred"] is pred


def test_transform_needs_one_output_key_per_key():
    with pytest.raises(ValueError, match="one entry per key"):
        DistanceMapWatershedd(keys=["a", "b"], output_key="instances")


def test_load_thresholds_falls_back_to_default(tmp_path):
    default = {"cells_max": 0.5, "cell_fill": 0.05, "min_size": 0}
    assert load_watershed_thresholds(tmp_path / "absent.json", default) == default


def test_load_thresholds_reads_and_casts(tmp_path):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"cells_max": 0.6, "cell_fill": 0.1, "min_size": 12.0, "OP_CSB": 0.8}))
    loaded = load_watershed_thresholds(path, {"cells_max": 0.5, "cell_fill": 0.05, "min_size": 0})
    assert loaded == {"cells_max": 0.6, "cell_fill": 0.1, "min_size": 12}
    assert isinstance(loaded["min_size"], int)


def test_smoothing_gives_one_smooth_instance_per_cell_from_a_ragged_map():
    labels = _touching_discs()
    dist = ndi.distance_transform_edt(labels > 0) / 12.0
    ragged = np.clip(dist + np.random.default_rng(0).normal(0, 0.2, dist.shape), 0, 1)
    raw = distance_map_watershed(ragged, cells_max=0.6, cell_fill=0.2)
    smooth = distance_map_watershed(ragged, cells_max=0.6, cell_fill=0.2, smooth_sigma=2.0)
    assert smooth.max() == 2 and raw.max() > 2  # noise peaks seed spurious cells without smoothing
    assert ctc_scores(labels, smooth).seg > ctc_scores(labels, raw).seg
    transform = DistanceMapWatershedd("pred", cells_max=0.6, cell_fill=0.2, smooth_sigma=2.0)
    out = transform({"pred": torch.as_tensor(ragged[None], dtype=torch.float32)})["instances"]
    np.testing.assert_array_equal(out[0].numpy(), smooth)
    with pytest.raises(ValueError, match="smooth_sigma"):
        distance_map_watershed(ragged, smooth_sigma=-1.0)


def test_load_thresholds_reads_smoothing_and_defaults_it_for_older_files(tmp_path):
    default = {"cells_max": 0.5, "cell_fill": 0.05, "smooth_sigma": 0.0}
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"cells_max": 0.6, "cell_fill": 0.1}))
    assert load_watershed_thresholds(path, default)["smooth_sigma"] == 0.0
    path.write_text(json.dumps({"cells_max": 0.6, "cell_fill": 0.1, "smooth_sigma": 1.5}))
    assert load_watershed_thresholds(path, default)["smooth_sigma"] == 1.5
    path.write_text(json.dumps({"cells_max": 0.6, "cell_fill": 0.1, "smooth_sigma": -1}))
    with pytest.raises(InputDataError, match="smooth_sigma must be >= 0"):
        load_watershed_thresholds(path, default)


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not a readable JSON file"),
        ("[0.5, 0.1]", "expected a JSON object"),
        ('{"cells_max": 0.5}', "missing watershed threshold"),
        ('{"cells_max": "high", "cell_fill": 0.1}', "'cells_max' must be a number"),
        ('{"cells_max": 0.1, "cell_fill": 0.5}', "0 <= cell_fill < cells_max <= 1"),
    ],
)
def test_load_thresholds_names_the_bad_file(tmp_path, content, problem):
    path = tmp_path / "thresholds.json"
    path.write_text(content)
    with pytest.raises(InputDataError, match=problem) as err:
        load_watershed_thresholds(path, {"cells_max": 0.5, "cell_fill": 0.05})
    assert str(err.value).startswith(str(path))
