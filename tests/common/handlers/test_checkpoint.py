import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer

from common.errors import InputDataError
from common.handlers.checkpoint import BestModelSaver, ModelWeightsLoader, TrainingCheckpoint
from common.io.checkpoint import load_checkpoint, save_checkpoint


def _trainer(tmp_path, max_epochs, resume):
    torch.manual_seed(0)
    network = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    data = [{"image": torch.randn(2, 4), "label": torch.randn(2, 1)} for _ in range(3)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=data,
        network=network,
        optimizer=optimizer,
        loss_function=torch.nn.MSELoss(),
    )
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: scheduler.step())
    checkpoint = TrainingCheckpoint(
        tmp_path,
        {"network": network, "optimizer": optimizer, "lr_scheduler": scheduler},
        resume=resume,
    )
    checkpoint.attach(trainer)
    return trainer, network, optimizer


def test_resume_continues_from_latest(tmp_path):
    trainer, network, _ = _trainer(tmp_path, max_epochs=2, resume=False)
    trainer.run()
    saved = load_checkpoint(tmp_path / "checkpoint_latest.pt")
    assert saved["trainer"]["iteration"] == 6 and saved["trainer"]["epoch_length"] == 3
    assert torch.equal(saved["network"]["weight"], network.weight.detach())

    resumed, _, resumed_optimizer = _trainer(tmp_path, max_epochs=3, resume=True)
    epochs_run = []
    resumed.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs_run.append(e.state.epoch))
    resumed.run()
    assert epochs_run == [3], "resume must run only the epochs that are left"
    assert resumed.state.iteration == 9
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)
    assert load_checkpoint(tmp_path / "checkpoint_latest.pt")["trainer"]["iteration"] == 9


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    trainer, _, _ = _trainer(tmp_path, max_epochs=1, resume=True)
    trainer.run()
    assert trainer.state.epoch == 1


def test_best_model_saver_keeps_best_and_round_trips_state(tmp_path):
    network = torch.nn.Linear(2, 1)
    scores = iter([0.5, 0.3, 0.4])
    evaluator = Engine(lambda e, b: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _metric(engine):
        engine.state.metrics["val_mse"] = next(scores)

    saver = BestModelSaver(tmp_path, network, "val_mse", mode="min")
    saver.attach(evaluator)
    for epoch in range(3):
        with torch.no_grad():
            network.weight.fill_(epoch)
        evaluator.run([0], max_epochs=epoch + 1)
    assert saver.best_score == 0.3 and saver.best_epoch == 2
    assert torch.all(load_checkpoint(tmp_path / "model.pt")["weight"] == 1)

    restored = BestModelSaver(tmp_path, network, "val_mse", mode="min")
    restored.load_state_dict(saver.state_dict())
    assert not restored.is_better(0.35) and restored.is_better(0.2)


def test_model_weights_loader(tmp_path):
    source, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    path = save_checkpoint({"state_dict": source.state_dict()}, tmp_path / "model.pt")
    ModelWeightsLoader(path, target)()
    assert torch.equal(source.weight, target.weight)
    with pytest.raises(InputDataError, match="sha256"):
        ModelWeightsLoader(path, target, sha256="f" * 64)()


def test_non_strict_loading_refuses_a_checkpoint_that_matches_nothing(tmp_path):
    """strict=False (a phase started from another network's weights) must not silently keep a random network."""
    path = save_checkpoint({"other.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    target = torch.nn.Linear(2, 2)
    before = target.weight.detach().clone()
    with pytest.raises(InputDataError, match="none of its 1 tensors matches"):
        ModelWeightsLoader(path, target, strict=False)()
    torch.testing.assert_close(target.weight, before)
    partial = save_checkpoint({"weight": torch.ones(2, 2)}, tmp_path / "partial.pt")
    ModelWeightsLoader(partial, target, strict=False)()  # the bias stays as it was
    torch.testing.assert_close(target.weight, torch.ones(2, 2))


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="save_interval"):
        TrainingCheckpoint(tmp_path, {"n": torch.nn.Linear(1, 1)}, save_interval=0)
    with pytest.raises(ValueError, match="mode"):
        BestModelSaver(tmp_path, torch.nn.Linear(1, 1), "m", mode="largest")
