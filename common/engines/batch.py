"""Batch runs that survive a bad input: one job per input, a failure logged with its cause and the run
going on, a summary at the end, a non-zero exit status when anything failed, and inputs whose outputs
are already complete skipped, so an interrupted batch resumes where it stopped.

Whole slides are one job each (:func:`run_batch`). Folders of images go through a MONAI evaluator, where
one unreadable image would end the run from inside the DataLoader: :class:`FailSafeDataset` turns a
failed item into a marker, :func:`collate_skipping_failed` keeps markers out of the batch, and
:class:`SkipFailedBatches` logs them, feeds the evaluator the rest, and raises at the end
(:meth:`SkipFailedBatches.raise_if_failed`); :func:`pending` drops the entries whose outputs exist.

A slide bundle's config imports it (``"$from common.engines.batch import run_batch"``) and runs
``"$run_batch(@slide_list, @segmenter, @segmenter.is_done)"``. An image bundle's ``datalist`` is
:func:`pending` over its folder's images, its ``dataloader`` is :func:`fail_safe_loader` over its
``dataset``, and its ``finalize`` calls ``"$@dataloader.raise_if_failed()"`` (``finalize``, not ``run``,
so that MONAI Label, which runs ``evaluator`` then ``finalize``, sees the failure too). Outputs must be
written atomically (``common.io.atomic``) for "present" to mean "complete".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from monai.data import DataLoader, list_data_collate
from torch.utils.data import Dataset

from common.errors import InputDataError, find_input_data_error
from common.utils import file_stem

__all__ = [
    "FAILED_KEY",
    "BatchFailedError",
    "BatchReport",
    "FailSafeDataset",
    "PendingEntries",
    "SkipFailedBatches",
    "collate_skipping_failed",
    "fail_safe_loader",
    "pending",
    "run_batch",
]

#: Key of the marker a :class:`FailSafeDataset` returns for an item that failed, and of the failures a
#: batch from :func:`collate_skipping_failed` carries.
FAILED_KEY = "failed_inputs"

logger = logging.getLogger(__name__)

Input = TypeVar("Input")


@dataclass
class BatchReport:
    """What a batch run did: how many inputs were processed (and, from :func:`run_batch`, their results),
    the inputs skipped as already complete, and the inputs that failed with their cause."""

    processed: int = 0
    results: list[Any] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        done, skipped, failed = self.processed, len(self.skipped), len(self.failed)
        text = f"{done} processed, {skipped} skipped (outputs complete), {failed} failed"
        return text + "".join(f"\n  failed: {name}: {cause}" for name, cause in self.failed.items())


class BatchFailedError(RuntimeError):
    """Some inputs of a batch failed; raised after all the others were processed, so the exit status of
    ``python -m monai.bundle run`` is non-zero. ``report`` holds the :class:`BatchReport`; the first
    failure is the ``__cause__`` (so :func:`common.errors.install_excepthook` still explains it)."""

    def __init__(self, report: BatchReport) -> None:
        self.report = report
        super().__init__(f"batch finished with failures: {report.summary()}")


def _cause(err: BaseException) -> str:
    """The user-facing reason: the :class:`~common.errors.InputDataError` behind ``err`` when there is one,
    else the type and message of the deepest ``__cause__`` (config and transform wrappers such as MONAI's
    ``applying transform ...`` hide the reader's own error in the chain)."""
    input_error = find_input_data_error(err)
    if input_error is not None:
        return input_error.problem
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}"


def run_batch(
    inputs: Iterable[Input],
    process: Callable[[Input], Any],
    is_done: Callable[[Input], bool] | None = None,
    raise_on_failure: bool = True,
) -> BatchReport:
    """Call ``process`` on every input not yet done, logging failures and going on.

    Args:
        inputs: e.g. slide paths, or datalist entries.
        process: the job for one input; what it returns goes into ``BatchReport.results``.
        is_done: whether an input's outputs are already complete (then it is skipped); default: never.
        raise_on_failure: end by raising :class:`BatchFailedError` when an input failed (a non-zero exit
            status for the command line); ``False`` returns the report instead.

    Interrupting (``KeyboardInterrupt``) stops the run at once: the inputs finished so far are complete
    and will be skipped when it is run again.
    """
    report = BatchReport()
    first_error: Exception | None = None
    for item in inputs:
        name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else str(item)
        if is_done is not None and is_done(item):
            logger.info("%s: outputs complete, skipped", name)
            report.skipped.append(name)
            continue
        try:
            report.results.append(process(item))
            report.processed += 1
        except Exception as err:  # one bad input must not stop the batch: logged and reported
            report.failed[name] = _cause(err)
            first_error = first_error or err
            logger.error("%s: failed, going on with the next input: %s", name, report.failed[name])
            logger.debug("%s: traceback", name, exc_info=err)
    log = logger.error if report.failed else logger.info
    log("batch: %s", report.summary())
    if report.failed and raise_on_failure:
        raise BatchFailedError(report) from first_error  # the first cause stays in the chain
    return report


def _entry_name(entry: Any, key: str) -> str:
    value = entry.get(key, entry) if isinstance(entry, Mapping) else entry
    return os.fspath(value) if isinstance(value, (str, os.PathLike)) else str(value)


class FailSafeDataset(Dataset):
    """A dataset whose items that fail to load or transform become ``{FAILED_KEY: [(name, cause)]}``
    markers instead of exceptions (which would end the evaluator's run from the DataLoader).

    Args:
        dataset: e.g. a MONAI ``Dataset`` over a datalist; its ``data`` names the failed entries.
        key: the datalist key naming an input (its file), default ``"image"``.
    """

    def __init__(self, dataset: Any, key: str = "image") -> None:
        self.dataset, self.key = dataset, key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except Exception as err:  # noqa: BLE001 - a bad input becomes a marker, logged by SkipFailedBatches
            entries = getattr(self.dataset, "data", None)
            name = _entry_name(entries[index], self.key) if entries is not None else f"item {index}"
            return {FAILED_KEY: [(name, _cause(err))]}


def collate_skipping_failed(items: Sequence[Any], collate: Callable[[list], Any] = list_data_collate) -> Any:
    """``collate_fn`` for a DataLoader over a :class:`FailSafeDataset`: ``collate`` (default MONAI's
    ``list_data_collate``; a bundle's own through ``"_mode_": "partial"``) of the items that loaded, with
    the failures under :data:`FAILED_KEY` (a batch of failures only is ``{FAILED_KEY: [...]}``; a batch
    mixing both must collate to a dict)."""
    failed = [
        f for item in items if isinstance(item, Mapping) and FAILED_KEY in item for f in item[FAILED_KEY]
    ]
    loaded = [item for item in items if not (isinstance(item, Mapping) and FAILED_KEY in item)]
    if not failed:
        return collate(loaded)
    batch = collate(loaded) if loaded else {}
    batch[FAILED_KEY] = failed
    return batch


def _batch_size(batch: Any) -> int:
    """Items in a collated batch: the length of its first tensor or list (1 when it has none)."""
    values = batch.values() if isinstance(batch, Mapping) else [batch]
    return next(
        (len(value) for value in values if hasattr(value, "__len__") and not isinstance(value, str)), 1
    )


class SkipFailedBatches:
    """The evaluator's data: the batches of ``loader`` (collated by :func:`collate_skipping_failed`) with
    their failures logged and removed. It has no length, so the evaluator's epoch ends with the data.
    Call :meth:`raise_if_failed` after the run (in the config's ``finalize``, after the writers close).

    Args:
        loader: the batches, e.g. a DataLoader over a :class:`FailSafeDataset`.
        skipped: the inputs left out as already complete (:attr:`PendingEntries.skipped`), for the summary.
    """

    def __init__(self, loader: Iterable[Any], skipped: Sequence[str] = ()) -> None:
        self.loader = loader
        self.report = BatchReport(skipped=list(skipped))

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if isinstance(batch, dict) and FAILED_KEY in batch:
                for name, cause in batch.pop(FAILED_KEY):
                    self.report.failed[name] = cause
                    logger.error("%s: failed, going on with the next input: %s", name, cause)
                if not batch:
                    continue
            self.report.processed += _batch_size(batch)
            yield batch

    def raise_if_failed(self) -> None:
        """Log the summary; raise :class:`BatchFailedError` (a non-zero exit status) when an input failed,
        from an :class:`~common.errors.InputDataError` naming the first failed input and its cause, so that
        the command line's excepthook explains it and MONAI Label answers 422 naming the file."""
        log = logger.error if self.report.failed else logger.info
        log("batch: %s", self.report.summary())
        if self.report.failed:
            name, cause = next(iter(self.report.failed.items()))
            raise BatchFailedError(self.report) from InputDataError(name, cause)


def fail_safe_loader(
    dataset: Any,
    key: str = "image",
    collate_fn: Callable[[list], Any] = list_data_collate,
    **loader_kwargs: Any,
) -> SkipFailedBatches:
    """An evaluator's ``val_data_loader`` that survives a bad input: :class:`SkipFailedBatches` over a MONAI
    ``DataLoader`` over a :class:`FailSafeDataset` over ``dataset``.

    Args:
        dataset: e.g. a MONAI ``Dataset`` over the :func:`pending` entries (whose skipped inputs go into
            the summary).
        key: the datalist key naming an input, for the failures.
        collate_fn: the bundle's collate function for the items that loaded.
        loader_kwargs: ``batch_size``, ``num_workers``... of the ``DataLoader``.
    """
    loader = DataLoader(
        FailSafeDataset(dataset, key),
        collate_fn=partial(collate_skipping_failed, collate=collate_fn),
        **loader_kwargs,
    )
    return SkipFailedBatches(loader, getattr(getattr(dataset, "data", None), "skipped", ()))


class PendingEntries(list):
    """The datalist entries still to process (a plain list to a Dataset), with ``skipped``: the inputs
    left out because their outputs were complete."""

    def __init__(self, entries: Iterable[Mapping[str, Any]], skipped: Iterable[str]) -> None:
        super().__init__(entries)
        self.skipped = list(skipped)


def pending(
    datalist: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    outputs: Sequence[str],
    key: str = "image",
    overwrite: bool = False,
) -> PendingEntries:
    """The datalist entries whose outputs are not all in ``output_dir`` yet, to resume a batch.

    Args:
        outputs: output file names with ``{stem}`` for the input's stem (:func:`common.utils.file_stem`),
            e.g. ``["{stem}_instances.tif", "{stem}_overlay.png"]``; written atomically, so present means
            complete.
        overwrite: keep every entry, to redo the outputs.

    Raises:
        ValueError: ``outputs`` is empty (every input would count as complete).
    """
    if not outputs:
        raise ValueError("outputs must name at least one file per input, e.g. ['{stem}_overlay.png']")
    if overwrite:
        return PendingEntries(datalist, ())
    root = Path(output_dir)
    todo, skipped = [], []
    for entry in datalist:
        stem = file_stem(entry[key])
        if all((root / name.format(stem=stem)).is_file() for name in outputs):
            logger.info("%s: outputs complete, skipped (overwrite redoes it)", entry[key])
            skipped.append(os.fspath(entry[key]))
        else:
            todo.append(entry)
    return PendingEntries(todo, skipped)
