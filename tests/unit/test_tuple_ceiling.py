"""Issue 15: no tuple ceiling for sustained short connections from few client addresses.

TupleAllocator spills a client's connections over the -c pool when its sticky address has no
free tuple, and (one address, or no -c) reuses a tuple still in the target's TIME_WAIT when
the target's kernel accepts the new SYN there (RFC 6191; Linux tcp_timewait_state_process).
Every reuse is checked against a model of that kernel rule, fed with what the old connection
left behind (its end seq, its last TSval) and what the new SYN carries.
"""

from __future__ import annotations

import random

import pytest

from engine.codec import packet
from engine.codec.packet import SYN
from engine.codec.tcpseq import after, ts_clock
from engine.core.config import SessionConfig
from engine.core.rewrite import (
    SynInfo,
    TransferEntry,
    TupleAllocator,
    choose_client_ip,
    parse_client_pool,
    spill_order,
)
from engine.core.session import TcpSession
from engine.io.tuple_history import TupleHistory
from tests.unit.engines import ENGINES, rewrite_module, table_class
from tests.unit.link import ONLINE, TARGET, Client, TableLink

TIP, TPORT = TARGET
TW_S = 60.0
CLIENT = packet.ip_from_str("198.18.0.2")  # the one load-generator address
POOL254 = parse_client_pool("198.19.1.x")
ONE = (packet.ip_from_str("198.19.1.7"),)
CONNS = 250_000
WINDOW_S = 60.0
LIVE_S = 0.5
"""How long each connection holds its tuple before its release (its life plus linger)."""
M32 = 0xFFFFFFFF


@pytest.fixture(autouse=True)
def strict(monkeypatch):
    monkeypatch.setattr(TcpSession, "strict", True)


class TimeWaitModel:
    """The target's TIME_WAIT table and Linux's test for a SYN on one of its tuples."""

    def __init__(self) -> None:
        self.tw: dict[tuple, tuple[float, int, int | None]] = {}
        self.reopened = 0

    def close(self, key: tuple, now: float, rcv_nxt: int, ts_recent: int | None) -> None:
        self.tw[key] = (now, rcv_nxt, ts_recent)

    def accepts(self, key: tuple, now: float, seq: int, tsval: int | None) -> bool:
        entry = self.tw.get(key)
        if entry is None or entry[0] + TW_S <= now:
            return True  # no TIME_WAIT (any more): a plain new connection
        _, rcv_nxt, ts_recent = entry
        self.reopened += 1
        if ts_recent is not None and tsval is not None:
            if after(ts_recent, tsval):
                return False  # PAWS rejects it
            if after(tsval, ts_recent):
                return True
        return after(seq, rcv_nxt)


def drive_allocator(alloc: TupleAllocator, syn_ts: bool, seed: int = 15) -> TimeWaitModel:
    """CONNS connections from CLIENT within WINDOW_S of fake time, each released LIVE_S after
    its SYN, like the table does; every tuple handed out must be one the target takes."""
    rng = random.Random(seed)
    model = TimeWaitModel()
    live: dict[tuple, None] = {}
    pending: list[tuple[float, tuple, int, int | None]] = []  # release queue, in time order
    head = 0
    sticky = choose_client_ip(CLIENT, alloc.pool) if alloc.pool else CLIENT
    for i in range(CONNS):
        now = i * WINDOW_S / CONNS
        while head < len(pending) and pending[head][0] <= now:
            at, key, end_seq, ts_last = pending[head]
            head += 1
            alloc.release(*key, at, end_seq, ts_last)
            model.close(key, at, end_seq, ts_last)
            del live[key]
        isn = rng.getrandbits(32)
        got = alloc.allocate(sticky, 1024 + i % 64000, TIP, TPORT, now, syn=SynInfo(isn, syn_ts))
        assert got is not None, f"connection {i} refused at {now:.3f} s"
        key = (*got, TIP, TPORT)
        assert key not in live
        tsval = ts_clock(now) if syn_ts else None
        assert model.accepts(key, now, isn, tsval), f"connection {i}: the target refuses it"
        live[key] = None
        # The connection sends a request and its FIN; its last TSval is read at its end.
        end_seq = (isn + 1 + rng.randrange(40, 400) + 1) & M32
        end = now + LIVE_S
        pending.append((end, key, end_seq, ts_clock(end - 0.01) if syn_ts else None))
    assert alloc.stats["exhausted"] == 0
    return model


@pytest.mark.parametrize("engine", ENGINES)
def test_pool_of_254_gives_one_client_250k_tuples_in_60_s_by_spilling(engine):
    rw = rewrite_module(engine)
    alloc = rw.TupleAllocator(TW_S, pool=POOL254)
    model = drive_allocator(alloc, syn_ts=True)
    stats = alloc.stats
    assert stats["allocated"] == CONNS
    assert stats["reused"] == 0 and model.reopened == 0  # no TIME_WAIT tuple was needed
    # The sticky address gives its 64,512 ports, the rest spills onto other addresses.
    assert stats["spilled"] >= CONNS - 64_512
    assert stats["spilled"] <= CONNS - 60_000


@pytest.mark.parametrize("engine", ENGINES)
def test_strict_pool_of_254_is_the_same_without_reuse(engine):
    rw = rewrite_module(engine)
    alloc = rw.TupleAllocator(TW_S, pool=POOL254, strict=True)
    drive_allocator(alloc, syn_ts=True)
    assert alloc.stats["reused"] == 0


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("pool", [ONE, ()], ids=["one-address", "no-c"])
def test_one_address_reuses_time_wait_tuples_by_timestamp(engine, pool):
    rw = rewrite_module(engine)
    alloc = rw.TupleAllocator(TW_S, pool=pool)
    model = drive_allocator(alloc, syn_ts=True)
    stats = alloc.stats
    assert stats["allocated"] == CONNS and stats["spilled"] == 0
    assert stats["reused"] >= CONNS - 64_512
    assert model.reopened == stats["reused"]


@pytest.mark.parametrize("engine", ENGINES)
def test_one_address_without_timestamps_reuses_by_sequence_number(engine):
    """A SYN without TS option (or a target with tcp_timestamps=0): only tuples whose old
    connection ended before the new ISN are taken."""
    rw = rewrite_module(engine)
    alloc = rw.TupleAllocator(TW_S, pool=ONE)
    model = drive_allocator(alloc, syn_ts=False)
    assert alloc.stats["reused"] >= CONNS - 64_512
    assert model.reopened == alloc.stats["reused"]


@pytest.mark.parametrize("engine", ENGINES)
def test_strict_one_address_stops_at_the_ceiling(engine):
    rw = rewrite_module(engine)
    alloc = rw.TupleAllocator(TW_S, pool=ONE, strict=True)
    with pytest.raises(AssertionError, match="refused"):
        drive_allocator(alloc, syn_ts=True)
    assert alloc.stats["allocated"] == 64_512


@pytest.mark.parametrize("engine", ENGINES)
def test_reuse_needs_what_the_old_connection_left(engine):
    rw = rewrite_module(engine)
    alloc = rw.TupleAllocator(TW_S, worker_index=0, worker_count=32256)  # 2 ports: 1024, 33280
    a = alloc.allocate(CLIENT, 1024, TIP, TPORT, 1.0, syn=SynInfo(100, True))
    b = alloc.allocate(CLIENT, 1024, TIP, TPORT, 1.0, syn=SynInfo(100, True))
    assert a is not None and b is not None
    alloc.release(*a, TIP, TPORT, 2.0)  # released without end seq nor TSval: never reused
    alloc.release(*b, TIP, TPORT, 2.0, end_seq=5000, ts_last=ts_clock(2.0))
    # Same millisecond as the old connection's last TSval, and an ISN before its end: no.
    assert alloc.allocate(CLIENT, 1024, TIP, TPORT, 2.0, syn=SynInfo(4000, True)) is None
    # No TS option and a seq not after the end: no.
    assert alloc.allocate(CLIENT, 1024, TIP, TPORT, 3.0, syn=SynInfo(5000, False)) is None
    # The TS clock moved on: yes, whatever the seq.
    assert alloc.allocate(CLIENT, 1024, TIP, TPORT, 2.5, syn=SynInfo(4000, True)) == b
    alloc.release(*b, TIP, TPORT, 3.0, end_seq=5000, ts_last=None)  # target without TS
    assert alloc.allocate(CLIENT, 1024, TIP, TPORT, 4.0, syn=SynInfo(4000, True)) is None
    assert alloc.allocate(CLIENT, 1024, TIP, TPORT, 4.0, syn=SynInfo(5001, True)) == b
    assert alloc.allocate(CLIENT, 1024, TIP, TPORT, 4.0) is None  # no SYN info: strict
    assert alloc.stats["reused"] == 2


def test_spill_order_is_fixed_and_skips_the_sticky_address():
    assert spill_order(POOL254[3], POOL254) == [*POOL254[4:], *POOL254[:3]]
    assert spill_order(CLIENT, POOL254) == []  # not a pool address: no -c
    assert spill_order(ONE[0], ONE) == []


@pytest.mark.parametrize("engine", ENGINES)
def test_spill_does_not_cross_worker_port_classes(engine):
    rw = rewrite_module(engine)
    workers = [rw.TupleAllocator(TW_S, i, 4, pool=POOL254[:2]) for i in range(4)]
    seen: set[tuple] = set()
    for w, alloc in enumerate(workers):
        for _ in range(2 * alloc.ports_per_client):
            got = alloc.allocate(POOL254[0], 40000, TIP, TPORT, 0.0)
            assert got is not None and got[1] % 4 == w
            seen.add(got)
        assert alloc.stats["spilled"] == alloc.ports_per_client
        assert alloc.allocate(POOL254[0], 40000, TIP, TPORT, 0.0) is None
    assert len(seen) == 2 * 64_512


# -- after a worker restart: the shared history ------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_restarted_worker_reuses_the_dead_ones_tuples_by_timestamp_only(engine):
    rw = rewrite_module(engine)
    history = TupleHistory.create()
    try:
        history.adopt(0.0, TW_S)
        first = rw.TupleAllocator(TW_S, history=history, pool=ONE)
        keys = []
        for i in range(64_512):
            got = first.allocate(ONE[0], 1024 + i, TIP, TPORT, i / 2000, syn=SynInfo(i, True))
            assert got is not None
            keys.append((*got, TIP, TPORT))
        held = set(keys[:100])  # still open when the worker dies
        for i, key in enumerate(keys[100:]):
            first.release(*key, 33.0, end_seq=i, ts_last=ts_clock(32.5))
        history.adopt(35.0, TW_S)  # the worker died at 34 s; the next one starts
        second = rw.TupleAllocator(TW_S, history=history, pool=ONE)
        # A SYN without TS option cannot reopen a tuple whose end seq is forgotten.
        assert second.allocate(ONE[0], 1024, TIP, TPORT, 35.0, syn=SynInfo(7, False)) is None
        got = [
            second.allocate(ONE[0], 1024, TIP, TPORT, 35.0 + i / 1000, syn=SynInfo(7, True))
            for i in range(500)
        ]
        assert all(g is not None for g in got)
        assert not {(*g, TIP, TPORT) for g in got} & held  # maybe ESTABLISHED at the target
        assert second.stats["reused"] == 500
    finally:
        first = second = None  # the compiled allocators hold the block until they go
        history.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_after_a_restart_a_free_port_beyond_the_bounded_look_is_still_found(engine):
    rw = rewrite_module(engine)

    class Held:
        """A dead incarnation left ports 1024..1323 live (ESTABLISHED at the target)."""

        inherited_until = 100.0

        def busy(self, key, since):
            return key[1] < 1324

        def reusable(self, key, since, before):
            return False

        def record_live(self, key):
            pass

        def record_released(self, key, now, was_live, reusable=False):
            pass

    alloc = rw.TupleAllocator(TW_S, history=Held(), pool=ONE)
    got = alloc.allocate(ONE[0], 1024, TIP, TPORT, 1.0, syn=SynInfo(1, False))
    assert got == (ONE[0], 1324)
    assert alloc.stats["exhausted"] == 0 and alloc.stats["reused"] == 0


# -- the whole table: sessions, their ends, the SYNs they send ----------------------------------

XFER = (TransferEntry(ONLINE[0], ONLINE[1], TIP, TPORT),)
REQ = b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("client_ts", "target_ts"),
    [(True, True), (False, True), (True, False)],
    ids=["timestamps", "syn-without-ts", "target-tcp_timestamps-0"],
)
def test_table_reopens_time_wait_tuples_the_target_accepts(engine, client_ts, target_ts):
    """Short connections from one client address through a SessionTable with 32 ports per
    address: the server closes first (its TIME_WAIT), and every SYN on a tuple still in it
    passes Linux's test, fed from the packets the target actually received."""
    cfg = SessionConfig(
        transfers=XFER,
        client_pool=ONE,
        worker_index=0,
        worker_count=2016,  # 32 ports per client address
        linger_s=0.2,
    )
    tl = TableLink(table_class(engine)(cfg), ts=9000 if target_ts else None)
    model = TimeWaitModel()
    rng = random.Random(6191)
    n = 300
    for i in range(n):
        tl.now = i * 0.05
        tl.run(tl.now)
        c = Client(
            isn=rng.getrandbits(32),
            addr=(CLIENT, 30000 + i % 5),
            ts=1 + i if client_ts else None,
        )
        (syn,) = [p for p in tl.client(c.syn(), c.ack()) if p.flags & SYN]
        key = (syn.src, syn.sport, TIP, TPORT)
        opts = packet.parse_options(syn.options).timestamp
        assert model.accepts(key, tl.now, syn.seq, None if opts is None else opts[0])
        t = tl.target((syn.src, syn.sport))
        tl.respond(t.synack())
        tl.client(c.data(REQ))
        tl.respond(t.send(100, fin=True))  # the server answers and closes first
        tl.client(c.fin(read=101))
        tl.respond(t.ack())
        model.close(key, tl.now, t.rcv_nxt, t.ts_recent if target_ts and client_ts else None)
    tl.now += 1.0
    tl.run(tl.now)
    # Per tuple, across its connections, our TSvals never go back (PAWS, also in TIME_WAIT).
    # (A target without timestamps ignores the TS options of the captured segments.)
    last: dict[tuple, int] = {}
    for sent in tl.log if target_ts else ():
        ts = packet.parse_options(sent.pkt.options).timestamp if sent.pkt.options else None
        if ts is not None:
            key = (sent.pkt.src, sent.pkt.sport)
            assert not after(last.get(key, ts[0]), ts[0]), (key, last[key], ts[0])
            last[key] = ts[0]
    c = tl.table.counters
    assert c["drop_no_tuple"] == 0
    assert c["tuples_reused"] >= n - 32 - 10
    assert model.reopened == c["tuples_reused"]
    assert c["conns"] == n


# -- loud when it still happens ------------------------------------------------------------------


def test_stats_line_shows_no_tuple_spilled_and_reused():
    from engine.proc.worker import stats_lines

    lines = stats_lines({"drop_no_tuple": 3, "tuples_spilled": 5, "tuples_reused": 2})
    assert "no tuple:3,tuples spilled:5,tuples reused:2" in lines


def test_no_tuple_is_logged_rate_limited_with_the_fix(caplog):
    from collections import Counter
    from types import SimpleNamespace

    from engine.io.logs import LOGGER_NAME, RateLimiter
    from engine.proc.worker import NO_TUPLE_LOG_INTERVAL_S, Worker

    counters: Counter = Counter()
    w = SimpleNamespace(
        table=SimpleNamespace(counters=counters),
        cfg=SimpleNamespace(session=SessionConfig(client_pool=ONE)),
        _no_tuple_seen=0,
        _no_tuple_log=RateLimiter(NO_TUPLE_LOG_INTERVAL_S),
    )
    caplog.set_level("WARNING", logger=LOGGER_NAME)
    Worker.warn_no_tuple(w, 0.0)  # nothing refused: nothing said
    counters["drop_no_tuple"] = 4
    Worker.warn_no_tuple(w, 1.0)
    counters["drop_no_tuple"] = 9
    Worker.warn_no_tuple(w, 2.0)  # within the interval: swallowed
    Worker.warn_no_tuple(w, 1.0 + NO_TUPLE_LOG_INTERVAL_S)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2
    assert msgs[0].startswith("4 new connection(s) refused (no_tuple, 4 in all)")
    assert "larger pool" in msgs[0] and "on all 1 -c address(es)" in msgs[0]
    assert msgs[1].startswith("5 new connection(s) refused (no_tuple, 9 in all)")
