"""Imports point one way: a module may import only from its own layer or the layers below it.

Layers, bottom to top: errors, atomic <- data, isa <- models <- pipelines <- training, eval <- demo,
serve, cli. Every import in src/liveditor is checked, function-level ones included, by reading the
source (nothing is imported).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "liveditor"

# Rank of each top-level module or subpackage of liveditor; a module may import equal or lower ranks.
LAYERS = [
    {"__init__", "errors", "atomic"},  # __init__: the root package (its version string)
    {"data", "isa"},
    {"models"},
    {"pipelines"},
    {"training", "eval"},
    {"demo", "serve", "explain", "cli", "__main__"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _unit(module_path: Path) -> str:
    """The top-level unit of a file: 'isa' for isa/ops.py, 'cli' for cli.py, '__init__' for the root."""
    rel = module_path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imported_units(path: Path) -> list[tuple[int, str]]:
    """(line, unit) of every liveditor unit the file imports, relative or absolute."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package_parts = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]  # ('liveditor', 'isa')
    if path.name == "__init__.py":
        package_parts = path.relative_to(PACKAGE.parent).parts[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package_parts[: len(package_parts) - node.level + 1])
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "liveditor" and len(parts) > 1:
                unit = parts[1]
                if not (PACKAGE / unit).is_dir() and not (PACKAGE / f"{unit}.py").is_file():
                    unit = "__init__"  # a name defined in the root package, e.g. __version__
                found.append((node.lineno, unit))
    return found


def _source_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts)


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in _source_files()}
    assert units <= set(RANK), f"units without a layer: {sorted(units - set(RANK))}"


def test_imports_point_down_the_layers():
    violations = []
    for path in _source_files():
        unit = _unit(path)
        for line, target in _imported_units(path):
            if target not in RANK:
                violations.append(f"{path.relative_to(PACKAGE)}:{line} imports unknown unit liveditor.{target}")
            elif RANK[target] > RANK[unit]:
                violations.append(f"{path.relative_to(PACKAGE)}:{line} ({unit}) imports liveditor.{target} (higher layer)")
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from ..pipelines import load_pipeline", ["pipelines"]),
        ("def f():\n    from liveditor.pipelines.loading import load_pipeline\n", ["pipelines"]),
        ("import liveditor.training.loop", ["training"]),
        ("from . import ops", ["isa"]),
        ("from .. import atomic", ["atomic"]),
        ("from .. import __version__", ["__init__"]),
    ],
)
def test_the_scan_sees_relative_absolute_and_function_level_imports(tmp_path, monkeypatch, source, expected):
    root = tmp_path / "liveditor"
    for unit in ("isa", "pipelines", "training"):
        (root / unit).mkdir(parents=True)
    (root / "atomic.py").write_text("")
    module = root / "isa" / "mod.py"
    module.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "liveditor")
    assert [unit for _, unit in _imported_units(module)] == expected
