"""The session engine when the capture delivers no pure ACK (engine/codec/bpf.py drops them in the
kernel), and the fidelity byte count when a packet of another connection reaches a session."""

from __future__ import annotations

import pytest

from engine.codec.packet import ACK, FIN, PSH, SYN
from engine.core.config import SessionConfig
from engine.core.rewrite import TransferEntry
from engine.core.session import CLIENT_SEQ_JUMP_MAX_BYTES, DropReason, State, TcpSession, drop_key
from engine.core.table import SessionTable
from tests.unit.link import FAKE_CLIENT, ONLINE, TARGET, Client, Link, TableLink, Target

PyTcpSession = TcpSession
M32 = 0xFFFFFFFF
REQ1 = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
REQ2 = b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
def engine(session_engine, monkeypatch):
    """The session tests here run against both session engines (tests/unit/conftest.py)."""
    monkeypatch.setitem(globals(), "TcpSession", session_engine)


@pytest.fixture(autouse=True)
def strict(monkeypatch):
    monkeypatch.setattr(PyTcpSession, "strict", True)


def mk() -> Link:
    cfg = SessionConfig()
    s = TcpSession(cfg, client=FAKE_CLIENT, target=TARGET, online=ONLINE, now=0.0)
    return Link(s, Target(), mtu=cfg.mtu)


@pytest.mark.usefixtures("engine")
def test_syn_then_data_without_any_ack_completes_the_handshake_and_sends_the_data():
    c = Client(ts=100)
    link = mk()
    t = link.target
    (syn,) = link.client(c.syn())
    assert syn.flags == SYN
    assert link.client(c.data(REQ1)) == []  # no ACK was captured; the data waits
    link.now = 0.002
    (data,) = link.respond(t.synack())  # the request acks the SYN-ACK: no ACK of its own
    assert (data.flags, data.seq, data.ack, data.payload) == (PSH | ACK, c.isn + 1, t.isn + 1, REQ1)
    assert link.session.state is State.ESTABLISHED
    # A keep-alive exchange and the close, without a single captured pure ACK.
    link.now = 0.01
    link.respond(t.send(300))
    (d2,) = [p for p in link.client(c.data(REQ2, read=300)) if p.payload]
    assert (d2.payload, d2.ack) == (REQ2, t.isn + 1 + 300)
    link.now = 0.02
    link.respond(t.send(200))
    out = link.client(c.fin(read=500))
    while not any(p.flags & FIN for p in out):  # the close waits for a quiet response
        out = link.advance(0.1)
    (fin,) = [p for p in out if p.flags & FIN]
    assert fin.seq == c.isn + 1 + len(REQ1 + REQ2)
    link.respond(t.fin())
    link.advance(5.0)
    assert bytes(t.data) == REQ1 + REQ2
    assert link.session.outcome == "closed"
    cnt = link.session.counters
    assert cnt[drop_key(DropReason.PURE_ACK)] == 0
    assert cnt["client_bytes_captured"] == cnt["client_bytes_acked"] == len(REQ1 + REQ2)
    assert cnt["requests"] == 2


def established(link: Link, c: Client) -> None:
    link.client(c.syn())
    link.now = 0.001
    link.respond(link.target.synack())
    link.client(c.data(REQ1))


@pytest.mark.usefixtures("engine")
def test_segment_of_another_connection_is_not_counted_as_gigabytes():
    """A packet whose seq lies far beyond the captured stream (the next connection on this
    client tuple, whose SYN was lost) must not add ~2^31 bytes to client_bytes_captured."""
    c = Client()
    link = mk()
    established(link, c)
    cnt = link.session.counters
    assert cnt["client_bytes_captured"] == len(REQ1)
    other = Client(isn=(c.isn + (1 << 31) - 7) & M32)  # seq nearly half the space away
    assert link.client(other.data(b"x" * 100)) == []
    near = Client(isn=(c.seq + CLIENT_SEQ_JUMP_MAX_BYTES + 10) & M32)
    assert link.client(near.data(b"y" * 100), near.fin()) == []
    assert cnt["client_bytes_captured"] == len(REQ1)
    assert cnt[drop_key(DropReason.CLIENT_OUT_OF_WINDOW)] == 3
    assert link.session.state is State.ESTABLISHED and link.session.unsend == 0
    # A real gap (captured loss) within reach is still counted: the client did send it.
    gap = Client(isn=(c.seq + 1000 - 1) & M32)
    link.client(gap.data(b"z" * 10))
    assert cnt["client_bytes_captured"] == len(REQ1) + 1000 + 10


def test_table_port_reuse_with_lost_syn_keeps_the_byte_count_sane():
    t = SessionTable(SessionConfig(transfers=(TransferEntry(*ONLINE, *TARGET),)))
    link = TableLink(t)
    old = Client()
    link.client(old.syn())
    link.now = 0.001
    (key,) = link.targets
    link.respond(link.target(key).synack())
    link.client(old.data(REQ1))
    assert t.counters["client_bytes_captured"] == len(REQ1)
    for k in range(1, 8):  # next connections on the tuple, SYN not captured
        new = Client(isn=(old.isn + k * 0x2000_0000) & M32)
        link.client(new.data(REQ2))
    # Each is dropped by the live session (its bytes are not this connection's); before the
    # fix the first one alone added 2^31 bytes.
    assert t.counters["client_bytes_captured"] == len(REQ1)
    far = t.counters[drop_key(DropReason.CLIENT_OUT_OF_WINDOW)]
    behind = t.counters[drop_key(DropReason.OLD_SEGMENT)]  # the seq unwraps to before the ISN
    assert far >= 1 and far + behind == 7
