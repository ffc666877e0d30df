"""SessionTable: flows, replicas, tuple allocation, response lookup, timers, drain.

Every test runs on both engines (tests/unit/engines.py): ``mk`` builds the table of the
engine the autouse fixture ``engine`` selects."""

from __future__ import annotations

import pytest

from engine.codec import packet
from engine.codec.packet import ACK, FIN, PSH, RST, SYN
from engine.core.config import SessionConfig
from engine.core.rewrite import TransferEntry, sample_keep, shift_port
from engine.core.session import CLIENT_GAP_WAIT_S, DropReason, RouteNeeded, TcpSession, drop_key
from engine.core.table import LOSS_GAP_WAIT_S, LOSS_RECENT_S, ClientRoute, SessionTable
from tests.paths import ONLINE_HTTP_PCAP
from tests.unit.engines import ENGINES, heap_size, table_class
from tests.unit.link import ONLINE, ORIG_CLIENT, TARGET, Client, TableLink, Target

POOL = (packet.ip_from_str("198.19.1.10"), packet.ip_from_str("198.19.1.11"))
XFER = (TransferEntry(ONLINE[0], ONLINE[1], TARGET[0], TARGET[1]),)
REQ = b"GET / HTTP/1.1\r\n\r\n"


TABLE: dict[int, type] = {0: SessionTable}


@pytest.fixture(autouse=True, params=ENGINES)
def engine(request, monkeypatch):
    monkeypatch.setattr(TcpSession, "strict", True)
    monkeypatch.setitem(TABLE, 0, table_class(request.param))
    return request.param


def mk(**kw) -> TableLink:
    kw.setdefault("transfers", XFER)
    return TableLink(TABLE[0](SessionConfig(**kw)))


def handshake(tl: TableLink, syns) -> None:
    for syn in syns:
        t = tl.target((syn.src, syn.sport))
        tl.respond(t.synack())


def test_one_flow_end_to_end_through_the_table():
    tl = mk(client_pool=POOL)
    c = Client()
    out = tl.client(c.syn(), c.ack())
    (syn,) = out
    (route,) = tl.routes
    assert isinstance(route, ClientRoute)
    assert route == RouteNeeded(syn.src, syn.sport, *TARGET)
    assert syn.src in POOL and (syn.dst, syn.dport) == TARGET
    t = tl.target((syn.src, syn.sport))
    out = tl.respond(t.synack())
    assert [p.flags for p in out] == [ACK]
    out = tl.client(c.data(REQ))
    assert [p.payload for p in out] == [REQ]
    assert tl.table.active == 1
    k = tl.table.counters
    assert k["syn cnt"] == 1 and k["all clt"] == 3 and k["clt cont"] == 1
    assert k["conns"] == 1


def test_replicas_make_distinct_sessions():
    tl = mk(replicas=3, client_pool=POOL, rand_shift=17)
    c = Client()
    syns = tl.client(c.syn())
    assert len(syns) == 3 and len(tl.routes) == 3
    tuples = {(p.src, p.sport) for p in syns}
    assert len(tuples) == 3
    assert tuples == {(r.client_ip, r.client_port) for r in tl.routes}
    assert all(p.seq == c.isn for p in syns)
    handshake(tl, syns)
    out = tl.client(c.ack(), c.data(REQ))
    assert sorted((p.src, p.sport) for p in out if p.payload) == sorted(tuples)
    assert tl.table.active == 3


def test_port_reuse_syn_starts_new_session_and_old_one_runs_on():
    tl = mk()
    c1 = Client(isn=1000)
    (syn1,) = tl.client(c1.syn())
    handshake(tl, [syn1])
    tl.client(c1.ack(), c1.data(REQ))
    # The load generator reuses the port for a new connection (a new ISN).
    c2 = Client(isn=900_000)
    (syn2,) = tl.client(c2.syn())
    assert (syn2.src, syn2.sport) != (syn1.src, syn1.sport)
    assert tl.table.counters["port reuse"] == 1
    assert tl.table.active == 2
    # The old session still gets its responses by its fake tuple.
    t1 = tl.target((syn1.src, syn1.sport))
    tl.respond(t1.send(100))
    assert tl.table.counters[drop_key(DropReason.UNKNOWN_RESPONSE)] == 0
    assert tl.table.counters["c-resp"] == 1
    # New client packets go to the new session only.
    handshake(tl, [syn2])
    out = tl.client(c2.ack(), c2.data(b"second"))
    assert [(p.sport, p.payload) for p in out if p.payload] == [(syn2.sport, b"second")]


def test_syn_retransmission_goes_to_the_same_session():
    tl = mk()
    c = Client()
    syn = c.syn()
    tl.client(syn)
    assert tl.client(syn) == []
    assert tl.table.active == 1
    assert tl.table.counters[drop_key(DropReason.SYN_RETRANSMIT)] == 1


def test_tuples_never_collide_within_time_wait_and_are_reused_after():
    tl = mk(time_wait_s=60.0, linger_s=1.0)
    used = []
    for i in range(20):
        c = Client(isn=1000 + 10_000 * i)  # the same original ip:port every time
        (syn,) = tl.client(c.syn())
        used.append((syn.src, syn.sport))
        t = tl.target((syn.src, syn.sport))
        tl.respond(t.synack())
        tl.client(c.ack(), c.data(REQ), c.rst())
        tl.now += 0.01
    assert len(set(used)) == 20
    assert used[0] == ORIG_CLIENT  # the preferred (captured) port first
    tl.run(tl.now + 2.0)  # linger over: all removed, tuples quarantined
    assert tl.table.active == 0
    assert tl.table.counters["rel"] == 20 and tl.table.counters["tw"] == 0
    c = Client(isn=5)
    (syn,) = tl.client(c.syn())
    assert (syn.src, syn.sport) not in used[:1]  # still in the target's TIME_WAIT
    tl.run(tl.now + 61.0)
    c = Client(isn=7)
    tl.table.receive_client(c.syn(), tl.now)  # port reuse of the live one: detached
    tl.drain()
    assert tl.routes[-1][:2] == ORIG_CLIENT  # the quarantine has expired


def test_drops_no_transfer_no_session_no_syn_and_client_syn_ack():
    tl = mk(fake_handshake=False)
    c = Client()
    other = Client(online=(ONLINE[0], 443))
    tl.client(other.syn())
    tl.client(c.ack())
    tl.client(c.data(REQ))
    synack = c._pkt(c.isn, 0, SYN | ACK)
    tl.client(synack)
    k = tl.table.counters
    assert k[drop_key(DropReason.NO_TRANSFER)] == 1
    assert k[drop_key(DropReason.NO_SESSION)] == 1
    assert k[drop_key(DropReason.NO_SYN)] == 1
    assert k[drop_key(DropReason.CLIENT_SYN_ACK)] == 1
    assert tl.table.active == 0


def test_midstream_flow_gets_faked_handshake():
    tl = mk()
    c = Client()
    req = c.data(REQ)
    (syn,) = tl.client(req)
    assert (syn.flags, syn.seq) == (SYN, req.seq - 1)


def test_sampling_per_flow():
    tl = mk(sample_percent=50)
    keep = [p for p in range(40000, 40200) if sample_keep(ORIG_CLIENT[0], p, 50)]
    drop = [p for p in range(40000, 40200) if not sample_keep(ORIG_CLIENT[0], p, 50)]
    assert keep and drop
    for port in (keep[0], drop[0]):
        c = Client(addr=(ORIG_CLIENT[0], port))
        tl.client(c.syn(), c.ack(), c.data(REQ))
    assert tl.table.active == 1
    # The dropped flow's SYN and data are sampled out; its pure ACK cannot start a session.
    assert tl.table.counters[drop_key(DropReason.SAMPLED_OUT)] == 2
    assert tl.table.counters[drop_key(DropReason.NO_SESSION)] == 1


def test_max_sessions_refuses_new_flows():
    tl = mk(max_sessions=2)
    for port in (40001, 40002, 40003):
        tl.client(Client(addr=(ORIG_CLIENT[0], port)).syn())
    assert tl.table.active == 2
    assert tl.table.counters["sessions refused"] == 1
    assert tl.table.counters[drop_key(DropReason.SESSION_LIMIT)] == 1


def test_unknown_response_dropped():
    tl = mk()
    stray = packet.TcpPacket(TARGET[0], ORIG_CLIENT[0], TARGET[1], 1234, 1, 2, ACK)
    tl.respond(stray)
    assert tl.table.counters[drop_key(DropReason.UNKNOWN_RESPONSE)] == 1


def test_timer_heap_drives_syn_retransmission():
    tl = mk()
    tl.client(Client().syn())
    assert tl.table.get_timer() == pytest.approx(0.5)
    tl.table.handle_timer(0.4)  # early: nothing due
    assert tl.table.drain() == ([], [])
    out = tl.run(0.5)
    assert [p.flags for p in out] == [SYN]


def test_get_timer_is_now_while_work_waits_for_drain():
    tl = mk()
    tl.now = 3.0
    tl.table.receive_client(Client().syn(), 3.0)
    assert tl.table.get_timer() == 3.0
    tl.drain()
    assert tl.table.get_timer() == pytest.approx(3.5)


def test_heap_does_not_grow_with_moving_idle_deadline():
    tl = mk()
    c = Client()
    (syn,) = tl.client(c.syn())
    handshake(tl, [syn])
    tl.client(c.ack(), c.data(REQ))
    t = tl.target((syn.src, syn.sport))
    for _ in range(200):
        tl.now += 0.1
        tl.respond(t.ack())  # each response moves the idle deadline later
    assert heap_size(tl.table) < 10


def test_lingering_flow_with_later_data_starts_new_session():
    tl = mk(linger_s=6.0)
    c = Client()
    (syn,) = tl.client(c.syn())
    handshake(tl, [syn])
    tl.client(c.ack(), c.data(REQ), c.rst())
    assert tl.table.lingering == 1
    late = c.data(b"more")
    (syn2,) = tl.client(late)
    assert (syn2.flags, syn2.seq) == (SYN, late.seq - 1)
    assert (syn2.src, syn2.sport) != (syn.src, syn.sport)
    assert tl.table.active == 2


def test_finished_session_removed_and_tuple_quarantined():
    tl = mk(linger_s=2.0, time_wait_s=60.0)
    c = Client()
    (syn,) = tl.client(c.syn())
    handshake(tl, [syn])
    tl.client(c.ack(), c.data(REQ), c.rst())
    assert tl.table.active == 1 and tl.table.counters["tw"] == 1
    tl.run(tl.now + 2.0)
    assert tl.table.active == 0 and tl.table.counters["tw"] == 0
    assert tl.table.counters["rel"] == 1
    assert tl.table.counters["ended_client_reset"] == 1
    assert not tl.table.allocator.is_free(syn.src, syn.sport, *TARGET, tl.now)
    assert tl.table.get_timer() is None


def test_unsend_aggregates_held_segments():
    tl = mk()
    c = Client()
    tl.client(c.syn(), c.ack(), c.data(b"a"), c.data(b"b"))
    assert tl.table.unsend == 2
    (syn,) = [e.pkt for e in tl.log if e.pkt.flags == SYN]
    handshake(tl, [syn])
    assert tl.table.unsend == 0


def _keepalive_with_hole(tl: TableLink, loss_noted: bool):
    c = Client()
    (syn,) = tl.client(c.syn(), c.ack())
    key = (syn.src, syn.sport)
    handshake(tl, [syn])
    reqs = [c.data(b"GET /%d HTTP/1.1\r\n\r\n" % i, read=100 * i) for i in range(4)]
    tl.client(reqs[0])
    tl.now += 0.001
    tl.respond(tl.target(key).send(100))
    if loss_noted:
        tl.table.note_capture_loss(tl.now)  # the ring read that brought reqs[2] was marked
    tl.client(*reqs[2:])  # reqs[1] was dropped at the full ring
    return key, reqs


@pytest.mark.parametrize("loss_noted", [True, False])
def test_a_hole_after_a_reported_ring_loss_is_given_up_at_once(loss_noted):
    # The capture marked the ring read (engine/io/ring.py RECORD_FLAG_LOSS_BEFORE): the hole is
    # that loss, so the session resynchronises after LOSS_GAP_WAIT_S, not a whole
    # CLIENT_GAP_WAIT_S; without the mark it still waits the second out (a reordering).
    tl = mk()
    _key, reqs = _keepalive_with_hole(tl, loss_noted)
    held_at = tl.now
    tl.run(held_at + LOSS_GAP_WAIT_S)
    out = [e.pkt for e in tl.log if e.at >= held_at and e.pkt.flags != ACK]
    k = tl.table.counters
    if loss_noted:
        assert [p.flags for p in out] == [RST | ACK, SYN]
        assert out[1].seq == reqs[2].seq - 1
        assert k["client gap ring loss"] == 1 and k["client gap abandoned"] == 1
    else:
        assert out == [] and k["client gap ring loss"] == 0
        tl.run(held_at + CLIENT_GAP_WAIT_S)
        out = [e.pkt for e in tl.log if e.at >= held_at and e.pkt.flags != ACK]
        assert [p.flags for p in out] == [RST | ACK, SYN]
    k = tl.table.counters  # the compiled table's is a snapshot
    assert k["client gap abandoned"] == 1


def test_a_reported_ring_loss_is_forgotten_after_loss_recent_s():
    tl = mk()
    tl.table.note_capture_loss(tl.now - LOSS_RECENT_S - 0.001)
    _key, _reqs = _keepalive_with_hole(tl, loss_noted=False)
    tl.run(tl.now + LOSS_GAP_WAIT_S)
    assert tl.table.counters["client gap ring loss"] == 0


def test_lost_captured_request_stalls_a_keepalive_flow_only_briefly():
    # The ring dropped one request of a keep-alive connection: the table's timer gives the
    # hole up after CLIENT_GAP_WAIT_S and the later requests replicate (not held until -t).
    tl = mk()
    c = Client()
    (syn,) = tl.client(c.syn(), c.ack())
    key = (syn.src, syn.sport)
    handshake(tl, [syn])
    reqs = [c.data(b"GET /%d HTTP/1.1\r\n\r\n" % i, read=100 * i) for i in range(5)]
    assert [p.payload for p in tl.client(reqs[0])] == [reqs[0].payload]
    tl.now += 0.001
    tl.respond(tl.target(key).send(100))
    tl.client(*reqs[2:])  # reqs[1] never captured
    assert tl.table.unsend == 3
    held_at = tl.now
    tl.run(held_at + CLIENT_GAP_WAIT_S)
    out = [e.pkt for e in tl.log if e.at >= held_at and e.pkt.flags != ACK]
    assert [p.flags for p in out] == [RST | ACK, SYN]
    assert out[1].seq == reqs[2].seq - 1
    tl.targets[key] = t2 = Target(isn=4242, addr=TARGET, client=key)
    t2.observe(out[1])
    sent = tl.respond(t2.synack())
    for _ in reqs[3:]:
        tl.now += 0.001
        sent += tl.respond(t2.send(100))
    tl.respond(t2.ack())
    assert [p.payload for p in sent if p.payload] == [r.payload for r in reqs[2:]]
    assert tl.table.unsend == 0
    k = tl.table.counters
    assert k["client gap abandoned"] == 1 and k["reconnect"] == 1
    assert k["client_bytes_acked"] == k["client_bytes_captured"] - len(reqs[1].payload)


def test_port_shift_gives_preferred_port():
    tl = mk(port_shift=2, rand_shift=5)
    c = Client()
    (syn,) = tl.client(c.syn())
    want = tl.table.allocator.preferred(shift_port(ORIG_CLIENT[1], 2, 5))
    assert syn.sport == want


def test_responses_routed_per_replica():
    tl = mk(replicas=2)
    c = Client()
    syns = tl.client(c.syn())
    handshake(tl, syns)
    tl.client(c.ack(), c.data(REQ))
    a, b = syns
    ta = tl.target((a.src, a.sport))
    out = tl.respond(ta.send(10, fin=True))
    assert {(p.sport, p.flags) for p in out} == {(a.sport, ACK), (a.sport, RST | ACK)}
    assert tl.table.counters["ended_target_closed"] == 1
    # The client's next request: replica b sends it; replica a (closed by its target) starts
    # over with a faked handshake on a fresh tuple, like a C session per replica (spec §3.6),
    # counted as the reconnect it is.
    tl.respond(tl.target((b.src, b.sport)).send(10))  # replica b's answer
    x = c.data(b"x", read=10)
    out = tl.client(x)
    assert [(p.sport, p.payload, p.flags) for p in out if p.sport == b.sport] == [
        (b.sport, b"x", PSH | ACK)
    ]
    (syn,) = [p for p in out if p.sport != b.sport]
    assert (syn.flags, syn.seq) == (SYN, x.seq - 1)
    assert syn.sport != a.sport
    assert tl.table.active == 3
    assert tl.table.counters["reconnect"] == 1


def test_later_data_after_the_target_closed_follows_the_reconnect_rules():
    """The -W PostgreSQL storm: the target closed the connection, the client went on, and
    every later packet started a new session in the middle of the stream.  Now the rest of a
    request never starts one, and after a new one was closed unanswered no more start."""
    tl = mk()
    c = Client()
    (syn,) = tl.client(c.syn())
    handshake(tl, [syn])
    tl.client(c.ack(), c.data(REQ))
    t = tl.target((syn.src, syn.sport))
    tl.respond(t.send(10, fin=True))
    assert tl.table.counters["ended_target_closed"] == 1
    assert tl.client(c.data(b"rest of the request")) == []  # same ack: no new session
    assert tl.table.counters["reconnect_skipped_bytes"] == len(b"rest of the request")
    out = tl.client(c.data(b"next request", read=10))
    (syn2,) = out
    assert syn2.flags == SYN and tl.table.counters["reconnect"] == 1
    handshake(tl, [syn2])
    t2 = tl.target((syn2.src, syn2.sport))
    tl.respond(t2.fin())  # closed before any answer
    for i in range(20):
        assert tl.client(c.data(b"q%d" % i, read=11 + i)) == []
    assert tl.table.counters["reconnect"] == 1
    assert tl.table.counters["reconnect_refused_unanswered"] == 1
    assert tl.table.counters["send syn"] == 2


def test_no_reconnect_also_stops_later_data_sessions():
    tl = mk(reconnect=False)
    c = Client()
    (syn,) = tl.client(c.syn())
    handshake(tl, [syn])
    tl.client(c.ack(), c.data(REQ))
    tl.respond(tl.target((syn.src, syn.sport)).send(10, fin=True))
    assert tl.client(c.data(b"next", read=10)) == []
    assert tl.table.counters["reconnect_refused_off"] == 1
    assert tl.table.counters["send syn"] == 1


def test_no_free_tuple_is_counted():
    # 64512 workers: each owns exactly one port, so a second flow toward the target from the
    # same address has nowhere to go.
    tl = mk(worker_count=64512, worker_index=0)
    tl.client(Client(addr=(ORIG_CLIENT[0], 40001)).syn())
    tl.client(Client(addr=(ORIG_CLIENT[0], 40002)).syn())
    assert tl.table.active == 1
    assert tl.table.counters[drop_key(DropReason.NO_TUPLE)] == 1


def test_replicas_with_port_shift_and_limit_on_replacement():
    tl = mk(replicas=2, port_shift=1, rand_shift=3, max_sessions=2)
    c = Client()
    syns = tl.client(c.syn())
    assert len({p.sport for p in syns}) == 2
    handshake(tl, syns)
    tl.client(c.ack(), c.data(REQ), c.rst())
    late = c.data(b"later")
    assert tl.client(late) == []  # both lingering; new sessions would exceed max_sessions
    assert tl.table.counters["sessions refused"] == 2


def test_stale_heap_entries_are_skipped():
    tl = mk()
    c = Client()
    (syn,) = tl.client(c.syn())  # scheduled at the SYN retransmission (0.5 s)
    tl.now = 0.001
    tl.respond(tl.target((syn.src, syn.sport)).synack())
    tl.client(c.ack(), c.data(REQ))  # the RTO (earlier) is pushed; 0.5 is now stale
    assert heap_size(tl.table) == 2
    out = tl.run(0.3)
    assert out and all(p.payload == REQ for p in out)  # retransmitted by the RTO
    assert tl.table.get_timer() > 0.3


def _online_capture():
    from engine.codec.pcapfile import open_pcap

    pkts = []
    with open_pcap(str(ONLINE_HTTP_PCAP)) as r:
        for ts, _, frame in r:
            pkts.append((ts, packet.parse_ip(frame[packet.l2_offset(frame, r.linktype) :])))
    return pkts


def test_replay_of_real_capture_reaches_target_complete():
    """Every request of online-http.pcap (20 short + 5 keep-alive connections, C TCPCopy's
    reference capture) reaches a target that answers like the online server did."""
    from tests.unit.link import MirrorTarget

    pkts = _online_capture()
    online = (pkts[0][1].dst, 80)
    xfer = (TransferEntry(online[0], 80, TARGET[0], TARGET[1]),)
    table = TABLE[0](SessionConfig(transfers=xfer, client_pool=POOL, linger_s=1.0))
    # The online server's answers per client port, and what each client sent.
    turns: dict[int, list] = {}
    sent: dict[int, bytearray] = {}
    for _, p in pkts:
        if p.dport == 80:
            sent.setdefault(p.sport, bytearray()).extend(p.payload)
            if p.payload:
                turns.setdefault(p.sport, []).append(([], False))
        elif p.data_len or p.flags & FIN:
            t = turns.get(p.dport)
            if t and not t[-1][1]:
                sizes, _ = t[-1]
                if p.data_len:
                    sizes.append(p.data_len)
                if p.flags & FIN and not any(
                    q.flags & FIN
                    for _, q in pkts
                    if q.dport == 80 and q.sport == p.dport and q.seq == (p.ack - 1) & 0xFFFFFFFF
                ):
                    t[-1] = (sizes, True)  # the server closed first
    targets: dict[tuple[int, int], MirrorTarget] = {}
    by_target: dict[tuple[int, int], int] = {}
    t0 = pkts[0][0]

    def pump(now):
        while True:
            _, raws = table.drain()
            if not raws:
                return
            for raw in raws:
                p = packet.parse_ip(raw)
                key = (p.src, p.sport)
                if key not in targets:
                    assert p.flags & SYN
                    orig = [q for _, q in pkts if q.dport == 80 and q.seq in (p.seq, p.seq + 1)]
                    port = orig[0].sport
                    targets[key] = MirrorTarget(list(turns.get(port, [])), client=key)
                    by_target[key] = port
                for r in targets[key].answer(p):
                    table.receive_response(r, now)

    now = 0.0
    for ts, p in pkts:
        if p.dport != 80:
            continue
        now = ts - t0
        while (t := table.get_timer()) is not None and t <= now:
            table.handle_timer(t)
            pump(t)
        table.receive_client(p, now)
        pump(now)
    end = now + 30.0
    while (t := table.get_timer()) is not None and t <= end:
        table.handle_timer(t)
        pump(t)
    k = table.counters
    assert len(targets) == 25 and table.active == 0
    for key, tgt in targets.items():
        assert bytes(tgt.data) == bytes(sent[by_target[key]]), key
    assert sum(tgt.requests for tgt in targets.values()) == 70
    assert k["client_bytes_acked"] == k["client_bytes_captured"] == sum(map(len, sent.values()))
    assert k["ended_closed"] + k["ended_target_closed"] == 25
    assert k["retransmit"] == 0
    assert not [
        key
        for key in k
        if key.startswith("drop_") and key not in ("drop_pure_ack", "drop_session_closed")
    ]
