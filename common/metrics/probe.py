"""k-NN probe of frozen ViT patch features: does an encoder tell lesion from skin before fine-tuning?

A falling MAE loss does not show that the encoder learnt more than colour statistics. The probe asks
the frozen encoder directly: each 16 px patch of a labelled dermoscopy image becomes one feature (the
last block's token, after the final norm), labelled lesion or skin from the mask, and patches of half
the images vote, by k-nearest neighbours, on the patches of the other half. Balanced accuracy
(mean of lesion and skin recall) does not reward calling every patch skin. Comparing an MAE encoder
with randomly initialised ones of the same architecture, and with the patches' mean colour alone, shows what
pretraining added::

    python -m common.metrics.probe --images data/test/labelled --vit vit_tiny_patch16_224 \\
        --checkpoint models/ssl_vit_backbone.pt --size 256 --output probe.json
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.data.cell_readers import read_image
from common.data.dermoscopy import read_binary_mask, read_isic_folder
from common.errors import InputDataError
from common.io.atomic import atomic_write
from common.networks.timm_backbone import create_vit_backbone
from common.transforms.intensity import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["compare_encoders", "knn_balanced_accuracy", "patch_colours", "patch_features", "patch_labels", "probe"]

SKIN, LESION, MIXED = 0, 1, -1
PATCH_SIZE = 16


def patch_labels(mask: np.ndarray, patch_size: int, purity: float = 0.9) -> np.ndarray:
    """(H/p, W/p) labels of a binary HxW mask's patches: ``LESION`` where at least ``purity`` of the
    pixels are lesion, ``SKIN`` where at most ``1 - purity`` are, ``MIXED`` (left out) on the border."""
    height, width = mask.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"mask {height}x{width} does not tile into {patch_size} px patches.")
    if not 0.5 < purity <= 1:
        raise ValueError(f"purity must be in (0.5, 1], got {purity}.")
    fraction = mask.reshape(height // patch_size, patch_size, width // patch_size, patch_size).mean((1, 3))
    labels = np.full(fraction.shape, MIXED, dtype=np.int64)
    labels[fraction >= purity] = LESION
    labels[fraction <= 1 - purity] = SKIN
    return labels


def knn_balanced_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 11,
) -> float:
    """Balanced accuracy of a vote among the ``k`` nearest training features.

    Features are (N, D), labels (N,) of ``SKIN``/``LESION``. Distances are Euclidean after standardising
    every dimension on the training set, so no dimension dominates by its scale alone (cosine similarity
    would not do: patch colours all point roughly the same way). Each vote counts inversely to its
    class's share of the training features, so the many skin patches do not outvote the few lesion ones.
    """
    if k < 1 or k > len(train_features):
        raise ValueError(f"k must be in [1, {len(train_features)}] (the training features), got {k}.")
    for name, labels in (("training", train_labels), ("test", test_labels)):
        if set(labels.unique().tolist()) != {SKIN, LESION}:
            raise ValueError(f"{name} labels must hold both skin and lesion patches.")
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    distance = torch.cdist((test_features - mean) / std, (train_features - mean) / std)
    votes = train_labels[distance.topk(k, dim=1, largest=False).indices]
    lesion_share = train_labels.float().mean()
    lesion_votes = (votes == LESION).float().mean(1) / lesion_share
    predicted = (lesion_votes > (votes == SKIN).float().mean(1) / (1 - lesion_share)).long()
    recalls = [(predicted[test_labels == c] == c).float().mean().item() for c in (SKIN, LESION)]
    return float(np.mean(recalls))


@torch.no_grad()
def patch_features(encoder: nn.Module, image: np.ndarray) -> torch.Tensor:
    """(h * w, D) last-block tokens, after the final norm, of an HxWx3 uint8 image (H, W multiples of 16)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std
    (last,) = encoder.forward_intermediates(
        pixels[None], indices=[len(encoder.blocks) - 1], norm=True, output_fmt="NCHW", intermediates_only=True
    )
    return last[0].flatten(1).T


def _resized_pair(entry: dict[str, str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """An ISIC entry's image (area) and mask (nearest) resized to ``size`` x ``size``; the reader has
    checked that the two are of one size."""
    image = torch.from_numpy(read_image(entry["image"]).copy()).permute(2, 0, 1).float()[None]
    mask = torch.from_numpy(read_binary_mask(entry["mask"])).float()[None, None]
    image = F.interpolate(image, size=(size, size), mode="area")[0].permute(1, 2, 0).round().byte().numpy()
    mask = F.interpolate(mask, size=(size, size), mode="nearest")[0, 0].numpy() > 0
    return image, mask


def patch_colours(image: np.ndarray) -> torch.Tensor:
    """(h * w, 3) mean colour of each 16 px patch of an HxWx3 image: the baseline an encoder must beat."""
    pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    return F.avg_pool2d(pixels, PATCH_SIZE)[0].flatten(1).T


def probe(
    features_of: Callable[[np.ndarray], torch.Tensor],
    entries: Sequence[dict[str, str]],
    size: int = 224,
    k: int = 11,
) -> float:
    """Balanced k-NN accuracy of lesion vs skin patches: even-numbered images vote on the odd ones.

    ``features_of`` maps an HxWx3 uint8 image to (h * w, D) patch features, e.g. ``partial(patch_features,
    encoder)`` or :func:`patch_colours`.
    """
    if len(entries) < 2:
        raise ValueError(f"the probe needs at least 2 labelled images (one to vote, one to score), got {len(entries)}.")
    halves: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []), ([], [])]
    for index, entry in enumerate(entries):
        image, mask = _resized_pair(entry, size)
        labels = torch.from_numpy(patch_labels(mask, PATCH_SIZE)).flatten()
        keep = labels != MIXED
        half_features, half_labels = halves[index % 2]
        half_features.append(features_of(image)[keep])
        half_labels.append(labels[keep])
    (train_features, train_labels), (test_features, test_labels) = (
        (torch.cat(features), torch.cat(labels)) for features, labels in halves
    )
    return knn_balanced_accuracy(train_features, train_labels, test_features, test_labels, k)


def compare_encoders(
    image_dir: str | os.PathLike,
    vit: str,
    checkpoint: str | os.PathLike,
    size: int = 224,
    k: int = 11,
    random_seeds: Sequence[int] = (0, 1, 2),
) -> dict[str, float]:
    """Probe accuracy of the encoder in ``checkpoint``, of random encoders (mean and standard deviation
    over ``random_seeds``: a random ViT's accuracy varies much with its seed) and of patch colour alone."""
    entries = read_isic_folder(image_dir)
    pretrained = create_vit_backbone(vit, checkpoint=checkpoint).eval()
    random_scores = []
    for seed in random_seeds:
        torch.manual_seed(seed)
        random_scores.append(probe(partial(patch_features, create_vit_backbone(vit).eval()), entries, size, k))
    return {
        "knn_pretrained": probe(partial(patch_features, pretrained), entries, size, k),
        "knn_random": float(np.mean(random_scores)),
        "knn_random_std": float(np.std(random_scores)),
        "knn_colour": probe(patch_colours, entries, size, k),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: probe a pretrained encoder, random ones and colour on labelled ISIC images."""
    parser = argparse.ArgumentParser(prog="python -m common.metrics.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, help="ISIC folder: ISIC_<n>.png with ISIC_<n>_segmentation.png")
    parser.add_argument("--vit", default="vit_base_patch16_224", help="timm name of the encoder")
    parser.add_argument("--checkpoint", required=True, help="encoder weights, e.g. models/ssl_vit_backbone.pt")
    parser.add_argument("--size", type=int, default=224, help="images are resized to size x size (multiple of 16)")
    parser.add_argument("--k", type=int, default=11, help="neighbours that vote")
    parser.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of random encoders")
    parser.add_argument("--output", help="JSON report to write")
    args = parser.parse_args(argv)
    try:
        report = compare_encoders(args.images, args.vit, args.checkpoint, args.size, args.k, args.random_seeds)
    except (InputDataError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    print(
        f"k-NN probe, lesion vs skin patches (balanced accuracy, k={args.k}): pretrained "
        f"{report['knn_pretrained']:.4f}, random {report['knn_random']:.4f} +- {report['knn_random_std']:.4f} "
        f"({len(args.random_seeds)} seeds), patch colour alone {report['knn_colour']:.4f}"
    )
    if args.output:
        text = json.dumps({**report, "k": args.k, "size": args.size, "vit": args.vit}, indent=2) + "\n"
        print(atomic_write(args.output, lambda f: f.write(text.encode("utf-8"))))


if __name__ == "__main__":
    main()
