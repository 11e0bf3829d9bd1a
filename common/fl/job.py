"""Write an NVFlare job folder that trains a bundle across sites.

    python -m common.fl.job --bundle bundles/microscopy_dinocell_segmentation --sites 2 --rounds 10 \\
        --local_epochs 1 --site_dataset_dir site-1=/data/a --site_dataset_dir site-2=/data/b \\
        --cross_site_eval --output jobs/dinocell_fedavg

The job has one app for the server and every site (NVFlare's ``deploy_map`` ``@ALL``) holding a copy of
the bundle's configs: the server runs scatter-and-gather (FedAvg; FedProx adds a proximal term at the
sites) and, optionally, cross-site evaluation; each site runs :class:`common.fl.executor.BundleExecutor`
on its own ``dataset_dir``. Sites can filter what they send with NVFlare's percentile-privacy or
exclude-variables filters. NVFlare 2.9 only builds classes its workspace allows, so ``resources.json``
lists them: copy it to each workspace's ``local/resources.json`` (the simulator's ``-w`` folder too).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from common.bundle.verify import parse_override
from common.errors import InputDataError
from common.io.atomic import atomic_directory, atomic_write

__all__ = ["MONAI_ALGO_IDS", "JobSpec", "main", "missing_ids", "read_train_configs", "write_job"]

# what monai.fl.client.MonaiAlgo reads from a bundle's train configs (monai.bundle.properties)
MONAI_ALGO_IDS = (
    "bundle_root",
    "device",
    "dataset_dir",
    "network_def",
    "train#trainer",
    "train#trainer#max_epochs",
    "train#dataset",
    "validate#evaluator",
)
FEDERATED_LAYER = "configs/federated.json"
BUNDLE_IN_APP = "config/bundle"
_NVFLARE = "nvflare.app_common."
CLASSES = {
    "scatter_and_gather": _NVFLARE + "workflows.scatter_and_gather.ScatterAndGather",
    "cross_site_eval": _NVFLARE + "workflows.cross_site_model_eval.CrossSiteModelEval",
    "shareable_generator": _NVFLARE
    + "shareablegenerators.full_model_shareable_generator.FullModelShareableGenerator",
    "aggregator": _NVFLARE
    + "aggregators.intime_accumulate_model_aggregator.InTimeAccumulateWeightedAggregator",
    "percentile": _NVFLARE + "filters.percentile_privacy.PercentilePrivacy",
    "exclude_vars": _NVFLARE + "filters.exclude_vars.ExcludeVars",
}


class JobSpec:
    """What a federated job of a bundle is: who trains, how long, how results are combined and filtered.

    Args:
        bundle: the bundle folder (``configs/train.json`` inside).
        dataset_dirs: each site's ``dataset_dir`` by site name, as the site sees it.
        rounds: federated rounds.
        local_epochs: epochs each site trains per round.
        aggregator: ``"fedavg"`` or ``"fedprox"`` (FedAvg with FedProx's proximal term at the sites).
        fedprox_mu: weight of the proximal term.
        privacy_filters: ``"percentile"`` and/or ``"exclude_vars"``, applied to what sites send.
        percentile, gamma: PercentilePrivacy's arguments (share only the largest diffs, clipped).
        exclude_vars: regular expression of the weights a site never sends.
        cross_site_eval: validate every site's and the global model on every site, and write the table.
        overrides: config ids set at the server and every site.
        server_overrides: config ids set only where the server builds the first global model, e.g.
            the pretrained weights (``backbone_checkpoint``): sites receive them with the model.
        layers: configs over train.json that MonaiAlgo reads, relative to the bundle; default its
            ``configs/federated.json`` where it has one.
        model_file: the checkpoint of the trained network, relative to the bundle: the global model
            is written there at the server and each site's best local model at the site.
    """

    def __init__(
        self,
        bundle: Path,
        dataset_dirs: Mapping[str, str],
        rounds: int,
        local_epochs: int = 1,
        aggregator: str = "fedavg",
        fedprox_mu: float = 0.01,
        privacy_filters: Sequence[str] = (),
        percentile: int = 10,
        gamma: float = 0.01,
        exclude_vars: str | None = None,
        cross_site_eval: bool = False,
        overrides: Mapping[str, Any] | None = None,
        layers: Sequence[str] | None = None,
        model_file: str = "models/model.pt",
        server_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        if rounds < 1 or local_epochs < 1:
            raise ValueError(f"rounds and local_epochs must be >= 1, got {rounds} and {local_epochs}.")
        if aggregator not in ("fedavg", "fedprox"):
            raise ValueError(f"aggregator must be 'fedavg' or 'fedprox', got {aggregator!r}.")
        unknown = set(privacy_filters) - {"percentile", "exclude_vars"}
        if unknown:
            raise ValueError(f"privacy filters are 'percentile' and 'exclude_vars', got {sorted(unknown)}.")
        if "exclude_vars" in privacy_filters and not exclude_vars:
            raise ValueError(
                "the exclude_vars filter needs a regular expression of the weights to keep back."
            )
        if not dataset_dirs:
            raise ValueError("a federated job needs at least one site.")
        self.bundle = Path(bundle)
        self.dataset_dirs = dict(dataset_dirs)
        self.rounds = rounds
        self.local_epochs = local_epochs
        self.aggregator = aggregator
        self.fedprox_mu = fedprox_mu
        self.privacy_filters = list(privacy_filters)
        self.percentile = percentile
        self.gamma = gamma
        self.exclude_vars = exclude_vars
        self.cross_site_eval = cross_site_eval
        self.overrides = dict(overrides or {})
        self.server_overrides = dict(server_overrides or {})
        if layers is None:
            layers = [FEDERATED_LAYER] if (self.bundle / FEDERATED_LAYER).is_file() else []
        self.config_files = ["configs/train.json", *layers]
        self.model_file = model_file


def read_train_configs(bundle: Path, config_files: Sequence[str]) -> ConfigParser:
    """The bundle's train configs, merged as MonaiAlgo merges them.

    Raises:
        InputDataError: a config is missing or is not valid JSON/YAML.
    """
    paths = [bundle / name for name in config_files]
    for path in paths:
        if not path.is_file():
            raise InputDataError(
                path, "config not found", "point --bundle at a bundle folder with configs/train.json"
            )
        try:
            ConfigParser.load_config_file(path)
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            raise InputDataError(path, f"not a valid bundle config ({err})") from err
    parser = ConfigParser()
    parser.read_config([str(path) for path in paths])
    return parser


def missing_ids(parser: ConfigParser) -> list[str]:
    """The ids MonaiAlgo needs that the merged configs lack."""
    return [config_id for config_id in MONAI_ALGO_IDS if config_id not in parser]


def _federation_epochs(parser: ConfigParser, epochs: int) -> dict[str, int]:
    """Set the id the trainer's ``max_epochs`` refers to (``@epochs``) to the federation's total epochs,
    so that the schedules built from it span all rounds; MonaiAlgo sets the trainer's own value per round."""
    max_epochs = parser["train#trainer#max_epochs"]
    if isinstance(max_epochs, str) and max_epochs.startswith("@"):
        return {max_epochs[1:]: epochs}
    return {}


def _server_config(spec: JobSpec, overrides: Mapping[str, Any]) -> dict[str, Any]:
    components = [
        {
            "id": "persistor",
            "path": "common.fl.persistor.BundleModelPersistor",
            "args": {
                "bundle_root": BUNDLE_IN_APP,
                "config_files": spec.config_files,
                "overrides": {**overrides, **spec.server_overrides},
                "model_file": spec.model_file,
            },
        },
        {"id": "shareable_generator", "path": CLASSES["shareable_generator"], "args": {}},
        {"id": "aggregator", "path": CLASSES["aggregator"], "args": {"expected_data_kind": "WEIGHT_DIFF"}},
    ]
    workflows = [
        {
            "id": "scatter_and_gather",
            "path": CLASSES["scatter_and_gather"],
            "args": {
                "min_clients": len(spec.dataset_dirs),
                "num_rounds": spec.rounds,
                "wait_time_after_min_received": 0,
                "aggregator_id": "aggregator",
                "persistor_id": "persistor",
                "shareable_generator_id": "shareable_generator",
                "train_task_name": "train",
            },
        }
    ]
    if spec.cross_site_eval:
        components += [
            {
                "id": "model_locator",
                "path": "common.fl.persistor.BundleModelLocator",
                "args": {"persistor_id": "persistor"},
            },
            {
                "id": "site_scores",
                "path": "common.fl.scores.SiteScoresWriter",
                "args": {"output_dir": BUNDLE_IN_APP + "/eval/federated"},
            },
        ]
        workflows.append(
            {
                "id": "cross_site_model_eval",
                "path": CLASSES["cross_site_eval"],
                "args": {"model_locator_id": "model_locator"},
            }
        )
    return {
        "format_version": 2,
        "task_data_filters": [],
        "task_result_filters": [],
        "components": components,
        "workflows": workflows,
    }


def _privacy_filters(spec: JobSpec) -> list[dict[str, Any]]:
    filters = []
    if "exclude_vars" in spec.privacy_filters:
        filters.append({"path": CLASSES["exclude_vars"], "args": {"exclude_vars": spec.exclude_vars}})
    if "percentile" in spec.privacy_filters:
        filters.append(
            {"path": CLASSES["percentile"], "args": {"percentile": spec.percentile, "gamma": spec.gamma}}
        )
    return filters


def _client_config(spec: JobSpec, overrides: Mapping[str, Any]) -> dict[str, Any]:
    executor = {
        "id": "executor",
        "path": "common.fl.executor.BundleExecutor",
        "args": {
            "bundle_root": BUNDLE_IN_APP,
            "dataset_dirs": spec.dataset_dirs,
            "local_epochs": spec.local_epochs,
            "config_train": spec.config_files,
            "overrides": dict(overrides),
            "fedprox_mu": spec.fedprox_mu if spec.aggregator == "fedprox" else 0.0,
            "model_file": spec.model_file,
        },
    }
    filters = _privacy_filters(spec)
    return {
        "format_version": 2,
        "executors": [{"tasks": ["train", "validate", "submit_model"], "executor": executor}],
        "task_data_filters": [],
        "task_result_filters": [{"tasks": ["train"], "filters": filters}] if filters else [],
        "components": [],
    }


def _allow_list(spec: JobSpec) -> list[str]:
    """Every class the job builds: our package prefix and NVFlare's classes by full path."""
    used = ["scatter_and_gather", "shareable_generator", "aggregator", *spec.privacy_filters]
    if spec.cross_site_eval:
        used.append("cross_site_eval")
    return ["common.fl.", *(CLASSES[name] for name in used)]


def _write_json(path: Path, content: Any) -> None:
    text = json.dumps(content, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def write_job(spec: JobSpec, output: Path, name: str | None = None) -> Path:
    """Write the job folder ``output`` (replacing it only once the new one is complete).

    Raises:
        InputDataError: the bundle's configs are missing, malformed, or lack an id MonaiAlgo needs.
    """
    parser = read_train_configs(spec.bundle, spec.config_files)
    missing = missing_ids(parser)
    if missing:
        raise InputDataError(
            spec.bundle / spec.config_files[-1],
            f"lacks the ids MonaiAlgo needs: {', '.join(missing)}",
            f"define them in a {FEDERATED_LAYER} layer over train.json and pass it with --layer",
        )
    overrides = {**_federation_epochs(parser, spec.rounds * spec.local_epochs), **spec.overrides}
    with atomic_directory(output) as staging:
        _write_json(
            staging / "meta.json",
            {
                "name": name or output.name,
                "resource_spec": {},
                "min_clients": len(spec.dataset_dirs),
                "deploy_map": {"app": ["@ALL"]},
            },
        )
        config_dir = staging / "app" / "config"
        _write_json(config_dir / "config_fed_server.json", _server_config(spec, overrides))
        _write_json(config_dir / "config_fed_client.json", _client_config(spec, overrides))
        bundle_copy = staging / "app" / BUNDLE_IN_APP
        shutil.copytree(spec.bundle / "configs", bundle_copy / "configs")
        if (spec.bundle / "LICENSE").is_file():
            shutil.copy2(spec.bundle / "LICENSE", bundle_copy / "LICENSE")
        _write_json(staging / "resources.json", {"class_allow_list": _allow_list(spec)})
    return output


def _parse_site_dir(text: str) -> tuple[str, str]:
    site, sep, path = text.partition("=")
    if not sep or not site or not path:
        raise argparse.ArgumentTypeError(f"expected SITE=DATASET_DIR, got {text!r}")
    return site, path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.fl.job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder")
    parser.add_argument("--sites", type=int, required=True, help="number of sites, named site-1 ... site-N")
    parser.add_argument("--rounds", type=int, required=True, help="federated rounds")
    parser.add_argument("--local_epochs", type=int, default=1, help="epochs per site and round (%(default)s)")
    parser.add_argument(
        "--site_dataset_dir",
        action="append",
        default=[],
        type=_parse_site_dir,
        metavar="SITE=DIR",
        required=True,
        help="a site's dataset_dir as that site sees it; once per site",
    )
    parser.add_argument("--output", type=Path, required=True, help="job folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing job folder")
    parser.add_argument("--aggregator", choices=("fedavg", "fedprox"), default="fedavg")
    parser.add_argument(
        "--fedprox_mu", type=float, default=0.01, help="FedProx proximal weight (%(default)s)"
    )
    parser.add_argument(
        "--privacy_filter",
        nargs="+",
        choices=("percentile", "exclude_vars"),
        default=[],
        help="filters on what sites send: NVFlare's PercentilePrivacy and/or ExcludeVars",
    )
    parser.add_argument("--percentile", type=int, default=10, help="PercentilePrivacy: share diffs above it")
    parser.add_argument(
        "--gamma", type=float, default=0.01, help="PercentilePrivacy: clip shared diffs to it"
    )
    parser.add_argument("--exclude_vars", help="ExcludeVars: regular expression of weights never sent")
    parser.add_argument(
        "--cross_site_eval",
        action="store_true",
        help="validate each site's and the global model on every site; write the scores table",
    )
    parser.add_argument(
        "--layer",
        action="append",
        metavar="CONFIG",
        help="config over train.json, relative to the bundle (default configs/federated.json if any)",
    )
    parser.add_argument(
        "--model_file",
        default="models/model.pt",
        help="checkpoint of the trained network, relative to the bundle (%(default)s)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        type=parse_override,
        metavar="ID=VALUE",
        help="set a config id at the server and every site, VALUE read as JSON if it parses",
    )
    parser.add_argument(
        "--server_override",
        action="append",
        default=[],
        type=parse_override,
        metavar="ID=VALUE",
        help="set a config id only for the first global model, e.g. backbone_checkpoint=FILE",
    )
    args = parser.parse_args(argv)
    sites = [f"site-{i}" for i in range(1, args.sites + 1)]
    dataset_dirs = dict(args.site_dataset_dir)
    if sorted(dataset_dirs) != sorted(sites):
        parser.error(
            f"--site_dataset_dir must name each of {', '.join(sites)} once; got {', '.join(dataset_dirs)}"
        )
    if args.output.exists() and not args.overwrite:
        parser.error(f"{args.output} exists: choose another --output or pass --overwrite")
    try:
        spec = JobSpec(
            args.bundle,
            dataset_dirs,
            args.rounds,
            args.local_epochs,
            args.aggregator,
            args.fedprox_mu,
            args.privacy_filter,
            args.percentile,
            args.gamma,
            args.exclude_vars,
            args.cross_site_eval,
            dict(args.override),
            args.layer,
            args.model_file,
            dict(args.server_override),
        )
    except ValueError as err:
        parser.error(str(err))
    output = write_job(spec, args.output)
    print(
        f"wrote {output}; try it in NVFlare's simulator with:\n"
        f"  mkdir -p WORKSPACE/local && cp {output}/resources.json WORKSPACE/local/\n"
        f"  nvflare simulator {output} -w WORKSPACE -n {args.sites} -t {args.sites}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
