"""-o DEV and -F without privileges: frame layout, MAC parsing, the neighbour and route table
parsers, the neighbour resolution, the link sender's batching contract, filter errors."""

from __future__ import annotations

import errno
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.app.arguments import parse_config
from engine.codec import link, packet
from engine.core import rewrite
from engine.errors import ConfigError
from engine.io import send
from engine.io.capture import PcapFileSource, ReplayPacer, TransferFilter
from engine.io.pcapfilter import compile_filter

TARGET = packet.ip_from_str("198.18.2.3")
GATEWAY = packet.ip_from_str("198.18.2.1")
FAR_TARGET = packet.ip_from_str("198.18.7.9")
DEV_MAC = bytes.fromhex("02aabbccdd01")
TARGET_MAC = bytes.fromhex("02aabbccdd03")
GATEWAY_MAC = bytes.fromhex("02aabbccdd0f")

ARP_TEXT = """\
IP address       HW type     Flags       HW address            Mask     Device
198.18.2.3       0x1         0x2         02:aa:bb:cc:dd:03     *        srv0
198.18.2.1       0x1         0x2         02:AA:BB:CC:DD:0F     *        srv0
198.18.2.4       0x1         0x0         00:00:00:00:00:00     *        srv0
198.18.1.10      0x1         0x2         02:aa:bb:cc:dd:10     *        cli0
not an entry
"""
# /proc/net/route on a little-endian host: 198.18.2.0/24 on srv0, 198.18.7.0/24 via
# 198.18.2.1 on srv0, a default route on cli0.
ROUTE_TEXT = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
srv0\t000212C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
srv0\t000712C6\t010212C6\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0
cli0\t00000000\t010112C6\t0003\t0\t0\t0\t00000000\t0\t0\t0
srv0\t00000000\t00000000\t0000\t0\t0\t0\t00000000\t0\t0\t0
"""


def _packet(dst: int = TARGET, payload: bytes = b"x" * 10, seq: int = 1000) -> bytes:
    return packet.build(
        packet.TcpPacket(
            src=packet.ip_from_str("198.19.1.5"),
            dst=dst,
            sport=40000,
            dport=8080,
            seq=seq,
            ack=5,
            flags=packet.ACK | packet.PSH,
            window=1000,
            options=b"",
            payload=payload,
        )
    )


# -- engine/codec/link.py -------------------------------------------------------------------------


def test_ethernet_header_layout() -> None:
    hdr = link.ethernet_header(TARGET_MAC, DEV_MAC)
    assert hdr == TARGET_MAC + DEV_MAC + b"\x08\x00"
    assert len(hdr) == link.ETH_HEADER_BYTES
    with pytest.raises(ValueError):
        link.ethernet_header(TARGET_MAC[:5], DEV_MAC)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("02:aa:bb:cc:dd:03", TARGET_MAC),
        ("02:AA:BB:CC:DD:03", TARGET_MAC),
        ("02:aa:bb:cc:dd:3", None),  # 16 characters
        ("02:aa:bb:cc:dd:033", None),  # 18
        ("02-aa-bb-cc-dd-03", None),
        ("02:aa:bb:cc:dd:0g", None),
        ("02:aa:bb:cc:ddd:3", None),
        ("", None),
    ],
)
def test_mac_text(text: str, want: bytes | None) -> None:
    assert link.mac_from_text(text) == want
    if want is not None:
        assert link.mac_to_text(want) == text.lower()


def test_transfer_map_mac_errors_name_x_and_the_17_characters() -> None:
    (entry,) = rewrite.parse_transfer("80@02:aa:bb:cc:dd:01-198.18.2.3:8080@02:aa:bb:cc:dd:03")
    assert (entry.online_mac, entry.target_mac) == (DEV_MAC, TARGET_MAC)
    with pytest.raises(ConfigError) as exc:
        rewrite.parse_transfer("80@02:aa:bb:cc:dd:1-198.18.2.3:8080@02:aa:bb:cc:dd:03")
    assert exc.value.where == "-x" and "17 characters" in str(exc.value)
    with pytest.raises(ConfigError, match="both sides"):
        rewrite.parse_transfer("80-198.18.2.3:8080@02:aa:bb:cc:dd:03")


def test_parse_proc_arp_keeps_complete_entries_by_device() -> None:
    table = link.parse_proc_arp(ARP_TEXT)
    assert table == {
        (TARGET, "srv0"): TARGET_MAC,
        (GATEWAY, "srv0"): GATEWAY_MAC,
        (packet.ip_from_str("198.18.1.10"), "cli0"): bytes.fromhex("02aabbccdd10"),
    }
    assert link.parse_proc_arp("") == {}


def test_parse_proc_route_and_next_hop() -> None:
    routes = link.parse_proc_route(ROUTE_TEXT)
    assert len(routes) == 3  # the route without RTF_UP is left out
    assert routes[1].gateway == GATEWAY and routes[1].mask == 0xFFFFFF00
    assert link.next_hop(routes, TARGET, "srv0") == TARGET  # on the link
    assert link.next_hop(routes, FAR_TARGET, "srv0") == GATEWAY  # through the gateway
    # Only routes through the device count: cli0's default route is not srv0's next hop.
    other = packet.ip_from_str("203.0.113.1")
    assert link.next_hop(routes, other, "srv0") == other
    assert link.next_hop(routes, other, "cli0") == packet.ip_from_str("198.18.1.1")
    big_endian = ROUTE_TEXT.replace("000212C6", "C6120200").replace("00FFFFFF", "FFFFFF00")
    assert link.parse_proc_route(big_endian, little_endian=False)[0] == routes[0]


# -- NeighbourTable ---------------------------------------------------------------------------


class FakeHost:
    """/proc tables that change when probed, and a clock that sleeps instantly."""

    def __init__(self, arp: str = ARP_TEXT, appear_on_probe: str = "") -> None:
        self.arp = arp
        self.appear = appear_on_probe
        self.probes: list[int] = []
        self.now = 100.0

    def read(self, path: str) -> str:
        return {send.PROC_NET_ARP: self.arp, send.PROC_NET_ROUTE: ROUTE_TEXT}[path]

    def probe(self, addr: int) -> None:
        self.probes.append(addr)
        self.arp += self.appear

    def sleep(self, s: float) -> None:
        self.now += s

    def table(self, transfers) -> send.NeighbourTable:
        return send.NeighbourTable(
            "srv0",
            DEV_MAC,
            transfers,
            read=self.read,
            probe=self.probe,
            clock=lambda: self.now,
            sleep=self.sleep,
        )


def _entries(spec: str):
    return rewrite.parse_transfer(spec)


def test_neighbours_from_the_table_the_gateway_and_the_x_macs() -> None:
    host = FakeHost()
    x_mac = "02:11:22:33:44:55"
    table = host.table(
        _entries(f"80-198.18.2.3:8080,81-198.18.7.9:80,82@02:aa:bb:cc:dd:99-198.18.9.9:80@{x_mac}")
    )
    table.resolve()
    assert host.probes == []
    headers = table.headers()
    assert headers[TARGET] == TARGET_MAC + DEV_MAC + b"\x08\x00"
    assert headers[FAR_TARGET] == GATEWAY_MAC + DEV_MAC + b"\x08\x00"
    # The -x MACs are used as given, the source one included (as C's --pcap-send).
    nine = packet.ip_from_str("198.18.9.9")
    assert (
        headers[nine] == bytes.fromhex("021122334455") + bytes.fromhex("02aabbccdd99") + b"\x08\x00"
    )


def test_an_absent_neighbour_is_probed_then_found() -> None:
    host = FakeHost(
        arp=ARP_TEXT.replace("198.18.2.3 ", "198.18.2.33"),
        appear_on_probe=(
            "198.18.2.3       0x1         0x2         02:aa:bb:cc:dd:03     *        srv0\n"
        ),
    )
    table = host.table(_entries("80-198.18.2.3:8080"))
    table.resolve()
    assert host.probes == [TARGET]
    assert table.headers()[TARGET][:6] == TARGET_MAC


def test_no_neighbour_after_a_probe_is_one_error_naming_o() -> None:
    host = FakeHost(arp=ARP_TEXT.replace("198.18.2.1 ", "198.18.2.11"))
    table = host.table(_entries("80-198.18.7.9:80"))
    with pytest.raises(ConfigError) as exc:
        table.resolve(wait_s=0.5)
    assert exc.value.where == "-o"
    assert "198.18.7.9" in str(exc.value) and "gateway 198.18.2.1" in str(exc.value)
    assert "\n" not in str(exc.value)
    assert host.probes == [GATEWAY]


def test_a_loopback_target_cannot_go_through_a_device() -> None:
    with pytest.raises(ConfigError, match="loopback") as exc:
        FakeHost().table(_entries("80-127.0.0.1:8080"))
    assert exc.value.where == "-o"


def test_refresh_follows_a_changed_mac_and_keeps_a_vanished_one() -> None:
    host = FakeHost()
    table = host.table(_entries("80-198.18.2.3:8080"))
    table.resolve()
    host.arp = ARP_TEXT.replace("02:aa:bb:cc:dd:03", "02:aa:bb:cc:dd:04")
    notes = table.refresh()
    assert notes == ["198.18.2.3: next hop MAC is now 02:aa:bb:cc:dd:04"]
    assert table.headers()[TARGET][:6] == bytes.fromhex("02aabbccdd04")
    host.arp = ""
    assert "no neighbour entry" in table.refresh()[0]
    assert table.refresh() == []  # said once; probed again each time
    assert table.headers()[TARGET][:6] == bytes.fromhex("02aabbccdd04")
    assert host.probes == [TARGET, TARGET]


# -- LinkSender (its batch function replaced: no packet socket without privileges) -----------


class FakeLinkSender(send.LinkSender):
    def __init__(self, table: send.NeighbourTable, mtu: int = 1500) -> None:
        # What __init__ does after the device facts and the socket.
        self.device, self.ifindex, self.mac, self.mtu = "srv0", 7, DEV_MAC, mtu
        self.neighbours = table
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.counters = Counter()
        self._limiter = send.RateLimiter(60.0)
        self.refresh_s = 5.0
        self.clock = lambda: 0.0
        self._next_refresh = 5.0
        self._set_headers(table.headers())
        self.frames: list[bytes] = []
        self.refuse: dict[int, int] = {}  # frame number -> errno
        self.batch_path, self._batch = "fake", self._fake_batch

    def _fake_batch(self, fd, ifindex, packets, table, start):
        # The contract of _fastio.send_link_batch, frames built from the 18-byte records.
        assert ifindex == 7
        records = {table[i : i + 4]: table[i + 4 : i + 18] for i in range(0, len(table), 18)}
        sent = 0
        for pkt in packets[start:]:
            hdr = records.get(pkt[16:20])
            if hdr is None:
                return sent, errno.EHOSTUNREACH
            err = self.refuse.pop(len(self.frames), 0)
            if err:
                return sent, err
            self.frames.append(hdr + pkt)
            sent += 1
        return sent, 0


def _resolved(spec: str = "80-198.18.2.3:8080") -> send.NeighbourTable:
    table = FakeHost().table(_entries(spec))
    table.resolve()
    return table


@pytest.fixture
def fake_sender() -> Iterator[Callable[..., FakeLinkSender]]:
    """Makes FakeLinkSenders and closes their sockets after the test."""
    made: list[FakeLinkSender] = []

    def make(table: send.NeighbourTable, mtu: int = 1500) -> FakeLinkSender:
        made.append(FakeLinkSender(table, mtu))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_link_sender_frames_every_packet_and_counts_refusals(fake_sender) -> None:
    s = fake_sender(_resolved())
    unknown = _packet(dst=packet.ip_from_str("198.18.2.200"))
    pkts = [_packet(seq=1), unknown, _packet(seq=2), _packet(seq=3)]
    s.refuse[1] = errno.ENOBUFS  # the frame after the first one: the packet with seq 2
    assert s.send_batch(pkts) == 2
    assert s.frames == [TARGET_MAC + DEV_MAC + b"\x08\x00" + p for p in (pkts[0], pkts[3])]
    assert s.counters["send_packets"] == 2
    assert s.counters["send_bytes"] == len(pkts[0]) + len(pkts[3])
    assert s.counters["send_error_EHOSTUNREACH"] == 1
    assert s.counters["send_error_ENOBUFS"] == 1
    assert s.counters["send_errors"] == 2
    # The frame's IP header carries a valid checksum (nothing is left to the kernel).
    assert packet.checksum(s.frames[0][14:34]) == 0


def test_link_sender_splits_packets_larger_than_the_device_mtu(fake_sender) -> None:
    s = fake_sender(_resolved(), mtu=576)
    big = _packet(payload=bytes(range(256)) * 8, seq=5000)  # 2048 bytes of data
    assert s.send_batch([big]) == 4
    assert s.counters["send_split"] == 1
    pieces = [packet.parse_ip(f[14:]) for f in s.frames]
    assert all(len(f) - 14 <= 576 for f in s.frames)
    assert b"".join(p.payload for p in pieces) == packet.parse_ip(big).payload
    assert [p.seq for p in pieces] == [5000, 5536, 6072, 6608]


def test_fastio_refuses_unknown_destinations_before_any_syscall() -> None:
    fastio = pytest.importorskip("engine.io._fastio")
    record = TARGET.to_bytes(4, "big") + link.ethernet_header(TARGET_MAC, DEV_MAC)
    other = _packet(dst=packet.ip_from_str("198.18.2.200"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        assert fastio.send_link_batch(sock.fileno(), 1, [other], record) == (0, errno.EHOSTUNREACH)
        assert fastio.send_link_batch(sock.fileno(), 1, [b"short"], record) == (0, errno.EINVAL)
        with pytest.raises(ValueError):
            fastio.send_link_batch(sock.fileno(), 1, [other], record[:17])


def test_ctypes_fallback_joins_header_and_packet() -> None:
    got: list[bytes] = []

    def frames_sender(fd, frames, start):
        got.extend(frames[start:])
        return len(frames) - start, 0

    batch = send._frames_batch(frames_sender)
    record = TARGET.to_bytes(4, "big") + link.ethernet_header(TARGET_MAC, DEV_MAC)
    p1, p2 = _packet(seq=1), _packet(dst=FAR_TARGET)
    assert batch(3, 1, [p1, p2], record, 0) == (1, errno.EHOSTUNREACH)
    assert got == [record[4:] + p1]


# -- -F ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("tcp dst port", "syntax error"),
        ("ether host 02:aa:bb:cc:dd:03", "ethernet addresses"),
        ("vlan 7", "VLAN"),
        ("   ", "empty"),
    ],
)
def test_filter_errors_name_f_and_carry_libpcaps_message(expression: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        compile_filter(expression)
    assert exc.value.where == "-F"
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_bad_filter_and_unknown_device_fail_at_argument_parsing(tmp_path: Path) -> None:
    base = ["-x", "80-198.18.2.3:8080", "-s", "198.18.2.3"]
    with pytest.raises(ConfigError) as exc:
        parse_config([*base, "-F", "tcp and and"])
    assert exc.value.where == "-F"
    with pytest.raises(ConfigError) as exc:
        parse_config([*base, "-o", "no-such-dev0"])
    assert exc.value.where == "-o"
    conf = tmp_path / "c.toml"
    conf.write_text('[tcpcopy]\ntransfer = "80-198.18.2.3:8080"\nfilter = "tcp and and"\n')
    with pytest.raises(ConfigError) as exc:
        parse_config(["--config", str(conf), "-s", "198.18.2.3"])
    assert exc.value.where.endswith(":3: key 'filter' (-F)"), exc.value.where
    cfg = parse_config([*base, "-F", "  not src net 10.0.0.0/8 "])
    assert cfg.capture_filter == "not src net 10.0.0.0/8"


def test_filter_matches_packets_in_python() -> None:
    f = compile_filter("not src host 198.19.1.5 and tcp dst port 8080")
    assert not f.matches(_packet())
    other = bytearray(_packet())
    other[12:16] = socket.inet_aton("198.19.1.6")
    assert f.matches(bytes(other))


def _write_pcap(path: Path, ips: list[bytes]) -> None:
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, packet.DLT_EN10MB)]
    for i, ip in enumerate(ips):
        frame = TARGET_MAC + DEV_MAC + b"\x08\x00" + ip
        out.append(struct.pack("<IIII", 1000 + i, 0, len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(out))


def test_offline_replay_applies_the_filter_to_the_files_packets(tmp_path: Path) -> None:
    a = [_packet(seq=i) for i in range(3)]
    b = []
    for i in range(2):
        pkt = bytearray(_packet(seq=100 + i))
        pkt[12:16] = socket.inet_aton("198.19.1.6")
        b.append(bytes(pkt))
    path = tmp_path / "two-clients.pcap"
    _write_pcap(path, [a[0], b[0], a[1], b[1], a[2]])
    entries = rewrite.parse_transfer("198.18.2.3:8080-198.18.5.5:80")
    prefilter = TransferFilter.for_transfers(entries, "not src host 198.19.1.6")
    src = PcapFileSource([str(path)], ReplayPacer(accelerate=1000.0), 1, prefilter)
    got, now = [], 0.0
    while not src.exhausted and now < 1.0:
        got += [ip for _, ip in src.read_batch(now)]
        now += 0.01
    assert got == a
    assert prefilter.counters["capture_filter_excluded"] == 2


def test_link_sender_follows_the_neighbour_table_while_sending(fake_sender) -> None:
    host = FakeHost()
    table = host.table(_entries("80-198.18.2.3:8080"))
    table.resolve()
    s = fake_sender(table)
    now = [0.0]
    s.clock = lambda: now[0]
    s.send_batch([_packet(seq=1)])
    host.arp = ARP_TEXT.replace("02:aa:bb:cc:dd:03", "02:aa:bb:cc:dd:04")
    now[0] = 4.9  # before the refresh interval: the old MAC
    s.send_batch([_packet(seq=2)])
    now[0] = 5.1
    s.send_batch([_packet(seq=3)])
    assert [f[:6].hex() for f in s.frames] == ["02aabbccdd03", "02aabbccdd03", "02aabbccdd04"]
