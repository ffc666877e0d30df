"""Live capture through the TPACKET_V3 mmap ring (the default), and overload shedding.

* The default live capture (raw mode: PACKET_HOST frames of every device) and ``--capture
  packet -i DEV`` both read kernel blocks (``capture_blocks`` > 0) and replicate the
  standard load exactly.
* A frozen worker under a burst of short connections: its ring passes 90 %, the capture
  sheds *new* sessions whole (shed_sessions{reason="ring_full"}), the ring never overflows,
  and every online request is either at the target or in a shed session (complete at the
  target: nginx logs a request only when it was whole).
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from engine.io.capture import TPACKET_ENV
from testbed import netns as tbm
from tests.netns.conftest import SKIP_NO_NETNS
from tests.netns.test_faults import RING_PACKETS, workers_of
from tests.netns.test_replication import (
    KEEPALIVE_REQUESTS,
    SHORT_CONNECTIONS,
    assert_exact,
    run_standard_load,
    wait_counts,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    SKIP_NO_NETNS,
    pytest.mark.usefixtures("programs"),
]

ARGS = ["-x", tbm.TRANSFER_HTTP, "-c", "198.19.1.x"]
SETTLED_S = 5.0
"""No new request at the target for this long: a session's SYN retransmissions (0.5, 1, 2 and
4 s apart) are over."""
WRK_CONNECTIONS = 8


def packet_ring_mappings(pid: int) -> int:
    """Shared mappings of a socket (the TPACKET_V3 ring) in the process ``pid``."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return sum(1 for line in maps if line.split()[-1].startswith("socket:"))


def children_named(pid: int, name: str) -> list[int]:
    out = []
    for child in psutil.Process(pid).children():
        try:
            if child.name() == name and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child.pid)
        except psutil.Error:
            continue
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("capture", ["default", "packet", "default-recv", "packet-recv"])
def test_tpacket_capture_replicates_exactly(
    testbed: tbm.Testbed, tmp_path: Path, capture: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each live capture replicates the standard load exactly: the TPACKET_V3 ring, and the
    recv path a kernel without that ring gets (selected here by TCPCOPY_MP_TPACKET=0), both
    through the same rings of records to the compiled workers."""
    testbed.tcpcopy_workers = 2
    args = list(ARGS)
    if capture.startswith("packet"):
        args += ["--capture", "packet", "-i", tbm.ONLINE_CLIENT_IFACE]
    ring = not capture.endswith("-recv")
    if not ring:
        monkeypatch.setenv(TPACKET_ENV, "0")  # the child processes inherit it
    _, tcpcopy = tbm.start_pair(testbed, tmp_path, args)
    run_standard_load(testbed)
    seen = wait_counts(testbed, {"/ka/": KEEPALIVE_REQUESTS, "/sc/": SHORT_CONNECTIONS})
    # The kernel ring is mapped by the capture process only, not by the supervisor.
    assert packet_ring_mappings(tcpcopy.pid) == 0
    (capture_pid,) = children_named(tcpcopy.pid, "tcmp-capture")
    assert packet_ring_mappings(capture_pid) == int(ring)
    summary = tbm.stop_tcpcopy(testbed, tcpcopy, tmp_path)
    assert seen == {"/ka/": KEEPALIVE_REQUESTS, "/sc/": SHORT_CONNECTIONS}, tbm.diag(testbed)
    assert_exact(testbed, "/ka/", KEEPALIVE_REQUESTS)
    assert_exact(testbed, "/sc/", SHORT_CONNECTIONS)
    if ring:
        assert summary["capture_blocks"] > 0, summary  # the mmap ring, not the recv path
    else:
        assert summary["capture_blocks"] == 0, summary
        assert "no TPACKET_V3 ring (TCPCOPY_MP_TPACKET=0)" in tcpcopy.output()
    assert summary["capture_kernel_dropped"] == 0, summary
    assert summary["ring_dropped"] == 0 and summary["drop_shed"] == 0, summary
    assert testbed.client_leak_packets() == 0


@pytest.mark.timeout(240)
def test_overload_sheds_new_sessions_whole_and_the_ring_never_overflows(
    testbed: tbm.Testbed, tmp_path: Path
) -> None:
    tb = testbed
    tb.tcpcopy_workers = 1
    _, tcpcopy = tbm.start_pair(tb, tmp_path, ARGS)
    (worker_pid,) = workers_of(tcpcopy).values()
    os.kill(worker_pid, signal.SIGSTOP)  # well under the heartbeat timeout
    try:
        wrk = tb.run(
            "client", "wrk", "-t", "2", "-c", str(WRK_CONNECTIONS), "-d", "3s",
            "-H", "Connection: close",
            f"http://{tbm.ONLINE_CLIENT_SIDE_IP}/shed/x", timeout=30,
        )  # fmt: skip
    finally:
        os.kill(worker_pid, signal.SIGCONT)
    m = re.search(r"(\d+) requests in", wrk.stdout)
    burst = int(m.group(1)) if m else 0
    online = len(tbm.with_prefix(tb.access_log("online"), "/shed/"))
    assert burst > RING_PACKETS // 4, wrk.stdout  # 4+ packets a session: more than 90 % holds
    # After SIGCONT the worker drains its ring; once it is under 50 % the capture admits
    # new sessions again (probes sent before that would be shed and counted too).  The ring
    # is FIFO: once two probes sent after that are replicated, every session the worker was
    # given has been replayed.
    tbm.wait_until(
        lambda: "new sessions are admitted again" in tcpcopy.tail(200),
        30,
        what="the capture admitting new sessions again",
    )
    tb.wait_replicating(tcpcopy, timeout=60, prefix="/after1/")
    tb.wait_replicating(tcpcopy, timeout=60, prefix="/after2/")
    # The probes can overtake sessions the worker took from the ring before them: it starts
    # the few thousand the ring held at once, and one whose SYN the target dropped (its
    # listen backlog overflowed) goes on after the session's SYN retransmission.  So wait
    # until no request of the burst has reached the target for a while.
    seen = {"count": -1, "since": time.monotonic()}

    def settled() -> bool:
        count = len(tbm.with_prefix(tb.access_log("target"), "/shed/"))
        if count != seen["count"]:
            seen.update(count=count, since=time.monotonic())
        return time.monotonic() - seen["since"] >= SETTLED_S

    tbm.wait_until(settled, 90, interval=0.5, what="the burst's replay to settle")
    summary = tbm.stop_tcpcopy(tb, tcpcopy, tmp_path)
    shed = summary["shed_sessions_ring_full"]
    at_target = len(tbm.with_prefix(tb.access_log("target"), "/shed/"))
    figures = {
        "online": online,
        "target": at_target,
        "shed_sessions": shed,
        "drop_shed": summary["drop_shed"],
        "ring_dropped": summary["ring_dropped"],
    }
    print("overload figures:", figures)
    assert shed > 0, figures
    assert summary["ring_dropped"] == 0, figures  # shed early enough: no session got a hole
    # Every online request is at the target or in a shed session.  The other way round up
    # to -c sessions more: the connections wrk cuts at the end of -d opened a session (SYN)
    # whose request never completed online.
    assert online <= at_target + shed <= online + WRK_CONNECTIONS, f"{figures}\n{tbm.diag(tb)}"
