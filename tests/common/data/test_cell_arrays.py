from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, decollate_batch, list_data_collate
from monai.transforms import RandSpatialCropd
from PIL import Image

from common.data.cell_arrays import CellArrayDataset, build_cell_arrays, main
from common.data.cell_readers import read_cellpose_folder
from common.data.distance_map import normalized_distance_map
from common.errors import InputDataError


def write_sample(folder: Path, name: str, height: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).save(folder / f"{name}_img.png")
    labels = np.zeros((height, width), np.uint16)
    labels[2:12, 3:15] = 4
    labels[12:20, 3:15] = 9  # touches cell 4
    labels[height - 6 :, width - 7 :] = 2  # on the bottom-right border
    Image.fromarray(labels).save(folder / f"{name}_masks.png")


@pytest.fixture()
def cellpose(tmp_path) -> Path:
    write_sample(tmp_path / "raw", "a", 32, 40, 0)
    write_sample(tmp_path / "raw", "b", 36, 30, 1)  # taller, narrower: padding on both axes
    return tmp_path / "raw"


@pytest.fixture()
def arrays(cellpose, tmp_path) -> Path:
    return build_cell_arrays(read_cellpose_folder(cellpose), tmp_path / "arrays")


def test_build_writes_padded_arrays(cellpose, arrays):
    imgs = np.load(arrays / "imgs.npy", mmap_mode="r")
    assert isinstance(imgs, np.memmap)
    assert imgs.shape == (2, 36, 40, 3) and imgs.dtype == np.uint8
    dist = np.load(arrays / "dist_maps.npy")
    anns = np.load(arrays / "anns.npy")
    assert dist.shape == anns.shape == (2, 36, 40)
    assert dist.dtype == np.float32 and anns.dtype == np.int32
    np.testing.assert_array_equal(np.load(arrays / "sizes.npy"), [[32, 40], [36, 30]])
    assert json.loads((arrays / "names.json").read_text()) == ["a", "b"]

    image, labels = read_cellpose_folder(cellpose)[0].load()
    np.testing.assert_array_equal(imgs[0, :32, :40], image)
    np.testing.assert_array_equal(anns[0, :32, :40], labels)
    np.testing.assert_array_equal(dist[0, :32, :40], normalized_distance_map(labels))
    assert not imgs[0, 32:].any() and not anns[1, :, 30:].any() and not dist[1, :, 30:].any()  # zero padding
    assert dist.min() == 0 and dist.max() == 1


def test_dataset_items_are_cropped_metatensors(arrays):
    dataset = CellArrayDataset(arrays)
    assert len(dataset) == 2
    item = dataset[1]
    assert item["name"] == "b"
    assert item["image"].shape == (3, 36, 30) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, 36, 30) and item["label"].dtype == torch.float32
    assert item["instances"].shape == (1, 36, 30) and item["instances"].dtype == torch.int32
    assert isinstance(item["image"], MetaTensor) and item["image"].meta["filename_or_obj"] == "b"
    assert float(item["image"].max()) > 1  # 0..255, not rescaled
    imgs = np.load(arrays / "imgs.npy")
    np.testing.assert_array_equal(item["image"].numpy(), imgs[1, :36, :30].transpose(2, 0, 1))
    assert set(np.unique(item["instances"].numpy())) == {0, 2, 4, 9}


def test_dataset_keys_transform_and_collation_keep_names(arrays):
    crop = RandSpatialCropd(keys=["image", "label"], roi_size=(16, 16), random_size=False)
    dataset = CellArrayDataset(arrays, transform=crop, keys=("image", "label"))
    items = [dataset[0], dataset[1]]
    assert set(items[0]) == {"image", "label", "name"}
    assert items[0]["image"].shape == (3, 16, 16)
    batch = list_data_collate(items)
    assert batch["image"].shape == (2, 3, 16, 16) and batch["name"] == ["a", "b"]
    assert [d["image"].meta["filename_or_obj"] for d in decollate_batch(batch)] == ["a", "b"]


def test_dataset_maps_files_lazily_and_survives_pickling(arrays):
    dataset = CellArrayDataset(arrays)
    assert dataset._arrays == {}
    dataset[0]
    assert isinstance(dataset._arrays["image"], np.memmap)
    clone = pickle.loads(pickle.dumps(dataset))  # what a spawned DataLoader worker receives
    assert clone._arrays == {}
    torch.testing.assert_close(clone[1]["label"], dataset[1]["label"])


def test_rebuild_replaces_the_dataset_atomically(cellpose, arrays, tmp_path):
    samples = read_cellpose_folder(cellpose)
    build_cell_arrays(samples[:1], arrays)
    assert json.loads((arrays / "names.json").read_text()) == ["a"]
    assert np.load(arrays / "imgs.npy").shape == (1, 32, 40, 3)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_failed_build_keeps_the_old_dataset(cellpose, arrays, tmp_path):
    samples = read_cellpose_folder(cellpose)
    (cellpose / "b_img.png").write_bytes(b"corrupt")  # fails half-way, after sample a was written
    with pytest.raises(InputDataError, match="b_img.png: not a readable image"):
        build_cell_arrays(samples, arrays)
    assert json.loads((arrays / "names.json").read_text()) == ["a", "b"]  # untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_build_refuses_empty_input_and_foreign_output_folder(cellpose, tmp_path):
    with pytest.raises(InputDataError, match="out: no samples"):
        build_cell_arrays([], tmp_path / "out")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.docx").write_text("precious")
    with pytest.raises(InputDataError, match="mine: exists and holds files that are not part"):
        build_cell_arrays(read_cellpose_folder(cellpose), tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.docx").read_text() == "precious"


def test_dataset_reports_bad_folders(arrays, tmp_path):
    with pytest.raises(InputDataError, match="nowhere: dataset folder not found"):
        CellArrayDataset(tmp_path / "nowhere")
    np.save(arrays / "dist_maps.npy", np.zeros((2, 36, 40), np.float64))
    with pytest.raises(InputDataError, match="dist_maps.npy: has dtype float64"):
        CellArrayDataset(arrays)
    assert len(CellArrayDataset(arrays, keys=("image",))) == 2  # the bad file is not needed
    np.save(arrays / "anns.npy", np.zeros((3, 36, 40), np.int32))
    with pytest.raises(InputDataError, match="anns.npy: has shape \\(3, 36, 40\\)"):
        CellArrayDataset(arrays, keys=("instances",))
    data = (arrays / "imgs.npy").read_bytes()
    (arrays / "imgs.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputDataError, match="imgs.npy: file is truncated"):
        CellArrayDataset(arrays, keys=("image",))
    (arrays / "names.json").write_text("[")
    with pytest.raises(InputDataError, match="names.json: not valid JSON"):
        CellArrayDataset(arrays)
    (arrays / "names.json").unlink()
    with pytest.raises(InputDataError, match="names.json: file not found"):
        CellArrayDataset(arrays)


def test_command_converts_splits(cellpose, tmp_path, capsys):
    root = tmp_path / "root"
    for split in ("train", "val"):
        write_sample(root / split, "s0", 24, 24, 3)
    main(["--format", "cellpose", "--input", str(root), "--splits", "train", "val",
          "--output", str(tmp_path / "out")])
    for split in ("train", "val"):
        assert np.load(tmp_path / "out" / split / "imgs.npy").shape == (1, 24, 24, 3)
    with pytest.raises(SystemExit, match="no images named NAME_img"):
        main(["--format", "cellpose", "--input", str(tmp_path / "out"), "--output", str(tmp_path / "x")])


def test_command_converts_image_and_label_folders(tmp_path, caplog):
    write_sample(tmp_path / "images", "x", 24, 28, 5)
    (tmp_path / "labels").mkdir()
    (tmp_path / "images" / "x_masks.png").rename(tmp_path / "labels" / "x_seg.png")
    (tmp_path / "images" / "x_img.png").rename(tmp_path / "images" / "x.png")
    with caplog.at_level(logging.INFO):
        main(["--format", "folders", "--input", str(tmp_path / "images"),
              "--labels", str(tmp_path / "labels"), "--label-suffix", "_seg",
              "--output", str(tmp_path / "out")])
    assert "out: 1 images, 3 cells, padded to 24x28" in caplog.text
    assert json.loads((tmp_path / "out" / "names.json").read_text()) == ["x"]
