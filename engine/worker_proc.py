"""A worker process of the multi-process engine: engine.worker.Worker fed from a ring.

Theory of operation
-------------------
The worker loop itself is engine/worker.py's Worker, unchanged: its capture source is a
``RingSource`` (the consumer side of this worker's shared-memory ring, see engine/ring.py),
which offers the capture.py source interface:

* ``fileno()`` is the ring's eventfd, rung by the producer on empty -> non-empty;
* ``next_deadline()`` is never more than ``RING_IDLE_POLL_S`` away (a wake-up can be missed,
  ring.py explains why), and is "now" while a backlog remains (the eventfd is only rung on
  empty -> non-empty, so a consumer that stopped early must come back by itself);
* ``read_batch(now)`` pops a batch;
* ``exhausted`` is true once the capture process marked an offline replay done and the ring
  is empty: Worker then stops by itself when its table has no session left.

Every ``read_batch`` (so at least every RING_IDLE_POLL_S) also calls ``tick(now)``:
``WorkerProcess`` uses it to write its heartbeat and to flush its counters into its row of
the shared CounterBlock every COUNTER_FLUSH_INTERVAL_S.  The watchdog's "shed" flag is the
capture process's to follow (engine/shed.py): it sheds whole sessions before they reach a
ring, where a worker refusing its flows would cut sessions already admitted.  A worker
follows it in two ways: while it is up, the SYNs already in its ring start no session
(engine/shard.py ``refuse_new``: the capture took them in before it began shedding, and at
10 k SYNs/s a full ring is 8 k sessions, ~32 MB), and every SHED_SWEEP_INTERVAL_S it gives
up its half-open sessions (the client sent a SYN and nothing after it: what a SYN flood
leaves, ``shed_half_open``), which are the memory a flood holds.  The row's
``active`` gauge is what the supervisor counts as lost if this process dies.  The stats
line is the supervisor's job, so ``log_stats`` only flushes.

Memory given back.  Ended sessions are freed by Python, but glibc keeps the freed heap
(most of a session's ~4 KB) mapped, so a worker that held 100 k sessions stays that large
after they are gone and the watchdog keeps seeing it.  When TRIM_AFTER_SESSIONS sessions
left the table since the last time, ``malloc_trim(0)`` hands the free pages back (measured:
470 -> 253 MB after 100 k sessions ended, the rest being their tuples' TIME_WAIT quarantine,
which expires after 60 s); at most every TRIM_INTERVAL_S.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from engine.logs import LOGGER_NAME
from engine.ring import RING_IDLE_POLL_S, Ring
from engine.worker import Worker
from metrics.counters import COUNTER_FLUSH_INTERVAL_S

log = logging.getLogger(LOGGER_NAME)

RING_BATCH_MAX_PACKETS = 1024
"""Packets taken from the ring per read_batch (timers and responses are not starved)."""
SHED_SWEEP_INTERVAL_S = 0.5
"""While the watchdog sheds: how often the half-open sessions are given up."""
TRIM_AFTER_SESSIONS = 1000
"""Sessions removed from the table since the last trim that make the next one worth it."""
TRIM_INTERVAL_S = 2.0
"""malloc_trim at most this often (it walks the heap: milliseconds for hundreds of MB)."""


class RingSource:
    """The capture-source interface (engine/capture.py) over a ring's consumer side."""

    def __init__(
        self,
        ring: Ring,
        control: object | None = None,
        tick: Callable[[float], None] | None = None,
        batch_max: int = RING_BATCH_MAX_PACKETS,
    ) -> None:
        self.ring = ring
        self.control = control
        self.tick = tick
        self.batch_max = batch_max
        self.counters: Counter[str] = Counter()
        self._last_read = float("-inf")
        self._backlog = False
        self._loss_marks = 0
        # Called with `now` when a batch held a packet the capture marked "packets of this
        # ring were dropped just before me" (ring.SLOT_FLAG_LOSS_BEFORE).
        self.on_loss: Callable[[float], None] | None = None

    def fileno(self) -> int | None:
        return self.ring.efd

    def next_deadline(self) -> float | None:
        if self._backlog:
            return self._last_read
        return self._last_read + RING_IDLE_POLL_S

    @property
    def exhausted(self) -> bool:
        control = self.control
        return (
            control is not None
            and control.capture_done  # type: ignore[attr-defined]
            and len(self.ring) == 0
        )

    def read_batch(self, now: float) -> list[tuple[float, bytes]]:
        ring = self.ring
        # Clear first: a push after our pop rings again, so nothing is slept through.
        ring.clear_wakeup()
        items = ring.pop_packets(self.batch_max)
        self._last_read = now
        if ring.loss_marks != self._loss_marks:
            self._loss_marks = ring.loss_marks
            if self.on_loss is not None:
                self.on_loss(now)
        # Anything in the ring now (pushed while we popped, or beyond batch_max) means come
        # back at once: the producer rang the eventfd only if it saw our tail caught up, and
        # it may have read the tail before we published it (ring.py "Wake-ups").  Testing
        # only a full batch here missed those, and each miss slept RING_IDLE_POLL_S with
        # packets waiting: under load the ring overflowed while the worker sat idle.
        self._backlog = len(ring) > 0
        if self.tick is not None:
            self.tick(now)
        return items

    def close(self) -> None:
        self.ring.close()


class WorkerProcess(Worker):
    """Worker plus the shared-memory duties of a worker process (see the module docstring)."""

    def __init__(
        self,
        index: int,
        cfg: object,
        table: object,
        source: RingSource,
        sender: object,
        *,
        counters: object | None = None,
        control: object | None = None,
        **kw: object,
    ) -> None:
        kw.setdefault("memory_rss", _no_rss)  # -m is the supervisor's (the tree's RSS)
        super().__init__(cfg, table, [source], sender, **kw)  # type: ignore[arg-type]
        self.index = index
        self.block = counters
        self.control = control
        self.row = counters.worker_row(index) if counters is not None else None  # type: ignore[attr-defined]
        self.slot = 1 + index
        self._next_flush = float("-inf")
        self._next_shed_sweep = float("-inf")
        self._shed_logged = False
        self._next_trim = float("-inf")
        self._released_at_trim = 0
        self._trim = _malloc_trim()
        source.tick = self.tick

    def tick(self, now: float) -> None:
        control = self.control
        if control is not None:
            control.beat(self.slot, now)  # type: ignore[attr-defined]
            shed = bool(control.shed)  # type: ignore[attr-defined]
            self.table.refuse_new = shed  # type: ignore[attr-defined]
            if now >= self._next_shed_sweep:
                self._next_shed_sweep = now + SHED_SWEEP_INTERVAL_S
                if shed:
                    self._shed_half_open(now)
                else:
                    self._shed_logged = False
                self.table.expire_refused(now)  # type: ignore[attr-defined]
        if now >= self._next_flush:
            self._next_flush = now + COUNTER_FLUSH_INTERVAL_S
            self.flush_counters()
            self.warn_no_tuple(now)
        if now >= self._next_trim:
            released = self.table.counters["rel"]  # type: ignore[attr-defined]
            if released - self._released_at_trim >= TRIM_AFTER_SESSIONS:
                self._released_at_trim = released
                self._next_trim = now + TRIM_INTERVAL_S
                if self._trim is not None:
                    self._trim(0)

    def _shed_half_open(self, now: float) -> None:
        table = self.table
        ended = table.shed_half_open(now)  # type: ignore[attr-defined]
        if not ended:
            return
        self._flush(now)  # their RSTs free the target's side, and they start to linger
        if not self._shed_logged:
            self._shed_logged = True
            log.warning(
                "memory above 90 %% of -m: %d half-open session%s (a SYN and nothing "
                "after it) given up, and more while it lasts (ended_shed_half_open)",
                ended,
                "" if ended == 1 else "s",
            )

    def flush_counters(self) -> None:
        if self.block is None:
            return
        table = self.table
        self.block.from_counter(  # type: ignore[attr-defined]
            self.row,
            table.counters,  # type: ignore[attr-defined]
            self.sender.counters,  # type: ignore[attr-defined]
            self.channels.counters,  # type: ignore[attr-defined]
            self.counters,
            {
                "active": table.active,  # type: ignore[attr-defined]
                "unsend": table.unsend,  # type: ignore[attr-defined]
                "channels_connected": self.channels.connected,  # type: ignore[attr-defined]
            },
        )

    def log_stats(self, now: float, final: bool = False) -> None:
        # The supervisor logs the aggregated stats line; a worker only publishes its row.
        self.flush_counters()
        self.warn_no_tuple(now)


def _no_rss() -> int:
    return 0


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None (another libc: nothing to hand back this way)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None
