"""The MONAI Label app that serves every bundle of the collection, straight from ``bundles/``.

Configured through MONAI Label's ``--conf`` key/value pairs (``python -m common.monailabel serve`` sets
them from its options):

- ``bundles``: comma-separated model names (default: every entry of
  :data:`common.monailabel.bundles.BUNDLES`);
- ``bundles_dir``: folder holding the bundles (default: the repository's ``bundles/``);
- ``models_dir``: folder with one sub-folder of weights per bundle folder (default: each bundle's
  ``models/``); models of one bundle share it, their weights files differ;
- ``work_dir``: where training logs and whole-slide outputs go (default: ``<studies>/.monailabel``);
- ``overrides``: a JSON file ``{model: {config id: value}}`` applied to inference and training,
  e.g. to serve a smaller network (see :func:`common.monailabel.bundles.bundle_parser`).

No model zoo is contacted: the bundles are read from disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.tasks.activelearning.random import Random

from common.errors import InputDataError
from common.monailabel.bundles import REPO_ROOT, BundleEntry, select_bundles, unused_overrides
from common.monailabel.infer import SlideInferTask, create_infer_task
from common.monailabel.strategy import FlipDisagreement
from common.monailabel.train import BundleTrainTask
from common.monailabel.wsi import infer_wsi

__all__ = ["CollectionApp"]


def _read_overrides(
    path: str | None, entries: list[BundleEntry], bundles_dir: Path
) -> dict[str, dict[str, Any]]:
    """The overrides file, checked: every id must be one that the model's configs can take."""
    if not path:
        return {}
    try:
        overrides = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InputDataError(path, f"cannot read the overrides JSON ({err})") from err
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise InputDataError(path, 'overrides must be {"<model>": {"<config id>": value}}')
    for entry in entries:
        unused = unused_overrides(entry, bundles_dir / entry.folder, overrides.get(entry.name, {}))
        if unused:
            raise InputDataError(path, f"{entry.name}: no config of the model has (the parent of) {unused}")
    return overrides


class CollectionApp(MONAILabelApp):
    """Inference for every served bundle, training for those whose labels an annotator can draw,
    QuPath's tiled whole-slide inference, and random or flip-disagreement active learning."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        names = [name for name in conf.get("bundles", "").split(",") if name]
        self.entries = select_bundles(names)
        self.bundles_dir = Path(conf.get("bundles_dir") or REPO_ROOT / "bundles")
        self.models_root = Path(conf["models_dir"]) if conf.get("models_dir") else None
        self.work_dir = Path(conf.get("work_dir") or Path(studies) / ".monailabel")
        self.overrides = _read_overrides(conf.get("overrides"), self.entries, self.bundles_dir)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MONAI imaging bundles",
            description="Every bundle of the collection, served from its own configs",
            version="1.0",
        )

    @property
    def owns_unmarked(self) -> bool:
        """Images and labels that name no model belong to the bundle served alone."""
        return len(self.entries) == 1

    def models_dir(self, entry: BundleEntry) -> Path:
        if self.models_root is None:
            return self.bundles_dir / entry.folder / "models"
        return self.models_root / entry.folder

    def init_infers(self) -> dict[str, Any]:
        return {
            entry.name: create_infer_task(
                entry,
                self.bundles_dir / entry.folder,
                self.models_dir(entry),
                self.work_dir / "outputs" / entry.name,
                self.overrides.get(entry.name),
            )
            for entry in self.entries
        }

    def init_trainers(self) -> dict[str, Any]:
        return {
            entry.name: BundleTrainTask(
                entry,
                self.bundles_dir / entry.folder,
                self.models_dir(entry),
                self.work_dir / "runs" / entry.name,
                owns_unmarked=self.owns_unmarked,
                overrides=self.overrides.get(entry.name),
            )
            for entry in self.entries
            if entry.trainable
        }

    def init_strategies(self) -> dict[str, Any]:
        return {"random": Random(), "flip_disagreement": FlipDisagreement(self._infers, self.owns_unmarked)}

    def infer_wsi(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """``/infer/wsi/<model>``: polygons of a slide region's classes (see :mod:`common.monailabel.wsi`),
        without the OpenSlide tiling of MONAI Label's own."""
        name = request.get("model")
        task = self._infers.get(name) if isinstance(name, str) else None
        if not isinstance(task, SlideInferTask):
            slides = sorted(n for n, t in self._infers.items() if isinstance(t, SlideInferTask))
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT, f"/infer/wsi serves {slides}; got {name!r}"
            )
        image = str(request.get("image") or "")
        if not os.path.isfile(image):
            image = (datastore or self.datastore()).get_image_uri(image)
        return infer_wsi(task, image, request)
