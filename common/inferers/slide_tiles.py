"""The kept tiles of one slide level, decoded ahead of the network, as device batches: the streaming core
that every whole-slide inferer of the collection shares (class maps, cell instances, detections).

Per slide: tissue is found once on a low-resolution level (:func:`common.transforms.tissue.tissue_mask`),
so tiles of bare glass are never decoded at full resolution; the kept tiles are decoded ahead of the
network by a :class:`~common.data.tile_reader.PrefetchingTileReader` (on tiled TIFF each TIFF tile once,
see :class:`~common.data.tile_reader.TiledTiffLevel`), whose errors name the slide and the tile; they
come in raster order, as MONAI's ``WSISlidingWindowSplitter`` places them, batched on the device and
preprocessed. What the network's outputs become (blended class maps, instances, detections) is the
caller's business.

The argument checks shared by the whole-slide inferers (:func:`check_int`, :func:`check_patch_size`,
:func:`check_overlap`) live here too, so that every inferer rejects a bad setting with the same words.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from common.data.tile_reader import PrefetchingTileReader, TiledTiffLevel
from common.data.wsi import BACKENDS, Slide, read_region
from common.inferers.band_merger import tile_positions
from common.transforms.tissue import tissue_fraction, tissue_mask

__all__ = [
    "SlideTileStream",
    "TileBatch",
    "block_slices",
    "check_fraction",
    "check_int",
    "check_overlap",
    "check_patch_size",
    "check_slide_settings",
    "is_int",
    "network_device",
    "slide_thumbnail",
]

_READ_BLOCK = 2048  # side of the blocks read for the thumbnail and the tissue map (12 MB of RGB)
_TISSUE_PIXELS = 8  # the tissue map's level is the coarsest where a tile is still this many pixels long


def is_int(value: Any) -> bool:
    """An integer, NumPy's included, but not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int, or a ``ValueError`` saying which range ``name`` must lie in."""
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        allowed = f"in {minimum}..{maximum}" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
    return int(value)


def check_patch_size(patch_size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` of a tile given as one side or a pair."""
    sizes = (patch_size, patch_size) if is_int(patch_size) else tuple(patch_size)
    if len(sizes) != 2 or not all(is_int(s) and s > 0 for s in sizes):
        raise ValueError(f"patch_size must be a positive integer or (height, width) pair, got {patch_size!r}")
    return int(sizes[0]), int(sizes[1])


def check_overlap(overlap: float, patch_size: tuple[int, int]) -> float | int:
    """A fraction of the tile in [0, 1) (float) or whole pixels (int) less than the tile's side."""
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float, np.integer, np.floating)):
        raise TypeError(f"overlap must be a fraction in [0, 1) or a whole number of pixels, got {overlap!r}")
    if isinstance(overlap, (float, np.floating)):
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"a fractional overlap must be in [0, 1), got {overlap}")
        return float(overlap)
    if not 0 <= overlap < min(patch_size):
        raise ValueError(f"an overlap in pixels must be in [0, {min(patch_size)}), got {overlap}")
    return int(overlap)


def check_fraction(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1], or a ``ValueError`` naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not 0 <= value <= 1
    ):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def check_slide_settings(level: int | None, mpp: float | None, backend: str) -> None:
    """Refuse a level given together with an mpp, and an unknown slide reader ``backend``."""
    if level is not None and mpp is not None:
        raise ValueError(f"give either level or mpp, not both (level={level}, mpp={mpp})")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def network_device(network: Callable, device: str | torch.device | None = None) -> torch.device:
    """``device``, or by default the device of the network's parameters (the CPU for a plain callable)."""
    if device is None:
        parameter = next(network.parameters(), None) if isinstance(network, torch.nn.Module) else None
        device = parameter.device if parameter is not None else "cpu"
    return torch.device(device)


def block_slices(shape: Sequence[int], block: int) -> Iterator[tuple[slice, slice]]:
    """Row-major ``(rows, columns)`` slices of ``block`` x ``block`` tiles covering ``shape``."""
    for y in range(0, shape[0], block):
        for x in range(0, shape[1], block):
            yield slice(y, min(y + block, shape[0])), slice(x, min(x + block, shape[1]))


def slide_thumbnail(slide: Slide, max_side: int) -> np.ndarray:
    """``(h, w, 3)`` uint8 view of the slide at most ``max_side`` pixels long, from the coarsest level
    that is at least that long, read and shrunk block by block."""
    dimensions = slide.info.level_dimensions
    level = max((lvl for lvl, dims in enumerate(dimensions) if max(dims) >= max_side), default=0)
    height, width = dimensions[level]
    scale = min(1.0, max_side / max(height, width))
    out_height, out_width = max(1, round(height * scale)), max(1, round(width * scale))
    thumbnail = np.empty((out_height, out_width, 3), dtype=np.uint8)
    downsample = slide.info.downsamples[level]
    for rows, cols in block_slices((height, width), _READ_BLOCK):
        y0, y1 = round(rows.start * scale), round(rows.stop * scale)
        x0, x1 = round(cols.start * scale), round(cols.stop * scale)
        if y1 == y0 or x1 == x0:
            continue
        location = (round(rows.start * downsample), round(cols.start * downsample))
        size = (rows.stop - rows.start, cols.stop - cols.start)
        block = Image.fromarray(np.moveaxis(read_region(slide, location, size, level), 0, -1))
        if block.size != (x1 - x0, y1 - y0):
            block = block.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
        thumbnail[y0:y1, x0:x1] = np.asarray(block)
    return thumbnail


def _level_tissue(slide: Slide, level: int) -> np.ndarray:
    """``(h, w)`` bool tissue mask of a whole pyramid level, read block by block."""
    height, width = slide.info.level_dimensions[level]
    downsample = slide.info.downsamples[level]
    mask = np.empty((height, width), dtype=bool)
    for rows, cols in block_slices((height, width), _READ_BLOCK):
        location = (round(rows.start * downsample), round(cols.start * downsample))
        size = (rows.stop - rows.start, cols.stop - cols.start)
        mask[rows, cols] = tissue_mask(read_region(slide, location, size, level))
    return mask


def _tile_tissue(
    mask: np.ndarray,
    scale: tuple[float, float],
    rows: Sequence[int],
    cols: Sequence[int],
    patch: Sequence[int],
) -> np.ndarray:
    """``(len(rows), len(cols))`` share of tissue in each tile, from a tissue ``mask`` ``scale`` times the
    size of the tiles' level; the part of a tile past the slide's edge counts as glass."""
    # summed in place (no temporary of the mask's size), in int32 unless the counts could overflow it
    dtype = np.int32 if mask.size < 2**31 else np.int64
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=dtype)
    np.cumsum(mask, axis=0, dtype=dtype, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])
    (y_scale, x_scale), (height, width) = scale, patch
    y0 = np.round(np.asarray(rows) * y_scale).astype(np.int64)
    y1 = np.maximum(np.round((np.asarray(rows) + height) * y_scale).astype(np.int64), y0 + 1)
    x0 = np.round(np.asarray(cols) * x_scale).astype(np.int64)
    x1 = np.maximum(np.round((np.asarray(cols) + width) * x_scale).astype(np.int64), x0 + 1)
    cy0, cy1 = np.clip(y0, 0, mask.shape[0])[:, None], np.clip(y1, 0, mask.shape[0])[:, None]
    cx0, cx1 = np.clip(x0, 0, mask.shape[1])[None], np.clip(x1, 0, mask.shape[1])[None]
    tissue = integral[cy1, cx1] - integral[cy0, cx1] - integral[cy1, cx0] + integral[cy0, cx0]
    return tissue / ((y1 - y0)[:, None] * (x1 - x0)[None])


@dataclass
class TileBatch:
    """One batch of kept tiles, in raster order.

    Attributes:
        indices: ``(i, j)`` grid index of each tile (row ``i`` of :meth:`SlideTileStream.grid`'s y starts).
        origins: ``(top, left)`` of each tile in pixels of the level; a tile may reach past the slide's
            edge, which reads as white glass.
        images: ``(B, 3, h, w)`` float tensor on the device, values 0..255 then ``preprocess``ed (a
            channels-last view with ``channels_last``). On the CPU it is a view of a buffer that the next
            batch reuses: use (or copy) it before asking for the next batch.
        tissue: per tile, its ``(h, w)`` bool tissue flags with ``tissue_flags``, else ``None``.
    """

    indices: list[tuple[int, int]]
    origins: list[tuple[int, int]]
    images: torch.Tensor
    tissue: list[np.ndarray | None]


class SlideTileStream:
    """Kept tiles of one slide level, decoded ahead of the network, in raster order, as device batches.

    Tiles lie on the grid MONAI's ``WSISlidingWindowSplitter`` uses (:meth:`grid`). A tile is kept when at
    least ``min_tissue_fraction`` of it is tissue, measured once per slide on the coarsest level where a
    tile is still 8 pixels long (or, when the slide has no such level, on the tile itself once read); the
    tiles of glass are never decoded. After an iteration of :meth:`batches`, :attr:`processed` and
    :attr:`skipped` count the tiles kept and left out.

    Args:
        patch_size: tile side (or ``(height, width)``) in pixels of the level read.
        overlap: between neighbouring tiles, a fraction of the tile in [0, 1) or whole pixels.
        batch_size: tiles per batch (the last one may be smaller).
        min_tissue_fraction: tiles with less tissue are skipped; 0 keeps every tile (e.g. dark-field
            fluorescence, where :func:`~common.transforms.tissue.tissue_mask` calls the background black).
        device: where batches go; on CUDA through pinned memory with non-blocking copies.
        preprocess: applied to each ``(B, 3, h, w)`` float batch with values 0..255 on ``device``, e.g.
            ImageNet normalisation. On the CPU it is applied tile by tile (``B = 1``) into a buffer reused
            from batch to batch, so that no batch-sized array is made per batch (those fragmented the heap
            so that the peak memory grew with the slide); it must not mix tiles.
        workers: threads decoding tiles ahead of the consumer; 0 decodes in the calling thread.
        channels_last: tiles are decoded as ``(h, w, 3)`` and batched channels-last (faster convolutions
            on CUDA with AMP); the batch's shape is still ``(B, 3, h, w)``.
        tissue_flags: also hand on each tile's pixel-level tissue flags (:class:`TileBatch`'s ``tissue``).
        tiled_level: makes the reader of a tiled TIFF level, ``(tif, level, plan)`` ->
            :class:`~common.data.tile_reader.TiledTiffLevel`; replaceable to watch the decoding.
    """

    def __init__(
        self,
        patch_size: int | Sequence[int] = 512,
        overlap: float = 0.25,
        batch_size: int = 8,
        min_tissue_fraction: float = 0.05,
        device: str | torch.device = "cpu",
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        workers: int = 2,
        channels_last: bool = False,
        tissue_flags: bool = False,
        tiled_level: Callable[..., TiledTiffLevel] = TiledTiffLevel,
    ) -> None:
        self.patch_size = check_patch_size(patch_size)
        self.overlap = check_overlap(overlap, self.patch_size)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.min_tissue_fraction = check_fraction("min_tissue_fraction", min_tissue_fraction)
        self.device = torch.device(device)
        if preprocess is not None and not callable(preprocess):
            raise TypeError(f"preprocess must be callable, got {type(preprocess).__name__}")
        self.preprocess = preprocess
        self.workers = check_int("workers", workers, 0)
        self.channels_last = bool(channels_last)
        self.tissue_flags = bool(tissue_flags)
        self.tiled_level = tiled_level
        self.processed = 0
        self.skipped = 0

    def grid(self, shape: Sequence[int]) -> tuple[list[int], list[int]]:
        """Tile starts along y and x of a level ``shape`` pixels large, as MONAI's
        ``WSISlidingWindowSplitter`` places them (the last tile reaching at or past the edge)."""
        overlap = self.overlap
        steps = [p - overlap if is_int(overlap) else round(p * (1 - overlap)) for p in self.patch_size]
        if min(steps) < 1:
            raise ValueError(f"overlap {overlap} leaves no step between tiles of {self.patch_size}")
        rows, cols = (tile_positions(int(n), p, s) for n, p, s in zip(shape, self.patch_size, steps))
        return rows, cols

    def batches(self, slide: Slide, level: int) -> Iterator[TileBatch]:
        """The kept tiles of ``level`` of ``slide`` in raster order, ``batch_size`` at a time.

        Raises (from the iteration):
            InputDataError: a tile could not be decoded; the message names the slide, level and location.
        """
        self.processed, self.skipped = 0, 0
        rows, cols = self.grid(slide.info.level_dimensions[level])
        share = self._tissue_share(slide, level, rows, cols) if self.min_tissue_fraction > 0 else None
        check_tiles = share is None and self.min_tissue_fraction > 0
        keep = np.ones((len(rows), len(cols)), bool) if share is None else share >= self.min_tissue_fraction
        indices = [(int(i), int(j)) for i, j in np.argwhere(keep)]
        origins = [(rows[i], cols[j]) for i, j in indices]
        read_patch = self._patch_reader(slide, level, [(*origin, *self.patch_size) for origin in origins])

        def read(location: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None] | None:
            """The tile and its tissue flags; ``None`` for glass not screened yet."""
            patch = read_patch(*location)
            if check_tiles and tissue_fraction(patch) < self.min_tissue_fraction:
                return None
            flags = tissue_mask(patch) if self.tissue_flags else None
            # the layout the batch needs, made here in the reader's thread rather than in the consumer's
            return (patch if self.channels_last else np.ascontiguousarray(patch.transpose(2, 0, 1))), flags

        buffer = None
        if self.device.type == "cpu":
            tile = (*self.patch_size, 3) if self.channels_last else (3, *self.patch_size)
            buffer = np.empty((self.batch_size, *tile), np.float32)
        reader = PrefetchingTileReader(
            read, origins, slide.info.path, level, self.workers, 2 * self.batch_size
        )
        pending: list[tuple[tuple[int, int], tuple[int, int], np.ndarray, np.ndarray | None]] = []
        tiles = iter(reader)
        try:
            for index, (origin, result) in zip(indices, tiles):
                if result is not None:
                    pending.append((index, origin, *result))
                    self.processed += 1
                if len(pending) == self.batch_size:
                    yield self._tile_batch(pending, buffer)
                    pending = []
        finally:
            tiles.close()  # stops the reader's threads when the consumer gives up early
        if pending:
            yield self._tile_batch(pending, buffer)
        self.skipped = len(rows) * len(cols) - self.processed

    def _tile_batch(self, pending: list, buffer: np.ndarray | None) -> TileBatch:
        indices, origins, patches, flags = (list(column) for column in zip(*pending))
        with torch.inference_mode():
            images = self._images(patches, buffer)
        return TileBatch(indices, origins, images, flags)

    def _tissue_share(self, slide: Slide, level: int, rows: list[int], cols: list[int]) -> np.ndarray | None:
        """Share of tissue in every tile, from the coarsest level on which a tile is still at least
        ``_TISSUE_PIXELS`` long; ``None`` when the slide has no such level below ``level`` (the tiles are
        then checked as they are read)."""
        dimensions, downsamples = slide.info.level_dimensions, slide.info.downsamples
        coarse = [
            lvl
            for lvl in range(level + 1, slide.info.level_count)
            if min(self.patch_size) * downsamples[level] / downsamples[lvl] >= _TISSUE_PIXELS
        ]
        if not coarse:
            return None
        low = max(coarse)
        scale = (dimensions[low][0] / dimensions[level][0], dimensions[low][1] / dimensions[level][1])
        return _tile_tissue(_level_tissue(slide, low), scale, rows, cols, self.patch_size)

    def _patch_reader(self, slide: Slide, level: int, plan: list[tuple[int, int, int, int]]) -> Callable:
        """``read(top, left)``: ``(h, w, 3)`` uint8 tile of ``level``, from its TIFF tiles directly when
        the level is tiled (each decoded once), else through the slide's MONAI reader."""
        if slide.info.backend == "tifffile":
            try:
                tiff_level = self.tiled_level(slide.wsi, level, plan)
            except ValueError:
                pass
            else:
                return lambda top, left: tiff_level.read(top, left, *self.patch_size)
        downsample = slide.info.downsamples[level]

        def read(top: int, left: int) -> np.ndarray:
            location = (round(top * downsample), round(left * downsample))
            return np.moveaxis(read_region(slide, location, self.patch_size, level), 0, -1)

        return read

    def _images(self, patches: list[np.ndarray], buffer: np.ndarray | None) -> torch.Tensor:
        """``(B, 3, h, w)`` float batch on the device, preprocessed, from uint8 ``(3, h, w)`` tiles (or
        ``(h, w, 3)`` ones with ``channels_last``): uint8 up to the device (through pinned memory on CUDA),
        converted and preprocessed there; on the CPU converted by NumPy (on the calling thread: torch's
        intra-op threads stall on a loaded CPU) and preprocessed tile by tile into ``buffer``."""
        if buffer is not None:
            batch = torch.from_numpy(buffer[: len(patches)])
            batch = batch.permute(0, 3, 1, 2) if self.channels_last else batch
            for index, patch in enumerate(patches):
                np.copyto(buffer[index], patch)
                if self.preprocess is not None:
                    tile = batch[index : index + 1]
                    tile.copy_(self.preprocess(tile))
            return batch
        pixels = torch.from_numpy(np.stack(patches))
        if self.device.type == "cuda":
            pixels = pixels.pin_memory()
        batch = pixels.to(self.device, non_blocking=True).float()
        batch = batch.permute(0, 3, 1, 2) if self.channels_last else batch
        return batch if self.preprocess is None else self.preprocess(batch)
