# The session table in C (included by engine.pyx): a port of engine/core/table.py
# (SessionTable), which is the specification; read its theory of operation.  Here:
#
# * flows: the flow index (TIndex, 8-byte slots keyed by what they point to) original
#   4-tuple -> TFlow (the replica list), or with one replica (-n 1) the entry itself (the
#   TEntry pointer | TB_ONE; the entry's in_map flag); responses:
#   the tuple allocator's own 8-byte slot of the fake tuple (alloc.state, rewrite.pxi TState):
#   while a session has the tuple, the slot is its TEntry (| TS_ENTRY), so one slot serves
#   both; refused flows: hmap original
#   4-tuple -> last packet time (slot.d).  The entries are also linked in the order they
#   entered the response map, the order in which the Python table's dict iterates
#   (end_input, shed_half_open, live_routes, ... visit them so).
# * a lingering session with nothing queued is frozen: its entry holds an ELinger record
#   (session.pxi sess_freeze) instead of the session; the timer, late client packets, stray
#   RSTs and the removal are handled from the record, anything else thaws it (tb_thaw).
# * the timer heap: (deadline, seq, entry) items with lazy invalidation, compacted past twice
#   the table plus TB_HEAP_SLACK items, as table.py does.  An entry removed from the table
#   frees its session at once; the small TEntry stays until no heap item refers to it.
# * touched: an array of entries, handled by drain.
# * counters: the table's uint64_t[EC_COUNT] (shared with its sessions).
#
# Per packet (tb_receive_client, tb_receive_response, tb_handle_timer, tb_drain_out): C types
# only, no Python object, no Python call.

from libc.math cimport NAN
from libc.stdlib cimport qsort
from libc.stdint cimport uintptr_t
from posix.stdlib cimport posix_memalign
from engine.dataplane.packet cimport (
    dp_parse_ipv4_tcp, DP_OK, dp_ring_step, dp_ring_is_wrap, DP_RING_HEADER_BYTES, DP_RING_ALIGN,
    DP_RING_LOSS_BEFORE,
)

import collections as _tb_collections

from engine.core.events import RouteNeeded as _RouteNeeded


cdef extern from *:
    """
    /* The counter row's seqlock (metrics/counters.py): the compiler keeps the counts between
       its two stores (x86-64 keeps stores in order; elsewhere a release fence). */
    static inline void tb_store_fence(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
    """
    void tb_store_fence() noexcept nogil


cdef double TB_REFUSED_IDLE_S = 60.0         # table.REFUSED_IDLE_S
cdef double TB_HALF_OPEN_SHED_AGE_S = 1.0    # table.HALF_OPEN_SHED_AGE_S
cdef double TB_LOSS_RECENT_S = 1.0           # table.LOSS_RECENT_S
cdef double TB_LOSS_GAP_WAIT_S = 0.01        # table.LOSS_GAP_WAIT_S
cdef size_t TB_HEAP_SLACK = 4096             # table.HEAP_SLACK (Table.heap_slack sets it)

cdef enum:
    TB_SYN = 0x02
    TB_FIN = 0x01
    TB_RST = 0x04
    TB_ACK = 0x10

# Response records (engine/codec/wire.py): 64 bytes, or 192 with the payload build.
cdef enum:
    WR_RESPONSE_RECORD_BYTES = 64
    WR_PAYLOAD_RECORD_BYTES = 192
    WR_TCP_AT = 20                   # the TCP header's offset in a record, whatever IHL says
    WR_MAX_TCP_HEADER_BYTES = 44
    WR_MAX_PAYLOAD_IN_RECORD = 128


cdef int wr_decode_record(const uint8_t* rec, size_t n, dp_packet* p) noexcept nogil:
    """wire.decode_response_record into *p: 0, or -1 where it raises DecodeError.  The
    options are parsed into p.opts (a response reaches the session as headers only; its
    payload bytes are not read); p.offset/ip_header_bytes/tcp_header_bytes place the options
    at rec + 40 for a reader of the buffer."""
    cdef uint32_t ihl_bytes, doff_bytes, tot_len, area
    cdef int64_t data_len
    memset(p, 0, sizeof(dp_packet))
    if n != WR_RESPONSE_RECORD_BYTES and n != WR_PAYLOAD_RECORD_BYTES:
        return -1
    ihl_bytes = (rec[0] & 0x0F) * 4
    doff_bytes = (rec[WR_TCP_AT + 12] >> 4) * 4
    if rec[0] >> 4 != 4 or ihl_bytes < 20 or rec[9] != 6:
        return -1
    if doff_bytes < 20:
        return -1
    area = doff_bytes if doff_bytes < WR_MAX_TCP_HEADER_BYTES else WR_MAX_TCP_HEADER_BYTES
    tot_len = (<uint32_t>rec[2] << 8) | rec[3]
    data_len = <int64_t>tot_len - ihl_bytes - doff_bytes
    if data_len < 0:
        data_len = 0
    p.family = DP_FAMILY_IPV4
    p.src[10] = p.src[11] = p.dst[10] = p.dst[11] = 0xFF
    memcpy(p.src + 12, rec + 12, 4)
    memcpy(p.dst + 12, rec + 16, 4)
    p.tos = rec[1]
    p.ip_id = (<uint16_t>rec[4] << 8) | rec[5]
    p.df = 1 if rec[6] & 0x40 else 0
    p.ttl = rec[8]
    p.sport = (<uint16_t>rec[20] << 8) | rec[21]
    p.dport = (<uint16_t>rec[22] << 8) | rec[23]
    p.seq = be32(rec + 24)
    p.ack = be32(rec + 28)
    p.flags = rec[33]
    p.window = (<uint16_t>rec[34] << 8) | rec[35]
    p.urgent = (<uint16_t>rec[38] << 8) | rec[39]
    p.ip_header_bytes = WR_TCP_AT
    p.tcp_header_bytes = <uint16_t>area
    p.data_len = <uint16_t>data_len
    if n == WR_PAYLOAD_RECORD_BYTES and 1 <= data_len <= WR_MAX_PAYLOAD_IN_RECORD:
        p.payload_bytes = <uint16_t>min(<size_t>data_len, n - (WR_TCP_AT + doff_bytes)
                                        if WR_TCP_AT + doff_bytes < n else 0)
    dp_parse_tcp_options(rec + WR_TCP_AT + 20, area - 20, &p.opts)
    return 0


# The slab: the table's entries and lingering records, 64 bytes each, in chunks of
# SB_CHUNK_BYTES aligned to their size (an object's chunk is its address with the low bits
# cleared), the first slot of each its header; no malloc chunk header per object.  A chunk
# hands out its never-used slots in order, then what was freed (a list through the slots);
# chunks with a free slot are on a list, and a chunk all free goes back to malloc (one is
# kept).  Built with AddressSanitizer every object is a malloc of its own (reads past one or
# of a freed one must reach the sanitizer).

cdef extern from *:
    """
    #if defined(__SANITIZE_ADDRESS__)
    #define SB_PLAIN 1
    #else
    #define SB_PLAIN 0
    #endif
    """
    const int SB_PLAIN


cdef enum:
    SB_OBJ = 64
    SB_CHUNK_BYTES = 65536
    SB_PER_CHUNK = SB_CHUNK_BYTES // SB_OBJ - 1


cdef struct SbChunk:            # the chunk's slot 0
    void* free_head             # freed slots (each slot's first word: the next)
    SbChunk* prev               # the list of chunks with a free slot
    SbChunk* next
    uint32_t used               # slots handed out
    uint32_t fresh              # slots 1..fresh handed out at least once
    uint8_t listed


ctypedef struct TSlab:
    SbChunk* partial
    SbChunk* spare              # an empty chunk kept
    size_t chunks


cdef inline void sb_unlist(TSlab* b, SbChunk* c) noexcept nogil:
    if c.prev != NULL:
        c.prev.next = c.next
    else:
        b.partial = c.next
    if c.next != NULL:
        c.next.prev = c.prev
    c.prev = c.next = NULL
    c.listed = 0


cdef inline void sb_list(TSlab* b, SbChunk* c) noexcept nogil:
    c.prev = NULL
    c.next = b.partial
    if b.partial != NULL:
        b.partial.prev = c
    b.partial = c
    c.listed = 1


cdef void* sb_alloc(TSlab* b) noexcept nogil:
    """A zeroed 64-byte object; NULL: no memory."""
    cdef SbChunk* c = b.partial
    cdef void* o
    cdef void* mem
    if SB_PLAIN:                # aligned as a slot is (the timer heap's items rely on it)
        if posix_memalign(&mem, SB_OBJ, SB_OBJ) != 0:
            return NULL
        memset(mem, 0, SB_OBJ)
        return mem
    if c == NULL:
        c = b.spare
        b.spare = NULL
        if c == NULL:
            if posix_memalign(&mem, SB_CHUNK_BYTES, SB_CHUNK_BYTES) != 0:
                return NULL
            c = <SbChunk*>mem
            memset(c, 0, sizeof(SbChunk))
            b.chunks += 1
        sb_list(b, c)
    if c.free_head != NULL:
        o = c.free_head
        c.free_head = (<void**>o)[0]
    else:
        c.fresh += 1
        o = <char*>c + <size_t>c.fresh * SB_OBJ
    c.used += 1
    if c.used == SB_PER_CHUNK:
        sb_unlist(b, c)
    memset(o, 0, SB_OBJ)
    return o


cdef void sb_free(TSlab* b, void* o) noexcept nogil:
    cdef SbChunk* c
    if o == NULL:
        return
    if SB_PLAIN:
        free(o)
        return
    c = <SbChunk*>(<uintptr_t>o & ~(<uintptr_t>(SB_CHUNK_BYTES - 1)))
    (<void**>o)[0] = c.free_head
    c.free_head = o
    c.used -= 1
    if not c.listed:
        sb_list(b, c)
    if c.used == 0:
        sb_unlist(b, c)
        c.free_head = NULL
        c.fresh = 0
        if b.spare == NULL:
            b.spare = c
        else:
            free(c)
            b.chunks -= 1


cdef void sb_release(TSlab* b) noexcept nogil:
    """The spare chunk back to malloc (the others go as their last object is freed)."""
    if b.spare != NULL:
        free(b.spare)
        b.spare = NULL
        b.chunks -= 1


cdef inline ELinger* lr_alloc(TSlab* b) noexcept nogil:
    """A record, counted with the engine's blocks."""
    global dp_live_blocks, dp_live_bytes
    cdef ELinger* r = <ELinger*>sb_alloc(b)
    if r != NULL:
        dp_live_blocks += 1
        dp_live_bytes += sizeof(ELinger)
    return r


cdef inline void lr_free(TSlab* b, ELinger* r) noexcept nogil:
    global dp_live_blocks, dp_live_bytes
    if r == NULL:
        return
    dp_live_blocks -= 1
    dp_live_bytes -= sizeof(ELinger)
    sb_free(b, r)


cdef struct TFlow


cdef struct TEntry:             # 64 bytes: a slot of the slab
    ESession* s                 # frozen: an ELinger* (tb_lr), the session kept as a record
    TFlow* flow
    TEntry* prev                # the response map's order
    TEntry* next
    uint64_t fk0                # the flow key (hm_key4 of the original 4-tuple)
    double sched                # NaN: None
    uint32_t fk1
    uint32_t heap_refs          # heap items that point here
    int32_t unsend              # (and s.tb_held: sess_held_bytes when the table last looked)
    uint8_t touched
    uint8_t gone
    uint8_t frozen
    uint8_t in_map              # no flow of its own (flow NULL): the flow map's slot is it


cdef enum:
    TB_ONE = 1                  # a flow map slot.a that is an entry, not a TFlow


cdef inline void tb_unmap(int64_t a) noexcept nogil:
    """What a flow map slot held is out of it."""
    if a & TB_ONE:
        (<TEntry*><intptr_t>(a & ~(<int64_t>TB_ONE))).in_map = 0
    else:
        (<TFlow*><intptr_t>a).in_map = 0


if sizeof(TEntry) > SB_OBJ or sizeof(ELinger) > SB_OBJ:
    raise ImportError(f"an entry ({sizeof(TEntry)} bytes) or a lingering record "
                      f"({sizeof(ELinger)}) does not fit a slab slot of {SB_OBJ}")


cdef inline ELinger* tb_lr(const TEntry* e) noexcept nogil:
    return <ELinger*>e.s


cdef inline void tb_entry_tuple(const TEntry* e, uint64_t* k0, uint32_t* k1) noexcept nogil:
    """The key of the fake tuple the entry has (rewrite.pxi TState: what its slot reads)."""
    cdef const ELinger* r
    cdef const ESession* s
    if e.frozen:
        r = <const ELinger*>e.s
        hm_key4(r.client_ip, r.client_port, r.target_ip, r.target_port, k0, k1)
    else:
        s = e.s
        hm_key4(s.client_ip, s.client_port, s.target_ip, s.target_port, k0, k1)


cdef inline int tb_state(const TEntry* e) noexcept nogil:
    return (<ELinger*>e.s).state if e.frozen else e.s.state


cdef inline void tb_free_session(TSlab* b, TEntry* e) noexcept nogil:
    if e.frozen:
        lr_free(b, <ELinger*>e.s)
        e.frozen = 0
    else:
        sess_free(e.s)
    e.s = NULL


cdef struct TFlow:
    TEntry** items              # &one for a single replica (no block of its own)
    TEntry* one
    uint64_t fk0                # its key in the flow index
    uint32_t fk1
    uint32_t n
    uint32_t cap
    uint8_t in_map


# A timer heap item is 16 bytes: the deadline and one word holding the entry's address
# (entries are slab slots, 64-byte aligned: its low TH_ENTRY_SHIFT bits are clear) above a
# TH_SEQ_BITS sequence number, which orders items of the same deadline by when they were
# pushed.  When the numbers run out, the items are renumbered in their order (tb_renumber).
cdef enum:
    TH_SEQ_BITS = 23
    TH_ENTRY_SHIFT = 6


cdef uint64_t TH_SEQ_MASK = (<uint64_t>1 << TH_SEQ_BITS) - 1
cdef uint64_t TB_SEQ_LIMIT = TH_SEQ_MASK    # the last sequence number (Table.set_seq_limit)


ctypedef struct THeapItem:      # 16 bytes
    double t
    uint64_t ref                # entry address >> TH_ENTRY_SHIFT << TH_SEQ_BITS | seq


cdef inline TEntry* th_entry(const THeapItem* h) noexcept nogil:
    return <TEntry*><uintptr_t>((h.ref >> TH_SEQ_BITS) << TH_ENTRY_SHIFT)


cdef int th_order(const void* a, const void* b) noexcept nogil:
    """qsort's comparison: by deadline, then sequence number."""
    cdef const THeapItem* x = <const THeapItem*>a
    cdef const THeapItem* y = <const THeapItem*>b
    if x.t != y.t:
        return -1 if x.t < y.t else 1
    if x.ref & TH_SEQ_MASK != y.ref & TH_SEQ_MASK:
        return -1 if x.ref & TH_SEQ_MASK < y.ref & TH_SEQ_MASK else 1
    return 0


cdef inline uint32_t tb_ip4(const uint8_t* a) noexcept nogil:
    return (<uint32_t>a[12] << 24) | (<uint32_t>a[13] << 16) | (<uint32_t>a[14] << 8) | a[15]


cdef inline bint tb_heap_less(const THeapItem* a, const THeapItem* b) noexcept nogil:
    return a.t < b.t or (a.t == b.t and (a.ref & TH_SEQ_MASK) < (b.ref & TH_SEQ_MASK))


cdef void tb_sift_down(THeapItem* h, size_t n, size_t i) noexcept nogil:
    cdef THeapItem x = h[i]
    cdef size_t c
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and tb_heap_less(&h[c + 1], &h[c]):
            c += 1
        if not tb_heap_less(&h[c], &x):
            break
        h[i] = h[c]
        i = c
    h[i] = x


cdef void tb_sift_up(THeapItem* h, size_t i) noexcept nogil:
    cdef THeapItem x = h[i]
    cdef size_t p
    while i > 0:
        p = (i - 1) // 2
        if not tb_heap_less(&x, &h[p]):
            break
        h[i] = h[p]
        i = p
    h[i] = x


cdef TFlow* tb_flow_new(uint32_t cap) noexcept nogil:
    cdef TFlow* f = <TFlow*>calloc(1, sizeof(TFlow))
    if f == NULL:
        return NULL
    if cap <= 1:
        f.items = &f.one
    else:
        f.items = <TEntry**>malloc(cap * sizeof(TEntry*))
        if f.items == NULL:
            free(f)
            return NULL
    f.cap = cap if cap else 1
    return f


cdef void tb_flow_free(TFlow* f) noexcept nogil:
    if f.items != &f.one:
        free(f.items)
    free(f)


# The flow index: original 4-tuple -> a TFlow, or with one replica the entry itself (| TB_ONE).
# A slot is 8 bytes, the value alone: its key is read from what it points to (the entry's or
# the flow's fk0/fk1), and the top TX_TAG_BITS bits hold the top bits of the key's hash, so
# a probe reads a pointed-to key only when they match.  Linear probing with backward-shift
# deletion as in hmap.pxi (the same hash, growth at 70 % load, shrinking under 1/8).
# User-space pointers on Linux (x86-64, arm64) leave bits 57-63 clear; where they do not (a
# tagged-pointer malloc), tx_put refuses the value as it refuses one it has no memory for.

# (TX_TAG_SHIFT, TX_VALUE_MASK: hmap.pxi; the tuple allocator's state is such an index too.)


ctypedef struct TIndex:
    uint64_t* slots             # 0: empty; else tag << TX_TAG_SHIFT | value
    size_t cap                  # a power of two; 0 before the first tx_put
    size_t n


cdef inline void tx_key(uint64_t v, uint64_t* k0, uint32_t* k1) noexcept nogil:
    cdef int64_t a = <int64_t>(v & TX_VALUE_MASK)
    cdef TEntry* e
    cdef TFlow* f
    if a & TB_ONE:
        e = <TEntry*><intptr_t>(a & ~(<int64_t>TB_ONE))
        k0[0] = e.fk0
        k1[0] = e.fk1
    else:
        f = <TFlow*><intptr_t>a
        k0[0] = f.fk0
        k1[0] = f.fk1


cdef inline uint64_t tx_tag(uint64_t h) noexcept nogil:
    return (h >> TX_TAG_SHIFT) << TX_TAG_SHIFT


cdef void tx_free(TIndex* m) noexcept nogil:
    free(m.slots)
    m.slots = NULL
    m.cap = 0
    m.n = 0


cdef size_t tx_find(const TIndex* m, uint64_t k0, uint32_t k1) noexcept nogil:
    """The slot of the key, or m.cap when absent."""
    cdef size_t mask, i
    cdef uint64_t h, tag, v, j0
    cdef uint32_t j1
    if m.cap == 0:
        return 0
    h = hm_hash(k0, k1)
    tag = tx_tag(h)
    mask = m.cap - 1
    i = <size_t>h & mask
    while True:
        v = m.slots[i]
        if v == 0:
            return m.cap
        if v & ~TX_VALUE_MASK == tag:
            tx_key(v, &j0, &j1)
            if j0 == k0 and j1 == k1:
                return i
        i = (i + 1) & mask


cdef inline int64_t tx_get(const TIndex* m, uint64_t k0, uint32_t k1) noexcept nogil:
    """The key's value, 0 when absent."""
    cdef size_t i = tx_find(m, k0, k1)
    return <int64_t>(m.slots[i] & TX_VALUE_MASK) if i < m.cap else 0


cdef int tx_resize(TIndex* m, size_t cap) noexcept nogil:
    cdef uint64_t* old = m.slots
    cdef size_t old_cap = m.cap, j, i, mask = cap - 1
    cdef uint64_t k0
    cdef uint32_t k1
    cdef uint64_t* fresh = <uint64_t*>calloc(cap, sizeof(uint64_t))
    if fresh == NULL:
        return -1
    for j in range(old_cap):
        if old[j]:
            tx_key(old[j], &k0, &k1)
            i = <size_t>hm_hash(k0, k1) & mask
            while fresh[i]:
                i = (i + 1) & mask
            fresh[i] = old[j]
    free(old)
    m.slots = fresh
    m.cap = cap
    return 0


cdef int tx_put(TIndex* m, uint64_t k0, uint32_t k1, int64_t a, int64_t* old) noexcept nogil:
    """The key's value set to a (whose own key it must be); *old: what it replaced, 0 if
    nothing.  -1: no memory, or a pointer with bits in the tag's place (nothing changed)."""
    cdef size_t mask, i
    cdef uint64_t h
    if <uint64_t>a & ~TX_VALUE_MASK:
        return -1
    i = tx_find(m, k0, k1)
    if i < m.cap:
        old[0] = <int64_t>(m.slots[i] & TX_VALUE_MASK)
        m.slots[i] = (m.slots[i] & ~TX_VALUE_MASK) | <uint64_t>a
        return 0
    old[0] = 0
    if (m.n + 1) * 10 > m.cap * 7:
        if tx_resize(m, m.cap * 2 if m.cap else HM_MIN_CAP) < 0:
            return -1
    h = hm_hash(k0, k1)
    mask = m.cap - 1
    i = <size_t>h & mask
    while m.slots[i]:
        i = (i + 1) & mask
    m.slots[i] = tx_tag(h) | <uint64_t>a
    m.n += 1
    return 0


cdef bint tx_del(TIndex* m, uint64_t k0, uint32_t k1, int64_t a) noexcept nogil:
    """The key's slot removed if it holds a (the run after it shifted back); False: it did
    not (absent, or another value).  a need not be readable any more: the slot is found by
    its value, the key giving where to look."""
    cdef size_t mask, i, j, home
    cdef uint64_t h, v, j0
    cdef uint32_t j1
    if m.cap == 0:
        return False
    h = hm_hash(k0, k1)
    mask = m.cap - 1
    i = <size_t>h & mask
    while True:
        v = m.slots[i]
        if v == 0:
            return False
        if v == (tx_tag(h) | <uint64_t>a):
            break
        i = (i + 1) & mask
    j = i
    while True:
        j = (j + 1) & mask
        if not m.slots[j]:
            break
        tx_key(m.slots[j], &j0, &j1)
        home = <size_t>hm_hash(j0, j1) & mask
        # Move j back to i unless its home lies cyclically in (i, j].
        if (j > i and (home <= i or home > j)) or (j < i and (home <= i and home > j)):
            m.slots[i] = m.slots[j]
            i = j
    m.slots[i] = 0
    m.n -= 1
    return True


cdef int tx_shrink(TIndex* m) noexcept nogil:
    """hm_shrink for the flow index."""
    cdef size_t cap = m.cap
    if cap <= HM_MIN_CAP or m.n * 8 >= cap:
        return 0
    while cap > HM_MIN_CAP and m.n * 10 <= (cap // 2) * 4:
        cap //= 2
    if m.n == 0:
        tx_free(m)
        return 0
    return tx_resize(m, cap)


cdef inline bint tb_opt_tsval_of(const dp_packet* p, const uint8_t* buf) noexcept nogil:
    """tsval(pkt.options) is not None."""
    cdef uint32_t v
    cdef size_t n = p.tcp_header_bytes - 20 if p.tcp_header_bytes > 20 else 0
    return opt_tsval(buf + p.offset + p.ip_header_bytes + 20, n, &v)


cdef class Table:
    """engine/core/table.SessionTable's Python API over the C table (see table.pxi)."""

    cdef ECfg ecfg
    cdef uint64_t* c                     # the counters: c_own, or a row of the shared block
    cdef uint64_t c_own[EC_COUNT]
    cdef int64_t* c_seq                  # that row's seqlock (NULL: counting in c_own)
    cdef int64_t c_seq_at
    cdef object _counter_row
    cdef TAlloc alloc
    cdef bint alloc_ready
    cdef TSlab slab                      # the entries and the lingering records
    cdef RwTransfer* transfers
    cdef int ntransfers
    cdef uint32_t* pool
    cdef size_t npool
    cdef int replicas
    cdef uint32_t port_shift
    cdef uint32_t rand_shift
    cdef int sample_percent
    cdef uint32_t localhost_ip
    cdef int64_t max_sessions
    cdef bint fake_handshake
    cdef int64_t backlog_max
    cdef bint has_history
    cdef TIndex flows
    cdef size_t nresp                    # entries reachable by their fake tuple (alloc.state)
    cdef hmap refused
    cdef TEntry* order_head
    cdef TEntry* order_tail
    cdef THeapItem* heap
    cdef size_t heap_n
    cdef size_t heap_cap
    cdef uint64_t heap_seq
    cdef TEntry** touched
    cdef size_t touched_n
    cdef size_t touched_cap
    cdef TEntry** draining
    cdef size_t draining_cap
    cdef EEvent* routes
    cdef size_t routes_n
    cdef size_t routes_cap
    cdef uint32_t pend_at                # drain_into: the next queued packet of self.out
    cdef size_t pend_off
    cdef double now
    cdef int64_t unsend_total
    cdef int64_t held_total
    cdef bint has_ramp_start
    cdef double ramp_start
    cdef bint ramp_done
    cdef bint route_down
    cdef bint has_loss
    cdef double loss_at
    cdef bint oom
    cdef EOut out
    cdef public bint refuse_new
    cdef readonly object config
    cdef object _history
    cdef object _keep
    cdef tuple _pool

    def __cinit__(self):
        eout_init(&self.out)
        self.c = self.c_own
        self.c_seq = NULL
        self.transfers = NULL
        self.pool = NULL
        self.heap = NULL
        self.touched = NULL
        self.draining = NULL
        self.routes = NULL
        self.order_head = NULL
        self.order_tail = NULL
        self.alloc_ready = False
        memset(&self.slab, 0, sizeof(TSlab))

    def __init__(self, config, tuple_history=None):
        cdef Py_ssize_t i
        ecfg_fill(&self.ecfg, config)
        self.config = config
        memset(self.c_own, 0, sizeof(self.c_own))
        self.ntransfers = rw_fill_transfers(&self.transfers, config.transfers)
        self._pool = tuple(config.client_pool)
        self.npool = len(self._pool)
        if self.npool:
            self.pool = <uint32_t*>malloc(self.npool * sizeof(uint32_t))
            if self.pool == NULL:
                raise MemoryError()
            for i in range(<Py_ssize_t>self.npool):
                self.pool[i] = self._pool[i]
        wc, wi = config.worker_count, config.worker_index
        span = RW_PORT_MAX - RW_PORT_MIN_UNPRIVILEGED + 1
        if not 1 <= wc <= span:
            raise ValueError(f"worker_count {wc} is not in 1..{span}")
        if not 0 <= wi < wc:
            raise ValueError(f"worker_index {wi} is not in 0..{wc - 1}")
        if config.time_wait_s < 0:
            raise ValueError(f"time_wait_s {config.time_wait_s} is negative")
        if ta_init(&self.alloc, float(config.time_wait_s), wi, wc, self.pool, self.npool,
                   bool(config.strict_time_wait)) < 0:
            raise MemoryError()
        self.alloc_ready = True
        self._history = tuple_history
        self.has_history = tuple_history is not None
        self._keep = _history_block_views(&self.alloc.history, tuple_history)
        self.replicas = max(1, int(config.replicas))
        self.port_shift = config.port_shift
        self.rand_shift = config.rand_shift
        self.sample_percent = config.sample_percent
        self.localhost_ip = config.localhost_ip or 0
        self.max_sessions = config.max_sessions or 0
        self.fake_handshake = bool(config.fake_handshake)
        self.backlog_max = getattr(config, "backlog_max_bytes", 0) or 0
        self.ramp_done = not config.gradual
        self.now = 0.0
        self.refuse_new = False

    def __dealloc__(self):
        # Every entry is on the order list (live), in the heap or in touched (live or gone):
        # each is freed once, with its session (live ones) and its flow (via the flows seen).
        cdef hmap seen
        cdef hmap flows
        cdef bint created
        cdef size_t i
        cdef TEntry* e
        cdef hslot* slot
        memset(&seen, 0, sizeof(hmap))
        memset(&flows, 0, sizeof(hmap))
        e = self.order_head
        while e != NULL:
            hm_put(&seen, <uint64_t><intptr_t>e, 0, &created)
            e = e.next
        for i in range(self.heap_n):
            hm_put(&seen, <uint64_t><intptr_t>th_entry(&self.heap[i]), 0, &created)
        for i in range(self.touched_n):
            hm_put(&seen, <uint64_t><intptr_t>self.touched[i], 0, &created)
        for i in range(self.flows.cap):
            if self.flows.slots[i] and not self.flows.slots[i] & TB_ONE:
                hm_put(&flows, self.flows.slots[i] & TX_VALUE_MASK, 0, &created)
        for i in range(seen.cap):
            if seen.slots[i].used:
                e = <TEntry*><intptr_t>seen.slots[i].k0
                if e.flow != NULL:
                    hm_put(&flows, <uint64_t><intptr_t>e.flow, 0, &created)
                tb_free_session(&self.slab, e)
                sb_free(&self.slab, e)
        for i in range(flows.cap):
            if flows.slots[i].used:
                tb_flow_free(<TFlow*><intptr_t>flows.slots[i].k0)
        hm_free(&seen)
        hm_free(&flows)
        free(self.heap)
        free(self.touched)
        free(self.draining)
        free(self.routes)
        tx_free(&self.flows)
        hm_free(&self.refused)
        free(self.transfers)
        free(self.pool)
        sb_release(&self.slab)
        if self.alloc_ready:
            ta_free(&self.alloc)
        eout_free(&self.out)

    # -- the C core -------------------------------------------------------------------------

    cdef inline bint tb_shedding(self) noexcept nogil:
        """New sessions are refused now: memory pressure, or the backlog budget is spent."""
        return self.refuse_new or (self.backlog_max and self.held_total >= self.backlog_max)

    cdef int tb_touch(self, TEntry* e) noexcept nogil:
        cdef size_t cap
        cdef TEntry** t
        if e.touched:
            return 0
        if self.touched_n == self.touched_cap:
            cap = self.touched_cap * 2 if self.touched_cap else 64
            t = <TEntry**>realloc(self.touched, cap * sizeof(TEntry*))
            if t == NULL:
                self.oom = True
                return -1
            self.touched = t
            self.touched_cap = cap
        e.touched = 1
        self.touched[self.touched_n] = e
        self.touched_n += 1
        return 0

    cdef ESession* tb_thaw(self, TEntry* e) noexcept nogil:
        """The session of a frozen entry back (sess_thaw); NULL: no memory."""
        cdef ESession* s
        if not e.frozen:
            return e.s
        s = sess_thaw(tb_lr(e), &self.ecfg, self.c)
        if s == NULL:
            self.oom = True
            return NULL
        lr_free(&self.slab, tb_lr(e))
        e.s = s
        e.frozen = 0
        return s

    cdef void tb_freeze(self, TEntry* e) noexcept nogil:
        """A lingering session with nothing queued kept as its record (sess_freeze), or
        else cut to what lingering reads (sess_linger)."""
        cdef ESession* s = e.s
        cdef ELinger* r = lr_alloc(&self.slab) if sess_freezable(s) else NULL
        if r != NULL:
            sess_freeze(s, r)
            sess_free(s)
            e.s = <ESession*>r
            e.frozen = 1
        elif not s.lingering:
            e.s = sess_linger(s)

    cdef bint tb_linger_response(self, TEntry* e, const dp_packet* p) noexcept nogil:
        """receive_response of a frozen entry when it queues no packet (a stray RST, or a
        segment without data, SYN or FIN on a gracefully ended session): counted, True;
        False: the session must answer (thawed by the caller)."""
        cdef uint8_t flags = p.flags
        if not flags & TB_RST and not (
            tb_lr(e).bits & LB_GRACEFUL and not p.data_len and not flags & (TB_SYN | TB_FIN)
        ):
            return False
        self.c[EC_RESP] += 1
        if flags & TB_RST:
            self.c[EC_RESP_RST] += 1
            self.c[EC_DROP_NO_TRANSFER + DR_STRAY_RESPONSE] += 1
        return True

    cdef void tb_maybe_free(self, TEntry* e) noexcept nogil:
        if e.gone and e.heap_refs == 0 and not e.touched:
            sb_free(&self.slab, e)

    cdef uint32_t tb_source(self, uint32_t src) noexcept nogil:
        """table._source: -H."""
        if src == RW_LOCALHOST_IP and self.localhost_ip:
            return self.localhost_ip
        return src

    cdef int tb_ramp_percent(self, double now) noexcept nogil:
        """table._ramp_percent (-g)."""
        cdef int64_t percent
        if not self.has_ramp_start:
            return 1
        percent = <int64_t>(now - self.ramp_start) + 1
        if percent >= 100:
            self.ramp_done = True
            return 100
        return <int>percent if percent > 1 else 1

    cdef bint tb_still_refused(self, hslot* r, uint8_t flags, double now) noexcept nogil:
        """table._still_refused."""
        if now - r.d > TB_REFUSED_IDLE_S or (flags & TB_SYN and not self.tb_shedding()):
            hm_del(&self.refused, r)
            return False
        self.c[EC_DROP_SHED] += 1
        if flags & (TB_FIN | TB_RST):
            hm_del(&self.refused, r)
        else:
            r.d = now
        return True

    cdef TEntry* tb_create(self, uint64_t fk0, uint32_t fk1, TFlow* flow, uint32_t i,
                           const dp_packet* p, const uint8_t* buf, double now,
                           int tindex) noexcept nogil:
        """table._create: replica i's fake client tuple and its session (not yet fed)."""
        cdef uint32_t src = self.tb_source(tb_ip4(p.src)), ip, tip, gip = 0
        cdef uint16_t port, tport, gport = 0
        cdef uint32_t syn_seq
        cdef bint syn_ts
        cdef int rc
        cdef ESession* s
        cdef TEntry* e
        cdef size_t slot
        cdef uint64_t k0
        cdef uint32_t k1
        ip = rw_choose_client_ip(src, self.pool, self.npool, i) if self.npool else src
        port = rw_shift_port(p.sport, self.port_shift, self.rand_shift) if self.port_shift \
            else p.sport
        if i:
            port = rw_replica_port(port, i, self.rand_shift)
            if self.port_shift:
                port = rw_shift_port(port, self.port_shift, self.rand_shift)
        tip = self.transfers[tindex].target_ip
        tport = self.transfers[tindex].target_port
        if p.flags & TB_SYN:
            syn_seq = p.seq
            syn_ts = tb_opt_tsval_of(p, buf)
        else:
            syn_seq = p.seq - 1
            syn_ts = False
        rc = ta_allocate(&self.alloc, ip, port, tip, tport, now, NULL, 0, True, syn_seq, syn_ts,
                         &gip, &gport)
        if self.has_history:
            self.c[EC_TUPLE_HISTORY_AVOIDED] = self.alloc.stats.inherited_hits
        self.c[EC_TUPLES_SPILLED] = self.alloc.stats.spilled
        self.c[EC_TUPLES_REUSED] = self.alloc.stats.reused
        if rc < 0:
            self.oom = True
            return NULL
        if rc == 0:
            self.c[EC_DROP_NO_TUPLE] += 1
            return NULL
        s = sess_new(&self.ecfg, self.c, gip, gport, tip, tport, tb_ip4(p.dst), p.dport, now)
        e = <TEntry*>sb_alloc(&self.slab)
        hm_key4(gip, gport, tip, tport, &k0, &k1)
        slot = self.alloc.state.cap
        if s != NULL and e != NULL:
            e.s = s                 # the tuple's key, once the slot points here
            slot = ts_find(&self.alloc.state, k0, k1)  # the allocator's record: RW_LIVE, a = 0
        if slot == self.alloc.state.cap or not ts_hold(&self.alloc.state, slot, e):
            sess_free(s)
            sb_free(&self.slab, e)
            ta_release(&self.alloc, gip, gport, tip, tport, now, False, 0, False, 0)
            self.oom = True
            return NULL
        if self.route_down:
            sess_handle_route_down(s, True, now)
        e.s = s
        e.flow = flow
        e.fk0 = fk0
        e.fk1 = fk1
        e.sched = NAN
        self.nresp += 1
        e.prev = self.order_tail
        if self.order_tail != NULL:
            self.order_tail.next = e
        else:
            self.order_head = e
        self.order_tail = e
        return e

    cdef void tb_new_flow(self, uint64_t fk0, uint32_t fk1, const dp_packet* p,
                          const uint8_t* buf, double now, int tindex) noexcept nogil:
        """table._new_flow."""
        cdef int percent, replicas = self.replicas
        cdef uint32_t src, ip0, i
        cdef TFlow* flow = NULL
        cdef TEntry* e
        cdef TEntry* one = NULL
        cdef TEntry** items
        cdef uint32_t n
        cdef int64_t was
        if tindex < 0:
            tindex = rw_match_transfer(self.transfers, self.ntransfers, tb_ip4(p.dst), p.dport)
            if tindex < 0:
                self.c[EC_DROP_NO_TRANSFER] += 1
                return
        percent = self.sample_percent if self.ramp_done else self.tb_ramp_percent(now)
        if percent < 100:
            # spec §3.3 step 7: the rewritten address and the original port, once per flow.
            src = self.tb_source(tb_ip4(p.src))
            ip0 = rw_choose_client_ip(src, self.pool, self.npool, 0) if self.npool else src
            if not rw_sample_keep(ip0, p.sport, percent):
                self.c[EC_DROP_SAMPLED_OUT] += 1
                return
        if not self.ramp_done and not self.has_ramp_start:
            self.has_ramp_start = True
            self.ramp_start = now
        if self.max_sessions and <int64_t>self.nresp + replicas > self.max_sessions:
            self.c[EC_SESSIONS_REFUSED] += 1
            self.c[EC_DROP_SESSION_LIMIT] += 1
            return
        if replicas == 1:
            one = self.tb_create(fk0, fk1, NULL, 0, p, buf, now, tindex)
            if one == NULL:
                return
            items = &one
            n = 1
        else:
            flow = tb_flow_new(replicas)
            if flow == NULL:
                self.oom = True
                return
            flow.fk0 = fk0
            flow.fk1 = fk1
            for i in range(<uint32_t>replicas):
                e = self.tb_create(fk0, fk1, flow, i, p, buf, now, tindex)
                if e != NULL:
                    flow.items[flow.n] = e
                    flow.n += 1
            if flow.n == 0:
                tb_flow_free(flow)
                return
            items = flow.items
            n = flow.n
        if tx_put(&self.flows, fk0, fk1, <int64_t><intptr_t>flow if flow != NULL
                  else <int64_t><intptr_t>one | TB_ONE, &was) < 0:
            self.oom = True  # the sessions stay reachable by their responses; the flow is lost
        else:
            if was:  # (never: the callers found no flow, or took it out)
                tb_unmap(was)
            if flow != NULL:
                flow.in_map = 1
            else:
                one.in_map = 1
        self.c[EC_ALL_CLT] += 1
        if p.data_len:
            self.c[EC_CLT_CONT] += 1
        for i in range(n):
            e = items[i]
            sess_receive_client(e.s, p, buf, now)
            self.tb_touch(e)

    cdef TEntry* tb_replace(self, TFlow* flow, TEntry* old, uint32_t i, const dp_packet* p,
                            const uint8_t* buf, double now) noexcept nogil:
        """table._replace: a new session in replica slot i (of flow, or the flow map's slot
        when flow is NULL: old is its one entry); the lingering one is detached."""
        cdef TEntry* e
        cdef int64_t was
        cdef int tindex
        if self.max_sessions and <int64_t>self.nresp >= self.max_sessions:
            self.c[EC_SESSIONS_REFUSED] += 1
            self.c[EC_DROP_SESSION_LIMIT] += 1
            return NULL
        tindex = rw_match_transfer(self.transfers, self.ntransfers, tb_ip4(p.dst), p.dport)
        if tindex < 0:
            return NULL
        e = self.tb_create(old.fk0, old.fk1, flow, i, p, buf, now, tindex)
        if e == NULL:
            return NULL
        if flow != NULL:
            flow.items[i] = e
        elif old.in_map:
            if tx_get(&self.flows, old.fk0, old.fk1) == (<int64_t><intptr_t>old | TB_ONE):
                tx_put(&self.flows, old.fk0, old.fk1, <int64_t><intptr_t>e | TB_ONE, &was)
                e.in_map = 1
        old.flow = NULL  # alone: its removal must not touch the live flow
        old.in_map = 0
        return e

    cdef void tb_receive_client(self, const dp_packet* p, const uint8_t* buf,
                                double now) noexcept nogil:
        """table.SessionTable.receive_client: an original captured client packet."""
        cdef uint64_t fk0
        cdef uint32_t fk1, i
        cdef int64_t fa
        cdef hslot* r
        cdef TFlow* flow = NULL
        cdef uint8_t flags = p.flags
        cdef TEntry* e
        cdef TEntry* one = NULL
        cdef TEntry** items = NULL
        cdef uint32_t n = 0
        cdef TEntry* fresh
        cdef ESession* s
        cdef int tindex
        cdef bint created
        self.now = now
        hm_key4(tb_ip4(p.src), p.sport, tb_ip4(p.dst), p.dport, &fk0, &fk1)
        fa = tx_get(&self.flows, fk0, fk1)
        if fa:
            if fa & TB_ONE:
                one = <TEntry*><intptr_t>(fa & ~(<int64_t>TB_ONE))
                items = &one
                n = 1
            else:
                flow = <TFlow*><intptr_t>fa
                items = flow.items
                n = flow.n
        if self.refused.n:
            r = hm_get(&self.refused, fk0, fk1)
            if r != NULL and self.tb_still_refused(r, flags, now):
                return
        if flags & TB_SYN:
            if flags & TB_ACK:
                self.c[EC_DROP_CLIENT_SYN_ACK] += 1
                return
            self.c[EC_SYN_CNT] += 1
        if items != NULL:
            e = items[0]
            if flags & TB_SYN and not (lr_owns_syn(tb_lr(e), p.seq) if e.frozen
                                       else sess_owns_syn(e.s, p.seq)):
                # spec §3.6 drops this SYN; it is a new connection reusing the port.  The old
                # sessions run on by their fake tuples until they end.
                self.c[EC_PORT_REUSE] += 1
                tb_unmap(fa)
                tx_del(&self.flows, fk0, fk1, fa)
                self.tb_new_flow(fk0, fk1, p, buf, now, -1)
                return
            self.c[EC_ALL_CLT] += 1
            if p.data_len:
                self.c[EC_CLT_CONT] += 1
            for i in range(n):
                e = items[i]
                if e.frozen:
                    if not lr_is_later_data(tb_lr(e), p):
                        # receive_client of an ended session: the drop counted, no more
                        self.c[EC_DROP_NO_TRANSFER + DR_SESSION_CLOSED] += 1
                        self.tb_touch(e)
                        continue
                    if self.tb_thaw(e) == NULL:
                        continue
                s = e.s
                if s.state == ST_LINGER and p.data_len and sess_is_later_data(s, p):
                    # spec §3.6: new traffic on a lingering tuple starts a new (faked) session
                    if not sess_may_continue(s, p, now):
                        continue
                    fresh = self.tb_replace(flow, e, i, p, buf, now)
                    if fresh == NULL:
                        continue
                    sess_continue_from(fresh.s, s)
                    e = fresh
                    s = fresh.s
                sess_receive_client(s, p, buf, now)
                self.tb_touch(e)
            return
        tindex = rw_match_transfer(self.transfers, self.ntransfers, tb_ip4(p.dst), p.dport)
        if tindex < 0:
            self.c[EC_DROP_NO_TRANSFER] += 1
            return
        if not flags & TB_SYN:
            if not p.data_len:
                self.c[EC_DROP_NO_SESSION] += 1  # spec §3.6: a SYN or payload starts one
                return
            if not self.fake_handshake:
                self.c[EC_DROP_NO_SYN] += 1  # -O
                return
        if self.tb_shedding():
            self.c[EC_SHED_SESSIONS_MEMORY if self.refuse_new else EC_SHED_SESSIONS_BACKLOG] += 1
            self.c[EC_DROP_SHED] += 1
            if not flags & (TB_FIN | TB_RST):
                r = hm_put(&self.refused, fk0, fk1, &created)
                if r == NULL:
                    self.oom = True
                else:
                    r.d = now
            return
        self.tb_new_flow(fk0, fk1, p, buf, now, tindex)

    cdef void tb_receive_response(self, const dp_packet* p, const uint8_t* buf,
                                  double now) noexcept nogil:
        """table.SessionTable.receive_response: a decoded response record (buf + p.offset:
        its IP header, whose TCP options the session reads as tcpseq.tsval does)."""
        cdef uint64_t k0, v
        cdef uint32_t k1
        cdef size_t slot
        cdef TEntry* e
        self.now = now
        hm_key4(tb_ip4(p.dst), p.dport, tb_ip4(p.src), p.sport, &k0, &k1)
        slot = ts_find(&self.alloc.state, k0, k1)
        v = self.alloc.state.slots[slot] & TX_VALUE_MASK if slot < self.alloc.state.cap else 0
        if not v & TS_ENTRY:        # none, quarantined or no session's (yet)
            self.c[EC_DROP_UNKNOWN_RESPONSE] += 1
            return
        e = <TEntry*><uintptr_t>(v & ~(<uint64_t>TS_ENTRY))
        if e.frozen and not self.tb_linger_response(e, p) and self.tb_thaw(e) == NULL:
            return
        if not e.frozen:
            sess_receive_response_buf(e.s, p, buf, now)
        self.tb_touch(e)

    cdef void tb_heap_pop(self) noexcept nogil:
        cdef TEntry* e = th_entry(&self.heap[0])
        self.heap_n -= 1
        if self.heap_n:
            self.heap[0] = self.heap[self.heap_n]
            tb_sift_down(self.heap, self.heap_n, 0)
        e.heap_refs -= 1
        self.tb_maybe_free(e)

    cdef void tb_handle_timer(self, double now) noexcept nogil:
        """table.SessionTable.handle_timer."""
        cdef double t
        cdef TEntry* e
        self.now = now
        while self.heap_n and self.heap[0].t <= now:
            t = self.heap[0].t
            e = th_entry(&self.heap[0])
            e.heap_refs += 1  # kept while it is looked at
            self.tb_heap_pop()
            e.heap_refs -= 1
            if e.sched != t or e.gone:
                self.tb_maybe_free(e)
                continue  # stale: rescheduled earlier meanwhile, or removed
            e.sched = NAN
            if e.frozen:
                lr_handle_timer(tb_lr(e), now)
            else:
                sess_handle_timer(e.s, now)
            self.tb_touch(e)
        self.tb_shrink()

    cdef void tb_shrink(self) noexcept nogil:
        """Memory given back after a flood: the maps and the timer heap shrink when mostly
        empty (no slot pointer is held here; a failed shrink leaves things as they were)."""
        cdef size_t cap
        cdef THeapItem* h
        tx_shrink(&self.flows)
        hm_shrink(&self.refused)
        ts_shrink(&self.alloc.state)
        hm_shrink(&self.alloc.groups)
        cap = self.heap_cap
        while cap > 256 and self.heap_n * 8 < cap:
            cap //= 2
        if cap != self.heap_cap:
            h = <THeapItem*>realloc(self.heap, cap * sizeof(THeapItem))
            if h != NULL:
                self.heap = h
                self.heap_cap = cap

    cdef double tb_get_timer(self) noexcept nogil:
        """table.SessionTable.get_timer; NaN: None."""
        cdef TEntry* e
        if self.touched_n:
            return self.now
        while self.heap_n:
            e = th_entry(&self.heap[0])
            if e.sched == self.heap[0].t and not e.gone:
                return self.heap[0].t
            self.tb_heap_pop()
        return NAN

    cdef int tb_schedule(self, TEntry* e) noexcept nogil:
        """table._schedule."""
        cdef double t = tb_lr(e).linger_at if e.frozen else sess_timer(e.s)
        cdef size_t cap
        cdef THeapItem* h
        cdef uintptr_t addr = <uintptr_t>e
        if tset(t) and (not tset(e.sched) or t < e.sched):
            if (addr & ((1 << TH_ENTRY_SHIFT) - 1)
                    or <uint64_t>addr >> (64 - TH_SEQ_BITS + TH_ENTRY_SHIFT)):
                self.oom = True     # an address the item cannot hold (never on Linux)
                return -1
            if self.heap_seq >= TB_SEQ_LIMIT and self.tb_renumber() < 0:
                self.oom = True
                return -1
            if self.heap_n == self.heap_cap:
                cap = self.heap_cap * 2 if self.heap_cap else 256
                h = <THeapItem*>realloc(self.heap, cap * sizeof(THeapItem))
                if h == NULL:
                    self.oom = True
                    return -1
                self.heap = h
                self.heap_cap = cap
            e.sched = t
            self.heap_seq += 1
            self.heap[self.heap_n].t = t
            self.heap[self.heap_n].ref = (
                (<uint64_t>addr >> TH_ENTRY_SHIFT) << TH_SEQ_BITS | self.heap_seq)
            e.heap_refs += 1
            self.heap_n += 1
            tb_sift_up(self.heap, self.heap_n - 1)
        return 0

    cdef int tb_renumber(self) noexcept nogil:
        """The sequence numbers ran out: the items sorted (a sorted array is a heap) and
        numbered again from 1 in that order, which keeps every item's place; -1: too many
        items for the numbers (nothing changed)."""
        cdef size_t i
        if self.heap_n >= TH_SEQ_MASK:
            return -1
        qsort(self.heap, self.heap_n, sizeof(THeapItem), th_order)
        for i in range(self.heap_n):
            self.heap[i].ref = (self.heap[i].ref & ~TH_SEQ_MASK) | <uint64_t>(i + 1)
        self.heap_seq = self.heap_n
        return 0

    cdef void tb_compact(self) noexcept nogil:
        """The dead heap items dropped in one pass (table._remove)."""
        cdef size_t i, j = 0
        cdef TEntry* e
        for i in range(self.heap_n):
            e = th_entry(&self.heap[i])
            if e.sched == self.heap[i].t and not e.gone:
                self.heap[j] = self.heap[i]
                j += 1
            else:
                e.heap_refs -= 1
                self.tb_maybe_free(e)
        self.heap_n = j
        if j > 1:
            i = j // 2
            while i > 0:
                i -= 1
                tb_sift_down(self.heap, j, i)

    cdef void tb_remove(self, TEntry* e, double now) noexcept nogil:
        """table._remove: out of the maps, the tuple quarantined, the session freed."""
        cdef ESession* s = e.s
        cdef ELinger* r = tb_lr(e)
        cdef uint64_t k0
        cdef uint32_t k1, i, j, cip, tip
        cdef uint16_t cport, tport
        cdef size_t slot
        cdef TFlow* flow
        cdef uint32_t end_seq = 0, ts_last = 0
        cdef bint has_end, has_ts
        e.gone = 1
        e.heap_refs += 1  # pinned: the compaction may drop its last item
        if self.heap_n > 2 * self.nresp + TB_HEAP_SLACK:
            self.tb_compact()
        e.heap_refs -= 1
        self.c[EC_REL] += 1
        self.c[EC_TW] -= 1
        self.unsend_total -= e.unsend
        e.unsend = 0
        if not e.frozen:
            self.held_total -= s.tb_held
            s.tb_held = 0
        if e.frozen:
            cip, cport, tip, tport = r.client_ip, r.client_port, r.target_ip, r.target_port
        else:
            cip, cport, tip, tport = s.client_ip, s.client_port, s.target_ip, s.target_port
        hm_key4(cip, cport, tip, tport, &k0, &k1)
        slot = ts_find(&self.alloc.state, k0, k1)
        if (slot < self.alloc.state.cap and self.alloc.state.slots[slot] & TX_VALUE_MASK
                == <uint64_t><uintptr_t>e | TS_ENTRY):
            self.nresp -= 1         # ta_release below makes it a record, quarantined
            if e.prev != NULL:
                e.prev.next = e.next
            else:
                self.order_head = e.next
            if e.next != NULL:
                e.next.prev = e.prev
            else:
                self.order_tail = e.prev
            e.prev = e.next = NULL
        flow = e.flow
        if flow == NULL:            # one replica: the flow map's slot, if it is still there
            if e.in_map:
                tx_del(&self.flows, e.fk0, e.fk1, <int64_t><intptr_t>e | TB_ONE)
                e.in_map = 0
        else:
            for i in range(flow.n):
                if flow.items[i] == e:
                    for j in range(i + 1, flow.n):
                        flow.items[j - 1] = flow.items[j]
                    flow.n -= 1
                    break
        if flow != NULL and flow.n == 0:
            if flow.in_map:
                tx_del(&self.flows, e.fk0, e.fk1, <int64_t><intptr_t>flow)
                flow.in_map = 0
            tb_flow_free(flow)
        e.flow = NULL
        # The target keeps the tuple in TIME_WAIT: quarantine it (design §9).
        if e.frozen:
            has_end = lr_end_seq(r, &end_seq)
            has_ts = lr_ts_last(r, &ts_last)
        else:
            has_end = sess_end_seq(s, &end_seq)
            has_ts = sess_ts_last(s, &ts_last)
        if ta_release(&self.alloc, cip, cport, tip, tport, now, has_end, end_seq, has_ts,
                      ts_last) < 0:
            self.oom = True
        tb_free_session(&self.slab, e)
        self.tb_maybe_free(e)

    cdef int tb_route(self, const EEvent* ev) noexcept nogil:
        cdef size_t cap
        cdef EEvent* r
        if self.routes_n == self.routes_cap:
            cap = self.routes_cap * 2 if self.routes_cap else 64
            r = <EEvent*>realloc(self.routes, cap * sizeof(EEvent))
            if r == NULL:
                self.oom = True
                return -1
            self.routes = r
            self.routes_cap = cap
        self.routes[self.routes_n] = ev[0]
        self.routes_n += 1
        return 0

    cdef void tb_drain_out(self) noexcept nogil:
        """table.SessionTable.drain in C: the packets appended to self.out, the routes to
        self.routes[0:routes_n] (both reset by the caller)."""
        cdef size_t k, n, cap
        cdef TEntry* e
        cdef ESession* s
        cdef double now = self.now
        cdef bint loss_recent = self.has_loss and now - self.loss_at <= TB_LOSS_RECENT_S
        cdef EEvent ev
        cdef int64_t u, h
        cdef TEntry** taken
        n = self.touched_n
        taken = self.touched
        cap = self.touched_cap
        self.touched = self.draining
        self.touched_cap = self.draining_cap
        self.touched_n = 0
        self.draining = taken
        self.draining_cap = cap
        for k in range(n):
            e = taken[k]
            e.touched = 0
            if e.gone:
                self.tb_maybe_free(e)
                continue
            if e.frozen:    # nothing queued, no event: it ended, or it lingers on
                if tb_lr(e).state == ST_FINISHED:
                    self.tb_remove(e, now)
                else:
                    self.tb_schedule(e)
                continue
            s = e.s
            if sess_packets_to_send(s, now, &self.out) < 0:
                self.oom = True
            if loss_recent:
                sess_expedite_gap(s, now + TB_LOSS_GAP_WAIT_S)
            while sess_next_event(s, &ev):
                self.tb_route(&ev)
            u = sess_unsend(s)
            if u != e.unsend:
                self.unsend_total += u - e.unsend
                e.unsend = <int32_t>u
            h = <int64_t>sess_held_bytes(s)
            if h != s.tb_held:
                self.held_total += h - s.tb_held
                s.tb_held = h
            if s.state == ST_FINISHED:
                self.tb_remove(e, now)
            else:
                if s.state == ST_LINGER:
                    self.tb_freeze(e)       # ended: kept as what lingering reads
                self.tb_schedule(e)

    # -- counting in a shared row (attach_counters) -------------------------------------------

    cdef inline void tb_count_begin(self) noexcept nogil:
        """A batch call starts counting: the row's seqlock goes odd (metrics/counters.py)."""
        if self.c_seq != NULL:
            self.c_seq_at = (self.c_seq[0] | 1) + 2
            self.c_seq[0] = self.c_seq_at
            tb_store_fence()

    cdef inline void tb_count_end(self) noexcept nogil:
        """... and is done: every count of the call is stored before the seqlock goes even."""
        if self.c_seq != NULL:
            tb_store_fence()
            self.c_seq[0] = self.c_seq_at + 1

    cdef void tb_count_in(self, uint64_t* c) noexcept nogil:
        """Every session counts in ``c`` from now on (its counts so far are there)."""
        cdef TEntry* e = self.order_head
        cdef size_t i
        self.c = c
        while e != NULL:
            if e.s != NULL and not e.frozen:
                e.s.counters = c
            e = e.next
        for i in range(self.heap_n):
            e = th_entry(&self.heap[i])
            if e.s != NULL and not e.frozen:
                e.s.counters = c
        for i in range(self.touched_n):
            if self.touched[i].s != NULL and not self.touched[i].frozen:
                self.touched[i].s.counters = c

    # -- Python API (table.SessionTable's) -----------------------------------------------------

    cdef void _check(self) except *:
        if self.oom:
            self.oom = False
            raise MemoryError("the session table ran out of memory")

    def receive_client(self, pkt, double now):
        cdef dp_packet p
        cdef bytes buf = _packet_buffer(pkt, &p)
        cdef const uint8_t* b = buf
        self.tb_count_begin()
        self.tb_receive_client(&p, b, now)
        self.tb_count_end()
        self._check()

    def receive_response(self, pkt, double now):
        cdef dp_packet p
        cdef bytes buf = _packet_buffer(pkt, &p)
        self.tb_count_begin()
        self.tb_receive_response(&p, buf, now)
        self.tb_count_end()
        self._check()

    def handle_timer(self, double now):
        self.tb_count_begin()
        self.tb_handle_timer(now)
        self.tb_count_end()
        self._check()

    def get_timer(self):
        cdef double t = self.tb_get_timer()
        return t if tset(t) else None

    def drain(self):
        """(routes as RouteNeeded, packets as bytes), as SessionTable.drain."""
        cdef size_t at = 0, i
        cdef EEvent* r
        if not self.touched_n:
            return [], []
        eout_reset(&self.out)
        self.pend_at = 0
        self.pend_off = 0
        self.routes_n = 0
        self.tb_count_begin()
        self.tb_drain_out()
        self.tb_count_end()
        r = self.routes
        out_routes = [
            _RouteNeeded(r[i].cip, r[i].cport, r[i].tip, r[i].tport) for i in range(self.routes_n)
        ]
        self.routes_n = 0
        packets = []
        for i in range(self.out.n):
            packets.append((<char*>self.out.buf)[at:at + self.out.lens[i]])
            at += self.out.lens[i]
        eout_reset(&self.out)
        self._check()
        return out_routes, packets

    def close(self):
        """Let go of the tuple history's and the counter row's shared blocks (their ``close``
        needs the export gone): the table allocates without a history and counts in its own
        array (its counts so far copied there) from then on."""
        memset(&self.alloc.history, 0, sizeof(RwHistory))
        self.has_history = False
        self._keep = None
        self._detach_counters()

    cdef void _detach_counters(self):
        if self.c != self.c_own:
            memcpy(self.c_own, self.c, sizeof(self.c_own))
            self.tb_count_in(self.c_own)
            self.c_seq = NULL
            self._counter_row = None

    counter_names = EC_NAMES
    """The Counter key of each counter, in the order of the array the table counts in."""

    def attach_counters(self, row, Py_ssize_t first):
        """Count in place from now on: ``row`` (a writable buffer of int64 slots, slot 0 its
        seqlock: a row of metrics/counters.py's shared block) holds the counters in slots
        ``first`` .. ``first + len(counter_names) - 1``, in ``counter_names`` order.  The
        counts so far are copied there; the seqlock is odd while a call counts.  Nothing is
        flushed any more: the row says what ``counters`` says.  ``close`` lets go of it."""
        cdef uint8_t[::1] b = _as_writable_bytes(row)
        cdef uint8_t* base
        if first < 1 or b.shape[0] < (first + EC_COUNT) * 8:
            raise ValueError(f"counter row of {b.shape[0]} bytes has no slots {first}.."
                             f"{first + EC_COUNT - 1}")
        base = &b[0]
        if <intptr_t>base % 8:
            raise ValueError("counter row is not 8-byte aligned")
        self._detach_counters()
        self._counter_row = b
        self.c_seq = <int64_t*>base
        self.tb_count_begin()
        memcpy(base + first * 8, self.c_own, sizeof(self.c_own))
        self.tb_count_in(<uint64_t*>(base + first * 8))
        self.tb_count_end()

    # -- batch calls (engine/io/batch.py is their specification) ------------------------------

    cdef int tb_client_ip(self, const uint8_t* pkt, size_t n, double now) noexcept nogil:
        cdef dp_packet p
        if dp_parse_ipv4_tcp(pkt, n, &p) != DP_OK:
            return 1
        self.tb_receive_client(&p, pkt, now)
        return 0

    def receive_client_ips(self, buf, offsets, lengths, Py_ssize_t n, double now):
        """``n`` captured IPv4 packets, packet i at buf[offsets[i]:offsets[i] + lengths[i]];
        returns how many did not parse (one reaching past buf does not)."""
        cdef const uint8_t[::1] b = _as_bytes_view(buf)
        cdef const int64_t[::1] offs = _tb_int64s(offsets, n)
        cdef const int64_t[::1] lens = _tb_int64s(lengths, n)
        cdef Py_ssize_t i, size = b.shape[0]
        cdef int64_t off, length
        cdef int errors = 0
        cdef const uint8_t* base = &b[0] if size else NULL
        if offs.shape[0] < n or lens.shape[0] < n:
            raise ValueError(f"{n} packets but {offs.shape[0]} offsets, {lens.shape[0]} lengths")
        with nogil:
            self.tb_count_begin()
            for i in range(n):
                off = offs[i]
                length = lens[i]
                if off < 0 or length < 0 or off + length > size:
                    errors += 1
                    continue
                errors += self.tb_client_ip(base + off, <size_t>length, now)
            self.tb_count_end()
        self._check()
        return errors

    def receive_ring(self, mem, uint64_t capacity, uint64_t pos, uint64_t nbytes, double now):
        """The packets of ``nbytes`` bytes of a shared-memory ring's records from byte
        ``pos`` read in place (engine/io/batch.py); returns how many did not parse."""
        cdef const uint8_t[::1] b = _as_bytes_view(mem)
        cdef int errors
        cdef const uint8_t* base = &b[0] if b.shape[0] else NULL
        if capacity < 8 or capacity > <uint64_t>b.shape[0] or pos >= capacity:
            raise ValueError(f"bad ring geometry: {capacity} bytes from {pos}")
        with nogil:
            self.tb_count_begin()
            errors = self.tb_receive_ring(base, capacity, pos, nbytes, now)
            self.tb_count_end()
        self._check()
        return errors

    cdef int tb_receive_ring(self, const uint8_t* base, uint64_t capacity, uint64_t pos,
                             uint64_t nbytes, double now) noexcept nogil:
        """receive_ring's walk (inside a count bracket; geometry checked by the caller),
        shared with the worker's Pump (pump.pxi)."""
        cdef uint64_t used = 0, at
        cdef int64_t step
        cdef uint32_t length, flags
        cdef int errors = 0
        while used < nbytes:
            step = dp_ring_step(base, capacity, pos + used, nbytes - used, &at, &length, &flags)
            if step < 0:
                errors += 1
                break
            used += <uint64_t>step
            if not dp_ring_is_wrap(length):
                errors += self.tb_client_ip(base + at, length, now)
        return errors

    def receive_records(self, buf, double now, Py_ssize_t record_bytes=WR_RESPONSE_RECORD_BYTES):
        """Response records back to back (frame counts removed): ``len(buf) // record_bytes``
        decoded in place and fed; returns the bytes consumed.  A record that does not decode
        is skipped and counted (``response_decode_errors``)."""
        cdef const uint8_t[::1] b = _as_bytes_view(buf)
        cdef Py_ssize_t count
        cdef const uint8_t* base = &b[0] if b.shape[0] else NULL
        if record_bytes <= 0:
            raise ValueError(f"record_bytes must be positive, not {record_bytes}")
        count = b.shape[0] // record_bytes
        with nogil:
            self.tb_count_begin()
            self.tb_receive_records(base, count, record_bytes, now)
            self.tb_count_end()
        self._check()
        return count * record_bytes

    def frame_reader(self, Py_ssize_t record_bytes=WR_RESPONSE_RECORD_BYTES, bint combined=True):
        """A FrameReader (frames.pxi) into this table: one call per intercept read."""
        return FrameReader(self, record_bytes, combined)

    cdef void tb_receive_records(self, const uint8_t* base, Py_ssize_t count,
                                 Py_ssize_t record_bytes, double now) noexcept nogil:
        """``count`` records of ``record_bytes`` back to back at ``base`` (inside a count
        bracket): receive_records' loop, shared with FrameReader.feed."""
        cdef Py_ssize_t i
        cdef dp_packet p
        for i in range(count):
            if wr_decode_record(base + i * record_bytes, record_bytes, &p) < 0:
                self.c[EC_RESPONSE_DECODE_ERRORS] += 1
                continue
            self.tb_receive_response(&p, base + i * record_bytes, now)

    def drain_into(self, sendbuf):
        """drain()'s routes, and its packets written back to back into ``sendbuf.data``
        (through ``sendbuf.view``) with their lengths in ``sendbuf.lengths``: returns
        (routes, n).  What does not fit stays queued for the next call (engine/io/batch.py)."""
        cdef uint8_t[::1] data = sendbuf.view
        cdef uint32_t[::1] lengths = sendbuf.lengths
        cdef size_t cap = data.shape[0], max_n = lengths.shape[0], off = 0, size, i
        cdef uint32_t n = 0
        cdef EEvent* r
        routes = []
        if self.pend_at >= self.out.n:
            eout_reset(&self.out)
            self.pend_at = 0
            self.pend_off = 0
            if self.touched_n:
                self.routes_n = 0
                self.tb_count_begin()
                self.tb_drain_out()
                self.tb_count_end()
                r = self.routes
                routes = [
                    _RouteNeeded(r[i].cip, r[i].cport, r[i].tip, r[i].tport)
                    for i in range(self.routes_n)
                ]
                self.routes_n = 0
        with nogil:
            while self.pend_at < self.out.n:
                size = self.out.lens[self.pend_at]
                if n == max_n or off + size > cap:
                    break
                memcpy(&data[0] + off, self.out.buf + self.pend_off, size)
                lengths[n] = <uint32_t>size
                off += size
                n += 1
                self.pend_off += size
                self.pend_at += 1
        self._check()
        return routes, n

    @property
    def counters(self):
        """A Counter built from the C array (zero entries left out)."""
        cdef int i
        c = _tb_collections.Counter()
        for i in range(EC_COUNT):
            if self.c[i]:
                c[EC_NAMES[i]] = <int64_t>self.c[i]
        return c

    @property
    def active(self):
        return self.nresp

    @property
    def lingering(self):
        return <int64_t>self.c[EC_TW]

    @property
    def sent(self):
        """SessionTable.sent: the ``send`` counter, without building ``counters``."""
        return <int64_t>self.c[EC_SEND]

    @property
    def unsend(self):
        return self.unsend_total

    @property
    def held_bytes(self):
        return self.held_total

    @property
    def allocator(self):
        return TupleAllocator.view(&self.alloc, self, self._history, self._pool)

    @property
    def heap_size(self):
        """Items in the timer heap (live and stale): for tests of its compaction."""
        return self.heap_n

    @property
    def index_bytes(self):
        """Bytes of the table's C indexes (flow, response and refused maps, the allocator's
        maps, the timer heap): what grows with a flood and shrinks after it."""
        return ((self.refused.cap + self.alloc.groups.cap) * sizeof(hslot)
                + (self.flows.cap + self.alloc.state.cap) * sizeof(uint64_t)
                + self.alloc.state.records * sizeof(TTuple)
                + self.heap_cap * sizeof(THeapItem))

    @property
    def slab_bytes(self):
        """Bytes of the slab's chunks (the entries and the lingering records)."""
        return self.slab.chunks * SB_CHUNK_BYTES

    @staticmethod
    def set_seq_limit(limit=None):
        """Tests: the timer heap's last sequence number before they are renumbered (None:
        as built, 2 ** TH_SEQ_BITS - 1)."""
        global TB_SEQ_LIMIT
        TB_SEQ_LIMIT = TH_SEQ_MASK if limit is None else min(max(int(limit), 1), TH_SEQ_MASK)

    @staticmethod
    def set_heap_slack(size_t slack):
        """Tests: the compaction threshold (table.HEAP_SLACK)."""
        global TB_HEAP_SLACK
        TB_HEAP_SLACK = slack

    def live_routes(self):
        cdef TEntry* e = self.order_head
        out = []
        while e != NULL:
            if not e.frozen and e.s.state < ST_LINGER:
                out.append(_RouteNeeded(e.s.client_ip, e.s.client_port, e.s.target_ip,
                                        e.s.target_port))
            e = e.next
        return out

    def set_route_down(self, down, double now):
        cdef TEntry* e = self.order_head
        cdef bint d = bool(down)
        if d == self.route_down:
            return
        self.route_down = d
        self.now = now
        self.tb_count_begin()
        while e != NULL:
            if not e.frozen and e.s.state < ST_LINGER:
                sess_handle_route_down(e.s, d, now)
                if not d:
                    self.tb_touch(e)
            e = e.next
        self.tb_count_end()
        self._check()

    def end_input(self, double now):
        cdef TEntry* e = self.order_head
        cdef int ended = 0
        self.now = now
        self.tb_count_begin()
        while e != NULL:
            if not e.frozen and sess_end_input(e.s, now):
                ended += 1
                self.tb_touch(e)
            e = e.next
        self.tb_count_end()
        self._check()
        return ended

    def shed_half_open(self, double now, limit=None):
        cdef double cutoff = now - TB_HALF_OPEN_SHED_AGE_S
        cdef TEntry* e = self.order_head
        cdef size_t n = self.nresp, nu = 0, na = 0, k, total
        cdef TEntry** unanswered
        cdef TEntry** answered
        self.now = now
        unanswered = <TEntry**>malloc((n + 1) * sizeof(TEntry*))
        answered = <TEntry**>malloc((n + 1) * sizeof(TEntry*))
        if unanswered == NULL or answered == NULL:
            free(unanswered)
            free(answered)
            raise MemoryError()
        while e != NULL:
            # half_open first: False once ended, and a lingering session has no created_at
            if not e.frozen and sess_half_open(e.s) and e.s.created_at <= cutoff:
                if e.s.state > ST_SYN_SENT:
                    answered[na] = e
                    na += 1
                else:
                    unanswered[nu] = e
                    nu += 1
            e = e.next
        total = nu + na
        if limit is not None:
            total = min(total, <size_t>max(0, limit))
        self.tb_count_begin()
        for k in range(total):
            e = unanswered[k] if k < nu else answered[k - nu]
            sess_shed_half_open(e.s, now)
            self.tb_touch(e)
        self.tb_count_end()
        free(unanswered)
        free(answered)
        self._check()
        return total

    def forget_ended(self, double now):
        cdef TEntry* e = self.order_head
        cdef TEntry* nxt
        self.now = now
        self.tb_count_begin()
        while e != NULL:
            nxt = e.next
            if tb_state(e) >= ST_LINGER and not e.gone:
                self.tb_remove(e, now)
            e = nxt
        self.tb_count_end()
        self._check()

    def note_capture_loss(self, double now):
        self.has_loss = True
        self.loss_at = now

    def expire_refused(self, double now):
        cdef double cutoff = now - TB_REFUSED_IDLE_S
        cdef size_t i, n = 0
        cdef hslot* s
        stale = []
        for i in range(self.refused.cap):
            s = &self.refused.slots[i]
            if s.used and s.d < cutoff:
                stale.append((s.k0, s.k1))
        for k0, k1 in stale:
            s = hm_get(&self.refused, k0, k1)
            if s != NULL:
                hm_del(&self.refused, s)


cdef uint8_t[::1] _as_writable_bytes(object buf):
    """A writable byte view of a buffer (TypeError if it is read-only)."""
    mv = memoryview(buf)
    if mv.readonly:
        raise TypeError("counter row: a writable buffer is needed")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


cdef const uint8_t[::1] _as_bytes_view(object buf):
    """A byte view of any buffer (bytes, bytearray, memoryview, mmap, numpy)."""
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1 or not mv.c_contiguous:
        mv = mv.cast("B")
    if mv.format != "B":
        mv = mv.cast("B")
    return mv


cdef object _tb_int64s(object values, Py_ssize_t n):
    """The first ``n`` of ``values`` as a C-contiguous int64 buffer: ``values`` itself when
    it is one, a copy when it is a buffer of uint32 (``array("I")``, what the worker
    passes), else numpy's conversion (numpy is imported only then)."""
    cdef const int64_t[::1] i64
    cdef const uint32_t[::1] u32
    cdef int64_t[::1] out
    cdef Py_ssize_t i
    try:
        i64 = values
        return values
    except (TypeError, ValueError, BufferError):
        pass
    try:
        u32 = values
    except (TypeError, ValueError, BufferError):
        import numpy as np

        return np.ascontiguousarray(values[:n], dtype=np.int64)
    n = min(n, u32.shape[0])
    copy = memoryview(bytearray(8 * n)).cast("q")
    out = copy
    for i in range(n):
        out[i] = u32[i]
    return copy
