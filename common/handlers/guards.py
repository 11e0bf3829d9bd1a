"""Stop training with one clear error when the loss stops being a finite number."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine

from common.errors import InputDataError

__all__ = ["NonFiniteLossGuard", "batch_sources"]


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

    def __init__(self, output_transform: Callable[[Any], Any] | None = None, image_key: str = "image") -> None:
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
