"""Fixtures of the MONAI Label tests: a datastore of one small synthetic image per bundle, tiny network
overrides, and weights written into a models folder under tmp_path (never into bundles/*/models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.cytology import BETHESDA_CLASSES
from common.data.synthetic.angiography import cass_labels, synthesize_angiogram
from common.data.synthetic.cells import synthesize_cell_image
from common.data.synthetic.dermoscopy import synthesize_dermoscopy_image
from common.data.synthetic.histology import write_synthetic_slide
from common.data.synthetic.smears import synthesize_smear
from common.io.checkpoint import save_checkpoint
from common.monailabel.bundles import BUNDLES, bundle_parser
from tests.helpers import REPO_ROOT

SIZE = 64
SMEAR_SIZE = 120  # not a multiple of the detector's 32: the label keeps the image's size
SLIDE_SIZE = (512, 640)
ANGIOGRAM_SIZE = 72  # not the networks' 64: the label keeps the image's size
TINY_VIT = {"network_def#depth": 4, "network_def#embed_dim": 32, "network_def#num_heads": 2}
TINY_ROPE_VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2}
TINY_VESSELS = {**TINY_ROPE_VIT, "decoder_channels": [16, 8, 8, 8, 8]}
OVERRIDES = {
    "microscopy_dinocell_segmentation": {**TINY_VIT, "patch_size": [32, 32], "batch_size": 2, "amp": False},
    "dermoscopy_lesion_maskrcnn": {
        "vit": "vit_tiny_patch16_224",
        "inference_size": SIZE,
        "working_size": SIZE,
        "max_size": 2 * SIZE,
        "train_sizes": [SIZE],
        "batch_size": 1,
        "amp": False,
    },
    "cytology_bethesda_detection": {
        "detector_backbone": "resnet18",
        "classifier_backbone": "resnet18",
        "patch_size": [128, 128],
        "classifier_input_size": 32,
        "conf": 0.0,
        "min_distance": 8,
        "top_k": 5,
        "amp": False,
    },
    "pathology_wsss_deeplab": {"backbone": "resnet10t", "patch_size": 64, "batch_size": 4, "amp": False},
    "angiography_cass_segmentation": {
        "img_size": 64,
        "network_def#out_channels": 32,
        "score_threshold": 0.0,
        "amp": False,
        **{f"backbone_kwargs#{k}": v for k, v in TINY_ROPE_VIT.items()},
    },
    "angiography_cass_segmentation_vessels": {  # one set for inference_vessels.json and train_vessels.json
        "img_size": 64,
        "batch_size": 1,
        "amp": False,
        **{f"{prefix}network_def#{k}": v for prefix in ("", "vessels#") for k, v in TINY_VESSELS.items()},
    },
}
IMAGES = {
    "microscopy_dinocell_segmentation": "cells.png",
    "dermoscopy_lesion_maskrcnn": "lesion.png",
    "cytology_bethesda_detection": "smear.png",
    "pathology_wsss_deeplab": "slide.tif",
    "angiography_cass_segmentation": "angiogram.png",
    "angiography_cass_segmentation_vessels": "coronary.png",  # its own image: one final label per image
}


def write_studies(folder: Path) -> dict[str, np.ndarray]:
    """One image per model in ``folder``; returns the cell image's instance labels, the lesion mask, and the
    CASS label map and vessel mask of the angiograms."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    cells, cell_labels = synthesize_cell_image(rng, (SIZE, SIZE))
    Image.fromarray(cells).save(folder / IMAGES["microscopy_dinocell_segmentation"])
    lesion, lesion_mask = synthesize_dermoscopy_image(rng, SIZE, 1)
    Image.fromarray(lesion).save(folder / IMAGES["dermoscopy_lesion_maskrcnn"])
    smear, _ = synthesize_smear(rng, list(BETHESDA_CLASSES[:2]), size=SMEAR_SIZE)
    Image.fromarray(smear).save(folder / IMAGES["cytology_bethesda_detection"])
    write_synthetic_slide(folder / IMAGES["pathology_wsss_deeplab"], size=SLIDE_SIZE, tile=128, workers=1)
    truth = {"cells": cell_labels, "lesion": lesion_mask}
    for name, key, view in (
        ("angiography_cass_segmentation", "cass", "left"),
        ("angiography_cass_segmentation_vessels", "vessels", "right"),
    ):
        frames, branches = synthesize_angiogram(rng, ANGIOGRAM_SIZE, view)
        Image.fromarray(np.round(frames[0] * 255).astype(np.uint8)).save(folder / IMAGES[name])
        truth[key] = (
            cass_labels(branches).astype(np.uint8) if key == "cass" else (branches > 0).astype(np.uint8)
        )
    return truth


def write_untrained_weights(models_dir: Path, name: str) -> None:
    """Randomly initialised weights of the tiny network, where the app looks for the model's weights."""
    entry = BUNDLES[name]
    folder = models_dir / entry.folder
    parser = bundle_parser(
        REPO_ROOT / "bundles" / entry.folder, entry.layer("infer"), folder, OVERRIDES[name]
    )
    folder.mkdir(parents=True, exist_ok=True)
    networks = {"model.pt": "network"}
    if name == "cytology_bethesda_detection":
        networks = {"detector.pt": "network", "classifier.pt": "classifier"}
    for file, network in networks.items():
        save_checkpoint(parser.get_parsed_content(network).state_dict(), folder / file)


@pytest.fixture(scope="module")
def overrides_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("conf") / "overrides.json"
    path.write_text(json.dumps(OVERRIDES))
    return path
