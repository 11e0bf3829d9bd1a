"""Reading the tiles of a whole slide ahead of the network, in threads, without losing an error.

:class:`PrefetchingTileReader` runs a read function for each planned location in a thread pool and
yields the results in order, so decoding (JPEG and JPEG 2000 decoders release the GIL) overlaps the
forward pass. A failure comes back from the iterator as :class:`~common.errors.InputDataError` naming the
slide and the tile's location, where MONAI's ``ThreadBuffer`` would end the iteration silently.

:class:`TiledTiffLevel` reads regions of one level of a tiled TIFF by decoding its TIFF tiles directly,
each tile once while the planned regions still need it: overlapping patches share tiles, and decoding
them again would cost up to four times the bare decode of the level. A kept tile is cut down to the rows
that the regions still to come need, so the cache holds about the overlap between tile rows across the
level's width rather than whole TIFF tiles.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import tifffile

from common.errors import InputDataError

__all__ = ["PrefetchingTileReader", "TiledTiffLevel"]

T = TypeVar("T")
_WHITE = 255  # what lies past the slide's edge: glass


class TiledTiffLevel:
    """Regions of one level of a tiled, 8-bit, interleaved RGB(A) TIFF, decoded tile by tile.

    Args:
        tif: the open TIFF (its file handle is shared; reads are serialised by a lock, decoding is not).
        level: index into ``tif.series[0].levels``.
        plan: the regions that will be read, as ``(top, left, height, width)`` in pixels of the level; each
            TIFF tile they touch is decoded once, cut to the rows later planned regions need as earlier
            ones are read, and dropped after the last. Regions outside the plan are read too, decoding
            their tiles without keeping them.

    Raises:
        ValueError: the level is not tiled, not contiguous RGB(A), or not 8-bit (use another reader).
    """

    def __init__(self, tif: tifffile.TiffFile, level: int, plan: Iterable[Sequence[int]] = ()) -> None:
        series = tif.series[0].levels[level]
        page = series.keyframe
        if not page.is_tiled or page.planarconfig != 1 or page.dtype != np.uint8 or page.samplesperpixel < 3:
            raise ValueError("only tiled, contiguous 8-bit RGB(A) TIFF levels are read tile by tile")
        self.page = series.pages[0]
        self.keyframe = page
        self.shape = (int(page.imagelength), int(page.imagewidth))
        self.tile_shape = (int(page.tilelength), int(page.tilewidth))
        self.tiles_across = -(-self.shape[1] // self.tile_shape[1])
        self._fh = tif.filehandle
        self._file_lock = threading.Lock()
        self._lock = threading.Lock()
        # a kept tile's future gives (rows from its first row still needed, that row's index in the tile)
        self._cache: dict[tuple[int, int], Future[tuple[np.ndarray, int]]] = {}
        self._uses: defaultdict[tuple[int, int], list[int]] = defaultdict(list)  # sorted first rows needed
        for top, left, height, width in plan:
            for ty, tx in self._tiles(top, left, height, width):
                bisect.insort(self._uses[ty, tx], max(top - ty * self.tile_shape[0], 0))
        self.decoded = 0  # tiles decoded so far, to check that none is decoded twice

    def _tiles(self, top: int, left: int, height: int, width: int) -> list[tuple[int, int]]:
        (th, tw), (h, w) = self.tile_shape, self.shape
        y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + height, h), min(left + width, w)
        if y1 <= y0 or x1 <= x0:
            return []
        return [(ty, tx) for ty in range(y0 // th, -(-y1 // th)) for tx in range(x0 // tw, -(-x1 // tw))]

    def _decode(self, ty: int, tx: int) -> np.ndarray:
        index = ty * self.tiles_across + tx
        offset, count = self.page.dataoffsets[index], self.page.databytecounts[index]
        with self._file_lock:
            self._fh.seek(offset)
            data = self._fh.read(count)
        tile, _, _ = self.keyframe.decode(data, index, jpegtables=self.keyframe.jpegtables)
        return tile.reshape(*self.tile_shape, -1)[..., :3]

    def _tile(self, key: tuple[int, int]) -> tuple[np.ndarray, int]:
        """The tile's pixels from row ``first`` on, and ``first``."""
        with self._lock:
            future = self._cache.get(key)
            owner = future is None
            if owner:
                future = Future()
                self.decoded += 1
                if len(self._uses.get(key, ())) > 1:
                    self._cache[key] = future
        if owner:
            try:
                future.set_result((self._decode(*key), 0))
            except Exception as err:  # noqa: BLE001 - handed on to every reader waiting for this tile
                future.set_exception(err)
        return future.result()

    def _release(self, key: tuple[int, int], first_row: int) -> None:
        """A region needing the tile from ``first_row`` on is done: drop the tile after its last region,
        else cut it to the rows the regions left need (a copy, so the whole tile is freed)."""
        with self._lock:
            uses = self._uses.get(key, [])
            index = bisect.bisect_left(uses, first_row)
            if index == len(uses) or uses[index] != first_row:
                return  # a region outside the plan
            uses.pop(index)
            future = self._cache.get(key)
            if not uses:
                del self._uses[key]
                self._cache.pop(key, None)
            elif future is not None and future.done() and future.exception() is None:
                pixels, first = future.result()
                if uses[0] > first:
                    cut: Future[tuple[np.ndarray, int]] = Future()
                    cut.set_result((pixels[uses[0] - first :].copy(), uses[0]))
                    self._cache[key] = cut

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """``(height, width, 3)`` uint8 pixels; the part past the level's edge is white."""
        region = np.full((height, width, 3), _WHITE, dtype=np.uint8)
        th, tw = self.tile_shape
        keys = self._tiles(top, left, height, width)
        try:
            for ty, tx in keys:
                tile, first = self._tile((ty, tx))
                y0, x0 = max(top, ty * th), max(left, tx * tw)
                y1 = min(top + height, (ty + 1) * th, self.shape[0])
                x1 = min(left + width, (tx + 1) * tw, self.shape[1])
                region[y0 - top : y1 - top, x0 - left : x1 - left] = tile[
                    y0 - ty * th - first : y1 - ty * th - first, x0 - tx * tw : x1 - tx * tw
                ]
        finally:
            for ty, tx in keys:
                self._release((ty, tx), max(top - ty * th, 0))
        return region

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded pixels kept for later regions."""
        with self._lock:
            futures = [f for f in self._cache.values() if f.done() and f.exception() is None]
        return sum(f.result()[0].nbytes for f in futures)

    @property
    def cached_tiles(self) -> int:
        return len(self._cache)


class PrefetchingTileReader:
    """Run ``read(location)`` for each location in ``workers`` threads, at most ``depth`` ahead of the
    consumer, and yield ``(location, result)`` in the order of ``locations``.

    Args:
        read: reads one tile; runs in a worker thread.
        locations: the tiles to read, e.g. ``(y, x)`` in pixels of ``level``.
        slide: the slide's path, named in errors.
        level: the pyramid level, named in errors.
        workers: threads; 0 reads in the consumer's thread (no prefetching).
        depth: tiles read ahead; default ``4 * workers``.

    Raises (from the iteration):
        InputDataError: a read failed; the message names the slide, the level, the location and the cause.
    """

    def __init__(
        self,
        read: Callable[[Any], T],
        locations: Sequence[Any],
        slide: str | os.PathLike,
        level: int = 0,
        workers: int = 2,
        depth: int | None = None,
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be at least 0, got {workers}")
        self.read, self.locations, self.slide, self.level = read, locations, slide, level
        self.workers = workers
        self.depth = max(1, depth if depth is not None else 4 * workers)

    def _failed(self, location: Any, err: BaseException) -> InputDataError:
        cause = err.problem if isinstance(err, InputDataError) else f"{type(err).__name__}: {err}"
        problem = f"tile at (y, x) = {tuple(location)} of level {self.level} could not be read ({cause})"
        return InputDataError(self.slide, problem, "re-export or re-scan the slide, or leave it out of the run")

    def __iter__(self) -> Iterator[tuple[Any, T]]:
        if self.workers == 0:
            for location in self.locations:
                try:
                    result = self.read(location)
                except Exception as err:
                    raise self._failed(location, err) from err
                yield location, result
            return
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tile-reader")
        pending: deque[tuple[Any, Future[T]]] = deque()
        upcoming = iter(self.locations)
        try:
            for location in upcoming:
                pending.append((location, pool.submit(self.read, location)))
                if len(pending) >= self.depth:
                    break
            while pending:
                location, future = pending.popleft()
                try:
                    result = future.result()
                except Exception as err:
                    raise self._failed(location, err) from err
                following = next(upcoming, None)
                if following is not None:
                    pending.append((following, pool.submit(self.read, following)))
                yield location, result
        finally:
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=True)
