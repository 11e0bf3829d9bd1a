"""Synthetic dermoscopy photographs with exact lesion masks, written in the ISIC layout.

The demo and the tests read them through the real reader (:func:`common.data.dermoscopy.read_isic_folder`).
Each image imitates what makes real dermoscopy hard to segment: textured skin of varied tone, hairs
crossing the lesion, a ruler's scale marks along an edge, the dark circular vignette of a contact
dermoscope, the colour cast of each camera's white balance, lesions with irregular borders and
variegated colour (brown, black and blue-grey patches, a lighter rim), and sometimes a second lesion. Masks are the drawn lesion regions, so they are exact by construction.

Layout::

    output_dir/labelled/ISIC_0000000.jpg, ISIC_0000000_segmentation.png (0/255), ...
    output_dir/unlabelled/ISIC_<n_labelled + i>.jpg, ...
    output_dir/dataset.json

Command line::

    python -m common.data.synthetic.dermoscopy --output data/dermoscopy --n-labelled 20 --n-unlabelled 20
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from common.data.dermoscopy import ISIC_MASK_SUFFIX
from common.data.synthetic.output import synthetic_dataset_folder, write_dataset_json

__all__ = ["SUBFOLDERS", "generate_dermoscopy_dataset", "main", "synthesize_dermoscopy_image"]

SUBFOLDERS = ("labelled", "unlabelled")
_GENERATOR = "common.data.synthetic.dermoscopy"
_SKIN_TONES = np.array([[232, 190, 165], [215, 160, 125], [185, 130, 95], [150, 100, 70]], dtype=np.float32)
_LESION_COLOURS = {
    "light_brown": np.array([160, 105, 70], dtype=np.float32),
    "dark_brown": np.array([95, 55, 35], dtype=np.float32),
    "black": np.array([35, 25, 25], dtype=np.float32),
    "blue_grey": np.array([105, 115, 135], dtype=np.float32),
}
_HARMONICS = np.arange(2, 9)  # border irregularity, from lobes to fine notches
_TWO_LESION_PROBABILITY = 0.3
_JPEG_QUALITY = 92
_RULER_PROBABILITY = 0.3
_WHITE_BALANCE_RANGE = (0.88, 1.12)  # per-channel gain: the colour cast differs between devices


def _smooth_field(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian-smoothed noise rescaled to [0, 1]: blotches about ``sigma`` pixels across."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma)
    return (field - field.min()) / max(float(np.ptp(field)), 1e-6)


def _skin(rng: np.random.Generator, size: int) -> np.ndarray:
    """HxWx3 float skin: a random tone with blotchy redness and pore-scale texture."""
    weights = rng.dirichlet(np.ones(len(_SKIN_TONES)) * 0.5)
    tone = weights @ _SKIN_TONES
    blotches = _smooth_field(rng, size, size / 8)[..., None] - 0.5
    redness = np.array([12.0, -10.0, -8.0], dtype=np.float32)
    texture = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 0.8)[..., None]
    return tone + blotches * redness * 2 + texture * 6.0


def _lesion_region(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float) -> np.ndarray:
    """Normalised radius (< 1 inside) of an ellipse whose border is perturbed by random harmonics."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    dy, dx = yy - centre[0], xx - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    aspect = rng.uniform(0.65, 1.0)
    rho = np.hypot(u / radius, v / (radius * aspect))
    theta = np.arctan2(v, u)[..., None]
    amplitudes = rng.uniform(0.0, 0.12, len(_HARMONICS)) / (_HARMONICS / 2)
    phases = rng.uniform(0, 2 * np.pi, len(_HARMONICS))
    border = 1.0 + (amplitudes * np.cos(_HARMONICS * theta + phases)).sum(axis=-1)
    return rho / border


def _paint_lesion(rng: np.random.Generator, image: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """Paint a variegated lesion where ``rho < 1`` and return its mask."""
    size = image.shape[0]
    mask = rho < 1.0
    jitter = rng.uniform(-8, 8, 3).astype(np.float32)
    colour = _LESION_COLOURS["light_brown"] * rng.uniform(0.6, 1.05) + jitter
    lesion = np.broadcast_to(colour, image.shape).copy()
    for name, share in (("dark_brown", 0.55), ("black", 0.25), ("blue_grey", 0.2)):
        if rng.uniform() < 0.8:
            patches = _smooth_field(rng, size, size / 24) > 1.0 - share * rng.uniform(0.3, 0.8)
            weight = ndimage.gaussian_filter(patches.astype(np.float32), 1.5)[..., None]
            lesion = lesion * (1 - weight) + _LESION_COLOURS[name] * weight
    core_darkening = np.clip(1.0 - rho, 0.0, 1.0)[..., None] * rng.uniform(0.0, 0.3)
    # lighter towards the border
    rim = np.clip((rho - 0.75) / 0.25, 0.0, 1.0)[..., None] * rng.uniform(0.1, 0.4)
    lesion = lesion * (1.0 - core_darkening)
    lesion = lesion * (1 - rim) + image * rim
    image[mask] = lesion[mask]
    return mask


def _hairs(rng: np.random.Generator, size: int) -> np.ndarray:
    """HxW opacity of a few thin dark hairs: quadratic Bezier curves drawn as dense point samples."""
    count = max(int(rng.integers(-3, 7)), 0)  # a third of the images without hair
    layer = np.zeros((size, size), dtype=np.float32)
    if count == 0:
        return layer
    t = np.linspace(0.0, 1.0, 4 * size, dtype=np.float32)[:, None]
    ends = rng.uniform(-0.1 * size, 1.1 * size, (count, 3, 2))  # start, control, end points
    weights = np.stack([(1 - t) ** 2, 2 * t * (1 - t), t**2])  # Bernstein polynomials, 3 x T x 1
    points = (weights[None] * ends[:, :, None]).sum(axis=1)  # count x T x 2
    rows, cols = np.round(points.reshape(-1, 2)).astype(int).T
    inside = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
    layer[rows[inside], cols[inside]] = 1.0
    return np.clip(ndimage.gaussian_filter(layer, 0.6) * 2.5, 0.0, 0.9)


def _ruler(rng: np.random.Generator, size: int) -> np.ndarray:
    """HxW opacity of a ruler along a random edge, in ``_RULER_PROBABILITY`` of the images: a line
    with a tick every ``size / 32`` pixels and a longer one every fifth, as printed millimetre scales."""
    layer = np.zeros((size, size), dtype=np.float32)
    if rng.uniform() >= _RULER_PROBABILITY:
        return layer
    row = int(rng.uniform(0.03, 0.08) * size)
    spacing, tick = max(size // 32, 2), max(size // 40, 2)
    layer[row, :] = 1.0
    for i, col in enumerate(range(int(rng.integers(0, spacing)), size, spacing)):
        layer[row : row + (2 * tick if i % 5 == 0 else tick), col] = 1.0
    layer = np.rot90(layer, int(rng.integers(0, 4)))
    return np.clip(ndimage.gaussian_filter(layer, 0.5) * 2.0, 0.0, 0.85)


def _vignette(rng: np.random.Generator, size: int) -> np.ndarray:
    """HxW brightness factor: 1 in the dermoscope's field, falling to near 0 outside its circular rim."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    centre = size / 2 + rng.uniform(-0.05, 0.05, 2) * size
    radius = size * rng.uniform(0.5, 0.75)  # > 0.71 leaves only the corners dark
    distance = np.hypot(yy - centre[0], xx - centre[1]) / radius
    return np.clip((1.08 - distance) / 0.15, 0.05, 1.0)


def synthesize_dermoscopy_image(
    rng: np.random.Generator, size: int, n_lesions: int
) -> tuple[np.ndarray, np.ndarray]:
    """(HxWx3 uint8 image, HxW bool mask) of ``n_lesions`` (1 or 2) separate lesions on skin."""
    if n_lesions not in (1, 2):
        raise ValueError(f"n_lesions must be 1 or 2, got {n_lesions}")
    image = _skin(rng, size)
    mask = np.zeros((size, size), dtype=bool)
    if n_lesions == 1:
        centres = [size / 2 + rng.uniform(-0.1, 0.1, 2) * size]
        radii = [rng.uniform(0.15, 0.28) * size]
    else:  # side by side along a random direction, far enough apart not to touch
        direction = rng.uniform(0, 2 * np.pi)
        offset = 0.2 * size * np.array([np.sin(direction), np.cos(direction)])
        centres = [size / 2 - offset, size / 2 + offset]
        radii = list(rng.uniform(0.08, 0.12, 2) * size)
    for centre, radius in zip(centres, radii):
        mask |= _paint_lesion(rng, image, _lesion_region(rng, size, np.asarray(centre), radius))
    hair = _hairs(rng, size)[..., None]
    image = image * (1 - hair) + np.array([40, 28, 22], dtype=np.float32) * hair
    ruler = _ruler(rng, size)[..., None]
    image = image * (1 - ruler) + np.array([30, 30, 35], dtype=np.float32) * ruler
    image = ndimage.gaussian_filter(image, (0.7, 0.7, 0)) * _vignette(rng, size)[..., None]
    image = image * rng.uniform(*_WHITE_BALANCE_RANGE, 3).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), mask


def generate_dermoscopy_dataset(
    output_dir: str | os.PathLike,
    n_labelled: int = 20,
    n_unlabelled: int = 20,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write a synthetic ISIC-style dataset (layout in the module docstring) and return ``output_dir``.

    Deterministic: image ``i`` depends only on ``seed`` and ``i``. The dataset is built beside
    ``output_dir`` and moved in place at the end; an existing ``output_dir`` is replaced only if it is
    empty or an earlier output of this generator.
    """
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")
    if n_labelled < 0 or n_unlabelled < 0:
        raise ValueError(
            f"image counts must be >= 0, got {n_labelled} labelled and {n_unlabelled} unlabelled"
        )
    output_dir = Path(output_dir)
    lesion_counts = []
    with synthetic_dataset_folder(output_dir, _GENERATOR, SUBFOLDERS) as staging:
        for folder in SUBFOLDERS:
            (staging / folder).mkdir()
        for i in range(n_labelled + n_unlabelled):
            rng = np.random.default_rng([seed, i])
            n_lesions = 2 if rng.uniform() < _TWO_LESION_PROBABILITY else 1
            image, mask = synthesize_dermoscopy_image(rng, size, n_lesions)
            name = f"ISIC_{i:07d}"
            folder = staging / SUBFOLDERS[0 if i < n_labelled else 1]
            Image.fromarray(image).save(folder / f"{name}.jpg", quality=_JPEG_QUALITY)
            if i < n_labelled:
                Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{name}{ISIC_MASK_SUFFIX}.png")
                lesion_counts.append(n_lesions)
        settings = {
            "format": "isic",
            "seed": seed,
            "size": size,
            "n_labelled": n_labelled,
            "n_unlabelled": n_unlabelled,
            "lesions_per_labelled_image": lesion_counts,
        }
        write_dataset_json(staging, _GENERATOR, settings)
    return output_dir


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point for :func:`generate_dermoscopy_dataset`."""
    parser = argparse.ArgumentParser(
        prog="python -m common.data.synthetic.dermoscopy", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output", required=True, help="dataset folder to (re)create")
    parser.add_argument("--n-labelled", type=int, default=20)
    parser.add_argument("--n-unlabelled", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(generate_dermoscopy_dataset(args.output, args.n_labelled, args.n_unlabelled, args.size, args.seed))


if __name__ == "__main__":
    main()
