# The -x/-c/-r/-n/-f rewrite rules and the TupleAllocator (included by engine.pyx).
#
# A port of engine/core/rewrite.py (the specification: read its theory of operation) and of the
# allocator's side of engine/io/tuple_history.py.  Same results for the same inputs: the same
# (ip, port) handed out, the same stats, the same shared-memory history block written bit for
# bit, so a Python worker and a compiled one can follow each other on one block.  Addresses
# are uint32 in host order holding the four network-order bytes big-endian (1.2.3.4 ==
# 0x01020304), as in rewrite.py.

from libc.math cimport isnan
from libc.stdint cimport uintptr_t


cdef extern from *:
    """
    #include <stdint.h>
    /* engine/io/tuple_history.py TupleHistory._slot: Python's ints are exact, the products
       reach 112 bits, and the result reads bits up to 65 of their xor: 128-bit arithmetic. */
    static inline uint64_t th_slot_of(uint32_t cip, uint16_t port, uint32_t tip, uint16_t tport,
                                      uint64_t mask) {
        unsigned __int128 a = (unsigned __int128)((uint64_t)cip << 16)
            * (unsigned __int128)0x9E3779B97F4A7C15ULL;
        unsigned __int128 b = (unsigned __int128)(((uint64_t)tip << 16) | tport)
            * (unsigned __int128)0xC2B2AE3D27D4EB4FULL;
        unsigned __int128 h = a ^ b;
        h ^= h >> 31;
        return ((uint64_t)(h ^ (h >> 17)) + port) & mask;
    }
    """
    uint64_t th_slot_of(uint32_t cip, uint16_t port, uint32_t tip, uint16_t tport,
                        uint64_t mask) noexcept nogil


cdef enum:
    RW_PORT_MIN_UNPRIVILEGED = 1024
    RW_PORT_MAX = 65535
    RW_RAND_SHIFT_MAX = 511
    RW_REPLICAS_MAX = 1023
    RW_PORT_SHIFT_FACTOR_MAX = 255
    RW_REUSE_PROBES_MAX = 256          # rewrite.py REUSE_PROBES_MAX
    RW_CLAIM_BUSY_PROBES_MAX = 256     # rewrite.py CLAIM_BUSY_PROBES_MAX
    RW_TS_CLOCK_HZ = 1000              # tcpseq.TS_CLOCK_HZ
    RW_LOCALHOST_IP = 0x7F000001


# -- pure formulas (rewrite.py) ------------------------------------------------------------------


cdef inline uint64_t rw_mix64(uint64_t value) noexcept nogil:
    """rewrite._mix64: splitmix64's finaliser."""
    cdef uint64_t z = value + <uint64_t>0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EB
    return z ^ (z >> 31)


cdef inline uint32_t rw_choose_client_ip(uint32_t orig_ip, const uint32_t* pool, size_t n,
                                         uint32_t salt) noexcept nogil:
    """rewrite.choose_client_ip."""
    if n == 0:
        return orig_ip
    return pool[rw_mix64((<uint64_t>salt << 32) | orig_ip) % n]


cdef inline bint rw_sample_keep(uint32_t saddr, uint16_t sport, int percent) noexcept nogil:
    """rewrite.sample_keep: C's LE-raw formula (spec §3.3 step 7)."""
    cdef uint32_t saddr_le, sport_le, k
    if not (0 < percent < 100):
        return True
    saddr_le = (((saddr & 0xFF) << 24) | ((saddr & 0xFF00) << 8)
                | ((saddr >> 8) & 0xFF00) | (saddr >> 24))
    sport_le = ((sport & 0xFF) << 8) | ((sport >> 8) & 0xFF)
    k = (sport_le + saddr_le) & 0xFFFF
    k = ((k >> 8) + (k & 0xFF)) % 100
    return k < <uint32_t>percent


cdef inline uint16_t rw_gap(uint32_t port, uint32_t offset) noexcept nogil:
    """rewrite.gap (spec §3.4)."""
    cdef uint32_t total = port + offset
    return <uint16_t>((total if total < 65536 else RW_PORT_MIN_UNPRIVILEGED + offset) & 0xFFFF)


cdef inline uint16_t rw_shift_port(uint16_t port, uint32_t factor, uint32_t rand_shift) noexcept nogil:
    """rewrite.shift_port; the ranges are checked once, in the config (or the wrapper)."""
    if factor == 0:
        return port
    return rw_gap(port, (factor << 11) + rand_shift)


cdef inline uint16_t rw_replica_port(uint16_t port, uint32_t i, uint32_t rand_shift) noexcept nogil:
    """rewrite.replica_port."""
    return rw_gap(port, ((2 * i - 1) << 5) + rand_shift)


cdef inline uint32_t rw_ts_clock(double now) noexcept nogil:
    """tcpseq.ts_clock: int() truncates toward zero, then the low 32 bits."""
    return <uint32_t><int64_t>(now * RW_TS_CLOCK_HZ)


cdef inline bint rw_after(uint32_t a, uint32_t b) noexcept nogil:
    """tcpseq.after: a is later than b in 32-bit sequence space."""
    cdef uint32_t d = a - b
    return 0 < d < 0x80000000u


ctypedef struct RwTransfer:
    uint32_t online_ip      # 0: any local address
    uint32_t target_ip
    uint16_t online_port
    uint16_t target_port


cdef inline int rw_match_transfer(const RwTransfer* t, size_t n, uint32_t dst_ip,
                                  uint16_t dst_port) noexcept nogil:
    """rewrite.match_transfer: the index of the first match, or -1."""
    cdef size_t i
    for i in range(n):
        if t[i].online_port == dst_port and (t[i].online_ip == 0 or t[i].online_ip == dst_ip):
            return <int>i
    return -1


# -- the tuple history (engine/io/tuple_history.py), through function pointers ------------------
#
# Production: the shared block (th_block_*, plain C).  Tests may hand the Python allocator any
# object with the history's methods; the compiled one calls them through th_obj_* (with the
# GIL): that branch is never taken with a real TupleHistory.


ctypedef struct RwHistory:
    int kind                 # 0 none, 1 the shared block, 2 a Python object (tests)
    int32_t* live
    double* released
    double* plain
    uint64_t mask
    void* obj                # kind 2: the object (a borrowed reference the wrapper keeps)
    bint inherited           # inherited_until is not None
    double inherited_until


cdef void th_record_live(RwHistory* h, uint32_t cip, uint16_t port, uint32_t tip,
                         uint16_t tport) noexcept nogil:
    cdef uint64_t i
    if h.kind == 1:
        i = th_slot_of(cip, port, tip, tport, h.mask)
        h.live[i] += 1
    elif h.kind == 2:
        with gil:
            (<object>h.obj).record_live((cip, port, tip, tport))


cdef void th_record_released(RwHistory* h, uint32_t cip, uint16_t port, uint32_t tip,
                             uint16_t tport, double now, bint was_live,
                             bint reusable) noexcept nogil:
    cdef uint64_t i
    if h.kind == 1:
        i = th_slot_of(cip, port, tip, tport, h.mask)
        if was_live and h.live[i] > 0:
            h.live[i] -= 1
        if h.released[i] < now:
            h.released[i] = now
        if not reusable and h.plain[i] < now:
            h.plain[i] = now
    elif h.kind == 2:
        with gil:
            (<object>h.obj).record_released((cip, port, tip, tport), now, was_live, reusable)


cdef bint th_busy(RwHistory* h, uint32_t cip, uint16_t port, uint32_t tip, uint16_t tport,
                  double since) noexcept nogil:
    cdef uint64_t i
    cdef double rel
    if h.kind == 1:
        i = th_slot_of(cip, port, tip, tport, h.mask)
        rel = h.released[i]
        return h.live[i] > 0 or (rel != 0.0 and rel >= since)
    if h.kind == 2:
        with gil:
            return bool((<object>h.obj).busy((cip, port, tip, tport), since))
    return False


cdef bint th_reusable(RwHistory* h, uint32_t cip, uint16_t port, uint32_t tip, uint16_t tport,
                      double since, double before) noexcept nogil:
    cdef uint64_t i
    cdef double pl
    if h.kind == 1:
        i = th_slot_of(cip, port, tip, tport, h.mask)
        pl = h.plain[i]
        return h.live[i] == 0 and h.released[i] < before and (pl == 0.0 or pl < since)
    if h.kind == 2:
        with gil:
            return bool((<object>h.obj).reusable((cip, port, tip, tport), since, before))
    return False


# -- TupleAllocator (rewrite.TupleAllocator) -------------------------------------------------------

# _state: one 8-byte slot per occupied tuple (TState), as the session table's flow index
# (table.pxi TIndex): a pointer, the top bits of its key's hash in its top bits, the key read
# from what it points to.  With TS_ENTRY set it is the session table's entry that has the tuple
# (live: the Python None; table.pxi looks responses up here; the key is the entry's session's or
# record's, tb_entry_tuple).  Else a TTuple, the allocator's own record of the tuple: flags
# RW_LIVE (live, not or not yet any table entry's: t.a is 0), or else quarantined since t.d;
# RW_CLOSED: _closed holds (end_seq, ts_last) for it, end_seq in the low 32 bits of t.a
# (RW_CLOSED_END: not -1), ts_last in its high 32 bits (RW_CLOSED_TS: not None).
cdef enum:
    RW_LIVE = 1
    RW_CLOSED = 2
    RW_CLOSED_TS = 4
    RW_CLOSED_END = 8

cdef enum:
    TS_ENTRY = 1                # a _state slot's value that is a table entry, not a TTuple


ctypedef struct TTuple:         # 32 bytes
    uint64_t k0                 # hm_key4 of the tuple
    uint32_t k1
    uint8_t flags
    double d
    int64_t a


ctypedef struct TState:
    uint64_t* slots             # 0: empty; else tag << TX_TAG_SHIFT | pointer
    size_t cap                  # a power of two; 0 before the first insert
    size_t n
    size_t records              # TTuple records in the slots
    TTuple* spare               # a freed record kept for the next one


cdef struct TEntry


cdef inline void ts_key(uint64_t v, uint64_t* k0, uint32_t* k1) noexcept nogil:
    cdef uint64_t q = v & TX_VALUE_MASK
    cdef TTuple* t
    if q & TS_ENTRY:
        tb_entry_tuple(<TEntry*><uintptr_t>(q & ~(<uint64_t>TS_ENTRY)), k0, k1)
    else:
        t = <TTuple*><uintptr_t>q
        k0[0] = t.k0
        k1[0] = t.k1


cdef inline TTuple* ts_rec(uint64_t v) noexcept nogil:
    """The slot's record; NULL: a table entry has the tuple (live)."""
    cdef uint64_t q = v & TX_VALUE_MASK
    return NULL if q & TS_ENTRY else <TTuple*><uintptr_t>q


cdef inline bint ts_live(uint64_t v) noexcept nogil:
    cdef TTuple* t = ts_rec(v)
    return t == NULL or (t.flags & RW_LIVE) != 0


cdef size_t ts_find(const TState* m, uint64_t k0, uint32_t k1) noexcept nogil:
    """The slot of the key, or m.cap when absent."""
    cdef size_t mask, i
    cdef uint64_t h, tag, v, j0
    cdef uint32_t j1
    if m.cap == 0:
        return 0
    h = hm_hash(k0, k1)
    tag = (h >> TX_TAG_SHIFT) << TX_TAG_SHIFT
    mask = m.cap - 1
    i = <size_t>h & mask
    while True:
        v = m.slots[i]
        if v == 0:
            return m.cap
        if v & ~TX_VALUE_MASK == tag:
            ts_key(v, &j0, &j1)
            if j0 == k0 and j1 == k1:
                return i
        i = (i + 1) & mask


cdef int ts_resize(TState* m, size_t cap) noexcept nogil:
    cdef uint64_t* old = m.slots
    cdef size_t old_cap = m.cap, j, i, mask = cap - 1
    cdef uint64_t k0
    cdef uint32_t k1
    cdef uint64_t* fresh = <uint64_t*>calloc(cap, sizeof(uint64_t))
    if fresh == NULL:
        return -1
    for j in range(old_cap):
        if old[j]:
            ts_key(old[j], &k0, &k1)
            i = <size_t>hm_hash(k0, k1) & mask
            while fresh[i]:
                i = (i + 1) & mask
            fresh[i] = old[j]
    free(old)
    m.slots = fresh
    m.cap = cap
    return 0


cdef TTuple* ts_new_rec(TState* m) noexcept nogil:
    """A record to fill (not yet counted); NULL: no memory, or a pointer with bits in the
    tag's place."""
    cdef TTuple* t = m.spare
    if t != NULL:
        m.spare = NULL
        return t
    t = <TTuple*>malloc(sizeof(TTuple))
    if t != NULL and <uint64_t><uintptr_t>t & (~TX_VALUE_MASK | <uint64_t>TS_ENTRY):
        free(t)
        return NULL
    return t


cdef TTuple* ts_put(TState* m, uint64_t k0, uint32_t k1, bint* created) noexcept nogil:
    """hm_put: the key's record, made (zeroed but for the key) when absent, or made of the
    table entry's slot (RW_LIVE, a = 0: the entry no longer has the tuple); NULL: no memory
    (nothing changed)."""
    cdef size_t mask, i
    cdef uint64_t h
    cdef TTuple* t
    i = ts_find(m, k0, k1)
    if i < m.cap:
        created[0] = False
        t = ts_rec(m.slots[i])
        if t != NULL:
            return t
        t = ts_new_rec(m)
        if t == NULL:
            return NULL
        t.flags = RW_LIVE
    else:
        created[0] = True
        t = ts_new_rec(m)
        if t == NULL:
            return NULL
        if (m.n + 1) * 10 > m.cap * 7:
            if ts_resize(m, m.cap * 2 if m.cap else HM_MIN_CAP) < 0:
                if m.spare == NULL:
                    m.spare = t
                else:
                    free(t)
                return NULL
        h = hm_hash(k0, k1)
        mask = m.cap - 1
        i = <size_t>h & mask
        while m.slots[i]:
            i = (i + 1) & mask
        m.slots[i] = (h >> TX_TAG_SHIFT) << TX_TAG_SHIFT
        m.n += 1
        t.flags = 0
    t.k0 = k0
    t.k1 = k1
    t.d = 0.0
    t.a = 0
    m.slots[i] = (m.slots[i] & ~TX_VALUE_MASK) | <uint64_t><uintptr_t>t
    m.records += 1
    return t


cdef inline void ts_drop_rec(TState* m, TTuple* t) noexcept nogil:
    m.records -= 1
    if m.spare == NULL:
        m.spare = t
    else:
        free(t)


cdef bint ts_hold(TState* m, size_t i, const TEntry* e) noexcept nogil:
    """Slot i's tuple (a record) given to the table entry e, whose key is the tuple's; False:
    a pointer with bits in the tag's place (nothing changed)."""
    cdef uint64_t v = <uint64_t><uintptr_t>e | TS_ENTRY
    cdef TTuple* t = ts_rec(m.slots[i])
    if v & ~TX_VALUE_MASK or t == NULL:
        return False
    m.slots[i] = (m.slots[i] & ~TX_VALUE_MASK) | v
    ts_drop_rec(m, t)
    return True


cdef void ts_del(TState* m, size_t i) noexcept nogil:
    """hm_del: slot i removed (its record, if any, freed), the run after it shifted back."""
    cdef size_t mask = m.cap - 1, j = i, home
    cdef uint64_t j0
    cdef uint32_t j1
    cdef TTuple* t = ts_rec(m.slots[i])
    if t != NULL:
        ts_drop_rec(m, t)
    while True:
        j = (j + 1) & mask
        if not m.slots[j]:
            break
        ts_key(m.slots[j], &j0, &j1)
        home = <size_t>hm_hash(j0, j1) & mask
        # Move j back to i unless its home lies cyclically in (i, j].
        if (j > i and (home <= i or home > j)) or (j < i and (home <= i and home > j)):
            m.slots[i] = m.slots[j]
            i = j
    m.slots[i] = 0
    m.n -= 1


cdef void ts_free(TState* m) noexcept nogil:
    """Everything freed: the records (not the table entries the slots point to)."""
    cdef size_t i
    cdef TTuple* t
    for i in range(m.cap):
        if m.slots[i]:
            t = ts_rec(m.slots[i])
            if t != NULL:
                free(t)
    free(m.slots)
    free(m.spare)
    memset(m, 0, sizeof(TState))


cdef int ts_shrink(TState* m) noexcept nogil:
    """hm_shrink for the tuple state (the spare record goes too when it shrinks)."""
    cdef size_t cap = m.cap
    if cap <= HM_MIN_CAP or m.n * 8 >= cap:
        return 0
    free(m.spare)
    m.spare = NULL
    while cap > HM_MIN_CAP and m.n * 10 <= (cap // 2) * 4:
        cap //= 2
    if m.n == 0:
        ts_free(m)
        return 0
    return ts_resize(m, cap)


# _groups: (client ip, 0, target ip, target port) -> occupied (slot.a), cursor (slot.d, an
# integer), spill (slot.aux: an index into spill_order, < 4096).


ctypedef struct RwExpiry:
    double t
    uint64_t k0
    uint32_t k1


ctypedef struct RwStats:
    uint64_t allocated
    uint64_t collisions
    uint64_t quarantine_hits
    uint64_t exhausted
    uint64_t inherited_hits
    uint64_t spilled
    uint64_t reused


ctypedef struct TAlloc:
    double time_wait_s
    double clock                 # -inf at start: the largest ``now`` seen
    uint32_t worker_index
    uint32_t worker_count
    uint32_t first
    uint32_t slots
    bint strict
    TState state
    hmap groups
    hmap pool_at                 # pool address -> its index (for spill_order)
    uint32_t* pool
    size_t npool
    RwExpiry* expiry             # a ring: expiry[(head + i) % cap], i < count
    size_t exp_head
    size_t exp_count
    size_t exp_cap
    RwHistory history
    RwStats stats
    uint64_t live_n              # tuples live (the Python live_count, kept as it changes)


cdef inline uint32_t ta_port_at(const TAlloc* a, uint32_t index) noexcept nogil:
    return a.first + index * a.worker_count


cdef inline uint32_t ta_index_near(const TAlloc* a, int64_t port) noexcept nogil:
    cdef int64_t wc = a.worker_count
    cdef int64_t num = port - <int64_t>a.first + (wc - 1) // 2
    # Python's // floors; num may be negative (a port below this worker's first).
    cdef int64_t index = num // wc if num >= 0 else -((-num + wc - 1) // wc)
    if index < 0:
        index = 0
    if index > <int64_t>a.slots - 1:
        index = <int64_t>a.slots - 1
    return <uint32_t>index


cdef inline bint ta_owns_port(const TAlloc* a, int64_t port) noexcept nogil:
    return (RW_PORT_MIN_UNPRIVILEGED <= port <= RW_PORT_MAX
            and port % a.worker_count == a.worker_index)


cdef int ta_init(TAlloc* a, double time_wait_s, uint32_t worker_index, uint32_t worker_count,
                 const uint32_t* pool, size_t npool, bint strict) noexcept nogil:
    """The ranges are checked by the caller (the wrapper raises ValueError).  -1: no memory."""
    cdef size_t i
    cdef hslot* s
    cdef bint created
    memset(a, 0, sizeof(TAlloc))
    a.time_wait_s = time_wait_s
    a.clock = -1.0 / 0.0
    a.worker_index = worker_index
    a.worker_count = worker_count
    a.first = RW_PORT_MIN_UNPRIVILEGED + (
        (<int64_t>worker_index - RW_PORT_MIN_UNPRIVILEGED) % <int64_t>worker_count
        + worker_count) % worker_count
    a.slots = (RW_PORT_MAX - a.first) // worker_count + 1
    a.strict = strict
    if npool:
        a.pool = <uint32_t*>malloc(npool * sizeof(uint32_t))
        if a.pool == NULL:
            return -1
        memcpy(a.pool, pool, npool * sizeof(uint32_t))
        a.npool = npool
        for i in range(npool):
            s = hm_put(&a.pool_at, pool[i], 0, &created)
            if s == NULL:
                return -1
            if created:  # a duplicate keeps its first index, as list.index does
                s.a = <int64_t>i
    return 0


cdef void ta_free(TAlloc* a) noexcept nogil:
    ts_free(&a.state)
    hm_free(&a.groups)
    hm_free(&a.pool_at)
    free(a.pool)
    a.pool = NULL
    free(a.expiry)
    a.expiry = NULL


cdef inline hslot* ta_group(TAlloc* a, uint32_t cip, uint32_t tip, uint16_t tport) noexcept nogil:
    """_group_for: made when absent (NULL: no memory)."""
    cdef bint created
    cdef uint64_t k0
    cdef uint32_t k1
    hm_key4(cip, 0, tip, tport, &k0, &k1)
    return hm_put(&a.groups, k0, k1, &created)


cdef int ta_expiry_push(TAlloc* a, double t, uint64_t k0, uint32_t k1) noexcept nogil:
    cdef size_t cap, i
    cdef RwExpiry* fresh
    if a.exp_count == a.exp_cap:
        cap = a.exp_cap * 2 if a.exp_cap else 64
        fresh = <RwExpiry*>malloc(cap * sizeof(RwExpiry))
        if fresh == NULL:
            return -1
        for i in range(a.exp_count):
            fresh[i] = a.expiry[(a.exp_head + i) % a.exp_cap]
        free(a.expiry)
        a.expiry = fresh
        a.exp_cap = cap
        a.exp_head = 0
    i = (a.exp_head + a.exp_count) % a.exp_cap
    a.expiry[i].t = t
    a.expiry[i].k0 = k0
    a.expiry[i].k1 = k1
    a.exp_count += 1
    return 0


cdef void ta_expire(TAlloc* a, double now) noexcept nogil:
    """_expire."""
    cdef double horizon
    cdef RwExpiry* e
    cdef TTuple* s
    cdef hslot* g
    cdef size_t i
    cdef uint64_t gk0
    cdef uint32_t gk1
    if now > a.clock:
        a.clock = now
    horizon = a.clock - a.time_wait_s
    while a.exp_count and a.expiry[a.exp_head].t <= horizon:
        e = &a.expiry[a.exp_head]
        a.exp_head = (a.exp_head + 1) % a.exp_cap
        a.exp_count -= 1
        i = ts_find(&a.state, e.k0, e.k1)
        s = ts_rec(a.state.slots[i]) if i < a.state.cap else NULL
        # Skip stale entries: the tuple was released again later (or already expired).
        if s != NULL and not (s.flags & RW_LIVE) and s.d == e.t:
            ts_del(&a.state, i)
            # group key: (client ip, 0, target ip, target port)
            gk0 = e.k0
            gk1 = e.k1 & 0xFFFF
            g = hm_get(&a.groups, gk0, gk1)
            if g != NULL:
                g.a -= 1
                if g.a == 0:
                    hm_del(&a.groups, g)
    if a.exp_count == 0:
        a.exp_head = 0


cdef bint ta_busy(TAlloc* a, bint use, uint32_t cip, uint16_t port, uint32_t tip,
                  uint16_t tport) noexcept nogil:
    """_inherited_busy's closure (``use``: the horizon lasts)."""
    if not use:
        return False
    if th_busy(&a.history, cip, port, tip, tport, a.clock - a.time_wait_s):
        a.stats.inherited_hits += 1
        return True
    return False


cdef int64_t ta_claim(TAlloc* a, uint32_t cip, uint32_t start, uint32_t tip, uint16_t tport,
                      bint busy) noexcept nogil:
    """_claim: the port claimed, or -1 (-2: no memory)."""
    cdef uint32_t port = ta_port_at(a, start), index, probes, k
    cdef uint64_t k0
    cdef uint32_t k1
    cdef TTuple* s
    cdef hslot* g
    cdef bint created
    hm_key4(cip, <uint16_t>port, tip, tport, &k0, &k1)
    if (ts_find(&a.state, k0, k1) == a.state.cap
            and not ta_busy(a, busy, cip, <uint16_t>port, tip, tport)):
        s = ts_put(&a.state, k0, k1, &created)
        if s == NULL:
            return -2
        s.flags = RW_LIVE
        a.live_n += 1
        g = ta_group(a, cip, tip, tport)
        if g == NULL:
            return -2
        g.a += 1
        return port
    g = ta_group(a, cip, tip, tport)
    if g == NULL:
        return -2
    if g.a >= a.slots:
        return -1
    index = <uint32_t>g.d
    probes = a.slots if not busy else min(a.slots, <uint32_t>RW_CLAIM_BUSY_PROBES_MAX)
    for k in range(probes):
        port = ta_port_at(a, index)
        index = index + 1 if index + 1 < a.slots else 0
        hm_key4(cip, <uint16_t>port, tip, tport, &k0, &k1)
        if ts_find(&a.state, k0, k1) == a.state.cap and not ta_busy(
            a, busy, cip, <uint16_t>port, tip, tport
        ):
            s = ts_put(&a.state, k0, k1, &created)
            if s == NULL:
                return -2
            s.flags = RW_LIVE
            a.live_n += 1
            g = ta_group(a, cip, tip, tport)  # hm_put on state leaves groups' slots in place
            g.a += 1
            g.d = index
            return port
    g.d = index
    return -1


cdef int64_t ta_reuse(TAlloc* a, uint32_t cip, uint32_t tip, uint16_t tport, uint32_t syn_seq,
                      bint syn_ts, double now, bint busy, bint* reused) noexcept nogil:
    """_reuse: the port (``reused`` set when it was quarantined), or -1 (-2: no memory)."""
    cdef uint32_t ts_now = rw_ts_clock(now) if syn_ts else 0
    cdef RwHistory* h = &a.history
    cdef bint inherited = h.kind != 0 and syn_ts and h.inherited and now < h.inherited_until
    cdef hslot* g
    cdef TTuple* s
    cdef size_t i
    cdef uint64_t k0
    cdef uint32_t k1, index, port, k, probes, ts_last
    cdef int64_t end_seq
    cdef double since
    cdef bint created
    hm_key4(cip, 0, tip, tport, &k0, &k1)
    g = hm_get(&a.groups, k0, k1)
    if g == NULL:
        if not busy:
            return -1
        g = ta_group(a, cip, tip, tport)
        if g == NULL:
            return -2
    since = a.clock - a.time_wait_s
    index = <uint32_t>g.d
    probes = min(a.slots, <uint32_t>RW_REUSE_PROBES_MAX)
    for k in range(probes):
        port = ta_port_at(a, index)
        index = index + 1 if index + 1 < a.slots else 0
        hm_key4(cip, <uint16_t>port, tip, tport, &k0, &k1)
        i = ts_find(&a.state, k0, k1)
        reused[0] = True
        if i < a.state.cap:
            s = ts_rec(a.state.slots[i])
            if s == NULL or not (s.flags & RW_CLOSED):
                continue  # live, or released without what the test needs
            end_seq = -1
            if s.flags & RW_CLOSED_END:
                end_seq = s.a & <int64_t>0xFFFFFFFFLL
            ts_last = <uint32_t>(<uint64_t>s.a >> 32)
            if not (
                (syn_ts and (s.flags & RW_CLOSED_TS) and rw_after(ts_now, ts_last))
                or (end_seq >= 0 and rw_after(syn_seq, <uint32_t>end_seq))
            ):
                continue
            s.flags = RW_LIVE
            s.a = 0                 # a live tuple's slot.a: its session table's entry
            a.live_n += 1
        elif not ta_busy(a, busy, cip, <uint16_t>port, tip, tport):
            # Free after all: the claim's look is bounded while the history is asked.
            reused[0] = False
            s = ts_put(&a.state, k0, k1, &created)
            if s == NULL:
                return -2
            s.flags = RW_LIVE
            a.live_n += 1
            g = ta_group(a, cip, tip, tport)
            g.a += 1
        elif inherited and th_reusable(h, cip, <uint16_t>port, tip, tport, since,
                                       now - 1.0 / RW_TS_CLOCK_HZ):
            s = ts_put(&a.state, k0, k1, &created)
            if s == NULL:
                return -2
            s.flags = RW_LIVE
            a.live_n += 1
            g = ta_group(a, cip, tip, tport)
            g.a += 1
        else:
            continue
        g.d = index
        return port
    return -1


cdef inline uint32_t ta_spill_ip(const TAlloc* a, size_t sticky_at, size_t j) noexcept nogil:
    """spill_order(pool[sticky_at], pool)[j]: the addresses after it, wrapping."""
    return a.pool[(sticky_at + 1 + j) % a.npool]


cdef int ta_allocate(TAlloc* a, uint32_t cip, int64_t preferred, uint32_t tip, uint16_t tport,
                     double now, const uint32_t* fallback, size_t nfallback, bint has_syn,
                     uint32_t syn_seq, bint syn_ts, uint32_t* out_ip,
                     uint16_t* out_port) noexcept nogil:
    """TupleAllocator.allocate: 1 claimed (out_*), 0 none, -1 no memory."""
    cdef uint32_t start, ip
    cdef uint64_t k0
    cdef uint32_t k1
    cdef hslot* s
    cdef hslot* g
    cdef RwHistory* h = &a.history
    cdef bint busy
    cdef int64_t port
    cdef size_t i, j, k, n = 0, sticky_at = 0, first_spill
    cdef bint reused
    ta_expire(a, now)
    if preferred < RW_PORT_MIN_UNPRIVILEGED:
        preferred += RW_PORT_MIN_UNPRIVILEGED
    start = ta_index_near(a, preferred)
    hm_key4(cip, <uint16_t>ta_port_at(a, start), tip, tport, &k0, &k1)
    i = ts_find(&a.state, k0, k1)
    if i < a.state.cap:
        if ts_live(a.state.slots[i]):
            a.stats.collisions += 1
        else:
            a.stats.quarantine_hits += 1
    busy = h.kind != 0 and h.inherited and now < h.inherited_until
    for i in range(nfallback + 1):
        ip = cip if i == 0 else fallback[i - 1]
        port = ta_claim(a, ip, start, tip, tport, busy)
        if port == -2:
            return -1
        if port >= 0:
            return ta_claimed(a, ip, <uint16_t>port, tip, tport, out_ip, out_port)
    if a.npool:
        s = hm_get(&a.pool_at, cip, 0)
        if s != NULL and a.npool > 1:
            sticky_at = <size_t>s.a
            n = a.npool - 1
    if n:
        g = ta_group(a, cip, tip, tport)
        if g == NULL:
            return -1
        first_spill = g.aux
        for k in range(n):
            j = (first_spill + k) % n
            ip = ta_spill_ip(a, sticky_at, j)
            port = ta_claim(a, ip, start, tip, tport, busy)
            if port == -2:
                return -1
            if port >= 0:
                g = ta_group(a, cip, tip, tport)
                if g == NULL:
                    return -1
                g.aux = <uint16_t>j
                a.stats.spilled += 1
                return ta_claimed(a, ip, <uint16_t>port, tip, tport, out_ip, out_port)
    if has_syn and not a.strict:
        for i in range(nfallback + 1 + n):
            if i == 0:
                ip = cip
            elif i <= nfallback:
                ip = fallback[i - 1]
            else:
                ip = ta_spill_ip(a, sticky_at, i - 1 - nfallback)
            port = ta_reuse(a, ip, tip, tport, syn_seq, syn_ts, now, busy, &reused)
            if port == -2:
                return -1
            if port >= 0:
                if reused:
                    a.stats.reused += 1
                return ta_claimed(a, ip, <uint16_t>port, tip, tport, out_ip, out_port)
    a.stats.exhausted += 1
    return 0


cdef inline int ta_claimed(TAlloc* a, uint32_t ip, uint16_t port, uint32_t tip, uint16_t tport,
                           uint32_t* out_ip, uint16_t* out_port) noexcept nogil:
    a.stats.allocated += 1
    th_record_live(&a.history, ip, port, tip, tport)
    out_ip[0] = ip
    out_port[0] = port
    return 1


cdef int ta_release(TAlloc* a, uint32_t cip, int64_t port, uint32_t tip, uint16_t tport,
                    double now, bint has_end, uint32_t end_seq, bint has_ts,
                    uint32_t ts_last) noexcept nogil:
    """TupleAllocator.release; -1: no memory."""
    cdef uint64_t k0
    cdef uint32_t k1
    cdef TTuple* s
    cdef hslot* g
    cdef bint created, was_live
    ta_expire(a, now)
    if not ta_owns_port(a, port):
        return 0
    hm_key4(cip, <uint16_t>port, tip, tport, &k0, &k1)
    s = ts_put(&a.state, k0, k1, &created)
    if s == NULL:
        return -1
    was_live = not created and (s.flags & RW_LIVE)
    if was_live:
        a.live_n -= 1
    s.d = a.clock
    if not has_end and not has_ts:
        s.flags = 0
        s.a = 0
    else:
        s.flags = RW_CLOSED | (RW_CLOSED_TS if has_ts else 0) | (RW_CLOSED_END if has_end else 0)
        s.a = <int64_t>((<uint64_t>(ts_last if has_ts else 0) << 32)
                        | (end_seq if has_end else 0))
    if created:
        g = ta_group(a, cip, tip, tport)
        if g == NULL:
            return -1
        g.a += 1
    th_record_released(&a.history, cip, <uint16_t>port, tip, tport, a.clock, was_live, has_ts)
    return ta_expiry_push(a, a.clock, k0, k1)
