"""Tests for common.errors: InputDataError's remedy, and the hook that ends a run's output with both."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from common.errors import GENERIC_REMEDY, InputDataError, find_input_data_error, install_excepthook
from tests.helpers import REPO_ROOT, bundle_command, run_command

BUNDLES = sorted(p.parents[1] for p in (REPO_ROOT / "bundles").glob("*/configs/train.json"))


def wrapped(cause: BaseException) -> RuntimeError:
    """``cause`` chained under a RuntimeError, as MONAI's ConfigComponent re-raises it."""
    try:
        try:
            raise cause
        except BaseException as err:
            raise RuntimeError("Failed to instantiate component 'reader'") from err
    except RuntimeError as err:
        return err


def test_message_names_the_path_and_remedy_defaults_to_the_generic_one():
    err = InputDataError("/data/train", "folder not found")
    assert str(err) == "/data/train: folder not found"
    assert err.remedy == GENERIC_REMEDY
    specific = InputDataError(None, "no images", remedy="python -m common.data.synthetic.cells --output DIR")
    assert str(specific) == "no images" and specific.remedy.startswith("python -m")


def test_finds_the_outermost_input_data_error_through_cause_and_context():
    inner = InputDataError("a.csv", "file is empty")
    outer = InputDataError("b.json", "lists a.csv, which is unusable")
    outer.__cause__ = inner
    assert find_input_data_error(wrapped(outer)) is outer
    try:
        try:
            raise inner
        except InputDataError:
            raise KeyError("raised while handling it")  # chained as __context__ only
    except KeyError as err:
        assert find_input_data_error(err) is inner
    assert find_input_data_error(wrapped(ValueError("unrelated"))) is None


@pytest.fixture
def previous_hook(monkeypatch) -> list[tuple]:
    """Calls that reach the hook installed before ours."""
    calls: list[tuple] = []
    monkeypatch.setattr(sys, "excepthook", lambda *args: calls.append(args))
    install_excepthook()
    install_excepthook()  # idempotent: a second install must not print twice
    return calls


def test_hook_prints_error_and_remedy_last(previous_hook, capsys):
    err = wrapped(InputDataError("/data/train", "folder not found", remedy="write it first"))
    sys.excepthook(RuntimeError, err, err.__traceback__)
    assert previous_hook == [(RuntimeError, err, err.__traceback__)]  # the traceback, printed as before
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["InputDataError: /data/train: folder not found", "How to fix: write it first"]


def test_hook_defers_other_errors_unchanged(previous_hook, capsys):
    err = wrapped(ValueError("unrelated"))
    sys.excepthook(RuntimeError, err, err.__traceback__)
    assert previous_hook == [(RuntimeError, err, err.__traceback__)]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_training_without_data_ends_with_the_missing_path_and_remedy(bundle, tmp_path):
    """MONAI wraps the readers' errors; the user must still read the cause and the fix last."""
    dataset_dir, bundle_root = tmp_path / "empty", tmp_path / "bundle_root"
    dataset_dir.mkdir()
    args = ["run", "training", "--config_file", str(bundle / "configs" / "train.json")]
    args += ["--dataset_dir", str(dataset_dir), "--bundle_root", str(bundle_root)]
    if "pretrained" in json.loads((bundle / "configs" / "train.json").read_text()):
        args += ["--pretrained", "False"]  # fail on the data, not on a download
    result = run_command(bundle_command(*args), timeout=300, check=False)
    assert result.returncode != 0
    last = [line for line in result.stderr.splitlines() if line.strip()][-2:]
    assert last[0].startswith(f"InputDataError: {tmp_path}/"), result.stderr[-3000:]
    path, problem = last[0].removeprefix("InputDataError: ").split(": ", 1)
    assert not Path(path).exists() and "not found" in problem
    assert last[1].startswith("How to fix: ") and "python -m " in last[1]  # the command that makes the data


def test_input_data_error_survives_pickling_with_its_remedy():
    import pickle

    err = pickle.loads(pickle.dumps(InputDataError("/data/a.png", "not an image", "convert it")))
    assert (str(err), err.remedy) == ("/data/a.png: not an image", "convert it")
