"""engine/io/send.py's link-layer sender (-o DEV) on a real packet socket, in a namespace of
its own.

The namespace holds one veth pair: frames the LinkSender writes on ``lk0`` are read back on
``lk1`` by an AF_PACKET socket, whole (Ethernet header included).  Every batch path (the C
extension, ctypes sendmmsg, sendto) must put the same frames on the wire, in order, go on
after a packet that has no next-hop MAC (counted EHOSTUNREACH), and split a packet larger
than the device's MTU.
"""

from __future__ import annotations

import os
import socket

import pytest

from engine.codec import packet
from engine.codec.packet import ACK, PSH, TcpPacket
from engine.core import rewrite
from engine.io import send
from testbed import netns as tbm

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

TARGET = "198.18.0.2"
UNKNOWN = "198.18.0.77"
PEER_MAC = "02:00:00:00:0a:02"
SRC_MAC = "02:00:00:00:0a:01"
MTU = 1000


@pytest.fixture
def ns():
    with tbm.scratch_netns(
        ["ip", "link", "add", "lk0", "type", "veth", "peer", "name", "lk1"],
        ["ip", "link", "set", "lk0", "address", SRC_MAC, "mtu", str(MTU), "up"],
        ["ip", "link", "set", "lk1", "address", PEER_MAC, "mtu", str(MTU), "up"],
        ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"],
    ) as name:
        yield name


def _pkt(sport: int, dst: str = TARGET, payload: bytes = b"x") -> bytes:
    return packet.build(
        TcpPacket(
            src=packet.ip_from_str("198.19.0.5"),
            dst=packet.ip_from_str(dst),
            sport=sport,
            dport=8080,
            seq=1000,
            ack=1,
            flags=PSH | ACK,
            window=1000,
            payload=payload,
        )
    )


def _open(ns: str, path: str) -> tuple[send.LinkSender, socket.socket]:
    entries = rewrite.parse_transfer(f"80@{SRC_MAC}-{TARGET}:8080@{PEER_MAC}")

    def make():
        rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        rx.bind(("lk1", 0x0800))
        rx.settimeout(2.0)
        return send.LinkSender("lk0", entries, batch_path=path), rx

    return tbm.in_netns(ns, make)


@pytest.mark.parametrize("path", ["fastio", "ctypes", "sendto"])
def test_frames_arrive_in_order_unknown_destinations_are_counted_big_ones_split(
    ns: str, path: str
) -> None:
    sender, rx = _open(ns, path)
    with rx:
        assert sender.batch_path == path
        big = _pkt(3000, payload=bytes(range(200)) * 12)  # 2,400 bytes of data
        batch = [_pkt(1), _pkt(2, dst=UNKNOWN), _pkt(3), big, _pkt(4)]
        sent = sender.send_batch(batch)
        frames = []
        while len(frames) < 6:
            frames.append(rx.recv(65536))
        sender.close()
    assert sent == 6  # 1, 3, the 3 pieces of the big one, 4
    header = bytes.fromhex(PEER_MAC.replace(":", "")) + bytes.fromhex(SRC_MAC.replace(":", ""))
    assert all(f[:14] == header + b"\x08\x00" for f in frames)
    pieces = [packet.parse_ip(f[14:]) for f in frames]
    assert [p.sport for p in pieces] == [1, 3, 3000, 3000, 3000, 4]
    assert all(len(f) - 14 <= MTU for f in frames)
    assert b"".join(p.payload for p in pieces if p.sport == 3000) == packet.parse_ip(big).payload
    assert all(packet.checksum(f[14:34]) == 0 for f in frames)
    c = sender.counters
    assert (c["send_packets"], c["send_error_EHOSTUNREACH"], c["send_split"]) == (6, 1, 1)
