"""The compiled NFQUEUE response path (engine/dataplane/responses, intercept/fastroute.py)
against the Python one (NfqueueSource.receive_messages -> InterceptServer.receive_ip_packets ->
Router): random netlink datagrams and random route adds and channel closes between batches give
the same verdicts, the same bytes on every channel, the same counters and router state."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from engine.codec import packet, wire
from engine.codec.packet import TcpPacket, ip_from_str
from intercept.fastroute import CompiledRouter, compiled_available
from intercept.router import Router
from intercept.server import InterceptServer
from intercept.sources import nfqueue as nq
from tests.unit.test_nfqueue_netlink import _attr, _FakeSock, _packet_msg

ok, why = compiled_available()
pytestmark = pytest.mark.skipif(not ok, reason=why)

TARGETS = [ip_from_str("198.18.2.3"), ip_from_str("198.18.2.4")]
CLIENTS = [ip_from_str("198.19.1.5"), ip_from_str("198.19.7.1")]
PORTS = [40000, 40001, 40002]
DOCKER_FROM = ip_from_str("198.19.9.9")  # -D DOCKER_FROM-CLIENTS[0]
TPORT = 8080
CHANNELS = 3


def response(dst: int, dport: int, src: int, flags: int, seq: int, opts: int) -> bytes:
    return packet.build(
        TcpPacket(src=src, dst=dst, sport=TPORT, dport=dport, seq=seq, ack=1, flags=flags,
                  options=b"\x01" * (4 * opts), payload=b"r" * (seq % 5))
    )  # fmt: skip


@st.composite
def payloads(draw: st.DrawFn) -> bytes | None:
    kind = draw(st.integers(0, 12))
    if kind == 0:
        return None  # a packet message without NFQA_PAYLOAD
    if kind == 1:
        return draw(st.binary(max_size=80))  # garbage
    pkt = response(
        draw(st.sampled_from([*CLIENTS, DOCKER_FROM])),
        draw(st.sampled_from(PORTS)),
        draw(st.sampled_from(TARGETS)),
        draw(st.sampled_from([0x10, 0x18, 0x02 | 0x10, 0x04, 0x01 | 0x10, 0x02])),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 10)),
    )
    if kind == 2:  # cut by the copy range / broken header fields
        pkt = pkt[: draw(st.integers(0, len(pkt)))]
    elif kind == 3:
        pos = draw(st.integers(0, min(len(pkt) - 1, 40)))
        pkt = pkt[:pos] + bytes([draw(st.integers(0, 255))]) + pkt[pos + 1 :]
    return pkt[: nq.COPY_RANGE_BYTES]


@st.composite
def datagrams(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 16))):
        kind = draw(st.integers(0, 12))
        if kind == 0:  # NLMSG_ERROR
            out += struct.pack("=IHHII", 36, 2, 0, 0, 0) + bytes(20)
        elif kind == 1:  # a packet message with an extra attribute and no packet header
            body = struct.pack("!BBH", 2, 0, 7) + _attr(3, b"\0\0\0\5")
            out += struct.pack("=IHHII", 16 + len(body), 0x300, 0, 0, 0) + body
        else:
            pid = draw(st.integers(0, 2**32 - 1))
            extra = _attr(3, b"\0\0\0\5") if kind == 2 else b""
            out += _packet_msg(pid, draw(payloads()), extra)
    if out and draw(st.booleans()):
        out = out[: draw(st.integers(0, len(out)))]  # a truncated tail
    return out


adds = st.tuples(
    st.just("add"),
    st.integers(0, CHANNELS - 1),
    st.sampled_from(CLIENTS),
    st.sampled_from(PORTS),
    st.sampled_from(TARGETS),
)
steps = st.lists(
    st.one_of(
        adds,
        adds,  # twice as likely as a close or a batch: more records get routed
        st.tuples(st.just("close"), st.integers(0, CHANNELS - 1)),
        st.tuples(st.just("batch"), st.lists(datagrams(), max_size=6)),
    ),
    max_size=20,
)


class Side:
    def __init__(
        self,
        compiled: bool,
        combine: int,
        out_max: int,
        limit: int | None,
        dnat: bool,
        pass_ips: tuple[int, ...] = (),
        docker: bool = False,
    ) -> None:
        cls = CompiledRouter if compiled else Router
        docker_map = (DOCKER_FROM, CLIENTS[0]) if docker else None
        self.server = InterceptServer(
            cls(max_routes_per_conn=limit, dnat=dnat), combine=combine,
            out_buffer_max_bytes=out_max, docker_map=docker_map,
        )  # fmt: skip
        self.peers = []
        self.channels = []
        self.got = [b""] * CHANNELS
        for i in range(CHANNELS):
            ours, peer = socket.socketpair()
            peer.setblocking(False)
            self.channels.append(self.server.attach_channel(ours, f"peer{i}"))
            self.peers.append(peer)
        src = nq.NfqueueSource.__new__(nq.NfqueueSource)
        src.counters = self.server.counters
        src.queue_num = 3
        src.pass_ips = frozenset(ip.to_bytes(4, "big") for ip in pass_ips)
        src._sock = _FakeSock()
        src.receive = self.server.receive_ip_packets
        src.compiled = None
        if compiled:
            # what intercept/cli.py and NfqueueSource.__init__ do for the compiled path
            router = self.server.router
            assert isinstance(router, CompiledRouter)
            src.compiled = nq.CompiledPath(router.table, self.server.receive_response_batch)
            if pass_ips:
                router.table.set_pass(pass_ips)
            if docker_map:
                router.table.set_docker(*docker_map)
        self.source = src

    def step(self, step: tuple, now: float) -> None:
        server = self.server
        if step[0] == "add":
            _, i, cip, cport, tip = step
            ch = self.channels[i]
            if not ch.closed:
                rec = wire.ClientRecord(cip, cport, wire.TYPE_CLIENT_ADD, tip, TPORT)
                server._receive_client_records(ch, [rec], now)
        elif step[0] == "close":
            server._close_channel(self.channels[step[1]], "test")
        elif self.source.compiled is not None:
            self.source.receive_messages_compiled(step[1], now)
        else:
            self.source.receive_messages(step[1], now)
        server._flush()
        for i, peer in enumerate(self.peers):
            try:
                self.got[i] += peer.recv(1 << 20)
            except BlockingIOError:
                pass

    def state(self) -> tuple:
        r = self.server.router
        return (
            dict(self.server.counters),
            dict(r.stats),
            len(r),
            r.delayed_records,
            [r.routes_of(ch) for ch in self.channels],
            [(bytes(ch.outbuf), bytes(ch.pending)) for ch in self.channels],
            self.got,
            self.source._sock.sent,
        )

    def close(self) -> None:
        self.server.close()
        for p in self.peers:
            p.close()


@settings(max_examples=400, deadline=None)
@given(
    st.tuples(
        st.lists(adds, min_size=4, max_size=12),
        steps,
        st.tuples(st.just("batch"), st.lists(datagrams(), min_size=1, max_size=6)),
    ).map(lambda t: [*t[0], *t[1], t[2]]),
    st.sampled_from([1, 3, 16]),
    st.sampled_from([200, 300, 700, 1 << 20]),
    st.sampled_from([None, 1, 2, 100]),
    st.booleans(),
    st.sampled_from([(), (CLIENTS[1],), (ip_from_str("198.18.0.1"), CLIENTS[1], DOCKER_FROM)]),
    st.booleans(),
)
def test_compiled_path_matches_python_path(
    steps, combine, out_max, limit, dnat, pass_ips, docker
) -> None:
    py = Side(False, combine, out_max, limit, dnat, pass_ips, docker)
    cc = Side(True, combine, out_max, limit, dnat, pass_ips, docker)
    try:
        for t, step in enumerate(steps):
            py.step(step, float(t))
            cc.step(step, float(t))
            assert cc.state() == py.state()
        c = py.server.counters
        for name in (
            "responses_dropped_slow",
            "responses_forwarded",
            "responses_delayed",
            "responses_delayed_flushed",
            "packets_invalid",
            "responses_unrouted",
            "pass_accepted",
            "docker_rewritten",
        ):
            if c[name]:
                event(name)
        if py.server.router.stats["route_evicted"]:
            event("route_evicted")
    finally:
        py.close()
        cc.close()


def _flood(side: Side, count: int, now: float) -> None:
    msgs = [
        _packet_msg(k, response(CLIENTS[0], PORTS[k % 2], TARGETS[0], 0x18, k, 0))
        for k in range(count)
    ]
    if side.source.compiled is not None:
        side.source.receive_messages_compiled(msgs, now)
    else:
        side.source.receive_messages(msgs, now)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("combine", [1, 5, 16])
def test_slow_drop_boundary(compiled: bool, combine: int) -> None:
    """A channel whose output buffer is near its bound takes records up to the byte where
    the bound would be crossed, counting frames as they are made, and drops the rest."""
    frame = 2 + combine * 64
    out_max = 3 * frame + 64 * (combine // 2) + 10  # three frames and part of a fourth
    side = Side(compiled, combine, out_max, None, False)
    try:
        ch = side.channels[0]
        for port in PORTS[:2]:
            side.server.router.add_route(CLIENTS[0], port, TARGETS[0], TPORT, ch, 0.0)
        _flood(side, 10 * combine, 1.0)
        c = side.server.counters
        kept = 3 * combine + (combine // 2 if combine > 1 else 0)
        # the fourth frame's records fit while outbuf + pending + 64 <= out_max
        assert c["responses_forwarded"] == kept
        assert c["responses_dropped_slow"] == 10 * combine - kept
        assert c["frames_sent"] == 3 and len(ch.pending) == 64 * (kept - 3 * combine)
        assert len(ch.outbuf) == 3 * frame
    finally:
        side.close()


def test_lru_touch_by_routed_batch_and_eviction() -> None:
    side = Side(True, 16, 1 << 20, 2, False)
    try:
        ch = side.channels[0]
        r = side.server.router
        keys = [(CLIENTS[0], port, TARGETS[0], TPORT) for port in PORTS]
        r.add_route(*keys[0], ch, 0.0)
        r.add_route(*keys[1], ch, 0.0)
        _flood(side, 1, 1.0)  # a response to keys[0]: most recent now
        assert r.routes_of(ch) == [keys[1], keys[0]]
        r.add_route(*keys[2], ch, 2.0)
        assert r.routes_of(ch) == [keys[0], keys[2]] and r.stats["route_evicted"] == 1
        assert len(r) == 2 and r.table.evicted == 1
        side.server._close_channel(ch, "test")
        assert len(r) == 0 and r.routes_of(ch) == []
    finally:
        side.close()


# --- --engine -----------------------------------------------------------------------------------


def _exit_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    from intercept.cli import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_engine_compiled_refused_in_pcap_mode(capsys) -> None:
    err = _exit_line(capsys, ["-F", "tcp", "--engine", "compiled"])
    assert (
        err
        == "intercept-mp: --engine: compiled is the NFQUEUE response path, not for the pcap mode\n"
    )


def test_engine_compiled_refused_when_not_built(capsys, monkeypatch) -> None:
    import intercept.fastroute as fr

    monkeypatch.setattr(fr, "compiled_available", lambda: (False, "not built (test)"))
    err = _exit_line(capsys, ["--queue-num", "1", "--engine", "compiled"])
    assert "--engine: the compiled response path is not available: not built (test)" in err


@pytest.fixture
def keep_signals():
    """_Lifecycle installs its SIGTERM/SIGINT handlers: put the test runner's back."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize(
    ("argv", "engine", "router"),
    [
        (["--queue-num", "1"], "compiled", CompiledRouter),
        (["--queue-num", "1", "--engine", "compiled"], "compiled", CompiledRouter),
        (["--queue-num", "1", "--engine", "python"], "python", Router),
        (
            ["--queue-num", "1", "-x", "198.18.0.9", "-D", "198.19.0.1-198.19.0.2"],
            "compiled",
            CompiledRouter,
        ),
        (["-F", "tcp"], "python", Router),
    ],
)
def test_engine_choice_builds_its_router(keep_signals, argv, engine, router) -> None:
    import logging

    from intercept.cli import _Lifecycle, parse_args

    life = _Lifecycle(parse_args(argv), logging.getLogger("test.intercept"))
    try:
        assert life.engine == engine and type(life.server.router) is router
    finally:
        life.server.close()


def test_engine_auto_falls_back_with_a_notice(keep_signals, monkeypatch, caplog) -> None:
    import logging

    import intercept.fastroute as fr
    from intercept.cli import _Lifecycle, parse_args

    monkeypatch.setattr(fr, "compiled_available", lambda: (False, "not built (test)"))
    with caplog.at_level(logging.INFO, logger="test.intercept"):
        life = _Lifecycle(parse_args(["--queue-num", "1"]), logging.getLogger("test.intercept"))
    try:
        assert life.engine == "python" and type(life.server.router) is Router
        assert "python response path runs: not built (test)" in caplog.text
    finally:
        life.server.close()


# --- the read: recvmmsg on a datagram socket ------------------------------------------------


class _DgramQueue:
    """A unix datagram socketpair standing in for the netlink socket: the test writes
    datagrams into one end, the source reads the other; verdicts are recorded."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.reader.setblocking(False)
        self.sent: list[bytes] = []

    def fileno(self) -> int:
        return self.reader.fileno()

    def send(self, data: bytes) -> int:
        self.sent.append(bytes(data))
        return len(data)

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def test_recv_reads_up_to_its_batch_and_matches_the_list_entry() -> None:
    from engine.dataplane.responses import ResponseTable

    q = _DgramQueue()
    grams = [
        _packet_msg(k, response(CLIENTS[0], PORTS[0], TARGETS[0], 0x18, k, 0))
        + _packet_msg(100 + k, None)
        for k in range(5)
    ]
    try:
        table = ResponseTable(recv_max=3)
        table.add(CLIENTS[0], PORTS[0], TARGETS[0], TPORT, 1)
        ref = ResponseTable()
        ref.add(CLIENTS[0], PORTS[0], TARGETS[0], TPORT, 1)
        assert table.recv(q.fileno()) == 0  # nothing waiting: EAGAIN is no error
        for g in grams:
            q.writer.send(g)
        seen = []
        for want in (3, 2, 0):
            assert table.recv(q.fileno()) == want
            seen.append((table.entries_seen, table.last_id, table.packets, table.take_slots()))
        ref.receive_datagrams(grams[:3])
        assert seen[0] == (6, 102, 3, ref.take_slots()) and ref.routed == 3
        ref.receive_datagrams(grams[3:])
        assert seen[1] == (4, 104, 2, ref.take_slots())
        assert seen[2] == (0, -1, 0, [])
    finally:
        q.close()
    with pytest.raises(OSError):
        table.recv(q.fileno())  # closed: EBADF


def test_source_reads_through_the_compiled_path() -> None:
    side = Side(True, 16, 1 << 20, None, False)
    q = _DgramQueue()
    try:
        src = side.source
        src._sock = q
        src._backlog = False
        ch = side.channels[1]
        side.server.router.add_route(CLIENTS[0], PORTS[0], TARGETS[0], TPORT, ch, 0.0)
        for k in range(nq.BATCH_MAX_PACKETS + 1):
            pkt = response(CLIENTS[0], PORTS[0], TARGETS[0], 0x18, k, 0)
            q.writer.send(_packet_msg(k, pkt))
        src.on_readable(1.0)
        assert src.has_backlog  # a full batch: more may wait
        src.on_readable(1.0)
        assert not src.has_backlog
        assert [v[-4:] for v in q.sent] == [(255).to_bytes(4, "big"), (256).to_bytes(4, "big")]
        assert side.server.counters["responses_forwarded"] == nq.BATCH_MAX_PACKETS + 1
        q.reader.close()
        src.on_readable(1.0)  # recvmmsg fails (EBADF): logged, not raised
        assert not src.has_backlog
    finally:
        q.writer.close()
        side.close()
