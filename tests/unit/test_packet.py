"""engine.codec.packet: golden bytes from the C testbed captures, checksums, options, MTU split,
link layers, addresses, and Hypothesis properties (any bytes parse or raise DecodeError)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.codec.packet import (
    ACK,
    DLT_EN10MB,
    DLT_IPV4,
    DLT_LINUX_SLL,
    DLT_LINUX_SLL2,
    DLT_RAW,
    FIN,
    PSH,
    RST,
    SYN,
    URG,
    TcpOptions,
    TcpPacket,
    build,
    build_options,
    checksum,
    ip_from_str,
    ip_to_str,
    l2_offset,
    parse_ip,
    parse_options,
    set_timestamp,
    split_mtu,
    tcp_checksum,
)
from engine.errors import DecodeError
from tests.paths import SHARED_DATA

DATA = SHARED_DATA
CAPTURES = ("online-http.pcap", "target-side.pcap")


# -- independent helpers (deliberately not sharing code with engine.codec.packet) -----------------


def read_pcap(path: Path) -> tuple[int, list[bytes]]:
    """A minimal classic-pcap reader: (linktype, frames)."""
    data = path.read_bytes()
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise AssertionError(f"{path}: not a pcap file")
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    frames = []
    off = 24
    while off < len(data):
        _sec, _frac, caplen, _wirelen = struct.unpack_from(endian + "IIII", data, off)
        off += 16
        frames.append(data[off : off + caplen])
        off += caplen
    assert off == len(data), f"{path}: trailing partial record"
    return linktype, frames


def ref_checksum(data: bytes) -> int:
    """RFC 1071 the slow, obvious way: add 16-bit words with end-around carry."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ref_tcp_checksum(ip: bytes, segment: bytes) -> int:
    pseudo = ip[12:20] + bytes((0, 6)) + len(segment).to_bytes(2, "big")
    return ref_checksum(pseudo + segment)


def be(b: bytes | bytearray) -> int:
    return int.from_bytes(b, "big")


def decode_by_hand(ip: bytes) -> dict[str, object]:
    """Field values read byte by byte, to compare with parse_ip."""
    ihl = (ip[0] & 0x0F) * 4
    tot_len = be(ip[2:4])
    t = ip[ihl:]
    doff = (t[12] >> 4) * 4
    return {
        "src": be(ip[12:16]),
        "dst": be(ip[16:20]),
        "sport": be(t[0:2]),
        "dport": be(t[2:4]),
        "seq": be(t[4:8]),
        "ack": be(t[8:12]),
        "flags": t[13],
        "window": be(t[14:16]),
        "urgent": be(t[18:20]),
        "options": t[20:doff],
        "payload": ip[ihl + doff : tot_len],
        "data_len": tot_len - ihl - doff,
        "ip_id": be(ip[4:6]),
        "ttl": ip[8],
        "tos": ip[1],
        "df": bool(ip[6] & 0x40),
        "ip_options": ip[20:ihl],
    }


def ip_packets(name: str) -> list[bytes]:
    linktype, frames = read_pcap(DATA / name)
    assert linktype == 1  # both captures are Ethernet
    out = []
    for frame in frames:
        assert frame[12:14] == b"\x08\x00"
        ip = frame[14:]
        out.append(ip[: be(ip[2:4])])  # no Ethernet padding in these captures, but be exact
    return out


@pytest.fixture(scope="module", params=CAPTURES)
def captured(request: pytest.FixtureRequest) -> list[bytes]:
    return ip_packets(request.param)


def ref_packet(
    *,
    src: int = 0xC6120001,
    dst: int = 0xC6120002,
    sport: int = 40000,
    dport: int = 80,
    seq: int = 1,
    ack: int = 2,
    flags: int = ACK,
    window: int = 65535,
    urgent: int = 0,
    options: bytes = b"",
    payload: bytes = b"",
    ip_id: int = 7,
    ttl: int = 64,
    tos: int = 0,
    df: bool = True,
    ip_options: bytes = b"",
) -> bytes:
    """A packet built with the reference checksum (independent of engine.codec.packet.build)."""
    ihl = 20 + len(ip_options)
    doff = 20 + len(options)
    tot = ihl + doff + len(payload)
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl // 4,
            tos,
            tot,
            ip_id,
            0x4000 if df else 0,
            ttl,
            6,
            0,
            src.to_bytes(4, "big"),
            dst.to_bytes(4, "big"),
        )
        + ip_options
    )
    ip[10:12] = ref_checksum(bytes(ip)).to_bytes(2, "big")
    tcp = bytearray(
        struct.pack(
            "!HHIIBBHHH", sport, dport, seq, ack, (doff // 4) << 4, flags, window, 0, urgent
        )
        + options
        + payload
    )
    tcp[16:18] = ref_tcp_checksum(bytes(ip), bytes(tcp)).to_bytes(2, "big")
    return bytes(ip + tcp)


# -- golden bytes -----------------------------------------------------------------------------


def test_captures_hold_the_expected_packets() -> None:
    # Packet counts as `tcpdump -r FILE | wc -l` reports them.
    assert len(ip_packets("online-http.pcap")) == 340
    assert len(ip_packets("target-side.pcap")) == 342


def test_every_captured_packet_parses_to_its_hand_decoded_fields(captured: list[bytes]) -> None:
    for ip in captured:
        pkt = parse_ip(ip)
        want = decode_by_hand(ip)
        got = {k: getattr(pkt, k) for k in want}
        assert got == want


def test_every_captured_packet_rebuilds_byte_for_byte(captured: list[bytes]) -> None:
    for ip in captured:
        ihl = (ip[0] & 0x0F) * 4
        # These captures were taken with checksum offload off: the checksums are valid, so
        # a fresh build must reproduce every byte, checksums included.
        assert ref_checksum(ip[:ihl]) == 0
        assert (
            ref_checksum(ip[12:20] + b"\x00\x06" + (len(ip) - ihl).to_bytes(2, "big") + ip[ihl:])
            == 0
        )
        assert build(parse_ip(ip)) == ip
        assert build(parse_ip(memoryview(ip))) == ip


def test_captured_tcp_checksums_match_tcp_checksum(captured: list[bytes]) -> None:
    for ip in captured:
        ihl = (ip[0] & 0x0F) * 4
        seg = bytearray(ip[ihl:])
        stored = be(seg[16:18])
        seg[16:18] = b"\x00\x00"
        assert tcp_checksum(be(ip[12:16]), be(ip[16:20]), bytes(seg)) == stored
        assert checksum(ip[:ihl]) == 0  # a header with a valid checksum sums to zero


def test_captured_options_decode_and_rebuild_in_linux_layout(captured: list[bytes]) -> None:
    kinds = set()
    for ip in captured:
        pkt = parse_ip(ip)
        o = parse_options(pkt.options)
        if pkt.flags & SYN:
            # Linux SYN / SYN-ACK here: MSS 1460, SACK_PERM, TS, NOP, WS 10 (tcpdump -v).
            assert (o.mss, o.sack_permitted, o.wscale) == (1460, True, 10)
            assert o.timestamp is not None
            kinds.add("syn")
        else:
            assert o.mss is None and o.wscale is None and not o.sack_permitted
            assert o.timestamp is not None
            kinds.add("data")
        # Where Linux puts TS: after MSS,SACK_PERM on a SYN; after NOP,NOP otherwise.
        at = 6 if pkt.flags & SYN else 2
        assert pkt.options[at : at + 2] == b"\x08\x0a"
        assert o.timestamp == (be(pkt.options[at + 2 : at + 6]), be(pkt.options[at + 6 : at + 10]))
        again = build_options(o.mss, o.wscale, o.sack_permitted, o.timestamp, o.sack)
        assert again == pkt.options
    assert kinds == {"syn", "data"}


def test_first_packets_match_tcpdump() -> None:
    # Values from `tcpdump -nn -v -r online-http.pcap` / target-side.pcap.
    on = [parse_ip(ip) for ip in ip_packets("online-http.pcap")[:4]]
    syn = on[0]
    assert ip_to_str(syn.src) == "198.18.1.10" and ip_to_str(syn.dst) == "198.18.1.2"
    assert (syn.sport, syn.dport, syn.seq, syn.flags, syn.window) == (
        12474,
        80,
        592461490,
        SYN,
        64240,
    )
    assert (syn.ip_id, syn.ttl, syn.df, syn.data_len) == (11029, 64, True, 0)
    assert parse_options(syn.options) == TcpOptions(
        mss=1460, wscale=10, sack_permitted=True, timestamp=(2546307102, 0)
    )
    synack = on[1]
    assert (synack.seq, synack.ack, synack.flags) == (1595690526, 592461491, SYN | ACK)
    assert parse_options(synack.options).timestamp == (2953255358, 2546307102)
    req = on[3]
    assert req.flags == PSH | ACK and req.data_len == 78 and req.window == 63
    assert req.payload.startswith(b"GET / HTTP/1.0\r\nHost: 198.18.1.2\r\n")
    assert parse_options(req.options).timestamp == (2546307102, 2953255358)
    tgt = parse_ip(ip_packets("target-side.pcap")[0])
    assert ip_to_str(tgt.src) == "198.19.1.1" and ip_to_str(tgt.dst) == "198.18.2.3"
    assert (tgt.sport, tgt.dport, tgt.seq) == (12474, 8080, 592461490)


def test_whole_truncated_and_trailing_data() -> None:
    ip = next(p for p in ip_packets("online-http.pcap") if len(p) > 100)
    whole = parse_ip(ip)
    hdrs = 20 + 20 + len(whole.options)
    assert len(whole.payload) == whole.data_len == len(ip) - hdrs > 0
    # Trailing bytes past tot_len (Ethernet padding, a bigger read buffer) are ignored.
    assert parse_ip(ip + b"\xee" * 30) == whole
    assert parse_ip(memoryview(ip + b"\x00" * 6)) == whole
    for cut in range(len(ip)):
        if cut < hdrs:
            with pytest.raises(DecodeError):
                parse_ip(ip[:cut])
        else:
            part = parse_ip(ip[:cut])
            assert part.payload == ip[hdrs:cut]
            assert part.data_len == whole.data_len  # declared length survives truncation
            assert (part.seq, part.options, part.flags) == (whole.seq, whole.options, whole.flags)


# -- parse errors -------------------------------------------------------------------------


def test_parse_errors_say_what_and_where() -> None:
    good = ref_packet(payload=b"hello", options=b"\x01\x01\x01\x01")
    cases = [
        (good[:19], "offset 0"),
        (bytes([0x65]) + good[1:], "not IPv4: version 6 at offset 0"),
        (bytes([0x44]) + good[1:], "header length 16"),
        (good[:9] + b"\x11" + good[10:], "protocol 17 at offset 9"),
        (good[:6] + b"\x00\x10" + good[8:], "fragment"),
        (good[:30], "TCP header truncated"),
        (good[:32] + b"\x40" + good[33:], "data offset 16"),
        (good[:42], "TCP options truncated"),
        (good[:2] + (43).to_bytes(2, "big") + good[4:], "tot_len 43 < headers 44"),
    ]
    for raw, text in cases:
        with pytest.raises(DecodeError, match=text) as info:
            parse_ip(raw)
        assert "\n" not in str(info.value)
    # An MF first fragment still has its TCP header; it parses (spec §3.3 only counts it).
    first_frag = good[:6] + b"\x20\x00" + good[8:]
    assert parse_ip(first_frag).payload == b"hello"


def test_ip_options_are_kept() -> None:
    ipo = b"\x94\x04\x00\x00"  # router alert
    raw = ref_packet(ip_options=ipo, payload=b"x")
    pkt = parse_ip(raw)
    assert pkt.ip_options == ipo and pkt.payload == b"x"
    assert build(pkt) == raw


# -- checksums ----------------------------------------------------------------------------


def test_checksum_known_values() -> None:
    # RFC 1071 §3 example words 0001 f203 f4f5 f6f7: sum ddf2, checksum 220d.
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    # The classic IPv4 header example (192.168.0.1 -> 192.168.0.199, UDP): checksum b861.
    assert checksum(bytes.fromhex("450000730000400040110000c0a80001c0a800c7")) == 0xB861
    assert checksum(b"") == 0xFFFF
    assert checksum(b"\x00\x00\x00") == 0xFFFF
    assert checksum(b"\xff\xff") == 0x0000  # sum 0xffff, not 0
    assert checksum(b"\x01") == 0xFEFF  # odd byte is the high half of a padded word
    assert checksum(bytearray(b"\x00\x01\xf2\x03")) == checksum(memoryview(b"\x00\x01\xf2\x03"))


@given(st.binary(max_size=300))
def test_checksum_equals_reference(data: bytes) -> None:
    assert checksum(data) == ref_checksum(data)


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=200))
def test_tcp_checksum_equals_reference(src: int, dst: int, seg: bytes) -> None:
    ip = b"\x00" * 12 + src.to_bytes(4, "big") + dst.to_bytes(4, "big")
    assert tcp_checksum(src, dst, seg) == ref_tcp_checksum(ip, seg)


# -- build --------------------------------------------------------------------------------


def test_build_matches_reference_builder() -> None:
    kw = dict(
        seq=0xFFFFFFFF,
        ack=5,
        flags=PSH | ACK | URG,
        window=1234,
        urgent=3,
        ip_id=0xFFFF,
        ttl=3,
        tos=0x10,
        df=False,
        options=b"\x01\x01\x08\x0a" + bytes(8),
        payload=b"abc",
    )
    pkt = TcpPacket(src=0xC6120001, dst=0xC6120002, sport=40000, dport=80, **kw)  # type: ignore[arg-type]
    assert build(pkt) == ref_packet(**kw)  # type: ignore[arg-type]


def test_build_pads_options_and_ignores_data_len() -> None:
    pkt = TcpPacket(
        1, 2, 3, 4, options=b"\x02\x04\x05\xb4\x01", ip_options=b"\x01", payload=b"x", data_len=500
    )
    raw = build(pkt)
    assert raw[0] == 0x46  # ihl 6: one byte of IP options padded to 4
    assert be(raw[2:4]) == len(raw) == 24 + 28 + 1  # tot_len from len(payload), not data_len
    assert raw[24 + 12] >> 4 == 7  # doff 7: 5 option bytes padded to 8
    assert raw[24 + 20 : 24 + 28] == b"\x02\x04\x05\xb4\x01\x00\x00\x00"
    assert raw[20:24] == b"\x01\x00\x00\x00"
    back = parse_ip(raw)
    assert back.data_len == 1 and back.payload == b"x"
    assert ref_checksum(raw[:24]) == 0


def test_build_rejects_impossible_packets() -> None:
    with pytest.raises(ValueError, match="TCP options too long"):
        build(TcpPacket(1, 2, 3, 4, options=bytes(41)))
    with pytest.raises(ValueError, match="IP options too long"):
        build(TcpPacket(1, 2, 3, 4, ip_options=bytes(44)))
    with pytest.raises(ValueError, match="packet too long"):
        build(TcpPacket(1, 2, 3, 4, payload=bytes(65536 - 40)))
    with pytest.raises(ValueError, match="out of range"):
        build(TcpPacket(1, 2, 70000, 4))
    with pytest.raises(ValueError, match="out of range"):
        build(TcpPacket(1, 2, 3, 4, seq=2**32))
    assert len(build(TcpPacket(1, 2, 3, 4, payload=bytes(65535 - 40)))) == 65535


# -- options ------------------------------------------------------------------------------


def test_build_options_layouts() -> None:
    ts = (0x01020304, 0x05060708)
    tsb = bytes.fromhex("080a0102030405060708")
    assert build_options() == b""
    # SYN like Linux: MSS, SACK_PERM, TS, NOP, WS.
    assert build_options(mss=1460, wscale=7, sack_permitted=True, timestamp=ts) == (
        b"\x02\x04\x05\xb4" + b"\x04\x02" + tsb + b"\x01\x03\x03\x07"
    )
    assert build_options(timestamp=ts) == b"\x01\x01" + tsb  # data
    assert build_options(mss=536) == b"\x02\x04\x02\x18"
    assert build_options(sack_permitted=True) == b"\x01\x01\x04\x02"
    assert build_options(wscale=0) == b"\x01\x03\x03\x00"
    blocks = ((1, 2), (3, 4))
    assert build_options(sack=blocks) == b"\x01\x01\x05\x12" + struct.pack("!IIII", 1, 2, 3, 4)
    # With TS only 2 SACK blocks fit in 40 bytes (12 + 4 + 16 = 32; a third would be 40+).
    many = tuple((i, i + 1) for i in range(0, 40, 2))
    out = build_options(timestamp=ts, sack=many)
    assert len(out) == 12 + 4 + 3 * 8 == 40
    assert parse_options(out).sack == many[:3]
    assert len(build_options(sack=many)) == 4 + 4 * 8
    # Nothing fits after MSS+SACK_PERM+TS+WS (20 bytes) -> up to 2 blocks.
    full = build_options(mss=1, wscale=1, sack_permitted=True, timestamp=ts, sack=many)
    assert len(full) == 40 and parse_options(full).sack == many[:2]
    for out in (build_options(mss=1, timestamp=ts), build_options(wscale=3, sack_permitted=True)):
        assert len(out) % 4 == 0


def test_build_options_rejects_out_of_range() -> None:
    for kw in (
        {"mss": 70000},
        {"mss": -1},
        {"wscale": 15},
        {"timestamp": (2**32, 0)},
        {"timestamp": (0, -1)},
        {"sack": ((0, 2**32),)},
    ):
        with pytest.raises(ValueError):
            build_options(**kw)  # type: ignore[arg-type]


def test_parse_options_cases() -> None:
    assert parse_options(b"") == TcpOptions()
    assert parse_options(b"\x01\x01\x01") == TcpOptions()
    assert parse_options(b"\x03\x03\x0e") == TcpOptions(wscale=14)
    assert parse_options(b"\x03\x03\x0f") == TcpOptions(wscale=14)  # RFC 7323: cap at 14
    assert parse_options(b"\x03\x03\xff").wscale == 14
    # EOL ends the list even if bytes follow.
    assert parse_options(b"\x00\x02\x04\x05\xb4") == TcpOptions()
    # A malformed option stops parsing; what came before is kept.
    assert parse_options(b"\x02\x04\x05\xb4\x08") == TcpOptions(mss=1460)  # no length byte
    assert parse_options(b"\x02\x04\x05\xb4\x08\x01xx\x04\x02") == TcpOptions(mss=1460)  # len<2
    assert parse_options(b"\x02\x04\x05\xb4\x08\x0a\x00") == TcpOptions(mss=1460)  # overrun
    # Known kind, wrong length: skipped as a unit, parsing goes on.
    assert parse_options(b"\x02\x03\x05\x04\x02") == TcpOptions(sack_permitted=True)
    # Unknown kinds are skipped (e.g. TFO cookie 34, MD5 19).
    assert parse_options(b"\x22\x04ab\x13\x12" + bytes(16) + b"\x02\x04\x00\x10").mss == 16
    sack = b"\x05\x12" + struct.pack("!IIII", 10, 20, 30, 40)
    assert parse_options(sack).sack == ((10, 20), (30, 40))
    assert parse_options(b"\x05\x0b" + bytes(9)).sack == ()  # not a whole number of blocks
    assert parse_options(memoryview(b"\x01\x01\x08\x0a" + struct.pack("!II", 5, 6))).timestamp == (
        5,
        6,
    )


@given(
    st.none() | st.integers(0, 0xFFFF),
    st.none() | st.integers(0, 14),
    st.booleans(),
    st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), max_size=2),
)
def test_options_round_trip(
    mss: int | None,
    ws: int | None,
    sp: bool,
    ts: tuple[int, int] | None,
    sack: list[tuple[int, int]],
) -> None:
    raw = build_options(mss, ws, sp, ts, tuple(sack))
    assert len(raw) % 4 == 0 and len(raw) <= 40
    # The fullest SYN options take 20 bytes, which leaves room for 2 SACK blocks: all fit.
    assert parse_options(raw) == TcpOptions(mss, ws, sp, tuple(sack), ts)


@given(st.binary(max_size=60))
def test_parse_options_never_raises(raw: bytes) -> None:
    o = parse_options(raw)
    assert o.wscale is None or 0 <= o.wscale <= 14


def test_set_timestamp() -> None:
    syn = build_options(mss=1460, wscale=7, sack_permitted=True, timestamp=(1, 2))
    out = set_timestamp(syn, 0xAABBCCDD, 0x11223344)
    assert len(out) == len(syn)
    assert out[:6] == syn[:6] and out[16:] == syn[16:]  # only the 8 value bytes change
    assert out[8:16] == bytes.fromhex("aabbccdd11223344")
    assert parse_options(out).timestamp == (0xAABBCCDD, 0x11223344)
    data = build_options(timestamp=(5, 6))
    assert set_timestamp(data, 2**32 + 9, 10)[4:] == struct.pack("!II", 9, 10)  # mod 2**32
    assert set_timestamp(b"", 1, 2) == b""
    no_ts = build_options(mss=1460, sack_permitted=True)
    assert set_timestamp(no_ts, 1, 2) == no_ts
    # A TS option behind an unknown option and a malformed tail.
    odd = b"\x22\x04ab\x08\x0a" + bytes(8) + b"\x01\x01"
    assert (
        set_timestamp(odd, 3, 4) == b"\x22\x04ab\x08\x0a" + struct.pack("!II", 3, 4) + b"\x01\x01"
    )
    broken = b"\x08\x0a\x00"  # runs past the end: not a TS option
    assert set_timestamp(broken, 3, 4) == broken
    assert set_timestamp(b"\x02", 3, 4) == b"\x02"
    assert set_timestamp(b"\x00\x08\x0a" + bytes(8), 3, 4) == b"\x00\x08\x0a" + bytes(8)
    assert set_timestamp(b"\x08\x01" + bytes(8), 3, 4) == b"\x08\x01" + bytes(8)


# -- MTU split ----------------------------------------------------------------------------


def test_split_mtu_small_packet_is_returned_as_is() -> None:
    pkt = TcpPacket(1, 2, 3, 4, payload=bytes(1460))
    assert split_mtu(pkt, 1500)[0] is pkt and len(split_mtu(pkt, 1500)) == 1


@pytest.mark.parametrize("flags", [ACK, PSH | ACK, FIN | PSH | ACK, FIN | ACK])
def test_split_mtu_rules(flags: int) -> None:
    opts = build_options(timestamp=(7, 8))
    payload = bytes(range(256)) * 16 + b"tail"  # 4100 bytes
    pkt = TcpPacket(
        0xC6120001,
        0xC6120002,
        40000,
        80,
        seq=0xFFFFF000,
        ack=99,
        flags=flags,
        window=500,
        options=opts,
        payload=payload,
        ip_id=0xFFFE,
        ttl=33,
        tos=4,
    )
    pieces = split_mtu(pkt, 1500)
    hdrs = 20 + 20 + len(opts)
    chunk = 1500 - hdrs
    assert len(pieces) == -(-len(payload) // chunk) == 3
    assert b"".join(p.payload for p in pieces) == payload
    offset = 0
    for i, p in enumerate(pieces):
        wire = build(p)
        assert len(wire) <= 1500
        assert p.seq == (pkt.seq + offset) & 0xFFFFFFFF  # wraps past 2**32
        assert p.ip_id == (pkt.ip_id + i) & 0xFFFF  # wraps past 65535
        assert (p.ack, p.window, p.options, p.ttl, p.tos, p.df) == (99, 500, opts, 33, 4, True)
        assert p.data_len == len(p.payload)
        last = i == len(pieces) - 1
        assert p.flags == (flags if last else flags & ~(FIN | PSH))
        if not last:
            assert len(wire) == 1500
        offset += len(p.payload)


def test_split_mtu_syn_with_data_and_ip_options() -> None:
    pkt = TcpPacket(1, 2, 3, 4, seq=100, flags=SYN | FIN, payload=bytes(250), ip_options=b"\x01")
    pieces = split_mtu(pkt, 144)  # 24 + 20 headers -> 100 bytes of data each
    assert [len(p.payload) for p in pieces] == [100, 100, 50]
    assert [p.seq for p in pieces] == [100, 201, 301]  # the SYN takes one sequence number
    assert [p.flags for p in pieces] == [SYN, 0, FIN]
    assert all(len(build(p)) <= 144 for p in pieces)


def test_split_mtu_errors() -> None:
    truncated = TcpPacket(1, 2, 3, 4, payload=bytes(100), data_len=3000)
    with pytest.raises(DecodeError, match="truncated"):
        split_mtu(truncated, 1500)
    with pytest.raises(ValueError, match="no room"):
        split_mtu(TcpPacket(1, 2, 3, 4, options=bytes(40), payload=bytes(100)), 80)


@given(st.integers(0, 5000), st.integers(60, 1600), st.integers(0, 255))
@settings(max_examples=60)
def test_split_mtu_property(size: int, mtu: int, flags: int) -> None:
    payload = bytes(i & 0xFF for i in range(size))
    pkt = TcpPacket(1, 2, 3, 4, seq=2**32 - 10, flags=flags, payload=payload, options=bytes(12))
    pieces = split_mtu(pkt, mtu)
    assert b"".join(p.payload for p in pieces) == payload
    assert all(len(build(p)) <= mtu for p in pieces)
    offset = 0
    for i, p in enumerate(pieces):
        syn_shift = 1 if flags & SYN and i > 0 else 0
        assert p.seq == (pkt.seq + offset + syn_shift) % 2**32
        offset += len(p.payload)
    assert sum(1 for p in pieces if p.flags & SYN) == (1 if flags & SYN else 0)
    assert sum(1 for p in pieces if p.flags & FIN) == (1 if flags & FIN else 0)
    assert all(p.flags & RST == flags & RST for p in pieces)


# -- link layer ---------------------------------------------------------------------------


def test_l2_offset() -> None:
    eth = bytes(12) + b"\x08\x00" + b"\x45"
    assert l2_offset(eth, DLT_EN10MB) == 14
    assert l2_offset(bytes(12) + b"\x81\x00\x00\x05\x08\x00", DLT_EN10MB) == 18
    assert l2_offset(bytes(14) + b"\x08\x00", DLT_LINUX_SLL) == 16
    assert l2_offset(b"\x08\x00" + bytes(18), DLT_LINUX_SLL2) == 20
    for lt in (DLT_RAW, 12, 14, DLT_IPV4):
        assert l2_offset(b"\x45", lt) == 0
    bad = [
        (bytes(13), DLT_EN10MB, "Ethernet header truncated"),
        (bytes(12) + b"\x86\xdd", DLT_EN10MB, "ethertype 0x86dd at offset 12"),
        (bytes(12) + b"\x81\x00\x00", DLT_EN10MB, "802.1Q header truncated"),
        (bytes(12) + b"\x81\x00\x00\x05\x86\xdd", DLT_EN10MB, "VLAN ethertype 0x86dd"),
        (bytes(15), DLT_LINUX_SLL, "SLL header truncated"),
        (bytes(14) + b"\x08\x06", DLT_LINUX_SLL, "SLL protocol 0x0806"),
        (bytes(19), DLT_LINUX_SLL2, "SLL2 header truncated"),
        (b"\x86\xdd" + bytes(18), DLT_LINUX_SLL2, "SLL2 protocol 0x86dd"),
        (bytes(40), 104, "unsupported link type 104"),  # C_HDLC, refused like the C code
    ]
    for frame, lt, text in bad:
        with pytest.raises(DecodeError, match=text):
            l2_offset(frame, lt)


def test_l2_offset_on_captured_frames() -> None:
    for name in CAPTURES:
        linktype, frames = read_pcap(DATA / name)
        for frame in frames:
            off = l2_offset(frame, linktype)
            assert off == 14
            pkt = parse_ip(memoryview(frame)[off:])
            assert 80 in (pkt.sport, pkt.dport) or 8080 in (pkt.sport, pkt.dport)


@given(st.binary(max_size=40), st.sampled_from([0, 1, 12, 14, 101, 104, 113, 228, 276]))
def test_l2_offset_any_bytes(frame: bytes, lt: int) -> None:
    expected = {1: (14, 18), 12: (0,), 14: (0,), 101: (0,), 113: (16,), 228: (0,), 276: (20,)}
    try:
        off = l2_offset(frame, lt)
    except DecodeError as e:
        assert "\n" not in str(e)
        return
    assert off in expected[lt]
    assert off <= len(frame)


# -- addresses ----------------------------------------------------------------------------


def test_ip_text_conversions() -> None:
    assert ip_from_str("198.18.0.1") == 0xC6120001
    assert ip_from_str("0.0.0.0") == 0
    assert ip_from_str("255.255.255.255") == 0xFFFFFFFF
    assert ip_to_str(0xC6130164) == "198.19.1.100"
    assert ip_to_str(0) == "0.0.0.0"
    for bad in (
        "",
        "1.2.3",
        "1.2.3.4.5",
        "1.2.3.256",
        "1.2.3.-1",
        "1.2.3.a",
        " 1.2.3.4",
        "1.2.3.4 ",
        "1.2..4",
        "01.2.3.4",
        "1.2.3.0x1",
        "1.2.3.\u0661",
        "1.2.3.1000",
    ):
        with pytest.raises(ValueError, match="bad IPv4 address"):
            ip_from_str(bad)
    with pytest.raises(DecodeError):
        ip_from_str(None)  # type: ignore[arg-type]
    for bad_int in (-1, 2**32):
        with pytest.raises(ValueError, match="out of range"):
            ip_to_str(bad_int)


@given(st.integers(0, 2**32 - 1))
def test_ip_text_round_trip(addr: int) -> None:
    text = ip_to_str(addr)
    assert ip_from_str(text) == addr
    assert text == ".".join(str(b) for b in addr.to_bytes(4, "big"))


# -- Hypothesis: parse / build properties -------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
u16 = st.integers(0, 0xFFFF)
u8 = st.integers(0, 0xFF)


def words(max_words: int) -> st.SearchStrategy[bytes]:
    return st.integers(0, max_words).flatmap(lambda k: st.binary(min_size=4 * k, max_size=4 * k))


packets = st.builds(
    TcpPacket,
    src=u32,
    dst=u32,
    sport=u16,
    dport=u16,
    seq=u32,
    ack=u32,
    flags=u8,
    window=u16,
    options=words(10),
    payload=st.binary(max_size=1600),
    ip_id=u16,
    ttl=u8,
    tos=u8,
    df=st.booleans(),
    urgent=u16,
    ip_options=words(10),
)


@st.composite
def raw_packets(draw: st.DrawFn) -> bytes:
    return ref_packet(
        src=draw(u32),
        dst=draw(u32),
        sport=draw(u16),
        dport=draw(u16),
        seq=draw(u32),
        ack=draw(u32),
        flags=draw(u8),
        window=draw(u16),
        urgent=draw(u16),
        options=draw(words(10)),
        payload=draw(st.binary(max_size=600)),
        ip_id=draw(u16),
        ttl=draw(u8),
        tos=draw(u8),
        df=draw(st.booleans()),
        ip_options=draw(words(10)),
    )


@given(packets)
def test_parse_of_build_is_identity(pkt: TcpPacket) -> None:
    raw = build(pkt)
    assert ref_checksum(raw[: (raw[0] & 0x0F) * 4]) == 0
    assert parse_ip(raw) == pkt


@given(raw_packets())
def test_build_of_parse_is_identity(raw: bytes) -> None:
    assert build(parse_ip(raw)) == raw


@given(st.binary(max_size=120))
def test_any_bytes_parse_or_raise_decode_error(data: bytes) -> None:
    try:
        pkt = parse_ip(data)
    except DecodeError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert len(pkt.payload) <= pkt.data_len


@given(raw_packets(), st.data())
def test_mutated_packets_parse_or_raise_decode_error(raw: bytes, data: st.DataObject) -> None:
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(u8)
    cut = data.draw(st.integers(0, len(buf) + 8))
    mutated = bytes(buf[:cut]) + bytes(max(0, cut - len(buf)))
    try:
        pkt = parse_ip(mutated)
    except DecodeError:
        return
    assert len(pkt.payload) <= pkt.data_len
    assert 0 <= pkt.data_len <= 0xFFFF
