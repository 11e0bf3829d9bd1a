"""Active learning: the next image to annotate is the one the model is least sure of.

Uncertainty is the disagreement of the model with itself under a horizontal flip: the image and its
mirror are both run through the bundle's inference task, the second label is flipped back, and the
score is the fraction of pixels whose label differs (for instance maps: cell vs background, since
instance ids are arbitrary). A confident model is flip-equivariant; where it is unsure, small changes
in the input move its boundaries and classes. This needs no dropout or ensemble and works for every
image bundle whatever its output (instances, masks, detection squares).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.strategy import Strategy

from common.data.cell_readers import read_image
from common.monailabel.datastore import owned_images
from common.monailabel.infer import BundleInferTask, ImageInferTask
from common.writers.display import write_png

__all__ = ["FlipDisagreement", "flip_disagreement"]


def flip_disagreement(task: ImageInferTask, image: str) -> float:
    """Fraction of pixels whose label changes when ``image`` is mirrored left-right before inference."""
    label, _ = task.predict(image, {})
    with tempfile.TemporaryDirectory(prefix="monailabel_flip_") as scratch:
        mirrored = write_png(np.ascontiguousarray(read_image(image)[:, ::-1]), Path(scratch) / "mirrored.png")
        mirrored_label, _ = task.predict(str(mirrored), {})
    mirrored_label = mirrored_label[:, ::-1]
    if task.entry.kind == "instances":
        label, mirrored_label = label > 0, mirrored_label > 0
    return float(np.mean(label != mirrored_label))


class FlipDisagreement(Strategy):
    """Rank the datastore's unlabelled images of a model by :func:`flip_disagreement`, highest first.

    Request: ``{"strategy": "flip_disagreement", "model": "<bundle>"}``. The answer holds the chosen
    ``id``, its ``score`` and every candidate's score.

    Args:
        infers: the app's inference tasks, by model name.
        owns_unmarked: also rank images that name no model (see :mod:`common.monailabel.datastore`).
    """

    def __init__(self, infers: Mapping[str, BundleInferTask], owns_unmarked: bool = False) -> None:
        super().__init__("Next image: largest label disagreement under a horizontal flip")
        self.infers = infers
        self.owns_unmarked = owns_unmarked

    def __call__(self, request: Mapping[str, Any], datastore: Datastore) -> dict[str, Any]:
        name = request.get("model")
        task = self.infers.get(name) if isinstance(name, str) else None
        if not isinstance(task, ImageInferTask):
            usable = sorted(n for n, t in self.infers.items() if isinstance(t, ImageInferTask))
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT, f"flip_disagreement needs 'model', one of {usable}; got {name!r}"
            )
        task.require_weights()
        candidates = owned_images(datastore, datastore.get_unlabeled_images(), name, self.owns_unmarked)
        scores = {image_id: flip_disagreement(task, datastore.get_image_uri(image_id)) for image_id in candidates}
        if not scores:
            return {}
        best = max(scores, key=scores.__getitem__)
        return {"id": best, "score": scores[best], "scores": scores}
