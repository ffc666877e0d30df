"""Sequence-space arithmetic, the TS option fast path and the captured-segment record.  (pure)

The helpers TcpSession (engine/session.py) computes with: 32-bit modular comparison
(``after``), the TSval of a captured segment's options, and ``Segment``, one captured client
segment as an interval [off, end) of the session's unwrapped client stream.
"""

from __future__ import annotations

import struct

from engine.packet import TcpPacket, parse_options

__all__ = [
    "IP_ID_MASK",
    "SEQ_HALF",
    "SEQ_MASK",
    "SEQ_SPACE",
    "TS_OPTION",
    "Segment",
    "after",
    "tsval",
    "with_payload",
]

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
        return _TS_VALUES.unpack_from(options, 4)[0]
    ts = parse_options(options).timestamp
    return None if ts is None else ts[0]


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
