"""The project's modules on disk, each with its layer (engine/layers.py): what the purity,
import-graph and layer tests walk."""

from __future__ import annotations

from pathlib import Path

from engine.layers import LAYERS, layer_index

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "intercept", "metrics")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every Python module of the three packages, by dotted name."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def layer_of(module: str) -> int:
    index = layer_index(module)
    assert index is not None, f"{module} is in no layer of engine/layers.py"
    return index


def pure_modules() -> dict[str, Path]:
    """The modules of the pure layers."""
    return {name: path for name, path in project_modules().items() if LAYERS[layer_of(name)].pure}
