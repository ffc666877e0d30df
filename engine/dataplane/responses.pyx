# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""intercept-mp's NFQUEUE response path in C: netlink parse, record encode, route lookup.

Theory of operation
-------------------
The compiled twin of three pieces of Python that stay its specification:

* ``parse_queue_messages`` (intercept/sources/nfqueue.py, and engine/io/_fastio.c's
  ``parse_nfqueue``): the NFQNL_MSG_PACKET messages of a netlink datagram, their packet id
  (NFQA_PACKET_HDR) and payload (NFQA_PAYLOAD); other message types, broken attributes and a
  truncated tail are skipped by the same rules;
* ``encode_response_record`` (engine/codec/wire.py): the 64-byte record of a captured
  IPv4/TCP packet, and its ``DecodeError`` cases (counted as ``invalid`` here);
* ``Router``'s route table (intercept/router.py): the key (client ip, client port, target ip
  or 0 with dnat, target port) of a record's (daddr, dport, saddr, sport), the latest add
  wins, and with a per-connection limit the least recently used route of a connection (an
  add or a routed response makes it most recent) is evicted when an add goes over it.

Connections are small ints here ("slots"): the caller (intercept/fastroute.py) maps its
connection objects to them.  A ``ResponseTable`` holds the routes (``hmap.pxi``'s open
addressing map; its value is the index of a route entry, and the entries of a slot form a
doubly linked list, least recent first) and, per slot, the records of the current batch back
to back.  ``recv`` reads up to ``max`` netlink datagrams with one recvmmsg(2) into its own
buffers and runs the batch; ``receive_datagrams`` runs it on a list of bytes (tests, fuzz).
A batch counts its packet messages (``entries``, the last one's id in ``last_id``: the
caller's DROP verdict), the payloads (``packets``), the invalid ones, routed and unrouted
records; unrouted SYN or RST records go to the delayed buffer (the caller hands them to the
router's delay table).  With a pass list (-x, ``set_pass``) a packet to one of its addresses
is ACCEPTed and not routed, as NfqueueSource.receive_messages does, and the batch's verdicts
are its runs of equal verdicts (``verdict_runs``); with -D (``set_docker``) a response to
its first address is encoded as if sent to the second, as InterceptServer does.  Per packet only C types and no Python call (``cython -a``); Python
takes the results once per batch: ``take_slots()`` (one bytes per touched slot, in the order
they were first touched) and ``take_delayed()``.

Memory: the route entries and the map grow with the routes and shrink after a slot's routes
are removed; the per-slot buffers hold one batch (at most ``max`` datagrams of ``bufsize``
bytes, or the datagrams given), and are emptied when the next batch starts.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

import os

include "hmap.pxi"

cdef extern from *:
    """
    #include <errno.h>
    #include <sys/socket.h>

    /* recvmmsg(2) of up to max datagrams into pool (max * bufsize bytes); their lengths in
       lens.  Returns the count, or -errno (EINTR retried). */
    static int rsp_recv(int fd, unsigned char *pool, size_t bufsize, unsigned int max,
                        struct mmsghdr *msgs, struct iovec *iov, uint32_t *lens)
    {
        int r;
        unsigned int k;
        memset(msgs, 0, sizeof(struct mmsghdr) * max);
        for (k = 0; k < max; k++) {
            iov[k].iov_base = pool + (size_t)k * bufsize;
            iov[k].iov_len = bufsize;
            msgs[k].msg_hdr.msg_iov = &iov[k];
            msgs[k].msg_hdr.msg_iovlen = 1;
        }
        do {
            r = recvmmsg(fd, msgs, max, MSG_DONTWAIT, NULL);
        } while (r < 0 && errno == EINTR);
        if (r < 0)
            return -errno;
        for (k = 0; k < (unsigned int)r; k++)
            lens[k] = msgs[k].msg_len < bufsize ? msgs[k].msg_len : (uint32_t)bufsize;
        return r;
    }
    """
    struct mmsghdr:
        pass
    struct iovec:
        pass
    int rsp_recv(int fd, unsigned char* pool, size_t bufsize, unsigned int max,
                 mmsghdr* msgs, iovec* iov, uint32_t* lens) nogil
    int EAGAIN
    int EWOULDBLOCK
    int ENOBUFS


cdef enum:
    RECORD_BYTES = 64           # wire.RESPONSE_RECORD_BYTES
    IP_HDR = 20
    TCP_MIN = 20
    TCP_MAX = 44                # wire.MAX_RESPONSE_TCP_HEADER_BYTES
    NLMSG_HDR = 16
    NFGEN_HDR = 4
    NFQ_PACKET_TYPE = (3 << 8) | 0
    NFQA_PACKET_HDR = 1
    NFQA_PAYLOAD = 10
    NLA_TYPE_MASK = 0x3FFF
    SYN_RST = 0x02 | 0x04
    RECV_MAX = 1024
    PASS_MAX = 64               # -x addresses (the flag takes 32)
    NF_DROP = 0
    NF_ACCEPT = 1


ctypedef struct rentry:
    uint64_t k0
    uint32_t k1
    int32_t slot                # -1: free (next is the free list's link)
    int32_t prev
    int32_t next


ctypedef struct vrun:           # a run of equal verdicts: one NFQNL_MSG_VERDICT_BATCH
    uint32_t verdict
    uint32_t last_id


ctypedef struct rslot:
    int32_t head                # least recently used route, -1: none
    int32_t tail
    int64_t count
    uint8_t* buf                # this batch's records
    size_t len
    size_t cap
    uint8_t touched


cdef inline uint32_t _be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint16_t _be16(const uint8_t* p) noexcept nogil:
    return <uint16_t>((<uint16_t>p[0] << 8) | p[1])


cdef int encode_record(const uint8_t* p, size_t n, uint8_t* rec) noexcept nogil:
    """wire.encode_response_record without payload into rec (64 bytes); -1 where it raises
    DecodeError."""
    cdef size_t ihl, doff, tcp_end
    if n < IP_HDR:
        return -1
    ihl = (p[0] & 0x0F) * 4
    if (p[0] >> 4) != 4 or p[9] != 6 or ihl < IP_HDR:
        return -1
    if n < ihl + TCP_MIN:
        return -1
    doff = (p[ihl + 12] >> 4) * 4
    if doff < TCP_MIN:
        return -1
    tcp_end = ihl + (doff if doff < TCP_MAX else TCP_MAX)
    if tcp_end > n:
        tcp_end = n
    memset(rec, 0, RECORD_BYTES)
    memcpy(rec, p, IP_HDR)
    memcpy(rec + IP_HDR, p + ihl, tcp_end - ihl)
    return 0


def encode(bytes packet):
    """The record of one packet (bytes) or None where encode_response_record raises (tests)."""
    cdef uint8_t rec[RECORD_BYTES]
    if encode_record(<const uint8_t*>PyBytes_AS_STRING(packet), <size_t>PyBytes_GET_SIZE(packet),
                     rec) < 0:
        return None
    return PyBytes_FromStringAndSize(<char*>rec, RECORD_BYTES)


cdef class ResponseTable:
    """Routes (key -> slot) with a per-slot LRU and limit, and the batch call (module doc)."""

    cdef hmap map
    cdef rentry* entries
    cdef int32_t entries_cap
    cdef int32_t free_head
    cdef rslot* slots
    cdef int32_t nslots
    cdef int32_t* touched
    cdef int32_t ntouched
    cdef uint8_t* delayed
    cdef size_t delayed_len, delayed_cap
    cdef unsigned char* pool
    cdef mmsghdr* msgs
    cdef iovec* iov
    cdef uint32_t* lens
    cdef size_t bufsize
    cdef unsigned int recv_max
    cdef bint nomem
    cdef uint32_t pass_ips[PASS_MAX]
    cdef int npass
    cdef bint docker
    cdef uint32_t docker_from, docker_to
    cdef vrun* runs
    cdef size_t nruns, runs_cap
    cdef readonly int64_t limit
    cdef readonly bint dnat
    # the last batch
    cdef readonly int64_t entries_seen
    cdef readonly int64_t last_id
    cdef readonly int64_t packets
    cdef readonly int64_t invalid
    cdef readonly int64_t routed
    cdef readonly int64_t unrouted
    cdef readonly int64_t delayed_count
    cdef readonly int64_t pass_accepted
    cdef readonly int64_t docker_rewritten
    # over the table's life
    cdef readonly int64_t evicted

    def __cinit__(self, int64_t limit=0, bint dnat=False, unsigned int recv_max=256,
                  size_t bufsize=2048):
        if recv_max < 1 or recv_max > RECV_MAX:
            raise ValueError(f"recv_max must be 1..{RECV_MAX}, not {recv_max}")
        if bufsize < 64 or bufsize > (1 << 20):
            raise ValueError(f"bufsize must be 64..1048576, not {bufsize}")
        self.limit = limit if limit > 0 else 0
        self.dnat = dnat
        self.free_head = -1
        self.last_id = -1
        self.recv_max = recv_max
        self.bufsize = bufsize
        self.pool = <unsigned char*>malloc(recv_max * bufsize)
        self.msgs = <mmsghdr*>calloc(recv_max, sizeof(mmsghdr))
        self.iov = <iovec*>calloc(recv_max, sizeof(iovec))
        self.lens = <uint32_t*>calloc(recv_max, sizeof(uint32_t))
        if self.pool == NULL or self.msgs == NULL or self.iov == NULL or self.lens == NULL:
            raise MemoryError()

    def __dealloc__(self):
        cdef int32_t i
        hm_free(&self.map)
        free(self.entries)
        for i in range(self.nslots):
            free(self.slots[i].buf)
        free(self.slots)
        free(self.touched)
        free(self.delayed)
        free(self.pool)
        free(self.msgs)
        free(self.iov)
        free(self.lens)
        free(self.runs)

    # --- routes ------------------------------------------------------------------------------

    cdef int _ensure_slot(self, int32_t slot) except -1:
        cdef int32_t n, i
        cdef rslot* s
        cdef int32_t* t
        if slot < 0:
            raise ValueError(f"slot must be >= 0, not {slot}")
        if slot < self.nslots:
            return 0
        n = self.nslots * 2 if self.nslots else 8
        while n <= slot:
            n *= 2
        s = <rslot*>realloc(self.slots, n * sizeof(rslot))
        if s == NULL:
            raise MemoryError()
        self.slots = s
        t = <int32_t*>realloc(self.touched, n * sizeof(int32_t))
        if t == NULL:
            raise MemoryError()
        self.touched = t
        memset(&s[self.nslots], 0, (n - self.nslots) * sizeof(rslot))
        for i in range(self.nslots, n):
            s[i].head = -1
            s[i].tail = -1
        self.nslots = n
        return 0

    cdef inline void _unlink(self, int32_t e) noexcept nogil:
        cdef rentry* r = &self.entries[e]
        cdef rslot* s = &self.slots[r.slot]
        if r.prev >= 0:
            self.entries[r.prev].next = r.next
        else:
            s.head = r.next
        if r.next >= 0:
            self.entries[r.next].prev = r.prev
        else:
            s.tail = r.prev
        s.count -= 1

    cdef inline void _append(self, int32_t e, int32_t slot) noexcept nogil:
        cdef rentry* r = &self.entries[e]
        cdef rslot* s = &self.slots[slot]
        r.slot = slot
        r.prev = s.tail
        r.next = -1
        if s.tail >= 0:
            self.entries[s.tail].next = e
        else:
            s.head = e
        s.tail = e
        s.count += 1

    cdef int32_t _new_entry(self) except -2:
        cdef int32_t e, n, i
        cdef rentry* grown
        if self.free_head < 0:
            n = self.entries_cap * 2 if self.entries_cap else 64
            grown = <rentry*>realloc(self.entries, n * sizeof(rentry))
            if grown == NULL:
                raise MemoryError()
            self.entries = grown
            for i in range(self.entries_cap, n):
                grown[i].slot = -1
                grown[i].next = i + 1 if i + 1 < n else -1
            self.free_head = self.entries_cap
            self.entries_cap = n
        e = self.free_head
        self.free_head = self.entries[e].next
        return e

    cdef void _free_entry(self, int32_t e) noexcept nogil:
        cdef rentry* r = &self.entries[e]
        cdef hslot* h = hm_get(&self.map, r.k0, r.k1)
        if h != NULL:
            hm_del(&self.map, h)
        r.slot = -1
        r.next = self.free_head
        self.free_head = e

    cdef inline void _key(self, uint32_t ci, uint16_t cp, uint32_t ti, uint16_t tp,
                          uint64_t* k0, uint32_t* k1) noexcept nogil:
        hm_key4(ci, cp, 0 if self.dnat else ti, tp, k0, k1)

    def add(self, uint32_t client_ip, uint16_t client_port, uint32_t target_ip,
            uint16_t target_port, int32_t slot):
        """Route the tuple to ``slot`` (most recent there); returns 1 when the add evicted the
        slot's least recently used route (limit), else 0."""
        cdef uint64_t k0
        cdef uint32_t k1
        cdef bint created
        cdef hslot* h
        cdef int32_t e
        self._ensure_slot(slot)
        if self.free_head < 0:
            # grow before hm_put: a MemoryError after it would leave a map slot without entry
            e = self._new_entry()
            self.entries[e].next = self.free_head
            self.free_head = e
        self._key(client_ip, client_port, target_ip, target_port, &k0, &k1)
        h = hm_put(&self.map, k0, k1, &created)
        if h == NULL:
            raise MemoryError()
        if created:
            e = self._new_entry()
            h.a = e
            self.entries[e].k0 = k0
            self.entries[e].k1 = k1
        else:
            e = <int32_t>h.a
            self._unlink(e)
        self._append(e, slot)
        if self.limit and self.slots[slot].count > self.limit:
            e = self.slots[slot].head
            self._unlink(e)
            self._free_entry(e)
            self.evicted += 1
            return 1
        return 0

    def remove_slot(self, int32_t slot):
        """Forget every route of ``slot``; returns how many."""
        cdef int32_t e, nxt
        cdef int64_t n = 0
        if slot < 0 or slot >= self.nslots:
            return 0
        e = self.slots[slot].head
        while e >= 0:
            nxt = self.entries[e].next
            self._free_entry(e)
            e = nxt
            n += 1
        self.slots[slot].head = -1
        self.slots[slot].tail = -1
        self.slots[slot].count = 0
        if hm_shrink(&self.map) < 0:
            raise MemoryError()
        return n

    def lookup(self, uint32_t client_ip, uint16_t client_port, uint32_t target_ip,
               uint16_t target_port):
        """The slot of the tuple, or -1 (no LRU touch)."""
        cdef uint64_t k0
        cdef uint32_t k1
        cdef hslot* h
        self._key(client_ip, client_port, target_ip, target_port, &k0, &k1)
        h = hm_get(&self.map, k0, k1)
        return self.entries[h.a].slot if h != NULL else -1

    cdef int32_t _route(self, const uint8_t* rec) noexcept nogil:
        # Router.route's key: the response goes to (daddr, dport) from (saddr, sport).
        cdef uint64_t k0
        cdef uint32_t k1
        cdef hslot* h
        cdef int32_t e, slot
        self._key(_be32(rec + 16), _be16(rec + 22), _be32(rec + 12), _be16(rec + 20), &k0, &k1)
        h = hm_get(&self.map, k0, k1)
        if h == NULL:
            return -1
        e = <int32_t>h.a
        slot = self.entries[e].slot
        if self.limit and self.slots[slot].tail != e:
            self._unlink(e)
            self._append(e, slot)
        return slot

    def route(self, bytes record):
        """The slot for a response record (>= 34 bytes: the caller checks), or -1; a hit
        makes the route most recent when there is a limit."""
        if PyBytes_GET_SIZE(record) < IP_HDR + 14:
            raise ValueError("record too short to route")
        return self._route(<const uint8_t*>PyBytes_AS_STRING(record))

    def routes_of(self, int32_t slot):
        """The keys routed to ``slot``, least recently used first."""
        cdef list out = []
        cdef int32_t e
        cdef rentry r
        if slot < 0 or slot >= self.nslots:
            return out
        e = self.slots[slot].head
        while e >= 0:
            r = self.entries[e]
            out.append((<uint32_t>(r.k0 >> 32), <uint16_t>(r.k1 >> 16), <uint32_t>r.k0,
                        <uint16_t>r.k1))
            e = r.next
        return out

    def slot_routes(self, int32_t slot):
        """How many routes ``slot`` has."""
        if slot < 0 or slot >= self.nslots:
            return 0
        return self.slots[slot].count

    def __len__(self):
        return self.map.n

    # --- the batch ---------------------------------------------------------------------------

    cdef void _begin(self) noexcept nogil:
        cdef int32_t i
        for i in range(self.ntouched):
            self.slots[self.touched[i]].len = 0
            self.slots[self.touched[i]].touched = 0
        self.ntouched = 0
        self.delayed_len = 0
        self.entries_seen = 0
        self.last_id = -1
        self.packets = 0
        self.invalid = 0
        self.routed = 0
        self.unrouted = 0
        self.delayed_count = 0
        self.pass_accepted = 0
        self.docker_rewritten = 0
        self.nruns = 0
        self.nomem = False

    cdef int _push(self, uint8_t** buf, size_t* length, size_t* cap,
                   const uint8_t* rec) noexcept nogil:
        cdef size_t n
        cdef uint8_t* grown
        if length[0] + RECORD_BYTES > cap[0]:
            n = cap[0] * 2 if cap[0] else 16 * RECORD_BYTES
            grown = <uint8_t*>realloc(buf[0], n)
            if grown == NULL:
                self.nomem = True
                return -1
            buf[0] = grown
            cap[0] = n
        memcpy(buf[0] + length[0], rec, RECORD_BYTES)
        length[0] += RECORD_BYTES
        return 0

    cdef void _payload(self, const uint8_t* p, size_t n) noexcept nogil:
        cdef uint8_t rec[RECORD_BYTES]
        cdef int32_t slot
        cdef rslot* s
        cdef bint rewrite
        self.packets += 1
        # -D (InterceptServer.receive_ip_packets): daddr rewritten before the encode, whose
        # checks do not read it, so the record's copy is rewritten instead
        rewrite = self.docker and n >= IP_HDR and _be32(p + 16) == self.docker_from
        if rewrite:
            self.docker_rewritten += 1
        if encode_record(p, n, rec) < 0:
            self.invalid += 1
            return
        if rewrite:
            rec[16] = <uint8_t>(self.docker_to >> 24)
            rec[17] = <uint8_t>(self.docker_to >> 16)
            rec[18] = <uint8_t>(self.docker_to >> 8)
            rec[19] = <uint8_t>self.docker_to
        slot = self._route(rec)
        if slot >= 0:
            self.routed += 1
            s = &self.slots[slot]
            if not s.touched:
                s.touched = 1
                self.touched[self.ntouched] = slot
                self.ntouched += 1
            self._push(&s.buf, &s.len, &s.cap, rec)
        elif rec[IP_HDR + 13] & SYN_RST:
            self.delayed_count += 1
            self._push(&self.delayed, &self.delayed_len, &self.delayed_cap, rec)
        else:
            self.unrouted += 1

    cdef void _verdict(self, int64_t pid, const uint8_t* pay, size_t paylen) noexcept nogil:
        # NfqueueSource.receive_messages with a pass list: ACCEPT a daddr of -x, DROP (and
        # route) the rest; one verdict message per run of equal verdicts
        cdef uint32_t verdict = NF_DROP, daddr
        cdef int i
        cdef size_t n
        cdef vrun* grown
        if pay != NULL and paylen >= IP_HDR:
            daddr = _be32(pay + 16)
            for i in range(self.npass):
                if self.pass_ips[i] == daddr:
                    verdict = NF_ACCEPT
                    break
        if verdict == NF_ACCEPT:
            self.pass_accepted += 1
        elif pay != NULL:
            self._payload(pay, paylen)
        if self.nruns and self.runs[self.nruns - 1].verdict == verdict:
            self.runs[self.nruns - 1].last_id = <uint32_t>pid
            return
        if self.nruns == self.runs_cap:
            n = self.runs_cap * 2 if self.runs_cap else 64
            grown = <vrun*>realloc(self.runs, n * sizeof(vrun))
            if grown == NULL:
                self.nomem = True
                return
            self.runs = grown
            self.runs_cap = n
        self.runs[self.nruns].verdict = verdict
        self.runs[self.nruns].last_id = <uint32_t>pid
        self.nruns += 1

    cdef void _datagram(self, const uint8_t* buf, size_t n) noexcept nogil:
        # parse_queue_messages, rule for rule
        cdef size_t pos = 0, end, a, paylen = 0
        cdef uint32_t mlen
        cdef uint16_t mtype, alen, atype
        cdef int64_t pid
        cdef const uint8_t* pay
        while pos + NLMSG_HDR + NFGEN_HDR <= n:
            memcpy(&mlen, buf + pos, 4)  # host order, as netlink sends it
            memcpy(&mtype, buf + pos + 4, 2)
            if mlen < NLMSG_HDR or mlen > n - pos:
                return
            end = pos + mlen
            if mtype == NFQ_PACKET_TYPE:
                pid = -1
                pay = NULL
                a = pos + NLMSG_HDR + NFGEN_HDR
                while a + 4 <= end:
                    memcpy(&alen, buf + a, 2)
                    memcpy(&atype, buf + a + 2, 2)
                    if alen < 4 or a + alen > end:
                        break
                    atype &= NLA_TYPE_MASK
                    if atype == NFQA_PACKET_HDR and alen >= 8:
                        pid = _be32(buf + a + 4)
                    elif atype == NFQA_PAYLOAD:
                        pay = buf + a + 4
                        paylen = alen - 4
                    a += (<size_t>alen + 3) & ~(<size_t>3)
                if pid >= 0:
                    self.entries_seen += 1
                    self.last_id = pid
                    if self.npass:
                        self._verdict(pid, pay, paylen)
                    elif pay != NULL:
                        self._payload(pay, paylen)
            pos += (<size_t>mlen + 3) & ~(<size_t>3)

    def receive_datagrams(self, list datagrams):
        """One batch over the given netlink datagrams (bytes); returns the packet messages."""
        cdef object d
        self._begin()
        for d in datagrams:
            if type(d) is not bytes:
                raise TypeError("datagrams must be bytes")
            self._datagram(<const uint8_t*>PyBytes_AS_STRING(d), <size_t>PyBytes_GET_SIZE(d))
        if self.nomem:
            raise MemoryError()
        return self.entries_seen

    def recv(self, int fd):
        """One recvmmsg (non-blocking) of up to recv_max datagrams and their batch; returns
        how many datagrams were read (0: none waiting) or -ENOBUFS (netlink overrun, nothing
        read); other errors raise OSError."""
        cdef int r, k
        cdef size_t off
        self._begin()
        with nogil:
            r = rsp_recv(fd, self.pool, self.bufsize, self.recv_max, self.msgs, self.iov,
                         self.lens)
            if r > 0:
                for k in range(r):
                    off = <size_t>k * self.bufsize
                    self._datagram(self.pool + off, self.lens[k])
        if r < 0:
            if -r == EAGAIN or -r == EWOULDBLOCK:
                return 0
            if -r == ENOBUFS:
                return r
            raise OSError(-r, os.strerror(-r))
        if self.nomem:
            raise MemoryError()
        return r

    def set_pass(self, ips):
        """-x: packets to these addresses (ints) are ACCEPTed, not routed; then the verdicts
        of a batch are ``verdict_runs()`` instead of one DROP up to ``last_id``."""
        cdef list values = [int(ip) for ip in ips]
        cdef int i
        if len(values) > PASS_MAX:
            raise ValueError(f"at most {PASS_MAX} pass addresses, not {len(values)}")
        for i in range(len(values)):
            self.pass_ips[i] = <uint32_t>values[i]
        self.npass = len(values)

    def set_docker(self, uint32_t daddr_from, uint32_t daddr_to):
        """-D A-B: responses to A are encoded (and routed) as if sent to B."""
        self.docker = True
        self.docker_from = daddr_from
        self.docker_to = daddr_to

    @property
    def has_pass_list(self):
        return self.npass > 0

    def verdict_runs(self):
        """[(verdict, last packet id)] of the last batch with a pass list, in order."""
        cdef size_t i
        return [(self.runs[i].verdict, self.runs[i].last_id) for i in range(self.nruns)]

    def take_slots(self):
        """[(slot, records)] of the last batch, in the order the slots were first touched;
        each slot once.  The buffers are emptied when the next batch starts."""
        cdef list out = []
        cdef int32_t i, slot
        cdef rslot* s
        for i in range(self.ntouched):
            slot = self.touched[i]
            s = &self.slots[slot]
            out.append((slot, PyBytes_FromStringAndSize(<char*>s.buf, s.len)))
        return out

    def take_delayed(self):
        """The unrouted SYN/RST records of the last batch, back to back."""
        return PyBytes_FromStringAndSize(<char*>self.delayed, self.delayed_len)
