"""engine/proc/worker.py: the loop shell with a fake table, channels and sender (no privileges)."""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from engine.codec import packet
from engine.core.config import ReplayConfig, SessionConfig
from engine.io.capture import PcapFileSource, ReplayPacer, TransferFilter
from engine.proc.worker import Worker, stats_lines
from tests.paths import ONLINE_HTTP_PCAP

PCAP = ONLINE_HTTP_PCAP
ONLINE = (0xC6120102, 80)


@dataclass
class Route:
    client_ip: int
    client_port: int
    target_ip: int
    target_port: int


class FakeTable:
    """Announces a route per SYN; echoes every client packet; a session per SYN that ends
    `linger` seconds after its last packet (via the timer)."""

    def __init__(self, linger: float = 0.05) -> None:
        self.linger = linger
        self.counters: Counter[str] = Counter()
        self.sessions: dict[tuple[int, int], float] = {}
        self.routes: list[Route] = []
        self.out: list[bytes] = []
        self.responses = []

    @property
    def active(self) -> int:
        return len(self.sessions)

    @property
    def sent(self) -> int:
        return self.counters["send"]

    unsend = 0

    def receive_client(self, pkt, now):
        self.counters["all clt"] += 1
        key = (pkt.src, pkt.sport)
        if pkt.flags & packet.SYN:
            self.counters["syn cnt"] += 1
            self.routes.append(Route(pkt.src, pkt.sport, 0xC6120203, 8080))
        self.sessions[key] = now + self.linger
        self.out.append(packet.build(pkt))

    def receive_response(self, pkt, now):
        self.responses.append(pkt)

    def get_timer(self):
        return min(self.sessions.values()) if self.sessions else None

    def handle_timer(self, now):
        for key, end in list(self.sessions.items()):
            if end <= now:
                del self.sessions[key]
                self.counters["rel"] += 1

    def drain(self):
        routes, out = self.routes, self.out
        self.routes, self.out = [], []
        return routes, out


class FakeChannels:
    def __init__(self, log):
        self.log = log
        self.counters: Counter[str] = Counter()
        self.connected = 2

    def start(self, now):
        pass

    def get_timer(self):
        return None

    def handle_timer(self, now):
        pass

    def announce(self, route, now):
        self.log.append(("route", route.client_port))
        self.counters["route_announced"] += 1
        return True

    def close(self):
        pass


class FakeSender:
    def __init__(self, log):
        self.log = log
        self.counters: Counter[str] = Counter()

    def send(self, pkt):
        self.log.append(("pkt", struct.unpack_from("!H", pkt, 20)[0]))
        self.counters["send_packets"] += 1
        return True


def count_records_and_syns(path: Path) -> tuple[int, int]:
    """Records in the pcap and pure SYNs among them, parsed here with struct."""
    data = path.read_bytes()
    off, records, syns = 24, 0, 0
    while off + 16 <= len(data):
        caplen = struct.unpack_from("<I", data, off + 8)[0]
        frame = data[off + 16 : off + 16 + caplen]
        ihl = (frame[14] & 0x0F) * 4
        records += 1
        syns += frame[14 + ihl + 13] == packet.SYN
        off += 16 + caplen
    return records, syns


def test_offline_run_feeds_table_orders_routes_first_and_exits_when_idle():
    flt = TransferFilter(lambda ip, port: object() if (ip, port) == ONLINE else None)
    src = PcapFileSource([str(PCAP)], ReplayPacer(accelerate=1.0), 1, flt)
    cfg = ReplayConfig(session=SessionConfig(), intercepts=(("198.18.2.4", 36524),))
    log: list[tuple[str, int]] = []
    table = FakeTable()
    worker = Worker(
        cfg,
        table,
        [src],
        FakeSender(log),
        prefilter_counters=flt.counters,
        channels=lambda sel, on_records: FakeChannels(log),
        memory_rss=lambda: 0,
    )
    try:
        assert worker.run() == 0
    finally:
        worker.close()
    assert worker.exit_reason == "offline replay is complete"
    assert src.exhausted and table.active == 0
    sent = [port for kind, port in log if kind == "pkt"]
    assert len(sent) == flt.counters["capture_accepted"] == src.counters["offline_packets"]
    # Every CLIENT_ADD precedes the first packet of its flow (spec §1.2).
    for i, (kind, port) in enumerate(log):
        if kind == "route":
            assert ("pkt", port) not in log[:i]
    records, syns = count_records_and_syns(PCAP)
    assert syns == 25  # README: ab -n 20, then ab -k -c 5
    assert table.counters["syn cnt"] == syns
    summary = worker.summary()
    assert summary["syn cnt"] == syns
    assert summary["route_announced"] == syns
    assert summary["send_packets"] == len(sent)
    assert summary["capture_packets"] == records
    lines = stats_lines(summary)
    assert f"active:0,rel:{syns},obs del:0,tw:0" in lines
    assert f"total captured packets:{records}" in lines


def test_reconnect_refusals_are_logged_rate_limited(caplog):
    """Each refused reconnect is counted by the sessions; the worker says so in one warning
    line per REFUSAL_LOG_INTERVAL_S with the count since the last line."""
    from engine.proc.worker import REFUSAL_LOG_INTERVAL_S

    cfg = ReplayConfig(session=SessionConfig(), intercepts=(("198.18.2.4", 36524),))
    table = FakeTable()
    worker = Worker(
        cfg,
        table,
        [],
        FakeSender([]),
        channels=lambda sel, on_records: FakeChannels([]),
        memory_rss=lambda: 0,
    )
    try:
        caplog.set_level("WARNING")
        worker._log_refusals(10.0)
        assert not caplog.records  # nothing refused yet
        table.counters["reconnect_refused_unanswered"] += 3
        worker._log_refusals(10.0)
        table.counters["reconnect_refused_off"] += 2
        worker._log_refusals(10.0 + REFUSAL_LOG_INTERVAL_S / 2)  # too soon: suppressed
        assert len(caplog.records) == 1
        assert "3 reconnect(s) refused" in caplog.records[0].getMessage()
        worker._log_refusals(10.0 + REFUSAL_LOG_INTERVAL_S)
        assert len(caplog.records) == 2
        msg = caplog.records[1].getMessage()
        assert "2 reconnect(s) refused" in msg and "off 2" in msg and "unanswered 3" in msg
    finally:
        worker.close()
