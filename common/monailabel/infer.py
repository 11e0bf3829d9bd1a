"""MONAI Label inference tasks that run a bundle's own inference workflow on one image.

Image bundles (cells, dermoscopy, cytology) run the bundle's ``evaluator`` from ``inference.json`` on a
one-image datalist, with their own writers pointed at a scratch folder; the task returns the label
image MONAI Label sends to the viewer and, as JSON, what the writers wrote beside it (the per-cell
table, the detections). Weights are read from disk on every call (the bundle's ``ModelWeightsLoader``
runs when the evaluator starts), so a model trained by ``/train`` is served at once, without a restart.
The histopathology bundle answers a region of a whole slide (MONAI Label's ``location``/``size`` in
level-0 pixels) with its class map, or, without a region, segments the whole slide with
:class:`common.inferers.wsi.WholeSlideSegmenter` (the long task behind ``/batch/infer``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.utils import convert_to_numpy
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from common.data.cell_readers import image_size
from common.data.wsi import open_slide
from common.errors import InputDataError
from common.monailabel.bundles import BundleEntry, bundle_parser, label_names
from common.monailabel.regions import read_slide_region, tile_boxes
from common.utils import as_plane, nan_to_none
from common.writers.display import write_png

__all__ = ["BundleInferTask", "ImageInferTask", "ModelNotTrainedError", "SlideInferTask", "create_infer_task"]

_INFER_TYPES = {
    "instances": InferType.SEGMENTATION,
    "mask": InferType.SEGMENTATION,
    "detections": InferType.DETECTION,
    "slide": InferType.SEGMENTATION,
}


class ModelNotTrainedError(RuntimeError):
    """Inference was asked of a bundle whose weights are not there yet (the server answers 409)."""


class BundleInferTask(InferTask):
    """What every served bundle shares: label names from its metadata, weights in ``models_dir``, and a
    description that says whether it is trained yet.

    Args:
        entry: the bundle's entry in :data:`common.monailabel.bundles.BUNDLES`.
        bundle_dir: the bundle folder.
        models_dir: folder of its weights.
        overrides: config ids replaced in every run (e.g. a smaller network).
    """

    def __init__(
        self,
        entry: BundleEntry,
        bundle_dir: str | os.PathLike,
        models_dir: str | os.PathLike,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.entry = entry
        self.bundle_dir = Path(bundle_dir)
        self.models_dir = Path(models_dir)
        self.overrides = dict(overrides or {})
        super().__init__(
            type=_INFER_TYPES[entry.kind],
            labels=label_names(self.bundle_dir, entry.output),
            dimension=2,
            description=entry.name,
            config={"kind": entry.kind},
        )

    @property
    def description(self) -> str:
        """Read on every ``/info``: a bundle without weights says so, and stops saying it once trained."""
        if self.is_trained():
            return f"{self.entry.name} ({self.entry.kind})"
        return f"{self.entry.name} ({self.entry.kind}): untrained, no {', '.join(self.missing_weights())} yet"

    @description.setter
    def description(self, value: str) -> None:
        """Ignored: the description follows the weights on disk (see the getter)."""

    def missing_weights(self) -> list[str]:
        return [name for name in self.entry.weights if not (self.models_dir / name).is_file()]

    def is_trained(self) -> bool:
        return not self.missing_weights()

    def info(self) -> dict[str, Any]:
        return {**super().info(), "trained": self.is_trained()}

    def is_valid(self) -> bool:
        """Always listed, trained or not, so that a cold-started bundle shows up and can be trained."""
        return True

    def parser(self, extra: Mapping[str, Any] | None = None) -> ConfigParser:
        """The bundle's inference config with its MONAI Label layer, this app's overrides and ``extra``."""
        layer = self.entry.layer("infer")
        return bundle_parser(self.bundle_dir, layer, self.models_dir, {**self.overrides, **(extra or {})})

    def require_weights(self) -> None:
        if not self.is_trained():
            raise ModelNotTrainedError(
                f"model {self.entry.name!r} is untrained: {', '.join(self.missing_weights())} not in {self.models_dir}; "
                f"save labels to the datastore and POST /train/{self.entry.name} first"
            )

    def __call__(self, request: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
        self.require_weights()
        image = request.get("image")
        if not isinstance(image, str) or not os.path.isfile(image):
            raise InputDataError(image if isinstance(image, str) else None, "image file not found")
        label, params = self.predict(image, request)
        if label is None:
            return None, params
        handle, path = tempfile.mkstemp(suffix=".png", prefix=f"{self.entry.name}_")
        os.close(handle)  # MONAI Label sends the file, then deletes it
        write_png(label, path)
        return path, params

    @abstractmethod
    def predict(self, image: str, request: Mapping[str, Any]) -> tuple[np.ndarray | None, dict[str, Any]]:
        """The (H, W) label image and the JSON for ``image``; ``None`` as label when there is none."""


class ImageInferTask(BundleInferTask):
    """Runs the bundle's ``evaluator`` on one image and turns its output into the viewer's label:

    - ``instances``: the instance map (uint16, 0 background) and the per-cell CSV as ``cells`` rows;
    - ``mask``: the (H, W) uint8 mask or label map (values as in the metadata's label names);
    - ``detections``: each detection drawn as a filled ``box_size`` square of value class index + 1
      (uint8), and ``detections`` as JSON: centre, box (x0, y0, x1, y1), class name and score.

    ``monailabel_infer.json`` points ``datalist`` at ``@monailabel_image`` and names the output key in
    ``monailabel_label_key``; where a writer saves a JSON file of the prediction (the angiography
    segments: name, score, box, RLE), ``monailabel_json_key`` names the output key of its path and the
    file's content is returned with the label.
    """

    def run_evaluator(self, image: str, output_dir: str) -> tuple[dict[str, Any], Any]:
        parser = self.parser({"monailabel_image": image, "output_dir": output_dir})
        parser.get_parsed_content("initialize")
        evaluator = parser.get_parsed_content("evaluator")
        evaluator.run()
        parser.get_parsed_content("finalize")
        output = evaluator.state.output
        return (output[0] if isinstance(output, Sequence) else output), parser

    def predict(self, image: str, request: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        with tempfile.TemporaryDirectory(prefix="monailabel_") as scratch:
            output, parser = self.run_evaluator(image, scratch)
            key = parser.get_parsed_content("monailabel_label_key")
            if self.entry.kind == "detections":
                return self._detections(output, parser, image_size(image))
            label = as_plane(convert_to_numpy(output[key]), key)
            if self.entry.kind == "instances":
                if label.max(initial=0) > np.iinfo(np.uint16).max:
                    raise ValueError(f"{image}: more than 65535 cells do not fit a 16-bit label image")
                return label.astype(np.uint16), {"cells": _read_tables(scratch)}
            return label.astype(np.uint8), _written_json(output, parser)

    def _detections(
        self, output: Mapping[str, Any], parser: ConfigParser, size: tuple[int, int]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        class_names = list(parser.get_parsed_content("class_names"))
        half = float(parser.get_parsed_content("box_size")) / 2
        points = convert_to_numpy(output["points"]).reshape(-1, 2)
        scores = convert_to_numpy(output["conf"]).reshape(-1)
        classes = convert_to_numpy(output["classes"]).reshape(-1).astype(np.int64)
        label = np.zeros(size, dtype=np.uint8)  # the image's size, not the network's padded input
        detections = []
        inside = (points[:, 0] < size[1]) & (points[:, 1] < size[0])  # not in the network's padding
        points, scores, classes = points[inside], scores[inside], classes[inside]
        for (x, y), score, cls in sorted(zip(points, scores, classes), key=lambda item: item[1]):
            x0, y0, x1, y1 = (float(v) for v in (x - half, y - half, x + half, y + half))
            rows = slice(max(round(y0), 0), max(round(y1), 0))
            cols = slice(max(round(x0), 0), max(round(x1), 0))
            label[rows, cols] = cls + 1  # higher scores drawn last, so they stay on top
            detections.append(
                {
                    "x": float(x),
                    "y": float(y),
                    "box": [x0, y0, x1, y1],
                    "class": class_names[cls],
                    "score": float(score),
                }
            )
        detections.reverse()
        return label, {"detections": nan_to_none(detections), "class_names": class_names}


def _written_json(output: Mapping[str, Any], parser: ConfigParser) -> dict[str, Any]:
    """The JSON file whose path the bundle's writer put under ``monailabel_json_key``, if the layer names one."""
    if "monailabel_json_key" not in parser:
        return {}
    return json.loads(Path(output[parser.get_parsed_content("monailabel_json_key")]).read_text())


def _read_tables(folder: str) -> list[dict[str, str]]:
    """Rows of the CSV files a bundle's writers left in ``folder`` (the per-cell table)."""
    rows: list[dict[str, str]] = []
    for path in sorted(Path(folder).rglob("*.csv")):
        rows += list(csv.DictReader(io.StringIO(path.read_text())))
    return rows


class SlideInferTask(BundleInferTask):
    """The class map of a region of a whole slide, or the whole slide.

    A request to ``/infer/<model>`` with ``params`` ``location`` ``[x, y]`` and ``size`` ``[width, height]``
    in level-0 pixels (as MONAI Label's ``/infer/wsi`` takes them) reads that region with
    :func:`common.data.wsi.open_slide` at the level matching the bundle's ``mpp``, runs the layer's
    ``monailabel_region_inferer`` and returns the (height, width) uint8 class map at level-0 resolution
    (values as in the bundle's masks: class index, ``C`` background). Without a region the bundle's
    ``segmenter`` writes the whole slide's outputs under ``output_dir`` and its summary is returned.
    :meth:`predict_tiles` answers QuPath's tiled ``/infer/wsi`` (see :mod:`common.monailabel.wsi`).
    """

    def __init__(self, *args: Any, output_dir: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.output_dir = Path(output_dir)

    def _slide_parser(self) -> ConfigParser:
        parser = self.parser({"output_dir": str(self.output_dir), "num_workers": 0})
        parser.get_parsed_content("initialize")
        return parser

    def predict(self, image: str, request: Mapping[str, Any]) -> tuple[np.ndarray | None, dict[str, Any]]:
        parser = self._slide_parser()
        if "location" not in request and "size" not in request:
            summary = parser.get_parsed_content("segmenter")(image)
            return None, nan_to_none(summary)
        return self._region(image, request, parser), {
            "location": list(request["location"]),
            "size": list(request["size"]),
        }

    def predict_tiles(
        self, image: str, location: Sequence[int], size: Sequence[int], tile_size: Sequence[int]
    ) -> Iterator[tuple[tuple[int, int, int, int], np.ndarray]]:
        """``(x, y, width, height)`` and class map of each ``tile_size`` tile of a region in level-0
        pixels, with one network for every tile."""
        self.require_weights()
        parser = self._slide_parser()
        for x, y, width, height in tile_boxes(location, size, tile_size):
            yield (
                (x, y, width, height),
                self._region(image, {"location": [x, y], "size": [width, height]}, parser),
            )

    def slide_size(self, image: str) -> tuple[int, int]:
        """``(width, height)`` of the slide at level 0."""
        with open_slide(image, self.parser().get_parsed_content("backend")) as slide:
            height, width = slide.info.level_dimensions[0]
        return width, height

    def _region(self, image: str, request: Mapping[str, Any], parser: ConfigParser) -> np.ndarray:
        (_, _, width, height), pixels = read_slide_region(
            image,
            request.get("location"),
            request.get("size"),
            parser.get_parsed_content("mpp"),
            parser.get_parsed_content("backend"),
        )
        network = parser.get_parsed_content("network")
        device = parser.get_parsed_content("device")
        batch = parser.get_parsed_content("preprocess")(torch.from_numpy(pixels).float())[None].to(device)
        with torch.inference_mode():
            network.eval()
            logits = parser.get_parsed_content("monailabel_region_inferer")(batch, network)
        classes = logits.argmax(dim=1, keepdim=True).float()
        classes = F.interpolate(classes, size=(height, width), mode="nearest")
        return classes[0, 0].to(torch.uint8).cpu().numpy()


def create_infer_task(
    entry: BundleEntry,
    bundle_dir: str | os.PathLike,
    models_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
) -> BundleInferTask:
    """The inference task for ``entry``'s kind."""
    if entry.kind == "slide":
        return SlideInferTask(entry, bundle_dir, models_dir, overrides, output_dir=output_dir)
    return ImageInferTask(entry, bundle_dir, models_dir, overrides)
