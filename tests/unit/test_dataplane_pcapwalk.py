"""The compiled pcap record walk (engine/dataplane/capture.pyx ``PcapWalker``) against its
specification, PcapFileSource's Python path plus CaptureProcess.dispatch: the same files
(the shared captures, and written ones: every link type, both byte orders, nanosecond
stamps, snaplen cuts, refused link headers, aggregates larger than -M, idle gaps, stamps
going back, several files and -T passes, cut and corrupt files) replayed on the same clock
give the same rings, loss marks, drops, counters, gate state, schedule and errors."""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import dataplane
from engine.io.capture import PcapFileSource, ReplayPacer
from engine.io.ring import Ring
from engine.proc.capture import CaptureProcess
from testbed.blocks import ACK, FIN, PSH, RST, SYN, Control, make_filter, tcp_ip
from tests.paths import CONTROL_PCAP, ONLINE_HTTP_PCAP, TARGET_SIDE_PCAP

pytestmark = pytest.mark.skipif(not dataplane.AVAILABLE, reason=dataplane.UNAVAILABLE)

MAGIC_US, MAGIC_NS = 0xA1B2C3D4, 0xA1B23C4D


def pcap_bytes(
    records: list[tuple[int, int, bytes, int]],
    *,
    linktype: int = 1,
    big: bool = False,
    nano: bool = False,
) -> bytes:
    """A pcap file: ``records`` of (seconds, sub-second, frame, wire bytes beyond it)."""
    order = ">" if big else "<"
    out = [
        struct.pack(order + "IHHiIII", MAGIC_NS if nano else MAGIC_US, 2, 4, 0, 0, 65535, linktype)
    ]
    for sec, frac, frame, extra in records:
        out.append(struct.pack(order + "IIII", sec, frac, len(frame), len(frame) + extra))
        out.append(frame)
    return b"".join(out)


def eth(ip: bytes, etype: int = 0x0800) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", etype) + ip


def vlan(ip: bytes, inner: int = 0x0800) -> bytes:
    return b"\x02" * 12 + struct.pack("!HHH", 0x8100, 7, inner) + ip


def sll(ip: bytes, proto: int = 0x0800) -> bytes:
    return bytes(14) + struct.pack("!H", proto) + ip


def sll2(ip: bytes, proto: int = 0x0800) -> bytes:
    return struct.pack("!H", proto) + bytes(18) + ip


FRAMERS = {1: eth, 113: sll, 276: sll2, 101: lambda ip: ip, 228: lambda ip: ip}


class Replay:
    """A capture process over one PcapFileSource and its own rings, through the compiled
    walk or the Python path."""

    def __init__(
        self,
        compiled: bool,
        paths: list[str],
        *,
        accelerate: float,
        idle_s: float,
        replays: int,
        workers: int,
        ring_bytes: int,
        mtu: int,
    ) -> None:
        self.filter = make_filter(drop_pure_acks=False)
        self.rings = [Ring.create(ring_bytes) for _ in range(workers)]
        self.pacer = ReplayPacer(accelerate, idle_s)
        self.src = PcapFileSource(paths, self.pacer, replays, self.filter)
        self.control = Control()
        self.clock = 0.0
        self.proc = CaptureProcess(
            [self.src],
            self.rings,
            mtu,
            control=self.control,
            clock=lambda: self.clock,
            compiled=compiled,
        )
        assert (self.proc._walker(self.src) is not None) == compiled

    def run(self, steps: list[tuple[float, int]], start: float = 100.0) -> dict[str, Any]:
        """Start at ``start``; per step move the clock, read while a packet is due (as the
        capture loop does) and let every consumer take that many packets."""
        out: list[list[tuple[float, bytes]]] = [[] for _ in self.rings]
        deadlines = []
        now = self.clock = start
        self.src.start(now)
        for step, pops in steps:
            now = self.clock = now + step
            for _ in range(64):
                due = self.src.next_deadline()
                if due is None or due > now:
                    break
                self.proc._read(self.src, now)
                deadlines.append(self.src.next_deadline())
            for got, ring in zip(out, self.rings, strict=True):
                got.extend(ring.pop_packets(pops))
        for got, ring in zip(out, self.rings, strict=True):
            got.extend(ring.pop_packets(ring.capacity))
        return {
            "rings": out,
            "deadlines": deadlines,
            "loss_marks": [r.loss_marks for r in self.rings],
            "dropped": [r.dropped for r in self.rings],
            "oversize": [r.oversize for r in self.rings],
            "proc": +self.proc.counters,
            "source": +self.src.counters,
            "filter": +self.filter.counters,
            "known": dict(self.proc.gate.known),
            "shed": dict(self.proc.gate.shed),
            "pacer": self.pacer.state(),
            "exhausted": self.src.exhausted,
            "error": self.src.error,
        }

    def close(self) -> None:
        self.src.close()
        for r in self.rings:
            r.close()


def both(paths: list[str], steps: list[tuple[float, int]], **kw: Any) -> dict[str, Any]:
    runs: list[Replay] = []
    try:
        runs.append(Replay(False, paths, **kw))
        runs.append(Replay(True, paths, **kw))
        want, got = (r.run(steps) for r in runs)
    finally:
        for r in runs:
            r.close()
    for key in want:
        assert got[key] == want[key], key
    return want


STEPS = [(0.0, 0)] + [(0.05, 40)] * 400
BASE = {
    "accelerate": 1.0,
    "idle_s": 0.0,
    "replays": 1,
    "workers": 2,
    "ring_bytes": 1 << 20,
    "mtu": 1500,
}


def test_the_shared_captures_replay_the_same():
    paths = [str(ONLINE_HTTP_PCAP), str(TARGET_SIDE_PCAP), str(CONTROL_PCAP)]
    for workers in (1, 3):
        out = both(paths, STEPS, **{**BASE, "workers": workers, "accelerate": 16.0, "replays": 2})
        assert sum(len(r) for r in out["rings"]) > 300
        assert out["exhausted"] and out["error"] is None
        assert out["source"]["offline_passes"] == 2


def test_a_full_ring_pauses_the_file_and_both_delay_the_same(tmp_path: Path):
    """Small rings: the backpressure pauses the file (``delay``) mid-schedule."""
    paths = [str(ONLINE_HTTP_PCAP)] * 3
    out = both(
        paths, [(0.0, 0)] + [(0.01, 3)] * 3000, **{**BASE, "ring_bytes": 4096, "accelerate": 4.0}
    )
    assert out["proc"]["offline_paused"] > 0
    assert out["exhausted"]


def flow_ip(i: int, flags: int, payload: bytes = b"") -> bytes:
    return tcp_ip(f"198.19.0.{1 + i % 3}", 1000 + i % 4, flags, payload)


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("linktype", sorted(FRAMERS))
@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("nano", [False, True])
def test_every_link_type_and_byte_order(tmp_path: Path, linktype: int, big: bool, nano: bool):
    frame = FRAMERS[linktype]
    ticks = 10**9 if nano else 10**6
    records = []
    for i in range(60):
        flags = (SYN, ACK, PSH | ACK, FIN | ACK, RST)[i % 5]
        ip = flow_ip(i, flags, b"x" * (i % 3) * 50)
        records.append((1000 + i // 7, (i * 7919 * 131) % ticks, frame(ip), 0))
    path = write(tmp_path, "a.pcap", pcap_bytes(records, linktype=linktype, big=big, nano=nano))
    out = both([path], STEPS, **BASE)
    assert out["source"]["offline_packets"] == 60
    assert out["exhausted"] and out["error"] is None


def test_cut_refused_and_oversized_records(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    records = [
        (10, 0, eth(flow_ip(0, SYN)), 0),
        (10, 1, eth(flow_ip(1, SYN)), 20),  # cut by the snaplen
        (10, 2, eth(flow_ip(2, SYN), 0x86DD), 0),  # not IPv4
        (10, 3, vlan(flow_ip(3, SYN), 0x0806), 0),  # a VLAN, not IPv4
        (10, 4, b"\x01\x02", 0),  # shorter than its link header
        (10, 5, eth(flow_ip(0, PSH | ACK, b"G" * 3000)), 0),  # larger than -M: split
        (10, 6, eth(flow_ip(1, ACK)), 0),  # a pure ACK: kept offline
        (10, 7, eth(tcp_ip("198.19.0.1", 1000, SYN, dport=81)), 0),  # no -x entry
        (10, 8, eth(tcp_ip("198.19.0.1", 1000, SYN, frag=0x10)), 0),  # a later fragment
        (10, 9, eth(tcp_ip("198.19.0.1", 1000, SYN, proto=17)), 0),
        (10, 10, eth(flow_ip(2, FIN | ACK)) + b"\x00" * 6, 0),  # Ethernet padding stays
    ]
    path = write(tmp_path, "a.pcap", pcap_bytes(records))
    with caplog.at_level(logging.WARNING):
        out = both([path], STEPS, **{**BASE, "mtu": 1500})
    src = out["source"]
    assert src["capture_truncated"] == 1 and src["capture_l2_error"] == 3
    assert out["proc"]["capture_split"] == 1
    assert out["filter"]["capture_not_matched"] == 1


@pytest.mark.parametrize("cut", [1, 8, 15, 16, 17, 30, -1], ids=lambda c: f"cut{c}")
def test_a_file_cut_inside_its_last_record(tmp_path: Path, caplog, cut: int):
    records = [(10, i, eth(flow_ip(i, SYN if i < 3 else ACK)), 0) for i in range(8)]
    data = pcap_bytes(records)
    last = 16 + len(records[-1][2])
    data = data[: len(data) - last + (cut if cut >= 0 else last - 1)]
    path = write(tmp_path, "cut.pcap", data)
    with caplog.at_level(logging.WARNING):
        out = both([path], STEPS, **BASE)
    assert out["source"]["capture_file_cut"] == 1
    assert out["source"]["offline_packets"] == 7
    lines = [r.getMessage() for r in caplog.records if "cut inside" in r.getMessage()]
    assert len(lines) == 2 and lines[0] == lines[1]


@pytest.mark.parametrize("how", ["caplen", "frac"])
def test_a_corrupt_record_header_stops_both_with_the_same_line(tmp_path: Path, how: str):
    records = [(10, i, eth(flow_ip(i, SYN)), 0) for i in range(5)]
    data = bytearray(pcap_bytes(records))
    at = 24 + 3 * (16 + len(records[0][2]))
    if how == "caplen":
        struct.pack_into("<I", data, at + 8, 262_145)
    else:
        struct.pack_into("<I", data, at + 4, 1_000_000)
    path = write(tmp_path, "bad.pcap", bytes(data))
    out = both([path], STEPS, **BASE)
    assert out["error"].startswith(f"{path}: corrupt record header at offset {at} ")
    assert out["error"].endswith("; the replay stops there")
    assert out["source"]["offline_packets"] == 3


def test_a_bad_magic_or_link_type_is_refused_by_both(tmp_path: Path):
    good = write(tmp_path, "good.pcap", pcap_bytes([(10, 0, eth(flow_ip(0, SYN)), 0)]))
    bad = write(tmp_path, "bad.pcap", b"\x00" * 40)
    other = write(tmp_path, "ppp.pcap", pcap_bytes([(10, 0, b"\x00" * 44, 0)], linktype=9))
    for second in (bad, other):
        out = both([good, second], STEPS, **BASE)
        assert out["error"] and second in out["error"]
        assert out["source"]["offline_packets"] == 1


# -- random files ---------------------------------------------------------------------------

FLAGS = (SYN, SYN | ACK, ACK, PSH | ACK, FIN | ACK, RST, RST | ACK, FIN)


@st.composite
def record_strategy(draw: Any) -> tuple[int, bytes, int]:
    """(sub-second step in ms, frame, wire bytes beyond it)."""
    kind = draw(st.sampled_from(("tcp",) * 8 + ("udp", "short", "other", "big", "l2")))
    i = draw(st.integers(0, 11))
    flags = draw(st.sampled_from(FLAGS))
    payload = b"p" * draw(st.sampled_from((0, 0, 1, 100, 700)))
    if kind == "udp":
        ip = tcp_ip("198.19.0.1", 1000 + i, flags, payload, proto=17)
    elif kind == "short":
        ip = flow_ip(i, flags, payload)[: draw(st.integers(0, 40))]
    elif kind == "other":
        ip = tcp_ip("198.19.0.2", 1000 + i, flags, payload, dport=81)
    elif kind == "big":
        ip = flow_ip(i, flags | ACK, b"G" * draw(st.integers(1400, 3500)))
    else:
        ip = flow_ip(i, flags, payload)
    frame = eth(ip, 0x0806) if kind == "l2" else eth(ip)
    step = draw(st.sampled_from((0, 0, 1, 5, 50, 400, 1000, 1200, 3000, -20)))
    return step, frame, draw(st.sampled_from((0,) * 9 + (30,)))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    files=st.lists(st.lists(record_strategy(), max_size=40), min_size=1, max_size=3),
    tail=st.sampled_from(("", "", "cut", "corrupt")),
    accelerate=st.sampled_from((0.5, 1.0, 16.0, 1000.0)),
    idle_s=st.sampled_from((0.0, 0.0, 1.0)),
    replays=st.integers(1, 2),
    workers=st.integers(1, 3),
    ring_bytes=st.sampled_from((3072, 8192, 1 << 20)),
    mtu=st.sampled_from((576, 1500)),
    steps=st.lists(
        st.tuples(st.sampled_from((0.0, 0.001, 0.02, 0.3, 2.0)), st.integers(0, 50)),
        min_size=1,
        max_size=60,
    ),
    big=st.booleans(),
)
def test_random_files_replay_the_same(
    tmp_path_factory, files, tail, accelerate, idle_s, replays, workers, ring_bytes, mtu, steps, big
):
    tmp = tmp_path_factory.mktemp("pcaps")
    paths = []
    for n, recs in enumerate(files):
        ms = 5_000_000
        records = []
        for step, frame, extra in recs:
            ms = max(0, ms + step)
            records.append((ms // 1000, (ms % 1000) * 1000, frame, extra))
        data = bytearray(pcap_bytes(records, big=big))
        if tail == "cut" and records:
            data = data[: len(data) - 9]
        elif tail == "corrupt" and records:
            struct.pack_into(">I" if big else "<I", data, 24 + 8, 300_000)
        paths.append(write(tmp, f"f{n}.pcap", bytes(data)))
    both(
        paths,
        [(0.0, 0), *steps, (1000.0, 0), *([(1000.0, 100)] * 20)],
        accelerate=accelerate, idle_s=idle_s, replays=replays, workers=workers,
        ring_bytes=ring_bytes, mtu=mtu,
    )  # fmt: skip
