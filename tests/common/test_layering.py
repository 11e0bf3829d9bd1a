"""The layering that common/README.md draws, checked on every module's imports (those inside
functions included): a module imports only from its own layer or the layers below, and only the
engine glue and the handlers import Ignite."""

import ast
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[2] / "common"

# bottom to top; packages on one line share a layer
LAYERS = (
    ("errors", "utils"),
    ("io",),
    ("data",),
    ("transforms", "networks", "losses"),
    ("metrics", "postprocessing"),
    ("engines", "inferers", "writers"),
    ("handlers",),
    ("bundle", "monailabel", "fl"),
)
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}
IGNITE_USERS = {"engines", "handlers"}


def _modules() -> list[Path]:
    return sorted(path for path in COMMON.rglob("*.py") if path.name != "__init__.py" or path.parent != COMMON)


def _package(module_name: str) -> str:
    return module_name.split(".")[1] if module_name.count(".") else module_name


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _own_package(path: Path) -> str:
    parts = path.relative_to(COMMON).with_suffix("").parts
    return parts[0]


def test_every_package_has_a_layer():
    packages = {_own_package(path) for path in _modules()}
    assert packages <= set(RANK), f"packages without a layer in LAYERS and common/README.md: {packages - set(RANK)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda path: str(path.relative_to(COMMON)))
def test_imports_flow_down(path):
    own = _own_package(path)
    upward = [
        name
        for name in _imports(path)
        if name.startswith("common.") and RANK.get(_package(name), -1) > RANK[own]
    ]
    assert not upward, f"{path.relative_to(COMMON)} ({own}) imports from a layer above it: {upward}"
    if own not in IGNITE_USERS:
        ignite = [name for name in _imports(path) if name == "ignite" or name.startswith("ignite.")]
        assert not ignite, f"{path.relative_to(COMMON)} imports Ignite; Ignite glue belongs in engines/ or handlers/"
