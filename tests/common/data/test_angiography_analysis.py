from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from common.data.angiography import CASS_CATEGORIES, read_angiography_coco
from common.data.angiography_analysis import analyse_split, category_colours, format_report, main, overlay
from common.data.synthetic.angiography import generate_angiography_dataset
from common.errors import InputDataError

H, W = 20, 30


def _entry(image, annotations):
    """An entry with ``(label, (x0, y0, x1, y1))`` rectangle annotations as polygons."""
    return {
        "image": str(image),
        "name": "x",
        "coco": "x.json",
        "height": H,
        "width": W,
        "annotations": [
            {"label": label, "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]], "iscrowd": 0}
            for label, (x0, y0, x1, y1) in annotations
        ],
    }


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.full((H, W), 100, dtype=np.uint8) + np.eye(H, W, dtype=np.uint8)).save(path)
    return path


def test_analyse_split_known_answers(image):
    entries = [
        _entry(image, [(1, (0, 0, 10, 2)), (1, (0, 4, 5, 6)), (12, (0, 10, 4, 13))]),
        _entry(image, [(1, (0, 0, 2, 2))]),
        _entry(image, []),
    ]
    result = analyse_split(entries, CASS_CATEGORIES)
    assert (result["n_images"], result["n_images_without_segments"], result["n_annotations"]) == (3, 1, 4)
    assert result["segments_per_image"] == pytest.approx({"mean": 4 / 3, "min": 0, "max": 3})
    assert result["class_counts"]["proximal_rca"] == 3 and result["images_with"]["proximal_rca"] == 2
    assert result["class_counts"]["left_main"] == 1 and result["class_counts"]["ramus"] == 0
    assert result["area"]["proximal_rca"] == pytest.approx({"mean": 34 / 3, "min": 4.0, "max": 20.0})
    assert result["area"]["ramus"] == {"mean": None, "min": None, "max": None}
    report = format_report({"train": result})
    assert "proximal_rca" in report and "3 (2), 11.3 px" in report


def test_overlay_tints_each_segment_with_its_colour(image):
    colours = category_colours(len(CASS_CATEGORIES))
    assert len({tuple(c) for c in colours}) == len(CASS_CATEGORIES)
    picture = overlay(_entry(image, [(2, (0, 0, 10, 5))]), colours)
    assert picture.shape == (H, W, 3)
    assert np.abs(picture[2, 5].astype(int) - (0.45 * 100 + 0.55 * colours[1])).max() <= 1
    np.testing.assert_array_equal(picture[15, 20], [100, 100, 100])
    with pytest.raises(InputDataError, match=f"image is {H}x{W} but x.json gives 21x{W}"):
        overlay(_entry(image, []) | {"height": H + 1}, colours)


def test_command_on_synthetic_cass_and_arcade_files(tmp_path, capsys):
    dataset = generate_angiography_dataset(tmp_path / "angio", 4, 96, seed=0)
    files = [str(dataset / split / "cass.json") for split in ("train", "val")]
    main(["--coco", *files, "--output", str(tmp_path / "report"), "--sheet-images", "2"])
    printed = capsys.readouterr().out
    assert "train" in printed and "obtuse_marginal_1" in printed
    analysis = json.loads((tmp_path / "report" / "analysis.json").read_text())["splits"]
    train = read_angiography_coco(files[0])
    assert analysis["train"]["n_annotations"] == sum(len(e["annotations"]) for e in train)
    for picture in ("class_counts.png", "segment_areas.png", "contact_sheet.png"):
        with Image.open(tmp_path / "report" / picture) as png:
            assert png.size[0] > 200

    arcade = str(dataset / "train" / "arcade_syntax.json")
    main(["--coco", arcade, "--output", str(tmp_path / "arcade"), "--sheet-images", "1"])
    counts = json.loads((tmp_path / "arcade" / "analysis.json").read_text())["splits"]["train"][
        "class_counts"
    ]
    assert counts["obtuse_marginal_3"] == 0 and sum(counts.values()) > 0
    with pytest.raises(SystemExit, match="error: .*different formats"):
        main(
            ["--coco", files[0], str(dataset / "val" / "arcade_syntax.json"), "--output", str(tmp_path / "x")]
        )
