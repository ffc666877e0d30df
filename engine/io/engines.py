"""Which session engine a worker runs (--engine), and the one factory of its table.

Two engines do the same thing (design §4-§5): the compiled one,
``engine.dataplane.engine.Table`` (a Cython extension built by the normal install when a C
compiler is there), and the Python one, ``engine.core.table.SessionTable``, which is the
specification and the fallback.  ``--engine``:

* ``auto`` (default): the compiled engine when the extension is built, else the Python one,
  with a logged notice naming why (the import error);
* ``compiled``: the compiled engine; when it is not built the configuration is refused (one
  line naming --engine, non-zero exit) rather than silently running the slow path;
* ``python``: the Python engine.

The extension is imported lazily, here only: every other module runs without it.
``build_table`` hands the worker a table with the batch calls (engine/io/batch.py): the
compiled table has them, the Python one is wrapped in the adapter.
"""

from __future__ import annotations

import importlib
from typing import Any

from engine.errors import ConfigError
from engine.io.batch import as_batch

__all__ = ["ENGINE_CHOICES", "build_table", "compiled_table_class", "resolve_engine"]

ENGINE_CHOICES = ("auto", "compiled", "python")
COMPILED_MODULE = "engine.dataplane.engine"


def compiled_table_class() -> tuple[Any | None, str]:
    """(the compiled Table class, "") or (None, why it is not available)."""
    try:
        module = importlib.import_module(COMPILED_MODULE)
    except ImportError as exc:
        return None, f"{COMPILED_MODULE} is not built ({exc})"
    table = getattr(module, "Table", None)
    if table is None:
        return None, f"{COMPILED_MODULE} has no Table"
    return table, ""


def resolve_engine(choice: str, where: str = "--engine") -> tuple[str, str]:
    """The engine ``choice`` runs: ("compiled" | "python", why "auto" fell back or "").
    ConfigError (naming ``where``) for "compiled" when it is not built."""
    if choice == "python":
        return "python", ""
    if choice not in ENGINE_CHOICES:
        raise ConfigError(where, f"unknown engine {choice!r} (auto, compiled, python)")
    cls, why = compiled_table_class()
    if cls is not None:
        return "compiled", ""
    if choice == "compiled":
        raise ConfigError(where, f"the compiled engine is not available: {why}")
    return "python", why


def build_table(engine: str, session: Any, tuple_history: Any = None) -> Any:
    """The worker's session table for ``engine`` ("compiled" | "python"), batch calls on."""
    if engine == "compiled":
        cls, why = compiled_table_class()
        if cls is None:
            raise ConfigError("--engine", f"the compiled engine is not available: {why}")
        return as_batch(cls(session, tuple_history=tuple_history))
    from engine.core.table import SessionTable

    return as_batch(SessionTable(session, tuple_history=tuple_history))
