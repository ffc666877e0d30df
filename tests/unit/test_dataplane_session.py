"""The compiled session (engine/dataplane/session.pxi): C only on the per-packet path, the
memory of an idle session, and no leaked block.  Its behaviour is the Python engine's: the
session tests run against both engines and test_dataplane_session_diff.py compares them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core.config import SessionConfig
from tests.unit.conftest import compiled_session_class
from tests.unit.link import FAKE_CLIENT, ONLINE, TARGET, Client, Link, Target

ROOT = Path(__file__).resolve().parents[2]
IDLE_SESSION_MAX_BYTES = 1024
"""Issue 19 item 3: an idle established session costs at most 1 KiB, struct and blocks."""
IDLE_SESSIONS = 100_000
HOT_FUNCTIONS = (
    "sess_receive_client",
    "sess_receive_response",
    "sess_handle_timer",
    "sess_packets_to_send",
    "sess_get_timer",
)


@pytest.fixture(scope="module")
def engine_mod():
    compiled_session_class()  # skips with the reason when the module is not built
    from engine.dataplane import engine

    return engine


def test_session_functions_make_no_python_calls(tmp_path: Path) -> None:
    """``cython -a``: every line of every ``noexcept nogil`` function of session.pxi (the
    whole state machine, and so every per-packet entry point) has score 0."""
    cython = shutil.which("cython", path=str(Path(sys.executable).parent))
    assert cython, "cython is not installed in this environment"
    out_c = tmp_path / "engine.c"
    cmd = [cython, "-a", "-3", "-I", str(ROOT), "engine/dataplane/engine.pyx", "-o", str(out_c)]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=300)
    html = (tmp_path / "session.html").read_text()
    score = {
        int(m[2]): int(m[1])
        for m in re.finditer(
            r'class="cython line score-(\d+)"[^>]*>.{0,12}?<span class="">(\d+)</span>', html
        )
    }
    lines = (ROOT / "engine" / "dataplane" / "session.pxi").read_text().splitlines()
    hot: list[int] = []
    names: set[str] = set()
    inside = False
    for no, line in enumerate(lines, 1):
        if line and not line[0].isspace():
            inside = False
        m = re.match(r"cdef (?:inline )?[\w* ]+?\b(\w+)\(", line)
        if m and "noexcept nogil" in " ".join(lines[no - 1 : no + 2]):
            inside = True
            names.add(m[1])
            continue
        if inside and line.strip() and not line.strip().startswith("#"):
            hot.append(no)
    assert set(HOT_FUNCTIONS) <= names
    yellow = [f"session.pxi:{n}: {lines[n - 1].strip()}" for n in hot if score.get(n, 0)]
    assert not yellow, "Python calls in the session's C functions:\n" + "\n".join(yellow)
    assert len(hot) > 1500


def test_an_idle_established_session_costs_at_most_1_kib(engine_mod) -> None:
    """100 k sessions built in C (faked handshake, one request sent and acknowledged, its
    answer acked, nothing pending): the live bytes they hold, struct included."""
    blocks_before, bytes_before = engine_mod.live_allocations()
    held, states = engine_mod.idle_sessions_bytes(SessionConfig(), IDLE_SESSIONS)
    assert states == [2, 2, 2, 2]  # State.ESTABLISHED
    per_session = held / IDLE_SESSIONS
    assert engine_mod.session_struct_bytes() <= per_session <= IDLE_SESSION_MAX_BYTES
    assert engine_mod.live_allocations() == (blocks_before, bytes_before)


def test_every_block_is_freed(engine_mod) -> None:
    """A session that held segments, control packets and events frees them all: the live
    block count goes back to where it was (tracemalloc cannot see C allocations)."""
    session = compiled_session_class()
    before = engine_mod.live_allocations()
    cfg = SessionConfig()
    s = session(cfg, client=FAKE_CLIENT, target=TARGET, online=ONLINE, now=0.0)
    link = Link(s, Target(), mtu=cfg.mtu)
    c = Client(ts=100)
    link.client(c.syn(), c.ack())
    link.now = 0.002
    link.respond(link.target.synack())
    link.client(c.data(b"a" * 3000))  # split to the MTU, sent, not acknowledged
    link.client(c.data(b"b" * 100, read=500))  # a new request: held by the gate
    link.client(c.data(b"c" * 100, read=900), c.fin(read=900))  # behind a hole, and the FIN
    s.handle_route_down(False, link.now)  # a retransmission owed
    assert s.held_bytes == 100 + 100  # "b" and "c" wait unsent; the sent "a" is not held
    assert engine_mod.live_allocations()[0] >= before[0] + 5
    del link, s  # the events, the queued packets and the segments go with it
    assert engine_mod.live_allocations() == before
