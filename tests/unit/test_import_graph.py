"""The import graph of engine/, intercept/ and metrics/ has no cycle, and its layers hold.

Built from the source's AST: an import at module level, inside a function, an ``if`` or a
``try`` is an edge all the same (a lazy import hides a cycle from the interpreter, not from
the design).  ``from engine import wire`` is an edge to ``engine.codec.wire``; ``from engine import
__version__`` is an edge to the package ``engine`` itself.

Layers: engine/layers.py, top to bottom; a module may import its own layer or one listed
before it, never one after it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping

import pytest

from engine.layers import LAYERS
from tests.unit.layout import layer_of, project_modules

# The programs: what a console script or ``python -m`` runs.  Nothing below imports them.
PROGRAM_LAYERS = ("app", "intercept-app")


def programs() -> frozenset[str]:
    wanted = {i for i, layer in enumerate(LAYERS) if layer.name in PROGRAM_LAYERS}
    return frozenset(name for name in project_modules() if layer_of(name) in wanted)


PROGRAMS = programs()


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(
    source: str, current: str, known: Iterable[str], is_package: bool = False
) -> set[str]:
    """The project modules ``source`` (module ``current``) imports, anywhere in its body."""
    known = set(known)

    def owner(name: str) -> str | None:
        # "engine.core.session.X" -> the longest known module prefix.
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            candidate = ".".join(parts[:n])
            if candidate in known:
                return candidate
        return None

    edges: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = owner(alias.name)
                if target:
                    edges.add(target)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(current, is_package, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in known else owner(base)
                if target:
                    edges.add(target)
    edges.discard(current)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {
        name: imports_of(path.read_text(), name, modules, path.name == "__init__.py")
        for name, path in modules.items()
    }


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each with one
    concrete cycle through it spelled out as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        nonlocal counter
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return [_one_cycle(graph, set(c)) for c in sorted(components)]


def _one_cycle(graph: Mapping[str, Iterable[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child not in component:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    nxt.append(child)
        frontier = nxt
    return sorted(component)  # unreachable for a true component


def test_no_import_cycle() -> None:
    found = cycles(import_graph())
    shown = "\n".join(" -> ".join(c) for c in found)
    assert not found, f"{len(found)} import cycle(s) among engine/, intercept/, metrics/:\n{shown}"


def test_every_module_is_in_a_layer_and_every_member_exists() -> None:
    modules = project_modules()
    for name in modules:
        layer_of(name)
    for layer in LAYERS:
        for member in layer.members:
            assert member in modules, f"engine/layers.py: {layer.name}: {member} does not exist"


def test_pure_layers_import_only_pure_layers() -> None:
    graph = import_graph()
    bad = sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        if LAYERS[layer_of(a)].pure
        for b in targets
        if not LAYERS[layer_of(b)].pure
    )
    assert not bad, "pure modules import I/O, process or CLI modules:\n" + "\n".join(bad)


def test_no_import_goes_down_the_list_of_layers() -> None:
    graph = import_graph()
    bad = sorted(
        f"{a} ({LAYERS[layer_of(a)].name}) -> {b} ({LAYERS[layer_of(b)].name})"
        for a, targets in graph.items()
        for b in targets
        if layer_of(b) > layer_of(a)
    )
    assert not bad, "imports of a layer listed later:\n" + "\n".join(bad)


def test_engine_imports_nothing_from_intercept_but_its_schema() -> None:
    """intercept-mp is built on engine/, never the other way round (design §4); the one edge
    back is the config reference generator reading intercept's schema (a data module)."""
    graph = import_graph()
    allowed = {("engine.app.configdoc", "intercept.config")}
    bad = sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        if a.startswith("engine")
        for b in targets
        if b.startswith("intercept") and (a, b) not in allowed
    )
    assert not bad, "\n".join(bad)


def test_intercept_sources_never_import_the_server() -> None:
    graph = import_graph()
    bad = sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        if a.startswith("intercept.sources")
        for b in targets
        if b == "intercept.server"
    )
    assert not bad, "a packet source pushes into the callback it is given:\n" + "\n".join(bad)


def test_programs_use_no_private_name_of_another_program() -> None:
    """A doctor, a CLI or the reference generator never reaches into another program's
    ``_private`` helpers: what two programs share lives in a module below both."""
    modules = project_modules()
    bad = []
    for name in PROGRAMS:
        tree = ast.parse(modules[name].read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in PROGRAMS and sub != name:
                        continue  # importing the module; its attribute uses are checked below
                    if target in PROGRAMS and target != name and alias.name.startswith("_"):
                        bad.append(f"{name}: from {target} import {alias.name}")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    if f"{node.value.id}" in {p.rsplit(".", 1)[-1] for p in PROGRAMS} and (
                        node.value.id != name.rsplit(".", 1)[-1]
                    ):
                        bad.append(f"{name}: {node.value.id}.{node.attr}")
    assert not bad, "\n".join(sorted(bad))


# The checker itself, on small graphs and sources.


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b", "a"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c", "a"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}, "x": {"y"}, "y": {"x"}}, [["a", "b", "a"], ["x", "y", "x"]]),
    ],
)
def test_cycle_finder(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert cycles(graph) == expected


def test_edges_include_function_level_and_from_package_imports() -> None:
    known = {"engine", "engine.a", "engine.b", "engine.c", "metrics.m"}
    source = (
        "from engine import a\n"
        "def f():\n"
        "    from engine.b import thing\n"
        "    import metrics.m\n"
        "if True:\n"
        "    from engine import __version__\n"
        "from . import c\n"
        "import json\n"
    )
    assert imports_of(source, "engine.x", known) == {
        "engine",
        "engine.a",
        "engine.b",
        "engine.c",
        "metrics.m",
    }


def test_intercept_uses_of_engine_app_are_only_the_option_parser() -> None:
    """What both programs share lives below engine/app; intercept's command line may still
    build its flags with engine/app/options.py (design §4: both CLIs use app)."""
    graph = import_graph()
    bad = sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        if a.startswith("intercept")
        for b in targets
        if b.startswith("engine.app") and b != "engine.app.options"
    )
    assert not bad, "\n".join(bad)
