"""Sequence-space arithmetic, the TS option fast path and the captured-segment record.  (pure)

The helpers TcpSession (engine/core/session.py) computes with: 32-bit modular comparison
(``after``), the TSval of a captured segment's options, ``ts_clock`` (the TSval every replayed
connection sends), and ``Segment``, one captured client segment as an interval [off, end) of
the session's unwrapped client stream.

The TS clock.  The TSval we send is ours to choose (we are the sending TCP), so it is not
the captured one but a 1 kHz clock read from ``now``, the monotonic time every process of the
engine shares (CLOCK_MONOTONIC is system-wide): ``ts_clock(now) = floor(now * 1000) mod
2**32``.  Within a connection it never goes backwards (PAWS, RFC 7323 §5), and across
connections it means a new SYN on a 4-tuple always carries a TSval newer than anything an
earlier connection on that tuple sent, provided at least a millisecond has passed, even when
the earlier one was sent by a worker that has since died.  That is what lets the target's
kernel accept the SYN on a tuple still in its TIME_WAIT (RFC 6191; Linux
tcp_timewait_state_process: the SYN's TSval is after the TIME_WAIT's ts_recent), so
engine/core/rewrite.py's TupleAllocator may reuse such tuples.  1 kHz is Linux's own TS rate: the
2**31 PAWS horizon is 24.8 days.
"""

from __future__ import annotations

import struct

from engine.codec.packet import TcpPacket, parse_options

__all__ = [
    "IP_ID_MASK",
    "SEQ_HALF",
    "SEQ_MASK",
    "SEQ_SPACE",
    "TS_OPTION",
    "Segment",
    "after",
    "ts_clock",
    "tsval",
    "with_payload",
]

TS_CLOCK_HZ = 1000
"""The rate of ``ts_clock`` (Linux's TS clock since 4.13)."""
SEQ_MASK = 0xFFFFFFFF
SEQ_HALF = 1 << 31
SEQ_SPACE = 1 << 32
IP_ID_MASK = 0xFFFF

TS_OPTION = struct.Struct("!BBBBII")  # NOP, NOP, kind 8, len 10, TSval, TSecr (spec §3.10)
_TS_PREFIX = b"\x01\x01\x08\x0a"
_TS_VALUES = struct.Struct("!I")


class Segment:
    """A captured client segment: [off, end) of the unwrapped client stream."""

    __slots__ = ("off", "end", "ack", "flags", "payload", "pkt", "tsval", "sent_at", "retx")

    def __init__(self, off: int, end: int, pkt: TcpPacket, flags: int, payload: bytes) -> None:
        self.off = off
        self.end = end
        self.ack = pkt.ack
        self.flags = flags
        self.payload = payload
        self.pkt = pkt  # never mutated: it may be shared with other replicas
        opts = pkt.options  # tsval(), its fast path inlined: one Segment per captured packet
        if not opts:
            self.tsval: int | None = None
        elif opts[:4] == _TS_PREFIX and len(opts) >= 12:
            self.tsval = _TS_VALUES.unpack_from(opts, 4)[0]
        else:
            self.tsval = tsval(opts)
        self.sent_at = 0.0
        self.retx = False


def tsval(options: bytes) -> int | None:
    """TSval of a TS option, fast path for Linux's NOP,NOP,TS layout (spec §3.10)."""
    if not options:
        return None
    if options[:4] == _TS_PREFIX and len(options) >= 12:
        value: int = _TS_VALUES.unpack_from(options, 4)[0]
        return value
    ts = parse_options(options).timestamp
    return None if ts is None else ts[0]


def ts_clock(now: float) -> int:
    """The TSval sent at monotonic time ``now`` (see the module docstring)."""
    return int(now * TS_CLOCK_HZ) & SEQ_MASK


def after(a: int, b: int) -> bool:
    """a is later than b in 32-bit sequence space (spec conventions)."""
    return 0 < ((a - b) & SEQ_MASK) < SEQ_HALF


def with_payload(pkt: TcpPacket, payload: bytes) -> TcpPacket:
    """The captured packet with another payload (its data_len recomputed); the rest kept."""
    return TcpPacket(
        pkt.src,
        pkt.dst,
        pkt.sport,
        pkt.dport,
        pkt.seq,
        pkt.ack,
        pkt.flags,
        pkt.window,
        pkt.options,
        payload,
        -1,
        pkt.ip_id,
        pkt.ttl,
        pkt.tos,
        pkt.df,
        pkt.urgent,
    )
