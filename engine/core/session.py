"""TcpSession: the sans-IO simulated client TCP stack for one replayed connection.  (pure)

CONTRACT (design §5):
    s = TcpSession(config, client=(ip, port), target=(ip, port), online=(ip, port), now=now)
    s.receive_client(pkt, now)     # a captured client packet (already rewritten: src/sport =
                                   #   the fake client, dst/dport = the target)
    s.receive_response(pkt, now)   # a decoded response record (TcpPacket, data_len declared)
    s.handle_timer(now)
    s.packets_to_send(now) -> list[bytes]   # wire bytes, checksums done, each <= mtu
    s.get_timer() -> float | None           # absolute deadline (monotonic seconds)
    s.next_event() -> Event | None          # RouteNeeded before any SYN; SessionEnded
    s.finished -> bool                      # may be removed from the table (linger over)
    s.unsend -> int                         # captured client segments not yet sent
    s.held_bytes -> int                     # their payload bytes (the held backlog)
    s.counters: collections.Counter         # spec §3.18 names + drops by DropReason

Additions to the contract (used by table.SessionTable):
    TcpSession(..., counters=Counter)  # share one Counter between the sessions of a shard
    s.state -> State; s.lingering -> bool; s.outcome -> str | None
    s.owns_syn(seq) -> bool            # a captured SYN with this seq belongs to this session
    s.is_later_data(pkt) -> bool       # lingering, and pkt is client data beyond the stream
    Counter keys: the spec §3.18 labels ("conns", "resp", "send content", ...), plus
    "drop_<DropReason value>", "ended_<outcome>", "client_bytes_captured",
    "client_bytes_acked", "gate_<rule>", "requests", "requests_held" (see the names below).
    The session never reads the addresses of a captured packet (it sends from its own client
    to its own target), so one captured packet may be fed unchanged to every replica.

THEORY OF OPERATION

Sequence numbers are never translated (spec §3.10): the target sees the online client's seq
numbers, so a captured segment can be sent as captured; only the ack (what *we* received from
the target), the addresses, the TS values, the window of faked handshakes and the checksums are
rewritten.  Internally the client's seq space is unwrapped into plain integers ("offsets")
relative to ``_base`` (the captured ISN, or first data seq - 1 for a mid-stream start), so
ordering never needs modular comparisons; ``_coff`` unwraps a captured or acked seq near
``_snd_nxt``.  A (re)connection starts at offset ``_iss``; ``_snd_una``/``_snd_nxt`` are the
usual send variables.

Captured data segments wait in ``_pending`` (ordered by offset; captured packets may arrive
reordered); sent ones move to ``_unacked`` until the target acknowledges them.  The captured
FIN and RST are kept apart (``_fin_seg``, ``_rst_seg``): they are sent only after the data in
front of them.  ``receive_*`` and ``handle_timer`` only change state (deadlines, due flags, the
``_ctl`` queue of small control packets described as tuples); every packet is built in
``packets_to_send``, which walks: queued control packets, retransmission, window probe, new
data (through the request gate, flow control and gap/overlap checks), then FIN/RST, the
handshake's third packet if nothing of that step carried its ACK (the first request usually
does: C sends both, we spare the target one packet per connection; a captured RST does not
carry it, the third packet then goes first), then a pure ACK if one is still owed.  A hole
in the captured stream (a segment the capture lost) holds the pump for at most
CLIENT_GAP_WAIT_S; then the session reconnects from the next captured request
(``_abandon_gap``, ``_skip_to_request``).

The request gate (replaces C's "response complete" timer heuristic, spec §3.7 step 6c, §3.9
DELAY_ACK, §6 item 6), per exchange.  An exchange is the target's answer to the previous
request.  A captured client segment's ack says how many response bytes the *online* server
had sent when the client sent it; the difference between this request's ack and the previous
request's ack (for the first request: the handshake ACK's, online ISN + 1) is what the online
server answered to the previous request: ``online = ack - prev_ack``.  What the target has
answered to it is ``got = _rcv_data - rcv_data_at_req`` (``_rcv_data`` counts the response
bytes of this connection; the gate's ``rcv_data_at_req`` is its value when the previous request went
out).  A data segment whose ack differs from the previous one's is a new request; it is
released when
  (a) got >= online: the target answered at least as much as production did;
  (b) -W (spec §3.14);
  (c) got > 0 and then nothing for quiet_s = max(rtt / 2, RESPONSE_QUIET_MIN_S): the answer
      was shorter and is over (C: DELAY_ACK's half-RTT tick, spec §3.9).  The rtt is the
      path's (the smallest sample), not the smoothed one, which under load also holds the
      time answers queued in our own worker.  On a LAN (path rtt <= LAN_RTT_MAX_S) got > 0
      is enough, as in C (``internal_usage``, spec §3.8 step 5, §3.12);
  (d) it has been held for response_wait_max_s.
Both counts start over at every request, so a shorter or longer answer on one exchange never
shifts the next (a running total would: one byte short, and every later request waits the
quiet; docs/replay.md has worked examples).  Continuations (same ack) go out at once.  Silence
we caused is not the target's: beyond a LAN, while a request is held, response data is acked
at once (the request would carry that ack anyway), and the quiet counts from that ACK.  A FIN
or RST whose ack moved uses the same gate (never rule (b)), with a longer quiet
(CLOSE_QUIET_MIN_S: a close that cuts a streaming answer makes the target abort it), and a FIN
also waits until all data
is acknowledged.

Reconnects (spec §3.8 reconstruct_sess) happen only where they can work: the target closed or
reset the connection with captured client data unsent, or a hole in the captured stream was
given up.  The new connection starts at a request boundary (a segment whose ack differs from
the one before it, contiguous with what was sent or skipped; skipped bytes are counted as
"reconnect_skipped_bytes"), never in the middle of a request.  A reconnect is refused
(counted as "reconnect_refused_<reason>", the session ends) when reconnects are off
(--no-reconnect: protocols with connection state, such as a database login), when the
session's budget (--reconnect-budget) is spent, or when the previous reconnected connection
was closed or reset by the target before it sent any response data: that target does not take
the stream from that point, and trying again would only repeat it.
"""

from __future__ import annotations

from collections import Counter, deque

from engine.codec.packet import (
    ACK,
    CWR,
    ECE,
    FIN,
    PSH,
    RST,
    SYN,
    URG,
    WSCALE_MAX,
    TcpPacket,
    build_fields,
    build_options,
    parse_options,
    set_timestamp,
    split_mtu,
)
from engine.codec.tcpseq import IP_ID_MASK, SEQ_HALF, SEQ_MASK, SEQ_SPACE
from engine.codec.tcpseq import TS_OPTION as _TS_OPTION
from engine.codec.tcpseq import Segment as _Seg
from engine.codec.tcpseq import after as _after
from engine.codec.tcpseq import ts_clock as _ts_clock
from engine.codec.tcpseq import tsval as _tsval
from engine.codec.tcpseq import with_payload as _with_payload
from engine.core.config import SessionConfig

# The vocabulary, the state table and the sequence helpers live in their own modules (below
# this one); their names stay importable from here.
from engine.core.events import DROP_KEYS as _DROP_KEYS
from engine.core.events import OBSOLETE_OUTCOMES as _OBSOLETE
from engine.core.events import DropReason, Event, Outcome, RouteNeeded, SessionEnded, drop_key
from engine.core.session_parts import (
    CLOSE_QUIET_MIN_S,
    LAN_RTT_MAX_S,
    RESPONSE_QUIET_MIN_S,
    RTO_GRANULARITY_S,
    RTO_INITIAL_S,
    RTO_MAX_S,
    RTO_MIN_S,
    RequestGate,
    RetransmitQueue,
    RttEstimator,
)
from engine.core.session_parts import GATE_CLOSE as _GATE_CLOSE
from engine.core.session_parts import GATE_DATA as _GATE_DATA
from engine.core.states import TRANSITIONS as _TRANSITIONS
from engine.core.states import State

__all__ = [
    "CLOSE_QUIET_MIN_S",
    "LAN_RTT_MAX_S",
    "RESPONSE_QUIET_MIN_S",
    "RTO_GRANULARITY_S",
    "RTO_INITIAL_S",
    "RTO_MAX_S",
    "RTO_MIN_S",
    "DropReason",
    "Event",
    "Outcome",
    "RouteNeeded",
    "SessionEnded",
    "State",
    "TcpSession",
    "drop_key",
]

RETRIES_MAX = 6
"""Consecutive RTO expiries without progress before the session gives up."""
SYN_RTO_INITIAL_S = 0.5
"""QUIRK fixed (spec §3.9 retrans_pack, §5.2): C never retransmits a SYN."""
DELAYED_ACK_S = 0.04
DUP_ACK_THRESHOLD = 3
FAKED_WINDOW = 65535
FAKED_TTL = 64
DEFAULT_MSS = 536
"""RFC 9293 §3.7.1: the MSS assumed when the SYN carried none."""
WINDOW_MAX_BYTES = 65535
CLIENT_GAP_WAIT_S = 1.0
"""How long a hole in the captured client stream may hold the session.  Capture reorders by
microseconds, never by a second; a hole still open after this is a segment the capture lost
(ring, socket buffer) and will never see: the session gives it up (counted as "client gap
abandoned") and reconnects from the next captured request.  QUIRK fixed (spec §3.7 step 6d,
§3.9): C holds the session on the hole until -t (sess_obso), so every later request of a
keep-alive connection piles up unsent; and the gate's byte count (rule (a)) could never
catch up, since the target never answers the lost request."""
CLIENT_SEQ_JUMP_MAX_BYTES = 64 * 1024 * 1024
"""A captured client segment starting further than this beyond everything captured of the
stream is not this connection's (the next connection on the same client tuple whose SYN was
not captured, a stray packet): a TCP sender stays within the peer's receive window, a few
MiB in practice (RFC 7323 allows 1 GiB, which no stack offers by default).  Counting such a
segment would add up to 2 GiB to client_bytes_captured and hold the session on a gap."""

_DATA_FLAGS = ACK | PSH | URG | ECE | CWR

# Enum members read as attributes of the class cost a descriptor lookup each (~0.3 us on
# Python 3.11, more than the rest of a state test); the hot paths compare module globals.
_CLOSED, _SYN_SENT, _ESTABLISHED = State.CLOSED, State.SYN_SENT, State.ESTABLISHED
_FIN_WAIT, _LINGER, _FINISHED = State.FIN_WAIT, State.LINGER, State.FINISHED
_SYN_FLAGS = SYN | ECE | CWR


# Outcomes where the target ended the connection (later client data is a reconnect in effect).
_TARGET_ENDED = frozenset({Outcome.TARGET_CLOSED, Outcome.TARGET_RESET, Outcome.RECONNECT_LIMIT})


class TcpSession:
    """One replayed connection (possibly reconnected); see the module docstring."""

    strict = False
    """Tests set this: internal errors raise instead of aborting the session quietly."""

    __slots__ = (
        "config", "client", "target", "online", "counters", "state", "outcome", "created_at",
        # client stream
        "_base", "_iss", "_snd_una", "_snd_nxt", "_cap_end", "_pending", "_held", "_unacked",
        "_syn_pkt",
        "_third_pkt", "_fin_seg", "_rst_seg", "_fin_sent", "_fake_syn", "_fake_wnd", "_ip_id",
        "_gap_held", "_gap_at", "_gap_fast", "_reconnects", "_reconnected", "_resync", "_cap_ack",
        "_restart_refused",
        # handshake
        "_syn_bytes", "_syn_sent_at", "_syn_retx", "_syn_rto", "_syn_at", "_handshake_at",
        "_syn_due", "_need_third", "_syn_ts", "_syn_wscale", "_rcv_mss", "_rcv_wnd_max",
        # receive side
        "_rcv_nxt", "_rcv_data", "_rcv_unacked", "_ack_at", "_ack_due", "_last_resp_at",
        "_last_resp_data_at", "_last_ack_at", "_now",
        # timestamps and window
        "_ts_ok", "_ts_val", "_ts_recent", "_snd_wscale", "_snd_wnd",
        # retransmission
        "_est", "_retries", "_rto_at", "_retx_due", "_dupacks", "_recover",
        "_persist_at", "_persist_backoff", "_probe_due", "_retx_answered",
        "_gate",
        # end
        "_fin_wait_at", "_linger_at", "_graceful", "_ctl", "_events", "_route_down",
    )  # fmt: skip

    def __init__(
        self,
        config: SessionConfig,
        client: tuple[int, int],
        target: tuple[int, int],
        online: tuple[int, int] = (0, 0),
        now: float = 0.0,
        *,
        counters: Counter[str] | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.target = target
        self.online = online
        self.counters: Counter[str] = Counter() if counters is None else counters
        self.state = _CLOSED
        self.outcome: str | None = None
        self.created_at = now
        self._base: int | None = None
        self._iss = 0
        self._snd_una = 0
        self._snd_nxt = 0
        self._cap_end = 1
        self._pending: deque[_Seg] = deque()
        self._held = 0  # sum of (end - off) over _pending, kept as it changes
        self._unacked = RetransmitQueue()
        self._syn_pkt: TcpPacket | None = None
        self._third_pkt: TcpPacket | None = None
        self._fin_seg: _Seg | None = None
        self._rst_seg: _Seg | None = None
        self._fin_sent = False
        self._fake_syn = False
        self._fake_wnd = False
        self._ip_id = 0
        self._gap_held = False
        self._gap_at: float | None = None  # when a hole in the captured stream is given up
        self._gap_fast = False  # this hole's deadline was brought forward (expedite_gap)
        self._reconnects = 0  # reconnects made by this session (the budget)
        self._reconnected = False  # the current connection is a reconnect
        # Skipping to a request boundary before a reconnect: (end offset, ack) of the last
        # segment known (sent or skipped), or None.
        self._resync: tuple[int, int | None] | None = None
        self._cap_ack: int | None = None  # the ack of the captured segment ending at _cap_end
        self._restart_refused = False  # later client data was refused a new session
        self._syn_bytes = b""
        self._syn_sent_at = 0.0
        self._syn_retx = False
        self._syn_rto = SYN_RTO_INITIAL_S
        self._syn_at: float | None = None
        self._handshake_at: float | None = None
        self._syn_due = False
        self._need_third = False
        self._syn_ts = False
        self._syn_wscale: int | None = None  # our SYN's window scale option
        self._rcv_mss = DEFAULT_MSS
        self._rcv_wnd_max = WINDOW_MAX_BYTES
        self._rcv_nxt = 0
        self._rcv_data = 0
        self._rcv_unacked = 0
        self._ack_at: float | None = None
        self._ack_due = False
        self._last_resp_at = now
        self._last_resp_data_at = now
        self._last_ack_at = now
        self._now = now  # the `now` of the packets_to_send call in progress (for _emit)
        self._ts_ok = False
        self._ts_val: int | None = None
        self._ts_recent = 0
        self._snd_wscale = 0
        self._snd_wnd = 0
        self._est = RttEstimator(config.rtt_initial_s)
        self._retries = 0
        self._rto_at: float | None = None
        self._retx_due = False
        self._dupacks = 0
        self._recover: int | None = None
        self._persist_at: float | None = None
        self._persist_backoff = 0
        self._probe_due = False
        self._retx_answered = True
        self._gate = RequestGate()
        self._fin_wait_at: float | None = None
        self._linger_at: float | None = None
        self._graceful = False
        # Control packets owed: (flags, seq, ack, options, captured segment or None).  Options
        # None: the faked ones, built when the packet is (its TSval must not be older than
        # that of a packet sent in between: PAWS at the target).
        self._ctl: list[tuple[int, int, int, bytes | None, _Seg | None]] = []
        self._events: deque[Event] = deque()
        self._route_down = False

    # -- public properties ------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.state is _FINISHED

    @property
    def lingering(self) -> bool:
        return self.state is _LINGER

    @property
    def unsend(self) -> int:
        n = len(self._pending)
        if self._fin_seg is not None and not self._fin_sent:
            n += 1
        if self._rst_seg is not None:
            n += 1
        return n

    @property
    def held_bytes(self) -> int:
        """Payload bytes of the captured segments not yet sent (the held backlog the table's
        byte budget counts); kept up to date as segments are queued, trimmed and sent."""
        return self._held

    @property
    def syn_seq(self) -> int | None:
        """The seq of the captured SYN, or None (mid-stream start)."""
        return None if self._syn_pkt is None else self._syn_pkt.seq

    @property
    def end_seq(self) -> int | None:
        """The seq after the last one this session sent toward the target (its FIN
        included), or None before any: what the target's TIME_WAIT holds as rcv_nxt at most
        (rewrite.TupleAllocator.release)."""
        if self._base is None:
            return None
        return self._seq(max(self._snd_nxt, self._snd_una))

    @property
    def ts_last(self) -> int | None:
        """The last TSval sent on a connection that negotiated timestamps, else None."""
        return self._ts_val if self._ts_ok else None

    def owns_syn(self, seq: int) -> bool:
        """Whether a captured SYN with ``seq`` belongs to this session's connection: its SYN
        again, or the SYN of a mid-stream start that has not sent anything yet (reorder)."""
        if self._syn_pkt is not None:
            return self._syn_pkt.seq == seq
        return self._base == seq and self.state is _CLOSED

    def is_later_data(self, pkt: TcpPacket) -> bool:
        """Lingering, and ``pkt`` is client data beyond everything captured: new traffic on
        this client tuple, which starts a new session (spec §3.6, §3.13)."""
        if self.state is not _LINGER or not pkt.data_len or self._base is None:
            return False
        return self._coff(pkt.seq) >= self._cap_end

    def may_continue(self, pkt: TcpPacket, now: float) -> bool:
        """Later data (``is_later_data``) on this ended session: may a new session carry the
        client's connection on?  When the target ended the connection while the client went
        on, a new session is a reconnect in effect (spec §3.13), under the same rules
        (module docstring): it must start at a request boundary and be allowed by
        ``_may_reconnect``; the new session takes over the count (``continue_from``).  A
        refused packet is dropped, and the session lingers on as long as the client talks,
        so that later data cannot start a session either (the -W PostgreSQL storm: each new
        connection began in the middle of the stream, was closed, and the next packet
        started another)."""
        if self.outcome not in _TARGET_ENDED:
            return True
        off = self._coff(pkt.seq)
        if off - self._cap_end > CLIENT_SEQ_JUMP_MAX_BYTES:
            return True  # not this stream: a new connection on the tuple
        c = self.counters
        ok = not self._restart_refused
        if ok and (pkt.ack == self._cap_ack and off == self._cap_end):
            c["reconnect_skipped_bytes"] += pkt.data_len  # the rest of a request
            ok = False
        elif ok and not self._may_reconnect(by_target=True):
            self._restart_refused = True
            ok = False
        if ok:
            return True
        end = off + pkt.data_len
        if end > self._cap_end:
            self._cap_end = end
            self._cap_ack = pkt.ack
        self._drop(DropReason.SESSION_CLOSED)
        if self._linger_at is not None:
            self._linger_at = now + self.config.linger_s
        return False

    def continue_from(self, old: TcpSession) -> None:
        """This new session carries on ``old``'s client connection (``may_continue``): if the
        target ended that one, this is a reconnect in effect, counted as one."""
        if old.outcome not in _TARGET_ENDED:
            return
        self._reconnects = old._reconnects + 1
        self._reconnected = True
        self.counters["reconnect"] += 1

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        st = self.state
        if st >= _LINGER:
            return self._linger_at
        # The idle deadline (_idle_deadline, inlined: this runs after every input) is always
        # set, so it is the starting point; a tie keeps it, as before.
        cfg = self.config
        best = self._last_resp_at + (
            cfg.session_timeout_s
            if self._pending
            or self._unacked
            or self._rst_seg is not None
            or (self._fin_seg is not None and not self._fin_sent)
            else cfg.keepalive_timeout_s
        )
        for t in (
            self._handshake_at,
            self._syn_at,
            self._rto_at,
            self._ack_at,
            self._persist_at,
            self._gate.at,
            self._fin_wait_at,
            self._gap_at,
        ):
            if t is not None and t < best:
                best = t
        return best

    # -- inputs -----------------------------------------------------------------------------

    def receive_client(self, pkt: TcpPacket, now: float) -> None:
        try:
            self._receive_client(pkt, now)
        except Exception:
            if self.strict:
                raise
            self._internal_error(now)

    def receive_response(self, pkt: TcpPacket, now: float) -> None:
        try:
            self._receive_response(pkt, now)
        except Exception:
            if self.strict:
                raise
            self._internal_error(now)

    def handle_timer(self, now: float) -> None:
        try:
            self._handle_timer(now)
        except Exception:
            if self.strict:
                raise
            self._internal_error(now)

    def packets_to_send(self, now: float) -> list[bytes]:
        out: list[bytes] = []
        self._now = now
        try:
            self._packets_to_send(now, out)
        except Exception:
            if self.strict:
                raise
            self._internal_error(now)
        return out

    def handle_route_down(self, down: bool, now: float) -> None:
        """An intercept is unreachable (down=True): the target's answers cannot reach us, so
        silence must not end the session (the retransmission limit waits; -t still applies).
        Back (down=False, the route was announced again): retransmit now with a fresh
        backoff, or probe when nothing is in flight, so the target answers within an RTT."""
        self._route_down = down
        if down or not (self.state is _ESTABLISHED or self.state is _FIN_WAIT):
            return
        self._retries = self._est.backoff = 0
        if self._unacked:
            self._retx_due = True
        else:  # an old seq: the target answers with an ACK carrying its current seq
            probe = (ACK, self._seq(self._snd_una - 1), self._rcv_nxt, None, None)
            self._ctl.append(probe)

    # -- client side ------------------------------------------------------------------------

    def _drop(self, reason: DropReason) -> None:
        self.counters[_DROP_KEYS[reason]] += 1

    def _coff(self, seq: int) -> int:
        """Unwrap a client-space seq into an offset, taking the nearest one to _snd_nxt."""
        nxt = self._snd_nxt
        d = (seq - self._base - nxt) & SEQ_MASK  # type: ignore[operator]
        if d >= SEQ_HALF:
            d -= SEQ_SPACE
        return nxt + d

    def _receive_client(self, pkt: TcpPacket, now: float) -> None:
        if self.state >= _LINGER:
            self._drop(DropReason.SESSION_CLOSED)
            return
        flags = pkt.flags
        if flags & SYN:
            self._client_syn(pkt)
            return
        dlen = pkt.data_len
        if self._base is None:
            # spec §3.6: only a packet with payload starts a session without a SYN.
            if not dlen:
                self._drop(DropReason.NO_SESSION)
                return
            if not self.config.fake_handshake:
                self._drop(DropReason.NO_SYN)
                return
            self._base = (pkt.seq - 1) & SEQ_MASK
        off = self._coff(pkt.seq)
        if off > self._cap_end + CLIENT_SEQ_JUMP_MAX_BYTES:
            self._drop(DropReason.CLIENT_OUT_OF_WINDOW)
            return
        if flags & RST:
            if self._rst_seg is not None:
                self._drop(DropReason.CLIENT_RETRANSMIT)
                return
            self._rst_seg = _Seg(off, off, pkt, flags & (RST | ACK), b"")
            return
        if not dlen and not flags & FIN:
            self._client_pure_ack(pkt, off)
            return
        if off <= self._iss:
            self._drop(DropReason.OLD_SEGMENT)
            return
        fin = self._fin_seg
        if fin is not None and (flags & FIN or off + dlen > fin.off):
            self._drop(DropReason.CLIENT_RETRANSMIT if flags & FIN else DropReason.AFTER_FIN)
            return
        if dlen:
            self._store_data(pkt, off, dlen)
        if flags & FIN:
            end = off + dlen
            self._fin_seg = _Seg(end, end + 1, pkt, FIN | (flags & ACK), b"")

    def _client_syn(self, pkt: TcpPacket) -> None:
        if pkt.flags & ACK:
            self._drop(DropReason.SYN_CONFLICT)
            return
        if self._base is None:
            self._base = pkt.seq
            self._syn_pkt = pkt
            return
        if self._syn_pkt is not None:
            same = self._syn_pkt.seq == pkt.seq
            self._drop(DropReason.SYN_RETRANSMIT if same else DropReason.SYN_CONFLICT)
            return
        if self.owns_syn(pkt.seq):
            # The SYN of a flow whose data was captured first: a real handshake after all.
            self._syn_pkt = pkt
            return
        self._drop(DropReason.SYN_CONFLICT)

    def _client_pure_ack(self, pkt: TcpPacket, off: int) -> None:
        gate = self._gate
        base = gate.online_base
        if (
            off == 1
            and self._syn_pkt is not None
            and gate.last_data_ack is None
            and (base is None or _after(base, pkt.ack))
        ):
            # The handshake's ACK: online ISN + 1, the origin of the request gate's byte
            # count.  Later pure ACKs (the client reading responses) must not move it; without
            # a captured handshake the first data segment's ack is the origin instead.
            gate.online_base = pkt.ack
        if (
            self._syn_pkt is not None
            and self._third_pkt is None
            and off == 1
            and not self._fake_syn
            and (self.state <= _SYN_SENT or self._need_third)
        ):
            self._third_pkt = pkt  # the handshake's third packet: sent as captured
            return
        self._drop(DropReason.PURE_ACK)

    def _store_data(self, pkt: TcpPacket, off: int, dlen: int) -> None:
        c = self.counters
        end = off + dlen
        if end <= self._snd_nxt:
            c["total cont retransmit"] += 1
            self._drop(DropReason.CLIENT_RETRANSMIT)
            return
        payload = pkt.payload
        if len(payload) < dlen:
            # A truncated capture (snaplen): the missing bytes cannot be replayed; zeros keep
            # the stream's shape so the session goes on instead of stalling on a gap.
            c["client_truncated"] += 1
            payload = payload + bytes(dlen - len(payload))
        flags = pkt.flags & _DATA_FLAGS
        mtu = self.config.mtu
        if 40 + len(pkt.options) + dlen > mtu:  # spec §3.4: GRO/TSO aggregates
            pieces = split_mtu(pkt if payload is pkt.payload else _with_payload(pkt, payload), mtu)
            segs = []
            for p in pieces:
                o = off + ((p.seq - pkt.seq) & SEQ_MASK)
                segs.append(_Seg(o, o + p.data_len, pkt, p.flags & _DATA_FLAGS, p.payload))
        else:
            segs = [_Seg(off, end, pkt, flags, payload)]
        if end > self._cap_end:
            # Bytes of the client's stream, gaps included: what the client sent, the
            # denominator of the replay fidelity (client_bytes_acked / this).
            c["client_bytes_captured"] += end - self._cap_end
            self._cap_end = end
            self._cap_ack = pkt.ack
        pend = self._pending
        for seg in segs:
            if not pend or pend[-1].off <= seg.off:
                pend.append(seg)
                self._held += seg.end - seg.off
                continue
            # Reordered capture: insert in offset order (rare; scan from the tail).
            i = len(pend) - 1
            while i > 0 and pend[i - 1].off > seg.off:
                i -= 1
            prev = pend[i - 1] if i else None
            if prev is not None and prev.off == seg.off and prev.end >= seg.end:
                c["total cont retransmit"] += 1
                self._drop(DropReason.CLIENT_RETRANSMIT)
                continue
            pend.insert(i, seg)
            self._held += seg.end - seg.off

    # -- responses --------------------------------------------------------------------------

    def _receive_response(self, pkt: TcpPacket, now: float) -> None:
        c = self.counters
        c["resp"] += 1
        st = self.state
        flags = pkt.flags
        if flags & RST:
            c["resp rst"] += 1
        if st >= _LINGER:
            self._linger_response(pkt)
            return
        if st < _ESTABLISHED:
            self._handshake_response(pkt, now)
            return
        self._last_resp_at = now
        if flags & RST:
            self._target_reset(now)
            return
        if flags & SYN:
            # The SYN-ACK again: our third packet was lost.
            self._ack_due = True
            return
        if self._ts_ok and pkt.options:
            tsv = _tsval(pkt.options)
            if tsv is not None and not _after(self._ts_recent, tsv):
                self._ts_recent = tsv
        if flags & ACK and not self._process_ack(pkt, now):
            return
        dlen = pkt.data_len
        if not dlen and not flags & FIN:
            ahead = (pkt.seq - self._rcv_nxt) & SEQ_MASK
            if 0 < ahead <= self._rcv_wnd_max:
                # A pure ACK beyond what we received: the target sent data we never saw (lost
                # while no intercept was connected); acked over like a gap (spec §3.8 step 2).
                self._process_data(self._rcv_nxt, ahead, now)
                self._ack_due = True  # it has been waiting for this ACK: no delay
        if dlen or flags & FIN:
            if self._rcv_wnd_max < (pkt.seq - self._rcv_nxt) & SEQ_MASK < SEQ_HALF:
                # Beyond any window we ever offered: not this connection's data (a late
                # record from before a reconnect).  RFC 9293 §3.10.7.4: ACK and drop.
                self._ack_due = True
                self._drop(DropReason.OUT_OF_WINDOW)
                return
        if dlen:
            c["c-resp"] += 1
            if not self._retx_answered:
                self._retx_answered = True
                c["recv packs after retransmission"] += 1  # spec §3.18
            self._process_data(pkt.seq, dlen, now)
        if flags & FIN:
            self._target_fin(pkt, now)

    def _handshake_response(self, pkt: TcpPacket, now: float) -> None:
        flags = pkt.flags
        if self.state is _SYN_SENT:
            ack_ok = bool(flags & ACK) and self._coff(pkt.ack) == self._snd_nxt
            if flags & SYN and ack_ok and not flags & RST:
                self._establish(pkt, now)
                return
            if flags & RST:
                if ack_ok or not flags & ACK:
                    self._end(Outcome.REFUSED, now)
                else:
                    self._drop(DropReason.UNEXPECTED_RESPONSE)
                return
        elif flags & RST:
            self._drop(DropReason.UNEXPECTED_RESPONSE)
            return
        # spec §3.8: a response before the handshake completed that is not our SYN-ACK (an
        # older connection on this tuple, or a SYN-ACK for another SYN) gets a RST; the SYN
        # retransmission then gets through.
        self._queue_rst_for(pkt)
        self._drop(DropReason.UNEXPECTED_RESPONSE)

    def _queue_rst_for(self, pkt: TcpPacket) -> None:
        flags = pkt.flags
        end = pkt.seq + pkt.data_len + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        seq = pkt.ack if flags & ACK else 0
        self._ctl.append((RST | ACK, seq, end & SEQ_MASK, b"", None))

    def _establish(self, pkt: TcpPacket, now: float) -> None:
        opts = parse_options(pkt.options) if pkt.options else None
        self._rcv_nxt = (pkt.seq + 1) & SEQ_MASK
        self._rcv_data = 0
        self._rcv_unacked = 0
        self._gate.rcv_data_at_req = 0
        ts = opts.timestamp if opts is not None else None
        self._ts_ok = self._syn_ts and ts is not None
        if self._ts_ok:
            self._ts_recent = ts[0]  # type: ignore[index]
        # RFC 7323 §2.2: both SYNs must carry the option for scaling to be in effect; the
        # SYN-ACK's own window is never scaled.
        ws = opts.wscale if opts is not None else None
        ours = self._syn_wscale
        scaling = ours is not None and ws is not None
        self._snd_wscale = ws if scaling else 0  # type: ignore[assignment]
        # The largest window we can have offered (ours is scaled only if scaling is in effect).
        self._rcv_wnd_max = WINDOW_MAX_BYTES << (ours if scaling else 0)  # type: ignore[operator]
        self._snd_wnd = pkt.window
        self._snd_una = self._snd_nxt
        if not self._syn_retx:
            self._est.sample(now - self._syn_sent_at)
        self._syn_at = None
        self._handshake_at = None
        self._syn_due = False
        self._set_state(_ESTABLISHED)
        self.counters["conns"] += 1
        self._need_third = True
        self._last_resp_at = now
        self._last_resp_data_at = now

    def _process_ack(self, pkt: TcpPacket, now: float) -> bool:
        """ACK processing; False if the segment is to be dropped."""
        a = self._coff(pkt.ack)
        una, nxt = self._snd_una, self._snd_nxt
        if a > nxt:
            # RFC 9293 §3.10.7.4: an ACK for something not yet sent: ACK and drop.
            self._ack_due = True
            self._drop(DropReason.BAD_ACK)
            return False
        wnd = pkt.window << self._snd_wscale
        if a > una:
            self._acked(a, now)
            self._snd_wnd = wnd
            self._dupacks = 0
        elif a == una:
            if wnd != self._snd_wnd:
                self._snd_wnd = wnd  # a window update, not a duplicate
            elif not pkt.data_len and not pkt.flags & FIN and una != nxt:
                self._dupacks += 1
                if self._dupacks == DUP_ACK_THRESHOLD and self._recover is None:
                    # RFC 5681 §3.2 fast retransmit (once per recovery episode)
                    self._retx_due = True
                    self._recover = nxt
                    self.counters["fast retransmit"] += 1
        if self._snd_wnd > 0 and self._persist_at is not None:
            # QUIRK fixed (spec §3.8 check_bak_ack): any window update reopens the window.
            self._persist_at = None
            self._persist_backoff = 0
        return True

    def _acked(self, a: int, now: float) -> None:
        una = self._snd_una
        sample = self._unacked.take_acked(a, now)  # Karn's rule: None after a retransmission
        acked = a - una
        fin = self._fin_seg
        if self._fin_sent and fin is not None and una <= fin.off < a:
            acked -= 1
        c = self.counters
        if acked > 0:
            c["client_bytes_acked"] += acked
        self._snd_una = a
        self._retries = 0
        self._est.backoff = 0
        if sample is not None:
            self._est.sample(sample)
        if self._recover is not None:
            if a < self._recover:
                self._retx_due = True  # NewReno partial ack: the next hole (RFC 6582)
            else:
                self._recover = None
        self._rto_at = now + self._est.rto() if a < self._snd_nxt else None

    def _process_data(self, seq: int, dlen: int, now: float) -> None:
        end = (seq + dlen) & SEQ_MASK
        d = (end - self._rcv_nxt) & SEQ_MASK
        if 0 < d < SEQ_HALF:
            # New response bytes.  Like C (spec §3.8 step 2) a gap is acked over: the target
            # did send those bytes (intercept just did not see them), and we need no payload.
            self._rcv_nxt = end
            self._rcv_data += d
            self._rcv_unacked += d
            self._last_resp_data_at = now
            if self._rcv_unacked >= 2 * self._rcv_mss:
                self._ack_due = True  # RFC 9293 §3.8.6.3: at least every second full segment
            elif self._ack_at is None:
                self._ack_at = now + DELAYED_ACK_S
        else:
            # Old data again: the target missed our ACK; a real stack ACKs at once.
            self._ack_due = True
            self.counters["resp retransmitted"] += 1

    def _target_fin(self, pkt: TcpPacket, now: float) -> None:
        # Every branch below ends or reconnects the connection, so a FIN is seen only once
        # per connection here; its retransmissions reach _linger_response.
        fin_end = (pkt.seq + pkt.data_len + 1) & SEQ_MASK
        self._rcv_nxt = fin_end
        c = self.counters
        c["resp fin"] += 1
        ack_ctl = (ACK, self._seq(self._snd_nxt), fin_end, None, None)
        if self.state is _FIN_WAIT:
            self._ctl.append(ack_ctl)
            self._end(Outcome.CLOSED, now, graceful=True)
        elif self._pending and self._may_reconnect(by_target=True):
            # spec §3.8 proc_bak_fin: unsent client data remains: reconnect and send it.
            self._ctl.append(ack_ctl)
            self._reconnect(now, send_rst=True)
        elif self._fin_seg is not None:
            # The client has closed too: our FIN answers theirs (and acks it).
            fin = self._fin_seg
            fin.off = self._snd_nxt
            fin.end = fin.off + 1
            self._ctl.append((fin.flags | ACK, self._seq(fin.off), fin_end, b"", fin))
            self._snd_nxt = fin.end
            self._fin_sent = True
            c["fin"] += 1
            self._end(Outcome.CLOSED, now, graceful=True)
        else:
            # spec §3.8 proc_bak_fin: tcpcopy never waits for the client's FIN: ACK, then RST.
            self._ctl.append(ack_ctl)
            self._end(Outcome.TARGET_CLOSED, now, rst_off=self._snd_nxt)

    def _target_reset(self, now: float) -> None:
        if self._pending and self._may_reconnect(by_target=True):
            self._reconnect(now, send_rst=False)
        else:
            self._end(Outcome.TARGET_RESET, now)

    def _linger_response(self, pkt: TcpPacket) -> None:
        flags = pkt.flags
        if flags & RST:
            self._drop(DropReason.STRAY_RESPONSE)
            return
        if self._graceful and not pkt.data_len and not flags & SYN:
            if flags & FIN:
                # Its FIN again (our ACK was lost): ACK it, as TIME_WAIT does.
                self._ctl.append((ACK, self._seq(self._snd_nxt), self._rcv_nxt, None, None))
            return  # the ACK of our FIN: the expected end of a clean close
        self._queue_rst_for(pkt)
        self._drop(DropReason.STRAY_RESPONSE)

    # -- timers -----------------------------------------------------------------------------

    def _busy(self) -> bool:
        """Work is pending: captured segments unsent or sent ones unacknowledged."""
        return bool(self._pending or self._unacked or self._rst_seg is not None) or (
            self._fin_seg is not None and not self._fin_sent
        )

    def _idle_deadline(self) -> float:
        cfg = self.config
        limit = cfg.session_timeout_s if self._busy() else cfg.keepalive_timeout_s
        return self._last_resp_at + limit

    def _handle_timer(self, now: float) -> None:
        st = self.state
        if st >= _LINGER:
            if self._linger_at is not None and now >= self._linger_at:
                self._linger_at = None
                self._set_state(_FINISHED)
            return
        if self._handshake_at is not None and now >= self._handshake_at:
            self._end(Outcome.HANDSHAKE_TIMEOUT, now)
            return
        if self._syn_at is not None and now >= self._syn_at:
            self._syn_due = True
            self._syn_rto *= 2
            self._syn_at = now + self._syn_rto
        if self._rto_at is not None and now >= self._rto_at:
            if not self._unacked:
                self._rto_at = None
            else:
                self._retries += 1
                if self._retries > RETRIES_MAX:
                    if not self._route_down:
                        self._end(Outcome.RETRANSMIT_LIMIT, now, rst_off=self._snd_una)
                        return
                    self._retries = RETRIES_MAX  # deaf, not refused: go on at the max RTO
                est = self._est
                est.backoff = min(est.backoff + 1, RETRIES_MAX)
                self._retx_due = True
                self._dupacks = 0
                # After a timeout every hole is retransmitted as the acks come (RFC 6582).
                self._recover = self._snd_nxt
                self._rto_at = now + self._est.rto()
                self.counters["rto"] += 1
        if self._persist_at is not None and now >= self._persist_at:
            self._probe_due = True
            self._persist_backoff += 1
            self._persist_at = now + self._est.persist_interval(self._persist_backoff)
        if self._ack_at is not None and now >= self._ack_at:
            self._ack_at = None
            self._ack_due = True
        if self._fin_wait_at is not None and now >= self._fin_wait_at:
            self._end(Outcome.FIN_WAIT_TIMEOUT, now, rst_off=self._snd_nxt)
            return
        if self._gap_at is not None and now >= self._gap_at:
            self._gap_at = None
            self._abandon_gap(now)
            if self.state >= _LINGER:
                return
        if now >= self._idle_deadline():
            # spec §3.9 sess_obso: -t while work is pending, -k when idle.
            outcome = Outcome.TIMEOUT if self._busy() else Outcome.IDLE
            has_conn = st is _ESTABLISHED or st is _FIN_WAIT
            self._end(outcome, now, rst_off=self._snd_una if has_conn else None)

    def expedite_gap(self, due: float) -> bool:
        """The capture reported that its ring dropped packets (engine/io/ring.py
        RECORD_FLAG_LOSS_BEFORE): a hole now held in front of the captured stream is most
        likely that loss, not a reordering, so it is given up at ``due`` instead of
        CLIENT_GAP_WAIT_S after it opened (a whole second in which this session's later
        requests queue up).  Once per hole; True if the deadline moved."""
        at = self._gap_at
        if not self._gap_held or self._gap_fast or at is None or at <= due:
            return False
        self._gap_fast = True
        self._gap_at = due
        self.counters["client gap ring loss"] += 1
        return True

    def _abandon_gap(self, now: float) -> None:
        """The hole in front of the captured stream outlived CLIENT_GAP_WAIT_S: its bytes are
        lost for good.  Resynchronise: RST the target's side and reconnect (faked handshake)
        from the next captured request, as for a target FIN/RST with unsent data (spec §3.8
        reconstruct_sess); the gate starts over, so later requests replicate."""
        if self.state is not _ESTABLISHED:
            return
        nxt = self._snd_nxt
        pend = self._pending
        fin = self._fin_seg
        if pend:
            if pend[0].off <= nxt:
                return  # filled meanwhile; the pump goes on
        elif fin is None or self._fin_sent or fin.off <= nxt:
            return
        if self._unacked:
            # Sent data is still in flight: a reconnect would throw it away.  Look again
            # once the retransmission machinery has had its turn.
            self._gap_at = now + self._est.rto()
            return
        c = self.counters
        c["client gap abandoned"] += 1
        self._gap_held = False
        if not pend:
            # Only the client's FIN is beyond the hole: close at what was sent instead.
            fin.off = nxt  # type: ignore[union-attr]
            fin.end = nxt + 1  # type: ignore[union-attr]
            return
        if not self._may_reconnect(by_target=False):
            self._end(Outcome.RECONNECT_LIMIT, now, rst_off=nxt)
            return
        self._reconnect(now, send_rst=True)

    def _path_rtt(self) -> float:
        return self._est.path_rtt()

    @property
    def _srtt(self) -> float | None:
        return self._est.srtt

    # What the request gate reads of the receive side (engine/session_parts.RequestGate).

    @property
    def rtt_estimator(self) -> RttEstimator:
        return self._est

    @property
    def rcv_data(self) -> int:
        """Response bytes received on this connection."""
        return self._rcv_data

    @property
    def rcv_unacked(self) -> int:
        """Response bytes received and not yet acknowledged."""
        return self._rcv_unacked

    @property
    def last_resp_data_at(self) -> float:
        return self._last_resp_data_at

    @property
    def last_ack_at(self) -> float:
        return self._last_ack_at

    def ack_now(self) -> None:
        """Owe the target an ACK at the next ``packets_to_send``."""
        self._ack_due = True

    # -- state changes ----------------------------------------------------------------------

    def _set_state(self, new: State) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"illegal session transition {self.state.name} -> {new.name}")
        self.state = new

    def _end(
        self,
        outcome: Outcome,
        now: float,
        rst_off: int | None = None,
        graceful: bool = False,
    ) -> None:
        c = self.counters
        if rst_off is not None:
            # spec §3.9 sess_post_disp: a passive RST frees the target's side.
            self._ctl.append((RST | ACK, self._seq(rst_off), self._rcv_nxt, b"", None))
        if self.unsend:
            c["unsend dropped"] += self.unsend
        self._pending.clear()
        self._held = 0
        self._unacked.clear()
        self._rst_seg = None
        if not self._fin_sent:
            self._fin_seg = None
        self._syn_at = self._handshake_at = self._rto_at = self._ack_at = None
        self._persist_at = self._gate.at = self._fin_wait_at = self._gap_at = None
        self._syn_due = self._retx_due = self._probe_due = self._ack_due = False
        self._need_third = False
        self._graceful = graceful
        self._set_state(_LINGER)
        self._linger_at = now + self.config.linger_s
        self.outcome = str(outcome)
        c["ended_" + outcome.value] += 1
        if outcome in _OBSOLETE:
            c["obs del"] += 1
        c["tw"] += 1  # a gauge: the table takes it back when the session is forgotten
        self._events.append(SessionEnded(self.outcome))

    def _may_reconnect(self, by_target: bool) -> bool:
        """Whether a reconnect can work (module docstring); a refusal is counted by reason.
        ``by_target``: the target closed or reset the connection."""
        cfg = self.config
        if not cfg.reconnect:
            reason = "off"
        elif by_target and self._reconnected and self._rcv_data == 0:
            # This connection was itself a reconnect, and the target ended it before sending
            # anything: it does not take the stream from there (the -W PostgreSQL storm).
            reason = "unanswered"
        elif self._reconnects >= cfg.reconnect_budget:
            reason = "budget"
        else:
            return True
        self.counters["reconnect_refused_" + reason] += 1
        return False

    def _reconnect(self, now: float, send_rst: bool) -> None:
        """spec §3.8 reconstruct_sess: RST the target's side, then a faked handshake on the
        same client tuple (spec §3.13) from the next request boundary (``_skip_to_request``)."""
        self.counters["reconnect"] += 1
        self._reconnects += 1
        self._reconnected = True
        # What was sent and never acknowledged is thrown away with the connection: the next
        # segment continues it only if it carries the same ack (the same request).
        self._resync = (self._snd_nxt, self._gate.last_data_ack)
        if send_rst:
            self._ctl.append((RST | ACK, self._seq(self._snd_nxt), self._rcv_nxt, b"", None))
        self._unacked.clear()
        self._set_state(_CLOSED)
        self._fake_syn = True
        self._need_third = False
        self._rto_at = self._ack_at = self._persist_at = self._gate.at = None
        self._retx_due = self._probe_due = self._ack_due = False
        self._recover = None
        self._dupacks = self._retries = self._est.backoff = self._persist_backoff = 0
        self._ts_ok = False
        self._snd_wscale = 0
        self._gate.restart()  # the new connection's first request goes at once
        self._gap_held = False
        self._gap_at = None

    @property
    def half_open(self) -> bool:
        """The client sent its SYN and nothing after it: no handshake ACK, no data, no FIN
        or RST (what a SYN flood's sessions look like; engine/core/table.py shed_half_open)."""
        return (
            self.state < _LINGER
            and self._syn_pkt is not None
            and self._third_pkt is None
            and self._cap_end <= 1
            and not self._pending
            and self._fin_seg is None
            and self._rst_seg is None
        )

    def shed_half_open(self, now: float) -> None:
        """Memory pressure: give this half-open session up (a RST frees the target's side
        if it answered), counted as ``ended_shed_half_open``."""
        if self.state >= _LINGER:
            return
        has_conn = self.state is _ESTABLISHED or self.state is _FIN_WAIT
        self._end(Outcome.SHED_HALF_OPEN, now, rst_off=self._snd_nxt if has_conn else None)
        # No linger: its memory is what is short.  A late SYN-ACK finds no session and is
        # dropped (unknown response); the target gives its half-open side up by itself.
        self._linger_at = now

    def end_input(self, now: float) -> bool:
        """The input ended for good (an offline replay after its tail, engine/proc/worker.py):
        end the session now, RST the target's side if a connection exists, count it as
        ``ended_offline_end``.  False when it had already ended."""
        st = self.state
        if st >= _LINGER:
            return False
        has_conn = st is _ESTABLISHED or st is _FIN_WAIT
        self._end(Outcome.OFFLINE_END, now, rst_off=self._snd_nxt if has_conn else None)
        return True

    def _skip_to_request(self, now: float) -> None:
        """Before a reconnect's SYN: drop captured segments until one starts a request (its
        ack differs from the one of the segment before it), so the new connection never
        starts in the middle of a request.  After a hole the segment before is the lost one:
        a segment whose ack differs from the last one known is taken as a boundary (requests
        are mostly one segment; a tail sent by mistake is refused by the target, and then
        rule "unanswered" stops the reconnects).  With no boundary captured yet the session
        waits (CLOSED) for more; if the client has closed meanwhile, it ends."""
        end, ack = self._resync  # type: ignore[misc]
        pend = self._pending
        skipped = 0
        while pend:
            seg = pend[0]
            if seg.end <= end:
                pend.popleft()  # a captured retransmission of what went before
                self._held -= seg.end - seg.off
                continue
            if seg.ack != ack and seg.off >= end:
                break
            pend.popleft()
            self._held -= seg.end - seg.off
            skipped += seg.end - max(seg.off, end)
            end, ack = seg.end, seg.ack
        if skipped:
            self.counters["reconnect_skipped_bytes"] += skipped
        if pend:
            self._resync = None
            return
        self._resync = (end, ack)
        if self._fin_seg is not None or self._rst_seg is not None:
            self._end(Outcome.TARGET_CLOSED, now)

    def _internal_error(self, now: float) -> None:
        self._drop(DropReason.INTERNAL_ERROR)
        if self.state < _LINGER:
            try:
                self._end(Outcome.ABORTED, now)
            except Exception:
                self.state = _LINGER
                self._linger_at = now + self.config.linger_s

    # -- output -----------------------------------------------------------------------------

    def _seq(self, off: int) -> int:
        return (self._base + off) & SEQ_MASK  # type: ignore[operator]

    def _ts_now(self) -> int:
        """The TSval to send now: the shared TS clock, never below what was sent before on
        this connection (PAWS at the target; engine/codec/tcpseq.py, the TS clock)."""
        v = self._ts_val
        clock = _ts_clock(self._now)
        if v is None or _after(clock, v):
            v = self._ts_val = clock
        return v

    def _faked_options(self) -> bytes:
        if not self._ts_ok:
            return b""
        return _TS_OPTION.pack(1, 1, 8, 10, self._ts_now(), self._ts_recent)

    def _emit(
        self,
        out: list[bytes],
        flags: int,
        seq: int,
        ack: int,
        payload: bytes,
        seg: _Seg | None,
        options: bytes | None = None,
    ) -> None:
        """Build one packet toward the target (spec §3.10 rewrite rules)."""
        cip, cport = self.client
        tip, tport = self.target
        if seg is not None:
            pkt = seg.pkt
            opts = pkt.options if options is None else options
            if self._ts_ok and seg.tsval is not None:
                # TSval from our TS clock (monotonic: PAWS at the target; shared: RFC 6191
                # reuse of the tuple later), TSecr = the target's latest TSval.
                opts = set_timestamp(opts, self._ts_now(), self._ts_recent)
            # A captured zero window (the online client's buffer was full) is not ours to
            # repeat: we consume every response at once, and a 0 would stall the target.
            window = FAKED_WINDOW if self._fake_wnd else (pkt.window or FAKED_WINDOW)
            ip_id, ttl, tos, df = pkt.ip_id, pkt.ttl, pkt.tos, pkt.df
        else:
            opts = self._faked_options() if options is None else options
            window = FAKED_WINDOW
            ip_id = (self._ip_id + 1) & IP_ID_MASK
            ttl, tos, df = FAKED_TTL, 0, True
        self._ip_id = ip_id
        if not flags & ACK:
            ack = 0
        out.append(
            build_fields(
                cip, tip, cport, tport, seq, ack, flags, window, opts, payload, ip_id, ttl, tos, df
            )
        )
        if flags & ACK and ack == self._rcv_nxt:
            self._ack_at = None
            self._ack_due = False
            self._rcv_unacked = 0
            self._last_ack_at = self._now

    def _packets_to_send(self, now: float, out: list[bytes]) -> None:
        c = self.counters
        if self._ctl:
            self._emit_ctl(out)
        st = self.state
        if st is _ESTABLISHED or st is _FIN_WAIT:
            # The handshake's ACK goes out on its own only when no segment of this step
            # carries it: the first request (or the FIN) acks the SYN-ACK just as well.  A
            # captured RST waiting is no carrier: the target must see the connection made
            # before it is reset, as the online server did.
            third_owed = self._need_third
            if third_owed and self._rst_seg is not None:
                self._send_third(out)
                third_owed = False
            mark = len(out)
            if self._retx_due:
                self._retransmit(now, out)
            if self._probe_due:
                # A zero-window probe: an old seq makes the target answer with its window.
                self._probe_due = False
                self._emit(out, ACK, self._seq(self._snd_una - 1), self._rcv_nxt, b"", None)
                c["window probe"] += 1
            self._send_new(now, out)
            if third_owed:
                if len(out) > mark:
                    self._need_third = False
                else:
                    self._send_third(out)
            st = self.state
            if (st is _ESTABLISHED or st is _FIN_WAIT) and (
                self._ack_due or (self._ack_at is not None and now >= self._ack_at)
            ):
                self._emit(out, ACK, self._seq(self._snd_nxt), self._rcv_nxt, b"", None)
                c["send"] += 1
                c["send ack"] += 1
        elif st is _CLOSED:
            if self._resync is not None:
                self._skip_to_request(now)
            if self._base is not None and (
                self._pending or (self._syn_pkt is not None and not self._fake_syn)
            ):
                self._send_syn(now, out)
        elif st is _SYN_SENT:
            if self._syn_due:
                self._syn_due = False
                self._syn_retx = True
                out.append(self._syn_bytes)
                c["retransmit"] += 1
                c["syn retransmit"] += 1
        if self._ctl:
            self._emit_ctl(out)

    def _emit_ctl(self, out: list[bytes]) -> None:
        c = self.counters
        for flags, seq, ack, opts, seg in self._ctl:
            self._emit(out, flags, seq, ack, b"", seg, opts if seg is None else None)
            c["send"] += 1
            if flags & RST:
                c["reset"] += 1
        self._ctl.clear()

    def _send_syn(self, now: float, out: list[bytes]) -> None:
        c = self.counters
        syn = self._syn_pkt
        if syn is not None and not self._fake_syn:
            opts = parse_options(syn.options) if syn.options else None
            self._syn_ts = opts is not None and opts.timestamp is not None
            ws = opts.wscale if opts is not None else None
            self._syn_wscale = WSCALE_MAX if ws is not None and ws > WSCALE_MAX else ws
            self._rcv_mss = (opts.mss if opts is not None else None) or DEFAULT_MSS
            syn_options = syn.options
            if self._syn_ts:
                # Our TS clock, not the captured TSval: newer than anything an earlier
                # connection on this tuple sent, so a target still holding it in TIME_WAIT
                # takes this SYN (RFC 6191; engine/codec/tcpseq.py, the TS clock).
                self._ts_val = None
                self._now = now
                syn_options = set_timestamp(syn_options, self._ts_now(), 0)
            self._iss = 0
            self._fake_wnd = False
            self._ip_id = syn.ip_id
            syn_fields = (
                self.client[0],
                self.target[0],
                self.client[1],
                self.target[1],
                self._seq(0),
                0,
                syn.flags & _SYN_FLAGS,
                syn.window,
                syn_options,
                b"",
                syn.ip_id,
                syn.ttl,
                syn.tos,
                syn.df,
            )
        else:
            # spec §3.7 step 4, §3.11 send_faked_syn: seq = first data seq - 1, MSS = -D only,
            # window 65535, IP ID = the captured id - 2, TTL 64, DF.
            head = self._pending[0]
            self._fake_syn = True
            self._iss = head.off - 1
            self._syn_ts = False
            self._syn_wscale = None
            self._ts_val = None
            self._rcv_mss = self.config.mss
            self._fake_wnd = True
            self._ip_id = (head.pkt.ip_id - 2) & IP_ID_MASK
            syn_fields = (
                self.client[0],
                self.target[0],
                self.client[1],
                self.target[1],
                self._seq(self._iss),
                0,
                SYN,
                FAKED_WINDOW,
                build_options(mss=self.config.mss),
                b"",
                self._ip_id,
                FAKED_TTL,
                0,
                True,
            )
            if self._reconnects == 0:
                c["for no syn"] += 1
        self._snd_una = self._iss
        self._snd_nxt = self._iss + 1
        self._rcv_nxt = 0
        self._syn_bytes = build_fields(*syn_fields)
        # spec §1.2, §6 item 1: the route goes out before the SYN.
        self._events.append(RouteNeeded(self.client[0], self.client[1], *self.target))
        out.append(self._syn_bytes)
        c["send"] += 1
        c["send syn"] += 1
        self._set_state(_SYN_SENT)
        self._syn_sent_at = now
        self._syn_retx = False
        self._syn_rto = SYN_RTO_INITIAL_S
        self._syn_at = now + SYN_RTO_INITIAL_S
        self._handshake_at = now + self.config.handshake_timeout_s

    def _send_third(self, out: list[bytes]) -> None:
        self._need_third = False
        third = self._third_pkt
        seq = self._seq(self._snd_nxt)
        if third is not None and not self._fake_syn:
            seg = _Seg(self._snd_nxt, self._snd_nxt, third, ACK, b"")
            self._emit(out, (third.flags & _DATA_FLAGS) | ACK, seq, self._rcv_nxt, b"", seg)
        else:
            # spec §3.11 send_faked_third_handshake
            self._emit(out, ACK, seq, self._rcv_nxt, b"", None)
        self.counters["send"] += 1

    def _retransmit(self, now: float, out: list[bytes]) -> None:
        self._retx_due = False
        head = self._unacked.resend_head(self._snd_una)
        if head is None:
            return
        seg, off, payload = head
        self._emit(out, seg.flags, self._seq(off), self._rcv_nxt, payload, seg)
        self._retx_answered = False
        self.counters["retransmit"] += 1
        self._rto_at = now + self._est.rto()

    def _send_new(self, now: float, out: list[bytes]) -> None:
        """The pump: captured segments in order, through gap, gate and window checks."""
        c = self.counters
        pend = self._pending
        gate = self._gate
        if self.state is _ESTABLISHED:
            while pend:
                seg = pend[0]
                nxt = self._snd_nxt
                if seg.end <= nxt:
                    pend.popleft()  # all of it was sent already (a captured retransmission)
                    self._held -= seg.end - seg.off
                    c["total cont retransmit"] += 1
                    self._drop(DropReason.CLIENT_RETRANSMIT)
                    continue
                if seg.off > nxt:
                    # spec §3.7 step 6d: a gap in the captured stream holds the session.
                    if not self._gap_held:
                        self._gap_held = True
                        self._gap_at = now + CLIENT_GAP_WAIT_S
                        self._gap_fast = False
                        c["client gap"] += 1
                    break
                self._gap_held = False
                self._gap_at = None
                if seg.off < nxt:  # overlap: send only the new part
                    self._held -= nxt - seg.off
                    seg.payload = seg.payload[nxt - seg.off :]
                    seg.off = nxt
                    c["client overlap"] += 1
                ack = seg.ack
                new_req = ack != gate.last_data_ack
                if (
                    new_req
                    and ack != gate.released_ack
                    and not gate.open(self, ack, now, _GATE_DATA)
                ):
                    break
                size = seg.end - seg.off
                room = self._snd_una + self._snd_wnd - nxt
                if size > room:
                    if nxt != self._snd_una:
                        break  # wait for acks to open the window
                    if room <= 0:
                        # Zero window: stop; probe until it reopens (spec §3.8, QUIRK fixed).
                        if self._persist_at is None:
                            self._persist_at = now + self._est.persist_interval(
                                self._persist_backoff
                            )
                        break
                    # Nothing in flight and a window smaller than the segment: send what fits.
                    head = _Seg(seg.off, seg.off + room, seg.pkt, seg.flags & ~PSH, b"")
                    head.payload = seg.payload[:room]
                    seg.payload = seg.payload[room:]
                    seg.off += room
                    self._held -= room
                    seg = head
                else:
                    pend.popleft()
                    self._held -= seg.end - seg.off
                self._emit(out, seg.flags, self._seq(seg.off), self._rcv_nxt, seg.payload, seg)
                seg.sent_at = now
                seg.retx = False
                self._unacked.append(seg)
                self._snd_nxt = seg.end
                if self._rto_at is None:
                    self._rto_at = now + self._est.rto()
                c["send"] += 1
                c["send content"] += 1
                if new_req:
                    c["requests"] += 1
                    gate.rcv_data_at_req = self._rcv_data
                gate.last_data_ack = ack
            if not pend:
                self._send_fin(now, out)
        rst = self._rst_seg
        if rst is not None and (not pend or pend[0].off > self._snd_nxt):
            if self.state < _LINGER and (
                rst.ack == gate.last_data_ack
                or rst.ack == gate.released_ack
                or gate.open(self, rst.ack, now, _GATE_CLOSE)
            ):
                # spec §3.7 step 1: seq clamped to what the target expects.
                flags = rst.flags
                self._emit(out, flags, self._seq(self._snd_nxt), self._rcv_nxt, b"", rst)
                c["send"] += 1
                c["reset"] += 1
                self._rst_seg = None
                self._end(Outcome.CLIENT_RESET, now)

    def _send_fin(self, now: float, out: list[bytes]) -> None:
        fin = self._fin_seg
        if fin is None or self._fin_sent:
            return
        if fin.off > self._snd_nxt:
            # A hole in front of the client's FIN (spec §3.7 step 6d): bounded, as for data.
            if not self._gap_held:
                self._gap_held = True
                self._gap_at = now + CLIENT_GAP_WAIT_S
                self._gap_fast = False
                self.counters["client gap"] += 1
            return
        if self._snd_una != self._snd_nxt:
            return  # spec §3.13: the FIN waits until the target has acked all data
        ack = fin.ack
        gate = self._gate
        if (
            ack != gate.last_data_ack
            and ack != gate.released_ack
            and not gate.open(self, ack, now, _GATE_CLOSE)
        ):
            return
        fin.off = self._snd_nxt
        fin.end = fin.off + 1
        self._emit(out, fin.flags, self._seq(fin.off), self._rcv_nxt, b"", fin)
        fin.sent_at = now
        fin.retx = False
        self._unacked.append(fin)
        self._snd_nxt = fin.end
        self._fin_sent = True
        if self._rto_at is None:
            self._rto_at = now + self._est.rto()
        c = self.counters
        c["send"] += 1
        c["fin"] += 1
        self._set_state(_FIN_WAIT)
        self._fin_wait_at = now + self.config.fin_wait_timeout_s
