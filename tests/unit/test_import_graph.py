"""The import graph of engine/, intercept/ and metrics/ has no cycle, and its layers hold.

Built from the source's AST: an import at module level, inside a function, an ``if`` or a
``try`` is an edge all the same (a lazy import hides a cycle from the interpreter, not from
the design).  ``from engine import wire`` is an edge to ``engine.wire``; ``from engine import
__version__`` is an edge to the package ``engine`` itself.

Layers (design §4), bottom to top: the pure core; the I/O pieces and libraries (capture, ring,
send, channel, logs, privileges, metrics, the option parsers); the process roles (worker,
capture process, supervisor, intercept's server and its capture loops); the programs (CLIs,
doctors, the config reference generator).  A module may import its own layer or lower ones,
never a higher one; the pure core imports only the pure core.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "intercept", "metrics")

# The pure core (design §4) and the schema it reads: standard library and each other only.
PURE = frozenset(
    {
        "engine",
        "engine.errors",
        "engine.config",
        "engine.packet",
        "engine.rewrite",
        "engine.session",
        "engine.session_events",
        "engine.session_states",
        "engine.session_parts",
        "engine.tcpseq",
        "engine.shard",
        "engine.wire",
        "engine.pcapfile",
        "engine.bpf",
        "engine.link",
        "intercept",
        "intercept.router",
        "metrics",
    }
)

# The process roles: the loops a process runs (and the services living in them).  Only other
# roles and the programs import them; the I/O pieces and libraries between stay below.
ROLES = frozenset(
    {
        "engine.capture_proc",
        "engine.supervisor",
        "engine.worker",
        "engine.worker_proc",
        "intercept.exporter",
        "intercept.nfqueue",
        "intercept.pcap",
        "intercept.server",
    }
)

# The programs: what a console script or ``python -m`` runs.  Nothing below imports them.
PROGRAMS = frozenset(
    {
        "engine.cli",
        "engine.doctor",
        "engine.configdoc",
        "intercept.cli",
        "intercept.doctor",
    }
)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


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
        # "engine.session.X" -> the longest known module prefix.
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


def test_pure_core_imports_only_the_pure_core() -> None:
    graph = import_graph()
    for name in PURE:
        assert name in graph, f"{name} is listed as pure but does not exist"
    bad = sorted(f"{a} -> {b}" for a in PURE for b in graph[a] if b not in PURE)
    assert not bad, "pure modules import process/CLI modules:\n" + "\n".join(bad)


def test_nothing_below_the_programs_imports_a_program() -> None:
    graph = import_graph()
    for name in PROGRAMS:
        assert name in graph, f"{name} is listed as a program but does not exist"
    bad = sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        if a not in PROGRAMS
        for b in targets
        if b in PROGRAMS
    )
    assert not bad, "a library/role module imports a program:\n" + "\n".join(bad)


def layer(name: str) -> int:
    """0 pure core, 1 I/O pieces and libraries, 2 process roles, 3 programs."""
    if name in PURE:
        return 0
    if name in PROGRAMS:
        return 3
    return 2 if name in ROLES else 1


def test_every_import_goes_to_the_same_layer_or_below() -> None:
    graph = import_graph()
    for name in ROLES:
        assert name in graph, f"{name} is listed as a process role but does not exist"
    bad = sorted(
        f"{a} (layer {layer(a)}) -> {b} (layer {layer(b)})"
        for a, targets in graph.items()
        for b in targets
        if layer(b) > layer(a)
    )
    assert not bad, "imports going up a layer:\n" + "\n".join(bad)


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
