"""engine/io/channel.py against an in-process fake intercept on 127.0.0.1 (no privileges)."""

from __future__ import annotations

import selectors
import socket
import time
from dataclasses import dataclass

import pytest

from engine.codec import packet, wire
from engine.core.config import CONNECTIONS_MAX, worker_connections
from engine.io.channel import BACKOFF_MAX_S, BACKOFF_MIN_S, InterceptChannels, per_record

DEADLINE_S = 5.0


@dataclass
class Route:
    client_ip: int
    client_port: int
    target_ip: int
    target_port: int


class FakeIntercept:
    """A listening socket that accepts and records what each connection sends."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.received: dict[int, bytearray] = {}

    def poll(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                break
            conn.setblocking(False)
            self.received[len(self.conns)] = bytearray()
            self.conns.append(conn)
        for i, conn in enumerate(self.conns):
            if conn.fileno() < 0:
                continue
            try:
                while data := conn.recv(65536):
                    self.received[i] += data
            except (BlockingIOError, OSError):
                pass

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.listener.close()


@pytest.fixture
def setup():
    icpt = FakeIntercept()
    sel = selectors.DefaultSelector()
    responses: list[packet.TcpPacket] = []
    chans = InterceptChannels(
        [("127.0.0.1", icpt.port)], 2, sel, per_record(lambda pkt, now: responses.append(pkt))
    )
    yield icpt, sel, chans, responses
    chans.close()
    icpt.close()
    sel.close()


def pump(sel, chans, icpt, until, deadline_s=DEADLINE_S):
    """Run the selector/timers until `until()` holds; fail after deadline_s."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        now = time.monotonic()
        for key, mask in sel.select(0.01):
            key.data(mask, now)
        timer = chans.get_timer()
        if timer is not None and timer <= time.monotonic():
            chans.handle_timer(time.monotonic())
        if icpt is not None:
            icpt.poll()
        if until():
            return
    raise AssertionError("condition not reached before the deadline")


def test_handshake_first_on_every_connection(setup):
    icpt, sel, chans, _ = setup
    chans.start(time.monotonic())
    pump(
        sel,
        chans,
        icpt,
        lambda: len(icpt.conns) == 2 and all(len(b) >= 14 for b in icpt.received.values()),
    )
    assert chans.connected == 2
    for buf in icpt.received.values():
        assert bytes(buf) == wire.HANDSHAKE
        assert bytes(buf) == bytes([0] * 7 + [6] + [0] * 6)  # spec §1.2 literal


def test_client_add_round_robin_over_connections(setup):
    icpt, sel, chans, _ = setup
    chans.start(time.monotonic())
    pump(sel, chans, icpt, lambda: chans.connected == 2 and len(icpt.conns) == 2)
    routes = [Route(0xC6130100 + i, 40000 + i, 0xC6120203, 8080) for i in range(4)]
    for r in routes:
        assert chans.announce(r, time.monotonic())
    total = 14 + 2 * 14
    pump(sel, chans, icpt, lambda: all(len(b) == total for b in icpt.received.values()))
    seen = []
    for buf in icpt.received.values():
        body = bytes(buf[14:])
        seen += [body[i : i + 14] for i in range(0, len(body), 14)]
    expected = [
        wire.client_add(r.client_ip, r.client_port, r.target_ip, r.target_port) for r in routes
    ]
    assert sorted(seen) == sorted(expected)
    # alternation: consecutive routes went to different connections
    firsts = {bytes(buf[14:28]) for buf in icpt.received.values()}
    assert firsts == {expected[0], expected[1]}
    assert chans.counters["route_announced"] == 4
    assert chans.counters["route_unannounced"] == 0


def test_frames_are_decoded_across_arbitrary_splits(setup):
    icpt, sel, chans, responses = setup
    chans.start(time.monotonic())
    pump(sel, chans, icpt, lambda: len(icpt.conns) == 2)
    synack = packet.TcpPacket(
        src=0xC6120203,
        dst=0xC6130101,
        sport=8080,
        dport=40001,
        seq=1000,
        ack=2001,
        flags=packet.SYN | packet.ACK,
        window=65160,
    )
    data = packet.TcpPacket(
        src=0xC6120203,
        dst=0xC6130101,
        sport=8080,
        dport=40001,
        seq=1001,
        ack=2079,
        flags=packet.ACK | packet.PSH,
        payload=b"x" * 300,
    )
    frame = wire.encode_frame(
        [wire.encode_response_record(packet.build(p)) for p in (synack, data)]
    )
    stream = frame + wire.encode_frame([wire.encode_response_record(packet.build(synack))])
    conn = icpt.conns[0]
    for i in range(0, len(stream), 7):  # 7-byte dribbles cut records and counts
        conn.sendall(stream[i : i + 7])
    pump(sel, chans, icpt, lambda: len(responses) == 3)
    assert [(r.seq, r.ack, r.flags) for r in responses] == [
        (1000, 2001, packet.SYN | packet.ACK),
        (1001, 2079, packet.ACK | packet.PSH),
        (1000, 2001, packet.SYN | packet.ACK),
    ]
    assert responses[1].data_len == 300
    assert chans.counters["responses_received"] == 3


def test_lost_connection_is_remade_and_handshakes_again(setup):
    icpt, sel, chans, _ = setup
    chans.start(time.monotonic())
    pump(sel, chans, icpt, lambda: chans.connected == 2 and len(icpt.conns) == 2)
    icpt.conns[0].close()
    pump(sel, chans, icpt, lambda: chans.counters["channel_disconnects"] == 1)
    pump(sel, chans, icpt, lambda: len(icpt.conns) == 3 and chans.connected == 2)
    pump(sel, chans, icpt, lambda: bytes(icpt.received[2]) == wire.HANDSHAKE)
    assert chans.counters["channel_connects"] == 3


def test_bad_frame_count_drops_only_that_connection(setup):
    icpt, sel, chans, responses = setup
    chans.start(time.monotonic())
    pump(sel, chans, icpt, lambda: chans.connected == 2 and len(icpt.conns) == 2)
    icpt.conns[1].sendall(b"\x00\x11" + b"\x00" * 64 * 17)  # 17 > COMB_MAX (spec §1.4)
    pump(sel, chans, icpt, lambda: chans.counters["channel_frame_errors"] == 1)
    assert responses == []
    pump(sel, chans, icpt, lambda: chans.connected == 2 and len(icpt.conns) == 3)


def test_unreachable_intercept_backs_off_and_counts_unannounced_routes():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: connect is refused
    sel = selectors.DefaultSelector()
    chans = InterceptChannels([("127.0.0.1", port)], 1, sel, per_record(lambda pkt, now: None))
    try:
        chans.start(100.0)
        pump(sel, chans, None, lambda: chans.counters["channel_connect_failures"] >= 1)
        # Timers run on the `now` we pass: a fake clock pins the backoff sequence.
        retries = []
        now = 1000.0
        for _ in range(7):
            conn = chans.intercepts[0].conns[0]
            retries.append(conn.backoff_s)
            chans.handle_timer(conn.deadline)  # reconnect attempt at its deadline
            pump(
                sel,
                chans,
                None,
                lambda n=chans.counters["channel_connect_failures"]: (
                    chans.counters["channel_connect_failures"] > n
                ),
            )
            now += 1
        assert retries[0] == 2 * BACKOFF_MIN_S  # the first failure already used 0.5 s
        assert retries == sorted(retries)
        assert max(retries) == BACKOFF_MAX_S
        assert not chans.announce(Route(1, 2, 3, 4), now)
        assert chans.counters["route_unannounced"] == 1
    finally:
        chans.close()
        sel.close()


@pytest.mark.parametrize(
    ("connections", "workers", "shares"),
    [(2, 1, [2]), (2, 2, [1, 1]), (3, 2, [2, 1]), (2, 8, [1] * 8), (16, 3, [6, 5, 5])],
)
def test_minus_c_is_spread_over_the_workers(connections: int, workers: int, shares: list) -> None:
    """-C counts the whole tcpcopy-mp's connections per intercept (C's per process): the
    workers share them, each keeping at least one."""
    assert [worker_connections(connections, workers, i) for i in range(workers)] == shares


def test_every_minus_c_and_worker_count_gives_max_of_both() -> None:
    for connections in range(1, CONNECTIONS_MAX + 1):
        for workers in range(1, 20):
            shares = [worker_connections(connections, workers, i) for i in range(workers)]
            assert sum(shares) == max(connections, workers), (connections, workers, shares)
            assert max(shares) - min(shares) <= 1 and min(shares) >= 1
