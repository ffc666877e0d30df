"""A running tree maps only what it uses: after it replicated traffic (every process has run
its packet path), no process of tcpcopy-mp maps numpy's libraries, psutil's extension, or
OpenSSL's libcrypto (no channel secret here, so no process needs HMAC).

tests/unit/test_lean_imports.py checks the modules; this reads /proc/PID/maps of the real
supervisor, capture process and workers.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from testbed import netns as tbm
from tests.netns.conftest import SKIP_NO_NETNS
from tests.unit.test_lean_imports import ring_imports_numpy

pytestmark = [
    pytest.mark.netns,
    SKIP_NO_NETNS,
    pytest.mark.usefixtures("programs"),
]

NUMPY_LIBRARIES = ("_multiarray_umath", "openblas", "libgfortran")
OTHER_LIBRARIES = ("_psutil_linux", "libcrypto", "orjson")


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (/proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for tid in os.listdir(f"/proc/{p}/task"):
            with open(f"/proc/{p}/task/{tid}/children") as f:
                todo.extend(int(k) for k in f.read().split())
    return out


def mapped(pid: int, names: tuple[str, ...]) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        files = {line.split()[-1] for line in f if "/" in line}
    return {n for n in names if any(n in path for path in files)}


@pytest.mark.timeout(120)
def test_the_python_engine_tree_replicates_with_numpy_where_it_runs(
    testbed: tbm.Testbed, tmp_path: Path
) -> None:
    """--engine python: the Python block walk and FlowGate import numpy when they run (the
    lazy imports work in the forked children); psutil and libcrypto stay out."""
    tb = testbed
    tb.set_mode(tbm.TRADITIONAL)
    intercept = tb.start_intercept()
    tcpcopy = tb.start_tcpcopy(
        ["-x", tbm.TRANSFER_HTTP, "-c", "198.19.1.x", "--workers", "2", "--engine", "python"]
    )
    tb.wait_replicating(tcpcopy)
    pids = tree(tcpcopy.pid)
    found = {pid: mapped(pid, NUMPY_LIBRARIES + OTHER_LIBRARIES) for pid in pids}
    assert tcpcopy.stop(signal.SIGTERM, timeout=20) == 0, tcpcopy.tail()
    assert intercept.stop(signal.SIGTERM, timeout=20) == 0, intercept.tail()
    assert len(pids) == 4, pids
    assert all(not names & set(OTHER_LIBRARIES) for names in found.values()), found
    children = pids[1:]  # the Python walk and FlowGate run in the capture process
    assert any("_multiarray_umath" in found[pid] for pid in children), found


@pytest.mark.timeout(120)
def test_the_running_tree_maps_no_numpy_psutil_or_libcrypto(
    testbed: tbm.Testbed, tmp_path: Path
) -> None:
    tb = testbed
    tb.set_mode(tbm.TRADITIONAL)
    intercept = tb.start_intercept()
    tcpcopy = tb.start_tcpcopy(["-x", tbm.TRANSFER_HTTP, "-c", "198.19.1.x", "--workers", "2"])
    tb.wait_replicating(tcpcopy)
    pids = tree(tcpcopy.pid)
    assert len(pids) == 4, pids  # supervisor, capture, two workers
    found = {pid: mapped(pid, NUMPY_LIBRARIES + OTHER_LIBRARIES) for pid in pids}
    assert tcpcopy.stop(signal.SIGTERM, timeout=20) == 0, tcpcopy.tail()
    assert intercept.stop(signal.SIGTERM, timeout=20) == 0, intercept.tail()
    if ring_imports_numpy():
        # engine/io/ring.py's rewrite drops numpy; until then its libraries are expected.
        found = {pid: names - set(NUMPY_LIBRARIES) for pid, names in found.items()}
    assert all(not names for names in found.values()), found
