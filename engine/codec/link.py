"""Link-layer send (-o DEV): Ethernet headers, the next hop and its MAC, as data.  (pure)

Theory of operation
-------------------
With ``-o DEV`` the worker writes each replayed IPv4 packet as an Ethernet frame on DEV
through a packet socket (engine/io/send.py ``LinkSender``), the run-time form of C's
``--pcap-send`` build (spec §3.2).  The online host's IP layer is then out of the way: no
route lookup, no OUTPUT chain, no conntrack entry, no rp_filter.  What the kernel did for us
on the raw IP path we do here:

* the frame header: destination = the next hop's MAC, source = DEV's MAC (or the ``-x``
  entry's source MAC, as C does), ethertype 0x0800 (``ethernet_header``);
* the next hop: the target itself when it is on DEV's link, else the gateway of the route
  to it through DEV (``next_hop`` over the routes of ``parse_proc_route``);
* its MAC: the ``-x ...@MAC`` of the entry (spec §3.1), else the kernel's neighbour table
  (``parse_proc_arp``), read at start and re-read while sending (engine/io/send.py probes an
  absent entry and refreshes it);
* the IP checksum: the engine's packets carry one already (engine/codec/packet.py ``build_fields``
  computes both checksums), so nothing is left for the kernel to fill in.

The parsers read the text of /proc/net/arp and /proc/net/route (the same tables ``ip neigh``
and ``ip route`` show for the main table); the I/O of reading them stays in engine/io/send.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from engine.codec.packet import ETH_HEADER_BYTES, ip_from_str
from engine.errors import DecodeError

__all__ = [
    "ETH_HEADER_BYTES",
    "ETH_P_IP",
    "MAC_TEXT_LEN",
    "Route",
    "ethernet_header",
    "mac_from_text",
    "mac_to_text",
    "next_hop",
    "parse_proc_arp",
    "parse_proc_route",
]

ETH_P_IP = 0x0800
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ARPHRD_ETHER = 1  # linux/if_arp.h
MAC_BYTES = 6
MAC_TEXT_LEN = 17
"""spec §3.1: a MAC is written as exactly 17 characters, xx:xx:xx:xx:xx:xx."""
ATF_COM = 0x02
"""/proc/net/arp flag: the entry is complete (its hardware address is known)."""
RTF_UP = 0x0001
RTF_GATEWAY = 0x0002
_HEX = frozenset("0123456789abcdefABCDEF")


def mac_from_text(text: str) -> bytes | None:
    """``xx:xx:xx:xx:xx:xx`` -> 6 bytes; None for anything else (wrong length included)."""
    if len(text) != MAC_TEXT_LEN:
        return None
    groups = text.split(":")
    if len(groups) != MAC_BYTES or any(len(g) != 2 or not set(g) <= _HEX for g in groups):
        return None
    return bytes(int(g, 16) for g in groups)


def mac_to_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def ethernet_header(dst_mac: bytes, src_mac: bytes) -> bytes:
    """The 14-byte Ethernet II header of an IPv4 frame from src_mac to dst_mac."""
    if len(dst_mac) != MAC_BYTES or len(src_mac) != MAC_BYTES:
        raise ValueError("a MAC address is 6 bytes")
    return dst_mac + src_mac + ETH_P_IP.to_bytes(2, "big")


def parse_proc_arp(text: str) -> dict[tuple[int, str], bytes]:
    """/proc/net/arp -> {(ip as int, device): MAC} of the complete entries.

    Lines: ``IP address  HW type  Flags  HW address  Mask  Device``; the header line and
    incomplete entries (flags without ATF_COM, address 00:00:...) are left out, and so is any
    line that does not parse (the table is the kernel's, but a reader must not crash on it).
    """
    out: dict[tuple[int, str], bytes] = {}
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 6 or cols[0] == "IP":
            continue
        ip = _ipv4(cols[0])
        mac = mac_from_text(cols[3])
        try:
            flags = int(cols[2], 16)
        except ValueError:
            continue
        if ip is None or mac is None or not flags & ATF_COM or mac == bytes(MAC_BYTES):
            continue
        out[(ip, cols[5])] = mac
    return out


@dataclass(frozen=True, slots=True)
class Route:
    """One IPv4 route of the main table (addresses as ints in network order)."""

    device: str
    destination: int
    gateway: int
    mask: int
    metric: int
    flags: int


def parse_proc_route(text: str, little_endian: bool = True) -> list[Route]:
    """/proc/net/route -> its routes that are up.

    The kernel prints each address as the hex of the in-memory u32 (network byte order
    stored in a host integer), so on a little-endian host ``0101A8C0`` is 192.168.1.1.
    """
    out: list[Route] = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 8 or cols[0] == "Iface":
            continue
        try:
            dst, gw, flags, metric, mask = (
                _hex_addr(cols[1], little_endian),
                _hex_addr(cols[2], little_endian),
                int(cols[3], 16),
                int(cols[6]),
                _hex_addr(cols[7], little_endian),
            )
        except ValueError:
            continue
        if flags & RTF_UP:
            out.append(Route(cols[0], dst, gw, mask, metric, flags))
    return out


def next_hop(routes: Iterable[Route], target: int, device: str) -> int:
    """The address whose MAC frames to ``target`` on ``device`` must carry.

    The longest-prefix route through ``device`` that covers the target (lowest metric on a
    tie): its gateway when it has one, else the target itself (on the link).  Without such a
    route the target is taken as on the link, which is what a directly attached segment
    without an address on DEV looks like.
    """
    best: Route | None = None
    for r in routes:
        if r.device != device or target & r.mask != r.destination & r.mask:
            continue
        if (
            best is None
            or _prefix_len(r.mask) > _prefix_len(best.mask)
            or (r.mask == best.mask and r.metric < best.metric)
        ):
            best = r
    if best is not None and best.flags & RTF_GATEWAY and best.gateway:
        return best.gateway
    return target


def resolve_macs(
    hops: Mapping[int, int], neighbours: Mapping[tuple[int, str], bytes], device: str
) -> dict[int, bytes]:
    """{target: MAC of its next hop} for the targets whose next hop is in ``neighbours``."""
    out: dict[int, bytes] = {}
    for target, hop in hops.items():
        mac = neighbours.get((hop, device))
        if mac is not None:
            out[target] = mac
    return out


def _prefix_len(mask: int) -> int:
    return bin(mask).count("1")


def _hex_addr(text: str, little_endian: bool) -> int:
    raw = bytes.fromhex(text)
    if len(raw) != 4:
        raise ValueError(text)
    return int.from_bytes(raw[::-1] if little_endian else raw, "big")


def _ipv4(text: str) -> int | None:
    try:
        return ip_from_str(text)
    except DecodeError:
        return None
