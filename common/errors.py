"""The one error type for bad user input.

Every reader, converter and workflow in the collection raises :class:`InputDataError` when a file
is missing, unreadable or inconsistent, so that a user sees a single message naming the file and
what is wrong with it, instead of a stack trace from deep inside NumPy or PyTorch.
"""

from __future__ import annotations

import os

__all__ = ["InputDataError"]


class InputDataError(ValueError):
    """Bad input data, reported with the offending path.

    Args:
        path: the file or folder at fault (``None`` when the problem is not tied to one file).
        problem: what is wrong, written for the user, e.g. ``"mask is 512x512 but image is 520x704"``.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if self.path is None else f"{self.path}: {problem}")
