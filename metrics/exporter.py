"""Prometheus exposition of the engine's and intercept-mp's counters (design §7).

Two custom collectors read the current values at scrape time (nothing is copied in between):

* ``TcpcopyCollector(snapshot_fn)``: the tcpcopy_* series from ``CounterBlock.snapshot()``
  (supervisor process: the HTTP thread reads the shared block);
* ``InterceptCollector(counters)``: the intercept_* series from intercept-mp's counter dict
  (``intercept.server.new_counters()``), or a function returning it.

Each lives in its own ``CollectorRegistry`` (``make_registry``): the default global registry,
with its process/platform collectors and import-time side effects, is never touched.  Every
labelled family yields all of its fixed label values (zero included), so Grafana sees a series
from the first scrape instead of "no data".  ``SERIES`` (per collector) is the single list of
what is exposed; ``describe()`` and the dashboard test read it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.codec.packet import ip_from_str
from engine.errors import ConfigError, DecodeError
from metrics.counters import (
    COUNTER,
    DROP_REASONS,
    GATE_RULES,
    GAUGE,
    HANDSHAKE_FAILURES,
    OUTCOMES,
    RECONNECT_REFUSALS,
    SEND_ERRNOS,
    SENT_KINDS,
    SHED_REASONS,
    sent_by_kind,
)

__all__ = [
    "BuildInfoCollector",
    "InterceptCollector",
    "Series",
    "TcpcopyCollector",
    "make_registry",
    "parse_metrics_addr",
    "start_exporter",
]

Snapshot = Mapping[str, Any]


class Series(NamedTuple):
    """One metric family: ``name`` without the ``_total`` suffix a counter gets on the wire."""

    name: str
    kind: str
    labels: tuple[str, ...]
    doc: str

    @property
    def sample_name(self) -> str:
        return self.name + "_total" if self.kind == COUNTER else self.name


def _family(s: Series) -> Metric:
    cls = CounterMetricFamily if s.kind == COUNTER else GaugeMetricFamily
    return cls(s.name, s.doc, labels=s.labels)


# -- tcpcopy-mp -----------------------------------------------------------------------------


def _per_worker(key: str) -> Callable[[Snapshot], Iterator[tuple[list[str], int]]]:
    def values(snap: Snapshot) -> Iterator[tuple[list[str], int]]:
        for i, row in enumerate(snap["workers"]):
            yield [str(i)], row[key]

    return values


def _total(key: str) -> Callable[[Snapshot], Iterator[tuple[list[str], int]]]:
    def values(snap: Snapshot) -> Iterator[tuple[list[str], int]]:
        yield [], snap["totals"][key]

    return values


def _labelled(prefix: str, label_values: tuple[str, ...]) -> Callable[[Snapshot], Any]:
    def values(snap: Snapshot) -> Iterator[tuple[list[str], int]]:
        totals = snap["totals"]
        for v in label_values:
            yield [v], totals[prefix + v]

    return values


def _sent(snap: Snapshot) -> Iterator[tuple[list[str], int]]:
    by_kind = sent_by_kind(snap["totals"])
    for kind in SENT_KINDS:
        yield [kind], by_kind[kind]


def _handshakes(snap: Snapshot) -> Iterator[tuple[list[str], int]]:
    totals = snap["totals"]
    for reason, key in HANDSHAKE_FAILURES.items():
        yield [reason], totals[key]


_W = ("worker",)
TCPCOPY_SERIES: tuple[tuple[Series, Callable[[Snapshot], Any]], ...] = (
    (
        Series(
            "tcpcopy_packets_captured",
            COUNTER,
            (),
            "Packets the capture saw (C 'total captured packets').",
        ),
        _total("capture_packets"),
    ),
    (
        Series(
            "tcpcopy_packets_sent",
            COUNTER,
            ("kind",),
            "Packets the sessions handed to the sender, by kind (the kinds partition them).",
        ),
        _sent,
    ),
    (
        Series(
            "tcpcopy_packets_dropped",
            COUNTER,
            ("reason",),
            "Captured or response packets not used, by reason.",
        ),
        _labelled("drop_", DROP_REASONS),
    ),
    (
        Series(
            "tcpcopy_ring_dropped",
            COUNTER,
            _W,
            "Packets the capture dropped because the worker's ring was full.",
        ),
        _per_worker("ring_dropped"),
    ),
    (
        Series(
            "tcpcopy_sessions_shed",
            COUNTER,
            ("reason",),
            "Whole sessions not admitted under overload, by reason "
            "(ring_full: the worker's ring past 90 %; memory: -m past 90 %; "
            "backlog: the worker's held captured data past --backlog-max-bytes).",
        ),
        _labelled("shed_sessions_", SHED_REASONS),
    ),
    (
        Series(
            "tcpcopy_unsend_packets",
            GAUGE,
            _W,
            "Captured client segments held back, not yet sent.",
        ),
        _per_worker("unsend"),
    ),
    (
        Series("tcpcopy_sessions_active", GAUGE, _W, "Sessions in the worker's table."),
        _per_worker("active"),
    ),
    (
        Series("tcpcopy_sessions", COUNTER, ("outcome",), "Sessions ended, by outcome."),
        _labelled("ended_", OUTCOMES),
    ),
    (
        Series(
            "tcpcopy_handshakes_failed",
            COUNTER,
            ("reason",),
            "Replayed handshakes that failed: refused (RST to our SYN) or timeout.",
        ),
        _handshakes,
    ),
    (
        Series(
            "tcpcopy_client_bytes_captured",
            COUNTER,
            (),
            "Client payload bytes captured for replay.",
        ),
        _total("client_bytes_captured"),
    ),
    (
        Series(
            "tcpcopy_client_bytes_acked",
            COUNTER,
            (),
            "Client payload bytes the target acknowledged (over captured: replay fidelity).",
        ),
        _total("client_bytes_acked"),
    ),
    (
        Series("tcpcopy_rss_bytes", GAUGE, (), "Resident memory of the process tree."),
        _total("rss_bytes"),
    ),
    (
        Series("tcpcopy_send_errors", COUNTER, ("errno",), "Raw sends that failed, by errno."),
        _labelled("send_error_", SEND_ERRNOS),
    ),
    (
        Series("tcpcopy_worker_restarts", COUNTER, (), "Workers restarted by the supervisor."),
        _total("worker_restarts"),
    ),
    (
        Series(
            "tcpcopy_sessions_lost",
            COUNTER,
            (),
            "Sessions that were active in a worker when it died.",
        ),
        _total("sessions_lost"),
    ),
    (
        Series(
            "tcpcopy_sessions_reannounced",
            COUNTER,
            (),
            "CLIENT_ADDs sent again for live sessions after an intercept connection was made "
            "again.",
        ),
        _total("sessions_reannounced"),
    ),
    (
        Series(
            "tcpcopy_capture_filter_excluded",
            COUNTER,
            (),
            "Captured packets that -F left out where it ran in user space (offline files, "
            "sockets without the kernel program); in the kernel it drops them uncounted.",
        ),
        _total("capture_filter_excluded"),
    ),
    (
        Series(
            "tcpcopy_send_split",
            COUNTER,
            (),
            "Packets the link-layer sender (-o) split to the device's MTU.",
        ),
        _total("send_split"),
    ),
    (
        Series(
            "tcpcopy_tuples_spilled",
            COUNTER,
            (),
            "Connections replayed from another -c address than their client's own fake "
            "address, which had no free port (the target sees that client as several "
            "addresses).",
        ),
        _total("tuples_spilled"),
    ),
    (
        Series(
            "tcpcopy_tuples_reused",
            COUNTER,
            (),
            "Connections replayed on a client port still in the target's TIME_WAIT, with a "
            "SYN its kernel accepts (RFC 6191).",
        ),
        _total("tuples_reused"),
    ),
    (
        Series(
            "tcpcopy_requests_released",
            COUNTER,
            ("rule",),
            "Held requests released by the request gate, by rule (bytes: the target answered "
            "as much as production; quiet: a shorter answer ended; max_wait; nowait: -W).",
        ),
        _labelled("gate_", GATE_RULES),
    ),
    (
        Series(
            "tcpcopy_reconnects_refused",
            COUNTER,
            ("reason",),
            "Reconnects not made, by reason (off: --no-reconnect; budget: "
            "--reconnect-budget spent; unanswered: the last reconnect was closed unanswered).",
        ),
        _labelled("reconnect_refused_", RECONNECT_REFUSALS),
    ),
    # Not in design §7: per-worker throughput (flow-hash balance) and intercept links.
    (
        Series(
            "tcpcopy_worker_client_packets",
            COUNTER,
            _W,
            "Client packets the worker's session table received (C 'all clt').",
        ),
        _per_worker("all clt"),
    ),
    (
        Series(
            "tcpcopy_worker_packets_sent",
            COUNTER,
            _W,
            "Packets the worker's raw socket sent.",
        ),
        _per_worker("send_packets"),
    ),
    (
        Series(
            "tcpcopy_channels_connected",
            GAUGE,
            _W,
            "The worker's connections to intercepts that are up.",
        ),
        _per_worker("channels_connected"),
    ),
)


BUILD_INFO = Series(
    "tcpcopy_build_info",
    GAUGE,
    ("engine", "version"),
    "Always 1: the session engine the workers run (compiled | python) and the version.",
)


class BuildInfoCollector(Collector):
    """``tcpcopy_build_info{engine=..., version=...} 1`` (fixed for the process's life)."""

    SERIES: tuple[Series, ...] = (BUILD_INFO,)

    def __init__(self, *, engine: str, version: str) -> None:
        self.labels = [engine, version]

    def describe(self) -> Iterator[Metric]:
        yield _family(BUILD_INFO)

    def collect(self) -> Iterator[Metric]:
        fam = _family(BUILD_INFO)
        fam.add_metric(self.labels, 1)
        yield fam


class TcpcopyCollector(Collector):
    """The tcpcopy_* series from ``snapshot_fn()`` (``CounterBlock.snapshot``'s shape)."""

    SERIES: tuple[Series, ...] = tuple(s for s, _ in TCPCOPY_SERIES)

    def __init__(self, snapshot_fn: Callable[[], Snapshot]) -> None:
        self.snapshot_fn = snapshot_fn

    def describe(self) -> Iterator[Metric]:
        for s in self.SERIES:
            yield _family(s)

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot_fn()
        for s, values in TCPCOPY_SERIES:
            fam = _family(s)
            for labels, value in values(snap):
                fam.add_metric(labels, value)
            yield fam


# -- intercept-mp ---------------------------------------------------------------------------

INTERCEPT_SERIES: tuple[tuple[Series, str], ...] = (
    (
        Series(
            "intercept_packets_captured",
            COUNTER,
            (),
            "Packets the capture source handed in (C 'all').",
        ),
        "packets_captured",
    ),
    (
        Series(
            "intercept_responses_forwarded",
            COUNTER,
            (),
            "Response records queued to a tcpcopy connection.",
        ),
        "responses_forwarded",
    ),
    (
        Series(
            "intercept_responses_unrouted",
            COUNTER,
            (),
            "Responses with no route (no CLIENT_ADD) that were dropped.",
        ),
        "responses_unrouted",
    ),
    (
        Series(
            "intercept_responses_delayed",
            COUNTER,
            (),
            "SYN/RST responses kept until their CLIENT_ADD arrived.",
        ),
        "responses_delayed",
    ),
    (
        Series(
            "intercept_responses_dropped_slow",
            COUNTER,
            (),
            "Responses dropped because a connection's output buffer was full.",
        ),
        "responses_dropped_slow",
    ),
    (
        Series(
            "intercept_frames_sent",
            COUNTER,
            (),
            "Frames written to tcpcopy connections (C 'sock write cnt').",
        ),
        "frames_sent",
    ),
    (
        Series(
            "intercept_queue_dropped",
            COUNTER,
            (),
            "Packets the kernel dropped from the NFQUEUE (queue and user drops).",
        ),
        "queue_dropped",
    ),
    (
        Series(
            "intercept_capture_dropped",
            COUNTER,
            (),
            "Packets the pcap reader dropped (backlog full).",
        ),
        "capture_dropped",
    ),
    (
        Series(
            "intercept_channels_connected",
            GAUGE,
            (),
            "tcpcopy connections currently up.",
        ),
        "channels_connected",
    ),
)


class InterceptCollector(Collector):
    """The intercept_* series from intercept-mp's counter dict (or a function returning it).

    The server mutates the dict in its own thread; a scrape copies it first (the GIL keeps
    each value whole), so one scrape is one moment.
    """

    SERIES: tuple[Series, ...] = tuple(s for s, _ in INTERCEPT_SERIES)

    def __init__(self, counters: Mapping[str, int] | Callable[[], Mapping[str, int]]) -> None:
        self.counters = counters

    def describe(self) -> Iterator[Metric]:
        for s in self.SERIES:
            yield _family(s)

    def collect(self) -> Iterator[Metric]:
        source = self.counters
        values = dict(source() if callable(source) else source)
        for s, key in INTERCEPT_SERIES:
            fam = _family(s)
            fam.add_metric([], values.get(key, 0))
            yield fam


# -- serving --------------------------------------------------------------------------------


def make_registry(*collectors: Collector) -> CollectorRegistry:
    """A private registry holding ``collectors`` (never the global default one)."""
    registry = CollectorRegistry(auto_describe=True)
    for c in collectors:
        registry.register(c)
    return registry


def parse_metrics_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces) -> (host, port)."""
    host, sep, port_text = addr.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # an unbracketed IPv6 address: the port is ambiguous
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError("--metrics", f"expected HOST:PORT (e.g. 127.0.0.1:9100), got {addr!r}")
    if host and all(ch.isdigit() or ch == "." for ch in host):
        # Looks like an IPv4 literal (a host name has letters): it must be a whole one, or
        # the bind fails only at start-up ("1.2.3" is not a host anybody meant).
        try:
            ip_from_str(host)
        except DecodeError:
            raise ConfigError(
                "--metrics", f"{host!r} is not an IPv4 address (in {addr!r})"
            ) from None
    return host or "0.0.0.0", int(port_text)


def start_exporter(addr: str, registry: CollectorRegistry) -> Any:
    """Serve ``registry`` on ``addr`` ("HOST:PORT") from a daemon thread; return the server.

    ``server.server_address`` is the bound address (port 0 picks one); ``server.shutdown()``
    then ``server.server_close()`` stop it.  A bind failure is a ConfigError naming --metrics.
    """
    host, port = parse_metrics_addr(addr)
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError("--metrics", f"cannot listen on {addr}: {exc.strerror or exc}") from exc
    return server
