"""HTTP statuses of the server's errors, which datastore images belong to which bundle, and the
training-target transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from PIL import Image

from common.data.synthetic.cells import voronoi_labels
from common.errors import InputDataError
from common.monailabel.datastore import owned_images
from common.monailabel.infer import ModelNotTrainedError
from common.monailabel.server import error_status
from common.monailabel.train import rename_label
from common.monailabel.transforms import LoadInstanceDistanceMapd


def test_error_status():
    try:
        try:
            raise InputDataError("a.png", "image is empty (all pixels equal)")
        except InputDataError as err:
            raise RuntimeError("applying transform LoadCellImaged") from err
    except RuntimeError as wrapped:
        assert error_status(wrapped) == (422, "a.png: image is empty (all pixels equal)")
    assert error_status(ModelNotTrainedError("untrained"))[0] == 409
    assert error_status(MONAILabelException(MONAILabelError.INVALID_INPUT, "no model 'x'")) == (400, "no model 'x'")
    assert error_status(MONAILabelException(MONAILabelError.APP_ERROR, "boom")) == (500, "boom")
    assert error_status(KeyError("k")) == (500, "KeyError: 'k'")


class _Store:
    """The two look-ups of MONAI Label's datastore that ownership needs."""

    def __init__(self, image_models: dict, label_models: dict) -> None:
        self.image_models, self.label_models = image_models, label_models

    def get_label_info(self, image_id: str, tag: str) -> dict:
        return {"model": self.label_models[image_id]} if image_id in self.label_models else {}

    def get_image_info(self, image_id: str) -> dict:
        return {"model": self.image_models[image_id]} if image_id in self.image_models else {}


def test_images_belong_to_the_bundle_they_name_and_unmarked_ones_only_to_a_lone_bundle():
    store = _Store(image_models={"a": "cells", "b": "skin"}, label_models={"b": "cells", "c": "skin"})
    ids = ["a", "b", "c", "d"]
    assert owned_images(store, ids, "cells", owns_unmarked=False) == ["a", "b"]  # b's label overrides its image
    assert owned_images(store, ids, "cells", owns_unmarked=True) == ["a", "b", "d"]
    assert owned_images(store, ids, "skin", owns_unmarked=False) == ["c"]


def test_rename_label():
    assert rename_label([{"image": "i.png", "label": "m.png"}], "mask") == [{"image": "i.png", "mask": "m.png"}]


def test_saved_instance_label_becomes_a_distance_map(tmp_path):
    labels = voronoi_labels((48, 40), n_cells=6, seed=1)
    path = tmp_path / "label.png"
    Image.fromarray(labels.astype(np.uint16)).save(path)
    target = LoadInstanceDistanceMapd("label")({"label": str(path)})["label"]
    assert target.shape == (1, 48, 40) and target.dtype == torch.float32
    assert float(target[0][labels == 0].abs().max()) == 0.0
    for cell in np.unique(labels[labels > 0]):
        assert float(target[0][labels == cell].max()) == pytest.approx(1.0)
