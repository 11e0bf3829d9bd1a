"""Per-sample views of what a MONAI engine produced in one iteration."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import ignite.distributed as idist
from ignite.engine import Engine, Events
from monai.data import decollate_batch

from common.utils import source_file

__all__ = ["EpochAccumulator", "gather_by_name", "iteration_samples", "sample_name"]


def iteration_samples(engine: Engine) -> list[dict[str, Any]]:
    """One dict per sample of the last iteration: the output's entries completed by the batch's.

    MONAI evaluators keep input keys that postprocessing does not rewrite (reference labels loaded with
    the image, boxes, names) in ``engine.state.batch`` rather than ``engine.state.output``; both are
    lists of per-sample dicts after ``decollate_batch``. A batched dict (``decollate=False``) is
    decollated here. Output entries win over batch entries of the same name.
    """
    outputs, batches = engine.state.output, engine.state.batch
    if isinstance(outputs, Mapping):
        outputs = decollate_batch(outputs)
        batches = decollate_batch(batches) if isinstance(batches, Mapping) else batches
    if not isinstance(batches, list) or len(batches) != len(outputs):
        batches = [{}] * len(outputs)
    return [{**(b if isinstance(b, Mapping) else {}), **o} for o, b in zip(outputs, batches)]


def sample_name(
    sample: Mapping[str, Any], name_key: str = "name", image_key: str = "image", position: int | None = None
) -> str | None:
    """The source file of a sample: its ``name_key`` entry, else the ``filename_or_obj`` of the
    MetaTensor under ``image_key``. Without either, ``rank<r>_image<position>`` when the sample's
    ``position`` on this rank is given (unique across ranks), else ``None``."""
    name = source_file(sample.get(name_key)) or source_file(sample.get(image_key))
    if name is None and position is not None:
        return f"rank{idist.get_rank()}_image{position}"
    return name


Record = TypeVar("Record")


def gather_by_name(records: Sequence[Record], name: Callable[[Record], str]) -> dict[str, Record]:
    """Every rank's ``records`` keyed by ``name(record)``, the first of each name kept (rank order, then
    arrival order). DistributedSampler pads an epoch by repeating samples: a repeated image counts once."""
    unique: dict[str, Record] = {}
    for rank_records in idist.all_gather(list(records)):
        for record in rank_records:
            unique.setdefault(name(record), record)
    return unique


class EpochAccumulator(ABC):
    """Base of handlers that collect per-sample results over an evaluation epoch and summarise them:
    ``reset`` at EPOCH_STARTED, ``update`` after each iteration, ``complete`` at EPOCH_COMPLETED."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.complete)

    @abstractmethod
    def reset(self, engine: Engine | None = None) -> None:
        """Forget the previous epoch."""

    @abstractmethod
    def update(self, engine: Engine) -> None:
        """Take the samples of the last iteration."""

    @abstractmethod
    def complete(self, engine: Engine) -> None:
        """Summarise the epoch."""
