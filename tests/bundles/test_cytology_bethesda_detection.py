"""End-to-end runs of the cytology bundle's workflows on tiny synthetic smears and small networks."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from common.data.cytology import BETHESDA_CLASSES
from common.data.synthetic.smears import generate_smear_dataset
from common.writers.detections import DETECTION_COLUMNS
from tests.helpers import REPO_ROOT, bundle_command, run_command

pytestmark = pytest.mark.slow

BUNDLE = REPO_ROOT / "bundles" / "cytology_bethesda_detection"
CONFIGS = BUNDLE / "configs"
SMALL_NETWORKS = ["--detector_backbone", "resnet18", "--classifier_backbone", "efficientnet_b0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cytology")
    data = generate_smear_dataset(root / "data", n_train=2, n_val=1, n_test=1, size=256, seed=0)
    work = root / "work"
    run_command(bundle_command(
        "run", "training", "--config_file", str(CONFIGS / "train.json"), "--bundle_root", str(work),
        "--dataset_dir", str(data), "--stage", "both", "--pretrained", "False", "--num_workers", "0", "--progress", "False",
        *SMALL_NETWORKS, "--detect#input_size", "128", "--detect#epochs", "1", "--detect#batch_size", "2",
        "--classify#input_size", "64", "--classify#epochs", "1", "--classify#batch_size", "16",
    ))
    return data, work


def test_both_stages_write_their_weights(trained):
    _, work = trained
    for name in ("detector.pt", "detector_checkpoint_latest.pt", "classifier.pt", "classifier_checkpoint_latest.pt"):
        assert (work / "models" / name).is_file(), name


def test_unknown_stage_is_refused(trained):
    data, work = trained
    result = run_command(
        bundle_command("run", "training", "--config_file", str(CONFIGS / "train.json"), "--bundle_root", str(work),
                       "--dataset_dir", str(data), "--stage", "segment", "--pretrained", "False", *SMALL_NETWORKS),
        check=False,
    )
    assert result.returncode != 0 and "stage must be one of" in result.stdout + result.stderr


def test_evaluate_and_infer(trained, tmp_path):
    data, work = trained
    common = ["--bundle_root", str(work), "--num_workers", "0", "--patch_size", "[128,128]", "--conf", "0.01",
              "--classifier_input_size", "64", *SMALL_NETWORKS]
    run_command(bundle_command("run", "evaluating", "--config_file",
                               f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'evaluate.json'}']", "--dataset_dir", str(data), *common))
    detection = json.loads((work / "eval" / "test" / "detection_metrics.json").read_text())
    for key in ("mAP", "mAP50", "agnostic_mAP", "agnostic_mAP50", "recall"):
        assert 0.0 <= detection[key] <= 1.0, key
    classification = json.loads((work / "eval" / "test" / "classification_report.json").read_text())
    assert classification["n_samples"] > 0 and 0.0 <= classification["balanced_accuracy"] <= 1.0

    output_dir = tmp_path / "out"
    run_command(bundle_command("run", "--config_file", str(CONFIGS / "inference.json"),
                               "--input_dir", str(data / "test" / "images"), "--output_dir", str(output_dir), *common))
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


def test_two_process_ddp_on_cpu(tmp_path):
    """Both stages under torchrun with 2 CPU processes: distributed samplers (the classifier's weighted
    one included) and rank-0-only checkpoints."""
    data = generate_smear_dataset(tmp_path / "data", n_train=2, n_val=2, n_test=1, size=256, seed=1)
    work = tmp_path / "work"
    run_command([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
        "run", "training", "--config_file", f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']",
        "--bundle_root", str(work), "--dataset_dir", str(data), "--pretrained", "False", "--num_workers", "0",
        "--progress", "False", *SMALL_NETWORKS, "--detect#input_size", "128", "--detect#epochs", "1", "--detect#batch_size", "1",
        "--classify#input_size", "64", "--classify#epochs", "1", "--classify#batch_size", "8",
    ], OMP_NUM_THREADS="1")
    assert sorted(p.name for p in (work / "models").iterdir()) == [
        "classifier.pt", "classifier_checkpoint_latest.pt", "detector.pt", "detector_checkpoint_latest.pt"
    ]
