"""Whole-slide images: open a pyramidal slide, choose a level, read regions.

The readers are MONAI ``BaseWSIReader`` subclasses, so the object that :func:`open_slide` uses is the
one :class:`monai.inferers.WSISlidingWindowSplitter` tiles a slide with. Two backends:

- ``"tifffile"`` (default, no system library): :class:`TiledTiffWSIReader`. MONAI's own
  ``TiffFileWSIReader`` decodes the *whole level* for every patch it returns (``wsi.asarray(level=...)``),
  which for a 100k x 80k slide is tens of gigabytes per tile; this subclass decodes only the TIFF tiles a
  region overlaps (through tifffile's zarr view), and finds levels, sizes and resolution through
  tifffile's pyramid series, so Aperio SVS, OME-TIFF (SubIFDs) and generic tiled pyramids all work.
- ``"openslide"``: MONAI's ``OpenSlideWSIReader``, for the vendor formats OpenSlide reads (NDPI, MRXS, ...),
  from the ``openslide-python`` and ``openslide-bin`` wheels (no system library needed). Regions past the
  scanned area are composited onto white glass instead of OpenSlide's transparent black.

``"auto"`` takes OpenSlide for the vendor formats (:data:`VENDOR_SUFFIXES`) when it can be imported, and
tifffile for generic pyramidal TIFF. Both report the vendor's objective power and microns per pixel.

Both return RGB ``uint8`` regions with the channel first; the part of a region outside the slide is
white (255), which the tissue filter of :mod:`common.inferers.wsi` counts as background.

:func:`write_pyramid_tiff` writes the other way: a tiled pyramid (RGB slide or label map) assembled tile
by tile from arrays that may live on disk or be computed on demand.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import imagecodecs
import numpy as np
import tifffile
import zarr
from monai.data.wsi_reader import BaseWSIReader, OpenSlideWSIReader, TiffFileWSIReader
from monai.utils import optional_import

from common.errors import InputDataError
from common.io.atomic import atomic_write

__all__ = [
    "BACKENDS",
    "SLIDE_SUFFIXES",
    "VENDOR_SUFFIXES",
    "Slide",
    "SlideInfo",
    "TiledTiffWSIReader",
    "create_wsi_reader",
    "list_slides",
    "open_slide",
    "read_region",
    "select_level",
    "write_pyramid_tiff",
]

BACKENDS = ("tifffile", "openslide", "auto")
#: Whole-slide file suffixes :func:`list_slides` picks from a folder (generic TIFF, Aperio, Hamamatsu,
#: 3DHistech, Leica, Ventana, Philips).
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif", ".svslide")
#: Suffixes of the scanner formats that ``backend="auto"`` opens with OpenSlide (Aperio, Hamamatsu,
#: 3DHistech, Leica, Ventana): their vendor metadata and non-TIFF layouts are what OpenSlide is for.
VENDOR_SUFFIXES = (".svs", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif", ".svslide")
_BACKGROUND_VALUE = 255  # white glass
# Microns per TIFF ResolutionUnit (2 inch, 3 centimetre, 4 millimetre, 5 micrometre); 1 (none) means unknown.
_MICRONS_PER_UNIT = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}
_TIFF_INCH = 2  # the TIFF default when ResolutionUnit is absent
_ENCODE_TILES = 16  # tiles write_pyramid_tiff hands its encoding threads at once


@dataclass(frozen=True)
class SlideInfo:
    """What a slide holds, level by level.

    Attributes:
        path: the slide file.
        backend: the reader backend used (``"tifffile"`` or ``"openslide"``).
        level_dimensions: ``(height, width)`` of every level, level 0 (full resolution) first.
        downsamples: level-0 height over each level's height (MONAI's downsample ratio).
        mpp: ``(y, x)`` microns per pixel at level 0, or ``None`` when the file does not record it.
        objective_power: the scanner's objective magnification (e.g. 20 or 40), or ``None``.
        vendor: the scanner format as OpenSlide names it (``"aperio"``, ``"hamamatsu"``, ...), or ``None``.
    """

    path: Path
    backend: str
    level_dimensions: tuple[tuple[int, int], ...]
    downsamples: tuple[float, ...]
    mpp: tuple[float, float] | None
    objective_power: float | None = None
    vendor: str | None = None

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> tuple[float, float] | None:
        """``(y, x)`` microns per pixel at ``level`` (each axis scaled by its own size ratio), or ``None``."""
        if self.mpp is None:
            return None
        (height0, width0), (height, width) = self.level_dimensions[0], self.level_dimensions[level]
        return self.mpp[0] * height0 / height, self.mpp[1] * width0 / width


class Slide:
    """An open slide: its :class:`SlideInfo`, the MONAI reader and the backend's slide object.

    Close it (or use it as a context manager) to release the file.
    """

    def __init__(self, info: SlideInfo, reader: BaseWSIReader, wsi: Any) -> None:
        self.info = info
        self.reader = reader
        self.wsi = wsi

    def close(self) -> None:
        self.wsi.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.info.path)!r}, levels={self.info.level_dimensions}, mpp={self.info.mpp})"


def _svs_description(tif: tifffile.TiffFile) -> dict[str, Any]:
    """The ``key = value`` fields of an Aperio description (``{}`` for other TIFFs)."""
    return tifffile.tifffile.svs_description_metadata(tif.pages[0].description) if tif.is_svs else {}


def _tiff_level_0_mpp(tif: tifffile.TiffFile) -> tuple[float, float] | None:
    """Level-0 ``(y, x)`` microns per pixel from the Aperio description, else the resolution tags."""
    mpp = _float(_svs_description(tif).get("MPP"))
    if mpp:
        return mpp, mpp
    tags = tif.series[0].levels[0].keyframe.tags
    unit = tags.valueof("ResolutionUnit", default=_TIFF_INCH)
    x_resolution, y_resolution = tags.valueof("XResolution"), tags.valueof("YResolution")
    if int(unit) not in _MICRONS_PER_UNIT or x_resolution is None or y_resolution is None:
        return None
    microns = _MICRONS_PER_UNIT[int(unit)]
    (xn, xd), (yn, yd) = x_resolution, y_resolution
    if not (xn and xd and yn and yd):
        return None
    return microns * yd / yn, microns * xd / xn


class TiledTiffWSIReader(TiffFileWSIReader):
    """MONAI's tifffile reader, reading regions tile by tile and levels from tifffile's pyramid series.

    Takes the arguments of :class:`monai.data.TiffFileWSIReader`; only ``mode="RGB"`` is supported (an
    alpha channel is dropped). Regions reaching past the level are padded with white.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.mode != "RGB":
            raise ValueError(f"TiledTiffWSIReader reads RGB only; mode={self.mode!r} was given")

    @staticmethod
    def get_level_count(wsi: tifffile.TiffFile) -> int:
        return len(wsi.series[0].levels)

    def get_size(self, wsi: tifffile.TiffFile, level: int) -> tuple[int, int]:
        height, width = wsi.series[0].levels[level].shape[:2]  # axes YXS, checked by open_slide
        return int(height), int(width)

    def get_downsample_ratio(self, wsi: tifffile.TiffFile, level: int) -> float:
        return self.get_size(wsi, 0)[0] / self.get_size(wsi, level)[0]

    def get_mpp(self, wsi: tifffile.TiffFile, level: int) -> tuple[float, float]:
        mpp = _tiff_level_0_mpp(wsi)
        if mpp is None:
            raise ValueError("`mpp` cannot be obtained for this file. Please use `level` instead.")
        (height0, width0), (height, width) = self.get_size(wsi, 0), self.get_size(wsi, level)
        return mpp[0] * height0 / height, mpp[1] * width0 / width

    def _get_patch(
        self,
        wsi: tifffile.TiffFile,
        location: tuple[int, int],
        size: tuple[int, int],
        level: int,
        dtype: Any,
        mode: str,
    ) -> np.ndarray:
        ratio = self.get_downsample_ratio(wsi, level)  # the splitter scales locations by this one ratio
        top, left = (round(value / ratio) for value in location)
        height, width = size
        level_height, level_width = self.get_size(wsi, level)
        patch = np.full((height, width, 3), _BACKGROUND_VALUE, dtype=np.uint8)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + height, level_height), min(left + width, level_width)
        if y1 > y0 and x1 > x0:
            pixels = zarr.open(wsi.series[0].aszarr(level=level), mode="r")
            region = np.asarray(pixels[y0:y1, x0:x1])
            patch[y0 - top : y1 - top, x0 - left : x1 - left] = region[..., :3]
        return np.moveaxis(patch.astype(dtype, copy=False), -1, self.channel_dim)


class _OpenSlideOnWhiteWSIReader(OpenSlideWSIReader):
    """OpenSlide reader that composites regions onto white: OpenSlide returns transparent black outside
    the scanned area (and between scanned tiles of some formats), which would read as dark tissue."""

    def _get_patch(
        self, wsi: Any, location: tuple[int, int], size: tuple[int, int], level: int, dtype: Any, mode: str
    ) -> np.ndarray:
        rgba = np.asarray(wsi.read_region(location[::-1], level, size[::-1]), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + _BACKGROUND_VALUE * (1.0 - alpha)
        return np.moveaxis(np.round(rgb).astype(dtype), -1, self.channel_dim)


def _resolve_backend(backend: str, path: str | os.PathLike | None = None) -> str:
    """``backend`` itself, or for ``"auto"``: OpenSlide when it can be imported and ``path`` is a vendor
    format (or no path is given), else tifffile."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        vendor = path is None or Path(path).suffix.lower() in VENDOR_SUFFIXES
        return "openslide" if vendor and optional_import("openslide")[1] else "tifffile"
    return backend


def create_wsi_reader(
    backend: str = "tifffile", level: int | None = None, path: str | os.PathLike | None = None
) -> BaseWSIReader:
    """The MONAI reader for ``backend`` (see :data:`BACKENDS`; ``"auto"`` decides by ``path``'s suffix)
    returning ``uint8`` RGB, channel first, at ``level`` by default (what
    :class:`~monai.inferers.WSISlidingWindowSplitter` reads patches at)."""
    backend = _resolve_backend(backend, path)
    if backend == "openslide":
        if not optional_import("openslide")[1]:
            raise ValueError(
                "backend 'openslide' needs openslide-python and the OpenSlide library; install them "
                "(pip install openslide-python openslide-bin) or use backend='tifffile'"
            )
        return _OpenSlideOnWhiteWSIReader(level=level, dtype=np.uint8, channel_dim=0)
    return TiledTiffWSIReader(level=level, dtype=np.uint8, channel_dim=0)


def _slide_info(path: Path, backend: str, reader: BaseWSIReader, wsi: Any) -> SlideInfo:
    levels = range(reader.get_level_count(wsi))
    dimensions = tuple(tuple(int(v) for v in reader.get_size(wsi, level)) for level in levels)
    downsamples = tuple(float(reader.get_downsample_ratio(wsi, level)) for level in levels)
    vendor = None
    if backend == "tifffile":
        mpp = _tiff_level_0_mpp(wsi)
        power = _float(_svs_description(wsi).get("AppMag"))
        vendor = "aperio" if wsi.is_svs else None
    else:
        try:
            mpp = tuple(float(v) for v in reader.get_mpp(wsi, 0))
        except ValueError:
            mpp = None
        power = _float(wsi.properties.get("openslide.objective-power"))
        vendor = wsi.properties.get("openslide.vendor")
    return SlideInfo(path, backend, dimensions, downsamples, mpp, power, vendor)  # type: ignore[arg-type]


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _check_tiff_layout(path: Path, tif: tifffile.TiffFile) -> None:
    if not tif.series:
        raise InputDataError(path, "TIFF holds no image")
    series = tif.series[0]
    if series.axes == "YX":
        raise InputDataError(path, "expected an RGB slide, found a single-channel (grey) image")
    if series.axes != "YXS" or series.shape[-1] not in (3, 4):
        raise InputDataError(
            path, f"expected an RGB slide (axes YXS), found axes {series.axes} of shape {series.shape}"
        )
    if series.dtype != np.uint8:
        raise InputDataError(path, f"expected 8-bit RGB pixels, found {series.dtype}")


def open_slide(path: str | os.PathLike, backend: str = "tifffile") -> Slide:
    """Open a whole-slide image without decoding its pixels.

    Args:
        path: the slide file: a pyramidal TIFF or SVS for ``"tifffile"``, any OpenSlide format for
            ``"openslide"``.
        backend: ``"tifffile"``, ``"openslide"``, or ``"auto"`` (OpenSlide for the vendor formats of
            :data:`VENDOR_SUFFIXES` when it can be imported, else tifffile).

    Raises:
        InputDataError: the file is missing, is not a slide the backend can read, or is not 8-bit RGB.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "slide file not found")
    backend = _resolve_backend(backend, path)
    reader = create_wsi_reader(backend)
    read_errors: tuple[type[BaseException], ...] = (
        OSError,
        ValueError,
        KeyError,
        IndexError,
        tifffile.TiffFileError,
    )
    if backend == "openslide":
        read_errors += (optional_import("openslide", name="OpenSlideError")[0],)
    try:
        wsi = reader.read(str(path))
    except read_errors as err:
        raise InputDataError(path, f"not a whole-slide image {backend} can read ({err})") from err
    try:
        if backend == "tifffile":
            _check_tiff_layout(path, wsi)
        info = _slide_info(path, backend, reader, wsi)
    except BaseException:
        wsi.close()
        raise
    return Slide(info, reader, wsi)


def list_slides(
    path: str | os.PathLike,
    suffixes: Sequence[str] = SLIDE_SUFFIXES,
    exclude_suffixes: Sequence[str] = ("_classes",),
) -> list[str]:
    """The slides to process: ``path`` itself when it is a file, else the files directly in the folder
    ``path`` whose suffix is one of ``suffixes`` (any case), sorted.

    Hidden files are skipped, and so are stems ending with ``exclude_suffixes``: by default the class-map
    TIFFs that whole-slide inference writes, should its output folder be the slides' folder.

    Raises:
        InputDataError: ``path`` does not exist, or the folder holds no slide.
    """
    path = Path(path)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise InputDataError(path, "slide file or folder not found")
    wanted = tuple(suffix.lower() for suffix in suffixes)
    slides = sorted(
        p
        for p in path.iterdir()
        if p.is_file()
        and p.suffix.lower() in wanted
        and not p.name.startswith(".")
        and not p.stem.endswith(tuple(exclude_suffixes))
    )
    if not slides:
        raise InputDataError(path, f"no slides ({', '.join(wanted)}) in this folder")
    return [str(p) for p in slides]


def _check_level(info: SlideInfo, level: int) -> None:
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
        raise TypeError(f"level must be an integer, got {level!r}")
    if not 0 <= level < info.level_count:
        raise InputDataError(
            info.path, f"slide has levels 0..{info.level_count - 1}; level {level} does not exist"
        )


def select_level(
    info: SlideInfo, level: int | None = None, mpp: float | None = None, mpp_rtol: float = 0.1
) -> int:
    """The pyramid level to process: ``level`` itself, or the level matching ``mpp``, or 0.

    For ``mpp`` the rule is: the *coarsest level that is not coarser than requested*, i.e. the largest
    level whose resolution (mean of its y and x microns per pixel) is at most ``mpp * (1 + mpp_rtol)``.
    A network trained at ``mpp`` thus never sees less detail than it was trained on; the slide is not
    resampled, so with levels at 0.25 and 1.0 mpp a request for 0.5 gives the 0.25 level.

    Raises:
        ValueError: both ``level`` and ``mpp`` are given, or ``mpp`` is not positive.
        InputDataError: the level does not exist, the slide does not record its resolution, or even
            level 0 is coarser than the requested ``mpp``.
    """
    if level is not None and mpp is not None:
        raise ValueError(f"give either level or mpp, not both (level={level}, mpp={mpp})")
    if mpp is None:
        level = 0 if level is None else level
        _check_level(info, level)
        return int(level)
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp!r}")
    if info.mpp is None:
        raise InputDataError(
            info.path,
            f"mpp {mpp} was requested but the slide does not record its resolution; give a level instead",
        )
    level_mpps = [sum(info.level_mpp(lvl)) / 2 for lvl in range(info.level_count)]  # type: ignore[arg-type]
    fine_enough = [lvl for lvl, value in enumerate(level_mpps) if value <= mpp * (1 + mpp_rtol)]
    if not fine_enough:
        raise InputDataError(
            info.path, f"mpp {mpp} was requested but the finest level has {level_mpps[0]:.4g} mpp"
        )
    return max(fine_enough, key=lambda lvl: level_mpps[lvl])


def read_region(slide: Slide, location: Sequence[int], size: Sequence[int], level: int = 0) -> np.ndarray:
    """RGB pixels of a region as a ``(3, height, width)`` uint8 array (alpha dropped).

    Args:
        slide: from :func:`open_slide`.
        location: ``(y, x)`` of the region's top-left corner in *level-0* pixels (OpenSlide's and MONAI's
            convention, so one location names the same spot at every level).
        size: ``(height, width)`` in pixels of ``level``. The part outside the slide is white.
        level: the pyramid level to read.
    """
    _check_level(slide.info, level)
    height, width = (int(v) for v in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {tuple(size)}")
    top, left = (int(v) for v in location)
    level0_height, level0_width = slide.info.level_dimensions[0]
    if not (0 <= top < level0_height and 0 <= left < level0_width):
        raise ValueError(
            f"location {(top, left)} is outside the slide (level 0 is {level0_height}x{level0_width})"
        )
    patch, _ = slide.reader.get_data(slide.wsi, location=(top, left), size=(height, width), level=level)
    return np.asarray(patch, dtype=np.uint8)


def _tiles(level: Any, tile_size: int) -> Iterator[np.ndarray]:
    """A level's tiles in raster order: from its own ``tiles(tile_size)`` when it renders them (e.g.
    in parallel), else by slicing it."""
    if callable(getattr(level, "tiles", None)):
        yield from level.tiles(tile_size)
        return
    height, width = level.shape[:2]
    for y in range(0, height, tile_size):
        for x in range(0, width, tile_size):
            yield np.asarray(level[y : y + tile_size, x : x + tile_size])


def _deflated_labels(tiles: Iterator[np.ndarray], tile_size: int, level: int | None) -> Iterator[bytes]:
    """zlib-encoded label tiles, padded with zeros to the full tile as tifffile pads them; a uniform tile
    is encoded once per value. Class maps are mostly uniform tiles (glass, large regions of one class):
    encoding every tile was the largest single cost of whole-slide inference's main thread on a 20k² slide
    (0.9 of about 6 CPU seconds)."""
    uniform: dict[int, bytes] = {}
    for tile in tiles:
        if tile.shape != (tile_size, tile_size):
            tile = np.pad(tile, ((0, tile_size - tile.shape[0]), (0, tile_size - tile.shape[1])))
        value = int(tile[0, 0])
        if (tile == value).all():
            if value not in uniform:
                uniform[value] = imagecodecs.zlib_encode(np.ascontiguousarray(tile), level=level)
            yield uniform[value]
        else:
            yield imagecodecs.zlib_encode(np.ascontiguousarray(tile), level=level)


def write_pyramid_tiff(
    path: str | os.PathLike,
    levels: Sequence[Any],
    mpp: float | tuple[float, float] | None = None,
    tile_size: int = 512,
    compression: str | None = "zlib",
    compression_args: dict[str, Any] | None = None,
    workers: int | None = None,
) -> Path:
    """Write a tiled pyramidal TIFF, atomically, one tile in memory at a time.

    The levels are consecutive pages, reduced ones marked ``NewSubfileType=1``: the generic tiled-TIFF
    pyramid that OpenSlide, QuPath, MONAI and :func:`open_slide` read.

    Args:
        path: the TIFF to write.
        levels: level 0 first; each a uint8 ``(H, W)`` (label map, grey) or ``(H, W, 3)`` (RGB) array-like
            (a 2-D level may have another integer ``dtype``, e.g. uint32 cell instances)
            with ``shape`` and 2-D slicing, e.g. a NumPy or zarr array, or a lazy object computing pixels;
            an object with a ``tiles(tile_size)`` method gives its tiles in raster order itself. Levels
            are read in order, so a reduced level may be filled while level 0 is written.
        mpp: ``(y, x)`` (or one value) microns per pixel of level 0, stored as resolution tags in pixels per
            centimetre, each level's scaled by its size ratio; ``None`` writes no resolution.
        tile_size: TIFF tile side, a multiple of 16.
        compression: a tifffile compression (``"zlib"``, ``"jpeg"``, ...) or ``None``. Label maps (2-D
            levels) in ``"zlib"`` are encoded here, each uniform tile once (see :func:`_deflated_labels`).
        compression_args: options of the codec, e.g. ``{"level": 90}`` for JPEG quality.
        workers: threads encoding tiles (tifffile's ``maxworkers``); ``None`` lets tifffile choose.
    """
    if tile_size <= 0 or tile_size % 16:
        raise ValueError(f"tile_size must be a positive multiple of 16 (a TIFF rule), got {tile_size}")
    if not levels:
        raise ValueError("levels is empty")
    mpp = (mpp, mpp) if isinstance(mpp, (int, float)) else mpp
    height0, width0 = levels[0].shape[:2]

    def write(file: Any) -> None:
        with tifffile.TiffWriter(file, bigtiff=height0 * width0 * 4 > 2**32) as tif:
            for index, level in enumerate(levels):
                height, width = level.shape[:2]
                resolution: dict[str, Any] = {}
                if mpp is not None:
                    y_mpp, x_mpp = mpp[0] * height0 / height, mpp[1] * width0 / width
                    resolution = {"resolution": (1e4 / x_mpp, 1e4 / y_mpp), "resolutionunit": "CENTIMETER"}
                tiles: Iterator[Any] = _tiles(level, tile_size)
                if compression == "zlib" and len(level.shape) == 2:
                    tiles = _deflated_labels(tiles, tile_size, (compression_args or {}).get("level"))
                tif.write(
                    tiles,
                    shape=tuple(level.shape),
                    dtype=np.dtype(getattr(level, "dtype", np.uint8)),
                    tile=(tile_size, tile_size),
                    photometric="rgb" if len(level.shape) == 3 else "minisblack",
                    compression=compression,
                    compressionargs=compression_args,
                    maxworkers=workers,
                    # tiles encoded at once: enough for the threads, not a row of a wide slide (or 256 MB)
                    buffersize=_ENCODE_TILES
                    * tile_size
                    * tile_size
                    * (level.shape[2] if len(level.shape) == 3 else 1),
                    subfiletype=1 if index else 0,
                    metadata=None,  # no tifffile JSON: readers then see one generic pyramid
                    **resolution,
                )

    return atomic_write(path, write)
