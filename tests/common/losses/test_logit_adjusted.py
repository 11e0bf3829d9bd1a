import logging
import math

import numpy as np
import pytest
import torch

from common.losses.logit_adjusted import LogitAdjustedCrossEntropy


def test_loss_is_cross_entropy_on_prior_shifted_logits():
    # counts 3 and 1: priors 0.75 and 0.25; logits (0, 0) become (log 0.75, log 0.25)
    loss = LogitAdjustedCrossEntropy([3, 1])
    logits = torch.zeros(2, 2)
    value = loss(logits, torch.tensor([0, 1]))
    expected = (-math.log(0.75) - math.log(0.25)) / 2  # softmax of the shifted logits is the prior
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_tau_zero_is_plain_cross_entropy():
    logits, target = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 2, 1])
    loss = LogitAdjustedCrossEntropy(np.array([100, 10, 1]), tau=0.0)
    assert loss(logits, target).item() == pytest.approx(torch.nn.functional.cross_entropy(logits, target).item())


def test_rare_class_is_pushed_harder():
    """Equal logits: the adjusted loss of a rare-class sample exceeds that of a common one, so its
    gradient asks for a larger margin on the rare class."""
    loss = LogitAdjustedCrossEntropy([90, 10])
    logits = torch.zeros(1, 2)
    assert loss(logits, torch.tensor([1])) > loss(logits, torch.tensor([0]))


def test_class_without_samples_counts_as_one(caplog):
    with caplog.at_level(logging.WARNING, logger="common.losses.logit_adjusted"):
        loss = LogitAdjustedCrossEntropy([3, 0, 1])
    assert "classes [1] have no training samples" in caplog.text
    torch.testing.assert_close(loss.adjustment, torch.log(torch.tensor([3 / 5, 1 / 5, 1 / 5])))


def test_bad_counts_and_shapes_are_refused():
    with pytest.raises(ValueError, match="must be non-negative"):
        LogitAdjustedCrossEntropy([5, -1, 3])
    with pytest.raises(ValueError, match="at least 2 classes"):
        LogitAdjustedCrossEntropy([5])
    with pytest.raises(ValueError, match="tau must be >= 0"):
        LogitAdjustedCrossEntropy([1, 2], tau=-1)
    with pytest.raises(ValueError, match=r"logits must be \(N, 3\)"):
        LogitAdjustedCrossEntropy([1, 2, 3])(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
