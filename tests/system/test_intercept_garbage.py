"""intercept-mp under peers that send garbage: cheap for it, bounded in the log.

The loop runs in this process over ``socketpair``s (no network at all), as in
tests/system/test_intercept_cli.py: one peer sends 1,000 records of an unknown type after a
valid handshake, another (a well-behaved tcpcopy) routes responses beside it.
"""

from __future__ import annotations

import logging

from engine.codec import wire
from intercept.router import Router
from intercept.server import BAD_RECORDS_MAX, InterceptServer
from tests.system.pairs import socketpair
from tests.system.test_intercept_cli import HELLO, ScriptedSource, burst, read_frames, routed

BAD_RECORDS_SENT = 1000


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def unknown_records(count: int) -> bytes:
    return b"".join(wire.CLIENT_RECORD.pack(0, 0, 9, 0, 0) for _ in range(count))


def test_garbage_records_are_rate_limited_counted_and_the_peer_closed() -> None:
    handler = Collect()
    logger = logging.getLogger("intercept.server")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    server = InterceptServer(Router())
    good_ours, good_peer = socketpair()
    bad_ours, bad_peer = socketpair()
    again_ours, again_peer = socketpair()
    try:
        server.attach_channel(good_ours, "198.18.0.7:5000")
        server.attach_channel(bad_ours, "198.18.0.9:6000")
        good_peer.sendall(HELLO)
        bad_peer.sendall(wire.HANDSHAKE + unknown_records(BAD_RECORDS_SENT))

        def reconnect(s: InterceptServer, now: float) -> bool:
            if len(s.channels) != 1:
                return False  # the bad peer is not closed yet
            s.attach_channel(again_ours, "198.18.0.9:6001")  # the same host comes back
            again_peer.sendall(wire.HANDSHAKE + unknown_records(BAD_RECORDS_SENT))
            return True

        steps = [
            routed("198.19.1.5", 40000),
            reconnect,
            lambda s, now: len(s.channels) == 1,  # closed again after its budget
            burst("198.19.1.5", 40000, 50),
        ]
        server.add_source(ScriptedSource(server, steps))
        assert server.run() == "script done"
    finally:
        logger.removeHandler(handler)
    c = server.counters
    unknown = [m for m in handler.messages if "unknown msg type" in m]
    closed = [m for m in handler.messages if "records of an unknown type: closed" in m]
    print(
        f"GARBAGE-RESULT sent={2 * BAD_RECORDS_SENT} bad={c['client_records_bad']} "
        f"closed={c['channels_closed_bad_records']} lines={len(unknown) + len(closed)}"
    )
    # Two connections, each closed at its budget: the rest of their records never cost more.
    assert c["client_records_bad"] == 2 * BAD_RECORDS_MAX
    assert c["channels_closed_bad_records"] == 2
    # One warning per peer address and interval, not one per record; the budget's close
    # line once for the host as well.
    assert len(unknown) == 1, unknown
    assert len(closed) == 1, closed
    assert bad_peer.recv(10) == b"" and again_peer.recv(10) == b""  # both closed
    # The well-behaved tcpcopy beside them kept its route and got every response.
    assert [ch.peer for ch in server.channels.values()] == ["198.18.0.7:5000"]
    frames = read_frames(good_peer)
    assert sum(len(f) for f in frames) == 50
    assert c["responses_forwarded"] == 50
    server.close()


def test_the_suppressed_count_is_told_when_the_next_line_is_allowed() -> None:
    handler = Collect()
    logger = logging.getLogger("intercept.server")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    clock = [100.0]
    server = InterceptServer(Router(), clock=lambda: clock[0])
    ours, peer = socketpair()
    try:
        server.attach_channel(ours, "198.18.0.9:6000")
        peer.sendall(wire.HANDSHAKE + unknown_records(10))

        def later(s: InterceptServer, now: float) -> bool:
            if s.counters["client_records_bad"] < 10:
                return False
            clock[0] += 3600.0  # past the interval: the next bad record is logged again
            peer.sendall(unknown_records(1))
            return True

        steps = [later, lambda s, now: s.counters["client_records_bad"] == 11]
        server.add_source(ScriptedSource(server, steps))
        assert server.run() == "script done"
    finally:
        logger.removeHandler(handler)
    unknown = [m for m in handler.messages if "unknown msg type" in m]
    assert len(unknown) == 2, unknown
    assert unknown[1].endswith("(9 more from 198.18.0.9 not logged)"), unknown
    server.close()
