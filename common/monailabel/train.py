"""MONAI Label training task: a bundle's own ``train.json`` run on the labels saved in the datastore.

The model's ``configs/monailabel_train*.json`` layer points its training and validation datasets at
``@monailabel_datalist`` (``[{"image": path, "label": path}]`` from the datastore) and adds what turns a
saved label into the bundle's target; everything else (network, loss, optimiser, handlers, the
checkpoint that writes the model's weights file) is the bundle's. Training starts from the served
weights when there are some, so annotators' corrections fine-tune the model; the inference task reads
the new weights on its next call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask

from common.io.checkpoint import extract_state_dict, load_checkpoint
from common.monailabel.bundles import BundleEntry, bundle_parser
from common.monailabel.datastore import labelled_pairs
from common.utils import unwrap_module

__all__ = ["BundleTrainTask", "rename_label"]


def rename_label(datalist: Sequence[Mapping[str, Any]], key: str) -> list[dict[str, Any]]:
    """``datalist`` with each entry's ``"label"`` under ``key``, for bundles whose loaders name it so."""
    return [{**{k: v for k, v in item.items() if k != "label"}, key: item["label"]} for item in datalist]


class BundleTrainTask(TrainTask):
    """Train one bundle from the datastore, synchronously in the server (``run_sync=true``) or in
    MONAI Label's background process.

    Args:
        entry: the bundle's entry in :data:`common.monailabel.bundles.BUNDLES`.
        bundle_dir: the bundle folder.
        models_dir: folder of its weights, read to start from and written by the bundle's checkpoints.
        runs_dir: folder of training logs (TensorBoard, validation reports).
        owns_unmarked: train on labels that name no model (see :mod:`common.monailabel.datastore`).
        overrides: config ids replaced in every run (e.g. a smaller network).
    """

    def __init__(
        self,
        entry: BundleEntry,
        bundle_dir: str | os.PathLike,
        models_dir: str | os.PathLike,
        runs_dir: str | os.PathLike,
        owns_unmarked: bool = False,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            f"Train {entry.name} on the datastore's final labels with its bundle's training config"
        )
        self.entry = entry
        self.bundle_dir = Path(bundle_dir)
        self.models_dir = Path(models_dir)
        self.runs_dir = Path(runs_dir)
        self.owns_unmarked = owns_unmarked
        self.overrides = dict(overrides or {})

    def config(self) -> dict[str, Any]:
        return {"max_epochs": 1}

    def __call__(self, request: Mapping[str, Any], datastore: Datastore) -> dict[str, Any]:
        datalist = labelled_pairs(datastore, self.entry.name, self.owns_unmarked)
        if not datalist:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                f"no final labels for {self.entry.name!r} in the datastore; save some through /datastore/label "
                f'(params {{"model": "{self.entry.name}"}}) first',
            )
        epochs = int(request.get("max_epochs", self.config()["max_epochs"]))
        self.models_dir.mkdir(parents=True, exist_ok=True)
        parser = bundle_parser(
            self.bundle_dir,
            self.entry.layer("train"),
            self.models_dir,
            {
                **self.overrides,
                "monailabel_datalist": datalist,
                "epochs": epochs,
                "output_dir": str(self.runs_dir),
            },
        )
        parser.get_parsed_content("initialize")
        weights = self.models_dir / self.entry.weights[0]
        if weights.is_file():
            state = extract_state_dict(load_checkpoint(weights))
            unwrap_module(parser.get_parsed_content("network")).load_state_dict(state)
        parser.get_parsed_content("run")
        parser.get_parsed_content("finalize")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"model": self.entry.name, "epochs": epochs, "samples": len(datalist), "weights": str(weights)}
