import pytest
import torch
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer

from common.errors import InputDataError
from common.handlers.guards import NonFiniteLossGuard


def test_nan_loss_names_the_batch_files():
    network = torch.nn.Linear(4, 1)
    image = MetaTensor(torch.randn(2, 4), meta={"filename_or_obj": ["a.png", "b.png"]})
    image[1, 0] = float("nan")
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": image, "label": torch.zeros(2, 1)}],
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
        loss_function=torch.nn.MSELoss(),
        train_handlers=[NonFiniteLossGuard()],
    )
    with pytest.raises(InputDataError, match="loss became nan") as err:
        trainer.run()
    assert "a.png" in str(err.value) and "b.png" in str(err.value)


def test_finite_loss_passes():
    network = torch.nn.Linear(4, 1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": torch.randn(2, 4), "label": torch.zeros(2, 1)}],
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
        loss_function=torch.nn.MSELoss(),
        train_handlers=[NonFiniteLossGuard()],
    )
    trainer.run()
    assert trainer.state.iteration == 1


def test_dict_output_from_custom_iteration_update():
    """Custom steps (e.g. DINO) return a plain dict that is not decollated."""
    from types import SimpleNamespace

    engine = SimpleNamespace(state=SimpleNamespace(output={"loss": torch.tensor(float("inf"))}, batch={}, epoch=1, iteration=3))
    with pytest.raises(InputDataError, match="loss became inf"):
        NonFiniteLossGuard()(engine)
