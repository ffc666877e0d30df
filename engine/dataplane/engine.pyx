# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled session engine (design §4-§5): sessions, rewrite, tuple allocation, table.

A port of engine/core/ (session.py, session_parts.py, rewrite.py, table.py), which is the
specification: the same inputs give the same packets, events and counters.  The per-packet
functions work on C types only; the classes at the end of each part are the Python API
(``Table``: engine/core/table.SessionTable's; ``TupleAllocator``: rewrite.TupleAllocator's;
``Session``: TcpSession's, for tests).
"""

from libc.stdint cimport (
    int8_t, uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t, intptr_t,
)

include "counters.pxi"   # EC_* counter indices, EC_NAMES
include "session.pxi"    # the session state machine (and its test wrapper, Session)
include "hmap.pxi"       # the C hash map of the allocator and the table
include "rewrite.pxi"    # -x/-c/-r/-n/-f rules, TupleAllocator


# -- Python API of the rewrite part --------------------------------------------------------------


def choose_client_ip(orig_ip, pool, salt=0):
    """rewrite.choose_client_ip."""
    cdef Py_ssize_t n = len(pool)
    if not n:
        return orig_ip
    return pool[rw_mix64(((<uint64_t>(salt & 0xFFFFFFFF)) << 32) | <uint32_t>(orig_ip & 0xFFFFFFFF))
                % <uint64_t>n]


def sample_keep(uint32_t saddr, uint16_t sport, int percent):
    """rewrite.sample_keep."""
    return rw_sample_keep(saddr, sport, percent)


def gap(uint32_t port, uint32_t offset):
    """rewrite.gap."""
    return rw_gap(port, offset)


def shift_port(int port, int factor, int rand_shift):
    """rewrite.shift_port (same ValueErrors)."""
    if not 0 <= factor <= RW_PORT_SHIFT_FACTOR_MAX:
        raise ValueError(f"port shift factor {factor} is not in 0..{RW_PORT_SHIFT_FACTOR_MAX}")
    if not 0 <= rand_shift <= RW_RAND_SHIFT_MAX:
        raise ValueError(f"rand_shift {rand_shift} is not in 0..{RW_RAND_SHIFT_MAX}")
    return rw_shift_port(<uint16_t>port, factor, rand_shift)


def replica_port(int orig_port, int i, int rand_shift):
    """rewrite.replica_port (same ValueErrors)."""
    if not 1 <= i < RW_REPLICAS_MAX:
        raise ValueError(f"replica index {i} is not in 1..{RW_REPLICAS_MAX - 1}")
    if not 0 <= rand_shift <= RW_RAND_SHIFT_MAX:
        raise ValueError(f"rand_shift {rand_shift} is not in 0..{RW_RAND_SHIFT_MAX}")
    return rw_replica_port(<uint16_t>orig_port, i, rand_shift)


cdef int rw_fill_transfers(RwTransfer** out, object entries) except -1:
    """The -x entries as a malloc'd C array (the caller frees it); returns their count."""
    cdef list items = list(entries)
    cdef Py_ssize_t i, n = len(items)
    cdef RwTransfer* t = <RwTransfer*>calloc(n if n else 1, sizeof(RwTransfer))
    if t == NULL:
        raise MemoryError()
    for i in range(n):
        e = items[i]
        t[i].online_ip = e.online_ip
        t[i].online_port = e.online_port
        t[i].target_ip = e.target_ip
        t[i].target_port = e.target_port
    out[0] = t
    return <int>n


def match_transfer(entries, uint32_t dst_ip, uint16_t dst_port):
    """rewrite.match_transfer (through the C array the table uses)."""
    cdef RwTransfer* t = NULL
    cdef int n, i
    items = list(entries)
    n = rw_fill_transfers(&t, items)
    i = rw_match_transfer(t, n, dst_ip, dst_port)
    free(t)
    return None if i < 0 else items[i]


cdef object _history_block_views(RwHistory* h, object history):
    """Point ``h`` at ``history`` (None, a TupleHistory, or any object with its methods);
    returns what must stay referenced while h is used."""
    cdef uint8_t[::1] block
    cdef uint8_t* base
    cdef uint64_t slots
    memset(h, 0, sizeof(RwHistory))
    if history is None:
        return None
    raw = getattr(history, "block", None)
    if raw is not None:
        block = raw
        slots = history.slots
        if slots == 0 or slots & (slots - 1) or <uint64_t>block.shape[0] < 8 + 20 * slots:
            raise ValueError("the tuple history block does not match its slot count")
        base = &block[0]
        h.kind = 1
        h.live = <int32_t*>(base + 8)
        h.released = <double*>(base + 8 + 4 * slots)
        h.plain = <double*>(base + 8 + 12 * slots)
        h.mask = slots - 1
        keep = block
    else:
        h.kind = 2
        h.obj = <void*>history
        keep = history
    _history_refresh(h, history)
    return keep


cdef void _history_refresh(RwHistory* h, object history):
    """The history's ``inherited_until`` (set by its adopt) read into the C struct."""
    until = None if history is None else history.inherited_until
    h.inherited = until is not None
    h.inherited_until = until if until is not None else 0.0


_STAT_NAMES = (
    "allocated", "collisions", "quarantine_hits", "exhausted", "inherited_hits", "spilled",
    "reused",
)


cdef dict _stats_dict(const RwStats* s):
    return {
        "allocated": s.allocated,
        "collisions": s.collisions,
        "quarantine_hits": s.quarantine_hits,
        "exhausted": s.exhausted,
        "inherited_hits": s.inherited_hits,
        "spilled": s.spilled,
        "reused": s.reused,
    }


cdef class TupleAllocator:
    """rewrite.TupleAllocator's Python API over the C allocator (``TAlloc``).

    ``stats`` is a new dict on every read.  The history's ``inherited_until`` is read when the
    allocator is made and at every ``allocate``/``release`` call made through this class (the
    table's C path reads it once, at the table's start, after the worker's ``adopt``)."""

    cdef TAlloc* a
    cdef bint owner
    cdef object _history
    cdef object _keep
    cdef object _owner_ref
    cdef tuple _pool

    def __cinit__(self):
        self.a = NULL
        self.owner = False

    def __init__(self, time_wait_s, worker_index=0, worker_count=1, history=None, *,
                 pool=(), strict=False):
        cdef int span = RW_PORT_MAX - RW_PORT_MIN_UNPRIVILEGED + 1
        cdef uint32_t* cpool = NULL
        cdef Py_ssize_t i, n
        if not 1 <= worker_count <= span:
            raise ValueError(f"worker_count {worker_count} is not in 1..{span}")
        if not 0 <= worker_index < worker_count:
            raise ValueError(f"worker_index {worker_index} is not in 0..{worker_count - 1}")
        if time_wait_s < 0:
            raise ValueError(f"time_wait_s {time_wait_s} is negative")
        self._pool = tuple(pool)
        n = len(self._pool)
        self.a = <TAlloc*>calloc(1, sizeof(TAlloc))
        if self.a == NULL:
            raise MemoryError()
        self.owner = True
        if n:
            cpool = <uint32_t*>malloc(n * sizeof(uint32_t))
            if cpool == NULL:
                raise MemoryError()
            for i in range(n):
                cpool[i] = self._pool[i]
        rc = ta_init(self.a, float(time_wait_s), worker_index, worker_count, cpool, n, strict)
        free(cpool)
        if rc < 0:
            raise MemoryError()
        self._history = history
        self._keep = _history_block_views(&self.a.history, history)

    @staticmethod
    cdef TupleAllocator view(TAlloc* a, object owner, object history, tuple pool):
        """A non-owning view of a table's allocator (kept alive by ``owner``)."""
        cdef TupleAllocator w = TupleAllocator.__new__(TupleAllocator)
        w.a = a
        w.owner = False
        w._owner_ref = owner
        w._history = history
        w._pool = pool
        return w

    def __dealloc__(self):
        if self.owner and self.a != NULL:
            ta_free(self.a)
            free(self.a)
        self.a = NULL

    @property
    def time_wait_s(self):
        return self.a.time_wait_s

    @property
    def worker_index(self):
        return self.a.worker_index

    @property
    def worker_count(self):
        return self.a.worker_count

    @property
    def history(self):
        return self._history

    @property
    def pool(self):
        return self._pool

    @property
    def strict(self):
        return bool(self.a.strict)

    @property
    def stats(self):
        return _stats_dict(&self.a.stats)

    @property
    def ports_per_client(self):
        return self.a.slots

    def __len__(self):
        return self.a.state.n

    @property
    def live_count(self):
        return self.a.live_n

    @property
    def quarantined_count(self):
        return self.a.state.n - self.a.live_n

    def owns_port(self, port):
        return bool(ta_owns_port(self.a, port))

    def preferred(self, int64_t port):
        if port < RW_PORT_MIN_UNPRIVILEGED:
            port += RW_PORT_MIN_UNPRIVILEGED
        return ta_port_at(self.a, ta_index_near(self.a, port))

    def is_free(self, uint32_t client_ip, uint16_t port, uint32_t target_ip,
                uint16_t target_port, double now):
        cdef uint64_t k0
        cdef uint32_t k1
        ta_expire(self.a, now)
        hm_key4(client_ip, port, target_ip, target_port, &k0, &k1)
        return ts_find(&self.a.state, k0, k1) == self.a.state.cap

    def allocate(self, uint32_t client_ip, int64_t preferred_port, uint32_t target_ip,
                 uint16_t target_port, double now, fallback_ips=(), syn=None):
        cdef uint32_t ip = 0
        cdef uint16_t port = 0
        cdef uint32_t* fb = NULL
        cdef Py_ssize_t i, nfb = len(fallback_ips)
        cdef int rc
        _history_refresh(&self.a.history, self._history)
        if nfb:
            fb = <uint32_t*>malloc(nfb * sizeof(uint32_t))
            if fb == NULL:
                raise MemoryError()
            for i in range(nfb):
                fb[i] = fallback_ips[i]
        if syn is None:
            rc = ta_allocate(self.a, client_ip, preferred_port, target_ip, target_port, now,
                             fb, nfb, False, 0, False, &ip, &port)
        else:
            rc = ta_allocate(self.a, client_ip, preferred_port, target_ip, target_port, now,
                             fb, nfb, True, syn.seq & 0xFFFFFFFF, bool(syn.ts), &ip, &port)
        free(fb)
        if rc < 0:
            raise MemoryError()
        return (ip, port) if rc else None

    def release(self, uint32_t client_ip, int64_t port, uint32_t target_ip,
                uint16_t target_port, double now, end_seq=None, ts_last=None):
        _history_refresh(&self.a.history, self._history)
        if ta_release(self.a, client_ip, port, target_ip, target_port, now,
                      end_seq is not None, 0 if end_seq is None else end_seq & 0xFFFFFFFF,
                      ts_last is not None, 0 if ts_last is None else ts_last) < 0:
            raise MemoryError()

    def close(self):
        """Let go of the tuple history's shared block (see Table.close)."""
        if self.owner:
            memset(&self.a.history, 0, sizeof(RwHistory))
            self._keep = None

    def tuples(self):
        """{(client ip, port, target ip, target port): None (live) or its release time}: the
        Python allocator's ``_state`` (for tests)."""
        cdef size_t i
        cdef TTuple* t
        cdef uint64_t k0
        cdef uint32_t k1
        out = {}
        for i in range(self.a.state.cap):
            if self.a.state.slots[i]:
                ts_key(self.a.state.slots[i], &k0, &k1)
                t = ts_rec(self.a.state.slots[i])
                out[(<uint32_t>(k0 >> 32), k1 >> 16, <uint32_t>(k0 & 0xFFFFFFFFu),
                     k1 & 0xFFFF)] = None if ts_live(self.a.state.slots[i]) else t.d
        return out


include "table.pxi"      # SessionTable: flows, responses, timers, drain; class Table
include "frames.pxi"     # FrameReader: an intercept connection's reads into the table
include "pump.pxi"       # Pump: a worker wake-up's ring batches, timers, drain and sendmmsg
