# cython: language_level=3
# The Python-visible test wrapper of one compiled session (included by session.pxi): the
# public API of engine.core.session.TcpSession, so that the session tests and the differential
# test drive both engines.  Test-only: each TcpPacket is turned into a dp_packet in Python,
# which the production path (the table's batch calls) never does.

import collections as _collections

from engine.core import events as _events
from engine.core.states import State as _State


def live_allocations():
    """(blocks, bytes) allocated by the sessions of this process and not freed yet."""
    return dp_live_blocks, dp_live_bytes


cdef extern from "<malloc.h>" nogil:
    struct mallinfo2:
        size_t uordblks
        size_t hblkhd
    mallinfo2 c_mallinfo2 "mallinfo2"()


def heap_in_use():
    """Bytes malloc has handed out and not taken back in this process (glibc's mallinfo2:
    chunks in use, their headers included, and mmap'd blocks): what tests measure the
    whole C state with, table entries and indexes included."""
    cdef mallinfo2 m = c_mallinfo2()
    return m.uordblks + m.hblkhd


def session_struct_bytes():
    """sizeof(ESession)."""
    return sizeof(ESession)


def lingering_record_bytes():
    """sizeof(ELinger): what the table keeps of a lingering session (sess_freeze)."""
    return sizeof(ELinger)


def lingering_session_bytes():
    """The size an ended session is cut to while it lingers (sess_linger)."""
    cdef ESession s
    return ((<size_t>(<char*>&s.linger_tail - <char*>&s) + 1) + 7) & ~(<size_t>7)


cdef object _pad4(bytes raw):
    cdef Py_ssize_t rem = len(raw) & 3
    return raw + b"\x00" * (4 - rem) if rem else raw


cdef bytes _packet_buffer(object pkt, dp_packet* p):
    """Lay a TcpPacket out as a captured packet (IP header, IP options, TCP header, options,
    payload) and fill *p as dp_parse_ipv4_tcp would (data_len as the packet declares)."""
    cdef bytes ip_opts = bytes(pkt.ip_options)
    cdef bytes opts = bytes(pkt.options)
    cdef bytes payload = bytes(pkt.payload)
    memset(p, 0, sizeof(dp_packet))
    p.family = DP_FAMILY_IPV4
    put32(p.src + 12, pkt.src)
    put32(p.dst + 12, pkt.dst)
    p.src[10] = p.src[11] = p.dst[10] = p.dst[11] = 0xFF
    p.sport = pkt.sport
    p.dport = pkt.dport
    p.seq = pkt.seq
    p.ack = pkt.ack
    p.flags = pkt.flags & 0xFF
    p.window = pkt.window
    p.urgent = pkt.urgent
    p.ip_id = pkt.ip_id
    p.ttl = pkt.ttl
    p.tos = pkt.tos
    p.df = 1 if pkt.df else 0
    p.offset = 0
    p.ip_header_bytes = 20 + len(ip_opts)
    p.tcp_header_bytes = 20 + len(opts)
    p.payload_bytes = len(payload)
    p.data_len = pkt.data_len
    buf = b"\x00" * 20 + ip_opts + b"\x00" * 20 + opts + payload
    cdef const uint8_t* o = buf
    dp_parse_tcp_options(o + p.ip_header_bytes + 20, len(opts), &p.opts)
    return buf


_EC_INDEX = {name: i for i, name in enumerate(EC_NAMES)}


cdef class CounterView:
    """A live, read-only view of a session's counter array with a Counter's reading API
    (a missing key reads 0; the keys are those whose count is not zero)."""

    cdef uint64_t* c
    cdef object owner

    def __getitem__(self, key):
        i = _EC_INDEX.get(key)
        return 0 if i is None else self.c[<int>i]

    def get(self, key, default=None):
        v = self[key]
        return v if v else default

    def counter(self):
        """A collections.Counter snapshot."""
        out = _collections.Counter()
        for i in range(EC_COUNT):
            if self.c[i]:
                out[EC_NAMES[i]] = self.c[i]
        return out

    def keys(self):
        return self.counter().keys()

    def values(self):
        return self.counter().values()

    def items(self):
        return self.counter().items()

    def __iter__(self):
        return iter(self.counter())

    def __len__(self):
        return len(self.counter())

    def __contains__(self, key):
        return bool(self[key])

    def __eq__(self, other):
        return self.counter() == other

    def __repr__(self):
        return repr(self.counter())


class _Estimator:
    """What the tests read of TcpSession.rtt_estimator."""

    def __init__(self, srtt, rtt_min, initial_s):
        self.srtt = srtt
        self.rtt_min = rtt_min
        self.initial_s = initial_s

    def rtt(self):
        return self.initial_s if self.srtt is None else self.srtt

    def path_rtt(self):
        return self.initial_s if self.rtt_min is None else self.rtt_min


cdef class Session:
    """One compiled session with TcpSession's public API (test-only wrapper)."""

    cdef ESession* s
    cdef ECfg cfg
    cdef uint64_t* _counters
    cdef object _counters_owner
    cdef EOut out
    cdef readonly object config
    cdef readonly tuple client
    cdef readonly tuple target
    cdef readonly tuple online

    strict = False

    def __cinit__(self):
        self.s = NULL
        self._counters = NULL
        eout_init(&self.out)

    def __init__(self, config, client, target, online=(0, 0), now=0.0, *, counters=None):
        ecfg_fill(&self.cfg, config)
        self.config = config
        self.client = tuple(client)
        self.target = tuple(target)
        self.online = tuple(online)
        if isinstance(counters, Session):  # share one counter array, as a table's sessions do
            self._counters_owner = counters
            self._counters = (<Session>counters)._counters
        elif counters is not None:
            raise TypeError("counters: another compiled Session (whose array is shared)")
        else:
            self._counters_owner = None
            self._counters = <uint64_t*>malloc(EC_COUNT * sizeof(uint64_t))
            if self._counters == NULL:
                raise MemoryError()
            memset(self._counters, 0, EC_COUNT * sizeof(uint64_t))
        self.s = sess_new(&self.cfg, self._counters, client[0], client[1], target[0],
                          target[1], online[0], online[1], now)
        if self.s == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.s != NULL:
            sess_free(self.s)
            self.s = NULL
        if self._counters != NULL and self._counters_owner is None:
            free(self._counters)
        self._counters = NULL
        eout_free(&self.out)

    # -- state --------------------------------------------------------------------------------

    @property
    def counters(self):
        """A live view of the counter array (as TcpSession.counters is a live Counter)."""
        cdef CounterView v = CounterView.__new__(CounterView)
        v.c = self._counters
        v.owner = self
        return v

    @property
    def state(self):
        return _State(self.s.state)

    @property
    def outcome(self):
        return None if self.s.outcome < 0 else OUTCOME_NAMES[self.s.outcome]

    @property
    def created_at(self):
        return self.s.created_at

    @property
    def finished(self):
        return self.s.state == ST_FINISHED

    @property
    def lingering(self):
        return self.s.state == ST_LINGER

    @property
    def unsend(self):
        return sess_unsend(self.s)

    @property
    def syn_seq(self):
        return self.s.syn_seq if self.s.has_syn else None

    @property
    def end_seq(self):
        cdef uint32_t v
        return v if sess_end_seq(self.s, &v) else None

    @property
    def ts_last(self):
        cdef uint32_t v
        return v if sess_ts_last(self.s, &v) else None

    @property
    def half_open(self):
        return bool(sess_half_open(self.s))

    @property
    def held_bytes(self):
        return sess_held_bytes(self.s)

    @property
    def rtt_estimator(self):
        s = self.s
        return _Estimator(
            s.srtt if tset(s.srtt) else None,
            s.rtt_min if tset(s.rtt_min) else None,
            s.cfg.rtt_initial_s,
        )

    # -- inputs -------------------------------------------------------------------------------

    def receive_client(self, pkt, double now):
        cdef dp_packet p
        cdef bytes buf = _packet_buffer(pkt, &p)
        sess_receive_client(self.s, &p, buf, now)

    def receive_response(self, pkt, double now):
        cdef dp_packet p
        cdef bytes buf = _packet_buffer(pkt, &p)
        sess_receive_response_buf(self.s, &p, buf, now)

    def handle_timer(self, double now):
        sess_handle_timer(self.s, now)

    def packets_to_send(self, double now):
        eout_reset(&self.out)
        if sess_packets_to_send(self.s, now, &self.out) < 0:
            raise MemoryError()
        res = []
        cdef size_t at = 0
        cdef uint32_t i
        for i in range(self.out.n):
            res.append(self.out.buf[at:at + self.out.lens[i]])
            at += self.out.lens[i]
        return res

    def get_timer(self):
        cdef double t = sess_timer(self.s)
        return t if tset(t) else None

    def next_event(self):
        cdef EEvent ev
        if not sess_next_event_any(self.s, &ev):
            return None
        if ev.kind == EV_ROUTE:
            return _events.RouteNeeded(ev.cip, ev.cport, ev.tip, ev.tport)
        return _events.SessionEnded(OUTCOME_NAMES[ev.outcome])

    def owns_syn(self, seq):
        return bool(sess_owns_syn(self.s, seq))

    def is_later_data(self, pkt):
        cdef dp_packet p
        _packet_buffer(pkt, &p)
        return bool(sess_is_later_data(self.s, &p))

    def may_continue(self, pkt, double now):
        cdef dp_packet p
        _packet_buffer(pkt, &p)
        return bool(sess_may_continue(self.s, &p, now))

    def continue_from(self, Session old):
        sess_continue_from(self.s, old.s)

    def handle_route_down(self, down, double now):
        sess_handle_route_down(self.s, bool(down), now)

    def shed_half_open(self, double now):
        sess_shed_half_open(self.s, now)

    def end_input(self, double now):
        return bool(sess_end_input(self.s, now))

    def expedite_gap(self, double due):
        return bool(sess_expedite_gap(self.s, due))


def idle_sessions_bytes(config, int n):
    """Build n compiled sessions, each established through a faked handshake and idle (one
    request sent and acknowledged, its answer acked), and return the live bytes they hold
    (struct and blocks) before freeing them: the memory check of an idle session."""
    cdef ECfg cfg
    cdef uint64_t* counters = <uint64_t*>calloc_counters()
    cdef ESession** arr = <ESession**>malloc(n * sizeof(ESession*))
    cdef EOut out
    cdef EEvent ev
    cdef dp_packet p
    cdef int i
    cdef size_t before, held
    cdef uint8_t buf[64]
    if counters == NULL or arr == NULL:
        free(counters)
        free(arr)
        raise MemoryError()
    ecfg_fill(&cfg, config)
    eout_init(&out)
    memset(buf, 0, sizeof(buf))
    before = dp_live_bytes
    for i in range(n):
        arr[i] = sess_new(&cfg, counters, 0xC6130000 + <uint32_t>(i >> 16),
                          <uint16_t>(1024 + (i & 0x7FFF)), 0xC6120001, 80, 0, 0, 0.0)
        s = arr[i]
        # a captured request, mid-stream: a faked handshake
        memset(&p, 0, sizeof(p))
        p.family = DP_FAMILY_IPV4
        p.ip_header_bytes = 20
        p.tcp_header_bytes = 20
        p.seq = 1000
        p.ack = 5000
        p.flags = F_ACK | F_PSH
        p.window = 502
        p.payload_bytes = 20
        p.data_len = 20
        p.ttl = 64
        p.df = 1
        sess_receive_client(s, &p, buf, 0.0)
        eout_reset(&out)
        sess_packets_to_send(s, 0.0, &out)
        # the SYN-ACK
        memset(&p, 0, sizeof(p))
        p.seq = 70000
        p.ack = 1000
        p.flags = F_SYN | F_ACK
        p.window = 65535
        sess_receive_response(s, &p, 0.001)
        eout_reset(&out)
        sess_packets_to_send(s, 0.001, &out)
        # the answer: acks the request, 100 bytes of data
        p.seq = 70001
        p.ack = 1020
        p.flags = F_ACK
        p.data_len = 100
        sess_receive_response(s, &p, 0.002)
        sess_handle_timer(s, 0.1)
        eout_reset(&out)
        sess_packets_to_send(s, 0.1, &out)
        while sess_next_event_any(s, &ev):
            pass
    held = dp_live_bytes - before
    states = [arr[i].state for i in range(min(n, 4))]
    for i in range(n):
        sess_free(arr[i])
    free(arr)
    free(counters)
    eout_free(&out)
    return held, states


cdef void* calloc_counters() noexcept nogil:
    cdef void* c = malloc(EC_COUNT * sizeof(uint64_t))
    if c != NULL:
        memset(c, 0, EC_COUNT * sizeof(uint64_t))
    return c
