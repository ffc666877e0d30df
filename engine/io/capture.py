"""Packet sources: what tcpcopy-mp replays comes from here as raw IPv4 packets (bytes).

Theory of operation
-------------------
Every source offers the same small interface so the capture process that feeds the
shared-memory rings (engine/proc/capture.py, design §3) can drive any of them;
``build_sources`` makes the ones a configuration asks for:

    src.fileno() -> int | None         # selectable fd, or None (a pcap file is paced by time)
    src.next_deadline() -> float|None  # when read_batch has something to return (files only)
    src.read_batch(now) -> list[tuple[float, bytes]]   # (capture time, IPv4 packet)
    src.exhausted -> bool              # a file source that has played all its passes
    src.counters: Counter; src.close()

* `RawTcpSource`: socket(AF_INET, SOCK_RAW, IPPROTO_TCP), the C default (spec §3.2): every TCP
  packet *arriving at* this host, IP header included, read until EAGAIN.
* `PacketSource`: AF_PACKET/SOCK_RAW/ETH_P_ALL bound to a device (or all): sees mirrored
  traffic too.  Outgoing frames are skipped and the link header is stripped.
* `TPacketSource`: AF_PACKET with a TPACKET_V3 mmap RX ring (the live default, see
  `open_live_source`): the kernel fills blocks of frames in shared memory and hands a whole
  block over per wake-up; no recv per packet.  `read_frames` returns a block as a
  `FrameBatch` (numpy arrays of IP offsets, lengths, flow keys and TCP flags, pulled for
  every frame of the block at once), which the capture process copies straight into the
  rings; `release` gives the blocks back to the kernel.  Where the data plane is compiled the
  capture process reads the blocks in place instead (`ready_blocks`, `buffer`: one call of
  engine/dataplane/capture.pyx per block); this module's walk is its specification.  The ring
  is mapped by the process that reads it (`map_ring`), never by the supervisor that opened
  the socket.
* `PcapFileSource`: offline replay (spec §3.16) paced by `ReplayPacer`, a pure schedule.
  Where the data plane is compiled the capture process gives it a walker (`use_walker`):
  the source then opens the files and fills a buffer with large reads, and
  engine/dataplane/capture.pyx walks the records, paces them and copies them into the rings
  (`walk_into`, one call per read); `read_batch` is its specification.

What a live source hands on is decided by one rule (engine/codec/bpf.py): IPv4 TCP to a -x
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
import mmap
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple

from engine.codec import bpf, packet
from engine.codec.bpf import PACKET_OUTGOING
from engine.codec.link import ARPHRD_ETHER, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP
from engine.codec.pcapfile import PCAP_GLOBAL_HEADER_BYTES, PCAP_RECORD_HEADER_BYTES
from engine.errors import DecodeError
from engine.io.logs import LOGGER_NAME

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(LOGGER_NAME)

RAW_RCVBUF_BYTES = 64 * 1024 * 1024
"""SO_RCVBUF of the raw capture socket, as C tcpcopy (spec §3.2)."""
RECV_BUFFER_BYTES = 256 * 1024
"""Largest packet we read: GRO aggregates exceed 64 KiB frames only with BIG TCP."""
BATCH_MAX_PACKETS = 1024
"""At most this many packets per read_batch, so timers and responses are not starved."""

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

# ARPHRD_* device types (linux/if_arp.h): which ones carry an Ethernet header.
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
    keeps pure ACKs (only for callers that need C's exact step 8).  ``user_filter`` is the
    compiled -F expression (engine/io/pcapfilter.py): a packet must match it too; live sources
    run it in the kernel behind the -x program (``user_program``).

    counters: capture_packets (every packet seen, C's "total captured packets"),
    capture_bytes, capture_not_tcp, capture_fragment (non-first IP fragments: no TCP header),
    capture_not_matched, capture_pure_ack_dropped (also counted as drop_pure_ack, the loss
    reason the sessions use for the same packets), capture_filter_excluded (left out by -F
    where it runs in Python: offline files, sockets without the kernel program),
    capture_accepted.
    """

    def __init__(
        self,
        match: Callable[[int, int], object],
        counters: Counter[str] | None = None,
        *,
        transfers: Sequence[tuple[int, int]] = (),
        drop_pure_acks: bool = True,
        user_filter: object | None = None,
    ):
        self.match = match
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.transfers = tuple(transfers)
        self.drop_pure_acks = drop_pure_acks
        self.user_filter: Any = user_filter

    @property
    def user_program(self) -> Sequence[tuple[int, int, int, int]]:
        """The -F program (IP header at offset 0), () without -F."""
        return self.user_filter.program if self.user_filter is not None else ()

    @classmethod
    def for_transfers(cls, transfers: Sequence[object], capture_filter: str = "") -> TransferFilter:
        """The filter of a run: its -x entries, and its -F expression compiled (ConfigError
        naming -F when libpcap refuses it)."""
        from engine.core import rewrite

        user_filter = None
        if capture_filter:
            from engine.io.pcapfilter import compile_filter

            user_filter = compile_filter(capture_filter)
        entries = tuple(transfers)
        pairs = [(e.online_ip, e.online_port) for e in entries]  # type: ignore[attr-defined]
        return cls(
            lambda ip, port: rewrite.match_transfer(entries, ip, port),
            transfers=pairs,
            user_filter=user_filter,
        )

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
        if self.user_filter is not None and not self.user_filter.matches(ip):
            c["capture_filter_excluded"] += 1
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

    ``kernel_filtered`` is True when the exact program (engine/codec/bpf.py) is attached: every
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
        user = self.prefilter.user_program if self.prefilter is not None else ()
        try:
            try:
                program = bpf.capture_program(transfers, base, pure_acks=pure_acks, user=user)
            except bpf.ProgramTooLarge:
                # A superset (the Python filter, -F included, decides again).
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
            bind_packet_socket(sock, device)
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


# --------------------------------------------------------------------------------------------
# TPACKET_V3: the mmap RX ring (linux/if_packet.h; Documentation/networking/packet_mmap.rst)
# --------------------------------------------------------------------------------------------
#
# The ring is tp_block_nr blocks of tp_block_size bytes.  The kernel fills one block at a time
# with frames laid out back to back (each 16-byte aligned, linked by tp_next_offset) and
# "retires" it to user space, by setting TP_STATUS_USER in its block_status, when it is full
# or tp_retire_blk_tov ms after its first frame.  We read every frame of the block, then hand
# it back by writing TP_STATUS_KERNEL.  poll()/select() on the socket says a block is ready.
#
#   block:  tpacket_block_desc: version u32, offset_to_priv u32, then tpacket_hdr_v1:
#           block_status u32 @8, num_pkts u32 @12, offset_to_first_pkt u32 @16, blk_len u32
#           @20, seq_num u64 @24, ts_first, ts_last (48 bytes)
#   frame:  tpacket3_hdr: tp_next_offset u32 @0, tp_sec @4, tp_nsec @8, tp_snaplen @12,
#           tp_len @16, tp_status @20, tp_mac u16 @24, tp_net u16 @26, hv1 (rxhash, vlan) @28,
#           padding to 48; then struct sockaddr_ll at 48 (sll_pkttype u8 @58)
#   tp_mac / tp_net are offsets from the frame's start to the link / network (IP) header.

SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_IGNORE_OUTGOING = 23
TPACKET_V3 = 2
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
TPACKET_BLOCK_BYTES = 1 << 17
"""One ring block (128 KiB): up to a few hundred packets per wake-up at load, and room for a
64 KiB GRO aggregate (a frame larger than a block would be cut short)."""
TPACKET_FRAME_BYTES = 1 << 11
"""tp_frame_size: only a sizing unit for TPACKET_V3 (frames are packed by their real size)."""
TPACKET_RETIRE_MS = 32
"""A block that is not full is handed over this long after its first frame: the capture's
added latency at low load (a replay's timing is the captured one, this only shifts it).  It
also sets how long the capture process may be off the CPU before the kernel drops: at low
rates each block carries one timeout's worth of packets, so the ring holds blocks x
TPACKET_RETIRE_MS (32 x 32 ms = 1 s with the default -B 4); 0.5 s lost packets on a shared
2-CPU machine under load (with the capture's walk in Python)."""
TPACKET_BLOCKS_PER_READ = 8
TPACKET_ENV = "TCPCOPY_MP_TPACKET"
"""Set to 0: the live capture reads packet by packet (recv), as where the kernel has no
TPACKET_V3 ring (tests of that path, comparisons)."""
"""Blocks read per read_frames call before the loop looks at its timers again."""
_TPACKET_REQ3 = struct.Struct("7I")
_TPACKET_STATS_V3 = struct.Struct("3I")
_BLOCK_STATUS = 8 // 4  # u32 word indexes inside a block descriptor
_BLOCK_NUM_PKTS = 12 // 4
_BLOCK_FIRST = 16 // 4
_BLOCK_SEQ = 24 // 4  # u64, as two u32 words (little-endian)
_FRAME_SNAPLEN = 12 // 4  # u32 words inside a frame header
_FRAME_LEN = 16 // 4
_FRAME_MAC = 24 // 2  # u16 words
_FRAME_NET = 26 // 2
_FRAME_PKTTYPE = 58  # bytes
_BLOCK_HEADER_NEED = 20  # bytes of a block descriptor that are read (to offset_to_first_pkt)
_FRAME_HEADER_NEED = 60  # bytes of a frame header that are read (to sll_pkttype)


class FrameBatch(NamedTuple):
    """The IPv4 packets of one capture block, as arrays over a buffer (no bytes objects).

    ``buf[starts[i] : starts[i] + lengths[i]]`` is packet i; ``keys[i]`` its flow key
    (client ip << 16 | client port, what the dispatcher hashes) and ``flags[i]`` its TCP
    flags.  The buffer belongs to the source until ``release()``.
    """

    buf: memoryview
    starts: np.ndarray  # int64
    lengths: np.ndarray  # int64
    keys: np.ndarray  # uint64
    flags: np.ndarray  # uint8
    ts: float


@cache
def _gathers() -> tuple[np.ndarray, ...]:
    """The index and weight arrays of the Python block walk (numpy is imported by that walk
    only: the compiled walk, engine/dataplane/capture.pyx, needs none of this)."""
    import numpy as np

    return (
        np.arange(5, dtype=np.int64),  # tp_next_offset .. tp_len (u32 words 0-4)
        np.array([0, 9, 12, 13, 14, 15], dtype=np.int64),  # version/IHL, protocol, src
        np.array([0, 1, 13], dtype=np.int64),  # source port, flags
        np.array([1 << 40, 1 << 32, 1 << 24, 1 << 16], dtype=np.int64),  # src address
        np.array([1 << 8, 1], dtype=np.int64),  # src port
        np.array([_FRAME_MAC, _FRAME_NET], dtype=np.int64),  # u16 words
    )


def frame_fields(
    u32: np.ndarray, u16: np.ndarray, u8: np.ndarray, frames: np.ndarray, end: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For frames at ``frames`` (headers checked by ``walk_frames``): (ip start, ip length,
    pkttype, truncated, inside) as arrays; ``inside`` is False for a frame whose captured
    bytes pass ``end`` or whose IP header (tp_net) is not within them.

    A few numpy gathers per block, whatever its packet count (each numpy call costs about a
    microsecond, so the fields are taken as matrices, not one call per field)."""
    import numpy as np

    frame_words, mac_net_words = _gathers()[0], _gathers()[5]
    head = u32.take((frames >> 2)[:, None] + frame_words).astype(np.int64)
    macnet = u16.take((frames >> 1)[:, None] + mac_net_words).astype(np.int64)
    snaplen = head[:, _FRAME_SNAPLEN]
    mac, net = macnet[:, 0], macnet[:, 1]
    inside = (net >= mac) & (net <= mac + snaplen) & (frames + mac + snaplen <= end)
    starts = frames + net
    lengths = snaplen - (net - mac)
    truncated = snaplen < head[:, _FRAME_LEN]
    return starts, lengths, u8.take(frames + _FRAME_PKTTYPE), truncated, inside


def ip_flow_fields(
    u8: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flow key u64, TCP flags u8, well-formed mask) of the IPv4/TCP packets at ``starts``.

    Packets too short for their TCP flags, or not IPv4/TCP, are marked not well-formed (an
    exact kernel filter lets none of them through; the others are read as zeros).  Reads
    past the buffer are clipped (``take(mode="clip")``), never raised.
    """
    import numpy as np

    _, ip_bytes, tcp_bytes, src_weights, port_weights, _ = _gathers()
    ip = u8.take(starts[:, None] + ip_bytes, mode="clip")
    b0 = ip[:, 0]
    ihl = (b0 & 0x0F).astype(np.int64) << 2
    ok = (b0 >> 4 == 4) & (ihl >= 20) & (lengths >= ihl + 14) & (ip[:, 1] == 6)
    tcp = u8.take((starts + ihl)[:, None] + tcp_bytes, mode="clip")
    # ip << 16 | port as two small matrix products (the key fits 48 bits of an int64).
    keys = ip[:, 2:].astype(np.int64) @ src_weights + tcp[:, :2].astype(np.int64) @ port_weights
    flags = tcp[:, 2]
    if not ok.all():
        keys = np.where(ok, keys, 0)
        flags = np.where(ok, flags, np.uint8(0))
    return keys.astype(np.uint64), flags, ok


class TPacketSource(_LiveSource):
    """AF_PACKET capture through a TPACKET_V3 mmap RX ring on one device (or every device).

    The same kernel program as PacketSource (``bpf.NET_BASE``: every link type, VLAN tags,
    our own outgoing frames dropped) is attached before the ring is bound.  ``read_frames``
    is the capture process's path; ``read_batch`` (bytes per packet) serves any other
    caller.  Raises OSError when the kernel refuses TPACKET_V3 or the ring (the caller falls
    back to a recv socket, ``open_live_source``).

    counters (besides the live-source ones): capture_truncated (frames cut short by the
    block size), capture_kernel_dropped (the kernel's count of packets the full ring lost,
    PACKET_STATISTICS), capture_blocks (blocks read), capture_block_errors (blocks that lied
    about their frames: read up to the first bad one, ``parse_block``).
    """

    def __init__(
        self,
        device: str | None,
        prefilter: TransferFilter | None = None,
        ring_bytes: int = RAW_RCVBUF_BYTES,
        bpf_ports: Sequence[int] = (),
        *,
        kernel_filter: bool = True,
        block_bytes: int = TPACKET_BLOCK_BYTES,
        retire_ms: int = TPACKET_RETIRE_MS,
        host_only: bool = False,
    ) -> None:
        if device == "any":
            device = None
        self.device = device
        self.host_only = host_only
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self._mm: mmap.mmap | None = None
        self._u8: Any = None  # numpy views of the ring: made by the Python walk only
        self._u16: Any = None
        self._u32: Any = None
        try:
            if device is not None:
                _device_hatype(device)
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            blocks = max(2, ring_bytes // block_bytes)
            frames = blocks * (block_bytes // TPACKET_FRAME_BYTES)
            req = _TPACKET_REQ3.pack(
                block_bytes, blocks, TPACKET_FRAME_BYTES, frames, retire_ms, 0, 0
            )
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        except OSError:
            sock.close()
            raise
        super().__init__(sock, prefilter)
        self.blocks = blocks
        self.block_bytes = block_bytes
        # Mapped by the first read (``map_ring``), in the process that reads: the supervisor,
        # which opens the socket before it forks the capture process, never maps the ring.
        self._view: memoryview | None = None  # type: ignore[assignment]
        self._next = 0  # the block the kernel fills next (they are retired in order)
        self._held: list[int] = []  # blocks handed out by read_frames, not yet released
        self._drops_logged = 0
        if kernel_filter:
            self._attach_filter(bpf.NET_BASE, bpf_ports)
        try:
            bind_packet_socket(sock, device)
        except OSError:
            self.close()
            raise

    # -- blocks ------------------------------------------------------------------------------

    def map_ring(self) -> None:
        """Map the ring (once, in the process that reads it)."""
        if self._mm is not None:
            return
        self._mm = mmap.mmap(
            self.sock.fileno(),
            self.blocks * self.block_bytes,
            mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
        )
        self._view = memoryview(self._mm)
        self._words = memoryview(self._mm).cast("I")

    @property
    def mapped(self) -> bool:
        """The ring is mapped in this process."""
        return self._mm is not None

    def _ready_block(self, scan: bool) -> int | None:
        words, size = self._words, self.block_bytes
        off = self._next * size
        if not words[(off >> 2) + _BLOCK_STATUS] & TP_STATUS_USER:
            if not scan:
                return None
            # Nothing where we expect it.  Normally the kernel is still filling that block;
            # but a restarted capture process inherits the cursor of its parent's object, so
            # resynchronize on the oldest ready block (the lowest seq_num), if any.
            oldest = None
            for i in range(self.blocks):
                base = (i * size) >> 2
                if words[base + _BLOCK_STATUS] & TP_STATUS_USER and i * size not in self._held:
                    seq = words[base + _BLOCK_SEQ] | words[base + _BLOCK_SEQ + 1] << 32
                    if oldest is None or seq < oldest[0]:
                        oldest = (seq, i)
            if oldest is None:
                return None
            self._next = oldest[1]
            off = self._next * size
        self._next = (self._next + 1) % self.blocks
        return off

    def release(self) -> None:
        """Hand the blocks of the last read_frames back to the kernel."""
        if not self._held:
            return
        words = self._words
        for off in self._held:
            words[(off >> 2) + _BLOCK_STATUS] = TP_STATUS_KERNEL
        self._held.clear()

    def ready_blocks(self) -> list[int]:
        """The byte offsets of the ready blocks (at most TPACKET_BLOCKS_PER_READ), held
        until ``release()``: what ``read_frames`` parses, and what the compiled walk
        (engine/dataplane/capture.pyx) reads in place from ``buffer``."""
        self.map_ring()
        self.release()
        c = self.counters
        for i in range(TPACKET_BLOCKS_PER_READ):
            block = self._ready_block(scan=i == 0)
            if block is None:
                break
            self._held.append(block)
            c["capture_blocks"] += 1
        if self._held:
            self._kernel_stats()
        return list(self._held)

    @property
    def buffer(self) -> memoryview:
        """The mapped ring (blocks at the offsets ``ready_blocks`` gives)."""
        self.map_ring()
        assert self._view is not None
        return self._view

    def read_frames(self, now: float) -> list[FrameBatch]:
        """The ready blocks (at most TPACKET_BLOCKS_PER_READ), one FrameBatch each (empty
        for a block with nothing to replay); call ``release()`` once they are copied out."""
        return [self._parse_block(block, now) for block in self.ready_blocks()]

    def _parse_block(self, block: int, now: float) -> FrameBatch:
        if self._u8 is None:
            import numpy as np

            self._u8 = np.frombuffer(self._mm, dtype=np.uint8)
            self._u16 = self._u8.view(np.uint16)
            self._u32 = self._u8.view(np.uint32)
        starts, lengths, keys, flags, ok, truncated = parse_block(
            self._words,
            self._u8,
            self._u16,
            self._u32,
            block,
            host_only=self.host_only,
            block_bytes=self.block_bytes,
            counters=self.counters,
        )
        c = self.counters
        if truncated:
            c["capture_truncated"] += truncated
        if self.kernel_filtered:
            keep = ok
        else:
            keep = self._python_filter(starts, lengths)
        if not keep.all():
            starts, lengths, keys, flags = starts[keep], lengths[keep], keys[keep], flags[keep]
        if self.kernel_filtered:
            c["capture_packets"] += len(starts)
            c["capture_bytes"] += int(lengths.sum())
            c["capture_accepted"] += len(starts)
        return FrameBatch(self._view, starts, lengths, keys, flags, now)

    def _python_filter(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Without an exact kernel program: TransferFilter.keep on every frame (it counts)."""
        import numpy as np

        view, keep = self._view, self.keep
        return np.fromiter(
            (
                keep(view[s : s + n].tobytes())
                for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)
            ),
            dtype=bool,
            count=len(starts),
        )

    def _kernel_stats(self) -> None:
        # PACKET_STATISTICS reads and resets the kernel's counts.
        try:
            raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS_V3.size)
        except OSError:
            return
        _packets, drops, _freeze = _TPACKET_STATS_V3.unpack(raw)
        if drops:
            c = self.counters
            c["capture_kernel_dropped"] += drops
            if c["capture_kernel_dropped"] >= self._drops_logged * 10 or not self._drops_logged:
                # Logged at the first drop, then each time the total grew tenfold.
                self._drops_logged = max(1, c["capture_kernel_dropped"])
                log.warning(
                    "capture: the kernel dropped %d packets so far (the TPACKET ring was full: "
                    "the capture process was off the CPU or too slow; -B sizes the ring)",
                    c["capture_kernel_dropped"],
                )

    def read_batch(self, now: float) -> list[Packet]:
        """The source interface with bytes per packet (for callers other than the capture
        process); the blocks are released before returning."""
        out: list[Packet] = []
        for b in self.read_frames(now):
            view = b.buf
            for s, n in zip(b.starts.tolist(), b.lengths.tolist(), strict=True):
                out.append((now, view[s : s + n].tobytes()))
        self.release()
        return out

    def close(self) -> None:
        self._held.clear()
        self._u8 = self._u16 = self._u32 = None
        for name in ("_words", "_view"):
            v = getattr(self, name, None)
            if v is not None:
                v.release()
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        self.sock.close()


def walk_frames(words: memoryview, block: int, end: int) -> tuple[np.ndarray, bool]:
    """Offsets (from the buffer's start) of the frames of the block at byte ``block`` whose
    header lies inside the block (it ends at byte ``end``), and whether the block lied.

    ``words`` is the buffer cast to u32.  The frames form a chain (tp_next_offset), so this
    is the one per-frame Python step: one int read and one add per frame.  The walk stops
    (and says the block is bad) at a frame header that is not 4-byte aligned or not inside
    the block, and after a frame whose tp_next_offset is 0 while num_pkts promises more: a
    block is kernel memory, but nothing read from it is trusted (the compiled walk,
    engine/dataplane/capture.pyx, applies the same rules).
    """
    import numpy as np

    end = min(end, len(words) * 4)
    offsets: list[int] = []
    if block < 0 or block + _BLOCK_HEADER_NEED > end:
        return np.empty(0, dtype=np.int64), True
    base = block >> 2
    count = words[base + _BLOCK_NUM_PKTS]
    off = block + words[base + _BLOCK_FIRST]
    bad = False
    while len(offsets) < count:
        if off & 3 or off < block or off + _FRAME_HEADER_NEED > end:
            bad = True
            break
        offsets.append(off)
        if len(offsets) < count:
            step = words[off >> 2]
            if step == 0:
                bad = True
                break
            off += step
    return np.array(offsets, dtype=np.int64), bad


def block_frames(words: memoryview, block: int) -> np.ndarray:
    """``walk_frames`` of a block that may reach the end of the buffer: the offsets only."""
    return walk_frames(words, block, len(words) * 4)[0]


def parse_block(
    words: memoryview,
    u8: np.ndarray,
    u16: np.ndarray,
    u32: np.ndarray,
    block: int,
    *,
    host_only: bool = False,
    block_bytes: int | None = None,
    counters: Counter[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The IPv4 packets of the TPACKET_V3 block at byte ``block`` of a buffer seen as
    ``words`` (u32 memoryview) and ``u8``/``u16``/``u32`` (numpy views):
    (starts, lengths, flow keys, TCP flags, well-formed mask, frames truncated).

    Frames we must not replay are already left out: our own outgoing ones (the kernel
    program drops them too), with ``host_only`` every frame not addressed to this host,
    and frames cut short by the block (counted in the last item).  A block that lies
    (``walk_frames``; or a frame whose captured bytes leave the block of ``block_bytes``,
    default: up to the buffer's end, or whose IP header is not within them) is read up to
    its first bad frame and counted once in ``counters`` as capture_block_errors.
    """
    import numpy as np

    end = len(words) * 4
    if block_bytes is not None:
        end = min(end, block + block_bytes)
    frames, bad = walk_frames(words, block, end)
    if len(frames):
        starts, lengths, pkttype, truncated, inside = frame_fields(u32, u16, u8, frames, end)
        if not inside.all():
            bad = True
            first = int(np.argmin(inside))
            starts, lengths = starts[:first], lengths[:first]
            pkttype, truncated = pkttype[:first], truncated[:first]
    if bad and counters is not None:
        counters["capture_block_errors"] += 1
    if len(frames) == 0 or len(starts) == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty.astype(np.uint64), empty.astype(np.uint8), empty > 0, 0
    keep = pkttype != PACKET_OUTGOING
    if host_only:
        keep &= pkttype == 0  # PACKET_HOST: what a raw IP socket would have received
    cut = 0
    if truncated.any():
        cut = int((truncated & keep).sum())
        keep &= ~truncated
    if not keep.all():
        starts, lengths = starts[keep], lengths[keep]
    keys, flags, ok = ip_flow_fields(u8, starts, lengths)
    return starts, lengths, keys, flags, ok, cut


_fallback_logged = False


def open_live_source(
    device: str | None,
    prefilter: TransferFilter | None,
    buffer_bytes: int,
    bpf_ports: Sequence[int] = (),
    *,
    host_only: bool = False,
) -> _LiveSource:
    """The live capture source: TPACKET_V3 when the kernel offers it, else (logged once)
    the recv path (PacketSource, or RawTcpSource for ``host_only``).  TPACKET_ENV=0 in the
    environment selects the recv path where the ring would work (tests, comparisons)."""
    global _fallback_logged
    if os.environ.get(TPACKET_ENV) == "0":
        reason: object = f"{TPACKET_ENV}=0"
    else:
        try:
            return TPacketSource(device, prefilter, buffer_bytes, bpf_ports, host_only=host_only)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise
            reason = exc
    if not _fallback_logged:
        _fallback_logged = True
        log.warning("capture: no TPACKET_V3 ring (%s); reading packet by packet", reason)
    if host_only:
        return RawTcpSource(prefilter, buffer_bytes)
    return PacketSource(device, prefilter, buffer_bytes, bpf_ports)


def _set_rcvbuf(sock: socket.socket, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        except OSError:
            pass


_SOCKADDR_LL = struct.Struct("=HHiHBB8s")  # family, protocol (BE), ifindex, hatype, pkttype...


def bind_packet_socket(sock: socket.socket, device: str | None) -> None:
    """bind() an AF_PACKET socket to ETH_P_ALL on `device`, or on every device (None).

    Python's AF_PACKET address takes an interface *name* and "" is refused (ENODEV), so
    "every device" (ifindex 0) is bound through libc with a struct sockaddr_ll.

    Frames the host sends are never replayed (the program and the block walk leave them
    out), so the kernel is first told not to hand them to this socket at all
    (PACKET_IGNORE_OUTGOING, Linux 4.20): otherwise each packet the workers send, and each
    answer of the online server, is cloned into the tap, filtered and dropped one by one, a
    cost the sender pays inside its sendmmsg.  Older kernels refuse the option; the program's
    test then does the same job.
    """
    try:
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    except OSError:
        pass
    if device is not None:
        sock.bind((device, ETH_P_ALL))
        return
    addr = _SOCKADDR_LL.pack(socket.AF_PACKET, socket.htons(ETH_P_ALL), 0, 0, 0, 0, bytes(8))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.bind(sock.fileno(), ctypes.c_char_p(addr), len(addr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bind AF_PACKET (every device): {os.strerror(err)}")


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
# SO_ATTACH_FILTER (the programs are built by engine/codec/bpf.py)
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

    _SCHEDULE = (
        "start",
        "_first",
        "_prev",
        "_pass_skipped",
        "_last_offset",
        "skipped_s",
        "idle_gaps",
    )
    """The schedule's moving parts, in the order ``state`` gives and ``load_state`` takes."""

    def state(self) -> tuple[float, float, float, float | None, float, float, float, float, int]:
        """The schedule as plain numbers, for the compiled walk that continues it
        (engine/dataplane/capture.pyx ``PcapWalker``): accelerate, idle threshold, then what
        ``load_state`` takes back."""
        moving = tuple(getattr(self, name) for name in self._SCHEDULE)
        return (self.accelerate, self.idle_threshold_s, *moving)  # type: ignore[return-value]

    def load_state(
        self, state: tuple[float, float | None, float, float, float, float, int]
    ) -> None:
        """The schedule where the compiled walk left it (``state()`` without its first two)."""
        for name, value in zip(self._SCHEDULE, state, strict=True):
            setattr(self, name, value)


FILE_BUFFER_BYTES = 1 << 20
"""The compiled walk's file buffer: filled with one read each time (a record is at most
256 KiB and 16 bytes, so one always fits)."""


def _files_bytes(paths: Sequence[str]) -> int:
    """Sum of the files' sizes; 0 (progress unknown) if any size cannot be read."""
    try:
        return sum(os.path.getsize(p) for p in paths)
    except OSError:
        return 0


def unsupported_linktype(linktype: int) -> str:
    """The one-line reason a pcap file of this link type is refused."""
    known = ", ".join(f"{name} ({lt})" for lt, name in sorted(packet.LINKTYPES.items()))
    return f"unsupported pcap link type {linktype} (0x{linktype:x}); readable: {known}"


class PcapFileSource:
    """Replays pcap files in order, `replays` times (-T), paced by `ReplayPacer`.

    `opener(path)` returns a reader with `.linktype` that iterates (ts, wire_len, frame)
    (engine.codec.pcapfile.open_pcap; raises DecodeError for a bad file).  Packets cut short by the
    capture's snaplen (caplen < wire length) are dropped and counted (spec §3.16).  The next
    pass starts right after the previous one's last packet: no 120 s tail
    (OFFLINE_TAIL_TIMEOUT in C).

    Broken files: a file cut inside its last record (a capture that was killed) replays its
    whole records, warns once with the byte offset of the cut and counts capture_file_cut;
    a file whose link type cannot be read or whose record header cannot be right (a length
    above libpcap's bound) stops the replay: ``error`` holds the one-line reason (with the
    byte offset), the source is exhausted, and the capture process exits non-zero
    (engine/proc/capture.py) after what came before was replayed.

    counters: capture_truncated, capture_l2_error, capture_file_cut, capture_file_error,
    offline_packets (emitted),
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
        *,
        walkable: bool | None = None,
    ) -> None:
        # The compiled walk reads a PcapReader's bytes itself: the default opener's readers
        # are, another opener says so (``walkable``).
        self.walkable = opener is None if walkable is None else walkable
        if opener is None:
            from engine.codec.pcapfile import open_pcap

            opener = open_pcap
        if not paths:
            raise ValueError("no pcap file")
        self.paths = list(paths)
        self.pacer = pacer
        self.replays_left = max(1, replays)
        # Offline keeps pure ACKs: a file is not read at line rate, and the captured
        # handshake ACK gives the request gate its exact origin (server-first protocols).
        self.keep = prefilter.keep_with_pure_acks if prefilter is not None else _keep_all
        self.prefilter = prefilter
        self.opener = opener
        self.counters: Counter[str] = Counter()
        self.counters["offline_bytes_total"] = _files_bytes(self.paths) * self.replays_left
        self.exhausted = False
        self.error: str | None = None
        self._file_index = -1
        self._reader: object | None = None
        self._iter: Iterator[tuple[float, int, bytes]] | None = None
        self._linktype = packet.DLT_EN10MB
        self._pending: tuple[float, float, bytes] | None = None  # (due, ts, ip)
        self._started = False
        # The compiled walk (use_walker): its walker, the file buffer and the end of its data.
        self._walker: Any = None
        self._buf = bytearray()
        self._end = 0

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
        if self._walker is not None:
            return self._walker.pending_due if self._walker.pending else None  # type: ignore[no-any-return]
        return self._pending[0] if self._pending is not None else None

    def delay(self, seconds: float) -> None:
        """Shift the rest of the schedule ``seconds`` later (backpressure: the workers are
        behind).  Every gap between the packets still to come stays what the file says."""
        if seconds <= 0:
            return
        self.pacer.start += seconds
        if self._walker is not None:
            self._walker.shift_pending(seconds)
        if self._pending is not None:
            due, ts, ip = self._pending
            self._pending = (due + seconds, ts, ip)

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

    # -- the compiled walk -------------------------------------------------------------------

    def use_walker(self, walker: Any, buffer_bytes: int = FILE_BUFFER_BYTES) -> bool:
        """From now on the records are walked by ``walker`` (engine/dataplane/capture.pyx
        ``PcapWalker``, whose rings and gate are the capture process's): ``walk_into``
        replaces ``read_batch`` and the dispatch.  Only before ``start``, and only when the
        opener gives PcapReaders (``walkable``); False otherwise (read_batch stays).
        ``buffer_bytes``: the file buffer (it grows if a record does not fit)."""
        if not self.walkable or self._started:
            return False
        self._walker = walker
        self._buf = bytearray(max(1, buffer_bytes))
        self._end = 0
        return True

    def walk_into(
        self,
        now: float,
        on_gate: Callable[[], object],
        on_split: Callable[[int, bytes, float], object],
    ) -> None:
        """``read_batch`` and ``CaptureProcess.dispatch`` in one, compiled: the packets due
        by ``now`` (at most BATCH_MAX_PACKETS) go into their workers' rings.  ``on_gate()``
        runs before the first of them (the gate's update per batch); ``on_split(worker, ip,
        ts)`` gets an admitted packet larger than -M."""
        if not self._started:
            self.start(now)
        self._walker.begin_batch()
        self._walk(now, BATCH_MAX_PACKETS, on_gate, on_split)
        self._flush_walk()

    def _flush_walk(self) -> None:
        flt = self.prefilter
        self._walker.flush_file_counts(self.counters, flt.counters if flt is not None else None)
        self.counters["offline_idle_gaps"] = self.pacer.idle_gaps

    def _walk(
        self,
        now: float,
        limit: int,
        on_gate: Callable[[], object] | None,
        on_split: Callable[[int, bytes, float], object] | None,
    ) -> None:
        """Walk (opening, filling and ending files) until the next packet is not due, the
        batch is full, or the replay is over; ``limit`` 0 only finds the next packet."""
        from engine.dataplane.capture import WALK_BAD_RECORD, WALK_GATE, WALK_MORE

        w = self._walker
        while True:
            if self._reader is None:
                if not self._open_next(now):
                    self.exhausted = True
                    return
                continue
            status = w.walk(self._buf, self._end, now, limit, self.pacer)
            if status >= 0:
                start = w.split_start
                if on_split is not None:
                    on_split(status, bytes(self._buf[start : start + w.split_length]), w.split_ts)
            elif status == WALK_GATE:
                if on_gate is not None:
                    on_gate()
            elif status == WALK_MORE:
                if not self._fill():
                    self._end_of_file()
            elif status == WALK_BAD_RECORD:
                from engine.codec.pcapfile import corrupt_record

                name = getattr(self._reader, "name", self.paths[self._file_index])
                reason = corrupt_record(name, w.bad_offset, w.bad_caplen, w.bad_frac)
                self._fail(f"{reason}; the replay stops there")
                return
            else:  # not due yet, or the batch is full
                return

    def _fill(self) -> bool:
        """More of the file into the buffer after what the walker has not read; False at
        its end."""
        self._end = self._walker.compact(self._buf, self._end)
        if self._end >= len(self._buf):  # a record larger than the buffer: a larger one
            self._buf.extend(bytes(len(self._buf)))
        got = self._reader.readinto(memoryview(self._buf)[self._end :])  # type: ignore[attr-defined]
        if not got:
            return False
        self._end += got
        return True

    def _end_of_file(self) -> None:
        """The file ends: what the walker read goes to the reader (a cut last record is told
        as the Python path tells it), then the next file."""
        w = self._walker
        reader: Any = self._reader
        reader.walked(w.base_offset + w.pos, w.records, self._end - w.pos)
        self._note_cut_tail()
        self._close_reader()
        self._end = 0

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
        path = self.paths[self._file_index]
        try:
            reader = self.opener(path)
        except DecodeError as exc:  # checked at start: the file changed since
            self._fail(str(exc))
            return False
        except OSError as exc:
            self._fail(f"{path}: cannot open: {exc.strerror or exc}")
            return False
        self._reader = reader
        self.counters["offline_bytes_read"] += PCAP_GLOBAL_HEADER_BYTES
        self._linktype = reader.linktype  # type: ignore[attr-defined]
        if self._linktype not in packet.LINKTYPES:
            self._fail(f"{path}: {unsupported_linktype(self._linktype)}")
            return False
        if self._walker is not None:
            r: Any = reader
            self._walker.open_file(self._linktype, r.big_endian, r.ticks_per_s, r.offset)
            self._end = 0
        else:
            self._iter = iter(reader)  # type: ignore[call-overload]
        self.pacer.restart(now)
        return True

    def _fail(self, reason: str) -> None:
        self.counters["capture_file_error"] += 1
        self.error = reason
        self.exhausted = True
        self._close_reader()

    def _note_cut_tail(self) -> None:
        """A file cut inside its last record: its whole records were replayed; say so once."""
        reader = self._reader
        if not getattr(reader, "truncated_tail", 0):
            return
        self.counters["capture_file_cut"] += 1
        self.counters["offline_bytes_read"] += reader.truncated_bytes  # type: ignore[union-attr]
        log.warning(
            "%s: cut inside its last record at byte offset %d (%d byte(s) of it present; "
            "a capture that was stopped?): the %d whole record(s) before it are replayed",
            self.paths[self._file_index],
            reader.truncated_at,  # type: ignore[union-attr]
            reader.truncated_bytes,  # type: ignore[union-attr]
            reader.records,  # type: ignore[union-attr]
        )

    def _advance(self, now: float) -> None:
        """Find the next replayable packet and its due time; mark exhaustion at the end."""
        if self._walker is not None:
            self._walker.begin_batch()
            self._walk(now, 0, None, None)
            self._flush_walk()
            return
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
                self._note_cut_tail()
                self._iter = None
                continue
            except DecodeError as exc:
                # A record header that cannot be right: nothing after it can be trusted.
                self._fail(f"{exc}; the replay stops there")
                self.counters["offline_idle_gaps"] = self.pacer.idle_gaps
                return
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


def build_sources(cfg: Any, prefilter: object, opener: Any = None) -> list[object]:
    """The capture sources cfg asks for (sockets need root or CAP_NET_RAW); ``opener``
    opens an offline replay's files (privileges' kept descriptors; default: by path)."""
    if cfg.capture == "offline":
        pacer = ReplayPacer(cfg.accelerate, cfg.idle_threshold_s)
        if opener is None:
            return [PcapFileSource(cfg.pcap_files, pacer, cfg.replays, prefilter)]
        paths = list(cfg.pcap_files)
        # The kept files' opener (engine/io/privileges.py) gives PcapReaders too.
        return [PcapFileSource(paths, pacer, cfg.replays, prefilter, opener=opener, walkable=True)]
    if cfg.capture == "packet":
        ports = sorted({t.online_port for t in cfg.session.transfers})
        devices = [d for d in cfg.interfaces if d != "any"] or [None]
        if "any" in cfg.interfaces:
            devices = [None]
        return [
            open_live_source(dev, prefilter, cfg.capture_buffer_bytes, ports)  # type: ignore[arg-type]
            for dev in devices
        ]
    # raw: what arrives at this host (PACKET_HOST on every device) through the TPACKET_V3
    # ring; the IPPROTO_TCP raw socket (spec §3.2) when the kernel offers no ring.
    return [
        open_live_source(None, prefilter, cfg.capture_buffer_bytes, host_only=True)  # type: ignore[arg-type]
    ]
