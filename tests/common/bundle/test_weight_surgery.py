"""Weight surgery: prefix rules, counts, refusal when nothing matches, atomic and safe checkpoint I/O."""

import json
import pickle

import pytest
import torch
from torch import nn

from common.bundle.weight_surgery import main, map_keys, transplant
from common.errors import InputDataError


class Phase1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 1)


class Phase2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.ModuleDict({"vit": nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 6))})  # 1 mismatches
        self.box_head = nn.Linear(8, 3)


def _save(tmp_path, name, obj):
    torch.save(obj, tmp_path / name)
    return str(tmp_path / name)


def test_map_keys_drops_strips_then_adds():
    keys = ["module.backbone.0.weight", "module.head.bias", "other.x"]
    mapped = map_keys(
        keys, strip_prefixes=["module.backbone."], add_prefix="body.vit.", drop=["module.head."]
    )
    assert mapped == {"module.backbone.0.weight": "body.vit.0.weight", "other.x": "body.vit.other.x"}


def test_transplant_counts_loaded_missing_unexpected_and_mismatched():
    source, target = Phase1().state_dict(), Phase2().state_dict()
    result = transplant(source, target, ["backbone."], "body.vit.", ["head."])
    assert sorted(result.loaded) == ["body.vit.0.bias", "body.vit.0.weight"]
    assert result.loaded["body.vit.0.weight"] is source["backbone.0.weight"]
    assert [name for name, _, _ in result.mismatched] == ["body.vit.1.weight", "body.vit.1.bias"]
    assert result.mismatched[0][1:] == ((8, 8), (6, 8))
    assert sorted(result.missing) == [
        "body.vit.1.bias",
        "body.vit.1.weight",
        "box_head.bias",
        "box_head.weight",
    ]
    assert result.unexpected == [] and result.dropped == 2
    assert (
        "loaded 2 of 6 target tensors; missing 4, unexpected 0, shape mismatches 2, dropped 2"
        in result.summary()
    )


def test_command_with_a_target_checkpoint_writes_a_loadable_state_dict(tmp_path, capsys):
    source = Phase1()
    checkpoint = _save(tmp_path, "phase1.pt", {"state_dict": source.state_dict(), "epoch": 3})
    target = _save(tmp_path, "phase2.pt", Phase2().state_dict())
    out = tmp_path / "init.pt"
    argv = ["--checkpoint", checkpoint, "--output", str(out), "--target", target]
    assert main([*argv, "--strip_prefix", "backbone.", "--add_prefix", "body.vit.", "--drop", "head."]) == 0
    printed = capsys.readouterr().out
    assert "loaded 2 of 6 target tensors" in printed and "shape mismatch: body.vit.1.weight" in printed
    written = torch.load(out, weights_only=True)
    assert sorted(written) == ["body.vit.0.bias", "body.vit.0.weight"]
    model = Phase2()
    model.load_state_dict(written, strict=False)
    assert torch.equal(model.body["vit"][0].weight, source.backbone[0].weight)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_command_refuses_when_nothing_matches_and_keeps_the_output(tmp_path):
    checkpoint = _save(tmp_path, "phase1.pt", Phase1().state_dict())
    target = _save(tmp_path, "phase2.pt", Phase2().state_dict())
    out = tmp_path / "init.pt"
    out.write_bytes(b"earlier result")
    with pytest.raises(InputDataError, match="no tensor matches the target") as err:
        main(["--checkpoint", checkpoint, "--output", str(out), "--target", target])
    assert "phase1.pt" in str(err.value) and "--strip_prefix" in err.value.remedy
    assert out.read_bytes() == b"earlier result"


def test_command_reads_the_target_from_a_bundle_config(tmp_path, capsys):
    checkpoint = _save(tmp_path, "phase1.pt", Phase1().state_dict())
    config = tmp_path / "train.json"
    config.write_text(
        json.dumps({"network_def": {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 8}})
    )
    out = tmp_path / "init.pt"
    main(
        [
            "--checkpoint",
            checkpoint,
            "--output",
            str(out),
            "--config_file",
            str(config),
            "--strip_prefix",
            "backbone.0.",
        ]
    )
    assert "loaded 2 of 2 target tensors" in capsys.readouterr().out
    assert sorted(torch.load(out, weights_only=True)) == ["bias", "weight"]
    with pytest.raises(InputDataError, match="has no id 'net'"):
        main(
            [
                "--checkpoint",
                checkpoint,
                "--output",
                str(out),
                "--config_file",
                str(config),
                "--network_id",
                "net",
            ]
        )


class Payload:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_command_loads_with_weights_only(tmp_path):
    bad = tmp_path / "bad.pt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": {"w": Payload()}}, f)
    target = _save(tmp_path, "phase2.pt", Phase2().state_dict())
    with pytest.raises(InputDataError, match="refused to load"):
        main(["--checkpoint", str(bad), "--output", str(tmp_path / "o.pt"), "--target", target])
    with pytest.raises(InputDataError, match="not found"):
        main(
            [
                "--checkpoint",
                str(tmp_path / "none.pt"),
                "--output",
                str(tmp_path / "o.pt"),
                "--target",
                target,
            ]
        )


def test_interrupted_write_keeps_the_previous_output(tmp_path, monkeypatch):
    checkpoint = _save(tmp_path, "phase1.pt", Phase1().state_dict())
    target = _save(tmp_path, "phase2.pt", Phase2().state_dict())
    out = tmp_path / "init.pt"
    out.write_bytes(b"earlier result")

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="disk full"):
        main(
            [
                "--checkpoint",
                checkpoint,
                "--output",
                str(out),
                "--target",
                target,
                "--strip_prefix",
                "backbone.",
                "--add_prefix",
                "body.vit.",
            ]
        )
    assert out.read_bytes() == b"earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init.pt", "phase1.pt", "phase2.pt"]


def test_rotary_tables_are_derived_not_transplanted():
    source = {"trunk.freqs_cis": torch.ones(4, dtype=torch.complex64), "trunk.w": torch.ones(2)}
    target = {"trunk.freqs_cis": torch.ones(9, dtype=torch.complex64), "trunk.w": torch.zeros(2)}
    result = transplant(source, target, derived={"trunk.freqs_cis"})
    assert list(result.loaded) == ["trunk.w"] and result.derived == 1
    assert result.mismatched == [] and result.missing == []


def test_sam3_trunk_out_of_a_full_checkpoint_into_a_bundle_network(tmp_path, capsys):
    pytest.importorskip("sam3.model.vitdet", reason="the optional sam3 package is not installed")
    from common.networks.sam3_trunk import SAM3_TRUNK_PREFIX, build_sam3_trunk

    tiny = {"embed_dim": 32, "depth": 2, "num_heads": 2, "window_size": 4, "global_att_blocks": [1]}
    trunk = build_sam3_trunk(56, pretrain_img_size=56, **tiny).state_dict()
    full = {**{SAM3_TRUNK_PREFIX + k: v for k, v in trunk.items()}, "detector.text.weight": torch.ones(2)}
    checkpoint = _save(tmp_path, "sam3.pt", {"model": full})
    network = {
        "_target_": "common.networks.angiography.VesselSegmentationNet",
        "trunk": "sam3",
        "img_size": 112,
    }
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"network_def": {**network, "pretrain_img_size": 56, **tiny}}))
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(tmp_path / "trunk.pt"),
        "--config_file",
        str(config),
    ]
    main(
        [
            *argv,
            "--strip_prefix",
            SAM3_TRUNK_PREFIX,
            "--add_prefix",
            "backbone.trunk.",
            "--drop",
            "detector.text",
        ]
    )
    n_learned = len(trunk) - 2  # two blocks' rotary tables are computed by the model at 112 px
    assert f"loaded {n_learned} of" in capsys.readouterr().out
    written = torch.load(tmp_path / "trunk.pt", weights_only=True)
    assert len(written) == n_learned and not any(k.endswith("freqs_cis") for k in written)


def test_phase_1_vessel_network_starts_phase_2_mask_rcnn():
    from common.networks.angiography import VesselSegmentationNet, angiography_mask_rcnn

    tiny = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    phase1 = VesselSegmentationNet(decoder_channels=(8, 8), img_size=64, **tiny).state_dict()
    phase2 = angiography_mask_rcnn(img_size=64, out_channels=8, backbone_kwargs=tiny).state_dict()
    result = transplant(
        phase1, phase2, ["backbone.trunk."], "backbone.vit.trunk.", ["head.", "stem.", "fuse."]
    )
    trunk_keys = [k for k in phase2 if k.startswith("backbone.vit.trunk.")]
    assert sorted(result.loaded) == sorted(trunk_keys) and len(trunk_keys) > 10
    assert result.mismatched == [] and all(not k.startswith("backbone.vit.trunk.") for k in result.missing)
