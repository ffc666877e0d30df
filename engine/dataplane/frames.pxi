# The response path of one intercept connection as one call per read: FrameReader.
#
# engine/codec/wire.py FrameDecoder.feed_records followed by Table.receive_records is the
# specification: the same records reach the table, the same DecodeError (same message, and
# raised again by every later feed) for a frame count of 0 or past ``max_count``, the same
# ``frames`` and ``pending_bytes``.  As there, a bad count anywhere in a read feeds none of
# that read's frames.  The difference is where the bytes lie: complete frames are decoded in
# the caller's read buffer; only a frame (or record) cut by a read boundary is copied, into
# the reader's own buffer, until a later read completes it.

from libc.stdlib cimport malloc, free, realloc
from libc.string cimport memcpy

from engine.errors import DecodeError as _fr_DecodeError


cdef class FrameReader:
    """Intercept frames (``!H count`` + count records; ``combined=False``: a plain stream of
    records) from one connection's reads into ``table``: ``feed(buf, n, now)`` takes the
    first ``n`` bytes of ``buf`` and returns how many records went to the table (those that
    do not decode included: the table counts them in ``response_decode_errors``)."""

    cdef Table table
    cdef readonly Py_ssize_t record_bytes, max_count
    cdef readonly bint combined
    cdef readonly int64_t frames
    cdef uint8_t* hold
    cdef Py_ssize_t hold_n, hold_cap, error_pending
    cdef object error

    def __cinit__(self, Table table not None, Py_ssize_t record_bytes=WR_RESPONSE_RECORD_BYTES,
                  bint combined=True, max_count=None):
        if record_bytes <= 0:
            raise ValueError(f"record_bytes must be positive, not {record_bytes}")
        self.table = table
        self.record_bytes = record_bytes
        self.combined = combined
        if max_count is None:
            from engine.codec.wire import max_records_per_frame
            max_count = max_records_per_frame(record_bytes)
        self.max_count = max_count
        self.frames = 0
        self.hold = NULL
        self.hold_n = self.hold_cap = 0
        self.error = None

    def __dealloc__(self):
        free(self.hold)

    @property
    def pending_bytes(self):
        """Bytes of an incomplete frame/record held for the next ``feed`` (0 = on a
        boundary)."""
        return self.error_pending if self.error is not None else self.hold_n

    cdef int fr_hold(self, const uint8_t* src, Py_ssize_t n) except -1:
        """Append n bytes to the held part."""
        cdef Py_ssize_t cap
        cdef uint8_t* grown
        if self.hold_n + n > self.hold_cap:
            cap = max(self.hold_n + n, 2 * self.hold_cap, 256)
            grown = <uint8_t*>realloc(self.hold, cap)
            if grown == NULL:
                raise MemoryError()
            self.hold = grown
            self.hold_cap = cap
        if n:
            memcpy(self.hold + self.hold_n, src, n)
            self.hold_n += n
        return 0

    cdef int fr_fail(self, Py_ssize_t count, Py_ssize_t at, Py_ssize_t total) except -1:
        self.error = _fr_DecodeError(
            f"frame of {count} records (allowed 1..{self.max_count}) at stream offset +{at}"
        )
        self.error_pending = total
        raise self.error

    def feed(self, buf, Py_ssize_t n, double now):
        """The first ``n`` bytes of ``buf`` (a read) after what is held: every complete frame
        into the table; returns the number of records fed."""
        cdef const uint8_t[::1] b = _as_bytes_view(buf)
        if self.error is not None:
            raise self.error
        if n < 0 or n > b.shape[0]:
            raise ValueError(f"feed: {n} bytes of a {b.shape[0]}-byte buffer")
        return self.fr_feed(&b[0] if n else NULL, n, now)

    cdef Py_ssize_t fr_feed(self, const uint8_t* data, Py_ssize_t n, double now) except -1:
        """``feed`` on ``n`` bytes at ``data`` (the worker's compiled wait loop reads into
        its own buffer and feeds from there); raises DecodeError as ``feed`` does."""
        cdef Py_ssize_t size = self.record_bytes, taken = 0, p, h0, need, count, end
        cdef Py_ssize_t frames = 0, records = 0
        cdef bint held_frame = False
        if self.error is not None:
            raise self.error
        h0 = self.hold_n
        if not self.combined:
            if h0:
                taken = min(size - h0, n)
                self.fr_hold(data, taken)
                if self.hold_n < size:
                    return 0
                held_frame = True
            count = (n - taken) // size
            p = taken + count * size
            with nogil:
                self.table.tb_count_begin()
                if held_frame:
                    self.table.tb_receive_records(self.hold, 1, size, now)
                self.table.tb_receive_records(data + taken, count, size, now)
                self.table.tb_count_end()
            records = count + held_frame
            self.frames += records
            self.hold_n = 0
            self.fr_hold(data + p, n - p)
            self.table._check()
            return records
        # combined: first the frame the held bytes begin (its count may itself be cut) ...
        if h0:
            if h0 < 2:
                taken = min(2 - h0, n)
                self.fr_hold(data, taken)
                if self.hold_n < 2:
                    return 0
            count = (self.hold[0] << 8) | self.hold[1]
            if count == 0 or count > self.max_count:
                self.fr_fail(count, 0, h0 + n)
            need = 2 + count * size
            if need - self.hold_n > n - taken:
                self.fr_hold(data + taken, n - taken)
                return 0
            self.fr_hold(data + taken, need - self.hold_n)
            taken += need - (h0 + taken)
            held_frame = True
            frames = 1
            records = count
        # ... then the frames that lie whole in the read: checked first, as a bad count
        # anywhere feeds nothing of this read.
        p = taken
        while n - p >= 2:
            count = (data[p] << 8) | data[p + 1]
            if count == 0 or count > self.max_count:
                self.fr_fail(count, h0 + p, h0 + n)
            end = p + 2 + count * size
            if end > n:
                break
            records += count
            frames += 1
            p = end
        end = p
        with nogil:
            self.table.tb_count_begin()
            if held_frame:
                count = (self.hold[0] << 8) | self.hold[1]
                self.table.tb_receive_records(self.hold + 2, count, size, now)
            p = taken
            while p < end:
                count = (data[p] << 8) | data[p + 1]
                self.table.tb_receive_records(data + p + 2, count, size, now)
                p += 2 + count * size
            self.table.tb_count_end()
        self.frames += frames
        if held_frame:
            self.hold_n = 0
        self.fr_hold(data + end, n - end)
        self.table._check()
        return records
