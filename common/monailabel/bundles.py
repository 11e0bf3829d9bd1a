"""The bundles the MONAI Label app serves, and how their configs are read.

Each bundle is one :class:`BundleEntry`: which of the app's output kinds it produces and whether an
annotator can draw its labels (so that the app can train it). Everything else (network, preprocessing,
postprocessing, training loop, label names) comes from the bundle's own configs, merged with its thin
``configs/monailabel_infer.json`` / ``monailabel_train.json`` layers and read through MONAI's
``ConfigParser`` exactly as ``python -m monai.bundle run`` would. Serving a new bundle is one entry in
:data:`BUNDLES` plus its two layers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from common.errors import InputDataError

__all__ = ["BUNDLES", "KINDS", "REPO_ROOT", "BundleEntry", "bundle_parser", "label_names", "select_bundles"]

REPO_ROOT = Path(__file__).resolve().parents[2]

KINDS = ("instances", "mask", "detections", "slide")
"""What a bundle returns to the viewer: an instance label map, a semantic mask, scored points with a
class, or the class map of a region of a whole slide."""


@dataclass(frozen=True)
class BundleEntry:
    """One served bundle.

    Args:
        name: folder under ``bundles/``, also the model name in MONAI Label's REST API.
        kind: one of :data:`KINDS`.
        weights: files in the bundle's models folder that inference needs.
        trainable: annotators can draw its labels, so ``/train/<name>`` trains it from the datastore.
    """

    name: str
    kind: str
    weights: tuple[str, ...] = ("model.pt",)
    trainable: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}, got {self.kind!r}")


BUNDLES: dict[str, BundleEntry] = {
    entry.name: entry
    for entry in (
        BundleEntry("microscopy_dinocell_segmentation", "instances"),
        BundleEntry("dermoscopy_lesion_maskrcnn", "mask"),
        BundleEntry("cytology_bethesda_detection", "detections", ("detector.pt", "classifier.pt"), trainable=False),
        BundleEntry("pathology_wsss_deeplab", "slide"),
    )
}


def bundle_parser(
    bundle_dir: str | os.PathLike,
    layer: str,
    models_dir: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
) -> ConfigParser:
    """A parser of ``<workflow>.json`` merged with ``monailabel_<workflow>.json``, rooted at the bundle.

    Args:
        bundle_dir: the bundle folder.
        layer: ``"infer"`` (over ``inference.json``) or ``"train"`` (over ``train.json``).
        models_dir: where the weights are read and written (the bundle's ``models`` by default).
        overrides: config ids to replace, as on ``monai.bundle run``'s command line.
    """
    bundle_dir = Path(bundle_dir)
    base = {"infer": "inference.json", "train": "train.json"}[layer]
    files = [bundle_dir / "configs" / name for name in (base, f"monailabel_{layer}.json")]
    for path in files:
        if not path.is_file():
            raise InputDataError(path, "config file not found", "serve only bundles listed in common.monailabel.bundles")
    parser = ConfigParser()
    parser.read_config([str(path) for path in files])
    parser.read_meta(str(bundle_dir / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(bundle_dir), "ckpt_dir": str(models_dir), **(overrides or {})})
    return parser


def label_names(bundle_dir: str | os.PathLike) -> dict[str, int]:
    """Label name -> value of the label image the app returns, from ``network_data_format.outputs.label``
    in the bundle's metadata (background, value 0 where it has one, left out as MONAI Label expects)."""
    path = Path(bundle_dir) / "configs" / "metadata.json"
    try:
        channels = json.loads(path.read_text())["network_data_format"]["outputs"]["label"]["channel_def"]
    except (OSError, ValueError, KeyError) as err:
        raise InputDataError(path, f"no network_data_format.outputs.label.channel_def ({err!r})") from err
    return {name: int(value) for value, name in channels.items() if name != "background"}


def select_bundles(names: Sequence[str] | None) -> list[BundleEntry]:
    """The entries named (all by default), refusing unknown names with the list of known ones."""
    if not names:
        return list(BUNDLES.values())
    unknown = [name for name in names if name not in BUNDLES]
    if unknown:
        raise ValueError(f"unknown bundle(s) {unknown}; the app serves {sorted(BUNDLES)}")
    return [BUNDLES[name] for name in names]
