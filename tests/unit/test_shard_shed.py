"""What a SYN flood leaves in a worker's table, and how it is given back (fake clock).

Every test runs on both engines (tests/unit/engines.py)."""

from __future__ import annotations

import gc

import pytest

from engine.codec import packet
from engine.codec.packet import ACK, RST
from engine.core import table as shard
from engine.core.config import SessionConfig
from engine.core.rewrite import TransferEntry
from engine.core.session import TcpSession
from engine.core.table import HALF_OPEN_SHED_AGE_S, SessionTable
from tests.unit.engines import ENGINES, compiled, heap_size, table_class
from tests.unit.link import ONLINE, TARGET, Client, TableLink

XFER = (TransferEntry(ONLINE[0], ONLINE[1], TARGET[0], TARGET[1]),)
POOL = (packet.ip_from_str("198.19.1.10"), packet.ip_from_str("198.19.1.11"))


TABLE: dict[int, type] = {0: SessionTable}


@pytest.fixture(autouse=True, params=ENGINES)
def engine(request, monkeypatch):
    monkeypatch.setitem(TABLE, 0, table_class(request.param))
    return request.param


def mk() -> TableLink:
    return TableLink(TABLE[0](SessionConfig(transfers=XFER, client_pool=POOL)))


def live_clients(table) -> set[tuple[int, int]]:
    """The fake clients of the sessions not yet ended."""
    return {(r.client_ip, r.client_port) for r in table.live_routes()}


def client(i: int) -> Client:
    return Client(
        isn=1000 + i, addr=(packet.ip_from_str("198.19.200.1") + i // 50000, 1024 + i % 50000)
    )


def test_half_open_sessions_are_shed_unanswered_first_and_legit_ones_kept():
    tl = mk()
    legit = client(0)
    (syn,) = tl.client(legit.syn(), legit.ack())  # a real client: its ACK follows the SYN
    tl.respond(tl.target((syn.src, syn.sport)).synack())
    answered, unanswered = client(1), client(2)
    (syn_a,) = tl.client(answered.syn())
    tl.respond(tl.target((syn_a.src, syn_a.sport)).synack())  # the target answered it
    tl.client(unanswered.syn())  # the target never did
    table = tl.table
    assert table.active == 3
    assert table.shed_half_open(tl.now) == 0  # too young: a real ACK may still come
    tl.now += HALF_OPEN_SHED_AGE_S
    assert table.shed_half_open(tl.now, limit=1) == 1
    tl.drain()
    assert table.counters["ended_shed_half_open"] == 1
    assert (syn_a.src, syn_a.sport) in live_clients(table)  # the answered one waits its turn
    assert table.shed_half_open(tl.now) == 1
    out = tl.drain()
    # The answered one had a connection at the target: a RST frees the target's side.
    assert [(p.sport, p.flags & RST) for p in out] == [(syn_a.sport, RST)]
    assert table.counters["ended_shed_half_open"] == 2
    assert live_clients(table) == {(syn.src, syn.sport)}  # the real client's session is kept


def live_sessions(engine: str) -> int:
    if engine == "compiled":
        return compiled.live_allocations()[0]  # C blocks: sessions and what they hold
    return sum(isinstance(o, TcpSession) for o in gc.get_objects())


@pytest.fixture
def heap_slack(monkeypatch, engine):
    """A small HEAP_SLACK (both engines), restored afterwards."""
    slack, default = 16, shard.HEAP_SLACK
    monkeypatch.setattr(shard, "HEAP_SLACK", slack)
    if engine == "compiled":
        compiled.Table.set_heap_slack(slack)
    yield slack
    if engine == "compiled":
        compiled.Table.set_heap_slack(default)


def test_ended_sessions_are_freed_not_held_by_their_timer_items(engine, heap_slack):
    """A session's timer item lies minutes ahead (its idle deadline): once the session is
    gone the item must not keep it alive (a flood's 100 k sessions stayed for -k)."""
    slack = heap_slack
    gc.collect()
    before = live_sessions(engine)
    tl = mk()
    count = 400
    for i in range(count):
        c = client(10 + i)
        tl.client(c.syn())
        syn = tl.log[-1].pkt
        tl.respond(tl.target((syn.src, syn.sport)).synack())
    table = tl.table
    assert table.active == count
    if engine == "python":
        assert live_sessions(engine) - before == count
    else:  # a session is one block or more (its SYN, the segments it keeps)
        assert live_sessions(engine) - before >= count
    tl.now += HALF_OPEN_SHED_AGE_S
    assert table.shed_half_open(tl.now) == count
    tl.drain()
    table.forget_ended(tl.now)
    assert table.active == 0
    gc.collect()
    # What the compaction tolerates (the dead items past the last compaction), never the flood.
    if engine == "python":
        assert live_sessions(engine) - before <= slack
    else:  # the compiled table frees a session when it is removed, whatever its items
        assert live_sessions(engine) == before
    assert heap_size(table) <= slack + 1


def test_end_input_closes_what_is_open_and_counts_it():
    tl = mk()
    c = client(5)
    tl.client(c.syn(), c.ack())
    syn = tl.log[-1].pkt
    tl.respond(tl.target((syn.src, syn.sport)).synack())
    table = tl.table
    assert table.end_input(tl.now) == 1
    out = tl.drain()
    assert [p.flags & (RST | ACK) for p in out][-1] & RST
    assert table.counters["ended_offline_end"] == 1
    assert table.end_input(tl.now) == 0  # already ended
    table.forget_ended(tl.now)
    assert table.active == 0


def test_refuse_new_sheds_whole_flows_and_keeps_admitted_ones():
    tl = mk()
    table = tl.table
    old = client(100)
    tl.client(old.syn(), old.ack())  # admitted before the memory pressure
    table.refuse_new = True
    late = client(101)  # its SYN was still in the ring when the flag went up
    assert tl.client(late.syn()) == []
    assert tl.client(late.ack(), late.data(b"GET / HTTP/1.1\r\n\r\n")) == []  # never half
    tl.client(old.data(b"GET /old HTTP/1.1\r\n\r\n"))  # an admitted flow goes on
    assert table.active == 1
    k = table.counters
    assert k["shed_sessions_memory"] == 1 and k["drop_shed"] == 3
    assert k["clt cont"] == 1  # the admitted session took its data
    table.refuse_new = False
    assert tl.client(late.data(b"more")) == []  # still the same refused flow
    again = Client(isn=9000, addr=late.addr)  # a new SYN on the tuple: a new, whole session
    assert [p.flags for p in tl.client(again.syn())] == [packet.SYN]
    assert table.active == 2
