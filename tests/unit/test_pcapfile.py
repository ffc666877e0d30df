"""pcap reader: real captures, both byte orders, nanoseconds, pcapng refusal, damage."""

import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.codec.pcapfile import PcapReader, open_pcap
from engine.errors import DecodeError
from tests.paths import SHARED_DATA

DATA = str(SHARED_DATA)


def make_pcap(records, order="<", nano=False, linktype=1):
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    ticks = 1_000_000_000 if nano else 1_000_000
    for ts, frame, wire_len in records:
        sec = int(ts)
        frac = round((ts - sec) * ticks)
        out += struct.pack(order + "IIII", sec, frac, len(frame), wire_len) + frame
    return out


@pytest.mark.parametrize("name", ["online-http", "target-side", "control-36524"])
def test_real_captures_read_whole(name):
    with open_pcap(f"{DATA}/{name}.pcap") as reader:
        recs = list(reader)
    assert reader.linktype == 1
    assert reader.records == len(recs) > 100
    assert reader.truncated_tail == 0
    stamps = [ts for ts, _, _ in recs]
    assert stamps == sorted(stamps)
    assert all(wire >= len(frame) >= 14 for _, wire, frame in recs)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("nano", [False, True])
def test_byte_orders_and_resolution(order, nano):
    recs = [(1000.25, b"\x01" * 60, 60), (1000.5, b"\x02" * 30, 90)]
    reader = PcapReader(io.BytesIO(make_pcap(recs, order, nano, linktype=113)))
    got = list(reader)
    assert reader.linktype == 113
    assert reader.nanosecond is nano
    assert [(round(t, 6), w, f) for t, w, f in got] == [
        (1000.25, 60, b"\x01" * 60),
        (1000.5, 90, b"\x02" * 30),
    ]


def test_pcapng_refused_with_hint():
    with pytest.raises(DecodeError, match="pcapng is not supported; convert"):
        PcapReader(io.BytesIO(struct.pack("<I", 0x0A0D0D0A) + b"\0" * 40), "x.pcapng")


def test_wrong_magic_names_offset():
    with pytest.raises(DecodeError, match=r"not a pcap file \(magic 0x"):
        PcapReader(io.BytesIO(b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 10))


def test_empty_and_short_header():
    with pytest.raises(DecodeError, match="empty"):
        PcapReader(io.BytesIO(b""))
    with pytest.raises(DecodeError, match="cut short"):
        PcapReader(io.BytesIO(make_pcap([])[:10]))


def test_truncated_tail_ends_iteration_and_counts():
    data = make_pcap([(1.0, b"a" * 40, 40), (2.0, b"b" * 40, 40)])
    for cut in (len(data) - 1, len(data) - 41, len(data) - 50):
        reader = PcapReader(io.BytesIO(data[:cut]))
        got = list(reader)
        assert len(got) == 1
        assert reader.truncated_tail == 1


def test_corrupt_record_header_names_offset():
    data = bytearray(make_pcap([(1.0, b"a" * 40, 40)]))
    struct.pack_into("<I", data, 24 + 8, 10_000_000)  # caplen far too large
    with pytest.raises(DecodeError, match="offset 24"):
        list(PcapReader(io.BytesIO(bytes(data))))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_read_or_decode_error(blob):
    try:
        reader = PcapReader(io.BytesIO(blob))
        for _ in reader:
            pass
    except DecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_body_after_valid_header(body):
    try:
        for _ in PcapReader(io.BytesIO(make_pcap([]) + body)):
            pass
    except DecodeError:
        pass
