"""Know an angiography dataset before training on it: segments per image, how often each CASS segment
is labelled, how large its masks are, and what the labels look like.

Command line::

    python -m common.data.angiography_analysis --coco data/angiography/train/cass.json \\
        data/angiography/val/cass.json --output reports/angiography_analysis

prints the tables and writes ``analysis.json``, ``class_counts.png`` (segments per category and
split), ``segment_areas.png`` (mask areas per category) and ``contact_sheet.png`` (the first images
of each file with their segments coloured, and a legend) under ``--output``. ARCADE files are read
through the CASS mapping of :mod:`common.data.angiography` (``--format``, detected by default).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image
from pycocotools import mask as mask_utils

from common.data.analysis_report import save_figure, summary_stats, text_table
from common.data.angiogram_images import read_angiogram
from common.data.angiography import FORMATS, category_names, read_coco_and_format
from common.data.coco import segmentation_to_rle
from common.data.coco_instances import decode_segmentations
from common.data.cytology_analysis import plot_class_counts
from common.errors import InputDataError
from common.io.atomic import atomic_write

__all__ = [
    "analyse_files",
    "analyse_split",
    "category_colours",
    "format_report",
    "main",
    "overlay",
    "plot_contact_sheet",
    "plot_segment_areas",
]

_THUMBNAIL = 224  # pixels per image on the contact sheet
_OVERLAY_OPACITY = 0.55


def _areas(entry: Mapping[str, Any]) -> list[tuple[int, float]]:
    """``(label, mask area in pixels)`` of each annotation of an entry."""
    height, width = entry["height"], entry["width"]
    return [
        (a["label"], float(mask_utils.area(segmentation_to_rle(a["segmentation"], height, width))))
        for a in entry["annotations"]
    ]


def analyse_split(entries: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
    """Statistics of one file's entries (as :func:`common.data.angiography.read_angiography_coco`
    returns them): images, segments per image, and per category its annotation count
    (``class_counts``), the images it appears in, and its mask areas in pixels."""
    areas = [_areas(entry) for entry in entries]
    per_image = np.array([len(a) for a in areas], dtype=np.int64)
    by_label = {
        label: np.array([area for image in areas for lab, area in image if lab == label])
        for label in range(1, len(classes) + 1)
    }
    images_with = {label: sum(any(lab == label for lab, _ in image) for image in areas) for label in by_label}
    return {
        "n_images": len(entries),
        "n_images_without_segments": int((per_image == 0).sum()),
        "n_annotations": int(per_image.sum()),
        "segments_per_image": summary_stats(per_image),
        "class_counts": {name: len(by_label[i]) for i, name in enumerate(classes, start=1)},
        "images_with": {name: images_with[i] for i, name in enumerate(classes, start=1)},
        "area": {name: summary_stats(by_label[i]) for i, name in enumerate(classes, start=1)},
    }


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def format_report(analysis: Mapping[str, Mapping[str, Any]]) -> str:
    """The tables printed by the command, from ``{name: analyse_split(...)}``."""
    lines = text_table(
        ["file", "images", "without segments", "segments", "per image mean", "min", "max"],
        [
            [name, str(a["n_images"]), str(a["n_images_without_segments"]), str(a["n_annotations"])]
            + [_number(a["segments_per_image"][key]) for key in ("mean", "min", "max")]
            for name, a in analysis.items()
        ],
    )
    classes = list(next(iter(analysis.values()))["class_counts"]) if analysis else []
    lines += ["", "Per segment: annotations (images with it), mean mask area in pixels"]
    lines += text_table(
        ["segment", *analysis],
        [
            [cls]
            + [
                f"{a['class_counts'][cls]} ({a['images_with'][cls]}), {_number(a['area'][cls]['mean'])} px"
                for a in analysis.values()
            ]
            for cls in classes
        ],
    )
    return "\n".join(lines)


def category_colours(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, one per category, from matplotlib's qualitative ``tab20``: its dark shades
    first, then the light ones, so that neighbouring segments (proximal, mid) never share a hue."""
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return (np.array([colormaps["tab20"](order[i % 20])[:3] for i in range(n)]) * 255).astype(np.uint8)


def overlay(entry: Mapping[str, Any], colours: np.ndarray) -> np.ndarray:
    """An entry's angiogram (the labelled frame) as HxWx3 uint8 with each segment tinted by its
    category's colour; where segments overlap the later one shows."""
    image = read_angiogram(entry["image"], entry.get("frame")).astype(np.float32)
    if image.shape[:2] != (entry["height"], entry["width"]):
        raise InputDataError(
            entry["image"],
            f"image is {image.shape[0]}x{image.shape[1]} but {entry['coco']} gives "
            f"{entry['height']}x{entry['width']}",
        )
    masks = decode_segmentations(
        [a["segmentation"] for a in entry["annotations"]], entry["height"], entry["width"]
    )
    for mask, ann in zip(masks.astype(bool), entry["annotations"]):
        image[mask] = (1 - _OVERLAY_OPACITY) * image[mask] + _OVERLAY_OPACITY * colours[ann["label"] - 1]
    return np.round(image).astype(np.uint8)


def plot_contact_sheet(
    entries: Sequence[Mapping[str, Any]], classes: Sequence[str], path: str | os.PathLike, columns: int = 4
) -> Path:
    """A grid of the entries' overlays (titled with their names) and a legend of the categories."""
    colours = category_colours(len(classes))
    rows = max(1, -(-len(entries) // columns))
    figure = Figure(figsize=(2.6 * columns, 2.6 * rows + 0.6))
    for i, entry in enumerate(entries):
        axes = figure.add_subplot(rows, columns, i + 1)
        thumbnail = Image.fromarray(overlay(entry, colours))
        thumbnail.thumbnail((_THUMBNAIL, _THUMBNAIL))
        axes.imshow(np.asarray(thumbnail))
        axes.set_title(f"{Path(entry['coco']).parent.name}/{entry['name']}", fontsize=8)
        axes.set_axis_off()
    handles = [Patch(color=colours[i] / 255, label=name) for i, name in enumerate(classes)]
    figure.legend(handles=handles, loc="lower center", ncol=min(len(classes), 5), fontsize=7, frameon=False)
    figure.subplots_adjust(bottom=0.6 / (2.6 * rows + 0.6), top=0.95, hspace=0.15)
    return save_figure(figure, Path(path))


def plot_segment_areas(
    datalists: Mapping[str, Sequence[Mapping[str, Any]]], classes: Sequence[str], path: str | os.PathLike
) -> Path:
    """Box plot of mask areas (pixels, log scale) per category, all files together."""
    areas = [[] for _ in classes]
    for entries in datalists.values():
        for entry in entries:
            for label, area in _areas(entry):
                areas[label - 1].append(area)
    figure = Figure(figsize=(max(6, 0.6 * len(classes)), 4))
    axes = figure.add_subplot()
    axes.boxplot([a or [np.nan] for a in areas])
    axes.set_xticks(np.arange(1, len(classes) + 1), classes)
    axes.set_yscale("log")
    axes.set_ylabel("mask area (pixels)")
    axes.set_title("Segment mask areas")
    axes.tick_params(axis="x", labelrotation=60, labelsize=7)
    return save_figure(figure, Path(path))


def _file_names(paths: Sequence[Path]) -> list[str]:
    """Names for the report: each file's folder (``train/cass.json`` -> ``train``), or its stem where
    folders repeat (``annotations/train.json`` -> ``train``), or the path."""
    for names in ([p.parent.name for p in paths], [p.stem for p in paths], [str(p) for p in paths]):
        if len(set(names)) == len(names):
            return names
    raise ValueError(f"the same file is given twice: {[str(p) for p in paths]}")


def analyse_files(
    paths: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike = "reports/angiography_analysis",
    format: str = "auto",
    sheet_images: int = 4,
    image_root: str | os.PathLike | None = None,
) -> dict[str, dict[str, Any]]:
    """Analyse COCO files of one format, write ``analysis.json`` and the pictures under ``output_dir``
    (see the module docstring), and return ``{name: analyse_split(...)}``.

    Args:
        paths: CASS or ARCADE COCO files (e.g. the train, val and test files of a dataset).
        format: as in :func:`common.data.angiography.read_angiography_coco`; detected by default.
        sheet_images: how many images of each file the contact sheet shows.
        image_root: folder the file names are relative to; by default each JSON's folder.

    Raises:
        InputDataError: a file that cannot be read, or files of different formats.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no COCO files to analyse")
    read = {
        name: read_coco_and_format(path, image_root, format) for name, path in zip(_file_names(paths), paths)
    }
    formats = {fmt for _, fmt in read.values()}
    if len(formats) > 1:
        raise InputDataError(
            paths[0], f"the files hold different formats {sorted(formats)}; analyse them apart"
        )
    classes = category_names(formats.pop())
    datalists = {name: entries for name, (entries, _) in read.items()}
    analysis = {name: analyse_split(entries, classes) for name, entries in datalists.items()}
    output_dir = Path(output_dir)
    text = json.dumps({"files": [str(p) for p in paths], "splits": analysis}, indent=2)
    atomic_write(output_dir / "analysis.json", lambda f: f.write(text.encode("utf-8")))
    plot_class_counts(analysis, output_dir / "class_counts.png")
    plot_segment_areas(datalists, classes, output_dir / "segment_areas.png")
    sheet = [entry for entries in datalists.values() for entry in entries[:sheet_images]]
    plot_contact_sheet(sheet, classes, output_dir / "contact_sheet.png")
    return analysis


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point for :func:`analyse_files`."""
    parser = argparse.ArgumentParser(
        prog="python -m common.data.angiography_analysis", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--coco", nargs="+", required=True, help="CASS or ARCADE COCO files, e.g. one per split"
    )
    parser.add_argument("--format", choices=FORMATS, default="auto")
    parser.add_argument("--image-root", help="folder the file names are relative to (default: each JSON's)")
    parser.add_argument(
        "--output", default="reports/angiography_analysis", help="folder for the JSON and plots"
    )
    parser.add_argument("--sheet-images", type=int, default=4, help="images per file on the contact sheet")
    args = parser.parse_args(argv)
    try:
        analysis = analyse_files(args.coco, args.output, args.format, args.sheet_images, args.image_root)
    except InputDataError as err:
        raise SystemExit(f"error: {err}") from err
    print(format_report(analysis))
    print(
        f"\nwrote analysis.json, class_counts.png, segment_areas.png and contact_sheet.png to {args.output}"
    )


if __name__ == "__main__":
    main()
