"""COCO instance annotations as training samples for Mask R-CNN style detectors.

:func:`read_coco_instances` turns a COCO file (such as the ``train.json``/``val.json`` written by
:mod:`common.data.mask_to_coco`, or an export from an annotation tool) into a checked datalist, one
entry per image, with the annotations kept as plain JSON values so that MONAI datasets can cache them
and DataLoader workers can pickle them. :class:`CocoInstancesd` decodes an entry's annotations into
the same ``instances``/``labels`` pair that :class:`~common.transforms.instances.MaskToInstancesd`
derives from a binary mask, so both data sources share one augmentation chain::

    LoadCellImaged("image")
    CocoInstancesd()                             # annotations -> instances (N, H, W), labels (N,)
    RandFlipd(["image", "instances"], ...)       # spatial transforms on both keys
    BoxesFromInstancesd()                        # boxes (N, 4) from the augmented masks

Crowd annotations (``iscrowd: 1``) mark a group of objects with one mask; a detector trained on
them would learn a single box around several lesions, so they are dropped unless ``keep_crowd``.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type
from pycocotools import mask as mask_utils

from common.data.coco import (
    check_segmentation,
    coco_field,
    coco_records,
    load_coco,
    segmentation_to_rle,
)
from common.errors import InputDataError

__all__ = ["CocoInstancesd", "decode_segmentations", "read_coco_instances"]

COCO_INSTANCES_REMEDY = (
    "convert binary masks with `python -m common.data.mask_to_coco --images IMAGES --masks MASKS "
    "--output DATASET_DIR/coco` (`--format isic` for ISIC folders); for demo data run "
    "`python -m common.data.synthetic.dermoscopy --output DIR`, then mask_to_coco on DIR/labelled"
)


def _int_field(record: dict[str, Any], key: str, path: Path, what: str) -> int:
    """``record[key]``, which must be an integer (COCO ids and sizes)."""
    value = coco_field(record, key, path, what)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputDataError(path, f'{what}: "{key}" must be an integer, got {value!r}')
    return value


def _category_labels(
    categories: list[dict[str, Any]], class_names: Sequence[str] | None, path: Path
) -> dict[int, int]:
    """``{category_id: label}`` with labels 1..K in ``class_names`` order, else in category-id order."""
    names = {
        _int_field(c, "id", path, "a category"): str(coco_field(c, "name", path, f"category {c.get('id')}"))
        for c in categories
    }
    if class_names is None:
        return {category_id: label for label, category_id in enumerate(sorted(names), start=1)}
    known = {name: label for label, name in enumerate(class_names, start=1)}
    for category_id, name in names.items():
        if name not in known:
            raise InputDataError(path, f"category {category_id} {name!r} is not one of {list(class_names)}")
    return {category_id: known[name] for category_id, name in names.items()}


def read_coco_instances(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    keep_crowd: bool = False,
) -> list[dict[str, Any]]:
    """One entry per image of a COCO instance-segmentation file, in the file's order.

    Each entry is ``{"image", "name", "coco", "image_id", "height", "width", "annotations"}``: the
    absolute image and JSON paths, the image's file stem, COCO id and size, and its annotations as
    ``{"segmentation", "category_id", "iscrowd", "bbox", "label"}`` dicts (``bbox`` as in the file, or
    ``None``: training boxes come from the augmented masks). Images without annotations are kept:
    lesion-free images are valid training examples.

    Args:
        path: the COCO JSON file.
        image_root: folder that ``file_name`` is relative to; by default the JSON's folder.
        class_names: label order; category ``name`` ``class_names[i]`` gets label ``i + 1``. By default
            the categories sorted by id get labels 1..K.
        keep_crowd: keep ``iscrowd: 1`` annotations (dropped by default, see the module docstring).

    Raises:
        InputDataError: a missing or invalid JSON file, no images, duplicate image ids, a missing image
            file, an annotation of an unknown image or category, a malformed segmentation, or a
            category not in ``class_names``.
    """
    if class_names is not None and (not class_names or len(set(class_names)) != len(class_names)):
        raise ValueError(f"class_names must be distinct and non-empty, got {class_names!r}")
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "file not found", COCO_INSTANCES_REMEDY)
    coco = load_coco(path)
    images, annotations, categories = (
        coco_records(coco, key, path) for key in ("images", "annotations", "categories")
    )
    if not images:
        raise InputDataError(path, "lists no images")
    labels = _category_labels(categories, class_names, path)
    root = path.parent if image_root is None else Path(image_root)

    entries: dict[int, dict[str, Any]] = {}
    for record in images:
        image_id = _int_field(record, "id", path, "an image entry")
        what = f"image {image_id}"
        if image_id in entries:
            raise InputDataError(path, f"image id {image_id} is listed twice")
        file_name = coco_field(record, "file_name", path, what)
        height, width = (_int_field(record, key, path, what) for key in ("height", "width"))
        if height < 1 or width < 1:
            raise InputDataError(path, f"{what}: height and width must be positive, got {height}x{width}")
        image = (root / str(file_name)).absolute()
        if not image.is_file():
            raise InputDataError(image, f"image {file_name!r} listed in {path} not found")
        entries[image_id] = {
            "image": str(image),
            "name": image.stem,
            "coco": str(path.absolute()),
            "image_id": image_id,
            "height": height,
            "width": width,
            "annotations": [],
        }

    for ann in annotations:
        what = f"annotation {ann.get('id', '?')}"
        image_id, category_id = (_int_field(ann, key, path, what) for key in ("image_id", "category_id"))
        segmentation = coco_field(ann, "segmentation", path, what)
        if image_id not in entries:
            raise InputDataError(path, f"{what} refers to unknown image_id {image_id!r}")
        if category_id not in labels:
            raise InputDataError(path, f"{what} refers to unknown category_id {category_id!r}")
        entry = entries[image_id]
        check_segmentation(segmentation, entry["height"], entry["width"], path, what)
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1):
            raise InputDataError(path, f'{what}: "iscrowd" must be 0 or 1, got {iscrowd!r}')
        if iscrowd and not keep_crowd:
            continue
        entry["annotations"].append(
            {
                "segmentation": segmentation,
                "category_id": category_id,
                "iscrowd": int(iscrowd),
                "bbox": ann.get("bbox"),
                "label": labels[category_id],
            }
        )
    return list(entries.values())


def decode_segmentations(segmentations: Sequence[list | dict], height: int, width: int) -> np.ndarray:
    """COCO segmentations (polygons, uncompressed or compressed RLE) as (N, H, W) uint8 masks."""
    if not segmentations:
        return np.zeros((0, height, width), dtype=np.uint8)
    rles = [segmentation_to_rle(segmentation, height, width) for segmentation in segmentations]
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))


class CocoInstancesd(MapTransform):
    """Decode the annotations of a :func:`read_coco_instances` entry into one uint8 channel per object.

    Writes ``instances_key`` (N, H, W) and ``labels_key`` (N,) int64, like
    :class:`~common.transforms.instances.MaskToInstancesd`. When the image is a MetaTensor, the
    instances become a MetaTensor with the image's metadata, so that MONAI spatial transforms treat
    both alike. Run it after loading the image and before the spatial augmentation.

    Args:
        annotations_key: the entry's annotation list.
        image_key: the loaded (C, H, W) image, whose size must be the entry's ``height`` x ``width``.
        instances_key: where to write the instance channels.
        labels_key: where to write the class labels.

    Raises:
        InputDataError: the loaded image's size differs from the one in the COCO file.
    """

    def __init__(
        self,
        annotations_key: str = "annotations",
        image_key: str = "image",
        instances_key: str = "instances",
        labels_key: str = "labels",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(annotations_key, allow_missing_keys)
        self.image_key = image_key
        self.instances_key = instances_key
        self.labels_key = labels_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[self.image_key]
            if not isinstance(image, (torch.Tensor, np.ndarray)) or image.ndim != 3:
                raise ValueError(f"{self.image_key!r} must be a loaded (C, H, W) image, not {type(image)}")
            height, width = d["height"], d["width"]
            if tuple(image.shape[1:]) != (height, width):
                name = getattr(image, "meta", {}).get("filename_or_obj", d.get("name"))
                raise InputDataError(
                    name,
                    f"image is {image.shape[1]}x{image.shape[2]} but {d.get('coco')} gives height x width "
                    f"{height}x{width}",
                )
            annotations = d[key]
            instances = decode_segmentations([a["segmentation"] for a in annotations], height, width)
            if isinstance(image, torch.Tensor):
                d[self.instances_key] = convert_to_dst_type(instances, image, dtype=torch.uint8)[0]
            else:
                d[self.instances_key] = torch.from_numpy(instances)
            d[self.labels_key] = torch.tensor([a["label"] for a in annotations], dtype=torch.int64)
        return d
