"""The list of served bundles, their MONAI Label config layers and label names."""

from __future__ import annotations

import pytest

from common.errors import InputDataError
from common.monailabel.bundles import (
    BUNDLES,
    REPO_ROOT,
    BundleEntry,
    bundle_parser,
    label_names,
    select_bundles,
)


@pytest.mark.parametrize("entry", BUNDLES.values(), ids=list(BUNDLES))
def test_every_served_bundle_has_its_layers_and_labels(entry: BundleEntry, tmp_path):
    bundle = REPO_ROOT / "bundles" / entry.name
    parser = bundle_parser(bundle, "infer", tmp_path)
    assert parser["ckpt_dir"] == str(tmp_path) and parser["bundle_root"] == str(bundle)
    assert entry.kind == "slide" or parser["monailabel_label_key"]
    if entry.trainable:
        assert "monailabel_datalist" in bundle_parser(bundle, "train", tmp_path).config
    names = label_names(bundle)
    assert names and "background" not in names and len(set(names.values())) == len(names)


def test_select_bundles_refuses_unknown_names():
    assert [e.name for e in select_bundles(["pathology_wsss_deeplab"])] == ["pathology_wsss_deeplab"]
    assert len(select_bundles(None)) == len(BUNDLES)
    with pytest.raises(ValueError, match="unknown bundle.*angiography"):
        select_bundles(["angiography"])


def test_an_entry_of_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        BundleEntry("angiography_vessels", "vessels")


def test_missing_layer_and_missing_label_names_name_the_file(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "inference.json").write_text("{}")
    (tmp_path / "configs" / "metadata.json").write_text('{"network_data_format": {"outputs": {}}}')
    with pytest.raises(InputDataError, match="monailabel_infer.json: config file not found"):
        bundle_parser(tmp_path, "infer", tmp_path)
    with pytest.raises(InputDataError, match="metadata.json: no network_data_format.outputs.label"):
        label_names(tmp_path)
