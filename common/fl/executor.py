"""NVFlare executor that trains and validates a bundle on a site through MONAI's ``MonaiAlgo``.

``monai-nvflare`` pins an old NVFlare and Python < 3.12, so this is the small part of it the
collection needs: the ``train``, ``validate`` and ``submit_model`` tasks of NVFlare's scatter-and-gather
and cross-site evaluation workflows, each mapped to one ``MonaiAlgo`` call. Weights travel as NumPy
arrays (NVFlare serialises them without PyTorch decomposers); the site sends weight differences, which
NVFlare's privacy filters (percentile, exclude-variables) act on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.engines.utils import IterationEvents
from monai.fl.client import MonaiAlgo
from monai.fl.utils.constants import ExtraItems, FlStatistics, ModelType, WeightType
from monai.fl.utils.exchange_object import ExchangeObject
from monai.utils import convert_to_numpy
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

__all__ = ["BundleExecutor", "FedProxGradient"]

# validating a model from another site or the server goes through the bundle's validation handlers,
# whose best-model saver would replace the site's own models/model.pt: send their files elsewhere
VALIDATION_OUTPUTS = {
    "ckpt_dir": "$@bundle_root + '/eval/cross_site/models'",
    "output_dir": "$@bundle_root + '/eval/cross_site'",
}


class FedProxGradient:
    """FedProx's proximal term, added to the gradients after every backward pass.

    FedProx (Li et al., 2020) adds ``mu / 2 * ||w - w_global||^2`` to each site's loss; its gradient is
    ``mu * (w - w_global)``, which is added here so that any bundle's trainer gets the term without
    changing its loss. Under AMP the gradients are still scaled at ``BACKWARD_COMPLETED``, so is the term.

    Args:
        mu: weight of the proximal term, > 0.
    """

    def __init__(self, mu: float) -> None:
        if mu <= 0:
            raise ValueError(f"mu must be > 0, got {mu}.")
        self.mu = mu
        self.reference: dict[str, torch.Tensor] = {}
        self.steps = 0

    def set_reference(self, weights: Mapping[str, Any]) -> None:
        """The global weights of this round, which the site's weights are pulled towards."""
        self.reference = {name: torch.as_tensor(value) for name, value in weights.items()}

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        scaler = getattr(engine, "scaler", None)
        scale = scaler.get_scale() if getattr(engine, "amp", False) and scaler is not None else 1.0
        network = engine.network.module if hasattr(engine.network, "module") else engine.network
        with torch.no_grad():
            for name, param in network.named_parameters():
                if param.grad is not None and name in self.reference:
                    reference = self.reference[name].to(device=param.device, dtype=param.dtype)
                    param.grad.add_(param - reference, alpha=self.mu * scale)
        self.steps += 1


def _to_numpy(weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {name: convert_to_numpy(value) for name, value in weights.items()}


class BundleExecutor(Executor):
    """Run a bundle's training and validation on this site for NVFlare's tasks.

    Args:
        bundle_root: the bundle folder, relative to the app folder NVFlare deploys.
        dataset_dirs: each site's ``dataset_dir``, by site name; the bundle reads its data from there.
        local_epochs: epochs each site trains per round.
        config_train: train configs relative to ``bundle_root``, applied in order; validation runs
            their ``validate#evaluator`` (the bundle's own validation split and key metric).
        overrides: config ids set at every site, e.g. ``{"num_workers": 2}``.
        fedprox_mu: weight of FedProx's proximal term; 0 trains with plain FedAvg.
        model_file: the site's best local checkpoint, relative to ``bundle_root``, sent for cross-site
            evaluation.
    """

    def __init__(
        self,
        bundle_root: str,
        dataset_dirs: Mapping[str, str],
        local_epochs: int = 1,
        config_train: Sequence[str] = ("configs/train.json",),
        overrides: Mapping[str, Any] | None = None,
        fedprox_mu: float = 0.0,
        model_file: str = "models/model.pt",
    ) -> None:
        super().__init__()
        if local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {local_epochs}.")
        self.bundle_root = bundle_root
        self.dataset_dirs = dict(dataset_dirs)
        self.local_epochs = local_epochs
        self.config_train = list(config_train)
        self.overrides = dict(overrides or {})
        self.fedprox = FedProxGradient(fedprox_mu) if fedprox_mu > 0 else None
        self.model_file = model_file
        self.tasks = {
            AppConstants.TASK_TRAIN: self._train,
            AppConstants.TASK_VALIDATION: self._validate,
            AppConstants.TASK_SUBMIT_MODEL: self._submit_model,
        }
        self.algo: MonaiAlgo | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self.algo = self._initialize(fl_ctx)
        elif event_type == EventType.END_RUN and self.algo is not None:
            self.algo.finalize()

    def _initialize(self, fl_ctx: FLContext) -> MonaiAlgo:
        site = fl_ctx.get_identity_name()
        if site not in self.dataset_dirs:
            raise ValueError(f"no dataset_dir for site {site!r}; the job lists {sorted(self.dataset_dirs)}.")
        kwargs = {**self.overrides, "dataset_dir": self.dataset_dirs[site]}
        algo = MonaiAlgo(
            bundle_root=self.bundle_root,
            local_epochs=self.local_epochs,
            config_train_filename=self.config_train,
            train_kwargs=dict(kwargs),
            config_evaluate_filename=self.config_train,
            eval_kwargs={**kwargs, **VALIDATION_OUTPUTS},
            best_model_filepath=self.model_file,
        )
        algo.initialize(
            extra={ExtraItems.CLIENT_NAME: site, ExtraItems.APP_ROOT: fl_ctx.get_prop(FLContextKey.APP_ROOT)}
        )
        if self.fedprox is not None:
            self.fedprox.attach(algo.trainer)
        return algo

    def execute(
        self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal
    ) -> Shareable:
        task = self.tasks.get(task_name)
        if task is None:
            self.log_error(fl_ctx, f"unknown task {task_name!r}; this executor runs {sorted(self.tasks)}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        if self.algo is None:
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        return task(shareable, fl_ctx)

    def _train(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        weights = from_shareable(shareable).data
        if self.fedprox is not None:
            self.fedprox.set_reference(weights)
        self.algo.train(ExchangeObject(weights=weights, weight_type=WeightType.WEIGHTS))
        update = self.algo.get_weights()
        steps = update.statistics.get(FlStatistics.NUM_EXECUTED_ITERATIONS, 1)
        kind = DataKind.WEIGHT_DIFF if update.weight_type == WeightType.WEIGHT_DIFF else DataKind.WEIGHTS
        if self.fedprox is not None and self.fedprox.steps == 0:
            raise RuntimeError(
                "FedProx was asked for but the bundle's trainer never fired BACKWARD_COMPLETED."
            )
        meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: steps}
        return DXO(data_kind=kind, data=_to_numpy(update.weights), meta=meta).to_shareable()

    def _validate(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        model_owner = shareable.get_header(AppConstants.MODEL_OWNER, "?")
        result = self.algo.evaluate(ExchangeObject(weights=from_shareable(shareable).data))
        metrics = {name: float(value) for name, value in result.metrics.items()}
        self.log_info(fl_ctx, f"validation of {model_owner}'s model: {metrics}")
        return DXO(data_kind=DataKind.METRICS, data=metrics).to_shareable()

    def _submit_model(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """The site's best local model (its ``models/model.pt``), for cross-site evaluation."""
        best = self.algo.get_weights(extra={ExtraItems.MODEL_TYPE: ModelType.BEST_MODEL})
        return DXO(data_kind=DataKind.WEIGHTS, data=_to_numpy(best.weights)).to_shareable()
