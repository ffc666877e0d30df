"""Issue 10 in the pure core and the tuple history block: SessionTable.live_routes and
set_route_down (re-announce after an intercept reconnect), TupleAllocator with a history,
and engine/io/tuple_history.py surviving a SIGKILLed writer."""

from __future__ import annotations

import os
import signal

import pytest

from engine.codec import packet
from engine.core.config import SessionConfig
from engine.core.rewrite import TransferEntry
from engine.core.session import RouteNeeded, TcpSession
from engine.io.tuple_history import TupleHistory
from tests.unit.engines import ENGINES, rewrite_module, table_class
from tests.unit.link import ONLINE, TARGET, Client, TableLink

XFER = (TransferEntry(ONLINE[0], ONLINE[1], TARGET[0], TARGET[1]),)
POOL = (packet.ip_from_str("198.19.1.10"),)
REQ = b"GET / HTTP/1.1\r\n\r\n"
CIP = packet.ip_from_str("198.19.1.10")
TIP, TPORT = TARGET
TW_S = 60.0


@pytest.fixture(autouse=True)
def strict(monkeypatch):
    monkeypatch.setattr(TcpSession, "strict", True)


def established(tl: TableLink, port: int) -> tuple[Client, tuple[int, int]]:
    c = Client(addr=(packet.ip_from_str("198.18.0.2"), port))
    (syn,) = tl.client(c.syn(), c.ack())
    fake = (syn.src, syn.sport)
    tl.respond(tl.target(fake).synack())
    return c, fake


# -- SessionTable -------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_live_routes_are_those_of_sessions_not_yet_ended(engine):
    tl = TableLink(table_class(engine)(SessionConfig(transfers=XFER, client_pool=POOL)))
    _, a = established(tl, 40001)
    cb, _b = established(tl, 40002)
    tl.client(cb.rst())  # b ends (lingers)
    assert tl.table.active == 2
    assert tl.table.live_routes() == [RouteNeeded(*a, *TARGET)]


@pytest.mark.parametrize("engine", ENGINES)
def test_route_down_suspends_the_limit_for_old_and_new_sessions_and_back_resumes_them(engine):
    tl = TableLink(table_class(engine)(SessionConfig(transfers=XFER, client_pool=POOL)))
    c1, a = established(tl, 40001)
    tl.client(c1.data(REQ))
    tl.table.set_route_down(True, tl.now)
    c2, b = established(tl, 40002)  # started during the outage (its SYN-ACK got through)
    tl.client(c2.data(REQ))
    tl.run(60.0)
    assert tl.table.counters["ended_retransmit_limit"] == 0
    assert tl.table.active == 2
    n = len(tl.log)
    tl.table.set_route_down(False, tl.now)
    out = tl.drain()
    assert sorted((p.sport, p.payload) for p in out) == sorted([(a[1], REQ), (b[1], REQ)])
    assert len(tl.log) == n + 2
    # Acked now: both go on; unanswered afterwards, the limit applies again.
    tl.respond(tl.target(a).ack())
    tl.run(120.0)
    k = tl.table.counters
    assert k["ended_retransmit_limit"] == 1  # b: never acked after the outage
    assert tl.table.live_routes() == [RouteNeeded(*a, *TARGET)]


@pytest.mark.parametrize("engine", ENGINES)
def test_route_down_twice_is_one_edge(engine):
    tl = TableLink(table_class(engine)(SessionConfig(transfers=XFER, client_pool=POOL)))
    established(tl, 40001)
    tl.table.set_route_down(False, 0.0)
    assert tl.drain() == []  # not down: nothing to resume


# -- TupleAllocator with a history ---------------------------------------------------------------


class FakeHistory:
    def __init__(self, busy=()):
        self.inherited_until: float | None = None
        self.busy_keys = set(busy)
        self.live: list = []
        self.released: list = []

    def record_live(self, key):
        self.live.append(key)

    def record_released(self, key, now, was_live, reusable=False):
        self.released.append((key, now, was_live))

    def busy(self, key, since):
        return key in self.busy_keys


@pytest.mark.parametrize("engine", ENGINES)
def test_allocator_tells_its_history_every_claim_and_release(engine):
    rw = rewrite_module(engine)
    h = FakeHistory()
    alloc = rw.TupleAllocator(TW_S, history=h)
    assert alloc.allocate(CIP, 40000, TIP, TPORT, 1.0) == (CIP, 40000)
    alloc.release(CIP, 40000, TIP, TPORT, 2.0)
    alloc.release(CIP, 40002, TIP, TPORT, 3.0)  # never claimed (the target saw it anyway)
    key = (CIP, 40000, TIP, TPORT)
    assert h.live == [key]
    assert h.released == [(key, 2.0, True), ((CIP, 40002, TIP, TPORT), 3.0, False)]


@pytest.mark.parametrize("engine", ENGINES)
def test_allocator_skips_inherited_tuples_until_the_horizon(engine):
    rw = rewrite_module(engine)
    h = FakeHistory(busy={(CIP, 40000, TIP, TPORT), (CIP, 40001, TIP, TPORT)})
    h.inherited_until = 100.0
    alloc = rw.TupleAllocator(TW_S, history=h)
    got = alloc.allocate(CIP, 40000, TIP, TPORT, 10.0)
    assert got is not None and got[1] not in (40000, 40001)
    assert alloc.stats["inherited_hits"] >= 1
    assert alloc.allocate(CIP, 40001, TIP, TPORT, 100.0) == (CIP, 40001)  # horizon over


@pytest.mark.parametrize("engine", ENGINES)
def test_allocator_with_every_port_inherited_reports_exhaustion_instead_of_spinning(engine):
    rw = rewrite_module(engine)

    class AllBusy(FakeHistory):
        def busy(self, key, since):
            return True

    h = AllBusy()
    h.inherited_until = 100.0
    alloc = rw.TupleAllocator(TW_S, worker_index=0, worker_count=64, history=h)
    assert alloc.allocate(CIP, 40000, TIP, TPORT, 1.0) is None
    assert alloc.stats["exhausted"] == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_table_counts_tuples_the_history_made_it_avoid(engine):
    h = FakeHistory(busy={(CIP, 40001, TIP, TPORT)})
    h.inherited_until = 100.0
    tl = TableLink(table_class(engine)(SessionConfig(transfers=XFER, client_pool=POOL), h))
    _, fake = established(tl, 40001)
    assert fake[1] != 40001
    assert tl.table.counters["tuple_history_avoided"] == 1


# -- the shared-memory block -----------------------------------------------------------------------


@pytest.fixture
def history():
    h = TupleHistory.create(slots=1 << 12)
    yield h
    h.close()


def keys(n: int, base: int = 40000) -> list[tuple[int, int, int, int]]:
    return [(CIP, base + i, TIP, TPORT) for i in range(n)]


def test_first_incarnation_inherits_nothing(history):
    assert history.adopt(5.0, TW_S) == 0
    assert history.inherited_until is None and history.incarnations == 1


def test_history_survives_a_sigkilled_worker(history):
    """A forked child (a worker) claims and releases tuples, then dies by SIGKILL; the next
    incarnation (here the parent) keeps both out of use for the TIME_WAIT horizon."""
    now = 1000.0
    live, released = keys(20), keys(20, base=50000)
    old = (CIP, 60000, TIP, TPORT)
    pid = os.fork()
    if pid == 0:  # the first worker
        history.adopt(now, TW_S)
        history.record_live(old)
        history.record_released(old, now - 2 * TW_S, True)
        for k in live + released:
            history.record_live(k)
        for k in released:
            history.record_released(k, now + 1.0, True)
        os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    restart = now + 2.0
    carried = history.adopt(restart, TW_S)
    assert carried >= 30  # 40 tuples; a few may share a slot
    assert history.inherited_until == restart + TW_S
    since = restart - TW_S
    assert all(history.busy(k, since) for k in live + released)
    # Live at the death: kept for a whole horizon from the restart.
    assert all(history.busy(k, restart + TW_S - 1.0 - TW_S) for k in live)
    assert not history.busy(old, since)  # released long before: free
    # The counts start over: the new worker's own releases work as usual.
    k = (CIP, 61000, TIP, TPORT)
    history.record_live(k)
    history.record_released(k, restart + 1.0, True)
    assert history.busy(k, restart) and not history.busy(k, restart + 2.0)


def test_free_tuples_are_mostly_not_busy(history):
    history.adopt(0.0, TW_S)
    for k in keys(200):
        history.record_live(k)
    history.adopt(10.0, TW_S)
    others = keys(1000, base=20000)
    false_busy = sum(history.busy(k, 10.0 - TW_S) for k in others)
    assert false_busy < 150  # 200 of 4096 slots used: about 5 % expected


def test_the_ports_of_one_target_touch_a_few_pages_of_the_block():
    # A worker cycles through its ports towards one target: side by side in each array, they
    # touch (ports * 20 bytes) / 4 KiB pages of the block, not nearly all of its 5 MiB.
    h = TupleHistory.create()
    try:
        for port in range(32768, 32768 + 20000):
            h.record_live((CIP, port, TIP, TPORT))
            h.record_released((CIP, port, TIP, TPORT), 1.0, True)
        block = bytes(h.block)
        pages = sum(1 for at in range(0, len(block), 4096) if any(block[at : at + 4096]))
        assert pages <= 20000 * 20 // 4096 + 4
        assert all(h.busy((CIP, port, TIP, TPORT), 0.5) for port in range(32768, 52768))
    finally:
        h.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_allocator_over_a_real_history_after_a_restart(engine, history):
    rw = rewrite_module(engine)
    history.adopt(0.0, TW_S)
    first = rw.TupleAllocator(TW_S, history=history)
    assert first.allocate(CIP, 40000, TIP, TPORT, 1.0) == (CIP, 40000)
    history.adopt(5.0, TW_S)  # the first worker died holding it
    second = rw.TupleAllocator(TW_S, history=history)
    got = second.allocate(CIP, 40000, TIP, TPORT, 5.5)
    assert got is not None and got != (CIP, 40000)
    assert second.stats["inherited_hits"] >= 1
    assert second.allocate(CIP, 40000, TIP, TPORT, 5.0 + TW_S + 1) == (CIP, 40000)


def test_slot_count_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        TupleHistory.create(slots=1000)
