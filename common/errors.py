"""The one error type for bad user input, and the hook that keeps it in view.

Every reader, converter and workflow in the collection raises :class:`InputDataError` when a file
is missing, unreadable or inconsistent, so that a user sees a single message naming the file, what
is wrong with it and how to fix it, instead of a stack trace from deep inside NumPy or PyTorch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["GENERIC_REMEDY", "InputDataError", "find_input_data_error", "install_excepthook"]

GENERIC_REMEDY = (
    "check the path and what it holds (bundles read their data from --dataset_dir and the other paths set "
    "on the command line); the Data section of the bundle's docs/README.md describes the layout it reads "
    "and the commands that write demo data or convert your own"
)


class InputDataError(ValueError):
    """Bad input data, reported with the offending path and what to do about it.

    Args:
        path: the file or folder at fault (``None`` when the problem is not tied to one file).
        problem: what is wrong, written for the user, e.g. ``"mask is 512x512 but image is 520x704"``.
        remedy: how to fix it, e.g. the command that writes the missing dataset; default
            :data:`GENERIC_REMEDY`. Kept out of the message, which stays ``"<path>: <problem>"``.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str, remedy: str | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        self.remedy = remedy or GENERIC_REMEDY
        super().__init__(problem if self.path is None else f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[type[InputDataError], tuple[str | None, str, str]]:
        """Rebuilt from its arguments, so that it survives DataLoader workers and multiprocessing."""
        return type(self), (self.path, self.problem, self.remedy)


def find_input_data_error(err: BaseException) -> InputDataError | None:
    """The outermost :class:`InputDataError` in ``err``'s chain of ``__cause__`` and ``__context__``."""
    seen: set[int] = set()
    pending: list[BaseException] = [err]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, InputDataError):
            return current
        pending += [link for link in (current.__cause__, current.__context__) if link is not None]
    return None


_ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], Any]


class _ExplainInputDataError:
    """``sys.excepthook`` that ends the report of an exception caused by an InputDataError with it."""

    def __init__(self, previous: _ExceptHook) -> None:
        self.previous = previous

    def __call__(self, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        self.previous(exc_type, exc, tb)
        cause = find_input_data_error(exc)
        if cause is not None:
            message = f"\n{type(cause).__name__}: {cause}\nHow to fix: {cause.remedy}"
            print(message, file=sys.stderr, flush=True)


def install_excepthook() -> None:
    """End the report of any uncaught exception caused by an :class:`InputDataError` with it and its remedy.

    MONAI's ``ConfigComponent`` and ``ConfigExpression`` re-raise every exception of a config item as
    ``RuntimeError: Failed to instantiate component ...`` (or ``Failed to evaluate ...``), so a reader's
    error is buried mid-traceback of ``python -m monai.bundle run``, whose last line names MONAI's
    wrapper. The hook lets the previously installed hook print the traceback, then repeats the error and
    how to fix it; other exceptions only reach the previous hook. Installing it twice changes nothing.
    """
    if not isinstance(sys.excepthook, _ExplainInputDataError):
        sys.excepthook = _ExplainInputDataError(sys.excepthook)
