"""intercept-mp's NFQUEUE source when the kernel overruns its netlink socket (ENOBUFS).

A real queue in a namespace of the test's own: an iptables rule sends TCP packets from port
SPORT to NFQUEUE QUEUE_NUM, an ``NfqueueSource`` (compiled response path or Python) is bound
to it, and its netlink socket's receive buffer is shrunk to the kernel's minimum, so that a
burst of BURST packets sent while nobody reads overruns it.  The kernel then drops what does
not fit (its ``user_dropped`` column) and the next read fails with ENOBUFS.

What a user must get: the overrun is counted (``queue_overruns``, one per episode), the read
after it takes what did fit, every packet read gets its verdict (the kernel's queue is empty
afterwards), and the kernel's count of the lost ones is what ``queue_dropped`` reports.  The
packets stay in the namespace: they are addressed to 198.18.200.1 on its loopback and the
rule queues them on their way out, where intercept drops them.
"""

from __future__ import annotations

import socket
import struct
import subprocess

import pytest

from intercept.router import Router
from intercept.server import InterceptServer
from intercept.sources import nfqueue as nq
from testbed import netns as tbm
from tests.netns.conftest import SKIP_NO_NETNS

pytestmark = [pytest.mark.netns, SKIP_NO_NETNS]

QUEUE_NUM = 7
SPORT = 7000
ADDR = "198.18.200.1"
BURST = 400
READS_MAX = 100
"""Reads after the overrun before the test gives up (each takes at most a batch)."""


def _ipv4_tcp(seq: int) -> bytes:
    """An IPv4/TCP ACK from ADDR:SPORT to ADDR:5555 (checksums left to the kernel and
    unneeded: the packet is queued before anything checks it, and dropped there)."""
    src = dst = socket.inet_aton(ADDR)
    tcp = struct.pack("!HHIIBBHHH", SPORT, 5555, seq, 1, 5 << 4, 0x10, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, seq & 0xFFFF, 0, 64, 6, 0, src, dst)
    return ip + tcp


def _queue_row(ns: str) -> list[int]:
    """The queue's row of /proc/net/netfilter/nfnetlink_queue in ``ns`` (as integers)."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", nq.NF_QUEUE_PROC],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for line in out.splitlines():
        cols = line.split()
        if cols and cols[0] == str(QUEUE_NUM):
            return [int(c) for c in cols]
    raise AssertionError(f"queue {QUEUE_NUM} not listed: {out!r}")


@pytest.mark.parametrize("engine", ["compiled", "python"])
def test_a_netlink_overrun_is_counted_and_the_queue_recovers(engine: str) -> None:
    if engine == "compiled":
        from intercept.fastroute import CompiledRouter, compiled_available

        built, why = compiled_available()
        if not built:
            pytest.skip(f"the compiled response path is not built: {why}")
        server = InterceptServer(CompiledRouter())
    else:
        server = InterceptServer(Router())
    setup = (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "addr", "add", f"{ADDR}/32", "dev", "lo"],
        ["iptables", "-w", "-A", "OUTPUT", *nq.rule_spec(SPORT, QUEUE_NUM, comment=False)],
    )
    with tbm.scratch_netns(*setup) as ns:
        compiled = None
        if engine == "compiled":
            compiled = nq.CompiledPath(server.router.table, server.receive_response_batch)  # type: ignore[attr-defined]

        def bind() -> nq.NfqueueSource:
            return nq.NfqueueSource(
                server.receive_ip_packets, server.counters, QUEUE_NUM, compiled=compiled
            )

        src: nq.NfqueueSource = tbm.in_netns(ns, bind)
        raw: socket.socket | None = None
        try:
            # The kernel's minimum receive buffer: a few messages fit, the burst does not.
            src._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
            raw = tbm.in_netns(
                ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            )
            for i in range(BURST):
                raw.sendto(_ipv4_tcp(i), (ADDR, 0))
            queued = _queue_row(ns)
            assert queued[6] > 0, f"the burst did not overrun the socket: {queued}"
            assert server.counters.get("queue_overruns", 0) == 0

            src.on_readable(0.0)
            assert server.counters["queue_overruns"] == 1
            assert src.has_backlog  # what fit is still to be read
            assert server.counters["responses_total"] == 0

            for _ in range(READS_MAX):
                src.on_readable(0.0)
                if not src.has_backlog and _queue_row(ns)[2] == 0:
                    break
            after = _queue_row(ns)
            # what intercept's queue_dropped counter folds in (poll_stats), read in the
            # namespace (/proc/net is the main thread's, thread-self/net this thread's)
            kernel_lost = tbm.in_netns(
                ns,
                lambda: nq.read_queue_dropped(
                    QUEUE_NUM, "/proc/thread-self/net/netfilter/nfnetlink_queue"
                ),
            )
        finally:
            if raw is not None:
                raw.close()
            src.close()
    total, user_dropped = after[2], after[6]
    assert total == 0, f"packets left without a verdict: {after}"
    read = server.counters["responses_total"]
    assert read > 0, "nothing was read after the overrun"
    assert server.counters["queue_overruns"] == 1  # one episode, one count
    assert read + user_dropped + after[5] == BURST, (read, after)
    assert kernel_lost == user_dropped + after[5]
    assert server.counters["responses_unrouted"] == read  # no tcpcopy connected: no route
