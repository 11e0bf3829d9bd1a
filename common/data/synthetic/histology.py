"""Synthetic H&E histology for weakly supervised tissue segmentation, written in the LUAD-HistoSeg
layout and as a pyramidal whole-slide TIFF, so the demo and the tests go through the real readers.

Tissue is rendered in optical density, ``I = I0 * exp(-(h * OD_H + e * OD_E + g))``, from haematoxylin
``h`` (purple-blue, nuclei), eosin ``e`` (pink, cytoplasm and fibres) and a grey term ``g``, with the
stain vectors, strengths and brightness jittered per patch as between labs. Classes (indices of
:data:`~common.data.histopathology.DEFAULT_CLASS_NAMES`) differ as they do under the microscope:

* 0 tumour epithelium: nests and glands of large, irregular, vesicular nuclei with nucleoli in
  purplish cytoplasm, around pale lumens;
* 1 necrosis: pale pink-grey debris with blue smudges, ghost cells and specks of fragmented nuclei;
* 2 lymphocyte: small, round, very dark nuclei packed densely, little cytoplasm;
* 3 tumour-associated stroma: wavy pink collagen fibres in a few directions with sparse spindle
  nuclei along them;
* 4 background: near-white glass, around the tissue and in holes through it (the lumens of
  glands are part of the tumour epithelium, as annotators draw them).

Every texture is a function of position in micrometres (hashed lattices, value noise and jittered
grids of nuclei), not of the array it is drawn into, so a slide rendered tile by tile has no seams
and patches at 1.0 um/px and slides at 0.5 um/px show the same tissue at two magnifications.
Region maps are the argmax of smooth random fields, one per class, so each patch holds 1-3 classes
with wobbly borders; a class covering under :data:`MIN_CLASS_FRACTION` of a patch is dropped
(its pixels go to the runner-up), so the label vector is exactly the set of classes present.

Layout::

    output_dir/train/train0000-[1 0 0 1].png, ...   image-level labels in the names (LUAD-HistoSeg)
    output_dir/train.jsonl                          the same patches as a manifest
    output_dir/val/img/val0000.png, val/mask/val0000.png (palette: 0..3 tissue, 4 background)
    output_dir/test/img/..., test/mask/...
    output_dir/slide/slide.tif        pyramidal tiled JPEG TIFF, levels /1 /2 /4 ..., 0.5 um/px
    output_dir/slide/slide_mask.png   its class map at 1/8 of level 0 (majority of each 8x8 block)
    output_dir/dataset.json           sizes, class names, resolutions, the slide's levels

The slide's level 0 is rendered and written tile by tile from a generator; only the reduced levels
(a quarter of the slide's pixels and less, about 70 MB for the default 8192 x 9216 slide) are held in
memory. The quick dataset, slide included, takes about 20 s of CPU time.

Command line::

    python -m common.data.synthetic.histology --out data/histology [--quick] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.data.histopathology import BACKGROUND, DEFAULT_CLASS_NAMES, write_mask
from common.data.synthetic.output import synthetic_dataset_folder, write_dataset_json
from common.data.wsi import write_pyramid_tiff

__all__ = [
    "MASK_DOWNSAMPLE",
    "MIN_CLASS_FRACTION",
    "PATCH_MPP",
    "SLIDE_MPP",
    "SUBFOLDERS",
    "generate_histology_dataset",
    "main",
    "synthesize_patch",
    "write_synthetic_slide",
]

SUBFOLDERS = ("train", "val", "test", "slide", "train.jsonl")  # what the output folder may hold
PATCH_MPP = 1.0  # um per pixel of the patches, as LUAD-HistoSeg's 10x patches
SLIDE_MPP = 0.5  # um per pixel at the slide's level 0 (20x); its level 1 matches the patches
MASK_DOWNSAMPLE = 8  # the slide's class map is stored at 1/8 of level 0
MIN_CLASS_FRACTION = 0.03  # a class below this share of a patch is not drawn there at all

_GENERATOR = "common.data.synthetic.histology"
_NUM_CLASSES = len(DEFAULT_CLASS_NAMES)
_BACKGROUND = _NUM_CLASSES
_SLIDE_KEY, _PATCH_KEY = 1, 2
_CLASS_COUNT_PROBABILITY = (0.35, 0.4, 0.25)  # patches with 1, 2 and 3 tissue classes
_PATCH_BACKGROUND_PROBABILITY = 0.35
_QUICK = {"n_train": 96, "n_val": 16, "n_test": 16, "patch_size": 128}
_DEFAULT = {"n_train": 480, "n_val": 64, "n_test": 64, "patch_size": 224}
_SLIDE_SIZE = (8192, 9216)  # (height, width): not square, so that swapped axes show
_SLIDE_TILE = 512
_JPEG_QUALITY = 90

# ------------------------------------------------------------------------------- procedural noise

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _key(*parts: int) -> int:
    """A 32-bit key for one random stream (a texture, a field) derived from integer ``parts``."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scatters neighbouring integers."""
    h = (h ^ (h >> np.uint64(30))) * _MIX1
    h = (h ^ (h >> np.uint64(27))) * _MIX2
    return h ^ (h >> np.uint64(31))


def _lattice_uniforms(key: int, iy: np.ndarray, ix: np.ndarray, count: int) -> np.ndarray:
    """``count`` uniforms in [0, 1) for every integer lattice point (iy, ix), fixed by ``key``;
    shape ``iy.shape + (count,)``. A point gets the same values whichever window asks for it."""
    h = _mix(_mix(iy.astype(np.int64).view(np.uint64) + np.uint64(key)) ^ ix.astype(np.int64).view(np.uint64))
    out = np.empty((*h.shape, count), dtype=np.float32)
    for k in range(count):
        h = _mix(h + _GOLDEN)
        out[..., k] = (h >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)
    return out


def _cell_grid(iy: np.ndarray, ix: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lattice cells covering integer cells (iy, ix) plus ``margin``: their (rows, cols) and the
    flat index of each (iy, ix) in them."""
    y0, x0 = int(iy.min()) - margin, int(ix.min()) - margin
    ny, nx = int(iy.max()) - y0 + 1 + margin, int(ix.max()) - x0 + 1 + margin
    rows, cols = np.meshgrid(np.arange(y0, y0 + ny), np.arange(x0, x0 + nx), indexing="ij")
    return rows, cols, (iy - y0) * nx + (ix - x0)


def _value_noise(key: int, y: np.ndarray, x: np.ndarray, period: float) -> np.ndarray:
    """Smooth noise in [-1, 1] with blobs about ``period`` um across, at points (y, x) in um."""
    gy, gx = y / np.float32(period), x / np.float32(period)
    fy, fx = np.floor(gy), np.floor(gx)
    rows, cols, k = _cell_grid(fy.astype(np.int64), fx.astype(np.int64), margin=1)
    lattice = _lattice_uniforms(key, rows, cols, 1).ravel() * 2 - 1
    nx = rows.shape[1]
    ty, tx = gy - fy, gx - fx
    ty, tx = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)  # smoothstep: no creases at lattice lines
    top = lattice[k] + (lattice[k + 1] - lattice[k]) * tx
    bottom = lattice[k + nx] + (lattice[k + nx + 1] - lattice[k + nx]) * tx
    return top + (bottom - top) * ty


def _fbm(key: int, y: np.ndarray, x: np.ndarray, period: float, octaves: int = 3) -> np.ndarray:
    """Fractal noise: octaves of value noise, each half the size and weight of the last; about
    zero-mean with standard deviation ~0.3."""
    total = np.zeros(np.broadcast_shapes(y.shape, x.shape), dtype=np.float32)
    weights = 0.5 ** np.arange(octaves)
    for octave, weight in enumerate(weights):
        total += np.float32(weight) * _value_noise(_key(key, octave), y, x, period / 2**octave)
    return total / np.float32(weights.sum())


# ------------------------------------------------------------------------------------------ nuclei

_SOFT_EDGE = 0.1  # nuclei fade out from 0.9 to 1.1 times their radius


@dataclass(frozen=True)
class _Nuclei:
    """Nuclei on a jittered grid: one candidate per ``spacing`` um cell, placed within ``jitter`` of
    the cell around its centre and kept with probability ``density``, with an equivalent radius and
    an axis ratio drawn from the given ranges (um) and a border wobbled by 2- and 3-lobed harmonics
    of relative amplitude up to ``wobble``."""

    spacing: float
    density: float
    radius: tuple[float, float]
    elongation: tuple[float, float]
    wobble: float
    jitter: float = 0.5

    def __post_init__(self) -> None:
        # A point's nearest 2x2 cells hold every nucleus that can reach it when no nucleus reaches
        # further than (1 - jitter / 2) cells from its own cell's centre; _nuclei relies on it.
        reach = self.radius[1] * math.sqrt(self.elongation[1]) * (1 + self.wobble) * (1 + _SOFT_EDGE)
        if reach > (1 - self.jitter / 2) * self.spacing:
            raise ValueError(f"nuclei reaching {reach:.1f} um do not fit a {self.spacing} um grid")


def _nuclei(
    key: int,
    y: np.ndarray,
    x: np.ndarray,
    spec: _Nuclei,
    keep: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    angle: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(coverage in 0..1 with a soft edge, normalised radius: 0 at a centre, 1 on the border) of the
    nearest nucleus at points (y, x) in um. ``keep(cy, cx)`` scales the density and ``angle(cy, cx)``
    orients the nuclei (default: random) by the position of their centres."""
    s = np.float32(spec.spacing)
    gy, gx = y / s, x / s
    iy, ix = np.floor(gy), np.floor(gx)
    rows, cols, cell = _cell_grid(iy.astype(np.int64), ix.astype(np.int64), 1)
    u = _lattice_uniforms(key, rows, cols, 8).reshape(-1, 8)
    cy = (rows.ravel() + 0.5 + spec.jitter * (u[:, 0] - 0.5)) * s
    cx = (cols.ravel() + 0.5 + spec.jitter * (u[:, 1] - 0.5)) * s
    density = spec.density * (keep(cy, cx) if keep is not None else 1.0)
    radius = spec.radius[0] + (spec.radius[1] - spec.radius[0]) * u[:, 2]
    elongation = np.sqrt(spec.elongation[0] + (spec.elongation[1] - spec.elongation[0]) * u[:, 3])
    theta = angle(cy, cx) if angle is not None else np.pi * u[:, 4]
    a, b = radius * elongation, radius / elongation
    alive = u[:, 5] < density
    far = np.float32(1e9)  # dropped candidates are moved out of reach
    phase = 2 * np.pi * u[:, 7]
    # per cell: the centre, the map from an offset to the nucleus' unit-circle frame, and the lobes
    params = [
        np.where(alive, cy, far),
        np.where(alive, cx, far),
        np.cos(theta) / a,
        np.sin(theta) / a,
        -np.sin(theta) / b,
        np.cos(theta) / b,
        spec.wobble * u[:, 6] * np.cos(phase),
        spec.wobble * u[:, 6] * np.sin(phase),
        spec.wobble * (1 - u[:, 6]) * np.cos(2 * phase),
    ]
    params = [p.astype(np.float32) for p in params]
    nx = rows.shape[1]
    step_y = np.where(gy - iy < 0.5, -nx, nx)  # towards the nearer neighbouring row of cells
    step_x = np.where(gx - ix < 0.5, -1, 1)
    nearest = np.full(cell.shape, np.inf, dtype=np.float32)
    for k in (cell, cell + step_x, cell + step_y, cell + step_y + step_x):
        cy_k, cx_k, m00, m01, m10, m11, w3c, w3s, w2c = (p[k] for p in params)
        dy, dx = y - cy_k, x - cx_k
        un, vn = dx * m00 + dy * m01, dx * m10 + dy * m11
        rho = np.sqrt(un * un + vn * vn) + np.float32(1e-6)
        c, sn = un / rho, vn / rho
        border = 1 + w3c * c * (4 * c * c - 3) + w3s * sn * (3 - 4 * sn * sn) + w2c * (c * c - sn * sn)
        np.minimum(nearest, rho / border, out=nearest)
    coverage = np.clip((1 - nearest) / (2 * _SOFT_EDGE) + 0.5, 0, 1)
    return coverage, nearest


# ----------------------------------------------------------------------------------------- tissues

_TUMOUR_NUCLEI = _Nuclei(spacing=11.0, density=0.92, radius=(3.6, 5.0), elongation=(1.0, 1.6), wobble=0.1)
_LYMPHOCYTES = _Nuclei(
    spacing=7.0, density=0.93, radius=(2.5, 3.1), elongation=(1.0, 1.2), wobble=0.04, jitter=0.7
)
_SPINDLE_NUCLEI = _Nuclei(spacing=22.0, density=0.45, radius=(2.4, 3.0), elongation=(4.0, 7.0), wobble=0.05)
_DEBRIS = _Nuclei(
    spacing=5.0, density=1.0, radius=(0.5, 1.1), elongation=(1.0, 2.0), wobble=0.15, jitter=0.9
)
_GHOST_CELLS = _Nuclei(spacing=12.0, density=0.5, radius=(3.4, 4.4), elongation=(1.0, 1.4), wobble=0.1)
_FIBRE_PERIOD = 8.0  # um between collagen fibres
Concentrations = tuple[np.ndarray, np.ndarray, np.ndarray]  # haematoxylin, eosin, grey optical densities


def _tumour(key: int, y: np.ndarray, x: np.ndarray) -> Concentrations:
    """Glands and nests of large irregular vesicular nuclei with nucleoli, around pale lumens."""
    glands = lambda yy, xx: _fbm(key, yy, xx, 60.0, 2)
    lumen = np.clip((glands(y, x) + 0.4) / 0.06, 0, 1)  # 0 in a lumen, 1 in the epithelium
    cover, rho = _nuclei(key + 7, y, x, _TUMOUR_NUCLEI, keep=lambda cy, cx: glands(cy, cx) > -0.32)
    chromatin = _value_noise(key + 8, y, x, 1.3)
    nucleolus = np.clip((0.2 - rho) / 0.08, 0, 1)
    nucleus = 0.7 + 0.5 * rho * rho + 0.25 * chromatin + 0.5 * nucleolus
    cytoplasm = 0.15 + 0.04 * _value_noise(key + 9, y, x, 5.0)
    haem = lumen * (cytoplasm * (1 - cover) + nucleus * cover)
    eosin = 0.08 + lumen * (0.25 + 0.06 * _value_noise(key + 10, y, x, 4.0) - 0.18 * cover)
    return haem, eosin, np.full_like(haem, 0.03)


def _necrosis(key: int, y: np.ndarray, x: np.ndarray) -> Concentrations:
    """Pale pink-grey debris: blue smudges, faint ghost cells and specks of fragmented nuclei."""
    clusters = lambda yy, xx: 0.15 + 0.6 * (_fbm(key + 1, yy, xx, 30.0, 2) > 0.05)
    specks, _ = _nuclei(key + 2, y, x, _DEBRIS, keep=clusters)
    ghosts, rho = _nuclei(key + 3, y, x, _GHOST_CELLS)
    smudge = np.clip(_fbm(key + 4, y, x, 14.0, 2), 0, None)
    haem = 0.05 + 0.3 * smudge + 0.05 * ghosts + 1.2 * specks
    eosin = 0.2 + 0.07 * _fbm(key + 5, y, x, 25.0, 2) + 0.1 * ghosts * (rho > 0.65)
    grey = 0.1 + 0.04 * _fbm(key + 6, y, x, 40.0, 2)
    return haem, eosin, grey


def _lymphocytes(key: int, y: np.ndarray, x: np.ndarray) -> Concentrations:
    """Small, round, very dark nuclei packed densely, with little cytoplasm between them."""
    sheets = lambda yy, xx: np.where(_fbm(key, yy, xx, 50.0, 2) > -0.4, 1.0, 0.5)
    cover, _ = _nuclei(key + 1, y, x, _LYMPHOCYTES, keep=sheets)
    nucleus = 1.5 + 0.15 * _value_noise(key + 2, y, x, 1.0)
    haem = 0.1 * (1 - cover) + nucleus * cover
    eosin = 0.16 + 0.04 * _value_noise(key + 3, y, x, 8.0) - 0.1 * cover
    return haem, eosin, np.full_like(haem, 0.03)


def _stroma(key: int, y: np.ndarray, x: np.ndarray) -> Concentrations:
    """Wavy bundles of eosinophilic collagen with thin clefts between them, running in three
    directions that take turns to dominate, with sparse spindle nuclei along the dominant one."""
    first = np.random.default_rng(key).uniform(0, np.pi)
    directions = (first + np.pi / 3 * np.arange(3)).astype(np.float32)

    def weights(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        w = np.exp(8 * np.stack([_value_noise(key + k, yy, xx, 150.0) for k in range(3)]))
        return w / w.sum(axis=0)

    waves = 7.0 * _value_noise(key + 3, y, x, 45.0)
    fibres = np.zeros_like(waves)
    clefts = np.zeros_like(waves)
    for weight, theta in zip(weights(y, x), directions):
        phase = (y * np.cos(theta) - x * np.sin(theta) + waves) * np.float32(2 * np.pi / _FIBRE_PERIOD)
        fibres += weight * (0.5 + 0.5 * np.cos(phase)) ** 2
        clefts += weight * np.clip((np.cos(phase / 3) - 0.85) * 7, 0, 1)  # between some fibres
    along = lambda cy, cx: directions[np.argmax(weights(cy, cx), axis=0)]
    cover, _ = _nuclei(key + 4, y, x, _SPINDLE_NUCLEI, angle=along)
    clefts *= np.clip(_value_noise(key + 6, y, x, 25.0) * 3, 0, 1)  # broken into short lengths
    strength = 0.65 + 0.35 * _value_noise(key + 5, y, x, 18.0)
    haem = 0.03 + 1.1 * cover
    eosin = (0.3 + 0.5 * fibres * strength) * (1 - 0.75 * clefts) * (1 - 0.5 * cover)
    return haem, eosin, np.full_like(haem, 0.02)


def _glass(key: int, y: np.ndarray, x: np.ndarray) -> Concentrations:
    """Near-white glass, faintly pink; the scanner's noise is its only texture (and it is cheap: half
    of a slide is glass)."""
    shape = np.broadcast_shapes(y.shape, x.shape)
    return np.zeros(shape, np.float32), np.full(shape, 0.012, np.float32), np.full(shape, 0.03, np.float32)


_TEXTURES: tuple[Callable[[int, np.ndarray, np.ndarray], Concentrations], ...] = (
    _tumour,
    _necrosis,
    _lymphocytes,
    _stroma,
    _glass,
)


# ------------------------------------------------------------------------------------------ colour

_HAEMATOXYLIN = np.array([0.650, 0.704, 0.286], dtype=np.float32)  # Ruifrok & Johnston's OD vectors
_EOSIN = np.array([0.072, 0.990, 0.105], dtype=np.float32)


@dataclass(frozen=True)
class _Stain:
    """A lab's staining and scanner: stain OD vectors (rows: haematoxylin, eosin, grey), strengths,
    brightness of the light and pixel noise."""

    vectors: np.ndarray
    brightness: float
    noise: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Stain:
        vectors = []
        for base in (_HAEMATOXYLIN, _EOSIN):
            v = np.clip(base + rng.normal(0, 0.04, 3), 0.02, None)
            vectors.append(v / np.linalg.norm(v) * rng.uniform(0.8, 1.2))
        vectors.append(np.ones(3))
        brightness, noise = float(rng.uniform(236, 252)), float(rng.uniform(1.5, 3.5))
        return cls(np.array(vectors, dtype=np.float32), brightness, noise)

    def to_rgb(self, concentrations: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(H, W, 3) uint8 transmitted light through (H, W, 3) haematoxylin, eosin and grey densities."""
        density = sum(concentrations[..., i, None] * self.vectors[i] for i in range(3))  # no BLAS threads
        light = self.brightness * np.exp(-density)
        light += self.noise * rng.standard_normal(light.shape, dtype=np.float32)
        return np.clip(np.round(light), 0, 255).astype(np.uint8)


def _render(
    keys: Sequence[int],
    class_map: np.ndarray,
    y_um: np.ndarray,
    x_um: np.ndarray,
    stain: _Stain,
    rng: np.random.Generator,
) -> np.ndarray:
    """(H, W, 3) uint8 image of ``class_map``, whose rows and columns lie at ``y_um`` and ``x_um``;
    ``keys[c]`` fixes the texture of class ``c``. Each texture is computed on its own pixels only."""
    concentrations = np.empty((*class_map.shape, 3), dtype=np.float32)
    for c in np.unique(class_map):
        rows, cols = np.nonzero(class_map == c)
        concentrations[rows, cols] = np.stack(_TEXTURES[c](keys[c], y_um[rows], x_um[cols]), axis=-1)
    return stain.to_rgb(concentrations, rng)


# ----------------------------------------------------------------------------------------- patches


def _pixel_centres(origin_um: float, size: int, mpp: float) -> np.ndarray:
    return (origin_um + (np.arange(size, dtype=np.float32) + 0.5) * mpp).astype(np.float32)


def _region_map(
    rng: np.random.Generator, key: int, classes: Sequence[int], y_um: np.ndarray, x_um: np.ndarray
) -> np.ndarray:
    """(H, W) uint8 map of smooth regions of ``classes``: the argmax of one random field per class.

    Classes covering less than :data:`MIN_CLASS_FRACTION` are dropped one by one (their pixels go to
    the runner-up), keeping at least one tissue class, so every class left is clearly present.
    """
    extent = float(max(y_um[-1] - y_um[0], x_um[-1] - x_um[0]))
    yy, xx = y_um[:, None], x_um[None, :]
    fields = np.stack(
        [
            _fbm(_key(key, c), yy, xx, extent * rng.uniform(0.45, 0.8), 2)
            + 0.025 * _value_noise(_key(key, c, 1), yy, xx, 10.0)  # wobbly borders
            + rng.uniform(-0.1, 0.1)
            - (0.08 if c == _BACKGROUND else 0.0)
            for c in classes
        ]
    )
    kept = list(range(len(classes)))
    while True:
        winner = np.asarray(kept)[np.argmax(fields[kept], axis=0)]
        share = np.bincount(winner.ravel(), minlength=len(classes)) / winner.size
        small = [i for i in kept if share[i] < MIN_CLASS_FRACTION]
        if not small:
            return np.asarray(classes, dtype=np.uint8)[winner]
        tissue = [i for i in kept if classes[i] != _BACKGROUND]
        droppable = [i for i in small if tissue != [i]]  # never the last tissue class ...
        if not droppable:  # ... which is small only beside a large background: drop that instead
            droppable = [i for i in kept if classes[i] == _BACKGROUND]
        kept.remove(min(droppable, key=lambda i: share[i]))


def synthesize_patch(
    rng: np.random.Generator, size: int, classes: Sequence[int], mpp: float = PATCH_MPP
) -> tuple[np.ndarray, np.ndarray]:
    """(image (size, size, 3) uint8, class map (size, size) uint8) of one H&E patch.

    ``classes`` are the candidate class indices (``0..3`` tissue, ``4`` background, at least one
    tissue class); each ends up covering at least :data:`MIN_CLASS_FRACTION` of the patch or not at
    all. Stain, texture and layout are drawn from ``rng``.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if not classes or not set(classes) <= set(range(_NUM_CLASSES + 1)) or set(classes) == {_BACKGROUND}:
        raise ValueError(f"classes must be indices in 0..{_NUM_CLASSES} with one tissue class, got {classes}")
    key = int(rng.integers(2**31))
    origin = rng.uniform(0, 20_000, 2)  # a fresh stretch of tissue for every patch
    y_um, x_um = _pixel_centres(origin[0], size, mpp), _pixel_centres(origin[1], size, mpp)
    class_map = _region_map(rng, key, sorted(set(classes)), y_um, x_um)
    keys = [_key(key, _PATCH_KEY, c) for c in range(_NUM_CLASSES + 1)]
    return _render(keys, class_map, y_um, x_um, _Stain.draw(rng), rng), class_map


# ------------------------------------------------------------------------------------------- slide

_SLIDE_CLASS_BIAS = (0.06, -0.06, -0.02, 0.04)  # more tumour and stroma than necrosis, as in LUAD
_BORDER_WOBBLE = 0.02  # amplitude of the fine noise added to the region fields at full resolution


def _slide_fields(key: int, height: int, width: int, mpp: float) -> np.ndarray:
    """(5, H/8, W/8) region fields at the centres of the slide's 8x8 blocks: four class scores and a
    tissue score, positive inside one irregular piece of tissue (with a few holes) in the middle.
    Regions are about half a millimetre across, smaller on slides under 2 mm so that they still
    hold every class."""
    f = MASK_DOWNSAMPLE
    y = _pixel_centres(0.0, height // f, f * mpp)[:, None]
    x = _pixel_centres(0.0, width // f, f * mpp)[None, :]
    half_h, half_w = height * mpp / 2, width * mpp / 2
    period = min(450.0, max(half_h, half_w) / 2)
    scores = [_fbm(_key(key, c), y, x, period) + bias for c, bias in enumerate(_SLIDE_CLASS_BIAS)]
    radius = np.sqrt(((y - half_h) / (0.8 * half_h)) ** 2 + ((x - half_w) / (0.8 * half_w)) ** 2)
    outline = 1 - radius + 0.35 * _fbm(_key(key, 5), y, x, 3 * max(half_h, half_w) / 4, 2)
    holes = 0.42 - _fbm(_key(key, 6), y, x, period / 2, 2)
    return np.stack([*scores, np.minimum(outline, holes)]).astype(np.float32)


def _block_positions(start: int, count: int, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """For pixels ``start .. start + count - 1`` of level 0: the index of the 8x8 block centre at or
    before each, and how far (0..1) it lies towards the next one; held constant beyond the outer ones."""
    q = np.clip((start + np.arange(count) + 0.5) / MASK_DOWNSAMPLE - 0.5, 0, n_blocks - 1)
    below = np.minimum(np.floor(q).astype(np.int64), n_blocks - 2)
    return below, (q - below).astype(np.float32)


def _tile_class_map(
    fields: np.ndarray, key: int, y0: int, x0: int, height: int, width: int, mpp: float
) -> np.ndarray:
    """(height, width) class map of a level-0 window: the region fields interpolated linearly to its
    pixels, plus a little fine noise so borders wobble. Windows far from any border skip both."""
    iy, ty = _block_positions(y0, height, fields.shape[1])
    ix, tx = _block_positions(x0, width, fields.shape[2])
    crop = fields[:, iy[0] : iy[-1] + 2, ix[0] : ix[-1] + 2]
    if (crop[-1] < -_BORDER_WOBBLE).all():
        return np.full((height, width), _BACKGROUND, dtype=np.uint8)
    ranked = np.sort(crop[:-1], axis=0)
    winner = np.argmax(crop[:-1], axis=0)
    uniform = (crop[-1] > _BORDER_WOBBLE).all() and (winner == winner.flat[0]).all()
    decided = (ranked[-1] - ranked[-2] > 2 * _BORDER_WOBBLE).all()  # no interpolated pixel can change sides
    if uniform and decided:
        return np.full((height, width), winner.flat[0], dtype=np.uint8)
    iy, ix = iy - iy[0], ix - ix[0]
    rows = crop[:, iy] * (1 - ty)[:, None] + crop[:, iy + 1] * ty[:, None]
    fine = rows[:, :, ix] * (1 - tx) + rows[:, :, ix + 1] * tx
    y_um = _pixel_centres(y0 * mpp, height, mpp)[:, None]
    x_um = _pixel_centres(x0 * mpp, width, mpp)[None, :]
    for c in range(len(fine)):
        fine[c] += _BORDER_WOBBLE * _value_noise(_key(key, 10, c), y_um, x_um, 12.0)
    tissue = np.argmax(fine[:-1], axis=0).astype(np.uint8)
    return np.where(fine[-1] > 0, tissue, np.uint8(_BACKGROUND))


def _block_majority(class_map: np.ndarray, factor: int) -> np.ndarray:
    """The most frequent class of each ``factor`` x ``factor`` block (ties: the lower index)."""
    h, w = class_map.shape
    blocks = class_map.reshape(h // factor, factor, w // factor, factor)
    counts = np.stack([(blocks == c).sum(axis=(1, 3)) for c in range(_NUM_CLASSES + 1)])
    return np.argmax(counts, axis=0).astype(np.uint8)


def _halve(image: np.ndarray, rows_per_step: int = 256) -> np.ndarray:
    """2x2 mean of an (H, W, 3) uint8 image, a band of rows at a time so that the 16-bit sums stay
    small; odd sizes are padded by repeating the last row or column."""
    h, w = image.shape[:2]
    if h % 2 or w % 2:
        image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    half = np.empty((image.shape[0] // 2, image.shape[1] // 2, 3), dtype=np.uint8)
    for top in range(0, half.shape[0], rows_per_step):
        band = image[2 * top : 2 * (top + rows_per_step)].astype(np.uint16)
        total = band[0::2, 0::2] + band[1::2, 0::2] + band[0::2, 1::2] + band[1::2, 1::2]
        half[top : top + rows_per_step] = (total + 2) // 4
    return half


def _level_shapes(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    """(height, width) of every pyramid level: halved until the shorter side fits one tile."""
    shapes = [(height, width)]
    while min(shapes[-1]) > tile:
        shapes.append((-(-shapes[-1][0] // 2), -(-shapes[-1][1] // 2)))
    return shapes


def write_synthetic_slide(
    path: str | os.PathLike,
    size: tuple[int, int] = _SLIDE_SIZE,
    tile: int = _SLIDE_TILE,
    mpp: float = SLIDE_MPP,
    seed: int = 0,
    workers: int = 2,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Write a synthetic H&E whole slide as a pyramidal tiled TIFF and return (its class map at
    1/:data:`MASK_DOWNSAMPLE` of level 0 as (H/8, W/8) uint8, the (height, width) of every level).

    The file is what scanners' generic TIFF exports look like and what openslide and MONAI's
    ``WSIReader(backend="tifffile")`` read: levels /1, /2, /4, ... as successive pages (not SubIFDs),
    ``tile`` x ``tile`` JPEG tiles, and resolution tags giving ``mpp`` um/px at level 0. Level 0 is
    rendered tile by tile by ``workers`` threads and streamed to the file; only the reduced levels
    are held in memory. The file appears atomically.

    Args:
        path: the ``.tif`` to write.
        size: (height, width) of level 0 in pixels, multiples of 8.
        tile: tile side in pixels, a multiple of 16 (JPEG blocks).
        mpp: micrometres per pixel at level 0.
        seed: fixes the slide's layout, textures and stain.
        workers: threads rendering level-0 tiles.
    """
    height, width = size
    if height % MASK_DOWNSAMPLE or width % MASK_DOWNSAMPLE or min(size) < 2 * tile:
        raise ValueError(f"size must be multiples of {MASK_DOWNSAMPLE} and at least 2 tiles, got {size}")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if mpp <= 0 or workers < 1:
        raise ValueError(f"mpp must be positive and workers at least 1, got {mpp} and {workers}")
    key = _key(seed, _SLIDE_KEY)
    stain = _Stain.draw(np.random.default_rng([seed, _SLIDE_KEY]))
    fields = _slide_fields(key, height, width, mpp)
    keys = [_key(key, _SLIDE_KEY, c) for c in range(_NUM_CLASSES + 1)]
    truth = np.empty((height // MASK_DOWNSAMPLE, width // MASK_DOWNSAMPLE), dtype=np.uint8)
    shapes = _level_shapes(height, width, tile)
    reduced = np.empty((*shapes[1], 3), dtype=np.uint8)

    def render_tile(ty: int, tx: int) -> np.ndarray:
        y0, x0 = ty * tile, tx * tile
        h, w = min(tile, height - y0), min(tile, width - x0)
        class_map = _tile_class_map(fields, key, y0, x0, h, w, mpp)
        f = MASK_DOWNSAMPLE
        truth[y0 // f : (y0 + h) // f, x0 // f : (x0 + w) // f] = _block_majority(class_map, f)
        y_um, x_um = _pixel_centres(y0 * mpp, h, mpp), _pixel_centres(x0 * mpp, w, mpp)
        return _render(keys, class_map, y_um, x_um, stain, np.random.default_rng([seed, _SLIDE_KEY, ty, tx]))

    class Level0:
        """Level 0 rendered a row of tiles at a time by ``workers`` threads, filling level 1 as it goes."""

        shape = (height, width, 3)

        def tiles(self, tile_size: int) -> Iterator[np.ndarray]:
            with ThreadPoolExecutor(workers) as pool:
                for ty in range(-(-height // tile_size)):
                    row = list(pool.map(render_tile, repeat(ty), range(-(-width // tile_size))))
                    half = ty * tile_size // 2
                    strip = _halve(np.concatenate(row, axis=1))
                    reduced[half : half + strip.shape[0]] = strip
                    yield from row

    levels: list[Any] = [Level0(), reduced]
    for _ in shapes[2:]:
        levels.append(_HalvedLevel(levels[-1]))
    write_pyramid_tiff(
        path, levels, mpp=mpp, tile_size=tile, compression="jpeg",
        compression_args={"level": _JPEG_QUALITY}, workers=workers,
    )
    return truth, shapes


class _HalvedLevel:
    """A pyramid level computed from the one above when first read (after that one was written)."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.shape = (-(-source.shape[0] // 2), -(-source.shape[1] // 2), 3)
        self._pixels: np.ndarray | None = None

    def __getitem__(self, index: Any) -> np.ndarray:
        if self._pixels is None:
            self._pixels = _halve(np.asarray(self.source[:, :]))
        return self._pixels[index]


# ----------------------------------------------------------------------------------------- dataset


def _draw_classes(rng: np.random.Generator, index: int) -> list[int]:
    """Candidate classes of patch ``index``: 1-3 tissue classes, always including ``index % 4`` so
    every class appears in every split, and sometimes background."""
    count = int(rng.choice(len(_CLASS_COUNT_PROBABILITY), p=_CLASS_COUNT_PROBABILITY)) + 1
    others = [c for c in range(_NUM_CLASSES) if c != index % _NUM_CLASSES]
    classes = [index % _NUM_CLASSES, *rng.choice(others, count - 1, replace=False).tolist()]
    if rng.uniform() < _PATCH_BACKGROUND_PROBABILITY:
        classes.append(_BACKGROUND)
    return classes


def _label(class_map: np.ndarray) -> list[int]:
    """The image-level label: which tissue classes the patch holds."""
    counts = np.bincount(class_map.ravel(), minlength=_NUM_CLASSES + 1)[:_NUM_CLASSES]
    return (counts > 0).astype(int).tolist()


def _write_split(folder: Path, split: str, count: int, size: int, seed: int) -> list[tuple[str, list[int]]]:
    """Write the patches of one split; return their image paths (relative to ``folder``) and labels."""
    written = []
    for i in range(count):
        rng = np.random.default_rng([seed, _PATCH_KEY, ("train", "val", "test").index(split), i])
        image, class_map = synthesize_patch(rng, size, _draw_classes(rng, i))
        label = _label(class_map)
        if split == "train":
            image_path = f"{split}/{split}{i:04d}-[{' '.join(str(v) for v in label)}].png"
        else:
            image_path = f"{split}/img/{split}{i:04d}.png"
            write_mask(folder / split / "mask" / f"{split}{i:04d}.png", class_map)
        Image.fromarray(image).save(folder / image_path)
        written.append((image_path, label))
    return written


def generate_histology_dataset(
    output_dir: str | os.PathLike,
    quick: bool = False,
    seed: int = 0,
    patch_size: int | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    slide_size: tuple[int, int] = _SLIDE_SIZE,
    slide_tile: int = _SLIDE_TILE,
    workers: int = 2,
) -> Path:
    """Write the synthetic dataset (layout in the module docstring) and return ``output_dir``.

    ``quick`` picks 96 training patches of 128 px and 16 validation and 16 test patches (a tiny CNN
    learns them in about a minute on a CPU); otherwise 480/64/64 patches of 224 px, LUAD-HistoSeg's
    size. ``patch_size`` and the counts override either setting. The slide is
    ``slide_size`` = (height, width) at level 0 in both settings (8192 x 9216 by default), rendered by
    ``workers`` threads.

    Deterministic: each patch depends only on ``seed``, its split and its index. The dataset is built
    beside ``output_dir`` and moved in place at the end; an existing ``output_dir`` is replaced only if
    it is empty or an earlier output of this generator.
    """
    setting = dict(_QUICK if quick else _DEFAULT)
    overrides = {"patch_size": patch_size, "n_train": n_train, "n_val": n_val, "n_test": n_test}
    setting.update({k: v for k, v in overrides.items() if v is not None})
    if setting["patch_size"] < 32:
        raise ValueError(f"patch_size must be at least 32 pixels, got {setting['patch_size']}")
    if min(setting["n_train"], setting["n_val"], setting["n_test"]) < 1:
        raise ValueError(f"every split needs at least one patch, got {setting}")
    output_dir = Path(output_dir)
    with synthetic_dataset_folder(output_dir, _GENERATOR, SUBFOLDERS) as staging:
        for sub in ("train", "val/img", "val/mask", "test/img", "test/mask", "slide"):
            (staging / sub).mkdir(parents=True)
        patches = {
            split: _write_split(staging, split, setting[f"n_{split}"], setting["patch_size"], seed)
            for split in ("train", "val", "test")
        }
        with open(staging / "train.jsonl", "w", encoding="utf-8") as manifest:
            for image_path, label in patches["train"]:
                record = {"image": image_path, "label": label, "split": "train", "mpp": PATCH_MPP}
                manifest.write(json.dumps(record) + "\n")
        truth, levels = write_synthetic_slide(
            staging / "slide" / "slide.tif", tuple(slide_size), slide_tile, SLIDE_MPP, seed, workers
        )
        write_mask(staging / "slide" / "slide_mask.png", truth)
        shares = np.round(np.bincount(truth.ravel(), minlength=_NUM_CLASSES + 1) / truth.size, 4)
        per_class = {
            split: dict(zip(DEFAULT_CLASS_NAMES, np.sum([label for _, label in written], axis=0).tolist()))
            for split, written in patches.items()
        }
        write_dataset_json(
            staging,
            _GENERATOR,
            {
                "format": "luad-histoseg",
                "seed": seed,
                "quick": quick,
                "class_names": list(DEFAULT_CLASS_NAMES),
                "background_index": _BACKGROUND,
                "ignore_index": 255,
                "patch_size": setting["patch_size"],
                "patch_mpp": PATCH_MPP,
                "min_class_fraction": MIN_CLASS_FRACTION,
                "splits": {
                    "train": {"images": "train", "manifest": "train.jsonl", "count": setting["n_train"]},
                    "val": {"images": "val/img", "masks": "val/mask", "count": setting["n_val"]},
                    "test": {"images": "test/img", "masks": "test/mask", "count": setting["n_test"]},
                },
                "patches_per_class": per_class,
                "slide": {
                    "image": "slide/slide.tif",
                    "mpp": SLIDE_MPP,
                    "levels": [list(shape) for shape in levels],
                    "tile": slide_tile,
                    "compression": "jpeg",
                    "mask": "slide/slide_mask.png",
                    "mask_downsample": MASK_DOWNSAMPLE,
                    "class_fractions": dict(zip((*DEFAULT_CLASS_NAMES, BACKGROUND), shares.tolist())),
                },
            },
        )
    return output_dir


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point for :func:`generate_histology_dataset`."""
    parser = argparse.ArgumentParser(
        prog="python -m common.data.synthetic.histology", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, help="dataset folder to (re)create")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller patches (same slide)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patch-size", type=int, default=None, help="patch side in pixels")
    parser.add_argument(
        "--slide-size", type=int, nargs=2, default=_SLIDE_SIZE, metavar=("HEIGHT", "WIDTH"), help="level 0"
    )
    parser.add_argument("--workers", type=int, default=2, help="threads rendering the slide")
    args = parser.parse_args(argv)
    output_dir = generate_histology_dataset(
        args.out,
        args.quick,
        args.seed,
        args.patch_size,
        slide_size=tuple(args.slide_size),
        workers=args.workers,
    )
    print(output_dir)


if __name__ == "__main__":
    main()
