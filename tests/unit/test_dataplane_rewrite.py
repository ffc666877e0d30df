"""The compiled TupleAllocator against rewrite.TupleAllocator: the same random calls give the
same tuples, stats and counts, and the same tuple-history block, byte for byte."""

from __future__ import annotations

import random

import pytest

from engine.core import rewrite
from engine.core.rewrite import SynInfo
from engine.io.tuple_history import TupleHistory
from tests.unit.engines import compiled

pytestmark = pytest.mark.skipif(compiled is None, reason="engine.dataplane is not compiled")

POOL = tuple(0xC6130100 + i for i in range(1, 4))  # 198.19.1.1-3
OTHER = (0xC6120002, 0xC6120003)  # clients outside the pool
TARGETS = (0xC6120101, 0xC6120102)
TW_S = 10.0


def drive(seed: int, worker_count: int, pool: tuple[int, ...], strict: bool, history: bool):
    rng = random.Random(seed)
    worker_index = rng.randrange(worker_count)
    blocks = [TupleHistory.create(slots=1 << 10) if history else None for _ in range(2)]
    for h in blocks:
        if h is not None:
            h.adopt(0.0, TW_S)
    allocs = [
        mod.TupleAllocator(TW_S, worker_index, worker_count, h, pool=pool, strict=strict)
        for mod, h in zip((rewrite, compiled), blocks, strict=True)
    ]
    live: list[tuple[int, int, int, int]] = []
    now = 0.0
    seen = dict.fromkeys(allocs[0].stats, 0)
    try:
        for step in range(2000):
            op = rng.random()
            if op < 0.01 and history:
                for h in blocks:
                    h.adopt(now, TW_S)  # type: ignore[union-attr]
            if op < 0.5:
                cip = rng.choice(pool) if pool and rng.random() < 0.8 else rng.choice(OTHER)
                pref = rng.randrange(70000)
                tip = rng.choice(TARGETS)
                syn = (
                    SynInfo(rng.getrandbits(32), rng.random() < 0.5) if rng.random() < 0.8 else None
                )
                fallback = (0xC6120009,) if rng.random() < 0.1 else ()
                got = [a.allocate(cip, pref, tip, 80, now, fallback, syn) for a in allocs]
                assert got[0] == got[1], step
                if got[0] is not None:
                    live.append((*got[0], tip, 80))
            elif op < 0.8 and live:
                key = live.pop(rng.randrange(len(live)))
                end_seq = rng.getrandbits(32) if rng.random() < 0.7 else None
                ts_last = rewrite.ts_clock(now - rng.random()) if rng.random() < 0.5 else None
                for a in allocs:
                    a.release(*key, now, end_seq, ts_last)
            elif op < 0.85:  # a tuple never allocated (the target saw it anyway)
                port = rng.randrange(1024, 65536)
                cip = rng.choice(pool or OTHER)
                for a in allocs:
                    a.release(cip, port, TARGETS[0], 80, now)
            else:
                now += rng.random() * TW_S * 0.3
            py, c = allocs
            assert py.stats == c.stats, step
            assert py._state == c.tuples(), step
            assert (len(py), py.live_count, py.quarantined_count) == (
                len(c),
                c.live_count,
                c.quarantined_count,
            ), step
            port = rng.randrange(1024, 65536)
            assert py.is_free(POOL[0], port, TARGETS[0], 80, now) == c.is_free(
                POOL[0], port, TARGETS[0], 80, now
            )
        if history:
            assert bytes(blocks[0].block) == bytes(blocks[1].block)  # type: ignore[union-attr]
        seen = allocs[0].stats
    finally:
        allocs.clear()  # the compiled one holds the block until it goes
        py = c = a = None
        for h in blocks:
            if h is not None:
                h.close()
    return seen


def test_same_tuples_stats_and_history_block_as_the_specification():
    totals: dict[str, int] = {}
    runs = 0
    for seed in range(2):
        for worker_count in (1, 16128, 32256):  # 64512, 4 and 2 ports per address
            for pool in ((), POOL[:1], POOL):
                for strict in (False, True):
                    for history in (False, True):
                        stats = drive(seed, worker_count, pool, strict, history)
                        for k, v in stats.items():
                            totals[k] = totals.get(k, 0) + v
                        runs += 1
    assert runs == 72
    # Every path was taken somewhere: collisions, quarantine, spill, RFC 6191 reuse, the
    # history's busy tuples and exhaustion.
    assert all(totals[k] > 0 for k in totals), totals


@pytest.mark.parametrize("worker_count", [1, 3, 64512])
def test_preferred_and_owned_ports_agree(worker_count):
    for worker_index in {0, 1 % worker_count, worker_count - 1}:
        py = rewrite.TupleAllocator(60.0, worker_index, worker_count)
        c = compiled.TupleAllocator(60.0, worker_index, worker_count)
        assert py.ports_per_client == c.ports_per_client
        for port in (*range(0, 1100, 7), *range(64000, 66000, 13), 70000):
            assert py.preferred(port) == c.preferred(port), port
            assert py.owns_port(port) == c.owns_port(port), port
