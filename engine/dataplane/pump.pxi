# The worker's capture path of one wake-up in one call (included by engine.pyx after
# table.pxi): engine/proc/worker.py's Python loop is its specification.
#
# A worker wake-up on its ring does, in Python: clear the ring's eventfd, peek a batch of
# records (loss marks counted), hand them to the table (``receive_ring``), release them, maybe
# a second batch (a backlog), the table's due timers, then drain the table into the send
# buffer and sendmmsg it on the raw socket.  ``Pump.run`` does the same steps in that order
# with no Python call in between: the ring's counters and records read in place, the table's C
# entries (``tb_receive_ring``, ``tb_handle_timer``, ``tb_drain_out``), and one sendmmsg
# per 256 packets straight from the table's output buffer.  It hands control back to Python
# for what is Python's: routes to announce before their packets leave (``PUMP_ROUTES``: the
# caller announces ``take_routes()`` and calls ``drain``), and a packet the kernel refused
# (``PUMP_SEND_ERROR``: the caller's sender sends the rest from the send buffer and counts,
# logs the refusal, as it does for every other send).

cdef extern from *:
    """
    #include <errno.h>
    #include <math.h>
    #include <sys/epoll.h>
    #include <time.h>
    #include <netinet/in.h>
    #include <netinet/tcp.h>
    #include <sys/socket.h>
    #include <unistd.h>

    #define PUMP_CHUNK 256 /* messages per sendmmsg (engine/io/_fastio.c: the same) */

    /* Packets [*at, n) of buf (back to back, lens[i] bytes each) sent on the raw socket fd,
       each to its own IPv4 destination: _fastio.c's send_raw_buffer loop.  *at and *off move
       past what went out and *bytes counts it; returns 0 (all sent) or the errno of the
       packet at *at that the kernel refused (EINVAL: shorter than an IPv4 header). */
    static int pump_send(int fd, const uint8_t *buf, const uint32_t *lens, uint32_t n,
                         uint32_t *at, size_t *off, uint64_t *bytes)
    {
        struct mmsghdr msgs[PUMP_CHUNK];
        struct iovec iov[PUMP_CHUNK];
        struct sockaddr_in addr[PUMP_CHUNK];
        while (*at < n) {
            unsigned int k = 0;
            size_t o = *off;
            while (k < PUMP_CHUNK && *at + k < n) {
                uint32_t len = lens[*at + k];
                if (len < 20)
                    break;
                memset(&addr[k], 0, sizeof(addr[k]));
                addr[k].sin_family = AF_INET;
                memcpy(&addr[k].sin_addr, buf + o + 16, 4);
                iov[k].iov_base = (void *)(buf + o);
                iov[k].iov_len = len;
                memset(&msgs[k], 0, sizeof(msgs[k]));
                msgs[k].msg_hdr.msg_name = &addr[k];
                msgs[k].msg_hdr.msg_namelen = sizeof(addr[k]);
                msgs[k].msg_hdr.msg_iov = &iov[k];
                msgs[k].msg_hdr.msg_iovlen = 1;
                o += len;
                k++;
            }
            if (k == 0)
                return EINVAL;
            int r;
            do {
                r = sendmmsg(fd, msgs, k, MSG_DONTWAIT);
            } while (r < 0 && errno == EINTR);
            if (r < 0)
                return errno;
            for (int j = 0; j < r; j++) {
                *bytes += lens[*at];
                *off += lens[*at];
                (*at)++;
            }
        }
        return 0;
    }

    /* The ring's counters (engine/io/ring.py "Counters"): the other side's read once per
       batch, our own published after the batch's records were read. */
    static inline uint64_t pump_load(const uint64_t *p)
    { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void pump_store(uint64_t *p, uint64_t v)
    { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

    /* The wait loop's clock: time.monotonic()'s. */
    static inline double pump_now(void)
    {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }

    /* selectors.EpollSelector.select's wait: the timeout in whole milliseconds, rounded up,
       at most a minute (the caller's deadlines come back sooner). */
    static inline int pump_epoll_wait(int epfd, struct epoll_event *evs, int max, double s)
    {
        int ms = 0;
        if (s > 0)
            ms = s >= 60.0 ? 60000 : (int)ceil(s * 1e3);
        return epoll_wait(epfd, evs, max, ms);
    }

    /* One recv of an intercept connection (its socket is non-blocking); -errno on error,
       -EAGAIN when nothing is there.  A read that got bytes puts the connection back in
       delayed-ACK mode (channel.py "Acknowledgements": TCP_QUICKACK 0, as ``_read`` does). */
    static inline ssize_t pump_recv(int fd, uint8_t *buf, size_t n)
    {
        ssize_t r;
        do {
            r = recv(fd, buf, n, MSG_DONTWAIT);
        } while (r < 0 && errno == EINTR);
        if (r < 0)
            return errno == EWOULDBLOCK ? -EAGAIN : -errno;
        if (r > 0) {
            int off = 0;
            (void)setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &off, sizeof(off));
        }
        return r;
    }

    static inline int pump_errno(void) { return errno; }

    /* RingSource.clear_wakeup: the eventfd consumed (EAGAIN when it was not rung). */
    static inline void pump_clear_wakeup(int efd)
    { uint64_t v; ssize_t r = read(efd, &v, sizeof(v)); (void)r; }
    """
    int pump_send(int fd, const uint8_t* buf, const uint32_t* lens, uint32_t n,
                  uint32_t* at, size_t* off, uint64_t* nbytes) noexcept nogil
    uint64_t pump_load(const uint64_t* p) noexcept nogil
    void pump_store(uint64_t* p, uint64_t v) noexcept nogil
    void pump_clear_wakeup(int efd) noexcept nogil
    double pump_now() noexcept nogil
    Py_ssize_t pump_recv(int fd, uint8_t* buf, size_t n) noexcept nogil
    int pump_errno() noexcept nogil
    cdef struct epoll_data_view "epoll_data":
        int fd
    cdef struct epoll_event:
        uint32_t events
        epoll_data_view data
    int pump_epoll_wait(int epfd, epoll_event* evs, int max, double s) noexcept nogil
    enum:
        EPOLLIN
        EAGAIN


cdef enum:
    PM_DONE = 0
    PM_ROUTES = 1
    PM_SEND_ERROR = 2
    PM_WAIT_EVENTS = 3
    PM_WAIT_DUE = 4
    PM_WAIT_READ_END = 5
    PM_WAIT_FRAME_ERROR = 6
    PM_WAIT_RING = 7
    PM_WAIT_FDS = 64        # the connections and events one wait handles
    PM_READ_BYTES = 65536   # engine/io/channel.py READ_BYTES
    PM_READS_PER_EVENT = 64  # ... and its READS_PER_EVENT_MAX

PUMP_DONE = PM_DONE
"""Everything read, timed out, drained and sent."""
PUMP_ROUTES = PM_ROUTES
"""Routes to announce (``take_routes``) before the drain's packets leave: then ``drain``."""
PUMP_SEND_ERROR = PM_SEND_ERROR
"""The kernel refused a packet: the rest of the drain is the caller's (``drain_into``)."""
PUMP_WAIT_EVENTS = PM_WAIT_EVENTS
"""``wait``: events for the caller's selector (none of them consumed)."""
PUMP_WAIT_DUE = PM_WAIT_DUE
"""``wait``: the caller's deadline came (the responses read so far drained and sent)."""
PUMP_WAIT_READ_END = PM_WAIT_READ_END
"""``wait``: a connection's read found its end or an error (``wait_fd``, ``wait_errno``)."""
PUMP_WAIT_FRAME_ERROR = PM_WAIT_FRAME_ERROR
"""``wait``: a connection's frames did not decode (``wait_fd``, ``wait_error``)."""
PUMP_WAIT_RING = PM_WAIT_RING
"""``wait``: the ring's eventfd fired (not consumed), the connections' reads of that wait
done and drained: the caller's wake-up on its ring."""
PUMP_READ_BYTES = PM_READ_BYTES
PUMP_READS_PER_EVENT = PM_READS_PER_EVENT

cdef class Pump:
    """One wake-up's ring batches, timers, drain and sendmmsg for a worker (module comment).

    ``ring``: the consumer side of the worker's ring (engine.io.ring.Ring), ``layout`` its
    geometry (engine.io.ring.record_layout()); its consumer state (the tail, the loss marks
    read, the corrupt batches) is loaded from it when ``run`` starts and written back when it
    returns, as the
    capture's BlockWalker does with the producer's.  ``fd`` is the raw socket (IP_HDRINCL)
    the worker's sender sends on, ``send_counters`` the sender's Counter (``send_packets``,
    ``send_bytes`` added per call).  ``note_loss``: a batch holding a loss mark calls the
    table's ``note_capture_loss`` first (RingSource.on_loss).

    After ``run``: ``errors`` (packets that did not parse), ``backlog`` (the ring still has
    packets), ``reads`` (batches read)."""

    cdef Table table
    cdef object ring
    cdef object _block
    cdef uint64_t* head
    cdef uint64_t* tail
    cdef uint64_t tail_mine
    cdef uint64_t marks
    cdef uint64_t corrupt
    cdef const uint8_t* area
    cdef uint64_t capacity
    cdef Py_ssize_t batch_max
    cdef int efd
    cdef int fd
    cdef bint note_loss
    cdef object send_counters
    cdef list routes
    cdef readonly int errors
    cdef readonly bint backlog
    cdef readonly int reads
    cdef uint8_t* rbuf
    cdef readonly int64_t responses
    cdef readonly int wait_fd
    cdef readonly int wait_errno
    cdef readonly object wait_error
    cdef readonly int64_t waits
    cdef readonly double sent_at
    cdef readonly int64_t sent_mark

    def __dealloc__(self):
        free(self.rbuf)

    def __init__(self, Table table, ring, layout, int fd, send_counters,
                 Py_ssize_t batch_max, bint note_loss=True):
        cdef uint8_t[::1] b = _as_writable_bytes(ring._buf)
        cdef Py_ssize_t size = b.shape[0]
        cdef uint64_t capacity = ring.capacity
        cdef Py_ssize_t head_at = layout["head_at"], tail_at = layout["tail_at"]
        cdef Py_ssize_t area_at = layout["header_bytes"]
        cdef uint8_t* base
        if (layout["data_at"] != DP_RING_HEADER_BYTES or layout["length_at"] != 0
                or layout["flags_at"] != 4 or layout["align"] != DP_RING_ALIGN
                or layout["flag_loss_before"] != DP_RING_LOSS_BEFORE):
            raise ValueError("the ring's record header is not the one tb_receive_ring reads")
        if capacity < 8 or capacity % DP_RING_ALIGN:
            raise ValueError(f"bad ring geometry: {capacity} bytes")
        if head_at < 0 or tail_at < 0 or head_at % 8 or tail_at % 8 or (
            max(head_at, tail_at) + 8 > area_at or <uint64_t>area_at + capacity > <uint64_t>size
        ):
            raise ValueError("the ring's counters and records do not fit its block")
        if batch_max <= 0:
            raise ValueError(f"batch_max must be positive, not {batch_max}")
        base = &b[0]
        if <intptr_t>base % 8:
            raise ValueError("the ring's block is not 8-byte aligned")
        self._block = b
        self.ring = ring
        self.table = table
        self.head = <uint64_t*>(base + head_at)
        self.tail = <uint64_t*>(base + tail_at)
        self.area = base + area_at
        self.capacity = capacity
        self.batch_max = batch_max
        self.efd = ring.efd
        self.fd = fd
        self.note_loss = note_loss
        self.send_counters = send_counters
        self.routes = []

    cdef inline uint64_t pm_used(self, uint64_t head, uint64_t tail) noexcept nogil:
        """Ring._used: head - tail clamped to [0, capacity]."""
        if head <= tail:
            return 0
        return head - tail if head - tail <= self.capacity else self.capacity

    cdef int pm_read(self, double now) noexcept nogil:
        """RingSource.receive_into: one batch (Ring.peek_records: up to batch_max records)
        read in place, then released; returns the parse errors.

        One walk over the batch's record headers: each record is parsed as it is met
        (``Table.tb_client_ip``, as tb_receive_ring does) while the batch's extent and loss
        marks are counted (Ring.peek_records' scan).  A loss mark notes the loss on the table
        when it is met, not before the batch as RingSource.on_loss does: the table reads it
        only when it drains (``tb_drain_out``), after the batch, so the two agree."""
        cdef uint64_t tail, avail, used = 0, at
        cdef int64_t step
        cdef uint32_t length, flags
        cdef Py_ssize_t count = 0
        cdef int errors = 0
        cdef uint64_t marks = 0
        pump_clear_wakeup(self.efd)
        tail = self.tail_mine
        avail = self.pm_used(pump_load(self.head), tail)
        if avail:
            self.table.tb_count_begin()
            while count < self.batch_max and used < avail:
                step = dp_ring_step(self.area, self.capacity, tail + used, avail - used, &at,
                                    &length, &flags)
                if step < 0:
                    if count == 0:
                        # Ring.peek_records: nothing readable at the front (wrap marks at
                        # most), a corrupted block; what was published is given back and
                        # the walk starts again at the head.
                        self.corrupt += 1
                        used = avail
                    break
                used += <uint64_t>step
                if dp_ring_is_wrap(length):
                    continue
                count += 1
                if flags & DP_RING_LOSS_BEFORE:
                    marks += 1
                    if self.note_loss:
                        self.table.has_loss = True
                        self.table.loss_at = now
                errors += self.table.tb_client_ip(self.area + at, length, now)
            self.table.tb_count_end()
            self.marks += marks
            self.tail_mine = tail + used
            pump_store(self.tail, self.tail_mine)
        self.backlog = self.pm_used(pump_load(self.head), self.tail_mine) > 0
        self.reads += 1
        return errors

    cdef int pm_drain_send(self, uint64_t* packets, uint64_t* nbytes) noexcept nogil:
        """Table.drain_into and the sender's send_buffer in one: the table's output buffer
        sent as it is.  Returns PUMP_DONE, or PUMP_ROUTES / PUMP_SEND_ERROR (the drain's
        packets left queued from ``pend_at`` on, for ``drain`` / ``drain_into``)."""
        cdef uint32_t at
        while True:
            if self.table.pend_at >= self.table.out.n:
                eout_reset(&self.table.out)
                self.table.pend_at = 0
                self.table.pend_off = 0
                if not self.table.touched_n:
                    return PM_DONE
                self.table.routes_n = 0
                self.table.tb_count_begin()
                self.table.tb_drain_out()
                self.table.tb_count_end()
                if self.table.routes_n:
                    return PM_ROUTES
            at = self.table.pend_at
            if pump_send(self.fd, self.table.out.buf, self.table.out.lens, self.table.out.n, &self.table.pend_at, &self.table.pend_off,
                         nbytes):
                packets[0] += self.table.pend_at - at
                return PM_SEND_ERROR
            packets[0] += self.table.pend_at - at

    cdef int pm_finish(self, int status, uint64_t packets, uint64_t nbytes) except -1:
        cdef Table t = self.table
        cdef size_t i
        cdef EEvent* r
        if packets:
            c = self.send_counters
            c["send_packets"] += <int64_t>packets
            c["send_bytes"] += <int64_t>nbytes
        if status == PM_ROUTES:
            r = t.routes
            self.routes = [
                _RouteNeeded(r[i].cip, r[i].cport, r[i].tip, r[i].tport)
                for i in range(t.routes_n)
            ]
            t.routes_n = 0
        t._check()
        return status

    def run(self, double now, int reads):
        """Up to ``reads`` ring batches (a second one only while a backlog remains), the
        table's timers when due, then the drain sent: worker.py's wake-up for its ring."""
        cdef int status, k
        cdef double timer
        cdef uint64_t packets = 0, nbytes = 0
        if self._block is None:
            raise ValueError("the pump is closed")
        self.errors = 0
        self.reads = 0
        self.marks = 0
        self.corrupt = 0
        if reads > 0:
            self.tail_mine = self.ring._tail_mine
        with nogil:
            for k in range(reads):
                if k and not self.backlog:
                    break
                self.errors += self.pm_read(now)
            timer = self.table.tb_get_timer()
            if tset(timer) and timer <= now:
                self.table.tb_count_begin()
                self.table.tb_handle_timer(now)
                self.table.tb_count_end()
            status = self.pm_drain_send(&packets, &nbytes)
        if self.reads:
            ring = self.ring
            ring._tail_mine = self.tail_mine
            if self.marks:
                ring.loss_marks += self.marks
            if self.corrupt:
                ring.corrupt += self.corrupt
        return self.pm_finish(status, packets, nbytes)

    def drain(self):
        """The table drained and sent (Table.drain_into and the sender's send_buffer in one:
        the worker's flush after responses), or after PUMP_ROUTES, once they are announced,
        the drain sent on."""
        cdef int status
        cdef uint64_t packets = 0, nbytes = 0
        if self._block is None:
            raise ValueError("the pump is closed")
        with nogil:
            status = self.pm_drain_send(&packets, &nbytes)
        return self.pm_finish(status, packets, nbytes)

    cdef int pm_read_conn(self, int fd, FrameReader reader, double now) except -1:
        """channel.py ``InterceptChannels._read`` for a connected connection: reads until one
        comes back short (at most PM_READS_PER_EVENT), each fed to the connection's reader.
        Returns 0, or PM_WAIT_READ_END (the end or an error: ``wait_errno``, 0 for the end)
        or PM_WAIT_FRAME_ERROR (``wait_error``), ``wait_fd`` set: the caller's to handle."""
        cdef Py_ssize_t n
        cdef int k
        for k in range(PM_READS_PER_EVENT):
            with nogil:
                n = pump_recv(fd, self.rbuf, PM_READ_BYTES)
            if n == -EAGAIN:
                return 0
            if n <= 0:
                self.wait_fd = fd
                self.wait_errno = <int>-n
                return PM_WAIT_READ_END
            try:
                self.responses += reader.fr_feed(self.rbuf, n, now)
            except _fr_DecodeError as exc:
                self.wait_fd = fd
                self.wait_error = exc
                return PM_WAIT_FRAME_ERROR
            if n < PM_READ_BYTES:
                return 0
        return 0

    def wait(self, int epfd, double deadline, fds, readers, at=None, bint until_idle=False):
        """The worker's loop between its Python deadlines (worker.py "The compiled wait"):
        waits on the selector's epoll ``epfd`` until ``deadline`` (time.monotonic), reading
        the connections ``fds`` (connected intercepts, response records into ``readers[i]``,
        their FrameReaders) itself, draining and sending after them, and running the table's
        timers when due, as the loop does.  Returns to the caller for everything else, with:

        * PUMP_WAIT_RING: the ring's eventfd fired (not read), with connection reads or
          alone: those read and drained first, as the loop's responses before its ring;
        * PUMP_WAIT_EVENTS: an event that is neither a connection's read nor the ring's (a
          signal, a writable or failing socket, another fd), or an interrupted wait; that
          wait's events are not consumed (the caller's selector sees them again);
        * PUMP_WAIT_DUE: ``deadline`` came;
        * PUMP_WAIT_READ_END / PUMP_WAIT_FRAME_ERROR: a connection failed (``wait_fd``): what
          it read before is in the table, not drained;
        * PUMP_ROUTES / PUMP_SEND_ERROR: a drain's hand-back (``drain``'s).

        ``responses``: the records read (the channel's ``responses_received``); ``waits``:
        the epoll waits made; ``sent_at``: the clock of the last step whose drain or timers
        changed the table's ``sent`` count (what the offline tail watches), ``sent_mark``
        that count then (-1: none did).  ``until_idle``: the wait also ends (PUMP_WAIT_DUE)
        after a step that left the table with no session (an offline replay's input ended).
        ``at``: a fixed clock (a test's scripted time) read instead of time.monotonic; the
        wait then ends (PUMP_WAIT_DUE) at its first timeout."""
        cdef epoll_event evs[PM_WAIT_FDS]
        cdef int cfds[PM_WAIT_FDS]
        cdef int nfd = len(fds), n, i, j, k, status = PM_DONE
        cdef bint ring = False
        cdef double now, until, timer
        cdef uint64_t packets = 0, nbytes = 0
        cdef int64_t sent
        cdef list rd = list(readers)
        cdef bint fixed = at is not None
        cdef double fixed_at = at if fixed else 0.0
        if self._block is None:
            raise ValueError("the pump is closed")
        if nfd > PM_WAIT_FDS or len(rd) != nfd:
            raise ValueError(f"{nfd} connections, {len(rd)} readers (at most {PM_WAIT_FDS})")
        for i in range(nfd):
            cfds[i] = fds[i]
            if not isinstance(rd[i], FrameReader):
                raise TypeError("a reader that is not a FrameReader")
        if self.rbuf == NULL:
            self.rbuf = <uint8_t*>malloc(PM_READ_BYTES)
            if self.rbuf == NULL:
                raise MemoryError()
        self.responses = 0
        self.waits = 0
        self.sent_mark = -1
        self.sent_at = 0.0
        sent = <int64_t>self.table.c[EC_SEND]
        self.wait_fd = -1
        self.wait_errno = 0
        self.wait_error = None
        while True:
            now = fixed_at if fixed else pump_now()
            until = deadline
            timer = self.table.tb_get_timer()
            if tset(timer) and timer < until:
                until = timer
            with nogil:
                n = pump_epoll_wait(epfd, evs, PM_WAIT_FDS, until - now)
            self.waits += 1
            now = fixed_at if fixed else pump_now()
            if n < 0:
                status = PM_WAIT_EVENTS  # EINTR: a signal, the caller's to handle
                break
            if fixed and n == 0:
                status = PM_WAIT_DUE
                break
            # Every event must be a connection's read or the ring's, or none is taken.
            ring = False
            for i in range(n):
                if evs[i].events != EPOLLIN:
                    status = PM_WAIT_EVENTS
                    break
                if evs[i].data.fd == self.efd:
                    ring = True
                    continue
                for j in range(nfd):
                    if cfds[j] == evs[i].data.fd:
                        break
                else:
                    status = PM_WAIT_EVENTS
                    break
            if status:
                break
            if n > <int>ring:
                # The loop's responses, then its drain after them.
                for i in range(n):
                    if evs[i].data.fd == self.efd:
                        continue
                    for j in range(nfd):
                        if cfds[j] == evs[i].data.fd:
                            break
                    status = self.pm_read_conn(cfds[j], <FrameReader>rd[j], now)
                    if status:
                        break
                if status:
                    break
                with nogil:
                    status = self.pm_drain_send(&packets, &nbytes)
                if <int64_t>self.table.c[EC_SEND] != sent:
                    sent = <int64_t>self.table.c[EC_SEND]
                    self.sent_mark = sent
                    self.sent_at = now
                if status:
                    break
            if ring:
                status = PM_WAIT_RING
                break
            if now >= deadline:
                status = PM_WAIT_DUE
                break
            # The loop's capture step with nothing read: the table's due timers, the drain.
            with nogil:
                timer = self.table.tb_get_timer()
                if tset(timer) and timer <= now:
                    self.table.tb_count_begin()
                    self.table.tb_handle_timer(now)
                    self.table.tb_count_end()
                status = self.pm_drain_send(&packets, &nbytes)
            if <int64_t>self.table.c[EC_SEND] != sent:
                sent = <int64_t>self.table.c[EC_SEND]
                self.sent_mark = sent
                self.sent_at = now
            if status:
                break
            if until_idle and self.table.nresp == 0:
                status = PM_WAIT_DUE
                break
        return self.pm_finish(status, packets, nbytes)

    def close(self):
        """Let go of the ring's block (Ring.close needs its exports gone); ``run`` then
        raises."""
        self._block = None
        self.ring = None

    def take_routes(self):
        """The routes of the last PUMP_ROUTES (RouteNeeded, as ``drain_into`` gives them)."""
        routes, self.routes = self.routes, []
        return routes
