"""A worker process's row of the shared counter block (engine/proc/worker.py WorkerProcess,
metrics/counters.py): the compiled table counts straight into it, the Python table is flushed
into it, and both rows say the same for the same traffic."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from engine.core.config import ReplayConfig, SessionConfig
from engine.core.rewrite import TransferEntry
from engine.io.capture import PcapFileSource, ReplayPacer, TransferFilter
from engine.io.engines import build_table
from engine.proc.worker import WorkerProcess
from metrics.counters import ALIASES, ENGINE_KEYS, KEYS, CounterBlock
from tests.unit.engines import compiled
from tests.unit.test_io_worker import ONLINE, PCAP, FakeChannels, FakeSender

TARGET = (0xC6120203, 8080)


def _replay(engine: str) -> tuple[dict[str, int], Counter[str], list[set[str]]]:
    """The pcap replayed offline by a WorkerProcess on ``engine`` (no target answers: the
    SYNs are retransmitted, then the sessions are ended at the offline tail).  Returns the
    worker's row after the run, the table's counters, and the keys of each flush."""
    flt = TransferFilter(lambda ip, port: object() if (ip, port) == ONLINE else None)
    src = PcapFileSource([str(PCAP)], ReplayPacer(accelerate=1.0), 1, flt)
    session = SessionConfig(transfers=(TransferEntry(*ONLINE, *TARGET),))
    cfg = ReplayConfig(session=session, intercepts=(("198.18.2.4", 36524),), offline_tail_s=0.05)
    block = CounterBlock.create(workers=1)
    flushed: list[set[str]] = []
    from_counter = block.from_counter

    def recording(row: int, *counters: Any) -> None:
        flushed.append({str(k) for c in counters for k in c})
        from_counter(row, *counters)

    block.from_counter = recording  # type: ignore[method-assign]
    log: list[tuple[str, int]] = []
    table = build_table(engine, session)
    worker = WorkerProcess(
        0,
        cfg,
        table,
        src,  # type: ignore[arg-type]
        FakeSender(log),
        counters=block,
        channels=lambda sel, on_records: FakeChannels(log),
    )
    try:
        assert worker.run() == 0
        row = block.snapshot()["workers"][0]
    finally:
        worker.close()
        # The table let go of the row: the block closes (BufferError otherwise).
        block.close()
        block.unlink()
    return row, table.counters, flushed


def _engine_slots(row: dict[str, int]) -> dict[str, int]:
    return {ALIASES.get(k, k): row[ALIASES.get(k, k)] for k in ENGINE_KEYS}


@pytest.mark.skipif(compiled is None, reason="the compiled engine is not built")
def test_the_compiled_table_counts_in_the_row_and_says_what_the_python_one_says() -> None:
    row_c, counters_c, flushed_c = _replay("compiled")
    row_p, counters_p, flushed_p = _replay("python")
    # The replay did count: sessions started, SYNs went out, the tail ended them.
    assert row_c["syn cnt"] == 25 and row_c["send syn"] >= 25
    assert row_c["ended_offline_end"] + row_c["ended_handshake_timeout"] == 25
    # Same names and values, whichever engine: the row, and the table's own counters.
    assert row_c == row_p
    assert {k: v for k, v in counters_c.items() if v} == {
        str(k): v for k, v in counters_p.items() if v
    }
    assert _engine_slots(row_c) == {ALIASES.get(k, k): counters_c[k] for k in ENGINE_KEYS}
    # The Python table's counters are flushed into the row; the compiled one's never are.
    engine_keys = set(ENGINE_KEYS)
    assert flushed_c and flushed_p
    assert all(not keys & engine_keys for keys in flushed_c)
    assert any("syn cnt" in keys for keys in flushed_p)


def test_the_engine_slots_come_first_in_the_compiled_order() -> None:
    slots = [ALIASES.get(k, k) for k in ENGINE_KEYS]
    assert list(KEYS[1 : 1 + len(slots)]) == slots
    if compiled is not None:
        assert compiled.Table.counter_names == ENGINE_KEYS


def test_a_table_of_another_build_is_flushed_instead() -> None:
    with CounterBlock.create(workers=1) as block:
        assert block.counting_row(1, ENGINE_KEYS[:-1]) is None
        assert block.counting_row(1, (*ENGINE_KEYS[1:], ENGINE_KEYS[0])) is None
        view = block.counting_row(1, ENGINE_KEYS)
        assert view is not None and len(view) == len(KEYS) * 8
        view.release()
        with pytest.raises(IndexError):
            block.counting_row(3, ENGINE_KEYS)


@pytest.mark.skipif(compiled is None, reason="the compiled engine is not built")
def test_attaching_moves_the_counts_and_the_live_sessions_to_the_row_and_close_back() -> None:
    from array import array

    from engine.codec import packet
    from engine.codec.packet import SYN, TcpPacket

    assert compiled is not None
    session = SessionConfig(transfers=(TransferEntry(*ONLINE, *TARGET),))
    table = compiled.Table(session)

    def syn(port: int, now: float) -> None:
        p = TcpPacket(0xC6120A01, ONLINE[0], port, ONLINE[1], 1000, 0, SYN, 29200, b"")
        table.receive_client(packet.parse_ip(packet.build(p)), now)
        table.drain()

    syn(40000, 1.0)  # a session before the row: it counts in the row once attached
    names = table.counter_names
    first = 3
    row = array("q", [0] * (first + len(names) + 1))
    with pytest.raises(TypeError):
        table.attach_counters(bytes(len(row) * 8), first)
    with pytest.raises(ValueError, match="no slots"):
        table.attach_counters(array("q", [0] * (first + len(names) - 1)), first)
    table.attach_counters(row, first)

    def in_row() -> dict[str, int]:
        return {k: row[first + i] for i, k in enumerate(names) if row[first + i]}

    assert (
        in_row() == dict(table.counters) == {"syn cnt": 1, "all clt": 1, "send": 1, "send syn": 1}
    )
    seq = row[0]
    assert seq % 2 == 0
    table.handle_timer(2.5)  # the first session's SYN is retransmitted: counted in the row
    table.drain()
    syn(40001, 2.5)
    assert row[0] % 2 == 0 and row[0] > seq
    assert in_row() == dict(table.counters)
    assert in_row()["syn retransmit"] == 1 and in_row()["syn cnt"] == 2
    assert row[first - 1] == row[first + len(names)] == 0  # nothing written outside
    table.close()
    kept = dict(table.counters)
    assert kept == in_row()
    syn(40002, 3.0)  # counted in the table's own array now, not in the row
    assert table.counters["syn cnt"] == 3 and in_row()["syn cnt"] == 2
