import csv
import json
import logging

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.transforms import Compose

from common.handlers.ctc_metrics import CTCMetricsHandler
from common.postprocessing.watershed import DistanceMapWatershedd


def _labels(*boxes: tuple[int, int, int, int]) -> torch.Tensor:
    labels = np.zeros((1, 32, 32), dtype=np.int32)
    for i, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        labels[0, y0:y1, x0:x1] = i
    return torch.from_numpy(labels)


def _sample(name: str | None, reference: torch.Tensor, prediction: torch.Tensor) -> dict:
    meta = {} if name is None else {"filename_or_obj": name}
    return {
        "image": MetaTensor(torch.zeros(3, 32, 32), meta=meta),
        "instances": MetaTensor(prediction, meta=meta),
        "instances_label": MetaTensor(reference, meta=meta),
    }


TWO_CELLS = _labels((2, 12, 2, 12), (2, 12, 20, 30))
ONE_CELL = _labels((2, 12, 2, 12))
MERGED = _labels((2, 12, 2, 30))

# Iteration 1: a perfect image and a missed cell; iteration 2: a merge (the prediction spans the gap, so
# each reference is matched with Jaccard 100 / 280) and an image without the file name in its metadata.
BATCHES = [
    [_sample("/data/01/t000.tif", TWO_CELLS, TWO_CELLS), _sample("/data/01/t001.tif", TWO_CELLS, ONE_CELL)],
    [_sample("/data/01/t002.tif", TWO_CELLS, MERGED), _sample(None, ONE_CELL, ONE_CELL)],
]


def _run(handler: CTCMetricsHandler, epochs: int = 1) -> Engine:
    engine = Engine(lambda engine, batch: batch)
    handler.attach(engine)
    engine.run(BATCHES, max_epochs=epochs)
    return engine


def test_metrics_files_and_log(tmp_path, caplog):
    handler = CTCMetricsHandler(output_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="common.handlers.ctc_metrics"):
        engine = _run(handler)

    seg = (2 + 1 + 2 * 100 / 280 + 1) / 7  # Jaccard sum over the 7 reference cells
    det = 1 - (10 + 5) / 70  # one missed cell, one split needed
    assert engine.state.metrics["SEG"] == pytest.approx(seg)
    assert engine.state.metrics["DET"] == pytest.approx(det)
    assert engine.state.metrics["OP_CSB"] == pytest.approx((seg + det) / 2)
    assert "CTC metrics over 4 images" in caplog.text

    summary = json.loads((tmp_path / "ctc_metrics.json").read_text())
    assert summary["OP_CSB"] == pytest.approx((seg + det) / 2)
    assert summary["overall"]["n_reference"] == 7
    assert [item["image"] for item in summary["per_image"]] == [
        "/data/01/t000.tif",
        "/data/01/t001.tif",
        "/data/01/t002.tif",
        "rank0_image3",
    ]
    with open(tmp_path / "ctc_per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["det"]) for r in rows] == pytest.approx([1.0, 0.5, 0.75, 1.0])
    assert rows[2]["splits"] == "1"


def test_state_resets_every_epoch():
    engine = _run(CTCMetricsHandler(), epochs=2)
    assert engine.state.metrics["DET"] == pytest.approx(1 - 15 / 70)


def test_batched_dict_output_is_decollated():
    batch = {
        "instances": torch.stack([TWO_CELLS, ONE_CELL]),
        "instances_label": torch.stack([TWO_CELLS, TWO_CELLS]),
    }
    engine = Engine(lambda engine, _: batch)
    CTCMetricsHandler().attach(engine)
    engine.run([0], max_epochs=1)
    assert engine.state.metrics["DET"] == pytest.approx(1 - 10 / 40)


def test_reference_labels_are_found_in_the_batch():
    batch = [{"instances_label": TWO_CELLS}, {"instances_label": TWO_CELLS}]
    engine = Engine(lambda engine, batch: [{"instances": TWO_CELLS}, {"instances": ONE_CELL}])
    CTCMetricsHandler().attach(engine)
    engine.run([batch], max_epochs=1)
    assert engine.state.metrics["DET"] == pytest.approx(1 - 10 / 40)


def test_inside_monai_supervised_evaluator(tmp_path):
    """The network is the identity on an image that already is a distance map, so the watershed must
    recover the reference exactly: a missing or mis-keyed step would lower the scores or raise."""
    reference = _labels((4, 14, 4, 14), (4, 14, 14, 24), (20, 28, 5, 30))
    dist = torch.zeros(1, 32, 32)
    for cell in range(1, 4):
        mask = reference == cell
        ys, xs = torch.nonzero(mask[0], as_tuple=True)
        to_edge_y = torch.minimum(ys - ys.min() + 1, ys.max() - ys + 1)
        to_edge_x = torch.minimum(xs - xs.min() + 1, xs.max() - xs + 1)
        depth = torch.minimum(to_edge_y, to_edge_x).float()  # chessboard distance to the square's border
        dist[0, ys, xs] = depth / depth.max()
    images = [MetaTensor(dist, meta={"filename_or_obj": f"/data/t00{i}.tif"}) for i in range(2)]
    data = [{"image": image, "instances_label": reference} for image in images]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(data), batch_size=2),
        network=torch.nn.Identity(),
        postprocessing=Compose([DistanceMapWatershedd(keys="pred", cells_max=0.5, cell_fill=0.05)]),
        val_handlers=[CTCMetricsHandler(output_dir=tmp_path)],
    )
    evaluator.run()
    assert evaluator.state.metrics == {"SEG": 1.0, "DET": 1.0, "OP_CSB": 1.0}
    summary = json.loads((tmp_path / "ctc_metrics.json").read_text())
    assert [item["image"] for item in summary["per_image"]] == ["/data/t000.tif", "/data/t001.tif"]
    assert summary["overall"]["n_reference"] == 6


def test_missing_key_is_reported():
    engine = Engine(lambda engine, _: [{"instances": TWO_CELLS}])
    CTCMetricsHandler().attach(engine)
    with pytest.raises(KeyError, match="no 'instances_label' in the engine output or batch"):
        engine.run([0], max_epochs=1)
