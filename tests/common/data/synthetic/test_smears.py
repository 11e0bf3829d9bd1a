import json

import numpy as np
import pytest
from PIL import Image

from common.data.cytology import BETHESDA_CLASSES, class_counts, read_split
from common.data.synthetic.smears import (
    CLASS_PRIOR,
    MIN_PER_CLASS,
    generate_smear_dataset,
    main,
    synthesize_smear,
)
from common.errors import InputDataError

SINGLE_CELLS = ("NILM", "ASCUS", "LSIL", "HSIL", "ASCH", "SCC")


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    return generate_smear_dataset(tmp_path_factory.mktemp("smears") / "data", 1, 1, 1, size=256, seed=3)


def test_layout_is_readable_and_every_class_is_in_every_split(small_dataset):
    settings = json.loads((small_dataset / "dataset.json").read_text())
    assert settings["classes"] == list(BETHESDA_CLASSES) and settings["box_size"] == 100
    for split in ("train", "val", "test"):
        datalist = read_split(small_dataset, split)
        assert [entry["name"] for entry in datalist] == ["000.png"]
        counts = class_counts(datalist, len(BETHESDA_CLASSES))
        assert counts.min() >= MIN_PER_CLASS
        assert dict(zip(BETHESDA_CLASSES, counts.tolist())) == settings["class_counts"][split]
        boxes = datalist[0]["boxes"]
        np.testing.assert_allclose(boxes[:, 2:] - boxes[:, :2], 100, atol=1e-3)
        with Image.open(datalist[0]["image"]) as image:
            assert (image.mode, image.size) == ("RGB", (256, 256))


def test_same_seed_same_dataset_other_seed_differs(tmp_path, small_dataset):
    again = generate_smear_dataset(tmp_path / "again", 1, 1, 1, size=256, seed=3)
    other = generate_smear_dataset(tmp_path / "other", 1, 1, 1, size=256, seed=4)
    for name in ("train/annotations.csv", "test/images/000.png"):
        assert (again / name).read_bytes() == (small_dataset / name).read_bytes()
        assert (other / name).read_bytes() != (small_dataset / name).read_bytes()


def test_classes_are_imbalanced_like_real_smears(tmp_path):
    root = generate_smear_dataset(tmp_path / "data", n_train=2, n_val=0, n_test=0, size=1024)
    assert not (root / "val").exists()
    counts = dict(zip(BETHESDA_CLASSES, class_counts(read_split(root, "train"), 8).tolist()))
    total = sum(counts.values())
    assert 80 < total < 150  # about 56 objects per 1024x1024 image
    # the real training set: NILM and INFL about 30 % each, the uncertain ASC-US and ASC-H about 2 %
    for name in ("NILM", "INFL"):
        assert counts[name] / total == pytest.approx(CLASS_PRIOR[name], abs=0.05), name
    assert counts["NILM"] > 5 * max(counts["ASCUS"], counts["ASCH"])
    assert min(counts.values()) >= MIN_PER_CLASS


def test_annotated_centre_lies_on_a_dark_nucleus():
    classes = list(SINGLE_CELLS) * 2
    image, centres = synthesize_smear(np.random.default_rng(0), classes, size=384)
    grey = image.astype(np.float64).mean(axis=2)
    x, y = np.round(centres).astype(int).T
    at_centre = np.mean([grey[y + dy, x + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    assert (at_centre < np.percentile(grey, 10)).all()


def test_high_grade_nuclei_are_larger_and_darker_than_normal():
    """The classifier must be able to tell NILM from HSIL: measure dark area around each centre."""
    image, centres = synthesize_smear(np.random.default_rng(1), ["NILM"] * 6 + ["HSIL"] * 6, size=512)
    grey = np.pad(image.astype(np.float64).mean(axis=2), 20, mode="edge")
    dark_area = [
        (grey[int(y) : int(y) + 41, int(x) : int(x) + 41] < 90).sum() for x, y in np.round(centres)
    ]
    assert max(dark_area[:6]) < min(dark_area[6:])


def test_refuses_to_replace_a_foreign_folder_and_bad_arguments(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputDataError, match="refusing to replace"):
        generate_smear_dataset(tmp_path / "mine", 1, 0, 0, size=128)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="at least 128"):
        generate_smear_dataset(tmp_path / "small", size=64)
    with pytest.raises(ValueError, match="unknown classes"):
        synthesize_smear(np.random.default_rng(0), ["NILM", "CIN3"], size=128)


def test_command_line_regenerates_its_own_output(tmp_path, capsys):
    args = ["--output", str(tmp_path / "data"), "--n-train", "1", "--n-val", "0", "--n-test", "0", "--size", "128"]
    main(args)
    main([*args[:-2], "--size", "160"])  # an earlier output of the generator may be replaced
    with Image.open(tmp_path / "data" / "train" / "images" / "000.png") as image:
        assert image.size == (160, 160)
    assert "wrote 1/0/0" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no staging folder left behind
