"""End-to-end runs of the DINOCell bundle's workflows on tiny synthetic data and a tiny ViT."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from common.bundle import score_cells
from common.data.synthetic.cells import generate_cell_dataset
from tests.helpers import REPO_ROOT, TORCHRUN_2, bundle_command, check_folder_inference_resumes, run_command

pytestmark = pytest.mark.slow

BUNDLE = REPO_ROOT / "bundles" / "microscopy_dinocell_segmentation"
CONFIGS = BUNDLE / "configs"
# a 2-block ViT with patch 8 and a narrow decoder: the tests are about wiring, not accuracy
TINY_NETWORK = [
    "--network_def#depth", "4", "--network_def#embed_dim", "32", "--network_def#num_heads", "2",
    "--network_def#decoder_channels", "[32,16,16,8]",
]
QUICK = ["--pretrained", "False", "--num_workers", "0", "--progress", "False", "--patch_size", "[64,64]"]


def configs(*names: str) -> str:
    return "[" + ",".join(f"'{CONFIGS / name}'" for name in names) + "]"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dinocell")
    generate_cell_dataset(root / "raw", n_train=4, n_val=2, n_test=2, size=(96, 96), seed=0)
    run_command([sys.executable, "-m", "common.data.cell_arrays", "--format", "cellpose", "--input", str(root / "raw"),
                 "--splits", "train", "val", "test", "--output", str(root / "arrays")])
    return root


@pytest.fixture(scope="module")
def pretrained_backbone(dataset: Path) -> Path:
    work = dataset / "work"
    run_command(bundle_command(
        "run", "pretraining", "--config_file", str(CONFIGS / "pretrain.json"), "--bundle_root", str(work),
        "--unlabelled_dir", str(dataset / "raw" / "train"), "--epochs", "1", "--batch_size", "2",
        "--global_size", "64", "--local_size", "32", "--n_local", "2", "--warmup_epochs", "1", "--out_dim", "64",
        "--head_def#hidden_dim", "64", "--head_def#bottleneck_dim", "32", "--num_workers", "0", "--progress", "False",
        "--backbone_def#depth", "4", "--backbone_def#embed_dim", "32", "--backbone_def#num_heads", "2",
    ))
    return work / "models" / "ssl_backbone.pt"


@pytest.fixture(scope="module")
def trained(dataset: Path, pretrained_backbone: Path) -> Path:
    """Fine-tune from the DINO backbone: proves pretrain.json's output loads into train.json."""
    work = dataset / "work"
    run_command(bundle_command(
        "run", "training", "--config_file", str(CONFIGS / "train.json"), "--bundle_root", str(work),
        "--dataset_dir", str(dataset / "arrays"), "--epochs", "2", "--warmup_iterations", "2",
        "--backbone_checkpoint", str(pretrained_backbone), "--freeze_backbone", "False", *QUICK, *TINY_NETWORK,
    ))
    return work


def test_training_writes_checkpoints_and_logs(trained: Path):
    assert (trained / "models" / "model.pt").is_file()
    assert any((trained / "runs").glob("events.out.tfevents.*")), "TensorBoard events missing"
    checkpoint = torch.load(trained / "models" / "checkpoint_latest.pt", weights_only=True)
    assert checkpoint["early_stop"]["best_step"] > 0, "the early-stopping state must survive --resume"


def test_resume_continues_training(dataset: Path, trained: Path):
    result = run_command(bundle_command(
        "run", "training", "--config_file", str(CONFIGS / "train.json"), "--bundle_root", str(trained),
        "--dataset_dir", str(dataset / "arrays"), "--epochs", "3", "--warmup_iterations", "2",
        "--freeze_backbone", "False", "--resume", "True", *QUICK, *TINY_NETWORK,
    ))
    log = result.stdout + result.stderr
    assert "resumed from" in log and "Epoch[3]" in log and "Epoch[1]" not in log


def test_few_images_recipe_stops_on_the_step_budget(dataset: Path, trained: Path, tmp_path: Path):
    """few_images.json from a trained model: 4 images at batch size 1 are 4 steps an epoch, so 6 steps end
    mid-way through a derived 2nd epoch."""
    work = tmp_path / "steps"
    result = run_command(bundle_command(
        "run", "training", "--config_file", configs("train.json", "few_images.json"), "--bundle_root", str(work),
        "--dataset_dir", str(dataset / "arrays"), "--init_weights", str(trained / "models" / "model.pt"),
        "--max_steps", "6", "--val_every_steps", "3", "--batch_size", "1", "--warmup_iterations", "2",
        "--early_stop_min_steps", "6", *QUICK, *TINY_NETWORK,
    ))
    log = result.stdout + result.stderr
    assert f"loaded weights from {trained / 'models' / 'model.pt'}" in log
    assert "reached max_steps=6" in log and "Epoch[2]" in log and "Epoch[3]" not in log
    state = torch.load(work / "models" / "checkpoint_latest.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 6


def test_tune_evaluate_baseline_and_infer(dataset: Path, trained: Path, tmp_path: Path):
    common_args = ["--bundle_root", str(trained), "--dataset_dir", str(dataset / "arrays"), *QUICK, *TINY_NETWORK]
    run_command(bundle_command("run", "tuning", "--config_file", configs("train.json", "evaluate.json", "tune_thresholds.json"),
                               "--cells_max_grid", "[0.4,0.6]", "--cell_fill_grid", "[0.1,0.2]", *common_args))
    thresholds = json.loads((trained / "models" / "watershed_thresholds.json").read_text())
    # the grids may have grown past an edge; the winner is one of the values searched
    assert thresholds["cells_max"] in thresholds["cells_max_grid"] and {0.4, 0.6} <= set(thresholds["cells_max_grid"])
    assert thresholds["cell_fill"] in thresholds["cell_fill_grid"] and {0.1, 0.2} <= set(thresholds["cell_fill_grid"])
    assert thresholds["smooth_sigma"] in (0.0, 1.0, 2.0)

    run_command(bundle_command("run", "evaluating", "--config_file", configs("train.json", "evaluate.json"), *common_args))
    run_command(bundle_command("run", "evaluating", "--config_file", configs("train.json", "evaluate.json", "baseline.json"), *common_args))
    for folder in ("test", "baseline_test"):
        summary = json.loads((trained / "eval" / folder / "ctc_metrics.json").read_text())
        for name in ("SEG", "DET", "OP_CSB"):
            assert 0.0 <= summary[name] <= 1.0
    baseline = json.loads((trained / "eval" / "baseline_test" / "ctc_metrics.json").read_text())
    assert baseline["DET"] > 0.2, "the classical baseline should find cells on the synthetic data"

    output_dir = tmp_path / "inference"
    run_command(bundle_command(
        "run", "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(trained),
        "--input_dir", str(dataset / "raw" / "test"), "--output_dir", str(output_dir), "--num_workers", "0",
        "--patch_size", "[64,64]", *TINY_NETWORK,
    ))
    images = sorted((dataset / "raw" / "test").glob("*_img.png"))
    for image in images:
        labels = tifffile.imread(next(output_dir.rglob(f"{image.stem}*instances*.tif")))
        assert labels.shape == (96, 96) and labels.dtype in (np.int32, np.uint16, np.uint32)
        assert next(output_dir.rglob(f"{image.stem}*overlay*.png")).is_file()
        with open(next(output_dir.rglob(f"{image.stem}*cells*.csv"))) as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(np.unique(labels[labels > 0]))


def test_folder_inference_survives_a_corrupt_image_and_resumes(dataset: Path, trained: Path, tmp_path: Path):
    """A corrupt image between two good ones: the good ones are written, the run fails naming it; a rerun
    skips the finished images and reports the bad one again; ``--overwrite True`` lists them again."""
    folder, output_dir = tmp_path / "images", tmp_path / "out"
    folder.mkdir()
    good = sorted((dataset / "raw" / "test").glob("*_img.png"))
    (folder / "a_img.png").write_bytes(good[0].read_bytes())
    (folder / "b_img.png").write_bytes(good[0].read_bytes()[:100])  # truncated
    (folder / "c_img.png").write_bytes(good[1].read_bytes())
    infer = bundle_command(
        "run", "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(trained),
        "--input_dir", str(folder), "--output_dir", str(output_dir), "--num_workers", "0",
        "--patch_size", "[64,64]", *TINY_NETWORK,
    )
    outputs = [f"{stem}_{kind}" for stem in ("a_img", "c_img") for kind in ("cells.csv", "instances.tif", "overlay.png")]
    check_folder_inference_resumes(
        infer, CONFIGS / "inference.json", folder, output_dir, outputs, "b_img.png", "a_img.png"
    )


def test_two_process_ddp_on_cpu(dataset: Path, tmp_path: Path):
    """torchrun with 2 CPU processes (gloo): both ranks train, rank 0 alone writes checkpoints."""
    work, logs = tmp_path / "work", tmp_path / "torchrun_logs"
    run_command([
        *TORCHRUN_2,
        "--log-dir", str(logs), "--tee", "3", "-m", "monai.bundle", "run", "training",
        "--config_file", configs("train.json", "multi_gpu_train.json"), "--bundle_root", str(work),
        "--dataset_dir", str(dataset / "arrays"), "--epochs", "1", "--warmup_iterations", "1", "--batch_size", "1",
        "--freeze_backbone", "False", *QUICK, *TINY_NETWORK,
    ], OMP_NUM_THREADS="1")
    rank_logs = {rank: "".join(p.read_text() for p in logs.rglob(f"*/{rank}/std*.log")) for rank in (0, 1)}
    for rank, text in rank_logs.items():
        assert "Epoch[1] Complete" in text, f"rank {rank} did not train:\n{text[-2000:]}"
    assert "saved training state" in rank_logs[0] and "saved training state" not in rank_logs[1]
    assert (work / "models" / "checkpoint_latest.pt").is_file() and (work / "models" / "model.pt").is_file()
    assert sorted(p.name for p in (work / "models").iterdir()) == ["checkpoint_latest.pt", "model.pt"]


def test_score_cells_scores_the_trained_bundle(dataset: Path, trained: Path, tmp_path: Path, capsys):
    """The LIVECell/Cellpose scoring command runs the bundle's inference.json on a Cellpose-layout test set."""
    tiny = list(zip(TINY_NETWORK[::2], TINY_NETWORK[1::2]))
    overrides = [arg for key, value in [("--patch_size", "[64,64]"), *tiny] for arg in ("--override", key[2:], value)]
    score_cells.main([
        "--bundle_root", str(trained), "--config_file", str(CONFIGS / "inference.json"), "--format", "cellpose",
        "--images", str(dataset / "raw" / "test"), "--output", str(tmp_path / "scores"), *overrides,
    ])
    summary = json.loads((tmp_path / "scores" / "scores.json").read_text())
    assert list(summary["per_cell_type"]) == ["cellpose"] and summary["overall"]["images"] == 2
    assert summary["overall"]["n_reference"] > 0 and "overall" in capsys.readouterr().out


def test_whole_slide_inference_over_a_folder_with_a_corrupt_slide(tmp_path: Path):
    """configs/wsi_inference.json on a tiny random-weight ViTUNet over a folder where a slide with a corrupt
    tile lies between two good ones: the good slides' instances, cells, overlay and summary are written, the
    bad one is in the batch summary and the exit status is non-zero; a rerun skips the finished slides."""
    from common.data.wsi import write_pyramid_tiff
    from common.networks.vit_unet import ViTUNet
    from tests.common.data.test_tile_reader import corrupt_tile

    bundle_root, folder, output_dir = tmp_path / "bundle", tmp_path / "slides", tmp_path / "out"
    (bundle_root / "models").mkdir(parents=True)
    torch.manual_seed(0)
    network = ViTUNet(pretrained=False, depth=4, embed_dim=32, num_heads=2, decoder_channels=[32, 16, 16, 8])
    torch.save(network.state_dict(), bundle_root / "models" / "model.pt")
    pixels = np.random.default_rng(0).integers(0, 256, (160, 192, 3), dtype=np.uint8)
    for name in ("a", "b_corrupt", "c"):
        write_pyramid_tiff(folder / f"{name}.tif", [pixels, pixels[::2, ::2]], mpp=0.5, tile_size=64)
    corrupt_tile(folder / "b_corrupt.tif", page=0, index=4)  # rows 64..127, columns 64..127
    infer = bundle_command(
        "run", "--config_file", str(CONFIGS / "wsi_inference.json"), "--bundle_root", str(bundle_root),
        "--slides", str(folder), "--output_dir", str(output_dir), "--patch_size", "64", "--band_rows", "32",
        "--max_cell_size", "16", "--workers", "0", *TINY_NETWORK,
    )
    first = run_command(infer, check=False)
    log = first.stdout + first.stderr
    assert first.returncode != 0 and "2 processed, 0 skipped (outputs complete), 1 failed" in log
    assert f"failed: {folder / 'b_corrupt.tif'}: tile at (y, x) = " in log
    kinds = ("cells.csv", "instances.tif", "overlay.png", "summary.json")
    assert sorted(p.name for p in output_dir.iterdir()) == sorted(f"{s}_{k}" for s in "ac" for k in kinds)
    summary = json.loads((output_dir / "a_summary.json").read_text())
    assert summary["tiles"] == {"processed": 3 * 4, "skipped": 0} and summary["shape"] == [160, 192]
    labels = tifffile.imread(output_dir / "a_instances.tif")
    assert labels.shape == (160, 192) and labels.dtype == np.uint32
    with open(output_dir / "a_cells.csv") as f:
        assert len(list(csv.DictReader(f))) == summary["cells"] == len(np.unique(labels[labels > 0]))
    again = run_command(infer, check=False)
    log = again.stdout + again.stderr
    assert again.returncode != 0 and "0 processed, 2 skipped (outputs complete), 1 failed" in log
