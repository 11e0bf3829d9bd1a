"""FedProx's proximal term, as the site's executor adds it to any bundle's trainer."""

from __future__ import annotations

import pytest
import torch
from monai.engines import SupervisedTrainer

pytest.importorskip("nvflare", reason="federated training needs the fl extra: pip install .[fl]")

from common.fl.executor import FedProxGradient


def test_fedprox_pulls_weights_towards_the_global_model():
    """With a loss of zero, one SGD step moves the weights by exactly lr * mu * (w - w_global)."""
    torch.manual_seed(0)
    network = torch.nn.Linear(3, 1)
    start = {name: value.detach().clone() for name, value in network.state_dict().items()}
    reference = {name: torch.zeros_like(value) for name, value in start.items()}
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": torch.ones(2, 3), "label": torch.ones(2, 1)}],
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.5),
        loss_function=lambda pred, label: 0.0 * pred.sum(),
    )
    fedprox = FedProxGradient(mu=0.1)
    fedprox.attach(trainer)
    fedprox.set_reference(reference)
    trainer.run()
    assert fedprox.steps == 1
    for name, value in network.state_dict().items():
        torch.testing.assert_close(value, start[name] * (1 - 0.5 * 0.1))
