"""The library's subpackages form layers: a module may import only from its own subpackage or from layers
below it (module-level and lazy imports alike), so there are no import cycles and the order stays readable.
Nothing in ``unigendet`` imports the repository's ``train``/``eval``/``launch``/``benchmarks`` folders."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "unigendet"

# Lowest first. Entries in one tuple are peers: they must not import each other.
LAYERS = [
    ("config", "labels", "utils"),
    ("ops", "losses", "recipes"),
    ("data",),
    ("models", "detectors"),
    ("profiling", "objectives", "distributed"),
    ("checkpoint",),
    ("training", "inference", "metrics"),
    ("cascade",),
    ("evaluation",),
    ("coevolution", "serving"),
    ("demo",),
    ("cli",),
]
RANK = {name: level for level, names in enumerate(LAYERS) for name in names}
REPO_FOLDERS = {"train", "eval", "launch", "benchmarks", "tests"}


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def _top_level(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _edges() -> list[tuple[str, str, str]]:
    """(importer subpackage, imported subpackage, where) for every cross-subpackage import."""
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _top_level(path)
        for line, module in _imports(path):
            parts = module.split(".")
            if parts[0] == "unigendet" and len(parts) > 1 and parts[1] != source:
                edges.append((source, parts[1], f"{path.relative_to(PACKAGE.parent)}:{line}"))
    return edges


def test_every_subpackage_has_a_layer():
    names = {_top_level(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert names - set(RANK) == set(), "add new subpackages to LAYERS"


def test_imports_only_go_down():
    upward = [f"{where}: {source} imports {target}" for source, target, where in _edges()
              if target in RANK and RANK[target] >= RANK[source]]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


@pytest.mark.parametrize("folder", sorted(REPO_FOLDERS))
def test_library_does_not_import_repository_folders(folder):
    offenders = [f"{p.relative_to(PACKAGE.parent)}:{line}" for p in PACKAGE.rglob("*.py")
                 for line, module in _imports(p) if module.split(".")[0] == folder]
    assert not offenders, offenders
