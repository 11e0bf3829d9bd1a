"""Score functions for early stopping and model selection from named metrics."""

from __future__ import annotations

from collections.abc import Callable

from ignite.engine import Engine

__all__ = ["metric_score"]


def metric_score(metric_name: str, mode: str = "max") -> Callable[[Engine], float]:
    """A score where larger is better, as Ignite's ``EarlyStopping`` expects: the metric itself for
    ``mode="max"``, its negative for errors (``mode="min"``, e.g. validation MSE)."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
    sign = 1.0 if mode == "max" else -1.0

    def score(engine: Engine) -> float:
        return sign * float(engine.state.metrics[metric_name])

    return score
