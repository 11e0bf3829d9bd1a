"""Whole-slide inference, the long task of the histopathology bundle, called as MONAI Label calls it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tifffile

from common.data.synthetic.histology import write_synthetic_slide
from common.monailabel.bundles import BUNDLES, REPO_ROOT
from common.monailabel.infer import create_infer_task
from tests.common.monailabel.conftest import OVERRIDES, SLIDE_SIZE, write_untrained_weights

NAME = "pathology_wsss_deeplab"


@pytest.mark.slow
def test_whole_slide_without_a_region_writes_the_class_map_and_areas(tmp_path: Path, one_thread):
    slide = tmp_path / "slide.tif"
    write_synthetic_slide(slide, size=SLIDE_SIZE, tile=128, workers=1)
    write_untrained_weights(tmp_path / "models", NAME)
    task = create_infer_task(
        BUNDLES[NAME], REPO_ROOT / "bundles" / NAME, tmp_path / "models" / NAME, tmp_path / "out", OVERRIDES[NAME]
    )
    label, summary = task({"model": NAME, "image": str(slide)})
    assert label is None  # no label image for a whole slide: its outputs are files
    assert json.loads(Path(summary["outputs"]["areas"]).read_text())["level"] == summary["level"] == 1
    with tifffile.TiffFile(summary["outputs"]["classes"]) as tif:
        assert tif.pages[0].shape == (SLIDE_SIZE[0] // 2, SLIDE_SIZE[1] // 2)
