import csv
import logging
import re

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from common.data.cytology import read_cell_csv
from common.errors import InputDataError
from common.writers.detections import (
    DETECTION_COLUMNS,
    DetectionCSVWriter,
    WriteDetectionsd,
    read_detections_csv,
)

POINTS = np.array([[10.0, 20.5], [33.25, 4.0]])
SCORES = np.array([0.9, 0.12345])
CLASSES = np.array([0, 7])


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_writer_names_file_by_time_and_renames_it_at_close(tmp_path):
    writer = DetectionCSVWriter(tmp_path / "out")
    assert re.fullmatch(r"detections_\d{8}-\d{6}\.csv", writer.path.name)
    assert _rows(writer.partial_path) == [list(DETECTION_COLUMNS)]  # header written at creation
    writer.write("a.png", POINTS, SCORES, CLASSES)
    assert len(_rows(writer.partial_path)) == 3  # rows on disk before close
    assert writer.close() == writer.path
    assert not writer.partial_path.exists()
    assert _rows(writer.path) == [
        list(DETECTION_COLUMNS),
        ["a.png", "10.00", "20.50", "100", "100", "0.9000", "NILM"],
        ["a.png", "33.25", "4.00", "100", "100", "0.1235", "SCC"],
    ]
    writer.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        writer.write("b.png", POINTS, SCORES, CLASSES)


def test_round_trip_with_tensors_and_empty_images(tmp_path):
    with DetectionCSVWriter(tmp_path, prefix="val", box_size=64) as writer:
        writer.write("a.png", torch.from_numpy(POINTS), torch.from_numpy(SCORES), torch.from_numpy(CLASSES))
        writer.write("empty.png", np.zeros((0, 2)), np.zeros(0), np.zeros(0))
        writer.write("b.png", POINTS[:1] + 1, SCORES[:1], np.array([3]))
    assert (writer.n_images, writer.n_detections) == (3, 3)
    detections = read_detections_csv(writer.path)
    assert list(detections) == ["a.png", "b.png"]  # an image without detections has no row
    a = detections["a.png"]
    np.testing.assert_allclose(a["points"], POINTS)
    np.testing.assert_allclose(a["scores"], [0.9, 0.1235])
    np.testing.assert_array_equal(a["labels"], CLASSES)
    np.testing.assert_allclose(a["boxes"][0], [-22, -11.5, 42, 52.5])
    assert a["labels"].dtype == np.int64 and a["points"].dtype == np.float32


def test_interrupted_run_keeps_written_rows_in_a_partial_file(tmp_path, caplog):
    with pytest.raises(RuntimeError), DetectionCSVWriter(tmp_path) as writer:
        writer.write("a.png", POINTS, SCORES, CLASSES)
        raise RuntimeError("killed")
    assert not writer.path.exists()
    assert writer.partial_path.name.endswith(".csv.partial")
    with caplog.at_level(logging.WARNING):
        detections = read_detections_csv(writer.partial_path)
    assert "did not finish" in caplog.text
    np.testing.assert_array_equal(detections["a.png"]["labels"], CLASSES)


def test_two_runs_in_the_same_second_get_two_files(tmp_path):
    first, second = DetectionCSVWriter(tmp_path), DetectionCSVWriter(tmp_path)
    assert first.partial_path != second.partial_path
    assert {first.close().name, second.close().name} == {p.name for p in tmp_path.iterdir()}


def test_writer_refuses_inconsistent_detections(tmp_path):
    writer = DetectionCSVWriter(tmp_path)
    with pytest.raises(ValueError, match="expected points \\(K, 2\\)"):
        writer.write("a.png", POINTS, SCORES[:1], CLASSES)
    with pytest.raises(ValueError, match="0..7"):
        writer.write("a.png", POINTS, SCORES, np.array([0, 8]))
    with pytest.raises(ValueError, match="box_size"):
        DetectionCSVWriter(tmp_path, box_size=0)


def test_detections_read_back_as_annotations(tmp_path):
    Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    with DetectionCSVWriter(tmp_path / "out") as writer:
        writer.write("a.png", POINTS, SCORES, CLASSES)
    (entry,) = read_cell_csv(writer.path, tmp_path)
    np.testing.assert_array_equal(entry["labels"], CLASSES)
    np.testing.assert_allclose(entry["boxes"][:, :2] + 50, POINTS)


@pytest.mark.parametrize(
    "row, message",
    [
        ("a.png,1,2,100,100,1.5,NILM", "line 3: conf must lie in \\[0, 1\\], got 1.5"),
        ("a.png,1,2,100,100,0.5,CIN2", "line 3: unknown class 'CIN2'"),
        ("a.png,x,2,100,100,0.5,NILM", "line 3: could not convert"),
        ("a.png,1,2,100,0,0.5,NILM", "line 3: x, y must be finite and width, height positive"),
    ],
)
def test_reader_refuses_bad_rows_naming_the_line(tmp_path, row, message):
    path = tmp_path / "detections.csv"
    path.write_text(",".join(DETECTION_COLUMNS) + "\na.png,1,2,100,100,0.5,NILM\n" + row + "\n")
    with pytest.raises(InputDataError, match=message) as info:
        read_detections_csv(path)
    assert info.value.path == str(path)


def test_reader_accepts_a_run_without_detections_but_not_a_wrong_header(tmp_path):
    path = tmp_path / "detections.csv"
    path.write_text(",".join(DETECTION_COLUMNS) + "\n")
    assert read_detections_csv(path) == {}
    path.write_text("image_filename,x,y,width,height,class\n")
    with pytest.raises(InputDataError, match="missing column\\(s\\) conf"):
        read_detections_csv(path)


def _image(path):
    return MetaTensor(torch.zeros(3, 8, 8), meta={"filename_or_obj": str(path)})


def test_write_detections_transform_names_rows_after_the_image(tmp_path):
    writer = DetectionCSVWriter(tmp_path / "out")
    transform = WriteDetectionsd(writer=writer)
    data = {"image": _image(tmp_path / "slides" / "s1.png"), "points": POINTS, "scores": SCORES, "classes": CLASSES}
    assert transform(data) == data
    nested = WriteDetectionsd(keys=["p", "s", "c"], writer=writer, image_root=tmp_path)
    nested({"image": _image(tmp_path / "slides" / "s2.png"), "p": POINTS[:1], "s": SCORES[:1], "c": CLASSES[:1]})
    assert list(read_detections_csv(writer.close())) == ["s1.png", "slides/s2.png"]


def test_write_detections_transform_needs_a_source_file_name(tmp_path):
    transform = WriteDetectionsd(writer=DetectionCSVWriter(tmp_path))
    with pytest.raises(ValueError, match="filename_or_obj"):
        transform({"image": torch.zeros(3, 8, 8), "points": POINTS, "scores": SCORES, "classes": CLASSES})
    with pytest.raises(ValueError, match="points, scores and classes"):
        WriteDetectionsd(keys=["points"], writer=DetectionCSVWriter(tmp_path))
