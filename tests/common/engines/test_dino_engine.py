from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.handlers import from_engine

from common.engines.dino import DINOIterationUpdate, cosine_momentum
from common.handlers import backbone as backbone_engine
from common.handlers.backbone import SaveBackboneHandler
from common.losses.dino import DINOLoss
from common.networks.dino import DINOHead, DINOModel, make_teacher
from common.networks.timm_backbone import create_vit_backbone
from common.networks.vit_unet import ViTUNet
from common.transforms.multicrop import MultiCropViewsd

pytestmark = pytest.mark.usefixtures("one_thread")

TIMM_NAME = "vit_small_patch8_224"
TINY = {"depth": 4, "embed_dim": 32, "num_heads": 2, "img_size": 32}
N_GLOBAL, N_LOCAL, OUT_DIM = 2, 2, 64


def _blob_images(n: int, size: int = 64, seed: int = 0) -> list[dict]:
    """Two-channel images of Gaussian blobs in 0..255, each with its own number, size and place of blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = []
    for _ in range(n):
        image = np.zeros((2, size, size), np.float32)
        for _ in range(rng.integers(3, 8)):
            cy, cx = rng.uniform(0, size, 2)
            radius = rng.uniform(3, 8)
            image[rng.integers(2)] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        images.append({"image": np.clip(image, 0, 1) * 255})
    return images


def _tiny_dino() -> DINOModel:
    head = DINOHead(32, OUT_DIM, hidden_dim=128, bottleneck_dim=256)
    return DINOModel(create_vit_backbone(TIMM_NAME, **TINY), head)


def _setup(n_images: int, lr: float, **update_kwargs):
    torch.manual_seed(0)
    transform = MultiCropViewsd(n_global=N_GLOBAL, n_local=N_LOCAL, global_size=32, local_size=16)
    transform.set_random_state(0)
    loader = DataLoader(Dataset(_blob_images(n_images), transform), batch_size=4, num_workers=0)
    student = _tiny_dino()
    teacher = make_teacher(student)
    # slow centre and (in _train) fast teacher, so that 30 iterations show the student being fitted
    loss = DINOLoss(OUT_DIM, n_global_crops=N_GLOBAL, warmup_teacher_temp_iters=10, center_momentum=0.99)
    update = DINOIterationUpdate(student, teacher, loss, n_global=N_GLOBAL, n_local=N_LOCAL, **update_kwargs)
    return loader, student, teacher, loss, update, torch.optim.AdamW(student.parameters(), lr=lr)


def _train(lr: float, backbone_path: Path) -> dict:
    """30 iterations on 8 blob images, logging the loss the way the bundle's StatsHandler reads it."""
    loader, student, teacher, loss, update, optimizer = _setup(
        8, lr, momentum_start=0.9, freeze_last_layer_iters=2
    )
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=15,
        train_data_loader=loader,
        network=student,
        optimizer=optimizer,
        loss_function=loss,
        iteration_update=update,
    )
    losses = []
    loss_of = from_engine(["loss"], first=True)
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(float(loss_of(e.state.output)[0]))
    )
    SaveBackboneHandler(teacher.backbone, backbone_path, TIMM_NAME).attach(trainer)
    initial = [p.clone() for p in teacher.parameters()]
    trainer.run()
    return {"losses": losses, "path": backbone_path, "teacher": teacher, "loss": loss, "initial": initial}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train(1e-3, tmp_path_factory.mktemp("dino") / "backbone.pt")


def test_dino_loss_falls(trained, tmp_path):
    """30 tiny iterations cannot learn useful features; this checks that the step optimises the
    student towards the teacher: the loss falls, and without updates (lr 0) it does not."""
    losses = trained["losses"]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), np.round(losses, 3)
    moved = [not torch.equal(a, b) for a, b in zip(trained["initial"], trained["teacher"].parameters())]
    assert all(moved), "every teacher parameter follows the student"
    assert trained["loss"].center.abs().sum() > 0

    frozen = _train(0.0, tmp_path / "backbone.pt")["losses"]
    assert np.mean(frozen[-5:]) > np.mean(frozen[:5]), np.round(frozen, 3)


def test_saved_backbone_loads_into_timm_and_vit_unet(trained):
    saved = torch.load(trained["path"], weights_only=True)
    teacher_backbone = trained["teacher"].backbone.state_dict()
    plain = timm.create_model(saved["timm_name"], num_classes=0, **saved["config"])
    plain.load_state_dict(saved["state_dict"], strict=True)
    network = ViTUNet(TIMM_NAME, backbone_checkpoint=trained["path"], decoder_channels=(16, 8, 8, 8), **TINY)
    for key, value in teacher_backbone.items():
        assert torch.equal(plain.state_dict()[key], value), key
    kept = network.backbone.state_dict()  # ViTUNet prunes the final norm it never reads
    assert kept and set(kept) <= set(teacher_backbone)
    for key, value in kept.items():
        assert torch.equal(value, teacher_backbone[key]), key
    assert network(torch.rand(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 100) == pytest.approx(0.996)
    assert cosine_momentum(50, 100) == pytest.approx(0.998)
    assert cosine_momentum(100, 100) == pytest.approx(1.0)
    assert cosine_momentum(25, 100) < cosine_momentum(50, 100) < cosine_momentum(75, 100)


def test_teacher_update_is_an_exact_ema():
    _, student, teacher, _, update, _ = _setup(0, 1e-3)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    update.update_teacher(0.75)
    for t_old, t_new, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t_new, 0.75 * t_old + 0.25 * s)


def test_last_layer_frozen_at_first_and_save_on_rank_0_only(tmp_path, monkeypatch):
    loader, student, teacher, loss, update, optimizer = _setup(4, 1e-2, freeze_last_layer_iters=1)
    last_layer = student.head.last_layer.weight.clone()
    first_mlp = student.head.mlp[0].weight.clone()
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=loader,
        network=student,
        optimizer=optimizer,
        loss_function=loss,
        iteration_update=update,
    )
    monkeypatch.setattr(backbone_engine.idist, "get_rank", lambda: 1)
    SaveBackboneHandler(teacher.backbone, tmp_path / "backbone.pt", TIMM_NAME).attach(trainer)
    trainer.run()
    assert torch.equal(student.head.last_layer.weight, last_layer)
    assert not torch.equal(student.head.mlp[0].weight, first_mlp)
    assert not (tmp_path / "backbone.pt").exists()


def test_engine_network_must_be_the_student():
    loader, _student, _, loss, update, optimizer = _setup(4, 1e-3)
    other = _tiny_dino()
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=loader,
        network=other,
        optimizer=optimizer,
        loss_function=loss,
        iteration_update=update,
    )
    with pytest.raises(ValueError, match="must be the student"):
        trainer.run()
