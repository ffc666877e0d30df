"""The shared-memory SPSC ring of variable-length records: order, wrap marks, records that
fit exactly, the largest packet, full-ring drops and loss marks, a lagging consumer, hostile
headers, wake-ups, across processes, and the C walk held equal to the Python one."""

import multiprocessing as mp
import random
import select
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import dataplane
from engine.io.ring import (
    RECORD_FLAG_LOSS_BEFORE,
    RECORD_HEADER_BYTES,
    RECORD_WRAP,
    Ring,
    record_bytes,
    scan_records,
)

CAPACITY = 256  # small: wraps often
LARGEST = 48  # record_bytes(48) == 64: four of the largest fill the ring


@pytest.fixture
def ring():
    r = Ring.create(CAPACITY, LARGEST)
    yield r
    r.close()


def _pos(ring: Ring, counter: int) -> int:
    return counter % ring.capacity


def _flags(ring: Ring) -> list[int]:
    """The flags of every record waiting, oldest first (read by a walk of the headers)."""
    out = []
    tail, head = ring._tail(), ring._head()
    area = ring.record_area
    while tail < head:
        pos = tail % ring.capacity
        length = struct.unpack_from("=I", area, pos)[0]
        if length == RECORD_WRAP:
            tail += ring.capacity - pos
            continue
        out.append(struct.unpack_from("=I", area, pos + 4)[0])
        tail += record_bytes(length)
    return out


def test_record_sizes():
    assert record_bytes(0) == RECORD_HEADER_BYTES == 16
    assert record_bytes(1) == record_bytes(8) == 24
    assert record_bytes(60) == 80 and record_bytes(1500) == 1520 and record_bytes(1520) == 1536


def test_fifo_order_and_timestamps(ring):
    pkts = [(bytes([i]) * (i + 1), float(i)) for i in range(5)]
    assert ring.push_batch(pkts) == 5
    assert len(ring) == sum(record_bytes(len(d)) for d, _ in pkts)
    assert ring.pop_batch(3) == pkts[:3]
    assert ring.pop_batch() == pkts[3:]
    assert ring.pop_batch() == [] and len(ring) == 0


def test_bad_geometry_is_refused():
    for capacity, largest in ((100, 8), (64, 48), (0, 1), (256, 0)):
        with pytest.raises(ValueError, match="bad geometry"):
            Ring.create(capacity, largest)


def test_full_ring_drops_and_counts_never_blocks(ring):
    written = ring.push_batch([(b"x" * 10, 0.0)] * 11)  # 32 bytes each: 8 fit
    assert written == 8 and ring.dropped == 3
    assert len(ring) == CAPACITY and ring.fill() == 1.0
    assert len(ring.pop_batch(100)) == 8


def test_oversize_counted(ring):
    assert ring.push_batch([(b"y" * (LARGEST + 1), 0.0), (b"ok", 1.0)]) == 1
    assert ring.oversize == 1 and ring.dropped == 0
    assert ring.pop_batch() == [(b"ok", 1.0)]


def test_the_largest_packet_round_trips_at_every_offset(ring):
    big = bytes(range(LARGEST))
    for offset in range(0, CAPACITY, 8):
        r = Ring.create(CAPACITY, LARGEST)
        try:
            r._publish_head(offset)
            r._publish_tail(offset)
            assert r.push_batch([(big, 1.0), (b"s", 2.0), (big, 3.0)]) == 3
            assert r.pop_packets(10) == [(1.0, big), (2.0, b"s"), (3.0, big)]
            assert len(r) == 0
        finally:
            r.close()


def test_a_record_that_does_not_fit_before_the_end_goes_after_a_wrap_mark(ring):
    ring.push_batch([(b"a" * 40, 0.0)] * 4)  # 4 x 56 = 224: 32 bytes left before the end
    assert len(ring.pop_batch(4)) == 4
    assert ring.push_batch([(b"b" * 20, 1.0)]) == 1  # 40 bytes: does not fit in 32
    area = ring.record_area
    assert struct.unpack_from("=I", area, 224)[0] == RECORD_WRAP
    assert struct.unpack_from("=I", area, 0)[0] == 20
    assert len(ring) == 32 + 40  # the skipped bytes count until the consumer passes them
    assert ring.pop_batch() == [(b"b" * 20, 1.0)]
    assert len(ring) == 0 and ring._tail() == 224 + 32 + 40


def test_records_that_fit_exactly_need_no_wrap_mark(ring):
    ring.push_batch([(b"a" * 40, 0.0)] * 4)  # 224 bytes
    ring.pop_batch(4)
    assert ring.push_batch([(b"c" * 16, 1.0)]) == 1  # 32 bytes: ends exactly at the end
    assert ring._head() == CAPACITY and len(ring) == 32
    assert ring.push_batch([(b"d" * (CAPACITY - 32 - 16), 2.0)]) == 0  # oversize here
    assert ring.push_batch([(b"d" * 48, 2.0)] * 3 + [(b"e" * 16, 3.0)]) == 4
    assert len(ring) == CAPACITY  # exactly full: 32 + 3 * 64 + 32
    assert ring.push_batch([(b"", 4.0)]) == 0 and ring.dropped == 1  # even an empty one
    assert ring.pop_packets(10) == [(1.0, b"c" * 16)] + [(2.0, b"d" * 48)] * 3 + [(3.0, b"e" * 16)]


def test_a_full_ring_does_not_write_the_wrap_mark_of_a_dropped_record(ring):
    ring.push_batch([(b"a" * 40, 0.0)] * 4)  # 224
    ring.pop_batch(1)  # 56 free at the start, 32 at the end
    assert ring.push_batch([(b"z" * 48, 1.0)]) == 0  # needs 32 + 64 > 88
    assert struct.unpack_from("=I", ring.record_area, 224)[0] != RECORD_WRAP
    assert ring.push_batch([(b"y" * 16, 2.0)]) == 1  # 32: fits before the end
    assert [d for d, _ in ring.pop_batch(10)] == [b"a" * 40] * 3 + [b"y" * 16]
    assert ring.loss_marks == 1


def test_wraparound_many_times_with_every_size(ring):
    rng = random.Random(5)
    for round_ in range(400):
        batch = [
            (bytes([round_ % 256]) * rng.randrange(LARGEST + 1), round_ + i / 10)
            for i in range(rng.randrange(1, 4))
        ]
        assert ring.push_batch(batch) == len(batch)
        assert ring.pop_batch() == batch
    assert ring._head() > 50 * CAPACITY and ring.dropped == 0


def test_a_consumer_that_lags_gets_everything_written_in_order():
    """The producer writes while the consumer takes a little per turn: what it takes is
    every written packet in order; drops only when the ring is full, and marked."""
    rng = random.Random(7)
    ring = Ring.create(1024, 200)
    try:
        written: list[bytes] = []
        got: list[bytes] = []
        seq = 0
        for _ in range(2000):
            batch = []
            for _ in range(rng.randrange(0, 6)):
                batch.append(seq.to_bytes(4, "big") * rng.randrange(1, 50))
                seq += 1
            empty = len(ring) == 0
            before = ring.dropped
            n = ring.push_batch([(d, 0.0) for d in batch])
            assert n + ring.dropped - before == len(batch)
            if empty:  # an empty ring takes any batch that fits with one wrap mark
                assert ring.dropped == before or (
                    sum(record_bytes(len(d)) for d in batch) > ring.capacity - record_bytes(200)
                )
            assert 0 <= len(ring) <= ring.capacity
            # A drop skips a packet; a later, smaller one may still fit.
            got.extend(d for d, _ in ring.pop_batch(rng.randrange(0, 3)))
            written.extend(batch)
        got.extend(d for d, _ in ring.pop_batch(10_000))
        assert len(got) + ring.dropped == len(written)
        numbers = [int.from_bytes(d[:4], "big") for d in got]
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
        assert all(written[k] == d for k, d in zip(numbers, got, strict=True))
        assert ring.dropped > 0 and ring.loss_marks > 0
    finally:
        ring.close()


def test_wakeup_rung_on_empty_to_nonempty_only(ring):
    ring.push_batch([(b"a", 0.0)])
    assert select.select([ring.efd], [], [], 0)[0] == [ring.efd]
    ring.clear_wakeup()
    ring.push_batch([(b"b", 0.0)])  # not empty before: no new wake-up needed
    assert select.select([ring.efd], [], [], 0)[0] == []
    ring.pop_batch()
    ring.push_batch([(b"c", 0.0)])
    assert select.select([ring.efd], [], [], 0)[0] == [ring.efd]


def _consumer(spec, total, conn):
    r = Ring.attach(spec)
    got = []
    deadline = time.monotonic() + 20  # the test ends by itself
    while len(got) < total and time.monotonic() < deadline:
        batch = r.pop_batch(64)
        if not batch:
            select.select([r.efd], [], [], 0.05)
            r.clear_wakeup()
            continue
        got.extend(d for d, _ in batch)
    conn.send(got)
    r.close()


def test_across_processes_in_order():
    ring = Ring.create(1024, 64)
    total = 2000
    parent, child = mp.Pipe()
    proc = mp.get_context("fork").Process(target=_consumer, args=(ring.spec(), total, child))
    proc.start()
    sent = []
    i = 0
    deadline = time.monotonic() + 20  # bounded in time: a dead consumer fails the test
    while i < total and time.monotonic() < deadline:
        data = i.to_bytes(4, "big") * (1 + i % 13)
        if ring.push_batch([(data, 0.0)]):
            sent.append(data)
            i += 1
        else:
            select.select([], [], [], 0.001)  # ring full: let the consumer catch up
    assert parent.poll(30)
    got = parent.recv()
    proc.join(10)
    ring.close()
    assert got == sent


# -- batch writes from one buffer (a TPACKET block) and batch reads ---------------------------


def _frames(sizes):
    """A buffer holding packets of ``sizes`` back to back, and their (start, length)."""
    chunks = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return memoryview(b"".join(chunks)), starts, list(sizes), chunks


def test_push_frames_round_trips_across_the_wrap(ring):
    buf, starts, lengths, chunks = _frames([1, 2, 3, 4, 5])
    assert ring.push_frames(buf, starts, lengths, 1.0) == 5  # 5 x 24 = 120
    assert ring.pop_packets(4) == [(1.0, c) for c in chunks[:4]]
    buf2, starts2, lengths2, chunks2 = _frames([16, 17, 18, 19, 20])  # 32 or 40 each
    assert ring.push_frames(buf2, starts2, lengths2, 2.0) == 5  # the fourth wraps
    assert ring.pop_packets(100) == [(1.0, chunks[4])] + [(2.0, c) for c in chunks2]


def test_push_frames_drops_what_does_not_fit_and_skips_oversize(ring):
    sizes = [10, LARGEST + 1, 20, 30, 40, 41, 42, 0]
    buf, starts, lengths, chunks = _frames(sizes)
    # 32 + 40 + 48 + 56 + 64 = 240: the 42 (64 bytes) does not fit in the 16 left, an
    # empty packet (a bare 16-byte header) fits them exactly.
    assert ring.push_frames(buf, starts, lengths, 0.0) == 6
    assert ring.oversize == 1 and ring.dropped == 1 and len(ring) == CAPACITY
    kept = [chunks[i] for i in (0, 2, 3, 4, 5, 7)]
    assert ring.pop_packets(100) == [(0.0, c) for c in kept]


def test_batch_and_frame_writes_and_both_reads_interleave(ring):
    buf, starts, lengths, chunks = _frames([3, 4])
    ring.push_batch([(b"a", 0.5)])
    ring.push_frames(buf, starts, lengths, 1.5)
    ring.push_batch([(b"z", 2.5)])
    assert ring.pop_batch(2) == [(b"a", 0.5), (chunks[0], 1.5)]
    assert ring.pop_packets(5) == [(1.5, chunks[1]), (2.5, b"z")]
    assert ring.pop_packets(5) == [] and len(ring) == 0


def test_fill_is_the_used_fraction_of_the_bytes(ring):
    assert ring.fill() == 0.0
    ring.push_batch([(b"x", 0.0)] * 6)
    assert ring.fill() == 6 * 24 / CAPACITY


def test_first_packet_written_after_a_drop_is_marked_both_writers(ring):
    # push_batch: 12 of 24 bytes into 256 drops 2; after room is made the next is marked.
    ring.push_batch([(b"a", 0.0)] * 12)
    assert ring.dropped == 2 and _flags(ring) == [0] * 10
    assert len(ring.pop_packets(3)) == 3 and ring.loss_marks == 0
    ring.push_batch([(b"b", 1.0)] * 2)
    assert _flags(ring)[-2:] == [RECORD_FLAG_LOSS_BEFORE, 0]
    # push_frames: a full ring drops the whole batch; the mark goes to the next one written.
    buf, starts, lengths, _ = _frames([5, 6])
    assert ring.push_frames(buf, starts, lengths, 2.0) == 1  # one record's room left
    assert ring.push_frames(buf, starts, lengths, 3.0) == 0
    ring.pop_packets(10)
    assert ring.loss_marks == 1  # popped the marked one
    assert ring.push_frames(buf, starts, lengths, 4.0) == 2
    assert _flags(ring) == [RECORD_FLAG_LOSS_BEFORE, 0]
    ring.pop_batch(10)  # the other reader counts marks too
    assert ring.loss_marks == 2
    # No drop, no mark.
    ring.push_frames(buf, starts, lengths, 5.0)
    ring.push_batch([(b"c", 6.0)])
    assert _flags(ring) == [0, 0, 0]


@pytest.mark.parametrize("batch", [1, 3, 5, 16, 31, 40])
def test_peek_records_counts_the_marks_of_its_batch_across_the_wrap(batch):
    """peek_records counts exactly the marked packets of the batch it hands out, wherever
    the batch starts and wraps."""
    ring = Ring.create(32 * 24, 8)  # 32 one-byte packets
    try:
        ring.push_batch([(b"x", 0.0)] * 29)
        ring.release(ring.peek_records(29)[2])  # the next batches wrap around the end
        marked = 0
        for _ in range(6):
            ring.push_batch([(b"y", 1.0)] * 40)  # fills the ring and drops the rest
            taken = 0
            while len(ring):
                before = ring.loss_marks
                flags = _flags(ring)
                pos, count, nbytes = ring.peek_records(batch)
                assert count == min(batch, 32 - taken) and nbytes == 24 * count
                assert pos == ring._tail() % ring.capacity
                marks = sum(1 for f in flags[:count] if f & RECORD_FLAG_LOSS_BEFORE)
                marked += marks
                assert ring.loss_marks - before == marks
                ring.release(nbytes)
                taken += count
        assert marked == ring.loss_marks == 5  # every refill after the first follows a drop
    finally:
        ring.close()


def test_a_header_that_does_not_fit_is_discarded_with_what_was_published(ring):
    ring.push_batch([(b"a", 0.0), (b"b", 1.0), (b"c", 2.0)])
    struct.pack_into("=I", ring.record_area, 24, 4000)  # the second claims 4,000 bytes
    assert ring.pop_packets(10) == [(0.0, b"a")]  # the batch ends before it
    assert ring.corrupt == 0
    assert ring.pop_packets(10) == [] and ring.corrupt == 1  # then the rest is given up
    assert len(ring) == 0
    ring.push_batch([(b"d", 3.0)])
    assert ring.pop_packets(10) == [(3.0, b"d")]  # and the ring goes on


def test_a_wrap_mark_at_the_start_of_the_area_is_a_bad_header(ring):
    ring.push_batch([(b"a", 0.0)])
    struct.pack_into("=I", ring.record_area, 0, RECORD_WRAP)
    assert scan_records(ring.record_area, CAPACITY, 0, 24, 10) == (0, 0, 0, True)


# -- the C walk and the Python walk ----------------------------------------------------------


def _random_area(draw_bytes: bytes, capacity: int) -> bytearray:
    area = bytearray(capacity)
    area[: len(draw_bytes)] = draw_bytes[:capacity]
    return area


@pytest.mark.skipif(not dataplane.AVAILABLE, reason=dataplane.UNAVAILABLE)
@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 60), max_size=40),
    st.integers(0, 1 << 20),
    st.integers(1, 40),
    st.lists(st.tuples(st.integers(0, 255), st.integers(0, 0xFFFFFFFF)), max_size=4),
)
def test_the_compiled_scan_is_the_python_scan(sizes, start, max_items, damage):
    """On rings written by the producer (from any start) and then damaged at random
    words: the same (count, nbytes, marks, bad) from both walks, for every window."""
    capacity = 256
    ring = Ring.create(capacity, 60)
    try:
        start -= start % 8
        ring._publish_head(start)
        ring._publish_tail(start)
        for i, n in enumerate(sizes):
            ring.push_batch([(bytes([i]) * n, float(i))])
            if i % 5 == 4:
                ring.pop_batch(2)
        area = ring.record_area
        for at, value in damage:
            struct.pack_into("=I", area, at - at % 4, value)
        tail, head = ring._tail(), ring._head()
        for avail in {head - tail, max(0, head - tail - 8), capacity}:
            want = scan_records(area, capacity, tail, avail, max_items)
            got = dataplane.packet.scan_records(area, capacity, tail, avail, max_items)
            assert tuple(got) == want
            if not damage and avail == head - tail:
                assert want[3] is False and want[1] <= avail
    finally:
        ring.close()


_BLOCKS_IN_A_FRESH_PROCESS = """
import os
from multiprocessing import resource_tracker

from engine.io.ring import Ring
from engine.io.tuple_history import TupleHistory
from metrics.counters import CounterBlock

def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

before = rss_kb()
block = CounterBlock.create(workers=2)
ring = Ring.create(16 << 20)
history = TupleHistory.create()
grown = rss_kb() - before
print(resource_tracker._resource_tracker._fd is None)
print(os.readlink(block.name))
print(os.readlink(f"/proc/self/fd/{ring.spec()[0]}"))
print(grown)
"""


def test_the_supervisor_blocks_have_no_name_no_tracker_and_map_no_ring_page():
    """Counter block, ring and tuple history: memfd or anonymous shared memory (nothing in
    /dev/shm, multiprocessing's resource tracker never started), and creating a 16 MiB ring
    maps none of its pages in the creator (a child maps them when it attaches)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _BLOCKS_IN_A_FRESH_PROCESS],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.splitlines()  # fmt: skip
    no_tracker, counters, ring, grown_kb = out
    assert no_tracker == "True"
    assert counters.startswith("/memfd:tcpcopy-mp-counters")
    assert ring.startswith("/memfd:tcpcopy-mp-ring")
    assert int(grown_kb) < 4096  # the ring is 16,384 KiB


def _attached_rss_kb(spec, conn) -> None:
    before = _rss_kb()
    ring = Ring.attach(spec)
    conn.send(_rss_kb() - before)
    ring.close()


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_child_that_attaches_maps_the_whole_ring():
    """The ring's pages are in the attaching child's footprint from its start (the -m
    watchdog sees them before a flood touches them)."""
    ring = Ring.create(8 << 20)
    parent, child = mp.Pipe()
    try:
        proc = mp.get_context("fork").Process(target=_attached_rss_kb, args=(ring.spec(), child))
        proc.start()
        assert parent.poll(30)
        grown_kb = parent.recv()
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        ring.close()
    assert grown_kb >= 8 * 1024
