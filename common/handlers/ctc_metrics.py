"""Ignite handler scoring an evaluation run with the Cell Tracking Challenge measures.

SEG and DET pool objects over the whole dataset (see :mod:`common.metrics.ctc`), so they cannot be
averaged batch by batch like a Dice score: the handler keeps the counts of every image, combines them
when the epoch ends, and reports both the dataset figures and the per-image ones that show where a
model fails.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Mapping
from csv import writer as csv_writer
from dataclasses import fields
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine

from common.handlers.samples import EpochAccumulator, gather_by_name, iteration_samples, sample_name
from common.io.atomic import atomic_write
from common.metrics.ctc import CTCScores, aggregate_ctc, ctc_scores
from common.utils import nan_to_none

__all__ = ["CTCMetricsHandler"]

_SCORE_FIELDS = tuple(field.name for field in fields(CTCScores))


class CTCMetricsHandler(EpochAccumulator):
    """Compute SEG, DET and OP_CSB over an evaluation epoch and store them in ``engine.state.metrics``.

    Attach it to a MONAI ``SupervisedEvaluator`` whose postprocessing puts predicted instances under
    ``pred_key``; the reference instances under ``label_key`` may come from postprocessing or straight
    from the data loader (both (1, H, W)). Each image is scored as it passes; at the end of the epoch
    the dataset-level ``SEG``, ``DET`` and ``OP_CSB`` go into ``engine.state.metrics``, a summary is
    logged, and with ``output_dir`` a JSON summary (overall and per image) and a per-image CSV are
    written.

    Under DDP every rank scores its own images and the per-image results are gathered before
    aggregating; an image met twice (``DistributedSampler`` repeats images to even out the ranks) is
    counted once. Only rank 0 writes files. Handlers that read the metrics, such as a ``CheckpointSaver``
    with ``key_metric_name="OP_CSB"``, must be attached after this one.

    Args:
        pred_key: key of the predicted instance labels in each output dict.
        label_key: key of the reference instance labels.
        output_dir: folder for the summary and per-image files; ``None`` writes nothing.
        name_key: key whose ``MetaTensor`` metadata (``filename_or_obj``) names the image; images
            without it are named by their position on the rank (``rank0_image3``).
        summary_file: JSON file name inside ``output_dir``.
        details_file: CSV file name inside ``output_dir``.
        logger_name: logger receiving the summary (per-image lines go at DEBUG level).
    """

    def __init__(
        self,
        pred_key: str = "instances",
        label_key: str = "instances_label",
        output_dir: str | os.PathLike | None = None,
        name_key: str = "image",
        summary_file: str = "ctc_metrics.json",
        details_file: str = "ctc_per_image.csv",
        logger_name: str = __name__,
    ) -> None:
        self.pred_key = pred_key
        self.label_key = label_key
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.name_key = name_key
        self.summary_file = summary_file
        self.details_file = details_file
        self.logger = logging.getLogger(logger_name)
        self._records: list[tuple[str, CTCScores]] = []

    def reset(self, engine: Engine | None = None) -> None:
        self._records = []

    def _name(self, sample: Mapping[str, Any]) -> str:
        return sample_name(sample, image_key=self.name_key, position=len(self._records))

    def update(self, engine: Engine) -> None:
        """Score every sample of the iteration."""
        for sample in iteration_samples(engine):
            for key in (self.pred_key, self.label_key):
                if key not in sample:
                    raise KeyError(
                        f"CTCMetricsHandler: no {key!r} in the engine output or batch; found {list(sample)}"
                    )
            scores = ctc_scores(sample[self.label_key], sample[self.pred_key])
            self._records.append((self._name(sample), scores))

    def _gathered(self) -> list[tuple[str, CTCScores]]:
        """All ranks' records as plain values, each image once, in rank then arrival order."""
        local = [(name, tuple(scores.as_dict().values())) for name, scores in self._records]
        unique = gather_by_name(local, lambda record: record[0])
        return [(name, CTCScores(**dict(zip(_SCORE_FIELDS, values)))) for name, values in unique.values()]

    def complete(self, engine: Engine) -> None:
        """Aggregate, publish ``SEG``/``DET``/``OP_CSB`` in ``engine.state.metrics`` and write the reports."""
        records = self._gathered()
        if not records:
            raise RuntimeError("CTCMetricsHandler saw no images during the epoch; nothing to score")
        overall = aggregate_ctc([scores for _, scores in records])
        engine.state.metrics.update({"SEG": overall.seg, "DET": overall.det, "OP_CSB": overall.op_csb})
        self._log(overall, records)
        if self.output_dir is not None and idist.get_rank() == 0:
            self._write(overall, records)

    def _log(self, overall: CTCScores, records: list[tuple[str, CTCScores]]) -> None:
        columns = ("SEG", "DET", "OP_CSB", "ref", "pred", "FN", "FP", "NS")
        header = f"{'image':<40}" + "".join(f" {c:>7}" for c in columns)

        def row(name: str, s: CTCScores) -> str:
            ratios = "".join(f" {v:7.4f}" for v in (s.seg, s.det, s.op_csb))
            counts = (s.n_reference, s.n_prediction, s.false_negatives, s.false_positives, s.splits)
            return f"{name[-40:]:<40}" + ratios + "".join(f" {v:7d}" for v in counts)

        self.logger.debug("CTC metrics per image:\n%s", "\n".join([header] + [row(n, s) for n, s in records]))
        self.logger.info("CTC metrics over %d images:\n%s\n%s", len(records), header, row("overall", overall))

    def _write(self, overall: CTCScores, records: list[tuple[str, CTCScores]]) -> None:
        summary = {
            "SEG": overall.seg,
            "DET": overall.det,
            "OP_CSB": overall.op_csb,
            "overall": overall.as_dict(),
            "per_image": [{"image": name, **scores.as_dict()} for name, scores in records],
        }
        text = json.dumps(nan_to_none(summary), indent=2) + "\n"
        atomic_write(self.output_dir / self.summary_file, lambda f: f.write(text.encode("utf-8")))

        table = io.StringIO()
        writer = csv_writer(table, lineterminator="\n")
        writer.writerow(("image",) + _SCORE_FIELDS)
        for name, scores in records:
            writer.writerow([name, *nan_to_none(scores.as_dict()).values()])
        atomic_write(self.output_dir / self.details_file, lambda f: f.write(table.getvalue().encode("utf-8")))


