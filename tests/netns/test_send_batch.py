"""engine/io/send.py's batched raw send on a real IPPROTO_RAW socket, in a namespace of its own.

The namespace has only ``lo`` with 198.18.0.1/32: packets to 198.18.0.1 are delivered
locally and read back by a raw TCP socket (every packet, in order); packets to 198.18.9.9
have no route (ENETUNREACH), so a batch that mixes both is a partial sendmmsg that must go
on after each refusal.  Every implementation (the C extension, ctypes, sendto) must give the
same counters as the per-packet ``send``.
"""

from __future__ import annotations

import os
import socket

import pytest

from engine.codec import packet
from engine.codec.packet import ACK, PSH, TcpPacket
from engine.io import send
from engine.io.batch import SendBuffer
from testbed import netns as tbm

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

LOCAL = "198.18.0.1"
NOROUTE = "198.18.9.9"


@pytest.fixture
def ns():
    with tbm.scratch_netns(
        ["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{LOCAL}/32", "dev", "lo"]
    ) as name:
        yield name


def _pkt(dst: str, sport: int, payload: bytes = b"x") -> bytes:
    return packet.build(
        TcpPacket(
            src=packet.ip_from_str(LOCAL),
            dst=packet.ip_from_str(dst),
            sport=sport,
            dport=9,
            seq=1000 + sport,
            ack=1,
            flags=PSH | ACK,
            window=1000,
            payload=payload,
        )
    )


def _open(ns: str, path: str | None) -> tuple[send.RawSender, socket.socket]:
    return tbm.in_netns(ns, lambda: send.RawSender(batch_path=path)), tbm.raw_tcp_receiver(ns)


def _received_sports(rx: socket.socket, n: int) -> list[int]:
    """The TCP source ports of the next n packets to LOCAL (loopback shows each once)."""
    out = []
    while len(out) < n:
        data = rx.recv(65536)
        p = packet.parse_ip(data)
        if p.dport == 9:
            out.append(p.sport)
    return out


PATHS = ["fastio", "ctypes", "sendto"]


@pytest.mark.parametrize("path", PATHS)
def test_a_batch_arrives_whole_and_in_order(ns: str, path: str) -> None:
    if path == "fastio":
        pytest.importorskip("engine.io._fastio")
    sender, rx = _open(ns, path)
    try:
        assert sender.batch_path == path
        batch = [_pkt(LOCAL, 20000 + i, b"y" * (i % 50)) for i in range(600)]  # > one chunk
        assert sender.send_batch(batch) == 600
        assert _received_sports(rx, 600) == [20000 + i for i in range(600)]
        assert sender.counters["send_packets"] == 600
        assert sender.counters["send_bytes"] == sum(map(len, batch))
        assert sender.counters["send_errors"] == 0
    finally:
        sender.close()
        rx.close()


@pytest.mark.parametrize("path", PATHS)
def test_refused_packets_are_counted_by_errno_and_the_rest_still_go(ns: str, path: str) -> None:
    if path == "fastio":
        pytest.importorskip("engine.io._fastio")
    sender, rx = _open(ns, path)
    try:
        good = [20000 + i for i in range(10)]
        batch = [
            _pkt(LOCAL, good[0]),
            _pkt(NOROUTE, 1),  # first refusal after one sent
            _pkt(NOROUTE, 2),  # two in a row
            *(_pkt(LOCAL, p) for p in good[1:5]),
            b"\x45\x00\x00",  # shorter than an IP header: EINVAL, never handed over
            *(_pkt(LOCAL, p) for p in good[5:]),
            _pkt(NOROUTE, 3),  # refusal as the very last packet
        ]
        assert sender.send_batch(batch) == len(good)
        assert _received_sports(rx, len(good)) == good
        c = sender.counters
        assert c["send_packets"] == len(good)
        assert c["send_errors"] == 4
        assert c["send_error_ENETUNREACH"] == 3
        assert c["send_error_EINVAL"] == 1
        unroutable = socket.inet_aton(NOROUTE)
        sent_bytes = sum(len(p) for p in batch if len(p) >= 20 and p[16:20] != unroutable)
        assert c["send_bytes"] == sent_bytes
        # The per-packet send counts the same way.
        one, one_rx = _open(ns, "sendto")
        try:
            for p in batch:
                one.send(p)
            assert {k: v for k, v in one.counters.items() if v} == {k: v for k, v in c.items() if v}
        finally:
            one.close()
            one_rx.close()
    finally:
        sender.close()
        rx.close()


def test_an_empty_batch_sends_nothing(ns: str) -> None:
    sender, rx = _open(ns, None)
    try:
        assert sender.send_batch([]) == 0
        assert sum(sender.counters.values()) == 0
    finally:
        sender.close()
        rx.close()


def _buffer(batch: list[bytes]) -> SendBuffer:
    buf = SendBuffer()
    off = 0
    for i, p in enumerate(batch):
        buf.data[off : off + len(p)] = p
        buf.lengths[i] = len(p)
        off += len(p)
    return buf


@pytest.mark.parametrize("path", PATHS)
def test_a_send_buffer_goes_out_as_its_packets_would(ns: str, path: str) -> None:
    """send_buffer (a drain's packets back to back, engine/io/batch.py) sends and counts
    exactly as send_batch of the same packets: in order, each refusal under its errno."""
    if path == "fastio":
        pytest.importorskip("engine.io._fastio")
    good = [21000 + i for i in range(600)]  # > one sendmmsg chunk
    batch = [
        _pkt(NOROUTE, 1),
        *(_pkt(LOCAL, p, b"z" * (p % 40)) for p in good[:300]),
        b"\x45\x00\x00",
        _pkt(NOROUTE, 2),
        *(_pkt(LOCAL, p) for p in good[300:]),
        _pkt(NOROUTE, 3),
    ]
    sender, rx = _open(ns, path)
    ref, rx2 = _open(ns, path)
    try:
        assert sender.send_buffer(_buffer(batch), len(batch)) == len(good)
        assert _received_sports(rx, len(good)) == good
        assert ref.send_batch(batch) == len(good)
        assert {k: v for k, v in sender.counters.items() if v} == {
            k: v for k, v in ref.counters.items() if v
        }
        assert sender.counters["send_error_ENETUNREACH"] == 3
    finally:
        for s in (sender, ref):
            s.close()
        for r in (rx, rx2):
            r.close()
