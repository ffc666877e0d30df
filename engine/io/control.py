"""ControlBlock: the few shared flags and heartbeats of the multi-process engine (design §3).

Theory of operation
-------------------
The supervisor creates one ControlBlock before it forks anything; the capture process and
every worker inherit it through fork (one page of anonymous shared memory: no name to
unlink, nothing left behind when the tree dies).  Slots are numbered like the
rows of metrics.counters.CounterBlock: slot 0 is the capture process, slot 1 + i worker i.

* ``capture_done``: set by the capture process once an offline replay has read its last
  packet; a worker whose ring is empty then knows nothing more will come.
* ``shed``: set by the supervisor's memory watchdog above 90 % of -m; workers refuse new
  sessions while it is set.
* ``heartbeat[slot]``: time.monotonic() of the child's last loop pass (CLOCK_MONOTONIC is
  system-wide, so the supervisor compares it with its own clock).  A child silent for longer
  than the supervisor's heartbeat timeout is killed and restarted.

Every field has exactly one writer (flags: one writer each; heartbeats: their child), and
aligned 8-byte stores do not tear, so no lock is needed.
"""

from __future__ import annotations

import mmap

_CAPTURE_DONE = 0
_SHED = 1
_FLAGS = 4

CAPTURE_SLOT = 0


class ControlBlock:
    """Shared flags and heartbeats for a capture process and ``workers`` workers."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"control block: bad worker count {workers}")
        self.workers = workers
        # Flags (i64) then heartbeats (f64), all 8-byte aligned; zeros until written.
        self._map = mmap.mmap(-1, 8 * (_FLAGS + workers + 1))
        block = memoryview(self._map)
        self._flags = block[: 8 * _FLAGS].cast("q")
        self._beats = block[8 * _FLAGS :].cast("d")

    @staticmethod
    def worker_slot(worker: int) -> int:
        return 1 + worker

    # -- heartbeats -----------------------------------------------------------------------
    def beat(self, slot: int, now: float) -> None:
        self._beats[slot] = now

    def last_beat(self, slot: int) -> float:
        return self._beats[slot]

    # -- flags ----------------------------------------------------------------------------
    @property
    def capture_done(self) -> bool:
        return bool(self._flags[_CAPTURE_DONE])

    def mark_capture_done(self) -> None:
        self._flags[_CAPTURE_DONE] = 1

    @property
    def shed(self) -> bool:
        return bool(self._flags[_SHED])

    @shed.setter
    def shed(self, value: bool) -> None:
        self._flags[_SHED] = 1 if value else 0
