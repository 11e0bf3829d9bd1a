"""Training schedules counted in optimiser steps.

With a handful of annotated images an epoch is one or two steps, so a schedule in epochs is too
coarse: warm-up, validation and early stopping all need steps as their unit. The user fixes the
number of optimiser steps (``max_steps``); the epochs the trainer runs are derived from it, and
:class:`StepLimit` ends training on exactly that step.
"""

from __future__ import annotations

import logging
import math

from ignite.engine import Engine, Events

__all__ = ["StepLimit", "training_epochs"]

logger = logging.getLogger(__name__)


def training_epochs(epochs: int, max_steps: int | None, steps_per_epoch: int) -> int:
    """Epochs for the trainer: ``epochs`` as given, or enough to hold ``max_steps`` optimiser steps.

    Args:
        epochs: the schedule in epochs, used when ``max_steps`` is ``None``.
        max_steps: the schedule in optimiser steps, or ``None``.
        steps_per_epoch: batches per epoch (``len(dataloader)``).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"the training data gives no batch per epoch (steps_per_epoch={steps_per_epoch})")
    if max_steps is None:
        return epochs
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    return math.ceil(max_steps / steps_per_epoch)


class StepLimit:
    """End training after ``max_steps`` optimiser steps, mid-epoch if need be (nothing when ``None``).

    Args:
        max_steps: the step after which the trainer terminates.
    """

    def __init__(self, max_steps: int | None) -> None:
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.max_steps = max_steps

    def attach(self, engine: Engine) -> None:
        if self.max_steps is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration >= self.max_steps:
            logger.info("reached max_steps=%d: training ends", self.max_steps)
            engine.terminate()
