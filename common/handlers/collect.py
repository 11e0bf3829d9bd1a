"""Keep selected per-sample outputs of an evaluation run in memory, for searches over post-processing
parameters that must not re-run the network for every candidate."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ignite.engine import Engine, Events
from monai.utils import convert_to_numpy

from common.handlers.samples import iteration_samples

__all__ = ["OutputCollector"]


class OutputCollector:
    """Collect ``keys`` of every decollated sample as squeezed NumPy arrays.

    A key is looked up in the engine's per-sample output first and in the batch second (MONAI
    evaluators keep input keys such as reference labels in ``engine.state.batch``).

    Args:
        keys: the entries to keep, e.g. ``("pred", "instances")``.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = tuple(keys)
        self.values: dict[str, list[np.ndarray]] = {k: [] for k in self.keys}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def reset(self, engine: Engine | None = None) -> None:
        self.values = {k: [] for k in self.keys}

    def __call__(self, engine: Engine) -> None:
        for sample in iteration_samples(engine):
            for key in self.keys:
                if key not in sample:
                    raise KeyError(f"{key!r} is neither in the engine output nor in the batch: {sorted(sample)}")
                value = sample[key]
                array = convert_to_numpy(value, wrap_sequence=True)
                self.values[key].append(np.squeeze(array))

    def __getitem__(self, key: str) -> list[np.ndarray]:
        return self.values[key]
