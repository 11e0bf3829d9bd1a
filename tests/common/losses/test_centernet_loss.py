import math

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.transforms import Compose, DeleteItemsd

from common.losses.centernet import CenterNetFocalLoss, CenterNetLoss
from common.networks.centernet import CenterNet
from common.networks.param_groups import param_groups
from common.transforms.centernet import CenterNetTargetd


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# a 2x2 heatmap: one centre (target 1), one cell next to it (0.5) and two background cells
LOGITS = [[0.0, 2.0], [-1.0, math.log(1 / 3)]]
TARGET = [[1.0, 0.5], [0.0, 0.0]]
# centre, p = 0.5:                -(1 - 0.5)^2 log 0.5                    = 0.173287
# near, p = sigmoid(2) = 0.880797: -(1 - 0.5)^4 0.880797^2 log(0.119203) = 0.103127
# background, p = 0.268941:       -0.268941^2 log(0.731059)              = 0.022658
# background, p = 0.25:           -0.25^2 log 0.75                        = 0.017980
HAND_COMPUTED = 0.173287 + 0.103127 + 0.022658 + 0.017980


def test_focal_loss_on_a_2x2_map_matches_the_hand_computed_value():
    loss = CenterNetFocalLoss()(torch.tensor([[LOGITS]]), torch.tensor([[TARGET]]))
    assert loss.item() == pytest.approx(HAND_COMPUTED, abs=1e-5)


def test_focal_loss_is_normalised_by_the_centres_in_the_batch():
    logits, target = torch.tensor([[LOGITS]]), torch.tensor([[TARGET]])
    batch = CenterNetFocalLoss()(logits.repeat(2, 1, 1, 1), target.repeat(2, 1, 1, 1))
    assert batch.item() == pytest.approx(HAND_COMPUTED, abs=1e-5)  # twice the sum over two centres
    background_only = CenterNetFocalLoss()(torch.tensor([[[[2.0]]]]), torch.zeros(1, 1, 1, 1))
    p = sigmoid(2.0)
    assert background_only.item() == pytest.approx(-(p**2) * math.log(1 - p), rel=1e-5)  # divided by 1


def test_focal_loss_exponents():
    logits, target = torch.tensor([[LOGITS]]), torch.tensor([[TARGET]])
    loss = CenterNetFocalLoss(alpha=0, beta=0)(logits, target)
    expected = -math.log(0.5) - sum(math.log(1 - sigmoid(x)) for x in (2.0, -1.0, math.log(1 / 3)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)  # plain binary cross-entropy summed


def test_focal_loss_is_stable_for_extreme_logits():
    logits = torch.tensor([[[[-100.0, 100.0], [100.0, -100.0]]]], requires_grad=True)
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    loss = CenterNetFocalLoss()(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # a missed centre and a confident false positive each cost about their logit; two centres
    assert loss.item() == pytest.approx((100 + 100) / 2, rel=1e-3)
    perfect = CenterNetFocalLoss()(torch.tensor([[[[100.0, -100.0]]]]), torch.tensor([[[[1.0, 0.0]]]]))
    assert perfect.item() == pytest.approx(0.0, abs=1e-6)


def test_offset_l1_counts_only_centre_cells():
    target = torch.zeros(2, 4, 4, 4)
    target[0, :, 1, 2] = torch.tensor([1.0, 0.25, 0.75, 1.0])
    target[1, :, 3, 0] = torch.tensor([1.0, 0.5, 0.5, 1.0])
    pred = torch.randn(2, 3, 4, 4)
    pred[:, 0] = torch.where(target[:, 0] == 1, 100.0, -100.0)  # heatmap loss ~ 0
    pred[0, 1:, 1, 2] = torch.tensor([0.5, 0.5])  # errors 0.25 and 0.25
    pred[1, 1:, 3, 0] = torch.tensor([0.5, 1.5])  # errors 0 and 1
    loss = CenterNetLoss(offset_weight=2.0)(pred, target)
    assert loss.item() == pytest.approx(2.0 * (0.25 + 0.25 + 0 + 1) / 4, abs=1e-5)

    elsewhere = pred.clone()
    elsewhere[:, 1:, 0, 0] += 10  # offsets away from the centres are not supervised
    assert CenterNetLoss(offset_weight=2.0)(elsewhere, target).item() == pytest.approx(loss.item())


def test_loss_shapes_are_checked():
    with pytest.raises(ValueError, match=r"pred \(B, 3, h, w\)"):
        CenterNetLoss()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))


def test_trains_with_monai_supervised_trainer():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    items = []
    for _ in range(2):
        centres = rng.uniform(10, 54, (3, 2))
        items.append({"image": torch.rand(3, 64, 64), "boxes": np.concatenate([centres - 8, centres + 8], 1)})
    transform = Compose([CenterNetTargetd(), DeleteItemsd(keys="boxes")])
    loader = DataLoader(Dataset(items, transform), batch_size=2)
    network = CenterNet("resnet18", deconv_channels=(16, 16, 16), head_channels=8)
    losses = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.AdamW(param_groups(network, 1e-3, 1e-4, backbone_lr_scale=0.1), lr=1e-3),
        loss_function=CenterNetLoss(),
        decollate=False,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output["loss"].item()))
    trainer.run()
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
