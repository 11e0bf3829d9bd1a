"""Tests for common.bundle.importer: every refusal leaves nothing behind; a good archive round-trips."""

from __future__ import annotations

import hashlib
import json
import pathlib
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

import monai.bundle
import numpy as np
import pytest
import tifffile
import torch
import yaml

from common.bundle.allowlist import untrusted_items
from common.bundle.export import export_bundle
from common.bundle.importer import MB, BundleRejected, import_bundle, main
from common.data import cell_arrays
from common.data.synthetic.cells import generate_cell_dataset
from common.errors import InputDataError
from common.io.checkpoint import save_checkpoint, sha256sum
from tests.common.bundle.test_export import EXPORTED_VERSION, NAME, trained_bundle
from tests.helpers import bundle_command, run_command

Edit = Callable[[dict[str, bytes]], None]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("import")
    bundle = trained_bundle(root / "site_a")
    return export_bundle(bundle, root / "dist", eval_data="2 synthetic test images")


@pytest.fixture
def dest(tmp_path) -> Path:
    """DEST inside an empty folder, so a test can assert that nothing at all was written beside it."""
    (tmp_path / "site_b").mkdir()
    return tmp_path / "site_b" / NAME


def assert_nothing_written(dest: Path) -> None:
    assert list(dest.parent.iterdir()) == [], "a refused import must leave no DEST and no staging folder"


def rewritten(archive: Path, target: Path, edit: Edit, extra: list[tuple[zipfile.ZipInfo, bytes]] = ()) -> Path:
    """A copy of ``archive`` whose members ``edit`` changed (name -> content), plus raw ``extra`` members."""
    with zipfile.ZipFile(archive) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    edit(members)
    with zipfile.ZipFile(target, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
        for info, content in extra:
            zf.writestr(info, content)
    return target


def edit_json(members: dict[str, bytes], name: str, change: Callable[[dict], None]) -> None:
    content = json.loads(members[f"{NAME}/{name}"])
    change(content)
    members[f"{NAME}/{name}"] = json.dumps(content).encode()


def relist(members: dict[str, bytes], name: str, content: bytes) -> None:
    """Replace a weight file and update both listings, as a careful attacker would."""
    members[f"{NAME}/{name}"] = content
    digest = hashlib.sha256(content).hexdigest()
    edit_json(members, "configs/metadata.json", lambda meta: meta["weights"].update({name: digest}))
    listing = yaml.safe_load(members[f"{NAME}/large_files.yml"])
    for item in listing["large_files"]:
        item["hash_val"] = digest if item["path"] == name else item["hash_val"]
    members[f"{NAME}/large_files.yml"] = yaml.safe_dump(listing).encode()


def refused(source: Path, dest: Path, match: str, **kwargs) -> None:
    with pytest.raises(BundleRejected, match=match):
        import_bundle(source, dest, **kwargs)
    assert_nothing_written(dest)


def test_import_places_a_verified_bundle_that_monai_loads(archive, dest, capsys):
    assert main([str(archive), "--dest", str(dest)]) == 0
    assert f"version {EXPORTED_VERSION}" in capsys.readouterr().out
    assert (dest / "configs" / "inference.json").is_file() and (dest / "eval" / "ctc_metrics.json").is_file()
    assert [path.name for path in dest.parent.iterdir()] == [NAME], "no staging folder is left"
    weights = torch.load(dest / "models" / "model.pt", weights_only=True)
    network = monai.bundle.load(NAME, bundle_dir=dest.parent, model=_tiny_network(dest), device="cpu")
    torch.testing.assert_close(network.state_dict(), weights)
    ts, metadata, _ = monai.bundle.load(NAME, bundle_dir=dest.parent, load_ts_module=True, device="cpu")
    assert metadata["version"] == EXPORTED_VERSION and isinstance(ts, torch.jit.ScriptModule)


def _tiny_network(bundle: Path) -> torch.nn.Module:
    parser = monai.bundle.ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    return parser.get_parsed_content("network_def")


def test_refuses_an_existing_dest_unless_overwrite(archive, dest):
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(InputDataError, match="already exists"):
        import_bundle(archive, dest)
    assert (dest / "keep.txt").read_text() == "mine"
    import_bundle(archive, dest, overwrite=True)
    assert not (dest / "keep.txt").exists() and (dest / "models" / "model.pt").is_file()


def test_refuses_a_tampered_weight_file(archive, dest, tmp_path):
    def tamper(members: dict[str, bytes]) -> None:
        weights = bytearray(members[f"{NAME}/models/model.pt"])
        weights[-100] ^= 0xFF
        members[f"{NAME}/models/model.pt"] = bytes(weights)

    refused(rewritten(archive, tmp_path / "a.zip", tamper), dest, r"models/model\.pt: sha256 differs")


class _TouchOnUnpickle:
    """Pickles to ``Path(path).touch()``: what a malicious checkpoint runs under ``weights_only=False``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_refuses_a_checkpoint_carrying_pickled_code(archive, dest, tmp_path):
    marker = tmp_path / "pwned"
    malicious = tmp_path / "model.pt"
    save_checkpoint({"weight": torch.zeros(1), "payload": _TouchOnUnpickle(marker)}, malicious)
    source = rewritten(archive, tmp_path / "a.zip", lambda m: relist(m, "models/model.pt", malicious.read_bytes()))
    refused(source, dest, r"models/model\.pt: refused to load")
    assert not marker.exists(), "the payload must never run"
    torch.load(malicious, weights_only=False)  # the payload is real: unsafe loading runs it
    assert marker.exists()


@pytest.mark.parametrize(
    ("member", "match"),
    [
        (f"{NAME}/../evil.txt", r"'microscopy_dinocell_segmentation/\.\./evil\.txt' contains '\.\.'"),
        ("/tmp/evil.txt", r"'/tmp/evil\.txt' is an absolute path"),
        (f"{NAME}/models/..\\..\\evil.txt", "has a backslash"),
    ],
)
def test_refuses_paths_escaping_dest(archive, dest, tmp_path, member, match):
    source = rewritten(archive, tmp_path / "a.zip", lambda m: None, extra=[(zipfile.ZipInfo(member), b"x")])
    refused(source, dest, match)
    assert not (tmp_path / "evil.txt").exists()


def test_refuses_links_and_device_files_in_an_archive(archive, dest, tmp_path):
    link = zipfile.ZipInfo(f"{NAME}/docs/passwd")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    device = zipfile.ZipInfo(f"{NAME}/docs/null")
    device.external_attr = (stat.S_IFCHR | 0o666) << 16
    source = rewritten(archive, tmp_path / "a.zip", lambda m: None, extra=[(link, b"/etc/passwd"), (device, b"")])
    refused(source, dest, r"docs/passwd' is a link; .*docs/null' is not a regular file")


def test_refuses_a_link_in_a_folder(archive, dest, tmp_path):
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(folder)
    (folder / NAME / "docs" / "passwd").symlink_to("/etc/passwd")
    refused(folder / NAME, dest, r"'docs/passwd' is a link")


def test_refuses_files_over_the_size_limits(archive, dest):
    refused(archive, dest, r"models/model\.pt' is .* over the limit", max_file_bytes=MB // 64)
    refused(archive, dest, r"unpacks to .* over the limit", max_total_bytes=MB // 64)


def test_refuses_an_unlisted_weight_file(archive, dest, tmp_path):
    def add(members: dict[str, bytes]) -> None:
        members[f"{NAME}/models/extra.pt"] = members[f"{NAME}/models/model.pt"]

    refused(rewritten(archive, tmp_path / "a.zip", add), dest, r"models/extra\.pt: is not listed")


def test_refuses_a_target_outside_the_allow_list_unless_trusted(archive, dest, tmp_path, capsys):
    marker = tmp_path / "pwned"

    def add(members: dict[str, bytes]) -> None:
        edit_json(members, "configs/inference.json",
                  lambda c: c.update(pwn={"_target_": "os.system", "command": f"touch {marker}"}))

    source = rewritten(archive, tmp_path / "a.zip", add)
    assert main([str(source), "--dest", str(dest)]) == 1
    err = capsys.readouterr().err
    assert "configs/inference.json: pwn#_target_ = 'os.system' (_target_)" in err
    assert err.count("(_target_)") == 1 and "(expression)" not in err, "our own configs are not listed"
    assert_nothing_written(dest)
    result = import_bundle(source, dest, trust=True)  # the verifier parses, but never calls, os.system
    assert [item.value for item in result.trusted] == ["os.system"]
    assert not marker.exists()


def test_refuses_an_expression_added_after_export(archive, dest, tmp_path):
    expression = "$__import__('pathlib').Path('pwned').touch()"

    def add(members: dict[str, bytes]) -> None:
        edit_json(members, "configs/evaluate.json", lambda c: c["initialize"].append(expression))

    refused(rewritten(archive, tmp_path / "a.zip", add), dest,
            r"configs/evaluate\.json: initialize#1 = .*Path\('pwned'\)\.touch\(\)\" \(expression\)")


def test_without_a_reference_every_expression_is_listed(archive, dest, tmp_path):
    def other_version(members: dict[str, bytes]) -> None:
        edit_json(members, "configs/metadata.json",
                  lambda meta: meta["required_packages_version"].update({"monai-imaging-bundles": "9.9.9"}))

    source = rewritten(archive, tmp_path / "a.zip", other_version)
    with pytest.raises(BundleRejected, match="9.9.9 is not installed here") as err:
        import_bundle(source, dest)
    assert "configs/inference.json: imports#0 = '$import os' (expression)" in str(err.value)
    assert "configs/logging.conf: [handler_consoleHandler] class" in str(err.value)
    assert_nothing_written(dest)


def infer(bundle: Path, images: Path, output_dir: Path, in_process: bool) -> None:
    """``inference.json`` of ``bundle`` on ``images``: in this process, or as a user runs it."""
    overrides = {"bundle_root": str(bundle), "input_dir": str(images), "output_dir": str(output_dir),
                 "num_workers": 0, "patch_size": [64, 64]}
    config = str(bundle / "configs" / "inference.json")
    if in_process:
        monai.bundle.run(config_file=config, **overrides)
        return
    arguments = [arg for key, value in overrides.items() for arg in (f"--{key}", json.dumps(value))]
    run_command(bundle_command("run", "--config_file", config, *arguments), OMP_NUM_THREADS="1")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:parsing config_file")
def test_export_then_import_gives_identical_predictions(tmp_path, one_thread):
    """Site A evaluates its trained bundle on its test images and exports it; site B imports the archive
    and runs ``python -m monai.bundle run`` with the imported inference.json on the same images."""
    data = tmp_path / "data"
    generate_cell_dataset(data / "raw", n_train=1, n_val=1, n_test=2, size=(64, 64), seed=0)
    cell_arrays.main(["--format", "cellpose", "--input", str(data / "raw"), "--splits", "test",
                      "--output", str(data / "arrays")])
    bundle = trained_bundle(tmp_path / "site_a")
    report_file = bundle / "eval" / "test" / "ctc_metrics.json"
    report_file.unlink()  # the placeholder: evaluate for real
    monai.bundle.run(
        "evaluating", config_file=[str(bundle / "configs" / n) for n in ("train.json", "evaluate.json")],
        bundle_root=str(bundle), dataset_dir=str(data / "arrays"), pretrained=False, num_workers=0,
        progress=False, patch_size=[64, 64],
    )
    report = json.loads(report_file.read_text())
    archive = export_bundle(bundle, tmp_path / "dist", eval_data="synthetic cells, 2 test images")
    with zipfile.ZipFile(archive) as zf:
        metadata = json.loads(zf.read(f"{NAME}/configs/metadata.json"))
    assert metadata["eval_metrics"] == {key: report[key] for key in ("SEG", "DET", "OP_CSB")}
    assert metadata["eval_report"]["sha256"] == sha256sum(report_file)

    imported = import_bundle(archive, tmp_path / "site_b" / NAME).bundle_dir
    infer(bundle, data / "raw" / "test", tmp_path / "predictions_a", in_process=True)
    infer(imported, data / "raw" / "test", tmp_path / "predictions_b", in_process=False)
    predictions = sorted((tmp_path / "predictions_a").rglob("*instances*.tif"))
    assert len(predictions) == 2
    for predicted in predictions:
        assert len(np.unique(tifffile.imread(predicted))) > 2, "at least two cells, to tell predictions apart"
        again = tmp_path / "predictions_b" / predicted.relative_to(tmp_path / "predictions_a")
        np.testing.assert_array_equal(tifffile.imread(again), tifffile.imread(predicted))


def test_only_monai_components_pass_by_short_name(tmp_path):
    """A short ``_target_`` that MONAI does not resolve falls through to the builtins (``eval``)."""
    (tmp_path / "configs").mkdir()
    config = {"a": {"_target_": "Compose"}, "b": {"_target_": "eval"}, "c": {"_target_": "builtins.exec"},
              "d": "%/elsewhere/other.json#network", "e": {"_target_": "@a"}}
    (tmp_path / "configs" / "x.json").write_text(json.dumps(config))
    found = [(item.config_id, item.kind) for item in untrusted_items(tmp_path, reference=None)]
    assert found == [("b#_target_", "_target_"), ("c#_target_", "_target_"), ("d", "macro")]
