"""SessionTable: the sessions of one worker, their timers, and response lookup.  (pure)

CONTRACT:
    t = SessionTable(config: SessionConfig)
    t.receive_client(pkt: TcpPacket, now)    # an ORIGINAL captured client->online packet
    t.receive_response(pkt: TcpPacket, now)  # a decoded response record
    t.handle_timer(now);  t.get_timer() -> float | None
    t.drain() -> tuple[list[ClientRoute], list[bytes]]
        # routes to announce (CLIENT_ADD), then packets to send; the shell sends all routes
        # of one drain before any packet of it.
    t.counters: Counter; t.active: int; t.unsend: int

Additions: ``ClientRoute`` is ``session.RouteNeeded`` (client_ip, client_port, target_ip,
target_port); ``t.lingering`` (sessions ended and lingering); ``t.allocator`` (the
rewrite.TupleAllocator); ``SessionTable(config, tuple_history)`` (engine/io/tuple_history.py,
handed to the allocator; counted as "tuple_history_avoided"; the allocator's spills and
RFC 6191 reuses as "tuples_spilled" and "tuples_reused"); ``t.live_routes()`` (the
routes of every session not yet ended, for a re-announce) and ``t.set_route_down(down,
now)`` (an intercept became unreachable / every one is back:
TcpSession.handle_route_down).  ``counters`` is shared with every session of the table, so it
holds
the session counters (spec §3.18 labels, ``drop_<reason>``, ``ended_<outcome>``, fidelity
bytes, gate rules) plus the table's own: "all clt", "clt cont", "syn cnt", "rel", "port reuse",
"sessions refused", and the gauge "tw".

THEORY OF OPERATION

Flows are keyed by the *original* 4-tuple (client ip, port, online ip, port) -> a list of
replica entries; responses are looked up by (fake client ip, port, target ip, port), which the
TupleAllocator guarantees unique among live and recently ended flows (design §9: C keys by the
rewritten client only, and refuses a port-reusing SYN; that loses up to 28 % of short
connections at 10 k conn/s from one address).  A SYN with a new seq on a live original key is
a new connection: the old sessions are detached from the key (they finish on their own and
still get their responses through their fake tuple) and fresh ones start.

Timers: a heap of (deadline, seq, entry) with lazy invalidation.  An entry records the
deadline it is scheduled at; a new heap item is pushed only when the session's deadline moved
*earlier*, so a session whose idle deadline moves later on every packet does not flood the
heap: its old item fires early, the session finds nothing due, and it is rescheduled.
An item outlives its session when the session ends before the item's deadline (an idle
deadline lies minutes ahead), and it holds the whole session until then: after a SYN flood
ended 100 k sessions, their ~4 KB each stayed for -k (720 s).  So when the heap holds more
than twice the table plus HEAP_SLACK items, the dead ones are dropped in one O(n) pass
(amortised O(1) per removal).

Shedding under memory pressure (``shed_half_open``, called by the worker while the
watchdog's flag is up): sessions whose client sent its SYN and nothing after it (no
handshake ACK, no data) for HALF_OPEN_SHED_AGE_S are the ones a SYN flood leaves; they are
ended first, those the target never answered before the others, and counted as
``ended_shed_half_open``.  While ``refuse_new`` is set (the worker sets it from the
watchdog's flag), a packet that would start a session does not: it is counted in
``shed_sessions_memory`` and its flow is remembered (``_refused``) so that every later
packet of it is dropped too (``drop_shed``) until its FIN/RST or SHED_IDLE_S: the SYNs the
capture queued in the ring before it began shedding become no session, and none of them
becomes half a session later (engine/core/shed.py keeps the same rule at the capture).

Backlog budget (``config.backlog_max_bytes``): the table keeps the sum of its sessions'
``held_bytes`` (captured payload not yet sent), updated per touched session at ``drain`` (so
"as of the last drain", like ``unsend``) and when a session is removed.  While it is at or
above the budget, a packet that would start a session starts none, exactly as under
``refuse_new`` but counted in ``shed_sessions_backlog``: the backlog cannot grow by new
sessions, only by the ones running, which drain it as their target answers.
Sessions touched by an input are queued once (``_touched``) and handled by ``drain``, which
is O(touched).
"""

from __future__ import annotations

import heapq
from collections import Counter

from engine.codec.packet import ACK, FIN, RST, SYN, TcpPacket
from engine.codec.tcpseq import SEQ_MASK, tsval
from engine.core.config import SessionConfig
from engine.core.events import DropReason, RouteNeeded, drop_key
from engine.core.rewrite import (
    LOCALHOST_IP,
    SynInfo,
    TransferEntry,
    TupleAllocator,
    choose_client_ip,
    match_transfer,
    replica_port,
    sample_keep,
    shift_port,
)
from engine.core.session import TcpSession
from engine.core.states import State

__all__ = ["ClientRoute", "SessionTable"]

ClientRoute = RouteNeeded

_DROP_NO_TRANSFER = drop_key(DropReason.NO_TRANSFER)
_DROP_SAMPLED_OUT = drop_key(DropReason.SAMPLED_OUT)
_DROP_NO_SESSION = drop_key(DropReason.NO_SESSION)
_DROP_NO_SYN = drop_key(DropReason.NO_SYN)
_DROP_SESSION_LIMIT = drop_key(DropReason.SESSION_LIMIT)
_DROP_NO_TUPLE = drop_key(DropReason.NO_TUPLE)
_DROP_CLIENT_SYN_ACK = drop_key(DropReason.CLIENT_SYN_ACK)
_DROP_UNKNOWN_RESPONSE = drop_key(DropReason.UNKNOWN_RESPONSE)
_DROP_SHED = "drop_shed"  # metrics.counters DROP_EXTRA_REASONS: shed under overload

# Enum members read as attributes of the class cost a descriptor lookup each (~0.3 us on
# Python 3.11, more than the rest of a state test); the hot paths compare module globals.
_LINGER, _FINISHED = State.LINGER, State.FINISHED
_SYN_SENT = State.SYN_SENT


LOSS_RECENT_S = 1.0
"""How long after the capture reported a ring loss (note_capture_loss) a hole a session finds
is taken for that loss (TcpSession.expedite_gap)."""
LOSS_GAP_WAIT_S = 0.01
"""How long such a hole is still waited for: a grace for a reordered packet that happens to
coincide with a ring loss (the capture hands packets over in the order it saw them)."""

REFUSED_IDLE_S = 60.0
"""A refused flow is forgotten after this long without a packet (core/shed.py SHED_IDLE_S)."""
HEAP_SLACK = 4096
"""Dead timer items tolerated beyond twice the sessions before the heap is compacted."""
HALF_OPEN_SHED_AGE_S = 1.0
"""Under memory pressure a session whose client sent only its SYN for this long is given
up: a real client's handshake ACK follows its SYN within one round trip to the online
server."""

Key4 = tuple[int, int, int, int]
"""A 4-tuple key (ip_a, port_a, ip_b, port_b): building and hashing a tuple of four small
ints costs half of what one packed 96-bit int did."""


class _Entry:
    """A session plus the table's bookkeeping for it."""

    __slots__ = (
        "session",
        "flow_key",
        "flow",
        "resp_key",
        "sched",
        "touched",
        "unsend",
        "held",
        "gone",
    )

    def __init__(
        self, session: TcpSession, flow_key: Key4, flow: list[_Entry], resp_key: Key4
    ) -> None:
        self.session = session
        self.flow_key = flow_key
        self.flow = flow  # the replica list this entry belongs to (shared)
        self.resp_key = resp_key
        self.sched: float | None = None
        self.touched = False
        self.unsend = 0
        self.held = 0
        self.gone = False


class SessionTable:
    """The sessions of one worker; see the module docstring."""

    def __init__(self, config: SessionConfig, tuple_history: object | None = None) -> None:
        self.config = config
        self.counters: Counter[str] = Counter()
        self.allocator = TupleAllocator(
            config.time_wait_s,
            config.worker_index,
            config.worker_count,
            tuple_history,
            pool=config.client_pool,
            strict=config.strict_time_wait,
        )
        self._flows: dict[Key4, list[_Entry]] = {}
        self._by_resp: dict[Key4, _Entry] = {}
        self._heap: list[tuple[float, int, _Entry]] = []
        self._heap_seq = 0
        self._touched: list[_Entry] = []
        self._now = 0.0
        self._unsend = 0
        self._held = 0  # the sessions' held_bytes as of the last drain (docstring)
        # -g: when the ramp started (the first flow kept), and whether it reached 100 %.
        self._ramp_start: float | None = None
        self._ramp_done = not config.gradual
        self._route_down = False
        self._loss_at: float | None = None  # the capture's last reported ring loss
        self.refuse_new = False  # memory pressure: new flows are refused (docstring)
        self._refused: dict[Key4, float] = {}

    # -- properties ---------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Sessions in the table (lingering ones included, like C's ``active``)."""
        return len(self._by_resp)

    @property
    def lingering(self) -> int:
        return self.counters["tw"]

    @property
    def sent(self) -> int:
        """Packets sent so far (the ``send`` counter, read without copying the counters)."""
        return self.counters["send"]

    @property
    def unsend(self) -> int:
        """Captured client segments not yet sent, over all sessions (as of the last drain)."""
        return self._unsend

    @property
    def held_bytes(self) -> int:
        """Their payload bytes (the held backlog), as of the last drain."""
        return self._held

    # -- routes -------------------------------------------------------------------------------

    def live_routes(self) -> list[RouteNeeded]:
        """The route of every session not yet ended (to announce again after an intercept
        connection was made again: the intercept has forgotten them)."""
        return [
            RouteNeeded(s.client[0], s.client[1], s.target[0], s.target[1])
            for s in (e.session for e in self._by_resp.values())
            if s.state < _LINGER
        ]

    def set_route_down(self, down: bool, now: float) -> None:
        """Some intercept is unreachable (down=True) or every one is back and was told our
        routes again (down=False): see TcpSession.handle_route_down.  O(sessions), once per
        edge; sessions created meanwhile inherit the state."""
        if down == self._route_down:
            return
        self._route_down = down
        self._now = now
        touched = self._touched
        for e in self._by_resp.values():
            s = e.session
            if s.state >= _LINGER:
                continue
            s.handle_route_down(down, now)
            if not down and not e.touched:
                e.touched = True
                touched.append(e)

    def end_input(self, now: float) -> int:
        """The input ended for good: end every session still open (TcpSession.end_input);
        the next drain sends their RSTs.  Returns how many were ended."""
        self._now = now
        ended = 0
        touched = self._touched
        for e in list(self._by_resp.values()):
            if e.session.end_input(now):
                ended += 1
                if not e.touched:
                    e.touched = True
                    touched.append(e)
        return ended

    def shed_half_open(self, now: float, limit: int | None = None) -> int:
        """Memory pressure: end the sessions whose client sent only its SYN at least
        HALF_OPEN_SHED_AGE_S ago, those with no SYN-ACK from the target first; at most
        ``limit`` of them.  Returns how many were ended (``ended_shed_half_open``)."""
        self._now = now
        cutoff = now - HALF_OPEN_SHED_AGE_S
        unanswered: list[_Entry] = []
        answered: list[_Entry] = []
        for e in self._by_resp.values():
            s = e.session
            if s.created_at <= cutoff and s.half_open:
                (answered if s.state > _SYN_SENT else unanswered).append(e)
        victims = unanswered + answered
        if limit is not None:
            victims = victims[:limit]
        touched = self._touched
        for e in victims:
            e.session.shed_half_open(now)
            if not e.touched:
                e.touched = True
                touched.append(e)
        return len(victims)

    def forget_ended(self, now: float) -> None:
        """Drop the ended sessions still lingering (their one remaining job, answering stray
        responses with a RST, ends with the program): ``active`` then counts none."""
        self._now = now
        for e in list(self._by_resp.values()):
            if e.session.state >= _LINGER and not e.gone:
                self._remove(e, now)

    def note_capture_loss(self, now: float) -> None:
        """The capture's ring for this worker was full and dropped packets (a ring read
        held a packet marked so): holes that sessions find in the next LOSS_RECENT_S are
        given up after LOSS_GAP_WAIT_S, not CLIENT_GAP_WAIT_S (see drain)."""
        self._loss_at = now

    # -- client side ----------------------------------------------------------------------------

    def receive_client(self, pkt: TcpPacket, now: float) -> None:
        self._now = now
        c = self.counters
        fkey = (pkt.src, pkt.sport, pkt.dst, pkt.dport)
        flow = self._flows.get(fkey)
        flags = pkt.flags
        if self._refused and fkey in self._refused and self._still_refused(fkey, flags, now):
            return
        if flags & SYN:
            if flags & ACK:
                c[_DROP_CLIENT_SYN_ACK] += 1
                return
            c["syn cnt"] += 1
        if flow is not None:
            if flags & SYN and not flow[0].session.owns_syn(pkt.seq):
                # spec §3.6 drops this SYN; it is a new connection reusing the port.  The old
                # sessions run on by their fake tuples until they end.
                c["port reuse"] += 1
                del self._flows[fkey]
                self._new_flow(fkey, pkt, now, None)
                return
            c["all clt"] += 1
            if pkt.data_len:
                c["clt cont"] += 1
            touched = self._touched
            for e in flow:
                s = e.session
                if s.state is _LINGER and pkt.data_len and s.is_later_data(pkt):
                    # spec §3.6: new traffic on a lingering tuple starts a new (faked)
                    # session; per replica, as each replica is its own session in C.  If the
                    # target ended the old one, only where a reconnect may (may_continue).
                    if not s.may_continue(pkt, now):
                        continue  # dropped; it lingers on (its timer entry fires, is moved)
                    fresh = self._replace(flow, flow.index(e), pkt, now)
                    if fresh is None:
                        continue
                    fresh.session.continue_from(s)
                    e, s = fresh, fresh.session
                s.receive_client(pkt, now)
                if not e.touched:
                    e.touched = True
                    touched.append(e)
            return
        entry = match_transfer(self.config.transfers, pkt.dst, pkt.dport)
        if entry is None:
            c[_DROP_NO_TRANSFER] += 1
            return
        if not flags & SYN:
            if not pkt.data_len:
                # spec §3.6: only a SYN or a packet with payload starts a session.
                c[_DROP_NO_SESSION] += 1
                return
            if not self.config.fake_handshake:
                c[_DROP_NO_SYN] += 1  # -O
                return
        budget = self.config.backlog_max_bytes
        if self.refuse_new or (budget and self._held >= budget):
            c["shed_sessions_memory" if self.refuse_new else "shed_sessions_backlog"] += 1
            c[_DROP_SHED] += 1
            if not flags & (FIN | RST):
                self._refused[fkey] = now
            return
        self._new_flow(fkey, pkt, now, entry)

    def _still_refused(self, fkey: Key4, flags: int, now: float) -> bool:
        """A packet of a refused flow: dropped (True) until the flow ends or goes idle; a
        SYN once refusing stopped begins a new, whole session (False)."""
        if now - self._refused[fkey] > REFUSED_IDLE_S or (flags & SYN and not self._shedding()):
            del self._refused[fkey]
            return False
        self.counters[_DROP_SHED] += 1
        if flags & (FIN | RST):
            del self._refused[fkey]
        else:
            self._refused[fkey] = now
        return True

    def _shedding(self) -> bool:
        """New sessions are refused now: memory pressure, or the backlog budget is spent."""
        budget = self.config.backlog_max_bytes
        return self.refuse_new or bool(budget and self._held >= budget)

    def expire_refused(self, now: float) -> None:
        """Forget refused flows idle for REFUSED_IDLE_S (the worker calls it now and then)."""
        cutoff = now - REFUSED_IDLE_S
        stale = [k for k, t in self._refused.items() if t < cutoff]
        for k in stale:
            del self._refused[k]

    def _new_flow(
        self, fkey: Key4, pkt: TcpPacket, now: float, entry: TransferEntry | None
    ) -> None:
        cfg = self.config
        c = self.counters
        if entry is None:
            entry = match_transfer(cfg.transfers, pkt.dst, pkt.dport)
            if entry is None:
                c[_DROP_NO_TRANSFER] += 1
                return
        pool = cfg.client_pool
        percent = cfg.sample_percent if self._ramp_done else self._ramp_percent(now)
        if percent < 100:
            # spec §3.3 step 7: the rewritten address and the original port, once per flow.
            src = self._source(pkt.src)
            ip0 = choose_client_ip(src, pool) if pool else src
            if not sample_keep(ip0, pkt.sport, percent):
                c[_DROP_SAMPLED_OUT] += 1
                return
        if not self._ramp_done and self._ramp_start is None:
            self._ramp_start = now  # C's start_pt: the first packet let through (at 1 %)
        replicas = max(1, cfg.replicas)
        if cfg.max_sessions and len(self._by_resp) + replicas > cfg.max_sessions:
            c["sessions refused"] += 1
            c[_DROP_SESSION_LIMIT] += 1
            return
        flow: list[_Entry] = []
        for i in range(replicas):
            e = self._create(fkey, flow, i, pkt, now, entry)
            if e is not None:
                flow.append(e)
        if not flow:
            return
        self._flows[fkey] = flow
        c["all clt"] += 1
        if pkt.data_len:
            c["clt cont"] += 1
        for e in flow:
            e.session.receive_client(pkt, now)
            e.touched = True
            self._touched.append(e)

    def _ramp_percent(self, now: float) -> int:
        """-g (spec §3.3 step 6): 1 % until the first flow is kept, then 1 % more per second
        since, up to 100 %; it replaces -r (config refuses the two together)."""
        start = self._ramp_start
        if start is None:
            return 1
        percent = int(now - start) + 1
        if percent >= 100:
            self._ramp_done = True
            return 100
        return max(percent, 1)

    def _source(self, src: int) -> int:
        """-H (spec §3.3 step 3): a 127.0.0.1 client source becomes the -H address, before -c
        and -r see it (config refuses -H when a target is 127.0.0.1)."""
        if src == LOCALHOST_IP and self.config.localhost_ip:
            return self.config.localhost_ip
        return src

    def _replace(self, flow: list[_Entry], i: int, pkt: TcpPacket, now: float) -> _Entry | None:
        """A new session in replica slot i of ``flow``; the lingering one is detached."""
        old = flow[i]
        cfg = self.config
        if cfg.max_sessions and len(self._by_resp) >= cfg.max_sessions:
            self.counters["sessions refused"] += 1
            self.counters[_DROP_SESSION_LIMIT] += 1
            return None
        entry = match_transfer(cfg.transfers, pkt.dst, pkt.dport)
        e = None if entry is None else self._create(old.flow_key, flow, i, pkt, now, entry)
        if e is None:
            return None
        old.flow = [old]  # its removal must not touch the live flow
        flow[i] = e
        return e

    def _create(
        self,
        fkey: Key4,
        flow: list[_Entry],
        i: int,
        pkt: TcpPacket,
        now: float,
        entry: TransferEntry,
    ) -> _Entry | None:
        """Allocate replica i's fake client tuple and make its session (not yet fed)."""
        cfg = self.config
        pool = cfg.client_pool
        shift, rand = cfg.port_shift, cfg.rand_shift
        src = self._source(pkt.src)
        ip = choose_client_ip(src, pool, i) if pool else src
        port = shift_port(pkt.sport, shift, rand) if shift else pkt.sport
        if i:
            # spec §3.4: replica i's port (the -f shift applies again on top).  These are only
            # preferences: the allocator moves them off any tuple in use or in TIME_WAIT.
            port = replica_port(port, i, rand)
            if shift:
                port = shift_port(port, shift, rand)
        tip, tport = entry.target_ip, entry.target_port
        alloc = self.allocator
        # What the target's TIME_WAIT will judge if the allocator has to reuse a tuple: the
        # captured SYN (its TS option keeps its place, with our TS clock's value), or the
        # faked SYN of a mid-stream start (first data seq - 1, no TS option).
        if pkt.flags & SYN:
            syn = SynInfo(pkt.seq, tsval(pkt.options) is not None)
        else:
            syn = SynInfo((pkt.seq - 1) & SEQ_MASK, False)
        got = alloc.allocate(ip, port, tip, tport, now, syn=syn)
        stats = alloc.stats
        c = self.counters
        if alloc.history is not None:
            c["tuple_history_avoided"] = stats["inherited_hits"]
        c["tuples_spilled"] = stats["spilled"]
        c["tuples_reused"] = stats["reused"]
        if got is None:
            c[_DROP_NO_TUPLE] += 1
            return None
        s = TcpSession(cfg, got, (tip, tport), (pkt.dst, pkt.dport), now, counters=self.counters)
        if self._route_down:
            s.handle_route_down(True, now)
        rkey = (got[0], got[1], tip, tport)
        e = _Entry(s, fkey, flow, rkey)
        self._by_resp[rkey] = e
        return e

    # -- responses ------------------------------------------------------------------------------

    def receive_response(self, pkt: TcpPacket, now: float) -> None:
        self._now = now
        e = self._by_resp.get((pkt.dst, pkt.dport, pkt.src, pkt.sport))
        if e is None:
            self.counters[_DROP_UNKNOWN_RESPONSE] += 1
            return
        e.session.receive_response(pkt, now)
        if not e.touched:
            e.touched = True
            self._touched.append(e)

    # -- timers ---------------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        self._now = now
        heap = self._heap
        touched = self._touched
        while heap and heap[0][0] <= now:
            t, _, e = heapq.heappop(heap)
            if e.sched != t or e.gone:
                continue  # stale: rescheduled earlier meanwhile, or removed
            e.sched = None
            e.session.handle_timer(now)
            if not e.touched:
                e.touched = True
                touched.append(e)

    def get_timer(self) -> float | None:
        if self._touched:
            return self._now  # work is waiting for drain()
        heap = self._heap
        while heap:
            t, _, e = heap[0]
            if e.sched == t and not e.gone:
                return t
            heapq.heappop(heap)
        return None

    def _schedule(self, e: _Entry) -> None:
        t = e.session.get_timer()
        if t is not None and (e.sched is None or t < e.sched):
            e.sched = t
            self._heap_seq += 1
            heapq.heappush(self._heap, (t, self._heap_seq, e))

    # -- output ---------------------------------------------------------------------------------

    def drain(self) -> tuple[list[RouteNeeded], list[bytes]]:
        routes: list[RouteNeeded] = []
        packets: list[bytes] = []
        now = self._now
        touched = self._touched
        if not touched:
            return routes, packets
        self._touched = []
        loss_at = self._loss_at
        loss_recent = loss_at is not None and now - loss_at <= LOSS_RECENT_S
        for e in touched:
            e.touched = False
            s = e.session
            out = s.packets_to_send(now)
            if out:
                packets += out
            if loss_recent:
                s.expedite_gap(now + LOSS_GAP_WAIT_S)
            while (ev := s.next_event()) is not None:
                # SessionEnded is counted by the session itself ("ended_<outcome>", "tw").
                if type(ev) is RouteNeeded:
                    routes.append(ev)
            u = s.unsend
            if u != e.unsend:
                self._unsend += u - e.unsend
                e.unsend = u
            h = s.held_bytes
            if h != e.held:
                self._held += h - e.held
                e.held = h
            if s.state is _FINISHED:
                self._remove(e, now)
            else:
                self._schedule(e)
        return routes, packets

    def _remove(self, e: _Entry, now: float) -> None:
        e.gone = True
        heap = self._heap
        if len(heap) > 2 * len(self._by_resp) + HEAP_SLACK:
            # In place: handle_timer and get_timer may hold the list (module docstring).
            heap[:] = [item for item in heap if item[2].sched == item[0] and not item[2].gone]
            heapq.heapify(heap)
        c = self.counters
        c["rel"] += 1
        c["tw"] -= 1
        self._unsend -= e.unsend
        e.unsend = 0
        self._held -= e.held
        e.held = 0
        if self._by_resp.get(e.resp_key) is e:
            del self._by_resp[e.resp_key]
        flow = e.flow
        flow.remove(e)
        if not flow and self._flows.get(e.flow_key) is flow:
            del self._flows[e.flow_key]
        s = e.session
        # The target keeps the tuple in TIME_WAIT: quarantine it (design §9).
        self.allocator.release(
            s.client[0], s.client[1], s.target[0], s.target[1], now, s.end_seq, s.ts_last
        )
