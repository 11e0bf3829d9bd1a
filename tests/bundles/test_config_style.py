"""Bundle configs read like MONAI model-zoo configs: short expressions, one ImageNet normalisation, and
logging handlers switched off on non-zero ranks by a flag rather than by their position in a list."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from monai.bundle import ConfigParser

from tests.helpers import REPO_ROOT

CONFIGS = sorted(REPO_ROOT.glob("bundles/*/configs/*.json"))
TRAIN_CONFIGS = sorted(REPO_ROOT.glob("bundles/*/configs/train.json"))
MULTI_GPU_CONFIGS = sorted(REPO_ROOT.glob("bundles/*/configs/multi_gpu_train.json"))
MAX_EXPRESSION = 80
# handlers that only report (log lines, TensorBoard events, a progress bar): one rank is enough
LOGGING_HANDLERS = ("StatsHandler", "TensorBoardStatsHandler", "ProgressBarHandler")
OFF_BELOW_RANK_0 = "$not @main_rank"


def _label(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def _strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string of a JSON document with its id (``a#0#b``)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}#{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _strings(value, f"{path}#{index}" if path else str(index))
    elif isinstance(node, str):
        yield path, node


def _components(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every ``_target_`` component of a JSON document with its id."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            yield from _components(value, f"{path}#{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _components(value, f"{path}#{index}" if path else str(index))


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_the_collection_has_configs():
    assert len(CONFIGS) >= 8 and len(TRAIN_CONFIGS) >= 2 and len(MULTI_GPU_CONFIGS) >= 2


@pytest.mark.parametrize("config", CONFIGS, ids=_label)
def test_expressions_are_short(config: Path):
    """Longer logic belongs in a named, documented function of ``common/`` that the config calls."""
    long = [
        f"{config_id} ({len(text)} characters): {text[:60]}..."
        for config_id, text in _strings(_load(config))
        if text.startswith("$") and len(text) > MAX_EXPRESSION
    ]
    assert not long, f"{_label(config)}: expressions over {MAX_EXPRESSION} characters:\n" + "\n".join(long)


@pytest.mark.parametrize("config", CONFIGS, ids=_label)
def test_imagenet_statistics_are_not_restated(config: Path):
    """One transform (``common.transforms.intensity.NormalizeImageNetd``) holds the ImageNet mean and std."""
    text = config.read_text()
    restated = [value for value in ("0.485", "0.229", "123.675", "58.395") if value in text]
    assert not restated, f"{_label(config)} restates ImageNet statistics {restated}; use NormalizeImageNetd"


@pytest.mark.parametrize("config", TRAIN_CONFIGS, ids=_label)
def test_train_configs_log_on_the_main_rank_by_default(config: Path):
    assert _load(config).get("main_rank") is True


def _configs_with_main_rank() -> list[Path]:
    """The configs that multi_gpu_train.json is merged over: those defining the flag."""
    return [c for c in CONFIGS if "main_rank" in _load(c) and c.name != "multi_gpu_train.json"]


@pytest.mark.parametrize("config", _configs_with_main_rank(), ids=_label)
def test_logging_handlers_are_off_on_other_ranks(config: Path):
    """Under DDP every rank runs the same handlers except those that only report, which rank 0 runs."""
    components = [
        (config_id, component)
        for config_id, component in _components(_load(config))
        if str(component["_target_"]).rsplit(".", 1)[-1] in LOGGING_HANDLERS
    ]
    assert components, f"{_label(config)} defines main_rank but has no logging handler"
    wrong = [cid for cid, component in components if component.get("_disabled_") != OFF_BELOW_RANK_0]
    assert not wrong, f"{_label(config)}: handlers without \"_disabled_\": \"{OFF_BELOW_RANK_0}\": {wrong}"


@pytest.mark.parametrize("config", MULTI_GPU_CONFIGS, ids=_label)
def test_multi_gpu_overlays_set_the_flag_and_keep_every_handler_list(config: Path):
    content = _load(config)
    assert content.get("main_rank") == {
        "_target_": "common.engines.distributed.is_main_process",
        "_requires_": "@device",
    }
    overridden = [key for key in content if key.endswith("handlers")]
    assert not overridden, f"handler lists are not overridden under DDP: {overridden}"
    assert "imports" not in content, "use +imports, so that train.json's imports are kept"


@pytest.mark.parametrize("main_rank", [True, False])
def test_monai_drops_disabled_components_from_lists(main_rank: bool):
    """What the flag relies on: MONAI leaves a component whose ``_disabled_`` is true out of its list."""
    parser = ConfigParser(
        {
            "main_rank": main_rank,
            "handlers": [
                {"_target_": "StatsHandler", "_disabled_": OFF_BELOW_RANK_0, "iteration_log": False},
                {"_target_": "EarlyStopHandler", "patience": 1, "score_function": "$lambda engine: 0.0"},
            ],
        }
    )
    handlers = parser.get_parsed_content("handlers")
    expected = ["StatsHandler", "EarlyStopHandler"] if main_rank else ["EarlyStopHandler"]
    assert [type(handler).__name__ for handler in handlers] == expected
