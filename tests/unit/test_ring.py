"""The shared-memory SPSC ring: order, full-ring drops, oversize, wake-ups, across processes."""

import multiprocessing as mp
import select
import time

import pytest

from engine.io.ring import SLOT_FLAG_LOSS_BEFORE, Ring


@pytest.fixture
def ring():
    r = Ring.create(slots=8, slot_bytes=128)
    yield r
    r.close()


def test_fifo_order_and_timestamps(ring):
    pkts = [(bytes([i]) * (i + 1), float(i)) for i in range(5)]
    assert ring.push_batch(pkts) == 5
    assert len(ring) == 5
    assert ring.pop_batch(3) == pkts[:3]
    assert ring.pop_batch() == pkts[3:]
    assert ring.pop_batch() == []


def test_full_ring_drops_and_counts_never_blocks(ring):
    written = ring.push_batch([(b"x" * 10, 0.0)] * 11)
    assert written == 8
    assert ring.dropped == 3
    assert len(ring.pop_batch(100)) == 8


def test_oversize_counted(ring):
    assert ring.push_batch([(b"y" * (ring.max_packet_bytes + 1), 0.0), (b"ok", 1.0)]) == 1
    assert ring.oversize == 1
    assert ring.pop_batch() == [(b"ok", 1.0)]


def test_wraparound_many_times(ring):
    for round_ in range(50):
        batch = [(f"{round_}-{i}".encode(), round_ + i / 10) for i in range(5)]
        assert ring.push_batch(batch) == 5
        assert ring.pop_batch() == batch


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
    ring = Ring.create(slots=64, slot_bytes=64)
    total = 2000
    parent, child = mp.Pipe()
    proc = mp.get_context("fork").Process(target=_consumer, args=(ring.spec(), total, child))
    proc.start()
    sent = []
    i = 0
    deadline = time.monotonic() + 20  # bounded in time: a dead consumer fails the test
    while i < total and time.monotonic() < deadline:
        data = i.to_bytes(4, "big")
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
    import numpy as np

    chunks = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
    starts = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
    return memoryview(b"".join(chunks)), starts, np.array(sizes, dtype=np.int64), chunks


def test_push_frames_round_trips_across_the_wrap(ring):
    buf, starts, lengths, chunks = _frames([1, 2, 3, 4, 5])
    assert ring.push_frames(buf, starts, lengths, 1.0) == 5
    assert ring.pop_packets(4) == [(1.0, c) for c in chunks[:4]]
    buf2, starts2, lengths2, chunks2 = _frames([6, 7, 8, 9, 10, 11, 12])
    assert ring.push_frames(buf2, starts2, lengths2, 2.0) == 7  # slots 5..11: wraps at 8
    assert len(ring) == 8
    assert ring.pop_packets(100) == [(1.0, chunks[4])] + [(2.0, c) for c in chunks2]


def test_push_frames_drops_what_does_not_fit_and_skips_oversize(ring):
    sizes = [10, ring.max_packet_bytes + 1, 20, 30, 40, 50, 60, 70, 80, 90]
    buf, starts, lengths, chunks = _frames(sizes)
    assert ring.push_frames(buf, starts, lengths, 0.0) == 8
    assert ring.oversize == 1 and ring.dropped == 1
    kept = [c for c in chunks if len(c) <= ring.max_packet_bytes][:8]
    assert ring.pop_packets(100) == [(0.0, c) for c in kept]


def test_batch_and_frame_writes_and_both_reads_interleave(ring):
    buf, starts, lengths, chunks = _frames([3, 4])
    ring.push_batch([(b"a", 0.5)])
    ring.push_frames(buf, starts, lengths, 1.5)
    ring.push_batch([(b"z", 2.5)])
    assert ring.pop_batch(2) == [(b"a", 0.5), (chunks[0], 1.5)]
    assert ring.pop_packets(5) == [(1.5, chunks[1]), (2.5, b"z")]
    assert ring.pop_packets(5) == [] and len(ring) == 0


def test_fill_is_the_used_fraction(ring):
    assert ring.fill() == 0.0
    ring.push_batch([(b"x", 0.0)] * 6)
    assert ring.fill() == 6 / 8


def _marks(ring) -> list[int]:
    """The flags word of every slot in use, oldest first."""
    words = ring._slot_words32
    return [int(ring._u32[(i % ring.slots) * words + 1]) for i in range(ring._tail(), ring._head())]


def test_first_packet_written_after_a_drop_is_marked_both_writers(ring):
    # push_batch: 10 into 8 slots drops 2; after room is made the next packet is marked.
    ring.push_batch([(b"a", 0.0)] * 10)
    assert ring.dropped == 2 and _marks(ring) == [0] * 8
    assert len(ring.pop_packets(3)) == 3 and ring.loss_marks == 0
    ring.push_batch([(b"b", 1.0)] * 2)
    assert _marks(ring)[-2:] == [SLOT_FLAG_LOSS_BEFORE, 0]
    # push_frames: a full ring drops the whole batch; the mark goes to the next one written.
    buf, starts, lengths, _ = _frames([5, 6])
    assert ring.push_frames(buf, starts, lengths, 2.0) == 1  # one slot left
    assert ring.push_frames(buf, starts, lengths, 3.0) == 0
    ring.pop_packets(8)
    assert ring.loss_marks == 1  # popped the marked one
    assert ring.push_frames(buf, starts, lengths, 4.0) == 2
    assert _marks(ring) == [SLOT_FLAG_LOSS_BEFORE, 0]
    ring.pop_batch(8)  # the other reader counts marks too
    assert ring.loss_marks == 2
    # No drop, no mark.
    ring.push_frames(buf, starts, lengths, 5.0)
    ring.push_batch([(b"c", 6.0)])
    assert _marks(ring) == [0, 0, 0]


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
ring = Ring.create(slots=8192, slot_bytes=2048)
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
    ring = Ring.create(slots=4096, slot_bytes=2048)  # 8 MiB
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


@pytest.mark.parametrize("batch", [1, 3, 5, 16, 31, 40])
def test_peek_slots_counts_the_marks_of_its_batch_across_the_wrap(batch):
    """peek_slots counts exactly the marked packets of the batch it hands out, wherever the
    batch starts and wraps (one strided read of the flags, two across the wrap)."""
    ring = Ring.create(slots=32, slot_bytes=64)
    try:
        ring.push_batch([(b"x", 0.0)] * 29)
        ring.release(ring.peek_slots(29)[1])  # the next batches wrap around slot 0
        marked = 0
        for _ in range(6):
            ring.push_batch([(b"y", 1.0)] * 40)  # fills the ring and drops the rest
            taken = 0
            while len(ring):
                before = ring.loss_marks
                first, count = ring.peek_slots(batch)
                assert count == min(batch, 32 - taken)
                words = ring._slot_words32
                flags = [int(ring._u32[((first + k) % 32) * words + 1]) for k in range(count)]
                marked += sum(1 for f in flags if f & SLOT_FLAG_LOSS_BEFORE)
                assert ring.loss_marks - before == sum(
                    1 for f in flags if f & SLOT_FLAG_LOSS_BEFORE
                )
                ring.release(count)
                taken += count
        assert marked == ring.loss_marks == 5  # every refill after the first follows a drop
    finally:
        ring.close()
