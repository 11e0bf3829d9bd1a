"""Synthetic microscopy with exact instance labels, written in the Cellpose folder layout.

The demo and the tests read these images through the same reader as real data
(:func:`common.data.cell_readers.read_cellpose_folder`). They are built to be a fair test of a
learned model against classical watershed: cells of varied size and shape packed so that many touch
and some overlap (the later cell occludes; labels describe what is visible), texture inside cells,
uneven illumination, shot and read noise, and blur. Each image has one of the looks users meet:

* ``phase``: phase contrast, dark cells with bright halos on grey;
* ``fluorescence_cytoplasm``: whole cells bright on a dark background, some too dim for Otsu;
* ``fluorescence_nuclei``: small round nuclei bright on a dark background (Poisson noise dominates);
* ``brightfield``: low-contrast cells with dark rims on a bright background.

Crowding goes from ``sparse`` (isolated cells) to ``confluent`` (cells filling the image, overlapping),
and images are written with 8 or 16 bits per pixel, as microscopes save them.

Images are rendered *from* the final label image, so the labels are exact by construction.

Command line::

    python -m common.data.synthetic.cells --output data/microscopy --n-train 16 --n-val 4 --n-test 4 \\
        --size 256 256 --seed 0 --look phase fluorescence_nuclei --density medium --bit-depth 8
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from common.data.distance_map import instance_distance_transform
from common.data.synthetic.output import SPLITS, synthetic_dataset_folder, write_dataset_json
from common.errors import InputDataError

__all__ = [
    "BIT_DEPTHS",
    "DENSITIES",
    "LOOKS",
    "generate_cell_dataset",
    "main",
    "synthesize_cell_image",
    "voronoi_labels",
]

LOOKS = ("phase", "fluorescence_cytoplasm", "fluorescence_nuclei", "brightfield")
BIT_DEPTHS = (8, 16)
# density -> (acceptance floor, weight of the random density field, spacing as a fraction of the two radii):
# below 1 neighbours touch and overlap, above 1 they keep apart
DENSITIES = {"sparse": (0.02, 0.25, 1.3), "medium": (0.3, 1.0, 0.8), "confluent": (1.0, 0.0, 0.7)}
_GENERATOR = "common.data.synthetic.cells"
_HARMONICS = np.arange(2, 5)  # boundary wobble: 2- to 4-fold, smooth at the scale of a cell
# look -> (range of the typical radius in pixels, range of elongation); nuclei are smaller and rounder
_SHAPES = {"fluorescence_nuclei": ((6.0, 9.0), (1.0, 1.5))}
_CELL_SHAPE = ((9.0, 14.0), (1.0, 2.2))


def _place_cells(
    rng: np.random.Generator, size: tuple[int, int], look: str, density: str
) -> dict[str, np.ndarray]:
    """Cell centres, semi-axes, orientations and boundary harmonics.

    Centres are drawn one by one and kept when far enough from earlier cells (a fraction of the sum
    of their radii set by ``density``) and when a smooth random density field accepts them, which
    leaves crowded clusters and empty background side by side.
    """
    height, width = size
    (radius_low, radius_high), (elongation_low, elongation_high) = _SHAPES.get(look, _CELL_SHAPE)
    floor, field_weight, spacing = DENSITIES[density]
    base_radius = rng.uniform(radius_low, radius_high)  # pixels, as at a fixed magnification
    n_candidates = int(4 * height * width / (np.pi * base_radius**2))
    centres = rng.uniform((0, 0), (height, width), size=(n_candidates, 2))
    radii = base_radius * rng.lognormal(0.0, 0.25, size=n_candidates)
    field = ndimage.zoom(rng.uniform(size=(4, 4)), 2, order=1)  # coarse field, 8x8 cells of the image
    accept = rng.uniform(size=n_candidates) < floor + field_weight * field[
        (centres[:, 0] * 8 / height).astype(int), (centres[:, 1] * 8 / width).astype(int)
    ]
    kept: list[int] = []
    for i in np.flatnonzero(accept):
        gaps = np.hypot(*(centres[kept] - centres[i]).T) - spacing * (radii[kept] + radii[i])
        if not kept or gaps.min() >= 0:
            kept.append(i)
    n = len(kept)
    elongation = rng.uniform(elongation_low, elongation_high, size=n)
    return {
        "centre": centres[kept],
        "axes": np.stack([radii[kept] * np.sqrt(elongation), radii[kept] / np.sqrt(elongation)], axis=1),
        "angle": rng.uniform(0, np.pi, size=n),
        "wobble": rng.uniform(0.0, 0.08, size=(n, len(_HARMONICS))),
        "phase": rng.uniform(0, 2 * np.pi, size=(n, len(_HARMONICS))),
    }


def _draw_labels(cells: dict[str, np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Paint the cells in order (later ones occlude earlier), keep each cell's largest visible piece,
    drop cells left with under a third of their area, and number the rest 1..n."""
    height, width = size
    labels = np.zeros(size, dtype=np.int32)
    drawn_area = np.zeros(len(cells["centre"]) + 1)
    for k, ((cy, cx), (a, b), angle, wobble, phase) in enumerate(
        zip(cells["centre"], cells["axes"], cells["angle"], cells["wobble"], cells["phase"]), start=1
    ):
        reach = a * (1 + wobble.sum())
        y0, y1 = max(0, int(cy - reach)), min(height, int(cy + reach) + 2)
        x0, x1 = max(0, int(cx - reach)), min(width, int(cx + reach) + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / a
        v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / b
        theta = np.arctan2(v, u)[..., None]
        boundary = 1 + (wobble * np.cos(_HARMONICS * theta + phase)).sum(axis=-1)
        inside = np.hypot(u, v) < boundary
        labels[y0:y1, x0:x1][inside] = k
        drawn_area[k] = inside.sum()

    kept = np.zeros_like(labels)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        pieces, n_pieces = ndimage.label(labels[box] == k)
        if n_pieces == 0:
            continue
        piece_areas = np.bincount(pieces.ravel())[1:]
        if piece_areas.max() >= drawn_area[k] / 3:
            kept[box][pieces == np.argmax(piece_areas) + 1] = k
    ids = np.unique(kept)
    lut = np.zeros(kept.max() + 1, dtype=np.int32)
    lut[ids] = np.arange(len(ids))  # ids[0] is background 0
    return lut[kept]


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(size), sigma)
    return field / (field.std() + 1e-12)


def _illumination(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Uneven lighting: a tilted plane times a vignette with a randomly placed centre."""
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    tilt = 1 + rng.uniform(-0.2, 0.2) * (yy - 0.5) + rng.uniform(-0.2, 0.2) * (xx - 0.5)
    cy, cx = rng.uniform(0.3, 0.7, size=2) * np.array(size) / max(height, width)
    vignette = 1 - rng.uniform(0.1, 0.3) * ((yy - cy) ** 2 + (xx - cx) ** 2) / 0.5
    return tilt * vignette


def _render(rng: np.random.Generator, labels: np.ndarray, look: str) -> np.ndarray:
    """Float image in about [0, 1] rendered from instance labels."""
    n = int(labels.max())
    inside = labels > 0
    depth = instance_distance_transform(labels)  # pixels to the cell's own edge
    peak = np.ones(n + 1)
    np.maximum.at(peak, labels.ravel(), depth.ravel())
    centrality = depth / peak[labels]  # 0 outside, 1 at each cell's deepest point
    nucleus_level = rng.uniform(0.45, 0.7, size=n + 1)[labels]
    nucleus = np.clip((centrality - nucleus_level) / 0.15, 0, 1) * inside
    granules = _smooth_noise(rng, labels.shape, 1.0) * inside
    edge = np.exp(-depth / 1.2) * inside  # thin rim along every cell boundary, touching ones included
    outside = ndimage.distance_transform_edt(~inside)

    if look == "phase":
        contrast = rng.uniform(0.15, 0.35, size=n + 1)[labels]
        body = np.clip(depth / 3.0, 0, 1)
        halo = np.exp(-outside / rng.uniform(1.5, 3.0)) * ~inside
        image = 0.5 - contrast * (0.4 + 0.6 * body) * inside - 0.1 * nucleus + 0.3 * edge + 0.35 * halo
        image += 0.04 * granules
        peak_photons = rng.uniform(150, 400)
    elif look == "brightfield":
        contrast = rng.uniform(0.05, 0.15, size=n + 1)[labels]
        rim = np.exp(-np.minimum(depth, outside) / 1.0)  # dark outline on both sides of the membrane
        image = 0.75 - contrast * inside - 0.12 * nucleus - 0.2 * rim * rng.uniform(0.6, 1.0)
        image += 0.03 * granules
        peak_photons = rng.uniform(300, 800)
    else:  # fluorescence: bright cells on black, a quarter of them dim
        dim = rng.uniform(size=n + 1) < 0.25
        brightness = np.where(dim, rng.uniform(0.1, 0.2, size=n + 1), rng.uniform(0.45, 1.0, size=n + 1))
        if look == "fluorescence_nuclei":  # chromatin: flat-topped, textured, sharp-edged
            profile = (0.8 + 0.2 * np.sqrt(centrality)) * (1 + 0.25 * granules)
        else:
            profile = (0.55 + 0.45 * np.sqrt(centrality) + 0.3 * nucleus) * (1 - 0.4 * edge)
            profile *= 1 + 0.12 * granules
        image = 0.04 + brightness[labels] * profile * inside
        peak_photons = rng.uniform(40, 120)
    image *= _illumination(rng, labels.shape)
    image = ndimage.gaussian_filter(image, rng.uniform(0.5, 1.2))
    image = rng.poisson(np.clip(image, 0, None) * peak_photons) / peak_photons
    return image + rng.normal(0, 0.01, size=image.shape)


def _check_choice(name: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _choices(name: str, value: str | Sequence[str], allowed: Sequence[str]) -> list[str]:
    """``value`` as a non-empty list of allowed names (one name, or several that images pick from)."""
    values = [value] if isinstance(value, str) else list(value)
    if not values:
        raise ValueError(f"{name} needs at least one of {list(allowed)}")
    for item in values:
        _check_choice(name, item, allowed)
    return values


def synthesize_cell_image(
    rng: np.random.Generator,
    size: tuple[int, int] = (256, 256),
    look: str = "phase",
    density: str = "medium",
    bit_depth: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image (HxW uint8 or uint16) and its instance labels (HxW int32, ids 1..n).

    Args:
        rng: source of randomness; the result is a function of its state.
        size: (height, width).
        look: one of :data:`LOOKS`.
        density: one of :data:`DENSITIES`, from isolated cells to a confluent layer.
        bit_depth: 8 or 16; 16-bit images use 12 bits of range, as most scientific cameras do.
    """
    _check_choice("look", look, LOOKS)
    _check_choice("density", density, tuple(DENSITIES))
    _check_choice("bit_depth", bit_depth, BIT_DEPTHS)
    labels = _draw_labels(_place_cells(rng, size, look, density), size)
    image = np.clip(_render(rng, labels, look), 0, 1)
    if bit_depth == 16:
        return np.round(image * 4095).astype(np.uint16), labels
    return np.round(image * 255).astype(np.uint8), labels


def voronoi_labels(
    shape: tuple[int, int], n_cells: int, seed: int = 0, foreground: float = 0.7
) -> np.ndarray:
    """Densely touching cells for tests and benchmarks: the Voronoi cells of ``n_cells`` random
    seeds, with about ``1 - foreground`` of the image (smooth blobs) set to background."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, dtype=np.int32)
    seeds[rng.integers(0, shape[0], n_cells), rng.integers(0, shape[1], n_cells)] = np.arange(1, n_cells + 1)
    nearest = ndimage.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
    labels = seeds[nearest[0], nearest[1]]
    blobs = _smooth_noise(rng, shape, max(shape) / 30)
    labels[blobs < np.quantile(blobs, 1 - foreground)] = 0
    return labels


def generate_cell_dataset(
    output_dir: str | os.PathLike,
    n_train: int = 16,
    n_val: int = 4,
    n_test: int = 4,
    size: Sequence[int] = (256, 256),
    seed: int = 0,
    look: str | Sequence[str] = "phase",
    density: str | Sequence[str] = "medium",
    bit_depth: int = 8,
) -> Path:
    """Write a synthetic dataset as ``output_dir/{train,val,test}/NNN_img.png`` (grey, ``bit_depth``
    bits) and ``NNN_masks.png`` (16-bit instance ids), plus ``dataset.json`` with the settings.

    Deterministic: image ``i`` of a split depends only on the arguments, the split and ``i``. The
    dataset is built beside ``output_dir`` and moved in place at the end; an existing ``output_dir`` is
    replaced only if it is empty or an earlier output of this generator.

    Args:
        look: one of :data:`LOOKS`, or several, in which case each image picks one at random.
        density: one of :data:`DENSITIES`, or several, in which case each image picks one at random (a
            model trained on sparse images too learns what bare background looks like).
        bit_depth: 8 or 16.
    """
    looks = _choices("look", look, LOOKS)
    densities = _choices("density", density, tuple(DENSITIES))
    _check_choice("bit_depth", bit_depth, BIT_DEPTHS)
    size = (int(size[0]), int(size[1]))
    if min(size) < 32:
        raise ValueError(f"size must be at least 32x32 pixels, got {size}")
    output_dir = Path(output_dir)
    with synthetic_dataset_folder(output_dir, _GENERATOR) as staging:
        counts = dict(zip(SPLITS, (n_train, n_val, n_test)))
        for split_index, (split, count) in enumerate(counts.items()):
            (staging / split).mkdir()
            for i in range(count):
                rng = np.random.default_rng([seed, split_index, i])
                image_look = str(rng.choice(looks)) if len(looks) > 1 else looks[0]
                image_density = str(rng.choice(densities)) if len(densities) > 1 else densities[0]
                image, labels = synthesize_cell_image(rng, size, image_look, image_density, bit_depth)
                Image.fromarray(image).save(staging / split / f"{i:03d}_img.png")
                Image.fromarray(labels.astype(np.uint16)).save(staging / split / f"{i:03d}_masks.png")
        settings = {
            "format": "cellpose",
            "seed": seed,
            "size": list(size),
            "look": looks,
            "density": densities if len(densities) > 1 else densities[0],
            "bit_depth": bit_depth,
            "splits": counts,
        }
        write_dataset_json(staging, _GENERATOR, settings)
    return output_dir


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point for :func:`generate_cell_dataset`."""
    parser = argparse.ArgumentParser(
        prog="python -m common.data.synthetic.cells", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output", required=True, help="dataset folder to (re)create")
    parser.add_argument("--n-train", type=int, default=16)
    parser.add_argument("--n-val", type=int, default=4)
    parser.add_argument("--n-test", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--look", choices=LOOKS, nargs="+", default=["phase"], help="one or more; each image picks one"
    )
    parser.add_argument(
        "--density", choices=tuple(DENSITIES), nargs="+", default=["medium"], help="one or more; each image picks one"
    )
    parser.add_argument("--bit-depth", type=int, choices=BIT_DEPTHS, default=8)
    args = parser.parse_args(argv)
    try:
        path = generate_cell_dataset(
            args.output, args.n_train, args.n_val, args.n_test, args.size, args.seed,
            args.look, args.density if len(args.density) > 1 else args.density[0], args.bit_depth,
        )
    except InputDataError as err:
        raise SystemExit(f"error: {err}") from err
    print(f"wrote {args.n_train}/{args.n_val}/{args.n_test} train/val/test images to {path}")


if __name__ == "__main__":
    main()
