"""engine/codec/wire.py: the compat intercept protocol, checked against C TCPCopy 1.0's bytes."""

from __future__ import annotations

import ipaddress
import itertools
import random
import struct
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.codec import wire
from engine.codec.wire import (
    CLIENT_RECORD,
    COMB_MAX,
    COMB_MAX_PAYLOAD,
    HANDSHAKE,
    INTERNAL_VERSION,
    PAYLOAD_RECORD_BYTES,
    RESPONSE_RECORD_BYTES,
    TYPE_CLIENT_ADD,
    TYPE_CLIENT_DEL,
    ClientRecord,
    ClientStreamDecoder,
    FrameDecoder,
    ResponseStreamDecoder,
    client_add,
    client_del,
    decode_response_record,
    encode_client_record,
    encode_frame,
    encode_response_record,
)
from engine.errors import DecodeError
from tests import paths

CONTROL_PCAP = paths.CONTROL_PCAP
INTERCEPT_PORT = 36524


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


# --- a tiny pcap reader + TCP reassembler for the golden capture ------------------------------

_PCAP_GLOBAL = struct.Struct("<IHHiIII")
_PCAP_RECORD = struct.Struct("<IIII")


def read_pcap(path: Path) -> list[tuple[float, bytes]]:
    """(timestamp, frame) of every record of a little-endian microsecond pcap file."""
    data = path.read_bytes()
    magic, _maj, _min, _tz, _sig, _snap, linktype = _PCAP_GLOBAL.unpack_from(data, 0)
    assert magic == 0xA1B2C3D4 and linktype == 1  # Ethernet, as README.md says
    out = []
    off = _PCAP_GLOBAL.size
    while off < len(data):
        sec, usec, incl, _orig = _PCAP_RECORD.unpack_from(data, off)
        off += _PCAP_RECORD.size
        out.append((sec + usec / 1e6, data[off : off + incl]))
        off += incl
    assert off == len(data)
    return out


def control_streams() -> dict[int, dict[str, list[tuple[float, bytes]]]]:
    """Per tcpcopy connection (keyed by its source port): the reassembled payload of each
    direction, "c2i" (tcpcopy -> intercept) and "i2c", as (capture time, chunk) in stream
    order, retransmitted bytes removed."""
    segs: dict[tuple[int, str], list[tuple[float, int, int, bytes]]] = defaultdict(list)
    for ts, frame in read_pcap(CONTROL_PCAP):
        assert struct.unpack_from("!H", frame, 12)[0] == 0x0800
        pkt = frame[14:]
        ihl = (pkt[0] & 0x0F) * 4
        tot_len = struct.unpack_from("!H", pkt, 2)[0]
        tcp = pkt[ihl:tot_len]
        sport, dport, seq = struct.unpack_from("!HHI", tcp, 0)
        flags = tcp[13]
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if dport == INTERCEPT_PORT:
            segs[(sport, "c2i")].append((ts, seq, flags, payload))
        else:
            assert sport == INTERCEPT_PORT
            segs[(dport, "i2c")].append((ts, seq, flags, payload))
    streams: dict[int, dict[str, list[tuple[float, bytes]]]] = defaultdict(dict)
    for (conn, direction), items in segs.items():
        syns = [seq for _ts, seq, flags, _p in items if flags & 0x02]
        assert len(set(syns)) == 1, "each direction of the capture starts with its SYN"
        expected = (syns[0] + 1) & 0xFFFFFFFF
        chunks = []
        for ts, seq, _flags, payload in sorted(
            items, key=lambda s: ((s[1] - syns[0]) & 0xFFFFFFFF, s[0])
        ):
            if not payload:
                continue
            skip = (expected - seq) & 0xFFFFFFFF
            assert skip < 0x80000000, "a gap in the captured stream"
            if skip >= len(payload):
                continue  # a retransmission of bytes we already have
            chunks.append((ts, payload[skip:]))
            expected = (expected + len(payload) - skip) & 0xFFFFFFFF
        streams[conn][direction] = chunks
    return dict(streams)


def joined(chunks: list[tuple[float, bytes]]) -> bytes:
    return b"".join(c for _ts, c in chunks)


@pytest.fixture(scope="module")
def control() -> dict[int, dict[str, list[tuple[float, bytes]]]]:
    streams = control_streams()
    assert len(streams) == 2  # tcpcopy -C 2
    return streams


def random_splits(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def feed_all(decoder, parts):
    out = []
    for part in parts:
        out.extend(decoder.feed(part))
    return out


# --- a packet builder for the tests (struct only: independent of engine.codec.packet) -------


def make_packet(
    *,
    src: str = "61.135.233.160",
    dst: str = "62.135.200.7",
    sport: int = 8080,
    dport: int = 40000,
    seq: int = 0x11223344,
    ack: int = 0x55667788,
    flags: int = 0x12,
    window: int = 29200,
    tcp_options: bytes = b"",
    ip_options: bytes = b"",
    payload: bytes = b"",
    tot_len: int | None = None,
    ip_id: int = 0x1234,
    ttl: int = 63,
    tos: int = 0,
    frag_off: int = 0x4000,
    urgent: int = 0,
    doff: int | None = None,
) -> bytes:
    assert len(tcp_options) % 4 == 0 and len(ip_options) % 4 == 0
    ihl = 5 + len(ip_options) // 4
    doff = 5 + len(tcp_options) // 4 if doff is None else doff
    tcp = (
        struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, window, 0xBEEF, urgent)
        + tcp_options
    )
    length = ihl * 4 + len(tcp) + len(payload) if tot_len is None else tot_len
    iph = struct.pack(
        "!BBHHHBBHII", 0x40 | ihl, tos, length, ip_id, frag_off, ttl, 6, 0xCAFE, ip(src), ip(dst)
    )
    return iph + ip_options + tcp + payload


SYNACK_OPTIONS = bytes.fromhex("020405b4 0402 080a 01020304 05060708 01 030307".replace(" ", ""))


# --- constants ---------------------------------------------------------------------------------


def test_constants_match_spec_sizes():
    assert CLIENT_RECORD.size == 14
    assert bytes.fromhex("0000000000000006 000000000000".replace(" ", "")) == HANDSHAKE
    assert (INTERNAL_VERSION, TYPE_CLIENT_ADD, TYPE_CLIENT_DEL) == (6, 1, 2)
    assert RESPONSE_RECORD_BYTES == 20 + wire.MAX_RESPONSE_TCP_HEADER_BYTES == 64
    assert PAYLOAD_RECORD_BYTES == 64 + wire.MAX_PAYLOAD_IN_RECORD_BYTES == 192
    assert (COMB_MAX, COMB_MAX_PAYLOAD) == (16, 6)
    # the largest frames of spec §1.4
    assert len(encode_frame([bytes(64)] * COMB_MAX)) == 1026
    assert len(encode_frame([bytes(192)] * COMB_MAX_PAYLOAD)) == 1154


# --- spec §1.8 worked example -----------------------------------------------------------------


def test_worked_example_client_side():
    cip, tip = ip("62.135.200.7"), ip("61.135.233.160")
    add = client_add(cip, 40000, tip, 8080)
    assert add == bytes.fromhex("3e87c8079c4000013d87e9a01f90")
    dec = ClientStreamDecoder()
    assert dec.feed(HANDSHAKE + add) == [ClientRecord(cip, 40000, TYPE_CLIENT_ADD, tip, 8080)]
    assert dec.version == INTERNAL_VERSION and dec.handshake_done and dec.pending_bytes == 0


def test_worked_example_frame_back():
    pkt = make_packet(tcp_options=SYNACK_OPTIONS)  # SYN-ACK, 20 B IP + 40 B TCP
    assert pkt[:4] == bytes.fromhex("4500003c")
    rec = encode_response_record(pkt)
    assert encode_response_record(memoryview(b"\x00" * 14 + pkt)[14:]) == rec  # past L2
    frame = encode_frame([rec])
    assert len(frame) == 2 + 64
    assert frame[:6] == bytes.fromhex("0001 4500003c".replace(" ", ""))
    assert frame[2:22] == pkt[:20]  # the IP header as captured
    assert frame[22:26] == bytes.fromhex("1f909c40")  # 8080 -> 40000
    assert frame[34:36] == bytes.fromhex("a012")  # doff 10, SYN|ACK
    assert frame[22:62] == pkt[20:60]  # 40 B TCP header incl. 20 B options
    assert frame[62:] == bytes(4)  # zero fill to 44
    hdr = decode_response_record(FrameDecoder().feed(frame)[0])
    assert decode_response_record(memoryview(bytearray(rec))) == hdr
    assert type(hdr.options) is bytes and type(hdr.payload) is bytes
    assert (hdr.src, hdr.dst, hdr.sport, hdr.dport) == (
        ip("61.135.233.160"),
        ip("62.135.200.7"),
        8080,
        40000,
    )
    assert (hdr.seq, hdr.ack, hdr.flags, hdr.window) == (0x11223344, 0x55667788, 0x12, 29200)
    assert hdr.options == SYNACK_OPTIONS
    assert (hdr.data_len, hdr.payload) == (0, b"")
    assert (hdr.ip_id, hdr.ttl, hdr.tos, hdr.df, hdr.urgent) == (0x1234, 63, 0, True, 0)


# --- golden bytes: the real C tcpcopy <-> intercept streams -----------------------------------


def test_golden_client_streams(control):
    client_net = ipaddress.IPv4Network("198.19.1.0/24")
    for conn, dirs in control.items():
        stream = joined(dirs["c2i"])
        assert stream.startswith(HANDSHAKE)
        dec = ClientStreamDecoder()
        records = dec.feed(stream)
        assert dec.version == INTERNAL_VERSION and dec.pending_bytes == 0
        assert len(records) == (len(stream) - 14) // 14 > 0, conn
        for rec in records:
            assert rec.type == TYPE_CLIENT_ADD
            assert ipaddress.IPv4Address(rec.client_ip) in client_net
            assert (rec.target_ip, rec.target_port) == (ip("198.18.2.3"), 8080)
        assert HANDSHAKE + b"".join(encode_client_record(r) for r in records) == stream
        # the same records whatever the split: per TCP segment, byte by byte, random
        assert feed_all(ClientStreamDecoder(), [c for _ts, c in dirs["c2i"]]) == records
        assert feed_all(ClientStreamDecoder(), [bytes([b]) for b in stream]) == records
        rng = random.Random(conn)
        for _ in range(20):
            assert feed_all(ClientStreamDecoder(), random_splits(stream, rng)) == records


def test_golden_intercept_streams(control):
    client_net = ipaddress.IPv4Network("198.19.1.0/24")
    total_records = 0
    for conn, dirs in control.items():
        stream = joined(dirs["i2c"])
        dec = FrameDecoder()
        frames = dec.feed_frames(stream)
        assert dec.pending_bytes == 0  # the stream ends exactly on a frame boundary
        assert dec.frames == len(frames) > 0
        assert all(1 <= len(f) <= COMB_MAX for f in frames)
        assert b"".join(encode_frame(f) for f in frames) == stream
        announced = {
            (r.client_ip, r.client_port, r.target_ip, r.target_port)
            for r in ClientStreamDecoder().feed(joined(dirs["c2i"]))
        }
        records = [r for f in frames for r in f]
        total_records += len(records)
        for rec in records:
            assert len(rec) == RESPONSE_RECORD_BYTES
            assert rec[0] == 0x45  # no IP options in this capture: a record is its own packet
            assert encode_response_record(rec) == rec
            hdr = decode_response_record(rec)
            assert (hdr.src, hdr.sport) == (ip("198.18.2.3"), 8080)
            assert ipaddress.IPv4Address(hdr.dst) in client_net
            # intercept routes a response to the connection that announced its tuple
            assert (hdr.dst, hdr.dport, hdr.src, hdr.sport) in announced
            assert hdr.options == rec[40 : 20 + (rec[32] >> 4) * 4]
            assert hdr.data_len == struct.unpack_from("!H", rec, 2)[0] - 20 - (rec[32] >> 4) * 4
        # split-invariance on real bytes
        assert feed_all(FrameDecoder(), [c for _ts, c in dirs["i2c"]]) == records
        assert feed_all(FrameDecoder(), [bytes([b]) for b in stream]) == records
        rng = random.Random(conn)
        for _ in range(20):
            assert feed_all(FrameDecoder(), random_splits(stream, rng)) == records
        packets = feed_all(ResponseStreamDecoder(), random_splits(stream, rng))
        assert packets == [decode_response_record(r) for r in records]
    assert total_records > 100


# --- ClientStreamDecoder ---------------------------------------------------------------------


def test_client_decoder_old_client_rejected_after_8_bytes():
    dec = ClientStreamDecoder()
    old = client_add(ip("198.19.1.1"), 1234, ip("198.18.2.3"), 80)
    assert dec.feed(old[:7]) == []
    with pytest.raises(DecodeError, match="too old"):
        dec.feed(old[7:8])
    with pytest.raises(DecodeError):  # the stream stays broken
        dec.feed(HANDSHAKE)
    with pytest.raises(DecodeError):
        ClientStreamDecoder().feed(struct.pack("!IHH", 0, 1, 6))  # only the port non-zero


def test_client_decoder_other_version_accepted_and_recorded():
    dec = ClientStreamDecoder()
    hs = CLIENT_RECORD.pack(0, 0, 5, 0xDEADBEEF, 7)  # the last 6 bytes are ignored
    add = client_add(1, 2, 3, 4)
    assert dec.feed(hs[:13]) == [] and dec.version is None and dec.pending_bytes == 13
    assert dec.feed(hs[13:] + add) == [ClientRecord(1, 2, 1, 3, 4)]
    assert dec.version == 5


def test_client_decoder_unknown_types_and_del_returned():
    recs = [
        ClientRecord(1, 2, TYPE_CLIENT_DEL, 3, 4),
        ClientRecord(5, 6, 99, 7, 8),
        ClientRecord(9, 10, TYPE_CLIENT_ADD, 11, 12),
    ]
    stream = (
        HANDSHAKE + client_del(1, 2, 3, 4) + b"".join(encode_client_record(r) for r in recs[1:])
    )
    assert ClientStreamDecoder().feed(stream) == recs


def test_client_decoder_keeps_trailing_partial_record():
    add = client_add(ip("198.19.1.9"), 5555, ip("198.18.2.3"), 8080)
    dec = ClientStreamDecoder()
    assert dec.feed(HANDSHAKE + add + add[:5]) == [ClientRecord(*CLIENT_RECORD.unpack(add))]
    assert dec.pending_bytes == 5
    assert dec.feed(b"") == []
    assert dec.feed(add[5:]) == [ClientRecord(*CLIENT_RECORD.unpack(add))]
    assert dec.pending_bytes == 0


client_records = st.builds(
    ClientRecord,
    st.integers(0, 2**32 - 1),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.integers(0, 2**32 - 1),
    st.integers(0, 65535),
)


@given(st.lists(client_records, max_size=20), st.randoms(use_true_random=False))
def test_client_records_roundtrip_any_split(records, rng):
    stream = HANDSHAKE + b"".join(encode_client_record(r) for r in records)
    assert feed_all(ClientStreamDecoder(), random_splits(stream, rng)) == records


@given(st.binary(max_size=100), st.randoms(use_true_random=False))
def test_client_decoder_any_bytes(data, rng):
    try:
        whole = ClientStreamDecoder().feed(data)
    except DecodeError:
        with pytest.raises(DecodeError):
            feed_all(ClientStreamDecoder(), random_splits(data, rng) if data else [data])
        return
    assert all(isinstance(r, ClientRecord) for r in whole)
    if data:
        assert feed_all(ClientStreamDecoder(), random_splits(data, rng)) == whole


# --- encode_response_record / decode_response_record ------------------------------------------


def test_record_ip_options_dropped_but_ihl_kept():
    pkt = make_packet(ip_options=b"\x01\x01\x01\x00", tcp_options=SYNACK_OPTIONS, payload=b"xy")
    rec = encode_response_record(pkt)
    assert rec[:20] == pkt[:20] and rec[0] == 0x46  # IHL still says 24 bytes
    assert rec[20:60] == pkt[24:64]  # TCP at 20, not at ihl*4
    hdr = decode_response_record(rec)
    assert (hdr.sport, hdr.dport, hdr.options) == (8080, 40000, SYNACK_OPTIONS)
    assert hdr.data_len == 2  # tot_len - 24 - 40
    assert hdr.ip_options == b""


def test_record_tcp_header_truncated_to_44_bytes():
    options = bytes(range(1, 41))  # doff 15: 60-byte TCP header
    pkt = make_packet(tcp_options=options, payload=b"z" * 10)
    rec = encode_response_record(pkt)
    assert len(rec) == 64 and rec[20:64] == pkt[20:64]
    hdr = decode_response_record(rec)
    assert hdr.options == options[:24]
    assert hdr.data_len == 10
    payload_rec = encode_response_record(pkt, with_payload=True)
    assert len(payload_rec) == 192
    assert payload_rec[64:80] == bytes(16)  # the lost options stay zero
    assert payload_rec[80:90] == b"z" * 10  # payload at 20 + doff*4
    assert decode_response_record(payload_rec).payload == b"z" * 10


def test_record_from_snaplen_truncated_capture_zero_fills():
    pkt = make_packet(tcp_options=SYNACK_OPTIONS, payload=b"p" * 1400)
    captured = pkt[:50]  # 20 IP + 30 of the 40 TCP bytes
    rec = encode_response_record(captured)
    assert rec == captured + bytes(14)
    hdr = decode_response_record(rec)
    assert hdr.data_len == 1400 and hdr.payload == b""
    # payload variant: a 100-byte payload of which only 20 bytes were captured
    pkt = make_packet(payload=bytes(range(100)))
    rec = encode_response_record(pkt[:60], with_payload=True)
    assert rec[40:60] == bytes(range(20)) and rec[60:] == bytes(132)
    assert decode_response_record(rec).payload == bytes(range(20)) + bytes(80)


@pytest.mark.parametrize("length", [1, 64, 127, 128])
def test_payload_variant_copies_1_to_128_bytes(length):
    body = bytes((i * 7) & 0xFF for i in range(length))
    pkt = make_packet(tcp_options=SYNACK_OPTIONS, payload=body)
    rec = encode_response_record(pkt, with_payload=True)
    assert len(rec) == PAYLOAD_RECORD_BYTES
    assert rec[:60] == pkt[:60]
    assert rec[60 : 60 + length] == body
    assert rec[60 + length :] == bytes(132 - length)
    hdr = decode_response_record(rec)
    assert (hdr.payload, hdr.data_len) == (body, length)
    assert encode_response_record(pkt) == rec[:60] + bytes(4)  # the default build: no payload


@pytest.mark.parametrize("length", [0, 129, 1400])
def test_payload_variant_copies_nothing_outside_1_to_128(length):
    pkt = make_packet(payload=b"q" * length)
    rec = encode_response_record(pkt, with_payload=True)
    assert rec == pkt[:40] + bytes(152)
    hdr = decode_response_record(rec)
    assert (hdr.payload, hdr.data_len) == (b"", length)


def test_payload_quirk_fixed_no_copy_past_the_record():
    options = bytes([1] * 40)  # doff 15: payload would start at record offset 80
    body = bytes(range(128))
    rec = encode_response_record(make_packet(tcp_options=options, payload=body), True)
    assert len(rec) == 192
    assert rec[80:] == body[:112]  # C would write 16 bytes past the end
    hdr = decode_response_record(rec)
    assert hdr.payload == body[:112] and hdr.data_len == 128


@pytest.mark.parametrize(
    ("packet", "message"),
    [
        (b"\x45" * 19, "shorter than"),
        (make_packet()[:39], "no complete TCP header"),
        (b"\x65" + make_packet()[1:], "not an IPv4/TCP"),
        (b"\x44" + make_packet()[1:], "not an IPv4/TCP"),
        (make_packet()[:9] + b"\x11" + make_packet()[10:], "not an IPv4/TCP"),
        (make_packet(doff=4), "data offset"),
    ],
)
def test_encode_rejects_what_intercept_drops(packet, message):
    with pytest.raises(DecodeError, match=message):
        encode_response_record(packet)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (bytes(63), "63 bytes"),
        (bytes(65), "65 bytes"),
        (b"\x65" + encode_response_record(make_packet())[1:], "IPv4/TCP"),
        (b"\x44" + encode_response_record(make_packet())[1:], "IPv4/TCP"),
        (b"\x44" + encode_response_record(make_packet(), True)[1:], "IPv4/TCP"),
    ],
)
def test_decode_rejects_bad_records(record, message):
    with pytest.raises(DecodeError, match=message):
        decode_response_record(record)


@pytest.mark.parametrize(
    ("offset", "value", "message"), [(9, 17, "IPv4/TCP"), (32, 0x40, "offset")]
)
def test_decode_rejects_bad_fields(offset, value, message):
    rec = bytearray(encode_response_record(make_packet()))
    rec[offset] = value
    with pytest.raises(DecodeError, match=message):
        decode_response_record(bytes(rec))


def test_decode_clamps_data_len_and_reads_flags_fields():
    pkt = make_packet(tot_len=30, flags=0x04, frag_off=0, urgent=9, tos=0x10)
    hdr = decode_response_record(encode_response_record(pkt))
    assert hdr.data_len == 0 and hdr.flags == 0x04
    assert (hdr.df, hdr.urgent, hdr.tos) == (False, 9, 0x10)


ip_ints = st.integers(0, 2**32 - 1)
ports = st.integers(0, 65535)


@st.composite
def tcp_packets(draw):
    options = draw(st.binary(max_size=40).map(lambda b: b + bytes(-len(b) % 4)))
    ip_opts = draw(st.binary(max_size=40).map(lambda b: b + bytes(-len(b) % 4)))
    body = draw(st.binary(max_size=300))
    fields = {
        "src": str(ipaddress.IPv4Address(draw(ip_ints))),
        "dst": str(ipaddress.IPv4Address(draw(ip_ints))),
        "sport": draw(ports),
        "dport": draw(ports),
        "seq": draw(ip_ints),
        "ack": draw(ip_ints),
        "flags": draw(st.integers(0, 255)),
        "window": draw(ports),
    }
    return fields, make_packet(tcp_options=options, ip_options=ip_opts, payload=body, **fields)


@given(tcp_packets(), st.booleans())
def test_record_roundtrip_fields(case, with_payload):
    fields, pkt = case
    ihl = (pkt[0] & 15) * 4
    doff = (pkt[ihl + 12] >> 4) * 4
    body = pkt[ihl + doff :]
    rec = encode_response_record(pkt, with_payload)
    assert len(rec) == (PAYLOAD_RECORD_BYTES if with_payload else RESPONSE_RECORD_BYTES)
    hdr = decode_response_record(rec)
    assert (hdr.src, hdr.dst) == (ip(fields["src"]), ip(fields["dst"]))
    assert (hdr.sport, hdr.dport, hdr.seq, hdr.ack) == (
        fields["sport"],
        fields["dport"],
        fields["seq"],
        fields["ack"],
    )
    assert (hdr.flags, hdr.window) == (fields["flags"], fields["window"])
    assert hdr.options == pkt[ihl + 20 : ihl + min(doff, 44)]
    assert hdr.data_len == len(body)
    if with_payload and 1 <= len(body) <= 128:
        assert hdr.payload == body[: 192 - 20 - doff]
    else:
        assert hdr.payload == b""


@given(
    st.one_of(
        st.binary(min_size=64, max_size=64),
        st.binary(min_size=192, max_size=192),
        st.binary(max_size=200),
    )
)
def test_decode_record_any_bytes(data):
    try:
        hdr = decode_response_record(data)
    except DecodeError:
        return
    assert len(data) in (64, 192) and hdr.data_len >= 0 and len(hdr.options) <= 24


@given(st.binary(max_size=120), st.booleans())
def test_encode_record_any_bytes(data, with_payload):
    try:
        rec = encode_response_record(data, with_payload)
    except DecodeError:
        return
    assert len(rec) == (192 if with_payload else 64)
    decode_response_record(rec)  # whatever encodes also decodes


# --- framing ----------------------------------------------------------------------------------


def test_encode_frame_rejects_what_tcpcopy_rejects():
    with pytest.raises(ValueError, match="at least one"):
        encode_frame([])
    with pytest.raises(ValueError, match="65 bytes"):
        encode_frame([bytes(65)])
    with pytest.raises(ValueError, match="17 records"):
        encode_frame([bytes(64)] * 17)
    with pytest.raises(ValueError, match="7 records"):
        encode_frame([bytes(192)] * 7)
    with pytest.raises(ValueError, match="different sizes"):
        encode_frame([bytes(64), bytes(192)])


@pytest.mark.parametrize(
    ("record_bytes", "count"), [(64, 0), (64, 17), (64, 0xFFFF), (192, 7), (192, 0)]
)
def test_frame_decoder_rejects_bad_counts(record_bytes, count):
    good = encode_frame([bytes(record_bytes)])
    dec = FrameDecoder(record_bytes)
    assert dec.feed(good) == [bytes(record_bytes)]
    with pytest.raises(DecodeError, match=f"frame of {count} records"):
        dec.feed(struct.pack("!H", count))
    with pytest.raises(DecodeError):  # desynchronised for good
        dec.feed(good)


def test_frame_decoder_limits():
    assert FrameDecoder(192).max_count == COMB_MAX_PAYLOAD
    assert FrameDecoder(64).max_count == COMB_MAX
    assert FrameDecoder(64, max_count=3).max_count == 3
    with pytest.raises(ValueError):
        FrameDecoder(0)
    recs = [bytes([i]) * 192 for i in range(6)]
    assert FrameDecoder(192).feed(encode_frame(recs)) == recs


def test_frame_decoder_keeps_trailing_partial_frame():
    recs = [bytes([i]) * 64 for i in range(3)]
    frame = encode_frame(recs)
    dec = FrameDecoder()
    assert dec.feed(frame + frame[:1]) == recs
    assert dec.pending_bytes == 1
    assert dec.feed(frame[1:100]) == []
    assert dec.pending_bytes == 100
    assert dec.feed_frames(frame[100:] + frame) == [recs, recs]
    assert dec.pending_bytes == 0 and dec.frames == 3


def test_non_combined_stream():
    recs = [bytes([i]) * 64 for i in range(5)]
    stream = b"".join(recs)
    dec = FrameDecoder(combined=False)
    assert dec.feed(stream[:100]) == recs[:1]
    assert dec.pending_bytes == 36
    assert dec.feed_frames(stream[100:] + recs[0][:3]) == [[r] for r in recs[1:]]
    assert dec.pending_bytes == 3
    assert feed_all(FrameDecoder(192, combined=False), [bytes(192 * 2)]) == [bytes(192)] * 2


records_64 = st.binary(min_size=64, max_size=64)
records_192 = st.binary(min_size=192, max_size=192)


@given(
    st.one_of(
        st.tuples(st.just(64), st.lists(st.lists(records_64, min_size=1, max_size=16), max_size=5)),
        st.tuples(
            st.just(192), st.lists(st.lists(records_192, min_size=1, max_size=6), max_size=4)
        ),
    ),
    st.randoms(use_true_random=False),
)
def test_frames_roundtrip_any_split(case, rng):
    size, frames = case
    stream = b"".join(encode_frame(f) for f in frames)
    flat = [r for f in frames for r in f]
    parts = random_splits(stream, rng) if stream else [b""]
    dec = FrameDecoder(size)
    assert feed_all(dec, parts) == flat
    assert dec.frames == len(frames) and dec.pending_bytes == 0
    assert FrameDecoder(size).feed_frames(stream) == frames
    assert feed_all(FrameDecoder(size, combined=False), parts) == [
        stream[i : i + size] for i in range(0, len(stream) - size + 1, size)
    ]


@settings(max_examples=300)
@given(st.binary(max_size=2200), st.sampled_from([64, 192]), st.randoms(use_true_random=False))
def test_frame_decoder_any_bytes(data, size, rng):
    parts = random_splits(data, rng) if data else [data]
    try:
        whole = FrameDecoder(size).feed(data)
    except DecodeError:
        with pytest.raises(DecodeError):
            feed_all(FrameDecoder(size), parts)
        return
    assert all(len(r) == size for r in whole)
    assert feed_all(FrameDecoder(size), parts) == whole


def test_response_stream_decoder_skips_and_counts_bad_records():
    good = encode_response_record(make_packet(tcp_options=SYNACK_OPTIONS))
    bad = bytes(64)
    dec = ResponseStreamDecoder()
    stream = encode_frame([good, bad]) + encode_frame([good])
    assert dec.feed(stream[:-1]) == [decode_response_record(good)]
    assert dec.bad_records == 1 and dec.pending_bytes == 2 + 63
    assert dec.feed(stream[-1:]) == [decode_response_record(good)]
    assert dec.pending_bytes == 0 and dec.framer.frames == 2
    plain = ResponseStreamDecoder(combined=False)
    assert plain.feed(good + bad[:10]) == [decode_response_record(good)]
    assert plain.pending_bytes == 10
