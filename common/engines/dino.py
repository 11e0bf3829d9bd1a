"""Ignite/MONAI glue for DINO self-supervised pretraining.

:class:`DINOIterationUpdate` is the ``iteration_update`` of a MONAI ``SupervisedTrainer`` whose
``network`` is the student (optionally wrapped in DistributedDataParallel) and whose data loader
yields the views of :class:`~common.transforms.multicrop.MultiCropViewsd` (the trainer's
``loss_function`` is unused by the step; pass the same :class:`~common.losses.dino.DINOLoss`).
:class:`common.handlers.backbone.SaveBackboneHandler` writes the teacher's backbone, the weights the
segmentation bundles fine-tune, as training goes. The teacher EMA momentum and the loss's temperature warm-up are read off
``engine.state.iteration``, so a resumed run continues both schedules where they stopped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents

from common.losses.dino import DINOLoss
from common.networks.dino import DINOModel

__all__ = ["DINOIterationUpdate", "cosine_momentum"]


def cosine_momentum(iteration: int, total_iterations: int, start: float = 0.996, end: float = 1.0) -> float:
    """Teacher EMA momentum at 0-based ``iteration``: ``start`` rising to ``end`` on a half cosine.

    A momentum close to 1 late in training makes the teacher a slow average of recent students,
    which is what stabilises DINO.
    """
    progress = min(iteration / max(total_iterations, 1), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


class DINOIterationUpdate:
    """One DINO step: teacher on global views, student on all views, loss, update, EMA of the teacher.

    Args:
        student: the trained model (unwrapped); ``engine.network`` must be it or its DDP wrapper.
        teacher: a copy of the student with ``requires_grad`` off
            (:func:`common.networks.dino.make_teacher`); it is only ever updated here, by EMA.
        loss: the DINO loss (its centre is updated every step).
        n_global: number of global views, read from batch keys ``global_0``, ...
        n_local: number of local views, read from ``local_0``, ...
        momentum_start: teacher EMA momentum at the first iteration.
        momentum_end: teacher EMA momentum at the last iteration.
        clip_grad: max global gradient norm of the student (0 or ``None``: no clipping).
        freeze_last_layer_iters: iterations during which the prototype layer is not updated; DINO
            freezes it for the first epoch, which prevents early collapse.
        amp: mixed precision (bfloat16 on CPU, float16 with loss scaling on CUDA).
    """

    def __init__(
        self,
        student: DINOModel,
        teacher: DINOModel,
        loss: DINOLoss,
        n_global: int,
        n_local: int,
        momentum_start: float = 0.996,
        momentum_end: float = 1.0,
        clip_grad: float | None = 3.0,
        freeze_last_layer_iters: int = 0,
        amp: bool = False,
    ) -> None:
        if [p.shape for p in student.parameters()] != [p.shape for p in teacher.parameters()]:
            raise ValueError("teacher and student architectures differ; build the teacher with make_teacher.")
        if n_global != loss.n_global_crops:
            raise ValueError(f"n_global is {n_global}, but the loss expects {loss.n_global_crops} views.")
        if not 0 <= momentum_start <= momentum_end <= 1:
            raise ValueError(
                f"need 0 <= momentum_start <= momentum_end <= 1, got {momentum_start} and {momentum_end}."
            )
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()
        self.loss = loss
        self.view_keys = [f"global_{i}" for i in range(n_global)] + [f"local_{i}" for i in range(n_local)]
        self.n_global = n_global
        self.momentum_start = momentum_start
        self.momentum_end = momentum_end
        self.clip_grad = clip_grad
        self.freeze_last_layer_iters = freeze_last_layer_iters
        self.amp = amp
        self.scaler: torch.amp.GradScaler | None = None

    def _views(self, batch: Mapping[str, Any], device: torch.device) -> list[torch.Tensor]:
        missing = [k for k in self.view_keys if k not in batch]
        if missing:
            raise KeyError(f"batch has no views {missing}; does MultiCropViewsd make n_global/n_local views?")
        return [torch.as_tensor(batch[k]).to(device, non_blocking=True) for k in self.view_keys]

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)

    def __call__(self, engine: Engine, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if getattr(engine.network, "module", engine.network) is not self.student:
            raise ValueError("engine.network must be the student of DINOIterationUpdate or its DDP wrapper.")
        device = torch.device(engine.state.device or "cpu")
        step = engine.state.iteration - 1  # Ignite counts from 1
        total = engine.state.max_epochs * engine.state.epoch_length
        views = self._views(batch, device)

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        use_scaler = self.amp and device.type == "cuda"
        if use_scaler and self.scaler is None:
            self.scaler = torch.amp.GradScaler("cuda")
        amp_dtype = torch.float16 if use_scaler else torch.bfloat16
        with torch.autocast(device.type, dtype=amp_dtype) if self.amp else nullcontext():
            with torch.no_grad():
                teacher_out = self.teacher(views[: self.n_global])
            student_out = engine.network(views)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = self.loss(student_out.float(), teacher_out.float(), step)
        engine.state.output = {"loss": loss}
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        if use_scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(engine.optimizer)
        else:
            loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip_grad)
        if step < self.freeze_last_layer_iters:
            self.student.head.last_layer.weight.grad = None
        if use_scaler:
            self.scaler.step(engine.optimizer)
            self.scaler.update()
        else:
            engine.optimizer.step()
        self.update_teacher(cosine_momentum(step, total, self.momentum_start, self.momentum_end))

        engine.state.output = {"loss": loss.detach()}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
