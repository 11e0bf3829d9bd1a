import json
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from torch import nn

from common.errors import InputDataError
from common.utils import as_plane, file_stem, nan_to_none, require_dir, source_file, unwrap_module


def test_nan_to_none_makes_strict_json_of_nested_scores():
    scores = {"a": math.nan, "b": [np.float64("nan"), 0.5, (np.float32(0.25), None)], "c": {"d": 1}}
    cleaned = nan_to_none(scores)
    assert cleaned == {"a": None, "b": [None, 0.5, [0.25, None]], "c": {"d": 1}}
    assert type(cleaned["b"][2][0]) is float
    json.dumps(cleaned, allow_nan=False)


def test_source_file_reads_paths_and_metatensor_metadata():
    assert source_file(MetaTensor(torch.zeros(1), meta={"filename_or_obj": "/data/a.png"})) == "/data/a.png"
    assert source_file(MetaTensor(torch.zeros(2, 1), meta={"filename_or_obj": ["/x/b.tif", "/x/c.tif"]})) == "/x/b.tif"
    assert source_file("c.png") == "c.png"
    assert source_file(torch.zeros(1)) is None and source_file("") is None and source_file(None) is None


@pytest.mark.parametrize(
    ("path", "stem"),
    [("/d/cell.ome.tif", "cell"), ("vol.nii.gz", "vol"), ("name-[1 0 0 1].png", "name-[1 0 0 1]"), ("a.b.png", "a.b")],
)
def test_file_stem_drops_double_suffixes(path, stem):
    assert file_stem(path) == stem


def test_require_dir_names_the_missing_folder(tmp_path):
    assert require_dir(tmp_path) == tmp_path
    with pytest.raises(InputDataError, match=r"nowhere: image folder not found"):
        require_dir(tmp_path / "nowhere", "image folder")


def test_as_plane_drops_a_channel_of_one_and_refuses_other_shapes():
    assert as_plane(torch.ones(1, 3, 4)).shape == (3, 4)
    assert as_plane(np.ones((3, 4)), dtype=np.float32).dtype == np.float32
    with pytest.raises(ValueError, match=r"mask must be \(H, W\) or \(1, H, W\), got shape \(2, 3, 4\)"):
        as_plane(np.ones((2, 3, 4)), "mask")


def test_unwrap_module_removes_data_parallel_only():
    net = nn.Linear(2, 2)
    assert unwrap_module(nn.DataParallel(net)) is net and unwrap_module(net) is net
