"""Processed cell-segmentation datasets as NumPy arrays, and the memory-mapped training dataset.

A dataset folder holds, for N samples zero-padded (bottom/right) to the largest height H and width W:

* ``imgs.npy``       (N, H, W, 3) uint8 images,
* ``dist_maps.npy``  (N, H, W) float32 per-cell normalised distance maps (the training target),
* ``anns.npy``       (N, H, W) int32 instance labels,
* ``sizes.npy``      (N, 2) int64 original (height, width) of each sample,
* ``names.json``     the N sample names, in order.

Distance maps are computed once here rather than in every epoch. The arrays are written sample by
sample into memory maps, so a dataset larger than memory converts, and training reads only the
samples it needs. Converting from the command line::

    python -m common.data.cell_arrays --format cellpose --input data/cellpose/train --output data/arrays/train
    python -m common.data.cell_arrays --format cellpose --input data/cellpose --splits train val test \\
        --output data/arrays
    python -m common.data.cell_arrays --format livecell --input LIVECell/images \\
        --annotations LIVECell/livecell_coco_{split}.json --splits train val test --output data/livecell
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from monai.data import MetaTensor
from torch.utils.data import Dataset

from common.data.cell_readers import CellSample, read_cellpose_folder, read_image_label_folders, read_livecell
from common.data.distance_map import normalized_distance_map
from common.errors import InputDataError
from common.io.atomic import atomic_directory

__all__ = ["DATASET_FILES", "CellArrayDataset", "build_cell_arrays", "main"]

logger = logging.getLogger(__name__)

CELL_ARRAYS_REMEDY = (
    "convert your data with `python -m common.data.cell_arrays --format cellpose|livecell|folders "
    "--input DIR --splits train val test --output DATASET_DIR`; for demo data first run "
    "`python -m common.data.synthetic.cells --output RAW` and convert RAW with --format cellpose"
)

IMAGES, DIST_MAPS, INSTANCES = "imgs.npy", "dist_maps.npy", "anns.npy"
SIZES, NAMES = "sizes.npy", "names.json"
DATASET_FILES = (IMAGES, DIST_MAPS, INSTANCES, SIZES, NAMES)


def _check_replaceable(output_dir: Path) -> None:
    """Refuse to overwrite a folder that is not an earlier cell-array dataset (a typo in ``--output``
    must never delete a user's raw data)."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise InputDataError(output_dir, "exists and is not a folder")
    foreign = sorted(p.name for p in output_dir.iterdir() if p.name not in DATASET_FILES)
    if foreign:
        raise InputDataError(
            output_dir,
            f"exists and holds files that are not part of a cell-array dataset ({', '.join(foreign[:5])}); "
            "refusing to replace it, choose another output folder",
        )


def _write_arrays(samples: Sequence[CellSample], folder: Path) -> int:
    """Fill ``folder`` with the dataset files; returns the number of cells."""
    n = len(samples)
    height = max(s.size[0] for s in samples)
    width = max(s.size[1] for s in samples)
    open_memmap = np.lib.format.open_memmap
    imgs = open_memmap(folder / IMAGES, mode="w+", dtype=np.uint8, shape=(n, height, width, 3))
    dist_maps = open_memmap(folder / DIST_MAPS, mode="w+", dtype=np.float32, shape=(n, height, width))
    anns = open_memmap(folder / INSTANCES, mode="w+", dtype=np.int32, shape=(n, height, width))
    sizes = np.zeros((n, 2), dtype=np.int64)
    cells = 0
    for i, sample in enumerate(samples):
        image, labels = sample.load()
        h, w = labels.shape
        if (h, w) != sample.size:
            raise InputDataError(
                sample.image_path, f"decodes to {h}x{w} but its header says {sample.size[0]}x{sample.size[1]}"
            )
        imgs[i, :h, :w] = image
        anns[i, :h, :w] = labels
        dist_maps[i, :h, :w] = normalized_distance_map(labels)
        sizes[i] = h, w
        cells += len(np.unique(labels)) - int((labels == 0).any())
    for array in (imgs, dist_maps, anns):
        array.flush()
    del imgs, dist_maps, anns
    np.save(folder / SIZES, sizes)
    (folder / NAMES).write_text(json.dumps([s.name for s in samples], indent=1), encoding="utf-8")
    return cells


def build_cell_arrays(samples: Sequence[CellSample], output_dir: str | os.PathLike) -> Path:
    """Write ``samples`` as a cell-array dataset folder (see the module docstring).

    The folder is built beside ``output_dir`` under a temporary name and renamed at the end, so an
    interrupted run leaves no half-written dataset and an existing one is replaced only on success.

    Raises:
        InputDataError: no samples, duplicate sample names, any unreadable sample, or an
            ``output_dir`` that exists and holds other files.
    """
    output_dir = Path(output_dir)
    if not samples:
        raise InputDataError(output_dir, "no samples to write")
    names = [s.name for s in samples]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise InputDataError(output_dir, f"two samples are named {duplicate!r}; sample names must be unique")
    _check_replaceable(output_dir)
    with atomic_directory(output_dir) as staging:
        cells = _write_arrays(samples, staging)
    height = max(s.size[0] for s in samples)
    width = max(s.size[1] for s in samples)
    logger.info("%s: %d images, %d cells, padded to %dx%d", output_dir, len(samples), cells, height, width)
    return output_dir


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file from its header, checking the file holds all the data."""
    if not path.is_file():
        raise InputDataError(path, "file not found (not a cell-array dataset folder?)", CELL_ARRAYS_REMEDY)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
            data_start = f.tell()
    except ValueError as err:
        raise InputDataError(path, f"not a readable .npy file ({err})") from err
    if fortran_order:
        raise InputDataError(path, "array is stored in Fortran order; expected C order")
    expected = data_start + int(np.prod(shape)) * dtype.itemsize
    if path.stat().st_size < expected:
        raise InputDataError(path, f"file is truncated ({path.stat().st_size} bytes, expected {expected})")
    return shape, dtype


class CellArrayDataset(Dataset):
    """Samples of a cell-array dataset folder, read through memory maps.

    Item: ``{"image": (3, h, w) float32 in 0..255, "label": (1, h, w) float32 distance map,
    "instances": (1, h, w) int32, "name": str}`` restricted to ``keys`` (plus ``"name"``), each
    cropped back to the sample's original size. Arrays are :class:`~monai.data.MetaTensor` with
    ``filename_or_obj`` set to the sample name, so writers downstream can name their outputs (batch
    with :class:`monai.data.DataLoader`, whose collation keeps per-sample meta data; ``"name"``
    survives any collation). ``transform`` (e.g. MONAI dictionary transforms) runs on the item.

    The ``.npy`` files are mapped on first access in each process, so every DataLoader worker gets
    its own maps; ``__init__`` reads only the file headers, ``sizes.npy`` and ``names.json``.

    Args:
        root: dataset folder written by :func:`build_cell_arrays`.
        transform: applied to each item.
        keys: which arrays to read: any of ``"image"``, ``"label"``, ``"instances"``.

    Raises:
        InputDataError: a missing, truncated or inconsistent file in ``root``.
    """

    _FILES: ClassVar[dict[str, str]] = {"image": IMAGES, "label": DIST_MAPS, "instances": INSTANCES}
    _DTYPES: ClassVar[dict[str, type]] = {"image": np.uint8, "label": np.float32, "instances": np.int32}

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        keys: Sequence[str] = ("image", "label", "instances"),
    ) -> None:
        unknown = set(keys) - set(self._FILES)
        if unknown or not keys:
            raise ValueError(f"keys must be a non-empty subset of {sorted(self._FILES)}, got {list(keys)}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputDataError(self.root, "dataset folder not found", CELL_ARRAYS_REMEDY)
        self.transform = transform
        self.keys = tuple(keys)
        self.names = self._read_names()
        self.sizes = self._read_sizes(len(self.names))
        for key in self.keys:
            self._check_array(key)
        self._arrays: dict[str, np.ndarray] = {}
        self._pid: int | None = None

    def _read_names(self) -> list[str]:
        path = self.root / NAMES
        if not path.is_file():
            raise InputDataError(
                path, "file not found (not a cell-array dataset folder?)", CELL_ARRAYS_REMEDY
            )
        try:
            names = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputDataError(path, f"not valid JSON ({err})") from err
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise InputDataError(path, "expected a non-empty JSON list of sample names")
        return names

    def _read_sizes(self, n: int) -> np.ndarray:
        path = self.root / SIZES
        shape, dtype = _npy_header(path)
        if shape != (n, 2) or not np.issubdtype(dtype, np.integer):
            raise InputDataError(
                path, f"expected ({n}, 2) integer sizes for the {n} names, got {shape} {dtype}"
            )
        return np.load(path)

    def _check_array(self, key: str) -> None:
        path = self.root / self._FILES[key]
        shape, dtype = _npy_header(path)
        n = len(self.names)
        expected_ndim = 4 if key == "image" else 3
        if len(shape) != expected_ndim or shape[0] != n or (key == "image" and shape[3] != 3):
            want = "(N, H, W, 3)" if key == "image" else "(N, H, W)"
            raise InputDataError(
                path, f"has shape {shape}; expected {want} with N = {n} samples as in {NAMES}"
            )
        if dtype != self._DTYPES[key]:
            raise InputDataError(path, f"has dtype {dtype}; expected {np.dtype(self._DTYPES[key])}")
        if (self.sizes < 1).any() or (self.sizes > np.array(shape[1:3])).any():
            raise InputDataError(
                self.root / SIZES, f"sizes do not fit the {shape[1]}x{shape[2]} arrays of {path.name}"
            )

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"], state["_pid"] = {}, None  # memory maps are reopened in the new process
        return state

    def _array(self, key: str) -> np.ndarray:
        if self._pid != os.getpid():
            self._arrays = {k: np.load(self.root / self._FILES[k], mmap_mode="r") for k in self.keys}
            self._pid = os.getpid()
        return self._arrays[key]

    def __getitem__(self, index: int) -> Any:
        name = self.names[index]
        height, width = (int(v) for v in self.sizes[index])
        item: dict[str, Any] = {}
        for key in self.keys:
            crop = self._array(key)[index, :height, :width]
            if key == "image":
                array = np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32)
            else:
                array = np.array(crop)[None]
            item[key] = MetaTensor(torch.from_numpy(array), meta={"filename_or_obj": name})
        item["name"] = name
        return self.transform(item) if self.transform is not None else item


# ------------------------------------------------------------------------------------------- command


def _samples(args: argparse.Namespace, split: str | None) -> list[CellSample]:
    """The reader's samples for one split; ``{split}`` in a path is replaced by the split name."""

    def path(value: str | None, implied_subfolder: bool = False) -> str | None:
        if value is None or split is None:
            return value
        if "{split}" in value:
            return value.replace("{split}", split)
        return os.path.join(value, split) if implied_subfolder else value

    if args.format == "livecell":
        if args.annotations is None:
            raise SystemExit("--format livecell needs --annotations (with {split} in --splits mode)")
        if split is not None and "{split}" not in args.annotations:
            raise SystemExit(
                "--splits with --format livecell needs {split} in --annotations, "
                "e.g. livecell_coco_{split}.json"
            )
        return read_livecell(path(args.annotations), path(args.input))
    if args.format == "cellpose":
        folder = path(args.input, implied_subfolder=True)
        return read_cellpose_folder(folder, mask_filter=args.label_suffix or "_masks")
    if args.labels is None:
        raise SystemExit("--format folders needs --labels")
    return read_image_label_folders(
        path(args.input, implied_subfolder=True), path(args.labels, implied_subfolder=True), args.label_suffix
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: convert one dataset, or its train/val/test splits, to arrays."""
    parser = argparse.ArgumentParser(
        prog="python -m common.data.cell_arrays",
        description="Convert a cell-segmentation dataset to .npy arrays.",
    )
    parser.add_argument("--format", required=True, choices=("livecell", "cellpose", "folders"))
    parser.add_argument(
        "--input",
        required=True,
        help="image folder (livecell: searched with subfolders; with --splits: ROOT of the split folders)",
    )
    parser.add_argument("--annotations", help="livecell: the COCO JSON; put {split} in it with --splits")
    parser.add_argument("--labels", help="folders: the label folder (with --splits: ROOT holding the splits)")
    parser.add_argument(
        "--label-suffix", default="", help="label name = image name + suffix (cellpose default: _masks)"
    )
    parser.add_argument("--splits", nargs="+", metavar="SPLIT", help="convert each split: train val test")
    parser.add_argument(
        "--output", required=True, help="dataset folder (with --splits: one subfolder per split)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.splits is None:
            build_cell_arrays(_samples(args, None), args.output)
        for split in args.splits or ():
            build_cell_arrays(_samples(args, split), Path(args.output) / split)
    except InputDataError as err:
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
