"""Score a trained cell-segmentation bundle on LIVECell's test split or Cellpose's test set, per cell type.

Published cell segmenters are compared on these two sets with the Cell Tracking Challenge measures:
SAMCell, for one, reports OP_CSB per LIVECell cell type (0.772 overall, Cellpose 0.684). This command
runs the bundle's own inference pipeline (its preprocessing, inferer with edge padding, tuned watershed
and weights, all read from ``inference.json``) on every image, scores the instances against the
reference with :mod:`common.metrics.ctc`, and pools the scores per cell type, so the figures sit beside
the published ones. LIVECell names each image after its cell line (``A172_Phase_C7_1_...``); the
Cellpose test set has no cell-type field, so it is scored as one group.

Command line::

    python -m common.bundle.score_cells --bundle_root bundles/microscopy_dinocell_segmentation \\
        --format livecell --annotations LIVECell/livecell_coco_test.json \\
        --images LIVECell/images/livecell_test_images --output scores/livecell
    python -m common.bundle.score_cells --bundle_root bundles/microscopy_dinocell_segmentation \\
        --format cellpose --images cellpose/test --output scores/cellpose

Writes ``scores.json`` (overall and per cell type SEG, DET, OP_CSB and counts) and ``per_image.csv``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.utils import convert_to_numpy

from common.data.cell_readers import CellSample, read_cellpose_folder, read_livecell
from common.errors import InputDataError
from common.handlers.checkpoint import ModelWeightsLoader
from common.io.atomic import atomic_write
from common.metrics.ctc import CTCScores, aggregate_ctc, ctc_scores
from common.utils import nan_to_none

__all__ = ["FORMATS", "bundle_predictor", "cell_type", "main", "read_samples", "score_samples", "write_scores"]

logger = logging.getLogger(__name__)

FORMATS = ("livecell", "cellpose")
_WATERSHED_ID = "postprocessing#transforms#0"  # inference.json's instance step, before the writers


def cell_type(sample: CellSample, data_format: str) -> str:
    """The group a sample is reported in: LIVECell's cell line (file-name prefix), else the format."""
    return sample.name.split("_")[0] if data_format == "livecell" else data_format


def bundle_predictor(
    config_file: str | os.PathLike, overrides: dict[str, Any] | None = None
) -> Callable[[CellSample], np.ndarray]:
    """A function from a sample to the bundle's HxW instance labels, built from its inference config.

    The config's ``preprocessing``, ``network``, ``inferer`` and instance step (the first
    postprocessing transform) are used as they are; the weights come from its
    :class:`~common.handlers.checkpoint.ModelWeightsLoader` handler, so they are checked the same way.
    """
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update(overrides or {})
    network = parser.get_parsed_content("network")
    loaders = [h for h in parser.get_parsed_content("handlers") if isinstance(h, ModelWeightsLoader)]
    if not loaders:
        raise InputDataError(
            config_file, "has no ModelWeightsLoader handler", "score a bundle's inference.json"
        )
    loaders[0]()
    network.eval()
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    instances = parser.get_parsed_content(_WATERSHED_ID)
    device = parser.get_parsed_content("device")

    def predict(sample: CellSample) -> np.ndarray:
        image = preprocessing({"image": str(sample.image_path)})["image"]
        with torch.no_grad():
            pred = inferer(torch.as_tensor(image)[None].to(device), network)[0].float().cpu()
        labels = instances({"pred": pred})[instances.output_keys[0]]
        return convert_to_numpy(labels)[0]

    return predict


def score_samples(
    samples: Sequence[CellSample], predict: Callable[[CellSample], np.ndarray], data_format: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """CTC scores per image, pooled per cell type and overall as the challenge pools a dataset.

    Returns:
        ``({"overall": {...}, "per_cell_type": {type: {...}}}, rows)``; each summary holds
        ``SEG``, ``DET``, ``OP_CSB``, ``images``, ``n_reference`` and ``n_prediction``, and each row is
        one image's ``name``, ``cell_type`` and scores.
    """
    if not samples:
        raise ValueError("no samples to score")
    rows: list[dict[str, Any]] = []
    groups: dict[str, list[CTCScores]] = {}
    for sample in samples:
        _, reference = sample.load()
        prediction = predict(sample)
        if prediction.shape != reference.shape:
            raise InputDataError(
                sample.image_path, f"prediction is {prediction.shape} but the reference is {reference.shape}"
            )
        scores = ctc_scores(reference, prediction)
        group = cell_type(sample, data_format)
        groups.setdefault(group, []).append(scores)
        rows.append({"name": sample.name, "cell_type": group, **_summary([scores])})
        logger.info("%s (%s): OP_CSB %.4f", sample.name, group, scores.op_csb)
    every = [scores for group_scores in groups.values() for scores in group_scores]
    summary = {
        "overall": _summary(every),
        "per_cell_type": {group: _summary(group_scores) for group, group_scores in sorted(groups.items())},
    }
    return summary, rows


def _summary(scores: Sequence[CTCScores]) -> dict[str, Any]:
    pooled = aggregate_ctc(scores)
    return {
        "SEG": pooled.seg,
        "DET": pooled.det,
        "OP_CSB": pooled.op_csb,
        "images": len(scores),
        "n_reference": pooled.n_reference,
        "n_prediction": pooled.n_prediction,
    }


def write_scores(
    summary: dict[str, Any], rows: Sequence[dict[str, Any]], output_dir: str | os.PathLike
) -> Path:
    """Write ``scores.json`` and ``per_image.csv`` under ``output_dir``, each atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(nan_to_none(summary), indent=2) + "\n"
    atomic_write(output_dir / "scores.json", lambda f: f.write(text.encode("utf-8")))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(output_dir / "per_image.csv", lambda f: f.write(table.getvalue().encode("utf-8")))
    return output_dir


def read_samples(
    data_format: str, images: str | os.PathLike, annotations: str | os.PathLike | None
) -> list[CellSample]:
    """The test samples of a LIVECell annotation file and image folder, or of a Cellpose folder."""
    if data_format == "livecell":
        if annotations is None:
            raise InputDataError(
                images, "LIVECell needs its annotation file", "pass --annotations livecell_coco_test.json"
            )
        return read_livecell(annotations, images)
    return read_cellpose_folder(images)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: score a bundle and print the per-cell-type table."""
    parser = argparse.ArgumentParser(
        prog="python -m common.bundle.score_cells", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--bundle_root", required=True, help="bundle folder holding models/model.pt")
    parser.add_argument(
        "--config_file", help="inference config (default: BUNDLE_ROOT/configs/inference.json)"
    )
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--images", required=True, help="LIVECell image folder, or the Cellpose test folder")
    parser.add_argument("--annotations", help="LIVECell COCO file, e.g. livecell_coco_test.json")
    parser.add_argument("--output", required=True, help="folder for scores.json and per_image.csv")
    parser.add_argument(
        "--override",
        nargs=2,
        action="append",
        default=[],
        metavar=("ID", "JSON"),
        help="config override, e.g. --override patch_size '[256,256]'",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config_file = args.config_file or Path(args.bundle_root) / "configs" / "inference.json"
    overrides = {"bundle_root": str(args.bundle_root), "num_workers": 0}
    overrides.update({key: json.loads(value) for key, value in args.override})
    try:
        samples = read_samples(args.format, args.images, args.annotations)
        summary, rows = score_samples(samples, bundle_predictor(config_file, overrides), args.format)
        write_scores(summary, rows, args.output)
    except InputDataError as err:
        raise SystemExit(f"error: {err}") from err
    print(f"{'cell type':<12} {'images':>6} {'SEG':>7} {'DET':>7} {'OP_CSB':>7}")
    for group, s in [*summary["per_cell_type"].items(), ("overall", summary["overall"])]:
        print(f"{group:<12} {s['images']:>6} {s['SEG']:>7.4f} {s['DET']:>7.4f} {s['OP_CSB']:>7.4f}")
    print(f"wrote {Path(args.output) / 'scores.json'}")


if __name__ == "__main__":
    main()
