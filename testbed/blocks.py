"""Synthetic TPACKET_V3 blocks, laid out as the kernel lays them out (linux/if_packet.h:
tpacket_block_desc, tpacket3_hdr, sockaddr_ll), a capture source over them, and a capture
process that reads them through the Python or the compiled walk: the fixture of
tests/unit/test_dataplane_capture.py, the sanitizer fuzzer (tests/fuzz/dataplane_asan.py)
and bench/bench_capture.py --synthetic."""

from __future__ import annotations

import random
import struct
from collections import Counter
from typing import Any

import numpy as np

from engine.codec import packet
from engine.io import capture
from engine.io.capture import TP_STATUS_USER, TransferFilter
from engine.io.ring import RING_MAX_PACKET, Ring
from engine.proc.capture import CaptureProcess

BLOCK = 1 << 13
FRAME_HDR = 48
SLL = struct.Struct("=HHiHBB8s")
ETH = 14
ONLINE = "198.18.1.2"
ONLINE_IP = packet.ip_from_str(ONLINE)
SYN, FIN, RST, PSH, ACK = 0x02, 0x01, 0x04, 0x08, 0x10


def align16(n: int) -> int:
    return (n + 15) & ~15


def tcp_ip(
    src: str,
    sport: int,
    flags: int,
    payload: bytes = b"",
    *,
    dport: int = 80,
    dst: str = ONLINE,
    proto: int = 6,
    frag: int = 0,
    options: bytes = b"",
) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 7, 0, 5 << 4, flags, 65535, 0, 0) + payload
    ihl = 5 + len(options) // 4
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        ihl * 4 + len(tcp),
        0,
        frag,
        64,
        proto,
        0,
        packet.ip_from_str(src).to_bytes(4, "big"),
        packet.ip_from_str(dst).to_bytes(4, "big"),
    )
    return head + options + tcp


def eth(ip: bytes) -> bytes:
    return bytes(12) + b"\x08\x00" + ip


class Frame:
    """One frame of a synthetic block: link frame, pkttype, and how the header lies."""

    def __init__(self, data: bytes, pkttype: int = 0, *, wire_extra: int = 0) -> None:
        self.data = data
        self.pkttype = pkttype
        self.wire_extra = wire_extra  # > 0: cut short (tp_snaplen < tp_len)


def make_block(frames: list[Frame], buf: Any, at: int, size: int = BLOCK) -> list[int]:
    """Write one retired block at byte ``at`` as the kernel lays it out; returns the frame
    header offsets (for tests that then corrupt them).  Frames that do not fit are left out."""
    first = FRAME_HDR
    off = at + first
    heads: list[int] = []
    mac = align16(FRAME_HDR + SLL.size) + 2
    for frame in frames:
        need = align16(mac + len(frame.data))
        if off + need > at + size:
            break
        heads.append(off)
        struct.pack_into(
            "=IIIIIIHH",
            buf,
            off,
            need,
            1,
            2,
            len(frame.data),
            len(frame.data) + frame.wire_extra,
            1,
            mac,
            mac + ETH,
        )
        SLL.pack_into(buf, off + FRAME_HDR, 17, 0x0008, 2, 1, frame.pkttype, 6, bytes(8))
        buf[off + mac : off + mac + len(frame.data)] = frame.data
        off += need
    if heads:
        struct.pack_into("=I", buf, heads[-1], 0)  # the last frame's tp_next_offset
    struct.pack_into("=IIIIIIQ", buf, at, 1, 0, TP_STATUS_USER, len(heads), first, off - at, 9)
    return heads


class BlockSource(capture.TPacketSource):
    """A TPacketSource over a buffer of blocks (a bytearray or a uint8 array; no socket):
    ``queue`` the blocks the next ``ready_blocks`` hands over."""

    def __init__(
        self,
        buf: Any,
        block_bytes: int,
        prefilter: TransferFilter | None,
        *,
        kernel_filtered: bool,
        host_only: bool,
    ) -> None:
        self.prefilter = prefilter
        self.keep = prefilter.keep if prefilter is not None else capture._keep_all
        self.kernel_filtered = kernel_filtered
        self.host_only = host_only
        self.device = None
        self.counters = Counter()
        self.block_bytes = block_bytes
        self._mm = None
        self.set_buffer(buf)
        self._held = []
        self._queue: list[int] = []
        self._drops_logged = 0

    def set_buffer(self, buf: Any) -> None:
        """Read blocks from ``buf`` from now on (its length: a multiple of 4)."""
        self.blocks = max(1, len(buf) // self.block_bytes)
        self._buf = buf
        self._view = memoryview(buf)
        self._u8 = np.frombuffer(buf, dtype=np.uint8)  # type: ignore[call-overload]
        self._u16 = self._u8[: len(buf) // 2 * 2].view(np.uint16)
        self._u32 = self._u8[: len(buf) // 4 * 4].view(np.uint32)
        self._words = memoryview(buf)[: len(buf) // 4 * 4].cast("I")

    def map_ring(self) -> None:
        pass  # the buffer is the ring

    def queue(self, blocks: list[int]) -> None:
        self._queue = list(blocks)

    def _ready_block(self, scan: bool) -> int | None:
        return self._queue.pop(0) if self._queue else None

    def _kernel_stats(self) -> None:
        pass

    def release(self) -> None:
        self._held.clear()

    def close(self) -> None:
        pass


class Control:
    def __init__(self) -> None:
        self.shed = False

    def beat(self, slot: int, now: float) -> None:
        pass


def make_filter(drop_pure_acks: bool = True) -> TransferFilter:
    entries = [(ONLINE_IP, 80), (0, 8080)]

    def match(ip: int, port: int) -> object:
        for e_ip, e_port in entries:
            if e_port == port and (e_ip == 0 or e_ip == ip):
                return (e_ip, e_port)
        return None

    return TransferFilter(match, transfers=entries, drop_pure_acks=drop_pure_acks)


class Walk:
    """A capture process over one BlockSource and its own rings, reading through the
    compiled walk (``compiled``) or the Python one; ``read`` takes one block."""

    def __init__(
        self,
        compiled: bool,
        buf: Any,
        *,
        block_bytes: int,
        workers: int,
        ring_bytes: int,
        mtu: int,
        kernel_filtered: bool,
        host_only: bool,
        drop_pure_acks: bool = True,
        max_packet: int = RING_MAX_PACKET,
    ) -> None:
        self.filter = make_filter(drop_pure_acks)
        self.rings = [Ring.create(ring_bytes, max_packet) for _ in range(workers)]
        self.clock = 0.0
        self.control = Control()
        self.src = BlockSource(
            buf, block_bytes, self.filter, kernel_filtered=kernel_filtered, host_only=host_only
        )
        self.proc = CaptureProcess(
            [self.src],
            self.rings,
            mtu,
            control=self.control,
            clock=lambda: self.clock,
            compiled=compiled,
        )
        assert (self.proc._walker(self.src) is not None) == compiled

    def read(self, now: float, memory: bool = False, block: int = 0) -> None:
        self.clock = now
        self.control.shed = memory
        self.src.queue([block])
        self.proc._read(self.src, now)

    def pop(self, count: int) -> list[list[tuple[float, bytes]]]:
        return [r.pop_packets(count) for r in self.rings]

    def state(self) -> dict[str, Any]:
        """Everything the two walks must agree on, besides the ring contents."""
        return {
            "loss_marks": [r.loss_marks for r in self.rings],
            "dropped": [r.dropped for r in self.rings],
            "oversize": [r.oversize for r in self.rings],
            "proc": +self.proc.counters,
            "source": +self.src.counters,
            "filter": +self.filter.counters,
            "known": dict(self.proc.gate.known),
            "shed": dict(self.proc.gate.shed),
        }

    def close(self) -> None:
        for r in self.rings:
            r.close()


def corrupt(buf: Any, heads: list[int], how: str, rng: random.Random, at: int = 0) -> None:
    """Make the block at byte ``at`` lie: a frame's tp_next_offset, tp_snaplen or
    tp_mac/tp_net, or the block's num_pkts or offset_to_first_pkt ("" : leave it).  A field
    that is not inside ``buf`` (a buffer cut short) is left alone."""
    size = len(buf) - at

    def put(fmt: str, where: int, *values: int) -> None:
        if where >= 0 and where + struct.calcsize(fmt) <= len(buf):
            struct.pack_into(fmt, buf, where, *values)

    h = rng.choice(heads) if heads else -(1 << 20)
    if how == "next":
        put("=I", h, rng.choice((0, 1, 2, 4, 60, size, 2**32 - 1)))
    elif how == "snaplen":
        put("=I", h + 12, rng.choice((0, 13, size, 2**32 - 1)))
    elif how == "num_pkts":
        put("=I", at + 12, rng.choice((0, len(heads) + 1, 2**32 - 1)))
    elif how == "first":
        put("=I", at + 16, rng.choice((0, 2, size - 40, 2**32 - 1)) & 0xFFFFFFFF)
    elif how == "macnet":
        put("=HH", h + 24, rng.randrange(1 << 16), rng.randrange(1 << 16))


CORRUPTIONS = ("next", "snaplen", "num_pkts", "first", "macnet")
