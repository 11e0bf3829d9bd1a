"""Cell detection and classification over a whole smear scan, tile by tile, in memory bounded by the tiles.

The image pipeline of the cytology bundle (``configs/inference.json``) runs a CenterNet over an image held
in memory, decodes cell centres (:func:`common.postprocessing.centernet.decode_centres`), drops
duplicates closer than ``min_distance`` (:func:`~common.postprocessing.centernet.suppress_close_points`)
and classifies a crop around each centre (:class:`~common.postprocessing.cell_classification.ClassifyCellsd`).
:class:`WholeSmearDetector` does the same over a pyramidal slide: the kept tiles of one level come from
:class:`~common.inferers.slide_tiles.SlideTileStream` (tissue found once on a low level, glass never
decoded, tiles decoded ahead of the network, errors naming the slide and tile), and each batch of tiles
goes through the detector, then the classifier, before the next is read.

Which tile reports a cell (the ownership rule). Along each axis, neighbouring tiles split their overlap at
its middle: with tile starts ``s_0 < s_1 < ...`` of side ``p``, tile ``k`` owns the coordinates in
``[(s_{k-1} + p + s_k) / 2, (s_k + p + s_{k+1}) / 2)`` (from 0 for the first tile, up to the level's size
for the last), the part of itself nearer its own centre than its neighbours'. A centre decoded in a tile is
kept only when it lies in the part that tile owns, so the owned parts tile the level without gaps or
overlap and a cell in an overlap is reported once, by the tile that sees it farthest from its own edge.
A network's heatmap can still put one cell's peak on either side of a seam in the two tiles that see it;
those two points, each kept by its own tile, lie a few pixels apart, within ``min_distance``, and the greedy
:func:`~common.postprocessing.centernet.suppress_close_points` over all kept centres of the slide (the
same step, with the same ``min_distance``, that the image pipeline applies to a whole image) keeps the
stronger. Centres in the part owned by a skipped (glass) tile are not reported, as a skipped tile is
background in the class maps of :mod:`common.inferers.wsi`.

Crops. The classifier's crop around a kept centre is cut from the tile that owns the centre, which holds
the processed level's pixels, preprocessed as the detector saw them (as the image pipeline crops the
normalised image): no second decode. The tile is first clipped to the level, so a crop at the slide's edge
is mirrored there, as :class:`~common.postprocessing.cell_classification.ClassifyCellsd` mirrors it at an
image's edge. A crop lies inside its tile when half the overlap covers half the crop and a pixel of
interpolation margin: the overlap in pixels must be at least ``crop_size + 2`` (checked up front).

Memory. Besides the stream's tiles (about ``2 x batch_size`` decoded tiles ahead and one batch on the
device) and one batch of crops (``classifier_batch_size x 3 x input_size^2`` floats), only the kept cells
are held until the slide ends: 5 float64 per cell before duplicates are dropped (40 bytes, 40 MB for a
million cells), then the CSV's text while it is written; nothing grows with the slide's size in pixels.
The overlay is a thumbnail of at most ``thumbnail_size`` pixels a side.

Outputs, per slide ``<stem>``, each written atomically into ``output_dir``:

- ``<stem>_detections.csv``: the image pipeline's columns (:data:`~common.writers.detections.DETECTION_COLUMNS`,
  ``image_filename`` being the slide's file name), with ``x``, ``y``, ``width`` and ``height`` in level-0
  pixels whatever level was processed, plus ``x_um`` and ``y_um`` (empty when the slide records no
  resolution); strongest detection first;
- ``<stem>_overlay.png``: a thumbnail with a dot per cell in its class's colour
  (:func:`common.writers.detection_overlays.class_colours`);
- ``<stem>_summary.json``: cells per class, tiles processed/skipped and seconds; written last, so its
  presence means the slide is done (:meth:`WholeSmearDetector.is_done`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from common.data.cytology import BETHESDA_CLASSES
from common.data.wsi import open_slide, select_level
from common.inferers.slide_tiles import (
    SlideTileStream,
    TileBatch,
    check_int,
    check_slide_settings,
    network_device,
    slide_thumbnail,
)
from common.io.atomic import atomic_write
from common.postprocessing.cell_classification import ClassifyCellsd
from common.postprocessing.centernet import decode_centres, suppress_close_points
from common.writers.detection_overlays import class_colours
from common.writers.detections import DETECTION_COLUMNS, detection_row
from common.writers.display import write_png

__all__ = ["MICRON_COLUMNS", "WholeSmearDetector", "owned_bounds"]

logger = logging.getLogger(__name__)

MICRON_COLUMNS = (
    "x_um",
    "y_um",
)  # appended to DETECTION_COLUMNS: the centre in microns from the slide's corner


def owned_bounds(starts: Sequence[int], size: int, length: int) -> np.ndarray:
    """``(n + 1,)`` bounds of the parts that ``n`` tiles of side ``size`` starting at ``starts`` own along
    an axis ``length`` pixels long: tile ``k`` owns ``[bounds[k], bounds[k + 1])``, neighbours splitting
    their overlap at its middle (see the module's docstring)."""
    starts = np.asarray(starts, dtype=np.float64)
    middles = (starts[:-1] + size + starts[1:]) / 2
    return np.concatenate([[0.0], middles, [float(length)]])


class WholeSmearDetector:
    """Detects and classifies the cells of whole smear scans; call it with a slide path.

    Built once from a bundle config, it runs over a folder of slides with
    ``run_batch(@slide_list, @detector, @is_done)`` (:func:`common.engines.batch.run_batch`).

    Args:
        detector: maps a ``(B, 3, h, w)`` float batch to ``(B, 3, h / stride, w / stride)`` CenterNet maps
            (heatmap logits, x and y offsets), e.g. :class:`common.networks.centernet.CenterNet`. It must
            already be on ``device``; an ``nn.Module`` is put in eval mode.
        classifier: maps ``(B, 3, input_size, input_size)`` crops to ``(B, len(class_names))`` logits, on
            ``device``.
        output_dir: folder for the outputs (created if missing).
        class_names: the classifier's classes in index order.
        patch_size: tile side (or ``(height, width)``) in pixels of the processed level, a multiple of
            ``stride``.
        overlap: between neighbouring tiles, a fraction of the tile in [0, 1) or whole pixels; at least
            ``crop_size + 2`` pixels (see the module's docstring).
        level: pyramid level to process; or give ``mpp`` to choose it by resolution (see
            :func:`common.data.wsi.select_level`); neither means level 0.
        mpp: microns per pixel the networks expect.
        batch_size: tiles per forward pass of the detector.
        min_tissue_fraction: tiles with less tissue are skipped, never decoded
            (:class:`~common.inferers.slide_tiles.SlideTileStream`); a smear is sparse, so keep it low.
        device: where tiles and crops go; default: the device of the detector's parameters.
        preprocess: applied to each float batch of tiles with values 0..255, e.g. ImageNet normalisation;
            the classifier's crops are cut from the preprocessed tiles, as in the image pipeline.
        stride: the detector's output stride.
        threshold: least heatmap probability of a centre.
        top_k: most centres per tile (the image pipeline's is per image).
        min_distance: of two kept centres closer than this (pixels of the processed level), the weaker
            is dropped; 0 keeps both.
        crop_size: side of the classifier's crop around each centre, in pixels of the processed level.
        classifier_input_size: side the crops are resized to for the classifier.
        classifier_batch_size: crops per classifier pass.
        box_size: width and height written for each cell, in pixels of the processed level (the CSV holds
            them in level-0 pixels).
        amp: autocast the detector's forward pass.
        channels_last: feed the detector channels-last batches.
        backend: slide reader, see :func:`common.data.wsi.open_slide`.
        workers: threads decoding tiles ahead of the network.
        thumbnail_size: longest side of the overlay PNG.
        dot_radius: radius of a cell's dot in the overlay, in thumbnail pixels.
    """

    def __init__(
        self,
        detector: Callable[[torch.Tensor], torch.Tensor],
        classifier: torch.nn.Module,
        output_dir: str | os.PathLike,
        class_names: Sequence[str] = BETHESDA_CLASSES,
        patch_size: int | Sequence[int] = 1024,
        overlap: float = 0.25,
        level: int | None = None,
        mpp: float | None = None,
        batch_size: int = 4,
        min_tissue_fraction: float = 0.002,
        device: str | torch.device | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        stride: int = 4,
        threshold: float = 0.3,
        top_k: int = 500,
        min_distance: float = 20.0,
        crop_size: int = 100,
        classifier_input_size: int = 224,
        classifier_batch_size: int = 64,
        box_size: float = 100.0,
        amp: bool = False,
        channels_last: bool = False,
        backend: str = "tifffile",
        workers: int = 2,
        thumbnail_size: int = 2048,
        dot_radius: float = 2.0,
    ) -> None:
        if not callable(detector):
            raise TypeError(f"detector must be callable, got {type(detector).__name__}")
        self.class_names = [str(name) for name in class_names]
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names must be unique names, got {list(class_names)}")
        check_slide_settings(level, mpp, backend)
        self.level, self.mpp = level, mpp
        self.stride = check_int("stride", stride, 1)
        self.top_k = check_int("top_k", top_k, 1)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a probability in [0, 1], got {threshold!r}")
        if min_distance < 0 or box_size <= 0 or dot_radius <= 0:
            raise ValueError(
                f"min_distance must be >= 0, box_size and dot_radius > 0; got {min_distance}, {box_size}, {dot_radius}"
            )
        self.threshold, self.min_distance, self.box_size = threshold, float(min_distance), float(box_size)
        self.backend = backend
        self.device = network_device(detector, device)
        self.stream = SlideTileStream(
            patch_size,
            overlap,
            batch_size,
            min_tissue_fraction,
            self.device,
            preprocess,
            workers,
            channels_last,
        )
        if any(side % self.stride for side in self.stream.patch_size):
            raise ValueError(
                f"patch_size {self.stream.patch_size} must be a multiple of the stride {self.stride}"
            )
        # the regular overlap of a grid: three tiles' worth of level has at least two tiles per axis
        starts = self.stream.grid([3 * side for side in self.stream.patch_size])
        overlaps = [side - (axis[1] - axis[0]) for side, axis in zip(self.stream.patch_size, starts)]
        if min(overlaps) < crop_size + 2:
            raise ValueError(
                f"an overlap of {min(overlaps)} px leaves the crops of centres near a seam outside their tile; "
                f"with crop_size {crop_size} the overlap must be at least {crop_size + 2} px"
            )
        self.classify = ClassifyCellsd(
            "image",
            classifier,
            crop_size=crop_size,
            input_size=classifier_input_size,
            batch_size=classifier_batch_size,
        )
        self.detector = detector
        self.amp = bool(amp)
        self.thumbnail_size = check_int("thumbnail_size", thumbnail_size, 1)
        self.dot_radius = float(dot_radius)
        self.output_dir = Path(output_dir)

    def outputs(self, slide_path: str | os.PathLike) -> dict[str, Path]:
        """The files :meth:`__call__` writes for ``slide_path``, the summary last."""
        stem = Path(slide_path).stem
        names = {"detections": "detections.csv", "overlay": "overlay.png", "summary": "summary.json"}
        return {kind: self.output_dir / f"{stem}_{name}" for kind, name in names.items()}

    def is_done(self, slide_path: str | os.PathLike) -> bool:
        """Whether the slide's outputs are complete: each is written atomically and the summary last."""
        return self.outputs(slide_path)["summary"].is_file()

    def _detect(
        self, batch: TileBatch, bounds: tuple[np.ndarray, np.ndarray], shape: Sequence[int]
    ) -> np.ndarray:
        """``(K, 5)`` rows ``x, y, score, class, class probability`` (pixels of the level) of the centres that
        the batch's tiles own, classified on crops of those tiles."""
        with torch.inference_mode():
            with torch.autocast(self.device.type, enabled=self.amp):
                maps = self.detector(batch.images)
            found = decode_centres(maps.float(), self.stride, self.top_k, self.threshold)
            rows = []
            for (i, j), (top, left), image, (points, scores) in zip(
                batch.indices, batch.origins, batch.images, found
            ):
                points, scores = points.cpu(), scores.cpu()
                x, y = points[:, 0].double().numpy() + left, points[:, 1].double().numpy() + top
                (y0, y1), (x0, x1) = bounds[0][i : i + 2], bounds[1][j : j + 2]
                owned = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
                if not owned.any():
                    continue
                # the tile clipped to the level: a crop at the slide's edge is mirrored there, not at the glass
                inside = image[
                    :, : min(image.shape[1], shape[0] - top), : min(image.shape[2], shape[1] - left)
                ]
                probabilities = self.classify.classify(inside, points[torch.from_numpy(owned)])
                confidence, classes = probabilities.max(dim=1)
                columns = (
                    x[owned],
                    y[owned],
                    scores.double().numpy()[owned],
                    classes.numpy(),
                    confidence.numpy(),
                )
                rows.append(np.stack(columns, axis=1))
        return np.concatenate(rows) if rows else np.zeros((0, 5))

    def _csv(
        self, slide_path: Path, cells: np.ndarray, scale: tuple[float, float], mpp: tuple | None
    ) -> bytes:
        """The detections CSV: level-0 pixels, microns when the slide records its resolution."""
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow([*DETECTION_COLUMNS, *MICRON_COLUMNS])
        width, height = self.box_size * scale[1], self.box_size * scale[0]
        for x, y, score, label, probability in cells:
            x0, y0 = x * scale[1], y * scale[0]
            microns = ("", "") if mpp is None else (f"{x0 * mpp[1]:.2f}", f"{y0 * mpp[0]:.2f}")
            name = self.class_names[int(label)]
            writer.writerow(
                [*detection_row(slide_path.name, x0, y0, width, height, score * probability, name), *microns]
            )
        return text.getvalue().encode("utf-8")

    def _overlay(self, thumbnail: np.ndarray, cells: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
        """The thumbnail with a dot per cell in its class's colour, rarer classes drawn last (on top)."""
        canvas = Image.fromarray(thumbnail)
        draw = ImageDraw.Draw(canvas)
        colours = class_colours(len(self.class_names))
        counts = np.bincount(cells[:, 3].astype(np.int64), minlength=len(self.class_names))
        radius = self.dot_radius
        for label in np.argsort(-counts, kind="stable"):
            for x, y in cells[cells[:, 3] == label, :2] * (scale[1], scale[0]):
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colours[label])
        return np.asarray(canvas)

    def __call__(self, slide_path: str | os.PathLike) -> dict[str, Any]:
        """Detect and classify the cells of one slide and write its outputs.

        Returns:
            the content of ``<stem>_summary.json`` (slide, processed level, its shape and mpp, settings,
            tiles processed/skipped, cells in all and per class, seconds: ``total`` and ``network``, the
            detector's and classifier's passes) plus ``"outputs"`` (the written paths).

        Raises:
            InputDataError: the slide is missing or unreadable (naming the tile that failed to decode),
                or the level/mpp does not fit it.
        """
        start = time.perf_counter()
        slide_path = Path(slide_path)
        with open_slide(slide_path, self.backend) as slide:
            level = select_level(slide.info, level=self.level, mpp=self.mpp)
            shape = slide.info.level_dimensions[level]
            height0, width0 = slide.info.level_dimensions[0]
            scale = (height0 / shape[0], width0 / shape[1])  # level -> level-0 pixels, per axis
            rows, cols = self.stream.grid(shape)
            bounds = (
                owned_bounds(rows, self.stream.patch_size[0], shape[0]),
                owned_bounds(cols, self.stream.patch_size[1], shape[1]),
            )
            if isinstance(self.detector, torch.nn.Module):
                self.detector.eval()
            found, network_seconds = [], 0.0
            with closing(self.stream.batches(slide, level)) as batches:  # stops the reader on an error
                for batch in batches:
                    batch_start = time.perf_counter()
                    found.append(self._detect(batch, bounds, shape))
                    network_seconds += time.perf_counter() - batch_start
            cells = np.concatenate(found) if found else np.zeros((0, 5))
            if len(cells):
                keep = suppress_close_points(cells[:, :2], cells[:, 2], self.min_distance).numpy()
                cells = cells[keep]
            thumbnail = slide_thumbnail(slide, self.thumbnail_size)
            mpp = slide.info.mpp
        outputs = self.outputs(slide_path)
        csv_bytes = self._csv(slide_path, cells, scale, mpp)
        atomic_write(outputs["detections"], lambda f: f.write(csv_bytes))
        thumbnail_scale = (thumbnail.shape[0] / shape[0], thumbnail.shape[1] / shape[1])
        write_png(self._overlay(thumbnail, cells, thumbnail_scale), outputs["overlay"])
        counts = np.bincount(cells[:, 3].astype(np.int64), minlength=len(self.class_names))
        level_mpp = slide.info.level_mpp(level)
        summary = {
            "slide": str(slide_path),
            "level": level,
            "shape": list(shape),
            "mpp": None if level_mpp is None else [round(v, 6) for v in level_mpp],
            "patch_size": list(self.stream.patch_size),
            "overlap": self.stream.overlap,
            "min_tissue_fraction": self.stream.min_tissue_fraction,
            "tiles": {"processed": self.stream.processed, "skipped": self.stream.skipped},
            "cells": len(cells),
            "classes": {name: int(count) for name, count in zip(self.class_names, counts)},
            "seconds": {"total": round(time.perf_counter() - start, 3), "network": round(network_seconds, 3)},
        }
        text = json.dumps(summary, indent=2) + "\n"
        atomic_write(outputs["summary"], lambda f: f.write(text.encode("utf-8")))
        logger.info(
            "%s: level %d (%d x %d), %d tiles processed, %d skipped, %d cells, %.1f s -> %s",
            slide_path,
            level,
            *shape,
            self.stream.processed,
            self.stream.skipped,
            len(cells),
            summary["seconds"]["total"],
            outputs["summary"],
        )
        return {**summary, "outputs": {name: str(path) for name, path in outputs.items()}}
