"""The layers of the code (design §4): the one list the tests and mypy's file list follow.

Each layer names the packages and modules it holds; a name covers itself and every module
below it, and a module belongs to the layer of the longest name that covers it (so
``engine`` alone is the package's ``__init__`` and the modules beside it, ``engine.errors``
and this one).  A module imports only from its own layer and the layers listed before it.

Read by tests/unit/test_purity.py (a ``pure`` layer imports no I/O, clock, process or metrics
module), tests/unit/test_import_graph.py (no import goes down this list) and
tests/unit/test_layers.py, which checks that pyproject.toml's mypy ``files`` are exactly the
pure layers (mypy cannot read Python, so it keeps its own copy and the test keeps them equal).

Why the exception root (``engine.errors``) is in the first layer: every layer raises or
catches ``ConfigError``/``DecodeError`` (the codecs raise DecodeError, the schema raises
ConfigError, both programs' command lines turn them into one line), so it must sit above
all of them and import nothing of the project.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Layer:
    name: str
    members: tuple[str, ...]
    """Dotted package or module names: each covers itself and the modules below it."""
    pure: bool
    """Imports no socket, time, os, select, multiprocessing, mmap or prometheus_client."""


LAYERS: tuple[Layer, ...] = (
    Layer("base", ("engine", "engine.errors", "engine.layers", "intercept", "metrics"), True),
    Layer("codec", ("engine.codec",), True),
    Layer("core", ("engine.core", "intercept.router"), True),
    Layer("dataplane", ("engine.dataplane",), False),
    Layer("metrics", ("metrics.counters", "metrics.exporter"), False),
    Layer("io", ("engine.io", "intercept.config"), False),
    Layer(
        "proc",
        (
            "engine.proc",
            "intercept.sources",
            "intercept.server",
            "intercept.exporter",
            "intercept.fastroute",
        ),
        False,
    ),
    Layer("app", ("engine.app",), False),
    Layer("intercept-app", ("intercept.cli", "intercept.doctor"), False),
)
"""Top to bottom: a layer may import the layers above it, never one below."""


def layer_index(module: str) -> int | None:
    """The position in LAYERS of the layer holding ``module`` (None: not in any layer)."""
    best: tuple[int, int] | None = None  # (length of the covering name, layer index)
    for index, layer in enumerate(LAYERS):
        for member in layer.members:
            if (module == member or module.startswith(member + ".")) and (
                best is None or len(member) > best[0]
            ):
                best = (len(member), index)
    return None if best is None else best[1]
