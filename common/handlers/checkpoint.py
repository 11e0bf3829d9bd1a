"""Atomic checkpoints with resume, as Ignite handlers.

MONAI's ``CheckpointSaver`` writes non-atomically and its loader needs the file name up front.
Here :class:`TrainingCheckpoint` keeps one ``checkpoint_latest.pt`` (network, optimizer, scheduler,
trainer state and anything else with ``state_dict``), replaced atomically at every save, and, with
``resume=True``, restores it when the trainer starts; :class:`BestModelSaver` keeps the weights of
the best validation score. Under DDP only rank 0 writes, every rank resumes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from common.errors import InputDataError
from common.io.checkpoint import extract_state_dict, load_checkpoint, save_checkpoint
from common.utils import unwrap_module

__all__ = ["BestModelSaver", "ModelWeightsLoader", "TrainingCheckpoint"]

logger = logging.getLogger(__name__)


def _state_dicts(objects: Mapping[str, Any]) -> dict[str, Any]:
    return {name: unwrap_module(obj).state_dict() for name, obj in objects.items()}


class TrainingCheckpoint:
    """Save the whole training state every ``save_interval`` epochs and resume from it.

    Args:
        save_dir: folder of ``filename``.
        save_dict: objects with ``state_dict``/``load_state_dict`` (network, optimizer, lr_scheduler,
            a :class:`BestModelSaver`, ...). The engine it is attached to is added as ``"trainer"``
            (so a config need not reference the trainer from inside the trainer's own handler list).
        resume: restore ``save_dir/filename`` when the trainer starts, if it exists.
        filename: name of the latest checkpoint.
        save_interval: epochs between saves; the final state is always saved when training ends.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        resume: bool = False,
        filename: str = "checkpoint_latest.pt",
        save_interval: int = 1,
    ) -> None:
        if save_interval < 1:
            raise ValueError(f"save_interval must be >= 1, got {save_interval}.")
        if not save_dict:
            raise ValueError("save_dict must name at least one object to save.")
        self.path = Path(save_dir) / filename
        self.save_dict = dict(save_dict)
        self.resume = resume
        self.save_interval = save_interval

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def save(self, engine: Engine | None = None) -> None:
        if idist.get_rank() != 0:
            return
        save_checkpoint(_state_dicts(self.save_dict), self.path)
        logger.info("saved training state to %s", self.path)

    def load(self, engine: Engine) -> None:
        if not self.path.is_file():
            logger.info("resume requested but %s does not exist yet: starting from scratch", self.path)
            return
        checkpoint = load_checkpoint(self.path, map_location="cpu")
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load={k: unwrap_module(v) for k, v in self.save_dict.items()}, checkpoint=checkpoint)
        # the command line may ask for more epochs than the interrupted run had
        engine.state.max_epochs = max(max_epochs or 0, engine.state.max_epochs or 0)
        logger.info("resumed from %s at epoch %d, iteration %d", self.path, engine.state.epoch, engine.state.iteration)


class BestModelSaver:
    """Keep the network weights of the best validation score (attach to the evaluator).

    Args:
        save_dir: folder of ``filename``.
        network: the network whose weights are saved (unwrapped from DDP).
        metric_name: key in ``engine.state.metrics``.
        mode: ``"max"`` when larger is better, ``"min"`` for errors such as MSE.
        filename: name of the weights file, ``model.pt`` as in the model zoo.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        network: torch.nn.Module,
        metric_name: str,
        mode: str = "max",
        filename: str = "model.pt",
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
        self.path = Path(save_dir) / filename
        self.network = network
        self.metric_name = metric_name
        self.mode = mode
        self.best_score: float | None = None
        self.best_epoch: int = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def is_better(self, score: float) -> bool:
        if self.best_score is None:
            return True
        return score > self.best_score if self.mode == "max" else score < self.best_score

    def __call__(self, engine: Engine) -> None:
        if self.metric_name not in engine.state.metrics:
            raise KeyError(f"metric {self.metric_name!r} not computed; available: {sorted(engine.state.metrics)}")
        score = float(engine.state.metrics[self.metric_name])
        if not self.is_better(score):
            return
        self.best_score = score
        # MONAI evaluators run with the trainer's epoch number, so this is the training epoch
        self.best_epoch = engine.state.epoch
        if idist.get_rank() == 0:
            save_checkpoint(unwrap_module(self.network).state_dict(), self.path)
            logger.info("new best %s=%.6f at epoch %d: saved %s", self.metric_name, score, self.best_epoch, self.path)

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_score = state["best_score"]
        self.best_epoch = int(state["best_epoch"])


class ModelWeightsLoader:
    """Load network weights when the engine starts, through the safe loader (``weights_only`` and an
    optional sha256), for evaluation, inference and fine-tuning configs.

    Args:
        load_path: weights file (a state_dict, or a checkpoint holding one under ``key``).
        network: the network to load into (unwrapped from DDP).
        key: entry of the checkpoint that holds the weights; by default the ``state_dict``/``model``
            entry if there is one, else the whole file.
        sha256: expected digest, e.g. from the bundle's ``large_files.yml``.
        strict: passed to ``load_state_dict``.
    """

    def __init__(
        self,
        load_path: str | os.PathLike,
        network: torch.nn.Module,
        key: str | None = None,
        sha256: str | None = None,
        strict: bool = True,
    ) -> None:
        self.load_path = Path(load_path)
        self.network = network
        self.key = key
        self.sha256 = sha256
        self.strict = strict

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        state = extract_state_dict(load_checkpoint(self.load_path, sha256=self.sha256), self.key)
        network = unwrap_module(self.network)
        if not self.strict and not set(state) & set(network.state_dict()):
            raise InputDataError(
                self.load_path,
                f"none of its {len(state)} tensors matches a parameter of {type(network).__name__}",
                "map its keys onto this network first with `python -m common.bundle.weight_surgery`",
            )
        result = network.load_state_dict(state, strict=self.strict)
        logger.info(
            "loaded weights from %s (%d missing, %d unexpected)",
            self.load_path, len(result.missing_keys), len(result.unexpected_keys),
        )  # fmt: skip
