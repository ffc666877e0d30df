"""The runtime processes import only what they use: no numpy, psutil, multiprocessing,
orjson or OpenSSL (hashlib, hmac) on the path of the default (compiled) engine.

Each of these costs every process of the tree memory (numpy alone about 15 MB of PSS:
its extension modules, OpenBLAS and their buffers), and the supervisor's imports are
inherited by every child it forks.  A fresh interpreter imports the modules the
supervisor, the capture process and a worker run, then exercises the shared blocks and the
compiled gate the way the processes do; what it loaded is read from ``sys.modules``.
tests/netns/test_lean_tree.py checks the same in the maps of a real running tree.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from array import array
from pathlib import Path
from typing import Any, cast

import pytest

from engine import dataplane
from tests.paths import REPO_ROOT

HEAVY = (
    "numpy",
    "psutil",
    "multiprocessing",
    "orjson",
    "hashlib",
    "hmac",
    "_hashlib",
    "ssl",
    "ctypes.util",
    "prometheus_client",
    "engine.core.session",
    "engine.core.table",
)
"""Modules the tree's default path must not load (the Python session engine included:
the compiled engine's worker does not run it)."""

PROBE = """
import builtins, json, os, sys
from array import array

# Who imports what: every import statement calls __import__, loaded module or not.
ROOT = os.getcwd() + os.sep
importers = {}
_import = builtins.__import__
def _recording_import(name, globals=None, *args, **kwargs):
    where = (globals or {}).get("__file__") or ""
    if where.startswith(ROOT) and os.sep + ".venv" + os.sep not in where:
        importers.setdefault(name, set()).add(os.path.relpath(where, ROOT))
    return _import(name, globals, *args, **kwargs)
builtins.__import__ = _recording_import

import engine.app.cli, engine.proc.supervisor, engine.proc.capture, engine.proc.worker
import engine.io.capture, engine.io.channel, engine.io.send, engine.io.engines
from engine import dataplane
from engine.io.control import ControlBlock
from engine.io.tuple_history import TupleHistory
from metrics.counters import CounterBlock

block = CounterBlock.create(2)
block.writer(block.worker_row(0)).flush({"conns": 3})
block.snapshot()
block.retire(block.worker_row(0))
control = ControlBlock(2)
control.beat(1, 1.0)
control.shed = True
history = TupleHistory.create(1 << 10)
history.adopt(1.0, 60.0)
history.record_live((1, 2, 3, 4))
history.adopt(2.0, 60.0)
if dataplane.AVAILABLE:
    import engine.dataplane.engine
    gate = dataplane.capture.Gate(2)
    gate.update([0.95, 0.0], False)
    gate.admit(array("Q", [1 << 16 | 80, 2]), array("B", [2, 2]), array("Q", [0, 1]), 1.0)
    gate.reason
print(json.dumps({"modules": sorted(sys.modules),
                  "importers": {k: sorted(v) for k, v in importers.items()}}))
"""


def ring_imports_numpy() -> bool:
    """engine/io/ring.py still imports numpy at module level (its rewrite drops it)."""
    tree = ast.parse((REPO_ROOT / "engine" / "io" / "ring.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name == "numpy" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "numpy":
            return True
    return False


def probe() -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=Path(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return cast(dict[str, Any], json.loads(out.stdout))


@pytest.mark.skipif(not dataplane.AVAILABLE, reason=dataplane.UNAVAILABLE)
def test_the_runtime_modules_load_nothing_heavy() -> None:
    found = probe()
    loaded = set(found["modules"])
    heavy = sorted(m for m in HEAVY if m in loaded)
    if ring_imports_numpy():
        # engine/io/ring.py's rewrite drops numpy; until then it is the one importer allowed.
        assert found["importers"].get("numpy") == ["engine/io/ring.py"], found["importers"]
        heavy.remove("numpy")
    else:
        assert "numpy" not in found["importers"], found["importers"]["numpy"]
    assert heavy == [], {m: found["importers"].get(m) for m in heavy}


def test_flowgate_takes_the_arrays_dispatch_passes() -> None:
    """CaptureProcess.dispatch hands the gate ``array`` buffers, not numpy arrays: the
    Python FlowGate decides on them as on numpy's (it converts them itself)."""
    import numpy as np

    from engine.core.shed import FlowGate

    keys, flags, workers = [7 << 16 | 1, 8 << 16 | 2, 7 << 16 | 1], [0x02, 0x02, 0x10], [0, 1, 0]
    decisions = []
    for make in (
        lambda: (array("Q", keys), array("B", flags), array("Q", workers)),
        lambda: (
            np.array(keys, np.uint64),
            np.array(flags, np.uint8),
            np.array(workers, np.uint64),
        ),
    ):
        gate = FlowGate(2)
        gate.update([0.95, 0.0])  # worker 0 sheds its new sessions
        mask = gate.admit(*make(), 1.0)
        assert mask is not None
        decisions.append((mask.tolist(), dict(gate.counters)))
    assert decisions[0] == decisions[1]
    assert decisions[0][0] == [False, True, False]
