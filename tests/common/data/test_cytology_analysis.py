import json

import numpy as np
import pytest
from PIL import Image

from common.data.cytology_analysis import analyse_split, format_report, main

NAMES = ("A", "B", "C")


def _entry(boxes, labels):
    return {"boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4), "labels": np.asarray(labels, dtype=np.int64)}


def _datalist():
    return [
        _entry([[0, 0, 100, 100], [10, 10, 110, 110], [5, 5, 25, 45]], [0, 0, 1]),
        _entry([[0, 0, 100, 100]], [0]),
        _entry([], []),
    ]


def test_analyse_split_known_answers():
    result = analyse_split(_datalist(), NAMES)
    assert result["n_images"] == 3
    assert result["n_images_without_cells"] == 1
    assert result["n_annotations"] == 4
    assert result["class_counts"] == {"A": 3, "B": 1, "C": 0}
    assert result["imbalance_ratio"] == {"A": 1.0, "B": 3.0, "C": None}
    assert result["cells_per_image"] == pytest.approx({"mean": 4 / 3, "min": 0, "max": 3})
    width, height = result["box_width"], result["box_height"]
    assert (width["min"], width["max"], width["mean"]) == (20, 100, 80)
    assert (height["min"], height["max"]) == (40, 100)
    assert width["histogram"]["edges"] == [20, 29, 38, 47, 56, 65, 74, 83, 92, 101]
    assert width["histogram"]["counts"] == [1, 0, 0, 0, 0, 0, 0, 0, 3]


def test_boxes_of_one_size_fall_in_one_whole_pixel_bin():
    # float32 corners of a 100-pixel box centred at 887.3 do not subtract back to exactly 100
    boxes = np.array([[887.3 - 50, 10, 887.3 + 50, 110]] * 5, dtype=np.float32)
    histogram = analyse_split([_entry(boxes, [0] * 5)], NAMES)["box_width"]["histogram"]
    assert histogram == {"edges": [100, 101], "counts": [5]}


def test_empty_split_has_no_statistics():
    result = analyse_split([], NAMES)
    assert result["n_annotations"] == 0
    assert result["cells_per_image"]["mean"] is None
    assert result["box_width"]["histogram"] == {"edges": [], "counts": []}
    assert "no boxes" in format_report({"train": result})


def test_report_lists_splits_and_classes():
    report = format_report({"train": analyse_split(_datalist(), NAMES), "val": analyse_split(_datalist()[1:], NAMES)})
    lines = report.splitlines()
    assert lines[0].split() == ["split", "images", "without", "cells", "annotations", "cells/image", "mean", "min", "max"]
    assert lines[2].split() == ["train", "3", "1", "4", "1.3", "0", "3"]
    assert any(line.split() == ["B", "1", "(3.0)", "0", "(-)"] for line in lines)


def test_command_writes_json_and_plots(tmp_path, capsys):
    for split, rows in {"train": ["a.png,10,10,20,20,NILM", "a.png,30,30,20,20,SCC"], "val": ["b.png,5,5,4,4,2"]}.items():
        folder = tmp_path / "data" / split
        (folder / "images").mkdir(parents=True)
        for name in ("a.png", "b.png"):
            Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(folder / "images" / name)
        (folder / "annotations.csv").write_text("image_filename,x,y,width,height,class\n" + "\n".join(rows) + "\n")
    output = tmp_path / "report"
    main(["--root", str(tmp_path / "data"), "--splits", "train", "val", "--output", str(output)])
    analysis = json.loads((output / "analysis.json").read_text())["splits"]
    assert analysis["train"]["class_counts"]["SCC"] == 1
    assert analysis["train"]["n_images_without_cells"] == 1  # b.png has no row in train
    assert analysis["val"]["class_counts"]["INFL"] == 1
    for name in ("class_counts.png", "box_sizes.png"):
        with Image.open(output / name) as plot:
            assert plot.format == "PNG" and plot.width > 300
    assert "NILM" in capsys.readouterr().out


def test_command_reports_missing_split(tmp_path):
    with pytest.raises(SystemExit, match=f"error: {tmp_path / 'test'}: split folder not found"):
        main(["--root", str(tmp_path), "--splits", "test", "--output", str(tmp_path / "report")])
    assert not (tmp_path / "report").exists()
