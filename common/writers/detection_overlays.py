"""Draw cell detections or annotations on their images, to check a dataset or a model by eye.

Each box is outlined in its class's colour and labelled with the class name and, for predictions, the
confidence. The first eight colours are the Okabe-Ito palette, told apart by colour-blind readers too.

Command line (ground truth, or a detections CSV written by :class:`common.writers.detections.DetectionCSVWriter`)::

    python -m common.writers.detection_overlays --images data/cytology/val/images \\
        --csv data/cytology/val/annotations.csv --ground-truth --output reports/val_overlays
    python -m common.writers.detection_overlays --images data/cytology/val/images \\
        --csv outputs/detections_20250101-120000.csv --output reports/val_predictions

Each image gets ``<stem>_overlay.png`` in ``--output``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy
from PIL import Image, ImageDraw, ImageFont

from common.data.cell_readers import read_image
from common.data.cytology import BETHESDA_CLASSES, read_cell_csv
from common.data.datalist import image_datalist
from common.errors import InputDataError
from common.writers.detections import read_detections_csv, source_name
from common.writers.display import display_rgb, golden_ratio_colours, write_png

__all__ = ["SaveDetectionOverlayd", "class_colours", "draw_detections", "main"]

# Okabe & Ito (2008), "Color Universal Design": bluish green, sky blue, yellow, orange, reddish purple,
# vermillion, blue, black; NILM, the commonest class, gets the calmest colour.
_PALETTE = (
    (0, 158, 115),
    (86, 180, 233),
    (240, 228, 66),
    (230, 159, 0),
    (204, 121, 167),
    (213, 94, 0),
    (0, 114, 178),
    (0, 0, 0),
)


def class_colours(n_classes: int) -> list[tuple[int, int, int]]:
    """One RGB colour per class: the palette first, then hues a golden-ratio step apart."""
    extra = golden_ratio_colours(max(0, n_classes - len(_PALETTE)), value=0.9).round().astype(int)
    extra = [tuple(int(c) for c in colour) for colour in extra]
    return [*_PALETTE, *extra][:n_classes]




def draw_detections(
    image: np.ndarray,
    boxes_or_points: np.ndarray | torch.Tensor,
    class_indices: np.ndarray | torch.Tensor,
    scores: np.ndarray | torch.Tensor | None = None,
    class_names: Sequence[str] = BETHESDA_CLASSES,
    box_size: float = 100,
    line_width: int = 2,
    font_size: int = 12,
) -> np.ndarray:
    """A copy of ``image`` (H, W, 3 uint8) with each detection outlined and labelled in its class colour.

    Args:
        image: the image to draw on.
        boxes_or_points: (K, 4) xyxy boxes, or (K, 2) centres (x, y) drawn as ``box_size`` squares.
        class_indices: (K,) indices into ``class_names``.
        scores: (K,) confidences shown after the class name; ``None`` for ground truth.
        class_names: the classes in index order.
        box_size: side of the square drawn around a point, in pixels.
        line_width: outline width in pixels.
        font_size: label text height in pixels.

    Raises:
        ValueError: the image is not (H, W, 3) uint8, the shapes disagree, or a class index is out of range.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    boxes = convert_to_numpy(boxes_or_points, np.float64, wrap_sequence=True)
    boxes = boxes.reshape(len(boxes), -1) if boxes.size else np.zeros((0, 4))
    if boxes.shape[1] == 2:
        boxes = np.concatenate([boxes - box_size / 2, boxes + box_size / 2], axis=1)
    labels = convert_to_numpy(class_indices, np.int64, wrap_sequence=True).reshape(-1)
    confidences = None if scores is None else convert_to_numpy(scores, np.float64, wrap_sequence=True).reshape(-1)
    n = len(boxes)
    if boxes.shape[1] != 4 or len(labels) != n or (confidences is not None and len(confidences) != n):
        raise ValueError(
            f"expected (K, 4) boxes or (K, 2) points with (K,) classes and scores, got {boxes.shape}, "
            f"{labels.shape} and {None if confidences is None else confidences.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"class indices must lie in 0..{len(class_names) - 1}, got {labels.tolist()}")

    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=font_size)
    colours = class_colours(len(class_names))
    for k, ((x0, y0, x1, y1), label) in enumerate(zip(boxes, labels)):
        colour = colours[label]
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line_width)
        text = class_names[label] if confidences is None else f"{class_names[label]} {confidences[k]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        label_width, label_height = right - left + 3, bottom - top + 2
        # above the box, or inside it where the box touches the top of the image; never off the image
        label_x = max(0.0, x0)
        label_y = y0 - label_height if y0 >= label_height else max(0.0, y0) + line_width
        draw.rectangle((label_x, label_y, label_x + label_width, label_y + label_height), fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = (0, 0, 0) if luminance > 128 else (255, 255, 255)
        draw.text((label_x + 2 - left, label_y + 1 - top), text, fill=ink, font=font)
    return np.asarray(canvas)



class SaveDetectionOverlayd(MapTransform):
    """Write ``<stem>_overlay.png`` of each sample's detections over its image, in an evaluator's or
    inferer's postprocessing after ``decollate_batch``; the data pass through unchanged.

    Args:
        keys: the keys of the points (K, 2) in image pixels, scores (K,) and class indices (K,).
        output_dir: folder receiving the overlays.
        image_key: the (C, H, W) ``MetaTensor`` image (may be normalised) whose file names the overlay.
        class_names: the classes in index order.
        box_size: side of the square drawn around each point, in pixels.
    """

    def __init__(
        self,
        keys: KeysCollection = ("points", "scores", "classes"),
        output_dir: str | os.PathLike = "./outputs",
        image_key: str = "image",
        class_names: Sequence[str] = BETHESDA_CLASSES,
        box_size: float = 100,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 3:
            raise ValueError(f"keys must name the points, scores and classes, got {self.keys}")
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.class_names = tuple(class_names)
        self.box_size = box_size

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        stem = Path(source_name(image, self.image_key)).stem
        points, scores, classes = (d[key] for key in self.keys)
        rgb = display_rgb(image)
        overlay = draw_detections(rgb, points, classes, scores, self.class_names, self.box_size)
        write_png(overlay, self.output_dir / f"{stem}_overlay.png")
        return d


def _overlays(
    image_dir: Path, csv_file: Path, ground_truth: bool, class_names: Sequence[str]
) -> list[tuple[Path, np.ndarray, np.ndarray, np.ndarray | None]]:
    """(image path, boxes, labels, scores or None) of every image to draw."""
    if ground_truth:
        return [
            (Path(entry["image"]), entry["boxes"], entry["labels"], None)
            for entry in read_cell_csv(csv_file, image_dir, class_names)
        ]
    detections = read_detections_csv(csv_file, class_names)
    images = [Path(entry["image"]) for entry in image_datalist(image_dir)]
    unknown = sorted(set(detections) - {p.name for p in images})
    if unknown:
        raise InputDataError(csv_file, f"detections for images not in {image_dir}: {', '.join(unknown[:5])}")
    items = []
    for path in images:
        found = detections.get(path.name)
        if found is None:  # no detection in this image: draw it bare, so every image has an overlay
            items.append((path, np.zeros((0, 4)), np.zeros(0, dtype=np.int64), np.zeros(0)))
        else:
            items.append((path, found["boxes"], found["labels"], found["scores"]))
    return items


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: draw a CSV of annotations or detections on its images."""
    parser = argparse.ArgumentParser(
        prog="python -m common.writers.detection_overlays", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--images", required=True, help="folder of the images named in the CSV")
    parser.add_argument("--csv", required=True, help="annotation CSV, or detections CSV with a conf column")
    parser.add_argument(
        "--ground-truth", action="store_true", help="the CSV holds annotations, not detections"
    )
    parser.add_argument("--output", required=True, help="folder receiving <stem>_overlay.png files")
    parser.add_argument(
        "--class-names", nargs="+", default=list(BETHESDA_CLASSES), help="classes in index order"
    )
    args = parser.parse_args(argv)
    image_dir, output_dir = Path(args.images), Path(args.output)
    try:
        if not image_dir.is_dir():
            raise InputDataError(image_dir, "image folder not found")
        items = _overlays(image_dir, Path(args.csv), args.ground_truth, args.class_names)
        for path, boxes, labels, scores in items:
            overlay = draw_detections(read_image(path), boxes, labels, scores, args.class_names)
            write_png(overlay, output_dir / f"{path.stem}_overlay.png")
    except InputDataError as err:
        raise SystemExit(f"error: {err}") from err
    print(f"wrote {len(items)} overlays to {output_dir}")


if __name__ == "__main__":
    main()
