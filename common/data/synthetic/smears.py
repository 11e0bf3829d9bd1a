"""Synthetic Papanicolaou-stained cervical smears with one annotated box per cell, for demos and tests.

Written in the layout of real data (``ROOT/<split>/images/*.png`` and ``annotations.csv`` with class
names, every box 100x100 pixels), so the demo goes through :func:`common.data.cytology.read_split`.

Images are composed in optical density and shown as transmitted light, ``I = I0 * exp(-OD)``, so
overlapping cells darken and mix their colours as stained cells do under a microscope. The classes
differ the way the Bethesda categories do, so a classifier has something real to learn:

* NILM: large flat polygonal squamous cell, cyan (intermediate) or pink (superficial), with a small
  round nucleus (low nuclear-to-cytoplasmic ratio);
* ASCUS: a squamous cell with a moderately enlarged, slightly darker nucleus;
* LSIL: koilocyte, an enlarged dark wrinkled nucleus (sometimes two) in a sharp perinuclear halo;
* ASCH: a small round metaplastic-like cell with a large nucleus;
* HSIL: a smaller cell still, nucleus filling most of it, dark coarse chromatin, irregular membrane;
* SCC: spindle, caudate or irregular cell with dense orange (keratinised) cytoplasm, inky nucleus;
* INFL: a cluster of neutrophils, small cells with dark multi-lobed nuclei and little cytoplasm;
* ENDO: a tight three-dimensional group of small cells with uniform round nuclei (honeycomb).

Around them lie red blood cells, mucus strands and specks of debris, on unevenly stained background,
with uneven focus, illumination and noise. Classes are imbalanced like the real training set (NILM
and INFL about 30 % each, ASC-US and ASC-H about 2 %), but each split holds every class at least
:data:`MIN_PER_CLASS` times, so per-class metrics exist.

Command line::

    python -m common.data.synthetic.smears --output data/cytology --n-train 8 --n-val 2 --n-test 2 \\
        --size 1024 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from common.data.cytology import ANNOTATION_COLUMNS, BETHESDA_CLASSES
from common.data.synthetic.output import SPLITS, synthetic_dataset_folder, write_dataset_json
from common.errors import InputDataError

__all__ = ["BOX_SIZE", "CLASS_PRIOR", "MIN_PER_CLASS", "generate_smear_dataset", "main", "synthesize_smear"]

BOX_SIZE = 100
# Annotation frequencies of the real training set: NILM and INFL about 30 % each, ASC-US and ASC-H,
# the uncertain categories, about 2 % each.
CLASS_PRIOR = {
    "NILM": 0.30,
    "ENDO": 0.04,
    "INFL": 0.30,
    "ASCUS": 0.02,
    "LSIL": 0.12,
    "HSIL": 0.12,
    "ASCH": 0.02,
    "SCC": 0.08,
}
MIN_PER_CLASS = 3
_GENERATOR = "common.data.synthetic.smears"
_OBJECTS_PER_PIXEL = 56 / 1024**2  # annotated cells or clusters per pixel of slide
# Per class, half the least distance in pixels between object centres: objects a and b stay at least
# spacing[a] + spacing[b] apart (less on slides too small for all their objects).
_SPACING = {"NILM": 26, "ENDO": 30, "INFL": 32, "ASCUS": 26, "LSIL": 28, "HSIL": 16, "ASCH": 20, "SCC": 24}
# Colour of each stain seen through a unit of it; stored as optical density -ln(colour / 255).
_STAIN_COLOURS = {
    "cyan": (140, 195, 205),  # cyanophilic cytoplasm (light green / Papanicolaou EA)
    "pink": (232, 150, 180),  # eosinophilic cytoplasm of superficial cells
    "orange": (236, 150, 55),  # keratin (Orange G)
    "haematoxylin": (72, 55, 125),  # nuclei
    "blood": (215, 85, 70),  # red blood cells
    "mucus": (195, 205, 230),
}

_Window = tuple[tuple[slice, slice], np.ndarray, np.ndarray]


class _Slide:
    """Optical density of a square slide, to which each object adds its stains."""

    def __init__(self, size: int, stains: dict[str, np.ndarray]) -> None:
        self.size = size
        self.stains = stains
        self.od = np.zeros((size, size, 3), dtype=np.float32)

    def window(self, cx: float, cy: float, reach: float) -> _Window | None:
        """Slices of the square of half-side ``reach`` around (cx, cy), with pixel offsets from the centre."""
        x0, x1 = max(0, int(cx - reach)), min(self.size, int(cx + reach) + 2)
        y0, y1 = max(0, int(cy - reach)), min(self.size, int(cy + reach) + 2)
        if x0 >= x1 or y0 >= y1:
            return None
        dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        return (slice(y0, y1), slice(x0, x1)), dx - cx, dy - cy

    def add(self, slices: tuple[slice, slice], density: np.ndarray, stain: str) -> None:
        self.od[slices] += np.clip(density, 0, None)[..., None] * self.stains[stain]


def _stains(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-slide stain vectors: batches of stain differ in strength and a little in hue."""
    stains = {}
    for name, rgb in _STAIN_COLOURS.items():
        optical_density = -np.log(np.asarray(rgb) / 255.0)
        strength, hue = rng.uniform(0.85, 1.15), rng.uniform(0.95, 1.05, 3)
        stains[name] = (optical_density * strength * hue).astype(np.float32)
    return stains


def _texture(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance noise smoothed at ``sigma`` pixels (chromatin, cytoplasm grain)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def _smooth_field(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Unit-variance random field varying over about ``scale`` pixels. It is smoothed on a grid 8 times
    coarser than ``scale`` and upsampled linearly: as smooth to the eye, and fast at any scale."""
    step = max(1, int(scale // 8))
    noise = rng.standard_normal((size // step + 2,) * 2)
    coarse = ndimage.gaussian_filter(noise, scale / (3 * step), mode="wrap")
    field = ndimage.zoom(coarse, step, order=1)[:size, :size].astype(np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


def _edge(distance_inside: np.ndarray, softness: float) -> np.ndarray:
    """Coverage 0..1 from the signed distance to a boundary (positive inside), anti-aliased."""
    return np.clip(distance_inside / softness + 0.5, 0.0, 1.0)


def _ellipse_radius(
    theta: np.ndarray, a: float, b: float, angle: float, wobble: np.ndarray, phase: np.ndarray
) -> np.ndarray:
    """Boundary radius at polar angle ``theta`` of an ellipse (semi-axes a, b, rotated by ``angle``)
    whose outline ripples with harmonics 1, 2, ... of amplitudes ``wobble``."""
    t = theta - angle
    radius = a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2)
    harmonics = np.arange(1, len(wobble) + 1, dtype=np.float32)
    return radius * (1 + (wobble * np.cos(harmonics * theta[..., None] + phase)).sum(axis=-1))


def _polygon_radius(theta: np.ndarray, vertex_angles: np.ndarray, vertex_radii: np.ndarray) -> np.ndarray:
    """Boundary radius at polar angle ``theta`` of the star-shaped polygon with the given vertices
    (angles increasing in [0, 2 pi)): where the ray meets the edge between its two vertices."""
    vertices = np.stack([np.cos(vertex_angles), np.sin(vertex_angles)], axis=1) * vertex_radii[:, None]
    index = (np.searchsorted(vertex_angles, np.mod(theta, 2 * np.pi), side="right") - 1) % len(vertices)
    v0, edge = vertices[index], vertices[(index + 1) % len(vertices)] - vertices[index]
    ux, uy = np.cos(theta), np.sin(theta)
    return (v0[..., 0] * edge[..., 1] - v0[..., 1] * edge[..., 0]) / (ux * edge[..., 1] - uy * edge[..., 0])


def _random_polygon(
    rng: np.random.Generator, radius: float, irregularity: float
) -> tuple[np.ndarray, np.ndarray]:
    """Vertex angles and radii of a polygon of 5 to 8 sides, like a flattened squamous cell."""
    n = int(rng.integers(5, 9))
    angles = np.sort(np.mod((np.arange(n) + rng.uniform(-0.25, 0.25, n)) * 2 * np.pi / n, 2 * np.pi))
    return angles, radius * rng.uniform(1 - irregularity, 1 + irregularity, n)


def _nucleus(
    slide: _Slide,
    rng: np.random.Generator,
    cx: float,
    cy: float,
    radius: float,
    darkness: float,
    coarseness: float = 0.15,
    irregularity: float = 0.03,
    elongation: float = 1.15,
    angle: float | None = None,
) -> None:
    """A haematoxylin-stained nucleus: oval, chromatin texture (coarser when ``coarseness`` is larger),
    a slightly darker membrane, and a wrinkled outline when ``irregularity`` is larger."""
    angle = rng.uniform(0, np.pi) if angle is None else angle
    a, b = radius * np.sqrt(elongation), radius / np.sqrt(elongation)
    window = slide.window(cx, cy, a * (1 + 4 * irregularity) + 2)
    if window is None:
        return
    slices, dx, dy = window
    boundary = _ellipse_radius(
        np.arctan2(dy, dx), a, b, angle, rng.uniform(0, irregularity, 4), rng.uniform(0, 2 * np.pi, 4)
    )
    inside = boundary - np.hypot(dx, dy)
    chromatin = 1 + coarseness * _texture(rng, dx.shape, 0.6 + 4 * coarseness)
    membrane = 0.3 * np.exp(-np.clip(inside, 0, None) / 1.2)
    slide.add(slices, _edge(inside, 0.8) * darkness * (chromatin + membrane), "haematoxylin")


def _squamous(
    slide: _Slide,
    rng: np.random.Generator,
    cx: float,
    cy: float,
    radius: float,
    stain: str,
    density: float,
    halo: float = 0.0,
) -> None:
    """Cytoplasm of a flat polygonal squamous cell around a nucleus at (cx, cy), with grain, a denser
    rim and sometimes a fold; ``halo > 0`` clears a perinuclear cavity of that radius (koilocyte)."""
    offset = rng.uniform(0, 0.2 * radius) * np.exp(1j * rng.uniform(0, 2 * np.pi))
    ox, oy = cx + offset.real, cy + offset.imag
    angles, radii = _random_polygon(rng, radius, 0.25)
    window = slide.window(ox, oy, radii.max() + 2)
    if window is None:
        return
    slices, dx, dy = window
    inside = _polygon_radius(np.arctan2(dy, dx), angles, radii) - np.hypot(dx, dy)
    rim = np.exp(-np.clip(inside, 0, None) / 2.5)
    cytoplasm = density * (1 + 0.1 * _texture(rng, dx.shape, 2.0) + 0.35 * rim)
    if rng.uniform() < 0.3:  # a fold: a thin line of doubled cytoplasm across the cell
        direction = rng.uniform(0, np.pi)
        distance = dx * np.sin(direction) - dy * np.cos(direction) - rng.uniform(-0.6, 0.6) * radius
        cytoplasm *= 1 + 0.8 * np.exp(-0.5 * (distance / 1.5) ** 2)
    if halo > 0:
        hx, hy = dx + offset.real, dy + offset.imag  # offsets from the nucleus
        halo_edge = _ellipse_radius(
            np.arctan2(hy, hx), halo * 1.15, halo / 1.15, rng.uniform(0, np.pi),
            rng.uniform(0, 0.06, 5), rng.uniform(0, 2 * np.pi, 5),
        )
        beyond = np.hypot(hx, hy) - halo_edge
        condensed = np.exp(-np.clip(beyond, 0, None) / 4) * (beyond > 0)  # dense cytoplasm around the halo
        cytoplasm *= 1 - 0.9 * _edge(-beyond, 1.0) + 0.6 * condensed
    slide.add(slices, _edge(inside, 1.5) * cytoplasm, stain)


def _round_cell(
    slide: _Slide, rng: np.random.Generator, cx: float, cy: float, radius: float, stain: str, density: float
) -> None:
    """Cytoplasm of a small round or oval cell (metaplastic or dysplastic) centred on (cx, cy)."""
    elongation = rng.uniform(1.0, 1.4)
    a, b = radius * np.sqrt(elongation), radius / np.sqrt(elongation)
    window = slide.window(cx, cy, a * 1.2 + 2)
    if window is None:
        return
    slices, dx, dy = window
    boundary = _ellipse_radius(
        np.arctan2(dy, dx), a, b, rng.uniform(0, np.pi), rng.uniform(0, 0.05, 4), rng.uniform(0, 2 * np.pi, 4)
    )
    inside = boundary - np.hypot(dx, dy)
    grain = 1 + 0.12 * _texture(rng, dx.shape, 1.5) + 0.25 * np.exp(-np.clip(inside, 0, None) / 2.0)
    slide.add(slices, _edge(inside, 1.0) * density * grain, stain)


def _blobs(
    dx: np.ndarray,
    dy: np.ndarray,
    centres: np.ndarray,
    radii: np.ndarray,
    elongation: np.ndarray,
    angles: np.ndarray,
) -> np.ndarray:
    """Coverage (n, h, w) of n small ellipses at once (neutrophil lobes, endometrial nuclei)."""
    ddx = dx[None] - centres[:, 0, None, None]
    ddy = dy[None] - centres[:, 1, None, None]
    cos, sin = np.cos(angles)[:, None, None], np.sin(angles)[:, None, None]
    stretch = np.sqrt(elongation)[:, None, None]
    u, v = (ddx * cos + ddy * sin) / stretch, (-ddx * sin + ddy * cos) * stretch
    return _edge(radii[:, None, None] - np.hypot(u, v), 0.8)


def _draw_nilm(slide: _Slide, rng: np.random.Generator, cx: float, cy: float) -> None:
    if rng.uniform() < 0.4:  # superficial cell: pink, small pyknotic nucleus
        _squamous(slide, rng, cx, cy, rng.uniform(36, 46), "pink", rng.uniform(0.35, 0.5))
        _nucleus(slide, rng, cx, cy, rng.uniform(2.4, 3.2), rng.uniform(1.4, 1.7), elongation=1.05)
    else:  # intermediate cell: cyan, small vesicular nucleus with fine chromatin
        _squamous(slide, rng, cx, cy, rng.uniform(34, 44), "cyan", rng.uniform(0.35, 0.55))
        _nucleus(slide, rng, cx, cy, rng.uniform(4.0, 5.2), rng.uniform(0.6, 0.8), coarseness=0.1)


def _draw_ascus(slide: _Slide, rng: np.random.Generator, cx: float, cy: float) -> None:
    stain = "pink" if rng.uniform() < 0.3 else "cyan"
    _squamous(slide, rng, cx, cy, rng.uniform(32, 42), stain, rng.uniform(0.35, 0.55))
    radius, darkness = rng.uniform(6.5, 8.0), rng.uniform(0.9, 1.1)
    _nucleus(slide, rng, cx, cy, radius, darkness, coarseness=0.18, irregularity=0.04)


def _draw_lsil(slide: _Slide, rng: np.random.Generator, cx: float, cy: float) -> None:
    radius = rng.uniform(7.5, 9.5)
    stain = "pink" if rng.uniform() < 0.4 else "cyan"
    halo = radius * rng.uniform(2.0, 2.6)
    _squamous(slide, rng, cx, cy, rng.uniform(34, 44), stain, rng.uniform(0.45, 0.6), halo=halo)
    if rng.uniform() < 0.25:  # binucleation
        shift = 0.8 * radius * np.exp(1j * rng.uniform(0, 2 * np.pi))
        nuclei = [(cx + sign * shift.real, cy + sign * shift.imag, 0.8 * radius) for sign in (-1, 1)]
    else:
        nuclei = [(cx, cy, radius)]
    for x, y, r in nuclei:
        _nucleus(slide, rng, x, y, r, rng.uniform(1.1, 1.3), coarseness=0.22, irregularity=0.08)


def _draw_asch(slide: _Slide, rng: np.random.Generator, cx: float, cy: float) -> None:
    _round_cell(slide, rng, cx, cy, rng.uniform(19, 25), "cyan", rng.uniform(0.7, 0.9))
    radius, darkness = rng.uniform(8.5, 10.5), rng.uniform(1.15, 1.35)
    _nucleus(slide, rng, cx, cy, radius, darkness, coarseness=0.28, irregularity=0.06)


def _draw_hsil(slide: _Slide, rng: np.random.Generator, cx: float, cy: float) -> None:
    radius = rng.uniform(10, 12.5)
    _round_cell(slide, rng, cx, cy, radius * rng.uniform(1.35, 1.6), "cyan", rng.uniform(0.75, 0.95))
    darkness = rng.uniform(1.45, 1.75)
    _nucleus(slide, rng, cx, cy, radius, darkness, coarseness=0.38, irregularity=0.1, elongation=1.25)


def _draw_scc(slide: _Slide, rng: np.random.Generator, cx: float, cy: float) -> None:
    angle = rng.uniform(0, np.pi)
    if rng.uniform() < 0.7:  # keratinised spindle or tadpole cell
        a, b = rng.uniform(30, 44), rng.uniform(7, 11)
        wobble = np.array([rng.uniform(0.1, 0.35), 0.0, rng.uniform(0, 0.06)])
    else:  # irregular keratinised cell
        a, b = rng.uniform(20, 28), rng.uniform(14, 20)
        wobble = rng.uniform(0, 0.15, 4)
    window = slide.window(cx, cy, a * (1 + wobble.sum()) + 2)
    if window is not None:
        slices, dx, dy = window
        theta = np.arctan2(dy, dx)
        phase = -angle * np.arange(1, len(wobble) + 1)  # the tail and bulges lie along the long axis
        inside = _ellipse_radius(theta, a, b, angle, wobble, phase) - np.hypot(dx, dy)
        keratin = rng.uniform(0.9, 1.2) * (1 + 0.15 * _texture(rng, dx.shape, 1.5))
        slide.add(slices, _edge(inside, 1.0) * keratin, "orange")
    _nucleus(
        slide, rng, cx, cy, rng.uniform(7, 10), rng.uniform(1.7, 2.0),
        coarseness=0.3, irregularity=0.12, elongation=rng.uniform(1.5, 2.5), angle=angle,
    )


def _draw_infl(slide: _Slide, rng: np.random.Generator, cx: float, cy: float) -> None:
    """A cluster of neutrophils: pale round cytoplasm, 2 to 4 dark nuclear lobes in a C-shaped chain."""
    n = int(rng.integers(8, 19))
    window = slide.window(cx, cy, 44)
    if window is None:
        return
    slices, dx, dy = window
    centres = np.clip(rng.normal(0, rng.uniform(8, 12), (n, 2)), -30, 30)
    ones = np.ones(n)
    cells = _blobs(dx, dy, centres, rng.uniform(5.0, 6.5, n), ones, ones).sum(axis=0)
    slide.add(slices, cells * rng.uniform(0.4, 0.55) * (1 + 0.1 * _texture(rng, dx.shape, 1.0)), "pink")
    n_lobes = rng.integers(2, 5, n)
    start = rng.uniform(0, 2 * np.pi, n)
    lobe_cell = np.repeat(np.arange(n), n_lobes)
    lobe_index = np.concatenate([np.arange(k) for k in n_lobes]) - (n_lobes[lobe_cell] - 1) / 2
    lobe_angle = start[lobe_cell] + 1.1 * lobe_index
    lobes = centres[lobe_cell] + 2.4 * np.stack([np.cos(lobe_angle), np.sin(lobe_angle)], axis=1)
    m = len(lobes)
    lobe_radii, lobe_elongation = rng.uniform(1.7, 2.3, m), rng.uniform(1.0, 1.4, m)
    nuclei = _blobs(dx, dy, lobes, lobe_radii, lobe_elongation, rng.uniform(0, np.pi, m))
    slide.add(slices, nuclei.sum(axis=0) * rng.uniform(1.4, 1.7), "haematoxylin")


def _draw_endo(slide: _Slide, rng: np.random.Generator, cx: float, cy: float) -> None:
    """A three-dimensional group of small endometrial cells: a dense cyan ball packed with uniform round
    nuclei on a honeycomb lattice, a second layer overlapping near the middle."""
    a = rng.uniform(22, 30)
    b = a * rng.uniform(0.7, 0.9)
    angle = rng.uniform(0, np.pi)
    wobble, phase = rng.uniform(0, 0.06, 4), rng.uniform(0, 2 * np.pi, 4)
    window = slide.window(cx, cy, a * 1.25 + 2)
    if window is None:
        return
    slices, dx, dy = window
    rho = np.hypot(dx, dy)
    boundary = _ellipse_radius(np.arctan2(dy, dx), a, b, angle, wobble, phase)
    group = _edge(boundary - rho, 1.0)
    depth = np.clip(1 - rho / boundary, 0, 1)
    slide.add(slices, group * rng.uniform(0.5, 0.65) * (0.7 + 0.6 * depth), "cyan")

    spacing = rng.uniform(7.0, 8.5)
    i, j = np.mgrid[-5:6, -5:6].reshape(2, -1)
    lattice = np.stack([i + 0.5 * j, j * np.sqrt(3) / 2], axis=1) * spacing
    second = lattice[rng.uniform(size=len(lattice)) < 0.45] + spacing * np.array([0.5, np.sqrt(3) / 6])
    rotation = rng.uniform(0, np.pi)
    turn = np.array([[np.cos(rotation), -np.sin(rotation)], [np.sin(rotation), np.cos(rotation)]])
    points = np.concatenate([lattice, second]) @ turn.T + rng.normal(0, 0.6, (len(lattice) + len(second), 2))
    first_layer = np.arange(len(points)) < len(lattice)
    point_boundary = _ellipse_radius(np.arctan2(points[:, 1], points[:, 0]), a, b, angle, wobble, phase)
    reach = np.where(first_layer, point_boundary - 3.0, 0.6 * point_boundary)
    points = points[np.hypot(points[:, 0], points[:, 1]) < reach]
    m = len(points)
    radii = rng.uniform(2.8, 3.4) * rng.uniform(0.95, 1.05, m)  # uniform nuclei, unlike dysplastic ones
    nuclei = _blobs(dx, dy, points, radii, rng.uniform(1.0, 1.25, m), rng.uniform(0, np.pi, m)).sum(axis=0)
    chromatin = rng.uniform(1.0, 1.2) * (1 + 0.1 * _texture(rng, dx.shape, 0.7))
    slide.add(slices, nuclei * chromatin, "haematoxylin")


_RENDERERS: dict[str, Callable[[_Slide, np.random.Generator, float, float], None]] = {
    "NILM": _draw_nilm,
    "ENDO": _draw_endo,
    "INFL": _draw_infl,
    "ASCUS": _draw_ascus,
    "LSIL": _draw_lsil,
    "HSIL": _draw_hsil,
    "ASCH": _draw_asch,
    "SCC": _draw_scc,
}


def _place(rng: np.random.Generator, classes: Sequence[str], size: int) -> np.ndarray:
    """(n, 2) centres (x, y), kept apart by the spacing of each class.

    Most candidates gather around a few random points, so crowded sheets and empty glass lie side by
    side as on a real smear. The spacing shrinks when the slide is too small for all the objects, so
    neighbouring cells overlap more but every object is placed.
    """
    if not classes:
        return np.zeros((0, 2))
    margin = min(12.0, size / 8)
    spacing = np.array([_SPACING[name] for name in classes], dtype=np.float64)
    centres = np.zeros((len(classes), 2))
    n_candidates = 40 * len(classes)
    sheets = rng.uniform(0, size, (int(rng.integers(3, 7)), 2))
    crowded = sheets[rng.integers(0, len(sheets), n_candidates)] + rng.normal(0, size / 7, (n_candidates, 2))
    scattered = rng.uniform(0, size, (n_candidates, 2))
    candidates = np.where(rng.uniform(size=(n_candidates, 1)) < 0.6, crowded, scattered)
    candidates = candidates[((candidates >= margin) & (candidates < size - margin)).all(axis=1)]
    scale = 1.0
    while True:
        placed = 0
        for candidate in candidates:
            gaps = np.hypot(*(centres[:placed] - candidate).T) - scale * (spacing[:placed] + spacing[placed])
            if placed == 0 or gaps.min() >= 0:
                centres[placed] = candidate
                placed += 1
                if placed == len(classes):
                    return centres
        scale *= 0.85


def _background(slide: _Slide, rng: np.random.Generator) -> None:
    """Uneven background staining, mucus strands, red blood cells and specks of debris."""
    size = slide.size
    haze = 0.04 + 0.03 * _smooth_field(rng, size, 200)
    slide.od += np.clip(haze, 0, None)[..., None] * (0.5 * slide.stains["cyan"] + 0.5 * slide.stains["pink"])

    level = _smooth_field(rng, size, rng.uniform(60, 120))  # mucus: thin strands along its zero contours
    gy, gx = np.gradient(level)
    strands = np.exp(-0.5 * (level / (np.hypot(gx, gy) * rng.uniform(1.5, 3.0) + 1e-6)) ** 2)
    patches = np.clip(_smooth_field(rng, size, 250), 0, None)
    slide.od += (0.35 * strands * patches)[..., None] * slide.stains["mucus"]

    specks = (rng.uniform(size=(size, size)) < 8e-5) * rng.uniform(0.5, 1.5, (size, size))
    specks = ndimage.gaussian_filter(specks.astype(np.float32), 1.2)
    slide.od += (specks * 8.0)[..., None] * slide.stains["haematoxylin"]

    n_blood = int(rng.integers(5, 40) * size**2 / 1024**2) + 1
    for x, y in rng.uniform(0, size, (n_blood, 2)):
        radius = rng.uniform(3.5, 4.5)
        window = slide.window(x, y, radius + 2)
        if window is not None:
            slices, dx, dy = window
            rho = np.hypot(dx, dy)
            biconcave = 0.6 + 0.4 * np.clip(rho / radius, 0, 1) ** 2  # paler centre
            slide.add(slices, _edge(radius - rho, 0.8) * rng.uniform(0.4, 0.6) * biconcave, "blood")


def _optics(rng: np.random.Generator, od: np.ndarray) -> np.ndarray:
    """Transmitted light through the stains, with uneven focus and illumination, and camera noise."""
    size = od.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    lamp = rng.uniform(235, 250) * (1 - rng.uniform(0.05, 0.15) * (xx**2 + yy**2) * 2)
    image = lamp[..., None] * np.exp(-od)
    sharp = ndimage.gaussian_filter(image, (0.6, 0.6, 0))
    blurred = ndimage.gaussian_filter(image, (rng.uniform(1.5, 2.5),) * 2 + (0,))
    focus = np.clip(0.6 + 0.5 * _smooth_field(rng, size, 300), 0, 1)[..., None]
    image = focus * sharp + (1 - focus) * blurred
    image += rng.normal(0, rng.uniform(1.5, 3.0), image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def synthesize_smear(
    rng: np.random.Generator, classes: Sequence[str], size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic smear (size x size x 3 uint8) holding one object of each entry of ``classes``.

    Returns:
        the image and the (n, 2) float centres (x, y) in pixels of the objects, in the order of ``classes``:
        the nucleus of a single cell, the middle of a cluster.
    """
    unknown = sorted(set(classes) - set(_RENDERERS))
    if unknown:
        raise ValueError(f"unknown classes {unknown}; expected names among {list(_RENDERERS)}")
    slide = _Slide(size, _stains(rng))
    centres = _place(rng, classes, size)
    for name, (x, y) in zip(classes, centres):
        _RENDERERS[name](slide, rng, float(x), float(y))
    _background(slide, rng)
    return _optics(rng, slide.od), centres


def _split_classes(rng: np.random.Generator, n_images: int, size: int) -> list[list[str]]:
    """Class names of the objects of each image of a split: counts follow :data:`CLASS_PRIOR` over the
    split, every class at least :data:`MIN_PER_CLASS` times, NILM taking the rest."""
    per_image = np.round(_OBJECTS_PER_PIXEL * size**2 * rng.uniform(0.8, 1.2, n_images))
    per_image = np.maximum(1, per_image).astype(int)
    counts = {name: max(MIN_PER_CLASS, int(p * per_image.sum())) for name, p in CLASS_PRIOR.items() if name != "NILM"}
    shortfall = sum(counts.values()) + MIN_PER_CLASS - int(per_image.sum())  # NILM needs its minimum too
    if shortfall > 0:
        per_image += shortfall // n_images + (np.arange(n_images) < shortfall % n_images)
    counts["NILM"] = int(per_image.sum()) - sum(counts.values())
    names = np.array([name for name in BETHESDA_CLASSES for _ in range(counts[name])])
    names = rng.permutation(names)
    return [chunk.tolist() for chunk in np.split(names, np.cumsum(per_image)[:-1])]


def _annotation_csv(rows: list[tuple[str, float, float, str]]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(ANNOTATION_COLUMNS)
    writer.writerows((name, f"{x:.1f}", f"{y:.1f}", BOX_SIZE, BOX_SIZE, label) for name, x, y, label in rows)
    return text.getvalue()


def generate_smear_dataset(
    output_dir: str | os.PathLike,
    n_train: int = 8,
    n_val: int = 2,
    n_test: int = 2,
    size: int = 1024,
    seed: int = 0,
) -> Path:
    """Write ``output_dir/{train,val,test}/images/NNN.png`` with ``annotations.csv`` (class names, 100x100
    boxes centred on each cell or cluster), plus ``dataset.json`` with the settings and class counts.
    A split of 0 images is left out.

    Deterministic in its arguments. The dataset is built beside ``output_dir`` and moved in place at the
    end; an existing ``output_dir`` is replaced only if it is empty or an earlier output of this generator.

    Raises:
        ValueError: a negative image count, or ``size`` under 128 pixels (too small for a 100-pixel box).
        InputDataError: ``output_dir`` exists and holds something else.
    """
    counts = dict(zip(SPLITS, (n_train, n_val, n_test)))
    if min(counts.values()) < 0:
        raise ValueError(f"image counts must be non-negative, got {counts}")
    if size < 128:
        raise ValueError(f"size must be at least 128 pixels, got {size}")
    output_dir = Path(output_dir)
    with synthetic_dataset_folder(output_dir, _GENERATOR) as staging:
        class_counts: dict[str, dict[str, int]] = {}
        for split_index, (split, count) in enumerate(counts.items()):
            if count == 0:  # no folder: an annotation CSV without rows is not a readable split
                continue
            (staging / split / "images").mkdir(parents=True)
            per_image = _split_classes(np.random.default_rng([seed, split_index]), count, size)
            rows = []
            for i, classes in enumerate(per_image):
                rng = np.random.default_rng([seed, split_index, i])
                image, centres = synthesize_smear(rng, classes, size)
                name = f"{i:03d}.png"
                Image.fromarray(image).save(staging / split / "images" / name)
                rows += [(name, x, y, label) for label, (x, y) in zip(classes, centres)]
            (staging / split / "annotations.csv").write_text(_annotation_csv(rows), encoding="utf-8")
            labels = [label for *_, label in rows]
            class_counts[split] = {name: labels.count(name) for name in BETHESDA_CLASSES}
        settings = {
            "format": "cytology_csv",
            "seed": seed,
            "size": size,
            "box_size": BOX_SIZE,
            "classes": list(BETHESDA_CLASSES),
            "splits": counts,
            "class_counts": class_counts,
        }
        write_dataset_json(staging, _GENERATOR, settings)
    return output_dir


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point for :func:`generate_smear_dataset`."""
    parser = argparse.ArgumentParser(
        prog="python -m common.data.synthetic.smears", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output", required=True, help="dataset folder to (re)create")
    parser.add_argument("--n-train", type=int, default=8)
    parser.add_argument("--n-val", type=int, default=2)
    parser.add_argument("--n-test", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024, help="side of the square images, in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        path = generate_smear_dataset(
            args.output, args.n_train, args.n_val, args.n_test, args.size, args.seed
        )
    except InputDataError as err:
        raise SystemExit(f"error: {err}") from err
    print(f"wrote {args.n_train}/{args.n_val}/{args.n_test} train/val/test smears to {path}")


if __name__ == "__main__":
    main()
