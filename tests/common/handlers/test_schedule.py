from __future__ import annotations

import pytest
from ignite.engine import Engine, Events

from common.handlers.guards import StepEarlyStopping
from common.handlers.schedule import StepLimit, training_epochs

STEPS_PER_EPOCH = 3


def test_epochs_are_derived_from_the_step_budget():
    assert training_epochs(100, None, STEPS_PER_EPOCH) == 100
    assert training_epochs(100, 10, STEPS_PER_EPOCH) == 4
    assert training_epochs(100, 9, STEPS_PER_EPOCH) == 3
    with pytest.raises(ValueError, match="max_steps"):
        training_epochs(100, 0, STEPS_PER_EPOCH)
    with pytest.raises(ValueError, match="no batch per epoch"):
        training_epochs(100, 10, 0)


def test_step_limit_ends_training_mid_epoch():
    trainer = Engine(lambda engine, batch: None)
    StepLimit(10).attach(trainer)
    trainer.run(range(STEPS_PER_EPOCH), max_epochs=training_epochs(100, 10, STEPS_PER_EPOCH))
    assert trainer.state.iteration == 10
    unlimited = Engine(lambda engine, batch: None)
    StepLimit(None).attach(unlimited)
    unlimited.run(range(STEPS_PER_EPOCH), max_epochs=2)
    assert unlimited.state.iteration == 6


def _train_with_early_stopping(min_steps: int) -> tuple[Engine, StepEarlyStopping]:
    """Validate every 2 steps; the score improves until step 4, then stays flat."""
    trainer = Engine(lambda engine, batch: None)
    evaluator = Engine(lambda engine, batch: None)
    stopper = StepEarlyStopping(
        lambda _: float(min(trainer.state.iteration, 4)), patience=4, min_steps=min_steps, trainer=trainer
    )
    stopper.attach(evaluator)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=2), lambda _: evaluator.run([0]))
    trainer.run(range(STEPS_PER_EPOCH), max_epochs=20)
    return trainer, stopper


def test_early_stopping_counts_steps_and_waits_for_min_steps():
    trainer, stopper = _train_with_early_stopping(min_steps=0)
    assert trainer.state.iteration == 8  # best at step 4, patience 4 steps
    assert stopper.state_dict() == {"best_score": 4.0, "best_step": 4}
    trainer, _ = _train_with_early_stopping(min_steps=14)
    assert trainer.state.iteration == 14


def test_early_stopping_state_round_trips_and_needs_a_trainer():
    stopper = StepEarlyStopping(lambda _: 0.0, patience=5)
    stopper.load_state_dict({"best_score": 0.7, "best_step": 30})
    assert stopper.state_dict() == {"best_score": 0.7, "best_step": 30}
    with pytest.raises(RuntimeError, match="no trainer"):
        stopper(Engine(lambda engine, batch: None))
    with pytest.raises(ValueError, match="patience >= 1"):
        StepEarlyStopping(lambda _: 0.0, patience=0)
