"""What a SYN flood leaves in a worker's table, and how it is given back (pure, fake clock)."""

from __future__ import annotations

import gc

from engine.codec import packet
from engine.codec.packet import ACK, RST
from engine.core import table as shard
from engine.core.config import SessionConfig
from engine.core.rewrite import TransferEntry
from engine.core.session import TcpSession
from engine.core.table import HALF_OPEN_SHED_AGE_S, SessionTable
from tests.unit.link import ONLINE, TARGET, Client, TableLink

XFER = (TransferEntry(ONLINE[0], ONLINE[1], TARGET[0], TARGET[1]),)
POOL = (packet.ip_from_str("198.19.1.10"), packet.ip_from_str("198.19.1.11"))


def mk() -> TableLink:
    return TableLink(SessionTable(SessionConfig(transfers=XFER, client_pool=POOL)))


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
    states = {s.client: s.outcome for s in (e.session for e in table._by_resp.values())}
    assert states[(syn_a.src, syn_a.sport)] is None  # the answered one waits its turn
    assert table.shed_half_open(tl.now) == 1
    out = tl.drain()
    # The answered one had a connection at the target: a RST frees the target's side.
    assert [(p.sport, p.flags & RST) for p in out] == [(syn_a.sport, RST)]
    assert table.counters["ended_shed_half_open"] == 2
    legit_session = next(e.session for e in table._by_resp.values() if e.session.outcome is None)
    assert not legit_session.half_open and legit_session.client == (syn.src, syn.sport)


def live_sessions() -> int:
    return sum(isinstance(o, TcpSession) for o in gc.get_objects())


def test_ended_sessions_are_freed_not_held_by_their_timer_items(monkeypatch):
    """A session's timer item lies minutes ahead (its idle deadline): once the session is
    gone the item must not keep it alive (a flood's 100 k sessions stayed for -k)."""
    slack = 16
    monkeypatch.setattr(shard, "HEAP_SLACK", slack)
    gc.collect()
    before = live_sessions()
    tl = mk()
    count = 400
    for i in range(count):
        c = client(10 + i)
        tl.client(c.syn())
        syn = tl.log[-1].pkt
        tl.respond(tl.target((syn.src, syn.sport)).synack())
    table = tl.table
    assert table.active == count
    assert live_sessions() - before == count
    tl.now += HALF_OPEN_SHED_AGE_S
    assert table.shed_half_open(tl.now) == count
    tl.drain()
    table.forget_ended(tl.now)
    assert table.active == 0
    gc.collect()
    # What the compaction tolerates (the dead items past the last compaction), never the flood.
    assert live_sessions() - before <= slack
    assert len(table._heap) <= slack + 1


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
