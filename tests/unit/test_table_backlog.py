"""The byte budget of a worker's held backlog (config.backlog_max_bytes): past it new
sessions are shed whole, running ones go on and drain it."""

from __future__ import annotations

import pytest

from engine.codec import packet
from engine.core.config import SessionConfig
from engine.core.rewrite import TransferEntry
from engine.core.table import SessionTable
from tests.unit.engines import ENGINES, table_class
from tests.unit.link import ONLINE, TARGET, Client, TableLink

XFER = (TransferEntry(ONLINE[0], ONLINE[1], TARGET[0], TARGET[1]),)
REQUEST = b"GET /" + b"x" * 195 + b" HTTP/1.1\r\n\r\n"
TABLE: dict[int, type] = {0: SessionTable}


@pytest.fixture(autouse=True, params=ENGINES)
def engine(request, monkeypatch):
    monkeypatch.setitem(TABLE, 0, table_class(request.param))
    return request.param


def mk(budget: int) -> TableLink:
    return TableLink(TABLE[0](SessionConfig(transfers=XFER, backlog_max_bytes=budget)))


def client(i: int) -> Client:
    return Client(isn=5000 + 7 * i, addr=(packet.ip_from_str("198.19.3.1") + i, 20000 + i))


def held_start(tl: TableLink, c: Client) -> tuple[int, int]:
    """A session whose request waits: the client's handshake and data, no SYN-ACK yet."""
    out = tl.client(c.syn(), c.ack(), c.data(REQUEST))
    assert [p.flags for p in out] == [packet.SYN]
    return out[0].src, out[0].sport


def test_held_bytes_follow_the_sessions_backlog():
    tl = mk(0)  # no budget: the count is kept all the same
    a = held_start(tl, client(1))
    assert tl.table.held_bytes == len(REQUEST)
    b = held_start(tl, client(2))
    assert tl.table.held_bytes == 2 * len(REQUEST)
    tl.respond(tl.target(a).synack())  # the handshake completes: a's request goes out
    assert tl.table.held_bytes == len(REQUEST)
    tl.respond(tl.target(b).synack())
    assert tl.table.held_bytes == 0
    assert tl.table.counters["shed_sessions_backlog"] == 0


def test_past_the_budget_new_sessions_are_shed_whole_and_running_ones_go_on():
    tl = mk(len(REQUEST))
    table = tl.table
    first = client(1)
    a = held_start(tl, first)
    assert table.held_bytes == len(REQUEST)  # at the budget: the next new flow is shed
    late = client(2)
    assert tl.client(late.syn(), late.ack()) == []
    assert tl.client(late.data(REQUEST)) == []  # never half a session
    k = table.counters
    assert k["shed_sessions_backlog"] == 1 and k["drop_shed"] == 3
    assert k["shed_sessions_memory"] == 0
    assert table.active == 1
    # The running session goes on: its data is taken and sent once the target answers.
    out = tl.respond(tl.target(a).synack())
    assert [len(p.payload) for p in out if p.payload] == [len(REQUEST)]
    assert table.held_bytes == 0
    assert tl.client(late.data(b"more")) == []  # the refused flow stays refused
    again = Client(isn=9000, addr=late.addr)  # a new SYN on that tuple: a new, whole session
    assert [p.flags for p in tl.client(again.syn())] == [packet.SYN]
    k = table.counters
    assert table.active == 2 and k["shed_sessions_backlog"] == 1
    other = client(3)
    assert [p.flags for p in tl.client(other.syn())] == [packet.SYN]
    assert table.active == 3


def test_a_refused_flow_is_forgotten_at_its_fin():
    tl = mk(1)
    held_start(tl, client(1))
    late = client(2)
    assert tl.client(late.syn()) == []
    assert tl.client(late.fin()) == []
    k = tl.table.counters
    assert k["shed_sessions_backlog"] == 1 and k["drop_shed"] == 2
