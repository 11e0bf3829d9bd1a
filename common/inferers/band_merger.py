"""Blend overlapping tiles of a whole slide in memory, finalising each part as soon as no later tile
touches it.

Tiles lie on a regular grid and arrive in raster order, so the part of the slide that a later tile can
still touch is a band of rows as wide as the slide. :class:`BandMerger` keeps only that band, cut along
every tile edge into *cells*: all pixels of a cell are covered by the same tiles, so a cell needs the
running sum of its tiles' probabilities and a single count. Once the last tile touching a cell (in
raster order) has been added or skipped, the cell is final: its arg-max class goes into the rows handed
to ``write_rows`` and its memory is freed. Nothing is written to disk unless probabilities are asked for.
With ``average_rows`` the final rows handed on are the averaged maps themselves rather than their arg-max,
for networks whose output is blended as a map (e.g. a cell distance map) and post-processed downstream.

With ``stride > 1`` the tiles' probabilities stay at the network's output stride (DeepLab-v2: 1/8 of the
tile's side): cells are blended there, 1/stride² of the memory and of the softmax, and each block of
final rows is upsampled bilinearly once by :class:`StrideUpsampler`, which computes full-resolution
scores only where the four nearest blended pixels disagree on the class (elsewhere any convex blend of
them, bilinear included, has the same arg-max), so the cost is that of the class boundaries.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["BandMerger", "StrideUpsampler", "argmax_first", "tile_positions"]


def tile_positions(size: int, patch: int, step: int) -> list[int]:
    """Tile starts along one axis, as MONAI's ``WSISlidingWindowSplitter`` places them: every ``step``
    pixels from 0, the last tile reaching at or past the end (the part past it is padding)."""
    if patch <= 0 or step <= 0:
        raise ValueError(f"patch and step must be positive, got {patch} and {step}")
    padded = size + (patch - size) % step
    return list(range(0, padded - patch + 1, step))


def argmax_first(scores: np.ndarray) -> np.ndarray:
    """``scores.argmax(axis=0)`` as uint8 (ties to the first class), a few times faster than NumPy's
    for few classes: one comparison per class over contiguous planes instead of a strided reduction."""
    best = scores[0].copy()
    labels = np.zeros(scores.shape[1:], dtype=np.uint8)
    for index in range(1, scores.shape[0]):
        better = scores[index] > best
        np.copyto(best, scores[index], where=better)
        labels[better] = index
    return labels


def _edges(size: int, starts: Sequence[int], patch: int) -> list[int]:
    return sorted({0, size, *(s for s in starts if s < size), *(min(s + patch, size) for s in starts)})


def _last_tile(edges: list[int], starts: Sequence[int], patch: int) -> list[int]:
    """For each cell between consecutive ``edges``, the index of the last tile start covering it."""
    last = []
    for top, bottom in itertools.pairwise(edges):
        index = bisect.bisect_right(starts, top) - 1
        if index < 0 or starts[index] + patch < bottom:
            raise ValueError(f"the tile grid leaves pixels {top}..{bottom - 1} uncovered")
        last.append(index)
    return last


_NONE = 255  # label of a blended pixel that no kept tile covers, before it becomes background
# full-resolution rows that StrideUpsampler computes at once: few enough that the scores of the quads
# whose corners disagree stay small, and fewer when the probabilities (C + 1 floats a pixel) are kept
_ROWS = 128
_ROWS_WITH_PROBABILITIES = 16


class StrideUpsampler:
    """Full-resolution class rows from blended probabilities at an output stride, bilinearly upsampled
    (as ``F.interpolate(scale_factor=stride, mode="bilinear", align_corners=False)`` would, edges
    clamped) and arg-maxed, one block of final rows at a time, holding one blended row of context.

    Full-resolution pixels fall into *quads* of ``stride x stride`` whose scores blend the same four
    blended pixels; where those four agree on the class the quad takes it (a convex blend keeps an
    arg-max that all its terms share), elsewhere its scores are computed and arg-maxed. Blended pixels
    no kept tile covers weigh nothing (their probabilities are zero), and full-resolution pixels whose
    own blended pixel is uncovered are ``background_index``.

    Args:
        shape: ``(H, W)`` at full resolution.
        stride: the output stride ``s``; blended rows are ``ceil(W / s)`` wide.
        background_index: class of uncovered pixels and of glass in ``tissue`` flags.
        write_rows: called with ``(top, labels)``, a uint8 ``(h, W)`` block, top to bottom, every row once.
        probabilities: as :class:`BandMerger`'s, filled with the upsampled probabilities; ``None``: none.
    """

    def __init__(
        self,
        shape: Sequence[int],
        stride: int,
        background_index: int,
        write_rows: Callable[[int, np.ndarray], None],
        probabilities: Any = None,
    ) -> None:
        self.shape, self.stride = (int(shape[0]), int(shape[1])), int(stride)
        self.low_rows = -(-self.shape[0] // self.stride)
        self.background_index, self.write_rows = background_index, write_rows
        self.probabilities = probabilities
        # a quad starts this many pixels before its lower-right blended pixel
        self.half = (self.stride + 1) // 2
        offsets = np.arange(self.stride)
        # the weight of the later blended pixel, at each offset in a quad
        self.weights = ((offsets - self.half + 0.5) / self.stride + 0.5).astype(np.float32)
        self._received = 0  # blended rows received
        self._context: tuple[np.ndarray, np.ndarray] | None = None  # the last blended row, padded
        self._tissue: np.ndarray | None = None  # flags of the full-resolution rows not written yet
        self._top = 0  # first full-resolution row not written

    def push(self, probabilities: np.ndarray, covered: np.ndarray, tissue: np.ndarray | None = None) -> None:
        """Add the next ``(C, h, ceil(W / s))`` blended rows (zero where ``covered`` is false) and, optionally,
        the tissue flags of their full-resolution rows; write every full-resolution row they complete."""
        padded = np.pad(probabilities, ((0, 0), (0, 0), (1, 1)), mode="edge")
        labels = np.where(np.pad(covered, ((0, 0), (1, 1)), mode="edge"), argmax_first(padded), _NONE)
        first_quad = self._received  # quad q blends blended rows q - 1 and q (clamped)
        above = (padded[:, :1], labels[:1]) if self._context is None else self._context
        self._received += probabilities.shape[1]
        below = (
            (padded[:, -1:], labels[-1:]) if self._received == self.low_rows else (padded[:, :0], labels[:0])
        )
        self._context = (padded[:, -1:], labels[-1:])
        rows = np.concatenate([above[0], padded, below[0]], axis=1)
        row_labels = np.concatenate([above[1], labels, below[1]])
        if tissue is not None:
            self._tissue = tissue if self._tissue is None else np.concatenate([self._tissue, tissue])
        quad_rows = len(row_labels) - 1
        step = max(1, (_ROWS_WITH_PROBABILITIES if self.probabilities is not None else _ROWS) // self.stride)
        # labels go out as they are made (a band's width is held, not a cell row's), probabilities once per
        # push: zarr would read back and rewrite partly written chunks
        kept, top = [], self._top
        for q in range(0, quad_rows, step):
            labels, probabilities = self._quad_rows(rows, row_labels, first_quad, q, min(q + step, quad_rows))
            if not len(labels):
                continue
            if self._tissue is not None:
                labels[~self._tissue[: len(labels)]] = self.background_index
                self._tissue = self._tissue[len(labels) :]
            if probabilities is not None:
                kept.append(probabilities)
            self.write_rows(self._top, labels)
            self._top += len(labels)
        if kept:
            self.probabilities[0, :, top : self._top] = (
                np.concatenate(kept, axis=1) if len(kept) > 1 else kept[0]
            )

    def _scores(self, rows: np.ndarray, q: Any, quads: Any) -> np.ndarray:
        """``(C, ..., s, s)`` bilinear scores of the quads in quad rows ``q`` and columns ``quads`` of
        ``rows`` (integers or index arrays that broadcast to the shape ``...``)."""
        w = self.weights
        upper = rows[:, q, quads, None] * (1 - w) + rows[:, q, quads + 1, None] * w
        lower = rows[:, q + 1, quads, None] * (1 - w) + rows[:, q + 1, quads + 1, None] * w
        return upper[..., None, :] * (1 - w)[:, None] + lower[..., None, :] * w[:, None]

    def _quad_rows(
        self, rows: np.ndarray, labels: np.ndarray, first_quad: int, q0: int, q1: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels (and probabilities, when kept) of the full-resolution rows of quad rows ``q0 .. q1 - 1``
        of ``rows`` (quad row ``q`` of the slide being ``first_quad + q``), all at once."""
        s, half, (height, width) = self.stride, self.half, self.shape
        n = q1 - q0
        top = s * (first_quad + q0) - half  # may be negative: the first quad row starts above the slide
        first = max(0, -top)
        stop = max(first, min(n * s, height - top))
        a, b = labels[q0:q1, :-1], labels[q0:q1, 1:]
        c, d = labels[q0 + 1 : q1 + 1, :-1], labels[q0 + 1 : q1 + 1, 1:]
        quads = a.shape[1]
        # a pixel is background when its own blended pixel (the nearest: the quad's corner in its quadrant)
        # is uncovered; in a uniform quad all four are alike, so only the mixed quads need looking at
        quadrant = 2 * (np.arange(s) >= half)[:, None] + (np.arange(s) >= half)[None]  # (s, s): a, b, c, d
        block = np.empty((n, s, quads, s), np.uint8)  # quad row, row in quad, quad, column in quad
        block[...] = np.where(a == _NONE, self.background_index, a)[:, None, :, None]
        mixed = np.nonzero((a != b) | (a != c) | (a != d))
        if len(mixed[0]):
            mixed_labels = argmax_first(self._scores(rows, q0 + mixed[0], mixed[1]))
            corners = np.stack([corner[mixed] == _NONE for corner in (a, b, c, d)], axis=1)  # (k, 4)
            mixed_labels[corners[:, quadrant]] = self.background_index
            block.transpose(0, 2, 1, 3)[mixed] = mixed_labels
        block = block.reshape(n * s, quads * s)[first:stop, half : half + width]
        if self.probabilities is None:
            return block, None
        covered = (labels != _NONE).astype(np.float32)[None]
        scores = self._scores(np.concatenate([rows, covered]), np.arange(q0, q1)[:, None], np.arange(quads))
        scores = scores.transpose(0, 1, 3, 2, 4).reshape(len(scores), n * s, quads * s)
        scores = scores[:, first:stop, half : half + width]
        with np.errstate(invalid="ignore", divide="ignore"):
            averaged = scores[:-1] / scores[-1:]
        corners = np.stack([corner == _NONE for corner in (a, b, c, d)], axis=-1)  # (n, quads, 4)
        uncovered = corners[:, :, quadrant].transpose(0, 2, 1, 3).reshape(n * s, quads * s)
        averaged[:, uncovered[first:stop, half : half + width]] = np.nan
        return block, averaged


class BandMerger:
    """Average class probabilities of overlapping tiles and arg-max them, a band of rows at a time.

    Tiles are ``ph x pw`` and start at ``rows x columns`` (each ascending); call :meth:`add` for the
    tiles kept, in raster order (tiles not added are skipped), then :meth:`finish`. Every pixel whose
    tiles were all skipped is ``background_index`` (0 in every channel with ``average_rows``). With
    ``stride = s > 1`` a tile's probabilities are ``(C, ph / s, pw / s)`` (the network's output stride),
    blended at that resolution and upsampled by a :class:`StrideUpsampler` once final; tile sizes and
    starts must then be multiples of ``s``.

    Memory: the sums held never exceed ``4 * C * ((ph - sy) / s * ceil(W / s) + ph * pw / s**2)`` bytes
    (float32; with tissue flags, ``(ph - sy) * W + ph * pw`` bytes more), for ``C`` classes, a slide
    ``W`` pixels wide and a step of ``sy`` rows between tile rows: the rows that the next tile row will
    overlap, across the whole width, plus the cells of the tile just added. It does not depend on the
    slide's height; for 512 px tiles with 25% overlap and 5 classes it is 2.5 kB per column of the slide
    plus 5 MB at full resolution (``s = 1``): 100 MB for a slide 40k pixels wide; at output stride 8,
    1.6 MB (plus 5 MB of tissue flags).

    Args:
        shape: ``(H, W)`` of the slide level.
        patch_size: ``(ph, pw)``.
        rows, columns: tile starts along y and x (see :func:`tile_positions`).
        num_classes: ``C``, channels of the probabilities.
        background_index: class of pixels no kept tile covers, and of glass with ``tissue`` flags.
        write_rows: called with ``(top, labels)``, ``labels`` a uint8 ``(h, W)`` block of final classes,
            top to bottom, every row once.
        probabilities: where averaged probabilities go, an array-like ``(1, C, H, W)`` (e.g. zarr) filled
            with NaN beforehand (pixels no kept tile covers are not written), or ``None`` to keep none.
        stride: the resolution of the tiles' probabilities relative to the slide level's.
        average_rows: hand ``write_rows`` the averaged float32 ``(C, h, W)`` maps of the final rows instead
            of their uint8 arg-max (0 where no kept tile covers a pixel, and on glass with ``tissue``
            flags); ``class_pixels`` then stays zero. Only at full resolution (``stride = 1``).
    """

    def __init__(
        self,
        shape: Sequence[int],
        patch_size: Sequence[int],
        rows: Sequence[int],
        columns: Sequence[int],
        num_classes: int,
        background_index: int,
        write_rows: Callable[[int, np.ndarray], None],
        probabilities: Any = None,
        stride: int = 1,
        average_rows: bool = False,
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.patch_size = (int(patch_size[0]), int(patch_size[1]))
        self.rows, self.columns = list(rows), list(columns)
        if self.rows != sorted(set(self.rows)) or self.columns != sorted(set(self.columns)):
            raise ValueError("tile rows and columns must be strictly ascending")
        if stride < 1 or any(v % stride for v in (*self.patch_size, *self.rows, *self.columns)):
            raise ValueError(f"tile sizes and starts must be multiples of the stride, got stride {stride}")
        self.num_classes, self.background_index, self.stride = num_classes, background_index, int(stride)
        self.write_rows, self.probabilities = write_rows, probabilities
        self.average_rows = bool(average_rows)
        if self.average_rows and self.stride > 1:
            raise ValueError(f"average_rows needs maps at full resolution (stride 1), got stride {stride}")
        # the cell grid lives at the probabilities' resolution
        low_shape = [-(-n // self.stride) for n in self.shape]
        self._patch = [n // self.stride for n in self.patch_size]
        self._starts = [[v // self.stride for v in starts] for starts in (self.rows, self.columns)]
        self.y_edges = _edges(low_shape[0], self._starts[0], self._patch[0])
        self.x_edges = _edges(low_shape[1], self._starts[1], self._patch[1])
        # a cell is final once the last tile touching it has passed; both lists are non-decreasing, so cells
        # become final row after row, left to right within a row, and need no list of their own
        self._last_row = _last_tile(self.y_edges, self._starts[0], self._patch[0])
        self._last_column = _last_tile(self.x_edges, self._starts[1], self._patch[1])
        self._final_rows = [0] * (len(self.y_edges) - 1)  # final cells of each cell row, from the left
        self._sums: dict[tuple[int, int], np.ndarray] = {}
        self._counts: dict[tuple[int, int], int] = {}
        self._tissue: dict[tuple[int, int], np.ndarray] = {}
        self._row_blocks: dict[int, list[np.ndarray | None]] = {}  # a cell row's finalised parts
        self._upsampler = None
        if self.stride > 1:
            self._upsampler = StrideUpsampler(
                self.shape, self.stride, background_index, self._write, probabilities
            )
        self._rows_written = 0  # cell rows handed on
        self._last_added = -1
        self.class_pixels = np.zeros(num_classes, dtype=np.int64)
        self.peak_bytes = 0  # most bytes of sums and tissue flags held at once
        self._held = 0  # bytes of sums and tissue flags held now

    def _cell_span(self, edges: list[int], start: int, patch: int, size: int) -> range:
        first = bisect.bisect_left(edges, start)
        return range(first, bisect.bisect_left(edges, min(start + patch, size)))

    def add(self, row: int, column: int, probabilities: np.ndarray, tissue: np.ndarray | None = None) -> None:
        """Add the ``(C, ph / s, pw / s)`` probabilities of the tile at grid index ``(row, column)``;
        ``tissue`` (``(ph, pw)`` bool, optional) marks the pixels that are tissue, the others become
        background."""
        index = row * len(self.columns) + column
        if index <= self._last_added:
            raise ValueError(f"tiles must come in raster order: tile {(row, column)} came after a later one")
        expected = (self.num_classes, *self._patch)
        if probabilities.shape != expected:
            raise ValueError(f"expected tile probabilities of shape {expected}, got {probabilities.shape}")
        self._last_added = index
        self._finalise_before(index)
        s, top, left = self.stride, self._starts[0][row], self._starts[1][column]
        for r in self._cell_span(self.y_edges, top, self._patch[0], self.y_edges[-1]):
            y0, y1 = self.y_edges[r], self.y_edges[r + 1]
            for c in self._cell_span(self.x_edges, left, self._patch[1], self.x_edges[-1]):
                # by construction no tile touches a final cell: its last tile came before this one
                assert c >= self._final_rows[r], f"tile {(row, column)} touches final cell {(r, c)}"
                x0, x1 = self.x_edges[c], self.x_edges[c + 1]
                part = probabilities[:, y0 - top : y1 - top, x0 - left : x1 - left]
                if (r, c) in self._sums:
                    self._sums[r, c] += part
                    self._counts[r, c] += 1
                else:
                    self._sums[r, c] = part.astype(np.float32, copy=True)
                    self._counts[r, c] = 1
                    self._held += self._sums[r, c].nbytes
                if tissue is not None:  # at full resolution, cut at the slide's edge
                    rows = slice(s * (y0 - top), min(s * y1, self.shape[0]) - s * top)
                    flags = tissue[rows, s * (x0 - left) : min(s * x1, self.shape[1]) - s * left]
                    self._held += flags.nbytes - self._tissue.pop((r, c), flags[:0]).nbytes
                    self._tissue[r, c] = flags
        self.peak_bytes = max(self.peak_bytes, self._held)

    def finish(self) -> None:
        """Finalise every cell left; all rows have then been written."""
        self._finalise_before(len(self.rows) * len(self.columns))
        assert self._rows_written == len(self.y_edges) - 1 and not self._sums

    def _finalise_before(self, index: int) -> None:
        """Finalise the cells whose last tile comes before raster index ``index``."""
        row, column = divmod(index, len(self.columns))
        cells_per_row = len(self.x_edges) - 1
        r = self._rows_written  # rows above are complete
        while r < len(self._last_row) and self._last_row[r] <= row:
            done = cells_per_row if self._last_row[r] < row else bisect.bisect_left(self._last_column, column)
            for c in range(self._final_rows[r], done):
                self._finalise(r, c)
            r += 1

    def _write(self, top: int, labels: np.ndarray) -> None:
        if not self.average_rows:
            # a count per class rather than np.bincount, which would copy the block as 8-byte integers
            self.class_pixels += [np.count_nonzero(labels == k) for k in range(self.num_classes)]
        self.write_rows(top, labels)

    def _finalise(self, r: int, c: int) -> None:
        """Finalise cell ``(r, c)``: at full resolution its labels, else its averaged probabilities, go into
        its cell row, which is handed on once all its cells are final."""
        sums, count = self._sums.pop((r, c), None), self._counts.pop((r, c), 0)
        tissue = self._tissue.pop((r, c), None)
        self._held -= (0 if sums is None else sums.nbytes) + (0 if tissue is None else tissue.nbytes)
        blocks = self._row_blocks.setdefault(r, [])
        if self.stride == 1:
            y0, y1, x0, x1 = self.y_edges[r], self.y_edges[r + 1], self.x_edges[c], self.x_edges[c + 1]
            if sums is None:
                shape = (y1 - y0, x1 - x0)
                if self.average_rows:
                    block = np.zeros((self.num_classes, *shape), np.float32)
                else:
                    block = np.full(shape, self.background_index, np.uint8)
            else:
                averaged = None
                if self.probabilities is not None or self.average_rows:
                    averaged = sums / np.float32(count)
                if self.probabilities is not None:
                    self.probabilities[0, :, y0:y1, x0:x1] = averaged
                if averaged is not None and self.average_rows:
                    block = averaged
                    if tissue is not None:
                        block[:, ~tissue] = 0
                else:
                    block = argmax_first(sums)  # dividing by the cell's one count changes no order
                    if tissue is not None:
                        block[~tissue] = self.background_index
            blocks.append(block)
        else:
            blocks.append(None if sums is None else sums / np.float32(count))
            blocks.append(tissue)
        self._final_rows[r] += 1
        cells_per_row = len(self.x_edges) - 1
        while (
            self._rows_written < len(self._final_rows)
            and self._final_rows[self._rows_written] == cells_per_row
        ):
            self._hand_on(self._rows_written, self._row_blocks.pop(self._rows_written))
            self._rows_written += 1

    def _hand_on(self, r: int, blocks: list[np.ndarray | None]) -> None:
        """Write a complete cell row, or push it to the upsampler."""
        if self._upsampler is None:
            self._write(self.y_edges[r], np.concatenate(blocks, axis=-1))
            return
        s, (height, width) = self.stride, self.shape
        rows = self.y_edges[r + 1] - self.y_edges[r]
        probabilities = np.zeros((self.num_classes, rows, self.x_edges[-1]), np.float32)
        covered = np.zeros((rows, self.x_edges[-1]), bool)
        tissue = None
        for (x0, x1), averaged, flags in zip(itertools.pairwise(self.x_edges), blocks[0::2], blocks[1::2]):
            if averaged is not None:
                probabilities[:, :, x0:x1] = averaged
                covered[:, x0:x1] = True
            if flags is not None:
                if tissue is None:
                    tissue = np.ones(
                        (min(s * self.y_edges[r + 1], height) - s * self.y_edges[r], width), bool
                    )
                tissue[:, s * x0 : min(s * x1, width)] = flags
        self._upsampler.push(probabilities, covered, tissue)
