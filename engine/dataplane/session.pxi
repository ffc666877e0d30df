# cython: language_level=3
# The session state machine in C (included by engine.pyx): a port of engine/core/session.py
# (TcpSession), engine/core/session_parts.py (RttEstimator, RetransmitQueue, RequestGate),
# engine/core/states.py and engine/core/events.py.  The Python code is the specification:
# for the same inputs and clock, the same packets (bytes, order), events and counters.
# Each cdef function names the Python function it ports ("port of ...").
#
# Memory: one ESession struct per session (no inline buffers); captured segments and packets
# live in malloc'd blocks of their own (header + options + payload), freed when sent and
# acknowledged; the control-packet and event queues are small arrays allocated on demand and
# freed when drained.  Every block goes through e_alloc/e_free, which count the live blocks and
# bytes (dp_live_blocks / dp_live_bytes) so that tests can see leaks and measure a session.
# A None of the Python code is NaN for a time (tset() tests it) and a has_* flag otherwise.

cimport cython
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free, realloc
from libc.string cimport memcpy, memset, memmove
from libc.math cimport NAN, fabs

from engine.dataplane.packet cimport (
    dp_packet, dp_tcp_fields, dp_tcp_options, dp_build_ipv4_tcp, dp_parse_tcp_options,
    DP_FAMILY_IPV4, DP_OPT_MSS, DP_OPT_WSCALE, DP_OPT_TS,
)

# -- engine/core/states.py ------------------------------------------------------------------

cdef enum:
    ST_CLOSED = 0
    ST_SYN_SENT = 1
    ST_ESTABLISHED = 2
    ST_FIN_WAIT = 3
    ST_LINGER = 4
    ST_FINISHED = 5

# -- engine/core/events.py ------------------------------------------------------------------

# DropReason, in its declaration order (the EC_DROP_* indices follow the same order).
cdef enum:
    DR_NO_TRANSFER = 0
    DR_SAMPLED_OUT
    DR_NO_SESSION
    DR_NO_SYN
    DR_SESSION_LIMIT
    DR_NO_TUPLE
    DR_CLIENT_SYN_ACK
    DR_UNKNOWN_RESPONSE
    DR_PURE_ACK
    DR_CLIENT_RETRANSMIT
    DR_SYN_RETRANSMIT
    DR_SYN_CONFLICT
    DR_OLD_SEGMENT
    DR_AFTER_FIN
    DR_SESSION_CLOSED
    DR_UNEXPECTED_RESPONSE
    DR_STRAY_RESPONSE
    DR_BAD_ACK
    DR_OUT_OF_WINDOW
    DR_CLIENT_OUT_OF_WINDOW
    DR_INTERNAL_ERROR

# Outcome, in its declaration order (the EC_ENDED_* indices follow the same order).
cdef enum:
    OC_NONE = -1
    OC_CLOSED = 0
    OC_TARGET_CLOSED
    OC_TARGET_RESET
    OC_CLIENT_RESET
    OC_REFUSED
    OC_HANDSHAKE_TIMEOUT
    OC_RETRANSMIT_LIMIT
    OC_RECONNECT_LIMIT
    OC_TIMEOUT
    OC_IDLE
    OC_FIN_WAIT_TIMEOUT
    OC_ABORTED
    OC_OFFLINE_END
    OC_SHED_HALF_OPEN

OUTCOME_NAMES = (
    "closed", "target_closed", "target_reset", "client_reset", "refused", "handshake_timeout",
    "retransmit_limit", "reconnect_limit", "timeout", "idle", "fin_wait_timeout", "aborted",
    "offline_end", "shed_half_open",
)

# Event kinds: RouteNeeded (EV_ROUTE) and SessionEnded (EV_ENDED, outcome = OC_*).
# sess_next_event returns routes only (what the table acts on); sess_next_event_any all.
cdef enum:
    EV_NONE = 0
    EV_ROUTE = 1
    EV_ENDED = 2

ctypedef struct EEvent:
    int kind
    uint32_t cip
    uint16_t cport
    uint32_t tip
    uint16_t tport
    int outcome

# -- the output buffer ----------------------------------------------------------------------

ctypedef struct EOut:
    uint8_t* buf
    size_t cap
    size_t used
    uint32_t* lens
    uint32_t n
    uint32_t max_n

# -- configuration (the session fields of engine/core/config.SessionConfig) -----------------

ctypedef struct ECfg:
    double rtt_initial_s
    double response_wait_max_s
    double session_timeout_s
    double keepalive_timeout_s
    double linger_s
    double handshake_timeout_s
    double fin_wait_timeout_s
    int64_t reconnect_budget
    int32_t mss
    int32_t mtu
    bint wait_response
    bint fake_handshake
    bint reconnect

# -- a captured segment or packet (engine/codec/tcpseq.Segment + what it keeps of its pkt) ----

ctypedef struct ESeg:
    ESeg* prev
    ESeg* next
    int64_t off
    int64_t end
    double sent_at
    uint8_t* payload            # inside this block (after the options)
    uint32_t plen
    uint32_t seq                # pkt.seq
    uint32_t ack                # pkt.ack
    uint32_t tsval
    uint16_t window
    uint16_t ip_id
    uint8_t flags               # the segment's own flags
    uint8_t pkt_flags           # pkt.flags
    uint8_t ttl
    uint8_t tos
    uint8_t df
    uint8_t has_tsval
    uint8_t retx
    uint8_t opt_len


# A control packet owed (session._ctl): flags, seq, ack; faked options (None) or none (b"");
# with_fin: built from the client's FIN segment (its captured options).
ctypedef struct ECtl:
    uint32_t seq
    uint32_t ack
    uint8_t flags
    uint8_t faked_opts
    uint8_t with_fin

# -- the session (engine/core/session.TcpSession) -------------------------------------------

ctypedef struct ESession:
    # -- what an ended session reads while it lingers (and the table's identity fields):
    # sess_linger cuts the struct after linger_tail, so every field below it is out of
    # reach of a lingering session's code paths (see sess_linger for the list).
    const ECfg* cfg
    uint64_t* counters
    ECtl* ctl
    EEvent* events
    uint8_t caddr[16]           # addresses also 16-byte IPv4-mapped, for IPv6 later
    uint8_t taddr[16]
    double now
    double ack_at
    double last_ack_at
    double linger_at
    int64_t snd_una
    int64_t snd_nxt
    int64_t cap_end
    int64_t reconnects
    int64_t rcv_data
    int64_t rcv_unacked
    int64_t tb_held             # the table's: sess_held_bytes when it last looked
    uint32_t client_ip
    uint32_t target_ip
    uint32_t base
    uint32_t cap_ack
    uint32_t syn_seq
    uint32_t rcv_nxt
    uint32_t ts_val
    uint32_t ts_recent
    uint32_t ctl_n
    uint32_t ctl_cap
    uint32_t ev_head
    uint32_t ev_n
    uint32_t ev_cap
    int state
    int outcome
    uint16_t client_port
    uint16_t target_port
    uint16_t ip_id
    uint8_t has_base
    uint8_t has_cap_ack
    uint8_t has_syn
    uint8_t has_ts_val
    uint8_t ts_ok
    uint8_t restart_refused
    uint8_t reconnected
    uint8_t graceful
    uint8_t route_down
    uint8_t ack_due
    uint8_t error               # an illegal transition was attempted (Python raised)
    uint8_t lingering           # cut by sess_linger: nothing below linger_tail exists
    uint8_t linger_tail         # the last byte kept
    # -- the rest: a live session's
    double created_at
    double gap_at
    int64_t pend_held           # sum of (end - off) over the pending queue (TcpSession._held)
    uint8_t gap_held
    uint8_t gap_fast
    uint32_t online_ip
    uint16_t online_port
    int64_t iss
    int64_t resync_end
    ESeg* pend_head
    ESeg* pend_tail
    uint32_t pend_n
    ESeg* unacked_head          # sent data segments, oldest first; the FIN (fin_unacked)
    ESeg* unacked_tail          # is the queue's virtual tail
    ESeg* syn_pkt               # freed once its SYN is built (has_syn, syn_seq stay)
    ESeg* third_pkt             # freed once sent (has_third stays)
    ESeg* fin_seg
    ESeg* rst_seg
    uint8_t* syn_bytes          # the SYN as sent, while SYN_SENT
    uint32_t syn_len
    uint32_t resync_ack
    uint8_t has_resync
    uint8_t resync_has_ack
    uint8_t has_third
    uint8_t fin_sent
    uint8_t fin_unacked
    uint8_t fake_syn
    uint8_t fake_wnd
    # handshake
    uint8_t syn_retx
    uint8_t syn_due
    uint8_t need_third
    uint8_t syn_ts
    uint8_t has_syn_wscale
    uint8_t syn_wscale
    uint8_t snd_wscale
    uint8_t retx_due
    uint8_t probe_due
    uint8_t retx_answered
    uint8_t has_recover
    double syn_sent_at
    double syn_rto
    double syn_at
    double handshake_at
    int64_t rcv_mss
    int64_t rcv_wnd_max
    # receive side
    double last_resp_at
    double last_resp_data_at
    # window and retransmission (RttEstimator inline)
    int64_t snd_wnd
    double srtt
    double rttvar
    double rtt_min
    int backoff
    int retries
    int dupacks
    int persist_backoff
    int64_t recover
    double rto_at
    double persist_at
    # the request gate (RequestGate inline)
    uint32_t g_online_base
    uint32_t g_last_data_ack
    uint32_t g_released_ack
    uint8_t g_has_online_base
    uint8_t g_has_last_data_ack
    uint8_t g_has_released_ack
    double g_held_since
    double g_at
    int64_t g_rcv_data_at_req
    # end
    double fin_wait_at

# -- constants (the Python names, units in the name) ----------------------------------------

# engine/core/session_parts.py
cdef double RTO_INITIAL_S = 0.2
cdef double RTO_MIN_S = 0.05
cdef double RTO_MAX_S = 3.0
cdef double RTO_GRANULARITY_S = 0.001
cdef double RESPONSE_QUIET_MIN_S = 0.001
cdef double LAN_RTT_MAX_S = 0.001
cdef double CLOSE_QUIET_MIN_S = 0.5
# engine/core/session.py
cdef int64_t RETRIES_MAX = 6
cdef double SYN_RTO_INITIAL_S = 0.5
cdef double DELAYED_ACK_S = 0.04
cdef int64_t DUP_ACK_THRESHOLD = 3
cdef int64_t FAKED_WINDOW = 65535
cdef int64_t FAKED_TTL = 64
cdef int64_t DEFAULT_MSS = 536
cdef int64_t WINDOW_MAX_BYTES = 65535
cdef double CLIENT_GAP_WAIT_S = 1.0
cdef int64_t CLIENT_SEQ_JUMP_MAX_BYTES = 67108864
# engine/codec/tcpseq.py, engine/codec/packet.py
cdef int64_t TS_CLOCK_HZ = 1000
cdef int64_t SEQ_HALF = 2147483648
cdef int64_t SEQ_SPACE = 4294967296
cdef int64_t IP_ID_MASK = 0xFFFF
cdef int64_t WSCALE_MAX = 14

cdef enum:
    F_FIN = 0x01
    F_SYN = 0x02
    F_RST = 0x04
    F_PSH = 0x08
    F_ACK = 0x10
    F_URG = 0x20
    F_ECE = 0x40
    F_CWR = 0x80
    DATA_FLAGS = 0x10 | 0x08 | 0x20 | 0x40 | 0x80
    SYN_FLAGS = 0x02 | 0x40 | 0x80
    GATE_DATA = 0
    GATE_CLOSE = 1
    OPT_SEG = 0                 # _emit(options=None) with a segment: its captured options
    OPT_FAKED = 1               # _emit(options=None) without one: _faked_options()
    OPT_EMPTY = 2               # options=b""
    BLOCK_HEADER_BYTES = 16

# -- the allocation counter (tests read it: no leaks, the memory of a session) --------------
#
# Blocks of up to CACHE_CLASSES * CACHE_STEP bytes (header included) are allocated rounded up
# to a multiple of CACHE_STEP and, when freed, kept on a free list of their size class (at
# most CACHE_MAX_BYTES over all classes) for the next allocation of that class: a session's
# segments, control packets and event arrays come and go with every request, and in steady
# state they then cost no malloc/free.  A kept block is not live: the counters below count
# what the engine holds, as before.  Built with AddressSanitizer there are no classes: every
# block is malloc'd at its exact size and freed (a read past it or of a freed block must
# reach the sanitizer's poisoned memory, not a class's slack or a kept block).

cdef enum:
    CACHE_STEP = 64
    CACHE_CLASSES = 32          # classes 1..31: blocks of 64 .. 1,984 bytes

cdef extern from *:
    """
    #if defined(__SANITIZE_ADDRESS__)
    #define E_CACHE_MAX_BYTES 0
    #else
    #define E_CACHE_MAX_BYTES (256 * 1024)
    #endif
    """
    const size_t CACHE_MAX_BYTES "E_CACHE_MAX_BYTES"

cdef size_t dp_live_blocks = 0
cdef size_t dp_live_bytes = 0
cdef size_t* e_cache[CACHE_CLASSES]     # free list heads (a kept block's p[0]: the next)
cdef size_t e_cache_bytes = 0


cdef void* e_alloc(size_t n) noexcept nogil:
    """malloc with a size header (p[0] the size asked for, p[1] the size class or 0), counted
    in dp_live_blocks / dp_live_bytes; a block of a size class comes from its free list."""
    global dp_live_blocks, dp_live_bytes, e_cache_bytes
    cdef size_t c = (n + BLOCK_HEADER_BYTES + CACHE_STEP - 1) // CACHE_STEP
    cdef size_t* p
    if c < CACHE_CLASSES and CACHE_MAX_BYTES:
        p = e_cache[c]
        if p != NULL:
            e_cache[c] = <size_t*>p[0]
            e_cache_bytes -= c * CACHE_STEP
        else:
            p = <size_t*>malloc(c * CACHE_STEP)
    else:
        c = 0
        p = <size_t*>malloc(n + BLOCK_HEADER_BYTES)
    if p == NULL:
        return NULL
    p[0] = n
    p[1] = c
    dp_live_blocks += 1
    dp_live_bytes += n + BLOCK_HEADER_BYTES
    return <void*>((<char*>p) + BLOCK_HEADER_BYTES)


cdef void e_free(void* q) noexcept nogil:
    global dp_live_blocks, dp_live_bytes, e_cache_bytes
    if q == NULL:
        return
    cdef size_t* p = <size_t*>((<char*>q) - BLOCK_HEADER_BYTES)
    cdef size_t c = p[1]
    dp_live_blocks -= 1
    dp_live_bytes -= p[0] + BLOCK_HEADER_BYTES
    if c and e_cache_bytes + c * CACHE_STEP <= CACHE_MAX_BYTES:
        p[0] = <size_t>e_cache[c]
        e_cache[c] = p
        e_cache_bytes += c * CACHE_STEP
        return
    free(p)


cdef void* e_realloc(void* q, size_t n) noexcept nogil:
    global dp_live_bytes
    if q == NULL:
        return e_alloc(n)
    cdef size_t* p = <size_t*>((<char*>q) - BLOCK_HEADER_BYTES)
    cdef size_t old = p[0]
    cdef size_t* r
    cdef void* moved
    if p[1]:
        if n + BLOCK_HEADER_BYTES <= p[1] * CACHE_STEP:
            p[0] = n                # still fits its class
            dp_live_bytes = dp_live_bytes - old + n
            return q
        moved = e_alloc(n)
        if moved == NULL:
            return NULL
        memcpy(moved, q, old if old < n else n)
        e_free(q)
        return moved
    r = <size_t*>realloc(p, n + BLOCK_HEADER_BYTES)
    if r == NULL:
        return NULL
    r[0] = n
    dp_live_bytes = dp_live_bytes - old + n
    return <void*>((<char*>r) + BLOCK_HEADER_BYTES)

# -- small helpers (engine/codec/tcpseq.py) -------------------------------------------------

cdef inline bint tset(double t) noexcept nogil:
    """A time that is not None (None is NaN)."""
    return t == t


cdef inline bint seq_after(uint32_t a, uint32_t b) noexcept nogil:
    """port of tcpseq.after"""
    cdef uint32_t d = a - b
    return 0 < d < SEQ_HALF


cdef inline uint32_t ts_clock(double now) noexcept nogil:
    """port of tcpseq.ts_clock: int(now * 1000) & SEQ_MASK"""
    return <uint32_t><int64_t>(now * TS_CLOCK_HZ)


cdef inline uint32_t be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void put32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline uint8_t* seg_opts(ESeg* g) noexcept nogil:
    return (<uint8_t*>g) + sizeof(ESeg)


cdef bint opt_tsval(const uint8_t* o, size_t n, uint32_t* out) noexcept nogil:
    """port of tcpseq.tsval (and Segment.__init__'s inlined fast path)"""
    cdef dp_tcp_options t
    if n == 0:
        return False
    if n >= 12 and o[0] == 1 and o[1] == 1 and o[2] == 8 and o[3] == 10:
        out[0] = be32(o + 4)
        return True
    dp_parse_tcp_options(o, n, &t)
    if t.present & DP_OPT_TS:
        out[0] = t.ts_val
        return True
    return False


cdef Py_ssize_t find_option(const uint8_t* raw, size_t n, int kind, int length) noexcept nogil:
    """port of packet._find_option"""
    cdef size_t i = 0
    cdef int k, ln
    while i < n:
        k = raw[i]
        if k == 0:
            break
        if k == 1:
            i += 1
            continue
        if i + 1 >= n:
            break
        ln = raw[i + 1]
        if ln < 2 or i + ln > n:
            break
        if k == kind and ln == length:
            return <Py_ssize_t>i
        i += ln
    return -1


cdef void set_timestamp(uint8_t* opts, size_t n, uint32_t tsval, uint32_t tsecr) noexcept nogil:
    """port of packet.set_timestamp, in place (the caller passes a copy)"""
    cdef Py_ssize_t i = find_option(opts, n, 8, 10)
    if i >= 0:
        put32(opts + i + 2, tsval)
        put32(opts + i + 6, tsecr)

# -- the output buffer ----------------------------------------------------------------------

cdef int eout_init(EOut* o) noexcept nogil:
    memset(o, 0, sizeof(EOut))
    return 0


cdef void eout_free(EOut* o) noexcept nogil:
    free(o.buf)
    free(o.lens)
    memset(o, 0, sizeof(EOut))


cdef void eout_reset(EOut* o) noexcept nogil:
    o.used = 0
    o.n = 0


cdef uint8_t* eout_room(EOut* o, size_t need) noexcept nogil:
    """Room for one more packet of up to ``need`` bytes (grown with realloc); NULL: no memory."""
    cdef size_t cap
    cdef uint32_t max_n
    cdef uint8_t* b
    cdef uint32_t* l
    if o.used + need > o.cap:
        cap = o.cap * 2 if o.cap else 4096
        while cap < o.used + need:
            cap *= 2
        b = <uint8_t*>realloc(o.buf, cap)
        if b == NULL:
            return NULL
        o.buf = b
        o.cap = cap
    if o.n >= o.max_n:
        max_n = o.max_n * 2 if o.max_n else 16
        l = <uint32_t*>realloc(o.lens, max_n * sizeof(uint32_t))
        if l == NULL:
            return NULL
        o.lens = l
        o.max_n = max_n
    return o.buf + o.used


cdef int eout_append(EOut* o, const uint8_t* data, size_t n) noexcept nogil:
    cdef uint8_t* p = eout_room(o, n)
    if p == NULL:
        return -1
    memcpy(p, data, n)
    o.lens[o.n] = <uint32_t>n
    o.n += 1
    o.used += n
    return 0

# -- configuration --------------------------------------------------------------------------

cdef int ecfg_fill(ECfg* out, object config) except -1:
    """The session fields of a SessionConfig, in C types (once per table)."""
    memset(out, 0, sizeof(ECfg))
    out.rtt_initial_s = float(config.rtt_initial_s)
    out.response_wait_max_s = float(config.response_wait_max_s)
    out.session_timeout_s = float(config.session_timeout_s)
    out.keepalive_timeout_s = float(config.keepalive_timeout_s)
    out.linger_s = float(config.linger_s)
    out.handshake_timeout_s = float(config.handshake_timeout_s)
    out.fin_wait_timeout_s = float(config.fin_wait_timeout_s)
    out.reconnect_budget = int(config.reconnect_budget)
    out.mss = int(config.mss)
    out.mtu = int(config.mtu)
    out.wait_response = bool(config.wait_response)
    out.fake_handshake = bool(config.fake_handshake)
    out.reconnect = bool(config.reconnect)
    return 0

# -- a captured packet as the session sees it -----------------------------------------------

ctypedef struct ECap:
    const uint8_t* opts
    const uint8_t* payload
    uint32_t opt_len
    uint32_t payload_bytes
    uint32_t ip_opts_len
    uint32_t seq
    uint32_t ack
    uint32_t data_len
    uint16_t window
    uint16_t ip_id
    uint8_t flags
    uint8_t ttl
    uint8_t tos
    uint8_t df


cdef void cap_of(ECap* c, const dp_packet* p, const uint8_t* buf) noexcept nogil:
    cdef const uint8_t* ip = buf + p.offset
    cdef uint32_t tcp_at = p.ip_header_bytes
    c.opts = ip + tcp_at + 20
    c.opt_len = p.tcp_header_bytes - 20 if p.tcp_header_bytes > 20 else 0
    c.payload = ip + tcp_at + p.tcp_header_bytes
    c.payload_bytes = p.payload_bytes
    c.ip_opts_len = p.ip_header_bytes - 20 if p.ip_header_bytes > 20 else 0
    c.seq = p.seq
    c.ack = p.ack
    c.data_len = p.data_len
    c.window = p.window
    c.ip_id = p.ip_id
    c.flags = p.flags
    c.ttl = p.ttl
    c.tos = p.tos
    c.df = p.df


cdef void copy_padded(uint8_t* dst, const uint8_t* src, size_t src_len, size_t start,
                      size_t n) noexcept nogil:
    """dst[0:n] = (src[0:src_len] + zeros)[start:start + n]"""
    cdef size_t have = 0
    if start < src_len:
        have = src_len - start
        if have > n:
            have = n
        memcpy(dst, src + start, have)
    if have < n:
        memset(dst + have, 0, n - have)


cdef ESeg* seg_new(const ECap* c, int64_t off, int64_t end, uint8_t flags,
                   const uint8_t* src, size_t src_len, size_t start, size_t plen) noexcept nogil:
    """port of tcpseq.Segment(off, end, pkt, flags, payload): one block with the packet's
    options and the payload (src[start:start + plen], zero-padded past src_len)."""
    cdef size_t olen = c.opt_len if c.opt_len <= 40 else 40
    cdef ESeg* g = <ESeg*>e_alloc(sizeof(ESeg) + olen + plen)
    if g == NULL:
        return NULL
    g.prev = NULL
    g.next = NULL
    g.off = off
    g.end = end
    g.sent_at = 0.0
    g.seq = c.seq
    g.ack = c.ack
    g.window = c.window
    g.ip_id = c.ip_id
    g.flags = flags
    g.pkt_flags = c.flags
    g.ttl = c.ttl
    g.tos = c.tos
    g.df = c.df
    g.retx = 0
    g.opt_len = <uint8_t>olen
    if olen:
        memcpy(seg_opts(g), c.opts, olen)
    g.has_tsval = opt_tsval(c.opts, olen, &g.tsval)
    g.payload = seg_opts(g) + olen
    g.plen = <uint32_t>plen
    if plen:
        copy_padded(g.payload, src, src_len, start, plen)
    return g


cdef ESeg* seg_piece(ESeg* s, int64_t off, int64_t end, uint8_t flags, size_t plen) noexcept nogil:
    """A new segment of the same captured packet with s.payload[:plen] (the window split)."""
    cdef ESeg* g = <ESeg*>e_alloc(sizeof(ESeg) + s.opt_len + plen)
    if g == NULL:
        return NULL
    memcpy(g, s, sizeof(ESeg))
    g.prev = NULL
    g.next = NULL
    g.off = off
    g.end = end
    g.flags = flags
    g.sent_at = 0.0
    g.retx = 0
    if s.opt_len:
        memcpy(seg_opts(g), seg_opts(s), s.opt_len)
    g.payload = seg_opts(g) + s.opt_len
    if plen > s.plen:
        plen = s.plen
    g.plen = <uint32_t>plen
    if plen:
        memcpy(g.payload, s.payload, plen)
    return g

# -- lists ----------------------------------------------------------------------------------

cdef inline void pend_unlink_head(ESession* s) noexcept nogil:
    cdef ESeg* g = s.pend_head
    s.pend_head = g.next
    if s.pend_head != NULL:
        s.pend_head.prev = NULL
    else:
        s.pend_tail = NULL
    s.pend_n -= 1
    s.pend_held -= g.end - g.off
    g.next = NULL


cdef inline void pend_drop_head(ESession* s) noexcept nogil:
    cdef ESeg* g = s.pend_head
    pend_unlink_head(s)
    e_free(g)


cdef void pend_clear(ESession* s) noexcept nogil:
    cdef ESeg* g = s.pend_head
    cdef ESeg* n
    while g != NULL:
        n = g.next
        e_free(g)
        g = n
    s.pend_head = NULL
    s.pend_tail = NULL
    s.pend_n = 0
    s.pend_held = 0


cdef inline bint uq_any(ESession* s) noexcept nogil:
    """bool(self._unacked)"""
    return s.unacked_head != NULL or s.fin_unacked


cdef inline ESeg* uq_head(ESession* s) noexcept nogil:
    if s.unacked_head != NULL:
        return s.unacked_head
    if s.fin_unacked:
        return s.fin_seg
    return NULL


cdef inline void uq_append(ESession* s, ESeg* g) noexcept nogil:
    g.next = NULL
    g.prev = s.unacked_tail
    if s.unacked_tail != NULL:
        s.unacked_tail.next = g
    else:
        s.unacked_head = g
    s.unacked_tail = g


cdef void uq_clear(ESession* s) noexcept nogil:
    cdef ESeg* g = s.unacked_head
    cdef ESeg* n
    while g != NULL:
        n = g.next
        e_free(g)
        g = n
    s.unacked_head = NULL
    s.unacked_tail = NULL
    s.fin_unacked = 0


cdef bint uq_take_acked(ESession* s, int64_t a, double now, double* sample) noexcept nogil:
    """port of RetransmitQueue.take_acked; False: no sample (None)."""
    cdef bint has = False
    cdef ESeg* g
    while True:
        g = uq_head(s)
        if g == NULL or g.end > a:
            break
        if g.retx:
            has = False
        else:
            has = True
            sample[0] = now - g.sent_at
        if g == s.unacked_head:
            s.unacked_head = g.next
            if s.unacked_head != NULL:
                s.unacked_head.prev = NULL
            else:
                s.unacked_tail = NULL
            e_free(g)
        else:
            s.fin_unacked = 0   # the FIN: it stays the session's _fin_seg
    return has


cdef int ctl_push(ESession* s, uint8_t flags, uint32_t seq, uint32_t ack, uint8_t faked_opts,
                  uint8_t with_fin) noexcept nogil:
    """self._ctl.append((flags, seq, ack, None if faked_opts else b"", fin or None))"""
    cdef uint32_t cap
    cdef ECtl* a
    if s.ctl_n >= s.ctl_cap:
        cap = s.ctl_cap * 2 if s.ctl_cap else 2
        a = <ECtl*>e_realloc(s.ctl, cap * sizeof(ECtl))
        if a == NULL:
            s.error = 2
            return -1
        s.ctl = a
        s.ctl_cap = cap
    a = s.ctl + s.ctl_n
    a.flags = flags
    a.seq = seq
    a.ack = ack
    a.faked_opts = faked_opts
    a.with_fin = with_fin
    s.ctl_n += 1
    return 0


cdef int ev_push(ESession* s, int kind, int outcome) noexcept nogil:
    cdef uint32_t cap
    cdef EEvent* a
    if s.ev_n >= s.ev_cap:
        cap = s.ev_cap * 2 if s.ev_cap else 2
        a = <EEvent*>e_realloc(s.events, cap * sizeof(EEvent))
        if a == NULL:
            s.error = 2
            return -1
        s.events = a
        s.ev_cap = cap
    a = s.events + s.ev_n
    a.kind = kind
    a.cip = s.client_ip
    a.cport = s.client_port
    a.tip = s.target_ip
    a.tport = s.target_port
    a.outcome = outcome
    s.ev_n += 1
    return 0

# -- counters -------------------------------------------------------------------------------

cdef inline void cnt(ESession* s, int key, int64_t n) noexcept nogil:
    s.counters[key] += <uint64_t>n


cdef inline void drop(ESession* s, int reason) noexcept nogil:
    """port of TcpSession._drop"""
    s.counters[EC_DROP_NO_TRANSFER + reason] += 1

# -- RttEstimator (engine/core/session_parts.py) --------------------------------------------

cdef void est_sample(ESession* s, double r) noexcept nogil:
    """port of RttEstimator.sample"""
    if r < 0:
        return
    if not tset(s.rtt_min) or r < s.rtt_min:
        s.rtt_min = r
    if not tset(s.srtt):
        s.srtt = r
        s.rttvar = r / 2
    else:
        s.rttvar = 0.75 * s.rttvar + 0.25 * fabs(s.srtt - r)
        s.srtt = 0.875 * s.srtt + 0.125 * r


cdef double est_rto(ESession* s) noexcept nogil:
    """port of RttEstimator.rto"""
    cdef double base, var4
    if not tset(s.srtt):
        base = RTO_INITIAL_S
    else:
        var4 = 4 * s.rttvar
        base = s.srtt + (var4 if var4 > RTO_GRANULARITY_S else RTO_GRANULARITY_S)
        if base < RTO_MIN_S:
            base = RTO_MIN_S
        elif base > RTO_MAX_S:
            base = RTO_MAX_S
    if s.backoff:
        base *= <double>(1 << s.backoff)
    return base if base < RTO_MAX_S else RTO_MAX_S


cdef double est_persist_interval(ESession* s, int persist_backoff) noexcept nogil:
    """port of RttEstimator.persist_interval"""
    cdef double base, r, v
    if not tset(s.srtt):
        base = RTO_INITIAL_S
    else:
        r = est_rto(s)
        base = RTO_MIN_S if RTO_MIN_S > r else r
    v = base * <double>(1 << (persist_backoff if persist_backoff < 16 else 16))
    return RTO_MAX_S if RTO_MAX_S < v else v


cdef inline double est_rtt(ESession* s) noexcept nogil:
    """port of RttEstimator.rtt"""
    return s.cfg.rtt_initial_s if not tset(s.srtt) else s.srtt


cdef inline double est_path_rtt(ESession* s) noexcept nogil:
    """port of RttEstimator.path_rtt"""
    return s.cfg.rtt_initial_s if not tset(s.rtt_min) else s.rtt_min

# -- RequestGate (engine/core/session_parts.py) ---------------------------------------------

cdef void gate_restart(ESession* s) noexcept nogil:
    """port of RequestGate.restart"""
    s.g_has_online_base = 0
    s.g_has_last_data_ack = 0
    s.g_has_released_ack = 0
    s.g_held_since = NAN


cdef bint gate_open(ESession* s, uint32_t ack, double now, int kind) noexcept nogil:
    """port of RequestGate.open"""
    cdef uint32_t prev
    cdef int64_t online, got
    cdef double held, quiet_s, quiet_at = 0.0, max_at, a
    cdef bint has_quiet = False
    cdef int rule = -1
    if s.g_has_last_data_ack:
        prev = s.g_last_data_ack
    elif s.g_has_online_base:
        prev = s.g_online_base
    else:
        prev = s.g_online_base = ack
        s.g_has_online_base = 1
    online = <uint32_t>(ack - prev)
    if online >= SEQ_HALF:
        online = 0
    got = s.rcv_data - s.g_rcv_data_at_req
    if got >= online:
        rule = EC_GATE_BYTES
    elif kind == GATE_DATA and not s.cfg.wait_response:
        rule = EC_GATE_NOWAIT
    else:
        held = s.g_held_since
        if not tset(held):
            held = s.g_held_since = now
            cnt(s, EC_REQUESTS_HELD, 1)
        if got > 0:
            if kind == GATE_DATA:
                quiet_s = est_path_rtt(s) / 2
                if quiet_s < RESPONSE_QUIET_MIN_S:
                    quiet_s = RESPONSE_QUIET_MIN_S
            else:
                quiet_s = 2 * est_rtt(s)
                if CLOSE_QUIET_MIN_S > quiet_s:
                    quiet_s = CLOSE_QUIET_MIN_S
            if kind == GATE_DATA and est_path_rtt(s) <= LAN_RTT_MAX_S:
                rule = EC_GATE_QUIET
            elif s.rcv_unacked:
                s.ack_due = 1
                quiet_at = now + quiet_s
                has_quiet = True
            else:
                a = s.last_resp_data_at
                if s.last_ack_at > a:
                    a = s.last_ack_at
                quiet_at = a + quiet_s
                has_quiet = True
                if now >= quiet_at:
                    rule = EC_GATE_QUIET
        if rule < 0:
            max_at = held + s.cfg.response_wait_max_s
            if now >= max_at:
                rule = EC_GATE_MAX_WAIT
            else:
                s.g_at = max_at if not has_quiet or quiet_at > max_at else quiet_at
                return False
    cnt(s, rule, 1)
    s.g_held_since = NAN
    s.g_at = NAN
    s.g_released_ack = ack
    s.g_has_released_ack = 1
    return True

# -- states (engine/core/states.py) ---------------------------------------------------------

cdef bint transition_ok(int old, int new) noexcept nogil:
    """states.TRANSITIONS"""
    if old == ST_CLOSED:
        return new == ST_SYN_SENT or new == ST_LINGER
    if old == ST_SYN_SENT:
        return new == ST_ESTABLISHED or new == ST_LINGER
    if old == ST_ESTABLISHED:
        return new == ST_FIN_WAIT or new == ST_CLOSED or new == ST_LINGER
    if old == ST_FIN_WAIT:
        return new == ST_LINGER
    if old == ST_LINGER:
        return new == ST_FINISHED
    return False


cdef void set_state(ESession* s, int new) noexcept nogil:
    """port of TcpSession._set_state: an illegal move (Python raises) flags an internal error."""
    if not transition_ok(s.state, new):
        s.error = 1
        return
    if s.state == ST_SYN_SENT and s.syn_bytes != NULL:
        e_free(s.syn_bytes)     # only retransmitted while SYN_SENT
        s.syn_bytes = NULL
        s.syn_len = 0
    s.state = new

# -- session: sequence helpers and output ---------------------------------------------------

cdef inline int64_t coff(ESession* s, uint32_t seq) noexcept nogil:
    """port of TcpSession._coff"""
    cdef int64_t nxt = s.snd_nxt
    cdef int64_t d = <uint32_t>(seq - s.base - <uint32_t>nxt)
    if d >= SEQ_HALF:
        d -= SEQ_SPACE
    return nxt + d


cdef inline uint32_t sseq(ESession* s, int64_t off) noexcept nogil:
    """port of TcpSession._seq"""
    return <uint32_t>(<int64_t>s.base + off)


cdef uint32_t ts_now(ESession* s) noexcept nogil:
    """port of TcpSession._ts_now"""
    cdef uint32_t clock = ts_clock(s.now)
    if not s.has_ts_val or seq_after(clock, s.ts_val):
        s.ts_val = clock
        s.has_ts_val = 1
    return s.ts_val


cdef int emit(ESession* s, EOut* out, uint8_t flags, uint32_t seq, uint32_t ack,
              const uint8_t* payload, size_t plen, ESeg* seg, int opt_mode) noexcept nogil:
    """port of TcpSession._emit (spec §3.10 rewrite rules)"""
    cdef dp_tcp_fields f
    cdef uint8_t opts[40]
    cdef size_t olen = 0
    cdef uint8_t* p
    cdef Py_ssize_t n
    memset(&f, 0, sizeof(f))
    if seg != NULL:
        olen = seg.opt_len
        if olen:
            memcpy(opts, seg_opts(seg), olen)
        if s.ts_ok and seg.has_tsval:
            set_timestamp(opts, olen, ts_now(s), s.ts_recent)
        if s.fake_wnd:
            f.window = FAKED_WINDOW
        else:
            f.window = seg.window if seg.window else FAKED_WINDOW
        f.ip_id = seg.ip_id
        f.ttl = seg.ttl
        f.tos = seg.tos
        f.df = seg.df
    else:
        if opt_mode == OPT_FAKED and s.ts_ok:
            opts[0] = 1
            opts[1] = 1
            opts[2] = 8
            opts[3] = 10
            put32(opts + 4, ts_now(s))
            put32(opts + 8, s.ts_recent)
            olen = 12
        f.window = FAKED_WINDOW
        f.ip_id = (s.ip_id + 1) & IP_ID_MASK
        f.ttl = FAKED_TTL
        f.tos = 0
        f.df = 1
    s.ip_id = f.ip_id
    if not flags & F_ACK:
        ack = 0
    memcpy(f.src, s.caddr, 16)
    memcpy(f.dst, s.taddr, 16)
    f.family = DP_FAMILY_IPV4
    f.sport = s.client_port
    f.dport = s.target_port
    f.seq = seq
    f.ack = ack
    f.flags = flags
    p = eout_room(out, 40 + 40 + plen)
    if p == NULL:
        s.error = 2
    else:
        n = dp_build_ipv4_tcp(p, out.cap - out.used, &f, opts, olen, NULL, 0, payload, plen)
        if n < 0:
            s.error = 1         # build_fields raised ValueError
        else:
            out.lens[out.n] = <uint32_t>n
            out.n += 1
            out.used += <size_t>n
    if flags & F_ACK and ack == s.rcv_nxt:
        s.ack_at = NAN
        s.ack_due = 0
        s.rcv_unacked = 0
        s.last_ack_at = s.now
    return 0


cdef void emit_ctl(ESession* s, EOut* out) noexcept nogil:
    """port of TcpSession._emit_ctl"""
    cdef uint32_t i
    cdef ECtl* c
    for i in range(s.ctl_n):
        c = s.ctl + i
        if c.with_fin:
            emit(s, out, c.flags, c.seq, c.ack, NULL, 0, s.fin_seg, OPT_SEG)
        else:
            emit(s, out, c.flags, c.seq, c.ack, NULL, 0, NULL,
                 OPT_FAKED if c.faked_opts else OPT_EMPTY)
        cnt(s, EC_SEND, 1)
        if c.flags & F_RST:
            cnt(s, EC_RESET, 1)
    s.ctl_n = 0
    e_free(s.ctl)
    s.ctl = NULL
    s.ctl_cap = 0

# -- session: ending and reconnecting -------------------------------------------------------

cdef inline bint is_obsolete(int oc) noexcept nogil:
    """events.OBSOLETE_OUTCOMES"""
    return (oc == OC_HANDSHAKE_TIMEOUT or oc == OC_RETRANSMIT_LIMIT or oc == OC_TIMEOUT
            or oc == OC_IDLE or oc == OC_FIN_WAIT_TIMEOUT)


cdef inline bint target_ended(int oc) noexcept nogil:
    """session._TARGET_ENDED"""
    return oc == OC_TARGET_CLOSED or oc == OC_TARGET_RESET or oc == OC_RECONNECT_LIMIT


cdef int sess_unsend(ESession* s) noexcept nogil:
    """port of TcpSession.unsend"""
    if s.lingering:
        return 0                # nothing was queued when it was cut (sess_linger)
    cdef int n = s.pend_n
    if s.fin_seg != NULL and not s.fin_sent:
        n += 1
    if s.rst_seg != NULL:
        n += 1
    return n


cdef void end(ESession* s, int outcome, double now, bint has_rst, int64_t rst_off,
              bint graceful) noexcept nogil:
    """port of TcpSession._end"""
    cdef int n
    if has_rst:
        ctl_push(s, F_RST | F_ACK, sseq(s, rst_off), s.rcv_nxt, 0, 0)
    n = sess_unsend(s)
    if n:
        cnt(s, EC_UNSEND_DROPPED, n)
    pend_clear(s)
    uq_clear(s)
    e_free(s.rst_seg)
    s.rst_seg = NULL
    if not s.fin_sent:
        e_free(s.fin_seg)
        s.fin_seg = NULL
    s.syn_at = NAN
    s.handshake_at = NAN
    s.rto_at = NAN
    s.ack_at = NAN
    s.persist_at = NAN
    s.g_at = NAN
    s.fin_wait_at = NAN
    s.gap_at = NAN
    s.syn_due = 0
    s.retx_due = 0
    s.probe_due = 0
    s.ack_due = 0
    s.need_third = 0
    s.graceful = graceful
    set_state(s, ST_LINGER)
    s.linger_at = now + s.cfg.linger_s
    s.outcome = outcome
    cnt(s, EC_ENDED_CLOSED + outcome, 1)
    if is_obsolete(outcome):
        cnt(s, EC_OBS_DEL, 1)
    cnt(s, EC_TW, 1)
    ev_push(s, EV_ENDED, outcome)


cdef bint may_reconnect(ESession* s, bint by_target) noexcept nogil:
    """port of TcpSession._may_reconnect"""
    if not s.cfg.reconnect:
        cnt(s, EC_RECONNECT_REFUSED_OFF, 1)
    elif by_target and s.reconnected and s.rcv_data == 0:
        cnt(s, EC_RECONNECT_REFUSED_UNANSWERED, 1)
    elif s.reconnects >= s.cfg.reconnect_budget:
        cnt(s, EC_RECONNECT_REFUSED_BUDGET, 1)
    else:
        return True
    return False


cdef void reconnect(ESession* s, double now, bint send_rst) noexcept nogil:
    """port of TcpSession._reconnect"""
    cnt(s, EC_RECONNECT, 1)
    s.reconnects += 1
    s.reconnected = 1
    s.has_resync = 1
    s.resync_end = s.snd_nxt
    s.resync_has_ack = s.g_has_last_data_ack
    s.resync_ack = s.g_last_data_ack
    if send_rst:
        ctl_push(s, F_RST | F_ACK, sseq(s, s.snd_nxt), s.rcv_nxt, 0, 0)
    uq_clear(s)
    set_state(s, ST_CLOSED)
    s.fake_syn = 1
    s.need_third = 0
    s.rto_at = NAN
    s.ack_at = NAN
    s.persist_at = NAN
    s.g_at = NAN
    s.retx_due = 0
    s.probe_due = 0
    s.ack_due = 0
    s.has_recover = 0
    s.dupacks = 0
    s.retries = 0
    s.backoff = 0
    s.persist_backoff = 0
    s.ts_ok = 0
    s.snd_wscale = 0
    gate_restart(s)
    s.gap_held = 0
    s.gap_at = NAN


cdef void skip_to_request(ESession* s, double now) noexcept nogil:
    """port of TcpSession._skip_to_request"""
    cdef int64_t end_ = s.resync_end, skipped = 0
    cdef uint32_t ack = s.resync_ack
    cdef bint has_ack = s.resync_has_ack
    cdef ESeg* g
    while s.pend_head != NULL:
        g = s.pend_head
        if g.end <= end_:
            pend_drop_head(s)
            continue
        if (not has_ack or g.ack != ack) and g.off >= end_:
            break
        skipped += g.end - (g.off if g.off > end_ else end_)
        end_ = g.end
        ack = g.ack
        has_ack = True
        pend_drop_head(s)
    if skipped:
        cnt(s, EC_RECONNECT_SKIPPED_BYTES, skipped)
    if s.pend_head != NULL:
        s.has_resync = 0
        return
    s.resync_end = end_
    s.resync_ack = ack
    s.resync_has_ack = has_ack
    if s.fin_seg != NULL or s.rst_seg != NULL:
        end(s, OC_TARGET_CLOSED, now, False, 0, False)


cdef void internal_error(ESession* s, double now) noexcept nogil:
    """port of TcpSession._internal_error"""
    s.error = 0
    drop(s, DR_INTERNAL_ERROR)
    if s.state < ST_LINGER:
        end(s, OC_ABORTED, now, False, 0, False)
        if s.state < ST_LINGER:
            s.state = ST_LINGER
            s.linger_at = now + s.cfg.linger_s
    s.error = 0

# -- session: the send path -----------------------------------------------------------------

cdef void send_syn(ESession* s, double now, EOut* out) noexcept nogil:
    """port of TcpSession._send_syn"""
    cdef dp_tcp_fields f
    cdef dp_tcp_options t
    cdef uint8_t opts[40]
    cdef size_t olen = 0
    cdef uint8_t buf[120]
    cdef Py_ssize_t n
    cdef ESeg* syn = s.syn_pkt
    cdef ESeg* head
    memset(&f, 0, sizeof(f))
    if syn != NULL and not s.fake_syn:
        olen = syn.opt_len
        if olen:
            memcpy(opts, seg_opts(syn), olen)
            dp_parse_tcp_options(opts, olen, &t)
        else:
            memset(&t, 0, sizeof(t))
        s.syn_ts = (t.present & DP_OPT_TS) != 0
        s.has_syn_wscale = (t.present & DP_OPT_WSCALE) != 0
        s.syn_wscale = t.wscale if t.wscale <= WSCALE_MAX else WSCALE_MAX
        s.rcv_mss = t.mss if (t.present & DP_OPT_MSS) and t.mss else DEFAULT_MSS
        if s.syn_ts:
            s.has_ts_val = 0
            s.now = now
            set_timestamp(opts, olen, ts_now(s), 0)
        s.iss = 0
        s.fake_wnd = 0
        s.ip_id = syn.ip_id
        f.seq = sseq(s, 0)
        f.flags = syn.pkt_flags & SYN_FLAGS
        f.window = syn.window
        f.ip_id = syn.ip_id
        f.ttl = syn.ttl
        f.tos = syn.tos
        f.df = syn.df
    else:
        # spec §3.7 step 4, §3.11 send_faked_syn
        head = s.pend_head
        s.fake_syn = 1
        s.iss = head.off - 1
        s.syn_ts = 0
        s.has_syn_wscale = 0
        s.has_ts_val = 0
        s.rcv_mss = s.cfg.mss
        s.fake_wnd = 1
        s.ip_id = (head.ip_id - 2) & IP_ID_MASK
        f.seq = sseq(s, s.iss)
        f.flags = F_SYN
        f.window = FAKED_WINDOW
        opts[0] = 2
        opts[1] = 4
        opts[2] = (s.cfg.mss >> 8) & 0xFF
        opts[3] = s.cfg.mss & 0xFF
        olen = 4
        f.ip_id = s.ip_id
        f.ttl = FAKED_TTL
        f.tos = 0
        f.df = 1
        if s.reconnects == 0:
            cnt(s, EC_FOR_NO_SYN, 1)
    s.snd_una = s.iss
    s.snd_nxt = s.iss + 1
    s.rcv_nxt = 0
    memcpy(f.src, s.caddr, 16)
    memcpy(f.dst, s.taddr, 16)
    f.family = DP_FAMILY_IPV4
    f.sport = s.client_port
    f.dport = s.target_port
    f.ack = 0
    n = dp_build_ipv4_tcp(buf, sizeof(buf), &f, opts, olen, NULL, 0, NULL, 0)
    if s.syn_pkt != NULL:
        e_free(s.syn_pkt)       # has_syn and syn_seq keep what is asked of it later
        s.syn_pkt = NULL
    e_free(s.syn_bytes)
    s.syn_bytes = NULL
    s.syn_len = 0
    if n < 0:
        s.error = 1
        return
    s.syn_bytes = <uint8_t*>e_alloc(<size_t>n)
    if s.syn_bytes == NULL:
        s.error = 2
        return
    memcpy(s.syn_bytes, buf, <size_t>n)
    s.syn_len = <uint32_t>n
    # spec §1.2, §6 item 1: the route goes out before the SYN.
    ev_push(s, EV_ROUTE, OC_NONE)
    if eout_append(out, buf, <size_t>n) < 0:
        s.error = 2
    cnt(s, EC_SEND, 1)
    cnt(s, EC_SEND_SYN, 1)
    set_state(s, ST_SYN_SENT)
    s.syn_sent_at = now
    s.syn_retx = 0
    s.syn_rto = SYN_RTO_INITIAL_S
    s.syn_at = now + SYN_RTO_INITIAL_S
    s.handshake_at = now + s.cfg.handshake_timeout_s


cdef void send_third(ESession* s, EOut* out) noexcept nogil:
    """port of TcpSession._send_third"""
    s.need_third = 0
    cdef ESeg* third = s.third_pkt
    cdef uint32_t seq = sseq(s, s.snd_nxt)
    if third != NULL and not s.fake_syn:
        emit(s, out, (third.pkt_flags & DATA_FLAGS) | F_ACK, seq, s.rcv_nxt, NULL, 0, third,
             OPT_SEG)
        e_free(third)           # sent once per session (has_third stays)
        s.third_pkt = NULL
    else:
        # spec §3.11 send_faked_third_handshake
        emit(s, out, F_ACK, seq, s.rcv_nxt, NULL, 0, NULL, OPT_FAKED)
    cnt(s, EC_SEND, 1)


cdef void retransmit(ESession* s, double now, EOut* out) noexcept nogil:
    """port of TcpSession._retransmit and RetransmitQueue.resend_head"""
    s.retx_due = 0
    cdef ESeg* g = uq_head(s)
    cdef int64_t off, k
    cdef const uint8_t* payload
    cdef size_t plen
    if g == NULL:
        return
    payload = g.payload
    plen = g.plen
    off = g.off
    if off < s.snd_una:     # partly acked: only the rest
        k = s.snd_una - off
        if <uint64_t>k >= plen:
            plen = 0
        else:
            payload += k
            plen -= <size_t>k
        off = s.snd_una
    g.retx = 1
    emit(s, out, g.flags, sseq(s, off), s.rcv_nxt, payload, plen, g, OPT_SEG)
    s.retx_answered = 0
    cnt(s, EC_RETRANSMIT, 1)
    s.rto_at = now + est_rto(s)


cdef inline void gap_hold(ESession* s, double now) noexcept nogil:
    if not s.gap_held:
        s.gap_held = 1
        s.gap_at = now + CLIENT_GAP_WAIT_S
        s.gap_fast = 0
        cnt(s, EC_CLIENT_GAP, 1)


cdef void send_fin(ESession* s, double now, EOut* out) noexcept nogil:
    """port of TcpSession._send_fin"""
    cdef ESeg* fin = s.fin_seg
    cdef uint32_t ack
    if fin == NULL or s.fin_sent:
        return
    if fin.off > s.snd_nxt:
        gap_hold(s, now)    # a hole in front of the client's FIN (spec §3.7 step 6d)
        return
    if s.snd_una != s.snd_nxt:
        return  # spec §3.13: the FIN waits until the target has acked all data
    ack = fin.ack
    if (not (s.g_has_last_data_ack and ack == s.g_last_data_ack)
            and not (s.g_has_released_ack and ack == s.g_released_ack)
            and not gate_open(s, ack, now, GATE_CLOSE)):
        return
    fin.off = s.snd_nxt
    fin.end = fin.off + 1
    emit(s, out, fin.flags, sseq(s, fin.off), s.rcv_nxt, NULL, 0, fin, OPT_SEG)
    fin.sent_at = now
    fin.retx = 0
    s.fin_unacked = 1
    s.snd_nxt = fin.end
    s.fin_sent = 1
    if not tset(s.rto_at):
        s.rto_at = now + est_rto(s)
    cnt(s, EC_SEND, 1)
    cnt(s, EC_FIN, 1)
    set_state(s, ST_FIN_WAIT)
    s.fin_wait_at = now + s.cfg.fin_wait_timeout_s


cdef void send_new(ESession* s, double now, EOut* out) noexcept nogil:
    """port of TcpSession._send_new: the pump"""
    cdef ESeg* g
    cdef ESeg* head
    cdef ESeg* rst
    cdef int64_t nxt, size, room, k
    cdef uint32_t ack
    cdef bint new_req
    if s.state == ST_ESTABLISHED:
        while s.pend_head != NULL:
            g = s.pend_head
            nxt = s.snd_nxt
            if g.end <= nxt:
                pend_drop_head(s)   # all of it was sent already
                cnt(s, EC_TOTAL_CONT_RETRANSMIT, 1)
                drop(s, DR_CLIENT_RETRANSMIT)
                continue
            if g.off > nxt:
                gap_hold(s, now)    # spec §3.7 step 6d
                break
            s.gap_held = 0
            s.gap_at = NAN
            if g.off < nxt:     # overlap: send only the new part
                k = nxt - g.off
                if <uint64_t>k >= g.plen:
                    g.payload += g.plen
                    g.plen = 0
                else:
                    g.payload += k
                    g.plen -= <uint32_t>k
                s.pend_held -= k
                g.off = nxt
                cnt(s, EC_CLIENT_OVERLAP, 1)
            ack = g.ack
            new_req = not s.g_has_last_data_ack or ack != s.g_last_data_ack
            if (new_req and not (s.g_has_released_ack and ack == s.g_released_ack)
                    and not gate_open(s, ack, now, GATE_DATA)):
                break
            size = g.end - g.off
            room = s.snd_una + s.snd_wnd - nxt
            if size > room:
                if nxt != s.snd_una:
                    break   # wait for acks to open the window
                if room <= 0:
                    # Zero window: stop; probe until it reopens (spec §3.8, QUIRK fixed).
                    if not tset(s.persist_at):
                        s.persist_at = now + est_persist_interval(s, s.persist_backoff)
                    break
                # Nothing in flight and a window smaller than the segment: send what fits.
                head = seg_piece(g, g.off, g.off + room, g.flags & ~F_PSH, <size_t>room)
                if head == NULL:
                    s.error = 2
                    break
                if <uint64_t>room >= g.plen:
                    g.payload += g.plen
                    g.plen = 0
                else:
                    g.payload += room
                    g.plen -= <uint32_t>room
                s.pend_held -= room
                g.off += room
                g = head
            else:
                pend_unlink_head(s)
            emit(s, out, g.flags, sseq(s, g.off), s.rcv_nxt, g.payload, g.plen, g, OPT_SEG)
            g.sent_at = now
            g.retx = 0
            uq_append(s, g)
            s.snd_nxt = g.end
            if not tset(s.rto_at):
                s.rto_at = now + est_rto(s)
            cnt(s, EC_SEND, 1)
            cnt(s, EC_SEND_CONTENT, 1)
            if new_req:
                cnt(s, EC_REQUESTS, 1)
                s.g_rcv_data_at_req = s.rcv_data
            s.g_last_data_ack = ack
            s.g_has_last_data_ack = 1
        if s.pend_head == NULL:
            send_fin(s, now, out)
    rst = s.rst_seg
    if rst != NULL and (s.pend_head == NULL or s.pend_head.off > s.snd_nxt):
        if s.state < ST_LINGER and (
                (s.g_has_last_data_ack and rst.ack == s.g_last_data_ack)
                or (s.g_has_released_ack and rst.ack == s.g_released_ack)
                or gate_open(s, rst.ack, now, GATE_CLOSE)):
            # spec §3.7 step 1: seq clamped to what the target expects.
            emit(s, out, rst.flags, sseq(s, s.snd_nxt), s.rcv_nxt, NULL, 0, rst, OPT_SEG)
            cnt(s, EC_SEND, 1)
            cnt(s, EC_RESET, 1)
            e_free(rst)
            s.rst_seg = NULL
            end(s, OC_CLIENT_RESET, now, False, 0, False)


cdef void packets_to_send(ESession* s, double now, EOut* out) noexcept nogil:
    """port of TcpSession._packets_to_send"""
    cdef int st
    cdef bint third_owed
    cdef uint32_t mark
    if s.ctl_n:
        emit_ctl(s, out)
    st = s.state
    if st == ST_ESTABLISHED or st == ST_FIN_WAIT:
        # The handshake's ACK goes out on its own only when no segment of this step carries
        # it: the first request (or the FIN) acks the SYN-ACK just as well.  A captured RST
        # waiting is no carrier: the target must see the connection made before the reset.
        third_owed = s.need_third
        if third_owed and s.rst_seg != NULL:
            send_third(s, out)
            third_owed = 0
        mark = out.n
        if s.retx_due:
            retransmit(s, now, out)
        if s.probe_due:
            # A zero-window probe: an old seq makes the target answer with its window.
            s.probe_due = 0
            emit(s, out, F_ACK, sseq(s, s.snd_una - 1), s.rcv_nxt, NULL, 0, NULL, OPT_FAKED)
            cnt(s, EC_WINDOW_PROBE, 1)
        send_new(s, now, out)
        if third_owed:
            if out.n != mark:
                s.need_third = 0
                if s.third_pkt != NULL:
                    e_free(s.third_pkt)  # carried, never sent (has_third stays)
                    s.third_pkt = NULL
            else:
                send_third(s, out)
        st = s.state
        if (st == ST_ESTABLISHED or st == ST_FIN_WAIT) and (
                s.ack_due or (tset(s.ack_at) and now >= s.ack_at)):
            emit(s, out, F_ACK, sseq(s, s.snd_nxt), s.rcv_nxt, NULL, 0, NULL, OPT_FAKED)
            cnt(s, EC_SEND, 1)
            cnt(s, EC_SEND_ACK, 1)
    elif st == ST_CLOSED:
        if s.has_resync:
            skip_to_request(s, now)
        if s.has_base and (s.pend_head != NULL or (s.has_syn and not s.fake_syn)):
            send_syn(s, now, out)
    elif st == ST_SYN_SENT:
        if s.syn_due:
            s.syn_due = 0
            s.syn_retx = 1
            if eout_append(out, s.syn_bytes, s.syn_len) < 0:
                s.error = 2
            cnt(s, EC_RETRANSMIT, 1)
            cnt(s, EC_SYN_RETRANSMIT, 1)
    if s.ctl_n:
        emit_ctl(s, out)

# -- session: client side -------------------------------------------------------------------

cdef void client_syn(ESession* s, const ECap* c) noexcept nogil:
    """port of TcpSession._client_syn"""
    if c.flags & F_ACK:
        drop(s, DR_SYN_CONFLICT)
        return
    if not s.has_base:
        s.base = c.seq
        s.has_base = 1
        s.syn_pkt = seg_new(c, 0, 0, c.flags, NULL, 0, 0, 0)
        s.has_syn = 1
        s.syn_seq = c.seq
        if s.syn_pkt == NULL:
            s.error = 2
        return
    if s.has_syn:
        drop(s, DR_SYN_RETRANSMIT if s.syn_seq == c.seq else DR_SYN_CONFLICT)
        return
    if sess_owns_syn(s, c.seq):
        # The SYN of a flow whose data was captured first: a real handshake after all.
        s.syn_pkt = seg_new(c, 0, 0, c.flags, NULL, 0, 0, 0)
        s.has_syn = 1
        s.syn_seq = c.seq
        if s.syn_pkt == NULL:
            s.error = 2
        return
    drop(s, DR_SYN_CONFLICT)


cdef void client_pure_ack(ESession* s, const ECap* c, int64_t off) noexcept nogil:
    """port of TcpSession._client_pure_ack"""
    if (off == 1 and s.has_syn and not s.g_has_last_data_ack
            and (not s.g_has_online_base or seq_after(s.g_online_base, c.ack))):
        s.g_online_base = c.ack
        s.g_has_online_base = 1
    if (s.has_syn and not s.has_third and off == 1 and not s.fake_syn
            and (s.state <= ST_SYN_SENT or s.need_third)):
        s.third_pkt = seg_new(c, off, off, c.flags, NULL, 0, 0, 0)
        s.has_third = 1
        if s.third_pkt == NULL:
            s.error = 2
        return
    drop(s, DR_PURE_ACK)


cdef void pend_insert(ESession* s, ESeg* g) noexcept nogil:
    """The insertion loop of TcpSession._store_data (offset order, scanning from the tail)."""
    cdef ESeg* node
    cdef ESeg* prev
    if s.pend_tail == NULL or s.pend_tail.off <= g.off:
        g.prev = s.pend_tail
        g.next = NULL
        if s.pend_tail != NULL:
            s.pend_tail.next = g
        else:
            s.pend_head = g
        s.pend_tail = g
        s.pend_n += 1
        s.pend_held += g.end - g.off
        return
    # Reordered capture: insert in offset order (rare; scan from the tail).
    node = s.pend_tail
    while node.prev != NULL and node.prev.off > g.off:
        node = node.prev
    prev = node.prev
    if prev != NULL and prev.off == g.off and prev.end >= g.end:
        cnt(s, EC_TOTAL_CONT_RETRANSMIT, 1)
        drop(s, DR_CLIENT_RETRANSMIT)
        e_free(g)
        return
    g.prev = prev
    g.next = node
    node.prev = g
    if prev != NULL:
        prev.next = g
    else:
        s.pend_head = g
    s.pend_n += 1
    s.pend_held += g.end - g.off


@cython.cdivision(True)
cdef void store_data(ESession* s, const ECap* c, int64_t off, uint32_t dlen) noexcept nogil:
    """port of TcpSession._store_data (with packet.split_mtu for GRO/TSO aggregates)"""
    cdef int64_t end_ = off + dlen
    cdef size_t src_len = c.payload_bytes
    cdef bint truncated
    cdef uint8_t flags = c.flags & DATA_FLAGS
    cdef int64_t mtu = s.cfg.mtu, hdrs, chunk, start, last_start, plen
    cdef ESeg* g
    cdef ESeg* first = NULL
    cdef ESeg* last = NULL
    cdef uint8_t middle, f
    if end_ <= s.snd_nxt:
        cnt(s, EC_TOTAL_CONT_RETRANSMIT, 1)
        drop(s, DR_CLIENT_RETRANSMIT)
        return
    if src_len > dlen:
        src_len = dlen
    truncated = c.payload_bytes < dlen
    if truncated:
        # A truncated capture (snaplen): zeros keep the stream's shape.
        cnt(s, EC_CLIENT_TRUNCATED, 1)
    if 40 + c.opt_len + dlen > mtu:     # spec §3.4: GRO/TSO aggregates (split_mtu)
        # with_payload() (the padded copy) has no IP options; the captured packet does.
        hdrs = 40 + ((c.opt_len + 3) & ~3) + (0 if truncated else (c.ip_opts_len + 3) & ~3)
        if hdrs + dlen <= mtu:
            first = seg_new(c, off, end_, flags, c.payload, src_len, 0, dlen)
            if first == NULL:
                s.error = 2
                return
        else:
            chunk = mtu - hdrs
            if chunk <= 0:
                s.error = 1     # split_mtu: ValueError
                return
            middle = c.flags & ~(F_FIN | F_PSH | F_SYN)
            last_start = ((dlen - 1) // chunk) * chunk
            start = 0
            while start < dlen:
                f = middle
                if start == 0:
                    f |= c.flags & F_SYN
                if start == last_start:
                    f |= c.flags & (F_FIN | F_PSH)
                plen = dlen - start if dlen - start < chunk else chunk
                g = seg_new(c, off + start, off + start + plen, f & DATA_FLAGS,
                            c.payload, src_len, <size_t>start, <size_t>plen)
                if g == NULL:
                    s.error = 2
                    break
                if last == NULL:
                    first = g
                else:
                    last.next = g
                last = g
                start += chunk
    else:
        first = seg_new(c, off, end_, flags, c.payload, src_len, 0, dlen)
        if first == NULL:
            s.error = 2
            return
    if end_ > s.cap_end:
        # Bytes of the client's stream, gaps included: the fidelity denominator.
        cnt(s, EC_CLIENT_BYTES_CAPTURED, end_ - s.cap_end)
        s.cap_end = end_
        s.cap_ack = c.ack
        s.has_cap_ack = 1
    while first != NULL:
        g = first
        first = g.next
        g.next = NULL
        pend_insert(s, g)


cdef void receive_client(ESession* s, const ECap* c, double now) noexcept nogil:
    """port of TcpSession._receive_client"""
    cdef uint8_t flags
    cdef uint32_t dlen
    cdef int64_t off, e
    cdef ESeg* fin
    if s.state >= ST_LINGER:
        drop(s, DR_SESSION_CLOSED)
        return
    flags = c.flags
    if flags & F_SYN:
        client_syn(s, c)
        return
    dlen = c.data_len
    if not s.has_base:
        # spec §3.6: only a packet with payload starts a session without a SYN.
        if not dlen:
            drop(s, DR_NO_SESSION)
            return
        if not s.cfg.fake_handshake:
            drop(s, DR_NO_SYN)
            return
        s.base = c.seq - 1
        s.has_base = 1
    off = coff(s, c.seq)
    if off > s.cap_end + CLIENT_SEQ_JUMP_MAX_BYTES:
        drop(s, DR_CLIENT_OUT_OF_WINDOW)
        return
    if flags & F_RST:
        if s.rst_seg != NULL:
            drop(s, DR_CLIENT_RETRANSMIT)
            return
        s.rst_seg = seg_new(c, off, off, flags & (F_RST | F_ACK), NULL, 0, 0, 0)
        if s.rst_seg == NULL:
            s.error = 2
        return
    if not dlen and not flags & F_FIN:
        client_pure_ack(s, c, off)
        return
    if off <= s.iss:
        drop(s, DR_OLD_SEGMENT)
        return
    fin = s.fin_seg
    if fin != NULL and (flags & F_FIN or off + dlen > fin.off):
        drop(s, DR_CLIENT_RETRANSMIT if flags & F_FIN else DR_AFTER_FIN)
        return
    if dlen:
        store_data(s, c, off, dlen)
    if flags & F_FIN:
        e = off + dlen
        s.fin_seg = seg_new(c, e, e + 1, F_FIN | (flags & F_ACK), NULL, 0, 0, 0)
        if s.fin_seg == NULL:
            s.error = 2

# -- session: responses ---------------------------------------------------------------------

cdef void queue_rst_for(ESession* s, const dp_packet* p) noexcept nogil:
    """port of TcpSession._queue_rst_for"""
    cdef uint32_t e = p.seq + p.data_len + (1 if p.flags & F_SYN else 0) + (
        1 if p.flags & F_FIN else 0)
    cdef uint32_t seq = p.ack if p.flags & F_ACK else 0
    ctl_push(s, F_RST | F_ACK, seq, e, 0, 0)


cdef void establish(ESession* s, const dp_packet* p, double now) noexcept nogil:
    """port of TcpSession._establish"""
    cdef bint scaling
    s.rcv_nxt = p.seq + 1
    s.rcv_data = 0
    s.rcv_unacked = 0
    s.g_rcv_data_at_req = 0
    s.ts_ok = s.syn_ts and (p.opts.present & DP_OPT_TS) != 0
    if s.ts_ok:
        s.ts_recent = p.opts.ts_val
    # RFC 7323 §2.2: both SYNs must carry the option for scaling to be in effect.
    scaling = s.has_syn_wscale and (p.opts.present & DP_OPT_WSCALE) != 0
    s.snd_wscale = p.opts.wscale if scaling else 0
    s.rcv_wnd_max = (<int64_t>WINDOW_MAX_BYTES) << (s.syn_wscale if scaling else 0)
    s.snd_wnd = p.window
    s.snd_una = s.snd_nxt
    if not s.syn_retx:
        est_sample(s, now - s.syn_sent_at)
    s.syn_at = NAN
    s.handshake_at = NAN
    s.syn_due = 0
    set_state(s, ST_ESTABLISHED)
    cnt(s, EC_CONNS, 1)
    s.need_third = 1
    s.last_resp_at = now
    s.last_resp_data_at = now


cdef void end_simple(ESession* s, int outcome, double now) noexcept nogil:
    end(s, outcome, now, False, 0, False)


cdef void handshake_response(ESession* s, const dp_packet* p, double now) noexcept nogil:
    """port of TcpSession._handshake_response"""
    cdef uint8_t flags = p.flags
    cdef bint ack_ok
    if s.state == ST_SYN_SENT:
        ack_ok = (flags & F_ACK) != 0 and coff(s, p.ack) == s.snd_nxt
        if flags & F_SYN and ack_ok and not flags & F_RST:
            establish(s, p, now)
            return
        if flags & F_RST:
            if ack_ok or not flags & F_ACK:
                end_simple(s, OC_REFUSED, now)
            else:
                drop(s, DR_UNEXPECTED_RESPONSE)
            return
    elif flags & F_RST:
        drop(s, DR_UNEXPECTED_RESPONSE)
        return
    queue_rst_for(s, p)
    drop(s, DR_UNEXPECTED_RESPONSE)


cdef void acked(ESession* s, int64_t a, double now) noexcept nogil:
    """port of TcpSession._acked"""
    cdef int64_t una = s.snd_una, n
    cdef double sample = 0.0
    cdef bint has_sample = uq_take_acked(s, a, now, &sample)
    cdef ESeg* fin = s.fin_seg
    n = a - una
    if s.fin_sent and fin != NULL and una <= fin.off < a:
        n -= 1
    if n > 0:
        cnt(s, EC_CLIENT_BYTES_ACKED, n)
    s.snd_una = a
    s.retries = 0
    s.backoff = 0
    if has_sample:
        est_sample(s, sample)
    if s.has_recover:
        if a < s.recover:
            s.retx_due = 1  # NewReno partial ack: the next hole (RFC 6582)
        else:
            s.has_recover = 0
    s.rto_at = now + est_rto(s) if a < s.snd_nxt else NAN


cdef bint process_ack(ESession* s, const dp_packet* p, double now) noexcept nogil:
    """port of TcpSession._process_ack; False if the segment is to be dropped."""
    cdef int64_t a = coff(s, p.ack)
    cdef int64_t una = s.snd_una, nxt = s.snd_nxt
    cdef int64_t wnd
    if a > nxt:
        s.ack_due = 1
        drop(s, DR_BAD_ACK)
        return False
    wnd = (<int64_t>p.window) << s.snd_wscale
    if a > una:
        acked(s, a, now)
        s.snd_wnd = wnd
        s.dupacks = 0
    elif a == una:
        if wnd != s.snd_wnd:
            s.snd_wnd = wnd     # a window update, not a duplicate
        elif not p.data_len and not p.flags & F_FIN and una != nxt:
            s.dupacks += 1
            if s.dupacks == DUP_ACK_THRESHOLD and not s.has_recover:
                # RFC 5681 §3.2 fast retransmit (once per recovery episode)
                s.retx_due = 1
                s.recover = nxt
                s.has_recover = 1
                cnt(s, EC_FAST_RETRANSMIT, 1)
    if s.snd_wnd > 0 and tset(s.persist_at):
        s.persist_at = NAN
        s.persist_backoff = 0
    return True


cdef void process_data(ESession* s, uint32_t seq, uint32_t dlen, double now) noexcept nogil:
    """port of TcpSession._process_data"""
    cdef uint32_t e = seq + dlen
    cdef uint32_t d = e - s.rcv_nxt
    if 0 < d < SEQ_HALF:
        s.rcv_nxt = e
        s.rcv_data += d
        s.rcv_unacked += d
        s.last_resp_data_at = now
        if s.rcv_unacked >= 2 * s.rcv_mss:
            s.ack_due = 1
        elif not tset(s.ack_at):
            s.ack_at = now + DELAYED_ACK_S
    else:
        s.ack_due = 1
        cnt(s, EC_RESP_RETRANSMITTED, 1)


cdef void target_fin(ESession* s, const dp_packet* p, double now) noexcept nogil:
    """port of TcpSession._target_fin"""
    cdef uint32_t fin_end = p.seq + p.data_len + 1
    cdef ESeg* fin
    s.rcv_nxt = fin_end
    cnt(s, EC_RESP_FIN, 1)
    if s.state == ST_FIN_WAIT:
        ctl_push(s, F_ACK, sseq(s, s.snd_nxt), fin_end, 1, 0)
        end(s, OC_CLOSED, now, False, 0, True)
    elif s.pend_head != NULL and may_reconnect(s, True):
        ctl_push(s, F_ACK, sseq(s, s.snd_nxt), fin_end, 1, 0)
        reconnect(s, now, True)
    elif s.fin_seg != NULL:
        fin = s.fin_seg
        fin.off = s.snd_nxt
        fin.end = fin.off + 1
        ctl_push(s, fin.flags | F_ACK, sseq(s, fin.off), fin_end, 0, 1)
        s.snd_nxt = fin.end
        s.fin_sent = 1
        cnt(s, EC_FIN, 1)
        end(s, OC_CLOSED, now, False, 0, True)
    else:
        ctl_push(s, F_ACK, sseq(s, s.snd_nxt), fin_end, 1, 0)
        end(s, OC_TARGET_CLOSED, now, True, s.snd_nxt, False)


cdef void target_reset(ESession* s, double now) noexcept nogil:
    """port of TcpSession._target_reset"""
    if s.pend_head != NULL and may_reconnect(s, True):
        reconnect(s, now, False)
    else:
        end_simple(s, OC_TARGET_RESET, now)


cdef void linger_response(ESession* s, const dp_packet* p) noexcept nogil:
    """port of TcpSession._linger_response"""
    cdef uint8_t flags = p.flags
    if flags & F_RST:
        drop(s, DR_STRAY_RESPONSE)
        return
    if s.graceful and not p.data_len and not flags & F_SYN:
        if flags & F_FIN:
            ctl_push(s, F_ACK, sseq(s, s.snd_nxt), s.rcv_nxt, 1, 0)
        return
    queue_rst_for(s, p)
    drop(s, DR_STRAY_RESPONSE)


cdef void receive_response(ESession* s, const dp_packet* p, const uint8_t* buf,
                           double now) noexcept nogil:
    """port of TcpSession._receive_response (buf: see sess_receive_response_buf)"""
    cdef int st = s.state
    cdef uint8_t flags = p.flags
    cdef uint32_t tsv = 0, ahead, d
    cdef bint has_tsv
    cdef const uint8_t* opts
    cnt(s, EC_RESP, 1)
    if flags & F_RST:
        cnt(s, EC_RESP_RST, 1)
    if st >= ST_LINGER:
        linger_response(s, p)
        return
    if st < ST_ESTABLISHED:
        handshake_response(s, p, now)
        return
    s.last_resp_at = now
    if flags & F_RST:
        target_reset(s, now)
        return
    if flags & F_SYN:
        s.ack_due = 1   # the SYN-ACK again: our third packet was lost
        return
    if s.ts_ok and p.tcp_header_bytes > 20:
        if buf != NULL:     # tcpseq.tsval on the record's own option bytes
            opts = buf + p.offset + p.ip_header_bytes + 20
            has_tsv = opt_tsval(opts, p.tcp_header_bytes - 20, &tsv)
        else:               # the parsed options (the last TS option, where tsval's fast
            has_tsv = (p.opts.present & DP_OPT_TS) != 0     # path reads the first)
            tsv = p.opts.ts_val
        if has_tsv and not seq_after(s.ts_recent, tsv):
            s.ts_recent = tsv
    if flags & F_ACK and not process_ack(s, p, now):
        return
    if not p.data_len and not flags & F_FIN:
        ahead = p.seq - s.rcv_nxt
        if 0 < ahead and ahead <= s.rcv_wnd_max:
            # A pure ACK beyond what we received (spec §3.8 step 2).
            process_data(s, s.rcv_nxt, ahead, now)
            s.ack_due = 1
    if p.data_len or flags & F_FIN:
        d = p.seq - s.rcv_nxt
        if s.rcv_wnd_max < d and d < SEQ_HALF:
            # Beyond any window we ever offered (RFC 9293 §3.10.7.4): ACK and drop.
            s.ack_due = 1
            drop(s, DR_OUT_OF_WINDOW)
            return
    if p.data_len:
        cnt(s, EC_C_RESP, 1)
        if not s.retx_answered:
            s.retx_answered = 1
            cnt(s, EC_RECV_PACKS_AFTER_RETRANSMISSION, 1)
        process_data(s, p.seq, p.data_len, now)
    if flags & F_FIN:
        target_fin(s, p, now)

# -- session: timers ------------------------------------------------------------------------

cdef inline bint busy(ESession* s) noexcept nogil:
    """port of TcpSession._busy"""
    return (s.pend_head != NULL or uq_any(s) or s.rst_seg != NULL
            or (s.fin_seg != NULL and not s.fin_sent))


cdef void abandon_gap(ESession* s, double now) noexcept nogil:
    """port of TcpSession._abandon_gap"""
    cdef int64_t nxt
    cdef ESeg* fin
    if s.state != ST_ESTABLISHED:
        return
    nxt = s.snd_nxt
    fin = s.fin_seg
    if s.pend_head != NULL:
        if s.pend_head.off <= nxt:
            return
    elif fin == NULL or s.fin_sent or fin.off <= nxt:
        return
    if uq_any(s):
        s.gap_at = now + est_rto(s)
        return
    cnt(s, EC_CLIENT_GAP_ABANDONED, 1)
    s.gap_held = 0
    if s.pend_head == NULL:
        fin.off = nxt
        fin.end = nxt + 1
        return
    if not may_reconnect(s, False):
        end(s, OC_RECONNECT_LIMIT, now, True, nxt, False)
        return
    reconnect(s, now, True)


cdef void handle_timer(ESession* s, double now) noexcept nogil:
    """port of TcpSession._handle_timer"""
    cdef int st = s.state
    cdef int outcome
    cdef bint has_conn
    if st >= ST_LINGER:
        if tset(s.linger_at) and now >= s.linger_at:
            s.linger_at = NAN
            set_state(s, ST_FINISHED)
        return
    if tset(s.handshake_at) and now >= s.handshake_at:
        end_simple(s, OC_HANDSHAKE_TIMEOUT, now)
        return
    if tset(s.syn_at) and now >= s.syn_at:
        s.syn_due = 1
        s.syn_rto *= 2
        s.syn_at = now + s.syn_rto
    if tset(s.rto_at) and now >= s.rto_at:
        if not uq_any(s):
            s.rto_at = NAN
        else:
            s.retries += 1
            if s.retries > RETRIES_MAX:
                if not s.route_down:
                    end(s, OC_RETRANSMIT_LIMIT, now, True, s.snd_una, False)
                    return
                s.retries = RETRIES_MAX
            s.backoff = s.backoff + 1 if s.backoff + 1 < RETRIES_MAX else RETRIES_MAX
            s.retx_due = 1
            s.dupacks = 0
            s.recover = s.snd_nxt
            s.has_recover = 1
            s.rto_at = now + est_rto(s)
            cnt(s, EC_RTO, 1)
    if tset(s.persist_at) and now >= s.persist_at:
        s.probe_due = 1
        s.persist_backoff += 1
        s.persist_at = now + est_persist_interval(s, s.persist_backoff)
    if tset(s.ack_at) and now >= s.ack_at:
        s.ack_at = NAN
        s.ack_due = 1
    if tset(s.fin_wait_at) and now >= s.fin_wait_at:
        end(s, OC_FIN_WAIT_TIMEOUT, now, True, s.snd_nxt, False)
        return
    if tset(s.gap_at) and now >= s.gap_at:
        s.gap_at = NAN
        abandon_gap(s, now)
        if s.state >= ST_LINGER:
            return
    if now >= s.last_resp_at + (s.cfg.session_timeout_s if busy(s)
                                else s.cfg.keepalive_timeout_s):
        # spec §3.9 sess_obso: -t while work is pending, -k when idle.
        outcome = OC_TIMEOUT if busy(s) else OC_IDLE
        has_conn = st == ST_ESTABLISHED or st == ST_FIN_WAIT
        end(s, outcome, now, has_conn, s.snd_una, False)

# -- the interface (engine.pyx's table calls these) -----------------------------------------

cdef ESession* sess_new(const ECfg* cfg, uint64_t* counters, uint32_t cip, uint16_t cport,
                        uint32_t tip, uint16_t tport, uint32_t oip, uint16_t oport,
                        double now) noexcept nogil:
    """port of TcpSession.__init__; NULL: out of memory"""
    cdef ESession* s = <ESession*>e_alloc(sizeof(ESession))
    if s == NULL:
        return NULL
    memset(s, 0, sizeof(ESession))
    s.cfg = cfg
    s.counters = counters
    s.client_ip = cip
    s.client_port = cport
    s.target_ip = tip
    s.target_port = tport
    s.online_ip = oip
    s.online_port = oport
    s.caddr[10] = 0xFF
    s.caddr[11] = 0xFF
    put32(s.caddr + 12, cip)
    s.taddr[10] = 0xFF
    s.taddr[11] = 0xFF
    put32(s.taddr + 12, tip)
    s.state = ST_CLOSED
    s.outcome = OC_NONE
    s.created_at = now
    s.cap_end = 1
    s.syn_rto = SYN_RTO_INITIAL_S
    s.syn_at = NAN
    s.handshake_at = NAN
    s.gap_at = NAN
    s.rcv_mss = DEFAULT_MSS
    s.rcv_wnd_max = WINDOW_MAX_BYTES
    s.ack_at = NAN
    s.last_resp_at = now
    s.last_resp_data_at = now
    s.last_ack_at = now
    s.now = now
    s.srtt = NAN
    s.rtt_min = NAN
    s.rto_at = NAN
    s.persist_at = NAN
    s.retx_answered = 1
    s.g_held_since = NAN
    s.g_at = NAN
    s.fin_wait_at = NAN
    s.linger_at = NAN
    return s


cdef void sess_free(ESession* s) noexcept nogil:
    if s == NULL:
        return
    if s.lingering:             # cut by sess_linger: its queues are gone with the tail
        e_free(s.ctl)
        e_free(s.events)
        e_free(s)
        return
    pend_clear(s)
    uq_clear(s)
    e_free(s.syn_pkt)
    e_free(s.third_pkt)
    e_free(s.fin_seg)
    e_free(s.rst_seg)
    e_free(s.syn_bytes)
    e_free(s.ctl)
    e_free(s.events)
    e_free(s)


cdef ESession* sess_linger(ESession* s) noexcept nogil:
    """An ended session cut down to what it reads while it lingers: its captured packets
    (SYN, handshake ACK, FIN, the SYN as sent) are freed and the struct is shrunk to the
    fields before and including linger_tail.  Only once nothing is queued (no control
    packet, event, segment or unsent count): the table calls it after a drain.  Returns the
    cut session (a new block: s is freed), or s itself, whole, when it cannot be cut.

    What a lingering session's code reads, all in the kept fields: receive_client (state);
    receive_response and linger_response (counters, state, graceful, snd_nxt, base, rcv_nxt,
    ctl); handle_timer, set_state to FINISHED and sess_timer (state, linger_at);
    packets_to_send, emit_ctl and emit without a segment (ctl, ts_ok, ts_val, ts_recent, now,
    ip_id, the addresses and ports, rcv_nxt and the ack fields it resets); sess_owns_syn
    (has_syn, syn_seq, has_base, base, state); sess_is_later_data, sess_may_continue,
    may_reconnect and sess_continue_from (outcome, cap_end, cap_ack, restart_refused, cfg,
    reconnected, rcv_data, reconnects, linger_at); sess_next_event (the event fields);
    sess_unsend and sess_held_bytes (0: lingering); sess_expedite_gap (False: lingering,
    end() cleared gap_at); sess_end_seq, sess_ts_last; the table's identity fields (its
    shed_half_open asks sess_half_open, False once ended, before it reads created_at);
    sess_free."""
    cdef ESession* r
    cdef size_t keep = <size_t>(<char*>&s.linger_tail - <char*>s) + 1
    if (s.lingering or s.state != ST_LINGER or s.error or s.ctl_n or s.ev_n
            or s.pend_head != NULL or s.unacked_head != NULL or sess_unsend(s)
            or s.pend_held or tset(s.gap_at)):
        return s
    e_free(s.syn_pkt)
    e_free(s.third_pkt)
    e_free(s.fin_seg)
    e_free(s.rst_seg)
    e_free(s.syn_bytes)
    s.syn_pkt = s.third_pkt = s.fin_seg = s.rst_seg = NULL
    s.syn_bytes = NULL
    # A new block, not a realloc: the whole one goes back whole, for the next new session
    # (a shrink in place would leave holes no session fits in).
    r = <ESession*>e_alloc((keep + 7) & ~(<size_t>7))
    if r == NULL:
        return s
    memcpy(r, s, keep)
    r.lingering = 1
    e_free(s)
    return r


# -- a lingering session frozen: what lingering reads, in a record of its own ---------------
#
# Once a lingering session has nothing queued, the table keeps it as an ELinger (sess_freeze)
# and frees the session: the record answers what lingering asks most (the timer, a late
# client packet or a stray RST, the tuple's release), and sess_thaw gives back the cut
# session (what sess_linger keeps) for the rest, which the session's own code then handles.
# Left out, as nothing a lingering session does reads them: now (packets_to_send sets it
# first), the ACK timer fields emit() writes (ack_at, last_ack_at, rcv_unacked), rcv_data
# but for whether it is 0 (may_reconnect), and the queues (empty).

cdef enum:
    LB_HAS_BASE = 1
    LB_HAS_CAP_ACK = 2
    LB_HAS_SYN = 4
    LB_HAS_TS_VAL = 8
    LB_TS_OK = 16
    LB_RESTART_REFUSED = 32
    LB_RECONNECTED = 64
    LB_GRACEFUL = 128
    LB_ROUTE_DOWN = 256
    LB_RCV_DATA = 512           # rcv_data != 0


ctypedef struct ELinger:        # 64 bytes: one slot of the table's slab (table.pxi TSlab)
    double linger_at
    uint32_t client_ip
    uint32_t target_ip
    uint32_t base
    uint32_t cap_ack
    uint32_t syn_seq
    uint32_t rcv_nxt
    uint32_t ts_val
    uint32_t ts_recent
    int32_t snd_nxt             # the session's int64 offsets; one that does not fit
    int32_t snd_una             # keeps the session unfrozen (sess_freezable)
    int32_t cap_end
    uint16_t client_port
    uint16_t target_port
    uint16_t ip_id
    int16_t reconnects
    int8_t outcome
    uint8_t state
    uint16_t bits


cdef inline bint lr_fits32(int64_t v) noexcept nogil:
    return -2147483648 <= v <= 2147483647


cdef bint sess_freezable(ESession* s) noexcept nogil:
    """A lingering session with nothing queued (the conditions of sess_linger, and no ACK
    owed) whose numbers fit a record's fields."""
    if (s.state != ST_LINGER or s.error or s.ctl_n or s.ev_n or s.ack_due
            or s.outcome < -128 or s.outcome > 127 or s.reconnects < 0
            or s.reconnects > 32767 or not lr_fits32(s.snd_nxt) or not lr_fits32(s.snd_una)
            or not lr_fits32(s.cap_end)):
        return False
    if not s.lingering and (s.pend_head != NULL or s.unacked_head != NULL or sess_unsend(s)
                            or s.pend_held or tset(s.gap_at)):
        return False
    return True


cdef void sess_freeze(ESession* s, ELinger* r) noexcept nogil:
    """The record of a session sess_freezable says can be frozen, written to *r."""
    cdef uint16_t bits = 0
    r.linger_at = s.linger_at
    r.snd_nxt = <int32_t>s.snd_nxt
    r.snd_una = <int32_t>s.snd_una
    r.cap_end = <int32_t>s.cap_end
    r.reconnects = <int16_t>s.reconnects
    r.client_ip = s.client_ip
    r.target_ip = s.target_ip
    r.base = s.base
    r.cap_ack = s.cap_ack
    r.syn_seq = s.syn_seq
    r.rcv_nxt = s.rcv_nxt
    r.ts_val = s.ts_val
    r.ts_recent = s.ts_recent
    r.client_port = s.client_port
    r.target_port = s.target_port
    r.ip_id = s.ip_id
    r.state = <uint8_t>s.state
    r.outcome = <int8_t>s.outcome
    if s.has_base:
        bits |= LB_HAS_BASE
    if s.has_cap_ack:
        bits |= LB_HAS_CAP_ACK
    if s.has_syn:
        bits |= LB_HAS_SYN
    if s.has_ts_val:
        bits |= LB_HAS_TS_VAL
    if s.ts_ok:
        bits |= LB_TS_OK
    if s.restart_refused:
        bits |= LB_RESTART_REFUSED
    if s.reconnected:
        bits |= LB_RECONNECTED
    if s.graceful:
        bits |= LB_GRACEFUL
    if s.route_down:
        bits |= LB_ROUTE_DOWN
    if s.rcv_data:
        bits |= LB_RCV_DATA
    r.bits = bits


cdef ESession* sess_thaw(const ELinger* r, const ECfg* cfg, uint64_t* counters) noexcept nogil:
    """The cut session (sess_linger's block) a record was made from; NULL: no memory."""
    cdef ESession tmp
    cdef size_t keep = <size_t>(<char*>&tmp.linger_tail - <char*>&tmp) + 1
    cdef ESession* s = <ESession*>e_alloc((keep + 7) & ~(<size_t>7))
    cdef uint16_t bits = r.bits
    if s == NULL:
        return NULL
    memset(s, 0, keep)
    s.cfg = cfg
    s.counters = counters
    s.caddr[10] = 0xFF
    s.caddr[11] = 0xFF
    put32(s.caddr + 12, r.client_ip)
    s.taddr[10] = 0xFF
    s.taddr[11] = 0xFF
    put32(s.taddr + 12, r.target_ip)
    s.ack_at = NAN
    s.linger_at = r.linger_at
    s.snd_nxt = r.snd_nxt
    s.snd_una = r.snd_una
    s.cap_end = r.cap_end
    s.reconnects = r.reconnects
    s.rcv_data = 1 if bits & LB_RCV_DATA else 0
    s.client_ip = r.client_ip
    s.target_ip = r.target_ip
    s.base = r.base
    s.cap_ack = r.cap_ack
    s.syn_seq = r.syn_seq
    s.rcv_nxt = r.rcv_nxt
    s.ts_val = r.ts_val
    s.ts_recent = r.ts_recent
    s.client_port = r.client_port
    s.target_port = r.target_port
    s.ip_id = r.ip_id
    s.state = r.state
    s.outcome = r.outcome
    s.has_base = 1 if bits & LB_HAS_BASE else 0
    s.has_cap_ack = 1 if bits & LB_HAS_CAP_ACK else 0
    s.has_syn = 1 if bits & LB_HAS_SYN else 0
    s.has_ts_val = 1 if bits & LB_HAS_TS_VAL else 0
    s.ts_ok = 1 if bits & LB_TS_OK else 0
    s.restart_refused = 1 if bits & LB_RESTART_REFUSED else 0
    s.reconnected = 1 if bits & LB_RECONNECTED else 0
    s.graceful = 1 if bits & LB_GRACEFUL else 0
    s.route_down = 1 if bits & LB_ROUTE_DOWN else 0
    s.lingering = 1
    return s


cdef inline bint lr_owns_syn(const ELinger* r, uint32_t seq) noexcept nogil:
    """sess_owns_syn of the record's session"""
    if r.bits & LB_HAS_SYN:
        return r.syn_seq == seq
    return (r.bits & LB_HAS_BASE) != 0 and r.base == seq and r.state == ST_CLOSED


cdef inline bint lr_is_later_data(const ELinger* r, const dp_packet* p) noexcept nogil:
    """sess_is_later_data of the record's session (coff as the session computes it)"""
    cdef int64_t nxt = r.snd_nxt, d
    if r.state != ST_LINGER or not p.data_len or not r.bits & LB_HAS_BASE:
        return False
    d = <uint32_t>(p.seq - r.base - <uint32_t>nxt)
    if d >= SEQ_HALF:
        d -= SEQ_SPACE
    return nxt + d >= r.cap_end


cdef inline void lr_handle_timer(ELinger* r, double now) noexcept nogil:
    """sess_handle_timer of a lingering session"""
    if tset(r.linger_at) and now >= r.linger_at:
        r.linger_at = NAN
        r.state = ST_FINISHED


cdef inline bint lr_end_seq(const ELinger* r, uint32_t* out) noexcept nogil:
    """sess_end_seq"""
    if not r.bits & LB_HAS_BASE:
        return False
    out[0] = <uint32_t>(<int64_t>r.base + (r.snd_nxt if r.snd_nxt > r.snd_una else r.snd_una))
    return True


cdef inline bint lr_ts_last(const ELinger* r, uint32_t* out) noexcept nogil:
    """sess_ts_last"""
    if not r.bits & LB_TS_OK or not r.bits & LB_HAS_TS_VAL:
        return False
    out[0] = r.ts_val
    return True


cdef inline void after_input(ESession* s, double now) noexcept nogil:
    """What TcpSession's try/except does: an internal error aborts the session."""
    if s.error == 1:
        internal_error(s, now)
    s.error = 0


cdef void sess_receive_client(ESession* s, const dp_packet* p, const uint8_t* buf,
                              double now) noexcept nogil:
    """port of TcpSession.receive_client"""
    cdef ECap c
    cap_of(&c, p, buf)
    receive_client(s, &c, now)
    after_input(s, now)


cdef void sess_receive_response(ESession* s, const dp_packet* p, double now) noexcept nogil:
    """port of TcpSession.receive_response, from the parsed record alone: a record with two
    TS options gives its last TSval here, its first in the Python engine (tcpseq.tsval's
    fast path); sess_receive_response_buf is exact."""
    receive_response(s, p, NULL, now)
    after_input(s, now)


cdef void sess_receive_response_buf(ESession* s, const dp_packet* p, const uint8_t* buf,
                                    double now) noexcept nogil:
    """port of TcpSession.receive_response; buf + p.offset = the record's IP header (its
    TCP options are read as the Python engine reads them)."""
    receive_response(s, p, buf, now)
    after_input(s, now)


cdef void sess_handle_timer(ESession* s, double now) noexcept nogil:
    """port of TcpSession.handle_timer"""
    handle_timer(s, now)
    after_input(s, now)


cdef int sess_packets_to_send(ESession* s, double now, EOut* out) noexcept nogil:
    """port of TcpSession.packets_to_send: the packets appended to out; -1: out of memory
    (state went on as if the packets had been lost on the wire)."""
    cdef int oom
    s.now = now
    packets_to_send(s, now, out)
    oom = s.error == 2
    after_input(s, now)
    return -1 if oom else 0


cdef double sess_timer(ESession* s) noexcept nogil:
    """port of TcpSession.get_timer; NaN: None"""
    cdef double best, t
    cdef const ECfg* cfg = s.cfg
    if s.state >= ST_LINGER:
        return s.linger_at
    best = s.last_resp_at + (cfg.session_timeout_s if busy(s) else cfg.keepalive_timeout_s)
    t = s.handshake_at
    if tset(t) and t < best:
        best = t
    t = s.syn_at
    if tset(t) and t < best:
        best = t
    t = s.rto_at
    if tset(t) and t < best:
        best = t
    t = s.ack_at
    if tset(t) and t < best:
        best = t
    t = s.persist_at
    if tset(t) and t < best:
        best = t
    t = s.g_at
    if tset(t) and t < best:
        best = t
    t = s.fin_wait_at
    if tset(t) and t < best:
        best = t
    t = s.gap_at
    if tset(t) and t < best:
        best = t
    return best


cdef double sess_get_timer(ESession* s) noexcept nogil:
    """port of TcpSession.get_timer; < 0.0: None"""
    cdef double t = sess_timer(s)
    return t if tset(t) else -1.0


cdef int sess_next_event_any(ESession* s, EEvent* ev) noexcept nogil:
    """port of TcpSession.next_event (RouteNeeded and SessionEnded); 0: none"""
    if s.ev_head >= s.ev_n:
        return 0
    ev[0] = s.events[s.ev_head]
    s.ev_head += 1
    if s.ev_head >= s.ev_n:
        e_free(s.events)
        s.events = NULL
        s.ev_head = 0
        s.ev_n = 0
        s.ev_cap = 0
    return 1


cdef int sess_next_event(ESession* s, EEvent* ev) noexcept nogil:
    """The next RouteNeeded (the SessionEnded events are skipped: the table reads the state
    and the counters, as engine/core/table.py does); 0: none"""
    while sess_next_event_any(s, ev):
        if ev.kind == EV_ROUTE:
            return 1
    return 0


cdef bint sess_owns_syn(ESession* s, uint32_t seq) noexcept nogil:
    """port of TcpSession.owns_syn"""
    if s.has_syn:
        return s.syn_seq == seq
    return s.has_base and s.base == seq and s.state == ST_CLOSED


cdef bint sess_is_later_data(ESession* s, const dp_packet* p) noexcept nogil:
    """port of TcpSession.is_later_data"""
    if s.state != ST_LINGER or not p.data_len or not s.has_base:
        return False
    return coff(s, p.seq) >= s.cap_end


cdef bint sess_may_continue(ESession* s, const dp_packet* p, double now) noexcept nogil:
    """port of TcpSession.may_continue"""
    cdef int64_t off, e
    cdef bint ok
    if not target_ended(s.outcome):
        return True
    off = coff(s, p.seq)
    if off - s.cap_end > CLIENT_SEQ_JUMP_MAX_BYTES:
        return True
    ok = not s.restart_refused
    if ok and (s.has_cap_ack and p.ack == s.cap_ack and off == s.cap_end):
        cnt(s, EC_RECONNECT_SKIPPED_BYTES, p.data_len)
        ok = False
    elif ok and not may_reconnect(s, True):
        s.restart_refused = 1
        ok = False
    if ok:
        return True
    e = off + p.data_len
    if e > s.cap_end:
        s.cap_end = e
        s.cap_ack = p.ack
        s.has_cap_ack = 1
    drop(s, DR_SESSION_CLOSED)
    if tset(s.linger_at):
        s.linger_at = now + s.cfg.linger_s
    return False


cdef void sess_continue_from(ESession* new, ESession* old) noexcept nogil:
    """port of TcpSession.continue_from"""
    if not target_ended(old.outcome):
        return
    new.reconnects = old.reconnects + 1
    new.reconnected = 1
    cnt(new, EC_RECONNECT, 1)


cdef void sess_handle_route_down(ESession* s, bint down, double now) noexcept nogil:
    """port of TcpSession.handle_route_down"""
    s.route_down = down
    if down or not (s.state == ST_ESTABLISHED or s.state == ST_FIN_WAIT):
        return
    s.retries = 0
    s.backoff = 0
    if uq_any(s):
        s.retx_due = 1
    else:   # an old seq: the target answers with an ACK carrying its current seq
        ctl_push(s, F_ACK, sseq(s, s.snd_una - 1), s.rcv_nxt, 1, 0)
    s.error = 0


cdef bint sess_half_open(ESession* s) noexcept nogil:
    """port of TcpSession.half_open"""
    return (s.state < ST_LINGER and s.has_syn and not s.has_third and s.cap_end <= 1
            and s.pend_head == NULL and s.fin_seg == NULL and s.rst_seg == NULL)


cdef void sess_shed_half_open(ESession* s, double now) noexcept nogil:
    """port of TcpSession.shed_half_open"""
    cdef bint has_conn
    if s.state >= ST_LINGER:
        return
    has_conn = s.state == ST_ESTABLISHED or s.state == ST_FIN_WAIT
    end(s, OC_SHED_HALF_OPEN, now, has_conn, s.snd_nxt, False)
    s.linger_at = now
    s.error = 0


cdef bint sess_end_input(ESession* s, double now) noexcept nogil:
    """port of TcpSession.end_input"""
    cdef int st = s.state
    cdef bint has_conn
    if st >= ST_LINGER:
        return False
    has_conn = st == ST_ESTABLISHED or st == ST_FIN_WAIT
    end(s, OC_OFFLINE_END, now, has_conn, s.snd_nxt, False)
    s.error = 0
    return True


cdef bint sess_expedite_gap(ESession* s, double due) noexcept nogil:
    """port of TcpSession.expedite_gap"""
    if s.lingering:
        return False            # ended: end() cleared gap_at
    cdef double at = s.gap_at
    if not s.gap_held or s.gap_fast or not tset(at) or at <= due:
        return False
    s.gap_fast = 1
    s.gap_at = due
    cnt(s, EC_CLIENT_GAP_RING_LOSS, 1)
    return True


cdef size_t sess_held_bytes(ESession* s) noexcept nogil:
    """port of TcpSession.held_bytes: the captured bytes not yet sent (end - off over the
    pending queue), kept as the queue changes."""
    if s.lingering:
        return 0                # nothing was held when it was cut (sess_linger)
    return <size_t>s.pend_held


cdef bint sess_end_seq(ESession* s, uint32_t* out) noexcept nogil:
    """port of TcpSession.end_seq; False: None"""
    if not s.has_base:
        return False
    out[0] = sseq(s, s.snd_nxt if s.snd_nxt > s.snd_una else s.snd_una)
    return True


cdef bint sess_ts_last(ESession* s, uint32_t* out) noexcept nogil:
    """port of TcpSession.ts_last; False: None"""
    if not s.ts_ok or not s.has_ts_val:
        return False
    out[0] = s.ts_val
    return True


include "session_py.pxi"
