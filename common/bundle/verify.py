"""Check a bundle folder before anyone trains it.

A bundle is configs only, so its bugs (a misspelt ``_target_``, an ``@id`` that an override renamed,
metadata that disagrees with the network, a network that no longer exports) otherwise surface minutes
into a user's first run on their own data. :func:`verify_bundle` finds them in seconds, builds nothing
but the network, and reports every problem at once, each naming the file at fault. It parses configs
with ``monai.bundle.ConfigParser``, resolves targets with MONAI's ``ComponentLocator`` and exports with
``monai.bundle.ckpt_export``, so what passes here is what ``python -m monai.bundle run`` accepts.
The network is built under :func:`~common.networks.timm_backbone.architecture_only`: the checks need its
architecture, not its weights, so they run offline and in a fresh clone without earlier stages' weights.

Command line::

    python -m common.bundle.verify bundles/<name> [bundles/<other> ...] [--no-export]
    python -m common.bundle.verify --all [--override ID=VALUE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import pydoc
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import torch
import yaml
from monai.bundle import ComponentLocator, ConfigComponent, ConfigParser, ckpt_export
from monai.bundle.reference_resolver import ReferenceResolver
from monai.bundle.scripts import _get_fake_spatial_shape
from monai.bundle.utils import DEPRECATED_ID_MAPPING, EXPR_KEY, ID_REF_KEY, ID_SEP_KEY
from monai.utils import get_equivalent_dtype

from common.io.checkpoint import save_checkpoint
from common.networks.timm_backbone import architecture_only

__all__ = [
    "DEFAULT_CONFIG_BASES",
    "REQUIRED_FILES",
    "CheckResult",
    "VerificationReport",
    "config_bases",
    "load_metadata_schema",
    "main",
    "parse_override",
    "torchscript_options",
    "verify_bundle",
]

REQUIRED_FILES = (
    "configs/metadata.json",
    "configs/train.json",
    "configs/evaluate.json",
    "configs/inference.json",
    "configs/multi_gpu_train.json",
    "configs/logging.conf",
    "docs/README.md",
    "LICENSE",
)
# Configs that only make sense merged over others, as users run them:
# ``--config_file "['train.json','evaluate.json']"``. Bundles extend this with metadata ``config_bases``.
DEFAULT_CONFIG_BASES: Mapping[str, tuple[str, ...]] = {
    "evaluate.json": ("train.json",),
    "multi_gpu_train.json": ("train.json",),
}
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
NET_ID = "network_def"


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one named check; when ``ok`` is False, ``message`` names the file and what is wrong."""

    name: str
    ok: bool
    message: str


@dataclass
class VerificationReport:
    """All checks run on one bundle folder."""

    bundle_dir: Path
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def format(self) -> str:
        """A table, one row per check, with multi-line messages indented under their check."""
        failed = sum(not check.ok for check in self.checks)
        status = "OK" if not failed else f"FAILED ({failed} of {len(self.checks)} checks)"
        width = max((len(check.name) for check in self.checks), default=0)
        lines = [f"{self.bundle_dir}: {status}"]
        for check in self.checks:
            first, *rest = check.message.splitlines() or [""]
            lines.append(f"  {'PASS' if check.ok else 'FAIL'}  {check.name:<{width}}  {first}")
            lines += [f"  {'':4}  {'':<{width}}  {line}" for line in rest]
        return "\n".join(lines)


@dataclass(frozen=True)
class _ParsedConfig:
    """A config file parsed as ``monai.bundle run`` would: merged over its bases, metadata as ``_meta_``."""

    path: Path
    bases: tuple[str, ...]
    parser: ConfigParser

    @property
    def label(self) -> str:
        return _config_label(self.path, self.bases)


def _config_label(path: Path, bases: Sequence[str]) -> str:
    """How reports name a config: its path, and what it is merged over."""
    return f"{path} (merged over {', '.join(bases)})" if bases else str(path)


@dataclass(frozen=True)
class _NetIO:
    """The fake input and the expected output that ``network_data_format`` declares."""

    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    output_channels: int
    output_spatial: tuple[int | None, ...] | None  # None per axis declared "*" (any size)
    output_dtype: torch.dtype
    output_keys: tuple[str, ...] = ()  # detection models: each image gives a dict with these keys


def load_metadata_schema() -> dict[str, Any]:
    """The JSON Schema that every bundle's ``configs/metadata.json`` must satisfy."""
    text = resources.files("common.bundle").joinpath("metadata_schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def config_bases(metadata: Mapping[str, Any] | None) -> dict[str, tuple[str, ...]]:
    """Config file name -> the config file names it is merged over, defaults updated by ``config_bases``."""
    bases = dict(DEFAULT_CONFIG_BASES)
    declared = (metadata or {}).get("config_bases")
    if isinstance(declared, Mapping):
        bases.update({name: tuple(chain) for name, chain in declared.items() if isinstance(chain, list)})
    return bases


def verify_bundle(
    bundle_dir: str | os.PathLike,
    export: bool = True,
    overrides: Mapping[str, Any] | None = None,
    n: int = 2,
    p: int = 1,
    any_size: int = 64,
) -> VerificationReport:
    """Run every check on one bundle folder and collect the results; never stops at the first failure.

    Args:
        bundle_dir: the bundle folder, e.g. ``bundles/microscopy_dinocell_segmentation``.
        export: also export ``network_def`` to TorchScript with ``ckpt_export`` and compare outputs.
        overrides: config id -> value, applied to every config that defines the id, as on the
            ``monai.bundle run`` command line, e.g. ``{"backbone": "vit_small_patch16_224"}`` to verify
            a variant.
        n, p, any_size: values for ``n``, ``p`` and ``"*"`` in metadata ``spatial_shape`` entries
            (``"16*n"``, ``"32**p"``), as in ``monai.bundle verify_net_in_out``. ``n=2`` rather than 1
            gives networks that downsample at least two steps per spatial unit.
    """
    bundle = Path(bundle_dir)
    report = VerificationReport(bundle)
    if not bundle.is_dir():
        report.checks.append(CheckResult("bundle folder", False, f"{bundle}: not a folder"))
        return report
    meta_path = bundle / "configs" / "metadata.json"
    report.checks.append(_check_required_files(bundle))
    metadata, metadata_check = _check_metadata(meta_path)
    report.checks += [metadata_check, _check_changelog(metadata, meta_path)]
    overrides = dict(overrides or {})
    configs, parse_check = _parse_configs(bundle, metadata, overrides)
    report.checks += [parse_check, _check_targets(configs), _check_references(configs)]
    with architecture_only():
        report.checks += _check_network(bundle, metadata, configs, export, overrides, n, p, any_size)
    return report


def _result(name: str, problems: Sequence[str], ok_message: str) -> CheckResult:
    return CheckResult(name, not problems, "\n".join(problems) if problems else ok_message)


def _describe(err: BaseException) -> str:
    """One line per exception in the ``raise ... from`` chain, so the root cause is not hidden."""
    parts = []
    current: BaseException | None = err
    while current is not None:
        text = str(current).strip().splitlines()
        parts.append(f"{type(current).__name__}: {text[0] if text else ''}")
        current = current.__cause__
    return " <- ".join(parts)


def _show_id(config_id: str) -> str:
    """Ids as users write them in configs and on the command line (``train#handlers#0``)."""
    return config_id.replace(ID_SEP_KEY, "#")


def _check_required_files(bundle: Path) -> CheckResult:
    problems = [f"{bundle / name}: missing" for name in REQUIRED_FILES if not (bundle / name).is_file()]
    return _result("required files", problems, f"all {len(REQUIRED_FILES)} present")


def _check_metadata(meta_path: Path) -> tuple[dict[str, Any] | None, CheckResult]:
    """Check 2: ``metadata.json`` is JSON and satisfies the schema; returns it when it is an object."""
    name = "metadata schema"
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, CheckResult(name, False, f"{meta_path}: missing")
    except (OSError, ValueError) as err:
        return None, CheckResult(name, False, f"{meta_path}: not valid JSON ({err})")
    validator = jsonschema.Draft202012Validator(load_metadata_schema())
    errors = sorted(validator.iter_errors(metadata), key=lambda e: [str(part) for part in e.absolute_path])
    problems = [
        f"{meta_path}: {'.'.join(str(part) for part in e.absolute_path) or '(top level)'}: {e.message}"
        for e in errors
    ]
    if not isinstance(metadata, dict):
        return None, _result(name, problems, "valid")
    # MONAI renames a deprecated key on load, silently replacing the current key's content with it.
    problems += [
        f"{meta_path}: {old}: MONAI reads it as the deprecated name of {new} and overwrites {new} with it; "
        f"merge the two into {new}"
        for old, new in DEPRECATED_ID_MAPPING.items()
        if old in metadata and new in metadata
    ]
    return metadata, _result(name, problems, "valid")


def _check_changelog(metadata: Mapping[str, Any] | None, meta_path: Path) -> CheckResult:
    """Check 3: the current version says what changed in it."""
    name = "version in changelog"
    if metadata is None:
        return CheckResult(name, False, f"not run: {meta_path} could not be read")
    version, changelog = metadata.get("version"), metadata.get("changelog")
    if not isinstance(version, str) or not isinstance(changelog, dict) or version not in changelog:
        return CheckResult(name, False, f"{meta_path}: version {version!r} has no entry in changelog")
    return CheckResult(name, True, f"{version}: {changelog[version]}")


def _load_problem(path: Path) -> str | None:
    """Why ``path`` cannot be loaded as a config file, or None when it can."""
    try:
        content = ConfigParser.load_config_file(path)
    except json.JSONDecodeError as err:
        return f"{path}: not valid JSON ({err})"
    except (OSError, ValueError, yaml.YAMLError) as err:
        return f"{path}: cannot be read as a config ({_describe(err)})"
    if not isinstance(content, dict):
        return f"{path}: top level is a {type(content).__name__}, a config must be an object"
    return None


def _build_parser(
    bundle: Path, names: Sequence[str], metadata: Mapping[str, Any] | None, overrides: Mapping[str, Any]
) -> ConfigParser:
    """Merge config files as ``monai.bundle run`` does, with the metadata as ``_meta_``, ``bundle_root``
    pointing at the bundle, and each override applied where its id exists; then parse (no instantiation)."""
    parser = ConfigParser()
    parser.read_meta(copy.deepcopy(dict(metadata or {})))  # MONAI renames deprecated keys in place
    parser.read_config([str(bundle / "configs" / name) for name in names])
    for config_id, value in {"bundle_root": str(bundle), **overrides}.items():
        if config_id in parser:
            parser[config_id] = copy.deepcopy(value)
    parser.parse()
    return parser


def _parse_configs(
    bundle: Path, metadata: Mapping[str, Any] | None, overrides: Mapping[str, Any]
) -> tuple[list[_ParsedConfig], CheckResult]:
    """Check 4: every config file loads, and parses alone or merged over its bases."""
    config_dir, meta = bundle / "configs", "metadata.json"
    files = sorted(
        path
        for path in config_dir.glob("*")
        if path.suffix.lower() in CONFIG_SUFFIXES and path.name != meta
    )
    load_problems = {path.name: _load_problem(path) for path in files}
    problems = [problem for problem in load_problems.values() if problem]
    bases_of = config_bases(metadata)
    parsed: list[_ParsedConfig] = []
    # Stand-alone configs first: a problem shared with configs merged over them is reported at its source.
    for path in sorted(files, key=lambda path: (path.name in bases_of, path.name)):
        bases = bases_of.get(path.name, ())
        absent = [base for base in bases if base not in load_problems]
        if absent:
            problems.append(f"{path}: base config {', '.join(absent)} not found in {config_dir}")
        if any(load_problems.get(name, "absent") for name in (*bases, path.name)):
            continue  # reported above
        try:
            parser = _build_parser(bundle, (*bases, path.name), metadata, overrides)
        except Exception as err:  # noqa: BLE001 - a user's macros and merges can fail in any way: report, never crash
            hint = "" if bases else f"; if it is merged over other configs, list them in {meta} config_bases"
            problems.append(f"{_config_label(path, bases)}: does not parse ({_describe(err)}){hint}")
            continue
        parsed.append(_ParsedConfig(path, bases, parser))
    unused = [key for key in overrides if not any(key in config.parser for config in parsed)]
    problems += [f"override {config_id}: no config in {config_dir} defines this id" for config_id in unused]
    return parsed, _result("configs parse", problems, f"{len(parsed)} configs parsed")


def _components(configs: Sequence[_ParsedConfig]) -> Iterator[tuple[_ParsedConfig, str, dict[str, Any]]]:
    """Every ``_target_`` component of every parsed config, with its id."""
    for config in configs:
        for config_id, item in config.parser.ref_resolver.items.items():
            if isinstance(item, ConfigComponent):
                yield config, config_id, item.get_config()


def _check_targets(configs: Sequence[_ParsedConfig]) -> CheckResult:
    """Check 5: every ``_target_`` names an importable class or function, found without instantiating it."""
    locator = ComponentLocator()  # one scan of MONAI's modules for short names like "SupervisedTrainer"
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for config, config_id, component in _components(configs):
        target = component["_target_"]
        if not isinstance(target, str) or target.startswith((EXPR_KEY, ID_REF_KEY)):
            continue  # a callable produced by an expression or reference exists only at run time
        if (config_id, target) in seen:
            continue
        seen.add((config_id, target))
        module_name = ConfigComponent(component, id=config_id, locator=locator).resolve_module_name()
        problem = None
        try:
            found = pydoc.locate(module_name)
        except pydoc.ErrorDuringImport as err:
            problem = f"fails to import ({_describe(err.value)})"
        else:
            if found is None:
                problem = "does not resolve to an importable class or function"
            elif not callable(found):
                problem = "is not a class or function"
        if problem:
            problems.append(f"{config.label}: {_show_id(config_id)}#_target_ = {target} {problem}")
    return _result("targets resolve", problems, f"{len(seen)} targets importable")


def _check_references(configs: Sequence[_ParsedConfig]) -> CheckResult:
    """Every ``@id`` reference points at an id the (merged) config defines."""
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for config in configs:
        items = config.parser.ref_resolver.items
        for config_id, item in items.items():
            value = item.get_config()
            if not isinstance(value, str):
                continue
            for ref in ReferenceResolver.match_refs_pattern(value):
                if ref not in items and (config_id, ref) not in seen:
                    seen.add((config_id, ref))
                    where = f"{config.label}: {_show_id(config_id)}"
                    problems.append(f"{where} refers to @{_show_id(ref)}, which is not defined")
    return _result("references resolve", problems, "every @reference is defined")


def _net_io(metadata: Mapping[str, Any], n: int, p: int, any_size: int) -> _NetIO:
    """Read ``inputs.image`` and ``outputs.pred``, the entries ``monai.bundle verify_net_in_out`` uses."""
    data_format = metadata["network_data_format"]
    image, pred = data_format["inputs"]["image"], data_format["outputs"]["pred"]
    spatial = _get_fake_spatial_shape(image["spatial_shape"], p=p, n=n, any=any_size)
    output_spatial = None
    if "spatial_shape" in pred:
        output_spatial = tuple(
            None if axis == "*" else _get_fake_spatial_shape([axis], p=p, n=n, any=any_size)[0]
            for axis in pred["spatial_shape"]
        )
    input_shape = (1, int(image["num_channels"]), *spatial)
    input_dtype = get_equivalent_dtype(image["dtype"], torch.Tensor)
    if pred.get("type") == "detections":  # torchvision-style detectors: a list of per-image dicts
        return _NetIO(input_shape, input_dtype, 0, None, input_dtype, output_keys=tuple(pred["keys"]))
    return _NetIO(
        input_shape=input_shape,
        input_dtype=input_dtype,
        output_channels=int(pred["num_channels"]),
        output_spatial=output_spatial,
        output_dtype=get_equivalent_dtype(pred["dtype"], torch.Tensor),
    )


def _output_problems(output: Any, io: _NetIO) -> list[str]:
    """How the network output differs from ``outputs.pred``; empty when it matches."""
    if io.output_keys:
        if not isinstance(output, (list, tuple)) or len(output) != io.input_shape[0]:
            return [f"returned a {type(output).__name__}, expected a list with one dict per image"]
        missing = [key for key in io.output_keys if not all(isinstance(d, Mapping) and key in d for d in output)]
        return [f"detections lack the declared keys {missing}"] if missing else []
    if not isinstance(output, torch.Tensor):
        return [f"returned a {type(output).__name__}, expected one tensor"]
    problems = []
    if output.ndim < 2 or output.shape[1] != io.output_channels:
        shape = tuple(output.shape)
        problems.append(f"output shape {shape} does not have {io.output_channels} channels in dim 1")
    spatial = tuple(output.shape[2:])
    if spatial and io.output_spatial is not None:
        expected = io.output_spatial
        if len(spatial) != len(expected) or any(e is not None and e != s for e, s in zip(expected, spatial)):
            problems.append(f"output spatial shape {spatial} differs from the declared {expected}")
    if output.dtype != io.output_dtype:
        problems.append(f"output dtype {output.dtype} differs from the declared {io.output_dtype}")
    return problems


def _output_summary(output: Any) -> str:
    """A tensor's shape, or the keys of a detector's per-image dicts, for the report."""
    if isinstance(output, torch.Tensor):
        return str(tuple(output.shape))
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
        return f"{len(output)} x dict({', '.join(map(str, output[0]))})"
    return type(output).__name__


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Keep the report readable during ``ckpt_export``: hide the input summary monai.bundle.scripts logs
    at INFO and torch.jit's deprecation notices, which concern PyTorch rather than the bundle."""
    logger = logging.getLogger("monai.bundle.scripts")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            yield
    finally:
        logger.setLevel(level)


def _check_network(
    bundle: Path,
    metadata: Mapping[str, Any] | None,
    configs: Sequence[_ParsedConfig],
    export: bool,
    overrides: Mapping[str, Any],
    n: int,
    p: int,
    any_size: int,
) -> list[CheckResult]:
    """Checks 6 and 7 on one instance of ``network_def``: shapes as declared, then TorchScript export.

    The network runs on two input sizes, ``n`` and ``n + 1``: a ``spatial_shape`` such as ``"16*n"``
    promises every ``n``, and a traced export can silently keep the size it was traced on.
    """
    names = ["network in/out"] + (["torchscript export"] if export else [])
    meta_path, train_path = bundle / "configs" / "metadata.json", bundle / "configs" / "train.json"

    def not_run(reason: str) -> list[CheckResult]:
        return [CheckResult(name, False, f"not run: {reason}") for name in names]

    train = next((c for c in configs if c.path.name == "train.json" and not c.bases), None)
    if metadata is None or train is None:
        return not_run(f"{meta_path if metadata is None else train_path} could not be read")
    try:
        ios = [_net_io(metadata, n=size, p=p, any_size=any_size) for size in (n, n + 1)]
    except (KeyError, TypeError, ValueError) as err:
        return not_run(
            f"{meta_path}: network_data_format needs inputs.image and outputs.pred with num_channels, "
            f"spatial_shape and dtype ({_describe(err)})"
        )
    if NET_ID not in train.parser:
        return not_run(f"{train_path}: no '{NET_ID}' id")
    try:
        net = train.parser.get_parsed_content(NET_ID)
    except Exception as err:  # noqa: BLE001 - the user's network constructor can raise anything
        return not_run(f"{train_path}: {NET_ID} could not be built ({_describe(err)})")
    if not isinstance(net, torch.nn.Module):
        return not_run(f"{train_path}: {NET_ID} is a {type(net).__name__}, not a torch.nn.Module")

    net.eval()
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(io.input_shape, generator=generator).to(io.input_dtype) for io in ios]
    outputs = []
    for io, image in zip(ios, images):
        try:
            with torch.no_grad():
                outputs.append(net(image))
        except Exception as err:  # noqa: BLE001 - a shape the network rejects shows up as any exception type
            return not_run(
                f"{train_path}: {NET_ID} failed on the {io.input_dtype} input {io.input_shape} allowed by "
                f"{meta_path} ({_describe(err)})"
            )
    problems = next((found for found in map(_output_problems, outputs, ios) if found), [])
    declared_by = f"({meta_path} outputs.pred)"
    passed = ", ".join(f"{io.input_shape} -> {_output_summary(out)}" for io, out in zip(ios, outputs))
    results = [
        _result(
            names[0],
            [f"{train_path}: {NET_ID} {problem} {declared_by}" for problem in problems],
            passed if ios[0].output_keys else f"{passed}; {ios[0].input_dtype} -> {outputs[0].dtype}",
        )
    ]
    if export:
        train_overrides = {key: value for key, value in overrides.items() if key in train.parser}
        results.append(_check_export(bundle, metadata, train_overrides, net, images, outputs, names[1]))
    return results


def torchscript_options(metadata: Mapping[str, Any]) -> tuple[bool, bool]:
    """(exportable, use_trace) from metadata ``torchscript``: scripted unless it says to trace, exported
    unless it declares ``"exportable": false``. Shared with the exporter, which writes ``models/model.ts``."""
    declared = metadata.get("torchscript")
    declared = declared if isinstance(declared, Mapping) else {}
    return declared.get("exportable") is not False, bool(declared.get("use_trace", False))


def _check_export(
    bundle: Path,
    metadata: Mapping[str, Any],
    overrides: Mapping[str, Any],
    net: torch.nn.Module,
    images: Sequence[torch.Tensor],
    outputs: Sequence[Any],
    name: str,
) -> CheckResult:
    """Check 7: ``ckpt_export`` of the network's weights, reloaded, gives the eager ``outputs`` on ``images``.

    Metadata ``torchscript`` says whether to script (default) or trace on the first image, or that the
    network cannot be exported. ``overrides`` are those train.json defines, passed to ``ckpt_export``.
    """
    meta_path, train_path = bundle / "configs" / "metadata.json", bundle / "configs" / "train.json"
    exportable, use_trace = torchscript_options(metadata)
    if not exportable:
        reason = metadata["torchscript"].get("reason")
        return CheckResult(name, True, f"skipped: {meta_path} declares it not exportable: {reason}")
    with tempfile.TemporaryDirectory(prefix="verify_bundle_") as tmp:
        ckpt_path = save_checkpoint(net.state_dict(), Path(tmp) / "model.pt")
        ts_path = Path(tmp) / "model.ts"
        try:
            with _quiet_export():
                ckpt_export(
                    net_id=NET_ID,
                    filepath=str(ts_path),
                    ckpt_file=str(ckpt_path),
                    meta_file=str(meta_path),
                    config_file=str(train_path),
                    use_trace=use_trace,
                    input_shape=list(images[0].shape) if use_trace else None,
                    **{"bundle_root": str(bundle), **overrides},
                )
                exported_net = torch.jit.load(str(ts_path), map_location="cpu").eval()
            with torch.no_grad():
                exported = [exported_net(image) for image in images]
        except Exception as err:  # noqa: BLE001 - TorchScript rejects unsupported Python in many exception types
            return CheckResult(
                name,
                False,
                f"{train_path}: {NET_ID} cannot be exported with monai.bundle ckpt_export "
                f"({_describe(err)}{_source_locations(err)}). Make the network scriptable, or in {meta_path} "
                'set "torchscript": {"exportable": true, "use_trace": true} if it traces, or declare '
                '"torchscript": {"exportable": false, "reason": "<why>"}',
            )
    for image, eager, loaded in zip(images, outputs, exported):
        try:
            torch.testing.assert_close(loaded, eager, rtol=1e-4, atol=1e-5)
        except AssertionError as err:
            where = f"{train_path}: exported {NET_ID} differs from eager on input {tuple(image.shape)}"
            return CheckResult(name, False, f"{where}: {err}")
    how = "traced" if use_trace else "scripted"
    return CheckResult(name, True, f"ckpt_export ({how}) output matches the eager network")


def _source_locations(err: BaseException) -> str:
    """``; at file:line <- ...`` from a TorchScript error, whose first line rarely says where it failed."""
    locations = re.findall(r'File "([^"]+)", line (\d+)', str(err))
    return "; at " + " <- ".join(f"{path}:{line}" for path, line in locations) if locations else ""


def parse_override(text: str) -> tuple[str, Any]:
    """``ID=VALUE`` from the command line; VALUE is JSON (``false``, ``3``, ``[1, 2]``) or else a string."""
    config_id, sep, value = text.partition("=")
    if not sep or not config_id:
        raise argparse.ArgumentTypeError(f"expected ID=VALUE, got {text!r}")
    try:
        return config_id, json.loads(value)
    except json.JSONDecodeError:
        return config_id, value


def main(argv: Sequence[str] | None = None) -> int:
    """Verify the bundles named on the command line; returns 1 when any check of any bundle failed."""
    parser = argparse.ArgumentParser(
        prog="python -m common.bundle.verify", description="Check bundle folders before anyone trains them."
    )
    parser.add_argument("bundles", nargs="*", type=Path, help="bundle folders to verify")
    parser.add_argument("--all", action="store_true", help="verify every folder under --bundles-root")
    parser.add_argument("--bundles-root", type=Path, default=Path("bundles"), help="default: %(default)s")
    parser.add_argument("--no-export", action="store_true", help="skip the TorchScript export check")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        type=parse_override,
        metavar="ID=VALUE",
        help="set a config id in every config that defines it, VALUE read as JSON if it parses, "
        "e.g. --override backbone=vit_small_patch16_224",
    )
    args = parser.parse_args(argv)
    bundles = list(args.bundles)
    if args.all:
        if not args.bundles_root.is_dir():
            parser.error(f"{args.bundles_root}: not a folder (set --bundles-root)")
        bundles += sorted(
            path for path in args.bundles_root.iterdir() if path.is_dir() and not path.name.startswith(".")
        )
    if not bundles:
        parser.error("no bundle folders to verify: name some, or use --all with a non-empty --bundles-root")
    failed = 0
    for bundle in bundles:
        report = verify_bundle(bundle, export=not args.no_export, overrides=dict(args.override))
        print(report.format(), end="\n\n", flush=True)
        failed += not report.ok
    print(f"{len(bundles) - failed} of {len(bundles)} bundles passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
