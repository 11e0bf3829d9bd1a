"""Save a self-supervised backbone while it trains, in the form every bundle loads."""

from __future__ import annotations

import os

import ignite.distributed as idist
from ignite.engine import Engine, Events
from torch import nn

from common.networks.timm_backbone import save_backbone

__all__ = ["SaveBackboneHandler"]


class SaveBackboneHandler:
    """Write ``backbone`` with :func:`~common.networks.timm_backbone.save_backbone` as training goes.

    Saved every ``save_interval_epochs`` epochs and when training completes, on rank 0 only, to one
    file that is replaced atomically, so an interrupted run always leaves the latest complete backbone.
    The file loads with ``create_vit_backbone(timm_name, checkpoint=path)`` (hence into ``ViTUNet`` and
    ``vit_mask_rcnn``) and, strictly, into ``timm.create_model(timm_name, num_classes=0, **config)``.

    Args:
        backbone: the module to save: the DINO teacher's ``backbone`` (the EMA model is the better
            feature extractor), or the MAE's ``encoder``.
        path: output file, e.g. ``models/ssl_backbone.pt``.
        timm_name: timm model name recorded in the file.
        save_interval_epochs: save every this many epochs.
    """

    def __init__(
        self, backbone: nn.Module, path: str | os.PathLike, timm_name: str, save_interval_epochs: int = 1
    ) -> None:
        if save_interval_epochs < 1:
            raise ValueError(f"save_interval_epochs must be >= 1, got {save_interval_epochs}.")
        self.backbone = backbone
        self.path = path
        self.timm_name = timm_name
        self.save_interval_epochs = save_interval_epochs

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval_epochs), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() == 0:
            save_backbone(self.backbone, self.path, timm_name=self.timm_name)
