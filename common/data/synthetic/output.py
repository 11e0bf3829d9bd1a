"""Where synthetic generators write: a folder built atomically and marked with the generator's name,
so that a rerun may replace its own earlier output but never a folder holding the user's data."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.errors import InputDataError
from common.io.atomic import atomic_directory

__all__ = ["SPLITS", "synthetic_dataset_folder", "write_dataset_json"]

SPLITS = ("train", "val", "test")
_SETTINGS_FILE = "dataset.json"


def _is_generated(folder: Path, generator: str, subfolders: Sequence[str]) -> bool:
    """Whether ``folder`` holds an earlier output of ``generator`` and nothing else."""
    if any(p.name not in (*subfolders, _SETTINGS_FILE) for p in folder.iterdir()):
        return False
    try:
        settings = json.loads((folder / _SETTINGS_FILE).read_text(encoding="utf-8"))
        return settings.get("generator") == generator
    except (OSError, ValueError, AttributeError):
        return False


@contextmanager
def synthetic_dataset_folder(
    output_dir: str | os.PathLike, generator: str, subfolders: Sequence[str] = SPLITS
) -> Iterator[Path]:
    """Yield a staging folder that replaces ``output_dir`` when the block succeeds.

    ``subfolders`` names what the generator writes besides ``dataset.json``; an existing folder holding
    anything else is the user's and is never replaced.

    Raises:
        InputDataError: ``output_dir`` exists, is not empty and is not an earlier output of ``generator``.
    """
    output_dir = Path(output_dir)
    replaceable = not output_dir.exists() or not any(output_dir.iterdir())
    if not replaceable and not _is_generated(output_dir, generator, subfolders):
        raise InputDataError(output_dir, "exists and is not an earlier synthetic dataset; refusing to replace it")
    with atomic_directory(output_dir) as staging:
        yield staging


def write_dataset_json(folder: Path, generator: str, settings: dict[str, Any]) -> None:
    """Record the generator and its settings, which also marks the folder as regenerable."""
    text = json.dumps({"generator": generator, **settings}, indent=2)
    (folder / _SETTINGS_FILE).write_text(text, encoding="utf-8")
