"""Raw IPv4 sender: the packets the session engine built go to the target as-is (spec §3.2).

The engine hands us complete IPv4 packets (its own checksums, spoofed fake-client source), so
we write them through an IPPROTO_RAW socket with IP_HDRINCL; the kernel routes by the
destination we pass to sendto (the packet's own daddr).

QUIRK fixed (spec §3.2, §5.2): C tcpcopy exits on any send error.  A send error here is counted
by errno name (EPERM from iptables/conntrack, ENOBUFS, EMSGSIZE, EAGAIN, ...) and logged at a
limited rate; the session engine's retransmission covers the loss.

Batches.  The worker drains a whole wake-up's packets at once and hands them to
``send_batch``, which writes them with sendmmsg(2): one syscall per up to 256 packets instead of
one sendto each.  Three implementations, best first, chosen once per process (a fallback is
logged once): the C extension ``engine.io._fastio`` (built by ``pip install``), ctypes on libc's
sendmmsg, and the per-packet sendto loop.  All three count exactly like ``send``: a packet the
kernel refuses is counted under its errno and the batch goes on with the next one (sendmmsg
stops at the first refusal; we resume after it), so a partial send never loses or resends
a packet silently.

Link-layer send (-o DEV, ``LinkSender``).  The run-time form of C's ``--pcap-send`` build
(spec §3.2): each packet goes out on DEV as an Ethernet frame through an AF_PACKET socket,
so the online host's IP layer (routing, OUTPUT rules, conntrack, rp_filter) is never
involved.  The frame header comes from engine/codec/link.py: the next hop's MAC (from ``-x
...@MAC``, else the kernel's neighbour table, probed at start when absent and re-read every
``NEIGH_REFRESH_S``) and DEV's MAC.  Batches go through ``_fastio.send_link_batch`` (two
iovecs per frame: header and packet, no copy), else ctypes sendmmsg, else sendto, with the
same stop-count-resume contract as the raw path.  Packets larger than DEV's MTU are split
as the capture splits GRO aggregates (spec §3.4), counted in ``send_split``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from engine.codec import link
from engine.codec.link import ARPHRD_ETHER
from engine.errors import ConfigError
from engine.io.logs import LOGGER_NAME, RateLimiter

SNDBUF_BYTES = 64 * 1024 * 1024
"""Large send buffer: a burst of replicated traffic should not hit EAGAIN/ENOBUFS."""
SEND_ERROR_LOG_INTERVAL_S = 5.0
"""At most one log line per errno name per this interval."""
CTYPES_BATCH_MAX_PACKETS = 256
"""Packets per sendmmsg call of the ctypes path (the kernel caps a call at UIO_MAXIOV, 1024)."""
_IP_DADDR = slice(16, 20)
IPV4_HEADER_MIN_BYTES = 20
NEIGH_REFRESH_S = 5.0
"""-o: how often the neighbour table (and the routes) are read again for a changed MAC."""
NEIGH_PROBE_WAIT_S = 3.0
"""-o: how long start-up waits for the kernel to resolve an absent neighbour entry."""
NEIGH_PROBE_POLL_S = 0.05
DISCARD_PORT = 9
"""The probe datagram's port (RFC 863 discard): it only makes the kernel resolve the MAC."""
PROC_NET_ARP = "/proc/net/arp"
PROC_NET_ROUTE = "/proc/net/route"

log = logging.getLogger(LOGGER_NAME)


class RawSender:
    """Sends complete IPv4 packets on a non-blocking raw socket.

    counters: `send_packets`, `send_bytes`, `send_errors`, and `send_error_<ERRNO>` per errno.
    `batch_path` pins the batch implementation ("fastio", "ctypes", "sendto"; default: the
    best available); `self.batch_path` says which one is in use.
    """

    def __init__(
        self,
        sndbuf_bytes: int = SNDBUF_BYTES,
        *,
        sock: socket.socket | None = None,
        batch_path: str | None = None,
    ):
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
            _set_buffer(sock, socket.SO_SNDBUF, _SO_SNDBUFFORCE, sndbuf_bytes)
        sock.setblocking(False)
        self.sock = sock
        self.counters: Counter[str] = Counter()
        self._limiter = RateLimiter(SEND_ERROR_LOG_INTERVAL_S)
        self.batch_path, self._batch = _batch_sender(batch_path)
        self._refused_bytes = 0

    def send_batch(self, packets: Sequence[bytes]) -> int:
        """Send every packet to its own destination, in order; returns how many went out.

        One sendmmsg per up to a few hundred packets; each refused packet is counted and
        logged as ``send`` does, and the rest of the batch still goes out.
        """
        n = len(packets)
        if not n:
            return 0
        batch = self._batch
        if batch is None:
            send = self.send
            return sum(1 for pkt in packets if send(pkt))
        fd = self.sock.fileno()
        start = ok = refused_bytes = 0
        while start < n:
            sent, err = batch(fd, packets, start)
            ok += sent
            start += sent
            if start >= n:
                break
            if not err:
                continue  # a short sendmmsg: the next call reports the refusal, if any
            pkt = packets[start]
            refused_bytes += len(pkt)
            if len(pkt) < IPV4_HEADER_MIN_BYTES:
                self._count_error(errno.EINVAL, "packet shorter than an IP header")
            else:
                self._count_error(err, _strerror(err), socket.inet_ntoa(pkt[_IP_DADDR]))
            start += 1
        if ok:
            c = self.counters
            c["send_packets"] += ok
            c["send_bytes"] += sum(map(len, packets)) - refused_bytes
        return ok

    def send_buffer(self, sendbuf: Any, n: int) -> int:
        """``send_batch`` of the first ``n`` packets of a SendBuffer (engine/io/batch.py),
        sent from the buffer itself: no bytes object per packet on the _fastio path."""
        if n <= 0:
            return 0
        fastio = _fastio_module() if self.batch_path == "fastio" else None
        if fastio is None:
            return self.send_batch(sendbuf.packets(n))
        fd = self.sock.fileno()
        data, lengths = sendbuf.data, sendbuf.lengths
        return self._send_from_buffer(
            sendbuf, n, lambda start: fastio.send_raw_buffer(fd, data, lengths, n, start)
        )

    def _send_from_buffer(
        self, sendbuf: Any, n: int, send_from: Callable[[int], tuple[int, int]]
    ) -> int:
        """Send the first ``n`` packets of ``sendbuf`` with ``send_from(start) -> (sent,
        errno)`` (one sendmmsg from packet ``start``): a refused packet is counted and
        skipped, the rest go on."""
        start = ok = 0
        while start < n:
            sent, err = send_from(start)
            ok += sent
            start += sent
            if start >= n:
                break
            if not err:
                continue
            self._refused_in_buffer(sendbuf, start, err)
            start += 1
        return self._count_buffer(sendbuf, n, ok)

    def _refused_in_buffer(self, sendbuf: Any, index: int, err: int) -> None:
        off = sum(sendbuf.lengths[:index])
        pkt = bytes(sendbuf.view[off : off + sendbuf.lengths[index]])
        self._refused_packet(pkt, err)
        self._refused_bytes += len(pkt)

    def _refused_packet(self, pkt: bytes, err: int) -> None:
        if len(pkt) < IPV4_HEADER_MIN_BYTES:
            self._count_error(errno.EINVAL, "packet shorter than an IP header")
        else:
            self._count_error(err, _strerror(err), socket.inet_ntoa(pkt[_IP_DADDR]))

    def _count_buffer(self, sendbuf: Any, n: int, ok: int) -> int:
        refused, self._refused_bytes = self._refused_bytes, 0
        if ok:
            c = self.counters
            c["send_packets"] += ok
            c["send_bytes"] += sum(sendbuf.lengths[:n]) - refused
        return ok

    def send(self, pkt: bytes) -> bool:
        """Send one IPv4 packet to its own destination address; False (counted) on error."""
        if len(pkt) < IPV4_HEADER_MIN_BYTES:
            self._count_error(errno.EINVAL, "packet shorter than an IP header")
            return False
        dst = socket.inet_ntoa(pkt[_IP_DADDR])
        try:
            self.sock.sendto(pkt, (dst, 0))
        except OSError as exc:
            self._count_error(exc.errno or 0, exc.strerror or str(exc), dst)
            return False
        self.counters["send_packets"] += 1
        self.counters["send_bytes"] += len(pkt)
        return True

    def _count_error(self, err: int, text: str, dst: str = "-") -> None:
        name = errno.errorcode.get(err, str(err))
        self.counters["send_errors"] += 1
        self.counters[f"send_error_{name}"] += 1
        allowed, suppressed = self._limiter.allow(name, time.monotonic())
        if allowed:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            hint = _HINTS.get(err, "")
            log.warning("raw send to %s failed: %s: %s%s%s", dst, name, text, hint, more)

    def close(self) -> None:
        self.sock.close()


# Linux SO_SNDBUFFORCE / SO_RCVBUFFORCE (root may exceed net.core.[rw]mem_max with these).
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

_HINTS = {
    errno.EPERM: "; an iptables/nftables rule or conntrack refused a forged packet",
    errno.EMSGSIZE: "; packet larger than the route MTU (check -M)",
    errno.ENOBUFS: "; the send queue is full",
}


def _set_buffer(sock: socket.socket, opt: int, force_opt: int, size: int) -> None:
    """Ask for `size` bytes of buffer; with root, beyond the sysctl maximum."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)
    except OSError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError:
            pass


# -- batch implementations -----------------------------------------------------------------------

BatchFn = Callable[[int, Sequence[bytes], int], tuple[int, int]]
"""batch(fd, packets, start) -> (sent, errno): sendmmsg of packets[start:], stopping at the
first refused packet (errno is that packet's; 0 when all went out)."""

_fallback_logged = False


# -- link-layer send (-o DEV) --------------------------------------------------------------------


def _read_text(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


SIOCGIFMTU = 0x8921
SIOCGIFHWADDR = 0x8927
_IFREQ = struct.Struct("16sH22s")  # ifr_name, then the union: sa_family + sa_data / int mtu


def device_facts(device: str) -> tuple[int, bytes, int, int]:
    """(ifindex, MAC, MTU, ARPHRD type) of ``device`` in this network namespace (ioctls on
    a socket, so a /sys of another namespace cannot mislead); ConfigError naming -o."""
    name = device.encode("ascii", "replace")[:15]
    try:
        ifindex = socket.if_nametoindex(device)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            hw = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, _IFREQ.pack(name, 0, b""))
            raw_mtu = fcntl.ioctl(s.fileno(), SIOCGIFMTU, _IFREQ.pack(name, 0, b""))
    except (OSError, ValueError):
        raise ConfigError("-o", f"no such network device: {device!r}") from None
    _, hatype, data = _IFREQ.unpack(hw)
    mac = data[: link.MAC_BYTES]
    mtu = int.from_bytes(raw_mtu[16:20], sys.byteorder, signed=True)
    if hatype != ARPHRD_ETHER:
        raise ConfigError(
            "-o", f"{device} is not an Ethernet device (type {hatype}): frames need a MAC header"
        )
    return ifindex, mac, mtu, hatype


def probe_neighbour(addr: int) -> None:
    """Make the kernel resolve ``addr``'s MAC: one empty UDP datagram to its discard port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        s.sendto(b"", (socket.inet_ntoa(addr.to_bytes(4, "big")), DISCARD_PORT))
    except OSError:
        pass  # unreachable, refused by a rule: the caller reports the missing entry
    finally:
        s.close()


class NeighbourTable:
    """The next-hop MAC of every -x target for frames on ``device`` (engine/codec/link.py).

    Targets whose -x entry carries MACs use them (spec §3.1: destination and source MAC of
    the entry); the others look their next hop up in /proc/net/arp.  ``resolve()`` at start
    probes absent entries and raises ConfigError("-o", ...) for one still absent;
    ``refresh()`` reads the tables again and reports what changed.
    """

    def __init__(
        self,
        device: str,
        device_mac: bytes,
        transfers: object,
        *,
        read: Callable[[str], str] = _read_text,
        probe: Callable[[int], None] = probe_neighbour,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.device = device
        self.device_mac = device_mac
        self.read = read
        self.probe = probe
        self.clock = clock
        self.sleep = sleep
        self.static: dict[int, tuple[bytes, bytes]] = {}
        dynamic: set[int] = set()
        for t in transfers:  # type: ignore[attr-defined]
            if t.target_ip >> 24 == 127:
                raise ConfigError(
                    "-o",
                    f"target {socket.inet_ntoa(t.target_ip.to_bytes(4, 'big'))} is this host's "
                    "loopback: frames on a device cannot reach it (leave -o out)",
                )
            if t.target_mac is not None:
                self.static.setdefault(t.target_ip, (t.target_mac, t.online_mac or device_mac))
            else:
                dynamic.add(t.target_ip)
        self.dynamic = sorted(dynamic - set(self.static))
        self.hops: dict[int, int] = {}
        self.macs: dict[int, bytes] = {}
        self.absent: set[int] = set()

    def headers(self) -> dict[int, bytes]:
        """{target: 14-byte frame header} for every target with a known MAC."""
        out = {ip: link.ethernet_header(dst, src) for ip, (dst, src) in self.static.items()}
        for ip, mac in self.macs.items():
            out[ip] = link.ethernet_header(mac, self.device_mac)
        return out

    def _lookup(self) -> dict[int, bytes]:
        if not self.dynamic:
            return {}
        try:
            routes = link.parse_proc_route(self.read(PROC_NET_ROUTE))
        except OSError:
            routes = []
        self.hops = {ip: link.next_hop(routes, ip, self.device) for ip in self.dynamic}
        try:
            neigh = link.parse_proc_arp(self.read(PROC_NET_ARP))
        except OSError:
            neigh = {}
        return link.resolve_macs(self.hops, neigh, self.device)

    def resolve(self, wait_s: float = NEIGH_PROBE_WAIT_S) -> None:
        """Start-up: every target's MAC, probing absent ones; ConfigError("-o") if one stays
        unknown."""
        macs = self._lookup()
        missing = [ip for ip in self.dynamic if ip not in macs]
        if missing:
            for ip in missing:
                self.probe(self.hops.get(ip, ip))
            deadline = self.clock() + wait_s
            while missing and self.clock() < deadline:
                self.sleep(NEIGH_PROBE_POLL_S)
                macs = self._lookup()
                missing = [ip for ip in self.dynamic if ip not in macs]
        if missing:
            ip = missing[0]
            hop = self.hops.get(ip, ip)
            via = "" if hop == ip else f" (its gateway {_ip_text(hop)})"
            raise ConfigError(
                "-o",
                f"no neighbour entry for {_ip_text(ip)}{via} on {self.device} after a probe: "
                "check that it answers ARP on that link, or give the MACs in -x "
                "(port@MAC-ip:port@MAC)",
            )
        self.macs = macs

    def refresh(self) -> list[str]:
        """Read the tables again; one line per target whose MAC changed or went missing (a
        missing one keeps its last MAC and is probed)."""
        if not self.dynamic:
            return []
        macs = self._lookup()
        notes = []
        for ip in self.dynamic:
            new, old = macs.get(ip), self.macs.get(ip)
            if new is None:
                self.probe(self.hops.get(ip, ip))
                if old is not None and ip not in self.absent:
                    self.absent.add(ip)  # said once, until the entry is back
                    notes.append(
                        f"{_ip_text(ip)}: no neighbour entry; keeping {link.mac_to_text(old)}"
                    )
            else:
                self.absent.discard(ip)
            if new is not None and new != old:
                self.macs[ip] = new
                notes.append(f"{_ip_text(ip)}: next hop MAC is now {link.mac_to_text(new)}")
        return notes


def _ip_text(addr: int) -> str:
    return socket.inet_ntoa(addr.to_bytes(4, "big"))


class LinkSender(RawSender):
    """Sends complete IPv4 packets as Ethernet frames on ``device`` (-o DEV).

    counters: those of RawSender (a packet without a next-hop MAC is refused with
    EHOSTUNREACH), plus ``send_split`` (packets split to DEV's MTU).  ``neighbours`` is a
    resolved NeighbourTable (built here when None).  ``refresh_s``: how often it is re-read.
    """

    def __init__(
        self,
        device: str,
        transfers: object = (),
        *,
        neighbours: NeighbourTable | None = None,
        sock: socket.socket | None = None,
        batch_path: str | None = None,
        sndbuf_bytes: int = SNDBUF_BYTES,
        refresh_s: float = NEIGH_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device = device
        self.ifindex, self.mac, self.mtu, _ = device_facts(device)
        if neighbours is None:
            neighbours = NeighbourTable(device, self.mac, transfers)
            neighbours.resolve()
        self.neighbours = neighbours
        if sock is None:
            # Protocol 0: the socket receives nothing; each frame names ETH_P_IP.
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            _set_buffer(sock, socket.SO_SNDBUF, _SO_SNDBUFFORCE, sndbuf_bytes)
        sock.setblocking(False)
        self.sock = sock
        self.counters = Counter()
        self._limiter = RateLimiter(SEND_ERROR_LOG_INTERVAL_S)
        self._refused_bytes = 0
        self._address = (device, link.ETH_P_IP)
        self._sockaddr = _SOCKADDR_LL.pack(
            socket.AF_PACKET, socket.htons(link.ETH_P_IP), self.ifindex, 0, 0, 6, bytes(8)
        )
        self.batch_path, self._batch = _link_batch_sender(batch_path, self._sockaddr)
        self.refresh_s = refresh_s
        self.clock = clock
        self._next_refresh = clock() + refresh_s
        self._set_headers(neighbours.headers())

    def _set_headers(self, headers: dict[int, bytes]) -> None:
        self.headers = {ip.to_bytes(4, "big"): h for ip, h in headers.items()}
        self._table = b"".join(ip + h for ip, h in self.headers.items())

    def _maybe_refresh(self) -> None:
        now = self.clock()
        if now < self._next_refresh:
            return
        self._next_refresh = now + self.refresh_s
        notes = self.neighbours.refresh()
        if notes:
            for note in notes:
                log.info("-o %s: %s", self.device, note)
            self._set_headers(self.neighbours.headers())

    def _split(self, packets: Sequence[bytes]) -> list[bytes]:
        from engine.codec import packet
        from engine.errors import DecodeError

        out: list[bytes] = []
        mtu = self.mtu
        for pkt in packets:
            if len(pkt) <= mtu:
                out.append(pkt)
                continue
            try:
                pieces = packet.split_mtu(packet.parse_ip(pkt), mtu)
            except (DecodeError, ValueError):
                out.append(pkt)  # refused by the kernel below, counted under its errno
                continue
            self.counters["send_split"] += 1
            out.extend(packet.build(p) for p in pieces)
        return out

    def send_batch(self, packets: Sequence[bytes]) -> int:
        """Send every packet as a frame to its destination's next hop, in order; returns how
        many went out (each refused one counted under its errno)."""
        if not packets:
            return 0
        self._maybe_refresh()
        if max(map(len, packets)) > self.mtu:
            packets = self._split(packets)
        batch = self._batch
        if batch is None:
            ok = nbytes = 0
            for pkt in packets:
                if self._send_one(pkt):
                    ok += 1
                    nbytes += len(pkt)
        else:
            ok, nbytes = self._send_batched(batch, packets)
        if ok:
            c = self.counters
            c["send_packets"] += ok
            c["send_bytes"] += nbytes
        return ok

    def send_buffer(self, sendbuf: Any, n: int) -> int:
        """``send_batch`` of the first ``n`` packets of a SendBuffer, from the buffer itself
        on the _fastio path (packets above DEV's MTU take send_batch, which splits them)."""
        if n <= 0:
            return 0
        fastio = _fastio_module() if self.batch_path == "fastio" else None
        if fastio is None or max(sendbuf.lengths[:n]) > self.mtu:
            return self.send_batch(sendbuf.packets(n))
        self._maybe_refresh()
        fd = self.sock.fileno()
        data, lengths = sendbuf.data, sendbuf.lengths
        return self._send_from_buffer(
            sendbuf,
            n,
            lambda start: fastio.send_link_buffer(
                fd, self.ifindex, data, lengths, n, self._table, start
            ),
        )

    def _refused_packet(self, pkt: bytes, err: int) -> None:
        self._refused(pkt, err)

    def _send_batched(self, batch: LinkBatchFn, packets: Sequence[bytes]) -> tuple[int, int]:
        n = len(packets)
        fd = self.sock.fileno()
        start = ok = refused_bytes = 0
        while start < n:
            sent, err = batch(fd, self.ifindex, packets, self._table, start)
            ok += sent
            start += sent
            if start >= n:
                break
            if not err:
                continue  # a short sendmmsg: the next call reports the refusal, if any
            pkt = packets[start]
            refused_bytes += len(pkt)
            self._refused(pkt, err)
            start += 1
        return ok, sum(map(len, packets)) - refused_bytes

    def _refused(self, pkt: bytes, err: int) -> None:
        if len(pkt) < IPV4_HEADER_MIN_BYTES:
            self._count_error(errno.EINVAL, "packet shorter than an IP header")
        elif err == errno.EHOSTUNREACH:
            self._count_error(
                err, f"no next-hop MAC on {self.device}", socket.inet_ntoa(pkt[_IP_DADDR])
            )
        else:
            self._count_error(err, _strerror(err), socket.inet_ntoa(pkt[_IP_DADDR]))

    def _send_one(self, pkt: bytes) -> bool:
        """The sendto fallback: one frame; a refusal is counted here."""
        if len(pkt) < IPV4_HEADER_MIN_BYTES:
            self._refused(pkt, errno.EINVAL)
            return False
        hdr = self.headers.get(pkt[_IP_DADDR])
        if hdr is None:
            self._refused(pkt, errno.EHOSTUNREACH)
            return False
        try:
            self.sock.sendto(hdr + pkt, self._address)
        except OSError as exc:
            self._refused(pkt, exc.errno or 0)
            return False
        return True

    def send(self, pkt: bytes) -> bool:
        return self.send_batch([pkt]) == 1


_SOCKADDR_LL = struct.Struct("=HHiHBB8s")  # family, protocol (BE), ifindex, hatype, pkttype,
# halen, addr


LinkBatchFn = Callable[[int, int, Sequence[bytes], bytes, int], tuple[int, int]]
"""batch(fd, ifindex, packets, headers, start) -> (sent, errno), as _fastio.send_link_batch."""

_link_fallback_logged = False


def _link_batch_sender(path: str | None, sockaddr: bytes) -> tuple[str, LinkBatchFn | None]:
    """The best link batch implementation (or the one ``path`` names)."""
    global _link_fallback_logged
    if path in (None, "fastio"):
        try:
            from engine.io import _fastio  # type: ignore[attr-defined]

            return "fastio", _fastio.send_link_batch
        except (ImportError, AttributeError) as exc:
            if path == "fastio":
                raise
            why = f"engine.io._fastio is not built ({exc})"
    else:
        why = f"batch path {path!r} asked for"
    if path in (None, "ctypes"):
        fn = _ctypes_sendmmsg(sockaddr)
        if fn is not None:
            if not _link_fallback_logged:
                _link_fallback_logged = True
                log.info("link send: %s; using ctypes sendmmsg from libc", why)
            return "ctypes", _frames_batch(fn)
        if path == "ctypes":
            raise OSError(errno.ENOSYS, "libc has no sendmmsg")
        why += "; libc has no sendmmsg"
    if not _link_fallback_logged:
        _link_fallback_logged = True
        log.warning("link send: %s; sending one sendto per packet", why)
    return "sendto", None


def _frames_batch(send_frames: BatchFn) -> LinkBatchFn:
    """send_link_batch's contract over a frame sender: the frames are joined here."""

    def batch(
        fd: int, ifindex: int, packets: Sequence[bytes], table: bytes, start: int
    ) -> tuple[int, int]:
        headers = {table[i : i + 4]: table[i + 4 : i + 18] for i in range(0, len(table), 18)}
        frames: list[bytes] = []
        err = 0
        for pkt in packets[start:]:
            if len(pkt) < IPV4_HEADER_MIN_BYTES:
                err = errno.EINVAL
                break
            hdr = headers.get(pkt[_IP_DADDR])
            if hdr is None:
                err = errno.EHOSTUNREACH
                break
            frames.append(hdr + pkt)
        sent, send_err = send_frames(fd, frames, 0) if frames else (0, 0)
        if sent < len(frames):
            return sent, send_err
        return sent, err

    return batch


def _strerror(err: int) -> str:
    import os

    return os.strerror(err)


def _fastio_module() -> Any:
    """engine.io._fastio, or None when it is not built."""
    try:
        from engine.io import _fastio  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _fastio


def _batch_sender(path: str | None) -> tuple[str, BatchFn | None]:
    """The best batch implementation (or the one ``path`` names)."""
    global _fallback_logged
    if path in (None, "fastio"):
        try:
            from engine.io import _fastio  # type: ignore[attr-defined]

            return "fastio", _fastio.send_raw_batch
        except ImportError as exc:
            if path == "fastio":
                raise
            why = f"engine.io._fastio is not built ({exc})"
    else:
        why = f"batch path {path!r} asked for"
    if path in (None, "ctypes"):
        fn = _ctypes_sendmmsg()
        if fn is not None:
            if not _fallback_logged:
                _fallback_logged = True
                log.info("raw send: %s; using ctypes sendmmsg from libc", why)
            return "ctypes", fn
        if path == "ctypes":
            raise OSError(errno.ENOSYS, "libc has no sendmmsg")
        why += "; libc has no sendmmsg"
    if not _fallback_logged:
        _fallback_logged = True
        log.warning("raw send: %s; sending one sendto per packet", why)
    return "sendto", None


class _SockaddrIn(ctypes.Structure):
    _fields_ = [
        ("sin_family", ctypes.c_ushort),
        ("sin_port", ctypes.c_uint16),
        ("sin_addr", ctypes.c_uint8 * 4),
        ("sin_zero", ctypes.c_uint8 * 8),
    ]


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


def _ctypes_sendmmsg(sockaddr: bytes | None = None) -> BatchFn | None:
    """sendmmsg through ctypes: the arrays are built once and refilled per call.

    Every packet goes to its own daddr (an IPPROTO_RAW socket), or with ``sockaddr`` every
    one to that raw address (an AF_PACKET socket's struct sockaddr_ll)."""
    import ctypes.util  # (subprocess, shutil, tempfile: only for this fallback)

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6", use_errno=True)
        sendmmsg = libc.sendmmsg
    except (OSError, AttributeError):
        return None
    sendmmsg.argtypes = [ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int]
    sendmmsg.restype = ctypes.c_int
    cap = CTYPES_BATCH_MAX_PACKETS
    msgs = (_Mmsghdr * cap)()
    iovs = (_Iovec * cap)()
    addrs = (_SockaddrIn * cap)()
    fixed = None if sockaddr is None else ctypes.create_string_buffer(sockaddr, len(sockaddr))
    for k in range(cap):
        addrs[k].sin_family = socket.AF_INET
        hdr = msgs[k].msg_hdr
        if fixed is None:
            hdr.msg_name = ctypes.addressof(addrs[k])
            hdr.msg_namelen = ctypes.sizeof(_SockaddrIn)
        else:
            hdr.msg_name = ctypes.addressof(fixed)
            hdr.msg_namelen = len(sockaddr)  # type: ignore[arg-type]
        hdr.msg_iov = ctypes.pointer(iovs[k])
        hdr.msg_iovlen = 1
    dontwait = socket.MSG_DONTWAIT

    def batch(fd: int, packets: Sequence[bytes], start: int) -> tuple[int, int]:
        n = len(packets)
        i = start
        while i < n:
            k = 0
            keep = []  # the buffers must live until the call returns
            while k < cap and i + k < n:
                pkt = packets[i + k]
                if len(pkt) < IPV4_HEADER_MIN_BYTES:
                    break
                buf = ctypes.c_char_p(pkt)
                keep.append(buf)
                iovs[k].iov_base = ctypes.cast(buf, ctypes.c_void_p).value
                iovs[k].iov_len = len(pkt)
                if fixed is None:
                    addrs[k].sin_addr[:] = pkt[16:20]
                k += 1
            if not k:
                return i - start, errno.EINVAL
            r = sendmmsg(fd, msgs, k, dontwait)
            if r < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                return i - start, err
            i += r
            if r < k:
                continue
        return i - start, 0

    return batch


def build_senders(count: int, cfg: object) -> list[RawSender]:
    """One sender per worker for the run ``cfg`` (a ReplayConfig): raw IP, or with -o DEV
    link-layer senders sharing one neighbour resolution (ConfigError naming -o)."""
    device = getattr(cfg, "output_interface", None)
    if not device:
        return [RawSender() for _ in range(count)]
    session = cfg.session  # type: ignore[attr-defined]
    _ifindex, mac, mtu, _ = device_facts(device)
    neighbours = NeighbourTable(device, mac, session.transfers)
    neighbours.resolve()
    if mtu < session.mtu:
        log.warning(
            "-o %s: its MTU %d is below -M %d; larger packets are split to %d bytes",
            device,
            mtu,
            session.mtu,
            mtu,
        )
    for ip, hdr in sorted(neighbours.headers().items()):
        log.info(
            "-o %s: frames to %s go to %s (from %s)",
            device,
            _ip_text(ip),
            link.mac_to_text(hdr[:6]),
            link.mac_to_text(hdr[6:12]),
        )
    return [LinkSender(device, neighbours=neighbours) for _ in range(count)]
