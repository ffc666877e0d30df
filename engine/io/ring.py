"""Single-producer single-consumer packet ring in shared memory (design §3).

Theory of operation
-------------------
The capture process (the only producer) hands packets to one worker (the only consumer)
through a ring of variable-length records in a shared block (memory: see "Memory" below):

    [ head u64 | pad ][ tail u64 | pad ][ record area: ``capacity`` bytes ]
    record = [ length u32 | flags u32 | timestamp f64 | data (length) | pad to 8 bytes ]

A packet takes ``record_bytes(length)`` = 16 + its length rounded up to 8 bytes (a 66-byte
ACK 88 bytes, a 1,500-byte segment 1,520), so the ring's bytes go to the packets, not to
the largest one.  Records start 8-byte aligned and never straddle the end of the area: a
record that does not fit before the end is written at the start, and the bytes it skipped
begin with a wrap mark (a length of ``RECORD_WRAP``; the area's size is a multiple of 8, so
at least 8 bytes are left for it).  ``head`` counts bytes ever written (skips included),
``tail`` bytes ever read; both only grow, so ``head - tail`` is the fill in bytes and a
record is at ``counter % capacity``.  Only the producer writes ``head`` and only the
consumer writes ``tail``, and each side publishes its counter only after the records.

Counters: every load and store of ``head`` and ``tail`` goes through ``_head``/``_tail`` and
``_publish_head``/``_publish_tail``, an item of an 8-byte ``memoryview`` cast at an 8-byte
aligned offset (``_counters``): CPython reads and writes such an item with one fixed-size
``memcpy``, one 8-byte load or store, which is atomic on x86-64 and arm64 when aligned.
``struct.pack_into`` must never be used for them: it zeroes its target before writing the
value, so a concurrent reader saw ``head == 0`` (or ``tail == 0``) for an instant.  That was
a worker crash loop under a SYN flood: the consumer computed a negative length, and a
producer that read ``tail == 0`` took a negative free space and moved ``head`` backwards for
good, so every restarted worker died again.

Ordering: x86-64 keeps stores in program order and loads in program order (TSO), so the
producer's record writes are visible before its ``head`` store and the consumer's record
reads are done before its ``tail`` store; CPython gives no fence of its own, so on a weakly
ordered CPU this module (and the compiled producer in engine/dataplane/capture.pyx) is where
a fence would go.  Each side keeps its own counter in a local variable (it is the only
writer: it never needs to read it back) and loads only the other's, once per batch; the
difference is then clamped to ``[0, capacity]`` (``_used``) whatever was read, so a torn,
stale or hostile value can make a side see the ring emptier (consumer) or fuller (producer)
than it is for one batch, never negative, never more than full, and never move a counter
backwards.  The consumer checks every record header against the area and against what was
published before it reads the record (``scan_records``): a header that does not fit (which
only a corrupted block can give) ends the batch, and the next read discards everything
published up to then (``corrupt`` counts it), so no value in the block makes a side read
outside it.  A side that attaches (a restarted capture process or worker) takes its own
counter from the block once: its predecessor, the only other writer of it, is dead.

The producer never blocks: when a record does not fit in the free bytes the packet is
dropped and counted (``dropped``), which is what the capture must do at line rate (design
§3); the next record written carries ``RECORD_FLAG_LOSS_BEFORE``.

Wake-ups: an eventfd is rung when the producer finds the ring empty before its batch
(empty -> non-empty) or its tail caught up with the head before its batch, so a busy
consumer costs no syscalls.  The consumer clears the eventfd, pops, and then reads the head
again: anything there (pushed while it popped) and it comes back without sleeping
(engine/proc/worker.RingSource).  Because Python gives us no memory fence between "publish
my counter" and "read the other's", a wake-up can still in rare interleavings be missed; the
consumer therefore never sleeps longer than ``RING_IDLE_POLL_S`` (the safety net costs one
wake-up per idle interval).

Batching: both sides read the other's counter once and publish their own once per batch.
The compiled producer (engine/dataplane/capture.pyx, given ``record_layout()``) writes a
whole TPACKET_V3 block's packets in C; ``push_frames`` and ``push_batch`` are its
specification.  The consumer reads in place: ``peek_records`` finds a batch's records
(``scan_records``: in C where engine.dataplane is built, else the Python loop here, the two
held equal by tests/unit/test_ring.py) and the worker's table parses them where they lie
(engine/io/batch.py ``receive_ring``); ``pop_packets``/``pop_batch`` copy them out.

Memory: the block is a memfd (no name in /dev/shm, nothing for multiprocessing's resource
tracker to follow), created by the supervisor before it forks and inherited by every capture
process and worker it starts, restarted ones included (``spec`` carries its descriptor).  Its
pages are committed when it is created (``posix_fallocate``) but not faulted in by it: the
supervisor reads the header page only, and a child that attaches maps them all at once
(``MAP_POPULATE``), so the ring is in the footprint the memory watchdog (-m) reads from the
child's start, split between its two users (a flood would otherwise touch its last pages
within a second, and that growth looked like sessions), and the hot path takes no page fault.
Its size is in bytes (``--ring-size``; the derived rule is engine/proc/capture.ring_bytes and
docs/memory.md).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "RECORD_ALIGN",
    "RECORD_FLAG_LOSS_BEFORE",
    "RECORD_HEADER_BYTES",
    "RECORD_WRAP",
    "RING_BYTES",
    "RING_IDLE_POLL_S",
    "RING_MAX_PACKET",
    "Ring",
    "record_bytes",
    "record_layout",
    "record_step",
    "scan_records",
]

RING_BYTES = 2 << 20
"""The default ring: 2 MiB of records (about 17,000 packets of 100 bytes)."""
RING_MAX_PACKET = 1520
"""The default largest packet, a record of 1,536 bytes: room for -M 1500 (the capture splits
anything larger than -M; a larger -M raises it, engine/proc/capture.ring_max_packet)."""
RING_IDLE_POLL_S = 0.05
_RECORD_HEADER = struct.Struct("=IId")  # length u32, flags u32, timestamp f64
RECORD_HEADER_BYTES = _RECORD_HEADER.size
RECORD_ALIGN = 8
"""Records start at multiples of 8 bytes (the timestamp is an aligned f64)."""
RECORD_WRAP = 0xFFFFFFFF
"""A record length that is a wrap mark: the rest of the area up to its end is skipped."""
_HEADER_BYTES = 128  # head and tail on separate cache lines
RECORD_FLAG_LOSS_BEFORE = 1
"""A record header's flag: the ring was full and dropped packets just before this one (the
first packet written after a drop carries it).  The consumer counts them (``loss_marks``):
a hole a session then finds in its captured stream is a known loss, not a reordering."""
_HEAD_WORD = 0  # 8-byte word index of head in the header
_TAIL_WORD = 8  # byte 64: its own cache line
_LENGTH = struct.Struct("=I")
_TIMESTAMP = struct.Struct("=d")


def record_bytes(length: int) -> int:
    """The bytes a packet of ``length`` bytes takes in the ring: header, data, padding."""
    return RECORD_HEADER_BYTES + -(-length // RECORD_ALIGN) * RECORD_ALIGN


def record_layout() -> dict[str, int]:
    """The geometry above as numbers, for code that writes records without this class
    (engine/dataplane/capture.pyx reads it once at import): the block's header size, where
    head and tail are in it, where a record's length, flags, timestamp and data start, the
    alignment, the wrap mark and the loss flag."""
    return {
        "header_bytes": _HEADER_BYTES,
        "head_at": _HEAD_WORD * 8,
        "tail_at": _TAIL_WORD * 8,
        "length_at": 0,
        "flags_at": struct.calcsize("=I"),
        "ts_at": struct.calcsize("=II"),
        "data_at": RECORD_HEADER_BYTES,
        "align": RECORD_ALIGN,
        "wrap": RECORD_WRAP,
        "flag_loss_before": RECORD_FLAG_LOSS_BEFORE,
    }


def record_step(area: Any, capacity: int, counter: int, left: int) -> tuple[int, int, int, int]:
    """The record at byte counter ``counter`` of a record area of ``capacity`` bytes, with
    ``left`` published bytes from it: ``(step, at, length, flags)``, the bytes it takes with
    the wrap mark before it, where its data starts, its length and flags (``length`` is
    RECORD_WRAP for a wrap mark that ends the published bytes); ``step`` is -1 for a header
    that does not fit the area or the published bytes (a wrap mark at the start of the area
    is one).  engine/dataplane/packet.pxd ``dp_ring_step`` is its twin in C."""
    pos = counter % capacity
    room = capacity - pos
    skip = 0
    if room < 4:
        return -1, 0, 0, 0
    length = _LENGTH.unpack_from(area, pos)[0]
    if length == RECORD_WRAP:
        if pos == 0 or room > left:
            return -1, 0, 0, 0
        if room == left:
            return room, 0, length, 0
        skip, left, pos, room = room, left - room, 0, capacity
        length = _LENGTH.unpack_from(area, 0)[0]
        if length == RECORD_WRAP:
            return -1, 0, 0, 0
    size = record_bytes(length)
    if room < RECORD_HEADER_BYTES or size > room or size > left:
        return -1, 0, 0, 0
    flags = _LENGTH.unpack_from(area, pos + 4)[0]
    return skip + size, pos + RECORD_HEADER_BYTES, length, flags


def scan_records(
    area: Any, capacity: int, tail: int, avail: int, max_items: int
) -> tuple[int, int, int, bool]:
    """Walk the records of ``area`` (a ring's record area) from byte counter ``tail`` over at
    most ``avail`` published bytes and ``max_items`` records.  Returns ``(count, nbytes,
    marks, bad)``: records found, the bytes they take (with the wrap marks before them, and
    one that ends the published bytes), how many carry the loss flag, and whether the walk
    stopped at a header that does not fit (``record_step``).  engine/dataplane/packet.pyx
    ``scan_records`` is its twin in C."""
    count = used = marks = 0
    while count < max_items and used < avail:
        step, _at, length, flags = record_step(area, capacity, tail + used, avail - used)
        if step < 0:
            return count, used, marks, True
        used += step
        if length == RECORD_WRAP:
            continue
        count += 1
        if flags & RECORD_FLAG_LOSS_BEFORE:
            marks += 1
    return count, used, marks, False


def _compiled_scan() -> Callable[[Any, int, int, int, int], tuple[int, int, int, bool]] | None:
    from engine import dataplane

    if not dataplane.AVAILABLE:
        return None
    return getattr(dataplane.packet, "scan_records", None)


class Ring:
    """One SPSC ring.  Create in the parent (``Ring.create``), attach in forked children
    (``Ring.attach(ring.spec())``)."""

    def __init__(
        self, fd: int, capacity: int, max_packet: int, efd: int, owner: bool,
        populate: bool = False,
    ) -> None:  # fmt: skip
        self._fd = fd
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        self._map = mmap.mmap(fd, _HEADER_BYTES + capacity, flags=flags)
        self._buf = memoryview(self._map)
        # The counters' one access path (module docstring, "Counters").
        self._counters = self._buf[:_HEADER_BYTES].cast("Q")
        self._area = self._buf[_HEADER_BYTES:]
        self.capacity = capacity
        self.max_packet_bytes = max_packet
        self.efd = efd
        self._owner = owner
        self._scan = _compiled_scan() or scan_records
        self.dropped = 0  # producer side: full ring
        self.oversize = 0  # producer side: packet larger than max_packet_bytes
        self.corrupt = 0  # consumer side: batches ended by a header that did not fit
        # Producer side: a full ring dropped packets and the next written one is not yet
        # marked.  Consumer side: how many marked packets were taken.
        self._loss_pending = False
        self.loss_marks = 0
        # Each side's own counter (the only writer of it keeps it locally).
        self._head_mine = self._counters[_HEAD_WORD]
        self._tail_mine = self._counters[_TAIL_WORD]

    @staticmethod
    def check_geometry(capacity: int, max_packet: int) -> None:
        if max_packet < 1 or capacity % RECORD_ALIGN or capacity < 2 * record_bytes(max_packet):
            raise ValueError(
                f"ring: bad geometry: {capacity} bytes for packets of up to {max_packet} "
                f"(a multiple of {RECORD_ALIGN}, at least two of the largest records)"
            )

    @classmethod
    def create(cls, capacity: int = RING_BYTES, max_packet: int = RING_MAX_PACKET) -> Ring:
        cls.check_geometry(capacity, max_packet)
        size = _HEADER_BYTES + capacity
        fd = os.memfd_create("tcpcopy-mp-ring", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            # Committed, not mapped (module docstring, "Memory"): reads as zeros.
            os.posix_fallocate(fd, 0, size)
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            os.close(fd)
            raise
        return cls(fd, capacity, max_packet, efd, owner=True)

    def spec(self) -> tuple[int, int, int, int]:
        """What a forked child needs to attach: the block's and the eventfd's descriptors
        (both inherited through fork) and the geometry."""
        return (self._fd, self.capacity, self.max_packet_bytes, self.efd)

    @classmethod
    def attach(cls, spec: tuple[int, int, int, int]) -> Ring:
        fd, capacity, max_packet, efd = spec
        # The creator alone closes the descriptors; this side maps every page now.
        return cls(fd, capacity, max_packet, efd, owner=False, populate=True)

    # -- counters --------------------------------------------------------------------------
    def _head(self) -> int:
        return self._counters[_HEAD_WORD]

    def _tail(self) -> int:
        return self._counters[_TAIL_WORD]

    def _used(self, head: int, tail: int) -> int:
        """Bytes in use from a head and a tail, clamped to [0, capacity]: the only place the
        two counters meet, so no value read can give a negative or over-full ring."""
        used = head - tail
        if used < 0:
            return 0
        return used if used <= self.capacity else self.capacity

    def __len__(self) -> int:
        """Bytes in use (records, their padding and wrap skips)."""
        # Tail first: both only grow and tail never passes head, so a head read after the
        # tail is at least that tail (a third party reading both gets no negative length).
        tail = self._tail()
        return self._used(self._head(), tail)

    def _producer_free(self) -> int:
        """Free bytes as the producer sees them: its own head, the consumer's tail.  A tail
        read beyond our head (impossible unless torn or corrupted) counts as a full ring:
        dropping a batch is safe, overwriting unread records is not."""
        head = self._head_mine
        tail = self._tail()
        if tail > head:
            return 0
        return self.capacity - self._used(head, tail)

    def _publish_head(self, head: int) -> None:
        self._head_mine = head
        self._counters[_HEAD_WORD] = head

    def _consumer_available(self) -> int:
        """Bytes the consumer may read: the producer's head, its own tail."""
        return self._used(self._head(), self._tail_mine)

    def _publish_tail(self, tail: int) -> None:
        self._tail_mine = tail
        self._counters[_TAIL_WORD] = tail

    # -- producer --------------------------------------------------------------------------
    def _put(self, head: int, free: int, data: Any, n: int, ts: float) -> tuple[int, int]:
        """Write one record at ``head`` if it fits in ``free`` bytes (a wrap mark first when
        it does not fit before the end); returns the new (head, free), unchanged when the
        packet was dropped."""
        size = record_bytes(n)
        pos = head % self.capacity
        room = self.capacity - pos
        need = size if size <= room else room + size
        if need > free:
            self.dropped += 1
            self._loss_pending = True
            return head, free
        area = self._area
        if size > room:
            _LENGTH.pack_into(area, pos, RECORD_WRAP)
            pos = 0
        flags = RECORD_FLAG_LOSS_BEFORE if self._loss_pending else 0
        self._loss_pending = False
        _RECORD_HEADER.pack_into(area, pos, n, flags, ts)
        start = pos + RECORD_HEADER_BYTES
        area[start : start + n] = data
        return head + need, free - need

    def _published(self, start_head: int, head: int, was_empty: bool) -> None:
        if head != start_head:
            self._publish_head(head)
            if was_empty or self._tail() == start_head:
                self._ring()

    def push_batch(self, packets: Sequence[tuple[bytes, float]]) -> int:
        """Append packets; return how many were written.  Never blocks."""
        start = head = self._head_mine
        free = self._producer_free()
        was_empty = free == self.capacity
        limit = self.max_packet_bytes
        written = 0
        for data, ts in packets:
            n = len(data)
            if n > limit:
                self.oversize += 1
                continue
            head, after = self._put(head, free, data, n, ts)
            written += after != free
            free = after
        self._published(start, head, was_empty)
        return written

    def fill(self) -> float:
        """Fraction of the bytes in use (producer side: what overload shedding watches)."""
        return 1.0 - self._producer_free() / self.capacity

    def push_frames(
        self, src: Any, starts: Sequence[int], lengths: Sequence[int], ts: float
    ) -> int:
        """Append packets ``src[starts[i] : starts[i] + lengths[i]]``, all stamped ``ts``;
        return how many were written (the rest: ``dropped``/``oversize``).  Never blocks.
        One head/tail read and one head publish for the batch."""
        start = head = self._head_mine
        free = self._producer_free()
        was_empty = free == self.capacity
        limit = self.max_packet_bytes
        written = 0
        for s, n in zip(_ints(starts), _ints(lengths), strict=True):
            if n > limit:
                self.oversize += 1
                continue
            head, after = self._put(head, free, src[s : s + n], n, ts)
            written += after != free
            free = after
        self._published(start, head, was_empty)
        return written

    def _ring(self) -> None:
        try:
            os.eventfd_write(self.efd, 1)
        except BlockingIOError:  # counter saturated: the consumer is awake anyway
            pass

    # -- consumer --------------------------------------------------------------------------
    def peek_records(self, max_items: int = 256) -> tuple[int, int, int]:
        """(pos, count, nbytes): up to ``max_items`` records ready to read in place, oldest
        first, from byte ``pos`` of ``record_area`` over ``nbytes`` bytes (wrap marks
        included; engine/io/batch.py ``receive_ring`` reads them so).  They stay the
        consumer's until ``release(nbytes)``; loss marks are counted here."""
        tail = self._tail_mine
        avail = self._consumer_available()
        pos = tail % self.capacity
        if avail <= 0:
            return pos, 0, 0
        count, used, marks, bad = self._scan(self._area, self.capacity, tail, avail, max_items)
        if bad and count == 0:
            # Nothing readable at the front: a corrupted block.  Give back what was published
            # (module docstring, "Ordering") and start again at the head.
            self.corrupt += 1
            self._publish_tail(tail + avail)
            return (tail + avail) % self.capacity, 0, 0
        self.loss_marks += marks
        return pos, count, used

    def release(self, nbytes: int) -> None:
        """Hand ``nbytes`` taken with ``peek_records`` back to the producer."""
        if nbytes > 0:
            self._publish_tail(self._tail_mine + nbytes)

    def pop_packets(self, max_items: int = 256) -> list[tuple[float, bytes]]:
        """Take up to ``max_items`` packets as (timestamp, data), oldest first: the capture
        source interface's order."""
        pos, _count, nbytes = self.peek_records(max_items)
        out = [(ts, data) for data, ts in self._read(pos, nbytes)]
        self.release(nbytes)
        return out

    def pop_batch(self, max_items: int = 256) -> list[tuple[bytes, float]]:
        """Take up to ``max_items`` packets as (data, timestamp), oldest first."""
        pos, _count, nbytes = self.peek_records(max_items)
        out = self._read(pos, nbytes)
        self.release(nbytes)
        return out

    def _read(self, pos: int, nbytes: int) -> list[tuple[bytes, float]]:
        """Copies of the records of ``nbytes`` bytes from ``pos`` (``peek_records``'s)."""
        area, capacity = self._area, self.capacity
        out = []
        used = 0
        while used < nbytes:
            step, at, n, _flags = record_step(area, capacity, pos + used, nbytes - used)
            if step < 0:  # pragma: no cover - peek_records walked these bytes already
                break
            used += step
            if n != RECORD_WRAP:
                ts = _TIMESTAMP.unpack_from(area, at - 8)[0]
                out.append((bytes(area[at : at + n]), ts))
        return out

    @property
    def record_area(self) -> memoryview:
        """The record area (``capacity`` bytes after the block's header): what a batch call
        reads in place (module docstring's layout)."""
        return self._area

    def clear_wakeup(self) -> None:
        """Consume the eventfd after it polled readable."""
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass

    # -- lifetime --------------------------------------------------------------------------
    def __del__(self) -> None:
        # The views export the block's buffer: drop them before the mapping goes (a ring
        # that was never closed, e.g. in a test that failed).
        for name in ("_counters", "_area"):
            view = getattr(self, name, None)
            if view is not None:
                view.release()

    def close(self) -> None:
        self._counters.release()  # a released view may be released again (__del__)
        self._area.release()
        if self._buf is not None:
            self._buf.release()
        self._buf = None  # type: ignore[assignment]
        self._map.close()
        if self._owner:
            os.close(self._fd)
            os.close(self.efd)


def _ints(values: Any) -> list[int]:
    """A sequence of integers (a list, an array.array or a numpy array) as Python ints."""
    tolist = getattr(values, "tolist", None)
    return tolist() if tolist is not None else [int(v) for v in values]
