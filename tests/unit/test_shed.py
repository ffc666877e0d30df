"""engine/core/shed.py FlowGate: whole sessions in or out under overload, counted by reason."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from engine.core.shed import REASON_MEMORY, REASON_RING_FULL, FlowGate
from engine.io.control import ControlBlock
from engine.io.ring import Ring, record_bytes
from engine.proc.capture import CaptureProcess
from metrics.counters import CounterBlock

SYN, FIN, RST, PSH_ACK, ACK = 0x02, 0x01, 0x04, 0x18, 0x10


def key(port: int, ip: int = 0xC6130001) -> int:
    return ip << 16 | port


def feed(gate: FlowGate, packets: list[tuple[int, int]], worker: int = 0, now: float = 0.0):
    """packets: (key, flags) in capture order, all for ``worker``; returns the kept keys."""
    keys = np.array([k for k, _ in packets], dtype=np.uint64)
    flags = np.array([f for _, f in packets], dtype=np.uint8)
    workers = np.full(len(packets), worker, dtype=np.uint64)
    mask = gate.admit(keys, flags, workers, now)
    if mask is None:
        return [k for k, _ in packets]
    return [k for (k, _), m in zip(packets, mask.tolist(), strict=True) if m]


def test_nothing_is_shed_below_the_threshold():
    gate = FlowGate(2)
    assert gate.update([0.89, 0.0]) == []
    pkts = [(key(1), SYN), (key(1), PSH_ACK), (key(2), PSH_ACK)]
    assert feed(gate, pkts) == [key(1), key(1), key(2)]
    assert gate.counters == Counter()
    assert set(gate.known) == {key(1), key(2)}


def test_known_sessions_go_on_new_ones_are_shed_whole_until_their_fin():
    gate = FlowGate(2)
    feed(gate, [(key(1), SYN), (key(1), PSH_ACK)])  # admitted before the overload
    assert gate.update([0.95, 0.1]) == [(0, REASON_RING_FULL)]
    kept = feed(gate, [(key(1), PSH_ACK), (key(2), SYN), (key(2), PSH_ACK), (key(1), PSH_ACK)])
    assert kept == [key(1), key(1)]
    assert gate.counters["shed_sessions_ring_full"] == 1
    assert gate.counters["drop_shed"] == 2
    # The ring drains: new sessions are admitted again, but flow 2 stays shed to its end.
    assert gate.update([0.4, 0.1]) == [(0, "")]
    assert feed(gate, [(key(2), PSH_ACK), (key(3), SYN), (key(2), FIN)]) == [key(3)]
    assert gate.counters["drop_shed"] == 4
    assert key(2) not in gate.shed
    # After its FIN the tuple is free: a later packet is an unknown flow again (admitted).
    assert feed(gate, [(key(2), PSH_ACK)]) == [key(2)]
    assert gate.counters["shed_sessions_ring_full"] == 1


def test_mid_stream_packet_of_an_unknown_flow_is_shed_while_shedding():
    gate = FlowGate(1)
    gate.update([0.9])
    assert feed(gate, [(key(7), PSH_ACK), (key(7), PSH_ACK)]) == []
    assert gate.counters["shed_sessions_ring_full"] == 1  # once per flow, not per packet
    assert gate.counters["drop_shed"] == 2


def test_hysteresis_between_low_and_high():
    gate = FlowGate(1, high=0.75, low=0.5)
    gate.update([0.8])
    assert gate.shedding
    assert gate.update([0.6]) == []  # still above low: still shedding
    assert gate.shedding
    assert gate.update([0.49]) == [(0, "")]
    assert not gate.shedding
    assert gate.update([0.7]) == []  # below high: still admitting
    assert gate.counters["shed_starts"] == 1


def test_memory_sheds_every_worker_with_its_own_reason():
    gate = FlowGate(2)
    assert sorted(gate.update([0.0, 0.0], memory=True)) == [(0, REASON_MEMORY), (1, REASON_MEMORY)]
    feed(gate, [(key(1), SYN)], worker=0)
    feed(gate, [(key(2), SYN)], worker=1)
    assert gate.counters["shed_sessions_memory"] == 2
    assert gate.counters["shed_sessions_ring_full"] == 0


def test_a_new_syn_on_a_shed_tuple_is_decided_afresh():
    gate = FlowGate(1)
    gate.update([0.9])
    feed(gate, [(key(5), SYN), (key(5), PSH_ACK)])  # shed, its FIN never seen
    gate.update([0.1])
    assert feed(gate, [(key(5), PSH_ACK), (key(5), SYN), (key(5), PSH_ACK)]) == [key(5), key(5)]
    assert key(5) in gate.known and key(5) not in gate.shed


def test_fin_forgets_a_flow_only_at_its_last_packet_of_the_batch():
    gate = FlowGate(1)
    feed(gate, [(key(1), SYN), (key(1), FIN), (key(1), SYN)])  # port reused in one batch
    assert key(1) in gate.known
    feed(gate, [(key(1), RST)])
    assert key(1) not in gate.known
    gate.update([0.9])
    assert feed(gate, [(key(1), PSH_ACK)]) == []  # now unknown, and shedding


def test_idle_flows_are_forgotten():
    gate = FlowGate(1, idle_s=10.0)
    feed(gate, [(key(1), SYN)], now=0.0)
    gate.update([0.9])
    feed(gate, [(key(2), SYN)], now=1.0)
    assert key(1) in gate.known and key(2) in gate.shed
    gate.expire(20.0)
    assert not gate.known and not gate.shed


def test_disabled_gate_never_sheds():
    gate = FlowGate(1, enabled=False)
    assert gate.update([1.0], memory=True) == []
    assert feed(gate, [(key(1), SYN)]) == [key(1)]


def test_bad_thresholds_refused():
    with pytest.raises(ValueError):
        FlowGate(1, high=0.5, low=0.75)
    with pytest.raises(ValueError):
        FlowGate(0)


# -- through the capture process: a filling ring sheds, the counts reach the block ----------


def _ip(sport: int, flags: int, payload: bytes = b"") -> bytes:
    import struct

    tcp = struct.pack("!HHIIBBHHH", sport, 80, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(tcp),
            0,
            0,
            64,
            6,
            0,
            bytes([198, 19, 0, 1]),
            bytes([198, 18, 1, 2]),
        )
        + tcp
    )


def test_capture_sheds_new_sessions_of_a_filling_ring_and_counts_them():
    rings = [Ring.create(920, 256)]  # 15 of these packets fill 848 bytes: past 90 %
    block = CounterBlock.create(workers=1)
    control = ControlBlock(1)
    try:
        proc = CaptureProcess([], rings, 1500, counters=block, control=control, clock=lambda: 0.0)
        old = [_ip(1000, SYN), _ip(1000, PSH_ACK, b"GET /")]
        proc.dispatch([(0.0, p) for p in old])
        filler = [_ip(2000 + i, SYN) for i in range(13)]
        proc.dispatch([(0.0, p) for p in filler])
        assert len(rings[0]) == sum(record_bytes(len(p)) for p in old + filler) == 848
        later = [_ip(3000, SYN), _ip(3000, PSH_ACK, b"GET /"), _ip(1000, PSH_ACK, b"GET /2")]
        proc.dispatch([(0.0, p) for p in later])
        got = [data for data, _ts in rings[0].pop_batch(100)]
        assert got[-1] == later[-1] and later[0] not in got and later[1] not in got
        assert rings[0].dropped == 0
        # The memory flag sheds too, under its own reason (the ring is empty now).
        control.shed = True
        proc.dispatch([(0.0, _ip(4000, SYN)), (0.0, _ip(1000, PSH_ACK, b"GET /3"))])
        assert [d for d, _ in rings[0].pop_batch(100)] == [_ip(1000, PSH_ACK, b"GET /3")]
        proc.flush()
        totals = block.snapshot()["totals"]
        assert totals["shed_sessions_ring_full"] == 1
        assert totals["shed_sessions_memory"] == 1
        assert totals["drop_shed"] == 3
    finally:
        for r in rings:
            r.close()
        block.close()
        block.unlink()


def test_a_retransmitted_syn_of_a_shed_flow_is_not_counted_twice():
    gate = FlowGate(1)
    gate.update([0.9])
    assert feed(gate, [(key(6), SYN), (key(6), SYN), (key(6), SYN)]) == []
    assert gate.counters["shed_sessions_ring_full"] == 1
    assert gate.counters["drop_shed"] == 3


def test_array_decisions_equal_the_per_packet_loop_on_random_traffic():
    """The vectorized slow path decides exactly as the per-packet loop (the reference)."""
    import random

    rnd = random.Random(7)
    fast, ref = FlowGate(2), FlowGate(2)
    ref.vectorize = False
    now = 0.0
    for _ in range(300):
        now += 0.01
        fills = [rnd.choice([0.0, 0.3, 0.6, 0.95]) for _ in range(2)]
        memory = rnd.random() < 0.05
        assert fast.update(fills, memory) == ref.update(fills, memory)
        n = rnd.randint(1, 40)
        keys = np.array([key(rnd.randint(1, 30)) for _ in range(n)], dtype=np.uint64)
        flags = np.array(
            [rnd.choice([PSH_ACK, PSH_ACK, PSH_ACK, SYN, FIN, RST, ACK]) for _ in range(n)],
            dtype=np.uint8,
        )
        workers = (keys % np.uint64(2)).astype(np.uint64)
        a = fast.admit(keys, flags, workers, now)
        b = ref.admit(keys, flags, workers, now)
        assert (a is None and b is None) or (a is not None and b is not None), (a, b)
        if a is not None:
            assert a.tolist() == b.tolist()
        assert fast.known == ref.known and fast.shed == ref.shed
    assert fast.counters == ref.counters
    assert fast.counters["drop_shed"] > 0 and fast.counters["shed_sessions_ring_full"] > 0


def test_shed_flows_remembered_are_bounded_the_rest_counted(monkeypatch):
    """A SYN flood makes every SYN a shed flow: past SHED_FLOWS_MAX they are still counted
    and dropped, but no longer remembered (memory is what is short)."""
    from engine.core import shed

    monkeypatch.setattr(shed, "SHED_FLOWS_MAX", 100)
    gate = FlowGate(1)
    gate.update([0.0], memory=True)
    kept = feed(gate, [(key(1000 + i), SYN) for i in range(300)])
    assert kept == []
    assert len(gate.shed) == 100
    assert gate.counters["shed_sessions_memory"] == 300
    assert gate.counters["drop_shed"] == 300
