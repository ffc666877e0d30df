"""Single-producer single-consumer packet ring in shared memory (design §3).

Theory of operation
-------------------
The capture process (the only producer) hands packets to one worker (the only consumer)
through a ring of fixed-size slots in a shared block (memory: see "Memory" below):

    [ head u64 | pad ][ tail u64 | pad ][ slot 0 ][ slot 1 ] ... [ slot N-1 ]
    slot = [ length u32 | flags u32 | timestamp f64 | data (RING_SLOT_BYTES - 16) ]

``head`` counts slots ever written, ``tail`` slots ever read; both only grow, so
``head - tail`` is the fill level and ``index = counter % slots``.  Only the producer
writes ``head`` and only the consumer writes ``tail``, and each side publishes its counter
only after the slot data.

Counters: every load and store of ``head`` and ``tail`` goes through ``_head``/``_tail`` and
``_publish_head``/``_publish_tail``, an item of an 8-byte ``memoryview`` cast at an 8-byte
aligned offset (``_counters``): CPython reads and
writes such an item with one fixed-size ``memcpy``, one 8-byte load or store, which is
atomic on x86-64 and arm64 when aligned.  ``struct.pack_into`` must never be used here: it
zeroes its target before writing the value, so a concurrent reader saw ``head == 0`` (or
``tail == 0``) for an instant.  That was a worker crash loop under a SYN flood: the
consumer computed a negative length (``__len__`` raised ValueError), and a producer that
read ``tail == 0`` took ``slots - head`` (negative) for its free space and moved ``head``
backwards for good, so every restarted worker died again.

Ordering: x86-64 keeps stores in program order and loads in program order (TSO), so the
producer's slot writes are visible before its ``head`` store and the consumer's slot reads
are done before its ``tail`` store; CPython gives no fence of its own, so on a weakly
ordered CPU this module is the one place a fence would go.  Each side keeps its own counter
in a local variable (it is the only writer: it never needs to read it back) and loads only
the other's, once per batch; the difference is then clamped to ``[0, slots]`` (``_used``)
whatever was read, so a torn, stale or hostile value can make a side see the ring emptier
(consumer) or fuller (producer) than it is for one batch, never negative, never more than
full, and never move a counter backwards.  A side that attaches (a restarted capture
process or worker) takes its own counter from the block once: its predecessor, the only
other writer of it, is dead.

The producer never blocks: when the ring is full the packet is dropped and counted
(``dropped``), which is what the capture must do at line rate (design §3).

Wake-ups: an eventfd is rung when the producer finds the ring empty before its batch
(empty -> non-empty) or its tail caught up with the head before its batch, so a busy
consumer costs no syscalls.  The consumer clears the eventfd, pops, and then reads the head
again: anything there (pushed while it popped) and it comes back without sleeping
(engine/proc/worker.RingSource).  Because Python gives us no memory fence between "publish
my counter" and "read the other's", a wake-up can still in rare interleavings be missed; the
consumer therefore never sleeps longer than ``RING_IDLE_POLL_S`` (the safety net costs one
wake-up per idle interval).

Batching: both sides read the other's counter once and publish their own once per batch.
``push_frames`` writes a whole batch that lies in one buffer (a TPACKET_V3 block of the
capture's mmap ring) with the slot headers set by numpy views over the block (lengths and
timestamps as arrays) and one memoryview slice copy per packet: no Python object per packet.
``pop_packets`` reads the batch's lengths and timestamps the same way.

Memory: the block is a memfd (no name in /dev/shm, nothing for multiprocessing's resource
tracker to follow), created by the supervisor before it forks and inherited by every capture
process and worker it starts, restarted ones included (``spec`` carries its descriptor).  Its
pages are committed when it is created (``posix_fallocate``) but not faulted in by it: the
supervisor reads the header page only, and a child that attaches maps them all at once
(``MAP_POPULATE``), so the ring is in the footprint the memory watchdog (-m) reads from the
child's start, split between its two users (a flood would otherwise touch its last pages
within a second, and that growth looked like sessions), and the hot path takes no page fault.
"""

from __future__ import annotations

import mmap
import os
import struct

import numpy as np

__all__ = ["RING_IDLE_POLL_S", "RING_SLOTS", "RING_SLOT_BYTES", "Ring"]

RING_SLOT_BYTES = 1536
"""The default slot: a packet of up to 1,520 bytes (the capture splits anything larger than
-M, 1500 by default) after its 16-byte header, a multiple of 64 bytes."""
RING_SLOTS = 8192
RING_IDLE_POLL_S = 0.05
_SLOT_HEADER = struct.Struct("=IId")  # length u32, flags u32, timestamp f64
SLOT_HEADER_BYTES = _SLOT_HEADER.size
_HEADER_BYTES = 128  # head and tail on separate cache lines
SLOT_FLAG_LOSS_BEFORE = 1
"""A slot header's flag: the ring was full and dropped packets just before this one (the
first packet written after a drop carries it).  The consumer counts them (``loss_marks``):
a hole a session then finds in its captured stream is a known loss, not a reordering."""
_HEAD_WORD = 0  # 8-byte word index of head in the header
_TAIL_WORD = 8  # byte 64: its own cache line


def slot_layout() -> dict[str, int]:
    """The geometry above as byte offsets, for code that writes slots without this class
    (engine/dataplane/capture.pyx reads it once at import): the block's header size, where
    head and tail are in it, and where a slot's length, flags, timestamp and data start."""
    return {
        "header_bytes": _HEADER_BYTES,
        "head_at": _HEAD_WORD * 8,
        "tail_at": _TAIL_WORD * 8,
        "length_at": 0,
        "flags_at": struct.calcsize("=I"),
        "ts_at": struct.calcsize("=II"),
        "data_at": SLOT_HEADER_BYTES,
        "flag_loss_before": SLOT_FLAG_LOSS_BEFORE,
    }


class Ring:
    """One SPSC ring.  Create in the parent (``Ring.create``), attach in forked children
    (``Ring.attach(ring.spec())``)."""

    def __init__(
        self, fd: int, slots: int, slot_bytes: int, efd: int, owner: bool, populate: bool = False
    ) -> None:
        self._fd = fd
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        self._map = mmap.mmap(fd, _HEADER_BYTES + slots * slot_bytes, flags=flags)
        self._buf = memoryview(self._map)
        # The counters' one access path (module docstring, "Counters").
        self._counters = self._buf[:_HEADER_BYTES].cast("Q")
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.max_packet_bytes = slot_bytes - _SLOT_HEADER.size
        self.efd = efd
        self._owner = owner
        # numpy views of the slot headers: length (u32) and timestamp (f64) of every slot.
        body = np.frombuffer(self._buf, dtype=np.uint8, offset=_HEADER_BYTES)
        self._u32 = body[: (len(body) // 4) * 4].view(np.uint32)
        self._f64 = body[: (len(body) // 8) * 8].view(np.float64)
        self._slot_words32 = slot_bytes // 4
        self._slot_words64 = slot_bytes // 8
        # The same u32 words for strided reads of a batch's flags (peek_slots).
        self._w32 = self._buf[_HEADER_BYTES : _HEADER_BYTES + self._u32.size * 4].cast("I")
        self.dropped = 0  # producer side: full ring
        self.oversize = 0  # producer side: packet larger than a slot
        # Producer side: a full ring dropped packets and the next written one is not yet
        # marked.  Consumer side: how many marked packets were popped.
        self._loss_pending = False
        self.loss_marks = 0
        # Each side's own counter (the only writer of it keeps it locally).
        self._head_mine = self._counters[_HEAD_WORD]
        self._tail_mine = self._counters[_TAIL_WORD]

    @classmethod
    def create(cls, slots: int = RING_SLOTS, slot_bytes: int = RING_SLOT_BYTES) -> Ring:
        if slots < 2 or slot_bytes < 64 or slot_bytes % 8:
            raise ValueError(f"ring: bad geometry slots={slots} slot_bytes={slot_bytes}")
        size = _HEADER_BYTES + slots * slot_bytes
        fd = os.memfd_create("tcpcopy-mp-ring", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            # Committed, not mapped (module docstring, "Memory"): reads as zeros.
            os.posix_fallocate(fd, 0, size)
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            os.close(fd)
            raise
        return cls(fd, slots, slot_bytes, efd, owner=True)

    def spec(self) -> tuple[int, int, int, int]:
        """What a forked child needs to attach: the block's and the eventfd's descriptors
        (both inherited through fork) and the geometry."""
        return (self._fd, self.slots, self.slot_bytes, self.efd)

    @classmethod
    def attach(cls, spec: tuple[int, int, int, int]) -> Ring:
        fd, slots, slot_bytes, efd = spec
        # The creator alone closes the descriptors; this side maps every page now.
        return cls(fd, slots, slot_bytes, efd, owner=False, populate=True)

    # -- counters --------------------------------------------------------------------------
    def _head(self) -> int:
        return self._counters[_HEAD_WORD]

    def _tail(self) -> int:
        return self._counters[_TAIL_WORD]

    def _used(self, head: int, tail: int) -> int:
        """Slots in use from a head and a tail, clamped to [0, slots]: the only place the
        two counters meet, so no value read can give a negative or over-full ring."""
        used = head - tail
        if used < 0:
            return 0
        return used if used <= self.slots else self.slots

    def __len__(self) -> int:
        # Tail first: both only grow and tail never passes head, so a head read after the
        # tail is at least that tail (a third party reading both gets no negative length).
        tail = self._tail()
        return self._used(self._head(), tail)

    def _producer_free(self) -> int:
        """Free slots as the producer sees them: its own head, the consumer's tail.  A tail
        read beyond our head (impossible unless torn or corrupted) counts as a full ring:
        dropping a batch is safe, overwriting unread slots is not."""
        head = self._head_mine
        tail = self._tail()
        if tail > head:
            return 0
        return self.slots - self._used(head, tail)

    def _publish_head(self, head: int) -> None:
        self._head_mine = head
        self._counters[_HEAD_WORD] = head

    def _consumer_available(self) -> int:
        """Slots the consumer may read: the producer's head, its own tail."""
        return self._used(self._head(), self._tail_mine)

    def _publish_tail(self, tail: int) -> None:
        self._tail_mine = tail
        self._counters[_TAIL_WORD] = tail

    # -- producer --------------------------------------------------------------------------
    def push_batch(self, packets: list[tuple[bytes, float]]) -> int:
        """Append packets; return how many were written.  Never blocks."""
        buf = self._buf
        head = self._head_mine
        free = self._producer_free()
        was_empty = free == self.slots
        slot_bytes = self.slot_bytes
        limit = self.max_packet_bytes
        written = 0
        for data, ts in packets:
            n = len(data)
            if n > limit:
                self.oversize += 1
                continue
            if free == 0:
                self.dropped += 1
                self._loss_pending = True
                continue
            off = _HEADER_BYTES + (head % self.slots) * slot_bytes
            flags = SLOT_FLAG_LOSS_BEFORE if self._loss_pending else 0
            self._loss_pending = False
            _SLOT_HEADER.pack_into(buf, off, n, flags, ts)
            start = off + _SLOT_HEADER.size
            buf[start : start + n] = data
            head += 1
            free -= 1
            written += 1
        if written:
            self._publish_head(head)
            if was_empty or self._tail() == head - written:
                self._ring()
        return written

    def fill(self) -> float:
        """Fraction of the slots in use (producer side: what overload shedding watches)."""
        return 1.0 - self._producer_free() / self.slots

    def push_frames(
        self, src: memoryview, starts: np.ndarray, lengths: np.ndarray, ts: float
    ) -> int:
        """Append packets ``src[starts[i] : starts[i] + lengths[i]]``, all stamped ``ts``;
        return how many were written (the rest: ``dropped``/``oversize``).  Never blocks.

        One head/tail read and one head publish for the batch; the slot headers are written
        as two numpy fancy-index stores, the data with one slice copy per packet.
        """
        count = len(starts)
        if count == 0:
            return 0
        buf = self._buf
        head = self._head_mine
        free = self._producer_free()
        was_empty = free == self.slots
        over = lengths > self.max_packet_bytes
        if over.any():
            self.oversize += int(over.sum())
            keep = ~over
            starts, lengths = starts[keep], lengths[keep]
            count = len(starts)
        lost = count > free
        if lost:
            self.dropped += count - free
            starts, lengths = starts[:free], lengths[:free]
            count = free
        if count == 0:
            self._loss_pending |= lost
            return 0
        index = (np.arange(head, head + count, dtype=np.int64)) % self.slots
        words = index * self._slot_words32
        self._u32[words] = lengths
        self._u32[words + 1] = 0
        if self._loss_pending:
            self._u32[words[0] + 1] = SLOT_FLAG_LOSS_BEFORE
        self._loss_pending = lost  # the dropped ones came after every one written here
        self._f64[index * self._slot_words64 + 1] = ts
        data = index * self.slot_bytes + (_HEADER_BYTES + _SLOT_HEADER.size)
        for d, s, n in zip(data.tolist(), starts.tolist(), lengths.tolist(), strict=True):
            buf[d : d + n] = src[s : s + n]
        head += count
        self._publish_head(head)
        if was_empty or self._tail() == head - count:
            self._ring()
        return count

    def _ring(self) -> None:
        try:
            os.eventfd_write(self.efd, 1)
        except BlockingIOError:  # counter saturated: the consumer is awake anyway
            pass

    # -- consumer --------------------------------------------------------------------------
    def pop_batch(self, max_items: int = 256) -> list[tuple[bytes, float]]:
        """Take up to ``max_items`` packets (oldest first)."""
        buf = self._buf
        tail = self._tail_mine
        count = min(self._consumer_available(), max_items)
        out = []
        slot_bytes = self.slot_bytes
        for _ in range(count):
            off = _HEADER_BYTES + (tail % self.slots) * slot_bytes
            n, flags, ts = _SLOT_HEADER.unpack_from(buf, off)
            if flags & SLOT_FLAG_LOSS_BEFORE:
                self.loss_marks += 1
            start = off + _SLOT_HEADER.size
            out.append((bytes(buf[start : start + n]), ts))
            tail += 1
        if count > 0:
            self._publish_tail(tail)
        return out

    def pop_packets(self, max_items: int = 256) -> list[tuple[float, bytes]]:
        """Take up to ``max_items`` packets as (timestamp, data), oldest first: the capture
        source interface's order, read with numpy views for the headers of the batch."""
        buf = self._buf
        tail = self._tail_mine
        count = min(self._consumer_available(), max_items)
        if count <= 0:
            return []
        index = np.arange(tail, tail + count, dtype=np.int64) % self.slots
        words = index * self._slot_words32
        lengths = self._u32[words].tolist()
        marks = self._u32[words + 1]
        if marks.any():
            self.loss_marks += int(np.count_nonzero(marks & SLOT_FLAG_LOSS_BEFORE))
        stamps = self._f64[index * self._slot_words64 + 1].tolist()
        data = (index * self.slot_bytes + (_HEADER_BYTES + _SLOT_HEADER.size)).tolist()
        out = [(t, buf[d : d + n].tobytes()) for t, d, n in zip(stamps, data, lengths, strict=True)]
        self._publish_tail(tail + count)
        return out

    @property
    def slot_area(self) -> memoryview:
        """The slots, from slot 0's header on: what a batch call reads in place (the slot
        ``i`` at byte ``i * slot_bytes``, see the module docstring's layout)."""
        return self._buf[_HEADER_BYTES:]

    def peek_slots(self, max_items: int = 256) -> tuple[int, int]:
        """(first, count): up to ``max_items`` packets ready to read in place, oldest first,
        slot ``(first + k) % slots`` for k < count.  They stay the consumer's until
        ``release(count)``; loss marks are counted here, as ``pop_packets`` does."""
        tail = self._tail_mine
        count = min(self._consumer_available(), max_items)
        if count <= 0:
            return tail % self.slots, 0
        slots, words, w32 = self.slots, self._slot_words32, self._w32
        first = tail % slots
        # The flags words of the batch: one strided slice, two where it wraps (a numpy fancy
        # index cost several microseconds per batch).
        runs = [(first, min(first + count, slots))]
        if first + count > slots:
            runs.append((0, first + count - slots))
        for start, end in runs:
            flags = w32[start * words + 1 : (end - 1) * words + 2 : words].tolist()
            if any(flags):
                self.loss_marks += sum(1 for f in flags if f & SLOT_FLAG_LOSS_BEFORE)
        return first, count

    def release(self, count: int) -> None:
        """Hand ``count`` slots taken with ``peek_slots`` back to the producer."""
        if count > 0:
            self._publish_tail(self._tail_mine + count)

    def clear_wakeup(self) -> None:
        """Consume the eventfd after it polled readable."""
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass

    # -- lifetime --------------------------------------------------------------------------
    def __del__(self) -> None:
        # The numpy views export the block's buffer: drop them before the mapping goes (a
        # ring that was never closed, e.g. in a test that failed).
        self._u32 = self._f64 = None  # type: ignore[assignment]
        for name in ("_counters", "_w32"):
            view = getattr(self, name, None)
            if view is not None:
                view.release()

    def close(self) -> None:
        # The numpy views export the buffer: they must go before the block can be closed.
        self._u32 = self._f64 = None  # type: ignore[assignment]
        self._counters.release()  # a released view may be released again (__del__)
        self._w32.release()
        if self._buf is not None:
            self._buf.release()
        self._buf = None  # type: ignore[assignment]
        self._map.close()
        if self._owner:
            os.close(self._fd)
            os.close(self.efd)
