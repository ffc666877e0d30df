"""Raw IPv4 sender: the packets the session engine built go to the target as-is (spec §3.2).

The engine hands us complete IPv4 packets (its own checksums, spoofed fake-client source), so
we write them through an IPPROTO_RAW socket with IP_HDRINCL; the kernel routes by the
destination we pass to sendto (the packet's own daddr).

QUIRK fixed (spec §3.2, §5.2): C tcpcopy exits on any send error.  A send error here is counted
by errno name (EPERM from iptables/conntrack, ENOBUFS, EMSGSIZE, EAGAIN, ...) and logged at a
limited rate; the session engine's retransmission covers the loss.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections import Counter

from engine.logs import LOGGER_NAME, RateLimiter

SNDBUF_BYTES = 64 * 1024 * 1024
"""Large send buffer: a burst of replicated traffic should not hit EAGAIN/ENOBUFS."""
SEND_ERROR_LOG_INTERVAL_S = 5.0
"""At most one log line per errno name per this interval."""
_IP_DADDR = slice(16, 20)

log = logging.getLogger(LOGGER_NAME)


class RawSender:
    """Sends complete IPv4 packets on a non-blocking raw socket.

    counters: `send_packets`, `send_bytes`, `send_errors`, and `send_error_<ERRNO>` per errno.
    """

    def __init__(self, sndbuf_bytes: int = SNDBUF_BYTES, *, sock: socket.socket | None = None):
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
            _set_buffer(sock, socket.SO_SNDBUF, _SO_SNDBUFFORCE, sndbuf_bytes)
        sock.setblocking(False)
        self.sock = sock
        self.counters: Counter[str] = Counter()
        self._limiter = RateLimiter(SEND_ERROR_LOG_INTERVAL_S)

    def send(self, pkt: bytes) -> bool:
        """Send one IPv4 packet to its own destination address; False (counted) on error."""
        if len(pkt) < 20:
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
