"""IPv4/TCP headers as data: parse, build, checksums, options, MTU split.  (pure)

CONTRACT (other modules rely on these names; keep them):

- Addresses are ``int`` (the 32-bit value of the 4 network-order bytes); ``ip_from_str`` /
  ``ip_to_str`` convert.  Ports, seq, ack are plain ints.
- ``TcpPacket`` is one IPv4+TCP packet as mutable data.  ``payload`` holds the bytes we have;
  ``data_len`` is the TCP payload length the IP header *declares* (tot_len - ihl*4 - doff*4),
  which is larger than ``len(payload)`` for header-only captures (intercept records, snaplen).
  For a packet built by us, ``data_len == len(payload)``.
- ``parse_ip(buf)`` parses an IPv4 packet starting at offset 0; raises ``DecodeError`` for
  anything that is not a well-formed IPv4/TCP header.  Checksums are never verified (veth
  offload leaves partial checksums, design §9).
- ``build(pkt)`` returns the wire bytes with a fresh IP header checksum and TCP checksum.
- ``parse_options(raw)`` -> ``TcpOptions`` (best effort: stops at a malformed option).
- ``build_options(...)`` -> bytes padded with NOP/EOL to a multiple of 4.
- ``set_timestamp(options, tsval, tsecr)`` -> options bytes with the TS option's values
  replaced in place (layout unchanged); unchanged bytes if there is no TS option.
- ``split_mtu(pkt, mtu)`` -> list of packets no larger than ``mtu`` (spec §3.4).
- ``l2_offset(frame, linktype)`` -> offset of the IP header in a captured frame
  (DLT_EN10MB with VLAN, DLT_LINUX_SLL, DLT_RAW); raises ``DecodeError``.

Theory of operation
-------------------
This is the per-packet path of every worker, so it stays small and allocation-light:
headers are read with ``Struct.unpack_from`` straight out of the capture buffer (bytes or
memoryview), and only the option and payload slices are copied into the ``TcpPacket``.
``build`` packs the two headers, sums the pieces for the checksums and joins them once.

The Internet checksum (RFC 1071) is computed with one big-integer reduction: a buffer read
as a big-endian integer is congruent, modulo 0xFFFF, to the one's-complement sum of its
16-bit words (because 2**16 == 1 mod 0xFFFF).  ``int.from_bytes(...) % 0xFFFF`` runs in C and
is far faster than a Python loop over words.  The only value the congruence cannot tell apart
is 0 versus 0xFFFF; a true end-around-carry sum is 0 only when every word is 0.

What is kept from a parsed packet is exactly what ``build`` needs to reproduce it: the TCP
flag byte (the 4 reserved/NS bits next to ``doff`` are dropped), the IP ``DF`` bit (other
fragment bits are not reproduced), TOS, TTL, IP ID, IP options, TCP options (raw), urgent
pointer and window.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from engine.errors import DecodeError

__all__ = [
    "ACK",
    "CWR",
    "DLT_EN10MB",
    "DLT_IPV4",
    "DLT_LINUX_SLL",
    "DLT_LINUX_SLL2",
    "DLT_RAW",
    "ECE",
    "FIN",
    "IPPROTO_TCP",
    "IP_HEADER",
    "IP_HEADER_BYTES",
    "LINKTYPES",
    "PSH",
    "RST",
    "SYN",
    "TCP_HEADER",
    "TCP_HEADER_BYTES",
    "TCP_OPTIONS_MAX_BYTES",
    "TS_OPTION_BYTES",
    "URG",
    "DecodeError",
    "TcpOptions",
    "TcpPacket",
    "build",
    "build_fields",
    "build_options",
    "checksum",
    "ip_from_str",
    "ip_to_str",
    "l2_offset",
    "parse_ip",
    "parse_options",
    "set_timestamp",
    "split_mtu",
    "tcp_checksum",
]  # fmt: skip

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

DLT_EN10MB = 1
DLT_RAW = 101  # LINKTYPE_RAW in pcap files (12/14 on some systems' DLT values, also accepted)
DLT_LINUX_SLL = 113
DLT_IPV4 = 228
DLT_LINUX_SLL2 = 276  # what `tcpdump -i any` writes with libpcap >= 1.10
LINKTYPES = {
    DLT_EN10MB: "EN10MB",
    DLT_LINUX_SLL: "LINUX_SLL",
    DLT_LINUX_SLL2: "LINUX_SLL2",
    DLT_RAW: "RAW",
    12: "RAW",
    14: "RAW",
    DLT_IPV4: "IPV4",
}
"""The pcap link types ``l2_offset`` reads (a file of any other type is refused at start)."""

# -- headers as data ---------------------------------------------------------------------

# IPv4 (RFC 791): version/ihl, tos, tot_len, id, flags/frag_off, ttl, protocol, checksum,
# saddr, daddr.  Addresses are read as one 32-bit big-endian int each.
IP_HEADER = struct.Struct("!BBHHHBBHII")
# TCP (RFC 9293): sport, dport, seq, ack, doff/reserved, flags, window, checksum, urgent.
TCP_HEADER = struct.Struct("!HHIIBBHHH")
# Both fixed headers in one: the common packet (no IP options) is read and written at once.
_HEADERS = struct.Struct("!BBHHHBBHIIHHIIBBHHH")
IP_HEADER_BYTES = IP_HEADER.size  # 20
TCP_HEADER_BYTES = TCP_HEADER.size  # 20
TCP_OPTIONS_MAX_BYTES = 40  # doff is 4 bits: at most 60 header bytes
IP_OPTIONS_MAX_BYTES = 40  # ihl is 4 bits: at most 60 header bytes
IP_TOT_LEN_MAX = 0xFFFF

IPPROTO_TCP = 6
IP_DF = 0x4000
IP_FRAG_OFFSET_MASK = 0x1FFF

ETH_HEADER_BYTES = 14
"""Destination MAC (6), source MAC (6), ethertype (2)."""
VLAN_HEADER_BYTES = 18
SLL_HEADER_BYTES = 16
SLL2_HEADER_BYTES = 20
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_VLAN = 0x8100
_U16 = struct.Struct("!H")

# TCP option kinds (IANA) and the lengths the RFCs fix for them.
OPT_EOL, OPT_NOP, OPT_MSS, OPT_WSCALE, OPT_SACK_PERM, OPT_SACK, OPT_TS = 0, 1, 2, 3, 4, 5, 8
WSCALE_MAX = 14  # RFC 7323 §2.3: a shift above 14 is treated as 14
TS_OPTION_BYTES = 10
_TS_VALUES = struct.Struct("!II")
_MSS_OPTION = struct.Struct("!BBH")
_TS_OPTION = struct.Struct("!BBII")
_SACK_BLOCK = struct.Struct("!II")

_U32_MASK = 0xFFFFFFFF


@dataclass(slots=True)
class TcpOptions:
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    sack: tuple[tuple[int, int], ...] = ()
    timestamp: tuple[int, int] | None = None  # (TSval, TSecr)


@dataclass(slots=True)
class TcpPacket:
    src: int
    dst: int
    sport: int
    dport: int
    seq: int = 0
    ack: int = 0
    flags: int = 0
    window: int = 65535
    options: bytes = b""
    payload: bytes = b""
    data_len: int = -1  # -1 in the constructor means len(payload)
    ip_id: int = 0
    ttl: int = 64
    tos: int = 0
    df: bool = True
    urgent: int = 0
    ip_options: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if self.data_len < 0:
            self.data_len = len(self.payload)


# -- checksums ---------------------------------------------------------------------------


def _word_sum(data: bytes | bytearray | memoryview) -> int:
    """A value congruent (mod 0xFFFF) to the one's-complement sum of data's 16-bit words."""
    n = int.from_bytes(data, "big")
    # An odd trailing byte is the high half of a last word padded with zero (RFC 1071).
    return n << 8 if len(data) & 1 else n


def _fold(total: int, nonzero: bool) -> int:
    """Finish a checksum from a congruent sum; see the theory of operation."""
    s = total % 0xFFFF
    if s == 0 and nonzero:
        s = 0xFFFF
    return ~s & 0xFFFF


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of ``data``; 0 when data includes a valid checksum."""
    total = _word_sum(data)
    return _fold(total, total != 0)


def tcp_checksum(src: int, dst: int, segment: bytes | bytearray | memoryview) -> int:
    """TCP checksum of ``segment`` (header with a zero checksum field + data) over the IPv4
    pseudo-header (RFC 9293 §3.1): src, dst, zero, protocol 6, TCP length."""
    # The pseudo-header's protocol word is never zero, so the sum is never all-zero words.
    return _fold(src + dst + IPPROTO_TCP + len(segment) + _word_sum(segment), True)


# -- parse / build -----------------------------------------------------------------------


def parse_ip(buf: bytes | bytearray | memoryview) -> TcpPacket:
    """Decode the IPv4+TCP packet at offset 0 of ``buf``.

    Bytes past ``tot_len`` (Ethernet padding) are ignored; a buffer shorter than ``tot_len``
    is a truncated capture: ``payload`` is what is there, ``data_len`` what tot_len says.
    Both headers (with options) must be present.  Checksums are not looked at (design §9).
    """
    # Fast path, the captured packet of every worker: no IP options, a first (or only)
    # fragment, both headers present; one unpack reads them.  Anything else -- including
    # every malformed packet -- takes the general path below, which explains the refusal.
    n = len(buf)
    if n >= 40:
        (
            vihl, tos, tot_len, ip_id, frag, ttl, proto, _csum, src, dst,
            sport, dport, seq, ack, off, flags, window, _tcsum, urgent,
        ) = _HEADERS.unpack_from(buf)  # fmt: skip
        hdrs = 20 + ((off >> 4) << 2)
        if (
            vihl == 0x45
            and proto == IPPROTO_TCP
            and not frag & IP_FRAG_OFFSET_MASK
            and 40 <= hdrs <= n
            and tot_len >= hdrs
        ):
            end = tot_len if tot_len < n else n
            if type(buf) is bytes:  # slices of bytes are bytes already
                return TcpPacket(
                    src, dst, sport, dport, seq, ack, flags, window,
                    buf[40:hdrs] if hdrs > 40 else b"", buf[hdrs:end], tot_len - hdrs,
                    ip_id, ttl, tos, bool(frag & IP_DF), urgent, b"",
                )  # fmt: skip
            return TcpPacket(
                src, dst, sport, dport, seq, ack, flags, window,
                bytes(buf[40:hdrs]), bytes(buf[hdrs:end]), tot_len - hdrs,
                ip_id, ttl, tos, bool(frag & IP_DF), urgent, b"",
            )  # fmt: skip
    return _parse_ip_general(buf)


def _parse_ip_general(buf: bytes | bytearray | memoryview) -> TcpPacket:
    """parse_ip for IP options, fragments and every malformed packet (clear errors)."""
    n = len(buf)
    if n < IP_HEADER_BYTES:
        raise DecodeError(f"IPv4 header truncated: {n} of 20 bytes at offset 0")
    vihl, tos, tot_len, ip_id, frag, ttl, proto, _csum, src, dst = IP_HEADER.unpack_from(buf)
    # spec §3.3 step 1: IPv4, protocol TCP, ihl*4 >= 20, doff*4 >= 20.
    if vihl >> 4 != 4:
        raise DecodeError(f"not IPv4: version {vihl >> 4} at offset 0")
    ihl = (vihl & 0x0F) << 2
    if ihl < IP_HEADER_BYTES:
        raise DecodeError(f"bad IPv4 header length {ihl} (< 20) at offset 0")
    if proto != IPPROTO_TCP:
        raise DecodeError(f"not TCP: IP protocol {proto} at offset 9")
    if frag & IP_FRAG_OFFSET_MASK:
        # C tcpcopy only counts fragments (frag_cnt) and parses them anyway; a non-first
        # fragment has no TCP header, so decoding one would invent ports and seq numbers.
        raise DecodeError(
            f"non-first IPv4 fragment (offset {(frag & IP_FRAG_OFFSET_MASK) * 8}) at offset 6"
        )
    if n < ihl + TCP_HEADER_BYTES:
        raise DecodeError(f"TCP header truncated: {n - ihl} of 20 bytes at offset {ihl}")
    sport, dport, seq, ack, off, flags, window, _tcsum, urgent = TCP_HEADER.unpack_from(buf, ihl)
    doff = (off >> 4) << 2
    if doff < TCP_HEADER_BYTES:
        raise DecodeError(f"bad TCP data offset {doff} (< 20) at offset {ihl + 12}")
    hdrs = ihl + doff
    if n < hdrs:
        raise DecodeError(f"TCP options truncated: {n - ihl} of {doff} bytes at offset {ihl}")
    if tot_len < hdrs:
        # spec §3.3 step 5 drops these; they cannot be given a data length.
        raise DecodeError(f"IPv4 tot_len {tot_len} < headers {hdrs} at offset 2")
    end = tot_len if tot_len < n else n
    return TcpPacket(
        src,
        dst,
        sport,
        dport,
        seq,
        ack,
        flags,
        window,
        bytes(buf[ihl + TCP_HEADER_BYTES : hdrs]),
        bytes(buf[hdrs:end]),
        tot_len - hdrs,
        ip_id,
        ttl,
        tos,
        bool(frag & IP_DF),
        urgent,
        bytes(buf[IP_HEADER_BYTES:ihl]) if ihl > IP_HEADER_BYTES else b"",
    )


def _pad4(raw: bytes) -> bytes:
    rem = len(raw) & 3
    # EOL (0) padding: anything after EOL is ignored by receivers (RFC 9293 §3.2).
    return raw + b"\x00" * (4 - rem) if rem else raw


def build(pkt: TcpPacket) -> bytes:
    """The wire bytes of ``pkt``: tot_len = headers + len(payload) (``data_len`` is not
    used), ihl/doff from the (zero-padded) option lengths, fresh IP and TCP checksums."""
    return build_fields(
        pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.seq, pkt.ack, pkt.flags, pkt.window,
        pkt.options, pkt.payload, pkt.ip_id, pkt.ttl, pkt.tos, pkt.df, pkt.urgent,
        pkt.ip_options,
    )  # fmt: skip


def build_fields(
    src: int,
    dst: int,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    opts: bytes,
    payload: bytes,
    ip_id: int,
    ttl: int,
    tos: int,
    df: bool,
    urgent: int = 0,
    ip_opts: bytes = b"",
) -> bytes:
    """``build`` of a packet given as its fields (no TcpPacket needed: the session's path).

    The checksums are summed from the field values, not from packed bytes: every field is
    a whole 16-bit word or two (a 32-bit field is congruent to the sum of its halves mod
    0xFFFF), and a word-aligned byte string read as one big-endian int is congruent to the
    sum of its words (theory of operation), so the headers are packed once, checksums in.
    """
    if len(ip_opts) & 3:
        ip_opts = _pad4(ip_opts)
    if len(opts) & 3:
        opts = _pad4(opts)
    if len(opts) > TCP_OPTIONS_MAX_BYTES:
        raise ValueError(f"TCP options too long: {len(opts)} bytes (max 40)")
    if len(ip_opts) > IP_OPTIONS_MAX_BYTES:
        raise ValueError(f"IP options too long: {len(ip_opts)} bytes (max 40)")
    ihl = IP_HEADER_BYTES + len(ip_opts)
    doff = TCP_HEADER_BYTES + len(opts)
    tcp_len = doff + len(payload)
    tot_len = ihl + tcp_len
    if tot_len > IP_TOT_LEN_MAX:
        raise ValueError(f"packet too long: {tot_len} bytes (max 65535)")
    vihl, frag, off = 0x40 | (ihl >> 2), IP_DF if df else 0, doff << 2
    # TCP checksum over the pseudo-header (RFC 9293 §3.1), which is never all-zero.
    total = (
        src + dst + IPPROTO_TCP + tcp_len + sport + dport + seq + ack + (off << 8) + flags
        + window + urgent
    )  # fmt: skip
    if opts:
        total += int.from_bytes(opts, "big")
    if payload:
        n = int.from_bytes(payload, "big")
        # An odd trailing byte is the high half of a last word padded with zero (RFC 1071).
        total += n << 8 if len(payload) & 1 else n
    tcp_csum = total % 0xFFFF
    tcp_csum = ~tcp_csum & 0xFFFF if tcp_csum else 0  # ~0xFFFF & 0xFFFF: see _fold
    # The IP header's first byte (version 4) is never zero either.
    total = (vihl << 8) + tos + tot_len + ip_id + frag + (ttl << 8) + IPPROTO_TCP + src + dst
    if ip_opts:
        total += int.from_bytes(ip_opts, "big")
    ip_csum = total % 0xFFFF
    ip_csum = ~ip_csum & 0xFFFF if ip_csum else 0
    try:
        if not ip_opts:
            hdr = _HEADERS.pack(
                vihl, tos, tot_len, ip_id, frag, ttl, IPPROTO_TCP, ip_csum, src, dst,
                sport, dport, seq, ack, off, flags, window, tcp_csum, urgent,
            )  # fmt: skip
            if opts:
                return b"".join((hdr, opts, payload))
            return hdr + payload if payload else hdr
        iph = IP_HEADER.pack(vihl, tos, tot_len, ip_id, frag, ttl, IPPROTO_TCP, ip_csum, src, dst)
        tcph = TCP_HEADER.pack(sport, dport, seq, ack, off, flags, window, tcp_csum, urgent)
    except struct.error as e:
        raise ValueError(f"cannot build packet: field out of range ({e})") from None
    return b"".join((iph, ip_opts, tcph, opts, payload))


# -- options -----------------------------------------------------------------------------


def _find_option(raw: bytes | bytearray | memoryview, kind: int, length: int) -> int:
    """Offset of the first option ``kind`` of exactly ``length`` bytes, or -1."""
    i, n = 0, len(raw)
    while i < n:
        k = raw[i]
        if k == OPT_EOL:
            break
        if k == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            break
        ln = raw[i + 1]
        if ln < 2 or i + ln > n:
            break
        if k == kind and ln == length:
            return i
        i += ln
    return -1


def parse_options(raw: bytes | bytearray | memoryview) -> TcpOptions:
    """Decode TCP options (MSS, window scale, SACK-permitted, SACK, timestamps).

    Best effort, like a receiving stack: stops at EOL or at an option whose length byte is
    missing, < 2 or runs past the end; a known kind with the wrong length is skipped.
    """
    out = TcpOptions()
    i, n = 0, len(raw)
    while i < n:
        kind = raw[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            break
        ln = raw[i + 1]
        if ln < 2 or i + ln > n:
            break
        if kind == OPT_TS and ln == TS_OPTION_BYTES:
            out.timestamp = _TS_VALUES.unpack_from(raw, i + 2)
        elif kind == OPT_MSS and ln == 4:
            out.mss = (raw[i + 2] << 8) | raw[i + 3]
        elif kind == OPT_WSCALE and ln == 3:
            out.wscale = min(raw[i + 2], WSCALE_MAX)
        elif kind == OPT_SACK_PERM and ln == 2:
            out.sack_permitted = True
        elif kind == OPT_SACK and ln >= 10 and (ln - 2) % 8 == 0:
            blocks = [_SACK_BLOCK.unpack_from(raw, j) for j in range(i + 2, i + ln, 8)]
            out.sack = tuple((left, right) for left, right in blocks)
        i += ln
    return out


def build_options(
    mss: int | None = None,
    wscale: int | None = None,
    sack_permitted: bool = False,
    timestamp: tuple[int, int] | None = None,
    sack: tuple[tuple[int, int], ...] | list[tuple[int, int]] = (),
) -> bytes:
    """TCP options in Linux's order and alignment (tcp_options_write), always 4-aligned:

    MSS | SACK_PERM,TS or NOP,NOP,TS | NOP,NOP,SACK_PERM (no TS) | NOP,WS | NOP,NOP,SACK.
    A SYN with everything is ``MSS, SACK_PERM, TS, NOP, WS`` (20 bytes); data with TS is
    ``NOP, NOP, TS`` (12 bytes).  SACK blocks that do not fit in 40 bytes are left out,
    as Linux does.
    """
    parts: list[bytes] = []
    if mss is not None:
        if not 0 <= mss <= 0xFFFF:
            raise ValueError(f"MSS {mss} out of range 0..65535")
        parts.append(_MSS_OPTION.pack(OPT_MSS, 4, mss))
    if timestamp is not None:
        tsval, tsecr = timestamp
        if not (0 <= tsval <= _U32_MASK and 0 <= tsecr <= _U32_MASK):
            raise ValueError(f"timestamp {timestamp} out of range 0..2**32-1")
        # SACK_PERM takes the two alignment bytes in front of TS when both are present.
        parts.append(b"\x04\x02" if sack_permitted else b"\x01\x01")
        parts.append(_TS_OPTION.pack(OPT_TS, TS_OPTION_BYTES, tsval, tsecr))
    elif sack_permitted:
        parts.append(b"\x01\x01\x04\x02")
    if wscale is not None:
        if not 0 <= wscale <= WSCALE_MAX:
            raise ValueError(f"window scale {wscale} out of range 0..14")
        parts.append(bytes((OPT_NOP, OPT_WSCALE, 3, wscale)))
    if sack:
        used = sum(len(p) for p in parts)
        room = (TCP_OPTIONS_MAX_BYTES - used - 4) // 8
        blocks = tuple(sack)[: max(room, 0)]
        if blocks:
            parts.append(bytes((OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(blocks))))
            for left, right in blocks:
                if not (0 <= left <= _U32_MASK and 0 <= right <= _U32_MASK):
                    raise ValueError(f"SACK block {(left, right)} out of range 0..2**32-1")
                parts.append(_SACK_BLOCK.pack(left, right))
    return b"".join(parts)  # every part above is a multiple of 4 bytes


def set_timestamp(options: bytes, tsval: int, tsecr: int) -> bytes:
    """``options`` with the TS option's TSval/TSecr replaced (values taken mod 2**32) and
    every other byte unchanged (spec §3.10); ``options`` itself if there is no TS option."""
    i = _find_option(options, OPT_TS, TS_OPTION_BYTES)
    if i < 0:
        return options
    out = bytearray(options)
    _TS_VALUES.pack_into(out, i + 2, tsval & _U32_MASK, tsecr & _U32_MASK)
    return bytes(out)


# -- MTU split (spec §3.4) ---------------------------------------------------------------


def split_mtu(pkt: TcpPacket, mtu: int) -> list[TcpPacket]:
    """Split an oversized packet (GRO/TSO aggregate) into packets of at most ``mtu`` bytes.

    Every piece keeps the IP and TCP headers and options; seq advances by the payload of
    the previous pieces, ip_id increments from the original (spec §3.4).  FIN and PSH stay
    only on the last piece, SYN only on the first (the C code only clears FIN; a PSH or
    SYN repeated on every piece would be wrong TCP).  A packet that already fits is
    returned as ``[pkt]``.  A truncated capture cannot be split: ``DecodeError`` (the C
    code drops those too); an ``mtu`` that leaves no room for data: ``ValueError``.
    """
    ip_opts_len = (len(pkt.ip_options) + 3) & ~3
    opts_len = (len(pkt.options) + 3) & ~3
    hdrs = IP_HEADER_BYTES + ip_opts_len + TCP_HEADER_BYTES + opts_len
    if hdrs + pkt.data_len <= mtu:
        return [pkt]
    payload = pkt.payload
    total = len(payload)
    if pkt.data_len != total:
        raise DecodeError(
            f"cannot split a truncated packet: {total} of {pkt.data_len} payload bytes"
        )
    chunk = mtu - hdrs
    if chunk <= 0:
        raise ValueError(f"MTU {mtu} leaves no room for data after {hdrs} header bytes")
    flags = pkt.flags
    middle_flags = flags & ~(FIN | PSH | SYN)
    # Data after a SYN starts at seq + 1 (the SYN occupies one sequence number).
    syn_shift = 1 if flags & SYN else 0
    last_start = ((total - 1) // chunk) * chunk
    pieces = []
    for idx, start in enumerate(range(0, total, chunk)):
        f = middle_flags
        if start == 0:
            f |= flags & SYN
        if start == last_start:
            f |= flags & (FIN | PSH)
        pieces.append(
            TcpPacket(
                pkt.src,
                pkt.dst,
                pkt.sport,
                pkt.dport,
                (pkt.seq + start + (syn_shift if start else 0)) & _U32_MASK,
                pkt.ack,
                f,
                pkt.window,
                pkt.options,
                payload[start : start + chunk],
                -1,
                (pkt.ip_id + idx) & 0xFFFF,
                pkt.ttl,
                pkt.tos,
                pkt.df,
                pkt.urgent,
                pkt.ip_options,
            )
        )
    return pieces


# -- link layer --------------------------------------------------------------------------


def l2_offset(frame: bytes | bytearray | memoryview, linktype: int) -> int:
    """Offset of the IPv4 header in a captured ``frame`` of pcap link type ``linktype``.

    Ethernet must carry IPv4 (0x0800), directly or under one 802.1Q tag (spec §3.2); the
    C code skips the check for VLAN and SLL frames, we check them too so that a non-IPv4
    frame gets a clear error here rather than a confusing one in ``parse_ip``.
    """
    n = len(frame)
    if linktype == DLT_EN10MB:
        if n < ETH_HEADER_BYTES:
            raise DecodeError(f"Ethernet header truncated: {n} of 14 bytes at offset 0")
        etype = _U16.unpack_from(frame, 12)[0]
        if etype == ETHERTYPE_VLAN:
            if n < VLAN_HEADER_BYTES:
                raise DecodeError(f"802.1Q header truncated: {n} of 18 bytes at offset 0")
            etype = _U16.unpack_from(frame, 16)[0]
            if etype != ETHERTYPE_IPV4:
                raise DecodeError(f"not IPv4: VLAN ethertype 0x{etype:04x} at offset 16")
            return VLAN_HEADER_BYTES
        if etype != ETHERTYPE_IPV4:
            raise DecodeError(f"not IPv4: ethertype 0x{etype:04x} at offset 12")
        return ETH_HEADER_BYTES
    if linktype == DLT_LINUX_SLL:
        if n < SLL_HEADER_BYTES:
            raise DecodeError(f"Linux SLL header truncated: {n} of 16 bytes at offset 0")
        etype = _U16.unpack_from(frame, 14)[0]
        if etype != ETHERTYPE_IPV4:
            raise DecodeError(f"not IPv4: SLL protocol 0x{etype:04x} at offset 14")
        return SLL_HEADER_BYTES
    if linktype == DLT_LINUX_SLL2:
        if n < SLL2_HEADER_BYTES:
            raise DecodeError(f"Linux SLL2 header truncated: {n} of 20 bytes at offset 0")
        etype = _U16.unpack_from(frame, 0)[0]
        if etype != ETHERTYPE_IPV4:
            raise DecodeError(f"not IPv4: SLL2 protocol 0x{etype:04x} at offset 0")
        return SLL2_HEADER_BYTES
    if linktype in (DLT_RAW, 12, 14, DLT_IPV4):
        return 0
    raise DecodeError(f"unsupported link type {linktype}")


# -- addresses ---------------------------------------------------------------------------


def ip_from_str(text: str) -> int:
    """Dotted-quad IPv4 text -> int.  Strict: four decimal octets 0..255, no leading
    zeros (inet_aton would read ``010`` as octal), no spaces."""
    parts = text.split(".") if isinstance(text, str) else ()
    if len(parts) != 4:
        raise DecodeError(f"bad IPv4 address {text!r}: need four dotted octets")
    value = 0
    for part in parts:
        if not (part.isascii() and part.isdigit()) or len(part) > 3:
            raise DecodeError(f"bad IPv4 address {text!r}: octet {part!r} is not 0..255")
        if len(part) > 1 and part[0] == "0":
            raise DecodeError(f"bad IPv4 address {text!r}: octet {part!r} has a leading zero")
        octet = int(part)
        if octet > 255:
            raise DecodeError(f"bad IPv4 address {text!r}: octet {part!r} is not 0..255")
        value = (value << 8) | octet
    return value


def ip_to_str(addr: int) -> str:
    """int -> dotted-quad IPv4 text."""
    if not 0 <= addr <= _U32_MASK:
        raise ValueError(f"IPv4 address {addr} out of range 0..2**32-1")
    return f"{addr >> 24}.{(addr >> 16) & 255}.{(addr >> 8) & 255}.{addr & 255}"
