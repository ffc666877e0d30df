# cython: language_level=3
"""C declarations of the compiled packet codec (engine/dataplane/packet.pyx).

Other compiled modules ``cimport`` these structs and functions; every function here works on
C types only (no Python object, no GIL), so it can sit on the per-packet path.  The Python
specification of every rule is engine/codec/packet.py; packet.pyx says where each line comes from.

Addresses are 16 bytes plus a family so that IPv6 can follow without changing a struct: an
IPv4 address is stored IPv4-mapped (RFC 4291 §2.5.5.2: ten zero bytes, 0xFFFF, then the four
address bytes in network order), so ``src[12:16]`` is the IPv4 address as it was on the wire.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy


cdef enum:
    DP_FAMILY_IPV4 = 4
    DP_FAMILY_IPV6 = 6
    DP_ADDR_BYTES = 16
    DP_IPV4_MAPPED_AT = 12          # offset of the IPv4 address inside a 16-byte address
    DP_IP_HEADER_BYTES = 20
    DP_TCP_HEADER_BYTES = 20
    DP_OPTIONS_MAX_BYTES = 40       # ihl and doff are 4 bits: at most 60 header bytes each
    DP_SACK_BLOCKS_MAX = 4          # (40 - 2) // 8: what fits in one TCP header
    DP_IP_TOT_LEN_MAX = 65535


# Parse and build outcomes: 0 is success, the rest name the first rule a packet broke.
# The parse codes follow the order of engine/codec/packet.py's checks (which DecodeError is raised
# first), so both sides reject the same packets for the same reason.
cdef enum dp_error:
    DP_OK = 0
    DP_E_IP_TRUNCATED = 1           # fewer than 20 bytes
    DP_E_NOT_IPV4 = 2               # version nibble is not 4
    DP_E_BAD_IHL = 3                # ihl * 4 < 20
    DP_E_NOT_TCP = 4                # IP protocol is not 6
    DP_E_FRAGMENT = 5               # a non-first fragment: it has no TCP header
    DP_E_TCP_TRUNCATED = 6          # the 20-byte TCP header is not all there
    DP_E_BAD_DOFF = 7               # doff * 4 < 20
    DP_E_OPTIONS_TRUNCATED = 8      # the TCP options are not all there
    DP_E_TOT_LEN = 9                # tot_len shorter than both headers
    DP_E_RANGE = 10                 # batch: offset + length past the end of the buffer
    DP_E_OPTIONS_TOO_LONG = 11      # build: TCP options > 40 bytes (after padding)
    DP_E_IP_OPTIONS_TOO_LONG = 12   # build: IP options > 40 bytes (after padding)
    DP_E_PACKET_TOO_LONG = 13       # build: tot_len > 65535
    DP_E_BUFFER_TOO_SMALL = 14      # build: the caller's buffer cannot hold the packet
    DP_E_FAMILY = 15                # build: a family this build cannot write (IPv6, for now)
    DP_E_SPLIT_TRUNCATED = 16       # split: a cut capture (data_len > payload) cannot be split
    DP_E_SPLIT_MTU = 17             # split: the MTU leaves no room for data after the headers
    DP_E_SPLIT_PIECES = 18          # split: more pieces than the caller has room for
    DP_E_L2_TRUNCATED = 19          # link layer: its header is not all there
    DP_E_L2_NOT_IPV4 = 20           # link layer: it does not carry IPv4
    DP_E_L2_LINKTYPE = 21           # link layer: a pcap link type we do not read
    DP_E_COUNT = 22

# pcap link types (engine/codec/packet.py's DLT_* names; 12 and 14 are DLT_RAW on some systems).
cdef enum:
    DP_DLT_EN10MB = 1
    DP_DLT_RAW = 101
    DP_DLT_LINUX_SLL = 113
    DP_DLT_IPV4 = 228
    DP_DLT_LINUX_SLL2 = 276


# dp_tcp_options.present: which options the walk found (the last valid one of a kind wins).
cdef enum:
    DP_OPT_MSS = 1
    DP_OPT_WSCALE = 2
    DP_OPT_SACK_PERM = 4
    DP_OPT_TS = 8
    DP_OPT_SACK = 16


ctypedef struct dp_tcp_options:
    uint32_t ts_val
    uint32_t ts_ecr
    uint32_t sack[8]                # DP_SACK_BLOCKS_MAX (left, right) pairs, host order
    uint16_t mss
    uint8_t wscale                  # already capped at 14 (RFC 7323 §2.3)
    uint8_t present                 # DP_OPT_* bits
    uint8_t sack_blocks
    uint8_t reserved[3]


# One parsed packet.  Multi-byte fields are in host order; addresses stay in network order.
# Where its pieces are in the buffer: IP options at offset + 20 .. offset + ip_header_bytes,
# TCP options next up to offset + ip_header_bytes + tcp_header_bytes, then payload_bytes of
# payload.  data_len is what the IP header declares (tot_len - headers): larger than
# payload_bytes for a header-only or snaplen-cut capture.
ctypedef struct dp_packet:
    uint8_t src[16]
    uint8_t dst[16]
    uint32_t seq
    uint32_t ack
    uint32_t offset                 # of the IP header in the buffer the batch was read from
    uint16_t sport
    uint16_t dport
    uint16_t window
    uint16_t urgent
    uint16_t ip_id
    uint16_t ip_header_bytes
    uint16_t tcp_header_bytes
    uint16_t payload_bytes
    uint16_t data_len
    uint8_t family
    uint8_t flags                   # the TCP flag byte (the NS/reserved bits are dropped)
    uint8_t ttl
    uint8_t tos
    uint8_t df                      # the IP Don't Fragment bit
    uint8_t error                   # dp_error; the fields above are zero when it is not 0
    uint8_t reserved[4]
    dp_tcp_options opts


# The header fields of a packet to build (the options and payload are passed beside it).
ctypedef struct dp_tcp_fields:
    uint8_t src[16]
    uint8_t dst[16]
    uint32_t seq
    uint32_t ack
    uint16_t sport
    uint16_t dport
    uint16_t window
    uint16_t urgent
    uint16_t ip_id
    uint8_t family
    uint8_t flags
    uint8_t ttl
    uint8_t tos
    uint8_t df
    uint8_t reserved


# The Internet checksum (RFC 1071) in three steps, so that a pseudo-header and a segment
# can be summed without being contiguous: add big-endian 16-bit words to a running sum,
# fold it with end-around carries, complement.
cdef uint64_t dp_sum16(const uint8_t* data, size_t n, uint64_t total) noexcept nogil
cdef uint16_t dp_fold(uint64_t total) noexcept nogil
cdef uint16_t dp_checksum(const uint8_t* data, size_t n) noexcept nogil

# TCP options of one header (n is clamped to 40): the same walk as engine.codec.packet.parse_options.
cdef void dp_parse_tcp_options(const uint8_t* raw, size_t n, dp_tcp_options* out) noexcept nogil

# Offset of the IPv4 header in a captured frame of a pcap link type (engine.codec.packet.l2_offset:
# Ethernet with one optional 802.1Q tag, Linux SLL and SLL2, raw IP), or minus a dp_error.
cdef Py_ssize_t dp_l2_offset(const uint8_t* frame, size_t n, int linktype) noexcept nogil

# The IPv4/TCP packet at buf[0:n] into *out (options included); returns out.error.
cdef int dp_parse_ipv4_tcp(const uint8_t* buf, size_t n, dp_packet* out) noexcept nogil

# Write an IPv4/TCP packet with both checksums into out[0:cap]; the options are padded with
# zero bytes to a multiple of 4.  Returns the packet's length, or minus a dp_error.  The
# option and payload pointers must not overlap out.
cdef Py_ssize_t dp_build_ipv4_tcp(
    uint8_t* out, size_t cap, const dp_tcp_fields* f,
    const uint8_t* tcp_opts, size_t tcp_opts_len,
    const uint8_t* ip_opts, size_t ip_opts_len,
    const uint8_t* payload, size_t payload_len,
) noexcept nogil

# Copy a parsed packet's header fields into build fields (the rewrite step goes between).
cdef void dp_fields_of(const dp_packet* p, dp_tcp_fields* f) noexcept nogil

# Build a packet split to at most mtu bytes per piece (engine.codec.packet.split_mtu, spec §3.4):
# the pieces one after the other in out, their lengths in lengths[0:count]; returns count,
# or minus a dp_error.  data_len is the packet's declared payload length (a packet that fits
# is built whole even when it is a cut capture).
cdef Py_ssize_t dp_build_split(
    uint8_t* out, size_t cap, const dp_tcp_fields* f,
    const uint8_t* tcp_opts, size_t tcp_opts_len,
    const uint8_t* ip_opts, size_t ip_opts_len,
    const uint8_t* payload, size_t payload_len, size_t data_len, Py_ssize_t mtu,
    uint32_t* lengths, size_t max_pieces,
) noexcept nogil


# A worker's ring of variable-length records (engine/io/ring.py): a record is [length u32 |
# flags u32 | timestamp f64 | data | pad to 8 bytes]; a length of 0xFFFFFFFF is a wrap mark
# (the rest of the area is skipped, the next record is at its start).
cdef enum:
    DP_RING_HEADER_BYTES = 16
    DP_RING_ALIGN = 8
    DP_RING_LOSS_BEFORE = 1


cdef inline bint dp_ring_is_wrap(uint32_t length) noexcept nogil:
    return length == <uint32_t>0xFFFFFFFF


cdef inline int64_t dp_ring_step(const uint8_t* area, uint64_t capacity, uint64_t counter,
                                 uint64_t left, uint64_t* at, uint32_t* length,
                                 uint32_t* flags) noexcept nogil:
    """engine/io/ring.py ``record_step``: the record at byte counter ``counter`` of a ring's
    record area of ``capacity`` bytes, ``left`` published bytes from it.  Returns the bytes it
    takes with the wrap mark before it, its data at ``area + *at``, its length and flags
    (``dp_ring_is_wrap(*length)`` for a wrap mark that ends the published bytes); or -1 for a
    header that does not fit the area or the published bytes."""
    cdef uint64_t pos = counter % capacity
    cdef uint64_t room = capacity - pos
    cdef uint64_t skip = 0, size
    flags[0] = 0
    at[0] = 0
    if room < 4:
        return -1
    memcpy(length, area + pos, 4)
    if dp_ring_is_wrap(length[0]):
        if pos == 0 or room > left:
            return -1
        if room == left:
            return <int64_t>room
        skip = room
        left -= room
        pos = 0
        room = capacity
        memcpy(length, area, 4)
        if dp_ring_is_wrap(length[0]):
            return -1
    size = DP_RING_HEADER_BYTES + (
        (<uint64_t>length[0] + DP_RING_ALIGN - 1) & ~(<uint64_t>DP_RING_ALIGN - 1))
    if room < DP_RING_HEADER_BYTES or size > room or size > left:
        return -1
    memcpy(flags, area + pos + 4, 4)
    at[0] = pos + DP_RING_HEADER_BYTES
    return <int64_t>(skip + size)
