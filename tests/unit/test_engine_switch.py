"""--engine and the batch calls around the session table (engine/io/engines.py, batch.py)."""

from __future__ import annotations

import sys
from collections import Counter

import pytest

from engine.app.arguments import UsageError, parse_config
from engine.codec import packet, wire
from engine.codec.packet import ACK, PSH, SYN, TcpPacket
from engine.core.config import SessionConfig
from engine.core.rewrite import TransferEntry
from engine.core.table import SessionTable
from engine.errors import ConfigError
from engine.io import engines
from engine.io.batch import PyBatchTable, SendBuffer, as_batch
from engine.io.ring import Ring, record_bytes
from engine.proc.worker import RingSource
from metrics.exporter import BuildInfoCollector, make_registry

ONLINE = (packet.ip_from_str("198.18.1.2"), 80)
TARGET = (packet.ip_from_str("198.18.2.3"), 8080)
CLIENT = packet.ip_from_str("198.18.1.10")
XFER = (TransferEntry(ONLINE[0], ONLINE[1], TARGET[0], TARGET[1]),)
BASE = ["-x", "80-198.18.2.3:8080", "-s", "198.18.2.4"]


@pytest.fixture
def not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, engines.COMPILED_MODULE, None)  # import raises


def syn(port: int, isn: int = 1000) -> bytes:
    return packet.build(TcpPacket(CLIENT, ONLINE[0], port, ONLINE[1], isn, 0, SYN, 64240, b""))


def test_python_is_python_and_needs_nothing_built(not_built: None) -> None:
    assert engines.resolve_engine("python") == ("python", "")
    assert isinstance(engines.build_table("python", SessionConfig()), PyBatchTable)


def test_auto_falls_back_to_python_saying_why(not_built: None) -> None:
    engine, why = engines.resolve_engine("auto")
    assert engine == "python" and "engine.dataplane.engine is not built" in why


def test_compiled_when_not_built_is_one_config_line_naming_the_flag(not_built: None) -> None:
    with pytest.raises(ConfigError, match=r"^--engine: the compiled engine is not available"):
        parse_config([*BASE, "--engine", "compiled"])
    assert parse_config([*BASE, "--engine", "python"]).engine == "python"
    assert parse_config(BASE).engine == "auto"
    with pytest.raises(UsageError, match="--engine: invalid choice"):
        parse_config([*BASE, "--engine", "fast"])


def test_auto_is_compiled_when_the_module_has_a_table(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = type(sys)("fake_engine")

    class Table:
        def __init__(self, cfg: object, tuple_history: object = None) -> None:
            self.cfg = cfg

    fake.Table = Table  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, engines.COMPILED_MODULE, fake)
    assert engines.resolve_engine("auto") == ("compiled", "")
    assert engines.resolve_engine("compiled") == ("compiled", "")
    table = engines.build_table("compiled", SessionConfig())
    assert isinstance(table, PyBatchTable) and isinstance(table.table, Table)


def test_build_info_series_names_the_engine() -> None:
    from prometheus_client import generate_latest

    text = generate_latest(make_registry(BuildInfoCollector(engine="python", version="9.9")))
    assert b'tcpcopy_build_info{engine="python",version="9.9"} 1.0' in text


def test_a_table_with_the_batch_calls_is_used_as_it_is() -> None:
    class Native:
        def receive_client_ips(self, *a: object) -> int:
            return 0

        receive_ring = receive_records = drain_into = receive_client_ips

    native = Native()
    assert as_batch(native) is native
    table = SessionTable(SessionConfig())
    wrapped = as_batch(table)
    assert wrapped.table is table
    wrapped.refuse_new = True  # attributes go through to the table
    assert table.refuse_new is True


def test_client_ips_count_what_does_not_parse_and_what_reaches_past_the_buffer() -> None:
    table = PyBatchTable(SessionTable(SessionConfig(transfers=XFER)))
    good = syn(40000)
    buf = good + b"\x45\x00" + good
    n = table.receive_client_ips(
        buf, [0, len(good), len(good) + 2, 10], [len(good), 2, len(good), len(buf)], 4, 1.0
    )
    assert n == 2  # the 2-byte packet, and the one reaching past the buffer
    assert table.counters["syn cnt"] == 2  # the same SYN twice: one session, one retransmit
    assert table.active == 1


def test_ring_batch_is_read_in_place_and_then_released() -> None:
    ring = Ring.create(1024, 256)
    consumer = Ring.attach(ring.spec())
    try:
        ring.push_batch([(syn(40000 + i), 1.0) for i in range(5)] + [(b"\x45" * 30, 1.0)])
        source = RingSource(consumer, batch_max=4)
        table = PyBatchTable(SessionTable(SessionConfig(transfers=XFER)))
        assert source.receive_into(table, 2.0) == 0
        assert table.active == 4
        assert len(consumer) == record_bytes(len(syn(40004))) + record_bytes(30)
        assert source.next_deadline() == 2.0  # a backlog: come back at once
        assert source.receive_into(table, 2.1) == 1  # the 30 junk bytes
        assert table.active == 5 and len(consumer) == 0
        source.close()
    finally:
        ring.close()


def test_records_are_decoded_in_place_and_bad_ones_counted_by_the_table() -> None:
    table = PyBatchTable(SessionTable(SessionConfig(transfers=XFER)))
    resp = TcpPacket(TARGET[0], CLIENT, TARGET[1], 40000, 1, 2, PSH | ACK, 100, b"", b"x" * 10)
    rec = wire.encode_response_record(packet.build(resp))
    bad = b"\x00" * len(rec)
    assert table.receive_records(rec + bad + rec + b"\x45", 1.0) == 3 * len(rec)
    assert table.counters["response_decode_errors"] == 1
    assert table.counters["drop_unknown_response"] == 2  # decoded, no such session


def test_drain_into_a_full_buffer_keeps_the_rest_for_the_next_call() -> None:
    table = PyBatchTable(SessionTable(SessionConfig(transfers=XFER)))
    for i in range(5):
        table.receive_client(packet.parse_ip(syn(40000 + i)), 1.0)
    reference = PyBatchTable(SessionTable(SessionConfig(transfers=XFER)))
    for i in range(5):
        reference.receive_client(packet.parse_ip(syn(40000 + i)), 1.0)
    ref_routes, ref_packets = reference.table.drain()
    buf = SendBuffer(max_packets=2)
    routes, got = [], []
    calls = 0
    while True:
        r, n = table.drain_into(buf)
        calls += 1
        routes += r
        got += buf.packets(n)
        if not n:
            break
    assert (routes, got) == (ref_routes, ref_packets)
    assert calls == 4  # 2 + 2 + 1, then the empty one
    with pytest.raises(ValueError):
        SendBuffer(nbytes=1000)


def test_the_channel_hands_each_read_to_one_call() -> None:
    """FrameDecoder.feed_records: frames of a stream, records back to back, any cut."""
    recs = [bytes([i]) * wire.RESPONSE_RECORD_BYTES for i in range(5)]
    stream = wire.encode_frame(recs[:2]) + wire.encode_frame(recs[2:])
    dec = wire.FrameDecoder()
    got = b""
    calls = Counter()
    for i in range(0, len(stream), 50):
        blob = dec.feed_records(stream[i : i + 50])
        calls["reads"] += 1
        got += blob
    assert got == b"".join(recs) and dec.frames == 2 and dec.pending_bytes == 0


def test_bad_records_are_counted_over_a_table_whose_counters_are_a_snapshot() -> None:
    class Snapshot:
        def __init__(self) -> None:
            self.inner = SessionTable(SessionConfig(transfers=XFER))

        @property
        def counters(self) -> Counter:
            return Counter(self.inner.counters)

        def receive_response(self, pkt: object, now: float) -> None:
            self.inner.receive_response(pkt, now)

    table = PyBatchTable(Snapshot())
    assert table.receive_records(b"\x00" * 128, 1.0) == 128
    assert table.counters["response_decode_errors"] == 2
    assert table.counters["response_decode_errors"] == 2  # not added twice


def test_the_worker_reads_the_pumps_statuses_by_their_values() -> None:
    """worker.py names the compiled pump's statuses without importing the compiled module
    (it must load where nothing is built): the values must be the pump's."""
    dataplane = pytest.importorskip("engine.dataplane.engine")
    from engine.proc import worker

    assert (worker.PUMP_ROUTES, worker.PUMP_SEND_ERROR) == (
        dataplane.PUMP_ROUTES,
        dataplane.PUMP_SEND_ERROR,
    )
    assert 0 not in (worker.PUMP_ROUTES, worker.PUMP_SEND_ERROR)  # 0 is PUMP_DONE
