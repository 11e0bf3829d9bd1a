"""The federated job writer and the MonaiAlgo ids of every bundle that trains federated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import InputDataError
from common.fl.job import JobSpec, main, missing_ids, read_train_configs, write_job
from tests.helpers import REPO_ROOT

BUNDLES = REPO_ROOT / "bundles"
# each federated job: a bundle and the layers MonaiAlgo reads over its train.json
FEDERATED_JOBS = {
    "microscopy_dinocell_segmentation": ["configs/train.json"],
    "dermoscopy_lesion_maskrcnn": ["configs/train.json"],
    "pathology_wsss_deeplab": ["configs/train.json", "configs/federated.json"],
    "cytology_bethesda_detection (detector)": ["configs/train.json", "configs/federated.json"],
    "cytology_bethesda_detection (classifier)": ["configs/train.json", "configs/federated_classify.json"],
    "angiography_cass_segmentation (vessels)": ["configs/train.json", "configs/train_vessels.json"],
    "angiography_cass_segmentation (segments)": ["configs/train.json"],
}
SITES = {"site-1": "/data/a", "site-2": "/data/b"}


def _target(parser, config_id: str) -> str:
    """The ``_target_`` of a component, following ``@id`` references."""
    config = parser[config_id]
    while isinstance(config, str) and config.startswith("@"):
        config = parser[config[1:]]
    return config["_target_"]


@pytest.mark.parametrize("job", sorted(FEDERATED_JOBS))
def test_bundle_defines_the_ids_monai_algo_needs(job: str):
    bundle = BUNDLES / job.split(" ")[0]
    parser = read_train_configs(bundle, FEDERATED_JOBS[job])
    assert missing_ids(parser) == []
    assert _target(parser, "train#trainer") == "SupervisedTrainer"
    assert _target(parser, "validate#evaluator") == "SupervisedEvaluator"
    # MonaiAlgo sets the local epochs through this id; the job writer sets the id it refers to
    max_epochs = parser["train#trainer#max_epochs"]
    assert isinstance(max_epochs, int) or max_epochs[1:] in parser


def test_job_folder_allows_exactly_what_it_builds(tmp_path: Path):
    spec = JobSpec(
        BUNDLES / "microscopy_dinocell_segmentation",
        SITES,
        rounds=3,
        local_epochs=2,
        aggregator="fedprox",
        privacy_filters=["percentile", "exclude_vars"],
        exclude_vars="head.*",
        cross_site_eval=True,
        overrides={"num_workers": 0},
        server_overrides={"pretrained": True},
    )
    job = write_job(spec, tmp_path / "job")
    meta = json.loads((job / "meta.json").read_text())
    assert meta["min_clients"] == 2 and meta["deploy_map"] == {"app": ["@ALL"]}
    server = json.loads((job / "app/config/config_fed_server.json").read_text())
    client = json.loads((job / "app/config/config_fed_client.json").read_text())
    allowed = json.loads((job / "resources.json").read_text())["class_allow_list"]
    filters = client["task_result_filters"][0]["filters"]
    paths = [c["path"] for c in server["components"] + server["workflows"] + filters]
    paths.append(client["executors"][0]["executor"]["path"])
    for path in paths:
        assert any(path == entry or (entry.endswith(".") and path.startswith(entry)) for entry in allowed), (
            path
        )
    assert all(entry.endswith(".") or entry in paths for entry in allowed), "allow-list names unused classes"
    executor = client["executors"][0]["executor"]["args"]
    assert (
        executor["dataset_dirs"] == SITES and executor["local_epochs"] == 2 and executor["fedprox_mu"] == 0.01
    )
    # the bundle's schedules span the whole federation; the user's overrides reach server and sites
    assert executor["overrides"] == {"epochs": 6, "num_workers": 0}
    # only the first global model is built with the pretrained weights: sites receive them
    assert server["components"][0]["args"]["overrides"] == {**executor["overrides"], "pretrained": True}
    assert [f["path"].rsplit(".", 1)[1] for f in filters] == ["ExcludeVars", "PercentilePrivacy"]
    assert (job / "app/config/bundle/configs/train.json").is_file()


def test_fedavg_job_has_no_proximal_term_or_filters(tmp_path: Path):
    write_job(JobSpec(BUNDLES / "pathology_wsss_deeplab", SITES, rounds=1), tmp_path / "job")
    client = json.loads((tmp_path / "job/app/config/config_fed_client.json").read_text())
    server = json.loads((tmp_path / "job/app/config/config_fed_server.json").read_text())
    assert client["executors"][0]["executor"]["args"]["fedprox_mu"] == 0.0
    # the bundle's federated.json layer is read by default
    assert (
        client["executors"][0]["executor"]["args"]["config_train"] == FEDERATED_JOBS["pathology_wsss_deeplab"]
    )
    assert client["task_result_filters"] == []
    assert [w["id"] for w in server["workflows"]] == ["scatter_and_gather"]


def test_bundle_without_monai_algo_ids_is_refused_and_nothing_written(tmp_path: Path):
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "train.json").write_text(json.dumps({"bundle_root": ".", "device": "cpu"}))
    with pytest.raises(InputDataError, match="train#trainer") as err:
        write_job(JobSpec(bundle, SITES, rounds=1), tmp_path / "job")
    assert err.value.path == str(bundle / "configs" / "train.json")
    assert not (tmp_path / "job").exists()


def test_malformed_config_names_the_file(tmp_path: Path):
    (tmp_path / "bundle" / "configs").mkdir(parents=True)
    (tmp_path / "bundle" / "configs" / "train.json").write_text("{not json")
    with pytest.raises(InputDataError, match="train.json: not a valid bundle config"):
        write_job(JobSpec(tmp_path / "bundle", SITES, rounds=1), tmp_path / "job")


def test_command_requires_a_dataset_dir_per_site(tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "--bundle",
                str(BUNDLES / "pathology_wsss_deeplab"),
                "--sites",
                "2",
                "--rounds",
                "1",
                "--site_dataset_dir",
                "site-1=/a",
                "--output",
                str(tmp_path / "job"),
            ]
        )
    assert "site-2" in capsys.readouterr().err
    assert not (tmp_path / "job").exists()
