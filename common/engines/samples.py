"""Per-sample views of what a MONAI engine produced in one iteration."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ignite.engine import Engine
from monai.data import MetaTensor, decollate_batch

__all__ = ["iteration_samples", "sample_name"]


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


def sample_name(sample: Mapping[str, Any], name_key: str = "name", image_key: str = "image") -> str | None:
    """The source file of a sample: its ``name_key`` entry, else the ``filename_or_obj`` of the
    MetaTensor under ``image_key``; ``None`` when neither is there (callers then number the sample)."""
    name = sample.get(name_key)
    if isinstance(name, (str, os.PathLike)) and os.fspath(name):
        return os.fspath(name)
    image = sample.get(image_key)
    source = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
    if isinstance(source, (str, os.PathLike)) and os.fspath(source):
        return os.fspath(source)
    return None
