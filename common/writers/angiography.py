"""Angiography outputs on disk, named after the image: the CASS segments as JSON, a label PNG, an overlay.

Per angiogram ``<stem>``:

* ``<stem>_segments.json``: one record per kept segment (the best-scoring instance of each CASS
  category, as in :func:`common.postprocessing.angiography.select_segments`): name, CASS id, score,
  box (x1, y1, x2, y2 in pixels) and the instance mask as COCO RLE, so that results load into
  pycocotools or an annotation tool;
* ``<stem>_labels.png``: 8-bit label map, 0 background and 1-14 the CASS ids (overlaps go to the
  higher score);
* ``<stem>_overlay.png``: the angiogram with each segment tinted in its category's colour (the colours
  of :mod:`common.data.angiography_analysis`, so overlays and dataset pictures agree) and a legend
  of the segments found beside it;
* ``<stem>_vessels.png`` (optional, phase-1 model): binary vessel mask, 0/255.

Every file is written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from common.data.angiography import CASS_CATEGORIES
from common.data.angiography_analysis import category_colours
from common.io.atomic import atomic_write
from common.postprocessing.angiography import select_segments
from common.utils import as_plane, nan_to_none
from common.writers.display import display_rgb, write_png
from common.writers.instances import source_stem

__all__ = [
    "SaveSegmentOutputsd",
    "SaveVesselMaskd",
    "draw_segment_overlay",
    "segment_records",
    "write_segments_json",
]

_OPACITY = 0.55
_FONT_SIZE = 12
_SWATCH = 12  # legend colour square, pixels


def segment_records(
    masks: Any,
    boxes: Any,
    scores: Any,
    labels: Any,
    category_names: Sequence[str] = CASS_CATEGORIES,
    score_threshold: float = 0.0,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """The kept segments, most confident first: ``name``, ``label``, ``score``, ``box`` and ``rle``.

    ``masks`` are Mask R-CNN's (K, 1, H, W) or (K, H, W) soft masks, ``boxes`` (K, 4) xyxy, ``scores``
    and ``labels`` (K,) with labels 1..len(category_names).
    """
    masks = convert_to_numpy(masks, wrap_sequence=True)
    masks = masks.reshape(len(masks), *masks.shape[-2:]) if masks.size else masks
    boxes = convert_to_numpy(boxes, np.float64, wrap_sequence=True).reshape(-1, 4)
    scores = convert_to_numpy(scores, np.float64, wrap_sequence=True).reshape(-1)
    labels = convert_to_numpy(labels, np.int64, wrap_sequence=True).reshape(-1)
    if not len(masks) == len(boxes) == len(scores) == len(labels):
        raise ValueError(
            f"expected as many masks, boxes, scores and labels, got {len(masks)}, {len(boxes)}, "
            f"{len(scores)} and {len(labels)}"
        )
    if labels.size and (labels.min() < 1 or labels.max() > len(category_names)):
        raise ValueError(f"labels must lie in 1..{len(category_names)}, got {sorted(set(labels.tolist()))}")
    records = []
    for i in select_segments(scores, labels, score_threshold)[::-1]:
        rle = mask_utils.encode(np.asfortranarray(masks[i] > mask_threshold, dtype=np.uint8))
        records.append(
            {
                "name": category_names[labels[i] - 1],
                "label": int(labels[i]),
                "score": round(float(scores[i]), 4),
                "box": [round(float(v), 1) for v in boxes[i]],
                "rle": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            }
        )
    return records


def write_segments_json(
    records: Sequence[Mapping[str, Any]], image: str, size: tuple[int, int], path: str | os.PathLike
) -> Path:
    """Write ``{"image", "height", "width", "segments"}`` as JSON, atomically."""
    content = {"image": image, "height": int(size[0]), "width": int(size[1]), "segments": list(records)}
    text = json.dumps(nan_to_none(content), indent=2) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def draw_segment_overlay(
    image: Any,
    label_map: Any,
    category_names: Sequence[str] = CASS_CATEGORIES,
    scores: Mapping[int, float] | None = None,
) -> np.ndarray:
    """(H, W + legend, 3) uint8: ``image`` tinted by segment, with a legend of the segments present.

    Args:
        image: the angiogram, (C, H, W), (H, W, C) or (H, W), as :func:`display_rgb` accepts.
        label_map: (H, W) or (1, H, W) CASS ids, 0 for background.
        category_names: names of labels 1, 2, ...
        scores: label -> confidence, shown in the legend.
    """
    rgb = display_rgb(image).astype(np.float32)
    labels = as_plane(label_map, "label map", np.int64)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(
            f"label map is {labels.shape[0]}x{labels.shape[1]} but the image is {rgb.shape[0]}x{rgb.shape[1]}"
        )
    colours = category_colours(len(category_names)).astype(np.float32)
    present = [int(v) for v in np.unique(labels) if 0 < v <= len(category_names)]
    for label in present:
        region = labels == label
        rgb[region] = (1 - _OPACITY) * rgb[region] + _OPACITY * colours[label - 1]

    font = ImageFont.load_default(size=_FONT_SIZE)
    lines = [
        (
            label,
            category_names[label - 1] + ("" if scores is None else f" {scores.get(label, float('nan')):.2f}"),
        )
        for label in present
    ] or [(0, "no segment found")]
    width = max(int(font.getlength(text)) for _, text in lines) + _SWATCH + 14
    height, row = rgb.shape[0], _FONT_SIZE + 6
    canvas = Image.new("RGB", (rgb.shape[1] + width, max(height, row * len(lines) + 8)), (255, 255, 255))
    canvas.paste(Image.fromarray(np.round(rgb).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = rgb.shape[1] + 4
    for k, (label, text) in enumerate(lines):
        y = 4 + k * row
        if label:
            draw.rectangle((x, y, x + _SWATCH, y + _SWATCH), fill=tuple(int(c) for c in colours[label - 1]))
        draw.text((x + _SWATCH + 6, y), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


class SaveSegmentOutputsd(MapTransform):
    """Write each angiogram's segments JSON, CASS label PNG and overlay (see the module docstring).

    Files go to ``output_dir`` as ``<stem>_segments.json``, ``<stem>_labels.png`` and
    ``<stem>_overlay.png``. With ``output_file`` (one image, from the single-image command line) the
    label PNG goes exactly there and the others beside it as ``<output stem>_segments.json`` and
    ``<output stem>_overlay.png``. The written paths are added under ``"<key>_path"``,
    ``"segments_path"`` and ``"overlay_path"``.

    Args:
        keys: the one key holding the (1, H, W) CASS label map
            (:class:`~common.postprocessing.angiography.CassLabelMapd`).
        detection_keys: the soft masks, boxes, scores and labels, in that order.
        image_key: the image MetaTensor, at the label map's size, that names the outputs.
        output_dir: folder receiving the files when ``output_file`` is not given.
        output_file: write the label PNG to this path (single-image use).
        category_names: names of labels 1, 2, ...
        score_threshold, mask_threshold: as given to ``CassLabelMapd``, so that the JSON lists the
            segments the label map shows.
        overlay: also write the overlay.
    """

    def __init__(
        self,
        keys: KeysCollection = "label_map",
        detection_keys: Sequence[str] = ("pred_masks", "pred_boxes", "pred_scores", "pred_labels"),
        image_key: str = "image",
        output_dir: str | os.PathLike = "./outputs",
        output_file: str | os.PathLike | None = None,
        category_names: Sequence[str] = CASS_CATEGORIES,
        score_threshold: float = 0.0,
        mask_threshold: float = 0.5,
        overlay: bool = True,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"SaveSegmentOutputsd writes one label-map key, got keys {self.keys}")
        if len(detection_keys) != 4:
            raise ValueError(
                f"detection_keys must name masks, boxes, scores and labels, got {detection_keys}"
            )
        self.detection_keys = tuple(detection_keys)
        self.image_key = image_key
        self.output_dir = Path(output_dir)
        self.output_file = None if output_file is None else Path(output_file)
        self.category_names = list(category_names)
        self.score_threshold, self.mask_threshold = score_threshold, mask_threshold
        self.overlay = overlay
        self._output_file_source: Path | None = None

    def _paths(self, image: Any) -> tuple[Path, Path, Path]:
        source, stem = source_stem(image, self.image_key)
        if self.output_file is None:
            folder = self.output_dir
            return (
                folder / f"{stem}_labels.png",
                folder / f"{stem}_segments.json",
                folder / f"{stem}_overlay.png",
            )
        if self._output_file_source not in (None, source):
            raise ValueError(
                f"output_file {self.output_file} takes one image, but both {self._output_file_source} and "
                f"{source} were given; use output_dir for several images"
            )
        self._output_file_source = source
        out = self.output_file
        return out, out.with_name(f"{out.stem}_segments.json"), out.with_name(f"{out.stem}_overlay.png")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[self.image_key]
            label_map = as_plane(d[key], "label map").astype(np.uint8)
            labels_path, json_path, overlay_path = self._paths(image)
            records = segment_records(
                *(d[k] for k in self.detection_keys),
                self.category_names, self.score_threshold, self.mask_threshold,
            )  # fmt: skip
            d["segments_path"] = str(
                write_segments_json(
                    records, str(source_stem(image, self.image_key)[0]), label_map.shape, json_path
                )
            )
            d[f"{key}_path"] = str(write_png(label_map, labels_path))
            if self.overlay:
                scores = {r["label"]: r["score"] for r in records}
                overlay = draw_segment_overlay(image, label_map, self.category_names, scores)
                d["overlay_path"] = str(write_png(overlay, overlay_path))
        return d


class SaveVesselMaskd(MapTransform):
    """Write a (1, H, W) binary vessel prediction as ``<stem>_vessels.png`` (0/255) in ``output_dir``,
    named after the image under ``image_key``; with ``output_file`` (single image), beside it as
    ``<output stem>_vessels.png``. The path is added under ``"<key>_path"``."""

    def __init__(
        self,
        keys: KeysCollection = "pred",
        image_key: str = "image",
        output_dir: str | os.PathLike = "./outputs",
        output_file: str | os.PathLike | None = None,
        threshold: float = 0.5,
    ) -> None:
        super().__init__(keys)
        self.image_key = image_key
        self.output_dir = Path(output_dir)
        self.output_file = None if output_file is None else Path(output_file)
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.output_file is None:
                path = self.output_dir / f"{source_stem(d[self.image_key], self.image_key)[1]}_vessels.png"
            else:
                path = self.output_file.with_name(f"{self.output_file.stem}_vessels.png")
            mask = np.where(as_plane(d[key], "vessel mask", np.float32) > self.threshold, 255, 0)
            d[f"{key}_path"] = str(write_png(mask.astype(np.uint8), path))
        return d
