"""Tests for common.bundle.export on a copy of the DINOCell bundle with a tiny network, in tmp_path."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import zipfile
from pathlib import Path

import monai
import pytest
import torch
import yaml
from monai.bundle import ConfigParser

from common.bundle.export import bump_version, export_bundle, main, read_eval_report
from common.bundle.verify import REQUIRED_FILES, verify_bundle
from common.errors import InputDataError
from common.io.checkpoint import save_checkpoint, sha256sum
from common.networks.timm_backbone import architecture_only
from tests.helpers import REPO_ROOT

NAME = "microscopy_dinocell_segmentation"
SOURCE_VERSION = json.loads((REPO_ROOT / "bundles" / NAME / "configs" / "metadata.json").read_text())["version"]
EXPORTED_VERSION = bump_version(SOURCE_VERSION, "patch")
# a 4-block ViT with patch 8 and a narrow decoder: these tests are about packing, not accuracy
TINY_NETWORK = {"depth": 4, "embed_dim": 32, "num_heads": 2, "decoder_channels": [32, 16, 16, 8]}
REPORT = {"SEG": 0.61, "DET": 0.72, "OP_CSB": 0.665, "overall": {"n_images": 2}, "per_image": []}


def tiny_bundle(root: Path) -> Path:
    """A copy of the bundle whose configs build a tiny network, with no weights and no report."""
    bundle = root / NAME
    for name in REQUIRED_FILES:  # only these: the tests must not depend on configs being written meanwhile
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO_ROOT / "bundles" / NAME / name, bundle / name)
    for name in ("train.json", "inference.json"):
        path = bundle / "configs" / name
        config = json.loads(path.read_text())
        config["network_def"].update(TINY_NETWORK)
        path.write_text(json.dumps(config, indent=4))
    return bundle


def save_random_weights(bundle: Path, seed: int = 0) -> Path:
    """``models/model.pt`` of the bundle's network, randomly initialised: trained weights as far as
    packing is concerned. A sharpened head turns random features into a map with many cells, so that
    predictions made with other weights differ visibly."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    torch.manual_seed(seed)
    with architecture_only():
        network = parser.get_parsed_content("network_def")
    network.head.weight.data.mul_(50)
    return save_checkpoint(network.state_dict(), bundle / "models" / "model.pt")


def write_report(bundle: Path, report: dict = REPORT) -> Path:
    path = bundle / "eval" / "test" / "ctc_metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))
    return path


def trained_bundle(root: Path) -> Path:
    bundle = tiny_bundle(root)
    save_random_weights(bundle)
    (bundle / "models" / "watershed_thresholds.json").write_text('{"cells_max": 0.9, "cell_fill": 0.5}')
    save_checkpoint({"network": {}}, bundle / "models" / "checkpoint_latest.pt")
    write_report(bundle)
    return bundle


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(trained bundle, its archive)."""
    root = tmp_path_factory.mktemp("export")
    bundle = trained_bundle(root / "site_a")
    archive = export_bundle(
        bundle, root / "dist", eval_data="2 synthetic test images", changelog="tiny weights", folder=True
    )
    return bundle, archive


def archive_metadata(archive: Path) -> dict:
    with zipfile.ZipFile(archive) as zf:
        return json.loads(zf.read(f"{NAME}/configs/metadata.json"))


def test_bump_version():
    assert bump_version("0.2.0", "patch") == "0.2.1"
    assert bump_version("0.2.7", "minor") == "0.3.0"
    assert bump_version("0.2.7", "major") == "1.0.0"


def test_archive_layout_and_weights_listed_with_sha256(exported):
    bundle, archive = exported
    assert archive.name == f"{NAME}_v{EXPORTED_VERSION}.zip"
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        large_files = yaml.safe_load(zf.read(f"{NAME}/large_files.yml"))["large_files"]
    for member in ("configs/train.json", "configs/inference.json", "docs/README.md", "LICENSE",
                   "models/model.pt", "models/model.ts", "models/watershed_thresholds.json",
                   "eval/ctc_metrics.json", "large_files.yml"):
        assert f"{NAME}/{member}" in names, member
    assert f"{NAME}/models/checkpoint_latest.pt" not in names, "resume state is not shipped"
    metadata = archive_metadata(archive)
    assert metadata["weights"]["models/model.pt"] == sha256sum(bundle / "models" / "model.pt")
    assert set(metadata["weights"]) == {"models/model.pt", "models/model.ts", "models/watershed_thresholds.json"}
    assert {item["path"]: item["hash_val"] for item in large_files} == metadata["weights"]
    assert all(item["hash_type"] == "sha256" for item in large_files)


def test_metadata_version_changelog_versions_and_metrics(exported):
    bundle, archive = exported
    metadata = archive_metadata(archive)
    assert metadata["version"] == EXPORTED_VERSION and metadata["changelog"][EXPORTED_VERSION] == "tiny weights"
    assert SOURCE_VERSION in metadata["changelog"], "older changelog entries are kept"
    required = metadata["required_packages_version"]
    assert required["monai-imaging-bundles"] == importlib.metadata.version("monai-imaging-bundles")
    assert required["timm"] == importlib.metadata.version("timm"), "this site's versions, not typed ones"
    assert metadata["monai_version"] == monai.__version__
    assert torch.__version__.startswith(metadata["pytorch_version"]) and "+" not in metadata["pytorch_version"]
    assert metadata["eval_metrics"] == {"SEG": 0.61, "DET": 0.72, "OP_CSB": 0.665}
    assert metadata["eval_report"]["data"] == "2 synthetic test images"
    assert metadata["eval_report"]["sha256"] == sha256sum(bundle / "eval" / "test" / "ctc_metrics.json")
    assert metadata["eval_report"]["evaluated"].endswith("+00:00")
    source = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert source["version"] == SOURCE_VERSION, "the bundle itself is not modified"


def test_exported_torchscript_matches_the_weights(exported):
    bundle, archive = exported
    with zipfile.ZipFile(archive) as zf:
        ts = torch.jit.load(zf.open(f"{NAME}/models/model.ts"))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    with architecture_only():
        network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ts.eval()(image), network.eval()(image))


def test_exported_folder_passes_the_verifier_and_matches_the_archive(exported):
    _, archive = exported
    folder = archive.parent / NAME
    assert verify_bundle(folder, export=False).ok
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            assert zf.read(name) == (archive.parent / name).read_bytes(), name


def test_eval_metrics_follow_the_report_file(tmp_path):
    report = write_report(tmp_path, {"SEG": 0.25, "DET": 1, "flag": True, "nan": float("nan"), "table": [1]})
    assert read_eval_report(report) == {"SEG": 0.25, "DET": 1.0}
    empty = write_report(tmp_path / "empty", {"per_image": []})
    with pytest.raises(InputDataError, match="no top-level finite numbers"):
        read_eval_report(empty)


def test_refuses_a_bundle_without_weights(tmp_path, capsys):
    bundle = tiny_bundle(tmp_path)
    write_report(bundle)
    assert main([str(bundle), "--output", str(tmp_path / "dist"), "--eval-data", "x"]) == 1
    assert "models/model.pt: no trained weights" in capsys.readouterr().err
    assert not (tmp_path / "dist").exists()


def test_refuses_weights_carrying_code(tmp_path):
    bundle = tiny_bundle(tmp_path)
    write_report(bundle)
    (bundle / "models").mkdir()
    torch.save({"optimizer": torch.optim.SGD}, bundle / "models" / "model.pt")  # a class: not weights_only
    with pytest.raises(InputDataError, match="refused to load"):
        export_bundle(bundle, tmp_path / "dist", eval_data="x")
    assert not (tmp_path / "dist").exists()


def test_refuses_a_bundle_the_verifier_fails(tmp_path):
    bundle = trained_bundle(tmp_path)
    (bundle / "configs" / "train.json").unlink()
    with pytest.raises(InputDataError, match=r"verifier failed:(.|\n)*configs/train\.json: missing"):
        export_bundle(bundle, tmp_path / "dist", eval_data="x")
    assert not (tmp_path / "dist").exists()


def test_refuses_without_one_evaluation_report(tmp_path):
    bundle = trained_bundle(tmp_path)
    write_report(bundle).rename(bundle / "eval" / "test" / "other.json")
    write_report(bundle)
    with pytest.raises(InputDataError, match="exactly one evaluation report"):
        export_bundle(bundle, tmp_path / "dist", eval_data="x")
    assert not (tmp_path / "dist").exists()
