"""The request gate over many exchanges on one keep-alive connection (engine/core/session.py, "The
request gate"; docs/replay.md): the target answers shorter, longer or split differently from
the online server, as a migrated or differently loaded server does.  Each run replays a
captured connection at its production pace on the fake clock against a scripted target that
answers every request it receives after a LAN round trip, and checks that every request
arrived in order, that no release waited for the maximum wait, and that the replay kept the
production pace (no request left long after it was captured)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

import pytest

from engine.core.config import SessionConfig
from engine.core.session import RESPONSE_QUIET_MIN_S, TcpSession
from tests.unit.link import FAKE_CLIENT, ONLINE, TARGET, Client, Link, Target

LAN = (0.0001, 0.002)
"""(one way to the target, production period): a LAN (0.2 ms round trip: C's internal_usage,
answer data releases at once), a client sending a request every 2 ms."""
WAN = (0.002, 0.020)
"""A 4 ms round trip to the target (the quiet of rule (c) is 2 ms), a request every 20 ms."""
SEGMENT_GAP_S = 0.00002
"""Between the segments of one answer (back to back on the wire)."""


@pytest.fixture(autouse=True)
def engine(session_engine, monkeypatch):
    """Every test here runs against both session engines (tests/unit/conftest.py)."""
    monkeypatch.setitem(globals(), "TcpSession", session_engine)


Answer = Callable[[int, int], list[int]]
"""(request index, online answer length) -> the target's answer as segment lengths."""


def replay(
    n: int, online_len: Callable[[int], int], answer: Answer, path: tuple = LAN, **cfg_kw
) -> dict:
    one_way_s, period_s = path
    cfg = SessionConfig(**cfg_kw)
    s = TcpSession(cfg, client=FAKE_CLIENT, target=TARGET, online=ONLINE, now=0.0)
    link = Link(s, Target(), mtu=cfg.mtu)
    t = link.target
    c = Client()
    link.client(c.syn(), c.ack())
    link.now = 2 * one_way_s
    link.respond(t.synack())

    reqs = [b"INCR counter:%06d\r\n" % i for i in range(n)]
    bounds = list(itertools.accumulate(len(r) for r in reqs))
    events: list[tuple[float, int, str, int]] = []
    order = itertools.count()
    read = 0
    captured_at = []
    for i, _ in enumerate(reqs):
        at = 0.001 + i * period_s
        captured_at.append(at)
        heapq.heappush(events, (at, next(order), "capture", i))
    pkts = []
    for i, r in enumerate(reqs):
        pkts.append(c.data(r, read=read))
        read += online_len(i)
    answered = 0

    def target_answers() -> None:
        nonlocal answered
        while answered < n and len(t.data) >= bounds[answered]:
            at = link.now + one_way_s
            for size in answer(answered, online_len(answered)):
                heapq.heappush(events, (at, next(order), "answer", size))
                at += SEGMENT_GAP_S
            answered += 1

    end = captured_at[-1] + 1.0
    while link.now < end:
        due = events[0][0] if events else end
        timer = s.get_timer()
        if timer is not None and timer < due:
            link.run(max(timer, link.now))
        else:
            if not events:
                link.run(end)
                break
            at, _, kind, arg = heapq.heappop(events)
            link.now = max(link.now, at)
            if kind == "capture":
                link.client(pkts[arg])
            else:
                link.respond(t.send(arg))
        target_answers()

    sent_at = {}
    for sent in link.log:
        if sent.pkt.payload and sent.pkt.seq not in sent_at:
            sent_at[sent.pkt.seq] = sent.at
    # (The first request waits for the handshake.)
    delays = [sent_at[p.seq] - captured_at[i] for i, p in enumerate(pkts) if i and p.seq in sent_at]
    return {
        "target": bytes(t.data),
        "reqs": reqs,
        "delays": delays,
        "counters": s.counters,
        "quiet_s": max(s.rtt_estimator.path_rtt() / 2, RESPONSE_QUIET_MIN_S),
    }


def check(run: dict, n: int) -> None:
    k = run["counters"]
    assert run["target"] == b"".join(run["reqs"])  # every request, in order
    assert k["requests"] == n
    assert k["gate_max_wait"] == 0  # never stalled: each release by bytes or by the quiet
    assert k["gate_bytes"] + k["gate_quiet"] == n
    # The production pace: a request leaves at most the quiet after it was captured (the
    # ACK we owed for a shorter answer goes out first; on a LAN at once), far less than the
    # time between captured requests, so the replay never falls behind.
    assert max(run["delays"]) <= run["quiet_s"] + 1e-9, max(run["delays"])


N = 400


def redis_int(i: int) -> int:
    return len(b":%d\r\n" % (100_000 + i))  # INCR on the online server: 6-digit answers


@pytest.mark.parametrize("path", [LAN, WAN], ids=["lan", "wan"])
def test_shorter_answers_every_time_release_by_quiet_not_max_wait(path):
    # The target's counters are smaller (other interleaving): every answer 2 bytes short.
    run = replay(N, redis_int, lambda i, o: [o - 2], path)
    check(run, N)
    assert run["counters"]["gate_quiet"] >= N - 1
    assert run["counters"]["gate_bytes"] <= 1


@pytest.mark.parametrize("path", [LAN, WAN], ids=["lan", "wan"])
def test_longer_answers_every_time_release_by_bytes(path):
    run = replay(N, redis_int, lambda i, o: [o + 3], path)
    check(run, N)
    assert run["counters"]["gate_bytes"] == N
    assert run["counters"]["gate_quiet"] == 0


@pytest.mark.parametrize("path", [LAN, WAN], ids=["lan", "wan"])
def test_alternating_shorter_and_longer_never_carry_over(path):
    """A surplus on one exchange does not pay for a deficit on the next (a running total
    would release the short one at once, then hold the next long one for the quiet)."""
    run = replay(N, redis_int, lambda i, o: [o + 5] if i % 2 else [o - 1], path)
    check(run, N)
    k = run["counters"]
    assert k["gate_bytes"] == N // 2  # the first request and every one after a longer answer
    assert k["gate_quiet"] == N // 2


@pytest.mark.parametrize("path", [LAN, WAN], ids=["lan", "wan"])
def test_one_byte_short_once_does_not_slow_the_rest(path):
    """The issue's stall: with a running total one byte short, every later request waited the
    quiet.  Per exchange only the short exchange does."""
    run = replay(N, redis_int, lambda i, o: [o - 1] if i == 10 else [o], path)
    check(run, N)
    assert run["counters"]["gate_quiet"] == 1


def test_answers_split_differently_release_on_the_last_byte():
    # Online answered in one segment; the target sends the same length in three.  Beyond a
    # LAN (where the first segment would release, as in C) the last byte does.
    def split(i: int, o: int) -> list[int]:
        return [100, 100, o - 200]

    run = replay(N, lambda i: 700 + i % 7, split, WAN)
    check(run, N)
    assert run["counters"]["gate_bytes"] == N


def test_multi_segment_answers_of_other_lengths():
    # HTTP-like: online bodies of one length, the target's longer or shorter, several
    # segments each.
    def other(i: int, o: int) -> list[int]:
        total = o + (900 if i % 3 == 0 else -150 if i % 3 == 1 else 0)
        return [min(1448, total - k) for k in range(0, total, 1448)]

    for path in (LAN, WAN):
        check(replay(N, lambda i: 1200 + 10 * (i % 5), other, path), N)


def test_quiet_scales_with_the_path_rtt():
    """The quiet is half the path's RTT (spec §3.9), the smallest sample: on a slower path the
    same short answer is waited for longer, never less than RESPONSE_QUIET_MIN_S; time our
    own worker kept answers queued (a larger sample later) does not stretch it."""
    cfg = SessionConfig()
    s = TcpSession(cfg, client=FAKE_CLIENT, target=TARGET, online=ONLINE, now=0.0)
    link = Link(s, Target(), mtu=cfg.mtu)
    c = Client()
    link.client(c.syn(), c.ack())
    link.now = 0.020  # a 20 ms round trip
    link.respond(link.target.synack())
    link.client(c.data(b"GET /a\r\n"))
    link.client(c.data(b"GET /b\r\n", read=500))
    link.now = 0.020 + 0.100  # answered 100 ms later (queued in our worker, say)
    link.respond(link.target.send(100))
    assert s.rtt_estimator.srtt > 0.025  # the smoothed RTT grew
    start = link.now
    assert [p.payload for p in link.run(start + 0.010 - 0.0001) if p.payload] == []
    assert [p.payload for p in link.run(start + 0.010) if p.payload] == [b"GET /b\r\n"]
