# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The capture process's per-packet path in C: TPACKET_V3 block walk and pcap record walk,
-x prefilter, flow hash, shed gate and the copy into the workers' rings.

Theory of operation
-------------------
This is the compiled twin of five pieces of Python that stay its specification:

* the block walk of engine/io/capture.py (``block_frames``, ``frame_fields``,
  ``ip_flow_fields``, ``parse_block``): frames chained by tp_next_offset, the IP packet at
  tp_net, our own outgoing frames (and with ``host_only`` everything not PACKET_HOST) left
  out, frames cut short by the block counted, and a block that lies (a frame header or its
  data outside the block, a tp_next_offset of 0 before num_pkts frames) walked up to its
  first bad frame and counted once as ``capture_block_errors``;
* ``TransferFilter._keep`` (the -x rule, when the kernel program is not exact): the same
  checks, in the same order, with the same counters;
* ``flow_worker`` (engine/proc/capture.py, which passes its multiplier in: this layer
  imports neither io nor proc): Fibonacci hashing of client ip << 16 | port, the worker
  from the top bits;
* ``FlowGate`` (engine/core/shed.py): ``Gate`` keeps the known and shed flows in two C hash
  tables (open addressing, linear probing, deletion by backward shift) and decides packet by
  packet what FlowGate decides for a batch (its batch rules reduce to one decision per
  packet in order: a flow is fast or slow for the whole batch, and the last packet of a flow
  sets its state);
* ``Ring.push_frames`` (engine/io/ring.py, whose ``record_layout()`` the walker is given):
  a record's length, flags (loss mark on the first packet written after a drop) and
  timestamp, then the data, after a wrap mark when it does not fit before the end of the
  area; a full ring drops and counts, a packet larger than the ring's largest is counted.

``BlockWalker.step`` walks one block from where it stopped: per packet only C types, no
Python object and no Python call (every per-packet function is ``noexcept nogil``, so the
compiler refuses any; tests/unit/test_dataplane_packet.py checks their ``cython -a`` score).  It stops early at a packet larger than -M (a GRO
aggregate the caller splits in Python, engine/codec/packet.split_mtu, then calls ``step``
again), so every ring gets its packets in capture order.  The rings' producer state (head,
free bytes, loss mark) is loaded from the Ring objects when ``step`` starts and written back
when it returns; counters are C arrays added to the callers' Counters once per call.

``PcapWalker`` (a BlockWalker: the same rings, rule, hash, gate and copy) walks the records
of an offline replay's pcap file instead, from a buffer the caller fills with large reads:
the record loop of engine/io/capture.py's ``PcapFileSource`` (engine/codec/pcapfile.py's
header checks, ``packet.l2_offset``, ``TransferFilter.keep_with_pure_acks``), the schedule
of its ``ReplayPacer`` (whose state it continues, call by call) and
``CaptureProcess.dispatch``.  Those stay its specification
(tests/unit/test_dataplane_pcapwalk.py holds the two equal on real and hostile files).

Untrusted input: the block is the kernel's, but nothing here trusts it: every frame header
and every packet is checked against the end of the block before it is read, and the ring
copy against the ring's largest packet and its free bytes; a pcap record header and its
frame are checked against the end of the buffer's data.  tests/fuzz/dataplane_asan.py
fuzzes ``step`` and ``walk`` under ASan.
"""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from libc.stdint cimport int8_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memmove

from array import array

from engine.core.shed import (
    EXPIRE_INTERVAL_S, REASON_MEMORY, REASON_RING_FULL, SHED_FLOWS_MAX, SHED_IDLE_S,
    SHED_RING_HIGH, SHED_RING_LOW,
)

__all__ = [
    "WALK_BAD_RECORD", "WALK_FULL", "WALK_GATE", "WALK_MORE", "WALK_WAIT", "BlockWalker",
    "Gate", "PcapWalker", "flow_worker", "walk_counters",
]

# -- constants ------------------------------------------------------------------------------

cdef enum:
    # tpacket_block_desc / tpacket_hdr_v1 (linux/if_packet.h)
    BLOCK_NUM_PKTS = 12
    BLOCK_FIRST = 16
    # tpacket3_hdr, then sockaddr_ll at 48 (sll_pkttype at 58)
    FRAME_NEXT = 0
    FRAME_SNAPLEN = 12
    FRAME_LEN = 16
    FRAME_MAC = 24
    FRAME_NET = 26
    FRAME_PKTTYPE = 58
    FRAME_HEADER_NEED = 60    # bytes of a frame header that are read
    PACKET_HOST = 0
    PACKET_OUTGOING = 4
    IPPROTO_TCP = 6
    TCP_FIN = 0x01
    TCP_SYN = 0x02
    TCP_RST = 0x04
    TCP_ACK = 0x10
    TCP_END = TCP_FIN | TCP_RST
    TCP_SYN_ACK = TCP_SYN | TCP_ACK
    REASON_NONE = 0
    REASON_RING = 1
    REASON_MEM = 2

# Counters of one step (indexes into a C array; names below, per owner).
cdef enum:
    C_SRC_TRUNCATED = 0
    C_SRC_PACKETS
    C_SRC_BYTES
    C_SRC_ACCEPTED
    C_SRC_BLOCK_ERRORS
    C_FLT_PACKETS
    C_FLT_BYTES
    C_FLT_NOT_TCP
    C_FLT_FRAGMENT
    C_FLT_NOT_MATCHED
    C_FLT_PURE_ACK
    C_FLT_ACCEPTED
    C_GATE_DROP_SHED
    C_GATE_SHED_RING
    C_GATE_SHED_MEMORY
    C_OFF_RECORDS
    C_OFF_BYTES_READ
    C_OFF_PACKETS
    C_OFF_L2_ERROR
    C_COUNT

_SOURCE_NAMES = (
    (C_SRC_TRUNCATED, "capture_truncated"),
    (C_SRC_PACKETS, "capture_packets"),
    (C_SRC_BYTES, "capture_bytes"),
    (C_SRC_ACCEPTED, "capture_accepted"),
    (C_SRC_BLOCK_ERRORS, "capture_block_errors"),
)
_FILTER_NAMES = (
    (C_FLT_PACKETS, "capture_packets"),
    (C_FLT_BYTES, "capture_bytes"),
    (C_FLT_NOT_TCP, "capture_not_tcp"),
    (C_FLT_FRAGMENT, "capture_fragment"),
    (C_FLT_NOT_MATCHED, "capture_not_matched"),
    (C_FLT_PURE_ACK, "capture_pure_ack_dropped"),
    (C_FLT_PURE_ACK, "drop_pure_ack"),
    (C_FLT_ACCEPTED, "capture_accepted"),
)
_FILE_NAMES = (
    (C_SRC_TRUNCATED, "capture_truncated"),
    (C_OFF_RECORDS, "offline_records"),
    (C_OFF_BYTES_READ, "offline_bytes_read"),
    (C_OFF_PACKETS, "offline_packets"),
    (C_OFF_L2_ERROR, "capture_l2_error"),
)
_GATE_NAMES = (
    (C_GATE_DROP_SHED, "drop_shed"),
    (C_GATE_SHED_RING, "shed_sessions_" + REASON_RING_FULL),
    (C_GATE_SHED_MEMORY, "shed_sessions_" + REASON_MEMORY),
)


def walk_counters():
    """The counter names a step may add to, by owner (source, prefilter, gate)."""
    return (
        tuple(n for _i, n in _SOURCE_NAMES),
        tuple(n for _i, n in _FILTER_NAMES),
        tuple(n for _i, n in _GATE_NAMES),
    )


cdef void _add_counts(const int64_t* counts, names, counter):
    if counter is None:
        return
    for i, name in names:
        if counts[i]:
            counter[name] += counts[i]


# The flow tables' own hash (any odd constant; Fibonacci hashing's, as the worker hash).
cdef uint64_t TABLE_MULTIPLIER = 0x9E3779B97F4A7C15ULL
cdef Py_ssize_t FLOWS_SHED_MAX = SHED_FLOWS_MAX
cdef double EXPIRE_EVERY_S = EXPIRE_INTERVAL_S
cdef uint64_t EMPTY_KEY = 0xFFFFFFFFFFFFFFFFULL  # flow keys have 48 bits: never a real one


cdef inline uint16_t _be16(const uint8_t* p) noexcept nogil:
    return <uint16_t>((p[0] << 8) | p[1])


cdef inline uint32_t _be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint32_t _host32(const uint8_t* p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline uint16_t _host16(const uint8_t* p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v


cdef inline uint64_t _worker_of(uint64_t key, uint64_t multiplier,
                                uint64_t workers) noexcept nogil:
    # engine/proc/capture.flow_worker: the top 32 bits of the product, scaled to workers.
    cdef uint64_t high = (key * multiplier) >> 32
    return (high * workers) >> 32


def flow_worker(uint64_t client_ip, uint64_t client_port, uint64_t workers,
                uint64_t multiplier):
    """engine/proc/capture.flow_worker, compiled (``multiplier``: its FLOW_HASH_MULTIPLIER;
    for the tests that hold the two equal)."""
    return _worker_of((client_ip << 16) | client_port, multiplier, workers)


# -- flow tables ----------------------------------------------------------------------------

cdef struct FlowTable:
    uint64_t* keys
    double* times
    Py_ssize_t cap       # a power of two
    Py_ssize_t used


cdef inline Py_ssize_t _slot_of(const FlowTable* t, uint64_t key) noexcept nogil:
    return <Py_ssize_t>((key * TABLE_MULTIPLIER) >> 32) & (t.cap - 1)


cdef int _ft_init(FlowTable* t, Py_ssize_t cap) noexcept nogil:
    cdef Py_ssize_t i
    t.keys = <uint64_t*>malloc(cap * sizeof(uint64_t))
    t.times = <double*>malloc(cap * sizeof(double))
    if t.keys == NULL or t.times == NULL:
        free(t.keys)
        free(t.times)
        t.keys = NULL
        t.times = NULL
        return -1
    for i in range(cap):
        t.keys[i] = EMPTY_KEY
    t.cap = cap
    t.used = 0
    return 0


cdef void _ft_free(FlowTable* t) noexcept nogil:
    free(t.keys)
    free(t.times)
    t.keys = NULL
    t.times = NULL
    t.cap = 0
    t.used = 0


cdef inline Py_ssize_t _ft_find(const FlowTable* t, uint64_t key) noexcept nogil:
    cdef Py_ssize_t mask = t.cap - 1
    cdef Py_ssize_t i = _slot_of(t, key)
    while True:
        if t.keys[i] == key:
            return i
        if t.keys[i] == EMPTY_KEY:
            return -1
        i = (i + 1) & mask


cdef int _ft_grow(FlowTable* t) noexcept nogil:
    cdef FlowTable bigger
    cdef Py_ssize_t i, j, mask
    if _ft_init(&bigger, t.cap * 2) != 0:
        return -1
    mask = bigger.cap - 1
    for i in range(t.cap):
        if t.keys[i] != EMPTY_KEY:
            j = _slot_of(&bigger, t.keys[i])
            while bigger.keys[j] != EMPTY_KEY:
                j = (j + 1) & mask
            bigger.keys[j] = t.keys[i]
            bigger.times[j] = t.times[i]
    bigger.used = t.used
    _ft_free(t)
    t[0] = bigger
    return 0


cdef int _ft_set(FlowTable* t, uint64_t key, double when) noexcept nogil:
    """Insert or refresh; -1 only when memory for a larger table could not be had (the flow
    is then not remembered: judged afresh by its next packet)."""
    cdef Py_ssize_t mask, i
    if (t.used + 1) * 2 > t.cap:
        if _ft_grow(t) != 0:
            return -1
    mask = t.cap - 1
    i = _slot_of(t, key)
    while True:
        if t.keys[i] == key:
            t.times[i] = when
            return 0
        if t.keys[i] == EMPTY_KEY:
            t.keys[i] = key
            t.times[i] = when
            t.used += 1
            return 0
        i = (i + 1) & mask


cdef void _ft_delete_at(FlowTable* t, Py_ssize_t i) noexcept nogil:
    # Backward-shift deletion: entries after the hole that may move into it do, so lookups
    # never need tombstones.
    cdef Py_ssize_t mask = t.cap - 1
    cdef Py_ssize_t j = i, home
    while True:
        j = (j + 1) & mask
        if t.keys[j] == EMPTY_KEY:
            break
        home = _slot_of(t, t.keys[j])
        # Move j into the hole i unless its home lies cyclically in (i, j].
        if (j > i and (home <= i or home > j)) or (j < i and (home <= i and home > j)):
            t.keys[i] = t.keys[j]
            t.times[i] = t.times[j]
            i = j
    t.keys[i] = EMPTY_KEY
    t.used -= 1


cdef inline void _ft_delete(FlowTable* t, uint64_t key) noexcept nogil:
    cdef Py_ssize_t i = _ft_find(t, key)
    if i >= 0:
        _ft_delete_at(t, i)


cdef void _ft_expire(FlowTable* t, double cutoff) noexcept nogil:
    """Drop entries older than cutoff: rebuilt in place, survivors reinserted."""
    cdef Py_ssize_t i, n = 0, j, mask = t.cap - 1
    cdef uint64_t* keep_keys
    cdef double* keep_times
    if t.used == 0:
        return
    keep_keys = <uint64_t*>malloc(t.used * sizeof(uint64_t))
    keep_times = <double*>malloc(t.used * sizeof(double))
    if keep_keys == NULL or keep_times == NULL:
        free(keep_keys)
        free(keep_times)
        return
    for i in range(t.cap):
        if t.keys[i] != EMPTY_KEY:
            if not t.times[i] < cutoff:
                keep_keys[n] = t.keys[i]
                keep_times[n] = t.times[i]
                n += 1
            t.keys[i] = EMPTY_KEY
    for i in range(n):
        j = _slot_of(t, keep_keys[i])
        while t.keys[j] != EMPTY_KEY:
            j = (j + 1) & mask
        t.keys[j] = keep_keys[i]
        t.times[j] = keep_times[i]
    t.used = n
    free(keep_keys)
    free(keep_times)


# -- the shed gate --------------------------------------------------------------------------

cdef class Gate:
    """engine/core/shed.FlowGate with its flow tables in C: the same constructor, the same
    ``update``/``admit``/``expire`` and the same counters (added to ``counters`` per call)."""

    cdef FlowTable known_t
    cdef FlowTable shed_t
    cdef int8_t* reasons
    cdef readonly int workers
    cdef readonly bint enabled
    cdef readonly double high, low, idle_s
    cdef double next_expire
    cdef int64_t counts[C_COUNT]
    cdef list _ring_shedding
    cdef public object counters

    def __cinit__(self, int workers, *args, **kwargs):
        if workers < 1:
            raise ValueError("gate: no worker")
        self.reasons = <int8_t*>calloc(workers, sizeof(int8_t))
        if self.reasons == NULL or _ft_init(&self.known_t, 1024) != 0 or \
                _ft_init(&self.shed_t, 64) != 0:
            raise MemoryError()

    def __init__(self, int workers, *, double high=SHED_RING_HIGH, double low=SHED_RING_LOW,
                 double idle_s=SHED_IDLE_S, counters=None, bint enabled=True):
        from collections import Counter

        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"gate: bad thresholds low={low} high={high}")
        self.workers = workers
        self.enabled = enabled
        self.high = high
        self.low = low
        self.idle_s = idle_s
        self.counters = counters if counters is not None else Counter()
        self._ring_shedding = [False] * workers
        self.next_expire = float("-inf")
        for i in range(C_COUNT):
            self.counts[i] = 0

    def __dealloc__(self):
        _ft_free(&self.known_t)
        _ft_free(&self.shed_t)
        free(self.reasons)

    # -- the decision per worker (FlowGate.update, per batch: Python is fine) --------------

    def update(self, fills, bint memory=False):
        names = {REASON_RING: REASON_RING_FULL, REASON_MEM: REASON_MEMORY}
        changes = []
        if not self.enabled:
            return changes
        for i, fill in enumerate(fills):
            was = self._ring_shedding[i]
            if not was and fill >= self.high:
                self._ring_shedding[i] = True
            elif was and fill < self.low:
                self._ring_shedding[i] = False
        for i in range(self.workers):
            state = REASON_MEM if memory else (REASON_RING if self._ring_shedding[i] else 0)
            if state != self.reasons[i]:
                if state != REASON_NONE and self.reasons[i] == REASON_NONE:
                    self.counters["shed_starts"] += 1
                self.reasons[i] = state
                changes.append((i, names.get(state, "")))
        return changes

    @property
    def shedding(self):
        for i in range(self.workers):
            if self.reasons[i] != REASON_NONE:
                return True
        return False

    @property
    def reason(self):
        return array("b", [self.reasons[i] for i in range(self.workers)])

    @property
    def known(self):
        """The known flows as {key: last seen} (a copy, for tests and tools)."""
        return _table_dict(&self.known_t)

    @property
    def shed(self):
        """The shed flows as {key: last seen} (a copy)."""
        return _table_dict(&self.shed_t)

    # -- the decision per packet ----------------------------------------------------------

    cdef inline bint decide(self, uint64_t key, uint8_t flag, uint64_t worker,
                            double now) noexcept nogil:
        """FlowGate.admit for one packet, in capture order (module docstring)."""
        cdef int8_t reason = self.reasons[worker]
        cdef bint end = (flag & TCP_END) != 0
        cdef Py_ssize_t at
        if reason == REASON_NONE and self.shed_t.used == 0:
            if end:
                _ft_delete(&self.known_t, key)
            else:
                _ft_set(&self.known_t, key, now)
            return True
        at = _ft_find(&self.shed_t, key)
        if reason == REASON_NONE and at < 0:
            if end:
                _ft_delete(&self.known_t, key)
            else:
                _ft_set(&self.known_t, key, now)
            return True
        if at >= 0:
            # A SYN on a shed flow's tuple while its worker still sheds: a retransmission
            # (or a new session shed again) - dropped, not counted twice.
            if (flag & TCP_SYN_ACK) != TCP_SYN or reason != REASON_NONE:
                self.counts[C_GATE_DROP_SHED] += 1
                if end:
                    _ft_delete_at(&self.shed_t, at)
                else:
                    self.shed_t.times[at] = now
                return False
            # Its worker recovered: a session that begins here, whole from its SYN on.
            _ft_delete_at(&self.shed_t, at)
        at = _ft_find(&self.known_t, key)
        if at >= 0:
            if end:
                _ft_delete_at(&self.known_t, at)
            else:
                self.known_t.times[at] = now
            return True
        if reason == REASON_NONE:
            if not end:
                _ft_set(&self.known_t, key, now)
            return True
        self.counts[C_GATE_DROP_SHED] += 1
        if not end:
            if self.shed_t.used < FLOWS_SHED_MAX:
                _ft_set(&self.shed_t, key, now)
            self.counts[C_GATE_SHED_RING if reason == REASON_RING else C_GATE_SHED_MEMORY] += 1
        return False

    cdef inline void begin(self, double now) noexcept nogil:
        if now >= self.next_expire:
            self._expire(now)

    cdef void _expire(self, double now) noexcept nogil:
        self.next_expire = now + EXPIRE_EVERY_S
        _ft_expire(&self.known_t, now - self.idle_s)
        _ft_expire(&self.shed_t, now - self.idle_s)

    def expire(self, double now):
        """Forget flows idle for ``idle_s``."""
        self._expire(now)

    cdef void flush_counts(self):
        _add_counts(self.counts, _GATE_NAMES, self.counters)
        for i in range(C_COUNT):
            self.counts[i] = 0

    def admit(self, keys, flags, workers, double now):
        """FlowGate.admit: the mask of packets to hand on (a memoryview of bools), or None
        when every one goes in.  ``keys`` and ``workers`` are buffers of uint64 (numpy
        arrays, ``array("Q")``), ``flags`` of uint8; anything else goes through numpy."""
        cdef const uint64_t[::1] k64 = _contiguous(keys, "uint64")
        cdef const uint8_t[::1] f8 = _contiguous(flags, "uint8")
        cdef const uint64_t[::1] w = _contiguous(workers, "uint64")
        cdef Py_ssize_t i, n = k64.shape[0]
        cdef uint64_t wn = self.workers
        cdef bint all_in = True
        if f8.shape[0] != n or w.shape[0] != n:
            raise ValueError("gate: keys, flags and workers differ in length")
        for i in range(n):
            if w[i] >= wn:
                raise ValueError(f"gate: worker {w[i]} of packet {i} out of range")
        self.begin(now)
        if n == 0:
            return None
        keep = bytearray(b"\x01") * n
        cdef uint8_t[::1] k = keep
        for i in range(n):
            if not self.decide(k64[i], f8[i], w[i], now):
                k[i] = 0
                all_in = False
        self.flush_counts()
        return None if all_in else memoryview(keep).cast("?")


cdef object _contiguous(object values, str dtype):
    """``values`` as they are when they are a C-contiguous buffer of ``dtype`` (uint8:
    format B, uint64: Q or L), else converted by numpy (imported only then)."""
    cdef const uint8_t[::1] u8
    cdef const uint64_t[::1] u64
    try:
        if dtype == "uint8":
            u8 = values
        else:
            u64 = values
        return values
    except (TypeError, ValueError, BufferError):
        import numpy as np

        return np.ascontiguousarray(values, dtype=dtype)


cdef dict _table_dict(const FlowTable* t):
    out = {}
    for i in range(t.cap):
        if t.keys[i] != EMPTY_KEY:
            out[t.keys[i]] = t.times[i]
    return out


# -- the block walk -------------------------------------------------------------------------

cdef struct RingState:
    uint8_t* base
    Py_ssize_t size
    uint64_t capacity
    uint64_t max_packet
    uint64_t head
    uint64_t start_head
    uint64_t free
    uint64_t dropped
    uint64_t oversize
    bint loss_pending
    bint was_empty


cdef struct Transfer:
    uint32_t ip           # 0: any address
    uint16_t port


cdef class BlockWalker:
    """Walks TPACKET_V3 blocks into the rings (module docstring).

    ``rings``: the producer side of every worker's ring (engine.io.ring.Ring), in worker
    order; ``layout``: their geometry (engine.io.ring.record_layout()); ``multiplier``: the
    flow hash's (engine.proc.capture.FLOW_HASH_MULTIPLIER).  ``gate``: a ``Gate``.
    ``kernel_filtered``: the exact kernel program is attached (frames not IPv4/TCP are left out silently, and what is kept is counted on the source);
    otherwise ``transfers`` ((online ip, online port) pairs of the -x entries) and
    ``drop_pure_acks`` are the prefilter's rule, counted on the prefilter's counters.

    ``begin(block)`` then ``step(buf, block_bytes, ts, now)`` until it returns -1: a value
    >= 0 is the worker of a packet larger than ``mtu`` at ``split_start``/``split_length``,
    admitted and left for the caller to split.
    """

    cdef list rings
    cdef Gate gate
    cdef Py_ssize_t n_rings
    cdef RingState* states
    cdef Py_buffer* views
    cdef Transfer* transfers
    cdef Py_ssize_t n_transfers
    cdef readonly bint kernel_filtered, host_only, drop_pure_acks
    cdef readonly Py_ssize_t mtu
    cdef int64_t counts[C_COUNT]
    # the cursor inside the current block
    cdef Py_ssize_t block
    cdef uint64_t frame_index
    cdef uint64_t frame_count
    cdef Py_ssize_t frame_off
    cdef readonly Py_ssize_t split_start, split_length
    # engine/io/ring.py's geometry (record_layout) and engine/proc/capture.py's hash
    cdef Py_ssize_t ring_header, slot_length_at, slot_flags_at, slot_ts_at, slot_data_at
    cdef uint64_t record_align
    cdef uint32_t flag_loss, record_wrap
    cdef uint64_t multiplier

    def __cinit__(self, rings, Gate gate not None, Py_ssize_t mtu, layout, multiplier, *,
                  bint kernel_filtered=True, bint host_only=False, transfers=(),
                  bint drop_pure_acks=True):
        self.n_rings = len(rings)
        if self.n_rings < 1 or self.n_rings != gate.workers:
            raise ValueError("walker: one ring per worker of the gate")
        self.states = <RingState*>calloc(self.n_rings, sizeof(RingState))
        self.views = <Py_buffer*>calloc(self.n_rings, sizeof(Py_buffer))
        pairs = list(transfers)
        self.n_transfers = len(pairs)
        self.transfers = <Transfer*>calloc(max(1, self.n_transfers), sizeof(Transfer))
        if self.states == NULL or self.views == NULL or self.transfers == NULL:
            raise MemoryError()
        for i, (ip, port) in enumerate(pairs):
            self.transfers[i].ip = ip
            self.transfers[i].port = port

    def __init__(self, rings, Gate gate not None, Py_ssize_t mtu, layout, multiplier, *,
                 bint kernel_filtered=True, bint host_only=False, transfers=(),
                 bint drop_pure_acks=True):
        self.ring_header = layout["header_bytes"]
        self.slot_length_at = layout["length_at"]
        self.slot_flags_at = layout["flags_at"]
        self.slot_ts_at = layout["ts_at"]
        self.slot_data_at = layout["data_at"]
        self.flag_loss = layout["flag_loss_before"]
        self.record_align = layout["align"]
        self.record_wrap = layout["wrap"]
        if self.record_align < 8 or self.record_align & (self.record_align - 1):
            raise ValueError("walker: record alignment must be a power of two >= 8")
        self.multiplier = multiplier
        self.rings = list(rings)
        self.gate = gate
        self.mtu = mtu
        self.kernel_filtered = kernel_filtered
        self.host_only = host_only
        self.drop_pure_acks = drop_pure_acks
        self.frame_index = self.frame_count = 0
        for i in range(C_COUNT):
            self.counts[i] = 0

    def __dealloc__(self):
        free(self.states)
        free(self.views)
        free(self.transfers)

    def begin(self, Py_ssize_t block):
        """Start the block at byte ``block`` of the buffer given to ``step``."""
        self.block = block
        self.frame_index = 0
        self.frame_count = 0
        self.frame_off = -1  # read from the block descriptor by the first step

    @property
    def done(self):
        return self.frame_off >= 0 and self.frame_index >= self.frame_count

    # -- rings: loaded from / stored to the Ring objects once per step ----------------------

    cdef int _load_rings(self) except -1:
        cdef RingState* s
        cdef Py_ssize_t i, got = 0
        try:
            for i in range(self.n_rings):
                ring = self.rings[i]
                PyObject_GetBuffer(ring._buf, &self.views[i], PyBUF_SIMPLE | PyBUF_WRITABLE)
                got += 1
                s = &self.states[i]
                s.base = <uint8_t*>self.views[i].buf
                s.size = self.views[i].len
                s.capacity = ring.capacity
                s.max_packet = ring.max_packet_bytes
                if (self.ring_header + <Py_ssize_t>s.capacity > s.size
                        or s.capacity % self.record_align
                        or s.capacity < 2 * (<uint64_t>self.slot_data_at + s.max_packet)):
                    raise ValueError(f"walker: ring {i} is smaller than its geometry")
                s.head = ring._head_mine
                s.start_head = s.head
                s.free = ring._producer_free()
                s.was_empty = s.free == s.capacity
                s.loss_pending = ring._loss_pending
                s.dropped = 0
                s.oversize = 0
        except BaseException:
            for i in range(got):
                PyBuffer_Release(&self.views[i])
            raise
        return 0

    cdef void _store_rings(self):
        cdef RingState* s
        cdef Py_ssize_t i
        cdef uint64_t written
        for i in range(self.n_rings):
            s = &self.states[i]
            ring = self.rings[i]
            PyBuffer_Release(&self.views[i])
            written = s.head - s.start_head
            ring.dropped += s.dropped
            ring.oversize += s.oversize
            ring._loss_pending = s.loss_pending
            if written:
                ring._publish_head(s.head)
                if s.was_empty or ring._tail() == s.head - written:
                    ring._ring()

    cdef inline void _push(self, RingState* s, const uint8_t* data, uint64_t n,
                           double ts) noexcept nogil:
        """Ring.push_frames for one packet (engine/io/ring.py ``_put``): a record, after a
        wrap mark when it does not fit before the end of the area."""
        cdef uint8_t* area = s.base + self.ring_header
        cdef uint32_t length32 = <uint32_t>n
        cdef uint32_t flags32
        cdef uint64_t size, pos, room, need
        if n > s.max_packet:
            s.oversize += 1
            return
        size = <uint64_t>self.slot_data_at + (
            (n + self.record_align - 1) & ~(self.record_align - 1))
        pos = s.head % s.capacity
        room = s.capacity - pos
        need = size if size <= room else room + size
        if need > s.free:
            s.dropped += 1
            s.loss_pending = True
            return
        if size > room:
            memcpy(area + pos + self.slot_length_at, &self.record_wrap, 4)
            pos = 0
        flags32 = self.flag_loss if s.loss_pending else 0
        s.loss_pending = False
        memcpy(area + pos + self.slot_length_at, &length32, 4)
        memcpy(area + pos + self.slot_flags_at, &flags32, 4)
        memcpy(area + pos + self.slot_ts_at, &ts, 8)
        memcpy(area + pos + self.slot_data_at, data, n)
        s.head += need
        s.free -= need

    # -- the -x rule (TransferFilter._keep) --------------------------------------------------

    cdef inline bint _keep(self, const uint8_t* ip, Py_ssize_t n) noexcept nogil:
        cdef Py_ssize_t ihl, i
        cdef uint32_t dst_ip
        cdef uint16_t dst_port
        cdef bint matched = False
        self.counts[C_FLT_PACKETS] += 1
        self.counts[C_FLT_BYTES] += n
        if n < 20 or ip[0] >> 4 != 4 or ip[9] != IPPROTO_TCP:
            self.counts[C_FLT_NOT_TCP] += 1
            return False
        if _be16(ip + 6) & 0x1FFF:
            self.counts[C_FLT_FRAGMENT] += 1
            return False
        ihl = (ip[0] & 0x0F) * 4
        if ihl < 20 or n < ihl + 14:
            self.counts[C_FLT_NOT_TCP] += 1
            return False
        dst_ip = _be32(ip + 16)
        dst_port = _be16(ip + ihl + 2)
        for i in range(self.n_transfers):
            if self.transfers[i].port == dst_port and (
                self.transfers[i].ip == 0 or self.transfers[i].ip == dst_ip
            ):
                matched = True
                break
        if not matched:
            self.counts[C_FLT_NOT_MATCHED] += 1
            return False
        # bpf.is_pure_ack: no SYN/FIN/RST and tot_len == ihl + doff
        if self.drop_pure_acks and not (ip[ihl + 13] & (TCP_FIN | TCP_SYN | TCP_RST)) and \
                _be16(ip + 2) == ihl + ((ip[ihl + 12] >> 4) << 2):
            self.counts[C_FLT_PURE_ACK] += 1
            return False
        self.counts[C_FLT_ACCEPTED] += 1
        return True

    # -- the walk ----------------------------------------------------------------------------

    cdef Py_ssize_t _walk(self, const uint8_t* buf, Py_ssize_t buf_len, Py_ssize_t block_bytes,
                          double ts, double now) noexcept nogil:
        cdef Py_ssize_t block = self.block
        cdef Py_ssize_t end = block + block_bytes
        cdef Py_ssize_t off, start, length, ihl
        cdef uint32_t snaplen, wire_len, next_off
        cdef uint16_t mac, net
        cdef uint8_t pkttype, flag
        cdef const uint8_t* ip
        cdef uint64_t key, worker, workers = self.n_rings
        if end > (buf_len & ~3):  # whole u32 words, as engine/io/capture.walk_frames reads
            end = buf_len & ~3
        if self.frame_off < 0:
            self.frame_index = 0
            self.frame_count = 0
            self.frame_off = end  # nothing to read unless the descriptor is there
            if block < 0 or block + BLOCK_FIRST + 4 > end:
                self.counts[C_SRC_BLOCK_ERRORS] += 1
                return -1
            self.frame_count = _host32(buf + block + BLOCK_NUM_PKTS)
            self.frame_off = block + <Py_ssize_t>_host32(buf + block + BLOCK_FIRST)
        while self.frame_index < self.frame_count:
            off = self.frame_off
            # the header (to sll_pkttype), 4-byte aligned, inside the block
            if off & 3 or off < block or off + FRAME_HEADER_NEED > end:
                self.counts[C_SRC_BLOCK_ERRORS] += 1
                self.frame_index = self.frame_count
                return -1
            snaplen = _host32(buf + off + FRAME_SNAPLEN)
            wire_len = _host32(buf + off + FRAME_LEN)
            mac = _host16(buf + off + FRAME_MAC)
            net = _host16(buf + off + FRAME_NET)
            next_off = _host32(buf + off + FRAME_NEXT)
            # the packet's bytes inside the block, the IP header inside the captured bytes
            if net < mac or <uint64_t>net > <uint64_t>mac + snaplen or \
                    <uint64_t>off + mac + snaplen > <uint64_t>end:
                self.counts[C_SRC_BLOCK_ERRORS] += 1
                self.frame_index = self.frame_count
                return -1
            self.frame_index += 1
            if self.frame_index < self.frame_count:
                if next_off == 0:  # num_pkts promises more frames than the chain has
                    self.counts[C_SRC_BLOCK_ERRORS] += 1
                    self.frame_count = self.frame_index
                self.frame_off = off + next_off
            pkttype = buf[off + FRAME_PKTTYPE]
            if pkttype == PACKET_OUTGOING or (self.host_only and pkttype != PACKET_HOST):
                continue
            if snaplen < wire_len:
                self.counts[C_SRC_TRUNCATED] += 1
                continue
            start = off + net
            length = <Py_ssize_t>snaplen - (net - mac)
            ip = buf + start
            if self.kernel_filtered:
                # ip_flow_fields' well-formed mask
                if length < 20 or ip[0] >> 4 != 4 or ip[9] != IPPROTO_TCP:
                    continue
                ihl = (ip[0] & 0x0F) << 2
                if ihl < 20 or length < ihl + 14:
                    continue
                self.counts[C_SRC_PACKETS] += 1
                self.counts[C_SRC_BYTES] += length
                self.counts[C_SRC_ACCEPTED] += 1
            else:
                if not self._keep(ip, length):
                    continue
                ihl = (ip[0] & 0x0F) << 2
            key = (<uint64_t>_be32(ip + 12) << 16) | _be16(ip + ihl)
            flag = ip[ihl + 13]
            worker = _worker_of(key, self.multiplier, workers)
            self.gate.begin(now)  # FlowGate.admit's expiry: before a block's first decision
            if not self.gate.decide(key, flag, worker, now):
                continue
            if length > self.mtu:
                self.split_start = start
                self.split_length = length
                return <Py_ssize_t>worker
            self._push(&self.states[worker], ip, length, ts)
        return -1

    def step(self, buf, Py_ssize_t block_bytes, double ts, double now):
        """Walk the current block from where the last step stopped (see the class)."""
        cdef Py_buffer view
        cdef Py_ssize_t result
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            self._load_rings()
            try:
                result = self._walk(<const uint8_t*>view.buf, view.len, block_bytes, ts, now)
            finally:
                self._store_rings()
        finally:
            PyBuffer_Release(&view)
        return result

    def flush_counts(self, source_counters, filter_counters):
        """Add what the steps counted to the source's, the prefilter's and the gate's
        Counters, and start again from zero."""
        self._flush(_SOURCE_NAMES, source_counters, filter_counters)

    def _flush(self, source_names, source_counters, filter_counters):
        _add_counts(self.counts, source_names, source_counters)
        _add_counts(self.counts, _FILTER_NAMES, filter_counters)
        for i in range(C_COUNT):
            self.counts[i] = 0
        self.gate.flush_counts()


# -- the pcap record walk (offline replay) --------------------------------------------------

cdef enum:
    PCAP_RECORD_HEADER = 16
    PCAP_MAX_RECORD = 262144       # engine/codec/pcapfile.PCAP_MAX_RECORD_BYTES
    LINKTYPE_EN10MB = 1
    LINKTYPE_LINUX_SLL = 113
    LINKTYPE_LINUX_SLL2 = 276
    ETHERTYPE_IPV4 = 0x0800
    ETHERTYPE_VLAN = 0x8100

# What PcapWalker.walk returns when it is not the worker of a packet to split (>= 0).
cdef enum:
    W_WAIT = -1        # the next packet is not due yet (``pending_due``)
    W_MORE = -2        # the buffer ends inside (or before) the next record: fill it
    W_FULL = -3        # the batch's packet limit is reached (the next packet is due)
    W_BAD_RECORD = -4  # a record header that cannot be right (``bad_*``): stop the file
    W_GATE = -5        # a first packet of the batch is due: update the gate, walk again

WALK_WAIT = W_WAIT
WALK_MORE = W_MORE
WALK_FULL = W_FULL
WALK_BAD_RECORD = W_BAD_RECORD
WALK_GATE = W_GATE


cdef inline uint32_t _le32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[3] << 24) | (<uint32_t>p[2] << 16) | (<uint32_t>p[1] << 8) | p[0]


cdef inline Py_ssize_t _l2_offset(const uint8_t* f, Py_ssize_t n, int linktype) noexcept nogil:
    """engine/codec/packet.l2_offset: the IPv4 header's offset in a frame, -1 for a frame it
    refuses (too short, not IPv4)."""
    cdef uint16_t etype
    if linktype == LINKTYPE_EN10MB:
        if n < 14:
            return -1
        etype = _be16(f + 12)
        if etype == ETHERTYPE_VLAN:
            if n < 18 or _be16(f + 16) != ETHERTYPE_IPV4:
                return -1
            return 18
        return 14 if etype == ETHERTYPE_IPV4 else -1
    if linktype == LINKTYPE_LINUX_SLL:
        if n < 16 or _be16(f + 14) != ETHERTYPE_IPV4:
            return -1
        return 16
    if linktype == LINKTYPE_LINUX_SLL2:
        if n < 20 or _be16(f) != ETHERTYPE_IPV4:
            return -1
        return 20
    if linktype == 101 or linktype == 12 or linktype == 14 or linktype == 228:
        return 0
    return -1


cdef class PcapWalker(BlockWalker):
    """Walks the records of a pcap file into the rings: the compiled twin of
    engine/io/capture.py's ``PcapFileSource`` (its record loop, ``ReplayPacer.due`` and the
    ``TransferFilter.keep_with_pure_acks`` rule) and of ``CaptureProcess.dispatch``.

    Built as a ``BlockWalker`` (the same rings, gate, layout and hash; ``kernel_filtered``
    False, ``drop_pure_acks`` False: the offline rule).  The caller owns the file and a
    buffer it fills with large reads (``open_file`` per file, ``compact`` before a fill);
    ``walk(buf, end, now, limit, pacer)`` reads the records from ``pos``:

    * a record is parsed (header checked as PcapReader checks it), counted, and either left
      out (cut short by the snaplen, link header refused, the -x rule) or becomes the
      *pending* packet with its due time from the pacer's state (``pacer.state()`` is loaded
      at the start of the call and stored at its end, so ReplayPacer stays the one schedule);
    * the pending packet is emitted when it is due and the batch has room (``limit`` packets
      since ``begin_batch``): hashed, gated, copied into its worker's ring (a packet larger
      than -M is returned for the caller to split, as the block walk does).

    It returns when the next packet is not due (WALK_WAIT), the batch is full (WALK_FULL),
    the buffer ends before a whole record (WALK_MORE: a partial record stays for the next
    fill), a record header is corrupt (WALK_BAD_RECORD, at ``bad_offset``), or the batch's
    first packet is due (WALK_GATE, once per batch: the caller updates the gate first).
    Like PcapFileSource, it always looks one kept packet ahead: the pending packet is found
    before a call returns WALK_WAIT or WALK_FULL.

    Untrusted input: every header and frame is checked against ``end`` (and ``end`` against
    the buffer) before it is read.
    """

    cdef int linktype
    cdef bint big_endian
    cdef double ticks
    cdef uint32_t ticks_u32
    cdef readonly Py_ssize_t pos
    cdef readonly int64_t base_offset     # file offset of buffer byte 0
    cdef readonly int64_t records         # whole records of this file read
    cdef readonly bint pending
    cdef readonly double pending_due
    cdef Py_ssize_t pending_ip            # from pos
    cdef Py_ssize_t pending_length
    cdef Py_ssize_t pending_record        # record bytes (header included)
    cdef double pending_ts
    cdef readonly Py_ssize_t emitted
    cdef bint gated
    cdef readonly double split_ts
    cdef readonly int64_t bad_offset
    cdef readonly uint32_t bad_caplen, bad_frac
    # ReplayPacer's state during a call
    cdef double p_accelerate, p_idle, p_start, p_first, p_prev, p_pass_skipped, p_last_offset
    cdef double p_skipped_s
    cdef bint p_has_first
    cdef int64_t p_idle_gaps

    def open_file(self, int linktype, bint big_endian, uint32_t ticks_per_s, int64_t offset):
        """A new file whose records start at byte ``offset``; the buffer is empty."""
        if ticks_per_s == 0:
            raise ValueError("walker: ticks per second must be > 0")
        self.linktype = linktype
        self.big_endian = big_endian
        self.ticks_u32 = ticks_per_s
        self.ticks = ticks_per_s
        self.pos = 0
        self.base_offset = offset
        self.records = 0
        self.pending = False

    def begin_batch(self):
        """A new batch: ``limit`` counts from here, and its first packet asks for the gate."""
        self.emitted = 0
        self.gated = False

    def shift_pending(self, double seconds):
        """PcapFileSource.delay for the pending packet (the pacer's start is the caller's)."""
        if self.pending:
            self.pending_due += seconds

    def compact(self, buf, Py_ssize_t end):
        """Move the bytes from ``pos`` to ``end`` to the buffer's start (before a fill);
        returns the new end."""
        cdef Py_buffer view
        cdef Py_ssize_t rest
        if self.pending:
            raise ValueError("walker: compact with a packet pending")
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            if end < self.pos or end > view.len:
                raise ValueError("walker: end outside the buffer")
            rest = end - self.pos
            if rest and self.pos:
                memmove(<uint8_t*>view.buf, <uint8_t*>view.buf + self.pos, rest)
            self.base_offset += self.pos
            self.pos = 0
            return rest
        finally:
            PyBuffer_Release(&view)

    # -- ReplayPacer.due ---------------------------------------------------------------------

    cdef inline double _due(self, double ts) noexcept nogil:
        cdef double gap, offset
        if not self.p_has_first:
            self.p_has_first = True
            self.p_first = ts
            self.p_prev = ts
        gap = ts - self.p_prev
        if self.p_idle > 0 and gap > self.p_idle:
            self.p_pass_skipped += gap
            self.p_skipped_s += gap
            self.p_idle_gaps += 1
        if ts > self.p_prev:
            self.p_prev = ts
        offset = ts - self.p_first - self.p_pass_skipped
        if not offset > self.p_last_offset:
            offset = self.p_last_offset
        self.p_last_offset = offset
        return self.p_start + offset / self.p_accelerate

    cdef _load_pacer(self, pacer):
        (self.p_accelerate, self.p_idle, self.p_start, first, self.p_prev,
         self.p_pass_skipped, self.p_last_offset, self.p_skipped_s,
         self.p_idle_gaps) = pacer.state()
        self.p_has_first = first is not None
        self.p_first = first if first is not None else 0.0
        if not self.p_accelerate > 0:
            raise ValueError("walker: accelerate must be > 0")

    cdef _store_pacer(self, pacer):
        pacer.load_state((
            self.p_start, self.p_first if self.p_has_first else None, self.p_prev,
            self.p_pass_skipped, self.p_last_offset, self.p_skipped_s, self.p_idle_gaps,
        ))

    # -- the walk ----------------------------------------------------------------------------

    cdef Py_ssize_t _walk_records(self, const uint8_t* buf, Py_ssize_t end, double now,
                                  Py_ssize_t limit) noexcept nogil:
        cdef const uint8_t* h
        cdef const uint8_t* ip
        cdef uint32_t sec, frac, caplen, wire_len
        cdef Py_ssize_t l2, n, ihl
        cdef uint64_t key, worker, workers = self.n_rings
        cdef uint8_t flag
        cdef double ts
        while True:
            if not self.pending:
                if end - self.pos < PCAP_RECORD_HEADER:
                    return W_MORE
                h = buf + self.pos
                if self.big_endian:
                    sec = _be32(h)
                    frac = _be32(h + 4)
                    caplen = _be32(h + 8)
                    wire_len = _be32(h + 12)
                else:
                    sec = _le32(h)
                    frac = _le32(h + 4)
                    caplen = _le32(h + 8)
                    wire_len = _le32(h + 12)
                if caplen > PCAP_MAX_RECORD or frac >= self.ticks_u32:
                    self.bad_offset = self.base_offset + self.pos
                    self.bad_caplen = caplen
                    self.bad_frac = frac
                    return W_BAD_RECORD
                if end - self.pos - PCAP_RECORD_HEADER < <Py_ssize_t>caplen:
                    return W_MORE
                self.records += 1
                self.counts[C_OFF_RECORDS] += 1
                self.counts[C_OFF_BYTES_READ] += PCAP_RECORD_HEADER + caplen
                if wire_len > caplen:  # cut short by the capture's snaplen
                    self.counts[C_SRC_TRUNCATED] += 1
                    self.pos += PCAP_RECORD_HEADER + caplen
                    continue
                l2 = _l2_offset(h + PCAP_RECORD_HEADER, caplen, self.linktype)
                if l2 < 0:
                    self.counts[C_OFF_L2_ERROR] += 1
                    self.pos += PCAP_RECORD_HEADER + caplen
                    continue
                n = <Py_ssize_t>caplen - l2
                if not self._keep(h + PCAP_RECORD_HEADER + l2, n):
                    self.pos += PCAP_RECORD_HEADER + caplen
                    continue
                ts = <double>sec + <double>frac / self.ticks
                self.pending = True
                self.pending_ip = PCAP_RECORD_HEADER + l2
                self.pending_length = n
                self.pending_record = PCAP_RECORD_HEADER + caplen
                self.pending_ts = ts
                self.pending_due = self._due(ts)
            if self.pending_due > now:
                return W_WAIT
            if self.emitted >= limit:
                return W_FULL
            if not self.gated:
                self.gated = True
                return W_GATE
            # emit the pending packet (CaptureProcess.dispatch)
            self.pending = False
            self.emitted += 1
            self.counts[C_OFF_PACKETS] += 1
            ip = buf + self.pos + self.pending_ip
            n = self.pending_length
            ts = self.pending_ts
            self.pos += self.pending_record
            ihl = (ip[0] & 0x0F) << 2  # the -x rule checked: IPv4, TCP, ports and flags there
            key = (<uint64_t>_be32(ip + 12) << 16) | _be16(ip + ihl)
            flag = ip[ihl + 13]
            worker = _worker_of(key, self.multiplier, workers)
            self.gate.begin(now)
            if not self.gate.decide(key, flag, worker, now):
                continue
            if n > self.mtu:
                self.split_start = ip - buf
                self.split_length = n
                self.split_ts = ts
                return <Py_ssize_t>worker
            self._push(&self.states[worker], ip, n, ts)

    def walk(self, buf, Py_ssize_t end, double now, Py_ssize_t limit, pacer):
        """Walk the records in ``buf[pos:end]`` (see the class); returns a WALK_* value or
        the worker of a packet to split (``split_start``, ``split_length``, ``split_ts``)."""
        cdef Py_buffer view
        cdef Py_ssize_t result
        if self.ticks_u32 == 0:
            raise ValueError("walker: no file open")
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            if end < self.pos or end > view.len:
                raise ValueError("walker: end outside the buffer")
            self._load_pacer(pacer)
            self._load_rings()
            try:
                result = self._walk_records(<const uint8_t*>view.buf, end, now, limit)
            finally:
                self._store_rings()
                self._store_pacer(pacer)
        finally:
            PyBuffer_Release(&view)
        return result

    def flush_file_counts(self, source_counters, filter_counters):
        """Add what the walks counted to the source's, the prefilter's and the gate's
        Counters, and start again from zero."""
        self._flush(_FILE_NAMES, source_counters, filter_counters)
