"""engine/io/capture.py TPACKET_V3 block parsing, on synthetic blocks laid out as the kernel
lays them out (linux/if_packet.h: tpacket_block_desc, tpacket3_hdr, sockaddr_ll), and the
vectorized dispatch (flow_workers, dispatch_frames) that consumes them."""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest

from engine.codec import packet
from engine.io.capture import (
    PACKET_OUTGOING,
    TP_STATUS_USER,
    FrameBatch,
    block_frames,
    parse_block,
)
from engine.io.ring import Ring
from engine.proc.capture import CaptureProcess, flow_worker, flow_workers

BLOCK = 1 << 14
FRAME_HDR = 48  # tpacket3_hdr
SLL = struct.Struct("=HHiHBB8s")  # sockaddr_ll right after the header (TPACKET_ALIGN(48))
ETH = 14
PACKET_HOST, PACKET_BROADCAST = 0, 1


def align16(n: int) -> int:
    return (n + 15) & ~15


def tcp_ip(src: str, sport: int, flags: int, payload: bytes = b"", options: bytes = b"") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, 80, 7, 0, 5 << 4, flags, 65535, 0, 0) + payload
    ihl = 5 + len(options) // 4
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        ihl * 4 + len(tcp),
        0,
        0,
        64,
        6,
        0,
        bytes(packet.ip_from_str(src).to_bytes(4, "big")),
        bytes(packet.ip_from_str("198.18.1.2").to_bytes(4, "big")),
    )
    return head + options + tcp


def make_block(
    frames: list[tuple[bytes, int]], buf: bytearray, at: int, *, wire_extra: int = 0
) -> None:
    """Write one retired block at byte ``at``: frames = (ethernet frame, pkttype)."""
    first = FRAME_HDR  # offset_to_first_pkt: right after the 48-byte block descriptor
    off = at + first
    for i, (frame, pkttype) in enumerate(frames):
        mac = align16(FRAME_HDR + SLL.size) + 2  # the kernel aligns the *network* header
        net = mac + ETH
        size = align16(mac + len(frame))
        last = i == len(frames) - 1
        wire = len(frame) + (wire_extra if last else 0)
        struct.pack_into(
            "=IIIIIIHH", buf, off, 0 if last else size, 1, 2, len(frame), wire, 1, mac, net
        )
        SLL.pack_into(buf, off + FRAME_HDR, 17, 0x0008, 2, 1, pkttype, 6, bytes(8))
        buf[off + mac : off + mac + len(frame)] = frame
        off += size
    struct.pack_into("=IIIIIIQ", buf, at, 1, 0, TP_STATUS_USER, len(frames), first, off - at, 9)


def views(buf: bytearray):
    u8 = np.frombuffer(buf, dtype=np.uint8)
    return memoryview(buf).cast("I"), u8, u8.view(np.uint16), u8.view(np.uint32)


def eth(ip: bytes) -> bytes:
    return bytes(12) + b"\x08\x00" + ip


def test_block_frames_follow_the_chain():
    buf = bytearray(2 * BLOCK)
    pkts = [tcp_ip("198.19.0.1", 1000 + i, 0x18, b"x" * (i * 7)) for i in range(5)]
    make_block([(eth(p), PACKET_HOST) for p in pkts], buf, BLOCK)
    words, *_ = views(buf)
    offs = block_frames(words, BLOCK).tolist()
    assert len(offs) == 5 and offs[0] == BLOCK + FRAME_HDR
    assert all(b > a and b % 16 == 0 for a, b in itertools.pairwise(offs))


def test_parse_block_gives_each_ip_packet_its_key_and_flags():
    buf = bytearray(BLOCK)
    pkts = [
        tcp_ip("198.19.0.1", 1000, 0x02),
        tcp_ip("198.19.3.4", 65535, 0x18, b"GET / HTTP/1.1\r\n\r\n"),
        tcp_ip("198.19.0.9", 2000, 0x11, options=b"\x01\x01\x01\x00"),  # IHL 6
    ]
    make_block([(eth(p), PACKET_HOST) for p in pkts], buf, 0)
    words, u8, u16, u32 = views(buf)
    starts, lengths, keys, flags, ok, cut = parse_block(words, u8, u16, u32, 0)
    assert cut == 0 and ok.all()
    assert [bytes(buf[s : s + n]) for s, n in zip(starts, lengths, strict=True)] == pkts
    for k, f, p in zip(keys.tolist(), flags.tolist(), pkts, strict=True):
        parsed = packet.parse_ip(p)
        assert k == parsed.src << 16 | parsed.sport
        assert f == parsed.flags


def test_outgoing_and_not_for_us_frames_are_left_out_and_truncated_ones_counted():
    buf = bytearray(BLOCK)
    mine = tcp_ip("198.19.0.1", 1000, 0x18, b"a")
    frames = [
        (eth(mine), PACKET_HOST),
        (eth(tcp_ip("198.19.0.2", 1001, 0x18, b"b")), PACKET_OUTGOING),
        (eth(tcp_ip("198.19.0.3", 1002, 0x18, b"c")), PACKET_BROADCAST),
        (eth(tcp_ip("198.19.0.4", 1003, 0x18, b"d")), PACKET_HOST),  # cut short below
    ]
    make_block(frames, buf, 0, wire_extra=100)
    words, u8, u16, u32 = views(buf)
    starts, lengths, _k, _f, _ok, cut = parse_block(words, u8, u16, u32, 0, host_only=True)
    assert cut == 1
    assert [bytes(buf[s : s + n]) for s, n in zip(starts, lengths, strict=True)] == [mine]
    starts, *_rest, cut = parse_block(words, u8, u16, u32, 0, host_only=False)
    assert len(starts) == 2 and cut == 1  # the broadcast one stays without host_only


def test_a_non_tcp_frame_is_marked_not_well_formed():
    buf = bytearray(BLOCK)
    udp = bytearray(tcp_ip("198.19.0.1", 1000, 0x18, b"z"))
    udp[9] = 17
    make_block([(eth(bytes(udp)), PACKET_HOST), (eth(tcp_ip("198.19.0.1", 1, 2)), 0)], buf, 0)
    words, u8, u16, u32 = views(buf)
    _s, _l, keys, _f, ok, _c = parse_block(words, u8, u16, u32, 0)
    assert ok.tolist() == [False, True] and keys[0] == 0


def test_an_empty_block():
    buf = bytearray(BLOCK)
    struct.pack_into("=IIIIIIQ", buf, 0, 1, 0, TP_STATUS_USER, 0, 48, 48, 1)
    starts, *_ = parse_block(*views(buf), 0)
    assert len(starts) == 0


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_flow_workers_is_flow_worker_vectorized(workers):
    rng = np.random.default_rng(5)
    ips = rng.integers(0, 1 << 32, 2000, dtype=np.uint64)
    ports = rng.integers(0, 1 << 16, 2000, dtype=np.uint64)
    keys = ips << np.uint64(16) | ports
    got = flow_workers(keys, workers).tolist()
    assert got == [flow_worker(int(i), int(p), workers) for i, p in zip(ips, ports, strict=True)]


def test_dispatch_frames_puts_each_packet_on_its_flows_ring_in_order():
    buf = bytearray(BLOCK * 2)
    pkts = [tcp_ip(f"198.19.0.{i % 7}", 1000 + i % 13, 0x18, b"q" * i) for i in range(60)]
    make_block([(eth(p), PACKET_HOST) for p in pkts[:30]], buf, 0)
    make_block([(eth(p), PACKET_HOST) for p in pkts[30:]], buf, BLOCK)
    words, u8, u16, u32 = views(buf)
    rings = [Ring.create(1 << 16) for _ in range(3)]
    try:
        proc = CaptureProcess([], rings, 1500, clock=lambda: 0.0)
        for block in (0, BLOCK):
            starts, lengths, keys, flags, _ok, _c = parse_block(words, u8, u16, u32, block)
            proc.dispatch_frames(FrameBatch(memoryview(buf), starts, lengths, keys, flags, 2.5))
        expected: list[list[bytes]] = [[], [], []]
        for p in pkts:
            q = packet.parse_ip(p)
            expected[flow_worker(q.src, q.sport, 3)].append(p)
        got = [r.pop_packets(100) for r in rings]
        assert [[d for _t, d in g] for g in got] == expected
        assert all(t == 2.5 for g in got for t, _d in g)
    finally:
        for r in rings:
            r.close()


def test_dispatch_frames_splits_an_aggregate_larger_than_mtu_in_order():
    buf = bytearray(BLOCK)
    small = tcp_ip("198.19.0.1", 1000, 0x18, b"a" * 10)
    big = tcp_ip("198.19.0.1", 1000, 0x18, b"b" * 3000)
    after = tcp_ip("198.19.0.1", 1000, 0x18, b"c" * 10)
    make_block([(eth(p), PACKET_HOST) for p in (small, big, after)], buf, 0)
    ring = Ring.create(1 << 16)
    try:
        proc = CaptureProcess([], [ring], 1500, clock=lambda: 0.0)
        starts, lengths, keys, flags, _ok, _c = parse_block(*views(buf), 0)
        proc.dispatch_frames(FrameBatch(memoryview(buf), starts, lengths, keys, flags, 1.0))
        got = [d for _t, d in ring.pop_packets(100)]
        assert got[0] == small and got[-1] == after and len(got) == 5
        payload = b"".join(packet.parse_ip(d).payload for d in got[1:-1])
        assert payload == b"b" * 3000 and all(len(d) <= 1500 for d in got)
        assert proc.counters["capture_split"] == 1
    finally:
        ring.close()


def test_open_live_source_falls_back_to_recv_and_says_so_once(monkeypatch, caplog):
    import errno
    import logging

    from engine.io import capture

    made = []

    def refuse(*args, **kw):
        raise OSError(errno.ENOPROTOOPT, "Protocol not available")

    monkeypatch.setattr(capture, "TPacketSource", refuse)
    monkeypatch.setattr(capture, "_fallback_logged", False)
    monkeypatch.setattr(capture, "RawTcpSource", lambda *a, **k: made.append(("raw", a)) or "raw")
    monkeypatch.setattr(
        capture, "PacketSource", lambda *a, **k: made.append(("packet", a)) or "packet"
    )
    with caplog.at_level(logging.WARNING, logger="tcpcopy"):
        assert capture.open_live_source(None, None, 1 << 20, host_only=True) == "raw"
        assert capture.open_live_source("eth9", None, 1 << 20, (80,)) == "packet"
    assert [m[0] for m in made] == ["raw", "packet"]
    assert made[1][1][0] == "eth9"
    lines = [r.getMessage() for r in caplog.records if "TPACKET_V3" in r.getMessage()]
    assert len(lines) == 1 and "packet by packet" in lines[0]


def test_open_live_source_does_not_hide_a_missing_device(monkeypatch):
    import errno

    from engine.io import capture

    def no_device(*args, **kw):
        raise OSError(errno.ENODEV, "no such network device: eth9")

    monkeypatch.setattr(capture, "TPacketSource", no_device)
    with pytest.raises(OSError) as info:
        capture.open_live_source("eth9", None, 1 << 20)
    assert info.value.errno == errno.ENODEV
