"""Pack a trained bundle as a model-zoo archive that another site can check before it runs anything.

The archive ``<bundle>_v<version>.zip`` holds one folder ``<bundle>/`` (the layout ``monai.bundle
download`` extracts): configs, docs, LICENSE, ``models/`` (``model.pt``, ``model.ts`` where metadata
``torchscript`` allows it, and every other file inference reads, without resume checkpoints), the
evaluation report under ``eval/``, and ``large_files.yml``. The metadata gets a bumped version with its
changelog line, the exact MONAI, PyTorch, NumPy and collection versions of this site, ``eval_metrics``
read from the evaluation report (with the report's sha256, the data it was run on and when) and
``weights``: every file under ``models/`` with its sha256, as ``large_files.yml`` lists them too.
Nothing is written unless the bundle has weights that load with ``weights_only=True`` and passes
:func:`~common.bundle.verify.verify_bundle`.

Command line::

    python -m common.bundle.export bundles/<bundle> --output dist/ --eval-data "what the report measured" \\
        [--eval-report bundles/<bundle>/eval/test/ctc_metrics.json] [--bump patch|minor|major] \\
        [--changelog "..."] [--folder]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import monai
import numpy
import torch
import yaml
from monai.bundle import ckpt_export
from monai.bundle.scripts import _get_fake_spatial_shape
from packaging.version import Version

from common.bundle.allowlist import COLLECTION
from common.bundle.verify import NET_ID, torchscript_options, verify_bundle
from common.errors import InputDataError
from common.io.atomic import atomic_directory, atomic_write
from common.io.checkpoint import load_checkpoint, sha256sum
from common.networks.timm_backbone import architecture_only

__all__ = ["BUMPS", "LARGE_FILES", "WEIGHTS_KEY", "bump_version", "export_bundle", "main", "read_eval_report"]

LARGE_FILES = "large_files.yml"
WEIGHTS_KEY = "weights"  # metadata: path in the bundle -> sha256, for every file under models/
EVAL_REPORT_KEY = "eval_report"  # metadata: where eval_metrics come from
BUMPS = ("patch", "minor", "major")
SHIPPED = ("configs", "docs", "LICENSE")
RESUME_PREFIX = "checkpoint"  # checkpoint_latest.pt: optimizer state for resuming, not for inference
TRAIN_REMEDY = (
    "train the bundle (python -m monai.bundle run training --config_file <bundle>/configs/train.json ...) "
    "so that models/model.pt exists, then evaluate it with configs/evaluate.json before exporting"
)


def bump_version(version: str, bump: str) -> str:
    """``0.2.0`` -> ``0.2.1`` (patch), ``0.3.0`` (minor) or ``1.0.0`` (major)."""
    major, minor, patch = Version(version).release[:3]
    return {
        "patch": f"{major}.{minor}.{patch + 1}",
        "minor": f"{major}.{minor + 1}.0",
        "major": f"{major + 1}.0.0",
    }[bump]


def _find_eval_report(bundle: Path) -> Path:
    """The one JSON report under ``<bundle>/eval``, where every bundle's evaluate.json writes."""
    found = sorted((bundle / "eval").rglob("*.json"))
    if len(found) != 1:
        what = "none" if not found else ", ".join(str(path) for path in found)
        raise InputDataError(
            bundle / "eval",
            f"expected exactly one evaluation report (JSON), found {what}",
            "run the bundle's configs/evaluate.json, then name its report with --eval-report",
        )
    return found[0]


def read_eval_report(path: str | os.PathLike) -> dict[str, float]:
    """The top-level numbers of an evaluation report (``SEG``, ``DET``, ``OP_CSB`` of ``ctc_metrics.json``),
    which become metadata ``eval_metrics``; nested tables (per image, per class) stay in the report."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise InputDataError(path, "evaluation report not found", TRAIN_REMEDY) from err
    except (OSError, ValueError) as err:
        raise InputDataError(path, f"evaluation report is not valid JSON ({err})") from err
    metrics = {
        key: float(value)
        for key, value in (report.items() if isinstance(report, dict) else ())
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }
    if not metrics:
        raise InputDataError(path, "the evaluation report has no top-level finite numbers to use as eval_metrics")
    return metrics


def _package_versions() -> dict[str, str]:
    """This site's MONAI, PyTorch and NumPy, as model-zoo metadata records them (no local ``+cu130``);
    ``required_packages_version`` gets this site's version of each package it names, and of ours."""
    return {
        "monai_version": Version(monai.__version__).public,
        "pytorch_version": Version(torch.__version__).public,
        "numpy_version": Version(numpy.__version__).public,
    }


def _shipped_model_files(bundle: Path) -> list[Path]:
    """Files under ``models/`` that inference may read: all but hidden files and resume checkpoints."""
    return sorted(
        path
        for path in (bundle / "models").rglob("*")
        if path.is_file() and not path.name.startswith((".", RESUME_PREFIX))
    )


def _check_trained(bundle: Path) -> None:
    """Refuse a bundle without weights, with weights that carry code, or that fails the verifier."""
    model = bundle / "models" / "model.pt"
    if not model.is_file():
        raise InputDataError(model, "no trained weights: the bundle has no models/model.pt", TRAIN_REMEDY)
    for path in _shipped_model_files(bundle):
        if path.suffix == ".pt":
            load_checkpoint(path)  # weights_only: what the receiving site will accept
    report = verify_bundle(bundle)  # with its export check: a traced model.ts also fits other input sizes
    if not report.ok:
        raise InputDataError(bundle, f"the bundle verifier failed:\n{report.format()}")


def _export_torchscript(bundle: Path, staged: Path, metadata: Mapping[str, Any]) -> None:
    """``models/model.ts`` from the trained ``models/model.pt``, as ``monai.bundle ckpt_export`` writes it
    (``staged`` already holds the metadata it embeds)."""
    exportable, use_trace = torchscript_options(metadata)
    if not exportable:
        return
    shape = None
    if use_trace:  # the smallest input metadata allows, as the verifier traces
        image = metadata["network_data_format"]["inputs"]["image"]
        shape = [1, int(image["num_channels"]), *_get_fake_spatial_shape(image["spatial_shape"], p=1, n=2, any=64)]
    # ckpt_export loads the trained weights, so no pretrained download first; the verifier has checked
    # that a trace fits other input sizes, which makes the tracer's warnings about constants moot
    with architecture_only(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        ckpt_export(
            net_id=NET_ID,
            filepath=str(staged / "models" / "model.ts"),
            ckpt_file=str(bundle / "models" / "model.pt"),
            meta_file=str(staged / "configs" / "metadata.json"),
            config_file=str(bundle / "configs" / "train.json"),
            use_trace=use_trace,
            input_shape=shape,
            bundle_root=str(bundle),
        )


def _write_json(path: Path, content: Any) -> None:
    text = json.dumps(content, indent=4) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _stage(bundle: Path, staged: Path, metadata: dict[str, Any], report: Path, eval_data: str) -> None:
    """Copy what ships into ``staged``, export TorchScript, and complete and write the metadata."""
    for name in SHIPPED:
        source = bundle / name
        if source.is_dir():
            shutil.copytree(source, staged / name)
        elif source.is_file():
            shutil.copyfile(source, staged / name)
    for path in _shipped_model_files(bundle):
        target = staged / path.relative_to(bundle)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    report_in_archive = PurePosixPath("eval", report.name)
    (staged / "eval").mkdir()
    shutil.copyfile(report, staged / report_in_archive)
    _write_json(staged / "configs" / "metadata.json", metadata)  # embedded in model.ts
    _export_torchscript(bundle, staged, metadata)

    weights = {
        PurePosixPath(path.relative_to(staged)).as_posix(): sha256sum(path)
        for path in sorted((staged / "models").rglob("*"))
        if path.is_file()
    }
    evaluated = datetime.fromtimestamp(report.stat().st_mtime, tz=timezone.utc)
    metadata[WEIGHTS_KEY] = weights
    metadata[EVAL_REPORT_KEY] = {
        "file": report_in_archive.as_posix(),
        "sha256": sha256sum(report),
        "data": eval_data,
        "evaluated": evaluated.isoformat(timespec="seconds"),
    }
    _write_json(staged / "configs" / "metadata.json", metadata)
    large_files = {
        "large_files": [
            {"path": path, "url": "", "hash_val": digest, "hash_type": "sha256"} for path, digest in weights.items()
        ]
    }
    text = yaml.safe_dump(large_files, sort_keys=False)
    atomic_write(staged / LARGE_FILES, lambda f: f.write(text.encode("utf-8")))


def _zip_folder(folder: Path, archive: Path) -> Path:
    """``archive`` holding ``folder`` under its own name, written atomically."""

    def write(f: Any) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    zf.write(path, PurePosixPath(folder.name, *path.relative_to(folder).parts).as_posix())

    return atomic_write(archive, write)


def export_bundle(
    bundle_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    eval_data: str,
    eval_report: str | os.PathLike | None = None,
    bump: str = "patch",
    changelog: str | None = None,
    folder: bool = False,
) -> Path:
    """Write ``<output_dir>/<bundle>_v<new version>.zip`` (and with ``folder`` also ``<output_dir>/<bundle>``).

    Args:
        bundle_dir: a trained bundle: ``models/model.pt`` written by its training, its report by evaluate.json.
        output_dir: where the archive goes.
        eval_data: the data the evaluation report was measured on, e.g. ``"LIVECell test split"``.
        eval_report: the report written by the bundle's evaluate workflow; default: the one JSON file under
            ``<bundle>/eval``.
        bump: which part of the bundle version to increase.
        changelog: the changelog line of the new version; default names the report's metrics.
        folder: also write the unpacked bundle folder.

    Raises:
        InputDataError: no weights, weights that do not load with ``weights_only=True``, a verifier
            failure, or a missing or empty evaluation report; nothing is written then.
    """
    bundle, output = Path(bundle_dir).resolve(), Path(output_dir)
    if bump not in BUMPS:
        raise ValueError(f"bump must be one of {BUMPS}, got {bump!r}")
    report = Path(eval_report) if eval_report is not None else _find_eval_report(bundle)
    metrics = read_eval_report(report)
    _check_trained(bundle)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    version = bump_version(metadata["version"], bump)
    summary = ", ".join(f"{key} {value:.4g}" for key, value in metrics.items())
    metadata["version"] = version
    metadata["changelog"] = {version: changelog or f"trained weights; {summary} on {eval_data}", **metadata["changelog"]}
    metadata.update(_package_versions())
    required = [*metadata.get("required_packages_version", {}), COLLECTION]
    metadata["required_packages_version"] = {name: importlib.metadata.version(name) for name in required}
    metadata["eval_metrics"] = metrics

    with tempfile.TemporaryDirectory(prefix="export_bundle_") as tmp:
        staged = Path(tmp) / bundle.name
        staged.mkdir()
        _stage(bundle, staged, metadata, report, eval_data)
        archive = _zip_folder(staged, output / f"{bundle.name}_v{version}.zip")
        if folder:
            with atomic_directory(output / bundle.name) as target:
                shutil.copytree(staged, target, dirs_exist_ok=True)
    return archive


def main(argv: Sequence[str] | None = None) -> int:
    """Export one bundle; returns 1, with one message, when it is refused."""
    parser = argparse.ArgumentParser(prog="python -m common.bundle.export", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="trained bundle folder, e.g. bundles/<name>")
    parser.add_argument("--output", type=Path, default=Path("dist"), help="default: %(default)s")
    parser.add_argument("--eval-data", required=True, help="the data the evaluation report was measured on")
    parser.add_argument("--eval-report", type=Path, help="default: the one JSON file under <bundle>/eval")
    parser.add_argument("--bump", choices=BUMPS, default="patch", help="default: %(default)s")
    parser.add_argument("--changelog", help="what changed in the new version")
    parser.add_argument("--folder", action="store_true", help="also write the unpacked folder")
    args = parser.parse_args(argv)
    try:
        archive = export_bundle(
            args.bundle, args.output, args.eval_data, args.eval_report, args.bump, args.changelog, args.folder
        )
    except InputDataError as err:
        print(f"export refused: {err}\nHow to fix: {err.remedy}", file=sys.stderr)
        return 1
    print(archive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
