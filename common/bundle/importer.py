"""Receive a bundle archive from another site, refusing anything that could run code or escape DEST.

Checks run in the order that keeps each one safe: the listing first (no absolute paths, no ``..``, no
links or device files, one top folder, size limits), before anything is written; then the bundle is
unpacked into a staging folder beside DEST, where every weight file must match the sha256 that both the
metadata ``weights`` and ``large_files.yml`` list, every ``.pt`` file must load with
``weights_only=True``, the configs must hold no ``_target_``, ``$`` expression, ``%`` macro or logging
entry outside :mod:`common.bundle.allowlist` (unless trusted), and only then, since it builds the
network from the configs, the bundle verifier must pass. Only a bundle that passes every check is
renamed into DEST; any refusal raises :class:`BundleRejected` and leaves nothing behind.
``models/model.ts`` is checked by its sha256 only: loading TorchScript runs its compiled code.

``monai.bundle.download(url=...)`` would unpack the same archive without any of these checks; import it
here instead, into ``DIR/<bundle>``, and ``monai.bundle.load("<bundle>", bundle_dir=DIR, model=...)`` then
loads its weights as from any downloaded bundle.

Command line (``python -m common.bundle.import`` runs the same; code imports ``common.bundle.importer``,
since ``import`` is a keyword)::

    python -m common.bundle.import dist/<bundle>_v<version>.zip --dest DIR/<bundle> [--trust] [--overwrite]
        [--max-file-mb 4096] [--max-total-mb 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO

import yaml

from common.bundle.allowlist import COLLECTION, ConfigItem, reference_configs, untrusted_items
from common.bundle.export import EVAL_REPORT_KEY, LARGE_FILES, WEIGHTS_KEY
from common.bundle.verify import verify_bundle
from common.errors import InputDataError
from common.io.atomic import atomic_directory
from common.io.checkpoint import load_checkpoint, sha256sum

__all__ = ["MB", "BundleRejected", "ImportResult", "import_bundle", "main"]

MB = 1 << 20
CHUNK = MB
REMEDY = (
    "ask the sending site for a fresh export (python -m common.bundle.export); do not edit an archive by hand. "
    "Pass --trust only for configs whose listed code you have read and accept"
)


class BundleRejected(InputDataError):
    """A received bundle failed a safety check; the message names the member and what is wrong."""

    def __init__(self, path: str | os.PathLike | None, problem: str) -> None:
        super().__init__(path, problem, REMEDY)

    def __reduce__(self) -> tuple[type[BundleRejected], tuple[str | None, str]]:
        return type(self), (self.path, self.problem)


@dataclass(frozen=True)
class _Member:
    """One file of the received bundle: its path inside the bundle folder and its size."""

    path: PurePosixPath
    size: int


@dataclass(frozen=True)
class ImportResult:
    """What was imported, and the config items the user trusted (empty without ``trust``)."""

    bundle_dir: Path
    version: str
    trusted: tuple[ConfigItem, ...]


def _unsafe_name(name: str) -> str | None:
    """Why an archive member name could write outside DEST, or None."""
    if not PurePosixPath(name).parts:
        return "has an empty name"
    if "\\" in name or PureWindowsPath(name).drive:
        return "has a backslash or a drive letter"
    if name.startswith("/"):
        return "is an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "contains '..'"
    return None


def _zip_members(archive: Path) -> tuple[str, list[tuple[zipfile.ZipInfo, _Member]]]:
    """The bundle name and its files, after checking every member of the listing."""
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except (OSError, zipfile.BadZipFile) as err:
        raise BundleRejected(archive, f"not a readable zip archive ({err})") from err
    problems, members, tops, seen = [], [], set(), set()
    for info in infos:
        why = _unsafe_name(info.filename)
        kind = stat.S_IFMT(info.external_attr >> 16)
        if why is None and kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            why = "is a link" if kind == stat.S_IFLNK else "is not a regular file (device, pipe or socket)"
        if why is None and info.filename in seen:
            why = "appears twice"
        if why:
            problems.append(f"member {info.filename!r} {why}")
            continue
        seen.add(info.filename)
        parts = PurePosixPath(info.filename).parts
        tops.add(parts[0])
        if not info.is_dir() and len(parts) > 1:
            members.append((info, _Member(PurePosixPath(*parts[1:]), info.file_size)))
        elif not info.is_dir():
            problems.append(f"member {info.filename!r} is outside the bundle folder")
    if not problems and len(tops) != 1:
        problems.append(f"expected one top folder (the bundle), found {sorted(tops) or 'none'}")
    if problems:
        raise BundleRejected(archive, "; ".join(problems))
    return tops.pop(), members


def _folder_members(folder: Path) -> list[_Member]:
    """Every file of a bundle folder, refusing links and special files."""
    problems, members = [], []
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = Path(root, name)
            status = path.lstat()  # the entry itself, never what a link points to
            mode = status.st_mode
            relative = PurePosixPath(path.relative_to(folder).as_posix())
            if stat.S_ISLNK(mode):
                problems.append(f"member {relative.as_posix()!r} is a link")
            elif stat.S_ISREG(mode):
                members.append(_Member(relative, status.st_size))
            elif not stat.S_ISDIR(mode):
                problems.append(f"member {relative.as_posix()!r} is not a regular file (device, pipe or socket)")
    if problems:
        raise BundleRejected(folder, "; ".join(problems))
    return members


def _check_sizes(source: Path, members: Sequence[_Member], max_file: int, max_total: int) -> None:
    too_big = [f"member {m.path.as_posix()!r} is {m.size / MB:.1f} MB" for m in members if m.size > max_file]
    if too_big:
        raise BundleRejected(source, f"{'; '.join(too_big)}, over the limit of {max_file / MB:.0f} MB per file")
    total = sum(m.size for m in members)
    if total > max_total:
        raise BundleRejected(source, f"unpacks to {total / MB:.1f} MB, over the limit of {max_total / MB:.0f} MB")


def _copy_limited(src: BinaryIO, target: Path, limit: int, source: Path, member: str) -> None:
    """Copy at most ``limit`` bytes: a zip member may decompress to more than its listing declares."""
    written = 0
    with open(target, "xb") as dst:
        for chunk in iter(lambda: src.read(CHUNK), b""):
            written += len(chunk)
            if written > limit:
                raise BundleRejected(source, f"member {member!r} unpacks to more than its declared {limit} bytes")
            dst.write(chunk)


def _unpack(source: Path, staging: Path, max_file: int, max_total: int) -> str:
    """Check the listing of a zip or folder, then copy its bundle files into ``staging``; returns the
    bundle name (the folder's, or the archive's top folder)."""
    if source.is_dir():
        members = _folder_members(source)
        _check_sizes(source, members, max_file, max_total)
        for member in members:
            target = staging / member.path
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(source / member.path, "rb") as src:
                _copy_limited(src, target, member.size, source, member.path.as_posix())
        return source.name
    name, listed = _zip_members(source)
    _check_sizes(source, [member for _, member in listed], max_file, max_total)
    with zipfile.ZipFile(source) as zf:
        for info, member in listed:
            target = staging / member.path
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src:
                _copy_limited(src, target, member.size, source, info.filename)
    return name


def _read_metadata(bundle: Path) -> dict[str, Any]:
    path = bundle / "configs" / "metadata.json"
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BundleRejected("configs/metadata.json", f"cannot be read ({err})") from err
    if not isinstance(metadata, dict) or not isinstance(metadata.get(WEIGHTS_KEY), dict):
        raise BundleRejected("configs/metadata.json", f"has no '{WEIGHTS_KEY}' table of files and sha256")
    return metadata


def _listed_files(bundle: Path, metadata: dict[str, Any]) -> dict[str, str]:
    """Path -> sha256 of every listed file; the metadata and ``large_files.yml`` must agree and list
    every file under ``models/``, so that no file arrives unchecked."""
    weights = {str(path): str(digest).lower() for path, digest in metadata[WEIGHTS_KEY].items()}
    try:
        large = yaml.safe_load((bundle / LARGE_FILES).read_text(encoding="utf-8"))["large_files"]
        large_files = {str(item["path"]): str(item["hash_val"]).lower() for item in large}
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise BundleRejected(LARGE_FILES, f"cannot be read as a list of files with sha256 ({err})") from err
    if large_files != weights:
        raise BundleRejected(LARGE_FILES, f"disagrees with configs/metadata.json '{WEIGHTS_KEY}'")
    present = {path.relative_to(bundle).as_posix() for path in (bundle / "models").rglob("*") if path.is_file()}
    unlisted = sorted(present - set(weights))
    if unlisted:
        raise BundleRejected(unlisted[0], f"is not listed with a sha256 in configs/metadata.json '{WEIGHTS_KEY}'")
    report = metadata.get(EVAL_REPORT_KEY)
    if isinstance(report, dict) and "file" in report and "sha256" in report:
        weights[str(report["file"])] = str(report["sha256"]).lower()
    return weights


def _check_files(bundle: Path, metadata: dict[str, Any]) -> None:
    """Every listed file exists inside the bundle with its sha256; every ``.pt`` loads without code."""
    for name, digest in _listed_files(bundle, metadata).items():
        why = _unsafe_name(name)
        path = bundle / name
        if why is None and not path.is_file():
            why = "is listed but missing"
        if why is None and sha256sum(path) != digest:
            why = f"sha256 differs from the listed {digest}: the file was altered or corrupted"
        if why:
            raise BundleRejected(name, why)
        if path.suffix == ".pt":
            try:
                load_checkpoint(path)  # weights_only=True: refuses pickled objects instead of running them
            except InputDataError as err:
                raise BundleRejected(name, err.problem) from err


def _check_configs(bundle: Path, metadata: dict[str, Any], name: str, trust: bool) -> tuple[ConfigItem, ...]:
    """Config items outside the allow-list; refused unless trusted. Returns the trusted ones."""
    required = metadata.get("required_packages_version") or {}
    reference = reference_configs(name, required.get(COLLECTION))
    items = tuple(untrusted_items(bundle, reference))
    if items and not trust:
        against = (
            f"the configs of {COLLECTION} {required.get(COLLECTION)} installed here"
            if reference is not None
            else f"no reference: {COLLECTION} {required.get(COLLECTION)!s} is not installed here, so every one is listed"
        )
        listing = "\n".join(f"  {item.describe()}" for item in items)
        raise BundleRejected(
            None,
            f"the configs of {name} would run code that is not ours ({against}); refused unless --trust:\n{listing}",
        )
    return items


def import_bundle(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    trust: bool = False,
    overwrite: bool = False,
    max_file_bytes: int = 4096 * MB,
    max_total_bytes: int = 16384 * MB,
) -> ImportResult:
    """Check a received bundle and, when every check passes, place it at ``dest``.

    Args:
        source: a ``<bundle>_v<version>.zip`` written by :func:`common.bundle.export.export_bundle`, or its
            unpacked folder.
        dest: the bundle folder to create, e.g. ``models/<bundle>``; MONAI's ``monai.bundle.load(<bundle>,
            bundle_dir=<parent of dest>)`` then finds it when ``dest`` is named after the bundle.
        trust: accept config items outside the allow-list (they are returned, for the report).
        overwrite: replace an existing ``dest``.
        max_file_bytes, max_total_bytes: limits on one file and on the whole bundle.

    Raises:
        BundleRejected: any check failed; ``dest`` is as it was and no staging folder is left.
    """
    source_path, target = Path(source), Path(dest)
    if not source_path.exists():
        raise InputDataError(source_path, "not found", "name the .zip written by common.bundle.export, or its folder")
    if target.exists() and not overwrite:
        raise InputDataError(target, "already exists", "choose another --dest or pass --overwrite")
    with atomic_directory(target) as staging:
        name = _unpack(source_path, staging, max_file_bytes, max_total_bytes)
        metadata = _read_metadata(staging)
        _check_files(staging, metadata)
        trusted = _check_configs(staging, metadata, name, trust)
        report = verify_bundle(staging, export=False)
        if not report.ok:
            raise BundleRejected(None, f"the bundle verifier failed:\n{report.format()}")
    return ImportResult(target, str(metadata.get("version")), trusted)


def _iter_report(result: ImportResult) -> Iterator[str]:
    yield f"imported {result.bundle_dir} (version {result.version})"
    if result.trusted:
        yield "trusted by --trust:"
        yield from (f"  {item.describe()}" for item in result.trusted)


def main(argv: Sequence[str] | None = None) -> int:
    """Import one bundle; returns 1, with one message naming the member at fault, when it is refused."""
    parser = argparse.ArgumentParser(prog="python -m common.bundle.importer", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="<bundle>_v<version>.zip or an unpacked bundle folder")
    parser.add_argument("--dest", type=Path, required=True, help="bundle folder to create")
    parser.add_argument("--trust", action="store_true", help="accept config code outside the allow-list")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dest")
    parser.add_argument("--max-file-mb", type=float, default=4096, help="default: %(default)s")
    parser.add_argument("--max-total-mb", type=float, default=16384, help="default: %(default)s")
    args = parser.parse_args(argv)
    try:
        result = import_bundle(
            args.source,
            args.dest,
            trust=args.trust,
            overwrite=args.overwrite,
            max_file_bytes=int(args.max_file_mb * MB),
            max_total_bytes=int(args.max_total_mb * MB),
        )
    except InputDataError as err:
        print(f"import refused: {err}\nHow to fix: {err.remedy}", file=sys.stderr)
        return 1
    print("\n".join(_iter_report(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
