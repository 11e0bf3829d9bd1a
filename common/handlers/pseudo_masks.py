"""Writing a pseudo-mask dataset from an evaluator run over the training patches.

A MONAI ``SupervisedEvaluator`` with :class:`common.inferers.cam.CAMInferer` produces class activation maps as ``pred``;
its postprocessing (:class:`common.postprocessing.pseudo_masks.CAMToPseudoMaskd`) turns them into a
pseudo-mask and a confidence map; :class:`PseudoMaskWriter` writes both per image and, once every
image is done, a manifest that stage 2 trains from. The configs then say the whole step, and a
multi-GPU run needs no code of its own. :class:`ClassPrototypeBuilder` ends a classifier's training
by building the class prototypes of the PBIP-style variant, so that variant is one config switch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.utils import convert_to_numpy
from PIL import Image

from common.data.histopathology import IGNORE_INDEX, write_mask
from common.errors import InputDataError
from common.handlers.samples import EpochAccumulator, iteration_samples, sample_name
from common.io.atomic import atomic_write
from common.io.checkpoint import extract_state_dict, load_checkpoint, save_checkpoint
from common.networks.cam_classifier import CAMClassifier, PrototypeCAMClassifier, build_class_prototypes
from common.utils import as_plane, source_file, unwrap_module

__all__ = ["ClassPrototypeBuilder", "PseudoMaskWriter", "assign_split"]

_ORIGIN_KEYS = ("origin", "location")  # ours, then MONAI's WSIReader patch metadata


class ClassPrototypeBuilder:
    """When training ends, build PBIP class prototypes from the classifier and save the prototype model.

    Attach to the trainer of a :class:`~common.networks.cam_classifier.CAMClassifier`. At ``COMPLETED``
    a copy of the classifier (the trained network is left as it is, so checkpoints saved after this
    handler are unaffected) takes the weights of ``weights_file`` when given, usually the best
    validation weights, :func:`~common.networks.cam_classifier.build_class_prototypes` runs over
    ``data_loader``, and the ``state_dict`` of the resulting
    :class:`~common.networks.cam_classifier.PrototypeCAMClassifier` is written atomically to
    ``output_file``. Under DDP only rank 0 builds and writes.

    Args:
        network: the trained classifier, possibly wrapped in ``DistributedDataParallel``.
        data_loader: un-augmented, normalised training images with their label vectors (dict batches).
        output_file: where the prototype model's weights go.
        weights_file: classifier weights to build from; ``None`` uses the network as trained.
        num_prototypes, cam_threshold, max_vectors_per_class, seed, image_key, label_key: see
            :func:`~common.networks.cam_classifier.build_class_prototypes`.
        enabled: ``False`` attaches nothing, so a config can switch the variant with one flag.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        data_loader: Any,
        output_file: str | os.PathLike,
        weights_file: str | os.PathLike | None = None,
        num_prototypes: int = 3,
        cam_threshold: float = 0.5,
        max_vectors_per_class: int = 10000,
        seed: int = 0,
        image_key: str = "image",
        label_key: str = "label",
        enabled: bool = True,
    ) -> None:
        if not isinstance(unwrap_module(network), CAMClassifier):
            raise TypeError(f"ClassPrototypeBuilder needs a CAMClassifier, got {type(network).__name__}")
        if num_prototypes < 1:
            raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}")
        self.network, self.data_loader = network, data_loader
        self.output_file = Path(output_file)
        self.weights_file = None if weights_file is None else Path(weights_file)
        self.options = {
            "num_prototypes": num_prototypes,
            "cam_threshold": cam_threshold,
            "max_vectors_per_class": max_vectors_per_class,
            "image_key": image_key,
            "label_key": label_key,
            "seed": seed,
        }
        self.enabled = enabled
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> Path | None:
        """Build and save the prototype model; returns ``output_file`` (``None`` on ranks other than 0)."""
        if idist.get_rank() != 0:
            return None
        classifier = copy.deepcopy(unwrap_module(self.network))
        if self.weights_file is not None:
            classifier.load_state_dict(extract_state_dict(load_checkpoint(self.weights_file)))
        prototypes = build_class_prototypes(classifier, self.data_loader, **self.options)
        model = PrototypeCAMClassifier(classifier, prototypes)
        save_checkpoint(model.state_dict(), self.output_file)
        self.logger.info(
            "%d prototypes per class from %s saved to %s",
            self.options["num_prototypes"], self.weights_file or "the trained network", self.output_file,
        )
        return self.output_file


def assign_split(name: str, val_fraction: float, seed: int = 0) -> str:
    """``"val"`` for about ``val_fraction`` of all names, else ``"train"``: a hash of seed and name, so
    an image keeps its split across runs, machines and dataset orders (Python's ``hash`` is salted)."""
    if not 0 <= val_fraction <= 1:
        raise ValueError(f"val_fraction must lie in 0..1, got {val_fraction}")
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


class PseudoMaskWriter(EpochAccumulator):
    """Write each image's pseudo-mask and confidence as PNGs, then a manifest of them all.

    For every sample of every iteration: ``<output_dir>/masks/<stem>.png`` (palette PNG by
    :func:`common.data.histopathology.write_mask`: labels ``0..C`` and 255 for uncertain pixels) and
    ``<output_dir>/confidence/<stem>.png`` (8-bit, confidence x 255), where ``<stem>`` is the image's
    file name without its suffix (so ``name-[1 0 0 1].png`` keeps its label in the mask's name). Each
    file is written atomically as soon as its image is done, so a crash keeps the finished ones.

    At the end of the epoch ``<output_dir>/<manifest_file>`` is written atomically with one JSON line per
    image, sorted by name: ``image`` (absolute path), ``mask`` and ``confidence`` (relative to
    ``output_dir``), ``label`` (the image-level vector), ``classes`` (labels found in the mask, background
    included, 255 not), ``origin`` ([y, x] of a tile in its slide from the ``origin`` or
    ``location`` metadata, [0, 0] for a patch), ``level`` and ``mpp`` (from the metadata, else
    ``null``) and ``split`` (:func:`assign_split`); :func:`common.data.histopathology.read_patch_manifest`
    reads it back. A manifest left by an earlier run is removed when the epoch starts, so a manifest on
    disk always describes a complete run.

    Under DDP every rank writes the masks of its own images, and rank 0 writes the manifest of all of
    them; an image met twice (``DistributedSampler`` pads the ranks) is listed once.

    Args:
        output_dir: folder of the pseudo-mask dataset.
        num_classes: number of tissue classes C; the background is C.
        mask_key, confidence_key: keys of the (1, H, W) mask and confidence maps in the engine output.
        label_key: key of the (C,) image-level label (output or batch).
        image_key: key of the image ``MetaTensor`` whose ``filename_or_obj`` locates the image and
            whose metadata may hold ``origin``/``location``, ``level`` and ``mpp``.
        name_key: key of the image's file name when the image carries no metadata.
        val_fraction, seed: see :func:`assign_split`.
        manifest_file: manifest name inside ``output_dir``.
        logger_name: logger receiving the summary.

    Raises:
        InputDataError: two different images share a file stem (their masks would overwrite each other).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        num_classes: int,
        mask_key: str = "pseudo_mask",
        confidence_key: str = "pseudo_confidence",
        label_key: str = "label",
        image_key: str = "image",
        name_key: str = "name",
        val_fraction: float = 0.1,
        seed: int = 0,
        manifest_file: str = "manifest.jsonl",
        logger_name: str = __name__,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        assign_split("", val_fraction)  # validates the fraction
        self.output_dir = Path(output_dir)
        self.num_classes = num_classes
        self.mask_key, self.confidence_key, self.label_key = mask_key, confidence_key, label_key
        self.image_key, self.name_key = image_key, name_key
        self.val_fraction, self.seed = val_fraction, seed
        self.manifest_file = manifest_file
        self.logger = logging.getLogger(logger_name)
        self._entries: dict[str, dict[str, Any]] = {}

    @property
    def manifest_path(self) -> Path:
        return self.output_dir / self.manifest_file

    def reset(self, engine: Engine | None = None) -> None:
        self._entries = {}
        if idist.get_rank() == 0:
            self.manifest_path.unlink(missing_ok=True)

    def update(self, engine: Engine) -> None:
        """Write the mask and confidence of every sample of the iteration."""
        for sample in iteration_samples(engine):
            for key in (self.mask_key, self.confidence_key, self.label_key):
                if key not in sample:
                    raise KeyError(
                        f"PseudoMaskWriter: no {key!r} in the engine output or batch; found {sorted(sample)}"
                    )
            name = sample_name(sample, self.name_key, self.image_key)
            if name is None:
                raise KeyError(
                    f"PseudoMaskWriter: a sample has no file name: load the images with their metadata "
                    f"({self.image_key!r}) or give the name under {self.name_key!r}"
                )
            image = os.path.abspath(source_file(sample.get(self.image_key)) or name)
            stem = Path(name).stem
            if stem in self._entries:
                _check_same_image(self._entries[stem], image)
                continue
            self._entries[stem] = self._write(stem, image, sample)

    def _write(self, stem: str, image: str, sample: Mapping[str, Any]) -> dict[str, Any]:
        mask = as_plane(sample[self.mask_key], repr(self.mask_key))
        confidence = as_plane(sample[self.confidence_key], repr(self.confidence_key)).astype(np.float64)
        if confidence.shape != mask.shape:
            raise ValueError(f"{image}: confidence is {confidence.shape} but the mask is {mask.shape}")
        label = np.asarray(_plain(sample[self.label_key])).reshape(-1)
        if label.size != self.num_classes:
            raise ValueError(f"{image}: label has {label.size} entries, expected {self.num_classes}")

        mask_path, confidence_path = f"masks/{stem}.png", f"confidence/{stem}.png"
        try:
            write_mask(self.output_dir / mask_path, mask, num_classes=self.num_classes)
        except ValueError as err:
            raise ValueError(f"{image}: pseudo-mask {self.mask_key!r}: {err}") from err
        levels = np.round(np.clip(confidence, 0, 1) * 255).astype(np.uint8)
        atomic_write(self.output_dir / confidence_path, lambda f: Image.fromarray(levels).save(f, "PNG"))
        origins = (_meta(sample, key, self.image_key) for key in _ORIGIN_KEYS)
        origin = next((value for value in origins if value is not None), [0, 0])
        return {
            "image": image,
            "mask": mask_path,
            "confidence": confidence_path,
            "label": [int(v) for v in label],
            "classes": [int(c) for c in np.unique(mask) if c != IGNORE_INDEX],
            "origin": [int(v) for v in np.asarray(origin).reshape(-1)],
            "level": _meta(sample, "level", self.image_key),
            "mpp": _meta(sample, "mpp", self.image_key),
            "split": assign_split(stem, self.val_fraction, self.seed),
        }

    def complete(self, engine: Engine) -> None:
        """Gather every rank's entries and write the manifest on rank 0."""
        entries: dict[str, dict[str, Any]] = {}
        for rank_entries in idist.all_gather(list(self._entries.values())):
            for entry in rank_entries:
                stem = Path(entry["mask"]).stem
                if stem in entries:
                    _check_same_image(entries[stem], entry["image"])
                else:
                    entries[stem] = entry
        if not entries:
            raise RuntimeError("PseudoMaskWriter saw no images during the epoch; nothing to write")
        ordered = [entries[stem] for stem in sorted(entries)]
        if idist.get_rank() == 0:
            text = "".join(json.dumps(entry) + "\n" for entry in ordered)
            atomic_write(self.manifest_path, lambda f: f.write(text.encode("utf-8")))
        n_val = sum(entry["split"] == "val" for entry in ordered)
        self.logger.info(
            "pseudo-masks of %d images (%d train, %d val) in %s",
            len(ordered), len(ordered) - n_val, n_val, self.output_dir,
        )


def _check_same_image(entry: Mapping[str, Any], image: str) -> None:
    if entry["image"] != image:
        raise InputDataError(
            image,
            f"has the same name as {entry['image']}; pseudo-masks are named after the image file, so "
            f"both would be written to {entry['mask']}: rename one of them",
        )





def _plain(value: Any) -> Any:
    """A JSON-ready copy of a tensor, array or number (metadata values come collated as tensors)."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return convert_to_numpy(value).tolist()
    return value


def _meta(sample: Mapping[str, Any], key: str, image_key: str) -> Any:
    """``key`` from the sample itself, else from the image's metadata, else ``None``."""
    value = sample.get(key)
    image = sample.get(image_key)
    if value is None and isinstance(image, MetaTensor):
        value = image.meta.get(key)
    return _plain(value)
