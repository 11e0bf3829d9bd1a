import numpy as np
import pytest
import torch
from ignite.engine import Engine
from PIL import Image

from common.handlers.reconstructions import SaveReconstructionImages, first_images, reconstruction_grid
from common.networks.mae import MaskedAutoencoderViT

TINY = {"img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2}
DECODER = {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}


@pytest.fixture(scope="module")
def model() -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT("vit_base_patch16_224", mask_ratio=0.5, **TINY, **DECODER)


def test_grid_layout_scale_and_hidden_pixels():
    original = torch.linspace(-1.0, 1.0, 3 * 4 * 4).reshape(1, 3, 4, 4)
    hidden = torch.zeros(1, 1, 4, 4)
    hidden[..., :2, :2] = 1
    grid = reconstruction_grid(original, original.clone(), original, hidden)
    assert grid.shape == (4, 3 * 4 + 2 * 2, 3) and grid.dtype == np.uint8
    expected = ((original[0].permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)
    np.testing.assert_array_equal(grid[:, -4:], expected)  # original column, rescaled to 0..255
    np.testing.assert_array_equal(grid[:, 6:10], expected)  # reconstruction on the same scale
    assert (grid[:2, :2] == 0).all() and (grid[2:, :4] == expected[2:]).all()  # hidden pixels black
    assert (grid[:, 4:6] == 255).all()  # white gap between panels
    grey = reconstruction_grid(original[:, :1], original[:, :1], original[:, :1], hidden)
    assert (grey[..., 0] == grey[..., 2]).all()


def test_handler_writes_png_every_n_epochs_and_keeps_training_mode(model, tmp_path):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    handler = SaveReconstructionImages(model, images, tmp_path / "pictures", every_n_epochs=2)
    engine = Engine(lambda engine, batch: None)
    handler.attach(engine)
    model.train()
    engine.run([0], max_epochs=4)
    assert model.training
    written = sorted(p.name for p in (tmp_path / "pictures").iterdir())
    assert written == ["reconstruction_epoch0002.png", "reconstruction_epoch0004.png"]
    picture = np.asarray(Image.open(tmp_path / "pictures" / written[0]))
    assert picture.shape == (2 * 32 + 2, 3 * 32 + 2 * 2, 3)
    masked_panel = picture[:32, :32]
    black_pixels = (masked_panel == 0).all(axis=-1).sum()
    assert 2 * 16 * 16 <= black_pixels < 32 * 32  # two of the four patches hidden


def test_same_masks_every_epoch(model, tmp_path):
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    handler = SaveReconstructionImages(model, images, tmp_path, seed=5)
    engine = Engine(lambda engine, batch: None)
    engine.state.epoch = 1
    first = np.asarray(Image.open(handler(engine)))
    engine.state.epoch = 2
    second = np.asarray(Image.open(handler(engine)))
    np.testing.assert_array_equal(first, second)  # unchanged model, fixed images and masks


def test_invalid_arguments(model, tmp_path):
    with pytest.raises(ValueError, match="every_n_epochs"):
        SaveReconstructionImages(model, torch.zeros(1, 3, 32, 32), tmp_path, every_n_epochs=0)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        SaveReconstructionImages(model, torch.zeros(1, 3, 30, 32), tmp_path)
    with pytest.raises(TypeError, match="MaskedAutoencoderViT"):
        SaveReconstructionImages(torch.nn.Linear(2, 2), torch.zeros(1, 3, 32, 32), tmp_path)


def test_first_images_stacks_at_most_count_samples():
    dataset = [{"image": torch.full((3, 4, 4), float(i)), "label": i} for i in range(3)]
    assert first_images(dataset, count=2).shape == (2, 3, 4, 4)
    stacked = first_images(dataset, count=5)
    assert stacked.shape == (3, 3, 4, 4) and stacked[2].eq(2).all()
    with pytest.raises(ValueError, match="non-empty dataset"):
        first_images([], count=4)
