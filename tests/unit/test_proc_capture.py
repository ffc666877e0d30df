"""engine/proc/capture.py and engine/proc/worker.RingSource: capture -> rings, in one process."""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import pytest

from engine.codec import packet
from engine.io.capture import PcapFileSource, ReplayPacer, TransferFilter
from engine.io.control import ControlBlock
from engine.io.ring import RING_IDLE_POLL_S, RING_MAX_PACKET, Ring, record_bytes
from engine.proc.capture import CaptureProcess, flow_worker, ring_bytes, ring_max_packet
from engine.proc.worker import RingSource
from metrics.counters import RING_DROPPED, CounterBlock
from tests.paths import ONLINE_HTTP_PCAP

PCAP = ONLINE_HTTP_PCAP
ONLINE = (0xC6120102, 80)


def client_packets(path: Path) -> list[tuple[int, int]]:
    """(src ip, src port) of every client->online:80 packet, decoded here with struct
    (offline sources keep pure ACKs)."""
    data = path.read_bytes()
    off, out = 24, []
    while off + 16 <= len(data):
        caplen = struct.unpack_from("<I", data, off + 8)[0]
        ip = data[off + 16 + 14 : off + 16 + caplen]
        ihl = (ip[0] & 0x0F) * 4
        src, dst = struct.unpack_from("!II", ip, 12)
        sport, dport = struct.unpack_from("!HH", ip, ihl)
        if (dst, dport) == ONLINE:
            out.append((src, sport))
        off += 16 + caplen
    return out


def make_capture(rings, **kw) -> tuple[CaptureProcess, TransferFilter, PcapFileSource]:
    flt = TransferFilter(lambda ip, port: object() if (ip, port) == ONLINE else None)
    src = PcapFileSource([str(PCAP)], ReplayPacer(accelerate=1000.0), 1, flt)
    proc = CaptureProcess([src], rings, 1500, prefilter_counters=flt.counters, **kw)
    return proc, flt, src


@pytest.fixture
def rings_factory():
    made: list[Ring] = []

    def make(n: int, capacity: int = 1 << 20, max_packet: int = RING_MAX_PACKET) -> list[Ring]:
        rings = [Ring.create(capacity, max_packet) for _ in range(n)]
        made.extend(rings)
        return rings

    yield make
    for r in made:
        r.close()


def test_flow_worker_is_stable_in_range_and_uses_every_worker():
    flows = set(client_packets(PCAP))
    assert len(flows) == 25  # README: ab -n 20, then ab -k -c 5
    for n in (1, 2, 3, 8):
        owners = {f: flow_worker(*f, n) for f in flows}
        assert all(0 <= w < n for w in owners.values())
        assert owners == {f: flow_worker(*f, n) for f in flows}  # no per-run salt
    assert len({flow_worker(*f, 2) for f in flows}) == 2


@pytest.mark.parametrize("step", [1, 2, 4, 8])
@pytest.mark.parametrize("workers", [2, 3, 4, 8])
def test_flow_worker_spreads_one_clients_ports_of_one_parity(step, workers):
    # Linux gives connect() ports of one parity, often 4 or 8 apart under concurrent
    # connects: a low-bit hash sent every one of them to the same worker.
    ip = 0xC6120A05
    owners = Counter(flow_worker(ip, 40000 + step * k, workers) for k in range(64 * workers))
    assert len(owners) == workers
    assert min(owners.values()) >= 64 * 0.75, owners


def test_the_largest_packet_follows_mtu():
    assert ring_max_packet(1500) == RING_MAX_PACKET == 1520
    assert ring_max_packet(576) == RING_MAX_PACKET
    assert ring_max_packet(9000) == 9000
    assert record_bytes(1520) == 1536 and record_bytes(9000) == 9016
    # A ring holds at least two of the largest records, whatever --ring-size says.
    assert (
        ring_bytes(_cfg(mtu=65535, ring_bytes=64 << 10)) == 2 * record_bytes(65535) // 64 * 64 + 64
    )


def test_every_flow_lands_on_exactly_one_ring_the_hashed_one(rings_factory):
    rings = rings_factory(3)
    control = ControlBlock(3)
    block = CounterBlock.create(workers=3)
    try:
        proc, flt, src = make_capture(rings, counters=block, control=control)
        assert proc.run() == 0
        proc.close()
        assert control.capture_done and src.exhausted
        seen: dict[tuple[int, int], set[int]] = {}
        per_ring = Counter()
        for i, ring in enumerate(rings):
            for data, _ts in ring.pop_batch(10_000):
                pkt = packet.parse_ip(data)
                seen.setdefault((pkt.src, pkt.sport), set()).add(i)
                per_ring[i] += 1
        expected = Counter(flow_worker(ip, port, 3) for ip, port in client_packets(PCAP))
        assert per_ring == expected
        assert all(owners == {flow_worker(*f, 3)} for f, owners in seen.items())
        assert sum(per_ring.values()) == flt.counters["capture_accepted"]
        totals = block.snapshot()["totals"]
        assert totals["capture_accepted"] == flt.counters["capture_accepted"]
        assert totals["ring_dropped"] == 0
    finally:
        block.close()
        block.unlink()


def test_tiny_ring_drops_are_counted_per_worker_and_capture_never_blocks(rings_factory, caplog):
    caplog.set_level("WARNING", logger="tcpcopy")
    rings = rings_factory(2, capacity=3072)  # a few packets each
    control = ControlBlock(2)
    block = CounterBlock.create(workers=2)
    try:
        # Shedding and offline backpressure off: this is the full-ring path itself
        # (tests/unit/test_shed.py has the shedding that normally keeps a ring from filling,
        # the backpressure test below the offline pause).
        proc, flt, _src = make_capture(
            rings, counters=block, control=control, shedding=False, backpressure=False
        )
        assert proc.run() == 0  # returns although nobody consumes: drops, no hang
        proc.close()
        expected = Counter(flow_worker(ip, port, 2) for ip, port in client_packets(PCAP))
        snap = block.snapshot()
        kept = [_records_in(ring) for ring in rings]
        for i, ring in enumerate(rings):
            assert 0 < kept[i] < expected[i] and len(ring) > 3072 - record_bytes(1520)
            assert ring.dropped == expected[i] - kept[i]
            assert snap["workers"][i]["ring_dropped"] == ring.dropped
        assert snap["totals"]["ring_dropped"] == flt.counters["capture_accepted"] - sum(kept)
        # Logged, not only counted: per worker, the lines add up to its drops.
        for i, ring in enumerate(rings):
            told = [
                int(r.getMessage().split(": ")[2].split()[0])
                for r in caplog.records
                if r.getMessage().startswith(f"worker {i}: its ring was full")
            ]
            assert told and sum(told) == ring.dropped, (i, told, ring.dropped)
        # A restarted capture process (fresh producer objects, rings still full) continues
        # the per-ring counts: the second pass drops what does not fit (nearly every packet).
        attached = [Ring.attach(r.spec()) for r in rings]
        again, _, _ = make_capture(
            attached, counters=block, control=control, shedding=False, backpressure=False
        )
        again.run()
        again.close()
        for i in range(2):
            total = _records_in(rings[i])
            assert total - kept[i] < expected[i] // 2
            assert block.writer(block.worker_row(i)).get(RING_DROPPED) == 2 * expected[i] - total
        for r in attached:
            r.close()
    finally:
        block.close()
        block.unlink()


def test_offline_source_waits_for_a_busy_ring_and_shifts_its_schedule(rings_factory):
    """Offline backpressure: past OFFLINE_PAUSE_FILL the file is not read (nothing dropped,
    nothing shed); below OFFLINE_RESUME_FILL it resumes, its schedule moved by the wait."""
    from engine.proc.capture import (
        HEARTBEAT_INTERVAL_S,
        OFFLINE_PAUSE_FILL,
        OFFLINE_PAUSE_POLL_S,
        OFFLINE_RESUME_FILL,
    )

    rings = rings_factory(1, capacity=64 * record_bytes(40))  # 64 packets of 40 bytes
    clock = [100.0]
    proc, _flt, src = make_capture(rings, clock=lambda: clock[0])
    src.start(clock[0])
    for _ in range(int(64 * OFFLINE_PAUSE_FILL)):
        rings[0].push_batch([(b"x" * 40, 0.0)])
    due_before = src.next_deadline()
    proc._read(src, clock[0])
    assert len(rings[0]) == int(64 * OFFLINE_PAUSE_FILL) * record_bytes(40)  # paused: not read
    assert proc.counters["offline_paused"] == 1
    # Paused, the loop polls the rings: the file's past due time does not wake it at once.
    assert due_before is not None and due_before <= clock[0]
    assert proc._wake_at(clock[0], clock[0] + 10) == clock[0] + OFFLINE_PAUSE_POLL_S
    clock[0] += 0.75
    rings[0].pop_batch(int(64 * (OFFLINE_PAUSE_FILL - OFFLINE_RESUME_FILL)) - 1)
    proc._read(src, clock[0])  # still at/over the resume mark: still paused
    assert proc.counters["offline_paused_ms"] == 0 and src.next_deadline() == due_before
    rings[0].pop_batch(64)
    clock[0] += 0.25
    proc._read(src, clock[0])
    assert proc.counters["offline_paused_ms"] == 1000
    assert proc.counters["offline_paused"] == 1
    due = src.next_deadline()  # running again: the loop wakes when the file is due
    wake = min(due, clock[0] + HEARTBEAT_INTERVAL_S) if due is not None else None
    assert wake is not None and proc._wake_at(clock[0], clock[0] + 10) == wake
    assert rings[0].dropped == 0 and proc.counters["shed_starts"] == 0
    # The schedule moved by the 1.0 s waited: the first packet was due at due_before.
    assert src.pacer.start == pytest.approx(100.0 + 1.0)
    assert len(rings[0]) > 0  # due packets (now <= due + 1 s) were read after resuming
    src.close()


def test_oversized_packet_is_split_at_mtu_onto_one_ring(rings_factory):
    rings = rings_factory(2)
    proc = CaptureProcess([], rings, 1500)
    payload = bytes(range(256)) * 16  # 4096 bytes: a GRO aggregate
    big = packet.TcpPacket(
        0xC6120A05, ONLINE[0], 40000, 80, seq=1000, ack=5, flags=packet.ACK | packet.PSH,
        payload=payload,
    )  # fmt: skip
    proc.dispatch([(1.0, packet.build(big))])
    ring = rings[flow_worker(0xC6120A05, 40000, 2)]
    assert len(rings[1 - rings.index(ring)]) == 0
    pieces = [packet.parse_ip(d) for d, _ in ring.pop_batch()]
    assert len(pieces) == 3 and all(len(packet.build(p)) <= 1500 for p in pieces)
    assert b"".join(p.payload for p in pieces) == payload
    assert [p.seq for p in pieces] == [1000, 1000 + len(pieces[0].payload),
                                        1000 + len(pieces[0].payload)
                                        + len(pieces[1].payload)]  # fmt: skip
    assert proc.counters["capture_split"] == 1


def _records_in(ring: Ring) -> int:
    """Packets waiting in ``ring``, counted by a second consumer that takes none."""
    reader = Ring.attach(ring.spec())
    try:
        return reader.peek_records(1 << 30)[1]
    finally:
        reader.close()


def test_ring_source_reads_batches_wakes_and_reports_exhaustion(rings_factory):
    (ring,) = rings_factory(1)
    control = ControlBlock(1)
    ticks: list[float] = []
    src = RingSource(Ring.attach(ring.spec()), control, tick=ticks.append, batch_max=4)
    assert src.fileno() == ring.efd
    ring.push_batch([(bytes([i]) * 40, float(i)) for i in range(6)])
    assert not src.exhausted  # capture not done
    first = src.read_batch(10.0)
    assert [ts for ts, _ in first] == [0.0, 1.0, 2.0, 3.0]
    assert src.next_deadline() == 10.0  # backlog: come back at once, no eventfd will ring
    rest = src.read_batch(10.5)
    assert [data for _, data in rest] == [bytes([4]) * 40, bytes([5]) * 40]
    assert src.next_deadline() == pytest.approx(10.5 + RING_IDLE_POLL_S)
    assert ticks == [10.0, 10.5]
    control.mark_capture_done()
    assert src.exhausted
    ring.push_batch([(b"late", 11.0)])
    assert not src.exhausted  # a packet is still in the ring


def test_ring_source_reports_a_marked_read_once(rings_factory):
    (ring,) = rings_factory(1, capacity=4 * record_bytes(1), max_packet=8)  # 4 packets
    src = RingSource(Ring.attach(ring.spec()), None, batch_max=8)
    seen: list[float] = []
    src.on_loss = seen.append
    ring.push_batch([(b"x", 0.0)] * 6)  # two dropped: the next written one is marked
    src.read_batch(1.0)
    assert seen == []
    ring.push_batch([(b"y", 0.0)])
    src.read_batch(2.0)
    ring.push_batch([(b"z", 0.0)])
    src.read_batch(3.0)
    assert seen == [2.0]
    src.close()


def test_ring_source_comes_back_at_once_for_a_push_that_raced_its_pop(rings_factory):
    # The producer pushed while the consumer popped and (reading the tail before the
    # consumer published it) rang no eventfd: the consumer must not sleep on that packet.
    (ring,) = rings_factory(1)
    consumer = Ring.attach(ring.spec())
    src = RingSource(consumer, None, batch_max=8)
    pop = consumer.pop_packets

    def racing_pop(n):
        got = pop(n)
        ring.push_batch([(b"late", 0.0)])
        consumer.clear_wakeup()  # its wake-up was lost
        return got

    consumer.pop_packets = racing_pop
    ring.push_batch([(b"x", 0.0)] * 3)
    assert len(src.read_batch(1.0)) == 3  # fewer than batch_max
    assert src.next_deadline() == 1.0  # due now, not RING_IDLE_POLL_S later
    consumer.pop_packets = pop
    assert [d for _t, d in src.read_batch(1.0)] == [b"late"]
    assert src.next_deadline() == 1.0 + RING_IDLE_POLL_S
    src.close()


def _cfg(**kw):
    from types import SimpleNamespace

    base = {"ring_bytes": None, "capture": "raw", "capture_buffer_bytes": 4 << 20, "workers": 1}
    mtu = kw.pop("mtu", 1500)
    base.update(kw)
    return SimpleNamespace(session=SimpleNamespace(mtu=mtu), **base)


def test_ring_size_derived_from_the_load():
    from engine.proc.capture import RING_BYTES_MIN, RING_BYTES_PER_WORKER

    # live: the worker's share of 2 MiB (or of half of -B if larger), between 1 and 2 MiB
    assert ring_bytes(_cfg()) == RING_BYTES_PER_WORKER == 2 << 20
    assert ring_bytes(_cfg(workers=2)) == RING_BYTES_MIN == 1 << 20
    assert ring_bytes(_cfg(workers=64)) == RING_BYTES_MIN
    assert ring_bytes(_cfg(capture_buffer_bytes=1 << 20)) == RING_BYTES_PER_WORKER
    assert ring_bytes(_cfg(capture_buffer_bytes=64 << 20, workers=8)) == RING_BYTES_PER_WORKER
    assert ring_bytes(_cfg(capture_buffer_bytes=64 << 20, workers=24)) == (
        (32 << 20) // 24 // 64 * 64 + 64
    )
    assert ring_bytes(_cfg(capture_buffer_bytes=256 << 20, workers=32)) == 2 << 20
    # offline: one read batch of the largest packets past the pause mark
    assert ring_bytes(_cfg(capture="offline")) == 2 * 1024 * record_bytes(1520) == 3 << 20
    # --ring-size wins
    assert ring_bytes(_cfg(ring_bytes=5 << 20, capture="offline")) == 5 << 20
    assert ring_bytes(_cfg(ring_bytes=1 << 20, workers=64)) == 1 << 20
