"""metrics.exporter: the scraped text carries design §7's series with the written values."""

from __future__ import annotations

import socket
from collections import Counter

import pytest
from prometheus_client import REGISTRY, generate_latest, make_wsgi_app
from prometheus_client.parser import text_string_to_metric_families

from engine.errors import ConfigError
from intercept.server import new_counters
from metrics.counters import (
    DROP_REASONS,
    OUTCOMES,
    RING_DROPPED,
    RSS_BYTES,
    SEND_ERRNOS,
    SENT_KINDS,
    SESSIONS_LOST,
    WORKER_RESTARTS,
    CounterBlock,
)
from metrics.exporter import (
    InterceptCollector,
    TcpcopyCollector,
    make_registry,
    parse_metrics_addr,
    start_exporter,
)

# design §7 (plus the supervisor's three series the task adds)
DESIGN_TCPCOPY = {
    "tcpcopy_packets_captured_total": (),
    "tcpcopy_packets_sent_total": ("kind",),
    "tcpcopy_packets_dropped_total": ("reason",),
    "tcpcopy_ring_dropped_total": ("worker",),
    "tcpcopy_unsend_packets": ("worker",),
    "tcpcopy_sessions_active": ("worker",),
    "tcpcopy_sessions_total": ("outcome",),
    "tcpcopy_handshakes_failed_total": ("reason",),
    "tcpcopy_client_bytes_captured_total": (),
    "tcpcopy_client_bytes_acked_total": (),
    "tcpcopy_rss_bytes": (),
    "tcpcopy_send_errors_total": ("errno",),
    "tcpcopy_worker_restarts_total": (),
    "tcpcopy_sessions_lost_total": (),
}
DESIGN_INTERCEPT = {
    "intercept_packets_captured_total",
    "intercept_responses_forwarded_total",
    "intercept_responses_unrouted_total",
    "intercept_queue_dropped_total",
    "intercept_channels_connected",
    "intercept_responses_delayed_total",
    "intercept_frames_sent_total",
}

WORKERS = 3
SESSION = [
    Counter(
        {
            "send": 40,
            "send syn": 4,
            "send content": 20,
            "fin": 3,
            "reset": 1,
            "retransmit": 2,
            "window probe": 1,
            "drop_no_session": 5,
            "drop_pure_ack": 7,
            "unsend dropped": 2,
            "ended_closed": 3,
            "ended_refused": 1,
            "ended_handshake_timeout": 2,
            "client_bytes_captured": 9000,
            "client_bytes_acked": 8500,
            "all clt": 60,
        }
    ),
    Counter({"send": 10, "send syn": 2, "send content": 5, "drop_no_session": 1, "all clt": 9}),
    Counter(),
]
SENDER = [
    Counter({"send_packets": 45, "send_errors": 3, "send_error_ENOBUFS": 2, "send_error_EIO": 1}),
    Counter({"send_packets": 17}),
    Counter(),
]
GAUGES = [
    {"active": 4, "unsend": 12, "channels_connected": 2},
    {"active": 0, "unsend": 1, "channels_connected": 2},
    {"active": 9, "unsend": 0, "channels_connected": 0},
]


def _samples(registry) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items: value} from the scraped exposition text."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
def block():
    b = CounterBlock.create(workers=WORKERS)
    try:
        yield b
    finally:
        b.close()
        b.unlink()


@pytest.fixture
def written(block):
    block.from_counter(block.capture_row, Counter({"capture_packets": 1000, "capture_bytes": 1}))
    for i in range(WORKERS):
        row = block.worker_row(i)
        block.from_counter(row, SESSION[i], SENDER[i], GAUGES[i])
        block.writer(row).set(RING_DROPPED, 100 + i)
    sup = block.writer(block.supervisor_row)
    sup.set(RSS_BYTES, 123456789)
    sup.add(WORKER_RESTARTS, 2)
    sup.add(SESSIONS_LOST, 6)
    return block


def test_tcpcopy_series_names_and_labels_are_design_7(written):
    samples = _samples(make_registry(TcpcopyCollector(written.snapshot)))
    for name, labels in DESIGN_TCPCOPY.items():
        assert name in samples, name
        for label_items in samples[name]:
            assert tuple(k for k, _ in label_items) == labels, name
    assert set(samples) >= set(DESIGN_TCPCOPY)
    assert all(n.startswith("tcpcopy_") for n in samples)
    assert not any(n.endswith("_created") for n in samples)


def test_tcpcopy_values_are_the_written_ones(written):
    s = _samples(make_registry(TcpcopyCollector(written.snapshot)))
    total = sum(SESSION, Counter())
    assert s["tcpcopy_packets_captured_total"][()] == 1000
    dropped = {dict(k)["reason"]: v for k, v in s["tcpcopy_packets_dropped_total"].items()}
    assert set(dropped) == set(DROP_REASONS)
    assert dropped["no_session"] == total["drop_no_session"]
    assert dropped["pure_ack"] == total["drop_pure_ack"]
    assert dropped["unsent_at_end"] == total["unsend dropped"]
    assert (
        sum(dropped.values())
        == sum(v for k, v in total.items() if k.startswith("drop_")) + total["unsend dropped"]
    )

    sent = {dict(k)["kind"]: v for k, v in s["tcpcopy_packets_sent_total"].items()}
    assert set(sent) == set(SENT_KINDS)
    assert sent["data"] == total["send content"] and sent["syn"] == total["send syn"]
    assert sum(sent.values()) == total["send"] + total["retransmit"] + total["window probe"]

    sessions = {dict(k)["outcome"]: v for k, v in s["tcpcopy_sessions_total"].items()}
    assert set(sessions) == set(OUTCOMES)
    assert sessions["closed"] == total["ended_closed"]
    failed = {dict(k)["reason"]: v for k, v in s["tcpcopy_handshakes_failed_total"].items()}
    assert failed == {
        "refused": total["ended_refused"],
        "timeout": total["ended_handshake_timeout"],
    }

    for i in range(WORKERS):
        w = (("worker", str(i)),)
        assert s["tcpcopy_ring_dropped_total"][w] == 100 + i
        assert s["tcpcopy_unsend_packets"][w] == GAUGES[i]["unsend"]
        assert s["tcpcopy_sessions_active"][w] == GAUGES[i]["active"]
        assert s["tcpcopy_worker_client_packets_total"][w] == SESSION[i]["all clt"]
        assert s["tcpcopy_worker_packets_sent_total"][w] == SENDER[i]["send_packets"]
        assert s["tcpcopy_channels_connected"][w] == GAUGES[i]["channels_connected"]
    assert len(s["tcpcopy_unsend_packets"]) == WORKERS

    errors = {dict(k)["errno"]: v for k, v in s["tcpcopy_send_errors_total"].items()}
    assert set(errors) == set(SEND_ERRNOS)
    assert errors["ENOBUFS"] == 2 and errors["other"] == 1  # EIO is not a listed errno
    assert s["tcpcopy_client_bytes_captured_total"][()] == total["client_bytes_captured"]
    assert s["tcpcopy_client_bytes_acked_total"][()] == total["client_bytes_acked"]
    assert s["tcpcopy_rss_bytes"][()] == 123456789
    assert s["tcpcopy_worker_restarts_total"][()] == 2
    assert s["tcpcopy_sessions_lost_total"][()] == 6


def test_scrape_reads_current_values(written):
    registry = make_registry(TcpcopyCollector(written.snapshot))
    first = _samples(registry)["tcpcopy_packets_captured_total"][()]
    written.from_counter(written.capture_row, Counter({"capture_packets": 1500}))
    assert _samples(registry)["tcpcopy_packets_captured_total"][()] == first + 500


def test_intercept_series_follow_the_live_dict():
    counters = new_counters()
    registry = make_registry(InterceptCollector(counters))
    assert set(_samples(registry)) >= DESIGN_INTERCEPT
    mapping = {
        "intercept_packets_captured_total": "packets_captured",
        "intercept_responses_forwarded_total": "responses_forwarded",
        "intercept_responses_unrouted_total": "responses_unrouted",
        "intercept_queue_dropped_total": "queue_dropped",
        "intercept_channels_connected": "channels_connected",
        "intercept_responses_delayed_total": "responses_delayed",
        "intercept_frames_sent_total": "frames_sent",
    }
    for n, key in enumerate(mapping.values(), start=1):
        counters[key] += 10 * n
    s = _samples(registry)
    for name, key in mapping.items():
        assert s[name][()] == counters[key], name


def test_intercept_collector_accepts_a_function():
    counters = new_counters()
    counters["responses_unrouted"] = 3
    s = _samples(make_registry(InterceptCollector(lambda: counters)))
    assert s["intercept_responses_unrouted_total"][()] == 3


def test_both_collectors_share_a_registry_without_touching_the_default(written):
    registry = make_registry(TcpcopyCollector(written.snapshot), InterceptCollector(new_counters()))
    names = set(_samples(registry))
    assert names >= set(DESIGN_TCPCOPY) | DESIGN_INTERCEPT
    default = {s.name for fam in REGISTRY.collect() for s in fam.samples}
    assert not any(n.startswith(("tcpcopy_", "intercept_")) for n in default)


def test_describe_matches_collect(written):
    for collector in (TcpcopyCollector(written.snapshot), InterceptCollector(new_counters())):
        described = {m.name for m in collector.describe()}
        collected = {m.name for m in collector.collect()}
        assert described == collected


def test_wsgi_app_serves_the_registry(written):
    # What start_exporter serves, exercised in-process (no socket traffic).
    app = make_wsgi_app(make_registry(TcpcopyCollector(written.snapshot)))
    status: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""}
    body = b"".join(app(environ, lambda st, headers: status.append(st)))
    assert status == ["200 OK"]
    assert b'tcpcopy_unsend_packets{worker="0"} 12.0' in body


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        (":9100", ("0.0.0.0", 9100)),
        ("[::1]:9100", ("::1", 9100)),
        ("metrics.example:0", ("metrics.example", 0)),
    ],
)
def test_parse_metrics_addr(addr, expected):
    assert parse_metrics_addr(addr) == expected


@pytest.mark.parametrize("addr", ["9100", "host:", "host:http", "h:65536", "::1:9100", ""])
def test_parse_metrics_addr_refuses(addr):
    with pytest.raises(ConfigError) as err:
        parse_metrics_addr(addr)
    assert err.value.where == "--metrics"
    assert "\n" not in str(err.value) and str(err.value).startswith("--metrics: ")


def test_start_exporter_binds_and_stops():
    server = start_exporter("127.0.0.1:0", make_registry(InterceptCollector(new_counters())))
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1" and port > 0
    finally:
        server.shutdown()
        server.server_close()


def test_start_exporter_reports_a_taken_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="--metrics: cannot listen"):
            start_exporter(f"127.0.0.1:{port}", make_registry())
