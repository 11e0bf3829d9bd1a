"""What in a received bundle's configs would run code that this collection did not write.

MONAI imports and calls every ``_target_`` and passes every ``$`` value to ``eval()`` (advisory
GHSA-873f-pvrv-4x83); ``%`` macros pull config text from other files, and ``logging.config.fileConfig``
imports each ``class`` and evaluates each ``args`` and ``kwargs`` of ``logging.conf``. A bundle's configs
are therefore code. :func:`untrusted_items` lists every ``_target_`` outside :data:`ALLOWED_TARGET_PREFIXES`
and every expression, macro and logging entry that the reference configs (the same bundle as shipped
with the installed collection of the version the bundle names, see :func:`reference_configs`) do not
contain; with no reference, every expression is listed. Nothing is imported or evaluated.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from monai.bundle import ComponentLocator, ConfigParser
from monai.bundle.utils import EXPR_KEY, ID_REF_KEY, ID_SEP_KEY, MACRO_KEY

from common.errors import InputDataError

__all__ = [
    "ALLOWED_TARGET_PREFIXES",
    "COLLECTION",
    "ConfigItem",
    "config_items",
    "reference_configs",
    "untrusted_items",
]

COLLECTION = "monai-imaging-bundles"
# Our configs call nothing else: `grep -rho '"_target_": "[^"]*"' bundles/*/configs` finds only these
# packages and MONAI's short names (``Compose``, ``SupervisedTrainer``); the standard library appears
# only in ``$`` expressions (``$import os``), which are checked against the reference instead.
ALLOWED_TARGET_PREFIXES = ("monai.", "torch.", "torchvision.", "ignite.", "timm.", "common.")
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
LOGGING_CONF = "logging.conf"
LOGGING_CODE_KEYS = ("class", "args", "kwargs")  # imported or eval()-ed by logging.config.fileConfig


@dataclass(frozen=True)
class ConfigItem:
    """One piece of config that runs code, e.g. ``configs/train.json``, ``optimizer#_target_``."""

    file: str  # relative to the bundle folder, POSIX separators
    config_id: str  # as users write ids on the command line, ``train#handlers#0#_target_``
    kind: str  # "_target_", "expression", "macro" or "logging"
    value: str

    def describe(self) -> str:
        return f"{self.file}: {self.config_id} = {self.value!r} ({self.kind})"


def _walk(node: Any, config_id: str) -> Iterator[tuple[str, str]]:
    """(id, string) for every string in a loaded config, ``_target_`` values under ids ending in it."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _walk(value, f"{config_id}{ID_SEP_KEY}{key}" if config_id else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{config_id}{ID_SEP_KEY}{index}" if config_id else str(index))
    elif isinstance(node, str):
        yield config_id, node


def _config_file_items(path: Path, file: str) -> Iterator[ConfigItem]:
    try:
        content = ConfigParser.load_config_file(path)  # json.load or yaml.safe_load: builds no objects
    except (OSError, ValueError, yaml.YAMLError) as err:  # JSONDecodeError is a ValueError
        raise InputDataError(path, f"cannot be read as a config ({err})") from err
    for config_id, value in _walk(content, ""):
        shown = config_id.replace(ID_SEP_KEY, "#")
        if value.startswith(EXPR_KEY):
            yield ConfigItem(file, shown, "expression", value)
        elif value.startswith(MACRO_KEY):
            yield ConfigItem(file, shown, "macro", value)
        elif config_id.split(ID_SEP_KEY)[-1] == "_target_" and not value.startswith(ID_REF_KEY):
            yield ConfigItem(file, shown, "_target_", value)


def _logging_items(path: Path, file: str) -> Iterator[ConfigItem]:
    parser = configparser.RawConfigParser()  # fileConfig's own parser, without interpolation
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as err:
        raise InputDataError(path, f"cannot be read as a logging config ({err})") from err
    for section in parser.sections():
        for key, value in parser.items(section):
            if key in LOGGING_CODE_KEYS:
                yield ConfigItem(file, f"[{section}] {key}", "logging", value)


def config_items(bundle_dir: str | os.PathLike) -> list[ConfigItem]:
    """Every ``_target_``, ``$`` expression, ``%`` macro and code-bearing ``logging.conf`` entry under
    ``configs/`` (metadata included: MONAI parses it as ``_meta_``), in file order."""
    bundle = Path(bundle_dir)
    items: list[ConfigItem] = []
    for path in sorted((bundle / "configs").rglob("*")):
        file = PurePosixPath(path.relative_to(bundle)).as_posix()
        if path.suffix.lower() in CONFIG_SUFFIXES:
            items += _config_file_items(path, file)
        elif path.name == LOGGING_CONF:
            items += _logging_items(path, file)
    return items


def _installed_bundle_configs(name: str) -> Path | None:
    """``configs/`` of bundle ``name`` as the installed collection ships it: from the source tree that
    ``common`` is imported from (a checkout or editable install), else among the distribution's files."""
    checkout = Path(__file__).resolve().parents[2] / "bundles" / name / "configs"
    if (checkout / "metadata.json").is_file():
        return checkout
    try:
        files = importlib.metadata.distribution(COLLECTION).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    suffix = ("bundles", name, "configs", "metadata.json")
    located = (Path(file.locate()) for file in files if tuple(file.parts[-4:]) == suffix)
    return next((path.parent for path in located if path.is_file()), None)


def reference_configs(name: str, collection_version: str | None) -> Path | None:
    """The configs the installed collection ships for bundle ``name``, when the installed collection is
    ``collection_version``, the one the bundle's metadata says it needs; otherwise None.

    The collection version pins our configs: an export bumps the bundle's own version for new weights
    while its configs stay those of the collection release it needs.
    """
    try:
        installed = importlib.metadata.version(COLLECTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    if collection_version is None or installed != collection_version:
        return None
    return _installed_bundle_configs(name)


def _allowed_target(target: str, locator: ComponentLocator) -> bool:
    """A dotted name under an allowed package, or a short name that MONAI resolves inside ``monai``
    (any other short name would be found by ``pydoc.locate`` among the builtins, e.g. ``eval``)."""
    if "." in target:
        return target.startswith(ALLOWED_TARGET_PREFIXES)
    module = locator.get_component_module_name(target)
    modules = module if isinstance(module, list) else [module] if module else []
    return bool(modules) and all(str(name).startswith("monai.") for name in modules)


def untrusted_items(bundle_dir: str | os.PathLike, reference: str | os.PathLike | None) -> list[ConfigItem]:
    """The items of :func:`config_items` that need the user's trust.

    Args:
        bundle_dir: the received bundle folder.
        reference: ``configs/`` of the same bundle as we ship it (:func:`reference_configs`); an
            expression, macro or logging entry is trusted when the same file there holds the same text.
            None: every one is listed.
    """
    known: set[tuple[str, str, str]] = set()
    if reference is not None:
        known = {(item.file, item.kind, item.value) for item in config_items(Path(reference).parent)}
    locator = ComponentLocator()
    return [
        item
        for item in config_items(bundle_dir)
        if not (
            _allowed_target(item.value, locator)
            if item.kind == "_target_"
            else (item.file, item.kind, item.value) in known
        )
    ]
