import logging

import numpy as np
import pytest
import torch

from common.data.sampling import class_counts, class_weights, inverse_frequency_weights, weighted_sampler

# 8 of class 0, 2 of class 1, none of class 2, 1 of class 3
LABELS = np.array([0] * 8 + [1] * 2 + [3])


def test_inverse_frequency_weights():
    weights = inverse_frequency_weights(LABELS, n_classes=4)
    assert weights.shape == (11,)
    np.testing.assert_allclose(weights, [1 / 8] * 8 + [1 / 2] * 2 + [1.0])
    # every present class has the same total weight, so each is drawn equally often
    np.testing.assert_allclose([weights[LABELS == c].sum() for c in (0, 1, 3)], 1.0)


def test_class_weights_normalised_to_mean_one_over_present_classes(caplog):
    with caplog.at_level(logging.WARNING, logger="common.data.sampling"):
        weights = class_weights(torch.as_tensor(LABELS), n_classes=4)
    raw = np.array([1 / 8, 1 / 2, 0, 1.0])
    expected = raw / raw[[0, 1, 3]].mean()
    assert weights.dtype == torch.float32
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)
    assert weights[[0, 1, 3]].mean().item() == pytest.approx(1.0)
    assert "classes [2] have no training samples" in caplog.text
    np.testing.assert_allclose(class_weights(LABELS, 4, normalise=False).numpy(), raw, rtol=1e-6)
    # a usable CrossEntropyLoss weight
    loss = torch.nn.CrossEntropyLoss(weight=weights)(torch.zeros(2, 4), torch.tensor([0, 3]))
    assert torch.isfinite(loss)


def test_weighted_sampler_balances_classes_deterministically():
    labels = np.array([0] * 90 + [1] * 9 + [2])
    sampler = weighted_sampler(labels, n_classes=3, num_samples=3000, seed=7)
    drawn = np.array(list(sampler))
    assert len(drawn) == 3000
    frequencies = np.bincount(labels[drawn], minlength=3) / len(drawn)
    np.testing.assert_allclose(frequencies, 1 / 3, atol=0.04)
    again = np.array(list(weighted_sampler(labels, n_classes=3, num_samples=3000, seed=7)))
    np.testing.assert_array_equal(drawn, again)
    assert len(weighted_sampler(labels, n_classes=3)) == 100  # an epoch keeps the dataset's size


def test_bad_labels_are_refused():
    assert class_counts([2, 0, 2], 3).tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="empty"):
        class_counts([], 3)
    with pytest.raises(ValueError, match=r"0\.\.2, found 0\.\.3"):
        inverse_frequency_weights([0, 3], 3)
    with pytest.raises(ValueError, match="integer"):
        class_weights(np.array([0.5, 1.0]), 3)
    with pytest.raises(ValueError, match="num_samples"):
        weighted_sampler([0, 1], 2, num_samples=0)
