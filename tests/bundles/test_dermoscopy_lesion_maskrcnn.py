"""End-to-end runs of the dermoscopy bundle's workflows on tiny synthetic images and a ViT-Tiny."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.data.dermoscopy import read_isic_folder
from common.data.mask_to_coco import split_and_write
from common.data.synthetic.dermoscopy import generate_dermoscopy_dataset
from tests.helpers import REPO_ROOT, TORCHRUN_2, bundle_command, check_folder_inference_resumes, run_command

pytestmark = pytest.mark.slow

BUNDLE = REPO_ROOT / "bundles" / "dermoscopy_lesion_maskrcnn"
CONFIGS = BUNDLE / "configs"
SIZE = 64
TINY_VIT = ["--vit", "vit_tiny_patch16_224", "--num_workers", "0"]
SMALL_DETECTOR = [*TINY_VIT, "--working_size", str(SIZE), "--max_size", str(2 * SIZE)]
INFERENCE = [*SMALL_DETECTOR, "--inference_size", str(SIZE)]


def _pretrain(dataset: Path, work: Path, *extra: str) -> None:
    run_command(bundle_command(
        "run", "pretraining", "--config_file", str(CONFIGS / "pretrain.json"), "--bundle_root", str(work),
        "--unlabelled_dir", str(dataset), "--image_size", str(SIZE), "--epochs", "1", "--batch_size", "4",
        "--warmup_epochs", "1", "--progress", "False", "--picture_interval", "1",
        "--network_def#decoder_dim", "64", "--network_def#decoder_depth", "1", "--network_def#decoder_heads", "4",
        *TINY_VIT, *extra,
    ))


def _train_args(data: Path, work: Path) -> list[str]:
    return [
        "--bundle_root", str(work), "--image_dir", str(data / "isic" / "labelled"), "--coco_dir", str(data / "coco"),
        "--train_sizes", f"[{SIZE}]", "--epochs", "1", "--batch_size", "2", "--progress", "False", *SMALL_DETECTOR,
    ]


def _dataset(root: Path, seed: int = 0, n_labelled: int = 6) -> Path:
    generate_dermoscopy_dataset(root / "isic", n_labelled=n_labelled, n_unlabelled=2, size=SIZE, seed=seed)
    split_and_write(read_isic_folder(root / "isic" / "labelled"), root / "coco", image_root=root / "isic" / "labelled")
    generate_dermoscopy_dataset(root / "test", n_labelled=2, n_unlabelled=0, size=SIZE, seed=seed + 1)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """MAE pretraining, then Mask R-CNN fine-tuning from the saved encoder, one epoch each."""
    root = tmp_path_factory.mktemp("dermoscopy")
    data = _dataset(root / "data")
    work = root / "work"
    _pretrain(data / "isic", work)
    run_command(bundle_command(
        "run", "training", "--config_file", str(CONFIGS / "train.json"), *_train_args(data, work),
        "--backbone_checkpoint", str(work / "models" / "ssl_vit_backbone.pt"),
    ))
    return data, work


def test_pretraining_saves_a_timm_loadable_encoder_and_reconstructions(trained):
    _, work = trained
    import timm

    from common.io.checkpoint import extract_state_dict, load_checkpoint

    state = extract_state_dict(load_checkpoint(work / "models" / "ssl_vit_backbone.pt"))
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=SIZE)
    vit.load_state_dict(state)  # strict: every encoder tensor is there, and nothing else
    assert list((work / "runs" / "pretrain").glob("*.png")), "reconstruction pictures"


def test_fine_tuning_starts_from_the_pretrained_encoder(trained, tmp_path):
    """The detector's ViT is the MAE encoder before fine-tuning moves it."""
    data, work = trained
    fresh = tmp_path / "fresh"
    run_command(bundle_command(
        "run", "training", "--config_file", str(CONFIGS / "train.json"), *_train_args(data, fresh),
        "--backbone_checkpoint", str(work / "models" / "ssl_vit_backbone.pt"),
        "--run", f"$[torch.save(@network.state_dict(), '{tmp_path / 'initial.pt'}')]",
    ))
    from common.io.checkpoint import extract_state_dict, load_checkpoint

    encoder = extract_state_dict(load_checkpoint(work / "models" / "ssl_vit_backbone.pt"))
    initial = torch.load(tmp_path / "initial.pt", weights_only=True)
    for name, tensor in encoder.items():
        if name != "pos_embed":  # pretrained at 64 px, resampled to the detector's 224 px grid
            torch.testing.assert_close(initial[f"backbone.vit.{name}"], tensor)
    torch.testing.assert_close(initial["backbone.vit.pos_embed"][:, 0], encoder["pos_embed"][:, 0])


def test_the_same_commands_give_the_same_weights(trained, tmp_path):
    """Pretraining and fine-tuning rerun from the same seed end at exactly the same weights."""
    data, work = trained
    again = tmp_path / "again"
    _pretrain(data / "isic", again)
    run_command(bundle_command(
        "run", "training", "--config_file", str(CONFIGS / "train.json"), *_train_args(data, again),
        "--backbone_checkpoint", str(again / "models" / "ssl_vit_backbone.pt"),
    ))
    from common.io.checkpoint import extract_state_dict, load_checkpoint

    for name, key in (("ssl_vit_backbone.pt", None), ("checkpoint_latest.pt", "network")):
        first = extract_state_dict(load_checkpoint(work / "models" / name), key)
        second = extract_state_dict(load_checkpoint(again / "models" / name), key)
        assert first.keys() == second.keys()
        for tensor_name, tensor in first.items():
            assert torch.equal(tensor, second[tensor_name]), f"{name}: {tensor_name} differs between runs"


def test_training_writes_best_and_latest_checkpoints_and_validation_metrics(trained):
    _, work = trained
    assert {"model.pt", "checkpoint_latest.pt"} <= {p.name for p in (work / "models").iterdir()}
    metrics = json.loads((work / "runs" / "train" / "lesion_metrics.json").read_text())
    for key in ("segm_AP", "segm_AP50", "bbox_AP", "jaccard", "dice", "thresholded_jaccard"):
        assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0, key


def test_evaluate_reports_coco_and_isic_scores(trained):
    data, work = trained
    run_command(bundle_command(
        "run", "evaluating", "--config_file", f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'evaluate.json'}']",
        "--bundle_root", str(work), "--eval_image_dir", str(data / "test" / "labelled"), *INFERENCE,
    ))
    metrics = json.loads((work / "eval" / "lesion_metrics.json").read_text())
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"):
        assert key in metrics
    for key in ("jaccard", "dice", "thresholded_jaccard"):
        assert 0.0 <= metrics[key] <= 1.0
    rows = (work / "eval" / "per_image.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # header and the two test images


def test_single_image_command_writes_a_binary_mask_at_the_input_size(trained, tmp_path):
    data, work = trained
    image = tmp_path / "scan.jpg"
    Image.open(data / "test" / "labelled" / "ISIC_0000000.jpg").resize((80, 72)).save(image)
    output = tmp_path / "result" / "mask.png"
    run_command(bundle_command(
        "run", "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(work),
        "--image", str(image), "--output", str(output), *INFERENCE,
    ))
    with Image.open(output) as mask:
        assert mask.size == (80, 72) and mask.mode == "L"
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
    assert (output.parent / "mask_overlay.png").is_file()


def test_folder_inference_writes_one_mask_and_overlay_per_image(trained, tmp_path):
    data, work = trained
    run_command(bundle_command(
        "run", "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(work),
        "--input_dir", str(data / "test" / "labelled"), "--output_dir", str(tmp_path), *INFERENCE,
    ))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ISIC_0000000_mask.png", "ISIC_0000000_overlay.png", "ISIC_0000001_mask.png", "ISIC_0000001_overlay.png",
    ]  # the ground-truth *_segmentation.png files beside the images are not inputs


def test_folder_inference_survives_a_corrupt_image_and_resumes(trained, tmp_path):
    """A corrupt image between two good ones: the good ones are written, the run fails naming it; a rerun
    skips the finished images and reports the bad one again; ``--overwrite True`` lists them again."""
    data, work = trained
    folder, output_dir = tmp_path / "images", tmp_path / "out"
    folder.mkdir()
    for name, source in (("a", "ISIC_0000000.jpg"), ("c", "ISIC_0000001.jpg")):
        (folder / f"{name}.jpg").write_bytes((data / "test" / "labelled" / source).read_bytes())
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff truncated")
    infer = bundle_command(
        "run", "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(work),
        "--input_dir", str(folder), "--output_dir", str(output_dir), *INFERENCE,
    )
    outputs = ["a_mask.png", "a_overlay.png", "c_mask.png", "c_overlay.png"]
    check_folder_inference_resumes(infer, CONFIGS / "inference.json", folder, output_dir, outputs, "b.jpg", "a.jpg")


def test_unreadable_image_is_named_in_the_error(trained, tmp_path):
    _, work = trained
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    result = run_command(bundle_command(
        "run", "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(work),
        "--image", str(broken), "--output", str(tmp_path / "mask.png"), *INFERENCE,
    ), check=False)
    assert result.returncode != 0 and str(broken) in result.stderr
    assert not (tmp_path / "mask.png").exists()


def test_evaluation_refuses_an_image_without_its_mask(trained, tmp_path):
    data, work = trained
    folder = tmp_path / "test"
    folder.mkdir()
    for name in ("ISIC_0000000.jpg", "ISIC_0000000_segmentation.png", "ISIC_0000001.jpg"):
        (folder / name).write_bytes((data / "test" / "labelled" / name).read_bytes())
    result = run_command(bundle_command(
        "run", "evaluating", "--config_file", f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'evaluate.json'}']",
        "--bundle_root", str(work), "--eval_image_dir", str(folder), *INFERENCE,
    ), check=False)
    assert result.returncode != 0
    assert "ISIC_0000001_segmentation.png" in result.stderr


def test_missing_coco_split_is_named_in_the_error(tmp_path):
    data = tmp_path / "data"
    generate_dermoscopy_dataset(data / "isic", n_labelled=2, n_unlabelled=0, size=SIZE, seed=0)
    result = run_command(bundle_command(
        "run", "training", "--config_file", str(CONFIGS / "train.json"), *_train_args(data, tmp_path / "work"),
        "--backbone_checkpoint", "",
    ), check=False)
    assert result.returncode != 0
    assert str(data / "coco" / "train.json") in result.stderr and "not found" in result.stderr


def test_two_process_ddp_on_cpu(tmp_path):
    """MAE-free fine-tuning under torchrun with 2 CPU processes: distributed samplers, gathered
    validation metrics and rank-0-only checkpoints."""
    data = _dataset(tmp_path / "data", seed=3, n_labelled=10)  # two validation images, one per rank
    work = tmp_path / "work"
    run_command([
        *TORCHRUN_2, "-m", "monai.bundle",
        "run", "training", "--config_file", f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']",
        *_train_args(data, work), "--backbone_checkpoint", "", "--batch_size", "1",
    ], OMP_NUM_THREADS="1")
    assert sorted(p.name for p in (work / "models").iterdir()) == ["checkpoint_latest.pt", "model.pt"]
    assert json.loads((work / "runs" / "train" / "lesion_metrics.json").read_text())["jaccard"] is not None
