"""The worker's compiled wait (engine/dataplane/pump.pxi ``Pump.wait``) against the loop's
select and callbacks (engine/io/channel.py ``_read``), over real intercept connections on
127.0.0.1 (no privileges: the responses belong to no session, so nothing is sent).

tests/netns/test_worker_pump.py holds the same comparison with sessions and the wire."""

from __future__ import annotations

import select
import selectors
import socket
import time
from collections import Counter

import pytest

from engine.codec import packet, wire
from engine.core.config import ReplayConfig, SessionConfig
from engine.io.engines import build_table, compiled_table_class
from engine.io.ring import Ring, record_layout
from engine.proc.worker import (
    PUMP_WAIT_DUE,
    PUMP_WAIT_EVENTS,
    PUMP_WAIT_RING,
    RingSource,
    Worker,
    _SourceCallback,
)

pytestmark = pytest.mark.skipif(
    compiled_table_class()[0] is None, reason="compiled engine not built"
)


class _Sender:
    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()


class World:
    """A worker with a compiled table, a ring, a pump and two intercept connections."""

    def __init__(self) -> None:
        from engine.dataplane.engine import Pump

        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.listener.settimeout(5.0)
        cfg = ReplayConfig(
            session=SessionConfig(),
            intercepts=(("127.0.0.1", self.listener.getsockname()[1]),),
            connections=2,
        )
        self.table = build_table("compiled", cfg.session)
        self.producer = Ring.create(capacity=4096)
        self.src = RingSource(Ring.attach(self.producer.spec()), None)
        self.src.on_loss = self.table.note_capture_loss
        self.worker = Worker(cfg, self.table, [self.src], _Sender(), memory_rss=lambda: 0)
        worker = self.worker
        worker.sel.register(
            self.src.fileno(), selectors.EVENT_READ, _SourceCallback(worker, self.src)
        )
        self.unused = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the pump's send fd
        worker._pump = Pump(
            self.table, self.src.ring, record_layout(), self.unused.fileno(), Counter(), 64
        )
        worker.channels.start(time.monotonic())
        self.conns = [self.listener.accept()[0] for _ in range(2)]
        worker._wait_for_intercept(time.monotonic())
        assert worker.channels.connected == 2
        self.epfd = worker._wait_fd(worker._pump)

    def readable(self) -> None:
        socks = [c.sock for i in self.worker.channels.intercepts for c in i.conns if c.sock]
        if socks:
            select.select(socks, [], [], 2.0)

    def close(self) -> None:
        self.worker.close()
        self.producer.close()
        self.unused.close()
        for c in self.conns:
            c.close()
        self.listener.close()


def _record(port: int) -> bytes:
    p = packet.TcpPacket(
        src=packet.ip_from_str("198.18.0.1"),
        dst=packet.ip_from_str("198.19.0.9"),
        sport=8080,
        dport=port,
        seq=1,
        ack=1,
        flags=packet.ACK,
        window=100,
    )
    return wire.encode_response_record(packet.build(p))


def _writes() -> list[tuple[int, bytes]]:
    """(connection, bytes): frames of 1-5 records cut anywhere, on both connections."""
    out = []
    for k in range(12):
        data = b""
        for n in range(1, 6):
            data += n.to_bytes(2, "big") + b"".join(_record(4000 + k * 10 + i) for i in range(n))
        cut = (k * 37) % len(data)
        out += [(k % 2, data[:cut]), (k % 2, data[cut:])]
    return out


def _run(wait: bool) -> World:
    w = World()
    try:
        worker = w.worker
        at = 1000.0
        assert w.epfd >= 0
        for conn, data in _writes():
            if not data:
                continue
            w.conns[conn].sendall(data)
            w.readable()
            at += 0.01
            if wait:
                events, drain_first = worker._wait(
                    worker._pump, w.epfd, at + 0.02, worker.sel.select, at
                )
                assert events == [] and not drain_first
            else:
                for key, mask in worker.sel.select(0.0):
                    key.data(mask, at)
        # A bad frame on one connection, the other closed by the intercept (what it was
        # sent read first: the close is then a FIN, not a reset).
        w.conns[1].setblocking(False)
        try:
            while w.conns[1].recv(65536):
                pass
        except BlockingIOError:
            pass
        w.conns[0].sendall(b"\x00\x00")
        w.conns[1].close()
        ended: list[object] = []
        for _ in range(2):
            w.readable()
            if wait:
                events, drain_first = worker._wait(
                    worker._pump, w.epfd, at + 0.02, worker.sel.select, at
                )
                assert events == [] and drain_first
                ended.append(worker._pump.wait_error)
            else:
                for key, mask in worker.sel.select(0.0):
                    key.data(mask, at)
        if wait:  # one wait found the bad frame, the other the end
            assert sorted(type(e).__name__ for e in ended) == ["DecodeError", "NoneType"]
        return w
    except BaseException:
        w.close()
        raise


def test_the_wait_reads_the_connections_as_the_loop_does() -> None:
    py = _run(wait=False)
    try:
        cp = _run(wait=True)
        try:
            a, b = cp.worker.channels.counters, py.worker.channels.counters
            assert a == b
            assert a["responses_received"] == 12 * 15
            assert a["channel_frame_errors"] == 1 and a["channel_disconnects"] == 2
            assert cp.worker.channels.connected == py.worker.channels.connected == 0
            ta = {k: v for k, v in cp.table.counters.items() if v}
            tb = {k: v for k, v in py.table.counters.items() if v}
            assert ta == tb and ta
            assert cp.worker._pump.wait_fd >= 0
        finally:
            cp.close()
    finally:
        py.close()


def test_the_wait_ends_on_its_deadline_the_ring_and_other_fds() -> None:
    w = World()
    a, b = socket.socketpair()
    try:
        pump, worker = w.worker._pump, w.worker
        fds, readers = worker.channels.compiled_reads(worker._reader_type)
        assert len(fds) == 2
        deadline = time.monotonic() + 0.03
        assert pump.wait(w.epfd, deadline, fds, readers) == PUMP_WAIT_DUE
        assert time.monotonic() >= deadline
        far = time.monotonic() + 30.0
        w.conns[0].sendall((1).to_bytes(2, "big") + _record(5000))
        w.producer.push_batch([(b"\x45\x00\x00\x14", 1.0)])
        w.readable()
        assert pump.wait(w.epfd, far, fds, readers) == PUMP_WAIT_RING
        assert pump.responses == 1 and len(w.src.ring) > 0  # the ring's batch not taken
        w.src.receive_into(w.table, 1.0)
        worker.sel.register(b, selectors.EVENT_READ, None)
        a.send(b"x")
        assert pump.wait(w.epfd, far, fds, readers) == PUMP_WAIT_EVENTS
        assert [key.fd for key, _ in worker.sel.select(0.0)] == [b.fileno()]
    finally:
        w.close()
        a.close()
        b.close()


def _quickack(sock: socket.socket) -> int:
    """1: the kernel ACKs at once (quick-ACK mode); 0: it delays its ACKs."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK)


@pytest.mark.parametrize("wait", [False, True], ids=["loop", "wait"])
def test_a_read_puts_the_connection_back_in_delayed_ack_mode(wait: bool) -> None:
    """channel.py "Acknowledgements": after every read that got bytes, TCP_QUICKACK is 0, so
    the kernel does not ACK each small frame as it is read (the loop's ``_read`` and the
    compiled wait alike)."""
    w = World()
    try:
        worker = w.worker
        socks = [c.sock for i in worker.channels.intercepts for c in i.conns if c.sock]
        assert len(socks) == 2
        # A fresh connection starts in quick-ACK mode: the test can see the change.
        assert [_quickack(s) for s in socks] == [1, 1]
        at = 1000.0
        for k, conn in enumerate(w.conns):
            conn.sendall((1).to_bytes(2, "big") + _record(6000 + k))
        w.readable()
        if wait:
            events, _ = worker._wait(worker._pump, w.epfd, at + 0.02, worker.sel.select, at)
            assert events == []
        else:
            for key, mask in worker.sel.select(0.0):
                key.data(mask, at)
        assert worker.channels.counters["responses_received"] >= 1
        read = [s for s in socks if _quickack(s) == 0]
        assert read, "no connection left in delayed-ACK mode after its read"
        assert worker.channels.counters["responses_received"] == len(read)
    finally:
        w.close()
