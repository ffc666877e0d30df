"""Classic BPF programs for the capture sockets (SO_ATTACH_FILTER), built as data.  (pure)

Theory of operation
-------------------
The capture process spent most of its time receiving, in Python, packets it then threw away:
other services' traffic and the clients' pure ACKs (about half of a keep-alive load).  A
classic BPF program attached to the capture socket makes the kernel drop them before they
are queued, so user space sees only what the replay needs.  The program accepts a packet iff

* it is IPv4 TCP, IHL >= 5, and not a non-first fragment (spec §3.3 step 1);
* its (dst ip, dst port) matches a -x entry, an entry with ip 0 matching the port on any
  address (spec §3.3 step 2, ``rewrite.match_transfer``);
* it is not a pure ACK: SYN, FIN or RST is set, or the TCP payload length
  ``tot_len - ihl*4 - doff*4`` is not 0 (spec §3.3 step 8: pure ACKs of established sessions
  carry nothing the replay needs; the session fakes the handshake's third ACK, spec §3.11).
  The length is computed in 32-bit unsigned arithmetic, so a GRO/BIG TCP aggregate whose
  tot_len is 0 is kept (the engine splits it, spec §3.4).

With ``-F`` (engine/io/pcapfilter.py) the user's program, compiled by libpcap for an IP header
at offset 0, is placed where the -x program accepts: ``rebase`` moves its packet loads onto
the IP header this program found, and its accepting returns become ``BPF_ACCEPT_BYTES``.  So
one program runs in the kernel and a packet is kept only when both accept it.

An accepted packet is returned whole (``BPF_ACCEPT_BYTES``).  ``keep_ipv4`` is the same
decision in Python, for offline pcap files and for sockets the program could not be attached
to; the unit tests run both on real captures and require identical answers.

Where the program finds the IP header (``base``):

* ``IP_BASE`` (0): an AF_INET/SOCK_RAW/IPPROTO_TCP socket's filter sees the IP header at 0.
* ``NET_BASE`` (SKF_NET_OFF): AF_PACKET.  Negative offsets from SKF_NET_OFF load relative to
  the skb's network header, whatever the link layer is (Ethernet, a VLAN tag the NIC did not
  strip, a raw-IP tunnel, or every device at once), and the ancillary loads SKF_AD_PROTOCOL
  (the ethertype) and SKF_AD_PKTTYPE (outgoing frames: our own sends) replace parsing the
  link header.  A frame whose ethertype is still 802.1Q/802.1ad (a second tag) is followed
  through one tag: IP at network header + 4.

Instructions are ``(code, jt, jf, k)`` tuples (struct sock_filter).  ``_Asm`` resolves
symbolic labels; conditional jumps are 8-bit, so a program whose jumps do not fit (hundreds of
-x entries) raises ``ProgramTooLarge`` and the caller falls back to the ports-only program
(``ports_only=True``: a superset) or to Python filtering.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from engine.codec.link import ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP
from engine.codec.packet import IP_FRAG_OFFSET_MASK, IPPROTO_TCP

__all__ = [
    "BPF_ACCEPT_BYTES",
    "IP_BASE",
    "NET_BASE",
    "Insn",
    "ProgramTooLarge",
    "capture_program",
    "is_pure_ack",
    "keep_ipv4",
    "rebase",
]

Insn = tuple[int, int, int, int]

# linux/filter.h opcode parts
BPF_LD, BPF_LDX, BPF_ST, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = (
    0x00,
    0x01,
    0x02,
    0x04,
    0x05,
    0x06,
    0x07,
)
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_MSH = 0x00, 0x20, 0x40, 0x60, 0xA0
BPF_SUB, BPF_AND, BPF_RSH = 0x10, 0x50, 0x70
BPF_JA, BPF_JEQ, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x30, 0x40
BPF_K, BPF_X = 0x00, 0x08
BPF_TXA = 0x80

BPF_MAXINSNS = 4096
JUMP_MAX = 255
"""Conditional jump offsets are u8 (struct sock_filter jt/jf)."""

SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL = 0
SKF_AD_PKTTYPE = 4
SKF_NET_OFF = -0x100000
PACKET_OUTGOING = 4

IP_BASE = 0
NET_BASE = SKF_NET_OFF
BPF_ACCEPT_BYTES = 0x40000
"""Snap length of an accepted packet: all of it (GRO aggregates exceed 64 KiB)."""

VLAN_TAG_BYTES = 4
TCP_FIN, TCP_SYN, TCP_RST = 0x01, 0x02, 0x04
TCP_FIN_SYN_RST = TCP_FIN | TCP_SYN | TCP_RST
U32 = 0xFFFFFFFF


class ProgramTooLarge(ValueError):
    """The -x entries do not fit a classic BPF program (jump range or instruction count)."""


def _u32(k: int) -> int:
    return k & U32


class _Asm:
    """A tiny assembler: instructions with symbolic jump targets, resolved by ``assemble``."""

    def __init__(self) -> None:
        self.items: list[tuple[int, object, object, int] | str] = []
        # Symbolic jumps hold labels or None; raw() items hold ints (already relative).

    def label(self, name: str) -> None:
        self.items.append(name)

    def op(self, code: int, k: int = 0) -> None:
        self.items.append((code, None, None, _u32(k)))

    def jump(self, code: int, k: int, jt: object, jf: object) -> None:
        """A conditional jump; jt/jf are labels or None (the next instruction)."""
        self.items.append((code, jt, jf, _u32(k)))

    def ja(self, target: str) -> None:
        self.items.append((BPF_JMP | BPF_JA, target, None, 0))

    def raw(self, program: Sequence[Insn]) -> None:
        """Instructions whose jumps are already relative (a whole program, inlined)."""
        self.items.extend(program)

    def assemble(self) -> list[Insn]:
        where: dict[str, int] = {}
        n = 0
        for item in self.items:
            if isinstance(item, str):
                if item in where:
                    raise ValueError(f"duplicate label {item}")
                where[item] = n
            else:
                n += 1
        if n > BPF_MAXINSNS:
            raise ProgramTooLarge(f"{n} instructions (at most {BPF_MAXINSNS})")
        out: list[Insn] = []
        for item in self.items:
            if isinstance(item, str):
                continue
            code, jt, jf, k = item
            if isinstance(jt, int) and isinstance(jf, int):
                out.append((code, jt, jf, k))  # from raw(): already resolved
                continue
            pc = len(out) + 1  # jumps are relative to the next instruction
            if code == BPF_JMP | BPF_JA:
                out.append((code, 0, 0, where[jt] - pc))  # type: ignore[index]
                continue
            offs = [0 if t is None else where[t] - pc for t in (jt, jf)]  # type: ignore[index]
            for off in offs:
                if off < 0:
                    raise ValueError("backward jump")
                if off > JUMP_MAX:
                    raise ProgramTooLarge(f"jump of {off} instructions (at most {JUMP_MAX})")
            out.append((code, offs[0], offs[1], k))
        return out


def _match_table(
    transfers: Iterable[tuple[int, int]], ports_only: bool
) -> dict[int, frozenset[int]]:
    """port -> online ips it is replayed for; None-like empty frozenset = any ip."""
    wild: set[int] = set()
    ips: dict[int, set[int]] = {}
    for ip, port in transfers:
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"bad port {port}")
        ips.setdefault(port, set())
        if ip == 0 or ports_only:
            wild.add(port)
        else:
            ips[port].add(ip & U32)
    return {p: frozenset() if p in wild else frozenset(s) for p, s in sorted(ips.items())}


def rebase(program: Sequence[Insn], base: int) -> list[Insn]:
    """A program written for an IP header at offset 0, moved to one at ``base``, with every
    accepting return made ``BPF_ACCEPT_BYTES`` (engine/io/pcapfilter.py programs).

    Packet loads (absolute, indirect, the IHL load) shift by ``base``; ancillary loads
    (negative offsets), scratch memory, immediates and jumps stay as they are.
    """
    out: list[Insn] = []
    for code, jt, jf, k in program:
        cls, mode = code & 0x07, code & 0xE0
        if (
            (cls == BPF_LD and mode == BPF_ABS and k < 0x80000000)
            or (cls == BPF_LD and mode == BPF_IND)
            or (cls == BPF_LDX and mode == BPF_MSH)
        ):
            k = _u32(k + base)
        elif cls == BPF_RET and code & 0x18 == BPF_K and k:
            k = BPF_ACCEPT_BYTES
        out.append((code, jt, jf, k))
    return out


def _body(
    asm: _Asm,
    tag: str,
    base: int,
    table: dict[int, frozenset[int]],
    pure_acks: bool,
    user: Sequence[Insn] = (),
) -> None:
    """IPv4/TCP checks, the -x match and the pure-ACK test for an IP header at ``base``."""
    drop, accept, flags = f"{tag}drop", f"{tag}accept", f"{tag}flags"
    asm.op(BPF_LD | BPF_B | BPF_ABS, base)  # version, IHL
    asm.op(BPF_ALU | BPF_AND | BPF_K, 0xF0)
    asm.jump(BPF_JMP | BPF_JEQ | BPF_K, 0x40, None, drop)
    asm.op(BPF_LD | BPF_B | BPF_ABS, base + 9)  # protocol
    asm.jump(BPF_JMP | BPF_JEQ | BPF_K, IPPROTO_TCP, None, drop)
    asm.op(BPF_LD | BPF_H | BPF_ABS, base + 6)  # flags + fragment offset
    asm.jump(BPF_JMP | BPF_JSET | BPF_K, IP_FRAG_OFFSET_MASK, drop, None)
    asm.op(BPF_LDX | BPF_B | BPF_MSH, base)  # X = IHL * 4
    asm.op(BPF_MISC | BPF_TXA)
    asm.jump(BPF_JMP | BPF_JGE | BPF_K, 20, None, drop)
    asm.op(BPF_LD | BPF_H | BPF_IND, base + 2)  # TCP dst port
    ports = list(table)
    for port in ports:
        target = flags if not table[port] else f"{tag}port{port}"
        asm.jump(BPF_JMP | BPF_JEQ | BPF_K, port, target, None)
    asm.op(BPF_RET | BPF_K, 0)
    for port in ports:
        if not table[port]:
            continue
        asm.label(f"{tag}port{port}")
        asm.op(BPF_LD | BPF_W | BPF_ABS, base + 16)  # dst ip
        for ip in sorted(table[port]):
            asm.jump(BPF_JMP | BPF_JEQ | BPF_K, ip, flags, None)
        asm.op(BPF_RET | BPF_K, 0)
    asm.label(flags)
    if not pure_acks:
        asm.op(BPF_LD | BPF_B | BPF_IND, base + 13)  # TCP flags
        asm.jump(BPF_JMP | BPF_JSET | BPF_K, TCP_FIN_SYN_RST, accept, None)
        asm.op(BPF_LD | BPF_B | BPF_IND, base + 12)  # data offset in the high nibble
        asm.op(BPF_ALU | BPF_RSH | BPF_K, 2)
        asm.op(BPF_ALU | BPF_AND | BPF_K, 0x3C)  # doff * 4
        asm.op(BPF_ST, 0)  # M[0] = doff * 4
        asm.op(BPF_LD | BPF_H | BPF_ABS, base + 2)  # tot_len
        asm.op(BPF_ALU | BPF_SUB | BPF_X)  # - IHL * 4
        asm.op(BPF_LDX | BPF_W | BPF_MEM, 0)
        asm.op(BPF_ALU | BPF_SUB | BPF_X)  # - doff * 4: the payload length (mod 2^32)
        asm.jump(BPF_JMP | BPF_JEQ | BPF_K, 0, drop, accept)
    if user:
        # -F runs last; the drop comes first so no jump above has to cross it.
        if pure_acks:
            asm.ja(accept)
        asm.label(drop)
        asm.op(BPF_RET | BPF_K, 0)
        asm.label(accept)
        asm.raw(rebase(user, base))
        return
    asm.label(accept)
    asm.op(BPF_RET | BPF_K, BPF_ACCEPT_BYTES)
    asm.label(drop)
    asm.op(BPF_RET | BPF_K, 0)


def capture_program(
    transfers: Sequence[tuple[int, int]],
    base: int = IP_BASE,
    *,
    ports_only: bool = False,
    pure_acks: bool = False,
    user: Sequence[Insn] = (),
) -> list[Insn]:
    """The filter for -x entries given as (online ip, online port); ip 0 = any address.

    ``user``: the -F program (IP header at offset 0, see ``rebase``); both must accept.
    ``base`` is ``IP_BASE`` for the IPPROTO_TCP raw socket, ``NET_BASE`` for AF_PACKET.
    ``ports_only`` ignores the addresses (a superset: the Python filter must still run).
    ``pure_acks`` keeps pure ACKs too (C's exact step 8 leaves them to the session table).
    Raises ValueError without entries, ProgramTooLarge when they do not fit.
    """
    table = _match_table(transfers, ports_only)
    if not table:
        raise ValueError("no -x entry for the BPF filter")
    asm = _Asm()
    if base == NET_BASE:
        asm.op(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_PKTTYPE)
        asm.jump(BPF_JMP | BPF_JEQ | BPF_K, PACKET_OUTGOING, "hdrop", None)  # our own sends
        asm.op(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_PROTOCOL)  # host byte order
        asm.jump(BPF_JMP | BPF_JEQ | BPF_K, ETH_P_IP, None, "htagged")
        asm.ja("hip")
        asm.label("htagged")
        asm.jump(BPF_JMP | BPF_JEQ | BPF_K, ETH_P_8021Q, "hinner", None)
        asm.jump(BPF_JMP | BPF_JEQ | BPF_K, ETH_P_8021AD, "hinner", "hdrop")
        asm.label("hinner")
        asm.op(BPF_LD | BPF_H | BPF_ABS, NET_BASE + 2)  # the tag's ethertype
        asm.jump(BPF_JMP | BPF_JEQ | BPF_K, ETH_P_IP, None, "hdrop")
        asm.ja("hvlan")
        asm.label("hdrop")
        asm.op(BPF_RET | BPF_K, 0)
        asm.label("hip")
        _body(asm, "", NET_BASE, table, pure_acks, user)
        asm.label("hvlan")
        _body(asm, "v", NET_BASE + VLAN_TAG_BYTES, table, pure_acks, user)
    elif base == IP_BASE:
        _body(asm, "", IP_BASE, table, pure_acks, user)
    else:
        raise ValueError(f"unknown base {base}")
    return asm.assemble()


# --------------------------------------------------------------------------------------------
# The same decision in Python
# --------------------------------------------------------------------------------------------


def is_pure_ack(ip: bytes | memoryview, ihl: int) -> bool:
    """No SYN/FIN/RST and no payload (tot_len - ihl - doff == 0, as the program computes it).

    ``ip`` must hold at least ihl + 14 bytes.
    """
    if ip[ihl + 13] & TCP_FIN_SYN_RST:
        return False
    return (ip[2] << 8 | ip[3]) == ihl + ((ip[ihl + 12] >> 4) << 2)


def keep_ipv4(
    ip: bytes | memoryview, transfers: Sequence[tuple[int, int]], *, pure_acks: bool = False
) -> bool:
    """``capture_program``'s decision for the IPv4 packet ``ip`` (reference implementation)."""
    if len(ip) < 20 or ip[0] & 0xF0 != 0x40 or ip[9] != IPPROTO_TCP:
        return False
    if (ip[6] << 8 | ip[7]) & IP_FRAG_OFFSET_MASK:
        return False
    ihl = (ip[0] & 0x0F) * 4
    if ihl < 20 or len(ip) < ihl + 14:
        return False
    dst_port = ip[ihl + 2] << 8 | ip[ihl + 3]
    dst_ip = int.from_bytes(ip[16:20], "big")
    if not any(p == dst_port and (i == 0 or i == dst_ip) for i, p in transfers):
        return False
    return pure_acks or not is_pure_ack(ip, ihl)
