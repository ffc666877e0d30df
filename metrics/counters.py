"""CounterBlock: the engine's counters in one shared-memory table (design §3 supervisor, §7).

Theory of operation
-------------------
One int64 matrix lives in a shared memfd block: one *row* per writer process and
one *slot* (column) per counter key of a fixed, ordered schema (``SLOTS``), so the shape never
changes while the engine runs.  Row layout (``CounterBlock.create(workers=N)``):

    row 0          capture process          (CAPTURE_ROW)
    rows 1..N      worker 0..N-1            (block.worker_row(i))
    row N+1        supervisor               (block.supervisor_row): its own gauges and
                                             counters, plus the folded rows of dead workers

Slot keys are the engine's own ``collections.Counter`` keys, verbatim: the spec §3.18 labels of
the session engine ("conns", "send content", "all clt", ...), ``drop_<DropReason value>``,
``ended_<Outcome value>``, the capture/sender/channel keys.  So the totals of a snapshot are
directly what ``engine.proc.worker.stats_lines`` prints, and the labelled Prometheus families
(dropped{reason}, sessions_total{outcome}, send_errors{errno}, ...) are fixed sets of slots
(``DROP_REASONS``, ``OUTCOMES``, ``SEND_ERRNOS``, ``SENT_KINDS``).  Keys outside the schema
with a known prefix land in that family's "other" slot; any other unknown key is ignored and
counted (slot ``unmapped_keys``, names in ``RowWriter.unmapped``).

Per-packet cost (measured here, CPython 3.11, per increment net of loop overhead):
dict ``d[k] += 1`` ~85 ns, ``Counter[k] += 1`` ~210 ns, numpy ``row[i] += 1`` ~210 ns,
``memoryview('q')[i] += 1`` ~105 ns, a ``w.add(i)`` method call ~180 ns.  The Python engine
counts into Counters (the sans-IO core must), so the cheapest path for it is to keep doing
exactly that and *flush* the cumulative Counters into the row periodically
(``RowWriter.flush``, ~15 µs for ~100 keys): zero extra cost per packet.  The compiled session
table counts in C: its counters are the first slots of every row (``ENGINE_KEYS``, in its
order), and a worker running it hands it its row (``CounterBlock.counting_row``), so it
increments them in place and is never flushed; it holds the row's seqlock (below) while a
batch call counts.  ``RowWriter.add``/``set`` (memoryview element ops, twice as cheap as
numpy's) are for gauges and rare events.

Consistency.  Every slot has exactly one writing process, and aligned 8-byte stores do not
tear (x86-64), so a single value is always whole.  A flush writes many slots, and derived
series (sent{kind="ack"} = send - syn - data - fin - rst) or sums over rows must never go
backwards, or Prometheus sees a counter reset and rate() spikes.  So slot 0 of every row is a
sequence number (a seqlock): odd while its writer updates it.  ``read`` copies each row between two
reads of its sequence slot and keeps the rows that were not being written; busy rows are read
again.  A row still busy after SNAPSHOT_WAIT_MAX_S (its writer died
or stalled mid-flush) keeps the values of its last consistent read, so per row a reader never
sees a half flush nor a value going backwards.  This relies on stores (and loads) not being
reordered with each other: true on x86-64 (TSO).

Restarts.  A restarted worker's Counters start at 0.  Before the supervisor starts the new
worker it calls ``retire(row)``: the dead row's counters are added into the supervisor row and
zeroed (so sums stay monotonic), its active sessions are counted in ``sessions_lost``, its
gauges are zeroed.  ``ring_dropped`` is the exception: the *capture* process writes it into
each worker's row (the ring outlives its consumer), so it is kept.  ``retire`` and ``read``
take one lock, so the supervisor's HTTP thread never sees a fold half done.

Lifetime.  Create in the parent before forking; children simply use the inherited object,
or attach by name (``CounterBlock.attach(block.name)``): the name is the creator's descriptor
of the memfd under /proc, so it resolves while the creator lives and has not unlinked.
Nothing is in /dev/shm and multiprocessing's resource tracker (a process of its own) is never
started; the creator alone unlinks, i.e. closes that descriptor (``unlink`` does nothing in
any other process), and the memory goes with the last mapping.
"""

from __future__ import annotations

import errno as _errno
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from engine.core.events import DropReason, Outcome

COUNTER_FLUSH_INTERVAL_S = 0.2
"""How stale a process's row of the counter block may get (and so the supervisor's sums)."""

__all__ = [
    "ACTIVE",
    "CAPTURE_ROW",
    "CHANNELS_CONNECTED",
    "DROP_REASONS",
    "ENGINE_FIRST",
    "ENGINE_KEYS",
    "HANDSHAKE_FAILURES",
    "KEYS",
    "OUTCOMES",
    "RING_DROPPED",
    "RSS_BYTES",
    "SEND_ERRNOS",
    "SENT_KINDS",
    "SESSIONS_LOST",
    "SHED_REASONS",
    "SLOTS",
    "SLOT_INDEX",
    "TW",
    "UNMAPPED_KEYS",
    "UNSEND",
    "WORKER_RESTARTS",
    "CounterBlock",
    "RowWriter",
    "Slot",
    "sent_by_kind",
    "slot",
]

COUNTER = "counter"
"""Monotonic; summed over rows; folded into the supervisor row when its writer is retired."""
GAUGE = "gauge"
"""A level (set, or incremented and decremented); summed over rows; zeroed on retire."""
PER_RING = "per_ring"
"""Monotonic, written by the capture process into a worker's row; kept on retire."""


class Slot(NamedTuple):
    key: str
    kind: str
    doc: str


# -- the labelled families: fixed, bounded label values ------------------------------------

OTHER = "other"

DROP_EXTRA_REASONS = ("unsent_at_end", "ring_oversize", "parse_error", "shed")
"""Losses counted outside the session's DropReason: client segments still unsent when their
session ended ("unsend dropped"), packets larger than a ring slot, captured frames that did
not parse, packets of sessions shed under overload (engine/core/shed.py)."""
DROP_REASONS: tuple[str, ...] = tuple(r.value for r in DropReason) + DROP_EXTRA_REASONS + (OTHER,)
"""Values of the ``reason`` label of tcpcopy_packets_dropped_total (slot ``drop_<reason>``)."""

OUTCOMES: tuple[str, ...] = (*tuple(o.value for o in Outcome), OTHER)
"""Values of the ``outcome`` label of tcpcopy_sessions_total (slot ``ended_<outcome>``)."""

SEND_ERRNOS: tuple[str, ...] = (
    "EPERM",  # an iptables rule or a missing capability
    "EACCES",
    "ENOBUFS",  # the socket buffer is full: sending faster than the NIC
    "EAGAIN",
    "EMSGSIZE",  # larger than the route MTU
    "ENETUNREACH",
    "EHOSTUNREACH",
    "EINVAL",
    "EADDRNOTAVAIL",
    "ENOMEM",
    OTHER,
)
"""Values of the ``errno`` label of tcpcopy_send_errors_total (slot ``send_error_<errno>``)."""
assert all(name == OTHER or hasattr(_errno, name) for name in SEND_ERRNOS)

SENT_KINDS: tuple[str, ...] = ("syn", "data", "ack", "fin", "rst", "retransmit", "probe")
"""Values of the ``kind`` label of tcpcopy_packets_sent_total: a partition of what the
sessions emitted (see ``sent_by_kind``)."""

GATE_RULES: tuple[str, ...] = ("bytes", "quiet", "max_wait", "nowait")
"""Values of the ``rule`` label of tcpcopy_requests_released_total (slot ``gate_<rule>``):
engine/core/session.py's request gate rules (a), (c), (d), (b)."""

RECONNECT_REFUSALS: tuple[str, ...] = ("off", "budget", "unanswered")
"""Values of the ``reason`` label of tcpcopy_reconnects_refused_total (slot
``reconnect_refused_<reason>``)."""

SHED_REASONS: tuple[str, ...] = ("ring_full", "memory", "backlog")
"""Values of the ``reason`` label of tcpcopy_sessions_shed_total (slot ``shed_sessions_<reason>``,
engine/core/shed.py's REASON_*, and "backlog": the session table's byte budget of held
captured data, engine/core/table.py): whole sessions not admitted under overload."""

HANDSHAKE_FAILURES: dict[str, str] = {
    "refused": "ended_" + Outcome.REFUSED.value,
    "timeout": "ended_" + Outcome.HANDSHAKE_TIMEOUT.value,
}
"""tcpcopy_handshakes_failed_total{reason}: label value -> the slot that counts it."""


def _counters(doc: str, *keys: str) -> list[Slot]:
    return [Slot(k, COUNTER, doc) for k in keys]


_SCHEMA: list[Slot] = [
    Slot("_seq", "seq", "seqlock of the row: odd while its writer updates it"),
    # capture process (engine/io/capture.py TransferFilter and sources)
    *_counters(
        "capture",
        "capture_packets",  # C "total captured packets"
        "capture_bytes",
        "capture_not_tcp",
        "capture_fragment",
        "capture_not_matched",
        "capture_accepted",
        "capture_truncated",
        "capture_block_errors",  # TPACKET_V3 blocks that lied (read to their first bad frame)
        "capture_l2_error",
        "capture_l2_unsupported",
        "capture_file_error",  # a pcap file that stopped the replay (bad header, link type)
        "capture_file_cut",  # a pcap file cut inside its last record: its whole records replayed
        "capture_errors",  # every capture_error_<name>
        "capture_pure_ack_dropped",  # pure ACKs the Python filter dropped (spec §3.3 step 8)
        "capture_filter_excluded",  # packets -F left out where it ran in Python (offline)
        "capture_kernel_filter_failed",  # sources whose BPF program could not be attached
        "capture_kernel_dropped",  # TPACKET_V3: packets the kernel lost, its ring full
        "capture_blocks",  # TPACKET_V3 blocks read
        "shed_starts",  # times a worker began shedding new sessions (engine/core/shed.py)
        "offline_packets",
        "offline_passes",
        "offline_idle_gaps",
        "offline_paused",  # offline backpressure: times the file waited for the workers
        "offline_paused_ms",  # ... and for how long in all (the replay was that much slower)
        "offline_records",  # records read from the pcap file(s), replayed or filtered out
        "offline_bytes_read",  # file bytes consumed (the progress display's numerator)
    ),
    Slot("ring_dropped", PER_RING, "packets the capture dropped: this worker's ring was full"),
    *_counters(
        "sessions shed under overload, by reason", *("shed_sessions_" + r for r in SHED_REASONS)
    ),
    # session table and sessions (engine/core/table.py, engine/core/session.py; spec §3.18 labels)
    *_counters(
        "session",
        "syn cnt",
        "all clt",
        "clt cont",
        "port reuse",
        "sessions refused",
        "conns",
        "resp",
        "c-resp",
        "resp fin",
        "resp rst",
        "resp retransmitted",
        "send",
        "send content",
        "send syn",
        "send ack",
        "fin",
        "reset",
        "reconnect",
        "for no syn",
        "retransmit",
        "syn retransmit",
        "fast retransmit",
        "rto",
        "window probe",
        "total cont retransmit",
        "recv packs after retransmission",
        "client gap",
        "client gap abandoned",
        "client gap ring loss",
        "client overlap",
        "client_truncated",
        "rel",
        "obs del",
        "requests",
        "requests_held",
        "gate_bytes",
        "gate_nowait",
        "gate_quiet",
        "gate_max_wait",
        "reconnect_refused_off",  # --no-reconnect
        "reconnect_refused_budget",  # --reconnect-budget spent
        "reconnect_refused_unanswered",  # the last reconnect was closed before any answer
        "reconnect_skipped_bytes",  # client bytes skipped to start a reconnect at a request
        "client_bytes_captured",
        "client_bytes_acked",
        "tuple_history_avoided",  # ports skipped: a dead predecessor used them (TIME_WAIT)
        "tuples_spilled",  # connections given another -c address than their sticky one
        "tuples_reused",  # connections given a tuple in the target's TIME_WAIT (RFC 6191)
    ),
    *_counters("dropped input, by reason", *("drop_" + r for r in DROP_REASONS)),
    *_counters("sessions ended, by outcome", *("ended_" + o for o in OUTCOMES)),
    # raw sender (engine/io/send.py)
    *_counters("sender", "send_packets", "send_bytes", "send_errors"),
    *_counters("link-layer sender (-o)", "send_split"),  # packets split to DEV's MTU
    *_counters("send errors, by errno", *("send_error_" + e for e in SEND_ERRNOS)),
    # intercept channels (engine/io/channel.py)
    *_counters(
        "channels",
        "channel_connects",
        "channel_disconnects",
        "channel_connect_failures",
        "channel_frame_errors",
        "channel_overflows",
        "route_announced",
        "route_unannounced",
        "route_records_sent",
        "responses_received",
        "response_decode_errors",
        "sessions_reannounced",  # CLIENT_ADDs sent again for live sessions after a (re)connect
        "channel_auth_ok",
        "channel_auth_refused",
        "channel_auth_bad_proof",
        "channel_auth_failures",
    ),
    # supervisor
    *_counters("supervisor", "worker_restarts", "sessions_lost"),
    # gauges
    Slot("active", GAUGE, "sessions in the table (SessionTable.active)"),
    Slot("unsend", GAUGE, "captured client segments held back, not yet sent"),
    Slot("tw", GAUGE, "ended sessions still lingering (the session's 'tw' key)"),
    Slot("channels_connected", GAUGE, "intercept connections up"),
    Slot("rss_bytes", GAUGE, "resident memory (the supervisor writes the tree's sum)"),
    Slot(
        "offline_bytes_total",
        GAUGE,
        "offline: bytes the whole replay will read (file sizes x -T); progress denominator",
    ),
    Slot(
        "capture_kernel_filtered",
        GAUGE,
        "capture sources whose exact BPF program drops unneeded packets in the kernel, uncounted",
    ),
    Slot("unmapped_keys", GAUGE, "distinct Counter keys of the last flush outside the schema"),
]

ALIASES: dict[str, str] = {
    "unsend dropped": "drop_unsent_at_end",
    "ring_oversize": "drop_ring_oversize",
    "capture_parse_errors": "drop_parse_error",
    "sessions_active": "active",
}
"""Counter keys stored under another slot."""

ENGINE_KEYS: tuple[str, ...] = (
    *("all clt", "c-resp", "client gap", "client gap abandoned", "client gap ring loss"),
    *("client overlap", "client_bytes_acked", "client_bytes_captured", "client_truncated"),
    *("clt cont", "conns", "fast retransmit", "fin", "for no syn", "obs del", "port reuse"),
    *("reconnect", *("reconnect_refused_" + r for r in ("budget", "off", "unanswered"))),
    *("reconnect_skipped_bytes", "recv packs after retransmission", "rel", "requests"),
    *("requests_held", "reset", "resp", "resp fin", "resp retransmitted", "resp rst"),
    *("retransmit", "rto", "send", "send ack", "send content", "send syn", "sessions refused"),
    *("syn cnt", "syn retransmit", "total cont retransmit", "tuple_history_avoided"),
    *("tuples_reused", "tuples_spilled", "tw", "unsend dropped", "window probe"),
    *("gate_" + r for r in ("bytes", "nowait", "quiet", "max_wait")),
    *("drop_" + r.value for r in DropReason),
    "drop_shed",
    *("ended_" + o.value for o in Outcome),
    *("shed_sessions_memory", "shed_sessions_backlog", "response_decode_errors"),
)
"""The compiled session table's counters (engine/dataplane/counters.pxi EC_NAMES), in its
order: Counter keys (ALIASES name the slot of the one stored under another key).  Their slots
come first in every row (ENGINE_FIRST on, in this order), so the compiled table counts straight
into its worker's row (``CounterBlock.counting_row``) instead of being flushed."""
ENGINE_FIRST = 1


def _arranged(schema: list[Slot]) -> list[Slot]:
    """The schema with the engine's slots moved to ENGINE_FIRST on, in ENGINE_KEYS order."""
    by_key = {s.key: s for s in schema}
    engine = [by_key[ALIASES.get(k, k)] for k in ENGINE_KEYS]
    moved = {s.key for s in engine}
    return [schema[0], *engine, *(s for s in schema[1:] if s.key not in moved)]


SLOTS: tuple[Slot, ...] = tuple(_arranged(_SCHEMA))
KEYS: tuple[str, ...] = tuple(s.key for s in SLOTS)
SLOT_INDEX: dict[str, int] = {k: i for i, k in enumerate(KEYS)}
assert len(SLOT_INDEX) == len(SLOTS), "duplicate slot key"


PREFIXES: tuple[tuple[str, str], ...] = (
    ("drop_", "drop_other"),
    ("ended_", "ended_other"),
    ("send_error_", "send_error_other"),
    ("capture_error_", "capture_errors"),
)
"""Unknown keys with these prefixes are summed into the family's catch-all slot."""


def slot(key: str) -> int:
    """The slot index of a schema key (KeyError if it is not one)."""
    return SLOT_INDEX[key]


SEQ = 0
CAPTURE_ROW = 0
ACTIVE = SLOT_INDEX["active"]
UNSEND = SLOT_INDEX["unsend"]
TW = SLOT_INDEX["tw"]
RING_DROPPED = SLOT_INDEX["ring_dropped"]
CHANNELS_CONNECTED = SLOT_INDEX["channels_connected"]
RSS_BYTES = SLOT_INDEX["rss_bytes"]
WORKER_RESTARTS = SLOT_INDEX["worker_restarts"]
SESSIONS_LOST = SLOT_INDEX["sessions_lost"]
UNMAPPED_KEYS = SLOT_INDEX["unmapped_keys"]

_KIND_COLUMNS = {
    kind: tuple(i for i, s in enumerate(SLOTS) if s.kind == kind)
    for kind in (COUNTER, GAUGE, PER_RING)
}

SCHEMA_FINGERPRINT = zlib.crc32("\0".join(f"{s.key}:{s.kind}" for s in SLOTS).encode())
"""Stored in the block's header: an attach from a different schema is refused."""


def sent_by_kind(values: Mapping[str, int]) -> dict[str, int]:
    """tcpcopy_packets_sent_total{kind} from slot values (totals or one row).

    The session counts every packet it emits under "send" except retransmissions
    ("retransmit", SYN retransmissions included) and window probes, and also under one of
    "send syn", "send content", "fin", "reset"; the rest of "send" are pure ACKs (delayed
    ACKs, the third handshake packet, ACKs of the target's FIN).  The kinds partition what
    the sessions handed to the sender.
    """
    syn = values["send syn"]
    data = values["send content"]
    fin = values["fin"]
    rst = values["reset"]
    return {
        "syn": syn,
        "data": data,
        "ack": max(0, values["send"] - syn - data - fin - rst),
        "fin": fin,
        "rst": rst,
        "retransmit": values["retransmit"],
        "probe": values["window probe"],
    }


# -- the shared block ------------------------------------------------------------------------

_HEADER = struct.Struct("<8sIIII")  # magic, version, workers, slots, schema fingerprint
_MAGIC = b"TCMPCNT\0"
_VERSION = 1
HEADER_BYTES = 64
"""The matrix starts one cache line in: 8-byte aligned, header apart from hot rows."""
SLOT_BYTES = 8
SNAPSHOT_WAIT_MAX_S = 0.02
"""How long a read waits for a row marked busy (a flush takes ~15 µs; a writer descheduled
mid-flush on a loaded host can take milliseconds; a dead one never finishes)."""
SNAPSHOT_SPINS_BEFORE_SLEEP = 8
SNAPSHOT_SLEEP_S = 0.0002


class RowWriter:
    """The writing side of one row.  Only one process may write a given row (or slot)."""

    __slots__ = ("row", "_m", "_resolve", "unmapped")

    def __init__(self, row: int, view: memoryview) -> None:
        self.row = row
        self._m = view  # memoryview cast to 'q' over this row only
        self._resolve: dict[Any, int] = dict(SLOT_INDEX)
        for alias, key in ALIASES.items():
            self._resolve[alias] = SLOT_INDEX[key]
        self.unmapped: set[str] = set()
        """Keys seen by ``flush`` that are in no slot (for debugging)."""

    def add(self, slot_index: int, n: int = 1) -> None:
        self._m[slot_index] += n

    def set(self, slot_index: int, value: int) -> None:
        self._m[slot_index] = value

    def get(self, slot_index: int) -> int:
        return self._m[slot_index]

    def flush(self, *counters: Mapping[Any, int]) -> None:
        """Make the row say what these cumulative Counters (or plain dicts) say.

        Pass every Counter of the row in one call: keys mapped to one slot (aliases, the
        "other" catch-alls) are summed over all of them.  Slots no key maps to keep their
        value (gauges written with ``set``, ring_dropped written by the capture).  Gauges can
        ride along as a plain dict: ``flush(table.counters, {"active": t.active, ...})``.
        """
        resolve = self._resolve
        acc: dict[int, int] = {}
        for counter in counters:
            for key, value in counter.items():
                i = resolve.get(key)
                if i is None:
                    i = self._learn(key)
                if i > 0:
                    acc[i] = acc.get(i, 0) + int(value)
        m = self._m
        seq = (m[SEQ] | 1) + 2  # odd: busy (and different from any value seen before)
        m[SEQ] = seq
        for i, value in acc.items():
            m[i] = value
        m[UNMAPPED_KEYS] = len(self.unmapped)
        m[SEQ] = seq + 1

    def _learn(self, key: Any) -> int:
        i = -1
        if isinstance(key, str):
            for prefix, catch_all in PREFIXES:
                if key.startswith(prefix):
                    i = SLOT_INDEX[catch_all]
                    break
        if i < 0:
            self.unmapped.add(str(key))
        self._resolve[key] = i
        return i


class CounterBlock:
    """The shared counter matrix: ``create`` in the parent, ``attach`` by name in children."""

    def __init__(self, block: mmap.mmap, name: str, fd: int | None, workers: int) -> None:
        self._map = block
        self._buf: memoryview | None = memoryview(block)
        self._name = name
        self._fd = fd  # the creator's: its descriptor is the name
        self.workers = workers
        self.rows = workers + 2
        self._owner_pid = os.getpid() if fd is not None else None
        size = self.rows * len(SLOTS) * SLOT_BYTES
        self._data = self._buf[HEADER_BYTES : HEADER_BYTES + size]
        self._cells = self._data.cast("q")  # the matrix, row-major (rows x slots, int64)
        self._writers: dict[int, RowWriter] = {}
        self._views: list[memoryview] = []
        self._last_good = [[0] * len(SLOTS) for _ in range(self.rows)]
        # read() and retire() exclude each other in this process: the supervisor retires a
        # row in its main loop while its HTTP thread may be reading.
        self._lock = threading.Lock()

    # -- lifetime ------------------------------------------------------------------------
    @classmethod
    def create(cls, workers: int) -> CounterBlock:
        """A zeroed block for a capture row, ``workers`` worker rows and a supervisor row."""
        if workers < 0:
            raise ValueError(f"counter block: bad worker count {workers}")
        size = HEADER_BYTES + (workers + 2) * len(SLOTS) * SLOT_BYTES
        fd = os.memfd_create("tcpcopy-mp-counters", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)  # reads as zeros
            block = mmap.mmap(fd, size)
        except OSError:
            os.close(fd)
            raise
        _HEADER.pack_into(block, 0, _MAGIC, _VERSION, workers, len(SLOTS), SCHEMA_FINGERPRINT)
        return cls(block, f"/proc/{os.getpid()}/fd/{fd}", fd, workers)

    @classmethod
    def attach(cls, name: str) -> CounterBlock:
        """Map an existing block (FileNotFoundError if it is gone, ValueError if foreign)."""
        fd = os.open(name, os.O_RDWR | os.O_CLOEXEC)
        try:
            block = mmap.mmap(fd, 0)
        except (OSError, ValueError) as e:  # ValueError: an empty file
            raise ValueError(f"counter block {name}: not a tcpcopy-mp counter block") from e
        finally:
            os.close(fd)  # the mapping stays
        try:
            if len(block) < _HEADER.size:
                raise ValueError(f"counter block {name}: not a tcpcopy-mp counter block")
            magic, version, workers, nslots, fingerprint = _HEADER.unpack_from(block, 0)
            if magic != _MAGIC or version != _VERSION:
                raise ValueError(f"counter block {name}: not a tcpcopy-mp counter block")
            if nslots != len(SLOTS) or fingerprint != SCHEMA_FINGERPRINT:
                raise ValueError(f"counter block {name}: written by another counter schema")
        except Exception:
            block.close()
            raise
        return cls(block, name, None, workers)

    @property
    def name(self) -> str:
        return self._name

    def close(self) -> None:
        """Unmap (every process, once).  Writers of this block are unusable afterwards."""
        if self._buf is None:
            return
        self._writers.clear()
        for view in self._views:
            view.release()
        self._views.clear()
        self._cells.release()
        self._data.release()
        self._buf.release()
        self._buf = None
        self._map.close()

    def unlink(self) -> None:
        """Remove the block's name (creator only; a no-op in any other process)."""
        if self._owner_pid == os.getpid() and self._fd is not None:
            self._owner_pid = None
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> CounterBlock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        self.unlink()

    # -- rows ----------------------------------------------------------------------------
    capture_row = CAPTURE_ROW

    def worker_row(self, worker: int) -> int:
        if not 0 <= worker < self.workers:
            raise IndexError(f"no worker {worker} (block has {self.workers})")
        return 1 + worker

    @property
    def supervisor_row(self) -> int:
        return self.workers + 1

    def writer(self, row: int) -> RowWriter:
        """The writer of ``row`` (cached: one per row and process)."""
        w = self._writers.get(row)
        if w is None:
            if not 0 <= row < self.rows:
                raise IndexError(f"no row {row} (block has {self.rows})")
            stride = len(SLOTS) * SLOT_BYTES
            view = self._data[row * stride : (row + 1) * stride].cast("q")
            self._views.append(view)
            w = self._writers[row] = RowWriter(row, view)
        return w

    def counting_row(self, row: int, names: Sequence[str]) -> memoryview | None:
        """Row ``row`` as bytes, for a writer that counts in place: the compiled session
        table, whose counters ``names`` are then the row's slots ENGINE_FIRST on, and which
        holds the row's seqlock (slot 0) while a batch call counts.  None if ``names`` is
        not ENGINE_KEYS (another build of the table: flush it instead).  The block cannot
        close while the view is held."""
        if tuple(names) != ENGINE_KEYS:
            return None
        if not 0 <= row < self.rows:
            raise IndexError(f"no row {row} (block has {self.rows})")
        stride = len(SLOTS) * SLOT_BYTES
        return self._data[row * stride : (row + 1) * stride]

    def from_counter(self, row: int, *counters: Mapping[Any, int]) -> None:
        """Copy cumulative Counters into ``row`` (``RowWriter.flush``)."""
        self.writer(row).flush(*counters)

    # -- reading (supervisor) ------------------------------------------------------------
    def read(self) -> list[list[int]]:
        """A copy of the matrix (a list of rows, each a list of the slots' int64 values),
        every row consistent (the seqlock).

        A row caught mid-flush is read again; one still busy after SNAPSHOT_WAIT_MAX_S (its
        writer died or is stopped mid-flush) keeps the values of the last consistent read,
        so what a reader sees per row never goes backwards.
        """
        stride = len(SLOTS)
        with self._lock:
            cells = self._cells
            out = self._last_good
            pending = list(range(self.rows))
            deadline = time.monotonic() + SNAPSHOT_WAIT_MAX_S
            attempt = 0
            while True:
                busy = []
                for r in pending:
                    base = r * stride
                    before = cells[base + SEQ]
                    copy = cells[base : base + stride].tolist()
                    if before & 1 == 0 and cells[base + SEQ] == before:
                        out[r] = copy
                    else:
                        busy.append(r)
                pending = busy
                if not pending or time.monotonic() > deadline:
                    return [row[:] for row in out]
                attempt += 1
                if attempt > SNAPSHOT_SPINS_BEFORE_SLEEP:
                    time.sleep(SNAPSHOT_SLEEP_S)

    def snapshot(self) -> dict[str, Any]:
        """Totals and per-row values: ``{"totals": {key: int}, "capture": {...},
        "workers": [{...} per worker], "supervisor": {...}}`` (keys: ``KEYS`` minus the
        seqlock).  Totals sum every row (counters and gauges alike)."""
        data = self.read()
        keys = KEYS[1:]

        def row(vector: list[int]) -> dict[str, int]:
            return dict(zip(keys, vector[1:], strict=True))

        return {
            "totals": row([sum(column) for column in zip(*data, strict=True)]),
            "capture": row(data[self.capture_row]),
            "workers": [row(data[1 + i]) for i in range(self.workers)],
            "supervisor": row(data[self.supervisor_row]),
        }

    def retire(self, row: int) -> dict[str, int]:
        """Fold a dead writer's row into the supervisor row before its replacement starts.

        Called by the supervisor (the supervisor row's writer) once the process is reaped.
        Counters move to the supervisor row, so sums never go backwards; the row's active
        sessions are added to ``sessions_lost``; gauges are zeroed; ``ring_dropped`` stays.
        Returns the row's values as they were.
        """
        sup = self.supervisor_row
        if not 0 <= row < sup:
            raise IndexError(f"row {row} cannot be retired")
        with self._lock:
            return self._retire(row, sup)

    def _retire(self, row: int, sup: int) -> dict[str, int]:
        cells = self._cells
        stride = len(SLOTS)
        dead_at = row * stride
        sup_at = sup * stride
        dead = cells[dead_at : dead_at + stride].tolist()
        seq_dead = (dead[SEQ] | 1) + 2
        seq_sup = (cells[sup_at + SEQ] | 1) + 2
        cells[dead_at + SEQ] = seq_dead
        cells[sup_at + SEQ] = seq_sup
        for i in _KIND_COLUMNS[COUNTER]:
            cells[sup_at + i] += cells[dead_at + i]
            cells[dead_at + i] = 0
        cells[sup_at + SESSIONS_LOST] += max(0, dead[ACTIVE])
        for i in _KIND_COLUMNS[GAUGE]:
            cells[dead_at + i] = 0
        self._writers.pop(row, None)  # its unmapped-key memory belonged to the dead process
        cells[dead_at + SEQ] = seq_dead + 1
        cells[sup_at + SEQ] = seq_sup + 1
        return dict(zip(KEYS[1:], dead[1:], strict=True))
