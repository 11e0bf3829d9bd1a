"""The table of every site's and the global model's validation scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("nvflare", reason="federated training needs the fl extra: pip install .[fl]")

from common.fl.scores import scores_markdown, write_scores


def test_scores_table_lists_the_global_model_first(tmp_path: Path):
    scores = {
        "site-2": {"site-1": {"val_mse": 0.3}, "site-2": {"val_mse": 0.1}},
        "SRV_global": {"site-1": {"val_mse": 0.2}, "site-2": {"val_mse": float("nan")}},
        "site-1": {"site-1": {"val_mse": 0.25}},
    }
    lines = scores_markdown(scores).splitlines()
    assert lines[0] == "| model | site-1 val_mse | site-2 val_mse |"
    assert lines[2] == "| global (server) | 0.2000 | nan |"
    assert lines[3] == "| site-1 (local) | 0.2500 | - |"
    assert lines[4] == "| site-2 (local) | 0.3000 | 0.1000 |"
    json_path, md_path = write_scores(scores, tmp_path)
    assert json.loads(json_path.read_text())["SRV_global"]["site-2"]["val_mse"] is None
    assert md_path.read_text() == scores_markdown(scores)
