"""pyproject.toml follows engine/layers.py: mypy checks exactly the pure layers, setuptools
ships every package (mypy and setuptools cannot import Python, so they keep copies)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from tests.unit.layout import PACKAGES, ROOT, layer_of, project_modules, pure_modules

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _expand(entries: list[str]) -> set[str]:
    """mypy's ``files``: a directory stands for every .py file below it."""
    out: set[str] = set()
    for entry in entries:
        path = ROOT / entry
        assert path.exists(), f"pyproject.toml [tool.mypy] files: {entry} does not exist"
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        out |= {str(p.relative_to(ROOT)) for p in found}
    return out


def test_mypy_checks_exactly_the_pure_layers() -> None:
    checked = _expand(PYPROJECT["tool"]["mypy"]["files"])
    pure = {str(path.relative_to(ROOT)) for path in pure_modules().values()}
    assert checked - pure == set(), "mypy files not in a pure layer (engine/layers.py)"
    assert pure - checked == set(), "pure modules mypy does not check (pyproject.toml)"


def test_setuptools_ships_every_package() -> None:
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in PACKAGES
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert packages == on_disk


def test_the_layers_are_ordered_as_the_design_says() -> None:
    order = [
        "engine.errors",
        "engine.codec.packet",
        "engine.core.session",
        "engine.io.ring",
        "engine.proc.worker",
        "engine.app.cli",
    ]
    assert [layer_of(m) for m in order] == sorted(layer_of(m) for m in order)
    assert len({layer_of(m) for m in order}) == len(order)
    assert all(name in project_modules() for name in order)


def _imported_top_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_bench_and_the_testbed_never_import_the_tests() -> None:
    """bench/ imports the fixtures (testbed/), which import no test module either."""
    files = sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "testbed").glob("*.py"))
    assert files
    bad = [str(p.relative_to(ROOT)) for p in files if "tests" in _imported_top_names(p)]
    assert not bad, f"these import tests/: {bad}"
    assert "testbed" in _imported_top_names(ROOT / "bench" / "bench_live.py")
