"""End-to-end runs of the angiography bundle's workflows on tiny synthetic angiograms and a one-block RoPE ViT.

The workflows run in this process through ``monai.bundle.run`` (a subprocess per run would spend most of
the time importing torch); the DDP test starts its own processes under torchrun with Gloo.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle import run as bundle_run
from PIL import Image

from common.bundle import weight_surgery
from common.data.angiography import CASS_CATEGORIES
from common.data.synthetic.angiography import generate_angiography_dataset
from common.errors import InputDataError
from common.io.checkpoint import extract_state_dict, load_checkpoint
from tests.helpers import REPO_ROOT, TORCHRUN_2, run_command

pytestmark = pytest.mark.slow

BUNDLE = REPO_ROOT / "bundles" / "angiography_cass_segmentation"
CONFIGS = BUNDLE / "configs"
SIZE = 64
TRUNK = {"depth": 1, "embed_dim": 32, "num_heads": 2}
PHASE_1 = {
    "img_size": SIZE, "decoder_channels": [16, 8, 8, 8, 8], "num_workers": 0, "progress": False, "epochs": 1,
    "batch_size": 2, **{f"network_def#{k}": v for k, v in TRUNK.items()},
}  # fmt: skip
SEGMENT_NET = {
    "img_size": SIZE, "num_workers": 0, "network_def#out_channels": 32,
    **{f"backbone_kwargs#{k}": v for k, v in TRUNK.items()},
}  # fmt: skip
VESSEL_NET = {
    f"vessels#network_def#{k}": v for k, v in {**TRUNK, "decoder_channels": [16, 8, 8, 8, 8]}.items()
}
SURGERY_RULES = [
    "--strip_prefix", "backbone.trunk.", "--add_prefix", "backbone.vit.trunk.",
    *(arg for prefix in ("head.", "project.", "stages.", "stem.", "fuse.") for arg in ("--drop", prefix)),
]  # fmt: skip


def _configs(*names: str, extra: Path | None = None) -> list[str]:
    return [str(CONFIGS / name) for name in names] + ([str(extra)] if extra else [])


def _run(workflow: str | None, configs: list[str], **overrides) -> None:
    bundle_run(run_id=workflow or "run", config_file=configs, **overrides)


def _messages(err: BaseException) -> str:
    """The messages of an exception and of every exception it was raised from."""
    messages = []
    while err is not None:
        messages.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(messages)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Synthetic data (4 train, 1 val, 1 test), phase 1, weight surgery, phase 2: one epoch each."""
    root = tmp_path_factory.mktemp("angiography")
    data, work = generate_angiography_dataset(root / "data", num_images=6, size=SIZE, seed=0), root / "work"
    network = root / "test_network.json"  # the tiny detector, as a file so that weight surgery builds it too
    network.write_text(json.dumps(SEGMENT_NET))
    _run("training", _configs("train_vessels.json"), bundle_root=str(work), dataset_dir=str(data), **PHASE_1)
    weight_surgery.main([
        "--checkpoint", str(work / "models" / "vessels.pt"), "--output", str(work / "models" / "segments_init.pt"),
        "--config_file", *_configs("train.json", extra=network), *SURGERY_RULES,
    ])  # fmt: skip
    _run(
        "training", _configs("train.json", extra=network), bundle_root=str(work), dataset_dir=str(data),
        epochs=1, progress=False,
    )  # fmt: skip
    return data, work, network


def test_metadata_lists_the_cass_categories_in_reader_order():
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    assert tuple(metadata["class_names"]) == CASS_CATEGORIES
    assert metadata["network_data_format"]["outputs"]["pred"]["num_channels"] == len(CASS_CATEGORIES) + 1


def test_phase_1_writes_the_best_vessel_model_and_vessel_scores(trained):
    _, work, _ = trained
    assert {"vessels.pt", "vessels_latest.pt"} <= {p.name for p in (work / "models").iterdir()}
    metrics = json.loads((work / "runs" / "vessels" / "vessel_metrics.json").read_text())
    assert 0.0 <= metrics["vessel_dice"] <= 1.0 and 0.0 <= metrics["vessel_cl_dice"] <= 1.0
    assert metrics["n_images"] == 1


def test_weight_surgery_carries_the_phase_1_trunk_into_phase_2(trained):
    """Every phase-2 trunk tensor comes from phase 1, unchanged, and the training config loads them."""
    _, work, network = trained
    vessels = extract_state_dict(load_checkpoint(work / "models" / "vessels.pt"))
    init = load_checkpoint(work / "models" / "segments_init.pt")
    trunk = {k: v for k, v in vessels.items() if k.startswith("backbone.trunk.")}
    assert trunk and sorted(init) == sorted(
        k.replace("backbone.trunk.", "backbone.vit.trunk.") for k in trunk
    )
    parser = ConfigParser()
    parser.read_config(_configs("train.json", extra=network))
    parser["bundle_root"] = str(work)
    parser.get_parsed_content("train#handlers#0")()  # the ModelWeightsLoader that starts phase 2
    state = parser.get_parsed_content("network").state_dict()
    for name, tensor in trunk.items():
        torch.testing.assert_close(state[name.replace("backbone.trunk.", "backbone.vit.trunk.")], tensor)


def test_phase_2_writes_checkpoints_and_segment_metrics(trained):
    _, work, _ = trained
    assert {"model.pt", "checkpoint_latest.pt"} <= {p.name for p in (work / "models").iterdir()}
    metrics = json.loads((work / "runs" / "segments" / "segment_metrics.json").read_text())
    assert metrics["n_images"] == 1 and 0.0 <= metrics["mean_segment_dice"] <= 1.0


def test_evaluation_reports_coco_ap_segment_dice_and_f1(trained):
    data, work, network = trained
    _run(
        "evaluating", _configs("inference.json", "evaluate.json", extra=network), bundle_root=str(work),
        eval_coco=str(data / "test" / "cass.json"), score_threshold=0.0,
    )  # fmt: skip
    report = json.loads((work / "eval" / "segment_metrics.json").read_text())
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"):
        assert report[key] is None or 0.0 <= report[key] <= 1.0, key
    assert 0.0 <= report["mean_segment_dice"] <= 1.0 and 0.0 <= report["mean_f1"] <= 1.0
    assert set(report["per_category"]) == set(CASS_CATEGORIES)
    assert report["n_images"] == 1 and report["n_references"] > 0


def _check_outputs(labels_path: Path, json_path: Path, overlay_path: Path, size: tuple[int, int]) -> None:
    with Image.open(labels_path) as image:
        labels = np.asarray(image)
    assert labels.shape == size and labels.dtype == np.uint8
    segments = json.loads(json_path.read_text())
    assert (segments["height"], segments["width"]) == size
    found = {s["label"] for s in segments["segments"]}
    assert set(np.unique(labels).tolist()) - {0} <= found <= set(range(1, 15))
    for segment in segments["segments"]:
        assert segment["name"] == CASS_CATEGORIES[segment["label"] - 1]
        assert segment["rle"]["size"] == list(size) and len(segment["box"]) == 4
    with Image.open(overlay_path) as overlay:
        # the legend sits beside the angiogram
        assert overlay.mode == "RGB" and overlay.height >= size[0] and overlay.width > size[1]


def test_folder_inference_writes_segments_labels_overlay_and_vessels(trained, tmp_path):
    data, work, network = trained
    _run(
        None, _configs("inference.json", "inference_vessels.json", extra=network), bundle_root=str(work),
        input_dir=str(data / "test" / "images"), output_dir=str(tmp_path), score_threshold=0.0, **VESSEL_NET,
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000_labels.png", "000_overlay.png", "000_segments.json", "000_vessels.png",
    ]  # fmt: skip
    _check_outputs(
        *(tmp_path / f"000_{s}" for s in ("labels.png", "segments.json", "overlay.png")), (SIZE, SIZE)
    )
    with Image.open(tmp_path / "000_vessels.png") as vessels:
        assert vessels.size == (SIZE, SIZE) and set(np.unique(np.asarray(vessels)).tolist()) <= {0, 255}


def test_single_dicom_image_inference_writes_where_asked(trained, tmp_path):
    """A DICOM angiogram of another size: outputs at its size, the label PNG at the given path."""
    data, work, network = trained
    dicom = data / "train" / "images" / "003.dcm"
    output = tmp_path / "result" / "segments.png"
    _run(
        None, _configs("inference.json", extra=network), bundle_root=str(work), image=str(dicom),
        output=str(output), score_threshold=0.0,
    )  # fmt: skip
    _check_outputs(
        output,
        output.with_name("segments_segments.json"),
        output.with_name("segments_overlay.png"),
        (SIZE, SIZE),
    )


def test_unknown_category_name_stops_phase_2_naming_the_file(trained, tmp_path):
    data, _, network = trained
    coco = json.loads((data / "train" / "cass.json").read_text())
    coco["categories"][0]["name"] = "first_diagonal"
    bad = data / "train" / "renamed.json"  # beside the images, which its file names are relative to
    bad.write_text(json.dumps(coco))
    with pytest.raises(Exception) as err:
        _run(
            "training", _configs("train.json", extra=network), bundle_root=str(tmp_path), train_coco=str(bad)
        )
    assert str(bad) in _messages(err.value) and "first_diagonal" in _messages(err.value)


def test_missing_image_stops_evaluation_naming_it(trained, tmp_path):
    data, work, network = trained
    coco = json.loads((data / "test" / "cass.json").read_text())
    coco["images"][0]["file_name"] = "images/absent.png"
    bad = data / "test" / "missing.json"
    bad.write_text(json.dumps(coco))
    with pytest.raises(Exception) as err:
        _run(
            "evaluating", _configs("inference.json", "evaluate.json", extra=network), bundle_root=str(work),
            eval_coco=str(bad), eval_dir=str(tmp_path),
        )  # fmt: skip
    assert "absent.png" in _messages(err.value)
    assert not list(tmp_path.iterdir())


def test_vessel_mask_of_another_size_stops_phase_1(trained, tmp_path):
    data, _, _ = trained
    masks = tmp_path / "masks"
    masks.mkdir()
    for mask in (data / "train" / "vessel_masks").iterdir():
        (masks / mask.name).write_bytes(mask.read_bytes())
    Image.new("L", (SIZE + 8, SIZE)).save(masks / "000.png")
    with pytest.raises(Exception) as err:
        _run(
            "training", _configs("train_vessels.json"), bundle_root=str(tmp_path), dataset_dir=str(data),
            train_mask_dir=str(masks), **PHASE_1,
        )  # fmt: skip
    assert str(masks / "000.png") in _messages(err.value) and "mask is" in _messages(err.value)


def test_checkpoint_matching_no_key_is_refused(trained, tmp_path):
    _, _, network = trained
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"encoder.layer.weight": torch.zeros(3)}, unrelated)
    output = tmp_path / "init.pt"
    with pytest.raises(InputDataError, match="no tensor matches"):
        weight_surgery.main([
            "--checkpoint", str(unrelated), "--output", str(output),
            "--config_file", *_configs("train.json", extra=network), *SURGERY_RULES,
        ])  # fmt: skip
    assert not output.exists()


def test_two_process_ddp_with_gloo_trains_phase_2(trained, tmp_path):
    """multi_gpu_train.json under torchrun on CPU: wrap_ddp, distributed samplers, rank-0 checkpoints."""
    _, _, network = trained
    # two validation images: one a rank
    data = generate_angiography_dataset(tmp_path / "data", num_images=10, size=SIZE, seed=1)
    work = tmp_path / "work"
    run_command([
        *TORCHRUN_2, "-m", "monai.bundle",
        "run", "training", "--config_file", str(_configs("train.json", "multi_gpu_train.json", extra=network)),
        "--bundle_root", str(work), "--dataset_dir", str(data), "--init_checkpoint", "", "--epochs", "1",
        "--progress", "False",
    ], OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")  # fmt: skip
    assert sorted(p.name for p in (work / "models").iterdir()) == ["checkpoint_latest.pt", "model.pt"]
    assert json.loads((work / "runs" / "segments" / "segment_metrics.json").read_text())["n_images"] == 2


@pytest.mark.parametrize("phase", ["train_vessels.json", "train.json"])
def test_multi_gpu_overlay_overrides_only_ids_both_phases_define(phase):
    """One multi_gpu_train.json serves both phases: every id it replaces exists in the phase's config."""
    overlay = json.loads((CONFIGS / "multi_gpu_train.json").read_text())
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / phase))
    replaced = [key for key in overlay if not key.startswith("+")]
    assert [key for key in replaced if key not in parser] == []


@pytest.mark.parametrize("img_size, smallest", [(672, 32), (256, 12), (128, 8)])
def test_training_and_inference_build_the_same_anchors_scaled_to_img_size(img_size, smallest):
    """Segments shrink with the image, so the anchors do too; inference must propose from the same ones."""
    sizes = []
    for name in ("train.json", "inference.json"):
        parser = ConfigParser()
        parser.read_config(_configs(name))
        parser.update({"img_size": img_size, **{f"backbone_kwargs#{k}": v for k, v in TRUNK.items()}})
        sizes.append(parser.get_parsed_content("network_def").rpn.anchor_generator.sizes)
    assert sizes[0] == sizes[1]
    assert sizes[0][0] == (smallest,)
    assert len(sizes[0]) == 5


@pytest.mark.parametrize("epochs, milestones", [(4, {3: 1}), (20, {15: 1, 18: 1}), (50, {37: 1, 45: 1})])
def test_learning_rate_drops_tenfold_once_per_milestone(epochs, milestones):
    """A short run must not stack both drops on one epoch (int(0.75 * 4) == int(0.9 * 4) == 3 gave 1e-2)."""
    parser = ConfigParser()
    parser.read_config(_configs("train.json"))
    parser.update(
        {"epochs": epochs, "img_size": SIZE, **{f"backbone_kwargs#{k}": v for k, v in TRUNK.items()}}
    )
    assert dict(parser.get_parsed_content("lr_scheduler").milestones) == milestones
