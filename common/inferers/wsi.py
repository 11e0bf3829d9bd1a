"""Whole-slide segmentation, tile by tile, without any slide-sized array in memory.

Per slide, a :class:`~common.inferers.slide_tiles.SlideTileStream` finds tissue once on a low-resolution
level, so tiles of bare glass are never decoded at full resolution, and decodes the kept tiles of the
processed level ahead of the network, in raster order, as MONAI's ``WSISlidingWindowSplitter`` places
them; the network's class
probabilities are averaged over overlapping tiles by a :class:`~common.inferers.band_merger.BandMerger`,
which holds only a band of rows as wide as the slide and hands final class-map rows on as soon as no
later tile touches them. By default they are blended at the network's output stride (DeepLab-v2: 8) and
only final rows are upsampled, bilinearly, before the arg-max: 1/64 of the softmax and of the band's
memory, and class maps that differ from full-resolution blending only along class boundaries.
Pixels that no kept tile covers are labelled ``background_index``, never class 0.

The class map is written while the slide is processed: the TIFF writer pulls level 0 a strip of tiles
at a time from the merger's final rows (:class:`_StreamedClassMap`), and its coarser levels wait,
zlib-compressed, in a scratch file. What is held therefore grows with the slide's width (the band, one
strip of class-map tiles, the TIFF tiles kept for the next row of patches), never with its height; on
the CPU no batch-sized array is made per batch either (see
:class:`~common.inferers.slide_tiles.SlideTileStream`), which kept the heap from fragmenting as slides grew.
:func:`write_streamed_pyramid` does the same for any label map (the cell instances of
:mod:`common.inferers.wsi_cells` too).

Outputs, per slide ``<stem>``, each written atomically into ``output_dir``:

- ``<stem>_classes.tif``: uint8 class map of the processed level as a tiled pyramidal TIFF (levels
  halved by 2x2 mode pooling as consecutive reduced-resolution pages, the layout OpenSlide, QuPath and
  :func:`common.data.wsi.open_slide` read), with resolution tags so each level keeps its microns per pixel;
- ``<stem>_overlay.png``: a thumbnail of the slide with the tissue classes blended in;
- ``<stem>_areas.json``: pixels, mm^2 and fraction per class, tissue fraction, tiles processed/skipped;
  written last, so its presence means the slide is done (:meth:`WholeSlideSegmenter.is_done`);
- ``<stem>_probabilities.zarr`` only with ``keep_probabilities=True``: the averaged ``(1, C, H, W)``
  probabilities (NaN where no tile was processed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
import zarr
from PIL import Image

from common.data.histopathology import mask_palette
from common.data.tile_reader import TiledTiffLevel
from common.data.wsi import Slide, open_slide, select_level, write_pyramid_tiff
from common.inferers.band_merger import BandMerger
from common.inferers.slide_tiles import (
    SlideTileStream,
    block_slices,
    check_fraction,
    check_int,
    check_slide_settings,
    is_int,
    network_device,
    slide_thumbnail,
)
from common.io.atomic import atomic_directory, atomic_write
from common.transforms.tissue import (
    BLACK_THRESHOLD,
    BRIGHTNESS_THRESHOLD,
    SATURATION_THRESHOLD,
    tissue_fraction,
    tissue_mask,
)

__all__ = [
    "BLENDS",
    "TissueFilter",
    "WholeSlideSegmenter",
    "mode_pool2",
    "segment_slide",
    "write_streamed_pyramid",
]

logger = logging.getLogger(__name__)

BLENDS = ("output_stride", "full")  # where overlapping tiles are averaged, see WholeSlideSegmenter
_CHUNK = 256  # spatial chunk of the probabilities' zarr array: ~1 MB blocks, small waste at tile edges
_OVERLAY_ROWS = 256  # rows of the overlay blended at once


class TissueFilter:
    """``filter_fn`` for :class:`~monai.inferers.WSISlidingWindowSplitter`: keep a tile when at least
    ``min_tissue_fraction`` of its pixels are tissue (:func:`common.transforms.tissue.tissue_mask`, with
    the same thresholds as pseudo-masks and the glass mask), and count the tiles kept and skipped.

    The white padding past the slide's edge counts as glass. ``min_tissue_fraction=0`` keeps every tile.
    :class:`WholeSlideSegmenter` applies the same rule to a low-resolution level instead, so that glass is
    never decoded at full resolution; this filter serves pipelines built on MONAI's splitter.
    """

    def __init__(
        self,
        min_tissue_fraction: float = 0.05,
        saturation_threshold: float = SATURATION_THRESHOLD,
        brightness_threshold: float = BRIGHTNESS_THRESHOLD,
        black_threshold: float = BLACK_THRESHOLD,
    ) -> None:
        self.min_tissue_fraction = check_fraction("min_tissue_fraction", min_tissue_fraction)
        self.thresholds = {
            "saturation_threshold": saturation_threshold,
            "brightness_threshold": brightness_threshold,
            "black_threshold": black_threshold,
        }
        tissue_mask(np.zeros((1, 1, 3)), **self.thresholds)  # validates the thresholds now
        self.kept = 0
        self.skipped = 0

    def tissue_fraction(self, patch: torch.Tensor) -> float:
        """Share of tissue pixels in a ``(..., 3, H, W)`` RGB tensor with values 0..255."""
        return tissue_fraction(patch.reshape(-1, 3, *patch.shape[-2:]), **self.thresholds)

    def __call__(self, patch: torch.Tensor, location: Sequence[int]) -> bool:
        keep = self.tissue_fraction(patch) >= self.min_tissue_fraction
        if keep:
            self.kept += 1
        else:
            self.skipped += 1
        return keep


def mode_pool2(labels: np.ndarray) -> np.ndarray:
    """Halve a label map: each output pixel is the most frequent of its 2x2 block, ties going to the
    top-left pixel (as plain striding would). Odd sizes are padded by repeating the last row/column."""
    if labels.shape[0] % 2 or labels.shape[1] % 2:
        labels = np.pad(labels, ((0, labels.shape[0] % 2), (0, labels.shape[1] % 2)), mode="edge")
    a, b, c, d = labels[0::2, 0::2], labels[0::2, 1::2], labels[1::2, 0::2], labels[1::2, 1::2]
    # a value shared by two of four is a mode, and no other value can then win more than two: the top-left
    # one when it is shared, else the first of the others that is, else (all differ) the top-left one; the
    # top-left one is shared almost everywhere in a class map, so the rest is worked out only where it is not
    pooled = a.copy()
    lone = (a != b) & (a != c) & (a != d)
    if lone.any():
        b, c, d = b[lone], c[lone], d[lone]
        pooled[lone] = np.where((b == c) | (b == d), b, np.where(c == d, c, pooled[lone]))
    return pooled


class _ProbabilityNetwork:
    """The network as the merger needs it: softmax probabilities as float32 NumPy, at the network's output
    stride when ``at_stride`` and the tile grid allows it (see :meth:`stride`), else at the tile's size;
    also times the forward passes, so reading, blending and writing can be told apart."""

    def __init__(
        self,
        network: Callable,
        num_classes: int,
        device: torch.device,
        amp: bool,
        channels_last: bool,
        at_stride: bool,
        starts: Sequence[int],
    ) -> None:
        self.network, self.num_classes, self.device, self.amp = network, num_classes, device, amp
        self.channels_last, self.at_stride, self.starts = channels_last, at_stride, starts
        self.stride: int | None = None  # of the probabilities returned, known after the first batch
        self.seconds = 0.0

    def _stride(self, tile: Sequence[int], output: Sequence[int]) -> int:
        """The output stride when the tiles' sizes and starts are multiples of it, else 1 (upsampled)."""
        ratios = {t // o if t % o == 0 else 0 for t, o in zip(tile, output)}
        stride = ratios.pop() if len(ratios) == 1 else 0
        if not self.at_stride or stride <= 1 or any(start % stride for start in self.starts):
            return 1
        return stride

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        start = time.perf_counter()
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, enabled=self.amp):
            logits = self.network(batch)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 4 or logits.shape[1] != self.num_classes:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"network must return (B, {self.num_classes}, H, W) class scores, got {shape}")
        if self.stride is None:
            self.stride = self._stride(batch.shape[-2:], logits.shape[-2:])
        if self.stride == 1 and logits.shape[-2:] != batch.shape[-2:]:  # a stride-8 head's scores are smooth
            size = batch.shape[-2:]
            logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        if logits.device.type == "cpu":
            probabilities = _softmax(logits.float().numpy())
        else:  # .cpu() waits for the device
            probabilities = torch.softmax(logits.float(), dim=1).contiguous().cpu().numpy()
        self.seconds += time.perf_counter() - start
        return probabilities


def _softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 of ``(B, C, h, w)`` scores, into a new C-ordered array. NumPy's, on the calling
    thread, rather than torch's: on a loaded CPU, torch's intra-op threads made a softmax of 8 tiles at
    stride 8 take 16 ms instead of 0.4 ms, each parallel region waiting for a descheduled thread."""
    probabilities = np.subtract(scores, scores.max(axis=1, keepdims=True), order="C", dtype=np.float32)
    np.exp(probabilities, out=probabilities)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return probabilities


def _zarr_codecs() -> dict[str, Any]:
    """Blosc-LZ4 with byte shuffle for the probabilities: zarr 2's default compressor, spelled out for
    zarr 3, whose default (zstd) was both slower and larger on class probabilities when measured
    (38 vs 33 ms per 512 px tile, 618 vs 546 MB for a 4000 px slide)."""
    if int(zarr.__version__.split(".")[0]) < 3:
        return {}
    codec = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    return {"codecs": [zarr.codecs.BytesCodec(), codec]}


def _strips(
    blocks: Iterable[np.ndarray], rows: int, width: int, dtype: np.dtype | type = np.uint8
) -> Iterator[np.ndarray]:
    """Regroup ``dtype`` row blocks of one image, top to bottom, into strips of ``rows`` rows (the last one
    shorter), copied into one buffer: a strip is valid until the next one is asked for."""
    strip = np.empty((rows, width), dtype)
    filled = 0
    for block in blocks:
        start = 0
        while start < len(block):
            count = min(rows - filled, len(block) - start)
            strip[filled : filled + count] = block[start : start + count]
            filled, start = filled + count, start + count
            if filled == rows:
                yield strip
                filled = 0
    if filled:
        yield strip[:filled]


def _strip_tiles(strip: np.ndarray, tile_size: int) -> Iterator[np.ndarray]:
    """The strip's tiles, left to right, as copies (the strip's buffer is reused)."""
    for x in range(0, strip.shape[1], tile_size):
        yield strip[:, x : x + tile_size].copy()


class _ReducedLevel:
    """One level of a label map halved by ``pool`` (:func:`mode_pool2` for class maps), filled a strip of
    TIFF tiles at a time while the finer level is written, kept zlib-compressed in a scratch file until the
    TIFF writer reads it back; it pools each finished strip into the next coarser level in turn."""

    def __init__(
        self,
        path: Path,
        shape: tuple[int, int],
        tile_size: int,
        coarser: _ReducedLevel | None,
        pool: Callable[[np.ndarray], np.ndarray],
        dtype: np.dtype,
    ) -> None:
        self.path, self.shape, self.tile_size, self.coarser = path, shape, tile_size, coarser
        self.pool, self.dtype = pool, dtype
        self._strips: list[tuple[int, int]] = []  # (rows, compressed bytes) of each strip in the file
        self._pending: list[np.ndarray] = []
        self._rows = 0  # rows received

    def add(self, finer: np.ndarray) -> None:
        """Pool the next strip of the finer level (an even number of rows, but for the last) into this one."""
        rows = self.pool(finer)
        self._pending.append(rows)
        self._rows += len(rows)
        if sum(len(block) for block in self._pending) >= self.tile_size or self._rows == self.shape[0]:
            strip = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending = []
            with open(self.path, "ab") as f:
                self._strips.append((len(strip), f.write(zlib.compress(strip, 1))))
            if self.coarser is not None:
                self.coarser.add(strip)

    def tiles(self, tile_size: int) -> Iterator[np.ndarray]:
        """The level's tiles in raster order (for :func:`~common.data.wsi.write_pyramid_tiff`)."""
        assert self._rows == self.shape[0], "the finer level was not written to its end"
        with open(self.path, "rb") as f:
            for rows, size in self._strips:
                strip = np.frombuffer(zlib.decompress(f.read(size)), self.dtype).reshape(rows, self.shape[1])
                yield from _strip_tiles(strip, tile_size)


class _StreamedClassMap:
    """Level 0 of a label map (classes, or instances) as :func:`~common.data.wsi.write_pyramid_tiff` reads
    it: its tiles come from the final rows that ``blocks`` yields as inference goes on, so the map is
    written while the slide is processed and never held whole (a strip of tiles at a time); each strip is
    also pooled into :attr:`reduced`, the coarser levels down to one tile, which the writer reads
    afterwards."""

    def __init__(
        self,
        shape: tuple[int, int],
        blocks: Iterable[np.ndarray],
        tile_size: int,
        scratch: Path,
        pool: Callable[[np.ndarray], np.ndarray] = mode_pool2,
        dtype: np.dtype | type = np.uint8,
    ) -> None:
        self.shape, self.blocks, self.tile_size, self.dtype = shape, blocks, tile_size, np.dtype(dtype)
        shapes = [shape]
        while max(shapes[-1]) > tile_size:
            shapes.append((-(-shapes[-1][0] // 2), -(-shapes[-1][1] // 2)))
        coarser = None
        self.reduced: list[_ReducedLevel] = []
        for index in range(len(shapes) - 1, 0, -1):
            path = scratch / f"level_{index}.bin"
            coarser = _ReducedLevel(path, shapes[index], tile_size, coarser, pool, self.dtype)
            self.reduced.insert(0, coarser)

    def tiles(self, tile_size: int) -> Iterator[np.ndarray]:
        assert tile_size == self.tile_size
        blocks, written = iter(self.blocks), 0
        for strip in _strips(blocks, tile_size, self.shape[1], self.dtype):
            written += len(strip)
            # the writer stops at the last tile: the source must finish (and fill in its results) first
            if written == self.shape[0] and next(blocks, None) is not None:
                raise RuntimeError("the merger handed on more label-map rows than the slide level has")
            if self.reduced:
                self.reduced[0].add(strip)
            yield from _strip_tiles(strip, tile_size)


def write_streamed_pyramid(
    path: str | os.PathLike,
    shape: tuple[int, int],
    blocks: Iterable[np.ndarray],
    mpp: tuple[float, float] | None,
    tile_size: int,
    scratch: Path,
    pool: Callable[[np.ndarray], np.ndarray] = mode_pool2,
    dtype: np.dtype | type = np.uint8,
) -> Path:
    """Write a ``shape`` label map whose rows ``blocks`` yields top to bottom (as a merger finalises them)
    as a tiled pyramidal TIFF (:func:`~common.data.wsi.write_pyramid_tiff`), atomically, holding a strip of
    tiles at a time: levels halved by ``pool`` down to one tile, kept zlib-compressed in ``scratch`` until
    the writer reaches them. The blocks are pulled while the TIFF is written, so inference runs inside.
    ``pool`` must return a new array: the strips it is given are a reused buffer."""
    level0 = _StreamedClassMap(shape, blocks, tile_size, scratch, pool, dtype)
    return write_pyramid_tiff(path, [level0, *level0.reduced], mpp, tile_size)


def _overlay(
    thumbnail: np.ndarray, class_map: Path, palette: np.ndarray, background_index: int, alpha: float
) -> np.ndarray:
    """Thumbnail with each non-background class blended in its colour; the classes come from the coarsest
    level of the ``class_map`` TIFF at least as large as the thumbnail (else level 0), resized by nearest
    neighbour."""
    height, width = thumbnail.shape[:2]
    with tifffile.TiffFile(class_map) as tif:
        levels = tif.series[0].levels
        large_enough = (lvl for lvl in reversed(levels) if lvl.shape[0] >= height and lvl.shape[1] >= width)
        source = next(large_enough, levels[0]).asarray()
    classes = np.asarray(Image.fromarray(source).resize((width, height), Image.Resampling.NEAREST))
    overlay = thumbnail.copy()
    # float64 blending a few rows at a time, not 300 MB
    for rows, _ in block_slices((height, 1), _OVERLAY_ROWS):
        tissue = classes[rows] != background_index
        tinted = np.round(thumbnail[rows][tissue] * (1.0 - alpha) + palette[classes[rows][tissue]] * alpha)
        overlay[rows][tissue] = tinted.astype(np.uint8)
    return overlay


class WholeSlideSegmenter:
    """Segments whole slides with one network and one set of settings; call it with a slide path.

    Built once from a bundle config, it runs over a list of slides with
    ``"$[@segmenter(s) for s in @slides]"``; each call returns the summary described in
    :meth:`__call__`.

    Args:
        network: maps a ``(B, 3, h, w)`` float batch to ``(B, num_classes, h', w')`` class scores
            (logits; softmaxed here before blending; a coarser ``h', w'`` is upsampled bilinearly, after
            blending with ``blend="output_stride"``). It must already be on ``device``; an ``nn.Module`` is
            put in eval mode.
        output_dir: folder for the outputs (created if missing). The scratch files (the class map's
            coarser levels before they go into the TIFF, and the probabilities' zarr array when kept) live
            in a hidden temporary folder inside it (a RAM-backed ``/tmp`` would defeat the purpose); it is
            removed at the end.
        num_classes: output channels, background included.
        patch_size: tile side (or ``(height, width)``) in pixels of the processed level.
        overlap: between neighbouring tiles, a fraction of the tile in [0, 1) or whole pixels; overlapping
            probabilities are averaged.
        level: pyramid level to process; or give ``mpp`` to choose it by resolution (see
            :func:`common.data.wsi.select_level`); neither means level 0.
        mpp: microns per pixel the network expects.
        batch_size: tiles per forward pass.
        min_tissue_fraction: tiles with less tissue are skipped, never decoded, and labelled background;
            measured once per slide on the coarsest level where a tile is still 8 pixels long (on the tiles
            themselves, as :class:`TissueFilter` does, when the slide has no such level).
        device: where tiles go for the forward pass; default: the device of the network's parameters.
        class_names: one unique name per class; default ``"class 0"``, ... and ``"background"``.
        background_index: the background class; default ``num_classes - 1`` (the collection's convention:
            tissue classes ``0..C-1``, background ``C``).
        amp: autocast the forward pass (float16 on CUDA, bfloat16 on CPU).
        preprocess: applied to each ``(B, 3, h, w)`` float batch with values 0..255 on ``device``, e.g.
            ImageNet normalisation; default: none. On the CPU it is applied tile by tile (``B = 1``), so
            that no batch-sized tensor is made per batch; it must not mix tiles.
        backend: slide reader, see :func:`common.data.wsi.open_slide`.
        keep_probabilities: keep the averaged probabilities as ``<stem>_probabilities.zarr`` (when at
            least one tile was processed).
        tile_size: tile side of the output TIFF (a multiple of 16).
        thumbnail_size: longest side of the overlay PNG.
        palette: ``num_classes`` RGB colours for the overlay; default
            :func:`common.data.histopathology.mask_palette` colours.
        overlay_alpha: opacity of the class colours in the overlay.
        mask_glass: label as background every pixel that
            :func:`~common.transforms.tissue.tissue_mask` calls glass, read from the slide at the
            processed level. A network trained on pseudo-masks learned that glass convention at its output
            stride only; this restores the pixel-level tissue outline (from the tiles already read).
        workers: threads decoding tiles ahead of the network; 0 decodes in the calling thread.
        channels_last: feed the network channels-last batches (faster convolutions on CUDA with AMP).
        blend: ``"output_stride"`` averages the softmaxed scores of overlapping tiles at the network's output
            resolution and upsamples only final rows (bilinear) before the arg-max: for DeepLab-v2 (stride
            8) 1/64 of the softmax and band memory, and class maps that agree with ``"full"`` (every
            tile's scores upsampled, softmaxed and averaged at full resolution) on at least 99.5% of the
            pixels, differing only along class boundaries. It falls back to ``"full"`` when the tiles'
            sizes or starts are not multiples of the output stride.
    """

    def __init__(
        self,
        network: Callable[[torch.Tensor], torch.Tensor],
        output_dir: str | os.PathLike,
        num_classes: int,
        patch_size: int | Sequence[int] = 512,
        overlap: float = 0.25,
        level: int | None = None,
        mpp: float | None = None,
        batch_size: int = 8,
        min_tissue_fraction: float = 0.05,
        device: str | torch.device | None = None,
        class_names: Sequence[str] | None = None,
        background_index: int | None = None,
        amp: bool = False,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        backend: str = "tifffile",
        keep_probabilities: bool = False,
        tile_size: int = 512,
        thumbnail_size: int = 2048,
        palette: Sequence[Sequence[int]] | None = None,
        overlay_alpha: float = 0.4,
        mask_glass: bool = False,
        workers: int = 2,
        channels_last: bool = False,
        blend: str = "output_stride",
    ) -> None:
        if not callable(network):
            raise TypeError(f"network must be callable, got {type(network).__name__}")
        self.num_classes = check_int("num_classes (background included)", num_classes, 2, 255)
        self.background_index = check_int(
            "background_index",
            self.num_classes - 1 if background_index is None else background_index,
            0,
            self.num_classes - 1,
        )
        if class_names is None:
            class_names = [f"class {i}" for i in range(self.num_classes)]
            class_names[self.background_index] = "background"
        self.class_names = [str(name) for name in class_names]
        if len(self.class_names) != self.num_classes or len(set(self.class_names)) != self.num_classes:
            raise ValueError(f"class_names must be {self.num_classes} unique names, got {list(class_names)}")
        check_slide_settings(level, mpp, backend)
        self.level, self.mpp = level, mpp
        self.device = network_device(network, device)
        # TiledTiffLevel as this module sees it, so that a test can watch the decoding here
        self.tiles = SlideTileStream(
            patch_size,
            overlap,
            batch_size,
            min_tissue_fraction,
            self.device,
            preprocess,
            workers,
            channels_last,
            tissue_flags=mask_glass,
            tiled_level=TiledTiffLevel,
        )
        self.amp = bool(amp)
        self.backend = backend
        self.keep_probabilities = bool(keep_probabilities)
        if not is_int(tile_size) or tile_size < 16 or tile_size % 16:
            raise ValueError(f"tile_size must be a positive multiple of 16 (a TIFF rule), got {tile_size!r}")
        self.tile_size = int(tile_size)
        self.thumbnail_size = check_int("thumbnail_size", thumbnail_size, 1)
        if palette is None:
            palette = mask_palette(self.num_classes)[: self.num_classes]
        colours = np.asarray(palette)
        if colours.shape != (self.num_classes, 3) or colours.min() < 0 or colours.max() > 255:
            raise ValueError(f"palette must be {self.num_classes} RGB colours in 0..255, got {colours.shape}")
        self.palette = colours.astype(np.float64)
        if not 0.0 <= overlay_alpha <= 1.0:
            raise ValueError(f"overlay_alpha must be in [0, 1], got {overlay_alpha!r}")
        self.overlay_alpha = overlay_alpha
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
        self.blend = blend
        self.network = network
        self.output_dir = Path(output_dir)

    def _infer(
        self, slide: Slide, level: int, make_merger: Callable[..., BandMerger]
    ) -> Generator[np.ndarray, None, tuple[BandMerger, dict[str, int], float]]:
        """Run the kept tiles through the network into the merger ``make_merger(rows, columns, stride,
        write_rows)`` makes once the network's output stride is known, yielding the class-map row blocks
        it finalises, top to bottom, after each batch; returns the merger, tiles processed/skipped and the
        network's seconds."""
        rows, cols = self.tiles.grid(slide.info.level_dimensions[level])
        at_stride = self.blend == "output_stride"
        network = _ProbabilityNetwork(
            self.network,
            self.num_classes,
            self.device,
            self.amp,
            self.tiles.channels_last,
            at_stride,
            rows + cols,
        )
        if isinstance(self.network, torch.nn.Module):
            self.network.eval()
        mergers: list[BandMerger] = []
        finished: list[np.ndarray] = []

        def write_rows(top: int, labels: np.ndarray) -> None:
            finished.append(labels)

        batches = self.tiles.batches(slide, level)
        try:
            for batch in batches:
                with torch.inference_mode():
                    probabilities = network(batch.images)
                if not mergers:
                    mergers.append(make_merger(rows, cols, network.stride, write_rows))
                for index, tile, flags in zip(batch.indices, probabilities, batch.tissue):
                    mergers[0].add(*index, tile, flags)
                yield from finished
                finished.clear()
        finally:
            batches.close()  # stops the reader's threads when the consumer gives up early
        merger = mergers[0] if mergers else make_merger(rows, cols, 1, write_rows)
        merger.finish()
        yield from finished
        return merger, {"processed": self.tiles.processed, "skipped": self.tiles.skipped}, network.seconds

    def _areas(
        self, slide: Slide, slide_path: Path, level: int, merger: BandMerger, tiles: dict[str, int]
    ) -> dict[str, Any]:
        counts = merger.class_pixels
        mpp = slide.info.level_mpp(level)
        mm2_per_pixel = None if mpp is None else mpp[0] * mpp[1] * 1e-6
        total = int(counts.sum())
        tissue_pixels = total - int(counts[self.background_index])
        return {
            "slide": str(slide_path),
            "level": level,
            "shape": list(slide.info.level_dimensions[level]),
            "mpp": None if mpp is None else [round(v, 6) for v in mpp],
            "patch_size": list(self.tiles.patch_size),
            "overlap": self.tiles.overlap,
            "min_tissue_fraction": self.tiles.min_tissue_fraction,
            "blend": {"mode": self.blend, "stride": merger.stride},
            "tiles": tiles,
            "tissue_fraction": tissue_pixels / total,
            "tissue_area_mm2": None if mm2_per_pixel is None else tissue_pixels * mm2_per_pixel,
            "classes": {
                name: {
                    "index": index,
                    "pixels": int(count),
                    "fraction": int(count) / total,
                    "area_mm2": None if mm2_per_pixel is None else int(count) * mm2_per_pixel,
                }
                for index, (name, count) in enumerate(zip(self.class_names, counts))
            },
        }

    def outputs(self, slide_path: str | os.PathLike) -> dict[str, Path]:
        """The files :meth:`__call__` writes for ``slide_path``, the areas JSON last."""
        stem = Path(slide_path).stem
        names = {"classes": "classes.tif", "overlay": "overlay.png", "areas": "areas.json"}
        return {kind: self.output_dir / f"{stem}_{name}" for kind, name in names.items()}

    def is_done(self, slide_path: str | os.PathLike) -> bool:
        """Whether the slide's outputs are complete: every file is written atomically and the areas JSON
        last, so its presence is enough (used to resume an interrupted batch)."""
        return self.outputs(slide_path)["areas"].is_file()

    def __call__(self, slide_path: str | os.PathLike) -> dict[str, Any]:
        """Segment one slide and write its outputs.

        Returns:
            the content of ``<stem>_areas.json`` (slide, level, shape and mpp of the processed level,
            where tiles were blended (``blend``: mode and the stride used), tiles processed/skipped,
            tissue fraction and area, and per class its index, pixels, fraction
            and area in mm^2, ``None`` when the slide has no resolution) plus ``"outputs"`` (the written
            paths) and ``"seconds"`` (``"total"`` and ``"network"``: the forward passes alone).

        Raises:
            InputDataError: the slide is missing or unreadable (naming the tile that failed to decode),
                or the level/mpp does not fit it.
        """
        start = time.perf_counter()
        slide_path = Path(slide_path)
        stem = slide_path.stem
        with open_slide(slide_path, self.backend) as slide:
            level = select_level(slide.info, level=self.level, mpp=self.mpp)
            shape = slide.info.level_dimensions[level]
            self.output_dir.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{stem}.", suffix=".scratch", dir=self.output_dir))
            try:
                probabilities = None
                if self.keep_probabilities:
                    probabilities = zarr.open_array(
                        str(scratch / "probabilities.zarr"),
                        mode="w",
                        shape=(1, self.num_classes, *shape),
                        chunks=(1, self.num_classes, _CHUNK, _CHUNK),
                        dtype="float32",
                        fill_value=np.nan,
                        **_zarr_codecs(),
                    )

                def make_merger(
                    rows: list[int], cols: list[int], stride: int, write_rows: Callable
                ) -> BandMerger:
                    return BandMerger(
                        shape,
                        self.tiles.patch_size,
                        rows,
                        cols,
                        self.num_classes,
                        self.background_index,
                        write_rows,
                        probabilities,
                        stride,
                    )

                run: dict[str, Any] = {}

                def class_rows() -> Iterator[np.ndarray]:
                    run["merger"], run["tiles"], run["network_seconds"] = yield from self._infer(
                        slide, level, make_merger
                    )

                # the class map is written while the slide is processed: the TIFF writer pulls its tiles
                outputs = self.outputs(slide_path)
                mpp = slide.info.level_mpp(level)
                write_streamed_pyramid(outputs["classes"], shape, class_rows(), mpp, self.tile_size, scratch)
                tiles, network_seconds = run["tiles"], run["network_seconds"]
                summary = self._areas(slide, slide_path, level, run["merger"], tiles)
                thumbnail = slide_thumbnail(slide, self.thumbnail_size)
                overlay = Image.fromarray(
                    _overlay(
                        thumbnail, outputs["classes"], self.palette, self.background_index, self.overlay_alpha
                    )
                )
                atomic_write(outputs["overlay"], lambda f: overlay.save(f, format="PNG", compress_level=1))
                if probabilities is not None and tiles["processed"]:
                    outputs["probabilities"] = self.output_dir / f"{stem}_probabilities.zarr"
                    with atomic_directory(outputs["probabilities"]) as staging:
                        for entry in (scratch / "probabilities.zarr").iterdir():
                            os.rename(entry, staging / entry.name)
                text = json.dumps(summary, indent=2) + "\n"
                atomic_write(outputs["areas"], lambda f: f.write(text.encode("utf-8")))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        summary["outputs"] = {name: str(path) for name, path in outputs.items()}
        summary["seconds"] = {"total": time.perf_counter() - start, "network": network_seconds}
        logger.info(
            "%s: level %d (%d x %d), %d tiles processed, %d skipped, tissue %.1f%%, %.1f s (network %.1f s)"
            " -> %s",
            slide_path,
            level,
            *shape,
            tiles["processed"],
            tiles["skipped"],
            100 * summary["tissue_fraction"],
            summary["seconds"]["total"],
            network_seconds,
            outputs["areas"],
        )
        return summary


def segment_slide(
    slide_path: str | os.PathLike,
    network: Callable[[torch.Tensor], torch.Tensor],
    output_dir: str | os.PathLike,
    num_classes: int,
    **settings: Any,
) -> dict[str, Any]:
    """Segment one slide: ``WholeSlideSegmenter(network, output_dir, num_classes, **settings)(slide_path)``.

    See :class:`WholeSlideSegmenter` for the settings (patch_size, overlap, level, mpp, batch_size,
    min_tissue_fraction, device, class_names, background_index, amp, preprocess, ...) and the summary.
    """
    return WholeSlideSegmenter(network, output_dir, num_classes, **settings)(slide_path)
