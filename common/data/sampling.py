"""Counter-measures for class imbalance, as components a bundle config builds from a dataset's labels.

Bethesda classes are highly imbalanced (NILM cells outnumber carcinoma cells by orders of magnitude),
so a classifier trained on raw frequencies learns to answer NILM. Two standard remedies: draw
training samples with probability inversely proportional to their class frequency
(:func:`weighted_sampler`, or :func:`inverse_frequency_weights` for MONAI's
``DistributedWeightedRandomSampler`` under DDP), or weight the loss (:func:`class_weights`).

A class with no training samples gets no sampling weight (there is nothing to draw) and a loss weight
of 0 (the network cannot learn it; a warning names it), rather than an error, so a subset of a
dataset without a rare class still trains.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

__all__ = ["class_counts", "class_weights", "inverse_frequency_weights", "weighted_sampler"]

logger = logging.getLogger(__name__)


def class_counts(labels: Sequence[int] | np.ndarray | torch.Tensor, n_classes: int) -> np.ndarray:
    """Number of samples of each class, (n_classes,) int64.

    Raises:
        ValueError: no labels, or a label outside ``0..n_classes-1``.
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        raise ValueError("no labels: the dataset is empty.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must lie in 0..{n_classes - 1}, found {labels.min()}..{labels.max()}.")
    return np.bincount(labels, minlength=n_classes).astype(np.int64)


def inverse_frequency_weights(
    labels: Sequence[int] | np.ndarray | torch.Tensor, n_classes: int
) -> np.ndarray:
    """Per-sample weights ``1 / count[label]``: every class present is drawn equally often.

    Each present class's weights sum to 1, so the weights sum to the number of classes present.
    """
    labels = np.asarray(labels).reshape(-1)
    counts = class_counts(labels, n_classes)
    return 1.0 / counts[labels]


def class_weights(
    labels: Sequence[int] | np.ndarray | torch.Tensor, n_classes: int, normalise: bool = True
) -> torch.Tensor:
    """Loss weights ``1 / count[class]`` for ``torch.nn.CrossEntropyLoss(weight=...)``.

    Args:
        labels: class index of every training sample.
        n_classes: number of classes of the classifier.
        normalise: scale the weights of the classes present to mean 1, so the loss keeps the
            magnitude of the unweighted loss and the learning rate need not change.

    Returns:
        (n_classes,) float32; classes without samples get 0.
    """
    counts = class_counts(labels, n_classes)
    present = counts > 0
    if not present.all():
        logger.warning(
            "classes %s have no training samples: their loss weight is 0", np.flatnonzero(~present).tolist()
        )
    weights = np.zeros(n_classes, dtype=np.float64)
    weights[present] = 1.0 / counts[present]
    if normalise:
        weights[present] /= weights[present].mean()
    return torch.as_tensor(weights, dtype=torch.float32)


def weighted_sampler(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    n_classes: int,
    num_samples: int | None = None,
    seed: int = 0,
) -> WeightedRandomSampler:
    """A class-balanced sampler (with replacement) whose draws depend only on ``seed``.

    Args:
        labels: class index of every dataset item, in item order (``CellCropDataset.labels``).
        n_classes: number of classes.
        num_samples: draws per epoch; by default the dataset length, so an epoch keeps its size.
        seed: seed of the sampler's own generator (a run is reproducible whatever else uses the
            global RNG).
    """
    weights = inverse_frequency_weights(labels, n_classes)
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    return WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.float64),
        num_samples=len(weights) if num_samples is None else num_samples,
        replacement=True,
        generator=torch.Generator().manual_seed(seed),
    )
