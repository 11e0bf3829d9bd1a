"""Synthetic X-ray coronary angiograms whose artery segments carry CASS labels, written as real files.

The demo and the tests read them through the real readers (:mod:`common.data.angiography`,
:func:`common.data.angiogram_images.read_angiogram`). Each image is a grey X-ray field (soft-tissue
shading, a circular collimator vignette, quantum noise) with a contrast catheter reaching the ostium
of the injected artery and one or both coronary trees: dark tubes that taper along each branch and
absorb most along their centre line, as a contrast-filled cylinder does. A left-coronary view
shows the left main, LAD, circumflex, obtuse marginals, diagonals and sometimes a ramus; a right
view the RCA, PDA and a posterolateral branch; some images show both. Branches are drawn on a fixed
template, moved, scaled, rotated and bent within small ranges per image, so that a small network
learns which segment is which in minutes; absent segments (no ramus, no third marginal) vary as in
real views. Labels are the drawn segments, exact by construction; diagonals and posterolateral
branches are opacified but have no CASS category, so they appear in the vessel masks and the ARCADE
file only.

Layout (per split ``train``, ``val``, ``test``)::

    output_dir/<split>/images/000.png          8-bit PNG; 16-bit (12 bits used) for one image in four;
                        images/003.dcm          DICOM XA, single frame (one image in eight),
                        images/006.dcm          DICOM XA run of 3 frames, the middle one labelled
                                                (one image in eight; the COCO record names its "frame")
    output_dir/<split>/vessel_masks/000.png     0/255, every opacified vessel (not the catheter)
    output_dir/<split>/cass.json                COCO, the 14 CASS categories; polygons, RLE for one
                                                image in three
    output_dir/<split>/arcade_syntax.json       the same segments as ARCADE numbers them (SYNTAX ids
                                                1-25, "stenosis" 26), one annotation per polygon
    output_dir/dataset.json

Command line::

    python -m common.data.synthetic.angiography --output_dir data/angiography --num_images 40 \\
        --size 672 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from common.data.angiography import CASS_CATEGORIES, STENOSIS_CATEGORIES, SYNTAX_SEGMENTS, build_coco
from common.data.mask_to_coco import mask_to_instances
from common.data.synthetic.output import SPLITS, synthetic_dataset_folder, write_dataset_json
from common.errors import InputDataError

__all__ = [
    "BRANCHES",
    "Branch",
    "cass_labels",
    "generate_angiography_dataset",
    "main",
    "split_counts",
    "synthesize_angiogram",
]

_GENERATOR = "common.data.synthetic.angiography"
_XA_STORAGE = "1.2.840.10008.5.1.4.1.1.12.1"  # X-Ray Angiographic Image Storage
_BITS_STORED = 12
_RUN_CONTRAST = (0.35, 1.0, 0.6)  # contrast filling over a 3-frame run; the middle frame is labelled
_FILE_KINDS = ("png8", "png16", "png8", "dicom", "png8", "png16", "dicom_run", "png8")
_RLE_EVERY = 3
_MU = 45.0  # attenuation per image width of contrast-filled lumen: the left main lets through ~40%
_MIN_SEGMENT_AREA = 4  # pixels; a segment smaller than this (cut by the image edge) is not annotated
_WAVELENGTH = 0.1  # of a branch's tortuous waves, as a fraction of the image width
_TORTUOSITY = 0.12  # largest height of a wave, as a fraction of its length
_TWIGS_PER_BRANCH = 1.5  # mean number of small unnamed side branches on each named one
_VIEWS = ("left", "right", "both")
_VIEW_PROBABILITIES = (0.5, 0.35, 0.15)


@dataclass(frozen=True)
class Branch:
    """One drawn vessel segment of the template, in coordinates relative to the image (x, y in 0..1).

    Attributes:
        name: the CASS category, or a name for a branch CASS does not label ("diagonal_1", ...).
        syntax: its SYNTAX number, as ARCADE labels it, or ``None`` (not annotated by ARCADE).
        tree: ``"left"`` or ``"right"``.
        start: where it begins: the tree's ostium (``None``), or ``(parent name, t)`` on the parent's curve.
        end: where it ends.
        bend: sideways offset of the curve's control point, as a fraction of the segment's length.
        radius: lumen radius at the start and the end, as a fraction of the image width.
        presence: probability that the branch is opacified in a view of its tree.
    """

    name: str
    syntax: str | None
    tree: str
    start: tuple[str, float] | None
    end: tuple[float, float]
    bend: float
    radius: tuple[float, float]
    presence: float = 1.0


# Parents before children. The right tree sits in the left half of the image and the left tree in
# the right half, so that a view of both trees keeps them apart.
BRANCHES = (
    Branch("proximal_rca", "1", "right", None, (0.14, 0.38), 0.25, (0.0095, 0.0085)),
    Branch("mid_rca", "2", "right", ("proximal_rca", 1.0), (0.15, 0.64), 0.12, (0.0085, 0.0075)),
    Branch("distal_rca", "3", "right", ("mid_rca", 1.0), (0.34, 0.79), 0.2, (0.0075, 0.0062)),
    Branch("pda", "4", "right", ("distal_rca", 1.0), (0.42, 0.96), 0.1, (0.0048, 0.0026), 0.9),
    Branch("posterolateral", "16", "right", ("distal_rca", 1.0), (0.52, 0.72), 0.15, (0.0048, 0.0026), 0.8),
    Branch("left_main", "5", "left", None, (0.61, 0.27), 0.0, (0.0105, 0.0098)),
    Branch("proximal_lad", "6", "left", ("left_main", 1.0), (0.55, 0.42), 0.08, (0.0088, 0.0076)),
    Branch("mid_lad", "7", "left", ("proximal_lad", 1.0), (0.50, 0.61), 0.06, (0.0074, 0.0060)),
    Branch("distal_lad", "8", "left", ("mid_lad", 1.0), (0.47, 0.87), 0.05, (0.0058, 0.0028)),
    Branch("diagonal_1", "9", "left", ("proximal_lad", 0.9), (0.60, 0.63), -0.1, (0.0050, 0.0026), 0.9),
    Branch("diagonal_2", "10", "left", ("mid_lad", 0.85), (0.56, 0.80), -0.1, (0.0045, 0.0024), 0.6),
    Branch("proximal_lcx", "11", "left", ("left_main", 1.0), (0.74, 0.33), -0.1, (0.0082, 0.0072)),
    Branch("distal_lcx", "13", "left", ("proximal_lcx", 1.0), (0.88, 0.64), -0.12, (0.0068, 0.0040)),
    Branch("ramus", "12", "left", ("left_main", 1.0), (0.68, 0.48), 0.05, (0.0058, 0.0030), 0.35),
    Branch("obtuse_marginal_1", "12a", "left", ("proximal_lcx", 0.95), (0.75, 0.58), 0.1, (0.0058, 0.0030)),
    Branch("obtuse_marginal_2", "12b", "left", ("distal_lcx", 0.4), (0.82, 0.74), 0.1, (0.0052, 0.0028), 0.85),
    Branch("obtuse_marginal_3", None, "left", ("distal_lcx", 0.75), (0.90, 0.84), 0.1, (0.0046, 0.0026), 0.45),
)  # fmt: skip
_OSTIA = {"right": (0.30, 0.20), "left": (0.64, 0.17)}
_CASS_IDS = {name: i for i, name in enumerate(CASS_CATEGORIES, start=1)}
_SYNTAX_IDS = {name: i for i, name in enumerate((*SYNTAX_SEGMENTS, *STENOSIS_CATEGORIES), start=1)}


def _rotation(angle: float) -> np.ndarray:
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def _bezier(start: np.ndarray, end: np.ndarray, bend: float, n: int) -> np.ndarray:
    """(n, 2) points of the quadratic Bezier from ``start`` to ``end`` bowed sideways by ``bend``."""
    chord = end - start
    control = (start + end) / 2 + bend * np.array([-chord[1], chord[0]])
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end


def _wiggle(rng: np.random.Generator, points: np.ndarray) -> np.ndarray:
    """``points`` displaced sideways in waves (:data:`_WAVELENGTH` long, :data:`_TORTUOSITY` of it
    high), none at the two ends, so that branches stay joined: the tortuosity of coronary arteries."""
    t = np.linspace(0.0, 1.0, len(points))[:, None]
    tangent = np.gradient(points, axis=0)
    length = np.hypot(*tangent.T).sum()
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1) / (np.hypot(*tangent.T)[:, None] + 1e-12)
    waves = length / _WAVELENGTH * rng.uniform(0.7, 1.3) * t + rng.uniform(0, 1)
    amplitude = _TORTUOSITY * min(_WAVELENGTH, length) * rng.uniform(0.3, 1.0)
    return points + amplitude * np.sin(2 * np.pi * waves) * np.sin(np.pi * t) * normal


def _tree_curves(
    rng: np.random.Generator, trees: Sequence[str], size: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{branch name: ((n, 2) x/y points in pixels, (n,) radii in pixels)}`` of the opacified branches.

    Each tree is rotated (+-8 degrees), scaled (0.9-1.1) about its ostium and shifted (+-3%); every
    end point moves by up to 1.5% and every bend by up to 0.06, so that the anatomy stays recognisable.
    """
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for tree in trees:
        ostium = np.array(_OSTIA[tree]) + rng.uniform(-0.03, 0.03, 2)
        pose = _rotation(rng.uniform(-0.14, 0.14)) * rng.uniform(0.9, 1.1)
        for branch in (b for b in BRANCHES if b.tree == tree):
            if rng.uniform() >= branch.presence or (
                branch.start is not None and branch.start[0] not in curves
            ):
                continue
            if branch.start is None:
                start = ostium
            else:
                parent, t = curves[branch.start[0]][0], branch.start[1]
                start = parent[round(t * (len(parent) - 1))] / size
            end = ostium + pose @ (np.array(branch.end) - _OSTIA[tree]) + rng.uniform(-0.015, 0.015, 2)
            n = max(2, int(2 * np.hypot(*(end - start)) * size))  # two samples per pixel of length
            points = _bezier(start, end, branch.bend + rng.uniform(-0.06, 0.06), n)
            points = _wiggle(rng, points) * size
            radii = np.maximum(np.linspace(*branch.radius, n) * size, 1.0)
            curves[branch.name] = (points, radii)
    return curves


def _twigs(
    rng: np.random.Generator, curves: dict[str, tuple[np.ndarray, np.ndarray]], size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Small side branches (septals, atrial and RV branches, ...) leaving the named ones at 30-70
    degrees, a third of their parent's width: vessel, but no labelled segment."""
    twigs = []
    for points, radii in curves.values():
        for _ in range(rng.poisson(_TWIGS_PER_BRANCH)):
            k = int(rng.uniform(0.15, 0.9) * (len(points) - 1))
            tangent = points[min(k + 1, len(points) - 1)] - points[max(k - 1, 0)]
            angle = rng.choice((-1, 1)) * rng.uniform(0.5, 1.2)
            direction = _rotation(angle) @ tangent / (np.hypot(*tangent) + 1e-12)
            end = points[k] + direction * rng.uniform(0.03, 0.08) * size
            n = max(2, int(2 * np.hypot(*(end - points[k]))))
            twig = _wiggle(rng, _bezier(points[k] / size, end / size, rng.uniform(-0.15, 0.15), n)) * size
            twigs.append((twig, np.maximum(np.linspace(0.35, 0.2, n) * radii[k], 0.8)))
    return twigs


def _catheter(rng: np.random.Generator, ostium: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A guiding catheter entering at the top edge and curving down onto ``ostium`` (pixels)."""
    entry = np.array([rng.uniform(0.42, 0.5) * size, -0.02 * size])
    n = int(2 * np.hypot(*(ostium - entry)))
    points = _bezier(entry, ostium, rng.choice((-0.25, 0.25)), n)
    return points, np.full(n, 0.0045 * size)


def _render_tubes(
    curves: Sequence[tuple[np.ndarray, np.ndarray]], size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(index + 1 of the curve whose tube is thickest at each pixel, else 0; lumen thickness in pixels).

    The X-ray path through a cylinder of radius r at distance d from its axis is 2*sqrt(r^2 - d^2),
    with d the distance to the curve's nearest centre-line sample. Each curve is measured on its own
    bounding box, so that a thin branch leaving a thick one does not notch it.
    """
    index = np.zeros((size, size), dtype=np.int32)
    thickness = np.zeros((size, size), dtype=np.float32)
    for k, (points, radii) in enumerate(curves, start=1):
        reach = radii.max() + 1
        low = np.clip(np.floor(points.min(axis=0) - reach), 0, size).astype(int)
        high = np.clip(np.ceil(points.max(axis=0) + reach) + 1, 0, size).astype(int)
        cols, rows = np.round(points).astype(int).T
        keep = (rows >= low[1]) & (rows < high[1]) & (cols >= low[0]) & (cols < high[0])
        if not keep.any():
            continue
        box = np.s_[low[1] : high[1], low[0] : high[0]]
        radius = np.zeros(index[box].shape, dtype=np.float32)
        radius[rows[keep] - low[1], cols[keep] - low[0]] = radii[keep]
        distance, (near_rows, near_cols) = ndimage.distance_transform_edt(radius == 0, return_indices=True)
        nearest = radius[near_rows, near_cols]
        tube = 2 * np.sqrt(np.clip(nearest**2 - distance**2, 0, None))
        thicker = tube > thickness[box]
        index[box][thicker] = k
        thickness[box][thicker] = tube[thicker]
    return index, thickness


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """X-ray transmission of the chest without contrast: soft-tissue shading and the collimator."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    coarse = ndimage.zoom(rng.uniform(-1, 1, (4, 4)), size / 4, order=3)[:size, :size]
    level = rng.uniform(0.55, 0.7) + 0.08 * coarse + rng.uniform(0.05, 0.12) * (0.5 - yy)  # diaphragm darker
    shadow = rng.uniform(0.05, 0.1) * np.exp(-(((xx - rng.uniform(0.35, 0.5)) / 0.08) ** 2))  # spine
    dome = rng.uniform(0.72, 0.9) + 0.5 * (xx - rng.uniform(0.3, 0.7)) ** 2  # the diaphragm's edge
    shadow += rng.uniform(0.1, 0.2) / (1 + np.exp(-(yy - dome) / 0.02))
    cy, cx = 0.5 + rng.uniform(-0.05, 0.05, 2)
    vignette = 1 - np.clip((np.hypot(yy - cy, xx - cx) - 0.38) / 0.35, 0, 1) ** 1.5 * rng.uniform(0.5, 0.8)
    return (level - shadow) * vignette


def synthesize_angiogram(
    rng: np.random.Generator, size: int = 672, view: str | None = None, contrast: Sequence[float] = (1.0,)
) -> tuple[np.ndarray, np.ndarray]:
    """Frames (F, H, W) float in 0..1, one per ``contrast`` filling level, and the branch map (H, W)
    int32: ``BRANCHES`` index + 1 on a named branch, ``len(BRANCHES) + 1`` on a small unnamed side
    branch, 0 elsewhere (the catheter included).

    Args:
        rng: source of randomness; the result is a function of its state.
        size: image height and width in pixels.
        view: ``"left"``, ``"right"`` or ``"both"`` trees; random when ``None``.
        contrast: filling level of each frame (1 = fully opacified), as over an injection.
    """
    if view is None:
        view = str(rng.choice(_VIEWS, p=_VIEW_PROBABILITIES))
    if view not in _VIEWS:
        raise ValueError(f"view must be one of {_VIEWS}, got {view!r}")
    trees = ("left", "right") if view == "both" else (view,)
    curves = _tree_curves(rng, trees, size)
    injected = trees[0] if len(trees) == 1 else str(rng.choice(trees))
    ostium = curves["left_main" if injected == "left" else "proximal_rca"][0][0]
    twigs = _twigs(rng, curves, size)
    labels, thickness = _render_tubes([*curves.values(), *twigs, _catheter(rng, ostium, size)], size)
    catheter = labels == len(curves) + len(twigs) + 1
    position = {b.name: i for i, b in enumerate(BRANCHES, start=1)}
    twig = len(BRANCHES) + 1
    lut = np.array([0, *(position[name] for name in curves), *[twig] * len(twigs), 0], dtype=np.int32)
    branches = lut[labels]

    background = _background(rng, size)
    mu = _MU * rng.uniform(0.8, 1.2) / size
    frames = []
    for level in contrast:
        absorption = mu * thickness * np.where(catheter, 0.7, level)
        image = ndimage.gaussian_filter(background * np.exp(-absorption), rng.uniform(0.6, 1.0))
        photons = rng.uniform(300, 800)
        image = rng.poisson(np.clip(image, 0, None) * photons) / photons
        frames.append(np.clip(image + rng.normal(0, 0.008, image.shape), 0, 1))
    return np.stack(frames), branches


def cass_labels(branches: np.ndarray) -> np.ndarray:
    """The branch map of :func:`synthesize_angiogram` as CASS ids (1-14 in
    :data:`~common.data.angiography.CASS_CATEGORIES` order; 0 for background and unlabelled branches)."""
    lut = np.array([0, *(_CASS_IDS.get(b.name, 0) for b in BRANCHES), 0], dtype=np.int32)
    return lut[branches]


def _segmentation(mask: np.ndarray, rle: bool) -> dict[str, Any] | list[list[float]] | None:
    """A segment's COCO segmentation: compressed RLE, or its outer polygons (``None`` when too small)."""
    if rle:
        encoded = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
        return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}
    rows, cols = ndimage.find_objects(mask.astype(np.uint8))[0]
    offset = np.array([cols.start, rows.start])
    polygons = [
        (np.asarray(polygon).reshape(-1, 2) + offset).ravel().tolist()
        for instance in mask_to_instances(mask[rows, cols])
        for polygon in instance["polygons"]
    ]
    return polygons or None


def _annotations(branches: np.ndarray, rle: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(CASS annotations, ARCADE annotations) of one image, as the entries of
    :func:`~common.data.angiography.build_coco` hold them (``label`` = category id).

    ARCADE splits a segment into one annotation per polygon, as annotation tools often export them.
    """
    cass, arcade = [], []
    for index in np.unique(branches[(branches > 0) & (branches <= len(BRANCHES))]):
        branch = BRANCHES[index - 1]
        mask = branches == index
        if mask.sum() < _MIN_SEGMENT_AREA:
            continue
        segmentation = _segmentation(mask, rle)
        if segmentation is None:
            continue
        if branch.name in _CASS_IDS:
            cass.append({"label": _CASS_IDS[branch.name], "segmentation": segmentation, "iscrowd": 0})
        if branch.syntax is not None:
            pieces = [segmentation] if rle else [[polygon] for polygon in segmentation]
            arcade += [{"label": _SYNTAX_IDS[branch.syntax], "segmentation": p, "iscrowd": 0} for p in pieces]
    return cass, arcade


def _write_dicom(path: Path, frames: np.ndarray, uid_source: str) -> None:
    """Write (F, H, W) uint16 frames (12 bits used) as an X-ray angiography DICOM file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _XA_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_source])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID = _XA_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_source, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_source, "series"])
    ds.Modality, ds.PatientName, ds.PatientID = "XA", "Synthetic^Angiogram", "SYNTHETIC"
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, _BITS_STORED, _BITS_STORED - 1
    ds.PixelRepresentation = 0  # unsigned
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.PixelData = frames.astype("<u2").tobytes()
    ds.save_as(path, write_like_original=False)


def _write_image(folder: Path, stem: str, frames: np.ndarray, kind: str, uid_source: str) -> Path:
    """Write ``frames`` as an image of ``kind`` (the middle frame, unless a DICOM run); return its path."""
    high = (1 << _BITS_STORED) - 1
    if kind.startswith("dicom"):
        path = folder / f"{stem}.dcm"
        _write_dicom(path, np.round(frames * high).astype(np.uint16), uid_source)
        return path
    labelled = frames[len(frames) // 2]
    pixels = (
        np.round(labelled * 255).astype(np.uint8)
        if kind == "png8"
        else np.round(labelled * high).astype(np.uint16)
    )
    path = folder / f"{stem}.png"
    Image.fromarray(pixels).save(path)
    return path


def split_counts(num_images: int, held_out: float = 0.15) -> dict[str, int]:
    """``{split: count}``: ``held_out`` of the images each for val and test (at least one each from
    three images on), the rest for training."""
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    n_held = max(1, round(num_images * held_out)) if num_images >= 3 else 0
    return {"train": num_images - 2 * n_held, "val": n_held, "test": n_held}


def _write_split(folder: Path, split_index: int, count: int, size: int, seed: int) -> dict[str, int]:
    """Write one split's images, vessel masks and COCO files; return its view counts."""
    (folder / "images").mkdir(parents=True)
    (folder / "vessel_masks").mkdir()
    cass, arcade, views = [], [], {view: 0 for view in _VIEWS}
    for i in range(count):
        rng = np.random.default_rng([seed, split_index, i])
        kind = _FILE_KINDS[i % len(_FILE_KINDS)]
        view = str(rng.choice(_VIEWS, p=_VIEW_PROBABILITIES))
        views[view] += 1
        contrast = _RUN_CONTRAST if kind == "dicom_run" else (1.0,)
        frames, branches = synthesize_angiogram(rng, size, view, contrast)
        stem = f"{i:03d}"
        image = _write_image(folder / "images", stem, frames, kind, f"{seed}/{split_index}/{i}")
        Image.fromarray((branches > 0).astype(np.uint8) * 255).save(folder / "vessel_masks" / f"{stem}.png")
        entry = {"image": str(image), "height": size, "width": size}
        if len(frames) > 1:
            entry["frame"] = len(frames) // 2
        image_cass, image_arcade = _annotations(branches, rle=i % _RLE_EVERY == _RLE_EVERY - 1)
        cass.append(entry | {"annotations": image_cass})
        arcade.append(entry | {"annotations": image_arcade})
    for name, entries, classes in (
        ("cass.json", cass, CASS_CATEGORIES),
        ("arcade_syntax.json", arcade, (*SYNTAX_SEGMENTS, *STENOSIS_CATEGORIES)),
    ):
        (folder / name).write_text(json.dumps(build_coco(entries, classes, folder)), encoding="utf-8")
    return views


def generate_angiography_dataset(
    output_dir: str | os.PathLike, num_images: int = 40, size: int = 672, seed: int = 0
) -> Path:
    """Write a synthetic angiography dataset (layout in the module docstring) and return ``output_dir``.

    Deterministic: image ``i`` of a split depends only on ``seed``, the split and ``i``. The dataset is
    built beside ``output_dir`` and moved in place at the end; an existing ``output_dir`` is replaced
    only if it is empty or an earlier output of this generator.
    """
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")
    counts = split_counts(num_images)
    output_dir = Path(output_dir)
    with synthetic_dataset_folder(output_dir, _GENERATOR) as staging:
        views = {
            split: _write_split(staging / split, split_index, counts[split], size, seed)
            for split_index, split in enumerate(SPLITS)
        }
        settings = {"format": "coco_cass", "seed": seed, "size": size, "splits": counts, "views": views}
        write_dataset_json(staging, _GENERATOR, settings)
    return output_dir


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point for :func:`generate_angiography_dataset`."""
    parser = argparse.ArgumentParser(
        prog="python -m common.data.synthetic.angiography", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output_dir", required=True, help="dataset folder to (re)create")
    parser.add_argument("--num_images", type=int, default=40, help="images over train, val and test")
    parser.add_argument("--size", type=int, default=672, help="image height and width in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        path = generate_angiography_dataset(args.output_dir, args.num_images, args.size, args.seed)
    except InputDataError as err:
        raise SystemExit(f"error: {err}") from err
    counts = split_counts(args.num_images)
    print(f"wrote {counts['train']}/{counts['val']}/{counts['test']} train/val/test angiograms to {path}")


if __name__ == "__main__":
    main()
