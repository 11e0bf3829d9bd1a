"""Stop training: with one clear error when the loss stops being a finite number, or early when the
validation score has stopped improving for a number of optimiser steps."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine

from common.errors import InputDataError

__all__ = ["NonFiniteLossGuard", "StepEarlyStopping", "batch_sources"]

logger = logging.getLogger(__name__)


def batch_sources(batch: Any, key: str = "image") -> list[str]:
    """File names of the samples in a batch (collated dict or MONAI's decollated list of dicts),
    read from MetaTensor meta data or a ``name`` entry where present."""
    if isinstance(batch, (list, tuple)):
        return [name for item in batch for name in batch_sources(item, key)]
    if not isinstance(batch, dict):
        return []
    meta = getattr(batch.get(key), "meta", None) or batch.get(f"{key}_meta_dict") or {}
    names = meta.get("filename_or_obj") or batch.get("name")
    if names is None:
        return []
    return [str(n) for n in (names if isinstance(names, (list, tuple)) else [names])]


class NonFiniteLossGuard:
    """Raise :class:`InputDataError` naming the batch's files when the loss is NaN or infinite.

    Ignite's ``TerminateOnNan`` ends the run quietly; a user training on their own data needs to know
    which images were in the batch (a corrupt or all-constant image is the usual cause). Checkpoints
    already written stay intact because they are replaced atomically.

    Args:
        output_transform: extracts the loss from ``engine.state.output`` (default: the ``loss`` entry
            of the first decollated sample, where MONAI trainers put the batch loss).
        image_key: batch key whose meta data holds ``filename_or_obj``.
    """

    def __init__(
        self, output_transform: Callable[[Any], Any] | None = None, image_key: str = "image"
    ) -> None:
        self.output_transform = output_transform or from_engine(["loss"], first=True)
        self.image_key = image_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = self.output_transform(engine.state.output)
        if isinstance(loss, (tuple, list)):  # from_engine gives a 1-tuple for a dict output
            loss = loss[0]
        value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
        if math.isfinite(value):
            return
        sources = batch_sources(engine.state.batch, self.image_key)
        where = ", ".join(sources) if sources else None
        raise InputDataError(
            where,
            f"training loss became {value} at epoch {engine.state.epoch}, iteration {engine.state.iteration}: "
            "check these inputs for corrupt or constant images and consider a lower learning rate; "
            "checkpoints written so far are intact",
        )


class StepEarlyStopping:
    """Stop training when the validation score has not improved for ``patience`` optimiser steps, but
    never before ``min_steps``.

    Ignite's ``EarlyStopping`` counts validation rounds and may stop during warm-up, when the score
    of a model trained on a few images is still noisy; counting steps keeps the rule the same
    whatever the dataset size and validation cadence. Attach it to the evaluator, after the handler
    that publishes the score (e.g. ``CTCMetricsHandler`` for ``OP_CSB``), and give it the trainer.

    Args:
        score_function: the evaluator's score, larger is better (see
            :func:`common.handlers.scores.metric_score`, e.g. ``val_mse`` with ``mode="min"``).
        patience: optimiser steps without an improvement after which training stops.
        min_steps: steps trained before stopping is allowed.
        min_delta: smallest rise of the score that counts as an improvement.
        trainer: the trainer to stop; or set later with :meth:`set_trainer`.
    """

    def __init__(
        self,
        score_function: Callable[[Engine], float],
        patience: int,
        min_steps: int = 0,
        min_delta: float = 0.0,
        trainer: Engine | None = None,
    ) -> None:
        if patience < 1 or min_steps < 0 or min_delta < 0:
            raise ValueError(
                f"need patience >= 1, min_steps >= 0 and min_delta >= 0, got {patience}, {min_steps} and {min_delta}"
            )
        self.score_function = score_function
        self.patience = patience
        self.min_steps = min_steps
        self.min_delta = min_delta
        self.trainer = trainer
        self.best_score: float | None = None
        self.best_step = 0

    def set_trainer(self, trainer: Engine) -> None:
        self.trainer = trainer

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.trainer is None:
            raise RuntimeError("StepEarlyStopping has no trainer: pass trainer= or call set_trainer first")
        score = float(self.score_function(engine))
        step = self.trainer.state.iteration
        if self.best_score is None or score > self.best_score + self.min_delta:
            self.best_score, self.best_step = score, step
        elif step - self.best_step >= self.patience and step >= self.min_steps:
            logger.info(
                "no improvement since step %d (best score %.4f): training stops at step %d",
                self.best_step,
                self.best_score,
                step,
            )
            self.trainer.terminate()

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_step": self.best_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_score = state["best_score"]
        self.best_step = int(state["best_step"])
