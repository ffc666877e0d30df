"""The shared-memory SPSC ring: order, full-ring drops, oversize, wake-ups, across processes."""

import multiprocessing as mp
import select
import time

import pytest

from engine.ring import Ring


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
