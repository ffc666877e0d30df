# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""IPv4/TCP packets in C: parse in place, TCP options, Internet checksum, build into a buffer.

Theory of operation
-------------------
This is the compiled twin of engine/codec/packet.py, which stays the specification: every rule
below is that module's rule, in the same order, and tests/unit/test_dataplane_packet.py
holds the two to identical fields, identical bytes and identical rejects on random and on
captured packets.

The per-packet functions (``dp_*``, declared in packet.pxd for other compiled modules) take
a pointer and a length and touch nothing else: no Python object, no GIL.  Input is
untrusted, so every read is checked against the length first: the fixed IP header, then
ihl, then the TCP header at ihl, then doff, then tot_len, and the option walk never reads a
kind's length byte or body past the end of the options (RFC 9293 §3.2).  A packet that
breaks a rule gets the ``dp_error`` code of the first rule it broke, the one whose
``DecodeError`` engine/codec/packet.py raises.

The checksum adds big-endian 16-bit words into a 64-bit sum and folds the carries back in
at the end (RFC 1071 §4.1); 2**48 words fit before the sum could overflow.  The fold of a
non-zero sum is never 0, which is why the result agrees with engine/codec/packet.py's modular
arithmetic in its one corner case (all-zero words: checksum 0xFFFF; any other sum that is
0 modulo 0xFFFF: checksum 0).

The Python entry points at the bottom convert once per call and loop in C: ``parse_batch``
parses N packets of one buffer (a pcap file read whole, a capture block) into a numpy
structured array laid out exactly like ``dp_packet``; ``parse_records`` does the same in
place on the records of a shared-memory ring (engine/io/ring.py, whose ``scan_records`` is
here in C too); ``build_batch``
writes the records back to the wire, one after the other, into one output buffer (what
sendmmsg sends).  The single-packet functions (``parse_ip``, ``parse_options``,
``build_fields``, ``split_build``, ``checksum``) exist for tests, the benchmark and the
fuzzers; they allocate the same Python objects engine/codec/packet.py does.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset

from engine.errors import DecodeError
from engine.codec.packet import TcpOptions, TcpPacket

__all__ = [
    "PACKET_DTYPE", "ERROR_NAMES", "DecodeError",
    "checksum", "tcp_checksum", "parse_options", "parse_ip", "decode_ip", "l2_offset",
    "build_fields", "build_into", "parse_batch", "scan_records", "parse_records",
    "build_batch", "split_build",
]

# -- constants (RFC 791, RFC 9293) ---------------------------------------------------------

cdef enum:
    IPPROTO_TCP = 6
    IP_DF = 0x4000
    IP_FRAG_OFFSET_MASK = 0x1FFF
    OPT_EOL = 0
    OPT_NOP = 1
    OPT_MSS = 2
    OPT_WSCALE = 3
    OPT_SACK_PERM = 4
    OPT_SACK = 5
    OPT_TS = 8
    WSCALE_MAX = 14                 # RFC 7323 §2.3: a shift above 14 is treated as 14
    TS_OPTION_BYTES = 10


cdef inline uint16_t _get16(const uint8_t* p) noexcept nogil:
    return <uint16_t>((p[0] << 8) | p[1])


cdef inline uint32_t _get32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void _put16(uint8_t* p, uint16_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 8)
    p[1] = <uint8_t>v


cdef inline void _put32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v


# -- checksum (RFC 1071) ---------------------------------------------------------------------

cdef uint64_t dp_sum16(const uint8_t* data, size_t n, uint64_t total) noexcept nogil:
    cdef size_t i = 0
    while i + 8 <= n:
        total += ((<uint64_t>data[i] << 8) | data[i + 1]) + ((<uint64_t>data[i + 2] << 8) | data[i + 3])
        total += ((<uint64_t>data[i + 4] << 8) | data[i + 5]) + ((<uint64_t>data[i + 6] << 8) | data[i + 7])
        i += 8
    while i + 2 <= n:
        total += (<uint64_t>data[i] << 8) | data[i + 1]
        i += 2
    if i < n:
        # An odd trailing byte is the high half of a last word padded with zero.
        total += <uint64_t>data[i] << 8
    return total


cdef uint16_t dp_fold(uint64_t total) noexcept nogil:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return <uint16_t>total


cdef uint16_t dp_checksum(const uint8_t* data, size_t n) noexcept nogil:
    return <uint16_t>(~dp_fold(dp_sum16(data, n, 0)) & 0xFFFF)


cdef inline uint64_t _pseudo_sum(const uint8_t* src, const uint8_t* dst, size_t tcp_len) noexcept nogil:
    # RFC 9293 §3.1: source, destination, zero, protocol 6, TCP length.
    return dp_sum16(src, 4, dp_sum16(dst, 4, IPPROTO_TCP + <uint64_t>tcp_len))


# -- TCP options (engine.codec.packet.parse_options) -----------------------------------------------

cdef void dp_parse_tcp_options(const uint8_t* raw, size_t n, dp_tcp_options* out) noexcept nogil:
    cdef size_t i = 0, ln, j
    cdef uint8_t kind
    memset(out, 0, sizeof(dp_tcp_options))
    if n > DP_OPTIONS_MAX_BYTES:
        n = DP_OPTIONS_MAX_BYTES
    while i < n:
        kind = raw[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            break  # no length byte
        ln = raw[i + 1]
        if ln < 2 or i + ln > n:
            break  # a length that cannot be walked: stop, like a receiving stack
        if kind == OPT_TS and ln == TS_OPTION_BYTES:
            out.ts_val = _get32(raw + i + 2)
            out.ts_ecr = _get32(raw + i + 6)
            out.present |= DP_OPT_TS
        elif kind == OPT_MSS and ln == 4:
            out.mss = _get16(raw + i + 2)
            out.present |= DP_OPT_MSS
        elif kind == OPT_WSCALE and ln == 3:
            out.wscale = raw[i + 2] if raw[i + 2] < WSCALE_MAX else WSCALE_MAX
            out.present |= DP_OPT_WSCALE
        elif kind == OPT_SACK_PERM and ln == 2:
            out.present |= DP_OPT_SACK_PERM
        elif kind == OPT_SACK and ln >= 10 and (ln - 2) % 8 == 0:
            # n <= 40, so ln <= 40 and at most DP_SACK_BLOCKS_MAX blocks.
            out.sack_blocks = <uint8_t>((ln - 2) // 8)
            for j in range(out.sack_blocks):
                out.sack[2 * j] = _get32(raw + i + 2 + 8 * j)
                out.sack[2 * j + 1] = _get32(raw + i + 6 + 8 * j)
            out.present |= DP_OPT_SACK
        i += ln


# -- link layer (engine.codec.packet.l2_offset) ----------------------------------------------------

cdef enum:
    ETHERTYPE_IPV4 = 0x0800
    ETHERTYPE_VLAN = 0x8100


cdef Py_ssize_t dp_l2_offset(const uint8_t* frame, size_t n, int linktype) noexcept nogil:
    # Ethernet must carry IPv4, directly or under one 802.1Q tag (spec §3.2); SLL and SLL2
    # are checked too, so a non-IPv4 frame is refused here, not misread as IPv4.
    if linktype == DP_DLT_EN10MB:
        if n < 14:
            return -DP_E_L2_TRUNCATED
        if _get16(frame + 12) == ETHERTYPE_VLAN:
            if n < 18:
                return -DP_E_L2_TRUNCATED
            return 18 if _get16(frame + 16) == ETHERTYPE_IPV4 else -DP_E_L2_NOT_IPV4
        return 14 if _get16(frame + 12) == ETHERTYPE_IPV4 else -DP_E_L2_NOT_IPV4
    if linktype == DP_DLT_LINUX_SLL:
        if n < 16:
            return -DP_E_L2_TRUNCATED
        return 16 if _get16(frame + 14) == ETHERTYPE_IPV4 else -DP_E_L2_NOT_IPV4
    if linktype == DP_DLT_LINUX_SLL2:
        if n < 20:
            return -DP_E_L2_TRUNCATED
        return 20 if _get16(frame) == ETHERTYPE_IPV4 else -DP_E_L2_NOT_IPV4
    if linktype == DP_DLT_RAW or linktype == 12 or linktype == 14 or linktype == DP_DLT_IPV4:
        return 0
    return -DP_E_L2_LINKTYPE


# -- parse (engine.codec.packet.parse_ip) ----------------------------------------------------------

cdef int dp_parse_ipv4_tcp(const uint8_t* buf, size_t n, dp_packet* out) noexcept nogil:
    cdef size_t ihl, doff, hdrs, tot_len, end
    cdef uint16_t frag
    cdef const uint8_t* tcp
    memset(out, 0, sizeof(dp_packet))
    # spec §3.3 step 1 and engine/codec/packet.py's checks, in its order.
    if n < DP_IP_HEADER_BYTES:
        out.error = DP_E_IP_TRUNCATED
        return out.error
    if buf[0] >> 4 != 4:
        out.error = DP_E_NOT_IPV4
        return out.error
    ihl = (buf[0] & 0x0F) << 2
    if ihl < DP_IP_HEADER_BYTES:
        out.error = DP_E_BAD_IHL
        return out.error
    if buf[9] != IPPROTO_TCP:
        out.error = DP_E_NOT_TCP
        return out.error
    frag = _get16(buf + 6)
    if frag & IP_FRAG_OFFSET_MASK:
        out.error = DP_E_FRAGMENT
        return out.error
    if n < ihl + DP_TCP_HEADER_BYTES:
        out.error = DP_E_TCP_TRUNCATED
        return out.error
    tcp = buf + ihl
    doff = (tcp[12] >> 4) << 2
    if doff < DP_TCP_HEADER_BYTES:
        out.error = DP_E_BAD_DOFF
        return out.error
    hdrs = ihl + doff
    if n < hdrs:
        out.error = DP_E_OPTIONS_TRUNCATED
        return out.error
    tot_len = _get16(buf + 2)
    if tot_len < hdrs:
        out.error = DP_E_TOT_LEN  # spec §3.3 step 5: no data length can be given
        return out.error
    # Bytes past tot_len are link padding; a buffer shorter than tot_len is a cut capture.
    end = tot_len if tot_len < n else n
    out.family = DP_FAMILY_IPV4
    out.src[10] = 0xFF
    out.src[11] = 0xFF
    memcpy(out.src + DP_IPV4_MAPPED_AT, buf + 12, 4)
    out.dst[10] = 0xFF
    out.dst[11] = 0xFF
    memcpy(out.dst + DP_IPV4_MAPPED_AT, buf + 16, 4)
    out.tos = buf[1]
    out.ip_id = _get16(buf + 4)
    out.df = 1 if frag & IP_DF else 0
    out.ttl = buf[8]
    out.ip_header_bytes = <uint16_t>ihl
    out.tcp_header_bytes = <uint16_t>doff
    out.sport = _get16(tcp)
    out.dport = _get16(tcp + 2)
    out.seq = _get32(tcp + 4)
    out.ack = _get32(tcp + 8)
    out.flags = tcp[13]
    out.window = _get16(tcp + 14)
    out.urgent = _get16(tcp + 18)
    out.payload_bytes = <uint16_t>(end - hdrs)
    out.data_len = <uint16_t>(tot_len - hdrs)
    dp_parse_tcp_options(tcp + DP_TCP_HEADER_BYTES, doff - DP_TCP_HEADER_BYTES, &out.opts)
    return DP_OK


# -- build (engine.codec.packet.build_fields) ------------------------------------------------------

cdef Py_ssize_t dp_build_ipv4_tcp(
    uint8_t* out, size_t cap, const dp_tcp_fields* f,
    const uint8_t* tcp_opts, size_t tcp_opts_len,
    const uint8_t* ip_opts, size_t ip_opts_len,
    const uint8_t* payload, size_t payload_len,
) noexcept nogil:
    cdef size_t ip_pad = (ip_opts_len + 3) & ~(<size_t>3)
    cdef size_t opt_pad = (tcp_opts_len + 3) & ~(<size_t>3)
    cdef size_t ihl, doff, tcp_len, tot_len
    cdef uint8_t* tcp
    # The same refusals as build_fields, in its order (options first, then the total).
    if tcp_opts_len > DP_OPTIONS_MAX_BYTES:
        return -DP_E_OPTIONS_TOO_LONG
    if ip_opts_len > DP_OPTIONS_MAX_BYTES:
        return -DP_E_IP_OPTIONS_TOO_LONG
    if payload_len > DP_IP_TOT_LEN_MAX:
        return -DP_E_PACKET_TOO_LONG  # checked alone first: the sum below cannot wrap
    ihl = DP_IP_HEADER_BYTES + ip_pad
    doff = DP_TCP_HEADER_BYTES + opt_pad
    tcp_len = doff + payload_len
    tot_len = ihl + tcp_len
    if tot_len > DP_IP_TOT_LEN_MAX:
        return -DP_E_PACKET_TOO_LONG
    if f.family != DP_FAMILY_IPV4:
        return -DP_E_FAMILY
    if tot_len > cap:
        return -DP_E_BUFFER_TOO_SMALL
    # IPv4 header (RFC 791); the checksum field is zero while it is summed.
    out[0] = <uint8_t>(0x40 | (ihl >> 2))
    out[1] = f.tos
    _put16(out + 2, <uint16_t>tot_len)
    _put16(out + 4, f.ip_id)
    _put16(out + 6, IP_DF if f.df else 0)
    out[8] = f.ttl
    out[9] = IPPROTO_TCP
    out[10] = 0
    out[11] = 0
    memcpy(out + 12, f.src + DP_IPV4_MAPPED_AT, 4)
    memcpy(out + 16, f.dst + DP_IPV4_MAPPED_AT, 4)
    if ip_opts_len:
        memcpy(out + DP_IP_HEADER_BYTES, ip_opts, ip_opts_len)
    # EOL (0) padding: anything after EOL is ignored by receivers (RFC 9293 §3.2).
    memset(out + DP_IP_HEADER_BYTES + ip_opts_len, 0, ip_pad - ip_opts_len)
    _put16(out + 10, dp_checksum(out, ihl))
    # TCP header (RFC 9293 §3.1), options, payload; then the checksum over the lot.
    tcp = out + ihl
    _put16(tcp, f.sport)
    _put16(tcp + 2, f.dport)
    _put32(tcp + 4, f.seq)
    _put32(tcp + 8, f.ack)
    tcp[12] = <uint8_t>((doff >> 2) << 4)
    tcp[13] = f.flags
    _put16(tcp + 14, f.window)
    tcp[16] = 0
    tcp[17] = 0
    _put16(tcp + 18, f.urgent)
    if tcp_opts_len:
        memcpy(tcp + DP_TCP_HEADER_BYTES, tcp_opts, tcp_opts_len)
    memset(tcp + DP_TCP_HEADER_BYTES + tcp_opts_len, 0, opt_pad - tcp_opts_len)
    if payload_len:
        memcpy(tcp + doff, payload, payload_len)
    _put16(tcp + 16, <uint16_t>(~dp_fold(dp_sum16(
        tcp, tcp_len, _pseudo_sum(out + 12, out + 16, tcp_len))) & 0xFFFF))
    return <Py_ssize_t>tot_len


# -- MTU split (engine.codec.packet.split_mtu, spec §3.4) -------------------------------------------

cdef enum:
    TCP_FIN = 0x01
    TCP_SYN = 0x02
    TCP_PSH = 0x08


cdef Py_ssize_t dp_build_split(
    uint8_t* out, size_t cap, const dp_tcp_fields* f,
    const uint8_t* tcp_opts, size_t tcp_opts_len,
    const uint8_t* ip_opts, size_t ip_opts_len,
    const uint8_t* payload, size_t payload_len, size_t data_len, Py_ssize_t mtu,
    uint32_t* lengths, size_t max_pieces,
) noexcept nogil:
    cdef size_t hdrs, chunk, start, last_start, used = 0, idx = 0, piece
    cdef Py_ssize_t n
    cdef dp_tcp_fields pf
    hdrs = (2 * DP_TCP_HEADER_BYTES + ((ip_opts_len + 3) & ~(<size_t>3))
            + ((tcp_opts_len + 3) & ~(<size_t>3)))
    if max_pieces < 1:
        return -DP_E_SPLIT_PIECES
    if mtu >= 0 and data_len <= <size_t>mtu and hdrs <= <size_t>mtu - data_len:
        # It fits: one packet, built as it is.
        n = dp_build_ipv4_tcp(out, cap, f, tcp_opts, tcp_opts_len, ip_opts, ip_opts_len,
                              payload, payload_len)
        if n < 0:
            return n
        lengths[0] = <uint32_t>n
        return 1
    if data_len != payload_len:
        return -DP_E_SPLIT_TRUNCATED
    if mtu < 0 or <size_t>mtu <= hdrs:
        return -DP_E_SPLIT_MTU
    chunk = <size_t>mtu - hdrs
    last_start = ((payload_len - 1) // chunk) * chunk
    pf = f[0]
    start = 0
    while start < payload_len:
        if idx >= max_pieces:
            return -DP_E_SPLIT_PIECES
        # FIN and PSH only on the last piece, SYN only on the first; data after a SYN
        # starts at seq + 1 (the SYN occupies one sequence number).
        pf.flags = f.flags & ~(TCP_FIN | TCP_PSH | TCP_SYN)
        if start == 0:
            pf.flags |= f.flags & TCP_SYN
        if start == last_start:
            pf.flags |= f.flags & (TCP_FIN | TCP_PSH)
        pf.seq = <uint32_t>(f.seq + start + (1 if start and f.flags & TCP_SYN else 0))
        pf.ip_id = <uint16_t>(f.ip_id + idx)
        piece = chunk if payload_len - start > chunk else payload_len - start
        n = dp_build_ipv4_tcp(out + used, cap - used, &pf, tcp_opts, tcp_opts_len,
                              ip_opts, ip_opts_len, payload + start, piece)
        if n < 0:
            return n
        lengths[idx] = <uint32_t>n
        used += <size_t>n
        idx += 1
        start += chunk
    return <Py_ssize_t>idx


cdef void dp_fields_of(const dp_packet* p, dp_tcp_fields* f) noexcept nogil:
    memcpy(f.src, p.src, DP_ADDR_BYTES)
    memcpy(f.dst, p.dst, DP_ADDR_BYTES)
    f.seq = p.seq
    f.ack = p.ack
    f.sport = p.sport
    f.dport = p.dport
    f.window = p.window
    f.urgent = p.urgent
    f.ip_id = p.ip_id
    f.family = p.family
    f.flags = p.flags
    f.ttl = p.ttl
    f.tos = p.tos
    f.df = p.df
    f.reserved = 0


# -- Python entry points -----------------------------------------------------------------------

ERROR_NAMES = (
    "ok", "ip_truncated", "not_ipv4", "bad_ihl", "not_tcp", "fragment", "tcp_truncated",
    "bad_doff", "options_truncated", "tot_len", "range", "options_too_long",
    "ip_options_too_long", "packet_too_long", "buffer_too_small", "family",
    "split_truncated", "split_mtu", "split_pieces", "l2_truncated", "l2_not_ipv4",
    "l2_linktype",
)
"""``ERROR_NAMES[code]``: the name of a ``dp_error`` code (the label a counter would use)."""
assert len(ERROR_NAMES) == DP_E_COUNT


cdef dp_packet _layout
cdef Py_ssize_t _at(void* field):
    return <char*>field - <char*>&_layout


def _packet_dtype():
    """The numpy dtype of ``dp_packet``: the C compiler's own offsets, host byte order."""
    import numpy as np

    o = &_layout.opts
    spec = [
        ("src", "u1", (16,), _at(&_layout.src[0])), ("dst", "u1", (16,), _at(&_layout.dst[0])),
        ("seq", "=u4", (), _at(&_layout.seq)), ("ack", "=u4", (), _at(&_layout.ack)),
        ("offset", "=u4", (), _at(&_layout.offset)),
        ("sport", "=u2", (), _at(&_layout.sport)), ("dport", "=u2", (), _at(&_layout.dport)),
        ("window", "=u2", (), _at(&_layout.window)), ("urgent", "=u2", (), _at(&_layout.urgent)),
        ("ip_id", "=u2", (), _at(&_layout.ip_id)),
        ("ip_header_bytes", "=u2", (), _at(&_layout.ip_header_bytes)),
        ("tcp_header_bytes", "=u2", (), _at(&_layout.tcp_header_bytes)),
        ("payload_bytes", "=u2", (), _at(&_layout.payload_bytes)),
        ("data_len", "=u2", (), _at(&_layout.data_len)),
        ("family", "u1", (), _at(&_layout.family)), ("flags", "u1", (), _at(&_layout.flags)),
        ("ttl", "u1", (), _at(&_layout.ttl)), ("tos", "u1", (), _at(&_layout.tos)),
        ("df", "u1", (), _at(&_layout.df)), ("error", "u1", (), _at(&_layout.error)),
        ("opt_ts_val", "=u4", (), _at(&o.ts_val)), ("opt_ts_ecr", "=u4", (), _at(&o.ts_ecr)),
        ("opt_sack", "=u4", (8,), _at(&o.sack[0])), ("opt_mss", "=u2", (), _at(&o.mss)),
        ("opt_wscale", "u1", (), _at(&o.wscale)), ("opt_present", "u1", (), _at(&o.present)),
        ("opt_sack_blocks", "u1", (), _at(&o.sack_blocks)),
    ]
    return np.dtype({
        "names": [s[0] for s in spec],
        "formats": [(s[1], s[2]) if s[2] else s[1] for s in spec],
        "offsets": [s[3] for s in spec],
        "itemsize": sizeof(dp_packet),
    })


_PACKET_DTYPE = None


def __getattr__(name):
    """``PACKET_DTYPE``, one ``dp_packet`` as a numpy record: ``np.empty(n, PACKET_DTYPE)``
    is what ``parse_batch`` fills (addresses are 16 bytes, IPv4-mapped; see packet.pxd).
    Made at its first use: numpy is imported by the batch API only, never by the worker or
    the capture process."""
    global _PACKET_DTYPE
    if name == "PACKET_DTYPE":
        if _PACKET_DTYPE is None:
            _PACKET_DTYPE = _packet_dtype()
        return _PACKET_DTYPE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


cdef inline const uint8_t* _ptr(const uint8_t[::1] view) noexcept nogil:
    return &view[0] if view.shape[0] else NULL


def checksum(const uint8_t[::1] data not None):
    """The Internet checksum (RFC 1071) of ``data`` (engine.codec.packet.checksum)."""
    return dp_checksum(_ptr(data), data.shape[0])


def tcp_checksum(src, dst, const uint8_t[::1] segment not None):
    """TCP checksum of ``segment`` over the IPv4 pseudo-header (engine.codec.packet.tcp_checksum)."""
    cdef uint8_t s[4]
    cdef uint8_t d[4]
    _put32(s, _field(src, 0xFFFFFFFF, "src"))
    _put32(d, _field(dst, 0xFFFFFFFF, "dst"))
    return <uint16_t>(~dp_fold(dp_sum16(_ptr(segment), segment.shape[0],
                                        _pseudo_sum(s, d, segment.shape[0]))) & 0xFFFF)


cdef object _options_object(const dp_tcp_options* o):
    out = TcpOptions()
    if o.present & DP_OPT_MSS:
        out.mss = o.mss
    if o.present & DP_OPT_WSCALE:
        out.wscale = o.wscale
    out.sack_permitted = bool(o.present & DP_OPT_SACK_PERM)
    if o.present & DP_OPT_TS:
        out.timestamp = (o.ts_val, o.ts_ecr)
    out.sack = tuple((o.sack[2 * j], o.sack[2 * j + 1]) for j in range(o.sack_blocks))
    return out


def parse_options(const uint8_t[::1] raw not None):
    """TCP options of one header (at most 40 bytes) -> engine.codec.packet.TcpOptions."""
    cdef dp_tcp_options o
    if raw.shape[0] > DP_OPTIONS_MAX_BYTES:
        raise ValueError(f"TCP options too long: {raw.shape[0]} bytes (max 40)")
    dp_parse_tcp_options(_ptr(raw), raw.shape[0], &o)
    return _options_object(&o)


def l2_offset(const uint8_t[::1] frame not None, int linktype):
    """engine.codec.packet.l2_offset through the compiled reader: the IPv4 header's offset in a
    captured frame; a refusal raises ``DecodeError`` naming the ``dp_error``."""
    cdef Py_ssize_t n = dp_l2_offset(_ptr(frame), frame.shape[0], linktype)
    if n < 0:
        err = DecodeError(f"frame rejected: {ERROR_NAMES[-n]}")
        err.code = -n
        raise err
    return n


def decode_ip(const uint8_t[::1] buf not None):
    """``(0, TcpPacket, TcpOptions)`` for a good packet, ``(code, None, None)`` for a reject:
    the compiled parser seen from Python (tests, fuzzers)."""
    cdef dp_packet p
    cdef const uint8_t* b = _ptr(buf)
    cdef size_t at
    if dp_parse_ipv4_tcp(b, buf.shape[0], &p) != DP_OK:
        return p.error, None, None
    at = p.ip_header_bytes + DP_TCP_HEADER_BYTES
    pkt = TcpPacket(
        _get32(p.src + DP_IPV4_MAPPED_AT), _get32(p.dst + DP_IPV4_MAPPED_AT),
        p.sport, p.dport, p.seq, p.ack, p.flags, p.window,
        b[at:p.ip_header_bytes + p.tcp_header_bytes],
        b[p.ip_header_bytes + p.tcp_header_bytes:
          p.ip_header_bytes + p.tcp_header_bytes + p.payload_bytes],
        p.data_len, p.ip_id, p.ttl, p.tos, bool(p.df), p.urgent,
        b[DP_IP_HEADER_BYTES:p.ip_header_bytes],
    )
    return DP_OK, pkt, _options_object(&p.opts)


def parse_ip(buf):
    """engine.codec.packet.parse_ip through the compiled parser; a reject raises ``DecodeError``
    naming the ``dp_error`` (its ``code`` attribute holds the number)."""
    code, pkt, _ = decode_ip(buf)
    if code:
        err = DecodeError(f"IPv4/TCP packet rejected: {ERROR_NAMES[code]}")
        err.code = code
        raise err
    return pkt


cdef uint32_t _field(object value, uint32_t limit, str name) except? 0xFFFFFFFF:
    # struct.pack's range check in engine.codec.packet.build_fields, as a ValueError.
    if not isinstance(value, int) or not 0 <= value <= limit:
        raise ValueError(f"cannot build packet: field {name} out of range ({value!r})")
    return <uint32_t>value


cdef void _fill_fields(dp_tcp_fields* f, src, dst, sport, dport, seq, ack, flags, window,
                       ip_id, ttl, tos, df, urgent) except *:
    memset(f, 0, sizeof(dp_tcp_fields))
    f.family = DP_FAMILY_IPV4
    f.src[10] = 0xFF
    f.src[11] = 0xFF
    f.dst[10] = 0xFF
    f.dst[11] = 0xFF
    _put32(f.src + DP_IPV4_MAPPED_AT, _field(src, 0xFFFFFFFF, "src"))
    _put32(f.dst + DP_IPV4_MAPPED_AT, _field(dst, 0xFFFFFFFF, "dst"))
    f.sport = <uint16_t>_field(sport, 0xFFFF, "sport")
    f.dport = <uint16_t>_field(dport, 0xFFFF, "dport")
    f.seq = _field(seq, 0xFFFFFFFF, "seq")
    f.ack = _field(ack, 0xFFFFFFFF, "ack")
    f.flags = <uint8_t>_field(flags, 0xFF, "flags")
    f.window = <uint16_t>_field(window, 0xFFFF, "window")
    f.ip_id = <uint16_t>_field(ip_id, 0xFFFF, "ip_id")
    f.ttl = <uint8_t>_field(ttl, 0xFF, "ttl")
    f.tos = <uint8_t>_field(tos, 0xFF, "tos")
    f.df = 1 if df else 0
    f.urgent = <uint16_t>_field(urgent, 0xFFFF, "urgent")


_BUILD_ERRORS = {
    DP_E_OPTIONS_TOO_LONG: "TCP options too long (max 40 bytes)",
    DP_E_IP_OPTIONS_TOO_LONG: "IP options too long (max 40 bytes)",
    DP_E_PACKET_TOO_LONG: "packet too long (max 65535 bytes)",
    DP_E_BUFFER_TOO_SMALL: "output buffer too small",
    DP_E_FAMILY: "only IPv4 can be built",
    DP_E_SPLIT_MTU: "the MTU leaves no room for data after the headers",
    DP_E_SPLIT_PIECES: "more pieces than room for them",
}


def build_into(uint8_t[::1] out not None, Py_ssize_t offset, src, dst, sport, dport, seq, ack,
               flags, window, const uint8_t[::1] opts not None,
               const uint8_t[::1] payload not None, ip_id, ttl, tos, df, urgent=0,
               const uint8_t[::1] ip_opts not None = b""):
    """Write the packet engine.codec.packet.build_fields would return into ``out[offset:]``;
    returns its length.  ``ValueError`` where build_fields raises one."""
    cdef dp_tcp_fields f
    cdef Py_ssize_t n
    if not 0 <= offset <= out.shape[0]:
        raise ValueError(f"offset {offset} outside the {out.shape[0]}-byte buffer")
    _fill_fields(&f, src, dst, sport, dport, seq, ack, flags, window, ip_id, ttl, tos, df, urgent)
    n = dp_build_ipv4_tcp(&out[0] + offset if out.shape[0] else NULL, out.shape[0] - offset, &f,
                          _ptr(opts), opts.shape[0], _ptr(ip_opts), ip_opts.shape[0],
                          _ptr(payload), payload.shape[0])
    if n < 0:
        raise ValueError(f"cannot build packet: {_BUILD_ERRORS[-n]}")
    return n


def build_fields(src, dst, sport, dport, seq, ack, flags, window, opts, payload, ip_id, ttl,
                 tos, df, urgent=0, ip_opts=b""):
    """engine.codec.packet.build_fields through the compiled builder: the wire bytes."""
    out = bytearray(DP_IP_TOT_LEN_MAX)
    n = build_into(out, 0, src, dst, sport, dport, seq, ack, flags, window, opts, payload,
                   ip_id, ttl, tos, df, urgent, ip_opts)
    return bytes(out[:n])


def split_build(src, dst, sport, dport, seq, ack, flags, window, opts, payload, ip_id, ttl,
                tos, df, urgent=0, ip_opts=b"", Py_ssize_t data_len=-1, Py_ssize_t mtu=1500):
    """``[build(p) for p in split_mtu(pkt, mtu)]`` of engine.codec.packet through the compiled
    splitter: the wire bytes of every piece.  ``DecodeError`` for a cut capture that does
    not fit, ``ValueError`` where engine.codec.packet raises one."""
    cdef dp_tcp_fields f
    cdef const uint8_t[::1] o = opts
    cdef const uint8_t[::1] io = ip_opts
    cdef const uint8_t[::1] pl = payload
    cdef size_t total = pl.shape[0], hdrs, chunk, pieces, cap
    cdef Py_ssize_t n, k, at = 0
    cdef uint8_t[::1] out
    cdef uint32_t[::1] lengths
    if data_len < 0:
        data_len = <Py_ssize_t>total
    _fill_fields(&f, src, dst, sport, dport, seq, ack, flags, window, ip_id, ttl, tos, df, urgent)
    hdrs = 40 + ((<size_t>io.shape[0] + 3) & ~(<size_t>3)) + ((<size_t>o.shape[0] + 3) & ~(<size_t>3))
    chunk = <size_t>mtu - hdrs if mtu > 0 and <size_t>mtu > hdrs else total
    pieces = (total + chunk - 1) // chunk if chunk else 1
    pieces = pieces if pieces else 1
    cap = pieces * hdrs + total
    out = bytearray(cap if cap else 1)
    lengths = memoryview(bytearray(4 * pieces)).cast("I")
    n = dp_build_split(&out[0], cap, &f, _ptr(o), o.shape[0], _ptr(io), io.shape[0], _ptr(pl),
                       total, <size_t>data_len, mtu, &lengths[0], pieces)
    if n == -DP_E_SPLIT_TRUNCATED:
        raise DecodeError(f"cannot split a truncated packet: {total} of {data_len} payload bytes")
    if n < 0:
        raise ValueError(f"cannot build packet: {_BUILD_ERRORS[-n]}")
    result = []
    for k in range(n):
        result.append(bytes(out[at:at + lengths[k]]))
        at += lengths[k]
    return result


cdef dp_packet* _records(object out, Py_ssize_t count) except NULL:
    cdef uint8_t[::1] raw
    import numpy as np

    if not isinstance(out, np.ndarray) or out.dtype != __getattr__("PACKET_DTYPE") \
            or out.ndim != 1:
        raise TypeError("out must be a 1-d numpy array of PACKET_DTYPE")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be C-contiguous and writeable")
    if out.shape[0] < count or count < 0:
        raise ValueError(f"out holds {out.shape[0]} records, {count} needed")
    if out.shape[0] == 0:
        return <dp_packet*>&_layout  # never written: count is 0
    raw = out.view(np.uint8)
    return <dp_packet*>&raw[0]


def parse_batch(const uint8_t[::1] buf not None, const uint32_t[::1] offsets not None,
                const uint32_t[::1] lengths not None, out, int linktype=DP_DLT_RAW):
    """Parse packet i at ``buf[offsets[i]:offsets[i] + lengths[i]]`` into ``out[i]`` (a
    PACKET_DTYPE array), for every i; returns how many parsed without error.  With a
    ``linktype`` (pcap's) other than raw IP, each entry is a captured frame and its link
    header is skipped first.  A rejected packet's record holds only its ``error`` code and
    ``offset`` (of its IP header, or of the frame when the link layer was refused)."""
    cdef Py_ssize_t count = offsets.shape[0], i, good = 0, l2
    cdef size_t size = buf.shape[0]
    cdef dp_packet* recs
    cdef const uint8_t* base = _ptr(buf)
    if lengths.shape[0] != count:
        raise ValueError(f"{count} offsets but {lengths.shape[0]} lengths")
    recs = _records(out, count)
    with nogil:
        for i in range(count):
            if offsets[i] > size or lengths[i] > size - offsets[i]:
                memset(&recs[i], 0, sizeof(dp_packet))
                recs[i].error = DP_E_RANGE
                recs[i].offset = offsets[i]
                continue
            l2 = dp_l2_offset(base + offsets[i], lengths[i], linktype)
            if l2 < 0:
                memset(&recs[i], 0, sizeof(dp_packet))
                recs[i].error = <uint8_t>-l2
                recs[i].offset = offsets[i]
                continue
            if dp_parse_ipv4_tcp(base + offsets[i] + l2, lengths[i] - l2, &recs[i]) == DP_OK:
                good += 1
            recs[i].offset = offsets[i] + <uint32_t>l2
    return good


def scan_records(const uint8_t[::1] area not None, uint64_t capacity, uint64_t tail,
                 uint64_t avail, Py_ssize_t max_items):
    """engine/io/ring.py ``scan_records`` in C (its specification): ``(count, nbytes, marks,
    bad)`` for the records of a ring's record area from byte counter ``tail``, over at most
    ``avail`` published bytes and ``max_items`` records."""
    cdef Py_ssize_t count = 0, marks = 0
    cdef uint64_t used = 0, at
    cdef int64_t step
    cdef uint32_t length, flags
    cdef bint bad = False
    cdef const uint8_t* b = _ptr(area)
    if capacity < 8 or capacity > <uint64_t>area.shape[0]:
        raise ValueError(f"ring of {capacity} bytes in a {area.shape[0]}-byte area")
    with nogil:
        while count < max_items and used < avail:
            step = dp_ring_step(b, capacity, tail + used, avail - used, &at, &length, &flags)
            if step < 0:
                bad = True
                break
            used += <uint64_t>step
            if dp_ring_is_wrap(length):
                continue
            count += 1
            if flags & DP_RING_LOSS_BEFORE:
                marks += 1
    return count, used, marks, bad


def parse_records(const uint8_t[::1] area not None, uint64_t capacity, uint64_t pos,
                  uint64_t nbytes, out, Py_ssize_t count):
    """Parse in place up to ``count`` packets of a ring's records (engine/io/ring.py's
    layout) from byte ``pos`` of its record area over ``nbytes`` bytes (what ``peek_records``
    hands out): record ``k`` goes to ``out[k]`` (``offset`` is where its data is in
    ``area``).  Returns ``(records, good)``: the records walked (fewer than ``count`` where
    the bytes end or a header does not fit) and how many parsed without error."""
    cdef Py_ssize_t k = 0, good = 0
    cdef uint64_t used = 0, at
    cdef int64_t step
    cdef uint32_t length, flags
    cdef dp_packet* recs
    cdef const uint8_t* b = _ptr(area)
    if capacity < 8 or capacity > <uint64_t>area.shape[0] or capacity > 0xFFFFFFFF:
        raise ValueError(f"ring of {capacity} bytes in a {area.shape[0]}-byte area")
    recs = _records(out, count)
    with nogil:
        while k < count and used < nbytes:
            step = dp_ring_step(b, capacity, pos + used, nbytes - used, &at, &length, &flags)
            if step < 0:
                break
            used += <uint64_t>step
            if dp_ring_is_wrap(length):
                continue
            if dp_parse_ipv4_tcp(b + at, length, &recs[k]) == DP_OK:
                good += 1
            recs[k].offset = <uint32_t>at
            k += 1
    return k, good


def build_batch(records, const uint8_t[::1] buf not None, uint8_t[::1] out not None,
                int32_t[::1] lengths not None):
    """Write each parsed record of ``records`` back to the wire, one after the other, into
    ``out``: its header fields (rewritten or not) with the IP options, TCP options and
    payload bytes it was parsed from in ``buf``.  ``lengths[i]`` gets the packet's length,
    or minus a ``dp_error`` (the record's own parse error, or the builder's; nothing is
    written for it).  Returns the bytes written."""
    cdef Py_ssize_t count = lengths.shape[0], i, n
    cdef size_t used = 0, cap = out.shape[0], size = buf.shape[0], at
    cdef dp_packet* recs = _records(records, count)
    cdef dp_packet* p
    cdef dp_tcp_fields f
    cdef const uint8_t* base = _ptr(buf)
    cdef uint8_t* dst = &out[0] if cap else NULL
    with nogil:
        for i in range(count):
            p = &recs[i]
            if p.error:
                lengths[i] = -p.error
                continue
            at = <size_t>p.offset
            # A record may have been edited since it was parsed: check its slices again.
            if (at > size or p.ip_header_bytes < DP_IP_HEADER_BYTES
                    or p.tcp_header_bytes < DP_TCP_HEADER_BYTES
                    or <size_t>p.ip_header_bytes + p.tcp_header_bytes + p.payload_bytes > size - at):
                lengths[i] = -DP_E_RANGE
                continue
            dp_fields_of(p, &f)
            n = dp_build_ipv4_tcp(
                dst + used, cap - used, &f,
                base + at + p.ip_header_bytes + DP_TCP_HEADER_BYTES,
                p.tcp_header_bytes - DP_TCP_HEADER_BYTES,
                base + at + DP_IP_HEADER_BYTES, p.ip_header_bytes - DP_IP_HEADER_BYTES,
                base + at + p.ip_header_bytes + p.tcp_header_bytes, p.payload_bytes)
            lengths[i] = <int32_t>n
            if n > 0:
                used += <size_t>n
    return used


def exercise(const uint8_t[::1] data not None):
    """For the sanitizer fuzzer: copy ``data`` into a heap block of exactly its size (so an
    out-of-bounds read hits AddressSanitizer's red zone, not the next object), parse it,
    walk its first bytes as options, checksum it, and rebuild a parsed packet into a block
    of exactly the size the builder needs.  Returns the parse code."""
    cdef size_t n = data.shape[0]
    cdef uint8_t* copy = <uint8_t*>malloc(n if n else 1)
    cdef uint8_t* wire
    cdef dp_packet p
    cdef dp_tcp_options o
    cdef dp_tcp_fields f
    cdef size_t need
    cdef int code
    if copy == NULL:
        raise MemoryError()
    with nogil:
        if n:
            memcpy(copy, &data[0], n)
        dp_parse_tcp_options(copy, n, &o)
        dp_checksum(copy, n)
        dp_l2_offset(copy, n, DP_DLT_EN10MB)
        dp_l2_offset(copy, n, DP_DLT_LINUX_SLL)
        dp_l2_offset(copy, n, DP_DLT_LINUX_SLL2)
        code = dp_parse_ipv4_tcp(copy, n, &p)
    if code == DP_OK:
        need = (<size_t>p.ip_header_bytes + p.tcp_header_bytes + p.payload_bytes)
        wire = <uint8_t*>malloc(need)
        if wire == NULL:
            free(copy)
            raise MemoryError()
        with nogil:
            dp_fields_of(&p, &f)
            n = <size_t>dp_build_ipv4_tcp(
                wire, need, &f,
                copy + p.ip_header_bytes + DP_TCP_HEADER_BYTES,
                p.tcp_header_bytes - DP_TCP_HEADER_BYTES,
                copy + DP_IP_HEADER_BYTES, p.ip_header_bytes - DP_IP_HEADER_BYTES,
                copy + p.ip_header_bytes + p.tcp_header_bytes, p.payload_bytes)
        free(wire)
        if n != need:
            free(copy)
            raise AssertionError(f"rebuilt {n} bytes, expected {need}")
    free(copy)
    return code
