"""The list of served models, their MONAI Label config layers, label names and overrides."""

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
    unused_overrides,
)


@pytest.mark.parametrize("entry", BUNDLES.values(), ids=list(BUNDLES))
def test_every_served_bundle_has_its_layers_and_labels(entry: BundleEntry, tmp_path):
    bundle = REPO_ROOT / "bundles" / entry.folder
    parser = bundle_parser(bundle, entry.layer("infer"), tmp_path)
    assert parser["ckpt_dir"] == str(tmp_path) and parser["bundle_root"] == str(bundle)
    assert entry.kind == "slide" or parser["monailabel_label_key"]
    if entry.trainable:
        assert "monailabel_datalist" in bundle_parser(bundle, entry.layer("train"), tmp_path).config
    names = label_names(bundle, entry.output)
    assert names and "background" not in names and len(set(names.values())) == len(names)


def test_select_bundles_refuses_unknown_names():
    assert [e.name for e in select_bundles(["pathology_wsss_deeplab"])] == ["pathology_wsss_deeplab"]
    assert len(select_bundles(None)) == len(BUNDLES)
    with pytest.raises(ValueError, match="unknown bundle.*angiography"):
        select_bundles(["angiography"])


def test_an_entry_of_unknown_kind_or_with_two_trained_weights_is_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        BundleEntry("angiography_vessels", "vessels")
    with pytest.raises(ValueError, match="a trainable model has one weights file"):
        BundleEntry("two_nets", "mask", ("a.pt", "b.pt"))


def test_a_second_workflow_of_a_bundle_is_a_second_model_with_its_own_layers_and_weights():
    segments, vessels = (
        BUNDLES["angiography_cass_segmentation"],
        BUNDLES["angiography_cass_segmentation_vessels"],
    )
    assert segments.folder == vessels.folder == "angiography_cass_segmentation"
    assert (segments.layer("infer"), vessels.layer("train")) == (
        "monailabel_infer.json",
        "monailabel_train_vessels.json",
    )
    assert segments.weights != vessels.weights
    bundle = REPO_ROOT / "bundles" / vessels.folder
    parser = bundle_parser(bundle, vessels.layer("infer"), bundle / "models")
    assert parser["evaluator"] == "@vessels#evaluator" and parser.get_parsed_content(
        "vessel_model_file"
    ).endswith("/vessels.pt")
    assert label_names(bundle, vessels.output) == {"vessel": 1}
    assert len(label_names(bundle)) == 14


def test_one_set_of_overrides_serves_inference_and_training_configs_whose_ids_differ(tmp_path):
    vessels = BUNDLES["angiography_cass_segmentation_vessels"]
    bundle = REPO_ROOT / "bundles" / vessels.folder
    overrides = {"img_size": 64, "vessels#network_def#depth": 1, "network_def#depth": 2, "nothing#here": 0}
    infer = bundle_parser(bundle, vessels.layer("infer"), tmp_path, overrides)
    train = bundle_parser(bundle, vessels.layer("train"), tmp_path, overrides)
    assert infer["vessels#network_def#depth"] == 1 and train["network_def#depth"] == 2
    assert train["img_size"] == infer["img_size"] == 64 and "vessels" not in train.config
    assert unused_overrides(vessels, bundle, overrides) == ["nothing#here"]
    with pytest.raises(ValueError, match="workflow must be one of"):
        vessels.layer("evaluate")


def test_missing_layer_and_missing_label_names_name_the_file(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "inference.json").write_text("{}")
    (tmp_path / "configs" / "metadata.json").write_text('{"network_data_format": {"outputs": {}}}')
    with pytest.raises(
        InputDataError, match="metadata.json: config_bases does not list monailabel_infer.json"
    ):
        bundle_parser(tmp_path, "monailabel_infer.json", tmp_path)
    (tmp_path / "configs" / "metadata.json").write_text(
        '{"config_bases": {"monailabel_infer.json": ["inference.json"]}, "network_data_format": {"outputs": {}}}'
    )
    with pytest.raises(InputDataError, match="monailabel_infer.json: config file not found"):
        bundle_parser(tmp_path, "monailabel_infer.json", tmp_path)
    with pytest.raises(InputDataError, match="metadata.json: no network_data_format.outputs.label"):
        label_names(tmp_path)
