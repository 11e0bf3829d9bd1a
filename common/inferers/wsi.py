"""Whole-slide segmentation, tile by tile, without any slide-sized array in memory.

The pipeline is MONAI's: :class:`~monai.inferers.PatchInferer` with a
:class:`~monai.inferers.WSISlidingWindowSplitter` reading overlapping tiles of one pyramid level from
the slide file, a :class:`TissueFilter` as its ``filter_fn`` dropping tiles of bare glass, and
:class:`~monai.inferers.ZarrAvgMerger` averaging the class probabilities of overlapping tiles in
on-disk zarr arrays. ``ZarrAvgMerger`` is used as MONAI ships it: it already keeps the sums, counts and
averages on disk, so no array of the slide's size is ever allocated; its cost is I/O (tens of
milliseconds per 512 px tile on a laptop disk, see ``scripts/benchmarks/bench_wsi_inference.py``).

After the merger, every pass over the slide reads bounded blocks from zarr: the arg-max class map, the
per-class pixel counts, the mode-pooled pyramid levels, the tiled TIFF and the thumbnail overlay.
Pixels that no kept tile covers have no probability (the merger leaves 0/0 = NaN there) and are
labelled ``background_index``, never class 0.

Outputs, per slide ``<stem>``, each written atomically into ``output_dir``:

- ``<stem>_classes.tif``: uint8 class map of the processed level as a tiled pyramidal TIFF (levels
  halved by 2x2 mode pooling as consecutive reduced-resolution pages, the layout OpenSlide, QuPath and
  :func:`common.data.wsi.open_slide` read), with resolution tags so each level keeps its microns per pixel;
- ``<stem>_overlay.png``: a thumbnail of the slide with the tissue classes blended in;
- ``<stem>_areas.json``: pixels, mm^2 and fraction per class, tissue fraction, tiles processed/skipped;
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
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from monai.inferers import PatchInferer, WSISlidingWindowSplitter
from monai.inferers.merger import ZarrAvgMerger
from PIL import Image

from common.data.histopathology import mask_palette
from common.data.wsi import (
    BACKENDS,
    Slide,
    create_wsi_reader,
    open_slide,
    read_region,
    select_level,
    write_pyramid_tiff,
)
from common.io.atomic import atomic_directory, atomic_write
from common.transforms.tissue import (
    BLACK_THRESHOLD,
    BRIGHTNESS_THRESHOLD,
    SATURATION_THRESHOLD,
    tissue_fraction,
    tissue_mask,
)

__all__ = ["TissueFilter", "mode_pool2", "WholeSlideSegmenter", "segment_slide"]

logger = logging.getLogger(__name__)

_CHUNK = 256  # spatial chunk of the merger's zarr arrays: ~1 MB blocks, small waste at tile edges
_READ_BLOCK = 2048  # side of the blocks read for the thumbnail (12 MB of RGB)


class TissueFilter:
    """``filter_fn`` for :class:`~monai.inferers.WSISlidingWindowSplitter`: keep a tile when at least
    ``min_tissue_fraction`` of its pixels are tissue (:func:`common.transforms.tissue.tissue_mask`, with
    the same thresholds as pseudo-masks and the glass mask), and count the tiles kept and skipped.

    The white padding past the slide's edge counts as glass. ``min_tissue_fraction=0`` keeps every tile.
    """

    def __init__(
        self,
        min_tissue_fraction: float = 0.05,
        saturation_threshold: float = SATURATION_THRESHOLD,
        brightness_threshold: float = BRIGHTNESS_THRESHOLD,
        black_threshold: float = BLACK_THRESHOLD,
    ) -> None:
        if not 0.0 <= min_tissue_fraction <= 1.0:
            raise ValueError(f"min_tissue_fraction must be in [0, 1], got {min_tissue_fraction!r}")
        self.min_tissue_fraction = min_tissue_fraction
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
    padded = np.pad(labels, ((0, labels.shape[0] % 2), (0, labels.shape[1] % 2)), mode="edge")
    quads = np.stack([padded[0::2, 0::2], padded[0::2, 1::2], padded[1::2, 0::2], padded[1::2, 1::2]])
    votes = (quads[:, None] == quads[None]).sum(axis=1)  # how many of the four share each one's value
    return np.take_along_axis(quads, votes.argmax(axis=0)[None], axis=0)[0]  # argmax: first of the ties


class _ProbabilityNetwork:
    """The network as the merger needs it: softmax probabilities at the tile's size, as float32 on the
    CPU; also times the forward passes, so reading, filtering and merging can be told apart."""

    def __init__(self, network: Callable, num_classes: int, device: torch.device, amp: bool) -> None:
        self.network, self.num_classes, self.device, self.amp = network, num_classes, device, amp
        self.seconds = 0.0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        with torch.autocast(self.device.type, enabled=self.amp):
            logits = self.network(batch)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 4 or logits.shape[1] != self.num_classes:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"network must return (B, {self.num_classes}, H, W) class scores, got {shape}")
        if logits.shape[-2:] != batch.shape[-2:]:  # a stride-8 head's scores are smooth: bilinear suffices
            size = batch.shape[-2:]
            logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        probabilities = torch.softmax(logits.float(), dim=1).cpu()  # .cpu() waits for the device
        self.seconds += time.perf_counter() - start
        return probabilities


def _merger_codecs() -> dict[str, Any]:
    """Blosc-LZ4 with byte shuffle for the merger's arrays: zarr 2's default compressor, spelled out for
    zarr 3, whose default (zstd) was both slower and larger on class probabilities when measured
    (38 vs 33 ms per 512 px tile, 618 vs 546 MB for a 4000 px slide)."""
    if int(zarr.__version__.split(".")[0]) < 3:
        return {}
    codecs = [zarr.codecs.BytesCodec(), zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    return {"codecs": codecs, "value_codecs": codecs, "count_codecs": codecs}


def _blocks(shape: Sequence[int], block: int) -> Iterator[tuple[slice, slice]]:
    """Row-major ``(rows, columns)`` slices of ``block`` x ``block`` tiles covering ``shape``."""
    for y in range(0, shape[0], block):
        for x in range(0, shape[1], block):
            yield slice(y, min(y + block, shape[0])), slice(x, min(x + block, shape[1]))


def _label_array(path: Path, shape: tuple[int, int], chunk: int, fill_value: int) -> zarr.Array:
    return zarr.open_array(
        str(path), mode="w", shape=shape, chunks=(chunk, chunk), dtype="uint8", fill_value=fill_value
    )


def _pyramid(level0: zarr.Array, scratch: Path, tile_size: int, background_index: int) -> list[zarr.Array]:
    """Level 0 and its 2x mode-pooled reductions until the largest side fits one tile, built tile by tile."""
    levels = [level0]
    while max(levels[-1].shape) > tile_size:
        finer = levels[-1]
        shape = (-(-finer.shape[0] // 2), -(-finer.shape[1] // 2))
        coarser = _label_array(scratch / f"classes_{len(levels)}.zarr", shape, tile_size, background_index)
        for rows, cols in _blocks(shape, tile_size):
            block = finer[2 * rows.start : 2 * rows.stop, 2 * cols.start : 2 * cols.stop]
            coarser[rows, cols] = mode_pool2(np.asarray(block))
        levels.append(coarser)
    return levels


def _thumbnail(slide: Slide, max_side: int) -> np.ndarray:
    """``(h, w, 3)`` uint8 view of the slide at most ``max_side`` pixels long, from the coarsest level
    that is at least that long, read and shrunk block by block."""
    dimensions = slide.info.level_dimensions
    level = max((lvl for lvl, dims in enumerate(dimensions) if max(dims) >= max_side), default=0)
    height, width = dimensions[level]
    scale = min(1.0, max_side / max(height, width))
    out_height, out_width = max(1, round(height * scale)), max(1, round(width * scale))
    thumbnail = np.empty((out_height, out_width, 3), dtype=np.uint8)
    downsample = slide.info.downsamples[level]
    for rows, cols in _blocks((height, width), _READ_BLOCK):
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


def _overlay(
    thumbnail: np.ndarray, levels: list[zarr.Array], palette: np.ndarray, background_index: int, alpha: float
) -> np.ndarray:
    """Thumbnail with each non-background class blended in its colour; the class map comes from the
    coarsest pyramid level at least as large as the thumbnail (else level 0), resized by nearest neighbour."""
    height, width = thumbnail.shape[:2]
    large_enough = (lvl for lvl in reversed(levels) if lvl.shape[0] >= height and lvl.shape[1] >= width)
    source = np.asarray(next(large_enough, levels[0])[:, :])
    classes = np.asarray(Image.fromarray(source).resize((width, height), Image.Resampling.NEAREST))
    tinted = np.round(thumbnail * (1.0 - alpha) + palette[classes] * alpha).astype(np.uint8)
    return np.where((classes != background_index)[..., None], tinted, thumbnail)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        allowed = f"in {minimum}..{maximum}" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
    return int(value)


def _check_patch_size(patch_size: int | Sequence[int]) -> tuple[int, int]:
    sizes = (patch_size, patch_size) if _is_int(patch_size) else tuple(patch_size)
    if len(sizes) != 2 or not all(_is_int(s) and s > 0 for s in sizes):
        raise ValueError(f"patch_size must be a positive integer or (height, width) pair, got {patch_size!r}")
    return int(sizes[0]), int(sizes[1])


def _check_overlap(overlap: float | int, patch_size: tuple[int, int]) -> float | int:
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float, np.integer, np.floating)):
        raise ValueError(f"overlap must be a fraction in [0, 1) or a whole number of pixels, got {overlap!r}")
    if isinstance(overlap, (float, np.floating)):
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"a fractional overlap must be in [0, 1), got {overlap}")
        return float(overlap)
    if not 0 <= overlap < min(patch_size):
        raise ValueError(f"an overlap in pixels must be in [0, {min(patch_size)}), got {overlap}")
    return int(overlap)


class WholeSlideSegmenter:
    """Segments whole slides with one network and one set of settings; call it with a slide path.

    Built once from a bundle config, it runs over a list of slides with
    ``"$[@segmenter(s) for s in @slides]"``; each call returns the summary described in
    :meth:`__call__`.

    Args:
        network: maps a ``(B, 3, h, w)`` float batch to ``(B, num_classes, h', w')`` class scores
            (logits; softmaxed here before blending; a coarser ``h', w'`` is upsampled bilinearly). It must
            already be on ``device``; an ``nn.Module`` is put in eval mode.
        output_dir: folder for the outputs (created if missing). The zarr scratch arrays live in a hidden
            temporary folder inside it, as they can be as large as the slide's probabilities (a RAM-backed
            ``/tmp`` would defeat the purpose); it is removed at the end.
        num_classes: output channels, background included.
        patch_size: tile side (or ``(height, width)``) in pixels of the processed level.
        overlap: between neighbouring tiles, a fraction of the tile in [0, 1) or whole pixels; overlapping
            probabilities are averaged.
        level: pyramid level to process; or give ``mpp`` to choose it by resolution (see
            :func:`common.data.wsi.select_level`); neither means level 0.
        mpp: microns per pixel the network expects.
        batch_size: tiles per forward pass.
        min_tissue_fraction: tiles with less tissue are skipped and labelled background (see
            :class:`TissueFilter`).
        device: where tiles go for the forward pass; default: the device of the network's parameters.
        class_names: one unique name per class; default ``"class 0"``, ... and ``"background"``.
        background_index: the background class; default ``num_classes - 1`` (the collection's convention:
            tissue classes ``0..C-1``, background ``C``).
        amp: autocast the forward pass (float16 on CUDA, bfloat16 on CPU).
        preprocess: applied to each ``(B, 3, h, w)`` float batch with values 0..255 on ``device``, e.g.
            ImageNet normalisation; default: none.
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
            stride only; this restores the pixel-level tissue outline (one more read of the slide).
    """

    def __init__(
        self,
        network: Callable[[torch.Tensor], torch.Tensor],
        output_dir: str | os.PathLike,
        num_classes: int,
        patch_size: int | Sequence[int] = 512,
        overlap: float | int = 0.25,
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
    ) -> None:
        if not callable(network):
            raise TypeError(f"network must be callable, got {type(network).__name__}")
        self.num_classes = _check_int("num_classes (background included)", num_classes, 2, 255)
        self.background_index = _check_int(
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
        self.patch_size = _check_patch_size(patch_size)
        self.overlap = _check_overlap(overlap, self.patch_size)
        if level is not None and mpp is not None:
            raise ValueError(f"give either level or mpp, not both (level={level}, mpp={mpp})")
        self.level, self.mpp = level, mpp
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.min_tissue_fraction = min_tissue_fraction
        TissueFilter(min_tissue_fraction)  # validates the fraction now rather than at the first slide
        if device is None:
            parameter = next(network.parameters(), None) if isinstance(network, torch.nn.Module) else None
            device = parameter.device if parameter is not None else "cpu"
        self.device = torch.device(device)
        self.amp = bool(amp)
        if preprocess is not None and not callable(preprocess):
            raise TypeError(f"preprocess must be callable, got {type(preprocess).__name__}")
        self.preprocess = preprocess
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.keep_probabilities = bool(keep_probabilities)
        if not _is_int(tile_size) or tile_size < 16 or tile_size % 16:
            raise ValueError(f"tile_size must be a positive multiple of 16 (a TIFF rule), got {tile_size!r}")
        self.tile_size = int(tile_size)
        self.thumbnail_size = _check_int("thumbnail_size", thumbnail_size, 1)
        if palette is None:
            palette = mask_palette(self.num_classes)[: self.num_classes]
        colours = np.asarray(palette)
        if colours.shape != (self.num_classes, 3) or colours.min() < 0 or colours.max() > 255:
            raise ValueError(f"palette must be {self.num_classes} RGB colours in 0..255, got {colours.shape}")
        self.palette = colours.astype(np.float64)
        if not 0.0 <= overlay_alpha <= 1.0:
            raise ValueError(f"overlay_alpha must be in [0, 1], got {overlay_alpha!r}")
        self.overlay_alpha = overlay_alpha
        self.mask_glass = mask_glass
        self.network = network
        self.output_dir = Path(output_dir)

    def _prepare(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True).float()
        return batch if self.preprocess is None else self.preprocess(batch)

    def _count_dtype(self) -> str:
        """uint8 counts suffice unless more than 255 tiles overlap a pixel (overlap above ~94%)."""
        overlap = self.overlap
        steps = [p - overlap if _is_int(overlap) else round(p * (1 - overlap)) for p in self.patch_size]
        windows = np.prod([-(-p // max(s, 1)) for p, s in zip(self.patch_size, steps)])
        return "uint8" if windows <= 255 else "uint16"

    def _infer(self, slide_path: Path, level: int, scratch: Path, tissue: TissueFilter) -> tuple[Any, float]:
        """Averaged probabilities (zarr; ``None`` when every tile was skipped) and the network's seconds."""
        with warnings.catch_warnings():
            # MONAI warns about every backend but OpenSlide/cuCIM because its TiffFileWSIReader decodes the
            # whole level per patch; ours reads only the tiles a patch overlaps.
            warnings.filterwarnings("ignore", message="WSIReader with tifffile backend", category=UserWarning)
            splitter = WSISlidingWindowSplitter(
                self.patch_size,
                overlap=self.overlap,
                filter_fn=tissue,
                reader=create_wsi_reader(self.backend, level=level),
                level=level,  # the splitter reads sizes at this level; the reader extracts patches there
            )
        inferer = PatchInferer(
            splitter,
            merger_cls=ZarrAvgMerger,
            batch_size=self.batch_size,
            preprocessing=self._prepare,
            store=str(scratch / "probabilities.zarr"),
            value_store=str(scratch / "sums.zarr"),
            count_store=str(scratch / "counts.zarr"),
            chunks=(1, self.num_classes, _CHUNK, _CHUNK),
            count_dtype=self._count_dtype(),
            **_merger_codecs(),
        )
        network = _ProbabilityNetwork(self.network, self.num_classes, self.device, self.amp)
        if isinstance(self.network, torch.nn.Module):
            self.network.eval()
        with torch.inference_mode(), np.errstate(invalid="ignore"):  # 0/0 = NaN marks pixels no tile covered
            merged = inferer(str(slide_path), network)
        return (merged if isinstance(merged, zarr.Array) else None), network.seconds

    def _class_map(
        self, probabilities: Any, shape: tuple[int, int], scratch: Path, slide: Slide, level: int
    ) -> tuple[zarr.Array, np.ndarray]:
        """Arg-max class of every pixel (background where no tile was processed, and with ``mask_glass``
        where the slide shows glass) and pixels per class."""
        classes = _label_array(scratch / "classes_0.zarr", shape, self.tile_size, self.background_index)
        counts = np.zeros(self.num_classes, dtype=np.int64)
        if probabilities is None:
            counts[self.background_index] = shape[0] * shape[1]
            return classes, counts
        downsample = slide.info.downsamples[level]
        for rows, cols in _blocks(shape, self.tile_size):
            block = np.asarray(probabilities[0, :, rows, cols])
            labels = block.argmax(axis=0).astype(np.uint8)
            labels[np.isnan(block[0])] = self.background_index
            if self.mask_glass:
                location = (round(rows.start * downsample), round(cols.start * downsample))
                rgb = read_region(slide, location, (rows.stop - rows.start, cols.stop - cols.start), level)
                labels[~tissue_mask(rgb)] = self.background_index
            classes[rows, cols] = labels
            counts += np.bincount(labels.ravel(), minlength=self.num_classes)
        return classes, counts

    def _areas(
        self, slide: Slide, slide_path: Path, level: int, counts: np.ndarray, tissue: TissueFilter
    ) -> dict[str, Any]:
        mpp = slide.info.level_mpp(level)
        mm2_per_pixel = None if mpp is None else mpp[0] * mpp[1] * 1e-6
        total = int(counts.sum())
        tissue_pixels = total - int(counts[self.background_index])
        return {
            "slide": str(slide_path),
            "level": level,
            "shape": list(slide.info.level_dimensions[level]),
            "mpp": None if mpp is None else [round(v, 6) for v in mpp],
            "patch_size": list(self.patch_size),
            "overlap": self.overlap,
            "min_tissue_fraction": self.min_tissue_fraction,
            "tiles": {"processed": tissue.kept, "skipped": tissue.skipped},
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

    def __call__(self, slide_path: str | os.PathLike) -> dict[str, Any]:
        """Segment one slide and write its outputs.

        Returns:
            the content of ``<stem>_areas.json`` (slide, level, shape and mpp of the processed level,
            tiles processed/skipped, tissue fraction and area, and per class its index, pixels, fraction
            and area in mm^2, ``None`` when the slide has no resolution) plus ``"outputs"`` (the written
            paths) and ``"seconds"`` (``"total"`` and ``"network"``: the forward passes alone).

        Raises:
            InputDataError: the slide is missing or unreadable, or the level/mpp does not fit it.
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
                tissue = TissueFilter(self.min_tissue_fraction)
                probabilities, network_seconds = self._infer(slide_path, level, scratch, tissue)
                classes, counts = self._class_map(probabilities, shape, scratch, slide, level)
                levels = _pyramid(classes, scratch, self.tile_size, self.background_index)
                summary = self._areas(slide, slide_path, level, counts, tissue)
                outputs = {
                    "classes": self.output_dir / f"{stem}_classes.tif",
                    "overlay": self.output_dir / f"{stem}_overlay.png",
                    "areas": self.output_dir / f"{stem}_areas.json",
                }
                write_pyramid_tiff(outputs["classes"], levels, slide.info.level_mpp(level), self.tile_size)
                thumbnail = _thumbnail(slide, self.thumbnail_size)
                overlay = Image.fromarray(
                    _overlay(thumbnail, levels, self.palette, self.background_index, self.overlay_alpha)
                )
                atomic_write(outputs["overlay"], lambda f: overlay.save(f, format="PNG", compress_level=3))
                text = json.dumps(summary, indent=2) + "\n"
                atomic_write(outputs["areas"], lambda f: f.write(text.encode("utf-8")))
                if self.keep_probabilities and probabilities is not None:
                    outputs["probabilities"] = self.output_dir / f"{stem}_probabilities.zarr"
                    with atomic_directory(outputs["probabilities"]) as staging:
                        for entry in (scratch / "probabilities.zarr").iterdir():
                            os.rename(entry, staging / entry.name)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        summary["outputs"] = {name: str(path) for name, path in outputs.items()}
        summary["seconds"] = {"total": time.perf_counter() - start, "network": network_seconds}
        logger.info(
            "%s: level %d (%d x %d), %d tiles processed, %d skipped, tissue %.1f%%, %.1f s (network %.1f s)"
            " -> %s",
            slide_path, level, *shape, tissue.kept, tissue.skipped, 100 * summary["tissue_fraction"],
            summary["seconds"]["total"], network_seconds, outputs["areas"],
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
