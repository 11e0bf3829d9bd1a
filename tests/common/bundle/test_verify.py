"""Tests for common.bundle.verify on small fixture bundles built in tmp_path."""

from __future__ import annotations

import copy
import json
import socket
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import timm.models._builder

from common.bundle.verify import CheckResult, VerificationReport, load_metadata_schema, main, verify_bundle
from common.networks.timm_backbone import create_timm_model

TENSOR = {
    "type": "image",
    "format": "magnitude",
    "dtype": "float32",
    "value_range": [0, 1],
    "is_patch_data": False,
}
METADATA = {
    "version": "0.1.0",
    "changelog": {"0.1.0": "first version"},
    "monai_version": "1.6.1",
    "pytorch_version": "2.15.0",
    "numpy_version": "2.2.0",
    "name": "Tiny segmentation",
    "task": "2D foreground segmentation",
    "description": "A tiny BasicUNet used to test the bundle verifier.",
    "authors": "tests",
    "copyright": "Copyright (c) tests",
    "intended_use": "tests only",
    "eval_metrics": {"mean_dice": 0.5},
    "references": ["Falk et al. U-Net: deep learning for cell counting. Nature Methods 2019"],
    "network_data_format": {
        "inputs": {
            "image": {
                **TENSOR,
                "num_channels": 1,
                "spatial_shape": ["16*n", "16*n"],
                "channel_def": {"0": "image"},
            }
        },
        "outputs": {
            "pred": {
                **TENSOR,
                "format": "segmentation",
                "num_channels": 2,
                "spatial_shape": ["16*n", "16*n"],
                "channel_def": {"0": "background", "1": "cell"},
            }
        },
    },
}
NETWORK = {
    "_target_": "BasicUNet",
    "spatial_dims": 2,
    "in_channels": "@_meta_#network_data_format#inputs#image#num_channels",
    "out_channels": 2,
    "features": [4, 4, 8, 8, 8, 4],
}
TRAIN = {
    "bundle_root": ".",
    "device": "$torch.device('cpu')",
    "network_def": NETWORK,
    "network": "$@network_def.to(@device)",
    "loss": {"_target_": "DiceLoss", "softmax": True, "to_onehot_y": True},
    "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 0.001},
    "train": {
        "handlers": [{"_target_": "StatsHandler", "tag_name": "train_loss"}],
        "trainer": {
            "_target_": "SupervisedTrainer",
            "device": "@device",
            "max_epochs": 1,
            "train_data_loader": "$[]",
            "network": "@network",
            "optimizer": "@optimizer",
            "loss_function": "@loss",
            "train_handlers": "@train#handlers",
        },
    },
    "training": ["$@train#trainer.run()"],
}
EVALUATE = {
    "validate": {
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "$[]",
            "network": "@network",
        }
    },
    "run": ["$@validate#evaluator.run()"],
}
INFERENCE = {
    "bundle_root": ".",
    "device": "$torch.device('cpu')",
    "network_def": NETWORK,
    "network": "$@network_def.to(@device)",
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32]},
}
MULTI_GPU = {"network": "$torch.nn.parallel.DistributedDataParallel(@network_def.to(@device))"}
UNSCRIPTABLE_MODULE = '''
import torch


class Unscriptable(torch.nn.Conv2d):
    def forward(self, x, *extra):  # TorchScript rejects variadic arguments
        return super().forward(x)


class SizeBaked(Unscriptable):
    def forward(self, x, *extra):  # a trace keeps the branch taken on the size it was traced on
        return super().forward(x) * (1.0 if x.shape[-1] == 32 else 2.0)
'''


@pytest.fixture
def files() -> dict[str, Any]:
    """The files of a valid bundle, relative path -> JSON content or text; tests edit them before writing."""
    contents = {
        "configs/metadata.json": METADATA,
        "configs/train.json": TRAIN,
        "configs/evaluate.json": EVALUATE,
        "configs/inference.json": INFERENCE,
        "configs/multi_gpu_train.json": MULTI_GPU,
        "configs/logging.conf": "[loggers]\nkeys=root\n",
        "docs/README.md": "# Tiny segmentation\n",
        "LICENSE": "Apache-2.0\n",
    }
    return {name: copy.deepcopy(content) for name, content in contents.items()}  # no sharing between files


def write_bundle(root: Path, files: dict[str, Any]) -> Path:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
    return root


def config(bundle: Path, name: str) -> Path:
    return bundle / "configs" / name


def check(report: VerificationReport, name: str) -> CheckResult:
    return next(result for result in report.checks if result.name == name)


def failures(bundle: Path, export: bool = False, **kwargs: Any) -> dict[str, str]:
    """Check name -> message of every failed check."""
    report = verify_bundle(bundle, export=export, **kwargs)
    return {result.name: result.message for result in report.checks if not result.ok}


def test_schema_is_valid_draft_2020_12_and_accepts_the_fixture():
    schema = load_metadata_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(METADATA, schema, cls=jsonschema.Draft202012Validator)


def test_valid_bundle_passes_every_check(tmp_path, files):
    report = verify_bundle(write_bundle(tmp_path / "tiny", files))
    assert report.ok, report.format()
    assert [result.name for result in report.checks] == [
        "required files",
        "metadata schema",
        "version in changelog",
        "configs parse",
        "targets resolve",
        "references resolve",
        "network in/out",
        "torchscript export",
    ]
    assert check(report, "network in/out").message == (
        "(1, 1, 32, 32) -> (1, 2, 32, 32), (1, 1, 48, 48) -> (1, 2, 48, 48); torch.float32 -> torch.float32"
    )
    message = check(report, "torchscript export").message
    assert message == "ckpt_export (scripted) output matches the eager network"
    assert "FAIL" not in report.format()


def test_broken_target_is_reported_once_with_file_and_id(tmp_path, files):
    files["configs/train.json"]["train"]["handlers"][0]["_target_"] = "common.networks.does_not_exist.Net"
    bundle = write_bundle(tmp_path / "tiny", files)
    # evaluate.json is merged over train.json, yet the error is train.json's and is reported once
    assert failures(bundle) == {
        "targets resolve": f"{config(bundle, 'train.json')}: train#handlers#0#_target_ = "
        "common.networks.does_not_exist.Net does not resolve to an importable class or function"
    }


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda meta: meta["network_data_format"]["inputs"]["image"].update(num_channels="3"),
            "network_data_format.inputs.image.num_channels: '3' is not of type 'integer'",
        ),
        (
            lambda meta: meta.update(eval_metrics={"dice": "high"}),
            "eval_metrics.dice: 'high' is not of type 'number'",
        ),
        (
            lambda meta: meta.pop("intended_use"),
            "(top level): 'intended_use' is a required property",
        ),
        (
            lambda meta: meta.update(torchscript={"exportable": False}),
            "torchscript: 'reason' is a required property",
        ),
    ],
)
def test_metadata_schema_violation_names_file_and_json_path(tmp_path, files, edit, expected):
    edit(files["configs/metadata.json"])
    bundle = write_bundle(tmp_path / "tiny", files)
    assert failures(bundle)["metadata schema"] == f"{config(bundle, 'metadata.json')}: {expected}"


@pytest.mark.filterwarnings("ignore:Detected deprecated name:UserWarning")  # MONAI's own notice of the same
def test_deprecated_metadata_key_clashing_with_its_replacement(tmp_path, files):
    files["configs/metadata.json"]["required_packages_version"] = {"timm": "1.0.20"}
    files["configs/metadata.json"]["optional_packages_version"] = {"tqdm": "4.66.0"}
    bundle = write_bundle(tmp_path / "tiny", files)
    assert failures(bundle)["metadata schema"].startswith(
        f"{config(bundle, 'metadata.json')}: optional_packages_version: "
        "MONAI reads it as the deprecated name of required_packages_version"
    )


def test_version_missing_from_changelog(tmp_path, files):
    files["configs/metadata.json"]["version"] = "0.2.0"
    bundle = write_bundle(tmp_path / "tiny", files)
    assert failures(bundle) == {
        "version in changelog": f"{config(bundle, 'metadata.json')}: "
        "version '0.2.0' has no entry in changelog"
    }


def test_missing_required_file(tmp_path, files):
    del files["docs/README.md"]
    bundle = write_bundle(tmp_path / "tiny", files)
    assert failures(bundle) == {"required files": f"{bundle / 'docs' / 'README.md'}: missing"}


def test_invalid_json_config_is_named_and_other_configs_still_checked(tmp_path, files):
    files["configs/evaluate.json"] = '{"validate": {'
    files["configs/inference.json"]["inferer"]["_target_"] = "NoSuchInferer"
    bundle = write_bundle(tmp_path / "tiny", files)
    problems = failures(bundle)
    assert set(problems) == {"configs parse", "targets resolve"}
    assert problems["configs parse"].startswith(f"{config(bundle, 'evaluate.json')}: not valid JSON (")
    assert problems["targets resolve"] == (
        f"{config(bundle, 'inference.json')}: inferer#_target_ = NoSuchInferer "
        "does not resolve to an importable class or function"
    )


def test_undefined_reference_in_merged_config(tmp_path, files):
    files["configs/evaluate.json"]["validate"]["evaluator"]["network"] = "@model"
    bundle = write_bundle(tmp_path / "tiny", files)
    assert failures(bundle) == {
        "references resolve": f"{config(bundle, 'evaluate.json')} (merged over train.json): "
        "validate#evaluator#network refers to @model, which is not defined"
    }


def test_metadata_config_bases_merge_extra_configs(tmp_path, files):
    files["configs/tune_thresholds.json"] = {"tune": ["$@validate#evaluator.run()"]}
    bundle = write_bundle(tmp_path / "tiny", files)
    assert failures(bundle) == {
        "references resolve": f"{config(bundle, 'tune_thresholds.json')}: "
        "tune#0 refers to @validate#evaluator, which is not defined"
    }
    files["configs/metadata.json"]["config_bases"] = {"tune_thresholds.json": ["train.json", "evaluate.json"]}
    assert failures(write_bundle(bundle, files)) == {}


def test_config_meant_to_be_merged_gets_a_hint(tmp_path, files):
    files["configs/tune_thresholds.json"] = {"validate#evaluator#network": "@network"}
    bundle = write_bundle(tmp_path / "tiny", files)
    problems = failures(bundle)
    assert list(problems) == ["configs parse"]
    assert problems["configs parse"].startswith(f"{config(bundle, 'tune_thresholds.json')}: does not parse (")
    assert problems["configs parse"].endswith(
        "if it is merged over other configs, list them in metadata.json config_bases"
    )


def test_overrides_reach_every_config_and_the_export(tmp_path, files):
    files["configs/train.json"]["network_def"]["features"] = "@features"
    files["configs/train.json"]["features"] = "$'set me'"
    bundle = write_bundle(tmp_path / "tiny", files)
    assert "network in/out" in failures(bundle)  # BasicUNet cannot be built with features='set me'
    report = verify_bundle(bundle, overrides={"features": [4, 4, 8, 8, 8, 4]})
    assert report.ok, report.format()
    problems = failures(bundle, overrides={"features": [4, 4, 8, 8, 8, 4], "no_such_id": 1})
    assert problems == {
        "configs parse": f"override no_such_id: no config in {bundle / 'configs'} defines this id"
    }


@pytest.mark.parametrize(
    "pred, expected",
    [
        ({"num_channels": 3}, "output shape (1, 2, 32, 32) does not have 3 channels in dim 1"),
        (
            {"spatial_shape": ["8*n", "8*n"]},
            "output spatial shape (32, 32) differs from the declared (16, 16)",
        ),
    ],
)
def test_network_output_differing_from_metadata(tmp_path, files, pred, expected):
    files["configs/metadata.json"]["network_data_format"]["outputs"]["pred"].update(pred)
    bundle = write_bundle(tmp_path / "tiny", files)
    assert failures(bundle) == {
        "network in/out": f"{config(bundle, 'train.json')}: network_def {expected} "
        f"({config(bundle, 'metadata.json')} outputs.pred)"
    }


@pytest.fixture
def unscriptable_files(tmp_path, files, monkeypatch) -> dict[str, Any]:
    """The bundle with a network TorchScript cannot compile, importable from a module in tmp_path."""
    (tmp_path / "unscriptable_net.py").write_text(UNSCRIPTABLE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "unscriptable_net", raising=False)  # import this test's copy
    net = {"_target_": "unscriptable_net.Unscriptable", "in_channels": 1, "out_channels": 2, "kernel_size": 3}
    for name in ("configs/train.json", "configs/inference.json"):
        files[name]["network_def"] = {**net, "padding": 1}
    return files


def test_unexportable_network_fails_with_advice(tmp_path, unscriptable_files):
    bundle = write_bundle(tmp_path / "tiny", unscriptable_files)
    problems = failures(bundle, export=True)
    assert list(problems) == ["torchscript export"]
    assert problems["torchscript export"].startswith(
        f"{config(bundle, 'train.json')}: network_def cannot be exported with monai.bundle ckpt_export ("
    )
    assert f"; at {tmp_path / 'unscriptable_net.py'}:" in problems["torchscript export"]
    assert '"torchscript": {"exportable": false, "reason": "<why>"}' in problems["torchscript export"]


def test_traceable_network_declared_use_trace_exports(tmp_path, unscriptable_files):
    unscriptable_files["configs/metadata.json"]["torchscript"] = {"exportable": True, "use_trace": True}
    report = verify_bundle(write_bundle(tmp_path / "tiny", unscriptable_files))
    assert report.ok, report.format()
    message = check(report, "torchscript export").message
    assert message == "ckpt_export (traced) output matches the eager network"


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the very problem this test provokes
def test_trace_that_keeps_its_input_size_is_caught(tmp_path, unscriptable_files):
    unscriptable_files["configs/metadata.json"]["torchscript"] = {"exportable": True, "use_trace": True}
    unscriptable_files["configs/train.json"]["network_def"]["_target_"] = "unscriptable_net.SizeBaked"
    bundle = write_bundle(tmp_path / "tiny", unscriptable_files)
    problems = failures(bundle, export=True)
    assert list(problems) == ["torchscript export"]
    assert problems["torchscript export"].startswith(
        f"{config(bundle, 'train.json')}: exported network_def differs from eager on input (1, 1, 48, 48): "
    )


def test_declared_unexportable_network_passes_with_reason(tmp_path, unscriptable_files):
    reason = "forward takes variadic arguments"
    unscriptable_files["configs/metadata.json"]["torchscript"] = {"exportable": False, "reason": reason}
    report = verify_bundle(write_bundle(tmp_path / "tiny", unscriptable_files))
    assert report.ok, report.format()
    assert check(report, "torchscript export").message.endswith(f"declares it not exportable: {reason}")
    assert reason in report.format()


def test_cli_exit_code_and_table(tmp_path, files, capsys):
    good = write_bundle(tmp_path / "bundles" / "good", files)
    assert main([str(good), "--no-export"]) == 0
    out = capsys.readouterr().out
    assert f"{good}: OK" in out and "1 of 1 bundles passed" in out
    assert "torchscript export" not in out

    files["configs/metadata.json"]["version"] = "9.9.9"
    write_bundle(tmp_path / "bundles" / "bad", files)
    root = str(tmp_path / "bundles")
    assert main(["--all", "--bundles-root", root, "--no-export", "--override", "optimizer#lr=0.01"]) == 1
    out = capsys.readouterr().out
    assert "bad: FAILED (1 of 7 checks)" in out and "FAIL  version in changelog" in out
    assert "1 of 2 bundles passed" in out


@pytest.mark.parametrize("argv", [["--all", "--bundles-root", "."], [".", "--override", "no-equals-sign"]])
def test_cli_usage_errors(tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)  # an empty folder: no bundles under it
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


DETECTOR = {
    "_target_": "common.networks.vitdet.vit_mask_rcnn",
    "num_classes": 2,
    "vit": "vit_base_patch16_224",
    "vit_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2},
    "min_size": 64,
    "max_size": 64,
}


@pytest.mark.parametrize("keys, ok", [(["boxes", "labels", "scores", "masks"], True), (["boxes", "keypoints"], False)])
def test_detection_network_outputs_are_checked_by_keys(tmp_path, files, keys, ok):
    """torchvision detectors return one dict per image; metadata declares their keys instead of a shape."""
    for name in ("configs/train.json", "configs/inference.json"):
        files[name]["network_def"] = DETECTOR
    metadata = files["configs/metadata.json"]
    metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] = ["32*n", "32*n"]
    metadata["network_data_format"]["outputs"]["pred"] = {
        "type": "detections", "format": "instances", "keys": keys, "num_channels": 2, "dtype": "float32",
        "spatial_shape": ["32*n", "32*n"],
        "value_range": [], "is_patch_data": False, "channel_def": {},
    }
    metadata["torchscript"] = {"exportable": False, "reason": "torchvision detection models take lists of images"}
    found = failures(write_bundle(tmp_path / "detector", files), export=True)
    if ok:
        assert not found, found
    else:
        assert "['keypoints']" in found["network in/out"]


@pytest.fixture
def no_downloads(monkeypatch):
    """Fetching timm weights, or any connection, fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_network_is_built_without_its_weights(tmp_path, files, no_downloads):
    """Configs ask for published weights and an earlier stage's checkpoint: the checks need neither."""
    files["configs/train.json"].update(
        pretrained=True,
        backbone_checkpoint="$@bundle_root + '/models/ssl_backbone.pt'",  # absent in a fresh clone
        network_def={
            "_target_": "common.networks.vit_unet.ViTUNet",
            "backbone": "vit_small_patch8_224.dino",
            "pretrained": "@pretrained",
            "backbone_checkpoint": "@backbone_checkpoint",
            "in_channels": 1,
            "out_channels": 2,
            "decoder_channels": [8, 8, 8, 8],
            "out_activation": None,
            "depth": 4,
            "embed_dim": 32,
            "num_heads": 2,
        },
    )
    files["configs/metadata.json"]["torchscript"] = {"exportable": True, "use_trace": True}
    report = verify_bundle(write_bundle(tmp_path / "pretrained", files))
    assert report.ok, report.format()
    with pytest.raises(AssertionError, match="tried to download"):  # weights are still fetched elsewhere
        create_timm_model("vit_small_patch8_224.dino", pretrained=True)
