"""engine/dataplane/pump.pxi: a worker's wake-up in one compiled call against the Python steps
it replaces (engine/proc/worker.py ``_capture_wakeup``, the specification).

Two worlds, each a compiled table, a ring and a raw sender in a namespace of its own with only
``lo`` and 198.18.0.1/32 (the target: what is sent there is read back by a raw TCP socket),
get the same script on the same clock: client packets pushed into the ring (a ring that
overflows, so a loss mark; a packet that does not parse), wake-ups fired by the eventfd or by
the ring's deadline, and the target's answers to what it received fed back as response
records.  One -x entry leads to 198.18.9.9, which has no route: its packets are refused
(ENETUNREACH), the pump's hand-back to the sender.  Both worlds must put the same packets on
the wire, wake-up by wake-up, announce the same routes before them and end with the same
counters.
"""

from __future__ import annotations

import os
import select
import selectors
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from engine.codec import packet, wire
from engine.core.config import ReplayConfig, SessionConfig
from engine.core.rewrite import TransferEntry
from engine.errors import DecodeError
from engine.io import send
from engine.io.engines import build_table, compiled_table_class
from engine.io.ring import Ring
from engine.proc.worker import (
    PUMP_ENV,
    PUMP_WAIT_DUE,
    PUMP_WAIT_EVENTS,
    PUMP_WAIT_RING,
    RingSource,
    Worker,
    _SourceCallback,
)
from testbed import netns as tbm
from tests.unit.link import Client, Target
from tests.unit.test_io_worker import FakeChannels

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(compiled_table_class()[0] is None, reason="compiled engine not built"),
]

LOCAL = packet.ip_from_str("198.18.0.1")
NOROUTE = packet.ip_from_str("198.18.9.9")
ONLINE_IP = packet.ip_from_str("198.18.1.2")
CLIENT_IP = packet.ip_from_str("198.19.7.1")


@pytest.fixture
def ns():
    with tbm.scratch_netns(
        ["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", "198.18.0.1/32", "dev", "lo"]
    ) as name:
        yield name


class World:
    """A worker (compiled table, ring, raw sender, fake channels) and the target's socket."""

    def __init__(self, ns: str, pump: bool, port: int = 0) -> None:
        self.sender = tbm.in_netns(ns, lambda: send.RawSender(batch_path="fastio"))
        self.rx = tbm.raw_tcp_receiver(ns)
        session = SessionConfig(
            transfers=(
                TransferEntry(ONLINE_IP, 80, LOCAL, 8080),
                TransferEntry(ONLINE_IP, 81, NOROUTE, 8080),
            )
        )
        # ``port``: real intercept channels to a listener there (two connections), in ns.
        cfg = ReplayConfig(
            session=session,
            intercepts=(("198.18.0.3" if port else "198.18.0.1", port or 36524),),
            connections=2,
        )
        self.table = build_table("compiled", session)
        self.producer = Ring.create(capacity=4096)
        self.src = RingSource(Ring.attach(self.producer.spec()), None, batch_max=16)
        self.src.on_loss = self.table.note_capture_loss
        self.log: list[tuple[str, int]] = []
        self.worker = Worker(
            cfg,
            self.table,
            [self.src],
            self.sender,
            channels=None if port else (lambda sel, on_records: FakeChannels(self.log)),
            memory_rss=lambda: 0,
        )
        self.pump = self.worker._pump = self.worker._make_pump() if pump else None
        self.targets: dict[tuple[int, int], Target] = {}
        self.wire: list[bytes] = []
        self._got = 0

    def wakeup(self, now: float, fired: bool) -> None:
        self.log.append(("wakeup", 0))
        if self.pump is not None:
            self.worker._pump_wakeup(self.pump, now, fired)
        else:
            self.worker._capture_wakeup([self.src] if fired else [], now)
        for kind, port in self.received():
            self.log.append((kind, port))

    def received(self) -> list[tuple[str, int]]:
        """What reached the target since the last call (as many as were sent)."""
        want = self.sender.counters["send_packets"] - self._got
        out = []
        while len(out) < want:
            raw = self.rx.recv(65536)
            p = packet.parse_ip(raw)
            if p.dst != LOCAL:
                continue
            out.append(raw)
        self._got += len(out)
        self.wire += out
        return [("pkt", packet.parse_ip(raw).sport) for raw in out]

    def answer(self, now: float, new: list[bytes]) -> None:
        """The target's answers to the packets in ``new``, as the intercept's records, then
        the drain the loop makes after responses."""
        records = self.records_for(new)
        if records:
            self.table.receive_records(b"".join(records), now)
            self.worker._flush(now)
            for kind, port in self.received():
                self.log.append((kind, port))

    def records_for(self, new: list[bytes]) -> list[bytes]:
        """The target's answers to the packets in ``new``, as the intercept's records."""
        records = []
        for raw in new:
            p = packet.parse_ip(raw)
            key = (p.src, p.sport)
            target = self.targets.get(key)
            if target is None:
                target = self.targets[key] = Target(addr=(LOCAL, 8080), client=key)
            target.observe(p)
            if p.flags & packet.SYN:
                answers = [target.synack()]
            elif p.payload:
                answers = [target.ack(), target.send(300)]
            elif p.flags & packet.FIN:
                answers = [target.ack(), target.fin()]
            else:
                answers = []
            records += [wire.encode_response_record(packet.build(a)) for a in answers]
        return records

    def close(self) -> None:
        self.worker.close()
        self.producer.close()
        self.rx.close()


def _script() -> list[list[bytes]]:
    """Per step, the client packets the capture pushes into the ring."""
    clients = [
        Client(
            isn=1000 + 7919 * i,
            addr=(CLIENT_IP, 40000 + i),
            online=(ONLINE_IP, 81 if i % 5 == 4 else 80),
            ts=500 + i,
        )
        for i in range(20)
    ]
    get = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
    steps: list[list[bytes]] = [[] for _ in range(24)]
    steps[0] = [packet.build(c.syn()) for c in clients[:10]] + [b"\x45\x00\x00\x14"]
    steps[1] = [packet.build(c.ack()) for c in clients[:10]]
    steps[1] += [packet.build(c.data(get)) for c in clients[:10]]
    steps[2] = [packet.build(c.syn()) for c in clients[10:]]  # 10
    # More than the 4 KiB ring holds: the overflow is dropped and the next push marks a loss.
    steps[3] = [packet.build(c.ack(300)) for c in clients[:10]]
    steps[3] += [packet.build(c.data(get * 2, 300)) for c in clients[10:] for _ in range(6)]
    steps[4] = [packet.build(c.data(get, 300)) for c in clients[:10]]
    steps[8] = [packet.build(c.fin(600)) for c in clients[:10]]
    steps[9] = [packet.build(c.data(get)) for c in clients[10:]]
    return steps


def _drive(w: World, t0: float = 1000.0) -> Iterator[tuple[int, float, list[bytes]]]:
    """The script's steps 0.25 s apart: each step's packets into the ring, the worker's
    wake-up (some by the eventfd, the others by the ring's deadline alone); yields the step,
    its clock and what that wake-up sent."""
    for k, pushed in enumerate(_script()):
        now = t0 + 0.25 * k
        if pushed:
            w.producer.push_batch([(p, now) for p in pushed])
        before = len(w.wire)
        w.wakeup(now, fired=k % 3 != 2)
        yield k, now, w.wire[before:]


def _run(ns: str, pump: bool) -> World:
    w = World(ns, pump)
    if pump:
        assert w.pump is not None
    try:
        for _k, now, sent in _drive(w):
            w.answer(now + 0.01, sent)
        return w
    except BaseException:
        w.close()
        raise


def assert_same_outcome(cp: Any, py: Any) -> None:
    """The compiled run and the Python run sent the same packets in the same order, logged the
    same and counted the same (the table's, the sender's and the worker's counters)."""
    assert cp.wire == py.wire
    assert cp.log == py.log
    assert len(cp.wire) > 60
    for name in ("table", "sender", "worker"):
        a = getattr(cp, name).counters
        b = getattr(py, name).counters
        assert {k: v for k, v in a.items() if v} == {k: v for k, v in b.items() if v}


def test_the_pump_does_what_the_python_wakeup_does(ns: str) -> None:
    py = _run(ns, pump=False)
    try:
        cp = _run(ns, pump=True)
        try:
            assert_same_outcome(cp, py)
            c = cp.sender.counters
            assert c["send_error_ENETUNREACH"] > 0  # the pump handed refusals back
            assert cp.worker.counters["capture_parse_errors"] == 1
            assert cp.producer.dropped > 0 and cp.src.ring.loss_marks > 0
            assert cp.src.ring.loss_marks == py.src.ring.loss_marks
            t = cp.table.counters
            # Handshakes, released requests, retransmissions by timer, closes: all went through.
            assert t["ended_closed"] > 0 and t["rto"] > 0 and t["requests"] > 0
            assert cp.table.active == py.table.active
            assert len(cp.src.ring) == len(py.src.ring)
            assert cp.src._backlog == py.src._backlog
        finally:
            cp.close()
    finally:
        py.close()


def test_the_switch_and_the_parts_select_the_python_steps(ns: str, monkeypatch) -> None:
    w = World(ns, pump=True)
    try:
        assert w.pump is not None
        monkeypatch.setenv(PUMP_ENV, "0")
        assert w.worker._make_pump() is None
        monkeypatch.delenv(PUMP_ENV)
        w.src.on_loss = lambda now: None  # not the table's: the pump would skip it
        assert w.worker._make_pump() is None
    finally:
        w.close()


# The compiled wait (Pump.wait): the intercept connections read, drained and sent, the table's
# timers run, between the loop's Python deadlines.  Its specification is the loop's steps for
# a wake-up on the connections: the callbacks (channel.py ``_read``), the drain, the table's
# due timers and the drain again.


class Intercept:
    """A listener in ``ns`` standing in for the intercept: accepts a world's connections and
    writes frames of response records to them."""

    ADDR = "198.18.0.3"  # not the target's: the raw socket there sees none of this

    def __init__(self, ns: str) -> None:
        subprocess.run(
            ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.ADDR}/32", "dev", "lo"],
            check=True,
        )

        def make():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((self.ADDR, 0))
            s.listen(8)
            return s

        self.sock = tbm.in_netns(ns, make)
        self.sock.settimeout(5.0)
        self.port = self.sock.getsockname()[1]

    def accept(self, w: World, ns: str) -> list[socket.socket]:
        worker = w.worker
        worker.sel.register(w.src.fileno(), selectors.EVENT_READ, _SourceCallback(worker, w.src))
        tbm.in_netns(ns, lambda: worker.channels.start(0.0))
        conns = [self.sock.accept()[0] for _ in range(2)]
        w.worker._wait_for_intercept(0.0)
        assert w.worker.channels.connected == 2
        return conns

    def close(self) -> None:
        self.sock.close()


def _frames(records: list[bytes]) -> bytes:
    """The records in frames of up to 7 (the caller cuts the bytes across two reads: what a
    reader holds in between)."""
    out = b""
    for i in range(0, len(records), 7):
        part = records[i : i + 7]
        out += len(part).to_bytes(2, "big") + b"".join(part)
    return out


def _readable(w: World) -> None:
    socks = [c.sock for i in w.worker.channels.intercepts for c in i.conns if c.sock]
    select.select(socks, [], [], 2.0)


def _steps(w: World, events: list, at: float) -> None:
    """The loop's steps for a wake-up on the connections: the callbacks, the drain, the
    table's due timers, the drain."""
    worker = w.worker
    for key, mask in events:
        assert type(key.data) is not _SourceCallback  # the script reads its ring itself
        key.data(mask, at)
    worker._flush(at)
    table = worker.table
    timer = table.get_timer()
    if timer is not None and timer <= at:
        table.handle_timer(at)
    worker._flush(at)


def _respond(w: World, at: float, wait: bool) -> None:
    """The loop's wake-up on the connections at ``at``: by Pump.wait (and what it hands
    back to the loop), or by its steps."""
    worker = w.worker
    _readable(w)
    if wait:
        epfd = worker._wait_fd(w.pump)
        assert epfd >= 0
        events, drain_first = worker._wait(w.pump, epfd, at + 0.05, worker.sel.select, at)
        if events or drain_first:
            _steps(w, events, at)
    else:
        _steps(w, worker.sel.select(1.0), at)
    w.log += [(kind, port) for kind, port in w.received()]


def _run_wait(ns: str, icpt: Intercept, wait: bool) -> tuple[World, list[socket.socket]]:
    w = World(ns, pump=True, port=icpt.port)
    conns: list[socket.socket] = []
    try:
        conns = icpt.accept(w, ns)
        t0 = 1000.0
        for k, now, sent in _drive(w, t0):
            records = w.records_for(sent)
            if records:
                data = _frames(records)
                cut = len(data) // 3
                conns[k % 2].sendall(data[:cut])
                _respond(w, now + 0.01, wait)
                conns[k % 2].sendall(data[cut:])
                _respond(w, now + 0.02, wait)
        # A bad frame on one connection, the other closed by the intercept: both end.
        conns[0].sendall(b"\x00\x00")
        _respond(w, t0 + 10.0, wait)
        if wait:
            assert isinstance(w.pump.wait_error, DecodeError)
        conns[1].setblocking(False)
        try:
            while conns[1].recv(65536):  # what it was sent: the close is then a FIN
                pass
        except BlockingIOError:
            pass
        conns[1].close()
        _respond(w, t0 + 10.1, wait)
        if wait:
            assert w.pump.wait_fd >= 0 and w.pump.wait_errno == 0  # the end, read by the wait
        return w, conns
    except BaseException:
        w.close()
        for c in conns:
            c.close()
        raise


def test_the_wait_does_what_the_loop_does(ns: str) -> None:
    icpt = Intercept(ns)
    try:
        py, py_conns = _run_wait(ns, icpt, wait=False)
        try:
            cp, cp_conns = _run_wait(ns, icpt, wait=True)
            try:
                assert_same_outcome(cp, py)
                a, b = cp.worker.channels.counters, py.worker.channels.counters
                assert a == b
                assert a["responses_received"] > 30
                assert a["channel_frame_errors"] == 1 and a["channel_disconnects"] == 2
                assert cp.worker.channels.connected == py.worker.channels.connected == 0
                t = cp.table.counters
                assert t["ended_closed"] > 0 and t["rto"] > 0 and t["requests"] > 0
                assert cp.table.active == py.table.active
            finally:
                cp.close()
                for c in cp_conns:
                    c.close()
        finally:
            py.close()
            for c in py_conns:
                c.close()
    finally:
        icpt.close()


def test_the_wait_hands_back_what_is_not_a_connection_read(ns: str) -> None:
    """The ring's eventfd ends the wait (the loop's wake-up on its ring), any fd but a
    connection's read too, neither consumed; the deadline ends it too."""
    icpt = Intercept(ns)
    w = World(ns, pump=True, port=icpt.port)
    conns: list[socket.socket] = []
    a, b = socket.socketpair()
    try:
        conns = icpt.accept(w, ns)
        worker = w.worker
        epfd = worker._wait_fd(w.pump)
        assert epfd >= 0
        fds, readers = worker.channels.compiled_reads(worker._reader_type)
        assert len(fds) == 2
        deadline = time.monotonic() + 0.05
        assert w.pump.wait(epfd, deadline, fds, readers) == PUMP_WAIT_DUE
        assert time.monotonic() >= deadline
        far = time.monotonic() + 30.0
        w.producer.push_batch([(b"\x45\x00\x00\x14", 1.0)])
        assert w.pump.wait(epfd, far, fds, readers) == PUMP_WAIT_RING
        assert w.pump.waits == 1 and len(w.src.ring) > 0  # nothing of it taken
        events, drain_first = worker._wait(w.pump, epfd, far, worker.sel.select)
        assert [key.fd for key, _ in events] == [w.src.fileno()] and not drain_first
        w.src.receive_into(w.table, 1.0)  # the ring read: its eventfd cleared
        worker.sel.register(b, selectors.EVENT_READ, None)
        a.send(b"x")
        assert w.pump.wait(epfd, far, fds, readers) == PUMP_WAIT_EVENTS
        assert [key.fd for key, _ in worker.sel.select(0.0)] == [b.fileno()]
    finally:
        w.close()
        for c in (*conns, a, b):
            c.close()
        icpt.close()
