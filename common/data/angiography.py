"""Coronary angiography datasets: CASS artery segments in COCO, ARCADE's SYNTAX files, vessel masks.

The collection labels angiograms with 14 segments of the CASS nomenclature (:data:`CASS_CATEGORIES`,
COCO ids 1-14 in that order). A COCO file is matched to them **by category name**, so a file whose
ids differ still loads, remapped onto ours. Readers return the datalist of
:func:`common.data.coco_instances.read_coco_instances` (one entry per image, annotations kept as JSON
values with ``label`` = CASS id), which :class:`~common.data.coco_instances.CocoInstancesd` decodes
into ``instances`` (N, H, W) and ``labels`` (N,) for Mask R-CNN; an entry of a DICOM run may carry
the ``frame`` that was labelled, which :class:`~common.transforms.io.LoadAngiogramd` consumes.

ARCADE (MICCAI 2023) labels segments with the SYNTAX score numbering. Its "syntax" files are read
through this mapping onto CASS (segments of one CASS category in one image are merged into one
instance; segments without a CASS counterpart are dropped):

==========  =========================================  ==================
SYNTAX      segment                                    CASS category
==========  =========================================  ==================
1           proximal right coronary artery             proximal_rca
2           mid right coronary artery                  mid_rca
3           distal right coronary artery               distal_rca
4           posterior descending (from the RCA)        pda
16, 16a-c   posterolateral branches from the RCA       dropped (1)
5           left main                                  left_main
6           proximal LAD                               proximal_lad
7           mid LAD                                    mid_lad
8           apical LAD                                 distal_lad
9, 9a       first diagonal (a)                         dropped (2)
10, 10a     second diagonal (a)                        dropped (2)
11          proximal circumflex                        proximal_lcx
12          intermediate / anterolateral (ramus)       ramus
12a         obtuse marginal a                          obtuse_marginal_1
12b         obtuse marginal b                          obtuse_marginal_2
13          distal circumflex                          distal_lcx
14, 14a-b   left posterolateral branches               dropped (1)
15          posterior descending (from the LCx)        pda (3)
==========  =========================================  ==================

(1) The 14 CASS categories hold no posterolateral branch; relabelling them as a neighbouring segment
would teach a model wrong anatomy. (2) Likewise no diagonal. (3) In a left-dominant circulation the
PDA arises from the circumflex; it is still the posterior descending artery. ``obtuse_marginal_3``
has no SYNTAX counterpart, so it never appears in data read from ARCADE.

ARCADE's "stenosis" files (the same category list, annotations of category ``stenosis``) are read
as they are, with one class (:data:`STENOSIS_CATEGORIES`). :func:`read_angiography_coco` detects
the format from the category names, or takes it as an argument.

Phase 1 (binary vessel segmentation) reads ``{"image", "label", "name"}`` entries from an image
folder and a mask folder (:func:`read_vessel_folders`, masks loaded by
:class:`~common.transforms.io.LoadBinaryMaskd`), or takes the union of an entry's segments
(:class:`VesselMaskd`).

Command line::

    python -m common.data.angiography convert --input arcade/syntax/train/annotations/train.json \\
        --image-root arcade/syntax/train/images --output data/angio/train.json
    python -m common.data.angiography vessel-masks --input data/angio/train.json --output data/angio/vessels
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform
from PIL import Image
from pycocotools import mask as mask_utils

from common.data.angiogram_images import ANGIOGRAM_SUFFIXES, angiogram_size
from common.data.cell_readers import LABEL_SUFFIXES, image_size
from common.data.coco import coco_field, coco_records, load_coco, segmentation_to_rle
from common.data.coco_instances import CocoInstancesd, decode_segmentations, read_coco_instances
from common.errors import InputDataError
from common.io.atomic import atomic_write
from common.utils import require_dir

__all__ = [
    "CASS_CATEGORIES",
    "FORMATS",
    "STENOSIS_CATEGORIES",
    "SYNTAX_SEGMENTS",
    "SYNTAX_TO_CASS",
    "VesselMaskd",
    "build_coco",
    "category_names",
    "detect_format",
    "main",
    "read_angiography_coco",
    "read_coco_and_format",
    "read_vessel_folders",
    "vessel_mask",
]

CASS_CATEGORIES = (
    "proximal_rca",
    "mid_rca",
    "distal_rca",
    "pda",
    "proximal_lad",
    "mid_lad",
    "distal_lad",
    "distal_lcx",
    "obtuse_marginal_1",
    "obtuse_marginal_2",
    "obtuse_marginal_3",
    "left_main",
    "ramus",
    "proximal_lcx",
)
STENOSIS_CATEGORIES = ("stenosis",)
SYNTAX_SEGMENTS = (
    "1", "2", "3", "4", "5", "6", "7", "8", "9", "9a", "10", "10a", "11", "12", "12a", "13",
    "14", "14a", "15", "16", "16a", "16b", "16c", "12b", "14b",
)  # fmt: skip
SYNTAX_TO_CASS: dict[str, str | None] = {
    "1": "proximal_rca",
    "2": "mid_rca",
    "3": "distal_rca",
    "4": "pda",
    "16": None,
    "16a": None,
    "16b": None,
    "16c": None,
    "5": "left_main",
    "6": "proximal_lad",
    "7": "mid_lad",
    "8": "distal_lad",
    "9": None,
    "9a": None,
    "10": None,
    "10a": None,
    "11": "proximal_lcx",
    "12": "ramus",
    "12a": "obtuse_marginal_1",
    "12b": "obtuse_marginal_2",
    "13": "distal_lcx",
    "14": None,
    "14a": None,
    "14b": None,
    "15": "pda",
}
FORMATS = ("auto", "cass", "arcade", "arcade_stenosis")
_ARCADE_NAMES = frozenset(SYNTAX_SEGMENTS) | frozenset(STENOSIS_CATEGORIES)
_REMEDY = (
    "categories are matched by name: CASS files use "
    + ", ".join(CASS_CATEGORIES)
    + "; ARCADE files the SYNTAX numbers 1-16c and 'stenosis'. Rename the categories, or convert with "
    "`python -m common.data.angiography convert --format arcade ...`; for demo data run "
    "`python -m common.data.synthetic.angiography --output_dir DIR`"
)
_MISSING_REMEDY = (
    "point --dataset_dir at a folder with {train,val,test}/cass.json and their images (the docs/README.md "
    "layout); convert ARCADE files with `python -m common.data.angiography convert --format arcade ...`, "
    "or write demo data with `python -m common.data.synthetic.angiography --output_dir DIR`"
)


def category_names(format: str) -> tuple[str, ...]:
    """The classes (label ``i + 1`` is ``names[i]``) that data of ``format`` is read as."""
    if format not in FORMATS[1:]:
        raise ValueError(f"format must be one of {FORMATS[1:]}, got {format!r}")
    return STENOSIS_CATEGORIES if format == "arcade_stenosis" else CASS_CATEGORIES


def _names_by_id(coco: dict[str, Any], path: Path) -> dict[Any, str]:
    categories = coco_records(coco, "categories", path)
    return {
        coco_field(c, "id", path, "a category"): str(coco_field(c, "name", path, "a category"))
        for c in categories
    }


def detect_format(names: Iterable[str], path: str | os.PathLike | None = None) -> str:
    """``"cass"``, ``"arcade"`` or ``"arcade_stenosis"`` from a COCO file's category names.

    ARCADE's stenosis files list the SYNTAX categories too: :func:`read_angiography_coco` tells them
    apart by their annotations, which are all ``stenosis``.

    Raises:
        InputDataError: names of neither scheme (``path`` is named in the message).
    """
    names = set(names)
    if names <= set(CASS_CATEGORIES):
        return "cass"
    if names <= _ARCADE_NAMES:
        return "arcade" if names - set(STENOSIS_CATEGORIES) else "arcade_stenosis"
    unknown = sorted(names - set(CASS_CATEGORIES) - _ARCADE_NAMES)
    raise InputDataError(path, f"unknown category names {unknown}: neither CASS nor ARCADE SYNTAX", _REMEDY)


def _resolve_format(coco: dict[str, Any], names: dict[Any, str], format: str, path: Path) -> str:
    """The format of ``coco``: ``format`` checked against its category names, or detected.

    An ARCADE file whose annotations are all ``stenosis`` is a stenosis file, although it lists the
    SYNTAX categories too.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "auto":
        format = detect_format(names.values(), path)
    unknown = sorted(set(names.values()) - (set(CASS_CATEGORIES) if format == "cass" else _ARCADE_NAMES))
    if unknown:
        raise InputDataError(path, f"unknown category names {unknown} for format {format!r}", _REMEDY)
    if format == "arcade":
        used = {names.get(a.get("category_id")) for a in coco_records(coco, "annotations", path)}
        if used and used <= set(STENOSIS_CATEGORIES):
            return "arcade_stenosis"
    return format


def _merge(segmentations: list[Any], height: int, width: int) -> Any:
    """One segmentation for several annotations of one object: polygons joined, otherwise an RLE union."""
    if len(segmentations) == 1:
        return segmentations[0]
    if all(isinstance(s, list) for s in segmentations):
        return [polygon for s in segmentations for polygon in s]
    rle = mask_utils.merge([segmentation_to_rle(s, height, width) for s in segmentations])
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _relabel(entry: dict[str, Any], labels: dict[int, int | None]) -> None:
    """Give each annotation of ``entry`` its new label (``None`` drops it), one merged annotation per label."""
    grouped: dict[int, list[dict[str, Any]]] = {}
    for ann in entry["annotations"]:
        label = labels[ann["category_id"]]
        if label is not None:
            grouped.setdefault(label, []).append(ann)
    entry["annotations"] = [
        {
            "segmentation": _merge([a["segmentation"] for a in anns], entry["height"], entry["width"]),
            "category_id": label,
            "iscrowd": max(a["iscrowd"] for a in anns),
            "bbox": anns[0]["bbox"] if len(anns) == 1 else None,
            "label": label,
        }
        for label, anns in sorted(grouped.items())
    ]


def read_coco_and_format(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    format: str = "auto",
    keep_crowd: bool = False,
) -> tuple[list[dict[str, Any]], str]:
    """The entries of :func:`read_angiography_coco` and the format they were read as (detected when
    ``format`` is ``"auto"``), for callers that need the class names too."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "COCO file not found", _MISSING_REMEDY)
    coco = load_coco(path)
    names = _names_by_id(coco, path)
    format = _resolve_format(coco, names, format, path)
    classes = category_names(format)
    if format == "cass":
        entries = read_coco_instances(path, image_root, classes, keep_crowd)
        for ann in (ann for entry in entries for ann in entry["annotations"]):
            ann["category_id"] = ann["label"]
    else:
        entries = read_coco_instances(path, image_root, None, keep_crowd)
        mapping = SYNTAX_TO_CASS if format == "arcade" else {"stenosis": "stenosis"}
        labels = {
            category_id: classes.index(mapping[name]) + 1 if mapping.get(name) else None
            for category_id, name in names.items()
        }
        for entry in entries:
            _relabel(entry, labels)
    frames = {r.get("id"): r["frame"] for r in coco_records(coco, "images", path) if "frame" in r}
    for entry in entries:
        if entry["image_id"] in frames:
            entry["frame"] = int(frames[entry["image_id"]])
    return entries, format


def read_angiography_coco(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    format: str = "auto",
    keep_crowd: bool = False,
) -> list[dict[str, Any]]:
    """One entry per image of a CASS or ARCADE COCO file, labelled with :data:`CASS_CATEGORIES`
    (``label`` and ``category_id`` = CASS id), or with :data:`STENOSIS_CATEGORIES` for a stenosis file.

    Entries are those of :func:`~common.data.coco_instances.read_coco_instances`, plus ``frame`` where
    the COCO image record names the labelled frame of a DICOM run.

    Args:
        path: the COCO JSON file.
        image_root: folder that ``file_name`` is relative to; by default the JSON's folder.
        format: ``"cass"``, ``"arcade"`` (SYNTAX segments, mapped as in the module docstring),
            ``"arcade_stenosis"``, or ``"auto"`` to detect it from the category names.
        keep_crowd: keep ``iscrowd: 1`` annotations.

    Raises:
        InputDataError: malformed JSON, an unknown category name, an annotation without a valid
            segmentation, a missing image, or any other problem that ``read_coco_instances`` reports.
    """
    return read_coco_and_format(path, image_root, format, keep_crowd)[0]


def _file_name(image: str, folder: Path) -> str:
    """``image`` relative to ``folder`` (the output JSON's), so that the dataset moves as one."""
    return Path(os.path.relpath(Path(image).resolve(), folder.resolve())).as_posix()


def build_coco(
    entries: Sequence[Mapping[str, Any]],
    classes: Sequence[str] = CASS_CATEGORIES,
    relative_to: str | os.PathLike = ".",
) -> dict[str, Any]:
    """A COCO dict of ``entries`` (as :func:`read_angiography_coco` returns them) with categories
    ``classes`` (id ``i + 1``), file names relative to ``relative_to``, and boxes and areas measured
    on the segmentations."""
    images, annotations = [], []
    for image_id, entry in enumerate(entries, start=1):
        record = {
            "id": image_id,
            "file_name": _file_name(entry["image"], Path(relative_to)),
            "height": entry["height"],
            "width": entry["width"],
        }
        images.append(record | ({"frame": entry["frame"]} if "frame" in entry else {}))
        for ann in entry["annotations"]:
            rle = segmentation_to_rle(ann["segmentation"], entry["height"], entry["width"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": ann["label"],
                    "segmentation": ann["segmentation"],
                    "bbox": [round(v, 2) for v in mask_utils.toBbox(rle).tolist()],
                    "area": int(mask_utils.area(rle)),
                    "iscrowd": ann["iscrowd"],
                }
            )
    categories = [{"id": i, "name": name} for i, name in enumerate(classes, start=1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def vessel_mask(entry: Mapping[str, Any]) -> np.ndarray:
    """The union of an entry's segments as an HxW bool mask (what phase 1 learns)."""
    segmentations = [a["segmentation"] for a in entry["annotations"]]
    return decode_segmentations(segmentations, entry["height"], entry["width"]).any(axis=0)


class VesselMaskd(MapTransform):
    """Write the union of an entry's segments as a (1, H, W) uint8 0/1 mask under ``mask_key``.

    Phase 1 then trains on any CASS or ARCADE COCO file without separate mask files. Decoding and the
    check of the loaded image's size against the COCO file are those of
    :class:`~common.data.coco_instances.CocoInstancesd`; the mask carries the image's metadata.

    Raises:
        InputDataError: the loaded image's size differs from the one in the COCO file.
    """

    def __init__(
        self,
        annotations_key: str = "annotations",
        image_key: str = "image",
        mask_key: str = "label",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(annotations_key, allow_missing_keys)
        self.mask_key = mask_key
        self._decode = CocoInstancesd(
            annotations_key, image_key, "_segments", "_segment_labels", allow_missing_keys
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for _ in self.key_iterator(d):
            segments = self._decode(d)["_segments"]
            d[self.mask_key] = (segments.sum(dim=0, keepdim=True) > 0).to(torch.uint8)
        return d


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Visible files of ``folder`` with one of ``suffixes``, sorted."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    )


def read_vessel_folders(
    image_dir: str | os.PathLike, mask_dir: str | os.PathLike, mask_suffix: str = ""
) -> list[dict[str, str]]:
    """Entries ``{"image", "label", "name"}`` pairing ``image_dir/NAME.ext`` (PNG, JPEG, TIFF or
    DICOM) with the binary vessel mask ``mask_dir/NAME{mask_suffix}.png`` (or .tif/.tiff).

    Only headers are read; mask values are checked when :class:`~common.transforms.io.LoadBinaryMaskd`
    loads them. A DICOM run's mask labels the frame that the loader picks (by default the middle one).

    Raises:
        InputDataError: a missing folder, no images, an image without its mask, or a mask of another
            size than its image.
    """
    image_dir, mask_dir = require_dir(image_dir, "image folder"), require_dir(mask_dir, "vessel mask folder")
    same_folder = image_dir.resolve() == mask_dir.resolve()
    if same_folder and not mask_suffix:
        raise InputDataError(
            mask_dir, "images and masks share this folder; give a mask suffix such as '_mask'"
        )
    masks = {p.stem: p for p in _files(mask_dir, LABEL_SUFFIXES)}
    images = _files(image_dir, ANGIOGRAM_SUFFIXES)
    if same_folder:
        images = [p for p in images if not p.stem.endswith(mask_suffix)]
    if not images:
        raise InputDataError(image_dir, f"no angiograms ({'/'.join(ANGIOGRAM_SUFFIXES)}) found")
    entries = []
    for image in images:
        mask = masks.get(image.stem + mask_suffix)
        if mask is None:
            raise InputDataError(image, f"no vessel mask {image.stem}{mask_suffix}.png/.tif in {mask_dir}")
        size, mask_size = angiogram_size(image), image_size(mask)
        if size != mask_size:
            raise InputDataError(
                mask,
                f"mask is {mask_size[0]}x{mask_size[1]} but image {image.name} is {size[0]}x{size[1]} (height x width)",
            )
        entries.append({"image": str(image), "label": str(mask), "name": image.stem})
    return entries


def _write_json(path: Path, content: dict[str, Any]) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(content).encode("utf-8")))


def convert(
    input: str | os.PathLike,
    output: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    format: str = "auto",
) -> Path:
    """Rewrite a CASS or ARCADE COCO file as a CASS (or stenosis) COCO file with ids 1..K, atomically."""
    output = Path(output)
    entries, format = read_coco_and_format(input, image_root, format)
    return _write_json(output, build_coco(entries, category_names(format), output.parent))


def write_vessel_masks(
    input: str | os.PathLike,
    output_dir: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    format: str = "auto",
) -> list[Path]:
    """Write ``output_dir/NAME.png`` (0/255), the union of each image's segments, for phase 1."""
    entries = read_angiography_coco(input, image_root, format)
    stems = [entry["name"] for entry in entries]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise InputDataError(
            input, f"images share the names {duplicates}; their masks would overwrite each other"
        )
    paths = []
    for entry in entries:
        mask = Image.fromarray(vessel_mask(entry).astype(np.uint8) * 255)
        paths.append(
            atomic_write(Path(output_dir) / f"{entry['name']}.png", lambda f, m=mask: m.save(f, format="PNG"))
        )
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: ``convert`` (to CASS COCO) and ``vessel-masks`` (phase-1 masks)."""
    parser = argparse.ArgumentParser(
        prog="python -m common.data.angiography", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help in (("convert", "write a CASS COCO file"), ("vessel-masks", "write binary vessel masks")):
        command = commands.add_parser(name, help=help)
        command.add_argument("--input", required=True, help="CASS or ARCADE COCO JSON file")
        command.add_argument(
            "--image-root", help="folder the file names are relative to (default: the JSON's)"
        )
        command.add_argument("--format", choices=FORMATS, default="auto")
        command.add_argument("--output", required=True, help="output JSON file (convert) or mask folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            print(convert(args.input, args.output, args.image_root, args.format))
        else:
            paths = write_vessel_masks(args.input, args.output, args.image_root, args.format)
            print(f"wrote {len(paths)} vessel masks to {args.output}")
    except InputDataError as err:
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
