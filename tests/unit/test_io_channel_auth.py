"""engine/io/channel.py with --secret-file: the extended handshake against in-process intercepts
on 127.0.0.1 (no privileges).  The fake intercept runs the real intercept-side state machine
(wire.InterceptStreamDecoder), so both halves of the protocol meet here."""

from __future__ import annotations

import logging
import os
import selectors
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from engine.codec import packet, wire
from engine.io.channel import AUTH_TIMEOUT_S, InterceptChannels, per_record
from engine.io.logs import LOGGER_NAME

from .test_io_channel import FakeIntercept, Route, pump

SECRET = b"0123456789abcdef-shared"
ROUTE = Route(0xC6130105, 40000, 0xC6120203, 8080)


class AuthIntercept(FakeIntercept):
    """Accepts, runs InterceptStreamDecoder per connection, answers, and on a refusal shuts
    its side; ``records[i]`` are the client records connection i delivered after its
    handshake.  ``answer`` may replace the decoder's output (to play a lying intercept)."""

    def __init__(
        self,
        secret: bytes | None,
        answer: Callable[[int, bytes], bytes] | None = None,
    ) -> None:
        super().__init__()
        self.secret = secret
        self.answer = answer
        self.decoders: list[wire.InterceptStreamDecoder] = []
        self.records: list[list[wire.ClientRecord]] = []
        self.offsets: list[int] = []

    def poll(self) -> None:
        super().poll()
        while len(self.decoders) < len(self.conns):
            self.decoders.append(wire.InterceptStreamDecoder(self.secret, os.urandom(32)))
            self.records.append([])
            self.offsets.append(0)
        for i, conn in enumerate(self.conns):
            if conn.fileno() < 0:
                continue
            dec = self.decoders[i]
            new = bytes(self.received[i][self.offsets[i] :])
            self.offsets[i] += len(new)
            if not new:
                continue
            self.records[i] += dec.feed(new)
            out = dec.take_output()
            if self.answer is not None and out:
                out = self.answer(i, out)
            if out:
                conn.sendall(out)
            if dec.refused is not None:
                conn.shutdown(socket.SHUT_WR)

    def open_conns(self) -> list[int]:
        return [i for i, d in enumerate(self.decoders) if d.handshake_done]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger(LOGGER_NAME)
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


def make(icpt: FakeIntercept, secret: bytes | None = SECRET, connections: int = 2):
    sel = selectors.DefaultSelector()
    responses: list[packet.TcpPacket] = []
    chans = InterceptChannels(
        [("127.0.0.1", icpt.port)],
        connections,
        sel,
        per_record(lambda pkt, now: responses.append(pkt)),
        secret=secret,
    )
    return sel, chans, responses


def test_same_secret_authenticates_then_routes_and_receives() -> None:
    icpt = AuthIntercept(SECRET)
    sel, chans, responses = make(icpt)
    try:
        chans.start(time.monotonic())
        pump(sel, chans, icpt, lambda: chans.connected == 2)
        assert chans.counters["channel_auth_ok"] == 2
        assert sorted(icpt.open_conns()) == [0, 1]
        assert all(d.mode == "extended" for d in icpt.decoders)
        for i in range(2):  # the first bytes on the wire were the extended hello
            assert bytes(icpt.received[i][:14]) == wire.EXT_HELLO
        assert chans.announce(ROUTE, time.monotonic())
        add = wire.ClientRecord(ROUTE.client_ip, ROUTE.client_port, wire.TYPE_CLIENT_ADD,
                                ROUTE.target_ip, ROUTE.target_port)  # fmt: skip
        pump(sel, chans, icpt, lambda: add in icpt.records[0] + icpt.records[1])
        synack = packet.TcpPacket(src=ROUTE.target_ip, dst=ROUTE.client_ip, sport=8080,
                                  dport=40000, seq=7, ack=1,
                                  flags=packet.SYN | packet.ACK)  # fmt: skip
        icpt.conns[0].sendall(
            wire.encode_frame([wire.encode_response_record(packet.build(synack))])
        )
        pump(sel, chans, icpt, lambda: len(responses) == 1)
        assert (responses[0].seq, responses[0].flags) == (7, packet.SYN | packet.ACK)
    finally:
        chans.close()
        icpt.close()
        sel.close()


def test_wrong_secret_is_refused_logged_and_retried(lines: Lines) -> None:
    icpt = AuthIntercept(b"the intercept's other secret")
    sel, chans, _ = make(icpt, connections=1)
    try:
        chans.start(time.monotonic())
        pump(sel, chans, icpt, lambda: chans.counters["channel_auth_refused"] >= 2)
        assert chans.connected == 0 and chans.counters["channel_auth_ok"] == 0
        assert icpt.open_conns() == []
        assert all(d.refuse_code == wire.REFUSE_BAD_PROOF for d in icpt.decoders)
        assert not chans.announce(ROUTE, time.monotonic())
        name = f"127.0.0.1:{icpt.port}"
        assert any(line.startswith(f"intercept {name} refused our secret") for line in lines.lines)
        # never a fallback: every connection opened with the extended hello
        assert all(bytes(b[:14]) == wire.EXT_HELLO for b in icpt.received.values())
    finally:
        chans.close()
        icpt.close()
        sel.close()


def test_intercept_without_a_secret_says_so(lines: Lines) -> None:
    icpt = AuthIntercept(None)
    sel, chans, _ = make(icpt, connections=1)
    try:
        chans.start(time.monotonic())
        pump(sel, chans, icpt, lambda: chans.counters["channel_auth_refused"] >= 1)
        assert any("has no --secret-file" in line for line in lines.lines), lines.lines
        assert chans.connected == 0
    finally:
        chans.close()
        icpt.close()
        sel.close()


def test_intercept_that_cannot_prove_the_secret_is_dropped(lines: Lines) -> None:
    # It lets us in but its ACCEPT carries a made-up MAC: it does not hold the secret.
    def lie(i: int, out: bytes) -> bytes:
        if out[4] == wire.EXT_KIND_ACCEPT:
            return wire.encode_accept(bytes(32))
        return out

    icpt = AuthIntercept(SECRET, answer=lie)
    sel, chans, _ = make(icpt, connections=1)
    try:
        chans.start(time.monotonic())
        pump(sel, chans, icpt, lambda: chans.counters["channel_auth_bad_proof"] >= 1)
        assert chans.connected == 0 and chans.counters["channel_auth_ok"] == 0
        name = f"127.0.0.1:{icpt.port}"
        assert any(line.startswith(f"intercept {name} did not prove the secret")
                   for line in lines.lines), lines.lines  # fmt: skip
    finally:
        chans.close()
        icpt.close()
        sel.close()


def test_a_silent_c_intercept_times_out_without_fallback(lines: Lines) -> None:
    icpt = FakeIntercept()  # reads, never answers: what a C intercept does with our hello
    sel, chans, _ = make(icpt, connections=1)
    try:
        chans.start(time.monotonic())
        conn = chans.intercepts[0].conns[0]
        pump(sel, chans, icpt, lambda: conn.state == "authenticating" and len(icpt.conns) == 1)
        pump(sel, chans, icpt, lambda: bytes(icpt.received[0]) == wire.EXT_HELLO)
        assert not chans.announce(ROUTE, time.monotonic())  # not usable while authenticating
        deadline = conn.deadline
        assert deadline is not None and deadline - time.monotonic() <= AUTH_TIMEOUT_S
        chans.handle_timer(deadline)
        assert conn.state == "idle" and chans.counters["channel_auth_failures"] == 1
        assert any("did not answer the extended hello" in line for line in lines.lines)
        icpt.poll()
        assert bytes(icpt.received[0]) == wire.EXT_HELLO  # no compat record was ever sent
    finally:
        chans.close()
        icpt.close()
        sel.close()


def test_without_a_secret_the_compat_handshake_is_unchanged() -> None:
    icpt = FakeIntercept()
    sel, chans, _ = make(icpt, secret=None, connections=1)
    try:
        chans.start(time.monotonic())
        pump(sel, chans, icpt, lambda: chans.connected == 1 and len(icpt.received) == 1)
        pump(sel, chans, icpt, lambda: bytes(icpt.received[0]) == wire.HANDSHAKE)
        assert chans.counters["channel_auth_ok"] == 0
    finally:
        chans.close()
        icpt.close()
        sel.close()
