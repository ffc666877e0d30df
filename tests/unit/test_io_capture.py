"""engine/io/capture.py: the offline pacing schedule, the -x pre-filter, the BPF builder."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import pytest

from engine.codec import packet
from engine.io.capture import (
    PcapFileSource,
    ReplayPacer,
    TransferFilter,
)
from tests.paths import ONLINE_HTTP_PCAP

PCAP = ONLINE_HTTP_PCAP
ONLINE_IP = 0xC6120102  # 198.18.1.2, the online nginx in the reference capture
ONLINE_PORT = 80


def read_pcap_independently(path: Path) -> list[tuple[float, bytes]]:
    """(ts, frame) of every record, parsed here with struct (not via engine.codec.pcapfile)."""
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


def to_online_port(frame: bytes, *, pure_acks: bool = False) -> bool:
    """A client->online packet the replay needs (pure ACKs only when asked)."""
    ihl = (frame[14] & 0x0F) * 4
    (tot_len,) = struct.unpack_from("!H", frame, 14 + 2)
    dport, _seq, _ack, doff_byte, flags = struct.unpack_from("!2xHIIBB", frame, 14 + ihl)
    dst = int.from_bytes(frame[14 + 16 : 14 + 20], "big")
    if (dport, dst) != (ONLINE_PORT, ONLINE_IP):
        return False
    pure_ack = not flags & 0x07 and tot_len == ihl + (doff_byte >> 4) * 4
    return pure_acks or not pure_ack


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
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
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


def test_file_source_releases_packets_at_their_pcap_offsets_pure_acks_included():
    records = read_pcap_independently(PCAP)
    wanted = [(ts, f[14:]) for ts, f in records if to_online_port(f, pure_acks=True)]
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
    wanted = [f for _, f in read_pcap_independently(PCAP) if to_online_port(f, pure_acks=True)]
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
    frames = [f for _, f in read_pcap_independently(PCAP) if to_online_port(f, pure_acks=True)][:3]
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


def test_transfer_filter_keeps_only_matching_destinations_without_pure_acks():
    records = read_pcap_independently(PCAP)
    flt = online_filter()
    kept = [f for _, f in records if flt.keep(f[14:])]
    assert kept == [f for _, f in records if to_online_port(f)]
    to_online = [f for _, f in records if to_online_port(f, pure_acks=True)]
    c = flt.counters
    assert c["capture_packets"] == len(records)
    assert c["capture_accepted"] == len(kept)
    assert c["capture_pure_ack_dropped"] == c["drop_pure_ack"] == len(to_online) - len(kept) > 0
    assert c["capture_not_matched"] == len(records) - len(to_online)
    assert not flt.keep(b"\x45" + b"\x00" * 8 + b"\x11" + b"\x00" * 10)  # UDP
    assert flt.counters["capture_not_tcp"] == 1


def test_transfer_filter_can_keep_pure_acks():
    records = read_pcap_independently(PCAP)
    flt = TransferFilter(
        lambda ip, port: object() if (ip, port) == (ONLINE_IP, ONLINE_PORT) else None,
        drop_pure_acks=False,
    )
    kept = [f for _, f in records if flt.keep(f[14:])]
    assert kept == [f for _, f in records if to_online_port(f, pure_acks=True)]
