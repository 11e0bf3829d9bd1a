from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from common.bundle.score_cells import read_samples, score_samples, write_scores
from common.data.synthetic.cells import generate_cell_dataset, synthesize_cell_image
from common.errors import InputDataError

SIZE = (64, 80)
CELL_LINES = ("A172", "BV2")


def livecell_test_split(root: Path) -> tuple[Path, Path]:
    """Two images per cell line, named as LIVECell names them, with a COCO file of RLE masks."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    for index, line in enumerate(CELL_LINES * 2):
        image, labels = synthesize_cell_image(np.random.default_rng(index), SIZE, "phase")
        file_name = f"{line}_Phase_C7_1_00d0{index}h00m_1.png"
        Image.fromarray(image).save(image_dir / file_name)
        images.append({"id": index, "file_name": file_name, "height": SIZE[0], "width": SIZE[1]})
        for cell in range(1, labels.max() + 1):
            rle = mask_utils.encode(np.asfortranarray(labels == cell, dtype=np.uint8))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(
                {"id": len(annotations) + 1, "image_id": index, "segmentation": rle, "category_id": 1}
            )
    annotation_file = root / "livecell_coco_test.json"
    annotation_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1}]})
    )
    return annotation_file, image_dir


def oracle_except(line: str):
    """Predicts the reference exactly, except on one cell line where it finds nothing."""

    def predict(sample):
        labels = sample.read_labels()
        return np.zeros_like(labels) if sample.name.startswith(line) else labels

    return predict


def test_livecell_is_scored_per_cell_line(tmp_path):
    annotation_file, image_dir = livecell_test_split(tmp_path)
    samples = read_samples("livecell", image_dir, annotation_file)
    summary, rows = score_samples(samples, oracle_except("BV2"), "livecell")
    per_type = summary["per_cell_type"]
    assert sorted(per_type) == list(CELL_LINES) and per_type["A172"]["images"] == 2
    assert per_type["A172"]["OP_CSB"] == pytest.approx(1.0)
    assert per_type["BV2"]["DET"] == pytest.approx(0.0) and per_type["BV2"]["n_prediction"] == 0
    assert 0.0 < summary["overall"]["OP_CSB"] < 1.0
    assert [row["cell_type"] for row in rows] == list(CELL_LINES * 2)

    output = write_scores(summary, rows, tmp_path / "scores")
    assert json.loads((output / "scores.json").read_text())["per_cell_type"]["A172"]["images"] == 2
    with open(output / "per_image.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_cellpose_test_set_is_one_group(tmp_path):
    root = generate_cell_dataset(tmp_path / "cellpose", 0, 0, 2, SIZE, look="fluorescence_nuclei")
    summary, _ = score_samples(
        read_samples("cellpose", root / "test", None), oracle_except("none"), "cellpose"
    )
    assert list(summary["per_cell_type"]) == ["cellpose"]
    assert summary["overall"]["OP_CSB"] == pytest.approx(1.0)


def test_bad_inputs_name_the_file(tmp_path):
    annotation_file, image_dir = livecell_test_split(tmp_path)
    with pytest.raises(InputDataError, match="annotation file"):
        read_samples("livecell", image_dir, None)
    samples = read_samples("livecell", image_dir, annotation_file)
    with pytest.raises(InputDataError, match="prediction is") as err:
        score_samples(samples, lambda sample: np.zeros((3, 3), dtype=np.int32), "livecell")
    assert "A172" in str(err.value)
