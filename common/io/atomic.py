"""Atomic writes: readers see the old file or folder or the complete new one, never a partial one."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_directory", "atomic_write"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, then rename it to ``path``.

    The rename is atomic on one filesystem, so readers see either the old file or the complete new one.
    The temporary file is opened by name (some writers, like tifffile, need ``f.name``) and with the
    user's umask, so the result has the same permissions as any other file they write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp_path, "xb") as f:
            write(f)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a staging folder beside ``target``, then swap it in.

    On success an existing ``target`` is set aside, replaced, and deleted only once the new folder is
    in place; on any error the staging folder is removed and ``target`` is left as it was. Callers
    decide beforehand whether ``target`` may be replaced at all.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    staging.mkdir()  # unlike mkdtemp, honours the umask: the result is as readable as the user's files
    try:
        yield staging
        if target.exists():
            previous = staging.with_name(staging.name + ".old")
            os.rename(target, previous)
            try:
                os.rename(staging, target)
            except BaseException:
                os.rename(previous, target)
                raise
            shutil.rmtree(previous)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
