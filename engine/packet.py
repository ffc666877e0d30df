"""IPv4/TCP headers as data: parse, build, checksums, options, MTU split.  (pure)

CONTRACT (other modules rely on these names; keep them):

- Addresses are ``int`` (the 32-bit value of the 4 network-order bytes); ``ip_from_str`` /
  ``ip_to_str`` convert.  Ports, seq, ack are plain ints.
- ``TcpPacket`` is one IPv4+TCP packet as mutable data.  ``payload`` holds the bytes we have;
  ``data_len`` is the TCP payload length the IP header *declares* (tot_len - ihl*4 - doff*4),
  which is larger than ``len(payload)`` for header-only captures (intercept records, snaplen).
  For a packet built by us, ``data_len == len(payload)``.
- ``parse_ip(buf)`` parses an IPv4 packet starting at offset 0; raises ``DecodeError`` for
  anything that is not a well-formed IPv4/TCP header.  Checksums are never verified (veth
  offload leaves partial checksums, design §9).
- ``build(pkt)`` returns the wire bytes with a fresh IP header checksum and TCP checksum.
- ``parse_options(raw)`` -> ``TcpOptions`` (best effort: stops at a malformed option).
- ``build_options(...)`` -> bytes padded with NOP/EOL to a multiple of 4.
- ``set_timestamp(options, tsval, tsecr)`` -> options bytes with the TS option's values
  replaced in place (layout unchanged); unchanged bytes if there is no TS option.
- ``split_mtu(pkt, mtu)`` -> list of packets no larger than ``mtu`` (spec §3.4).
- ``l2_offset(frame, linktype)`` -> offset of the IP header in a captured frame
  (DLT_EN10MB with VLAN, DLT_LINUX_SLL, DLT_RAW); raises ``DecodeError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import DecodeError

__all__ = [
    "FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR",
    "TcpPacket", "TcpOptions", "DecodeError",
    "parse_ip", "build", "parse_options", "build_options", "set_timestamp", "split_mtu",
    "l2_offset", "ip_from_str", "ip_to_str", "checksum", "tcp_checksum",
    "DLT_EN10MB", "DLT_RAW", "DLT_LINUX_SLL", "DLT_IPV4",
]

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

DLT_EN10MB = 1
DLT_RAW = 101  # LINKTYPE_RAW in pcap files (12/14 on some systems' DLT values, also accepted)
DLT_LINUX_SLL = 113
DLT_IPV4 = 228


@dataclass(slots=True)
class TcpOptions:
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    sack: tuple[tuple[int, int], ...] = ()
    timestamp: tuple[int, int] | None = None  # (TSval, TSecr)


@dataclass(slots=True)
class TcpPacket:
    src: int
    dst: int
    sport: int
    dport: int
    seq: int = 0
    ack: int = 0
    flags: int = 0
    window: int = 65535
    options: bytes = b""
    payload: bytes = b""
    data_len: int = -1  # -1 in the constructor means len(payload)
    ip_id: int = 0
    ttl: int = 64
    tos: int = 0
    df: bool = True
    urgent: int = 0
    ip_options: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if self.data_len < 0:
            self.data_len = len(self.payload)
