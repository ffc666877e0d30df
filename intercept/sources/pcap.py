"""Advanced mode: the target's responses are routed to this host and captured with libpcap.

Theory of operation
-------------------
Spec §2.1: one pcap handle per ``-i`` device, snaplen 134, not promiscuous, immediate mode,
the mandatory ``-F`` filter.  python-libpcap (``pylibpcap.base.Sniff``) offers only a
blocking generator: its ``capture()`` sits in ``pcap_next`` (GIL released) and, in immediate
mode, does not come back while the device is idle; it exposes neither the selectable fd nor
``pcap_setnonblock``.  So each device gets a daemon reader thread that appends frames to a
``deque`` and rings a wake-up pipe only on empty -> non-empty; the selectors loop owns the
pipe's read end and drains a bounded batch per pass (``has_backlog`` asks for another pass
at once when more is waiting).  The deque is bounded: a loop that falls behind drops and
counts (``capture_dropped``) instead of growing memory.  The threads are never joined:
``close`` flags them and the process exits around them (a blocked ``pcap_next`` cannot be
interrupted through this API).

pylibpcap does not expose ``pcap_datalink`` either, so the link type comes from the
device's ARPHRD type in sysfs (Ethernet and loopback -> DLT_EN10MB, L3 tunnels -> raw IP);
``engine.codec.packet.l2_offset`` then strips it per frame (VLAN and SLL included).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable, Iterable, MutableMapping

from engine.codec.packet import DLT_EN10MB, DLT_RAW, l2_offset
from engine.errors import DecodeError
from intercept.config import FILTER_MAX_CHARS, MAX_DEVICES
from intercept.errors import PcapError

__all__ = [
    "FILTER_MAX_CHARS",
    "SNAPLEN_BYTES",
    "PcapError",
    "PcapSource",
    "linktype_of",
    "list_capture_devices",
]

log = logging.getLogger("intercept.sources.pcap")

SNAPLEN_BYTES = 134  # REP_RCV_BUF_SIZE = 14 + 120 (spec §1.3)
PCAP_TIMEOUT_MS = 10  # spec §2.1
BACKLOG_MAX_FRAMES = 65536  # frames waiting between the reader threads and the loop
BATCH_MAX_FRAMES = 512

# ARPHRD_* (linux/if_arp.h) -> pcap link type.  libpcap maps loopback to Ethernet headers.
_ARPHRD_TO_DLT = {
    1: DLT_EN10MB,  # ARPHRD_ETHER (veth, bridges, NICs)
    772: DLT_EN10MB,  # ARPHRD_LOOPBACK
    768: DLT_RAW,  # ARPHRD_TUNNEL (ipip)
    776: DLT_RAW,  # ARPHRD_SIT
    778: DLT_RAW,  # ARPHRD_IPGRE
    65534: DLT_RAW,  # ARPHRD_NONE (tun, wireguard)
}


def linktype_of(device: str) -> int | None:
    """The pcap link type of ``device`` from /sys/class/net/DEV/type (None if unknown)."""
    try:
        with open(f"/sys/class/net/{device}/type", encoding="ascii") as f:
            return _ARPHRD_TO_DLT.get(int(f.read().strip()))
    except (OSError, ValueError):
        return None


def list_capture_devices() -> list[str]:
    """Every network device except ``any`` (spec §2.1: C's default when -i is missing).

    pcap_findalldevs also lists pseudo devices (nflog, dbus, bluetooth monitors); only the
    ones that are real network interfaces (in /sys/class/net) are kept.
    """
    from pylibpcap.base import get_iface_list

    return [d for d in get_iface_list() if d != "any" and os.path.isdir(f"/sys/class/net/{d}")]


class _Device:
    """One opened device and its reader thread."""

    def __init__(self, source: PcapSource, name: str, sniff: object, linktype: int) -> None:
        self.source = source
        self.name = name
        self.sniff = sniff
        self.linktype = linktype
        self.thread = threading.Thread(target=self._read, name=f"pcap-{name}", daemon=True)

    def _read(self) -> None:
        source = self.source
        queue = source._queue
        linktype = self.linktype
        try:
            for caplen, _ts, frame in self.sniff.capture():  # type: ignore[attr-defined]
                if source._closing:
                    return
                if not caplen:
                    continue  # a timeout tick
                if len(queue) >= BACKLOG_MAX_FRAMES:
                    source._dropped += 1
                    continue
                queue.append((linktype, frame))
                if not source._signalled:
                    source._signalled = True
                    try:
                        os.write(source._wake_w, b"\0")
                    except OSError:
                        pass  # the pipe is full: a wake-up is already pending
        except Exception as e:
            if not source._closing:
                log.error("capture on %s stopped: %s", self.name, e)


class PcapSource:
    """Live capture on ``devices`` with BPF ``filter_expr``, pushing frames into ``receive``."""

    def __init__(
        self,
        receive: Callable[[list[bytes], float], None],
        counters: MutableMapping[str, int],
        devices: Iterable[str] | None,
        filter_expr: str,
        *,
        snaplen: int = SNAPLEN_BYTES,
    ) -> None:
        from pylibpcap.base import Sniff  # optional dependency (live)

        self.receive = receive  # the server's receive_ip_packets(packets, now)
        self.counters = counters  # the server's counters, which these sources add to
        self._queue: collections.deque[tuple[int, bytes]] = collections.deque()
        self._closing = False
        self._signalled = False
        self._dropped = 0
        self._dropped_seen = 0
        self._kernel_dropped_seen = 0
        self._backlog = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        names = list(devices) if devices else list_capture_devices()
        if not names:
            raise PcapError("-i", "no capture device found")
        self.devices: list[_Device] = []
        failures: list[str] = []
        for name in names[:MAX_DEVICES]:
            linktype = linktype_of(name)
            if linktype is None:
                failures.append(f"{name} (unknown or unsupported link type)")
                continue
            try:
                sniff = Sniff(
                    name,
                    promisc=0,
                    snaplen=snaplen,
                    timeout=PCAP_TIMEOUT_MS,
                    filters=filter_expr,
                    immediate_mode=1,
                )
            except Exception as e:
                if "bpf" in str(e).lower():
                    self._close_pipe()
                    raise PcapError(
                        "-F",
                        f"filter does not compile: {filter_expr!r}",
                        tuple(names),
                        filter_expr,
                    ) from None
                failures.append(f"{name} ({e})")
                continue
            self.devices.append(_Device(self, name, sniff, linktype))
        if not self.devices:
            self._close_pipe()
            raise PcapError(
                "-i",
                f"no device could be opened: {', '.join(failures)}",
                tuple(names),
                filter_expr,
            )
        for failure in failures:
            # Spec §2.1: devices that fail to open are skipped.
            log.warning("-i: device skipped: %s", failure)
        self.name = "pcap:" + ",".join(d.name for d in self.devices)

    def start(self) -> None:
        """Start the reader threads (after any daemon fork: threads do not survive it)."""
        for dev in self.devices:
            if not dev.thread.is_alive():
                dev.thread.start()
            log.info("capturing on %s (link type %d)", dev.name, dev.linktype)

    def fileno(self) -> int:
        return self._wake_r

    @property
    def has_backlog(self) -> bool:
        return self._backlog

    def on_readable(self, now: float) -> None:
        # Clear the flag before draining: a frame appended after this point either gets
        # drained below or rings the pipe again, so none is left without a wake-up.
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        self._signalled = False
        queue = self._queue
        counters = self.counters
        batch: list[bytes] = []
        for _ in range(BATCH_MAX_FRAMES):
            try:
                linktype, frame = queue.popleft()
            except IndexError:
                self._backlog = False
                break
            try:
                offset = l2_offset(frame, linktype)  # spec §2.2 step 2
            except DecodeError:
                counters["packets_captured"] += 1
                counters["packets_invalid"] += 1
                continue
            batch.append(frame[offset:])
        else:
            self._backlog = bool(queue)
        if batch:
            self.receive(batch, now)
        if self._dropped != self._dropped_seen:
            counters["capture_dropped"] += self._dropped - self._dropped_seen
            self._dropped_seen = self._dropped

    def poll_stats(self) -> None:
        """Fold the kernel's capture drops (pcap_stats ps_drop) into ``capture_dropped``."""
        total = 0
        for dev in self.devices:
            try:
                total += dev.sniff.stats().ps_drop  # type: ignore[attr-defined]
            except Exception:
                continue
        if total > self._kernel_dropped_seen:
            self.counters["capture_dropped"] += total - self._kernel_dropped_seen
            self._kernel_dropped_seen = total

    def close(self) -> None:
        self._closing = True
        self._close_pipe(write_end=False)

    def _close_pipe(self, write_end: bool = True) -> None:
        # The write end stays open while reader threads may still run: closing it could let
        # a thread write into a reused fd number.  With the read end gone a late write gets
        # EPIPE, which the thread ignores.
        fds = (self._wake_r, self._wake_w) if write_end else (self._wake_r,)
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = -1
