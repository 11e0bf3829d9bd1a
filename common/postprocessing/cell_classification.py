"""Second stage of two-stage cell analysis: classify a crop around every detected centre."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from common.data.cell_crops import extract_crops

__all__ = ["ClassifyCellsd"]


class ClassifyCellsd(MapTransform):
    """Crop around each detected centre and classify the crops in batches.

    Runs in an evaluator's postprocessing after the detector's centres were decoded (e.g. by
    ``common.postprocessing.centernet.DecodeCentresd``). Crops are taken from the same (normalised)
    image the detector saw and batched ``batch_size`` at a time, never one by one. The final
    confidence of a cell is its detection score times its class probability, as in the submission format.

    Args:
        keys: the image key to crop from, (C, H, W).
        classifier: network mapping (B, C, input_size, input_size) to (B, n_classes) logits.
        points_key: detected centres (K, 2) as x, y pixels.
        scores_key: detection scores (K,).
        crop_size: side of the square crop around each centre, in image pixels.
        input_size: side the crops are resized to for the classifier.
        batch_size: crops per classifier pass.
        classes_key: where the class indices (K,) are written.
        conf_key: where detection score x class probability (K,) is written.
        probabilities_key: where the class probabilities (K, n_classes) are written.
    """

    def __init__(
        self,
        keys: KeysCollection,
        classifier: torch.nn.Module,
        points_key: str = "points",
        scores_key: str = "scores",
        crop_size: int = 100,
        input_size: int = 224,
        batch_size: int = 64,
        classes_key: str = "classes",
        conf_key: str = "conf",
        probabilities_key: str = "class_probabilities",
    ) -> None:
        super().__init__(keys)
        if crop_size < 1 or input_size < 1 or batch_size < 1:
            raise ValueError(f"crop_size, input_size and batch_size must be >= 1, got {crop_size}, {input_size}, {batch_size}.")
        self.classifier = classifier
        self.points_key = points_key
        self.scores_key = scores_key
        self.crop_size = crop_size
        self.input_size = input_size
        self.batch_size = batch_size
        self.classes_key = classes_key
        self.conf_key = conf_key
        self.probabilities_key = probabilities_key

    @torch.no_grad()
    def classify(self, image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Class probabilities (K, n_classes) of the crops around ``points``."""
        device = next(self.classifier.parameters()).device
        was_training = self.classifier.training
        self.classifier.eval()
        probabilities = []
        for start in range(0, len(points), self.batch_size):
            crops = extract_crops(
                image, points[start : start + self.batch_size], self.crop_size, self.input_size, padding_mode="reflect"
            )
            probabilities.append(torch.softmax(self.classifier(crops.to(device)).float(), dim=1).cpu())
        self.classifier.train(was_training)
        return torch.cat(probabilities)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            points = torch.as_tensor(d[self.points_key], dtype=torch.float32).reshape(-1, 2)
            scores = torch.as_tensor(d[self.scores_key], dtype=torch.float32).reshape(-1)
            probabilities = self.classify(torch.as_tensor(d[key]), points) if len(points) else torch.zeros((0, 1))
            confidence, classes = probabilities.max(dim=1)
            d[self.classes_key] = classes
            d[self.conf_key] = scores * confidence
            d[self.probabilities_key] = probabilities
        return d
