"""The ring under a real producer process and a real consumer process, and hostile counters.

The stress test pushes millions of sequence-numbered packets through a small ring (so it
wraps thousands of times and overflows most of the time) from one process while another
pops them, and checks at every batch what a worker relies on: the length is never negative
and never above the capacity, packets come out in order without duplicates, every gap is a
drop the producer counted and the consumer saw marked, and sent = popped + dropped.
"""

import multiprocessing as mp
import time

import numpy as np
import pytest

from engine.io.ring import Ring

CAPACITY = 256 * 24 + 8  # 8-byte packets take 24 bytes: wrap marks now and then
PACKETS = 2_000_000
DEADLINE_S = 90.0  # bounded in time: a stuck side fails the test instead of hanging it
BATCH = 200


def _produce(spec, total, deadline, conn):
    """Sequence numbers 0..total-1 as 8-byte packets, alternating the two write paths."""
    ring = Ring.attach(spec)
    buf = bytearray(BATCH * 8)
    view = memoryview(buf)
    seq = np.zeros(BATCH, dtype=">u8")
    starts = np.arange(BATCH, dtype=np.int64) * 8
    sent = 0
    batches = 0
    while sent < total and time.monotonic() < deadline:
        n = min(BATCH - (batches % 7) * 20, total - sent)  # batches of varying size
        seq[:n] = np.arange(sent, sent + n, dtype=np.uint64)
        buf[: n * 8] = seq[:n].tobytes()
        if batches % 2:
            ring.push_frames(view, starts[:n], np.full(n, 8, dtype=np.int64), float(batches))
        else:
            ring.push_batch([(bytes(buf[i * 8 : i * 8 + 8]), float(batches)) for i in range(n)])
        sent += n
        batches += 1
        if batches % 64 == 0:
            time.sleep(0)  # let the consumer drain now and then: the ring also empties
    conn.send((sent, ring.dropped, ring.oversize, batches))
    conn.close()
    del view
    ring.close()


def _consume(spec, deadline, stop, conn):
    ring = Ring.attach(spec)
    popped = 0
    last = -1
    gaps = 0
    bad_len = 0
    out_of_order = 0
    checks = 0
    while time.monotonic() < deadline:
        items = ring.pop_packets(64) if checks % 2 else ring.pop_batch(64)
        # Busy: the length is read as often as possible while the producer publishes (the
        # window where a counter store is not one store is a few nanoseconds wide).
        for _ in range(4):
            length = len(ring)
            checks += 1
            if not 0 <= length <= ring.capacity:
                bad_len += 1
        if not items and stop.is_set() and len(ring) == 0:
            break
        for item in items:
            data = item[1] if isinstance(item[0], float) and isinstance(item[1], bytes) else item[0]
            n = int.from_bytes(data, "big")
            if n <= last:
                out_of_order += 1
            elif n != last + 1:
                gaps += 1
            last = n
        popped += len(items)
    conn.send(
        {
            "popped": popped,
            "gaps": gaps,
            "bad_len": bad_len,
            "out_of_order": out_of_order,
            "loss_marks": ring.loss_marks,
            "checks": checks,
        }
    )
    conn.close()
    ring.close()


def _observe(spec, stop, conn):
    """A third process that only reads the length (as the supervisor or a test could):
    the more reads race a counter store, the likelier a broken store is caught."""
    ring = Ring.attach(spec)
    reads = bad = 0
    while not stop.is_set():
        for _ in range(1000):
            length = len(ring)
            if not 0 <= length <= ring.capacity:
                bad += 1
        reads += 1000
    conn.send((reads, bad))
    conn.close()
    ring.close()


@pytest.mark.slow
def test_two_processes_millions_of_records_wrap_and_overflow():
    ctx = mp.get_context("fork")
    ring = Ring.create(CAPACITY, 8)
    deadline = time.monotonic() + DEADLINE_S
    stop = ctx.Event()
    p_recv, p_send = ctx.Pipe(duplex=False)
    c_recv, c_send = ctx.Pipe(duplex=False)
    o_recv, o_send = ctx.Pipe(duplex=False)
    producer = ctx.Process(target=_produce, args=(ring.spec(), PACKETS, deadline, p_send))
    consumer = ctx.Process(target=_consume, args=(ring.spec(), deadline + 5, stop, c_send))
    observer = ctx.Process(target=_observe, args=(ring.spec(), stop, o_send))
    consumer.start()
    observer.start()
    producer.start()
    try:
        assert p_recv.poll(DEADLINE_S + 10), "producer did not finish"
        sent, dropped, oversize, batches = p_recv.recv()
        stop.set()
        assert c_recv.poll(30), "consumer did not finish"
        seen = c_recv.recv()
        assert o_recv.poll(30), "observer did not finish"
        observed, observed_bad = o_recv.recv()
    finally:
        stop.set()
        for proc in (producer, consumer, observer):
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        ring.close()
    print(
        f"RING-STRESS sent={sent} dropped={dropped} batches={batches} {seen} "
        f"observer_reads={observed} observer_bad={observed_bad}"
    )
    assert sent == PACKETS, "the producer ran out of time"
    assert producer.exitcode == 0 and consumer.exitcode == 0
    assert seen["bad_len"] == 0
    assert observed_bad == 0 and observed > 0
    assert seen["out_of_order"] == 0
    assert oversize == 0
    assert seen["popped"] + dropped == sent
    assert seen["popped"] > 256 * 50  # wrapped around many times
    assert dropped > 0  # and overflowed
    assert seen["gaps"] == seen["loss_marks"]  # every hole was a counted, marked drop


def test_hostile_counters_never_give_a_negative_or_overfull_ring():
    """Whatever the other side writes into its counter, a length stays in [0, capacity],
    the producer never overwrites unread records and never moves its head backwards."""
    ring = Ring.create(8 * 24, 8)  # eight 1-byte packets
    try:
        assert ring.push_batch([(b"a", 0.0)] * 5) == 5
        counters = ring._counters
        for hostile_tail in (0, 3, 5, 7, 2**63, 2**64 - 1):
            counters[8] = hostile_tail  # the tail word, as a broken consumer would write it
            assert 0 <= len(ring) <= ring.capacity
            assert 0.0 <= ring.fill() <= 1.0
        counters[8] = 2**64 - 1  # tail beyond head: the producer takes the ring as full
        head = ring._head()
        assert ring.push_batch([(b"b", 0.0)]) == 0
        assert ring._head() == head
        counters[8] = 0  # a tail reset to 0 (what struct.pack_into showed for an instant)
        assert ring.push_batch([(b"c", 0.0)] * 10) == 3  # 8 - 5 free, never more
        assert ring._head() == head + 3 * 24
        # The consumer side: a head read as 0 gives nothing to pop, never a negative count.
        consumer = Ring.attach(ring.spec())
        try:
            consumer._tail_mine = 4
            counters[0] = 0
            assert consumer.pop_packets() == []
            assert len(consumer) == 0
        finally:
            consumer.close()
    finally:
        ring.close()
