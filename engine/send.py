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
logged once): the C extension ``engine._fastio`` (built by ``pip install``), ctypes on libc's
sendmmsg, and the per-packet sendto loop.  All three count exactly like ``send``: a packet the
kernel refuses is counted under its errno and the batch goes on with the next one (sendmmsg
stops at the first refusal; we resume after it), so a partial send never loses or resends
a packet silently.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence

from engine.logs import LOGGER_NAME, RateLimiter

SNDBUF_BYTES = 64 * 1024 * 1024
"""Large send buffer: a burst of replicated traffic should not hit EAGAIN/ENOBUFS."""
SEND_ERROR_LOG_INTERVAL_S = 5.0
"""At most one log line per errno name per this interval."""
CTYPES_BATCH_MAX_PACKETS = 256
"""Packets per sendmmsg call of the ctypes path (the kernel caps a call at UIO_MAXIOV, 1024)."""
_IP_DADDR = slice(16, 20)
IPV4_HEADER_MIN_BYTES = 20

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


def _strerror(err: int) -> str:
    import os

    return os.strerror(err)


def _batch_sender(path: str | None) -> tuple[str, BatchFn | None]:
    """The best batch implementation (or the one ``path`` names)."""
    global _fallback_logged
    if path in (None, "fastio"):
        try:
            from engine import _fastio  # type: ignore[attr-defined]

            return "fastio", _fastio.send_raw_batch
        except ImportError as exc:
            if path == "fastio":
                raise
            why = f"engine._fastio is not built ({exc})"
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


def _ctypes_sendmmsg() -> BatchFn | None:
    """sendmmsg through ctypes: the arrays are built once and refilled per call."""
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
    for k in range(cap):
        addrs[k].sin_family = socket.AF_INET
        hdr = msgs[k].msg_hdr
        hdr.msg_name = ctypes.addressof(addrs[k])
        hdr.msg_namelen = ctypes.sizeof(_SockaddrIn)
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
