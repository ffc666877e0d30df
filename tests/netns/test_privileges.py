"""Least privilege in the testbed: both programs started as root end up unprivileged.

tcpcopy-mp (multi-process, --workers 2) and intercept-mp (traditional, --install-rule) are
started as root without --user, so they switch to the default user (tcpcopy, else nobody)
keeping only CAP_NET_RAW and CAP_NET_ADMIN.  The test replicates requests, reads
/proc/PID/status of every process of both trees, kills a worker (its replacement must be
unprivileged too and replication must go on), and stops intercept-mp, whose iptables rule
must be gone although it is no longer root.

The checkout (and its .venv) may live where the new user cannot read it (a 0700 mktemp -d or
home directory), and so may the interpreter (a pyenv under a 0700 /root); the programs then
refuse to drop (engine/io/privileges.py: they stay root, with a warning), which is not what this
test is about.  So both programs run from tests/readable_install.py's copy of the project in a
world-readable venv under /tmp, with an interpreter the user can run (a system Python of the
same version, or the base one seen through a private mount namespace that makes it
readable): what a normal installation looks like to the unprivileged user, wherever the
checkout lives.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.io.privileges import CAP_NET_ADMIN, CAP_NET_RAW, read_status, resolve_target
from testbed import netns as tbm
from tests.netns.conftest import SKIP_NO_NETNS
from tests.readable_install import ReadableInstall

pytestmark = [pytest.mark.netns, SKIP_NO_NETNS, pytest.mark.usefixtures("programs")]

KEPT_MASK = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)
REQUESTS = 5
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def readable() -> Iterator[ReadableInstall]:
    target = resolve_target(None, None)
    if target is None:
        pytest.skip("no unprivileged user to switch to")
    install = ReadableInstall.create(target)
    try:
        yield install
    finally:
        install.close()


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _assert_unprivileged(pid: int, what: str) -> None:
    state = read_status(pid)
    assert 0 not in state.uids, f"{what} (pid {pid}) still has uid 0: {state.uids}"
    assert 0 not in state.gids, f"{what} (pid {pid}) still has gid 0: {state.gids}"
    assert state.effective == KEPT_MASK, f"{what}: CapEff {state.effective:#x}"
    assert state.permitted == KEPT_MASK, f"{what}: CapPrm {state.permitted:#x}"
    assert state.bounding & ~KEPT_MASK == 0, f"{what}: CapBnd {state.bounding:#x}"
    assert state.no_new_privs in (True, None), f"{what}: no_new_privs not set"


def _send_requests(tb: tbm.Testbed, prefix: str) -> None:
    for i in range(REQUESTS):
        status, _ = tbm.http_get(
            tb.ns("client"), tbm.ONLINE_CLIENT_SIDE_IP, tbm.ONLINE_HTTP_PORT, f"{prefix}{i}"
        )
        assert status == 200


def _workers(supervisor: int) -> dict[str, int]:
    return {_comm(p): p for p in _tree(supervisor) if _comm(p).startswith("tcmp-worker")}


def test_both_programs_drop_root_keep_two_caps(
    testbed: tbm.Testbed, tmp_path: Path, readable: ReadableInstall
) -> None:
    tb = testbed
    tb.set_mode(tbm.TRADITIONAL)
    intercept_argv = [str(readable.bin("intercept-mp")), "--queue-num", "0", "--install-rule",
                      str(tbm.TARGET_HTTP_PORT), "-p", str(tbm.INTERCEPT_PORT),
                      "--summary-json", str(tmp_path / "intercept-summary.json")]  # fmt: skip
    intercept = tb.spawn(
        "target", "intercept-mp", readable.wrap(intercept_argv, tmp_path / "m-intercept")
    )

    def listening() -> bool:
        if not intercept.alive():
            raise tbm.TestbedError(f"intercept-mp exited:\n{intercept.tail()}")
        return tb._listening("target", tbm.INTERCEPT_PORT)

    tbm.wait_until(listening, tbm.READY_TIMEOUT_S, what="intercept-mp listening")
    rules = lambda: tb.run("target", "iptables-save", "-t", "filter").stdout  # noqa: E731
    tbm.wait_until(lambda: "intercept-mp" in rules(), tbm.READY_TIMEOUT_S, what="NFQUEUE rule")

    summary = tmp_path / "tcpcopy-summary.json"
    tcpcopy_argv = [str(readable.bin("tcpcopy-mp")), "-x", tbm.TRANSFER_HTTP, "-c", "198.19.1.x",
                    "-s", tbm.TARGET_IP,
                    "--workers", "2", "--summary-json", str(summary)]  # fmt: skip
    tcpcopy = tb.spawn("online", "tcpcopy-mp", readable.wrap(tcpcopy_argv, tmp_path / "m-tcpcopy"))
    tb.wait_replicating(tcpcopy, timeout=DEADLINE_S)
    _send_requests(tb, "/priv/a")
    n = tb.wait_target_count("/priv/a", REQUESTS, timeout=DEADLINE_S)
    assert n == REQUESTS, f"{n} of {REQUESTS} replicated\n{tcpcopy.tail()}"

    # Every process of both trees: supervisor, capture, each worker, intercept-mp (and any
    # helper they started, such as multiprocessing's resource tracker).
    assert "dropped root" in tcpcopy.output(), tcpcopy.tail()
    assert "dropped root" in intercept.output(), intercept.tail()
    names = {_comm(p) for p in _tree(tcpcopy.pid)}
    assert {"tcmp-capture", "tcmp-worker0", "tcmp-worker1"} <= names, names
    for pid in _tree(tcpcopy.pid):
        _assert_unprivileged(pid, f"tcpcopy-mp {_comm(pid)}")
    for pid in _tree(intercept.pid):
        _assert_unprivileged(pid, f"intercept-mp {_comm(pid)}")

    # A killed worker comes back unprivileged, and replication goes on.
    old = _workers(tcpcopy.pid)
    os.kill(old["tcmp-worker0"], signal.SIGKILL)

    def replaced() -> int | None:
        pid = _workers(tcpcopy.pid).get("tcmp-worker0")
        return pid if pid is not None and pid != old["tcmp-worker0"] else None

    new_pid = tbm.wait_until(replaced, DEADLINE_S, what="worker 0 restarted")
    _assert_unprivileged(new_pid, "restarted worker 0")
    # Flows hash to either worker; the restarted one must get its intercept channel again
    # before its flows are replicated, so probe until a request arrives, then send the batch.
    tb.wait_replicating(tcpcopy, timeout=DEADLINE_S, prefix="/priv/probe-after-kill")
    _send_requests(tb, "/priv/b")
    n = tb.wait_target_count("/priv/b", REQUESTS, timeout=DEADLINE_S)
    assert n == REQUESTS, f"after the restart {n} of {REQUESTS} replicated\n{tcpcopy.tail()}"

    # intercept-mp, no longer root, still removes its rule at exit (ambient CAP_NET_ADMIN).
    assert intercept.stop(signal.SIGTERM, timeout=20) == 0, intercept.tail()
    assert "intercept-mp" not in rules(), rules()
    assert "removed the NFQUEUE rule" in intercept.output(), intercept.tail()
    assert tbm.read_summary(tmp_path / "intercept-summary.json") is not None

    # tcpcopy-mp's --summary-json lives in a directory only root can write: it was created
    # before the drop and rewritten in place at exit.
    assert tcpcopy.stop(signal.SIGTERM, timeout=20) == 0, tcpcopy.tail()
    assert tbm.read_summary(summary) is not None, tcpcopy.tail()
    assert tb.client_leak_packets() == 0
