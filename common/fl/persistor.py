"""The server's global model, kept as an ordinary bundle checkpoint.

:class:`BundleModelPersistor` builds the bundle's ``network_def`` for the first round's weights and
saves every global model as ``<bundle>/models/model.pt`` in the server's copy of the bundle: a plain
state dict, written atomically, that the bundle's inference.json loads with ``weights_only=True`` and
that exports like any trained bundle. :class:`BundleModelLocator` hands that file to NVFlare's
cross-site evaluation, so every site also validates the global model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.utils import convert_to_numpy, set_determinism
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_locator import ModelLocator
from nvflare.app_common.abstract.model_persistor import ModelPersistor

from common.io.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["GLOBAL_MODEL_NAME", "BundleModelLocator", "BundleModelPersistor", "initial_weights"]

GLOBAL_MODEL_NAME = "global"


def initial_weights(
    bundle_root: str | os.PathLike, config_files: Sequence[str], overrides: Mapping[str, Any]
) -> dict:
    """State dict of the bundle's ``network_def`` as its configs build it (with ``_meta_`` from its
    metadata.json, as ``monai.bundle run`` reads it), seeded by its ``seed`` id."""
    parser = ConfigParser()
    parser.read_config([str(Path(bundle_root) / name) for name in config_files])
    metadata = Path(bundle_root) / "configs" / "metadata.json"
    if metadata.is_file():
        parser.read_meta(str(metadata))
    parser.update({**overrides, "bundle_root": str(bundle_root)})
    if "seed" in parser:
        set_determinism(seed=parser.get_parsed_content("seed"))
    network = parser.get_parsed_content("network_def")
    return {name: value.detach().cpu() for name, value in network.state_dict().items()}


class BundleModelPersistor(ModelPersistor):
    """Load the first global model from the bundle's configs; save each one as ``models/model.pt``.

    Args:
        bundle_root: the bundle folder, relative to the server's app folder.
        config_files: configs that define ``network_def``, relative to ``bundle_root``.
        overrides: config ids set as at the sites (a smaller network for a test, ``pretrained``, ...).
        model_file: where the global model is written, relative to ``bundle_root``.
    """

    def __init__(
        self,
        bundle_root: str,
        config_files: Sequence[str] = ("configs/train.json",),
        overrides: Mapping[str, Any] | None = None,
        model_file: str = "models/model.pt",
    ) -> None:
        super().__init__()
        self.bundle_root = bundle_root
        self.config_files = list(config_files)
        self.overrides = dict(overrides or {})
        self.model_file = model_file

    def model_path(self, fl_ctx: FLContext) -> Path:
        return Path(fl_ctx.get_prop(FLContextKey.APP_ROOT)) / self.bundle_root / self.model_file

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        bundle = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT)) / self.bundle_root
        weights = initial_weights(bundle, self.config_files, self.overrides)
        self.log_info(fl_ctx, f"initial global model: {len(weights)} tensors from {bundle}'s network_def")
        return make_model_learnable({name: convert_to_numpy(value) for name, value in weights.items()}, {})

    def save_model(self, model: ModelLearnable, fl_ctx: FLContext) -> None:
        weights = {name: torch.as_tensor(value) for name, value in model[ModelLearnableKey.WEIGHTS].items()}
        path = save_checkpoint(weights, self.model_path(fl_ctx))
        self.log_info(fl_ctx, f"saved the global model to {path}")


class BundleModelLocator(ModelLocator):
    """Offer the persistor's last global model to NVFlare's cross-site evaluation.

    Args:
        persistor_id: component id of the :class:`BundleModelPersistor`.
    """

    def __init__(self, persistor_id: str = "persistor") -> None:
        super().__init__()
        self.persistor_id = persistor_id

    def _path(self, fl_ctx: FLContext) -> Path:
        persistor = fl_ctx.get_engine().get_component(self.persistor_id)
        if not isinstance(persistor, BundleModelPersistor):
            raise TypeError(
                f"component {self.persistor_id!r} must be a BundleModelPersistor, got {type(persistor)}"
            )
        return persistor.model_path(fl_ctx)

    def get_model_names(self, fl_ctx: FLContext) -> list[str]:
        return [GLOBAL_MODEL_NAME] if self._path(fl_ctx).is_file() else []

    def locate_model(self, model_name: str, fl_ctx: FLContext) -> DXO | None:
        if model_name != GLOBAL_MODEL_NAME:
            return None
        weights = load_checkpoint(self._path(fl_ctx))
        return DXO(
            data_kind=DataKind.WEIGHTS,
            data={name: convert_to_numpy(value) for name, value in weights.items()},
        )
