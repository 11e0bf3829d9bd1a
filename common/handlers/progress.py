"""A progress bar that a config can list among the handlers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine
from ignite.handlers import ProgressBar

__all__ = ["ProgressBarHandler"]


class ProgressBarHandler:
    """Attach Ignite's tqdm ``ProgressBar`` on rank 0, showing the loss, for long runs.

    Args:
        output_transform: what to show from ``engine.state.output`` (default: the ``loss`` entry).
        enabled: lets a config switch the bar off (e.g. ``--progress false`` in batch jobs).
    """

    def __init__(self, output_transform: Callable[[Any], Any] | None = None, enabled: bool = True) -> None:
        self.output_transform = output_transform or _loss_only
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        if self.enabled and idist.get_rank() == 0:
            ProgressBar(persist=False).attach(engine, output_transform=self.output_transform)


def _loss_only(output: Any) -> dict[str, float]:
    if isinstance(output, list):  # decollated per-sample outputs: every sample carries the batch loss
        output = output[0]
    if isinstance(output, dict) and "loss" in output:
        return {"loss": float(output["loss"])}
    return {}
