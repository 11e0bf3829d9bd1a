"""End-to-end runs of the cytology bundle's workflows on tiny synthetic smears and small networks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from monai.bundle import ConfigParser
from torch.utils.data import WeightedRandomSampler

from common.data.cytology import BETHESDA_CLASSES
from common.data.synthetic.smears import generate_smear_dataset, synthesize_smear
from common.data.wsi import write_pyramid_tiff
from common.errors import InputDataError
from common.io.checkpoint import save_checkpoint
from common.losses.logit_adjusted import LogitAdjustedCrossEntropy
from common.networks.centernet import CenterNet
from common.networks.timm_backbone import create_timm_model
from common.writers.detections import DETECTION_COLUMNS
from tests.common.data.test_tile_reader import corrupt_tile
from tests.helpers import REPO_ROOT, TORCHRUN_2, bundle_command, run_command

BUNDLE = REPO_ROOT / "bundles" / "cytology_bethesda_detection"
CONFIGS = BUNDLE / "configs"
SMALL_NETWORKS = ["--detector_backbone", "resnet18", "--classifier_backbone", "efficientnet_b0"]


TINY_TRAINING = [
    "--pretrained",
    "False",
    "--num_workers",
    "0",
    "--progress",
    "False",
    *SMALL_NETWORKS,
    "--detect#input_size",
    "128",
    "--detect#epochs",
    "1",
    "--detect#batch_size",
    "2",
    "--classify#input_size",
    "64",
    "--classify#epochs",
    "1",
    "--classify#batch_size",
    "16",
]


def parsed(*names: str, **overrides) -> ConfigParser:
    """The merged configs as ``monai.bundle run`` sees them, with command-line style overrides."""
    parser = ConfigParser()
    parser.read_meta(str(CONFIGS / "metadata.json"))
    parser.read_config([str(CONFIGS / name) for name in names])
    for config_id, value in overrides.items():
        parser[config_id] = value
    return parser


@pytest.fixture(scope="module")
def tiny_smears(tmp_path_factory) -> Path:
    return generate_smear_dataset(
        tmp_path_factory.mktemp("smears") / "data", n_train=2, n_val=1, n_test=0, size=256
    )


def imbalance_corrections(parser: ConfigParser) -> list[str]:
    """Which corrections for class imbalance the classifier's training applies."""
    corrections = []
    if isinstance(parser.get_parsed_content("classify#dataloader").sampler, WeightedRandomSampler):
        corrections.append("sampler")
    loss = parser.get_parsed_content("classify#loss")
    if isinstance(loss, LogitAdjustedCrossEntropy) or getattr(loss, "weight", None) is not None:
        corrections.append("loss")
    return corrections


def test_default_training_corrects_imbalance_once_in_the_loss(tiny_smears):
    """Sampler and class weights together suppress the majority class (NILM) twice: the default is
    the logit-adjusted loss over a uniformly shuffled loader, and the ablation's rows stay reachable."""
    overrides = {
        "dataset_dir": str(tiny_smears),
        "pretrained": False,
        "classifier_backbone": "resnet18",
        "num_workers": 0,
    }
    for names in (("train.json",), ("train.json", "quick.json")):
        parser = parsed(*names, **overrides)
        assert imbalance_corrections(parser) == ["loss"], names
        assert isinstance(parser.get_parsed_content("classify#loss"), LogitAdjustedCrossEntropy), names
    for demo in ("demo.json", "demo_full.json"):  # the demos measure the default, as the model card says
        (training,) = [
            step["command"]
            for step in json.loads((CONFIGS / demo).read_text())["steps"]
            if "training" in step["command"]
        ]
        assert not [
            arg for arg in training if arg.startswith(("--classify#loss", "--classify#balanced_sampler"))
        ], demo
    rows = {
        ("plain", False): [],
        ("plain", True): ["sampler"],
        ("weighted", False): ["loss"],
        ("weighted", True): ["sampler", "loss"],
    }
    for (loss_name, balanced), expected in rows.items():
        parser = parsed(
            "train.json",
            **overrides,
            **{"classify#loss_name": loss_name, "classify#balanced_sampler": balanced},
        )
        assert imbalance_corrections(parser) == expected, (loss_name, balanced)


def test_classifier_starts_from_a_local_weights_file(tmp_path):
    """An offline machine gets the pretrained start from a file: timm reads it (weights only) and
    replaces the 1000-class head by one for the 8 Bethesda classes."""
    source = timm.create_model("resnet18")
    torch.save(source.state_dict(), tmp_path / "resnet18_imagenet.pth")
    parser = parsed(
        "train.json",
        classifier_backbone="resnet18",
        pretrained=True,
        classifier_weights=str(tmp_path / "resnet18_imagenet.pth"),
        device=torch.device("cpu"),
    )
    classifier = parser.get_parsed_content("classifier_def")
    torch.testing.assert_close(classifier.conv1.weight, source.conv1.weight, rtol=0, atol=0)
    assert classifier.fc.out_features == len(BETHESDA_CLASSES)
    parser = parsed(
        "train.json",
        classifier_backbone="resnet18",
        pretrained=True,
        classifier_weights=str(tmp_path / "none.pth"),
    )
    with pytest.raises(RuntimeError, match="create_timm_model") as raised:  # never a silent random start
        parser.get_parsed_content("classifier_def")
    cause = raised.value.__cause__
    assert isinstance(cause, InputDataError) and cause.path.endswith("none.pth"), cause


def assert_same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], label: str) -> None:
    assert first.keys() == second.keys(), label
    for key, tensor in first.items():
        assert torch.equal(tensor, second[key]), f"{label}: {key} differs"


@pytest.mark.slow
def test_same_command_gives_the_same_weights(tiny_smears, tmp_path):
    """Seeded samplers, loaders and deterministic algorithms: two runs of one command train both
    stages to identical weights, and ``--stage classify`` alone trains the classifier of ``--stage both``
    (each stage reseeds when it starts), which the model card's ablation rows rely on."""
    weights = {}
    for run, stage in (("first", "both"), ("second", "both"), ("classify", "classify")):
        work = tmp_path / run
        run_command(
            bundle_command(
                "run",
                "training",
                "--config_file",
                str(CONFIGS / "train.json"),
                "--bundle_root",
                str(work),
                "--dataset_dir",
                str(tiny_smears),
                "--stage",
                stage,
                *TINY_TRAINING,
            )
        )
        names = ("detector.pt", "classifier.pt") if stage == "both" else ("classifier.pt",)
        weights[run] = {name: torch.load(work / "models" / name, weights_only=True) for name in names}
    for name in ("detector.pt", "classifier.pt"):
        assert_same_weights(weights["first"][name], weights["second"][name], f"{name}, second run")
    assert_same_weights(
        weights["first"]["classifier.pt"], weights["classify"]["classifier.pt"], "--stage classify"
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cytology")
    data = generate_smear_dataset(root / "data", n_train=2, n_val=1, n_test=1, size=256, seed=0)
    work = root / "work"
    run_command(
        bundle_command(
            "run",
            "training",
            "--config_file",
            str(CONFIGS / "train.json"),
            "--bundle_root",
            str(work),
            "--dataset_dir",
            str(data),
            "--stage",
            "both",
            *TINY_TRAINING,
        )
    )
    return data, work


@pytest.mark.slow
def test_both_stages_write_their_weights(trained):
    _, work = trained
    for name in (
        "detector.pt",
        "detector_checkpoint_latest.pt",
        "classifier.pt",
        "classifier_checkpoint_latest.pt",
    ):
        assert (work / "models" / name).is_file(), name


@pytest.mark.slow
def test_unknown_stage_is_refused(trained):
    data, work = trained
    result = run_command(
        bundle_command(
            "run",
            "training",
            "--config_file",
            str(CONFIGS / "train.json"),
            "--bundle_root",
            str(work),
            "--dataset_dir",
            str(data),
            "--stage",
            "segment",
            "--pretrained",
            "False",
            *SMALL_NETWORKS,
        ),
        check=False,
    )
    assert result.returncode != 0 and "stage must be one of" in result.stdout + result.stderr


@pytest.mark.slow
def test_evaluate_and_infer(trained, tmp_path):
    data, work = trained
    common = [
        "--bundle_root",
        str(work),
        "--num_workers",
        "0",
        "--patch_size",
        "[128,128]",
        "--conf",
        "0.01",
        "--classifier_input_size",
        "64",
        *SMALL_NETWORKS,
    ]
    run_command(
        bundle_command(
            "run",
            "evaluating",
            "--config_file",
            f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'evaluate.json'}']",
            "--dataset_dir",
            str(data),
            *common,
        )
    )
    detection = json.loads((work / "eval" / "test" / "detection_metrics.json").read_text())
    for key in ("mAP", "mAP50", "agnostic_mAP", "agnostic_mAP50", "recall"):
        assert 0.0 <= detection[key] <= 1.0, key
    classification = json.loads((work / "eval" / "test" / "classification_report.json").read_text())
    assert classification["n_samples"] > 0 and 0.0 <= classification["balanced_accuracy"] <= 1.0
    assert classification["screening"]["abnormal_classes"] == ["ASCUS", "LSIL", "HSIL", "ASCH", "SCC"]
    assert (
        (work / "eval" / "test" / "screening_per_image.csv")
        .read_text()
        .startswith("image,cells,true_abnormal")
    )

    output_dir = tmp_path / "out"
    run_command(
        bundle_command(
            "run",
            "--config_file",
            str(CONFIGS / "inference.json"),
            "--input_dir",
            str(data / "test" / "images"),
            "--output_dir",
            str(output_dir),
            *common,
        )
    )
    (csv_file,) = output_dir.glob("detections_*.csv")
    with open(csv_file, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == DETECTION_COLUMNS
        rows = list(reader)
    assert rows, "a detector at conf 0.01 finds something"
    for row in rows:
        assert row["image_filename"] == "000.png" and row["class"] in BETHESDA_CLASSES
        assert 0.0 <= float(row["conf"]) <= 1.0 and float(row["width"]) == 100.0
    assert (output_dir / "overlays" / "000_overlay.png").is_file()


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    """Both stages under torchrun with 2 CPU processes: distributed samplers (the classifier's default
    uniform one; the weighted one of ``--classify#balanced_sampler True`` is not run here) and rank-0-only
    checkpoints."""
    data = generate_smear_dataset(tmp_path / "data", n_train=2, n_val=2, n_test=1, size=256, seed=1)
    work = tmp_path / "work"
    run_command(
        [
            *TORCHRUN_2,
            "-m",
            "monai.bundle",
            "run",
            "training",
            "--config_file",
            f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']",
            "--bundle_root",
            str(work),
            "--dataset_dir",
            str(data),
            *TINY_TRAINING,
            # one smear per rank and step for the detector, a smaller classifier batch per rank (the last wins)
            "--detect#batch_size",
            "1",
            "--classify#batch_size",
            "8",
        ],
        OMP_NUM_THREADS="1",
    )
    assert sorted(p.name for p in (work / "models").iterdir()) == [
        "classifier.pt",
        "classifier_checkpoint_latest.pt",
        "detector.pt",
        "detector_checkpoint_latest.pt",
    ]


@pytest.mark.slow
def test_whole_smear_inference_survives_a_corrupt_slide_and_resumes(tmp_path):
    """``wsi_inference.json`` over a folder of pyramidal smear scans with a corrupt one between two good
    ones, with tiny random-weight networks: the good slides get their CSV, overlay and summary, the bad
    one is named in the batch summary and the exit status is non-zero; a rerun skips the finished slides
    and ``--overwrite True`` would redo them."""
    torch.manual_seed(0)
    work = tmp_path / "work"
    save_checkpoint(CenterNet("resnet18", pretrained=False).state_dict(), work / "models" / "detector.pt")
    classifier = create_timm_model("efficientnet_b0", pretrained=False, num_classes=len(BETHESDA_CLASSES))
    save_checkpoint(classifier.state_dict(), work / "models" / "classifier.pt")
    slides = tmp_path / "slides"
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        pixels, _ = synthesize_smear(rng, ["NILM", "HSIL", "INFL"], size=512)
        write_pyramid_tiff(slides / f"{name}.tif", [pixels, pixels[::2, ::2]], mpp=0.25, tile_size=128)
    corrupt_tile(slides / "b.tif", page=0, index=5)  # TIFF tile (1, 1): rows and columns 128..255
    output_dir = tmp_path / "out"
    infer = bundle_command(
        "run",
        "--config_file",
        str(CONFIGS / "wsi_inference.json"),
        "--bundle_root",
        str(work),
        "--slides",
        str(slides),
        "--output_dir",
        str(output_dir),
        *SMALL_NETWORKS,
        "--patch_size",
        "256",
        "--overlap",
        "0.5",
        "--box_size",
        "48",
        "--classifier_input_size",
        "64",
        "--conf",
        "0.0",
        "--top_k",
        "5",
        "--min_tissue_fraction",
        "0.0",
        "--thumbnail_size",
        "128",
    )
    first = run_command(infer, check=False)
    log = first.stdout + first.stderr
    assert first.returncode != 0 and f"InputDataError: {slides / 'b.tif'}: tile at (y, x) = (0, 0)" in log
    assert "2 processed, 0 skipped (outputs complete), 1 failed" in log
    assert sorted(p.name for p in output_dir.iterdir()) == [
        f"{stem}_{kind}" for stem in ("a", "c") for kind in ("detections.csv", "overlay.png", "summary.json")
    ]
    for stem in ("a", "c"):
        summary = json.loads((output_dir / f"{stem}_summary.json").read_text())
        assert summary["level"] == 0 and summary["tiles"] == {"processed": 9, "skipped": 0}
        assert summary["cells"] == sum(summary["classes"].values()) > 0
        assert list(summary["classes"]) == list(BETHESDA_CLASSES)
        with open(output_dir / f"{stem}_detections.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == summary["cells"] and tuple(rows[0]) == (*DETECTION_COLUMNS, "x_um", "y_um")
        for row in rows:
            assert row["image_filename"] == f"{stem}.tif" and row["class"] in BETHESDA_CLASSES
            assert 0 <= float(row["x"]) < 512 and float(row["x_um"]) == pytest.approx(
                float(row["x"]) / 4, abs=0.01
            )
    again = run_command(infer, check=False)
    log = again.stdout + again.stderr
    assert again.returncode != 0 and f"{slides / 'a.tif'}: outputs complete, skipped" in log
    assert "0 processed, 2 skipped (outputs complete), 1 failed" in log and str(slides / "b.tif") in log
    parser = parsed("wsi_inference.json", output_dir=str(output_dir), overwrite=True)
    assert parser.get_parsed_content("is_done") is None  # every slide is processed again
    networks = {"detector_backbone": "resnet18", "classifier_backbone": "efficientnet_b0"}
    is_done = parsed("wsi_inference.json", output_dir=str(output_dir), **networks).get_parsed_content(
        "is_done"
    )
    assert is_done(slides / "a.tif") and not is_done(slides / "b.tif")
