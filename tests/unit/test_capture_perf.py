"""The capture hot path (RawTcpSource.read_batch -> CaptureProcess.dispatch -> rings), fed
real packets through an AF_UNIX datagram socket: the kernel runs the same BPF program there.

The tests check what the batches deliver (exactly the packets the rule keeps, in order, on
their flow's ring); ``python -m tests.unit.test_capture_perf`` prints the micro-benchmark
(microseconds of capture-side work per offered packet, Python filter vs kernel filter).
"""

from __future__ import annotations

import functools
import inspect
import operator
import socket
import struct
import sys
import time

from engine.codec import packet
from engine.io.capture import RawTcpSource, TransferFilter
from engine.io.ring import Ring, record_bytes
from engine.proc.capture import CaptureProcess, flow_worker
from tests.paths import CONTROL_PCAP, ONLINE_HTTP_PCAP, TARGET_SIDE_PCAP

ONLINE = (packet.ip_from_str("198.18.1.2"), 80)
SNDBUF_BYTES = 8 * 1024 * 1024
CHUNK_PACKETS = 2000


def real_packets() -> list[bytes]:
    """The IPv4 packets of the shared captures, both directions (parsed here with struct)."""
    out = []
    for path in (ONLINE_HTTP_PCAP, TARGET_SIDE_PCAP, CONTROL_PCAP):
        data = path.read_bytes()
        off = 24
        while off + 16 <= len(data):
            caplen = struct.unpack_from("<I", data, off + 8)[0]
            out.append(data[off + 16 + 14 : off + 16 + caplen])
            off += 16 + caplen
    return out


def wanted(ip: bytes) -> bool:
    """spec §3.3 steps 1, 2, 8 for the one -x entry ONLINE, decided here independently."""
    p = packet.parse_ip(ip)
    if (p.dst, p.dport) != ONLINE:
        return False
    return bool(p.flags & (packet.SYN | packet.FIN | packet.RST)) or p.data_len > 0


def make_filter() -> TransferFilter:
    def match(ip: int, port: int) -> object:
        return object() if (ip, port) == ONLINE else None

    if "transfers" in inspect.signature(TransferFilter).parameters:
        return TransferFilter(match, transfers=[ONLINE])
    return TransferFilter(match)  # an older tree, for "before" figures


def make_source(rx: socket.socket, kernel_filter: bool) -> RawTcpSource:
    flt = make_filter()
    if "kernel_filter" in inspect.signature(RawTcpSource).parameters:
        return RawTcpSource(flt, sock=rx, kernel_filter=kernel_filter)
    return RawTcpSource(flt, sock=rx)  # an older tree, for "before" figures


def pump(packets: list[bytes], kernel_filter: bool, workers: int = 2, rounds: int = 1):
    """Offer ``packets`` ``rounds`` times; returns (capture seconds, what each ring got)."""
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    rings = [Ring.create() for _ in range(workers)]
    for ring in rings:  # touch every page once: a live ring is warm after its first lap
        largest = ring.max_packet_bytes
        ring.push_batch([(bytes(largest), 0.0)] * (ring.capacity // record_bytes(largest)))
        ring.pop_batch(ring.capacity)
    got: list[list[bytes]] = [[] for _ in range(workers)]
    spent = 0.0
    try:
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF_BYTES)
        src = make_source(rx, kernel_filter)
        proc = CaptureProcess([src], rings, 1500)
        offered = packets * rounds
        for i in range(0, len(offered), CHUNK_PACKETS):
            for ip in offered[i : i + CHUNK_PACKETS]:
                tx.send(ip)
            t0 = time.perf_counter()
            while True:
                batch = src.read_batch(t0)
                if not batch:
                    break
                proc.dispatch(batch)
            spent += time.perf_counter() - t0
            for ring, out in zip(rings, got, strict=True):
                out.extend(data for data, _ts in ring.pop_batch(1 << 20))
        return spent, got, src
    finally:
        rx.close()
        tx.close()
        for r in rings:
            r.close()


def _expected(packets: list[bytes], workers: int) -> list[list[bytes]]:
    rings: list[list[bytes]] = [[] for _ in range(workers)]
    for ip in packets:
        if wanted(ip):
            p = packet.parse_ip(ip)
            rings[flow_worker(p.src, p.sport, workers)].append(ip)
    return rings


def test_kernel_filtered_batches_deliver_exactly_the_needed_packets():
    packets = real_packets()
    _spent, got, src = pump(packets, kernel_filter=True)
    assert src.kernel_filtered
    expected = _expected(packets, 2)
    assert got == expected and all(expected)
    kept = sum(map(len, expected))
    assert src.counters["capture_accepted"] == src.counters["capture_packets"] == kept
    assert src.counters["capture_bytes"] == sum(
        map(len, functools.reduce(operator.iadd, expected, []))
    )


def test_python_filter_delivers_the_same():
    packets = real_packets()
    _spent, got, src = pump(packets, kernel_filter=False)
    assert not src.kernel_filtered
    assert got == _expected(packets, 2)
    c = src.prefilter.counters
    assert c["capture_packets"] == len(packets)
    assert c["capture_pure_ack_dropped"] > 0


def test_attach_failure_falls_back_to_python_filtering():
    class NoFilterSocket:
        def __init__(self, sock):
            self.sock = sock

        def setsockopt(self, *args):
            raise OSError(22, "Invalid argument")

        def __getattr__(self, name):
            return getattr(self.sock, name)

    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with rx, tx:
        src = RawTcpSource(make_filter(), sock=NoFilterSocket(rx))  # type: ignore[arg-type]
        assert not src.kernel_filtered
        assert src.counters["capture_kernel_filter_failed"] == 1
        packets = real_packets()[:200]
        for ip in packets:
            tx.send(ip)
        got = [ip for _ts, ip in src.read_batch(0.0)]
        assert got == [ip for ip in packets if wanted(ip)]


def main(argv: list[str]) -> int:
    rounds = int(argv[1]) if len(argv) > 1 else 200
    packets = real_packets()
    offered = len(packets) * rounds
    kept = sum(wanted(ip) for ip in packets) * rounds
    print(f"{offered} packets offered ({kept} needed by the replay), 2 rings")
    modes = [("python filter", False), ("kernel filter", True)]
    for name, kernel in modes:
        spent, got, src = pump(packets, kernel, rounds=rounds)
        delivered = sum(map(len, got))
        print(
            f"{name:14s} kernel_filtered={getattr(src, 'kernel_filtered', False)!s:5s} "
            f"delivered {delivered:7d}  {spent:6.3f} s  "
            f"{spent / offered * 1e6:6.3f} us/offered  {spent / max(1, delivered) * 1e6:6.3f} "
            "us/delivered"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))


def test_kernel_filter_keeps_pure_acks_when_the_prefilter_does():
    flt = TransferFilter(
        lambda ip, port: object() if (ip, port) == ONLINE else None,
        transfers=[ONLINE],
        drop_pure_acks=False,
    )
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with rx, tx:
        src = RawTcpSource(flt, sock=rx)
        assert src.kernel_filtered
        packets = real_packets()[:300]
        for ip in packets:
            tx.send(ip)
        got = [ip for _ts, ip in src.read_batch(0.0)]
    to_online = [ip for ip in packets if packet.parse_ip(ip).dport == ONLINE[1]]
    assert got == [ip for ip in to_online if packet.parse_ip(ip).dst == ONLINE[0]]
    assert len(got) > len([ip for ip in packets if wanted(ip)])
