"""InterceptServer.receive_ip_packets (a source's read batch) == receive_ip_packet per packet:
same frames on the channel, same counters, whatever the mix of routed, unrouted, delayed,
invalid and docker-rewritten responses."""

from __future__ import annotations

import socket

import pytest

from engine.codec import packet, wire
from engine.codec.packet import ACK, PSH, RST, SYN, TcpPacket, ip_from_str
from intercept.router import Router
from intercept.server import InterceptServer

TARGET = ip_from_str("198.18.2.3")
ROUTED = ip_from_str("198.19.1.5")
OTHER = ip_from_str("198.19.1.6")
DOCKER_FROM, DOCKER_TO = ip_from_str("198.19.9.9"), ROUTED


def response(dst: int, dport: int, flags: int, seq: int) -> bytes:
    return packet.build(
        TcpPacket(src=TARGET, dst=dst, sport=8080, dport=dport, seq=seq, ack=1, flags=flags,
                  payload=b"r" * (seq % 7))
    )  # fmt: skip


def mixed_batch() -> list[bytes]:
    out = []
    for i in range(70):
        kind = i % 7
        if kind == 0:
            out.append(response(OTHER, 40001, ACK, i))  # no route: unrouted
        elif kind == 1:
            out.append(response(OTHER, 40001, SYN | ACK, i))  # no route, SYN: delayed
        elif kind == 2:
            out.append(b"\x60" + bytes(39))  # IPv6: invalid
        elif kind == 3:
            out.append(response(DOCKER_FROM, 40000, PSH | ACK, i))  # -D rewrite, then routed
        elif kind == 4:
            out.append(response(ROUTED, 40000, RST, i))
        else:
            out.append(response(ROUTED, 40000, PSH | ACK, i))
    return out


def run(batched: bool, combine: int) -> tuple[dict[str, int], bytes]:
    server = InterceptServer(Router(), combine=combine, docker_map=(DOCKER_FROM, DOCKER_TO))
    ours, peer = socket.socketpair()
    ch = server.attach_channel(ours, "socketpair")
    server.router.add_route(ROUTED, 40000, TARGET, 8080, ch, 0.0)
    batch = mixed_batch()
    if batched:
        server.receive_ip_packets(batch[:33], 1.0)
        server.receive_ip_packets(batch[33:], 1.0)
    else:
        for p in batch:
            server.receive_ip_packet(p, 1.0)
    server._flush()
    peer.setblocking(False)
    data = peer.recv(1 << 20)
    counters = dict(server.counters)
    server.close()
    peer.close()
    return counters, data


@pytest.mark.parametrize("combine", [1, 4, 16])
def test_batch_receive_matches_per_packet_receive(combine: int) -> None:
    one, one_bytes = run(False, combine)
    many, many_bytes = run(True, combine)
    assert many == one
    assert many_bytes == one_bytes
    assert one["responses_forwarded"] == 40
    assert (one["responses_unrouted"], one["responses_delayed"]) == (10, 10)
    assert (one["packets_invalid"], one["docker_rewritten"]) == (10, 10)
    frames = wire.FrameDecoder().feed_frames(many_bytes)
    assert sum(map(len, frames)) == 40
