"""Run one or several training stages of a multi-stage bundle from one config."""

from __future__ import annotations

from collections.abc import Mapping

from ignite.engine import Engine

__all__ = ["run_stages"]


def run_stages(stage: str, trainers: Mapping[str, Engine], all_name: str = "both") -> list[str]:
    """Run ``trainers[stage]``, or every trainer in mapping order when ``stage == all_name``.

    Two-stage bundles (detector then classifier) keep both trainers in one ``train.json``;
    ``--stage`` picks what a run trains. Returns the stages that ran.

    Raises:
        ValueError: ``stage`` is neither a trainer name nor ``all_name``.
    """
    names = list(trainers) if stage == all_name else [stage]
    unknown = [name for name in names if name not in trainers]
    if unknown:
        raise ValueError(f"stage must be one of {[*trainers, all_name]}, got {stage!r}.")
    for name in names:
        trainers[name].run()
    return names
