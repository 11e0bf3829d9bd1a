import numpy as np
import pytest
import timm
import torch

from common.io.checkpoint import load_checkpoint, save_checkpoint
from common.networks.mae import MaskedAutoencoderViT, random_masking, sincos_2d_position_embedding
from common.networks.timm_backbone import create_vit_backbone, save_backbone

NAME = "vit_base_patch16_224"
TINY = {"img_size": 64, "depth": 2, "embed_dim": 32, "num_heads": 2}
DECODER = {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}


def tiny_mae(**kwargs) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT(NAME, **{**TINY, **DECODER, **kwargs}).eval()


@pytest.fixture(scope="module")
def mae() -> MaskedAutoencoderViT:
    return tiny_mae()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_random_masking_counts_and_indices():
    for length, ratio in [(16, 0.75), (10, 0.9), (10, 0.7), (196, 0.75), (7, 0.0)]:
        ids_keep, mask, ids_restore = random_masking(3, length, ratio)
        assert mask.shape == (3, length)
        assert mask.sum(dim=1).tolist() == [round(length * ratio)] * 3
        for b in range(3):  # the kept ids are exactly the unmasked positions
            assert sorted(ids_keep[b].tolist()) == torch.nonzero(mask[b] == 0).flatten().tolist()
            assert sorted(ids_restore[b].tolist()) == list(range(length))
    with pytest.raises(ValueError, match="hides all 4 patches"):
        random_masking(1, 4, 0.9)


def test_forward_shapes_and_masked_count(mae, images):
    out = mae(images)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert out["pred"].shape == (2, 16, 16 * 16 * 3)
    assert out["mask"].shape == (2, 16)
    assert out["mask"].sum(dim=1).tolist() == [12.0, 12.0]
    wide = mae(torch.randn(1, 3, 64, 96))  # dynamic image size: a 4x6 patch grid
    assert wide["pred"].shape == (1, 24, 768) and wide["mask"].sum().item() == 18


def test_masks_differ_between_samples(mae):
    out = mae(torch.zeros(4, 3, 64, 64))
    assert len({tuple(m.tolist()) for m in out["mask"]}) > 1


def test_encoder_sees_visible_tokens_at_their_positions(mae):
    """With nothing masked and the identity order, the encoder path equals timm's own forward_features."""
    unmasked = tiny_mae(mask_ratio=0.0)
    x = torch.randn(2, 3, 64, 96)
    noise = torch.arange(24, dtype=torch.float32).expand(2, 24)
    latent, mask, _ = unmasked.forward_encoder(x, noise)
    assert mask.sum() == 0
    torch.testing.assert_close(latent, unmasked.encoder.forward_features(x))


def test_patchify_layout_and_round_trip(mae):
    x = torch.randn(2, 3, 32, 48)
    patches = mae.patchify(x)
    assert patches.shape == (2, 6, 768)
    # first patch starts with pixel (0, 0)'s channels; patch 1 is one patch to the right
    torch.testing.assert_close(patches[0, 0, :3], x[0, :, 0, 0])
    torch.testing.assert_close(patches[0, 1, :3], x[0, :, 0, 16])
    torch.testing.assert_close(patches[0, 3, 3:6], x[0, :, 16, 1])
    torch.testing.assert_close(mae.unpatchify(patches, (2, 3)), x)
    square = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(mae.unpatchify(mae.patchify(square)), square)
    with pytest.raises(ValueError, match="does not hold 6 patches"):
        mae.unpatchify(patches)


def test_loss_ignores_visible_patches(mae, images):
    out = mae(images)
    pred, mask = out["pred"].detach().clone(), out["mask"]
    base = mae.forward_loss(images, pred, mask)
    torch.testing.assert_close(base, out["loss"])
    visible = mask == 0
    changed_visible = pred.clone()
    changed_visible[visible] += 100.0
    torch.testing.assert_close(mae.forward_loss(images, changed_visible, mask), base)
    changed_masked = pred.clone()
    b, i = torch.nonzero(mask)[0].tolist()
    changed_masked[b, i] += 1.0
    assert mae.forward_loss(images, changed_masked, mask) > base + 1e-3


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_matches_hand_computation(norm_pix_loss):
    model = tiny_mae(norm_pix_loss=norm_pix_loss)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 3, 32, 32))
    pred = rng.normal(size=(1, 4, 768))
    mask = np.array([[1.0, 0.0, 1.0, 0.0]])
    errors = []
    for index in (0, 2):  # the masked patches: top-left and bottom-left
        r, c = divmod(index, 2)
        target = image[0, :, 16 * r : 16 * (r + 1), 16 * c : 16 * (c + 1)].transpose(1, 2, 0).reshape(-1)
        if norm_pix_loss:
            target = (target - target.mean()) / np.sqrt(target.var(ddof=1) + 1e-6)
        errors.append(np.mean((pred[0, index] - target) ** 2))
    image_t, pred_t, mask_t = (torch.tensor(a, dtype=torch.float32) for a in (image, pred, mask))
    loss = model.forward_loss(image_t, pred_t, mask_t)
    assert loss.item() == pytest.approx(np.mean(errors), rel=1e-5)


def test_sincos_position_embedding():
    emb = sincos_2d_position_embedding(2, 3, 8)
    assert emb.shape == (6, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    # row 1, column 2: first half encodes the row, second half the column; lowest frequency is 1
    assert emb[5, 0].item() == pytest.approx(np.sin(1.0)) and emb[5, 4].item() == pytest.approx(np.sin(2.0))
    assert len({tuple(row.tolist()) for row in emb}) == 6
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_position_embedding(2, 2, 6)


def test_reconstruct_pastes_visible_patches(mae, images):
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))
    masked_input, reconstruction, original = mae.reconstruct(images, noise)
    assert masked_input.shape == reconstruction.shape == original.shape == images.shape
    mask = mae(images, noise)["mask"].bool()
    torch.testing.assert_close(original, images)
    torch.testing.assert_close(mae.patchify(reconstruction)[~mask], mae.patchify(images)[~mask])
    assert (mae.patchify(masked_input)[mask] == 0).all()
    torch.testing.assert_close(mae.patchify(masked_input)[~mask], mae.patchify(images)[~mask])
    assert not torch.allclose(mae.patchify(reconstruction)[mask], mae.patchify(images)[mask])


def test_encoder_weights_load_strictly_into_timm(mae, images, tmp_path):
    path = save_backbone(mae.encoder, tmp_path / "encoder.pt")
    checkpoint = load_checkpoint(path)
    plain = timm.create_model(checkpoint["timm_name"], num_classes=0, **checkpoint["config"])
    plain.load_state_dict(checkpoint["state_dict"], strict=True)
    plain.eval()
    expected = mae.encoder.forward_features(images)
    torch.testing.assert_close(plain.forward_features(images), expected)

    fresh = timm.create_model(NAME, num_classes=0, **TINY)
    fresh.load_state_dict(mae.encoder_state_dict(), strict=True)

    for source in (path, save_checkpoint({"state_dict": mae.state_dict()}, tmp_path / "mae_full.pt")):
        backbone = create_vit_backbone(NAME, checkpoint=source, **TINY).eval()
        torch.testing.assert_close(backbone.forward_features(images), expected)


def test_optimizer_steps_reduce_loss(images):
    model = tiny_mae().train()
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = model(images, noise)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]


def test_invalid_arguments_are_refused(mae):
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_mae(mask_ratio=1.0)
    with pytest.raises(ValueError, match="decoder_dim"):
        tiny_mae(decoder_dim=18)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        mae(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        mae(torch.zeros(1, 3, 64, 70))
