import os
import pickle

import pytest
import torch

from common.errors import InputDataError
from common.io.checkpoint import extract_state_dict, load_checkpoint, save_checkpoint, sha256sum


class _RunsCodeOnLoad:
    """Unpickling this calls os.system: the payload a malicious checkpoint would carry."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_round_trip_and_sha256(tmp_path):
    state = {"weight": torch.arange(6.0).reshape(2, 3), "epoch": 3}
    path = save_checkpoint(state, tmp_path / "sub" / "model.pt")
    loaded = load_checkpoint(path, sha256=sha256sum(path))
    assert torch.equal(loaded["weight"], state["weight"]) and loaded["epoch"] == 3
    assert not [p for p in path.parent.iterdir() if p.name != "model.pt"], "temporary files left behind"


def test_sha256_mismatch_is_refused(tmp_path):
    path = save_checkpoint({"w": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(InputDataError, match="sha256") as err:
        load_checkpoint(path, sha256="0" * 64)
    assert str(path) in str(err.value)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _RunsCodeOnLoad()}, f)
    with pytest.raises(InputDataError, match="refused to load") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(InputDataError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(InputDataError, match="corrupt.pt"):
        load_checkpoint(corrupt)


def test_failed_save_keeps_previous_file(tmp_path):
    path = save_checkpoint({"w": torch.ones(2)}, tmp_path / "model.pt")
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a local lambda: AttributeError
        save_checkpoint({"w": lambda: None}, path)  # lambdas cannot be pickled
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_extract_state_dict():
    weights = {"w": torch.zeros(1)}
    assert extract_state_dict({"state_dict": weights, "epoch": 1}) is weights
    assert extract_state_dict({"network": weights}) is weights
    assert extract_state_dict(weights) is weights
    assert extract_state_dict({"ema": weights}, key="ema") is weights
