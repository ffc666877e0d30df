"""Broken pcap files judged by the reader and by the offline source (no network, fake clock)."""

from __future__ import annotations

import io

from engine.codec.pcapfile import PcapReader
from engine.io.capture import PcapFileSource, ReplayPacer
from tests.unit.test_pcapfile import make_pcap

ETH_IP = b"\x00" * 12 + b"\x08\x00"


def ip_frame(n: int) -> bytes:
    """An Ethernet frame carrying an IPv4/TCP header (the source drops what is not kept)."""
    ip = (
        bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0])
        + bytes([198, 19, 0, n])
        + bytes([198, 18, 1, 2])
    )
    tcp = (40000 + n).to_bytes(2, "big") + (80).to_bytes(2, "big") + bytes(16)
    return ETH_IP + ip + tcp


def test_a_cut_tail_says_where_and_how_much():
    data = make_pcap([(1.0, b"a" * 40, 40), (2.0, b"b" * 40, 40)])
    whole = 24 + 16 + 40
    for cut, present in ((len(data) - 1, 16 + 39), (whole + 10, 10)):
        reader = PcapReader(io.BytesIO(data[:cut]))
        assert len(list(reader)) == 1
        assert (reader.truncated_at, reader.truncated_bytes) == (whole, present)
        assert reader.offset == whole


def source_over(files: dict[str, bytes]) -> PcapFileSource:
    src = PcapFileSource(
        list(files), ReplayPacer(1000.0), opener=lambda p: PcapReader(io.BytesIO(files[p]), p)
    )
    src.counters["offline_bytes_total"] = 0
    return src


def drain(src: PcapFileSource) -> list:
    out, now = [], 0.0
    src.start(now)
    while not src.exhausted:
        now += 1.0
        out += src.read_batch(now)
    return out


def test_the_source_stops_at_a_corrupt_header_with_its_offset():
    good = make_pcap([(1.0, ip_frame(1), 54), (1.1, ip_frame(2), 54)])
    bad = good + b"\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x80\x3c\x00\x00\x00" + b"\0" * 60
    src = source_over({"bad.pcap": bad, "never.pcap": good})
    got = drain(src)
    assert len(got) == 2  # what came before it
    assert src.error is not None
    assert src.error.startswith("bad.pcap: corrupt record header at offset 164 ")
    assert src.counters["capture_file_error"] == 1
    assert src.counters["offline_records"] == 2  # the next file was never opened


def test_the_source_refuses_an_unknown_link_type_of_a_later_file():
    good = make_pcap([(1.0, ip_frame(1), 54)])
    dead = make_pcap([(1.0, ip_frame(2), 54)], linktype=0xDEAD)
    src = source_over({"good.pcap": good, "dead.pcap": dead})
    assert len(drain(src)) == 1
    assert src.error is not None and "dead.pcap: unsupported pcap link type 57005" in src.error


def test_the_source_warns_once_for_a_cut_tail_and_goes_on(caplog):
    good = make_pcap([(1.0, ip_frame(1), 54), (1.1, ip_frame(2), 54)])
    src = source_over({"cut.pcap": good[:-5], "next.pcap": good})
    assert len(drain(src)) == 3
    assert src.error is None
    assert src.counters["capture_file_cut"] == 1
    warned = [r.getMessage() for r in caplog.records if "cut inside" in r.getMessage()]
    assert (
        len(warned) == 1 and "cut.pcap: cut inside its last record at byte offset 94" in warned[0]
    )
