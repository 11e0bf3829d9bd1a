"""Pictures of MAE reconstructions during pretraining, as an Ignite handler.

The MAE loss falls slowly and says little about whether the encoder learns anatomy or only colour;
a grid of masked input, reconstruction and original for a few fixed images, written every few
epochs, shows it at a glance. The images and masks are fixed, so successive grids are comparable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image

from common.io.atomic import atomic_write
from common.networks.mae import MaskedAutoencoderViT, random_masking
from common.utils import unwrap_module

__all__ = ["SaveReconstructionImages", "first_images", "reconstruction_grid"]

GAP = 2  # pixels of white between panels


def _to_uint8(panels: Sequence[np.ndarray], low: float, high: float) -> list[np.ndarray]:
    scale = 255.0 / max(high - low, 1.0e-8)
    return [np.clip((p - low) * scale, 0, 255).round().astype(np.uint8) for p in panels]


def reconstruction_grid(
    masked_input: torch.Tensor, reconstruction: torch.Tensor, original: torch.Tensor, pixel_mask: torch.Tensor
) -> np.ndarray:
    """An RGB uint8 grid, one row per image: masked input (hidden patches black), reconstruction, original.

    Inputs are network-normalised, so each row is rescaled to its original's minimum and maximum; the
    three panels of a row share that scale and can be compared. Single-channel images are shown grey.

    Args:
        masked_input, reconstruction, original: ``(B, C, H, W)`` as returned by
            :meth:`MaskedAutoencoderViT.reconstruct`.
        pixel_mask: ``(B, 1, H, W)`` with 1 on hidden pixels.
    """
    rows = []
    for masked, recon, orig, hidden in zip(masked_input, reconstruction, original, pixel_mask):
        panels = [t.detach().float().cpu().permute(1, 2, 0).numpy() for t in (masked, recon, orig)]
        masked_u8, recon_u8, orig_u8 = _to_uint8(panels, float(panels[2].min()), float(panels[2].max()))
        masked_u8[hidden[0].cpu().numpy().astype(bool)] = 0
        row = [
            np.repeat(p, 3, axis=2) if p.shape[2] == 1 else p[..., :3] for p in (masked_u8, recon_u8, orig_u8)
        ]
        height = row[0].shape[0]
        gap = np.full((height, GAP, 3), 255, dtype=np.uint8)
        rows.append(np.concatenate([row[0], gap, row[1], gap, row[2]], axis=1))
    gap = np.full((GAP, rows[0].shape[1], 3), 255, dtype=np.uint8)
    return np.concatenate([part for row in rows for part in (row, gap)][:-1], axis=0)


def first_images(dataset: Sequence[Any], count: int = 4, key: str = "image") -> torch.Tensor:
    """The ``key`` entries of the first ``count`` samples of ``dataset`` (fewer if it is smaller), stacked
    into a ``(B, C, H, W)`` tensor: the fixed images :class:`SaveReconstructionImages` pictures.

    Raises:
        ValueError: ``count`` < 1 or an empty dataset.
    """
    if count < 1 or len(dataset) == 0:
        raise ValueError(f"need count >= 1 and a non-empty dataset, got {count=} and {len(dataset)} samples")
    return torch.stack([torch.as_tensor(dataset[i][key]) for i in range(min(count, len(dataset)))])


class SaveReconstructionImages:
    """Write ``output_dir/reconstruction_epoch{NNNN}.png`` every ``every_n_epochs`` epochs (rank 0 only).

    Args:
        model: the :class:`MaskedAutoencoderViT` being trained, possibly DDP-wrapped.
        images: ``(B, C, H, W)`` fixed images, normalised as the training batches are (a handful is enough).
        output_dir: folder of the PNG files.
        every_n_epochs: epochs between pictures.
        seed: seeds the fixed masks.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        images: torch.Tensor,
        output_dir: str | os.PathLike,
        every_n_epochs: int = 1,
        seed: int = 0,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if not isinstance(unwrap_module(model), MaskedAutoencoderViT):
            raise TypeError(
                f"model must be a MaskedAutoencoderViT, got {type(unwrap_module(model)).__name__}"
            )
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[0] < 1:
            raise ValueError(
                f"images must be a (B, C, H, W) tensor with B >= 1, got {getattr(images, 'shape', images)}"
            )
        self.model = model
        self.images = images.detach().cpu()
        self.output_dir = Path(output_dir)
        self.every_n_epochs = every_n_epochs
        grid_h, grid_w = unwrap_module(model).grid_size(self.images)
        generator = torch.Generator().manual_seed(seed)
        self.noise = torch.rand(images.shape[0], grid_h * grid_w, generator=generator)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every_n_epochs), self)

    def __call__(self, engine: Engine) -> Path | None:
        """Write the grid for the current epoch; returns its path on rank 0, ``None`` elsewhere."""
        if idist.get_rank() != 0:
            return None
        model = unwrap_module(self.model)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            masked, recon, orig = model.reconstruct(self.images.to(device), self.noise)
        finally:
            model.train(was_training)
        mask = random_masking(*self.noise.shape, model.mask_ratio, self.noise)[1]
        grid = model.grid_size(self.images)
        patch_mask = mask.unsqueeze(-1).expand(-1, -1, model.patch_size**2 * model.in_chans)
        pixel_mask = model.unpatchify(patch_mask, grid)[:, :1]
        picture = reconstruction_grid(masked, recon, orig, pixel_mask)
        path = self.output_dir / f"reconstruction_epoch{engine.state.epoch:04d}.png"
        return atomic_write(path, lambda f: Image.fromarray(picture).save(f, format="PNG"))
