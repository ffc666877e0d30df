"""TcpSession across an intercept outage (issue 10 item 1): no retransmission-limit end while
no intercept can deliver the target's answers, a prompt resume once the routes are back, and
response bytes lost meanwhile acked over from the target's next pure ACK."""

from __future__ import annotations

import pytest

from engine.codec.packet import ACK
from engine.core.config import SessionConfig
from engine.core.session import RETRIES_MAX, RTO_MAX_S, SessionEnded, State, TcpSession
from tests.unit.link import FAKE_CLIENT, ONLINE, TARGET, Client, Link, Target
from tests.unit.test_session import REQ1, REQ2, establish

M32 = 0xFFFFFFFF


@pytest.fixture(autouse=True)
def engine(session_engine, monkeypatch):
    """Every test here runs against both session engines (tests/unit/conftest.py)."""
    monkeypatch.setitem(globals(), "TcpSession", session_engine)


def mk() -> Link:
    s = TcpSession(SessionConfig(), client=FAKE_CLIENT, target=TARGET, online=ONLINE, now=0.0)
    return Link(s, Target())


def outage_link() -> tuple[Link, Client]:
    """Established, one request answered, then the route goes down and the next request's
    answer (ACK and data) never reaches us."""
    c = Client()
    link = mk()
    establish(link, c, rtt=0.01)
    link.now = 1.0
    link.client(c.data(REQ1))
    link.respond(link.target.send(100))
    link.session.handle_route_down(True, link.now)
    link.client(c.data(REQ2, read=100))
    return link, c


def test_no_retransmit_limit_while_the_route_is_down():
    link, _ = outage_link()
    link.run(60.0)  # ten times what RETRIES_MAX RTOs take
    s = link.session
    assert s.state is State.ESTABLISHED
    assert s.counters["ended_retransmit_limit"] == 0
    retx = [e for e in link.log if e.pkt.payload == REQ2][1:]
    assert len(retx) > RETRIES_MAX + 5  # it kept retransmitting...
    gaps = [b.at - a.at for a, b in zip(retx[-4:], retx[-3:], strict=False)]
    assert gaps == pytest.approx([RTO_MAX_S] * 3)  # ...at the longest RTO, no further backoff


def test_route_back_retransmits_at_once_and_the_session_resumes():
    link, c = outage_link()
    link.run(30.0)
    t = link.target
    before = len(link.log)
    link.session.handle_route_down(False, link.now)
    (r,) = link.flush()  # no waiting for the backed-off RTO
    assert (r.payload, len(link.log)) == (REQ2, before + 1)
    # The target's ACK of it; the answer itself was lost during the outage: its pure ACK's
    # seq is 120 bytes ahead of what we received, acked over.
    t.snd_nxt = (t.snd_nxt + 120) & M32
    (a,) = link.respond(t.ack())
    assert (a.flags, a.ack) == (ACK, t.snd_nxt)
    assert link.session.counters["client_bytes_acked"] == len(REQ1) + len(REQ2)
    # The gate sees those bytes: the next request goes out at once.
    (d,) = link.client(c.data(b"GET /c HTTP/1.1\r\n\r\n", read=220))
    assert d.payload.startswith(b"GET /c")
    link.respond(t.send(80))
    assert link.session.state is State.ESTABLISHED
    assert link.session.counters["ended_retransmit_limit"] == 0


def test_route_back_with_nothing_in_flight_probes_the_target():
    c = Client()
    link = mk()
    establish(link, c, rtt=0.01)
    link.client(c.data(REQ1))
    link.respond(link.target.send(100))
    s = link.session
    s.handle_route_down(True, link.now)
    s.handle_route_down(False, link.now)
    (p,) = link.flush()
    # An old seq: the target must answer it with an ACK carrying its current seq.
    una = (c.isn + 1 + len(REQ1)) & M32
    assert (p.flags, p.seq, p.payload) == (ACK, (una - 1) & M32, b"")


def test_the_limit_applies_again_once_the_route_is_back():
    link, _ = outage_link()
    link.run(10.0)
    link.session.handle_route_down(False, link.now)
    link.lose = 1000
    link.run(link.now + 60)
    assert link.events()[-1] == SessionEnded("retransmit_limit")


def test_pure_ack_within_what_was_received_changes_nothing():
    c = Client()
    link = mk()
    establish(link, c, rtt=0.01)
    link.client(c.data(REQ1))
    link.respond(link.target.send(100))
    link.advance(0.2)
    n = len(link.log)
    assert link.respond(link.target.ack()) == []
    assert len(link.log) == n
    assert link.session.counters["c-resp"] == 1
