"""The session's collaborators: RTT/RTO estimator, retransmission queue, request gate.  (pure)

``TcpSession`` (engine/core/session.py) keeps the state table, the sequence variables and the
timers; it owns one of each of these and calls them where its module docstring says:

* ``RttEstimator``: RFC 6298 smoothing of the samples, the smallest sample (the path's RTT),
  the retransmission timeout with its exponential backoff, the zero-window probe interval;
* ``RetransmitQueue``: the segments sent and not yet acknowledged, in order; an ACK takes the
  acknowledged ones off (Karn's rule for the RTT sample), a retransmission resends the head;
* ``RequestGate``: when a captured request may go, per exchange (rules (a)-(d) of the module
  docstring of engine/core/session.py), and the counts it needs.

Names stay importable from engine.core.session.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Protocol

from engine.codec.tcpseq import SEQ_HALF, SEQ_MASK
from engine.codec.tcpseq import Segment as _Seg
from engine.core.config import SessionConfig

__all__ = ["GatedSession", "RequestGate", "RetransmitQueue", "RttEstimator"]

RTO_INITIAL_S = 0.2
"""Retransmission timeout before an RTT was measured (RFC 6298 says 1 s; a replay toward a
test server on the same LAN wants faster recovery; the backoff makes it safe)."""
RTO_MIN_S = 0.05
RTO_MAX_S = 3.0
RTO_GRANULARITY_S = 0.001
RESPONSE_QUIET_MIN_S = 0.001
"""Rule (c) of the request gate: a shorter answer is over after max(rtt / 2, this) of silence
(spec §3.9 DELAY_ACK re-arms for rtt/2), counted from the later of its last data and our last
ACK (silence we caused by not acking is not the target's).  The floor is the event loop's
timer resolution."""
LAN_RTT_MAX_S = 0.001
"""Rule (c) on a LAN: with a path RTT up to this (C's internal_usage, spec §3.12: rtt <= 1 ms)
a held request goes as soon as answer data has arrived, as C does (spec §3.8 step 5)."""
CLOSE_QUIET_MIN_S = 0.5
"""Rule (c) for a client FIN/RST: a close that cuts a still-streaming response short makes the
target abort it (nginx logs a short body), so a close waits for a longer silence."""

# Gate kinds: a FIN/RST is never released by -W (spec §3.14: FIN/RST stay held).
GATE_DATA, GATE_CLOSE = 0, 1


class RttEstimator:
    """RTT samples -> smoothed RTT, variance, minimum; the RTO with its backoff."""

    __slots__ = ("srtt", "rttvar", "rtt_min", "backoff", "initial_s")

    def __init__(self, initial_s: float) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rtt_min: float | None = None  # the smallest sample: the path, not our queueing
        self.backoff = 0
        self.initial_s = initial_s  # -R: assumed before a sample (the gate's quiet)

    def sample(self, r: float) -> None:
        """RFC 6298 §2 smoothing; the minimum is kept apart (``rtt_min``)."""
        if r < 0:
            return
        if self.rtt_min is None or r < self.rtt_min:
            self.rtt_min = r
        if self.srtt is None:
            self.srtt = r
            self.rttvar = r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r

    def rto(self) -> float:
        """The current RTO with exponential backoff (QUIRK fixed, spec §3.9: C's fixed 100 ms
        RTO with no backoff, effectively disabled after the first fast response)."""
        # min()/max() spelled as comparisons: this runs for every segment sent.
        srtt = self.srtt
        if srtt is None:
            base = RTO_INITIAL_S
        else:
            var4 = 4 * self.rttvar
            base = srtt + (var4 if var4 > RTO_GRANULARITY_S else RTO_GRANULARITY_S)
            if base < RTO_MIN_S:
                base = RTO_MIN_S
            elif base > RTO_MAX_S:
                base = RTO_MAX_S
        if self.backoff:
            base *= 1 << self.backoff
        return base if base < RTO_MAX_S else RTO_MAX_S

    def persist_interval(self, persist_backoff: int) -> float:
        """The zero-window probe interval after ``persist_backoff`` unanswered probes."""
        base = RTO_INITIAL_S if self.srtt is None else max(self.rto(), RTO_MIN_S)
        return min(base * (1 << min(persist_backoff, 16)), RTO_MAX_S)

    def rtt(self) -> float:
        return self.initial_s if self.srtt is None else self.srtt

    def path_rtt(self) -> float:
        """The round trip of the path to the target: the smallest sample (Linux's min_rtt).
        The smoothed RTT also holds the time our own worker kept the answers queued under
        load, which says nothing about gaps inside the target's answers."""
        return self.initial_s if self.rtt_min is None else self.rtt_min


class RetransmitQueue(deque[_Seg]):
    """The segments sent and not yet acknowledged, oldest first (a deque: appending a sent
    segment costs what it did inline)."""

    __slots__ = ()

    def take_acked(self, a: int, now: float) -> float | None:
        """Remove the segments ``a`` acknowledges entirely; returns the RTT sample of the last
        one, None if there is none or it was retransmitted (Karn's rule)."""
        sample: float | None = None
        while self and self[0].end <= a:
            seg = self.popleft()
            sample = None if seg.retx else now - seg.sent_at
        return sample

    def resend_head(self, una: int) -> tuple[_Seg, int, bytes] | None:
        """The oldest segment to retransmit, as (segment, offset, payload): only its part
        beyond ``una`` when it is partly acknowledged; marked retransmitted."""
        if not self:
            return None
        seg = self[0]
        payload = seg.payload
        off = seg.off
        if off < una:  # partly acked: only the rest
            payload = payload[una - off :]
            off = una
        seg.retx = True
        return seg, off, payload


class GatedSession(Protocol):
    """What the request gate reads of its session (engine/session.TcpSession)."""

    config: SessionConfig
    counters: Counter[str]

    @property
    def rtt_estimator(self) -> RttEstimator: ...
    @property
    def rcv_data(self) -> int: ...
    @property
    def rcv_unacked(self) -> int: ...
    @property
    def last_resp_data_at(self) -> float: ...
    @property
    def last_ack_at(self) -> float: ...
    def ack_now(self) -> None: ...


class RequestGate:
    """When a captured request may go (engine/core/session.py module docstring, rules (a)-(d)).

    ``last_data_ack``: the ack of the last data segment sent (the previous request's);
    ``released_ack``: the ack the gate last released; ``online_base``: the handshake ACK's
    (online ISN + 1), the origin of the first exchange; ``rcv_data_at_req``: the session's
    response byte count when the previous request went out; ``held_since``/``at``: the hold
    in progress and the deadline to look again."""

    __slots__ = ("online_base", "last_data_ack", "released_ack", "held_since", "at",
                 "rcv_data_at_req")  # fmt: skip

    def __init__(self) -> None:
        self.online_base: int | None = None
        self.last_data_ack: int | None = None
        self.released_ack: int | None = None
        self.held_since: float | None = None
        self.at: float | None = None
        self.rcv_data_at_req = 0

    def restart(self) -> None:
        """A reconnect: the new connection's first request goes at once."""
        self.online_base = None
        self.last_data_ack = None
        self.released_ack = None
        self.held_since = None

    def open(self, s: GatedSession, ack: int, now: float, kind: int) -> bool:
        """Whether the request (or close) carrying ``ack`` may go now; counts the rule that
        released it, or sets ``at`` to when to look again.  Reads the session's receive
        side; asks it for an ACK now when our silence may be holding the answer."""
        prev = self.last_data_ack  # the previous request's ack
        if prev is None:
            prev = self.online_base  # none sent yet: the handshake ACK's (online ISN + 1)
            if prev is None:
                prev = self.online_base = ack  # a mid-stream start: nothing to wait for
        online = (ack - prev) & SEQ_MASK
        if online >= SEQ_HALF:
            online = 0  # the client's ack went backwards: not a new answer
        got = s.rcv_data - self.rcv_data_at_req
        c = s.counters
        if got >= online:
            rule = "gate_bytes"  # (a)
        elif kind == GATE_DATA and not s.config.wait_response:
            rule = "gate_nowait"  # (b) -W
        else:
            held = self.held_since
            if held is None:
                held = self.held_since = now
                c["requests_held"] += 1
            quiet_at: float | None = None
            rule = ""
            if got > 0:
                est = s.rtt_estimator
                if kind == GATE_DATA:
                    # spec §3.9 DELAY_ACK: rtt/2 without new data
                    quiet_s = est.path_rtt() / 2
                    if quiet_s < RESPONSE_QUIET_MIN_S:
                        quiet_s = RESPONSE_QUIET_MIN_S
                else:
                    quiet_s = max(2 * est.rtt(), CLOSE_QUIET_MIN_S)
                if kind == GATE_DATA and est.path_rtt() <= LAN_RTT_MAX_S:
                    # spec §3.8 step 5, §3.12 internal_usage: on a LAN the next request goes
                    # as soon as answer data has arrived (and carries our ACK).
                    rule = "gate_quiet"  # (c)
                elif s.rcv_unacked:
                    # We owe the target an ACK, so its silence may be ours (Nagle, cwnd): the
                    # ACK goes out now (the held request would carry it anyway) and the quiet
                    # counts from it.
                    s.ack_now()
                    quiet_at = now + quiet_s
                else:
                    quiet_at = max(s.last_resp_data_at, s.last_ack_at) + quiet_s
                    if now >= quiet_at:
                        rule = "gate_quiet"  # (c)
            if not rule:
                max_at = held + s.config.response_wait_max_s
                if now >= max_at:
                    rule = "gate_max_wait"  # (d)
                else:
                    self.at = max_at if quiet_at is None or quiet_at > max_at else quiet_at
                    return False
        c[rule] += 1
        self.held_since = None
        self.at = None
        self.released_ack = ack
        return True
