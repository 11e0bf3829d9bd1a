"""The models the MONAI Label app serves, and how their bundles' configs are read.

Each model is one :class:`BundleEntry`: its bundle, which of the app's output kinds it produces and
whether an annotator can draw its labels (so that the app can train it). Everything else (network,
preprocessing, postprocessing, training loop, label names) comes from the bundle's own configs, merged
with its thin ``configs/monailabel_infer.json`` / ``monailabel_train.json`` layers and read through
MONAI's ``ConfigParser`` exactly as ``python -m monai.bundle run`` would; the configs a layer is merged
over are the ones the bundle's metadata lists for it in ``config_bases``. A bundle with a second
workflow (the angiography bundle's vessel model beside its segment model) serves it as a second entry
whose layers carry the workflow's name (``monailabel_infer_vessels.json``). Serving a new bundle is one
entry in :data:`BUNDLES` plus its layers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.reference_resolver import ReferenceResolver

from common.bundle.verify import config_bases
from common.errors import InputDataError

__all__ = [
    "BUNDLES",
    "KINDS",
    "REPO_ROOT",
    "WORKFLOWS",
    "BundleEntry",
    "bundle_parser",
    "label_names",
    "select_bundles",
    "unused_overrides",
]

REPO_ROOT = Path(__file__).resolve().parents[2]

KINDS = ("instances", "mask", "detections", "slide")
"""What a bundle returns to the viewer: an instance label map, a semantic mask or label map, scored
points with a class, or the class map of a region of a whole slide."""

WORKFLOWS = ("infer", "train")
"""The app's two uses of a bundle, each through its own config layer."""


@dataclass(frozen=True)
class BundleEntry:
    """One served model.

    Args:
        name: the model name in MONAI Label's REST API (and in the overrides file); unique.
        kind: one of :data:`KINDS`.
        weights: files in the bundle's models folder that inference needs; a trainable entry has one,
            the file its training writes.
        trainable: annotators can draw its labels, so ``/train/<name>`` trains it from the datastore.
        bundle: the folder under ``bundles/``; ``name`` by default.
        workflow: the bundle workflow this model is, when not the main one: its layers are then
            ``monailabel_infer_<workflow>.json`` and ``monailabel_train_<workflow>.json``.
        output: the ``network_data_format.outputs`` entry of the metadata whose ``channel_def`` names
            the labels.
    """

    name: str
    kind: str
    weights: tuple[str, ...] = ("model.pt",)
    trainable: bool = True
    bundle: str = ""
    workflow: str = ""
    output: str = "label"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.trainable and len(self.weights) != 1:
            raise ValueError(f"{self.name}: a trainable model has one weights file, got {self.weights}")

    @property
    def folder(self) -> str:
        """The bundle's folder name under ``bundles/``."""
        return self.bundle or self.name

    def layer(self, workflow: str) -> str:
        """The file name of this model's config layer for ``workflow`` (one of :data:`WORKFLOWS`)."""
        if workflow not in WORKFLOWS:
            raise ValueError(f"workflow must be one of {WORKFLOWS}, got {workflow!r}")
        return f"monailabel_{workflow}{'_' + self.workflow if self.workflow else ''}.json"


BUNDLES: dict[str, BundleEntry] = {
    entry.name: entry
    for entry in (
        BundleEntry("microscopy_dinocell_segmentation", "instances"),
        BundleEntry("dermoscopy_lesion_maskrcnn", "mask"),
        BundleEntry(
            "cytology_bethesda_detection", "detections", ("detector.pt", "classifier.pt"), trainable=False
        ),
        BundleEntry("pathology_wsss_deeplab", "slide"),
        BundleEntry("angiography_cass_segmentation", "mask"),
        BundleEntry(
            "angiography_cass_segmentation_vessels",
            "mask",
            ("vessels.pt",),
            bundle="angiography_cass_segmentation",
            workflow="vessels",
            output="vessels",
        ),
    )
}


def _applies(parser: ConfigParser, config_id: str) -> bool:
    """Whether ``config_id`` can be set in ``parser``: a top-level id, or one whose parent exists."""
    *parent, _ = ReferenceResolver.split_id(config_id)
    return not parent or ReferenceResolver.sep.join(parent) in parser


def bundle_parser(
    bundle_dir: str | os.PathLike,
    layer: str,
    models_dir: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
) -> ConfigParser:
    """A parser of the configs the bundle's metadata lists in ``config_bases`` for ``layer``, merged
    with ``layer``, rooted at the bundle.

    Args:
        bundle_dir: the bundle folder.
        layer: the layer's file name, e.g. ``"monailabel_infer.json"`` (see :meth:`BundleEntry.layer`).
        models_dir: where the weights are read and written (the bundle's ``models`` by default).
        overrides: config ids to replace, as on ``monai.bundle run``'s command line; a nested id
            (``vessels#network_def#depth``) only where its parent exists, so that one set of overrides
            serves a model's inference and training configs even where their ids differ.
    """
    configs = Path(bundle_dir) / "configs"
    meta = configs / "metadata.json"
    try:
        bases = config_bases(json.loads(meta.read_text())).get(layer)
    except (OSError, ValueError) as err:
        raise InputDataError(meta, f"cannot read the bundle metadata ({err})") from err
    if bases is None:
        raise InputDataError(meta, f"config_bases does not list {layer}: name the configs it is merged over")
    files = [configs / name for name in (*bases, layer)]
    for path in files:
        if not path.is_file():
            raise InputDataError(
                path, "config file not found", "serve only bundles listed in common.monailabel.bundles"
            )
    parser = ConfigParser()
    parser.read_config([str(path) for path in files])
    parser.read_meta(str(meta))
    parser.update({"bundle_root": str(bundle_dir), "ckpt_dir": str(models_dir)})
    parser.update({key: value for key, value in (overrides or {}).items() if _applies(parser, key)})
    return parser


def unused_overrides(
    entry: BundleEntry, bundle_dir: str | os.PathLike, overrides: Mapping[str, Any]
) -> list[str]:
    """The override ids that none of ``entry``'s configs (inference, and training when trainable) can
    take: a misspelt id would otherwise be ignored."""
    workflows = WORKFLOWS if entry.trainable else WORKFLOWS[:1]
    parsers = [bundle_parser(bundle_dir, entry.layer(workflow), bundle_dir) for workflow in workflows]
    return [key for key in overrides if not any(_applies(parser, key) for parser in parsers)]


def label_names(bundle_dir: str | os.PathLike, output: str = "label") -> dict[str, int]:
    """Label name -> value of the label image the app returns, from ``network_data_format.outputs.<output>``
    in the bundle's metadata (background, value 0 where it has one, left out as MONAI Label expects)."""
    path = Path(bundle_dir) / "configs" / "metadata.json"
    try:
        channels = json.loads(path.read_text())["network_data_format"]["outputs"][output]["channel_def"]
    except (OSError, ValueError, KeyError) as err:
        raise InputDataError(path, f"no network_data_format.outputs.{output}.channel_def ({err!r})") from err
    return {name: int(value) for value, name in channels.items() if name != "background"}


def select_bundles(names: Sequence[str] | None) -> list[BundleEntry]:
    """The entries named (all by default), refusing unknown names with the list of known ones."""
    if not names:
        return list(BUNDLES.values())
    unknown = [name for name in names if name not in BUNDLES]
    if unknown:
        raise ValueError(f"unknown bundle(s) {unknown}; the app serves {sorted(BUNDLES)}")
    return [BUNDLES[name] for name in names]
