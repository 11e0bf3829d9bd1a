"""Know a cytology dataset before training on it: images and cells per split, class balance, box sizes.

Command line::

    python -m common.data.cytology_analysis --root data/cytology --splits train val test \\
        --output reports/cytology_analysis

prints the tables and writes ``analysis.json``, ``class_counts.png`` (annotations per class and split)
and ``box_sizes.png`` (histograms of box width and height) under ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from common.data.analysis_report import save_figure, summary_stats, text_table
from common.data.cytology import BETHESDA_CLASSES, class_counts, read_split
from common.errors import InputDataError
from common.io.atomic import atomic_write

__all__ = ["analyse_dataset", "analyse_split", "format_report", "main", "plot_box_sizes", "plot_class_counts"]

_HISTOGRAM_BINS = 10


def _histogram(values: np.ndarray) -> dict[str, list[float]]:
    """Counts in whole-pixel bins (at most :data:`_HISTOGRAM_BINS`), so that boxes of one size fall in
    one bin ``[size, size + 1)`` instead of being spread over fractions of a pixel."""
    if values.size == 0:
        return {"edges": [], "counts": []}
    low, high = np.floor(values.min()), np.floor(values.max()) + 1
    step = max(1.0, np.ceil((high - low) / _HISTOGRAM_BINS))
    edges = low + step * np.arange(int(np.ceil((high - low) / step)) + 1)
    counts, _ = np.histogram(values, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def _box_sizes(datalist: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Widths and heights of all boxes, rounded to 1/100 pixel: float32 corners ``x -+ w/2`` do not
    subtract back to ``w`` exactly."""
    boxes = [np.asarray(entry["boxes"], dtype=np.float64).reshape(-1, 4) for entry in datalist]
    boxes_all = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    return np.round(boxes_all[:, 2] - boxes_all[:, 0], 2), np.round(boxes_all[:, 3] - boxes_all[:, 1], 2)


def analyse_split(datalist: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
    """Statistics of one split's datalist (entries with ``boxes`` xyxy and ``labels``).

    The imbalance ratio of a class is the count of the most frequent class divided by its own count
    (1 for the most frequent; ``None`` for a class without annotations, whose ratio is unbounded).
    """
    counts = class_counts(datalist, len(class_names))
    per_image = np.array([len(entry["labels"]) for entry in datalist], dtype=np.int64)
    widths, heights = _box_sizes(datalist)
    largest = counts.max(initial=0)
    return {
        "n_images": len(datalist),
        "n_images_without_cells": int((per_image == 0).sum()),
        "n_annotations": int(counts.sum()),
        "class_counts": dict(zip(class_names, counts.tolist())),
        "imbalance_ratio": {
            name: float(largest / count) if count else None for name, count in zip(class_names, counts)
        },
        "cells_per_image": summary_stats(per_image),
        "box_width": summary_stats(widths) | {"histogram": _histogram(widths)},
        "box_height": summary_stats(heights) | {"histogram": _histogram(heights)},
    }


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_report(analysis: Mapping[str, Mapping[str, Any]]) -> str:
    """The tables printed by the command, from ``{split: analyse_split(...)}``."""
    splits = list(analysis)
    lines = text_table(
        ["split", "images", "without cells", "annotations", "cells/image mean", "min", "max"],
        [
            [
                split,
                str(a["n_images"]),
                str(a["n_images_without_cells"]),
                str(a["n_annotations"]),
                _number(a["cells_per_image"]["mean"]),
                _number(a["cells_per_image"]["min"], 0),
                _number(a["cells_per_image"]["max"], 0),
            ]
            for split, a in analysis.items()
        ],
    )
    class_names = list(next(iter(analysis.values()))["class_counts"]) if analysis else []
    lines += ["", "Annotations per class (imbalance ratio = largest class count / class count)"]
    lines += text_table(
        ["class", *splits],
        [
            [
                name,
                *(
                    f"{analysis[s]['class_counts'][name]} ({_number(analysis[s]['imbalance_ratio'][name])})"
                    for s in splits
                ),
            ]
            for name in class_names
        ],
    )
    for dimension in ("box_width", "box_height"):
        lines += ["", f"{dimension.replace('_', ' ').capitalize()} in pixels: histogram (bin start: count)"]
        for split in splits:
            stats = analysis[split][dimension]
            histogram = stats["histogram"]
            pairs = zip(histogram["edges"], histogram["counts"])
            bins = ", ".join(f"{edge:g}: {count}" for edge, count in pairs)
            summary = ", ".join(f"{key} {_number(stats[key])}" for key in ("mean", "min", "max"))
            lines.append(f"{split}: {summary}; {bins or 'no boxes'}")
    return "\n".join(lines)


def plot_class_counts(analysis: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Grouped bar plot of annotations per class, one bar per split, on a log scale (classes are rare)."""
    figure = Figure(figsize=(9, 4.5))
    axes = figure.add_subplot()
    splits = list(analysis)
    class_names = list(next(iter(analysis.values()))["class_counts"]) if analysis else []
    width = 0.8 / max(1, len(splits))
    for i, split in enumerate(splits):
        counts = [analysis[split]["class_counts"][name] for name in class_names]
        offset = (i - (len(splits) - 1) / 2) * width
        axes.bar(np.arange(len(class_names)) + offset, counts, width, label=split)
    axes.set_xticks(np.arange(len(class_names)), class_names)
    axes.set_yscale("symlog", linthresh=1)
    axes.set_ylabel("annotations")
    axes.set_title("Annotations per class")
    axes.legend()
    return save_figure(figure, Path(path))


def plot_box_sizes(datalists: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike) -> Path:
    """Histograms of box width and height (pixels), one outline per split."""
    figure = Figure(figsize=(9, 3.5))
    sizes = {split: _box_sizes(datalist) for split, datalist in datalists.items()}
    for column, dimension in enumerate(("width", "height")):
        axes = figure.add_subplot(1, 2, column + 1)
        edges = _histogram(np.concatenate([s[column] for s in sizes.values()]))["edges"] or 1
        for split, split_sizes in sizes.items():
            axes.hist(split_sizes[column], bins=edges, histtype="step", linewidth=1.5, label=split)
        axes.set_xlabel(f"box {dimension} (pixels)")
        axes.set_ylabel("annotations")
        axes.legend()
    return save_figure(figure, Path(path))


def analyse_dataset(
    root: str | os.PathLike,
    splits: Sequence[str] = ("train", "val", "test"),
    output_dir: str | os.PathLike = "reports/cytology_analysis",
    class_names: Sequence[str] = BETHESDA_CLASSES,
) -> dict[str, dict[str, Any]]:
    """Analyse each split of ``root`` (read with :func:`common.data.cytology.read_split`), write
    ``analysis.json``, ``class_counts.png`` and ``box_sizes.png`` under ``output_dir``, and return
    ``{split: analyse_split(...)}``."""
    datalists = {split: read_split(root, split, class_names) for split in splits}
    analysis = {split: analyse_split(datalist, class_names) for split, datalist in datalists.items()}
    output_dir = Path(output_dir)
    text = json.dumps({"root": str(root), "splits": analysis}, indent=2)
    atomic_write(output_dir / "analysis.json", lambda f: f.write(text.encode("utf-8")))
    plot_class_counts(analysis, output_dir / "class_counts.png")
    plot_box_sizes(datalists, output_dir / "box_sizes.png")
    return analysis


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point for :func:`analyse_dataset`."""
    parser = argparse.ArgumentParser(
        prog="python -m common.data.cytology_analysis", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--root", required=True, help="dataset folder holding <split>/images and annotations")
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    parser.add_argument("--output", default="reports/cytology_analysis", help="folder for the JSON and plots")
    parser.add_argument(
        "--class-names", nargs="+", default=list(BETHESDA_CLASSES), help="classes in index order"
    )
    args = parser.parse_args(argv)
    try:
        analysis = analyse_dataset(args.root, args.splits, args.output, args.class_names)
    except InputDataError as err:
        raise SystemExit(f"error: {err}") from err
    print(format_report(analysis))
    print(f"\nwrote analysis.json, class_counts.png and box_sizes.png to {args.output}")


if __name__ == "__main__":
    main()
