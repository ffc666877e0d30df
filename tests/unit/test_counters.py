"""metrics.counters: the shared counter block (fixed schema, forked writers, seqlock, retire)."""

from __future__ import annotations

import ast
import multiprocessing
import time
from collections import Counter
from pathlib import Path

import pytest

from engine.core.session import DropReason, Outcome
from metrics import counters as mc
from metrics.counters import (
    ACTIVE,
    KEYS,
    RING_DROPPED,
    RSS_BYTES,
    SLOT_INDEX,
    SLOTS,
    UNSEND,
    WORKER_RESTARTS,
    CounterBlock,
    sent_by_kind,
)

FORK = multiprocessing.get_context("fork")
ENGINE = Path(__file__).resolve().parents[2] / "engine"

# What each forked worker writes (derived expectations below are computed from these).
WORKER_COUNTS = [
    Counter({"conns": 3, "send": 20, "send syn": 3, "send content": 9, "drop_no_session": 2}),
    Counter({"conns": 5, "send": 31, "send syn": 5, "fin": 4, "ended_closed": 4}),
]
WORKER_GAUGES = [{"active": 7, "unsend": 11}, {"active": 1, "unsend": 0}]
FLUSH_ROUNDS = 5000


@pytest.fixture
def block():
    b = CounterBlock.create(workers=2)
    try:
        yield b
    finally:
        b.close()
        b.unlink()


def _child_write(name: str, worker: int) -> None:
    b = CounterBlock.attach(name)
    row = b.worker_row(worker)
    b.from_counter(row, WORKER_COUNTS[worker], WORKER_GAUGES[worker])
    b.writer(row).add(SLOT_INDEX["reconnect"], worker + 1)
    b.close()


def _child_capture(name: str) -> None:
    b = CounterBlock.attach(name)
    b.from_counter(b.capture_row, Counter({"capture_packets": 100, "capture_bytes": 6400}))
    for i in range(b.workers):
        b.writer(b.worker_row(i)).set(RING_DROPPED, 10 * (i + 1))
    b.close()


def _run(target, *args) -> None:
    p = FORK.Process(target=target, args=args)
    p.start()
    p.join(timeout=30)
    assert p.exitcode == 0


# -- schema --------------------------------------------------------------------------------


def test_schema_is_fixed_and_labelled_families_are_bounded():
    assert KEYS[0] == "_seq" and len(set(KEYS)) == len(KEYS) == len(SLOTS)
    assert {r.value for r in DropReason} <= set(mc.DROP_REASONS)
    assert {o.value for o in Outcome} <= set(mc.OUTCOMES)
    for prefix, values in (
        ("drop_", mc.DROP_REASONS),
        ("ended_", mc.OUTCOMES),
        ("send_error_", mc.SEND_ERRNOS),
    ):
        assert "other" in values
        assert all(prefix + v in SLOT_INDEX for v in values)
    assert set(mc.HANDSHAKE_FAILURES.values()) <= set(SLOT_INDEX)
    assert set(sent_by_kind(dict.fromkeys(KEYS, 0))) == set(mc.SENT_KINDS)
    for alias, key in mc.ALIASES.items():
        assert alias not in SLOT_INDEX and key in SLOT_INDEX
    for _prefix, catch_all in mc.PREFIXES:
        assert catch_all in SLOT_INDEX


def test_shape_and_attach_by_name(block):
    assert block.rows == 4 and block.supervisor_row == 3
    assert [block.worker_row(i) for i in range(2)] == [1, 2]
    with pytest.raises(IndexError):
        block.worker_row(2)
    other = CounterBlock.attach(block.name)
    try:
        assert other.workers == 2
        other.writer(other.supervisor_row).set(RSS_BYTES, 12345)
        assert block.snapshot()["supervisor"]["rss_bytes"] == 12345
        other.unlink()  # not the creator: a no-op
    finally:
        other.close()
    CounterBlock.attach(block.name).close()  # still there


def test_attach_refuses_a_foreign_block(tmp_path):
    for size in (4096, 0):
        foreign = tmp_path / f"block-{size}"
        foreign.write_bytes(bytes(size))
        with pytest.raises(ValueError, match="not a tcpcopy-mp counter block"):
            CounterBlock.attach(str(foreign))


def test_creator_unlink_removes_the_name():
    b = CounterBlock.create(workers=1)
    name = b.name
    b.close()
    b.unlink()
    with pytest.raises(FileNotFoundError):
        CounterBlock.attach(name)


# -- forked writers -------------------------------------------------------------------------


def test_forked_writers_are_summed_by_the_reader(block):
    _run(_child_capture, block.name)
    for i in range(2):
        _run(_child_write, block.name, i)

    snap = block.snapshot()
    totals = snap["totals"]
    expected = sum(WORKER_COUNTS, Counter())
    for key, value in expected.items():
        assert totals[key] == value, key
    assert totals["reconnect"] == 1 + 2
    assert totals["capture_packets"] == snap["capture"]["capture_packets"] == 100
    for i, row in enumerate(snap["workers"]):
        assert row["active"] == WORKER_GAUGES[i]["active"]
        assert row["unsend"] == WORKER_GAUGES[i]["unsend"]
        assert row["ring_dropped"] == 10 * (i + 1)
        assert row["conns"] == WORKER_COUNTS[i]["conns"]
    assert totals["active"] == sum(g["active"] for g in WORKER_GAUGES)
    assert totals["ring_dropped"] == 10 + 20
    # the children exited: the block outlived them (nobody but the creator unlinks)
    CounterBlock.attach(block.name).close()


def _child_flush_loop(name: str, rounds: int) -> None:
    b = CounterBlock.attach(name)
    w = b.writer(b.worker_row(0))
    keys = [s.key for s in SLOTS if s.kind == "counter"]
    c = Counter()
    for n in range(1, rounds + 1):
        for k in keys:
            c[k] = n
        w.flush(c)
    b.close()


def test_snapshot_never_sees_a_half_written_flush(block):
    # Every flush writes the same value n into every counter slot; a torn read would show
    # two different values in one row, or a total going backwards.
    counter_keys = [s.key for s in SLOTS if s.kind == "counter"]
    p = FORK.Process(target=_child_flush_loop, args=(block.name, FLUSH_ROUNDS))
    p.start()
    seen = 0
    distinct = set()
    try:
        while p.is_alive() or seen == 0:
            row = block.snapshot()["workers"][0]
            values = {row[k] for k in counter_keys}
            assert len(values) == 1, f"torn row: {sorted(values)[:5]}"
            (v,) = values
            assert v >= seen
            seen = v
            distinct.add(v)
            if seen == FLUSH_ROUNDS:
                break
    finally:
        p.join(timeout=30)
    assert p.exitcode == 0
    assert block.snapshot()["workers"][0]["conns"] == FLUSH_ROUNDS
    assert len(distinct) > 1  # the reader really ran while the writer was flushing


def test_a_row_left_busy_keeps_its_last_consistent_values(block):
    w = block.writer(block.worker_row(1))
    conns = SLOT_INDEX["conns"]
    w.flush({"conns": 4})
    assert block.snapshot()["totals"]["conns"] == 4
    w.set(0, 7)  # odd seqlock: as if the writer died in the middle of a flush ...
    w.set(conns, 99)  # ... having written part of it
    started = time.monotonic()
    assert block.snapshot()["workers"][1]["conns"] == 4  # stale but whole
    assert time.monotonic() - started < 1.0  # the wait is bounded
    w.flush({"conns": 5})  # the next flush of the row recovers the seqlock
    assert block.read()[block.worker_row(1)][0] % 2 == 0
    assert block.snapshot()["workers"][1]["conns"] == 5


# -- flush semantics ------------------------------------------------------------------------


def test_flush_sets_cumulative_values_and_routes_unknown_keys(block):
    row = block.worker_row(0)
    w = block.writer(row)
    c = Counter({"conns": 1, "drop_no_session": 2, "drop_brand_new_reason": 3, "unsend dropped": 4})
    sender = Counter({"send_packets": 8, "send_error_ENOBUFS": 1, "send_error_EWEIRD": 2})
    w.flush(c, sender, {"tw": 3})
    c["conns"] += 10
    c["not a key"] += 1
    c["ended_outcome_from_the_future"] += 5
    w.flush(c, sender, {"tw": 2})
    r = block.snapshot()["workers"][0]
    assert r["conns"] == 11  # set, not added
    assert r["drop_no_session"] == 2
    assert r["drop_other"] == 3
    assert r["drop_unsent_at_end"] == 4
    assert r["send_error_ENOBUFS"] == 1 and r["send_error_other"] == 2
    assert r["ended_other"] == 5
    assert r["tw"] == 2
    assert r["unmapped_keys"] == 1 and w.unmapped == {"not a key"}


def test_writer_add_set_get(block):
    w = block.writer(block.supervisor_row)
    assert block.writer(block.supervisor_row) is w
    w.add(WORKER_RESTARTS)
    w.add(WORKER_RESTARTS, 2)
    w.set(RSS_BYTES, 1 << 40)
    assert w.get(WORKER_RESTARTS) == 3
    snap = block.snapshot()
    assert snap["supervisor"]["worker_restarts"] == 3
    assert snap["totals"]["rss_bytes"] == 1 << 40


def test_sent_by_kind_partitions_what_the_sessions_sent():
    v = dict.fromkeys(KEYS, 0)
    v.update({"send": 50, "send syn": 5, "send content": 20, "fin": 4, "reset": 1})
    v.update({"retransmit": 3, "window probe": 2})
    kinds = sent_by_kind(v)
    assert kinds["ack"] == 50 - 5 - 20 - 4 - 1
    assert sum(kinds.values()) == v["send"] + v["retransmit"] + v["window probe"]


# -- retire ---------------------------------------------------------------------------------


def test_retire_keeps_totals_monotonic_and_counts_lost_sessions(block):
    row = block.worker_row(1)
    block.from_counter(row, Counter({"conns": 6, "send": 9}), {"active": 4, "unsend": 2})
    block.writer(row).set(RING_DROPPED, 5)
    before = block.snapshot()["totals"]

    old = block.retire(row)

    assert old["active"] == 4 and old["conns"] == 6
    snap = block.snapshot()
    after, sup, dead = snap["totals"], snap["supervisor"], snap["workers"][1]
    assert after["conns"] == before["conns"] and after["send"] == before["send"]
    assert dead["conns"] == 0 and dead["active"] == 0 and dead["unsend"] == 0
    assert dead["ring_dropped"] == 5  # the capture owns it: kept
    assert sup["sessions_lost"] == 4 and sup["conns"] == 6
    # the replacement worker starts from zero; totals go on from where they were
    block.from_counter(row, Counter({"conns": 1}))
    assert block.snapshot()["totals"]["conns"] == before["conns"] + 1
    with pytest.raises(IndexError):
        block.retire(block.supervisor_row)


def test_read_is_a_copy(block):
    a = block.read()
    a[1][ACTIVE] = 99
    assert block.snapshot()["workers"][0]["active"] == 0
    assert len(a) == block.rows and all(len(row) == len(SLOTS) for row in a)
    assert all(type(v) is int for row in a for v in row)
    assert UNSEND != ACTIVE


# -- the schema covers what the engine counts ----------------------------------------------


def _counter_keys_in(source: str) -> tuple[set[str], set[str]]:
    """String keys and f-string prefixes used to index something named c / counters."""
    keys: set[str] = set()
    prefixes: set[str] = set()

    def named_counter(node: ast.expr) -> bool:
        name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
        return name in {"c", "counters", "prefilter_counters"}

    def collect(node: ast.expr) -> None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            keys.add(node.value)
        elif isinstance(node, ast.IfExp):
            collect(node.body)
            collect(node.orelse)
        elif isinstance(node, ast.JoinedStr) and isinstance(node.values[0], ast.Constant):
            prefixes.add(node.values[0].value)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and named_counter(node.value):
            collect(node.slice)
    return keys, prefixes


@pytest.mark.parametrize(
    "module",
    [
        "core/session.py",
        "core/table.py",
        "io/capture.py",
        "io/send.py",
        "io/channel.py",
        "proc/worker.py",
    ],
)
def test_every_counter_key_the_engine_uses_has_a_slot(module, block):
    keys, prefixes = _counter_keys_in((ENGINE / module).read_text())
    w = block.writer(block.worker_row(0))
    w.flush(dict.fromkeys(keys, 1))
    assert w.unmapped == set()
    catch_alls = {p for p, _ in mc.PREFIXES}
    assert prefixes <= catch_alls


def test_totals_feed_the_classic_stats_lines(block):
    from engine.proc.worker import stats_lines

    block.from_counter(block.worker_row(0), Counter({"conns": 2, "resp": 5}), {"active": 1})
    block.from_counter(block.worker_row(1), Counter({"conns": 3, "resp": 1}), {"active": 2})
    lines = stats_lines(block.snapshot()["totals"])
    assert lines[0].startswith("active:3,")
    assert lines[1].startswith("conns:5,resp:6,")
