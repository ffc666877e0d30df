"""Both session engines for parametrized tests: the pure-Python one (the specification) and
the compiled one (engine/dataplane/engine.pyx), skipped with the reason where it is not built."""

from __future__ import annotations

from types import ModuleType

import pytest

from engine.core import rewrite

try:
    from engine.dataplane import engine as compiled
except ImportError as exc:  # not built here
    compiled = None
    WHY = f"engine.dataplane.engine is not compiled ({exc})"
else:
    WHY = ""

ENGINES = [
    pytest.param("python", id="python"),
    pytest.param("compiled", id="compiled", marks=pytest.mark.skipif(compiled is None, reason=WHY)),
]
"""``@pytest.mark.parametrize("engine", ENGINES)`` or ``pytest.fixture(params=ENGINES)``."""


def rewrite_module(engine: str) -> ModuleType:
    """The module with choose_client_ip, sample_keep, shift_port, replica_port, gap,
    match_transfer and TupleAllocator of that engine."""
    if engine == "python":
        return rewrite
    assert compiled is not None
    return compiled


def table_class(engine: str) -> type:
    """SessionTable (python) or the compiled Table: the same constructor and API."""
    if engine == "python":
        from engine.core.table import SessionTable

        return SessionTable
    assert compiled is not None
    return compiled.Table


def heap_size(table: object) -> int:
    """Items in a table's timer heap, live and stale (a private figure of either engine)."""
    if compiled is not None and isinstance(table, compiled.Table):
        return int(table.heap_size)
    return len(table._heap)  # type: ignore[attr-defined]
