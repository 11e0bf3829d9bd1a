import pytest
from ignite.engine import Engine

from common.engines.stages import run_stages


def _trainer(log, name):
    engine = Engine(lambda e, b: log.append(name))
    engine.run = lambda: Engine.run(engine, [0], max_epochs=1)
    return engine


def test_runs_one_stage_or_all_in_order():
    log = []
    trainers = {"detect": _trainer(log, "detect"), "classify": _trainer(log, "classify")}
    assert run_stages("classify", trainers) == ["classify"] and log == ["classify"]
    log.clear()
    assert run_stages("both", trainers) == ["detect", "classify"] and log == ["detect", "classify"]


def test_unknown_stage_names_the_choices():
    with pytest.raises(ValueError, match=r"\['detect', 'classify', 'both'\]"):
        run_stages("segment", {"detect": Engine(lambda e, b: None), "classify": Engine(lambda e, b: None)})
