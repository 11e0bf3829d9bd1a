"""Multi-label patch classifiers whose class activation maps (CAMs) seed weakly supervised segmentation.

Histopathology patches often carry only image-level labels (which tissues occur, not where). A
classifier trained on such labels localises each class anyway: with global average pooling and a
bias-free linear layer, the logit of class c is the mean over positions of w_c . f(x, y), so the map
CAM_c(x, y) = ReLU(w_c . f(x, y)) (Zhou et al., CVPR 2016) shows where the evidence for c lies. A
dilated backbone (output stride 8 or 16) keeps that map fine enough for tissue boundaries.

CAMs cover only the most discriminative parts of a region. PBIP (Tang et al., CVPR 2025,
arXiv 2503.12068) instead compares every feature with class prototypes, cluster centres of the
classifier's own features where a class is confidently present, which spreads activation over whole
regions. :func:`build_class_prototypes` makes those prototypes from a training bank and
:class:`PrototypeCAMClassifier` turns them into maps with the same ``cams`` interface as the classifier.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import InputDataError
from common.networks.deeplab_v2 import create_dilated_backbone

__all__ = ["CAMClassifier", "PrototypeCAMClassifier", "build_class_prototypes", "kmeans"]


def _check_images(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(x.shape)}.")


def _multiscale_cams(
    feature_cams: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    size: Sequence[int] | None,
    scales: Sequence[float],
    flip: bool,
) -> torch.Tensor:
    """Mean of ``feature_cams`` over rescaled (and mirrored) copies of ``x``, each upsampled to ``size``.

    Evidence a network finds at one scale or orientation only is common; averaging over several is the
    usual test-time augmentation for CAMs in weakly supervised segmentation.
    """
    _check_images(x)
    scales = tuple(float(s) for s in scales)
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive factors, got {scales}.")
    size = tuple(int(s) for s in (x.shape[-2:] if size is None else size))
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (height, width) with positive entries, got {size}.")
    total = None
    for scale in scales:
        scaled = x
        if scale != 1.0:
            scaled = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        views = [feature_cams(scaled)]
        if flip:
            views.append(feature_cams(scaled.flip(-1)).flip(-1))
        for cams in views:
            cams = F.interpolate(cams, size=size, mode="bilinear", align_corners=False)
            total = cams if total is None else total + cams
    return total / (len(scales) * (2 if flip else 1))


class CAMClassifier(nn.Module):
    """Dilated timm CNN + global average pooling + bias-free 1x1 classifier; multi-label logits and CAMs.

    ``forward`` maps (B, 3, H, W) images to (B, num_classes) logits for ``BCEWithLogitsLoss`` or
    ``MultiLabelSoftMarginLoss``. ``cams`` gives the non-negative, unnormalised maps
    ReLU(w_c . f(x, y)) bilinearly upsampled to the input size; ``features`` the map f itself,
    (B, num_features, H/s, W/s) at ``output_stride`` s.

    WSSS work on histology (e.g. PBIP) often uses ResNet38, a wide ResNet that timm does not ship;
    any timm CNN that accepts ``output_stride`` works here: ``"resnet50"`` (default), ``"resnet101"``,
    ``"wide_resnet50_2"``, ``"resnest50d"``, or ``"resnet18"`` for quick experiments.

    Args:
        num_classes: number of image-level labels (tissue classes, without background).
        backbone: timm model name of a CNN that accepts ``output_stride``.
        pretrained: start from timm's ImageNet weights (needs network access or a filled Hugging Face
            cache). Offline, download them once and pass the file as ``checkpoint``.
        output_stride: 16 (default) or 8: the last (or last two) stages are dilated instead of strided.
        checkpoint: local backbone weights: a timm state dict of the same architecture, or a whole
            network checkpoint whose ``backbone.`` entries are used.
        checkpoint_key: entry of ``checkpoint`` that holds the state dict (default: autodetect).
        sha256: expected digest of ``checkpoint``.

    Raises:
        ValueError: ``num_classes`` < 1, ``output_stride`` not 8 or 16, or ``backbone`` cannot be dilated.
        RuntimeError: ``pretrained`` is true but the weights cannot be fetched.
        InputDataError: ``checkpoint`` is unreadable or does not fit the backbone.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        pretrained: bool = False,
        output_stride: int = 16,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_key: str | None = None,
        sha256: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.backbone = create_dilated_backbone(
            backbone, pretrained, output_stride, checkpoint, checkpoint_key=checkpoint_key, sha256=sha256
        )
        self.num_features = int(self.backbone.feature_info.channels()[-1])
        self.classifier = nn.Conv2d(self.num_features, num_classes, kernel_size=1, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The deepest backbone features, (B, num_features, H/s, W/s)."""
        _check_images(x)
        return self.backbone(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.features(x).mean(dim=(2, 3), keepdim=True)
        return self.classifier(pooled).flatten(1)

    def feature_cams(self, x: torch.Tensor) -> torch.Tensor:
        """CAMs at the feature resolution, ReLU(w_c . f), (B, num_classes, H/s, W/s)."""
        return F.relu(self.classifier(self.features(x)))

    def cams(
        self,
        x: torch.Tensor,
        size: Sequence[int] | None = None,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
    ) -> torch.Tensor:
        """Non-negative CAMs (B, num_classes, *size), upsampled bilinearly to ``size`` (default: the input's).

        With several ``scales`` (input resize factors) and/or ``flip`` (also the mirrored image), the
        maps of every view are averaged. Gradients flow; wrap in ``torch.no_grad()`` for inference.
        """
        return _multiscale_cams(self.feature_cams, x, size, scales, flip)


class PrototypeCAMClassifier(nn.Module):
    """A trained :class:`CAMClassifier` whose maps come from class prototypes (PBIP), not its weights.

    The map of class c is max over its k prototypes p of ReLU(cos(f(x, y), p)), in [0, 1]. ``forward``
    still returns the classifier's logits. The prototypes are a buffer, so ``state_dict`` holds them
    with the classifier: save it with :func:`common.io.checkpoint.save_checkpoint`, and to load it
    build ``PrototypeCAMClassifier(CAMClassifier(...), num_prototypes=k)`` and call ``load_state_dict``.

    Args:
        classifier: the trained classifier.
        prototypes: (num_classes, k, num_features) from :func:`build_class_prototypes`; ``None`` makes
            zero prototypes to be filled by ``load_state_dict``.
        num_prototypes: k when ``prototypes`` is ``None``.
    """

    def __init__(
        self, classifier: CAMClassifier, prototypes: torch.Tensor | None = None, num_prototypes: int = 3
    ) -> None:
        super().__init__()
        expected = (classifier.num_classes, classifier.num_features)
        if prototypes is None:
            if num_prototypes < 1:
                raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}.")
            prototypes = torch.zeros(expected[0], num_prototypes, expected[1])
        if prototypes.ndim != 3 or prototypes.shape[0] != expected[0] or prototypes.shape[2] != expected[1]:
            raise ValueError(
                f"prototypes must have shape (num_classes={expected[0]}, k, num_features={expected[1]}), "
                f"got {tuple(prototypes.shape)}."
            )
        self.classifier = classifier
        self.register_buffer("prototypes", prototypes.detach().clone().float())

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    @property
    def output_stride(self) -> int:
        return self.classifier.output_stride

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def feature_cams(self, x: torch.Tensor) -> torch.Tensor:
        """Prototype maps at the feature resolution, (B, num_classes, H/s, W/s), in [0, 1]."""
        features = F.normalize(self.features(x), dim=1)
        prototypes = F.normalize(self.prototypes, dim=-1).to(features.dtype)
        similarity = torch.einsum("bfhw,ckf->bckhw", features, prototypes)
        return F.relu(similarity.amax(dim=2))

    def cams(
        self,
        x: torch.Tensor,
        size: Sequence[int] | None = None,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
    ) -> torch.Tensor:
        """Prototype maps (B, num_classes, *size) in [0, 1]; arguments as in :meth:`CAMClassifier.cams`."""
        return _multiscale_cams(self.feature_cams, x, size, scales, flip)


def kmeans(x: torch.Tensor, k: int, num_iters: int = 100, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding on (N, F) points; returns (k, F) centres.

    Deterministic for a given ``seed``. A cluster that loses all its points keeps its previous centre.
    """
    if x.ndim != 2:
        raise ValueError(f"kmeans expects (N, F) points, got shape {tuple(x.shape)}.")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= number of points ({n}), got k={k}.")
    x = x.detach().float()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    centres = x[torch.randint(n, (1,), generator=generator, device=x.device)]
    for _ in range(1, k):
        # k-means++: the next centre is drawn with probability ~ squared distance to the nearest one
        weights = torch.cdist(x, centres).square().amin(dim=1)
        if weights.sum() <= 0:
            weights = torch.ones_like(weights)
        centres = torch.cat([centres, x[torch.multinomial(weights, 1, generator=generator)]])
    assignment = None
    for _ in range(num_iters):
        new_assignment = torch.cdist(x, centres).argmin(dim=1)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        sums = torch.zeros_like(centres).index_add_(0, assignment, x)
        counts = torch.bincount(assignment, minlength=k)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


def _batch_images_labels(batch: Any, image_key: str, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        images, labels = batch[image_key], batch[label_key]
    else:
        images, labels = batch[0], batch[1]
    # MetaTensors carry per-operation metadata that only slows this loop down
    return tuple(torch.as_tensor(t).as_subclass(torch.Tensor) for t in (images, labels))


@torch.no_grad()
def build_class_prototypes(
    model: CAMClassifier,
    batches: Iterable[Any],
    num_prototypes: int = 3,
    cam_threshold: float = 0.5,
    max_vectors_per_class: int = 10000,
    image_key: str = "image",
    label_key: str = "label",
    device: str | torch.device | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Class prototypes after PBIP: k-means centres of each class's confidently activated features.

    For every image whose label contains class c, the feature vectors f(x, y) at positions where c's
    CAM, divided by its maximum over the image, reaches ``cam_threshold`` join c's bank. Each bank is
    L2-normalised and clustered with :func:`kmeans` (the prototype maps compare by cosine similarity,
    so the clusters are formed in the same geometry), and the centres are returned at unit length.

    Args:
        model: trained classifier; it runs in eval mode here and its mode is restored afterwards.
        batches: a DataLoader or any iterable of dict batches (``image_key``: (B, 3, H, W) images,
            ``label_key``: (B, C) 0/1 label vectors) or of (images, labels) pairs.
        num_prototypes: k, the prototypes per class.
        cam_threshold: in (0, 1]; the fraction of an image's CAM maximum a position must reach.
        max_vectors_per_class: at most this many vectors per class are kept, a uniform random sample
            of all that qualified, so memory stays bounded on large banks.
        image_key, label_key: keys of dict batches.
        device: where the images go (default: the device of ``model``); the model must be there.
        seed: seed of the sampling and of k-means, for reproducible prototypes.

    Returns:
        (num_classes, num_prototypes, num_features) float32 prototypes on the CPU.

    Raises:
        ValueError: an argument is out of range or label vectors do not have ``num_classes`` entries.
        InputDataError: a class has fewer than ``num_prototypes`` qualifying vectors, e.g. because it
            never occurs in the labels; the message names the class index.
    """
    if num_prototypes < 1:
        raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}.")
    if not 0.0 < cam_threshold <= 1.0:
        raise ValueError(f"cam_threshold must be in (0, 1], got {cam_threshold}.")
    if max_vectors_per_class < num_prototypes:
        raise ValueError(
            f"max_vectors_per_class ({max_vectors_per_class}) must be >= num_prototypes ({num_prototypes})."
        )
    num_classes = model.num_classes
    device = torch.device(device) if device is not None else next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    banks: list[torch.Tensor] = [torch.empty(0, model.num_features) for _ in range(num_classes)]
    keys: list[torch.Tensor] = [torch.empty(0) for _ in range(num_classes)]
    images_with_class = torch.zeros(num_classes, dtype=torch.long)

    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            images, labels = _batch_images_labels(batch, image_key, label_key)
            if labels.ndim != 2 or labels.shape[1] != num_classes:
                raise ValueError(
                    f"label vectors must have shape (B, {num_classes}), got {tuple(labels.shape)}."
                )
            present = (labels > 0.5).cpu()
            images_with_class += present.sum(dim=0)
            features = model.features(images.to(device=device, dtype=torch.float32))
            cams = F.relu(model.classifier(features))
            peak = cams.amax(dim=(2, 3), keepdim=True)
            confident = (cams >= cam_threshold * peak) & (peak > 0)
            features, confident = features.permute(0, 2, 3, 1).float().cpu(), confident.cpu()
            for c in range(num_classes):
                mask = confident[:, c] & present[:, c, None, None]
                vectors = features[mask]
                if not len(vectors):
                    continue
                # bottom-k of uniform random keys = a uniform sample without replacement of the whole stream
                banks[c] = torch.cat([banks[c], vectors])
                keys[c] = torch.cat([keys[c], torch.rand(len(vectors), generator=generator)])
                if len(keys[c]) > max_vectors_per_class:
                    keep = keys[c].topk(max_vectors_per_class, largest=False).indices
                    banks[c], keys[c] = banks[c][keep], keys[c][keep]
    finally:
        model.train(was_training)

    prototypes = []
    for c, bank in enumerate(banks):
        if len(bank) < num_prototypes:
            reason = (
                "never occurs in the label vectors"
                if images_with_class[c] == 0
                else f"occurs in {int(images_with_class[c])} images but only {len(bank)} feature vectors "
                f"reach cam_threshold={cam_threshold}"
            )
            raise InputDataError(
                None,
                f"cannot build {num_prototypes} prototypes for class {c}: it {reason}. Check the labels, or "
                "lower cam_threshold or num_prototypes.",
            )
        centres = kmeans(F.normalize(bank, dim=1), num_prototypes, seed=seed + c)
        prototypes.append(F.normalize(centres, dim=1))
    return torch.stack(prototypes)
