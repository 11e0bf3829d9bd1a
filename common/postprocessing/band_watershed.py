"""Cell instances of a distance map too large to hold, found a band of rows at a time with ids unique
over the whole map.

The map arrives top to bottom in blocks of rows as wide as the map (from a whole-slide merger). Each band
of ``band_rows`` rows is segmented by :func:`~common.postprocessing.watershed.distance_map_watershed` on
the band plus ``max_cell_size`` rows below it (the margin), plus the rows the smoothing reaches on each
side. An instance is *committed* when its top row lies in the band (in the last band: anywhere), minus
the pixels that instances committed earlier already claimed; it gets the next id of a running uint32
counter, in raster order of its first pixel. The band's rows are then final, and the next band starts
below it, knowing the pixels claimed in its first ``max_cell_size`` rows.

The rule: when every connected group of touching cells (a connected region of the smoothed map above
``cell_fill``) is at most ``max_cell_size`` rows tall, the instances are exactly those of the whole-map
watershed, renumbered in raster order of their first pixel. Such a group with its top row in a band lies
wholly in the band and its margin, and the watershed of one group does not depend on the others; a group
whose top row lies above the band was committed whole before, so each of its pixels is claimed and what
the band's watershed makes of its lower part is dropped. A taller group may be cut where a band's margin
ends: each part is kept, as separate cells; :attr:`BandWatershed.cut_cells` counts the committed cells
that reach a margin's last row, a sign that ``max_cell_size`` is too small.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.ndimage import find_objects, gaussian_filter

from common.postprocessing.watershed import check_smooth_sigma, check_thresholds, distance_map_watershed

__all__ = ["BandWatershed", "CellRows"]

_TRUNCATE = 4.0  # scipy's gaussian_filter default: the kernel reaches int(4 * sigma + 0.5) pixels
# bytes per pixel of the window that the watershed and the statistics hold at their peak, an upper bound
# of tracemalloc's peak on maps of packed cells (41 without smoothing, 49 with; smoothing copies the window)
WATERSHED_BYTES_PER_PIXEL = 52

#: Statistics of committed cells as :class:`BandWatershed` hands them on: each an array of one value per
#: cell, ids ascending (``bbox_max_*`` one past the last pixel).
CellRows = dict[str, np.ndarray]


class BandWatershed:
    """Watershed a ``height x width`` distance map pushed a block of rows at a time, holding only a band.

    Memory: at most ``W * (B + M + 2 * halo) * WATERSHED_BYTES_PER_PIXEL + 4 * W * (B + 2 * M + 2 * halo + p)``
    bytes (:attr:`peak_bytes` is this for the windows actually seen) for a map ``W`` pixels wide, a band of
    ``B = band_rows`` rows, a margin of ``M = max_cell_size`` rows and pushes of at most ``p`` rows: the
    window's watershed, the float32 map rows held and the uint32 ids claimed below the band. It grows
    with the width, the band and the margin, never with the map's height. ``halo`` is the smoothing's
    reach, ``int(4 * smooth_sigma + 0.5)`` (0 without smoothing); for ``W = 100_000``, ``B = 256``,
    ``M = 64`` and no smoothing, about 1.9 GB.

    Args:
        height, width: of the whole map.
        write_rows: called with ``(top, labels)``: uint32 ``(h, width)`` final instance ids, top to bottom,
            every row once (0: background).
        write_cells: called with the :data:`CellRows` of the cells each band commits: ``id``, ``area``
            (pixels), ``centroid_y``, ``centroid_x``, ``bbox_min_y``, ``bbox_min_x``, ``bbox_max_y``,
            ``bbox_max_x``, in pixels of the map.
        cells_max, cell_fill, min_size, smooth_sigma: as :func:`distance_map_watershed`.
        max_cell_size: the tallest group of touching cells, in rows, that is kept whole (the margin).
        band_rows: rows committed per watershed; larger bands redo less of the margin
            (``max_cell_size / band_rows`` of the map twice) but hold more.
    """

    def __init__(
        self,
        height: int,
        width: int,
        write_rows: Callable[[int, np.ndarray], None],
        write_cells: Callable[[CellRows], None],
        cells_max: float = 0.5,
        cell_fill: float = 0.05,
        min_size: int = 0,
        smooth_sigma: float = 0.0,
        max_cell_size: int = 64,
        band_rows: int = 256,
    ) -> None:
        check_thresholds(cells_max, cell_fill)
        check_smooth_sigma(smooth_sigma)
        for name, value in (("max_cell_size", max_cell_size), ("band_rows", band_rows)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive whole number of pixels, got {value!r}")
        if height < 1 or width < 1:
            raise ValueError(f"the map must have at least one row and column, got {height} x {width}")
        self.height, self.width = int(height), int(width)
        self.write_rows, self.write_cells = write_rows, write_cells
        self.cells_max, self.cell_fill, self.min_size = cells_max, cell_fill, min_size
        self.smooth_sigma = float(smooth_sigma)
        self.max_cell_size, self.band_rows = int(max_cell_size), int(band_rows)
        self.halo = int(_TRUNCATE * self.smooth_sigma + 0.5) if self.smooth_sigma > 0 else 0
        self._blocks: list[np.ndarray] = []  # map rows from self._top on
        self._top = 0  # first map row held
        self._received = 0  # map rows pushed
        self._committed = 0  # rows before it are final and written
        # ids that earlier bands gave to the rows from self._committed on
        self._claimed = np.zeros((0, self.width), np.uint32)
        self.cells = 0  # ids given so far: the last id
        self.cut_cells = 0
        self.peak_bytes = 0  # the most bytes of map rows, claimed ids and window held at once

    def push(self, rows: np.ndarray) -> None:
        """Add the next ``(h, width)`` rows of the map; segment and write every band they complete."""
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.width or self._received + len(rows) > self.height:
            raise ValueError(
                f"expected (h, {self.width}) map rows with at most {self.height - self._received} rows left, "
                f"got {rows.shape}"
            )
        self._blocks.append(rows)
        self._received += len(rows)
        while self._committed < self.height:
            bottom = min(self._committed + self.band_rows + self.max_cell_size + self.halo, self.height)
            if self._received < bottom:
                break
            self._band()

    def finish(self) -> None:
        """Check that the whole map was pushed and written."""
        if self._committed != self.height:
            raise RuntimeError(f"{self._received} of {self.height} map rows were pushed")

    def _window(self, start: int, stop: int) -> np.ndarray:
        """Map rows ``start..stop - 1`` (all held), as one array; rows above ``start`` are dropped."""
        held = np.concatenate(self._blocks) if len(self._blocks) > 1 else self._blocks[0]
        held = held[start - self._top :]
        self._blocks, self._top = [held], start
        return held[: stop - start]

    def _band(self) -> None:
        c, height = self._committed, self.height
        end = min(c + self.band_rows + self.max_cell_size, height)  # the band and its margin
        last = end == height
        commit_end = height if last else c + self.band_rows
        first, stop = max(c - self.halo, 0), min(end + self.halo, height)
        window = self._window(first, stop)
        held = sum(block.nbytes for block in self._blocks) + self._claimed.nbytes
        self.peak_bytes = max(
            self.peak_bytes, held + (end - c + 2 * self.halo) * self.width * WATERSHED_BYTES_PER_PIXEL
        )
        if self.smooth_sigma > 0:  # as over the whole map: the halo holds every row the kernel reaches
            window = gaussian_filter(window, self.smooth_sigma, mode="nearest", truncate=_TRUNCATE)
        labels = distance_map_watershed(
            window[c - first : end - first], self.cells_max, self.cell_fill, self.min_size
        )
        out = np.zeros(labels.shape, np.uint32)
        out[: len(self._claimed)] = self._claimed
        ys, xs = np.nonzero(labels)  # raster order: a label's first pixel is on its top row
        values = labels[ys, xs]
        unique, first_pixel = np.unique(values, return_index=True)
        committed = np.zeros(int(labels.max(initial=0)) + 1, bool)
        committed[unique[ys[first_pixel] < commit_end - c]] = True
        keep = committed[values] & (out[ys, xs] == 0)  # pixels claimed by earlier bands stay theirs
        ys, xs, values = ys[keep], xs[keep], values[keep]
        unique, first_pixel = np.unique(values, return_index=True)
        rank = np.empty(len(committed), np.int64)
        rank[unique[np.argsort(first_pixel)]] = np.arange(len(unique))  # ids in raster order of first pixels
        index = rank[values]
        out[ys, xs] = (index + self.cells + 1).astype(np.uint32)
        self._write_cells(out, index, ys, xs, len(unique), None if last else end - c)
        self.cells += len(unique)
        self.write_rows(c, out[: commit_end - c])
        self._claimed = out[commit_end - c :].copy()
        self._committed = commit_end

    def _write_cells(
        self,
        out: np.ndarray,
        index: np.ndarray,
        ys: np.ndarray,
        xs: np.ndarray,
        n: int,
        margin_end: int | None,
    ) -> None:
        """Statistics of the ``n`` cells just committed to ``out`` (band rows from ``self._committed``),
        ``index`` being each of their pixels' cell, 0..n-1."""
        if n == 0:
            return
        local = np.zeros(out.shape, np.int32)
        local[ys, xs] = index + 1
        boxes = np.array([(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in find_objects(local, n)])
        del local
        if margin_end is not None:
            self.cut_cells += int(np.count_nonzero(boxes[:, 2] >= margin_end))
        area = np.bincount(index, minlength=n)
        top = self._committed
        self.write_cells(
            {
                "id": np.arange(self.cells + 1, self.cells + 1 + n, dtype=np.uint32),
                "area": area,
                "centroid_y": np.bincount(index, ys, minlength=n) / area + top,
                "centroid_x": np.bincount(index, xs, minlength=n) / area,
                "bbox_min_y": boxes[:, 0] + top,
                "bbox_min_x": boxes[:, 1],
                "bbox_max_y": boxes[:, 2] + top,
                "bbox_max_x": boxes[:, 3],
            }
        )
