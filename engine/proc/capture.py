"""The capture process: packets in, one ring per worker out (design §3).

Theory of operation
-------------------
One process owns the capture sources (capture.RawTcpSource / PacketSource, or
PcapFileSource with its offline pacing) and their -x pre-filter.  Every accepted packet is

1. split when it is larger than -M (GRO/TSO aggregates, spec §3.4: packet.split_mtu), so each
   piece fits a ring record (the ring's largest packet is -M, ``ring_max_packet``);
2. given to worker ``flow_worker(client ip, client port, N)``: a stable hash of the *original*
   client, so every packet of a flow, and therefore every -n replica made of it (replicas are
   created inside the owning worker's session table), lives on one worker;
3. appended to that worker's ring with ``Ring.push_batch`` once per input batch.  A full ring
   drops the packet and counts it for that worker (``ring_dropped``); capture never blocks
   on a worker (design §3).

Sources with ``read_frames`` (capture.TPacketSource) hand over whole kernel blocks as numpy
arrays (``FrameBatch``): the worker index of every packet is computed vectorized
(``flow_workers``), and each ring gets its packets with one ``Ring.push_frames``, copied
straight from the kernel's block into the ring's records.  Where engine.dataplane is compiled
(``compiled=None``, the default: when ``engine.dataplane.AVAILABLE``; True or False to
choose) the blocks are walked in place instead by engine/dataplane/capture.pyx, one call per
block: the frame walk, the -x rule, the flow hash, the shed gate (its ``Gate``, which also
serves ``dispatch``) and the copy into the rings in C.  This module's path is its
specification (tests/unit/test_dataplane_capture.py holds the two equal).  A pcap file
source is walked the same way (``PcapWalker``, through ``PcapFileSource.walk_into``: the
record walk, the schedule, the -x rule, hash, gate and ring copy in C, ``dispatch`` its
specification, tests/unit/test_dataplane_pcapwalk.py); with -F it stays on the Python path.

Overload (engine/core/shed.py): before each batch the rings' fill levels and the memory
watchdog's flag update a ``FlowGate``; a worker past SHED_RING_HIGH (or all workers while
memory is short) admits no new session, and the flows it shed stay shed to their end, so a
session is replicated whole or not at all.  Counted as shed_sessions_<reason>, drop_shed.

Offline sources are not shed but slowed: a file can wait, a live interface cannot.  When a
ring passes OFFLINE_PAUSE_FILL the file is not read until every ring is below
OFFLINE_RESUME_FILL, and the rest of the schedule moves later by the time waited (the gaps
between packets stay as captured).  Counted as offline_paused (pauses) and
offline_paused_ms; the exit summary says by how much the replay was slowed.

Offline, when the file(s) are exhausted the process marks ``capture_done`` in the shared
ControlBlock and exits 0: workers finish once their ring is empty and their sessions are
gone, and the supervisor ends the replay when every worker did.

Counters go to the capture row of the shared CounterBlock (flushed periodically and at
exit); the drops of ring i go into worker i's row (``ring_dropped``, the ring outlives its
consumer).  A restarted capture process continues those counts from what is in the block.
"""

from __future__ import annotations

import logging
import math
import selectors
import signal
import struct
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from engine.codec import packet
from engine.core.shed import REASON_RING_FULL, FlowGate
from engine.errors import DecodeError
from engine.io.capture import BATCH_MAX_PACKETS, FrameBatch
from engine.io.control import CAPTURE_SLOT
from engine.io.logs import LOGGER_NAME, reopen_logs
from engine.io.ring import RING_BYTES, RING_MAX_PACKET, Ring, record_bytes, record_layout
from engine.io.sigloop import SignalPipe
from metrics.counters import COUNTER_FLUSH_INTERVAL_S

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(LOGGER_NAME)

FLOW_HASH_MULTIPLIER = 0x9E3779B97F4A7C15
"""Fibonacci hashing: 2^64 / golden ratio, odd."""
_U64 = (1 << 64) - 1
HEARTBEAT_INTERVAL_S = 0.5
"""The loop wakes at least this often to write its heartbeat."""
RING_BYTES_PER_WORKER = RING_BYTES
"""The largest derived live ring (2 MiB of records: about 20,000 packets of 100 bytes)."""
RING_BYTES_MIN = 1 << 20
"""The smallest derived live ring (1 MiB)."""
LIVE_RINGS_BYTES = RING_BYTES_PER_WORKER
"""What the live rings of all workers take together, at least (``ring_bytes``; half of -B
if larger), each ring kept between RING_BYTES_MIN and RING_BYTES_PER_WORKER: 2 MiB for one
worker, 1 MiB each for two or more with the default -B 4.  A ring holds what arrives while
its worker is off the CPU, and each of N workers gets 1/N of the packets.  On 2 CPUs the
bench's loads (bench/run.sh, 10 s) dropped nothing in one 2 MiB ring (ka-c50,
short-c10-1ip) nor in two 1 MiB rings (ka-c10, ka-c50, short-c10-1ip, short-c10-64ip),
where 8,192 fixed 1.5 KiB slots (12 MiB) were the smallest that did (docs/memory.md)."""
_SRC_NO_OPTIONS = struct.Struct("!12xI4xH")  # IPv4 src address, then (IHL 5) the TCP src port


OFFLINE_PAUSE_FILL = 0.5
OFFLINE_RESUME_FILL = 0.25
OFFLINE_PAUSE_POLL_S = 0.002
RING_DROP_LOG_INTERVAL_S = 10.0
"""At most one "ring full" warning per worker in this long (the first drop is logged at the
next counter flush, 0.2 s at most; the count covers every drop since the last line)."""


def flow_worker(client_ip: int, client_port: int, workers: int) -> int:
    """The worker that owns the flow of this original client (ip, port): stable across
    processes and runs (no salted hash()), so it can be recomputed by tests and tools.

    The 48-bit key is multiplied (Fibonacci hashing) and the worker is taken from the *top*
    bits of the product: ``(high 32 bits * workers) >> 32``.  Low bits mix badly: Linux hands
    out connect() ephemeral ports of one parity, often 4 or 8 apart under concurrent
    connects, and ``% 2`` of the product's bit 32 sent every such port of a client to one
    worker (seen: a 10-connection wrk load wholly on worker 1 of 2).
    """
    high = (((client_ip << 16 | client_port) * FLOW_HASH_MULTIPLIER) & _U64) >> 32
    return (high * workers) >> 32


def flow_workers(keys: np.ndarray, workers: int) -> np.ndarray:
    """``flow_worker`` for an array of flow keys (client ip << 16 | client port, uint64):
    the same numbers (uint64 products wrap modulo 2^64 like the ``& _U64`` above).  The
    Python block walk's (numpy is imported here, not by the compiled walk's path)."""
    import numpy as np

    shift = np.uint64(32)
    with np.errstate(over="ignore"):
        high = (keys * np.uint64(FLOW_HASH_MULTIPLIER)) >> shift
        return (high * np.uint64(workers)) >> shift


def ring_max_packet(mtu: int) -> int:
    """The largest packet a ring takes: -M (the capture splits anything larger), never below
    RING_MAX_PACKET."""
    return max(RING_MAX_PACKET, mtu)


def ring_bytes(cfg: Any) -> int:
    """The bytes of each worker's ring: --ring-size, else derived from the load (the rule is
    --ring-size's help in engine/core/config.py and docs/memory.md):

    * live capture: each worker's share of LIVE_RINGS_BYTES, or of half of -B if that is
      larger, between RING_BYTES_MIN and RING_BYTES_PER_WORKER: a worker's ring holds what
      arrives while that worker is off the CPU, the kernel's ring (-B) what arrives while
      the capture process is;
    * offline replay: room for one read batch of the largest packets past the pause mark
      (the file waits while a ring is OFFLINE_PAUSE_FILL full): 3 MiB with -M 1500.

    Never less than two of the largest records (a ring must hold any packet after a wrap).
    """
    largest = record_bytes(ring_max_packet(cfg.session.mtu))
    if cfg.ring_bytes:
        size = int(cfg.ring_bytes)
    elif cfg.capture == "offline":
        size = math.ceil(BATCH_MAX_PACKETS * largest / (1.0 - OFFLINE_PAUSE_FILL))
    else:
        share = max(LIVE_RINGS_BYTES, cfg.capture_buffer_bytes // 2) // max(1, cfg.workers)
        size = min(RING_BYTES_PER_WORKER, max(RING_BYTES_MIN, share))
    size = max(size, 2 * largest)
    return -(-size // 64) * 64


def _compiled_capture() -> Any:
    """engine.dataplane.capture when the data plane is built here, else None."""
    from engine import dataplane

    return dataplane.capture if dataplane.AVAILABLE else None


EXIT_INPUT_ERROR = 3
"""The capture process's status when an offline input file is broken (it logged why)."""


class CaptureProcess:
    """The capture loop.  `rings[i]` is worker i's ring (producer side).

    `counters` is a metrics.counters.CounterBlock (or None in tests); `control` an
    engine.io.control.ControlBlock (or None).  counters (capture row): the sources' and the
    pre-filter's, plus capture_split (packets split at -M), capture_parse_errors (an
    oversized packet that could not be split), ring_oversize.
    """

    def __init__(
        self,
        sources: Sequence[object],
        rings: Sequence[Ring],
        mtu: int,
        *,
        prefilter_counters: Counter[str] | None = None,
        counters: object | None = None,
        control: object | None = None,
        clock: Callable[[], float] = time.monotonic,
        shedding: bool = True,
        backpressure: bool = True,
        compiled: bool | None = None,
    ) -> None:
        if not rings:
            raise ValueError("capture: no ring")
        self.sources = list(sources)
        self.rings = list(rings)
        self.mtu = mtu
        self.prefilter_counters = (
            prefilter_counters if prefilter_counters is not None else Counter()
        )
        self.block = counters
        self.control = control
        self.clock = clock
        self.counters: Counter[str] = Counter()
        # The compiled walk (engine/dataplane/capture.pyx) where it was built, unless
        # ``compiled`` says otherwise (False: the Python path, the specification).
        self.dataplane = _compiled_capture() if compiled is not False else None
        if compiled and self.dataplane is None:
            raise ValueError("capture: the compiled walk is not built here")
        self._walkers: dict[int, object] = {}
        # shedding=False (tests of the full-ring path only): a gate that never sheds.
        gate_class: Callable[..., FlowGate] = FlowGate
        if self.dataplane is not None:
            gate_class = self.dataplane.Gate
        self.gate = gate_class(len(self.rings), counters=self.counters, enabled=shedding)
        self.exit_reason = ""
        self.exit_code = 0
        # Offline backpressure (module docstring); off only in tests of the full-ring path.
        self.backpressure = backpressure
        self._paused_since: float | None = None
        self._stop = False
        self._signals = SignalPipe(
            (signal.SIGTERM, signal.SIGINT, signal.SIGHUP), ignore_sigpipe=True
        )
        self.sel = selectors.DefaultSelector()
        # A restarted capture process continues the per-ring drop counts of its predecessor.
        self._dropped_base = [0] * len(self.rings)
        # Per ring: drops already told in the log, and when the next warning may come.
        self._drops_logged = [0] * len(self.rings)
        self._drops_log_at = [0.0] * len(self.rings)
        if self.block is not None:
            from metrics.counters import RING_DROPPED

            for i in range(len(self.rings)):
                row = self.block.worker_row(i)  # type: ignore[attr-defined]
                self._dropped_base[i] = self.block.writer(row).get(RING_DROPPED)  # type: ignore[attr-defined]

    # -- lifecycle --------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        if not self._stop:
            self._stop = True
            self.exit_reason = reason

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reopens the log; handlers only queue (self-pipe)."""
        self.sel.register(self._signals.install(), selectors.EVENT_READ, None)

    def _handle_signals(self) -> None:
        while (signum := self._signals.pop()) is not None:
            if signum == signal.SIGHUP:
                reopen_logs()
                log.info("SIGHUP: log file reopened")
            elif signum == signal.SIGINT:
                # A terminal's Ctrl-C reaches the whole process group: the supervisor decides.
                continue
            else:
                self.stop(f"stopped by {signal.Signals(signum).name}")

    def run(self) -> int:
        for src in self.sources:
            # A TPACKET_V3 ring is mapped here, in the process that reads it (the supervisor
            # that opened the socket never maps it).
            map_ring = getattr(src, "map_ring", None)
            if map_ring is not None:
                map_ring()
        for kind, attr in (("block", "ready_blocks"), ("pcap", "use_walker")):
            # (a file source is given its walker here, before it starts)
            walked = [src for src in self.sources if hasattr(src, attr)]
            if walked:
                walks = {"Python" if self._walker(src) is None else "compiled" for src in walked}
                log.info("the %s %s walk", " and ".join(sorted(walks)), kind)
        now = self.clock()
        for i, src in enumerate(self.sources):
            fd = src.fileno()  # type: ignore[attr-defined]
            if fd is not None:
                self.sel.register(fd, selectors.EVENT_READ, i)
            elif hasattr(src, "start"):
                src.start(now)
        next_flush = now
        while not self._stop:
            self._beat(now)
            if now >= next_flush:
                next_flush = now + COUNTER_FLUSH_INTERVAL_S
                self._update_gate()  # also when no packet comes: the state and its log
                self._log_ring_drops(now)
                self.flush()
            if self._offline_done():
                if self.control is not None:
                    self.flush()  # the counts first: whoever sees "done" may read them
                    self.control.mark_capture_done()  # type: ignore[attr-defined]
                self.stop("offline capture is complete")
                break
            deadline = self._wake_at(now, next_flush)
            events = self.sel.select(max(0.0, deadline - now))
            now = self.clock()
            self._handle_signals()
            for key, _mask in events:
                if key.data is None:
                    self._signals.drain()
                    continue
                self._read(self.sources[key.data], now)
            for src in self.sources:
                due = src.next_deadline()  # type: ignore[attr-defined]
                if due is not None and due <= now:
                    self._read(src, now)
            self._check_input_errors()
        self._log_ring_drops(self.clock(), final=True)
        self.flush()
        log.info("capture exits: %s", self.exit_reason)
        return self.exit_code

    def _wake_at(self, now: float, next_flush: float) -> float:
        """When the loop must look again: the heartbeat, the next flush, the sources' due
        times.  A paused file waits for the rings, not for its schedule (its due time is
        past): it is looked at again after OFFLINE_PAUSE_POLL_S, not at once (no spin)."""
        deadline = min(now + HEARTBEAT_INTERVAL_S, next_flush)
        paused = self._paused_since is not None
        for src in self.sources:
            if paused and hasattr(src, "delay"):
                continue
            due = src.next_deadline()  # type: ignore[attr-defined]
            if due is not None and due < deadline:
                deadline = due
        if paused:
            deadline = min(deadline, now + OFFLINE_PAUSE_POLL_S)
        return deadline

    def _check_input_errors(self) -> None:
        """A file source that met a broken file (engine/io/capture.py PcapFileSource.error):
        its one-line reason, then exit EXIT_INPUT_ERROR once what came before is in the
        rings (the supervisor ends the replay with a non-zero status)."""
        for src in self.sources:
            error = getattr(src, "error", None)
            if error and not self._stop:
                log.error("%s", error)
                self.exit_code = EXIT_INPUT_ERROR
                self.stop("a broken input file")

    def _offline_paused(self, src: object, now: float) -> bool:
        """Backpressure for a file source (module docstring): True while it must wait."""
        if not self.backpressure or not hasattr(src, "delay"):
            return False
        if self._paused_since is None:
            if max(r.fill() for r in self.rings) < OFFLINE_PAUSE_FILL:
                return False
            self._paused_since = now
            self.counters["offline_paused"] += 1
            if self.counters["offline_paused"] == 1:
                log.info(
                    "offline replay paused: a worker's ring is over %d %% full; the replay "
                    "is slowed, not shed (offline_paused_ms)",
                    round(OFFLINE_PAUSE_FILL * 100),
                )
            return True
        if max(r.fill() for r in self.rings) >= OFFLINE_RESUME_FILL:
            return True
        waited = now - self._paused_since
        self._paused_since = None
        self.counters["offline_paused_ms"] += round(waited * 1000)
        for other in self.sources:
            delay = getattr(other, "delay", None)
            if delay is not None:
                delay(waited)
        return False

    def _read(self, src: object, now: float) -> None:
        if self._offline_paused(src, now):
            return
        walker = self._walker(src)
        if walker is not None:
            if hasattr(src, "walk_into"):
                src.walk_into(now, self._update_gate, self._push_split)
            else:
                self._walk_blocks(src, walker, now)
            return
        read_frames = getattr(src, "read_frames", None)
        if read_frames is None:
            self.dispatch(src.read_batch(now), now)  # type: ignore[attr-defined]
            return
        try:
            for batch in read_frames(now):
                self.dispatch_frames(batch)
        finally:
            src.release()  # type: ignore[attr-defined]

    # -- the compiled walk -------------------------------------------------------------------

    def _walker(self, src: object) -> Any:
        """The compiled walker of a TPACKET_V3 source or a pcap file source, or None (the
        Python path): no compiled module, another source, or a prefilter rule the walk does
        not have (-F in Python, a match without its -x pairs)."""
        if self.dataplane is None:
            return None
        key = id(src)
        if key in self._walkers:
            return self._walkers[key]
        walker = None
        flt: Any = getattr(src, "prefilter", None)
        if hasattr(src, "use_walker"):
            if flt is not None and flt.transfers and flt.user_filter is None:
                walker = self.dataplane.PcapWalker(
                    self.rings,
                    self.gate,
                    self.mtu,
                    record_layout(),
                    FLOW_HASH_MULTIPLIER,
                    kernel_filtered=False,
                    transfers=flt.transfers,
                    drop_pure_acks=False,
                )
                if not src.use_walker(walker):
                    walker = None
            self._walkers[key] = walker
            return walker
        if not hasattr(src, "ready_blocks"):
            return None
        kernel = bool(getattr(src, "kernel_filtered", False))
        if kernel or (flt is not None and flt.transfers and flt.user_filter is None):
            walker = self.dataplane.BlockWalker(
                self.rings,
                self.gate,
                self.mtu,
                record_layout(),
                FLOW_HASH_MULTIPLIER,
                kernel_filtered=kernel,
                host_only=bool(getattr(src, "host_only", False)),
                transfers=flt.transfers if flt is not None else (),
                drop_pure_acks=flt.drop_pure_acks if flt is not None else True,
            )
        self._walkers[key] = walker
        return walker

    def _walk_blocks(self, src: Any, walker: Any, now: float) -> None:
        """The ready blocks through the compiled walk: per block one ``step`` (more only
        around a packet larger than -M, split here in capture order), counters per read."""
        try:
            blocks = src.ready_blocks()
            if not blocks:
                return
            buf = src.buffer
            block_bytes = src.block_bytes
            for block in blocks:
                self._update_gate()
                gate_now = self.clock()
                walker.begin(block)
                while (worker := walker.step(buf, block_bytes, now, gate_now)) >= 0:
                    s, n = walker.split_start, walker.split_length
                    pieces: list[tuple[bytes, float]] = []
                    self._split(buf[s : s + n].tobytes(), now, pieces)
                    if pieces:
                        self.rings[worker].push_batch(pieces)
            flt = src.prefilter
            walker.flush_counts(src.counters, flt.counters if flt is not None else None)
        finally:
            src.release()

    def _push_split(self, worker: int, ip: bytes, ts: float) -> None:
        """An admitted packet of the compiled pcap walk larger than -M: split here."""
        pieces: list[tuple[bytes, float]] = []
        self._split(ip, ts, pieces)
        if pieces:
            self.rings[worker].push_batch(pieces)

    def close(self) -> None:
        for src in self.sources:
            src.close()  # type: ignore[attr-defined]
        self._signals.close()
        self.sel.close()

    def _offline_done(self) -> bool:
        return bool(self.sources) and all(getattr(s, "exhausted", False) for s in self.sources)

    def _beat(self, now: float) -> None:
        if self.control is not None:
            self.control.beat(CAPTURE_SLOT, now)  # type: ignore[attr-defined]

    # -- data path --------------------------------------------------------------------------

    def dispatch(self, batch: Sequence[tuple[float, bytes]], now: float | None = None) -> None:
        """Hash each (already pre-filtered) IPv4/TCP packet to its worker's ring.

        The path of the sources that hand over bytes (recv sockets, pcap files): per packet
        one struct unpack for the common 20-byte IP header; the shedding decision is taken
        for the whole batch (``FlowGate.admit``, the compiled ``Gate.admit``).
        ``now`` is the monotonic time of the batch (the packets' stamps may be file times).
        """
        if not batch:
            return
        if now is None:
            now = self.clock()
        self._update_gate()
        rings = self.rings
        n = len(rings)
        mtu = self.mtu
        keys: list[int] = []
        flags: list[int] = []
        add_key, add_flags = keys.append, flags.append
        unpack_src = _SRC_NO_OPTIONS.unpack_from
        for _ts, ip in batch:
            # The pre-filter has checked: IPv4, TCP, not a non-first fragment, ports present.
            if ip[0] == 0x45:  # no IP options: src ip and src port at fixed offsets
                src_ip, src_port = unpack_src(ip)
                add_flags(ip[33])
            else:
                ihl = (ip[0] & 0x0F) * 4
                src_ip = int.from_bytes(ip[12:16], "big")
                src_port = ip[ihl] << 8 | ip[ihl + 1]
                add_flags(ip[ihl + 13])
            add_key(src_ip << 16 | src_port)
        if n > 1:  # flow_worker of each key, inline
            mult = FLOW_HASH_MULTIPLIER
            worker_list = [((((k * mult) & _U64) >> 32) * n) >> 32 for k in keys]
        else:
            worker_list = [0] * len(keys)
        admit = self.gate.admit(array("Q", keys), array("B", flags), array("Q", worker_list), now)
        out: list[list[tuple[bytes, float]]] = [[] for _ in range(n)]
        mask = bytes(admit) if admit is not None else None  # one byte (0/1) per packet
        for i, ((ts, ip), w) in enumerate(zip(batch, worker_list, strict=True)):
            if mask is not None and not mask[i]:
                continue
            dest = out[w]
            if len(ip) <= mtu:
                dest.append((ip, ts))
            else:
                self._split(ip, ts, dest)
        for ring, packets in zip(rings, out, strict=True):
            if packets:
                ring.push_batch(packets)

    def dispatch_frames(self, batch: FrameBatch) -> None:
        """A kernel block's packets to the rings: workers and shedding for the whole batch as
        arrays, then one ``push_frames`` per ring copying from the block into the records.
        The gate takes the rings' fill levels first, for every block (an empty one too)."""
        import numpy as np

        self._update_gate()
        count = len(batch.keys)
        if count == 0:
            return
        rings = self.rings
        n = len(rings)
        workers = flow_workers(batch.keys, n) if n > 1 else np.zeros(count, dtype=np.uint64)
        starts, lengths = batch.starts, batch.lengths
        admit = self.gate.admit(batch.keys, batch.flags, workers, self.clock())
        if admit is not None:
            admit = np.frombuffer(admit, dtype=bool)  # FlowGate's array or Gate's memoryview
            starts, lengths, workers = starts[admit], lengths[admit], workers[admit]
        if len(starts) == 0:
            return
        ts = batch.ts
        if (lengths > self.mtu).any():
            # GRO/TSO aggregates to split: the bytes path for this batch keeps the order.
            self._dispatch_split(batch.buf, starts, lengths, workers, ts)
            return
        if n == 1:
            rings[0].push_frames(batch.buf, starts, lengths, ts)
            return
        for i, ring in enumerate(rings):
            sel = workers == i
            if sel.any():
                ring.push_frames(batch.buf, starts[sel], lengths[sel], ts)

    def _dispatch_split(
        self,
        buf: memoryview,
        starts: np.ndarray,
        lengths: np.ndarray,
        workers: np.ndarray,
        ts: float,
    ) -> None:
        mtu = self.mtu
        out: list[list[tuple[bytes, float]]] = [[] for _ in self.rings]
        for s, n, w in zip(starts.tolist(), lengths.tolist(), workers.tolist(), strict=True):
            ip = buf[s : s + n].tobytes()
            if n <= mtu:
                out[w].append((ip, ts))
            else:
                self._split(ip, ts, out[w])
        for ring, packets in zip(self.rings, out, strict=True):
            if packets:
                ring.push_batch(packets)

    def _update_gate(self) -> None:
        memory = bool(self.control is not None and self.control.shed)  # type: ignore[attr-defined]
        for worker, reason in self.gate.update([r.fill() for r in self.rings], memory):
            # The memory watchdog's own line says when and why memory sheds.
            if reason == REASON_RING_FULL:
                log.warning(
                    "worker %d: ring over %d %% full: its new sessions are shed whole "
                    "(shed_sessions_ring_full)",
                    worker,
                    round(self.gate.high * 100),
                )
            elif not reason:
                log.info("worker %d: new sessions are admitted again", worker)

    def _log_ring_drops(self, now: float, final: bool = False) -> None:
        """A full ring dropped packets of sessions already admitted: a runtime fault, so it
        is logged (rate-limited per worker), not only counted."""
        for i, ring in enumerate(self.rings):
            new = ring.dropped - self._drops_logged[i]
            if new <= 0 or (now < self._drops_log_at[i] and not final):
                continue
            self._drops_logged[i] = ring.dropped
            self._drops_log_at[i] = now + RING_DROP_LOG_INTERVAL_S
            log.warning(
                "worker %d: its ring was full: %d captured packets dropped since the last "
                "line (ring_full, %d in all); each is a hole in an admitted session, which "
                "gives it up and reconnects from its next segment (client gap ring loss): "
                "worker %d cannot keep up (more --workers, or -r to sample)",
                i,
                new,
                self._dropped_base[i] + ring.dropped,
                i,
            )

    def _split(self, ip: bytes, ts: float, dest: list[tuple[bytes, float]]) -> None:
        """A GRO/TSO aggregate larger than -M: its MTU-sized pieces (spec §3.4)."""
        try:
            pieces = packet.split_mtu(packet.parse_ip(ip), self.mtu)
        except (DecodeError, ValueError):
            self.counters["capture_parse_errors"] += 1
            return
        self.counters["capture_split"] += 1
        for piece in pieces:
            dest.append((packet.build(piece), ts))

    def flush(self) -> None:
        """Publish the counters (capture row) and per-ring drops (worker rows)."""
        if self.block is None:
            return
        from metrics.counters import RING_DROPPED

        block = self.block
        oversize = sum(r.oversize for r in self.rings)
        block.from_counter(  # type: ignore[attr-defined]
            block.capture_row,  # type: ignore[attr-defined]
            self.prefilter_counters,
            *(src.counters for src in self.sources),  # type: ignore[attr-defined]
            self.counters,
            {"ring_oversize": oversize},
        )
        for i, ring in enumerate(self.rings):
            row = block.worker_row(i)  # type: ignore[attr-defined]
            block.writer(row).set(RING_DROPPED, self._dropped_base[i] + ring.dropped)  # type: ignore[attr-defined]

    def ring_dropped(self) -> list[int]:
        return [r.dropped for r in self.rings]
