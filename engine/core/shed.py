"""Overload shedding at the capture: whole sessions in or out, never a hole in one (pure).

Theory of operation
-------------------
When a worker cannot keep up its ring fills, and a full ring drops packets of sessions that
are already replaying: each such drop is a hole in the middle of a session (the target then
waits for bytes that never come).  So the capture process sheds *earlier* and by session:

* a worker whose ring is more than ``SHED_RING_HIGH`` (90 %) full starts shedding and stops when it
  is back under ``SHED_RING_LOW`` (hysteresis, so the decision does not flap per batch);
  while the memory watchdog has raised the shared "shed" flag (engine/io/control.py, -m above
  90 %) every worker sheds, and the reason is ``memory``;
* while a worker sheds, a packet of a flow it does not know (a SYN, or a mid-stream packet of
  a flow whose start was never seen) starts a *shed* flow: counted once in
  ``shed_sessions_<reason>``, and every later packet of that flow is dropped too
  (``drop_shed``) until its FIN/RST or ``SHED_IDLE_S`` of silence, even after the worker
  recovered: the session is wholly replicated or wholly shed.  A SYN on the same (ip, port)
  after the worker recovered starts a new, whole session (while it still sheds, a SYN
  retransmission is not counted as another shed session);
* packets of known (admitted) flows always go in; only a full ring still drops them
  (``ring_dropped``), which shedding early is there to make rare.

A flow is *known* from its first admitted packet until its FIN/RST (the last one of the
batch) or ``SHED_IDLE_S`` without a packet.  Flows are keyed as the dispatcher hashes them:
``client ip << 16 | client port`` (engine/proc/capture.py).

Cost.  The gate sees whole batches as numpy arrays (numpy is imported when a FlowGate is
made: the compiled gate, engine/dataplane/capture.pyx ``Gate``, needs none).  With no worker
shedding and no shed flow alive, a batch costs one ``dict.update`` of its keys (C loop) and
a lookup per FIN/RST;
packets of shedding workers or of shed flows are decided as arrays when their flow cannot
change state in the batch (known or shed, no SYN/FIN/RST, nothing unknown: keep-alive
traffic); the others go through the per-packet Python loop, in order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import repeat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "REASON_MEMORY",
    "REASON_RING_FULL",
    "SHED_IDLE_S",
    "SHED_REASONS",
    "SHED_RING_HIGH",
    "SHED_RING_LOW",
    "FlowGate",
]

SHED_RING_HIGH = 0.9
"""Ring fill above which the worker's new sessions are shed.  High, so a burst the ring can
absorb sheds nothing (75 % shed sessions of a redis-benchmark flood that fit); the last
10 % (819 slots of the default ring) take the packets of the sessions admitted already."""
SHED_RING_LOW = 0.5
"""Ring fill below which it admits new sessions again."""
SHED_FLOWS_MAX = 65_536
"""Shed flows remembered at most (~10 MB).  A SYN flood makes every SYN a shed flow, and
remembering each for SHED_IDLE_S grew the capture by ~14 MB per 70 k SYNs while memory was
what was short; past this bound a shed flow is counted and dropped but not remembered, so
a later packet of it is judged afresh (shed again while its worker sheds)."""
SHED_IDLE_S = 60.0
"""A known or shed flow is forgotten after this long without a packet (C's session idle)."""
EXPIRE_INTERVAL_S = 1.0
"""How often the flow tables are swept for idle flows."""
REASON_RING_FULL = "ring_full"
REASON_MEMORY = "memory"
SHED_REASONS = (REASON_RING_FULL, REASON_MEMORY)
"""Values of the ``reason`` label of tcpcopy_sessions_shed_total."""

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10
_SYN_ACK = TCP_SYN | TCP_ACK
_END = TCP_FIN | TCP_RST

_NONE = 0
_RING = 1
_MEMORY = 2
_REASON_NAME = {_RING: REASON_RING_FULL, _MEMORY: REASON_MEMORY}


class FlowGate:
    """Decides, batch by batch, which captured packets go to their worker's ring.

    counters: ``shed_sessions_ring_full``, ``shed_sessions_memory`` (flows shed, by the
    reason in force when their first packet came), ``drop_shed`` (their packets),
    ``shed_starts`` (times a worker began shedding).
    """

    def __init__(
        self,
        workers: int,
        *,
        high: float = SHED_RING_HIGH,
        low: float = SHED_RING_LOW,
        idle_s: float = SHED_IDLE_S,
        counters: Counter[str] | None = None,
        enabled: bool = True,
    ) -> None:
        if workers < 1:
            raise ValueError("gate: no worker")
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"gate: bad thresholds low={low} high={high}")
        self.workers = workers
        self.enabled = enabled
        self.vectorize = True  # False: every slow packet through the loop (the reference)
        self.high = high
        self.low = low
        self.idle_s = idle_s
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.known: dict[int, float] = {}
        self.shed: dict[int, float] = {}
        self._ring_shedding = [False] * workers
        self._memory = False
        import numpy as np

        self.reason = np.zeros(workers, dtype=np.int8)  # per worker: _NONE, _RING, _MEMORY
        self._next_expire = float("-inf")

    # -- the decision per worker -------------------------------------------------------------

    def update(self, fills: Sequence[float], memory: bool = False) -> list[tuple[int, str]]:
        """Take the rings' fill fractions and the watchdog's flag; return the workers whose
        state changed, as (worker, "ring_full" | "memory" | "") for the caller's log."""
        changes: list[tuple[int, str]] = []
        if not self.enabled:
            return changes
        for i, fill in enumerate(fills):
            was = self._ring_shedding[i]
            if not was and fill >= self.high:
                self._ring_shedding[i] = True
            elif was and fill < self.low:
                self._ring_shedding[i] = False
        self._memory = memory
        for i in range(self.workers):
            state = _MEMORY if memory else (_RING if self._ring_shedding[i] else _NONE)
            if state != self.reason[i]:
                if state != _NONE and self.reason[i] == _NONE:
                    self.counters["shed_starts"] += 1
                self.reason[i] = state
                changes.append((i, _REASON_NAME.get(state, "")))
        return changes

    @property
    def shedding(self) -> bool:
        """Some worker sheds now."""
        return bool(self.reason.any())

    # -- the decision per packet -------------------------------------------------------------

    def admit(
        self, keys: np.ndarray, flags: np.ndarray, workers: np.ndarray, now: float
    ) -> np.ndarray | None:
        """For a batch (flow keys u64, TCP flags u8, worker index per packet, in capture
        order): the mask of packets to hand on, or None when every packet goes in."""
        import numpy as np

        keys = np.asarray(keys, dtype=np.uint64)  # also from array("Q") and the like
        flags = np.asarray(flags, dtype=np.uint8)
        workers = np.asarray(workers, dtype=np.intp)
        if now >= self._next_expire:
            self.expire(now)
        count = len(keys)
        if count == 0:
            return None
        key_list = keys.tolist()
        ends = np.flatnonzero(flags & _END)
        if not self.shed and not self.reason.any():
            self._note(key_list, ends, now)
            return None
        slow = self.reason[workers] != _NONE
        if self.shed:
            slow |= np.fromiter(map(self.shed.__contains__, key_list), dtype=bool, count=count)
        if not slow.any():
            self._note(key_list, ends, now)
            return None
        fast = np.flatnonzero(~slow)
        if len(fast):
            fast_keys = [key_list[i] for i in fast.tolist()]
            self._note(fast_keys, np.flatnonzero(flags[fast] & _END), now)
        keep = np.ones(count, dtype=bool)
        known, shed, c = self.known, self.shed, self.counters
        reason = self.reason
        flag_list = flags.tolist()
        worker_list = workers.tolist()
        slow_idx = np.flatnonzero(slow)
        if self.vectorize:
            slow_idx = self._admit_plain(slow_idx, keys, flags, key_list, keep, now)
        for i in slow_idx.tolist():
            key = key_list[i]
            flag = flag_list[i]
            end = flag & _END
            if key in shed:
                # A SYN on a shed flow's tuple while its worker still sheds: a retransmission
                # (or a new session shed again) - dropped, not counted twice.
                if flag & _SYN_ACK != TCP_SYN or reason[worker_list[i]] != _NONE:
                    keep[i] = False
                    c["drop_shed"] += 1
                    if end:
                        del shed[key]
                    else:
                        shed[key] = now
                    continue
                # A SYN on a shed flow's tuple once its worker recovered: a session that begins
                # here (whole from its SYN on).
                del shed[key]
            if key in known:
                if end:
                    del known[key]
                else:
                    known[key] = now
            else:
                state = int(reason[worker_list[i]])
                if state == _NONE:  # a new SYN of a shed flow's tuple, its worker recovered
                    if not end:
                        known[key] = now
                    continue
                keep[i] = False
                c["drop_shed"] += 1
                if not end:
                    if len(shed) < SHED_FLOWS_MAX:
                        shed[key] = now
                    c["shed_sessions_" + _REASON_NAME[state]] += 1
        return keep

    def _admit_plain(
        self,
        slow_idx: np.ndarray,
        keys: np.ndarray,
        flags: np.ndarray,
        key_list: list[int],
        keep: np.ndarray,
        now: float,
    ) -> np.ndarray:
        """Decide, as arrays, the slow packets whose flow cannot change state in this batch:
        flows already known or shed with no SYN, FIN or RST and no unknown packet in the
        batch (a keep-alive flow of a shedding worker).  Returns the indexes left for the
        per-packet loop: every packet of the other flows, in order."""
        import numpy as np

        known, shed = self.known, self.shed
        slow_keys = [key_list[i] for i in slow_idx.tolist()]
        n = len(slow_keys)
        in_shed = np.fromiter(map(shed.__contains__, slow_keys), dtype=bool, count=n)
        in_known = np.fromiter(map(known.__contains__, slow_keys), dtype=bool, count=n)
        special = ((flags[slow_idx] & (_END | TCP_SYN)) != 0) | ~(in_shed | in_known)
        if special.all():
            return slow_idx
        key_arr = keys[slow_idx]
        touched = np.isin(key_arr, key_arr[special]) if special.any() else special
        plain = ~touched
        dropped = plain & in_shed
        admitted = plain & ~in_shed
        if dropped.any():
            keep[slow_idx[dropped]] = False
            self.counters["drop_shed"] += int(dropped.sum())
            shed.update(zip(key_arr[dropped].tolist(), repeat(now)))
        if admitted.any():
            known.update(zip(key_arr[admitted].tolist(), repeat(now)))
        return slow_idx[touched]

    def _note(self, key_list: list[int], ends: np.ndarray, now: float) -> None:
        """Admitted packets: their flows are known (now), ended flows forgotten."""
        known = self.known
        known.update(zip(key_list, repeat(now)))
        if len(ends):
            # Forget a flow only at its batch's last packet (a new SYN may follow its FIN).
            last = {k: i for i, k in enumerate(key_list)}
            for i in ends.tolist():
                key = key_list[i]
                if last[key] == i:
                    known.pop(key, None)

    def expire(self, now: float) -> None:
        """Forget flows idle for ``idle_s``."""
        self._next_expire = now + EXPIRE_INTERVAL_S
        cutoff = now - self.idle_s
        for table in (self.known, self.shed):
            stale = [k for k, t in table.items() if t < cutoff]
            for k in stale:
                del table[k]
