"""Cell instance segmentation of whole slides (fluorescence or H&E), tile by tile, with instance ids unique
over the whole slide and memory bounded by a band of the slide's width.

Per slide, a :class:`~common.inferers.slide_tiles.SlideTileStream` decodes the kept tiles ahead of the
network; the network (e.g. DINOCell's :class:`~common.networks.vit_unet.ViTUNet`) predicts each tile's
normalised distance map; a :class:`~common.inferers.band_merger.BandMerger` averages the maps of
overlapping tiles and hands final rows on as soon as no later tile touches them; a
:class:`~common.postprocessing.band_watershed.BandWatershed` turns those rows into cell instances a band
at a time (see its module for the rule that keeps a cell that straddles a band boundary whole), and the
instance rows are written into the output TIFF as they become final. The part of a tile past the slide's
edge is mirrored from the part inside, as the bundle's sliding-window inference pads images, rather than
read as white glass (which would look like a bright cell to a fluorescence network).

Outputs, per slide ``<stem>``, each written atomically into ``output_dir``:

- ``<stem>_instances.tif``: uint32 instance ids of the processed level (0: background) as a tiled
  pyramidal TIFF with resolution tags, coarser levels by taking every other pixel (labels are not mixed);
- ``<stem>_cells.csv``: per cell its id, area in pixels and in µm² (empty without a resolution),
  centroid and bounding box (``bbox_max_*`` one past the last pixel) in pixels of the processed level;
- ``<stem>_overlay.png``: a thumbnail of the slide with each cell filled and outlined in its colour;
- ``<stem>_summary.json``: cells, tiles processed/skipped, settings, memory and seconds; written last,
  so its presence means the slide is done (:meth:`WholeSlideCellSegmenter.is_done`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import tifffile
import torch
from skimage.segmentation import relabel_sequential

from common.data.wsi import Slide, open_slide, select_level
from common.inferers.band_merger import BandMerger
from common.inferers.slide_tiles import (
    SlideTileStream,
    check_int,
    check_slide_settings,
    is_int,
    network_device,
    slide_thumbnail,
)
from common.inferers.wsi import write_streamed_pyramid
from common.io.atomic import atomic_write
from common.postprocessing.band_watershed import BandWatershed, CellRows
from common.postprocessing.watershed import check_smooth_sigma, check_thresholds
from common.writers.instances import CELL_TABLE_COLUMNS, write_overlay

__all__ = ["CELL_COLUMNS", "WholeSlideCellSegmenter"]

logger = logging.getLogger(__name__)

#: Columns of ``<stem>_cells.csv``: the image pipeline's cell table with the area in µm² after the pixels.
CELL_COLUMNS = (*CELL_TABLE_COLUMNS[:2], "area_um2", *CELL_TABLE_COLUMNS[2:])


def _decimate2(labels: np.ndarray) -> np.ndarray:
    """Halve an instance map by taking every other pixel (a copy): ids are not averaged or voted on."""
    return labels[::2, ::2].copy()


def _mirror_index(inside: int, size: int) -> np.ndarray:
    """Indices ``0..size - 1`` that mirror the first ``inside`` ones past them (as ``np.pad`` 'reflect')."""
    return np.pad(np.arange(inside), (0, size - inside), mode="reflect" if inside > 1 else "edge")


def _mirror_past_edge(images: torch.Tensor, origins: Sequence[tuple[int, int]], shape: Sequence[int]) -> None:
    """Replace, in place, the part of each ``(3, h, w)`` tile past the slide's edge by its mirror image."""
    height, width = images.shape[-2:]
    for image, (top, left) in zip(images, origins):
        inside = (min(height, shape[0] - top), min(width, shape[1] - left))
        if inside[0] < height:
            image.copy_(image[:, torch.as_tensor(_mirror_index(inside[0], height), device=image.device)])
        if inside[1] < width:
            image.copy_(image[:, :, torch.as_tensor(_mirror_index(inside[1], width), device=image.device)])


class _DistanceNetwork:
    """The network as the merger needs it: ``(B, 1, h, w)`` float32 NumPy maps of the tiles' size, the
    forward passes timed."""

    def __init__(self, network: Callable, device: torch.device, amp: bool, channels_last: bool) -> None:
        self.network, self.device, self.amp, self.channels_last = network, device, amp, channels_last
        self.seconds = 0.0

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        start = time.perf_counter()
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, enabled=self.amp):
            maps = self.network(batch)
        expected = (len(batch), 1, *batch.shape[-2:])
        if not isinstance(maps, torch.Tensor) or tuple(maps.shape) != expected:
            shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
            raise ValueError(
                f"network must return {expected} distance maps for a batch of tiles, got {shape}"
            )
        maps = maps.float().cpu().numpy()  # .cpu() waits for the device
        self.seconds += time.perf_counter() - start
        return maps


class WholeSlideCellSegmenter:
    """Segments the cells of whole slides with one distance-map network; call it with a slide path.

    Built once from a bundle config, it runs over a folder of slides with
    ``"$run_batch(@slide_list, @segmenter, @is_done)"``; each call returns the summary described in
    :meth:`__call__`.

    Memory: besides the network and the tiles decoded ahead, the merger's band,
    ``4 * ((ph - sy) * W + ph * pw)`` bytes for tiles ``ph x pw`` a step of ``sy`` rows apart (see
    :class:`~common.inferers.band_merger.BandMerger`), and the band watershed's window, about
    ``W * (band_rows + max_cell_size + 2 * halo) * 56`` bytes with the map rows it holds (the exact bound is
    :class:`~common.postprocessing.band_watershed.BandWatershed`'s), for a level ``W`` pixels wide: it
    grows with the width and the margin, never with the height. The summary reports both peaks; the
    overlay adds about 85 bytes per thumbnail pixel while it is drawn.

    Args:
        network: maps a ``(B, 3, h, w)`` float batch to ``(B, 1, h, w)`` distance maps in [0, 1] (see
            :mod:`common.postprocessing.watershed`). It must already be on ``device``; an ``nn.Module`` is
            put in eval mode.
        output_dir: folder for the outputs (created if missing); a hidden scratch folder inside it holds
            the cell table and the TIFF's coarser levels until they are written, and is removed at the end.
        cells_max, cell_fill, min_size, smooth_sigma: the watershed's settings, see
            :func:`~common.postprocessing.watershed.distance_map_watershed` (tuned ones from
            :func:`~common.postprocessing.watershed.load_watershed_thresholds`).
        max_cell_size: the tallest group of touching cells, in pixels of the processed level, that is
            found whole where it straddles two bands: an instance is committed with the band its top row
            lies in, segmented on the band plus this many rows below it.
        band_rows: rows of the slide segmented at once (more: less margin redone, more memory).
        patch_size: tile side (or ``(height, width)``), a multiple of the network's patch size.
        overlap: between neighbouring tiles, a fraction of the tile in [0, 1) or whole pixels; overlapping
            maps are averaged.
        level: pyramid level to process; or give ``mpp`` to choose it by resolution (see
            :func:`common.data.wsi.select_level`); neither means level 0.
        mpp: microns per pixel the network expects.
        batch_size: tiles per forward pass.
        min_tissue_fraction: tiles with less tissue (:func:`~common.transforms.tissue.tissue_mask`: neither
            bright grey glass nor black) are skipped and left background; 0 (default) keeps every tile. On
            dark-field fluorescence the background is "black" and bright grey nuclei count as glass, so a
            sparse tile may look empty: keep 0 there, use e.g. 0.05 for H&E to skip the glass.
        device: where tiles go for the forward pass; default: the device of the network's parameters.
        amp: autocast the forward pass (float16 on CUDA, bfloat16 on CPU).
        preprocess: applied to each ``(B, 3, h, w)`` float batch with values 0..255, e.g. ImageNet
            normalisation; see :class:`~common.inferers.slide_tiles.SlideTileStream`.
        backend: slide reader, see :func:`common.data.wsi.open_slide`.
        tile_size: tile side of the output TIFF (a multiple of 16).
        thumbnail_size: longest side of the overlay PNG.
        workers: threads decoding tiles ahead of the network; 0 decodes in the calling thread.
        channels_last: feed the network channels-last batches.
    """

    def __init__(
        self,
        network: Callable[[torch.Tensor], torch.Tensor],
        output_dir: str | os.PathLike,
        cells_max: float = 0.5,
        cell_fill: float = 0.05,
        min_size: int = 0,
        smooth_sigma: float = 0.0,
        max_cell_size: int = 64,
        band_rows: int = 256,
        patch_size: int | Sequence[int] = 256,
        overlap: float = 0.25,
        level: int | None = None,
        mpp: float | None = None,
        batch_size: int = 8,
        min_tissue_fraction: float = 0.0,
        device: str | torch.device | None = None,
        amp: bool = False,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        backend: str = "tifffile",
        tile_size: int = 512,
        thumbnail_size: int = 2048,
        workers: int = 2,
        channels_last: bool = False,
    ) -> None:
        if not callable(network):
            raise TypeError(f"network must be callable, got {type(network).__name__}")
        check_thresholds(cells_max, cell_fill)
        check_smooth_sigma(smooth_sigma)
        self.watershed = {
            "cells_max": float(cells_max),
            "cell_fill": float(cell_fill),
            "min_size": check_int("min_size", min_size, 0),
            "smooth_sigma": float(smooth_sigma),
        }
        self.max_cell_size = check_int("max_cell_size", max_cell_size, 1)
        self.band_rows = check_int("band_rows", band_rows, 1)
        check_slide_settings(level, mpp, backend)
        self.level, self.mpp = level, mpp
        self.device = network_device(network, device)
        self.tiles = SlideTileStream(
            patch_size,
            overlap,
            batch_size,
            min_tissue_fraction,
            self.device,
            preprocess,
            workers,
            channels_last,
        )
        self.amp = bool(amp)
        self.backend = backend
        if not is_int(tile_size) or tile_size < 16 or tile_size % 16:
            raise ValueError(f"tile_size must be a positive multiple of 16 (a TIFF rule), got {tile_size!r}")
        self.tile_size = int(tile_size)
        self.thumbnail_size = check_int("thumbnail_size", thumbnail_size, 1)
        self.network = network
        self.output_dir = Path(output_dir)

    def outputs(self, slide_path: str | os.PathLike) -> dict[str, Path]:
        """The files :meth:`__call__` writes for ``slide_path``, the summary last."""
        stem = Path(slide_path).stem
        names = {
            "instances": "instances.tif",
            "cells": "cells.csv",
            "overlay": "overlay.png",
            "summary": "summary.json",
        }
        return {kind: self.output_dir / f"{stem}_{name}" for kind, name in names.items()}

    def is_done(self, slide_path: str | os.PathLike) -> bool:
        """Whether the slide's outputs are complete: each is written atomically and the summary last, so its
        presence is enough (used to resume an interrupted batch)."""
        return self.outputs(slide_path)["summary"].is_file()

    def _infer(
        self, slide: Slide, level: int, table: TextIO, mpp: tuple[float, float] | None
    ) -> Generator[np.ndarray, None, dict[str, Any]]:
        """Run the kept tiles through the network, merger and band watershed, yielding the final uint32
        instance rows top to bottom and writing each committed cell's row into ``table``; returns what
        the summary reports of the run."""
        shape = slide.info.level_dimensions[level]
        rows, cols = self.tiles.grid(shape)
        finished: list[np.ndarray] = []
        um2 = None if mpp is None else mpp[0] * mpp[1]

        def write_cells(cells: CellRows) -> None:
            area_um2 = [""] * len(cells["id"]) if um2 is None else [f"{a * um2:.3f}" for a in cells["area"]]
            columns = zip(*(cells[name].tolist() for name in CELL_COLUMNS if name != "area_um2"))
            table.writelines(
                f"{cell_id},{area},{in_um2},{cy:.3f},{cx:.3f},{','.join(map(str, box))}\n"
                for (cell_id, area, cy, cx, *box), in_um2 in zip(columns, area_um2)
            )

        band = BandWatershed(
            *shape,
            lambda top, labels: finished.append(labels),
            write_cells,
            max_cell_size=self.max_cell_size,
            band_rows=self.band_rows,
            **self.watershed,
        )
        merger = BandMerger(
            shape,
            self.tiles.patch_size,
            rows,
            cols,
            1,
            0,
            lambda top, maps: band.push(maps[0]),
            average_rows=True,
        )
        network = _DistanceNetwork(self.network, self.device, self.amp, self.tiles.channels_last)
        if isinstance(self.network, torch.nn.Module):
            self.network.eval()
        batches = self.tiles.batches(slide, level)
        try:
            for batch in batches:
                with torch.inference_mode():
                    _mirror_past_edge(batch.images, batch.origins, shape)
                    maps = network(batch.images)
                for index, tile in zip(batch.indices, maps):
                    merger.add(*index, tile)
                yield from finished
                finished.clear()
        finally:
            batches.close()  # stops the reader's threads when the consumer gives up early
        merger.finish()
        band.finish()
        yield from finished
        return {
            "cells": band.cells,
            "cells_reaching_the_margin": band.cut_cells,
            "tiles": {"processed": self.tiles.processed, "skipped": self.tiles.skipped},
            "peak_bytes": {"merger": merger.peak_bytes, "band_watershed": band.peak_bytes},
            "network_seconds": network.seconds,
        }

    def __call__(self, slide_path: str | os.PathLike) -> dict[str, Any]:
        """Segment the cells of one slide and write its outputs.

        Returns:
            the content of ``<stem>_summary.json``: slide, level, shape and mpp of the processed level,
            the settings, ``cells``, ``cells_reaching_the_margin`` (committed cells that reach the last row
            of a band's margin: maybe taller than ``max_cell_size``, and then cut), tiles
            processed/skipped, ``peak_bytes`` of the merger and of the band watershed, ``seconds``
            (``total`` and ``network``) and ``outputs`` (the written paths).

        Raises:
            InputDataError: the slide is missing or unreadable (naming the tile that failed to decode),
                or the level/mpp does not fit it.
        """
        start = time.perf_counter()
        slide_path = Path(slide_path)
        outputs = self.outputs(slide_path)
        with open_slide(slide_path, self.backend) as slide:
            level = select_level(slide.info, level=self.level, mpp=self.mpp)
            shape = slide.info.level_dimensions[level]
            mpp = slide.info.level_mpp(level)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            scratch = Path(
                tempfile.mkdtemp(prefix=f".{slide_path.stem}.", suffix=".scratch", dir=self.output_dir)
            )
            try:
                run: dict[str, Any] = {}
                with open(scratch / "cells.csv", "w", encoding="utf-8") as table:
                    table.write(",".join(CELL_COLUMNS) + "\n")

                    def instance_rows() -> Generator[np.ndarray, None, None]:
                        run.update((yield from self._infer(slide, level, table, mpp)))

                    # the instances are written while the slide is processed: the TIFF writer pulls their rows
                    write_streamed_pyramid(
                        outputs["instances"],
                        shape,
                        instance_rows(),
                        mpp,
                        self.tile_size,
                        scratch,
                        _decimate2,
                        np.uint32,
                    )
                with open(scratch / "cells.csv", "rb") as table:
                    atomic_write(outputs["cells"], lambda f: shutil.copyfileobj(table, f))
                write_overlay(
                    *_overlay_layers(slide, outputs["instances"], self.thumbnail_size), outputs["overlay"]
                )
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        summary = {
            "slide": str(slide_path),
            "level": level,
            "shape": list(shape),
            "mpp": None if mpp is None else [round(v, 6) for v in mpp],
            "patch_size": list(self.tiles.patch_size),
            "overlap": self.tiles.overlap,
            "min_tissue_fraction": self.tiles.min_tissue_fraction,
            "watershed": self.watershed,
            "max_cell_size": self.max_cell_size,
            "band_rows": self.band_rows,
            "cells": run["cells"],
            "cells_reaching_the_margin": run["cells_reaching_the_margin"],
            "tiles": run["tiles"],
            "peak_bytes": run["peak_bytes"],
            "seconds": {"total": time.perf_counter() - start, "network": run["network_seconds"]},
            "outputs": {name: str(path) for name, path in outputs.items()},
        }
        text = json.dumps(summary, indent=2) + "\n"
        atomic_write(outputs["summary"], lambda f: f.write(text.encode("utf-8")))
        if summary["cells_reaching_the_margin"]:
            logger.warning(
                "%s: %d cells reach the end of a band's margin and may be cut in two: raise max_cell_size (%d)",
                slide_path,
                summary["cells_reaching_the_margin"],
                self.max_cell_size,
            )
        logger.info(
            "%s: level %d (%d x %d), %d cells, %d tiles processed, %d skipped, %.1f s (network %.1f s) -> %s",
            slide_path,
            level,
            *shape,
            summary["cells"],
            run["tiles"]["processed"],
            run["tiles"]["skipped"],
            summary["seconds"]["total"],
            summary["seconds"]["network"],
            outputs["summary"],
        )
        return summary


def _overlay_layers(slide: Slide, instances: Path, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """The slide's thumbnail and the instances at its size (nearest neighbour, from the coarsest level of
    the instance TIFF at least as large), numbered 1..n so that the overlay's colours stay few."""
    thumbnail = slide_thumbnail(slide, max_side)
    height, width = thumbnail.shape[:2]
    with tifffile.TiffFile(instances) as tif:
        levels = tif.series[0].levels
        large_enough = (lvl for lvl in reversed(levels) if lvl.shape[0] >= height and lvl.shape[1] >= width)
        source = next(large_enough, levels[0]).asarray()
    rows = np.arange(height) * source.shape[0] // height
    cols = np.arange(width) * source.shape[1] // width
    labels = relabel_sequential(source[rows[:, None], cols[None]])[0]
    return thumbnail, labels
