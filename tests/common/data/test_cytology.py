import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from common.data.cytology import BETHESDA_CLASSES, class_counts, read_cell_csv, read_coco_cells, read_split
from common.errors import InputDataError

HEADER = "image_filename,x,y,width,height,class\n"


def _image(path, width=64, height=48):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 200, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    for name in ("a.png", "b.png", "c.png"):
        _image(folder / name)
    return folder


def _csv(tmp_path, text):
    path = tmp_path / "annotations.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_reads_class_names_and_indices(tmp_path, images):
    path = _csv(tmp_path, HEADER + "b.png,5,6,4,2,scc\na.png,10,20,8,6,NILM\na.png,30.5,40,10,10,3\n")
    datalist = read_cell_csv(path, images)
    assert [entry["name"] for entry in datalist] == ["a.png", "b.png", "c.png"]
    a, b, c = datalist
    assert a["image"] == str(images / "a.png")
    np.testing.assert_array_equal(a["boxes"], [[6, 17, 14, 23], [25.5, 35, 35.5, 45]])
    np.testing.assert_array_equal(a["labels"], [0, 3])
    np.testing.assert_array_equal(b["labels"], [BETHESDA_CLASSES.index("SCC")])
    assert a["boxes"].dtype == np.float32 and a["labels"].dtype == np.int64
    assert c["boxes"].shape == (0, 4) and c["labels"].shape == (0,)
    assert [entry["name"] for entry in read_cell_csv(path, images, include_empty=False)] == ["a.png", "b.png"]


def test_csv_accepts_excel_bom_spaces_and_extra_columns(tmp_path, images):
    path = _csv(tmp_path, "\ufeffimage_filename, x, y, width, height, class, conf\n\na.png, 1, 2, 2, 2, ASCH, 0.9\n")
    (entry,) = read_cell_csv(path, images, include_empty=False)
    np.testing.assert_array_equal(entry["boxes"], [[0, 1, 2, 3]])
    np.testing.assert_array_equal(entry["labels"], [6])


def test_csv_reads_tiff_size_from_header(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "t.tif", np.zeros((48, 64, 3), dtype=np.uint8), photometric="rgb")
    assert len(read_cell_csv(_csv(tmp_path, HEADER + "t.tif,63,47,4,4,HSIL\n"), folder)[0]["labels"]) == 1
    with pytest.raises(InputDataError, match="line 2: box centre \\(64, 10\\) lies outside its 64x48 image"):
        read_cell_csv(_csv(tmp_path, HEADER + "t.tif,64,10,4,4,HSIL\n"), folder)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "file is empty"),
        (HEADER, "has a header but no data rows"),
        ("image_filename,x,y,width,height\na.png,1,1,1,1\n", "missing column\\(s\\) class"),
        (HEADER + "a.png,1,1,1,1,NILM\na.png,1,1,1,1,FOO\n", "line 3: unknown class 'FOO'.*0=NILM.*7=SCC"),
        (HEADER + "a.png,1,1,1,1,8\n", "line 2: unknown class '8'"),
        (HEADER + "zz.png,1,1,1,1,NILM\n", "line 2: image 'zz.png' not found"),
        (HEADER + "a.png,one,1,1,1,NILM\n", "line 2: x must be a number, got 'one'"),
        (HEADER + "a.png,1,nan,1,1,NILM\n", "line 2: y must be finite"),
        (HEADER + "a.png,1,1,0,1,NILM\n", "line 2: width and height must be positive"),
        (HEADER + "a.png,1,1,1,-3,NILM\n", "line 2: width and height must be positive"),
        (HEADER + "a.png,10,48,1,1,NILM\n", "line 2: box centre \\(10, 48\\) lies outside its 64x48 image"),
        (HEADER + "a.png,-1,4,1,1,NILM\n", "line 2: box centre"),
        (HEADER + "a.png,1,1,1\n", "line 2: no value for height, class"),
        (HEADER + 'a.png,1,1,1,1,"NI"LM\n', "line 2: malformed CSV"),
        (HEADER + 'a.png,1,1,1,1,"NILM\n', "malformed CSV \\(unexpected end of data"),
    ],
)
def test_csv_refuses_bad_input_naming_file_and_line(tmp_path, images, text, message):
    path = _csv(tmp_path, text)
    with pytest.raises(InputDataError, match=message) as info:
        read_cell_csv(path, images)
    assert info.value.path == str(path)


def test_csv_missing_file_or_folder(tmp_path, images):
    with pytest.raises(InputDataError, match="file not found") as info:
        read_cell_csv(tmp_path / "nope.csv", images)
    assert info.value.path == str(tmp_path / "nope.csv")
    with pytest.raises(InputDataError, match="image folder not found"):
        read_cell_csv(_csv(tmp_path, HEADER + "a.png,1,1,1,1,NILM\n"), tmp_path / "missing")


def test_csv_corrupt_image_names_image_and_row(tmp_path, images):
    (images / "a.png").write_bytes(b"not a png")
    path = _csv(tmp_path, HEADER + "a.png,1,1,1,1,NILM\n")
    with pytest.raises(InputDataError, match="not a readable image.*annotations.csv, line 2") as info:
        read_cell_csv(path, images)
    assert info.value.path == str(images / "a.png")


def _coco(tmp_path, **overrides):
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}, {"id": 2, "file_name": "c.png"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [10, 20, 8, 6]},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [0, 0, 4, 4]},
        ],
        "categories": [{"id": 2, "name": "NILM"}, {"id": 7, "name": "hsil"}],
    } | overrides
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(coco), encoding="utf-8")
    return path


def test_coco_maps_categories_by_name_and_bbox_to_xyxy(tmp_path, images):
    a, c = read_coco_cells(_coco(tmp_path), images)
    assert (a["name"], c["name"]) == ("a.png", "c.png")
    np.testing.assert_array_equal(a["boxes"], [[10, 20, 18, 26], [0, 0, 4, 4]])
    np.testing.assert_array_equal(a["labels"], [BETHESDA_CLASSES.index("HSIL"), 0])
    assert c["boxes"].shape == (0, 4)
    assert len(read_coco_cells(_coco(tmp_path), images, include_empty=False)) == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"categories": [{"id": 2, "name": "NILM"}, {"id": 7, "name": "koilocyte"}]}, "category 'koilocyte'.*0=NILM"),
        ({"annotations": []}, "has no annotations"),
        ({"annotations": [{"id": 5, "image_id": 9, "category_id": 2, "bbox": [0, 0, 1, 1]}]}, "annotation 5 .*image_id 9"),
        ({"annotations": [{"id": 5, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}]}, "unknown category_id 3"),
        ({"annotations": [{"id": 5, "image_id": 1, "category_id": 2, "bbox": [0, 0, 1]}]}, "annotation 5: bbox must be"),
        ({"annotations": [{"id": 5, "image_id": 1, "category_id": 2, "bbox": [0, 0, 0, 1]}]}, "must be positive"),
        ({"annotations": [{"id": 5, "image_id": 1, "category_id": 2, "bbox": [70, 0, 2, 2]}]}, "lies outside"),
        ({"annotations": [{"id": 5, "image_id": 1, "category_id": 2}]}, 'annotation 5 has no "bbox"'),
        ({"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 48}]}, "100x48 in the JSON but 64x48"),
        ({"images": [{"id": 1, "file_name": "zz.png"}]}, "image 'zz.png' not found"),
        ({"categories": {"id": 1}}, '"categories" must be a list'),
    ],
)
def test_coco_refuses_bad_input(tmp_path, images, overrides, message):
    path = _coco(tmp_path, **overrides)
    with pytest.raises(InputDataError, match=message) as info:
        read_coco_cells(path, images)
    assert info.value.path == str(path)


def test_coco_refuses_malformed_json(tmp_path, images):
    path = tmp_path / "annotations.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(InputDataError, match="not valid JSON"):
        read_coco_cells(path, images)
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(InputDataError, match="top level is not an object"):
        read_coco_cells(path, images)
    path.write_text('{"annotations": []}', encoding="utf-8")
    with pytest.raises(InputDataError, match='no "images" entry'):
        read_coco_cells(path, images)


def test_read_split_finds_csv_or_json(tmp_path):
    split = tmp_path / "train"
    _image(split / "images" / "a.png")
    with pytest.raises(InputDataError, match="no annotations.csv or annotations.json"):
        read_split(tmp_path, "train")
    _csv(split, HEADER + "a.png,1,1,1,1,LSIL\n")
    assert read_split(tmp_path, "train")[0]["labels"].tolist() == [4]
    _coco(split)
    with pytest.raises(InputDataError, match="both annotations.csv and annotations.json"):
        read_split(tmp_path, "train")
    (split / "annotations.csv").unlink()
    with pytest.raises(InputDataError, match="image 'c.png' not found"):  # the COCO file lists c.png too
        read_split(tmp_path, "train")
    with pytest.raises(InputDataError, match="split folder not found") as info:
        read_split(tmp_path, "val")
    assert info.value.path == str(tmp_path / "val")


def test_class_counts():
    datalist = [{"labels": np.array([0, 0, 3])}, {"labels": np.zeros(0, dtype=np.int64)}, {"labels": np.array([7])}]
    np.testing.assert_array_equal(class_counts(datalist, 8), [2, 0, 0, 1, 0, 0, 0, 1])
    np.testing.assert_array_equal(class_counts([], 3), [0, 0, 0])
    with pytest.raises(ValueError, match="0..2"):
        class_counts(datalist, 3)
