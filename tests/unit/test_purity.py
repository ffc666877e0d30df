"""The pure modules (design §4) import no I/O, clock, process or metrics module.

Checked on the source's AST, so an import inside a function or an ``if`` counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PURE_MODULES = (
    "engine/packet.py",
    "engine/rewrite.py",
    "engine/session.py",
    "engine/session_events.py",
    "engine/session_states.py",
    "engine/session_parts.py",
    "engine/tcpseq.py",
    "engine/shard.py",
    "engine/wire.py",
    "engine/pcapfile.py",
    "engine/bpf.py",
    "engine/link.py",
    "engine/shed.py",
    "intercept/router.py",
)

FORBIDDEN = frozenset(
    {"socket", "time", "os", "select", "multiprocessing", "mmap", "prometheus_client"}
)


def forbidden_imports(source: str, filename: str = "<src>") -> list[str]:
    """'line N: name' for every forbidden import in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:  # relative imports stay inside the project
                names = [node.module]
        elif isinstance(node, ast.Call):
            # __import__("os") / importlib.import_module("os") with a literal name.
            func = node.func
            fname = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if fname in ("__import__", "import_module") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    names = [arg.value]
        line = getattr(node, "lineno", 0)
        found += [f"line {line}: {name}" for name in names if name.split(".")[0] in FORBIDDEN]
    return found


@pytest.mark.parametrize("relpath", PURE_MODULES)
def test_pure_module_imports_nothing_impure(relpath: str) -> None:
    path = ROOT / relpath
    assert path.is_file(), f"{relpath} is missing"
    bad = forbidden_imports(path.read_text(), str(path))
    assert not bad, f"{relpath} imports impure modules: {bad}"


@pytest.mark.parametrize(
    "source",
    [
        "import os",
        "import os.path",
        "import json, socket",
        "from time import monotonic",
        "from multiprocessing.shared_memory import SharedMemory",
        "import prometheus_client as prom",
        "def f():\n    import select\n",
        "try:\n    import mmap\nexcept ImportError:\n    pass\n",
        "x = __import__('os')",
        "import importlib\nm = importlib.import_module('socket')",
    ],
)
def test_checker_catches_each_import_form(source: str) -> None:
    assert forbidden_imports(source)


@pytest.mark.parametrize(
    "source",
    [
        "import struct",
        "from dataclasses import dataclass",
        "from engine.errors import DecodeError",
        "from . import os",  # a project-relative module that happens to share a name
        "import timeit, ossaudiodev, socketserver_like",  # prefixes are not matches
        "import engine.time",
    ],
)
def test_checker_allows_pure_imports(source: str) -> None:
    assert forbidden_imports(source) == []
