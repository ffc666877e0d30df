"""Packet sources: what tcpcopy-mp replays comes from here as raw IPv4 packets (bytes).

Theory of operation
-------------------
Every source offers the same small interface so the worker loop (and, later, the capture
process that feeds the shared-memory rings, design §3) can drive any of them:

    src.fileno() -> int | None         # selectable fd, or None (a pcap file is paced by time)
    src.next_deadline() -> float|None  # when read_batch has something to return (files only)
    src.read_batch(now) -> list[tuple[float, bytes]]   # (capture time, IPv4 packet)
    src.exhausted -> bool              # a file source that has played all its passes
    src.counters: Counter; src.close()

* `RawTcpSource`: socket(AF_INET, SOCK_RAW, IPPROTO_TCP), the C default (spec §3.2): every TCP
  packet *arriving at* this host, IP header included, read until EAGAIN.
* `PacketSource`: AF_PACKET/SOCK_RAW/ETH_P_ALL bound to a device (or all): sees mirrored
  traffic too.  Outgoing frames are skipped and the link header is stripped.
* `PcapFileSource`: offline replay (spec §3.16) paced by `ReplayPacer`, a pure schedule.

What a live source hands on is decided by one rule (engine/bpf.py): IPv4 TCP to a -x
(dst ip, dst port), and not a pure ACK (spec §3.3 steps 1, 2, 8).  Live sockets get it as a
classic BPF program (SO_ATTACH_FILTER), so the kernel drops the rest before it is queued;
when the program is attached and exact, nothing is filtered again in Python and each
received packet costs one recv_into and one copy.  Sockets the program could not be attached
to run `TransferFilter.keep`, the same rule in Python (the tests hold the two equal on real
captures).  Offline files run `TransferFilter.keep_with_pure_acks`: the same without the
pure-ACK step, which the session table then applies as C does (spec §3.3 step 8).  Large
GRO/TSO aggregates pass untouched; the engine splits them (spec §3.4).

Counting: packets the kernel filter drops are not seen, so with the filter attached
capture_packets counts only what reached user space (capture_kernel_filtered says so).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

from engine import bpf, packet
from engine.errors import DecodeError
from engine.logs import LOGGER_NAME
from engine.pcapfile import PCAP_GLOBAL_HEADER_BYTES, PCAP_RECORD_HEADER_BYTES

log = logging.getLogger(LOGGER_NAME)

RAW_RCVBUF_BYTES = 64 * 1024 * 1024
"""SO_RCVBUF of the raw capture socket, as C tcpcopy (spec §3.2)."""
RECV_BUFFER_BYTES = 256 * 1024
"""Largest packet we read: GRO aggregates exceed 64 KiB frames only with BIG TCP."""
BATCH_MAX_PACKETS = 1024
"""At most this many packets per read_batch, so timers and responses are not starved."""

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

# ARPHRD_* device types (linux/if_arp.h): which ones carry an Ethernet header.
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
_ARPHRD_ETHERNET_LIKE = {ARPHRD_ETHER, ARPHRD_LOOPBACK}
_ARPHRD_RAW_IP = {65534, 519, 768, 776, 778}  # NONE, RAWIP, TUNNEL, SIT, IPGRE

Packet = tuple[float, bytes]


# --------------------------------------------------------------------------------------------
# The cheap -x pre-filter (spec §3.3 steps 1-2), applied before anything is parsed in full.
# --------------------------------------------------------------------------------------------


class TransferFilter:
    """Keeps IPv4/TCP packets whose (dst ip, dst port) match a -x entry and that are not pure
    ACKs: the Python twin of ``bpf.capture_program`` (spec §3.3 steps 1, 2, 8).

    `match(dst_ip, dst_port)` is `rewrite.match_transfer` bound to the entries (injected so
    this module stays testable without the rewrite layer).  `transfers` lists the entries as
    (online ip, online port) for the kernel program (`for_transfers` fills it); without it
    live sources cannot attach an exact program and filter here.  `drop_pure_acks=False`
    keeps pure ACKs (only for callers that need C's exact step 8).

    counters: capture_packets (every packet seen, C's "total captured packets"),
    capture_bytes, capture_not_tcp, capture_fragment (non-first IP fragments: no TCP header),
    capture_not_matched, capture_pure_ack_dropped (also counted as drop_pure_ack, the loss
    reason the sessions use for the same packets), capture_accepted.
    """

    def __init__(
        self,
        match: Callable[[int, int], object],
        counters: Counter[str] | None = None,
        *,
        transfers: Sequence[tuple[int, int]] = (),
        drop_pure_acks: bool = True,
    ):
        self.match = match
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.transfers = tuple(transfers)
        self.drop_pure_acks = drop_pure_acks

    @classmethod
    def for_transfers(cls, transfers: Sequence[object]) -> TransferFilter:
        from engine import rewrite

        entries = tuple(transfers)
        pairs = [(e.online_ip, e.online_port) for e in entries]  # type: ignore[attr-defined]
        return cls(lambda ip, port: rewrite.match_transfer(entries, ip, port), transfers=pairs)

    def keep(self, ip: bytes) -> bool:
        """The live rule (``drop_pure_acks`` as configured)."""
        return self._keep(ip, self.drop_pure_acks)

    def keep_with_pure_acks(self, ip: bytes) -> bool:
        """The offline rule: pure ACKs stay (the session table drops those of established
        sessions, spec §3.3 step 8, and uses the captured handshake ACK)."""
        return self._keep(ip, False)

    def _keep(self, ip: bytes, drop_pure_acks: bool) -> bool:
        c = self.counters
        c["capture_packets"] += 1
        c["capture_bytes"] += len(ip)
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_TCP:
            c["capture_not_tcp"] += 1
            return False
        if (ip[6] << 8 | ip[7]) & 0x1FFF:
            c["capture_fragment"] += 1
            return False
        ihl = (ip[0] & 0x0F) * 4
        # The TCP flags (ihl + 13) must be there: the kernel program drops shorter packets.
        if ihl < 20 or len(ip) < ihl + 14:
            c["capture_not_tcp"] += 1
            return False
        dst_ip = int.from_bytes(ip[16:20], "big")
        dst_port = ip[ihl + 2] << 8 | ip[ihl + 3]
        if self.match(dst_ip, dst_port) is None:
            c["capture_not_matched"] += 1
            return False
        if drop_pure_acks and bpf.is_pure_ack(ip, ihl):
            c["capture_pure_ack_dropped"] += 1
            c["drop_pure_ack"] += 1
            return False
        c["capture_accepted"] += 1
        return True


def _keep_all(ip: bytes) -> bool:
    return True


# --------------------------------------------------------------------------------------------
# Live sources
# --------------------------------------------------------------------------------------------


class _LiveSource:
    """A non-blocking capture socket read in batches into one reused buffer.

    ``kernel_filtered`` is True when the exact program (engine/bpf.py) is attached: every
    packet received is then one to keep, and ``read_batch`` only copies it out.
    """

    exhausted = False

    def __init__(self, sock: socket.socket, prefilter: TransferFilter | None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.prefilter = prefilter
        self.keep = prefilter.keep if prefilter is not None else _keep_all
        self.kernel_filtered = False
        # One receive buffer, reused: a fresh 256 KiB bytes per recv() would cost an
        # mmap/munmap pair per packet (above malloc's mmap threshold).
        self._view = memoryview(bytearray(RECV_BUFFER_BYTES))
        self.counters: Counter[str] = Counter()

    def fileno(self) -> int | None:
        return self.sock.fileno()

    def next_deadline(self) -> float | None:
        return None

    def close(self) -> None:
        self.sock.close()

    def _attach_filter(self, base: int, ports: Sequence[int] = ()) -> None:
        """Attach the exact program for the prefilter's -x entries; if it does not fit, the
        ports-only superset (Python filters again); if attaching fails, nothing (Python
        filters everything).  Never raises: the capture works without it, only slower."""
        transfers: Sequence[tuple[int, int]] = ()
        if self.prefilter is not None:
            transfers = self.prefilter.transfers
        if not transfers:
            transfers = [(0, p) for p in ports]
        if not transfers:
            return
        exact = self.prefilter is not None and bool(self.prefilter.transfers)
        pure_acks = self.prefilter is not None and not self.prefilter.drop_pure_acks
        try:
            try:
                program = bpf.capture_program(transfers, base, pure_acks=pure_acks)
            except bpf.ProgramTooLarge:
                program = bpf.capture_program(transfers, base, ports_only=True, pure_acks=pure_acks)
                exact = False
            attach_bpf(self.sock, program)
        except (OSError, ValueError) as exc:
            log.warning("capture: no kernel filter (%s); filtering in Python", exc)
            self.counters["capture_kernel_filter_failed"] += 1
            return
        if exact:
            self.kernel_filtered = True
            self.counters["capture_kernel_filtered"] = 1

    def _flush_unfiltered(self) -> None:
        """Drop what was queued before the filter was attached (microseconds' worth)."""
        recv_into, view = self.sock.recv_into, self._view
        try:
            for _ in range(1 << 16):
                recv_into(view)
        except OSError:
            pass

    def _count_batch(self, packets: int, nbytes: int) -> None:
        c = self.counters
        c["capture_packets"] += packets
        c["capture_bytes"] += nbytes
        c["capture_accepted"] += packets

    def _recv_error(self, exc: OSError) -> None:
        # ENETDOWN etc. on a device that went away: count, keep running (the device may return).
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self.counters[f"capture_error_{name}"] += 1


class RawTcpSource(_LiveSource):
    """Every TCP packet arriving at this host, from an IPPROTO_TCP raw socket (spec §3.2).

    The socket's filter sees the IP header at offset 0 (``bpf.IP_BASE``).  ``sock`` is for
    tests (any datagram socket carrying IPv4 packets); ``kernel_filter=False`` skips the
    program.
    """

    def __init__(
        self,
        prefilter: TransferFilter | None = None,
        rcvbuf_bytes: int = RAW_RCVBUF_BYTES,
        *,
        sock: socket.socket | None = None,
        kernel_filter: bool = True,
    ) -> None:
        own = sock is None
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
            _set_rcvbuf(sock, rcvbuf_bytes)
        super().__init__(sock, prefilter)
        if kernel_filter:
            self._attach_filter(bpf.IP_BASE)
        if own and self.kernel_filtered:
            # The socket received from its creation on, before the filter was attached.
            self._flush_unfiltered()

    def read_batch(self, now: float) -> list[Packet]:
        if self.kernel_filtered:
            return self._read_filtered(now)
        out: list[Packet] = []
        recv_into, view, keep = self.sock.recv_into, self._view, self.keep
        for _ in range(BATCH_MAX_PACKETS):
            try:
                n = recv_into(view)
            except BlockingIOError:
                break
            except OSError as exc:
                self._recv_error(exc)
                break
            ip = bytes(view[:n])
            if keep(ip):
                out.append((now, ip))
        return out

    def _read_filtered(self, now: float) -> list[Packet]:
        # The hot loop of the capture process: the kernel kept only what the replay needs.
        out: list[Packet] = []
        append = out.append
        recv_into, view = self.sock.recv_into, self._view
        nbytes = 0
        try:
            for _ in range(BATCH_MAX_PACKETS):
                n = recv_into(view)
                nbytes += n
                append((now, view[:n].tobytes()))
        except BlockingIOError:
            pass
        except OSError as exc:
            self._recv_error(exc)
        self._count_batch(len(out), nbytes)
        return out


class PacketSource(_LiveSource):
    """AF_PACKET capture on one device (or every device when `device` is None or "any").

    The program finds the IP header through the skb's network header (``bpf.NET_BASE``), so
    one program serves every link type, VLAN-tagged frames and all devices at once, and it
    drops our own outgoing frames.  ``bpf_ports``: a ports-only program when the prefilter
    carries no entries.
    """

    def __init__(
        self,
        device: str | None,
        prefilter: TransferFilter | None = None,
        rcvbuf_bytes: int = RAW_RCVBUF_BYTES,
        bpf_ports: Sequence[int] = (),
        *,
        kernel_filter: bool = True,
    ) -> None:
        if device == "any":
            device = None
        self.device = device
        # Protocol 0: nothing is queued before the filter is in place; bind() starts it.
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            _set_rcvbuf(sock, rcvbuf_bytes)
            if device is not None:
                _device_hatype(device)  # ENODEV with the device's name
        except OSError:
            sock.close()
            raise
        super().__init__(sock, prefilter)
        if kernel_filter:
            self._attach_filter(bpf.NET_BASE, bpf_ports)
        try:
            sock.bind((device or "", ETH_P_ALL))  # "": every device
        except OSError:
            sock.close()
            raise

    def read_batch(self, now: float) -> list[Packet]:
        out: list[Packet] = []
        recvfrom_into, view, c = self.sock.recvfrom_into, self._view, self.counters
        keep = None if self.kernel_filtered else self.keep
        nbytes = 0
        for _ in range(BATCH_MAX_PACKETS):
            try:
                n, addr = recvfrom_into(view)
            except BlockingIOError:
                break
            except OSError as exc:
                self._recv_error(exc)
                break
            # addr = (ifname, proto, pkttype, hatype, hwaddr)
            if addr[2] == PACKET_OUTGOING:
                # Our own sends (and the host's replies) must not be replayed again.
                continue
            hatype = addr[3]
            if hatype in _ARPHRD_ETHERNET_LIKE:
                if addr[1] not in (ETH_P_IP, ETH_P_8021Q, ETH_P_8021AD):
                    continue
                frame = view[:n]
                try:
                    off = packet.l2_offset(frame, packet.DLT_EN10MB)
                except DecodeError:
                    c["capture_l2_error"] += 1
                    continue
                ip = frame[off:].tobytes()
            elif hatype in _ARPHRD_RAW_IP:
                ip = view[:n].tobytes()
            else:
                c["capture_l2_unsupported"] += 1
                continue
            if keep is None:
                nbytes += len(ip)
                out.append((now, ip))
            elif keep(ip):
                out.append((now, ip))
        if keep is None:
            self._count_batch(len(out), nbytes)
        return out


def _set_rcvbuf(sock: socket.socket, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        except OSError:
            pass


def _device_hatype(device: str) -> int:
    """ARPHRD type of `device`; raises OSError(ENODEV) when it does not exist."""
    try:
        with open(f"/sys/class/net/{device}/type", encoding="ascii") as f:
            return int(f.read().strip())
    except FileNotFoundError:
        raise OSError(errno.ENODEV, f"no such network device: {device}") from None


def device_exists(device: str) -> bool:
    return os.path.exists(f"/sys/class/net/{device}")


# --------------------------------------------------------------------------------------------
# SO_ATTACH_FILTER (the programs are built by engine/bpf.py)
# --------------------------------------------------------------------------------------------

_SOCK_FILTER = struct.Struct("HBBI")  # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}
_SOCK_FPROG = struct.Struct("HL")  # struct sock_fprog {unsigned short len; filter *}


def attach_bpf(sock: socket.socket, program: Sequence[tuple]) -> None:
    """SO_ATTACH_FILTER: the kernel copies the program, so the buffer may go right after."""
    raw = b"".join(_SOCK_FILTER.pack(*ins) for ins in program)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = _SOCK_FPROG.pack(len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


# --------------------------------------------------------------------------------------------
# Offline replay (spec §3.16)
# --------------------------------------------------------------------------------------------


class ReplayPacer:
    """The offline schedule: when (monotonic time) is each pcap packet due.  Pure.

    due = pass_start + (ts - first_ts - skipped_idle) / accelerate

    * `accelerate` (-a) divides every gap (spec §3.16 applies it only for -a > 1; any
      positive value works here, so 0.5 replays at half speed).
    * `idle_threshold_s` (-I): an inter-packet gap longer than this is skipped entirely, as in
      C.  QUIRK fixed (spec §3.16): C re-adds the same gap on every evaluation of its stop
      condition; here each gap is counted exactly once, because `due()` is called exactly once
      per packet, in file order.
    * A timestamp going backwards never moves the schedule back (due times never decrease).
    """

    def __init__(self, accelerate: float = 1.0, idle_threshold_s: float = 0.0) -> None:
        if accelerate <= 0:
            raise ValueError("accelerate must be > 0")
        self.accelerate = accelerate
        self.idle_threshold_s = idle_threshold_s
        self.idle_gaps = 0
        self.skipped_s = 0.0
        self.restart(0.0)

    def restart(self, now: float) -> None:
        """Begin a new pass (a new file or a -T replay) at monotonic time `now`."""
        self.start = now
        self._first: float | None = None
        self._prev = 0.0
        self._pass_skipped = 0.0
        self._last_offset = 0.0

    def due(self, ts: float) -> float:
        """Monotonic time at which the packet stamped `ts` should be replayed."""
        if self._first is None:
            self._first = self._prev = ts
        gap = ts - self._prev
        if self.idle_threshold_s > 0 and gap > self.idle_threshold_s:
            self._pass_skipped += gap
            self.skipped_s += gap
            self.idle_gaps += 1
        if ts > self._prev:
            self._prev = ts
        offset = max(self._last_offset, ts - self._first - self._pass_skipped)
        self._last_offset = offset
        return self.start + offset / self.accelerate


def _files_bytes(paths: Sequence[str]) -> int:
    """Sum of the files' sizes; 0 (progress unknown) if any size cannot be read."""
    try:
        return sum(os.path.getsize(p) for p in paths)
    except OSError:
        return 0


class PcapFileSource:
    """Replays pcap files in order, `replays` times (-T), paced by `ReplayPacer`.

    `opener(path)` returns a reader with `.linktype` that iterates (ts, wire_len, frame)
    (engine.pcapfile.open_pcap; raises DecodeError for a bad file).  Packets cut short by the
    capture's snaplen (caplen < wire length) are dropped and counted (spec §3.16).  The next
    pass starts right after the previous one's last packet: no 120 s tail
    (OFFLINE_TAIL_TIMEOUT in C).

    counters: capture_truncated, capture_l2_error, offline_packets (emitted),
    offline_passes (completed file passes), offline_idle_gaps; for the progress display
    (the supervisor renders it from the counter block): offline_records (records read),
    offline_bytes_read (file bytes consumed) and offline_bytes_total (the sum of the file
    sizes times -T; 0 when a size is unknown).
    """

    def __init__(
        self,
        paths: Sequence[str],
        pacer: ReplayPacer,
        replays: int = 1,
        prefilter: TransferFilter | None = None,
        opener: Callable[[str], object] | None = None,
    ) -> None:
        if opener is None:
            from engine.pcapfile import open_pcap

            opener = open_pcap
        if not paths:
            raise ValueError("no pcap file")
        self.paths = list(paths)
        self.pacer = pacer
        self.replays_left = max(1, replays)
        # Offline keeps pure ACKs: a file is not read at line rate, and the captured
        # handshake ACK gives the request gate its exact origin (server-first protocols).
        self.keep = prefilter.keep_with_pure_acks if prefilter is not None else _keep_all
        self.opener = opener
        self.counters: Counter[str] = Counter()
        self.counters["offline_bytes_total"] = _files_bytes(self.paths) * self.replays_left
        self.exhausted = False
        self._file_index = -1
        self._reader: object | None = None
        self._iter: Iterator[tuple[float, int, bytes]] | None = None
        self._linktype = packet.DLT_EN10MB
        self._pending: tuple[float, float, bytes] | None = None  # (due, ts, ip)
        self._started = False

    def fileno(self) -> int | None:
        return None

    def start(self, now: float) -> None:
        """Open the first file and schedule its first packet relative to `now`."""
        self._started = True
        self.pacer.restart(now)
        self._advance(now)

    def next_deadline(self) -> float | None:
        if self.exhausted or not self._started:
            return None
        return self._pending[0] if self._pending is not None else None

    def read_batch(self, now: float) -> list[Packet]:
        if not self._started:
            self.start(now)
        out: list[Packet] = []
        while self._pending is not None and self._pending[0] <= now:
            if len(out) >= BATCH_MAX_PACKETS:
                break
            _, ts, ip = self._pending
            out.append((ts, ip))
            self.counters["offline_packets"] += 1
            self._advance(now)
        return out

    def close(self) -> None:
        self._close_reader()

    # -- internals --------------------------------------------------------------------------

    def _close_reader(self) -> None:
        close = getattr(self._reader, "close", None)
        if close is not None:
            close()
        self._reader = self._iter = None

    def _open_next(self, now: float) -> bool:
        """Open the next file (or the first again for the next -T pass); False when done."""
        self._close_reader()
        self._file_index += 1
        if self._file_index >= len(self.paths):
            self.replays_left -= 1
            self.counters["offline_passes"] += 1
            if self.replays_left <= 0:
                return False
            self._file_index = 0
        reader = self.opener(self.paths[self._file_index])
        self._reader = reader
        self.counters["offline_bytes_read"] += PCAP_GLOBAL_HEADER_BYTES
        self._linktype = reader.linktype  # type: ignore[attr-defined]
        self._iter = iter(reader)  # type: ignore[call-overload]
        self.pacer.restart(now)
        return True

    def _advance(self, now: float) -> None:
        """Find the next replayable packet and its due time; mark exhaustion at the end."""
        self._pending = None
        while True:
            if self._iter is None:
                if not self._open_next(now):
                    self.exhausted = True
                    self.counters["offline_idle_gaps"] = self.pacer.idle_gaps
                    return
                continue
            try:
                ts, wire_len, frame = next(self._iter)
            except StopIteration:
                self._iter = None
                continue
            except DecodeError as exc:
                # A file cut short mid-record: replay what came before, say so once.
                self.counters["capture_file_error"] += 1
                log.warning(
                    "%s: %s; the rest of the file is skipped", self.paths[self._file_index], exc
                )
                self._iter = None
                continue
            self.counters["offline_records"] += 1
            self.counters["offline_bytes_read"] += PCAP_RECORD_HEADER_BYTES + len(frame)
            if len(frame) < wire_len:
                self.counters["capture_truncated"] += 1
                continue
            try:
                off = packet.l2_offset(frame, self._linktype)
            except DecodeError:
                self.counters["capture_l2_error"] += 1
                continue
            ip = frame[off:]
            if not self.keep(ip):
                continue
            self._pending = (self.pacer.due(ts), ts, ip)
            self.counters["offline_idle_gaps"] = self.pacer.idle_gaps
            return
