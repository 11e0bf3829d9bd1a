"""The MONAI Label app that serves every bundle of the collection, straight from ``bundles/``.

Configured through MONAI Label's ``--conf`` key/value pairs (``python -m common.monailabel serve`` sets
them from its options):

- ``bundles``: comma-separated bundle names (default: every entry of
  :data:`common.monailabel.bundles.BUNDLES`);
- ``bundles_dir``: folder holding the bundles (default: the repository's ``bundles/``);
- ``models_dir``: folder with one sub-folder of weights per bundle (default: each bundle's ``models/``);
- ``work_dir``: where training logs and whole-slide outputs go (default: ``<studies>/.monailabel``);
- ``overrides``: a JSON file ``{bundle: {config id: value}}`` applied to inference and training,
  e.g. to serve a smaller network.

No model zoo is contacted: the bundles are read from disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.random import Random

from common.errors import InputDataError
from common.monailabel.bundles import REPO_ROOT, select_bundles
from common.monailabel.infer import create_infer_task
from common.monailabel.strategy import FlipDisagreement
from common.monailabel.train import BundleTrainTask

__all__ = ["CollectionApp"]


def _read_overrides(path: str | None) -> dict[str, dict[str, Any]]:
    if not path:
        return {}
    try:
        overrides = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InputDataError(path, f"cannot read the overrides JSON ({err})") from err
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise InputDataError(path, 'overrides must be {"<bundle>": {"<config id>": value}}')
    return overrides


class CollectionApp(MONAILabelApp):
    """Inference for every served bundle, training for those whose labels an annotator can draw, and
    random or flip-disagreement active learning."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        names = [name for name in conf.get("bundles", "").split(",") if name]
        self.entries = select_bundles(names)
        self.bundles_dir = Path(conf.get("bundles_dir") or REPO_ROOT / "bundles")
        self.models_root = Path(conf["models_dir"]) if conf.get("models_dir") else None
        self.work_dir = Path(conf.get("work_dir") or Path(studies) / ".monailabel")
        self.overrides = _read_overrides(conf.get("overrides"))
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

    def models_dir(self, name: str) -> Path:
        if self.models_root is None:
            return self.bundles_dir / name / "models"
        return self.models_root / name

    def init_infers(self) -> dict[str, Any]:
        return {
            entry.name: create_infer_task(
                entry,
                self.bundles_dir / entry.name,
                self.models_dir(entry.name),
                self.work_dir / "outputs" / entry.name,
                self.overrides.get(entry.name),
            )
            for entry in self.entries
        }

    def init_trainers(self) -> dict[str, Any]:
        return {
            entry.name: BundleTrainTask(
                entry,
                self.bundles_dir / entry.name,
                self.models_dir(entry.name),
                self.work_dir / "runs" / entry.name,
                owns_unmarked=self.owns_unmarked,
                overrides=self.overrides.get(entry.name),
            )
            for entry in self.entries
            if entry.trainable
        }

    def init_strategies(self) -> dict[str, Any]:
        return {"random": Random(), "flip_disagreement": FlipDisagreement(self._infers, self.owns_unmarked)}
