"""engine/capture.py: the offline pacing schedule, the -x pre-filter, the BPF builder."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from engine import packet
from engine.capture import (
    PcapFileSource,
    ReplayPacer,
    TransferFilter,
    tcp_dst_ports_program,
)
from tests.paths import ONLINE_HTTP_PCAP

PCAP = ONLINE_HTTP_PCAP
ONLINE_IP = 0xC6120102  # 198.18.1.2, the online nginx in the reference capture
ONLINE_PORT = 80


def read_pcap_independently(path: Path) -> list[tuple[float, bytes]]:
    """(ts, frame) of every record, parsed here with struct (not via engine.pcapfile)."""
    data = path.read_bytes()
    magic = struct.unpack_from("<I", data)[0]
    order = "<" if magic == 0xA1B2C3D4 else ">"
    assert struct.unpack_from(order + "I", data)[0] == 0xA1B2C3D4  # microsecond pcap
    off, out = 24, []
    while off + 16 <= len(data):
        sec, usec, caplen, _wire = struct.unpack_from(order + "IIII", data, off)
        out.append((sec + usec / 1e6, data[off + 16 : off + 16 + caplen]))
        off += 16 + caplen
    return out


def to_online_port(frame: bytes) -> bool:
    ihl = (frame[14] & 0x0F) * 4
    dport = struct.unpack_from("!H", frame, 14 + ihl + 2)[0]
    dst = int.from_bytes(frame[14 + 16 : 14 + 20], "big")
    return dport == ONLINE_PORT and dst == ONLINE_IP


def online_filter() -> TransferFilter:
    return TransferFilter(
        lambda ip, port: object() if (ip, port) == (ONLINE_IP, ONLINE_PORT) else None
    )


# -- ReplayPacer (pure) ------------------------------------------------------------------------


def test_pacer_follows_timestamps_scaled_by_accelerate():
    stamps = [50.0, 50.2, 50.5, 51.5]
    for accel in (1.0, 2.0, 0.5):
        pacer = ReplayPacer(accelerate=accel)
        pacer.restart(1000.0)
        got = [pacer.due(ts) for ts in stamps]
        assert got == pytest.approx([1000.0 + (ts - 50.0) / accel for ts in stamps])


def test_pacer_skips_each_idle_gap_exactly_once():
    # gaps: 0.1, 5.0 (idle), 0.1, 3.0 (idle), 0.2
    stamps = [10.0, 10.1, 15.1, 15.2, 18.2, 18.4]
    pacer = ReplayPacer(accelerate=1.0, idle_threshold_s=1.0)
    pacer.restart(0.0)
    got = [pacer.due(ts) for ts in stamps]
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    kept = [g for g in gaps if g <= 1.0]
    assert got[-1] == pytest.approx(sum(kept))  # both idle gaps gone, each only once
    assert pacer.idle_gaps == 2
    assert pacer.skipped_s == pytest.approx(8.0)
    assert got == sorted(got)


def test_pacer_never_goes_back_in_time():
    pacer = ReplayPacer()
    pacer.restart(0.0)
    got = [pacer.due(ts) for ts in (5.0, 6.0, 5.5, 7.0)]
    assert got == pytest.approx([0.0, 1.0, 1.0, 2.0])


def test_pacer_rejects_non_positive_speed():
    with pytest.raises(ValueError):
        ReplayPacer(accelerate=0)


# -- PcapFileSource on the reference capture, with a fake clock --------------------------------


def test_file_source_releases_packets_at_their_pcap_offsets():
    records = read_pcap_independently(PCAP)
    wanted = [(ts, f[14:]) for ts, f in records if to_online_port(f)]
    assert 50 < len(wanted) < len(records)  # the file holds both directions
    first = wanted[0][0]
    accel = 4.0
    src = PcapFileSource([str(PCAP)], ReplayPacer(accelerate=accel), 1, online_filter())
    start = 500.0
    got = src.read_batch(start)
    assert [ip for _, ip in got] == [ip for ts, ip in wanted if ts == first]
    span = (wanted[-1][0] - first) / accel
    for step in range(1, 11):
        now = start + span * step / 10
        got += src.read_batch(now)
        due = [ip for ts, ip in wanted if (ts - first) / accel <= span * step / 10 + 1e-9]
        assert [ip for _, ip in got] == due
        assert src.next_deadline() is None or src.next_deadline() > now
    assert src.exhausted
    assert src.counters["offline_packets"] == len(wanted)
    assert src.counters["offline_passes"] == 1


def test_replays_play_the_file_again_right_after_it_ends():
    wanted = [f for _, f in read_pcap_independently(PCAP) if to_online_port(f)]
    src = PcapFileSource([str(PCAP)], ReplayPacer(accelerate=1.0), 3, online_filter())
    out, now = [], 0.0
    while not src.exhausted and now < 10.0:
        out += src.read_batch(now)
        now += 0.001
    assert src.exhausted
    assert len(out) == 3 * len(wanted)
    assert src.counters["offline_passes"] == 3


class FakeReader:
    linktype = packet.DLT_EN10MB

    def __init__(self, records):
        self.records = records

    def __iter__(self):
        return iter(self.records)


def test_truncated_and_non_ip_records_are_dropped_and_counted():
    frames = [f for _, f in read_pcap_independently(PCAP) if to_online_port(f)][:3]
    records = [
        (1.0, len(frames[0]), frames[0]),
        (1.1, len(frames[1]) + 10, frames[1]),  # caplen < wire length
        (1.2, 60, b"\xff" * 12 + b"\x08\x06" + b"\x00" * 46),  # ARP
        (1.3, len(frames[2]), frames[2]),
    ]
    src = PcapFileSource(
        ["fake"], ReplayPacer(), 1, online_filter(), opener=lambda p: FakeReader(records)
    )
    got = src.read_batch(100.0)  # the pass starts now: only the first packet is due
    got += src.read_batch(100.5)
    assert [ip for _, ip in got] == [frames[0][14:], frames[2][14:]]
    assert src.exhausted
    assert src.counters["capture_truncated"] == 1
    assert src.counters["capture_l2_error"] == 1


# -- TransferFilter ----------------------------------------------------------------------------


def test_transfer_filter_keeps_only_matching_destinations():
    records = read_pcap_independently(PCAP)
    flt = online_filter()
    kept = [f for _, f in records if flt.keep(f[14:])]
    assert kept == [f for _, f in records if to_online_port(f)]
    c = flt.counters
    assert c["capture_packets"] == len(records)
    assert c["capture_accepted"] == len(kept)
    assert c["capture_not_matched"] == len(records) - len(kept)
    assert not flt.keep(b"\x45" + b"\x00" * 8 + b"\x11" + b"\x00" * 10)  # UDP
    assert flt.counters["capture_not_tcp"] == 1


# -- BPF ---------------------------------------------------------------------------------------


def run_bpf(prog, frame: bytes) -> int:
    """A tiny classic-BPF interpreter for the instructions the builder emits."""
    a = x = 0
    pc = 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == 0x28:
            a = struct.unpack_from("!H", frame, k)[0]
        elif code == 0x30:
            a = frame[k]
        elif code == 0xB1:
            x = (frame[k] & 0x0F) * 4
        elif code == 0x48:
            a = struct.unpack_from("!H", frame, x + k)[0]
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x45:
            pc += jt if a & k else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


def test_bpf_program_accepts_exactly_tcp_to_the_ports():
    records = read_pcap_independently(PCAP)
    prog = tcp_dst_ports_program([80, 8080], l2_bytes=14)
    for _, frame in records:
        ihl = (frame[14] & 0x0F) * 4
        dport = struct.unpack_from("!H", frame, 14 + ihl + 2)[0]
        assert (run_bpf(prog, frame) > 0) == (dport in (80, 8080))
    raw_prog = tcp_dst_ports_program([12474], l2_bytes=0)  # a client port seen in the file
    hits = [f for _, f in records if run_bpf(raw_prog, f[14:])]
    assert hits and all(struct.unpack_from("!H", f, 14 + 22)[0] == 12474 for f in hits)
    arp = b"\xff" * 12 + b"\x08\x06" + b"\x00" * 46
    assert run_bpf(prog, arp) == 0
