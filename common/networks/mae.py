"""Masked autoencoder (He et al., CVPR 2022) around a timm ViT.

Dermoscopy archives hold far more unlabelled images than annotated lesions. MAE pretraining on a
clinic's own images hides most patches of each image and teaches the ViT encoder to reconstruct them
from the rest; the encoder is then saved with :func:`common.networks.timm_backbone.save_backbone`
and fine-tuned by a detector or segmenter through ``create_vit_backbone(checkpoint=...)``.

The encoder is an ordinary timm ViT (built by :func:`create_vit_backbone`, so its weights keep timm's
names); only the light decoder, the mask token and the prediction head are specific to MAE.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from common.networks.timm_backbone import create_vit_backbone

__all__ = ["MaskedAutoencoderViT", "random_masking", "sincos_2d_position_embedding"]


def sincos_2d_position_embedding(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding of shape ``(grid_h * grid_w, dim)``, rows in raster order.

    Half of the channels encode the row, half the column, each as sines and cosines of geometrically
    spaced frequencies (MAE's decoder embedding). Being a formula, it fits any grid size, so the
    decoder follows the encoder's ``dynamic_img_size`` without resampling anything.
    """
    if dim % 4:
        raise ValueError(f"a 2D sin-cos position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angles = coord[:, None] * omega[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()


def random_masking(
    batch_size: int, num_patches: int, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose, per sample, ``round(num_patches * mask_ratio)`` patches to hide, uniformly at random.

    Patches are ranked by uniform noise; the lowest-ranked ones stay visible. The masked count is
    rounded rather than truncated so that float error (``1 - 0.9 = 0.0999...``) never hides one patch
    too many.

    Args:
        batch_size: B.
        num_patches: L, patches per image.
        mask_ratio: fraction of patches to hide, in [0, 1).
        noise: ``(B, L)`` ranking noise; default ``torch.rand`` (pass it to make masks reproducible).

    Returns:
        ``ids_keep (B, L_keep)`` indices of the visible patches, ``mask (B, L)`` float with 1 = masked,
        and ``ids_restore (B, L)`` that puts shuffled tokens (visible first) back in raster order.

    Raises:
        ValueError: the ratio leaves no visible patch, or ``noise`` has the wrong shape.
    """
    num_keep = num_patches - round(num_patches * mask_ratio)
    if num_keep < 1:
        raise ValueError(
            f"mask_ratio {mask_ratio} hides all {num_patches} patches; lower it or use larger images"
        )
    if noise is None:
        noise = torch.rand(batch_size, num_patches)
    if tuple(noise.shape) != (batch_size, num_patches):
        raise ValueError(f"noise must have shape {(batch_size, num_patches)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch_size, num_patches, device=noise.device)
    mask[:, :num_keep] = 0
    return ids_shuffle[:, :num_keep], torch.gather(mask, 1, ids_restore), ids_restore


class MaskedAutoencoderViT(nn.Module):
    """A timm ViT encoder that sees only visible patches, a small decoder that predicts the hidden ones.

    Args:
        encoder: timm ViT name, e.g. ``"vit_base_patch16_224"`` (or ``vit_small_patch16_224`` on small data).
        mask_ratio: fraction of patches hidden per image; 0.75 in the paper.
        decoder_dim: decoder width (divisible by 4 and by ``decoder_heads``).
        decoder_depth: decoder transformer blocks.
        decoder_heads: decoder attention heads.
        norm_pix_loss: regress pixels normalised by each patch's own mean and variance, which the
            paper found gives better representations than raw pixels.
        pretrained: start the encoder from timm's pretrained weights (needs network access).
        encoder_kwargs: passed to :func:`create_vit_backbone`, e.g. ``img_size``, ``depth``,
            ``embed_dim``, ``num_heads``, ``drop_path_rate`` or a local ``checkpoint``.

    Inputs are ``(B, C, H, W)`` with H and W multiples of the patch size; they are normalised as the
    fine-tuning stage will normalise them, since the encoder learns features of those values.
    """

    def __init__(
        self,
        encoder: str = "vit_base_patch16_224",
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        pretrained: bool = False,
        **encoder_kwargs: Any,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if decoder_dim < 4 or decoder_dim % 4 or decoder_dim % decoder_heads:
            raise ValueError(
                "decoder_dim must be a positive multiple of 4 and of decoder_heads "
                f"({decoder_heads}), got {decoder_dim}"
            )
        if decoder_depth < 1:
            raise ValueError(f"decoder_depth must be >= 1, got {decoder_depth}")
        self.encoder = create_vit_backbone(encoder, pretrained=pretrained, **encoder_kwargs)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = int(self.encoder.patch_embed.patch_size[0])
        self.in_chans = int(self.encoder.patch_embed.proj.in_channels)
        self.num_prefix_tokens = int(self.encoder.num_prefix_tokens)

        self.decoder_embed = nn.Linear(self.encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.Sequential(
            *[
                Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * self.in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        """MAE's decoder initialisation; the encoder keeps timm's own."""
        nn.init.normal_(self.mask_token, std=0.02)
        for name, module in self.named_modules():
            if name.startswith("decoder_") and isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """Learnt tokens and position embeddings, which weight decay would only shrink (timm's convention)."""
        return {"mask_token", *(f"encoder.{name}" for name in self.encoder.no_weight_decay())}

    def grid_size(self, images: torch.Tensor) -> tuple[int, int]:
        """(patch rows, patch columns) of ``(B, C, H, W)`` images whose sides are multiples of the patch."""
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(
                f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(images.shape)}"
            )
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image sides must be multiples of the patch size {self.patch_size}, got {height}x{width}"
            )
        return height // self.patch_size, width // self.patch_size

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, L, p*p*C)``, raster order; each patch flattened as (row, col, chan)."""
        grid_h, grid_w = self.grid_size(images)
        p, c = self.patch_size, self.in_chans
        x = images.reshape(images.shape[0], c, grid_h, p, grid_w, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(images.shape[0], grid_h * grid_w, p * p * c)

    def unpatchify(self, patches: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Inverse of :meth:`patchify`; ``grid_size`` (patch rows, patch columns) defaults to a square."""
        batch, length, _ = patches.shape
        if grid_size is None:
            side = round(length**0.5)
            grid_size = (side, side)
        grid_h, grid_w = grid_size
        if grid_h * grid_w != length:
            raise ValueError(f"a {grid_h}x{grid_w} patch grid does not hold {length} patches; pass grid_size")
        p, c = self.patch_size, self.in_chans
        x = patches.reshape(batch, grid_h, grid_w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(batch, c, grid_h * p, grid_w * p)

    def forward_encoder(
        self, images: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches of randomly masked images.

        Position embeddings (resampled by timm for the input size) and prefix tokens are added by the
        encoder's own ``_pos_embed`` before masking, so every visible token keeps its true position.

        Returns:
            latent ``(B, prefix + L_keep, D)``, mask ``(B, L)`` with 1 = masked, ids_restore ``(B, L)``.
        """
        self.grid_size(images)
        tokens = self.encoder._pos_embed(self.encoder.patch_embed(images))
        prefix, patches = tokens[:, : self.num_prefix_tokens], tokens[:, self.num_prefix_tokens :]
        batch, length, dim = patches.shape
        if noise is None:
            noise = torch.rand(batch, length, device=images.device)
        ids_keep, mask, ids_restore = random_masking(batch, length, self.mask_ratio, noise.to(images.device))
        visible = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        x = self.encoder.norm_pre(torch.cat([prefix, visible], dim=1))
        x = self.encoder.norm(self.encoder.blocks(x))
        return x, mask, ids_restore

    def forward_decoder(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, grid_size: tuple[int, int]
    ) -> torch.Tensor:
        """Predict the pixels of every patch, ``(B, L, p*p*C)``, from the visible tokens plus mask tokens."""
        x = self.decoder_embed(latent)
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        batch, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(batch, length - visible.shape[1], -1)
        patches = torch.cat([visible, mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        pos = sincos_2d_position_embedding(*grid_size, x.shape[-1]).to(device=x.device, dtype=x.dtype)
        x = torch.cat([prefix, patches + pos], dim=1)  # prefix tokens carry no position, as in MAE
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, self.num_prefix_tokens :])

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder regresses: patch pixels, normalised per patch when ``norm_pix_loss``."""
        patches = self.patchify(images)
        if not self.norm_pix_loss:
            return patches
        mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
        return (patches - mean) / (var + 1.0e-6).sqrt()

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only; visible patches are free to be anything."""
        per_patch = ((pred - self.target(images)) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Mask, encode, decode and score a batch.

        Args:
            images: ``(B, C, H, W)``.
            noise: optional ``(B, L)`` ranking noise that fixes the masks (see :func:`random_masking`).

        Returns:
            ``{"loss": scalar, "pred": (B, L, p*p*C), "mask": (B, L)}`` with 1 = masked in ``mask``.
        """
        grid = self.grid_size(images)
        latent, mask, ids_restore = self.forward_encoder(images, noise)
        pred = self.forward_decoder(latent, ids_restore, grid)
        return {"loss": self.forward_loss(images, pred, mask), "pred": pred, "mask": mask}

    @torch.no_grad()
    def reconstruct(
        self, images: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pictures for logging: ``(masked_input, reconstruction, original)``, each ``(B, C, H, W)``.

        Hidden patches are black in ``masked_input``. ``reconstruction`` shows the prediction on
        hidden patches with the visible ones pasted back, as in the paper's figures. With
        ``norm_pix_loss`` predictions are in per-patch normalised units, so they are mapped back with
        the original patch's mean and standard deviation: the picture shows predicted structure,
        while a hidden patch's overall brightness and contrast come from the original.
        """
        grid = self.grid_size(images)
        out = self.forward(images, noise)
        pred, mask = out["pred"], out["mask"].unsqueeze(-1)
        original = self.patchify(images)
        if self.norm_pix_loss:
            mean, var = original.mean(dim=-1, keepdim=True), original.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6).sqrt() + mean
        masked_input = self.unpatchify(original * (1 - mask), grid)
        reconstruction = self.unpatchify(original * (1 - mask) + pred * mask, grid)
        return masked_input, reconstruction, images

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder weights under timm's names, on CPU (for ``timm.create_model(...).load_state_dict``)."""
        return {k: v.detach().cpu() for k, v in self.encoder.state_dict().items()}
