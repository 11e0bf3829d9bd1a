"""Running torchvision detection models (Mask R-CNN and kin) inside MONAI's engines.

MONAI's ``SupervisedTrainer`` and ``SupervisedEvaluator`` call ``network(image)`` on a stacked batch
and ``loss(pred, label)``; torchvision detectors instead take a list of images of any sizes and a
list of target dicts, and return a loss dict when training and a list of prediction dicts when
evaluating. The pieces here bridge the two without giving up MONAI's handlers:

- :func:`detection_collate` keeps samples as lists (no stacking, so sizes may differ);
- :class:`DetectionTrainingStep` is the trainer's ``iteration_update``;
- :class:`DetectionInferenceStep` is the evaluator's ``iteration_update``.

MONAI's decollation (``decollate=True``) splits every tensor of a list along its first dimension,
which scrambles per-sample lists, so both engines are built with ``decollate=False``; the steps
already leave per-sample lists where MONAI's handlers look for them. In a bundle config::

    "train#trainer": {"_target_": "SupervisedTrainer", "decollate": false,
        "iteration_update": {"_target_": "common.engines.detection.DetectionTrainingStep"},
        "loss_function": null, ...}
    "train#handlers": [{"_target_": "StatsHandler", "output_transform": "$lambda x: x", ...}]
    "validate#evaluator": {"_target_": "SupervisedEvaluator", "decollate": false,
        "iteration_update": {"_target_": "common.engines.detection.DetectionInferenceStep"},
        "postprocessing": ..., ...}

with ``"collate_fn": "$common.engines.detection.detection_collate"`` in both data loaders. The
trainer's output is a dict of scalar losses, which ``StatsHandler`` and ``TensorBoardStatsHandler``
log key by key with ``output_transform=lambda x: x`` (``from_engine(["loss"], first=True)`` returns a
tuple for a dict and logs nothing). The evaluator's ``engine.state.output`` and ``engine.state.batch``
are lists of per-sample dicts, so postprocessing runs per sample and
:func:`~common.handlers.samples.iteration_samples` joins predictions with their reference instances.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.networks.utils import eval_mode

from common.errors import InputDataError
from common.utils import source_file

__all__ = ["DetectionInferenceStep", "DetectionTrainingStep", "detection_collate"]

IMAGE, BOXES, LABELS, INSTANCES = "image", "boxes", "labels", "instances"


def detection_collate(batch: Sequence[Mapping[str, Any] | Sequence[Mapping[str, Any]]]) -> dict[str, list]:
    """Gather samples into one list per key, keeping each tensor (and its metadata) as it is.

    Samples that a transform turned into several (a list of dicts, e.g. random crops with
    ``num_samples > 1``) are flattened into the batch, as MONAI's ``list_data_collate`` does.
    """
    samples = [s for item in batch for s in ([item] if isinstance(item, Mapping) else item)]
    if not samples:
        raise ValueError("detection_collate got an empty batch.")
    keys = list(samples[0])
    for i, sample in enumerate(samples[1:], start=1):
        if set(sample) != set(keys):
            raise ValueError(
                f"samples of a batch must have the same keys: sample 0 has {sorted(keys)}, "
                f"sample {i} has {sorted(sample)}."
            )
    return {key: [sample[key] for sample in samples] for key in keys}


def _plain(value: Any) -> torch.Tensor:
    """A plain tensor: MetaTensor's per-operation metadata tracking only slows torchvision down."""
    return value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)



def _images(batch: Mapping[str, Any]) -> list[Any]:
    """The batch's images as given, checked to be a list of (C, H, W) tensors."""
    if not isinstance(batch, Mapping) or not isinstance(batch.get(IMAGE), (list, tuple)):
        raise TypeError(
            "a detection batch is a dict holding a list of images under 'image'; build the data loader "
            "with collate_fn=common.engines.detection.detection_collate."
        )
    images = list(batch[IMAGE])
    for key, values in batch.items():
        if isinstance(values, (list, tuple)) and len(values) != len(images):
            raise ValueError(f"batch has {len(images)} images but {len(values)} entries under '{key}'.")
    for i, image in enumerate(images):
        if not torch.is_tensor(image) or image.ndim != 3:
            shape = getattr(image, "shape", type(image))
            raise InputDataError(source_file(image), f"sample {i}: image must be a (C, H, W) tensor, got {shape}")
    return images


def _target(
    batch: Mapping[str, Any], i: int, device: torch.device, non_blocking: bool
) -> dict[str, torch.Tensor]:
    """Sample ``i``'s torchvision target: float32 xyxy boxes, int64 labels, uint8 masks, all checked."""
    image = batch[IMAGE][i]
    path = source_file(image)
    missing = [k for k in (BOXES, LABELS, INSTANCES) if k not in batch]
    if missing:
        raise InputDataError(path, f"training needs {missing} for every image (see the instance transform)")
    boxes = _plain(batch[BOXES][i]).to(torch.float32)
    labels = _plain(batch[LABELS][i]).to(torch.int64)
    masks = _plain(batch[INSTANCES][i])
    height, width = image.shape[-2:]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InputDataError(path, f"boxes must be (N, 4), got {tuple(boxes.shape)}")
    n = boxes.shape[0]
    if labels.shape != (n,):
        raise InputDataError(path, f"{n} boxes but labels of shape {tuple(labels.shape)}")
    if masks.shape != (n, height, width):
        expected = (n, height, width)
        raise InputDataError(path, f"instances must be {expected} for {n} boxes, got {tuple(masks.shape)}")
    if n and bool((labels < 1).any()):
        raise InputDataError(path, f"labels must be >= 1 (0 is the background), got {labels.tolist()}")
    flat = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if bool(flat.any()):
        raise InputDataError(path, f"boxes need x1 > x0 and y1 > y0 (xyxy), got {boxes[flat].tolist()}")
    target = {BOXES: boxes, LABELS: labels, "masks": masks.to(torch.uint8)}
    return {k: v.to(device, non_blocking=non_blocking) for k, v in target.items()}


def _require_no_decollation(engine: Engine) -> None:
    """Fail early, and say why, when the engine was built with MONAI's default ``decollate=True``.

    MONAI registers its decollation as a ``MODEL_COMPLETED`` handler named ``_decollate_data``; on a
    detection batch it would fail later with an ``IndexError`` from deep inside ``decollate_batch``.
    """
    handlers = engine._event_handlers.get(IterationEvents.MODEL_COMPLETED, [])
    if any(getattr(handler, "__name__", "") == "_decollate_data" for handler, *_ in handlers):
        raise ValueError(
            f"build the {type(engine).__name__} with decollate=False: MONAI's decollation splits the "
            "per-sample lists of a detection batch (see common.engines.detection)."
        )


def _autocast(amp: bool, device: torch.device) -> Any:
    """float16 autocast on CUDA (with loss scaling), bfloat16 on CPU, nothing when ``amp`` is off."""
    if not amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


class DetectionTrainingStep:
    """One training iteration of a torchvision detector, as ``SupervisedTrainer(iteration_update=...)``.

    The batch (from :func:`detection_collate`) holds per-sample lists under ``"image"`` ((C, H, W)
    float), ``"boxes"`` ((N, 4) xyxy pixels), ``"labels"`` ((N,) >= 1) and ``"instances"``
    ((N, H, W) binary, one channel per object); N may be 0 for an image without objects. The losses
    the detector returns are weighted, summed and back-propagated, and MONAI's iteration events fire
    at the points ``SupervisedTrainer`` fires them, so handlers such as gradient clipping still work.

    Args:
        loss_weights: factor per loss name (e.g. ``{"loss_mask": 2.0}``); unnamed losses count once.
            A name the detector does not return is an error, so a typo cannot pass silently.
        amp: mixed precision, float16 with gradient scaling on CUDA, bfloat16 on CPU.

    Returns (per call): ``{"loss": total, "loss_classifier": ..., ...}``, every value a detached scalar.
    """

    def __init__(self, loss_weights: Mapping[str, float] | None = None, amp: bool = False) -> None:
        self.loss_weights = dict(loss_weights or {})
        if any(w < 0 for w in self.loss_weights.values()):
            raise ValueError(f"loss_weights must be >= 0, got {self.loss_weights}.")
        self.amp = amp
        self.scaler: torch.amp.GradScaler | None = None

    def _total(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        unknown = set(self.loss_weights) - set(losses)
        if unknown:
            raise ValueError(
                f"loss_weights names {sorted(unknown)}, but the detector returns {sorted(losses)}."
            )
        return sum(self.loss_weights.get(name, 1.0) * value.float() for name, value in losses.items())

    def __call__(self, engine: Engine, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if getattr(engine, "accumulation_steps", 1) > 1:
            raise ValueError("DetectionTrainingStep does not accumulate gradients; set accumulation_steps=1.")
        _require_no_decollation(engine)
        device = torch.device(engine.state.device or "cpu")
        non_blocking = bool(getattr(engine, "non_blocking", False))
        images = [_plain(image).to(device, non_blocking=non_blocking) for image in _images(batch)]
        targets = [_target(batch, i, device, non_blocking) for i in range(len(images))]

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=getattr(engine, "optim_set_to_none", True))
        use_scaler = self.amp and device.type == "cuda"
        if use_scaler and self.scaler is None:
            self.scaler = torch.amp.GradScaler("cuda")
        with _autocast(self.amp, device):
            losses = engine.network(images, targets)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = self._total(losses)
        engine.state.output = {"loss": loss, **losses}
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        if use_scaler:
            self.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            self.scaler.step(engine.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()

        engine.state.output = {name: value.detach() for name, value in engine.state.output.items()}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def _predictions(image: Any, found: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """One sample's output entry: the input image and torchvision's detections renamed ``pred_*``."""
    output = {IMAGE: image, "pred_boxes": found[BOXES].float(), "pred_scores": found["scores"].float()}
    output["pred_labels"] = found[LABELS]
    if "masks" in found:  # box-only detectors (Faster R-CNN, RetinaNet) have none
        output["pred_masks"] = found["masks"].float()
    return output


class DetectionInferenceStep:
    """One inference iteration of a torchvision detector, as ``SupervisedEvaluator(iteration_update=...)``.

    Runs the detector in eval mode without gradients and leaves, for each sample, a dict with the
    input ``"image"`` and ``"pred_boxes"`` ((K, 4) xyxy), ``"pred_scores"`` ((K,)), ``"pred_labels"``
    ((K,)) and, for Mask R-CNN, ``"pred_masks"`` ((K, 1, H, W) probabilities at the input size) in
    ``engine.state.output``. ``engine.state.batch`` becomes the matching list of per-sample input
    dicts, so reference ``"instances"``, ``"boxes"`` and names stay beside the predictions for
    postprocessing and metric handlers. The evaluator must be built with ``decollate=False``.

    Args:
        amp: mixed precision (float16 on CUDA, bfloat16 on CPU); predictions are returned as float32.
    """

    def __init__(self, amp: bool = False) -> None:
        self.amp = amp

    def __call__(self, engine: Engine, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        _require_no_decollation(engine)
        device = torch.device(engine.state.device or "cpu")
        non_blocking = bool(getattr(engine, "non_blocking", False))
        originals = _images(batch)
        images = [_plain(image).to(device, non_blocking=non_blocking) for image in originals]
        with eval_mode(engine.network), _autocast(self.amp, device):
            detections = engine.network(images)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        engine.state.batch = [
            {key: values[i] if isinstance(values, (list, tuple)) else values for key, values in batch.items()}
            for i in range(len(images))
        ]
        engine.state.output = [_predictions(image, found) for image, found in zip(originals, detections)]
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
