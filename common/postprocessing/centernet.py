"""From CenterNet output maps to detected centres: peak decoding and point NMS.

Decoding inverts :func:`common.transforms.centernet.centernet_target`: a centre at ``c`` pixels is
trained as cell ``floor(c / s)`` plus offset ``c / s - floor(c / s)``, so ``(cell + offset) * s`` gives
back ``c`` in the same continuous pixel coordinates as the training boxes, with no half-pixel shift.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor
from scipy.spatial import cKDTree

__all__ = ["DecodeCentresd", "decode_centres", "suppress_close_points"]


def decode_centres(
    output: torch.Tensor, stride: int = 4, top_k: int = 500, threshold: float = 0.3, apply_sigmoid: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Centres and scores from (3, h, w) or (B, 3, h, w) CenterNet maps, one pair per image.

    A cell is a peak when it equals the maximum of its 3x3 neighbourhood (CenterNet's max-pool NMS,
    which keeps centres as close as two cells apart); the ``top_k`` strongest peaks scoring at least
    ``threshold`` are kept, best first.

    Args:
        output: [heatmap, offset x, offset y] maps at stride ``stride``.
        stride: output stride of the network.
        top_k: most centres per image.
        threshold: least heatmap probability of a centre.
        apply_sigmoid: the heatmap holds logits (the network's output) rather than probabilities.

    Returns:
        per image, points (K, 2) float32 as x, y input-image pixels and scores (K,) in [0, 1].
    """
    if output.ndim == 3:
        output = output[None]
    if output.ndim != 4 or output.shape[1] != 3:
        raise ValueError(f"expected CenterNet output (3, h, w) or (B, 3, h, w), got shape {tuple(output.shape)}.")
    if stride < 1 or top_k < 1:
        raise ValueError(f"stride and top_k must be >= 1, got {stride} and {top_k}.")
    output = convert_to_tensor(output, track_meta=False).float()
    heatmap = torch.sigmoid(output[:, 0]) if apply_sigmoid else output[:, 0]
    is_peak = F.max_pool2d(heatmap[:, None], 3, stride=1, padding=1)[:, 0] == heatmap
    peaks = heatmap.masked_fill(~is_peak, -torch.inf)
    width = heatmap.shape[-1]
    scores, indices = peaks.flatten(1).topk(min(top_k, peaks[0].numel()), dim=1)
    results = []
    for image_output, image_scores, image_indices in zip(output, scores, indices):
        keep = image_scores >= threshold
        image_scores, image_indices = image_scores[keep], image_indices[keep]
        rows, cols = image_indices // width, image_indices % width
        offsets = image_output[1:3].flatten(1)[:, image_indices]
        points = torch.stack([cols + offsets[0], rows + offsets[1]], dim=1) * stride
        results.append((points, image_scores))
    return results


def suppress_close_points(
    points: torch.Tensor | np.ndarray, scores: torch.Tensor | np.ndarray, min_distance: float
) -> torch.Tensor:
    """Greedy point NMS: indices of the points kept, best score first.

    Going down the scores, a point is dropped when it lies closer than ``min_distance`` to a point
    already kept. Sliding-window inference can find one cell twice near window borders; with
    ``min_distance`` below the smallest plausible distance between two cell centres only such
    duplicates go. Neighbours come from a KD-tree, so thousands of points cost milliseconds.
    """
    if min_distance < 0:
        raise ValueError(f"min_distance must be >= 0, got {min_distance}.")
    points_np = torch.as_tensor(points).detach().cpu().double().numpy().reshape(-1, 2)
    scores_np = torch.as_tensor(scores).detach().cpu().double().numpy().reshape(-1)
    if len(points_np) != len(scores_np):
        raise ValueError(f"{len(points_np)} points but {len(scores_np)} scores.")
    order = np.argsort(-scores_np, kind="stable")
    if min_distance == 0:
        return torch.as_tensor(order, dtype=torch.long)
    pairs = cKDTree(points_np).query_pairs(min_distance, output_type="ndarray")
    pairs = pairs[np.linalg.norm(points_np[pairs[:, 0]] - points_np[pairs[:, 1]], axis=1) < min_distance]
    neighbours: dict[int, list[int]] = {}
    for a, b in pairs.tolist():
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    suppressed = np.zeros(len(points_np), dtype=bool)
    keep = []
    for index in order.tolist():
        if not suppressed[index]:
            keep.append(index)
            suppressed[neighbours.get(index, [])] = True
    return torch.as_tensor(keep, dtype=torch.long)


class DecodeCentresd(MapTransform):
    """Decode one image's (3, h, w) CenterNet output into ``points`` (K, 2) x, y pixels and ``scores`` (K,).

    For an evaluator's postprocessing after decollation. Arguments as in :func:`decode_centres`;
    ``min_distance > 0`` also applies :func:`suppress_close_points`.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        stride: int = 4,
        top_k: int = 500,
        threshold: float = 0.3,
        min_distance: float = 0.0,
        apply_sigmoid: bool = True,
        points_key: str = "points",
        scores_key: str = "scores",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"DecodeCentresd decodes one output key, got {self.keys}.")
        if min_distance < 0:
            raise ValueError(f"min_distance must be >= 0, got {min_distance}.")
        self.stride, self.top_k, self.threshold = stride, top_k, threshold
        self.min_distance, self.apply_sigmoid = min_distance, apply_sigmoid
        self.points_key, self.scores_key = points_key, scores_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            [(points, scores)] = decode_centres(d[key], self.stride, self.top_k, self.threshold, self.apply_sigmoid)
            if self.min_distance > 0:
                keep = suppress_close_points(points, scores, self.min_distance).to(points.device)
                points, scores = points[keep], scores[keep]
            d[self.points_key], d[self.scores_key] = points, scores
        return d
