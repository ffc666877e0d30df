"""TcpSession through the in-memory link: exact packets for every behaviour (design §5)."""

from __future__ import annotations

import dataclasses

import pytest

from engine.codec import packet
from engine.codec.packet import ACK, FIN, PSH, RST, SYN
from engine.codec.tcpseq import ts_clock
from engine.core.config import SessionConfig
from engine.core.session import (
    CLIENT_GAP_WAIT_S,
    CLOSE_QUIET_MIN_S,
    DELAYED_ACK_S,
    DUP_ACK_THRESHOLD,
    FAKED_TTL,
    FAKED_WINDOW,
    LAN_RTT_MAX_S,
    RESPONSE_QUIET_MIN_S,
    RETRIES_MAX,
    RTO_MAX_S,
    RTO_MIN_S,
    SYN_RTO_INITIAL_S,
    DropReason,
    Outcome,
    RouteNeeded,
    SessionEnded,
    State,
    TcpSession,
    drop_key,
)
from tests.unit.link import FAKE_CLIENT, ONLINE, TARGET, Client, Link, Target

M32 = 0xFFFFFFFF
REQ1 = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
REQ2 = b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(autouse=True)
def engine(session_engine, monkeypatch):
    """Every test here runs against both session engines (tests/unit/conftest.py)."""
    monkeypatch.setitem(globals(), "TcpSession", session_engine)


def mk(cfg: SessionConfig | None = None, **target_kw) -> Link:
    cfg = cfg or SessionConfig()
    s = TcpSession(cfg, client=FAKE_CLIENT, target=TARGET, online=ONLINE, now=0.0)
    return Link(s, Target(**target_kw), mtu=cfg.mtu)


def ts_of(p) -> tuple[int, int] | None:
    return packet.parse_options(p.options).timestamp


def establish(link: Link, c: Client, *, third: bool = True, rtt: float = 0.001, **synack_kw):
    """Real handshake; returns the packets sent in answer to the SYN-ACK."""
    out = link.client(c.syn())
    assert [p.flags for p in out] == [SYN]
    if third:
        assert link.client(c.ack()) == []
    link.now += rtt
    return link.respond(link.target.synack(**synack_kw))


def counters(link: Link):
    return link.session.counters


# -- handshakes ----------------------------------------------------------------------------


def test_real_handshake_sends_captured_syn_third_ack_and_data():
    c = Client(ts=100)
    link = mk()
    t = link.target
    syn = c.syn()
    out = link.client(syn)
    assert link.events() == [RouteNeeded(*FAKE_CLIENT, *TARGET)]
    (s,) = out
    assert (s.flags, s.seq, s.ack, s.window) == (SYN, c.isn, 0, 64240)
    # The client's options as captured (spec §3.10), with our TS clock's TSval (RFC 6191
    # reuse: engine/codec/tcpseq.py).
    assert s.options == packet.set_timestamp(syn.options, ts_clock(link.now), 0)
    assert (s.ip_id, s.ttl, s.df) == (syn.ip_id, 61, True)
    third = c.ack()
    assert link.client(third) == []  # held until the SYN-ACK
    link.now = 0.002
    (a,) = link.respond(t.synack())
    assert (a.flags, a.seq, a.ack) == (ACK, c.isn + 1, t.isn + 1)
    assert (a.ip_id, a.window, a.ttl) == (third.ip_id, third.window, 61)
    assert ts_of(a) == (ts_clock(0.002), 9000)
    req = c.data(REQ1)
    (d,) = link.client(req)
    assert (d.flags, d.seq, d.ack, d.window, d.payload) == (
        PSH | ACK,
        c.isn + 1,
        t.isn + 1,
        502,
        REQ1,
    )
    assert bytes(t.data) == REQ1
    assert counters(link)["conns"] == 1
    assert link.session.state is State.ESTABLISHED


def test_real_handshake_without_captured_third_ack_fakes_it():
    c = Client(ts=100)
    link = mk()
    t = link.target
    (a,) = establish(link, c, third=False)
    assert (a.flags, a.seq, a.ack, a.window, a.ttl) == (ACK, c.isn + 1, t.isn + 1, 65535, 64)
    assert ts_of(a) == (ts_clock(link.now), 9000)  # our TS clock, the target's TSval
    assert a.options[:4] == b"\x01\x01\x08\x0a"


def test_faked_handshake_for_midstream_flow_uses_mss_option_and_65535():
    cfg = SessionConfig(mss=1400)  # -D
    c = Client(ts=100)
    link = mk(cfg)
    t = link.target
    req = c.data(REQ1)
    (syn,) = link.client(req)
    assert link.events() == [RouteNeeded(*FAKE_CLIENT, *TARGET)]
    assert (syn.flags, syn.seq, syn.ack, syn.window, syn.ttl) == (SYN, req.seq - 1, 0, 65535, 64)
    assert syn.options == packet.build_options(mss=1400)  # MSS only (spec §3.11)
    assert syn.ip_id == req.ip_id - 2
    assert counters(link)["for no syn"] == 1
    out = link.respond(t.synack())
    # The request goes at once and acks the SYN-ACK itself: no faked third ACK before it.
    assert [p.flags for p in out] == [PSH | ACK]
    (d,) = out
    # The faked SYN had no TS option: timestamps are not in effect, the capture's are kept.
    assert (d.seq, d.ack, d.payload, d.window, d.options) == (
        req.seq,
        t.isn + 1,
        REQ1,
        65535,
        req.options,
    )


def test_a_captured_reset_after_the_handshake_follows_the_third_ack():
    """A connection the client reset right after its handshake (a health check, a probe):
    the third ACK is not left to the RST, so the target sees the connection made, then
    reset, as the online server did."""
    c = Client()
    link = mk()
    link.client(c.syn())
    link.client(c.ack(), c.rst())
    out = link.respond(link.target.synack())
    assert [(p.flags, p.payload) for p in out] == [(ACK, b""), (RST | ACK, b"")]
    assert out[0].ack == out[1].ack == link.target.isn + 1


def test_faked_third_ack_goes_alone_when_the_request_cannot():
    """A zero window in the SYN-ACK holds the request: the faked third ACK (spec §3.11) then
    goes out on its own, MSS-less, window 65535, the IP id after the faked SYN's."""
    c = Client(ts=100)
    link = mk(SessionConfig(mss=1400))
    t = link.target
    req = c.data(REQ1)
    (syn,) = link.client(req)
    assert syn.flags == SYN
    out = link.respond(t.synack(window=0))
    assert [p.flags for p in out] == [ACK]
    (a,) = out
    assert (a.seq, a.ack, a.window, a.options, a.ip_id) == (
        req.seq,
        t.isn + 1,
        65535,
        b"",
        req.ip_id - 1,
    )
    assert counters(link)["send content"] == 0


def test_no_fake_handshake_drops_midstream_flow():
    link = mk(SessionConfig(fake_handshake=False))  # -O
    c = Client()
    assert link.client(c.data(REQ1)) == []
    assert counters(link)[drop_key(DropReason.NO_SYN)] == 1
    assert link.events() == []


def test_syn_retransmission_backoff_then_handshake_timeout():
    cfg = SessionConfig(handshake_timeout_s=3.0)
    link = mk(cfg)
    c = Client()
    link.client(c.syn())
    link.events()
    out = link.run(5.0)
    syns = [e for e in link.log if e.flags == SYN]
    times = [e.at for e in syns]
    # 0, then +0.5, +1.0 (doubling), and the next (+2.0 = 3.5) is after the 3 s limit.
    assert times == pytest.approx([0.0, SYN_RTO_INITIAL_S, SYN_RTO_INITIAL_S * 3])
    assert all(e.pkt.seq == c.isn for e in syns)
    assert out[-1].flags == SYN
    assert link.events() == [SessionEnded("handshake_timeout")]
    assert counters(link)["syn retransmit"] == 2
    assert link.session.lingering
    # linger, then finished
    link.run(3.0 + cfg.linger_s)
    assert link.session.finished


def test_synack_with_wrong_ack_gets_rst_and_syn_is_retried():
    link = mk()
    c = Client()
    link.client(c.syn())
    bad = link.target.synack(ack=12345)
    (r,) = link.respond(bad)
    assert (r.flags, r.seq, r.ack) == (RST | ACK, 12345, link.target.isn + 1)
    assert counters(link)[drop_key(DropReason.UNEXPECTED_RESPONSE)] == 1
    out = link.run(SYN_RTO_INITIAL_S)
    assert [p.flags for p in out] == [SYN]
    link.respond(link.target.synack())
    assert link.session.state is State.ESTABLISHED


def test_rst_to_syn_means_refused():
    link = mk()
    c = Client()
    link.client(c.syn(), c.data(REQ1))
    rst = link.target._pkt(0, RST | ACK, ack=c.isn + 1, options=b"")
    link.respond(rst)
    assert link.events()[-1] == SessionEnded("refused")
    assert counters(link)["unsend dropped"] == 1


def test_synack_retransmission_gets_ack_again():
    c = Client()
    link = mk()
    establish(link, c)
    (a,) = link.respond(link.target.synack())
    assert (a.flags, a.ack) == (ACK, link.target.isn + 1)


# -- the request gate ----------------------------------------------------------------------


def test_new_request_held_until_target_sent_as_much_as_online_rule_a():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c, rtt=0.004)  # beyond a LAN: answer data alone releases nothing
    (d1,) = link.client(c.data(REQ1))
    assert counters(link)["gate_bytes"] == 1  # the first request: online had sent 0
    # The online server answered 300 bytes before the client's next request.
    assert link.client(c.data(REQ2, read=300)) == []
    assert link.session.unsend == 1
    link.now += 0.004
    # 200 < 300: still held; the data is acked at once (the target's silence must be its own).
    assert [(p.flags, p.payload) for p in link.respond(t.send(200))] == [(ACK, b"")]
    link.now += 0.0005
    (d2,) = link.respond(t.send(100))
    assert (d2.payload, d2.seq, d2.ack) == (REQ2, d1.seq + len(REQ1), t.isn + 1 + 300)
    assert counters(link)["gate_bytes"] == 2
    assert counters(link)["requests_held"] == 1
    assert counters(link)["requests"] == 2


def test_held_request_released_after_quiet_response_rule_c():
    cfg = SessionConfig(rtt_initial_s=0.001)
    c = Client()
    link = mk(cfg)
    t = link.target
    establish(link, c, rtt=0.004)  # measured RTT about 4 ms -> quiet = rtt / 2
    link.client(c.data(REQ1))
    link.now = 0.010
    link.client(c.data(REQ2, read=300))
    link.now = 0.020
    # The target's answer is shorter than online's: acked at once (a held request would carry
    # that ack anyway), so the silence after it is the target's own.
    out = link.respond(t.send(200))
    assert [(p.flags, p.ack) for p in out] == [(ACK, t.isn + 1 + 200)]
    # rtt/2 (spec §3.9)
    quiet = max(link.session.rtt_estimator.path_rtt() / 2, RESPONSE_QUIET_MIN_S)
    assert 0.001 < quiet < 0.004
    out = link.run(0.020 + quiet - 0.0001)
    assert [p.payload for p in out if p.payload] == []
    out = link.run(0.020 + quiet)
    assert [p.payload for p in out if p.payload] == [REQ2]
    assert counters(link)["gate_quiet"] == 1
    assert counters(link)["gate_max_wait"] == 0


def test_on_a_lan_the_next_request_goes_when_answer_data_arrives():
    """spec §3.8 step 5, §3.12 internal_usage: with a path RTT up to LAN_RTT_MAX_S, C sends
    the next request as soon as response data arrives; so do we (counted as rule (c))."""
    c = Client()
    link = mk()
    t = link.target
    establish(link, c, rtt=0.0002)
    link.client(c.data(REQ1))
    assert link.client(c.data(REQ2, read=300)) == []  # no answer data yet: held
    out = link.respond(t.send(10))
    assert [p.payload for p in out] == [REQ2]
    assert out[0].ack == t.snd_nxt  # it carries the ACK of the answer
    assert counters(link)["gate_quiet"] == 1
    assert LAN_RTT_MAX_S >= 0.0002


def test_client_fin_waits_for_long_silence_not_a_pause_mid_response():
    """A FIN must not cut a streaming response short (nginx aborts it): a close needs
    CLOSE_QUIET_MIN_S of silence after our last ACK, far longer than a scheduling pause."""
    cfg = SessionConfig(rtt_initial_s=0.001)
    c = Client()
    link = mk(cfg)
    t = link.target
    establish(link, c, rtt=0.004)
    link.client(c.data(REQ1))
    link.now = 0.010
    assert link.respond(t.send(1000)) == []
    link.client(c.fin(read=5000))  # online had sent 5000 bytes before the client closed
    out = link.run(0.010 + DELAYED_ACK_S + RESPONSE_QUIET_MIN_S + 0.01)
    assert not [p for p in out if p.flags & FIN]  # a data-sized pause does not release it
    out = link.run(0.010 + DELAYED_ACK_S + CLOSE_QUIET_MIN_S)
    assert [p.flags & FIN for p in out if p.flags & FIN] == [FIN]
    assert counters(link)["gate_quiet"] == 1


def test_held_request_released_after_max_wait_rule_d():
    cfg = SessionConfig(response_wait_max_s=1.5)
    c = Client()
    link = mk(cfg)
    establish(link, c)
    link.client(c.data(REQ1))
    link.respond(link.target.ack())
    link.now = 0.5
    link.client(c.data(REQ2, read=300))
    out = link.run(0.5 + 1.5 - 0.001)
    assert not [p for p in out if p.payload == REQ2]
    out = link.run(0.5 + 1.5)
    assert [p.payload for p in out if p.payload] == [REQ2]
    assert counters(link)["gate_max_wait"] == 1


def test_continuation_segments_go_out_at_once():
    c = Client()
    link = mk()
    establish(link, c)
    body = [b"a" * 1000, b"b" * 1000, b"c" * 500]
    out = link.client(*(c.data(b) for b in body))  # same ack: one request in three segments
    assert [p.payload for p in out] == body
    assert counters(link)["requests"] == 1


def test_pipelined_requests_with_no_wait():
    cfg = SessionConfig(wait_response=False)  # -W
    c = Client()
    link = mk(cfg)
    establish(link, c)
    out = link.client(c.data(REQ1), c.data(REQ2, read=300), c.data(b"x", read=900))
    assert [p.payload for p in out] == [REQ1, REQ2, b"x"]
    assert counters(link)["gate_nowait"] == 2


def test_server_first_greeting_holds_first_request():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)  # captured third ACK: ack = online ISN + 1
    # The client spoke after reading the server's 20-byte greeting (e.g. SMTP, MySQL).
    assert link.client(c.data(b"EHLO x\r\n", read=20)) == []
    (d,) = link.respond(t.send(20))
    assert (d.payload, d.ack) == (b"EHLO x\r\n", t.isn + 1 + 20)


# -- acking the target ---------------------------------------------------------------------


def test_delayed_ack_and_every_second_full_segment():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)
    link.client(c.data(REQ1))
    link.now = 1.0
    assert link.respond(t.send(100)) == []
    out = link.run(1.0 + DELAYED_ACK_S - 0.001)
    assert out == []
    (a,) = link.run(1.0 + DELAYED_ACK_S)
    assert (a.flags, a.ack, a.seq) == (ACK, t.isn + 1 + 100, c.seq)
    # Two full-sized segments (2 x the MSS of our SYN) are acked at once.
    out = link.respond(t.send(1460))
    assert out == []
    (a,) = link.respond(t.send(1460))
    assert a.ack == t.snd_nxt


def test_data_carries_the_ack_so_no_separate_ack():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)
    link.client(c.data(REQ1))
    link.respond(t.send(50))
    (d,) = link.client(c.data(REQ2, read=50))
    assert d.ack == t.snd_nxt
    link.respond(t.ack())  # a pure ACK: nothing to acknowledge
    assert link.run(link.now + 1.0) == []


def test_retransmitted_response_is_acked_at_once():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)
    link.client(c.data(REQ1))
    p = t.send(100)
    link.respond(p)
    link.run(0.5)
    (a,) = link.respond(p)  # the same segment again: our ACK was lost
    assert (a.flags, a.ack) == (ACK, t.snd_nxt)
    assert counters(link)["resp retransmitted"] == 1


# -- flow control --------------------------------------------------------------------------


def test_window_scaling_limits_flight():
    c = Client(wscale=7)
    link = mk(wscale=2)
    t = link.target
    establish(link, c)
    link.respond(t.ack(window=100))  # 100 << 2 = 400 bytes
    segs = [b"a" * 300, b"b" * 300, b"c" * 300]
    out = link.client(*(c.data(s) for s in segs))
    assert [p.payload for p in out] == [segs[0]]
    out = link.respond(t.ack(window=100))  # acks 300: 400 more
    assert [p.payload for p in out] == [segs[1]]
    out = link.respond(t.ack(window=100))
    assert [p.payload for p in out] == [segs[2]]


def test_no_window_scaling_unless_both_syns_carry_it():
    c = Client(wscale=None)
    link = mk(wscale=2)
    t = link.target
    establish(link, c)
    link.respond(t.ack(window=400))  # not scaled: 400 bytes
    out = link.client(c.data(b"a" * 300), c.data(b"b" * 300))
    assert len(out) == 1


def test_small_window_with_nothing_in_flight_sends_what_fits():
    c = Client(wscale=None)
    link = mk(wscale=None)
    t = link.target
    establish(link, c)
    link.respond(t.ack(window=100))
    req = c.data(b"z" * 250)
    out = link.client(req)
    assert [(p.seq, p.payload) for p in out] == [(req.seq, b"z" * 100)]
    out = link.respond(t.ack(window=100))
    assert [(p.seq, p.payload) for p in out] == [(req.seq + 100, b"z" * 100)]
    out = link.respond(t.ack(window=100))
    assert [(p.seq, p.payload, p.flags) for p in out] == [(req.seq + 200, b"z" * 50, PSH | ACK)]


def test_zero_window_stops_probes_and_reopens():
    c = Client(wscale=None)
    link = mk(wscale=None)
    t = link.target
    establish(link, c, rtt=0.01)
    (d1,) = link.client(c.data(REQ1))
    link.now = 0.1
    link.respond(t.ack(window=0))  # acks REQ1, window closed
    assert link.client(c.data(b"more")) == []  # a continuation, but no window
    probe_at = link.session.get_timer()
    assert probe_at >= 0.1 + RTO_MIN_S  # the persist timer runs on the RTO
    out = link.run(probe_at)
    probes = [p for p in out if p.flags == ACK]
    assert len(probes) == 1
    assert (probes[0].seq, probes[0].payload) == (d1.seq + len(REQ1) - 1, b"")
    assert counters(link)["window probe"] == 1
    # QUIRK fixed (spec §3.8): a window update that acks everything reopens the window.
    link.now = 0.2
    out = link.respond(t.ack(window=1000))
    assert [p.payload for p in out] == [b"more"]


# -- the captured client stream ------------------------------------------------------------


def test_captured_gap_holds_until_filled():
    c = Client()
    link = mk()
    establish(link, c)
    p1, p2, p3 = c.data(b"1" * 10), c.data(b"2" * 10), c.data(b"3" * 10)
    assert [p.payload for p in link.client(p1, p3)] == [b"1" * 10]
    assert counters(link)["client gap"] == 1
    assert link.session.unsend == 1
    assert [p.payload for p in link.client(p2)] == [b"2" * 10, b"3" * 10]
    assert bytes(link.target.data) == b"1" * 10 + b"2" * 10 + b"3" * 10


def test_captured_gap_filled_before_the_wait_is_not_abandoned():
    c = Client()
    link = mk()
    establish(link, c)
    p1, p2, p3 = c.data(b"1" * 10), c.data(b"2" * 10), c.data(b"3" * 10)
    link.client(p1, p3)
    link.respond(link.target.ack())
    assert link.session.get_timer() == pytest.approx(link.now + CLIENT_GAP_WAIT_S)
    assert link.advance(CLIENT_GAP_WAIT_S * 0.9) == []
    assert [p.payload for p in link.client(p2)] == [b"2" * 10, b"3" * 10]
    link.run(link.now + 2 * CLIENT_GAP_WAIT_S)
    assert counters(link)["client gap abandoned"] == 0
    assert counters(link)["reconnect"] == 0
    assert bytes(link.target.data) == b"1" * 10 + b"2" * 10 + b"3" * 10


def keepalive_with_lost_request(lost: int, n: int = 6):
    """A keep-alive connection of n request/response turns (300-byte responses) whose
    request ``lost`` the capture never saw; every request after it is captured."""
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)
    reqs = [c.data(b"GET /%d HTTP/1.1\r\n\r\n" % i, read=300 * i) for i in range(n)]
    for req in reqs[:lost]:
        assert [p.payload for p in link.client(req)] == [req.payload]
        link.now += 0.001
        link.respond(t.send(300))
    link.now += 0.001
    link.client(*reqs[lost + 1 :])  # the capture dropped reqs[lost]
    return link, c, reqs


def test_captured_gap_never_filled_reconnects_from_the_next_segment():
    # A keep-alive stream whose capture lost one request (ring overflow): C holds the
    # session until -t and every later request piles up (QUIRK fixed, spec §3.7 step 6d).
    link, _c, reqs = keepalive_with_lost_request(lost=2)
    s = link.session
    t = link.target
    assert s.unsend == 3
    assert counters(link)["client gap"] == 1
    held_at = link.now
    out = link.run(held_at + CLIENT_GAP_WAIT_S - 0.01)
    assert [p.flags for p in out] == [ACK]  # the delayed ACK of the last response, no more
    assert counters(link)["client gap abandoned"] == 0
    assert s.get_timer() == pytest.approx(held_at + CLIENT_GAP_WAIT_S)
    out = link.run(held_at + CLIENT_GAP_WAIT_S)
    # The target's side is reset where it stands, then a faked handshake from reqs[3].
    assert [p.flags for p in out] == [RST | ACK, SYN]
    assert (out[0].seq, out[0].ack) == (reqs[2].seq, t.snd_nxt)
    syn = out[1]
    assert (syn.seq, syn.options) == (reqs[3].seq - 1, packet.build_options(mss=1460))
    assert counters(link)["client gap abandoned"] == 1
    assert counters(link)["reconnect"] == 1
    assert RouteNeeded(*FAKE_CLIENT, *TARGET) in link.events()
    link.target = t2 = Target(isn=777)
    t2.observe(syn)
    out = link.respond(t2.synack())
    # The gate starts over: the first request goes at once (acking the SYN-ACK itself),
    # each later one after its answer.
    assert [(p.flags, p.payload) for p in out] == [(PSH | ACK, reqs[3].payload)]
    for req in reqs[4:]:
        link.now += 0.001
        assert [p.payload for p in link.respond(t2.send(300)) if p.payload] == [req.payload]
    link.now += 0.001
    link.respond(t2.send(300))
    assert s.unsend == 0
    assert bytes(t2.data) == b"".join(r.payload for r in reqs[3:])
    assert s.state is State.ESTABLISHED
    assert counters(link)["requests"] == 5  # all but the lost one


def test_captured_gap_waits_for_data_in_flight_before_reconnecting():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)
    link.client(c.data(REQ1))
    link.now += 0.001
    acked = t.rcv_nxt
    link.respond(t.send(300))
    req2 = c.data(REQ2, read=300)
    (d2,) = link.client(req2)
    c.data(b"lost", read=300)  # the capture dropped this continuation
    req3 = c.data(b"GET /c HTTP/1.1\r\n\r\n", read=600)
    link.now += 0.001
    link.respond(t.send(300, ack=acked))  # answers REQ2 but acks only REQ1: REQ2 in flight
    assert link.client(req3) == []
    held_at = link.now
    out = link.run(held_at + CLIENT_GAP_WAIT_S)
    # Sent data is never thrown away: the retransmission goes on, the reconnect waits.
    retx = [p for p in out if p.payload]
    assert retx and all((p.seq, p.payload) == (d2.seq, REQ2) for p in retx)
    assert not any(p.flags & (SYN | RST) for p in out)
    assert counters(link)["client gap abandoned"] == 0
    link.respond(t.ack())  # REQ2 acknowledged at last
    out = link.run(link.session.get_timer())
    assert [p.flags for p in out if p.flags != ACK] == [RST | ACK, SYN]
    assert out[-1].seq == req3.seq - 1
    assert counters(link)["client gap abandoned"] == 1


def test_captured_gap_before_the_fin_closes_at_what_was_sent():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)
    link.client(c.data(REQ1))
    link.respond(t.send(300))
    c.data(REQ2, read=300)  # lost by the capture
    fin = c.fin(read=300)
    assert link.client(fin) == []
    assert counters(link)["client gap"] == 1
    out = link.run(link.now + CLIENT_GAP_WAIT_S)
    sent = [(p.flags, p.seq) for p in out if p.flags != ACK]
    assert sent == [(FIN | ACK, fin.seq - len(REQ2))]  # the FIN, at the end of what was sent
    assert counters(link)["client gap abandoned"] == 1
    link.respond(t.fin())
    assert link.events()[-1] == SessionEnded("closed")


def test_captured_overlap_is_trimmed_and_retransmission_skipped():
    c = Client()
    link = mk()
    establish(link, c)
    p1 = c.data(b"A" * 100)
    (_d1,) = link.client(p1)
    assert link.client(p1) == []  # a client retransmission
    assert counters(link)["total cont retransmit"] == 1
    assert counters(link)[drop_key(DropReason.CLIENT_RETRANSMIT)] == 1
    over = c._pkt(p1.seq + 50, p1.ack, PSH | ACK, b"A" * 50 + b"B" * 50)
    (d2,) = link.client(over)
    assert (d2.seq, d2.payload) == (p1.seq + 100, b"B" * 50)
    assert counters(link)["client overlap"] == 1


def test_reordered_capture_is_sent_in_order():
    c = Client()
    link = mk()
    link.client(c.syn())
    third = c.ack()
    p1, p2, p3 = c.data(b"1" * 5), c.data(b"2" * 5), c.data(b"3" * 5)
    link.client(p3, p1, third, p2, p2)
    out = link.respond(link.target.synack())
    # The captured third ACK is not sent: the first segment carries the same ack.
    assert [p.payload for p in out] == [b"1" * 5, b"2" * 5, b"3" * 5]
    assert counters(link)[drop_key(DropReason.CLIENT_RETRANSMIT)] == 1


def test_pure_ack_of_established_session_dropped():
    c = Client()
    link = mk()
    establish(link, c)
    assert link.client(c.ack(read=0)) == []
    assert counters(link)[drop_key(DropReason.PURE_ACK)] == 1


def test_mtu_split_of_oversized_capture():
    cfg = SessionConfig(mtu=576)
    c = Client(ts=7)
    link = mk(cfg)
    establish(link, c)
    big = c.data(bytes(range(256)) * 6)  # 1536 bytes: a GRO aggregate
    out = link.client(big)
    room = 576 - 40 - len(big.options)
    assert [len(p.payload) for p in out] == [room, room, 1536 - 2 * room]
    assert [p.seq for p in out] == [big.seq, big.seq + room, big.seq + 2 * room]
    assert [p.flags for p in out] == [ACK, ACK, PSH | ACK]
    assert b"".join(p.payload for p in out) == big.payload


def test_truncated_capture_is_padded_and_counted():
    c = Client()
    link = mk()
    establish(link, c)
    p = c.data(b"abc")
    p.data_len = 6
    (d,) = link.client(p)
    assert d.payload == b"abc\x00\x00\x00"
    assert counters(link)["client_truncated"] == 1


# -- retransmission to the target ----------------------------------------------------------


def test_fast_retransmit_on_three_dup_acks():
    c = Client(wscale=None)
    link = mk(wscale=None)
    t = link.target
    establish(link, c)
    link.respond(t.ack())  # the target's window as in its later ACKs (dup acks repeat it)
    link.lose = 1
    segs = [bytes([65 + i]) * 100 for i in range(5)]
    sent = link.client(*(c.data(s) for s in segs))
    assert len(sent) == 5
    dup = t.ack()
    assert dup.ack == sent[0].seq  # the target still waits for the first
    out = []
    for _ in range(DUP_ACK_THRESHOLD):
        out += link.respond(t.ack())
    assert [(p.seq, p.payload) for p in out] == [(sent[0].seq, segs[0])]
    assert counters(link)["fast retransmit"] == 1
    assert counters(link)["retransmit"] == 1
    # The target now has everything in order.
    link.respond(t.ack())
    assert bytes(t.data) == b"".join(segs)


def test_partial_ack_retransmits_next_hole():
    c = Client(wscale=None)
    link = mk(wscale=None)
    t = link.target
    establish(link, c)
    link.respond(t.ack())
    segs = [bytes([65 + i]) * 100 for i in range(4)]
    link.lose = 2  # the first two are lost
    sent = link.client(*(c.data(s) for s in segs))
    for _ in range(DUP_ACK_THRESHOLD):
        link.respond(t.ack())
    # After the retransmission of seg 0 the target acks up to seg 1 (still missing).
    (r,) = link.respond(t.ack(ack=sent[1].seq))
    assert (r.seq, r.payload) == (sent[1].seq, segs[1])


def test_rto_backoff_and_retry_limit():
    c = Client()
    link = mk()
    establish(link, c, rtt=0.01)  # srtt 10 ms: RTO clamps to RTO_MIN_S
    link.now = 1.0
    link.lose = 100
    (d,) = link.client(c.data(REQ1))
    link.run(100.0)
    retx = [e for e in link.log if e.pkt.payload == REQ1][1:]
    assert len(retx) == RETRIES_MAX
    gaps = [
        round(b.at - a.at, 6) for a, b in zip([link.log[-len(retx) - 2], *retx], retx, strict=False)
    ]
    expect = [min(RTO_MIN_S * 2**i, RTO_MAX_S) for i in range(RETRIES_MAX)]
    assert gaps == pytest.approx(expect)
    assert all(e.pkt.seq == d.seq for e in retx)
    events = link.events()
    assert events[-1] == SessionEnded("retransmit_limit")
    last = link.log[-1].pkt
    assert (last.flags, last.seq) == (RST | ACK, d.seq)


def test_rto_retransmits_and_recovers():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c, rtt=0.01)
    link.lose = 1
    (_d,) = link.client(c.data(REQ1))
    out = link.run(RTO_MIN_S + 0.011)
    assert [p.payload for p in out] == [REQ1]
    link.respond(t.send(10))
    assert counters(link)["recv packs after retransmission"] == 1
    (a,) = link.run(link.now + DELAYED_ACK_S)
    assert a.flags == ACK
    assert link.session.get_timer() > 100  # nothing in flight: only the keepalive timer


def test_bad_ack_is_dropped_and_acked():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)
    (a,) = link.respond(t.ack(ack=c.seq + 5000))
    assert a.flags == ACK
    assert counters(link)[drop_key(DropReason.BAD_ACK)] == 1


# -- closing -------------------------------------------------------------------------------


def test_target_fin_without_unsent_data_acks_then_resets():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)
    link.client(c.data(REQ1))
    link.events()
    out = link.respond(t.send(300, fin=True))
    assert [(p.flags, p.ack) for p in out] == [(ACK, t.snd_nxt), (RST | ACK, t.snd_nxt)]
    assert out[1].seq == c.seq
    assert link.events() == [SessionEnded("target_closed")]
    assert counters(link)["resp fin"] == 1


def test_target_fin_with_unsent_data_reconnects():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)
    link.client(c.data(REQ1))
    link.events()
    req2 = c.data(REQ2, read=300)
    assert link.client(req2) == []  # held by the gate
    out = link.respond(t.send(250, fin=True))  # the target closed (keepalive timeout)
    assert [p.flags for p in out] == [ACK, RST | ACK, SYN]
    assert link.events() == [RouteNeeded(*FAKE_CLIENT, *TARGET)]
    syn = out[2]
    assert (syn.seq, syn.options) == (req2.seq - 1, packet.build_options(mss=1460))
    assert counters(link)["reconnect"] == 1
    t2 = Target(isn=777)
    link.target = t2
    t2.observe(syn)
    out = link.respond(t2.synack())
    assert [(p.flags, p.payload) for p in out] == [(PSH | ACK, REQ2)]
    assert out[0].window == 65535 and out[0].ack == t2.isn + 1


def test_target_rst_with_unsent_data_reconnects_else_ends():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)
    link.client(c.data(REQ1))
    req2 = c.data(REQ2, read=300)
    link.client(req2)
    out = link.respond(t.rst())
    assert [(p.flags, p.seq) for p in out] == [(SYN, req2.seq - 1)]
    link.target = t2 = Target(isn=42)
    t2.observe(out[0])
    link.respond(t2.synack())
    link.respond(t2.ack())
    link.respond(t2.rst())
    assert link.events()[-1] == SessionEnded("target_reset")


def test_a_reconnect_reset_before_any_answer_is_not_reconnected_again():
    c = Client()
    link = mk()
    link.client(c.syn(), c.ack(), c.data(REQ1))
    # A target that takes the connection but never opens its window, then resets it.
    link.respond(link.target.synack(window=0))
    for i in range(10):
        t = Target(isn=1000 * (i + 1))
        out = link.respond(link.target.rst())
        if link.session.lingering:
            break
        assert out[-1].flags == SYN
        link.target = t
        t.observe(out[-1])
        link.respond(t.synack(window=0))
    assert counters(link)["reconnect"] == 1
    assert counters(link)["reconnect_refused_unanswered"] == 1
    assert link.events()[-1] == SessionEnded("target_reset")


def test_reconnect_budget_caps_answered_reconnects():
    cfg = SessionConfig(reconnect_budget=2)
    c = Client()
    link = mk(cfg)
    establish(link, c)
    link.client(c.data(REQ1))
    read = 0
    for i in range(3):
        read += 100
        link.client(c.data(b"GET /%d HTTP/1.1\r\n\r\n" % i, read=read))
    for i in range(4):
        # The target answers, then closes with the next request still unsent.
        out = link.respond(link.target.send(50, fin=True))
        if link.session.lingering:
            break
        assert out[-1].flags == SYN
        link.target = t = Target(isn=1000 * (i + 1))
        t.observe(out[-1])
        link.respond(t.synack())
    assert counters(link)["reconnect"] == 2
    assert counters(link)["reconnect_refused_budget"] == 1
    assert link.events()[-1] == SessionEnded("target_closed")
    assert counters(link)["unsend dropped"] == 1


def test_no_reconnect_flag_ends_the_session():
    cfg = SessionConfig(reconnect=False)
    c = Client()
    link = mk(cfg)
    establish(link, c)
    link.client(c.data(REQ1), c.data(REQ2, read=300))
    out = link.respond(link.target.send(250, fin=True))
    assert not [p for p in out if p.flags & SYN]
    assert counters(link)["reconnect"] == 0
    assert counters(link)["reconnect_refused_off"] == 1
    assert link.events()[-1] == SessionEnded("target_closed")


def test_reconnect_starts_at_a_request_boundary():
    """The target closed in the middle of a request's segments: the new connection starts at
    the next request, never with the rest of the cut one (a database would take it for a
    startup packet)."""
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)
    link.client(c.data(REQ1))
    link.respond(t.send(300))
    link.now += 0.01
    # REQ2 in three segments (one ack); the target closes after the first one.
    parts = [b"a" * 100, b"b" * 100, b"c" * 100]
    link.lose = 0
    segs = [c.data(p, read=300) for p in parts]
    out = link.client(segs[0])
    assert [p.payload for p in out] == [parts[0]]
    req3 = c.data(REQ1, read=600)
    link.session.receive_client(segs[1], link.now)  # captured, not yet sent
    link.session.receive_client(segs[2], link.now)
    link.session.receive_client(req3, link.now)
    out = link.respond(t.send(0, fin=True))
    syns = [p for p in out if p.flags & SYN]
    assert [p.seq for p in syns] == [req3.seq - 1]
    assert counters(link)["reconnect_skipped_bytes"] == 200
    link.target = t2 = Target(isn=4242)
    t2.observe(syns[0])
    out = link.respond(t2.synack())
    assert [p.payload for p in out if p.payload] == [REQ1]


def test_client_fin_waits_for_ack_and_gate_then_clean_close():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)
    link.lose = 1
    (_d,) = link.client(c.data(REQ1))
    fin = c.fin(read=300)
    assert link.client(fin) == []
    assert link.respond(t.ack()) == []  # REQ1 not acked yet (it was lost)
    out = link.run(link.now + RTO_MIN_S)  # the RTO resends it
    assert [p.payload for p in out] == [REQ1]
    # acked; 200 < 300 online bytes: the FIN waits (the data is acked at once meanwhile)
    assert [p.flags for p in link.respond(t.send(200))] == [ACK]
    (f,) = link.respond(t.send(100))
    assert (f.flags, f.seq, f.ack) == (FIN | ACK, fin.seq, t.snd_nxt)
    assert link.session.state is State.FIN_WAIT
    (a,) = link.respond(t.fin())
    assert (a.flags, a.seq, a.ack) == (ACK, fin.seq + 1, t.snd_nxt)
    assert link.events()[-1] == SessionEnded("closed")
    assert counters(link)["fin"] == 1
    # linger: the target's FIN again is acked, stray data gets a RST
    (a2,) = link.respond(t._pkt(t.snd_nxt - 1, FIN | ACK))
    assert (a2.flags, a2.ack) == (ACK, t.snd_nxt)
    (r,) = link.respond(t.send(10))
    assert r.flags == RST | ACK
    assert counters(link)[drop_key(DropReason.STRAY_RESPONSE)] == 1


def test_fin_with_data_and_target_fin_first():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)
    link.client(c.data(REQ1))
    fin = c.fin(read=300)
    link.client(fin)
    # The target answers and closes before our FIN went out: our FIN answers theirs.
    out = link.respond(t.send(300, fin=True))
    assert [(p.flags, p.seq, p.ack) for p in out] == [(FIN | ACK, fin.seq, t.snd_nxt)]
    assert link.events()[-1] == SessionEnded("closed")
    assert link.respond(t.ack(ack=fin.seq + 1)) == []  # the last ACK is the expected end


def test_fin_wait_timeout():
    cfg = SessionConfig(fin_wait_timeout_s=5.0)
    c = Client()
    link = mk(cfg)
    t = link.target
    establish(link, c)
    link.client(c.data(REQ1))
    link.client(c.fin())
    (f,) = link.respond(t.ack())
    assert f.flags == FIN | ACK
    link.respond(t.ack())
    out = link.run(link.now + 5.0)
    assert [p.flags for p in out] == [RST | ACK]
    assert link.events()[-1] == SessionEnded("fin_wait_timeout")


def test_client_rst_held_while_response_pending_then_clamped():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)
    link.client(c.data(REQ1))
    rst = c._pkt(c.seq + 1000, c.online_ack(300), RST | ACK)
    assert link.client(rst) == []  # the response is pending
    (r,) = link.respond(t.send(300))
    assert (r.flags, r.seq, r.ack) == (RST | ACK, c.seq, t.snd_nxt)  # seq clamped
    assert link.events()[-1] == SessionEnded("client_reset")


def test_target_fin_retransmitted_is_acked_again():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)
    link.client(c.data(REQ1))
    link.client(c.fin(read=0))
    f = [p for p in link.respond(t.ack()) if p.flags & FIN]
    assert f
    link.respond(t.fin())
    assert link.session.lingering


# -- timestamps ----------------------------------------------------------------------------


def test_timestamps_rewritten_monotonic_and_echo_target():
    c = Client(ts=5000)
    link = mk(ts=9000)
    t = link.target
    establish(link, c)
    link.now = 1.5
    link.client(c.data(REQ1))
    assert ts_of(link.log[-1].pkt)[0] == ts_clock(1.5)  # our clock, not the captured 5000
    r = t.send(10)
    link.respond(r)
    echo = ts_of(r)[0]
    # The captured TSval (low or high) does not matter: ours follows the shared TS clock.
    link.now = 2.25
    low = c.data(b"x", options=packet.build_options(timestamp=(10, 0)))
    (d,) = link.client(low)
    assert ts_of(d) == (ts_clock(2.25), echo)
    link.now = 2.0  # a clock step back never makes the TSval go backwards (PAWS)
    higher = c.data(b"y", options=packet.build_options(timestamp=(999999, 0)))
    (d2,) = link.client(higher)
    assert ts_of(d2) == (ts_clock(2.25), echo)
    assert link.session.ts_last == ts_clock(2.25)


def test_a_response_with_two_ts_options_echoes_the_first():
    """tcpseq.tsval: a record whose options start NOP, NOP, TS reads that TSval (the fast
    path), even when another TS option follows."""
    c = Client(ts=5000)
    link = mk(ts=9000)
    t = link.target
    establish(link, c)
    first, last = 20000, 30000  # the last is newer: a walk of the options would take it
    opts = packet.build_options(timestamp=(first, 0)) + packet.build_options(timestamp=(last, 0))
    link.respond(t.send(10, options=opts))
    link.now = 1.0
    (d,) = link.client(c.data(REQ1))
    assert ts_of(d)[1] == first


# -- timeouts and linger -------------------------------------------------------------------


def test_session_timeout_with_pending_work():
    cfg = SessionConfig(session_timeout_s=10.0, keepalive_timeout_s=30.0, response_wait_max_s=100)
    c = Client()
    link = mk(cfg)
    establish(link, c)
    link.client(c.data(REQ1))
    link.respond(link.target.ack())
    link.client(c.data(REQ2, read=500))  # held: no response ever comes
    link.run(9.9)
    assert not link.session.lingering
    link.run(10.1)
    assert link.events()[-1] == SessionEnded("timeout")
    assert counters(link)["obs del"] == 1
    assert link.log[-1].flags == RST | ACK


def test_keepalive_timeout_when_idle():
    cfg = SessionConfig(session_timeout_s=10.0, keepalive_timeout_s=30.0)
    c = Client()
    link = mk(cfg)
    establish(link, c)
    link.client(c.data(REQ1))
    link.respond(link.target.ack())
    link.run(29.0)
    assert not link.session.lingering
    link.run(31.0)
    assert link.events()[-1] == SessionEnded("idle")


def test_linger_resets_stray_responses_then_finishes():
    cfg = SessionConfig(linger_s=6.0)
    c = Client()
    link = mk(cfg)
    t = link.target
    establish(link, c)
    link.client(c.data(REQ1))
    link.client(c.rst())
    link.events()
    assert link.session.lingering
    stray = t.send(100)
    (r,) = link.respond(stray)
    assert (r.flags, r.seq, r.ack) == (RST | ACK, stray.ack, stray.seq + 100)
    assert link.client(c.data(b"late")) == []
    assert counters(link)[drop_key(DropReason.SESSION_CLOSED)] == 1
    end = link.now + 6.0
    link.run(end - 0.01)
    assert not link.session.finished
    link.run(end)
    assert link.session.finished and link.session.get_timer() is None


def test_response_before_handshake_gets_rst():
    link = mk()
    c = Client()
    link.client(c.syn())
    stray = link.target._pkt(123, ACK, 10, ack=c.isn + 77)
    (r,) = link.respond(stray)
    assert (r.flags, r.seq, r.ack) == (RST | ACK, c.isn + 77, 133)


def test_is_later_data_and_owns_syn():
    c = Client()
    link = mk()
    s = link.session
    syn = c.syn()
    link.client(syn)
    assert s.owns_syn(syn.seq) and not s.owns_syn(syn.seq + 1)
    assert s.syn_seq == syn.seq
    link.client(c.syn())
    assert counters(link)[drop_key(DropReason.SYN_RETRANSMIT)] == 1
    establish_rest = link.respond(link.target.synack())
    assert establish_rest
    link.client(c.data(REQ1), c.rst())
    assert s.lingering
    assert s.is_later_data(c.data(b"new"))
    old = c._pkt(syn.seq + 1, 0, PSH | ACK, b"old")
    assert not s.is_later_data(old)


def test_midstream_syn_adopted_when_captured_late():
    c = Client()
    link = mk()
    req = c.data(REQ1)
    s = link.session
    s.receive_client(req, 0.0)  # not flushed yet: nothing sent
    syn = c._pkt(req.seq - 1, 0, SYN, options=packet.build_options(mss=1400))
    assert s.owns_syn(syn.seq)
    (p,) = link.client(syn)
    assert (p.flags, p.options) == (SYN, syn.options)  # the real SYN, not a faked one


def test_counters_fidelity_and_send_names():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)
    link.client(c.data(b"a" * 100), c.data(b"b" * 50))
    link.respond(t.ack())
    k = counters(link)
    assert k["client_bytes_captured"] == 150
    assert k["client_bytes_acked"] == 150
    assert k["send syn"] == 1 and k["send content"] == 2
    assert k["send"] == 4  # SYN, third ACK, two data
    assert k["resp"] == 2


@pytest.mark.reference_only
def test_internal_error_aborts_session(monkeypatch):
    monkeypatch.setattr(TcpSession, "strict", False)
    c = Client()
    link = mk()
    establish(link, c)

    def boom(*a, **k):
        raise ValueError("bug")

    monkeypatch.setattr(TcpSession, "_process_ack", boom)
    link.respond(link.target.ack())
    assert counters(link)[drop_key(DropReason.INTERNAL_ERROR)] == 1
    assert link.events()[-1] == SessionEnded("aborted")


@pytest.mark.reference_only
def test_illegal_transition_raises():
    s = TcpSession(SessionConfig(), client=FAKE_CLIENT, target=TARGET)
    with pytest.raises(RuntimeError):
        s._set_state(State.FIN_WAIT)


def test_outcome_values_are_labels():
    assert {o.value for o in Outcome} >= {"closed", "retransmit_limit", "timeout", "idle"}
    assert all(r.value == r.value.lower() for r in DropReason)
    assert dataclasses.is_dataclass(SessionConfig)
    assert FAKED_TTL == 64 and FAKED_WINDOW == 65535


# -- edge paths ----------------------------------------------------------------------------


def test_karn_no_rtt_sample_from_retransmitted_syn_keeps_initial_rto():
    from engine.core.session import RTO_INITIAL_S

    c = Client()
    link = mk()
    t = link.target
    link.client(c.syn(), c.ack())
    link.run(SYN_RTO_INITIAL_S)  # the SYN is retransmitted
    link.now = 0.6
    link.respond(t.synack())  # ambiguous sample (which SYN?): none taken
    link.lose = 1
    (d,) = link.client(c.data(REQ1))
    out = link.run(0.6 + RTO_INITIAL_S)
    assert [(p.seq, p.payload) for p in out] == [(d.seq, REQ1)]
    assert link.log[-1].at == pytest.approx(0.6 + RTO_INITIAL_S)


def test_partly_acked_segment_retransmits_the_rest():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c, rtt=0.01)
    link.lose = 1
    (d,) = link.client(c.data(b"Q" * 1000))
    link.respond(t.ack(ack=d.seq + 400))
    out = link.run(link.session.get_timer())
    assert [(p.seq, p.payload) for p in out] == [(d.seq + 400, b"Q" * 600)]


def test_odd_client_inputs_have_drop_reasons():
    c = Client()
    link = mk()
    s = link.session
    link.client(c.ack())  # a pure ACK cannot start a session
    assert counters(link)[drop_key(DropReason.NO_SESSION)] == 1
    link.client(c._pkt(c.isn, 0, SYN | ACK))
    assert counters(link)[drop_key(DropReason.SYN_CONFLICT)] == 1
    syn = c.syn()
    link.client(syn)
    link.client(c._pkt(c.isn + 5, 0, SYN))  # another SYN: not ours
    assert counters(link)[drop_key(DropReason.SYN_CONFLICT)] == 2
    link.client(c._pkt(c.isn - 100, 0, PSH | ACK, b"old"))
    assert counters(link)[drop_key(DropReason.OLD_SEGMENT)] == 1
    link.client(c.data(b"a"))
    fin = c.fin()
    link.client(fin, fin)
    assert counters(link)[drop_key(DropReason.CLIENT_RETRANSMIT)] == 1
    link.client(c._pkt(fin.seq + 1, 0, PSH | ACK, b"z"))
    assert counters(link)[drop_key(DropReason.AFTER_FIN)] == 1
    rst = c.rst()
    link.client(rst, rst)
    assert counters(link)[drop_key(DropReason.CLIENT_RETRANSMIT)] == 2
    assert s.unsend == 3  # data, FIN, RST


def test_reordered_duplicate_is_dropped_on_arrival():
    c = Client()
    link = mk()
    link.client(c.syn())
    p1, p2 = c.data(b"1" * 5), c.data(b"2" * 5)
    link.client(p2, p1, p1)
    assert link.session.unsend == 2
    assert counters(link)[drop_key(DropReason.CLIENT_RETRANSMIT)] == 1


def test_client_rst_without_ack_flag():
    c = Client()
    link = mk()
    establish(link, c)
    link.client(c.data(REQ1))
    link.respond(link.target.ack())
    (r,) = link.client(c._pkt(c.seq, c.online_ack(0), RST))
    assert (r.flags, r.seq, r.ack) == (RST, c.seq, 0)


def test_timestamp_option_not_first_is_still_rewritten():
    c = Client(ts=50)
    link = mk(ts=9000)
    establish(link, c)
    sack = b"\x01\x01\x05\x0a" + (123).to_bytes(4, "big") + (456).to_bytes(4, "big")
    opts = sack + packet.build_options(timestamp=(777, 1))
    (d,) = link.client(c.data(b"q", options=opts))
    assert d.options[:12] == sack
    assert ts_of(d) == (ts_clock(link.now), 9000)


def test_response_data_far_outside_window_is_dropped_and_acked():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)
    far = t._pkt(t.snd_nxt + 50_000_000, PSH | ACK, 100)
    (a,) = link.respond(far)
    assert (a.flags, a.ack) == (ACK, t.snd_nxt)
    assert counters(link)[drop_key(DropReason.OUT_OF_WINDOW)] == 1


def test_rst_before_handshake_and_stray_rst_in_syn_sent():
    c = Client()
    link = mk()
    link.client(c.syn())
    stray_rst = link.target._pkt(5, RST | ACK, ack=999, options=b"")
    assert link.respond(stray_rst) == []  # not for our SYN: ignored
    assert counters(link)[drop_key(DropReason.UNEXPECTED_RESPONSE)] == 1
    assert link.session.state is State.SYN_SENT


def test_rst_response_while_reconnecting_is_ignored():
    c = Client()
    link = mk()
    t = link.target
    establish(link, c)
    link.client(c.data(REQ1), c.data(REQ2, read=300))
    link.session.receive_response(t.rst(), link.now)  # -> CLOSED, SYN not yet built
    assert link.session.state is State.CLOSED
    link.session.receive_response(t.rst(), link.now)
    assert counters(link)[drop_key(DropReason.UNEXPECTED_RESPONSE)] == 1
    (syn,) = link.flush()
    assert syn.flags == SYN


@pytest.mark.reference_only
@pytest.mark.parametrize("method", ["_receive_client", "_handle_timer", "_packets_to_send"])
def test_internal_errors_never_escape(monkeypatch, method):
    monkeypatch.setattr(TcpSession, "strict", False)
    c = Client()
    link = mk()
    establish(link, c)

    def boom(*a, **k):
        raise KeyError("bug")

    monkeypatch.setattr(TcpSession, method, boom)
    s = link.session
    s.receive_client(c.data(b"x"), 1.0)
    s.handle_timer(1.0)
    s.packets_to_send(1.0)
    assert counters(link)[drop_key(DropReason.INTERNAL_ERROR)] >= 1
    assert s.lingering


@pytest.mark.reference_only
def test_internal_error_while_ending_still_lingers(monkeypatch):
    monkeypatch.setattr(TcpSession, "strict", False)
    link = mk()

    def boom(*a, **k):
        raise KeyError("bug")

    monkeypatch.setattr(TcpSession, "_receive_response", boom)
    monkeypatch.setattr(TcpSession, "_end", boom)
    link.session.receive_response(link.target.ack(), 2.0)
    assert link.session.lingering
    assert link.session.get_timer() == 2.0 + link.session.config.linger_s


def test_midstream_pure_ack_does_not_move_the_gate_origin():
    c = Client()
    link = mk()
    t = link.target
    d1 = c.data(REQ1, read=1000)  # mid-stream: the client had read 1000 bytes before
    link.client(d1)
    link.client(c.ack(read=1300))  # the client acks the online answer (300 bytes)
    link.respond(t.synack())
    assert link.client(c.data(REQ2, read=1300)) == []  # waits for the target's 300 bytes
    (d,) = link.respond(t.send(300))
    assert d.payload == REQ2


def test_pending_segment_covered_by_an_earlier_one_is_skipped_at_send_time():
    c = Client()
    link = mk()
    link.client(c.syn())
    big = c.data(b"B" * 150)
    prefix = c._pkt(big.seq, big.ack, PSH | ACK, b"B" * 100)
    link.client(big, prefix)  # both wait for the handshake
    out = link.respond(link.target.synack())
    assert [p.payload for p in out] == [b"B" * 150]
    assert counters(link)["total cont retransmit"] == 1


def test_tsval_never_goes_back_when_a_queued_ack_follows_a_newer_packet():
    """The target's FIN and its retransmission arrive in one batch while the client's FIN
    waits: our FIN (answering theirs) and the ACK of the retransmission leave in one drain,
    and the ACK's TSval is taken when it is built, not when it was queued (an older TSval
    after the FIN is dropped by the target's PAWS, in TIME_WAIT too)."""
    c = Client(ts=100)
    link = mk()
    t = link.target
    establish(link, c)
    link.now = 0.010
    link.client(c.data(REQ1))
    link.now = 0.020
    link.client(c.fin(read=0))  # captured before the response: waits for the gate
    data, fin = t.send(100), t.fin()
    for p in (data, fin, fin):  # the FIN's retransmission in the same batch
        link.session.receive_response(p, 0.050)
    link.now = 0.060  # the drain comes later (the worker read more input meanwhile)
    out = link.flush()
    assert [p.flags for p in out] == [FIN | ACK, ACK]
    sent = [ts_of(s.pkt)[0] for s in link.log]
    assert sent == sorted(sent)
    assert sent[-2:] == [ts_clock(0.060)] * 2
