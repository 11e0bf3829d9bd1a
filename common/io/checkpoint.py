"""Safe checkpoint I/O shared by every bundle.

Checkpoints travel between hospitals, so loading one must never run code: :func:`load_checkpoint`
always uses ``torch.load(..., weights_only=True)`` and, where the sender declared a sha256, checks
it before unpickling anything. :func:`save_checkpoint` writes to a temporary file in the target
folder and renames it, so an interrupted run never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from common.errors import InputDataError
from common.io.atomic import atomic_write

__all__ = ["extract_state_dict", "load_checkpoint", "save_checkpoint", "sha256sum"]


def sha256sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB weights do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(
    path: str | os.PathLike, sha256: str | None = None, map_location: str | torch.device = "cpu"
) -> Any:
    """Load a checkpoint without executing code.

    Args:
        path: checkpoint file written by :func:`save_checkpoint` or ``torch.save``.
        sha256: expected hex digest; when given, a mismatch is refused before loading.
        map_location: where tensors are placed.

    Raises:
        InputDataError: the file is missing, its digest differs, or it holds objects other than
            tensors and plain containers (a pickled payload that could run code).
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "checkpoint file not found")
    if sha256 is not None:
        actual = sha256sum(path)
        if actual.lower() != sha256.lower():
            raise InputDataError(path, f"sha256 is {actual}, expected {sha256}: the file is corrupt or not the declared one")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise InputDataError(
            path,
            "refused to load: the checkpoint contains objects other than tensors and plain containers "
            f"(loading it could run arbitrary code). Details: {str(err).splitlines()[0]}",
        ) from err
    except (RuntimeError, EOFError) as err:
        raise InputDataError(path, f"not a readable PyTorch checkpoint ({err})") from err


def extract_state_dict(checkpoint: Any, key: str | None = None) -> dict[str, torch.Tensor]:
    """The network weights inside a checkpoint: ``checkpoint[key]`` when ``key`` is given, else
    the ``state_dict``/``model``/``network`` entry if one exists, else the checkpoint itself."""
    if key is not None:
        return checkpoint[key]
    if isinstance(checkpoint, dict):
        for candidate in ("state_dict", "model", "network"):
            if candidate in checkpoint and isinstance(checkpoint[candidate], dict):
                return checkpoint[candidate]
    return checkpoint


def save_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """Save ``obj`` with ``torch.save`` atomically: write a temporary file beside ``path``, then rename."""
    return atomic_write(path, lambda f: torch.save(obj, f))
