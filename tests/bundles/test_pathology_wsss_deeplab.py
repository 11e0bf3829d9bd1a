"""End-to-end runs of the weakly supervised histology bundle on tiny synthetic patches and a small slide."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from PIL import Image

from common.data.histopathology import DEFAULT_CLASS_NAMES, read_mask, read_patch_manifest
from common.data.synthetic.histology import generate_histology_dataset
from common.errors import InputDataError
from common.io.checkpoint import load_checkpoint, save_checkpoint
from common.networks.cam_classifier import CAMClassifier, PrototypeCAMClassifier
from tests.helpers import REPO_ROOT, TORCHRUN_2, bundle_command, run_command

pytestmark = pytest.mark.slow

BUNDLE = REPO_ROOT / "bundles" / "pathology_wsss_deeplab"
CONFIGS = BUNDLE / "configs"
TINY = ["--backbone", "resnet10t", "--pretrained", "False", "--num_workers", "0"]
TRAIN = [*TINY, "--epochs", "1", "--batch_size", "4", "--progress", "False"]
NUM_LABELS = len(DEFAULT_CLASS_NAMES) + 1  # tissue classes and background


def configs(*names: str) -> str:
    return "[" + ",".join(f"'{CONFIGS / name}'" for name in names) + "]"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wsss")
    return generate_histology_dataset(
        root / "data", patch_size=64, n_train=8, n_val=4, n_test=4, slide_size=(512, 640), slide_tile=128,
        workers=1,
    )


@pytest.fixture(scope="module")
def work(dataset: Path) -> Path:
    """Stage 1, pseudo-masks of the training patches, then stage 2 started from the stage-1 backbone:
    each step reads what the one before wrote, as a user runs them."""
    work = dataset.parent / "work"
    common = ["--bundle_root", str(work), "--dataset_dir", str(dataset)]
    stage_1, pseudo_masks = str(CONFIGS / "train_cam.json"), configs("train_cam.json", "pseudo_masks.json")
    run_command(bundle_command("run", "training", "--config_file", stage_1, *common, *TRAIN))
    run_command(bundle_command("run", "pseudo_labelling", "--config_file", pseudo_masks, *common, *TINY,
                               "--val_fraction", "0.25"))
    stage_2 = str(CONFIGS / "train.json")
    run_command(bundle_command("run", "training", "--config_file", stage_2, *common, *TRAIN,
                               "--backbone_checkpoint", str(work / "models" / "cam_classifier.pt")))
    return work


def test_both_stages_write_their_weights(work: Path):
    names = {p.name for p in (work / "models").iterdir()}
    assert {"cam_classifier.pt", "cam_checkpoint_latest.pt", "model.pt", "checkpoint_latest.pt"} <= names
    assert "cam_prototypes.pt" not in names  # the default variant uses the classifier's own CAMs


def test_prototype_variant_builds_prototypes_when_training_ends(dataset: Path, tmp_path: Path):
    """Building prototypes from a barely trained classifier can fail (no class evidence), so the
    builder itself is tested in tests/common/engines; here the switch and the wiring."""
    for variant, enabled in (("cam", False), ("prototype", True)):
        parser = parsed("train_cam.json", cam_variant=variant, bundle_root=str(tmp_path),
                        dataset_dir=str(dataset), backbone="resnet10t", pretrained=False)
        builder = parser.get_parsed_content("train#prototypes")
        assert builder.enabled is enabled and builder.weights_file.name == "cam_classifier.pt"
        assert builder.output_file.name == "cam_prototypes.pt"
        assert parser.get_parsed_content("train#handlers").count(builder) == 1


def test_pseudo_masks_cover_every_training_patch(dataset: Path, work: Path):
    entries = read_patch_manifest(work / "pseudo_masks" / "manifest.jsonl", len(DEFAULT_CLASS_NAMES))
    patches = sorted((dataset / "train").glob("*.png"))
    assert sorted(Path(e["image"]) for e in entries) == patches
    assert {e["split"] for e in entries} <= {"train", "val"}
    for entry in entries:
        assert entry["name"] in entry["mask"]  # the mask keeps the label vector of the patch's name
        mask = read_mask(entry["mask"], len(DEFAULT_CLASS_NAMES))
        assert mask.shape == (64, 64)
        labelled = [int(c) for c in np.unique(mask) if c < len(DEFAULT_CLASS_NAMES)]
        assert all(entry["label"][c] == 1 for c in labelled), "only labelled classes may appear"
        with Image.open(work / "pseudo_masks" / "confidence" / f"{entry['name']}.png") as confidence:
            assert confidence.size == (64, 64)


def test_evaluation_writes_the_cam_and_the_deeplab_rows(dataset: Path, work: Path):
    # the CAM row from the prototype variant: a prototype model around the trained classifier
    classifier = CAMClassifier(len(DEFAULT_CLASS_NAMES), backbone="resnet10t")
    classifier.load_state_dict(load_checkpoint(work / "models" / "cam_classifier.pt"))
    prototypes = F.normalize(torch.rand(len(DEFAULT_CLASS_NAMES), 2, classifier.num_features), dim=-1)
    prototype_model = PrototypeCAMClassifier(classifier, prototypes)
    save_checkpoint(prototype_model.state_dict(), work / "models" / "cam_prototypes.pt")
    common = ["--bundle_root", str(work), "--dataset_dir", str(dataset), *TINY]
    run_command(bundle_command(
        "run", "evaluating", "--config_file", configs("train_cam.json", "pseudo_masks.json"), *common,
        "--eval_split", "test", "--cam_variant", "prototype", "--num_prototypes", "2",
    ))
    run_command(bundle_command("run", "evaluating", "--config_file", configs("train.json", "evaluate.json"),
                               *common))
    for row in ("cam", "deeplab"):
        report = json.loads((work / "eval" / "test" / row / "segmentation_metrics.json").read_text())
        assert report["n_images"] == 4 and report["class_names"] == [*DEFAULT_CLASS_NAMES, "background"]
        for key in ("mIoU", "fwIoU", "mDice", "mBoundaryIoU"):
            assert 0.0 <= report[key] <= 1.0, (row, key)
        assert (work / "eval" / "test" / row / "segmentation_metrics_per_class.csv").is_file()


def test_whole_slide_inference_writes_class_map_overlay_and_areas(dataset: Path, work: Path, tmp_path: Path):
    output_dir = tmp_path / "slides"
    run_command(bundle_command(
        "run", "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(work),
        "--slides", str(dataset / "slide"), "--output_dir", str(output_dir), "--backbone", "resnet10t",
        "--patch_size", "64", "--batch_size", "4",
    ))
    with tifffile.TiffFile(output_dir / "slide_classes.tif") as tif:
        levels = [page.asarray() for page in tif.pages]
    assert levels[0].shape == (256, 320)  # level 1 of the slide: 1.0 um/px, as the patches
    assert levels[0].dtype == np.uint8 and levels[0].max() < NUM_LABELS
    with Image.open(output_dir / "slide_overlay.png") as overlay:
        assert overlay.mode == "RGB" and overlay.size[0] > overlay.size[1]
    areas = json.loads((output_dir / "slide_areas.json").read_text())
    assert areas["level"] == 1 and areas["mpp"] == [1.0, 1.0]
    assert list(areas["classes"]) == [*DEFAULT_CLASS_NAMES, "background"]
    pixels = sum(c["pixels"] for c in areas["classes"].values())
    assert pixels == 256 * 320
    for name, scores in areas["classes"].items():
        assert scores["area_mm2"] == pytest.approx(scores["pixels"] * 1e-6), name


def test_two_process_ddp_on_cpu(dataset: Path, work: Path, tmp_path: Path):
    """Stage 2 under torchrun with 2 CPU processes (gloo): rank 0 alone writes the weights."""
    ddp_work = tmp_path / "work"
    shutil.copytree(work / "pseudo_masks", ddp_work / "pseudo_masks")
    run_command([
        *TORCHRUN_2,
        "-m", "monai.bundle", "run", "training",
        "--config_file", configs("train.json", "multi_gpu_train.json"),
        "--bundle_root", str(ddp_work), "--dataset_dir", str(dataset), *TRAIN, "--batch_size", "2",
    ], OMP_NUM_THREADS="1")
    assert sorted(p.name for p in (ddp_work / "models").iterdir()) == ["checkpoint_latest.pt", "model.pt"]


# ------------------------------------------------------------------------------------------ bad inputs


def parsed(*names: str, **overrides) -> ConfigParser:
    """The merged configs as ``monai.bundle run`` sees them, with command-line style overrides."""
    parser = ConfigParser()
    parser.read_meta(str(CONFIGS / "metadata.json"))
    parser.read_config([str(CONFIGS / name) for name in names])
    for config_id, value in overrides.items():
        parser[config_id] = value
    return parser


def input_error(parser: ConfigParser, *ids: str) -> InputDataError:
    """The :class:`InputDataError` behind the failure of resolving ``ids`` in order (MONAI wraps it)."""
    with pytest.raises(Exception) as info:
        for config_id in ids:
            parser.get_parsed_content(config_id)
    error: BaseException | None = info.value
    while error is not None and not isinstance(error, InputDataError):
        error = error.__cause__
    assert error is not None, f"not an InputDataError: {info.value!r}"
    return error


@pytest.mark.parametrize(
    ("name", "problem"),
    [("patch.png", "file name has no label vector"), ("patch-[1 0].png", "has 2 entries; expected 4")],
)
def test_training_names_the_patch_with_a_bad_label_vector(tmp_path: Path, name: str, problem: str):
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    for file_name in ("good-[1 0 0 1].png", name):
        Image.new("RGB", (8, 8), (200, 120, 180)).save(train_dir / file_name)
    error = input_error(parsed("train_cam.json", train_dir=str(train_dir)), "train#datalist")
    assert error.path == str(train_dir / name) and problem in str(error)


def test_inference_names_an_unreadable_slide(work: Path, tmp_path: Path):
    broken = tmp_path / "slides" / "broken.tif"
    broken.parent.mkdir()
    broken.write_bytes(b"this is not a slide")
    parser = parsed("inference.json", bundle_root=str(work), slides=str(broken.parent), backbone="resnet10t",
                    output_dir=str(tmp_path / "out"))
    error = input_error(parser, "initialize", "run")
    assert error.path == str(broken) and "not a whole-slide image" in str(error)


def test_inference_names_the_slide_without_the_requested_level(dataset: Path, work: Path, tmp_path: Path):
    parser = parsed("inference.json", bundle_root=str(work), slides=str(dataset / "slide"),
                    backbone="resnet10t", output_dir=str(tmp_path / "out"), level=7)
    error = input_error(parser, "initialize", "run")
    assert error.path == str(dataset / "slide" / "slide.tif") and "level 7 does not exist" in str(error)


def test_unknown_cam_variant_is_refused():
    with pytest.raises(RuntimeError) as info:
        parsed("train_cam.json", cam_variant="prototypes").get_parsed_content("initialize")
    message = str(info.value.__cause__)
    assert "'prototypes' is not a valid value" in message and "did you mean 'prototype'" in message
