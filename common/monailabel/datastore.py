"""Which of the datastore's images belong to which bundle.

One MONAI Label datastore serves every bundle, so an image belongs to a bundle when its image info or
its final label's info says ``"model": "<bundle>"`` (MONAI Label writes that key when it saves a
prediction as a label; clients pass it in ``params`` when they upload an image or a label). Images
that name no model belong to the bundle only when the app serves that bundle alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

__all__ = ["image_owner", "labelled_pairs", "owned_images"]


def image_owner(datastore: Datastore, image_id: str) -> str | None:
    """The bundle an image is marked for, or ``None``."""
    label_info = datastore.get_label_info(image_id, DefaultLabelTag.FINAL) or {}
    return label_info.get("model") or (datastore.get_image_info(image_id) or {}).get("model")


def owned_images(datastore: Datastore, image_ids: Iterable[str], name: str, owns_unmarked: bool) -> list[str]:
    """The ids among ``image_ids`` that belong to bundle ``name``."""
    owners = {image_id: image_owner(datastore, image_id) for image_id in image_ids}
    return [i for i, owner in owners.items() if owner == name or (owner is None and owns_unmarked)]


def labelled_pairs(datastore: Datastore, name: str, owns_unmarked: bool) -> list[dict[str, Any]]:
    """``[{"image": path, "label": path}]`` of the final labels that belong to bundle ``name``, with the
    ``location`` and ``size`` of labels drawn on a region of a whole slide (see
    :mod:`common.monailabel.regions`)."""
    pairs = []
    for image_id in owned_images(datastore, datastore.get_labeled_images(), name, owns_unmarked):
        info = datastore.get_label_info(image_id, DefaultLabelTag.FINAL) or {}
        region = {key: info[key] for key in ("location", "size") if key in info}
        label = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL)
        pairs.append({"image": datastore.get_image_uri(image_id), "label": label, **region})
    return pairs
