"""engine/codec/bpf.py: the capture filter program against real captures, and the kernel running it.

A small classic-BPF interpreter (written here from linux/filter.h semantics) runs the program
on every frame of the shared captures; its verdict must equal ``bpf.keep_ipv4`` (the Python
fallback) and the meaning stated in the spec (§3.3 steps 1, 2, 8), re-derived from
``engine.codec.packet.parse_ip``.  The kernel itself runs the IP_BASE program through an AF_UNIX
datagram socket (socket filters apply there too, no privilege needed).
"""

from __future__ import annotations

import socket
import struct

import pytest

from engine.codec import bpf, packet
from engine.codec.packet import FIN, RST, SYN
from engine.io.capture import attach_bpf
from tests.paths import CONTROL_PCAP, ONLINE_HTTP_PCAP, TARGET_SIDE_PCAP

ONLINE_IP = packet.ip_from_str("198.18.1.2")  # the online nginx in the reference capture
OTHER_IP = packet.ip_from_str("198.18.9.9")
PCAPS = [ONLINE_HTTP_PCAP, TARGET_SIDE_PCAP, CONTROL_PCAP]
TRANSFER_SETS = [
    [(ONLINE_IP, 80)],
    [(0, 80)],
    [(OTHER_IP, 80)],
    [(OTHER_IP, 80), (ONLINE_IP, 80), (0, 8080), (0, 36524)],
    [(0, 8080)],
]

M32 = 0xFFFFFFFF
# linux/filter.h opcode parts engine/codec/bpf.py does not emit (libpcap's -F programs may)
BPF_LEN, BPF_STX = 0x80, 0x03
BPF_ADD, BPF_MUL, BPF_OR, BPF_LSH = 0x00, 0x20, 0x40, 0x60
BPF_JGT = 0x20


class _OutOfBounds(Exception):
    pass


def run_bpf(
    prog,
    data: bytes,
    *,
    net_off: int = 0,
    protocol: int = bpf.ETH_P_IP,
    pkttype: int = 0,
) -> int:
    """Interpret ``prog`` on a packet as the kernel does on an skb whose data is ``data`` and
    whose network header is at ``net_off``.  A load out of bounds ends the program with 0."""

    def addr(k: int, size: int) -> int:
        k = k - (1 << 32) if k >= 1 << 31 else k
        if k >= 0:
            off = k
        elif k >= bpf.SKF_NET_OFF and k < bpf.SKF_AD_OFF:
            off = net_off + (k - bpf.SKF_NET_OFF)
        else:
            raise AssertionError(f"unexpected offset {k}")
        if off < 0 or off + size > len(data):
            raise _OutOfBounds
        return off

    def load(k: int, size: int) -> int:
        kk = k - (1 << 32) if k >= 1 << 31 else k
        if bpf.SKF_AD_OFF <= kk < 0:
            return {bpf.SKF_AD_PROTOCOL: protocol, bpf.SKF_AD_PKTTYPE: pkttype}[kk - bpf.SKF_AD_OFF]
        off = addr(k, size)
        return int.from_bytes(data[off : off + size], "big")

    a = x = 0
    mem = [0] * 16
    pc = 0
    steps = 0
    try:
        while True:
            steps += 1
            assert steps <= len(prog), "a classic BPF program cannot loop"
            code, jt, jf, k = prog[pc]
            pc += 1
            cls = code & 0x07
            size = {bpf.BPF_W: 4, bpf.BPF_H: 2, bpf.BPF_B: 1}.get(code & 0x18, 0)
            mode = code & 0xE0
            if cls == bpf.BPF_LD:
                if mode == bpf.BPF_ABS:
                    a = load(k, size)
                elif mode == bpf.BPF_IND:
                    a = load((x + k) & M32, size)
                elif mode == bpf.BPF_IMM:
                    a = k
                elif mode == bpf.BPF_MEM:
                    a = mem[k]
                elif mode == BPF_LEN:
                    a = len(data)
                else:
                    raise AssertionError(f"ld mode {mode:#x}")
            elif cls == bpf.BPF_LDX:
                if mode == bpf.BPF_MSH:
                    x = (load(k, 1) & 0x0F) * 4
                elif mode == bpf.BPF_MEM:
                    x = mem[k]
                elif mode == bpf.BPF_IMM:
                    x = k
                else:
                    raise AssertionError(f"ldx mode {mode:#x}")
            elif cls == bpf.BPF_ST:
                mem[k] = a
            elif cls == BPF_STX:
                mem[k] = x
            elif cls == bpf.BPF_ALU:
                src = x if code & bpf.BPF_X else k
                op = code & 0xF0
                if op == bpf.BPF_SUB:
                    a = (a - src) & M32
                elif op == bpf.BPF_AND:
                    a &= src
                elif op == bpf.BPF_RSH:
                    a >>= src
                elif op == BPF_ADD:
                    a = (a + src) & M32
                elif op == BPF_OR:
                    a |= src
                elif op == BPF_LSH:
                    a = (a << src) & M32
                elif op == BPF_MUL:
                    a = (a * src) & M32
                else:
                    raise AssertionError(f"alu op {op:#x}")
            elif cls == bpf.BPF_MISC:
                if code == bpf.BPF_MISC | bpf.BPF_TXA:
                    a = x
                else:
                    assert code == bpf.BPF_MISC  # TAX
                    x = a
            elif cls == bpf.BPF_JMP:
                op = code & 0xF0
                if op == bpf.BPF_JA:
                    pc += k
                    continue
                if op == bpf.BPF_JEQ:
                    cond = a == (x if code & bpf.BPF_X else k)
                elif op == bpf.BPF_JGE:
                    cond = a >= (x if code & bpf.BPF_X else k)
                elif op == BPF_JGT:
                    cond = a > (x if code & bpf.BPF_X else k)
                elif op == bpf.BPF_JSET:
                    cond = bool(a & (x if code & bpf.BPF_X else k))
                else:
                    raise AssertionError(f"jmp op {op:#x}")
                pc += jt if cond else jf
            elif cls == bpf.BPF_RET:
                return a if code & 0x18 == 0x10 else k
            else:
                raise AssertionError(f"class {cls}")
    except _OutOfBounds:
        return 0


def read_frames(path) -> list[bytes]:
    """Every record of a microsecond pcap (parsed here with struct, not engine.codec.pcapfile)."""
    data = path.read_bytes()
    order = "<" if struct.unpack_from("<I", data)[0] == 0xA1B2C3D4 else ">"
    assert struct.unpack_from(order + "I", data)[0] == 0xA1B2C3D4
    assert struct.unpack_from(order + "I", data, 20)[0] == packet.DLT_EN10MB
    off, out = 24, []
    while off + 16 <= len(data):
        _s, _u, caplen, _w = struct.unpack_from(order + "IIII", data, off)
        out.append(data[off + 16 : off + 16 + caplen])
        off += 16 + caplen
    return out


def spec_keep(ip: bytes, transfers) -> bool:
    """spec §3.3 steps 1, 2, 8 as stated, decided from engine.codec.packet's full parse."""
    if int.from_bytes(ip[6:8], "big") & 0x1FFF:  # a non-first fragment has no TCP header
        return False
    p = packet.parse_ip(ip)
    if not any(port == p.dport and ip_ in (0, p.dst) for ip_, port in transfers):
        return False
    return bool(p.flags & (SYN | FIN | RST)) or p.data_len > 0


def all_frames():
    frames = [f for path in PCAPS for f in read_frames(path)]
    assert len(frames) > 300
    return frames


def test_program_matches_python_filter_and_spec_on_real_captures():
    frames = all_frames()
    pure_acks_seen = 0
    for transfers in TRANSFER_SETS:
        ip_prog = bpf.capture_program(transfers, bpf.IP_BASE)
        net_prog = bpf.capture_program(transfers, bpf.NET_BASE)
        kept = 0
        for frame in frames:
            assert frame[12:14] == b"\x08\x00"
            ip = frame[14:]
            want = bpf.keep_ipv4(ip, transfers)
            assert want == spec_keep(ip, transfers)
            assert (run_bpf(ip_prog, ip) == bpf.BPF_ACCEPT_BYTES) == want
            assert (run_bpf(net_prog, frame, net_off=14) == bpf.BPF_ACCEPT_BYTES) == want
            assert run_bpf(ip_prog, ip) in (0, bpf.BPF_ACCEPT_BYTES)
            kept += want
            p = packet.parse_ip(ip)
            if transfers == [(0, 80)] and p.dport == 80 and not p.data_len:
                pure_acks_seen += not p.flags & (SYN | FIN | RST)
        assert 0 <= kept < len(frames)
        if transfers != [(OTHER_IP, 80)]:
            assert kept > 0
    assert pure_acks_seen > 50  # the captures do contain pure ACKs to the online port


def _tcp(flags: int, payload: bytes = b"", dst: int = ONLINE_IP, dport: int = 80) -> bytes:
    return packet.build(
        packet.TcpPacket(
            src=packet.ip_from_str("198.18.1.10"),
            dst=dst,
            sport=40000,
            dport=dport,
            seq=1,
            ack=2,
            flags=flags,
            window=100,
            payload=payload,
        )
    )


def test_edge_cases_agree():
    transfers = [(ONLINE_IP, 80)]
    ip_prog = bpf.capture_program(transfers)
    net_prog = bpf.capture_program(transfers, bpf.NET_BASE)
    eth = b"\x02" * 12 + b"\x08\x00"
    cases = {
        "pure ack": (_tcp(packet.ACK), False),
        "data": (_tcp(packet.ACK | packet.PSH, b"x"), True),
        "syn": (_tcp(SYN), True),
        "fin": (_tcp(FIN | packet.ACK), True),
        "rst": (_tcp(RST), True),
        "other port": (_tcp(packet.ACK, b"x", dport=81), False),
        "other ip": (_tcp(packet.ACK, b"x", dst=OTHER_IP), False),
    }
    ack = bytearray(_tcp(packet.ACK))
    cases["ethernet padding"] = (bytes(ack) + bytes(6), False)  # tot_len, not the frame
    gro = bytearray(_tcp(packet.ACK, b"y" * 100))
    gro[2:4] = b"\x00\x00"  # BIG TCP aggregates carry tot_len 0
    cases["tot_len 0"] = (bytes(gro), True)
    frag = bytearray(_tcp(packet.ACK, b"x"))
    frag[6:8] = b"\x00\x10"  # a non-first fragment
    cases["fragment"] = (bytes(frag), False)
    short = _tcp(SYN)[:33]  # the TCP flags are not there
    cases["short"] = (short, False)
    udp = bytearray(_tcp(packet.ACK, b"x"))
    udp[9] = 17
    cases["udp"] = (bytes(udp), False)
    v6 = bytearray(_tcp(SYN))
    v6[0] = 0x65
    cases["version 6"] = (bytes(v6), False)
    for name, (ip, want) in cases.items():
        assert bpf.keep_ipv4(ip, transfers) is want, name
        assert (run_bpf(ip_prog, ip) > 0) is want, name
        assert (run_bpf(net_prog, eth + ip, net_off=14) > 0) is want, name
    data = _tcp(packet.ACK | packet.PSH, b"x")
    # our own frames leaving a device are never captured
    assert run_bpf(net_prog, eth + data, net_off=14, pkttype=bpf.PACKET_OUTGOING) == 0
    assert run_bpf(net_prog, eth + data, net_off=14, protocol=0x0806) == 0  # ARP etc.
    # an 802.1Q tag still in the frame: the skb's network header points at the tag
    tagged = b"\x02" * 12 + b"\x81\x00" + b"\x00\x05\x08\x00" + data
    assert run_bpf(net_prog, tagged, net_off=14, protocol=bpf.ETH_P_8021Q) > 0
    tagged_ack = b"\x02" * 12 + b"\x81\x00" + b"\x00\x05\x08\x00" + _tcp(packet.ACK)
    assert run_bpf(net_prog, tagged_ack, net_off=14, protocol=bpf.ETH_P_8021Q) == 0
    # raw-IP devices (tun): the network header is at 0
    assert run_bpf(net_prog, data, net_off=0) > 0


def test_wildcard_entry_matches_any_address_and_ports_only_is_a_superset():
    any80 = bpf.capture_program([(OTHER_IP, 80), (0, 80)])
    assert run_bpf(any80, _tcp(SYN, dst=ONLINE_IP)) > 0
    exact = bpf.capture_program([(OTHER_IP, 80)])
    assert run_bpf(exact, _tcp(SYN, dst=ONLINE_IP)) == 0
    loose = bpf.capture_program([(OTHER_IP, 80)], ports_only=True)
    assert run_bpf(loose, _tcp(SYN, dst=ONLINE_IP)) > 0
    assert run_bpf(loose, _tcp(packet.ACK, dst=ONLINE_IP)) == 0


def test_pure_acks_can_be_kept():
    transfers = [(ONLINE_IP, 80)]
    prog = bpf.capture_program(transfers, pure_acks=True)
    for ip in (_tcp(packet.ACK), _tcp(SYN), _tcp(packet.ACK, b"x")):
        assert run_bpf(prog, ip) > 0
        assert bpf.keep_ipv4(ip, transfers, pure_acks=True)
    assert run_bpf(prog, _tcp(packet.ACK, dport=81)) == 0


def test_program_shape_and_size_limits():
    prog = bpf.capture_program([(ONLINE_IP, 80), (0, 8080)], bpf.NET_BASE)
    for i, (code, jt, jf, k) in enumerate(prog):
        assert 0 <= jt <= 255 and 0 <= jf <= 255 and 0 <= k <= 0xFFFFFFFF
        if code & 0x07 == bpf.BPF_JMP:
            target = i + 1 + (k if code == bpf.BPF_JMP | bpf.BPF_JA else max(jt, jf))
            assert target < len(prog)
    assert prog[-1][0] == bpf.BPF_RET
    many = [(ONLINE_IP + i, 80) for i in range(400)]
    with pytest.raises(bpf.ProgramTooLarge):
        bpf.capture_program(many)
    loose = bpf.capture_program(many, ports_only=True)
    assert run_bpf(loose, _tcp(SYN, dst=ONLINE_IP + 399)) > 0
    with pytest.raises(ValueError):
        bpf.capture_program([])


def test_kernel_runs_the_program_like_the_python_filter():
    """The kernel's own verdicts (AF_UNIX datagrams are filtered with the data at offset 0)."""
    transfers = [(ONLINE_IP, 80), (0, 36524)]
    frames = all_frames()
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with rx, tx:
        rx.setblocking(False)
        attach_bpf(rx, bpf.capture_program(transfers, bpf.IP_BASE))
        want = []
        got = []
        for frame in frames:
            ip = frame[14:]
            tx.send(ip)
            if bpf.keep_ipv4(ip, transfers):
                want.append(ip)
            try:
                got.append(rx.recv(1 << 17))
            except BlockingIOError:
                pass
    assert want and got == want


# -- -F: the libpcap program behind the -x program ----------------------------------------------

USER_FILTERS = [
    "not src host 198.18.1.10",
    "tcp[tcpflags] & (tcp-syn|tcp-fin) != 0",
    "tcp src portrange 30000-50000 or dst port 8080",
    "ip[8] > 60 and src net 198.18.0.0/16",
]


@pytest.mark.parametrize("expression", USER_FILTERS)
def test_user_filter_runs_after_the_transfer_program_on_every_base(expression: str) -> None:
    """The combined program keeps a packet iff the -x rule and libpcap's own verdict on the
    same packet (pcap_offline_filter) both keep it: on the IP socket, on AF_PACKET frames and
    behind a VLAN tag the NIC left in place."""
    from engine.io.pcapfilter import compile_filter

    user = compile_filter(expression)
    transfers = [(0, 80), (0, 8080)]
    frames = all_frames()
    ip_prog = bpf.capture_program(transfers, bpf.IP_BASE, user=user.program)
    net_prog = bpf.capture_program(transfers, bpf.NET_BASE, user=user.program)
    verdicts = []
    for frame in frames:
        ip = frame[14:]
        want = bpf.keep_ipv4(ip, transfers) and user.matches(ip)
        verdicts.append(want)
        assert (run_bpf(ip_prog, ip) == bpf.BPF_ACCEPT_BYTES) == want, frame.hex()
        assert (run_bpf(net_prog, frame, net_off=14) == bpf.BPF_ACCEPT_BYTES) == want
        tagged = frame[:12] + b"\x81\x00\x00\x07" + frame[12:]  # the tag's ethertype, then IP
        got = run_bpf(net_prog, tagged, net_off=14, protocol=bpf.ETH_P_8021Q)
        assert (got == bpf.BPF_ACCEPT_BYTES) == want
    # The filter decides something on these captures: some kept, some left out by -F alone.
    assert any(verdicts)
    assert any(
        bpf.keep_ipv4(f[14:], transfers) and not v for f, v in zip(frames, verdicts, strict=True)
    )


def test_rebase_moves_packet_loads_only() -> None:
    prog = [
        (bpf.BPF_LD | bpf.BPF_B | bpf.BPF_ABS, 0, 0, 9),
        (bpf.BPF_LD | bpf.BPF_W | bpf.BPF_ABS, 0, 0, (bpf.SKF_AD_OFF + 4) & M32),  # ancillary
        (bpf.BPF_LDX | bpf.BPF_B | bpf.BPF_MSH, 0, 0, 0),
        (bpf.BPF_LD | bpf.BPF_H | bpf.BPF_IND, 0, 0, 2),
        (bpf.BPF_LD | bpf.BPF_IMM, 0, 0, 7),
        (bpf.BPF_JMP | bpf.BPF_JEQ | bpf.BPF_K, 0, 1, 80),
        (bpf.BPF_RET | bpf.BPF_K, 0, 0, 262144),
        (bpf.BPF_RET | bpf.BPF_K, 0, 0, 0),
    ]
    moved = bpf.rebase(prog, bpf.NET_BASE)
    assert moved[0][3] == (bpf.NET_BASE + 9) & M32
    assert moved[1] == prog[1]
    assert moved[2][3] == bpf.NET_BASE & M32
    assert moved[3][3] == (bpf.NET_BASE + 2) & M32
    assert moved[4:6] == prog[4:6]
    assert moved[6] == (bpf.BPF_RET | bpf.BPF_K, 0, 0, bpf.BPF_ACCEPT_BYTES)
    assert moved[7] == prog[7]
    assert bpf.rebase(prog, bpf.IP_BASE)[:6] == prog[:6]


def test_kernel_accepts_and_runs_the_combined_program() -> None:
    from engine.io.pcapfilter import compile_filter

    user = compile_filter("not src host 198.18.1.10")
    transfers = [(0, 80), (0, 8080)]
    frames = all_frames()
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with rx, tx:
        rx.setblocking(False)
        attach_bpf(rx, bpf.capture_program(transfers, bpf.IP_BASE, user=user.program))
        want, got = [], []
        for frame in frames:
            ip = frame[14:]
            tx.send(ip)
            if bpf.keep_ipv4(ip, transfers) and user.matches(ip):
                want.append(ip)
            try:
                got.append(rx.recv(1 << 17))
            except BlockingIOError:
                pass
    assert want and got == want
