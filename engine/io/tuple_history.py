"""A worker's tuple history in shared memory: survives the worker's SIGKILL (issue 10).

Theory of operation
-------------------
The target keeps every replayed 4-tuple (fake client ip, port, target ip, port) for a while
after we stop using it: in TIME_WAIT for ``time_wait_s`` after a close, and ESTABLISHED for as
long as its keep-alive timeout when the worker that used it died without a close.  A worker's
TupleAllocator (engine/core/rewrite.py) quarantines what *it* used, but that memory dies with the
process: a restarted worker picking up the dead one's keep-alive connections mid-stream would
choose the very same tuples (the preferred port is the captured one) and run into the target's
old connection (challenge ACK, RST, SYN retransmission; measured: some pick-ups then failed
their handshake for 3 s).  So every worker also writes its tuple use into a block the
supervisor creates before forking and hands to every incarnation of that worker.

The block is a counting filter keyed by a hash of the tuple, with no keys stored:

    [ incarnations i64 ][ live i32 x SLOTS ][ released f64 x SLOTS ][ plain f64 x SLOTS ]

``live[h]`` counts the tuples hashing to h that are in use, ``released[h]`` is the latest
release time (time.monotonic(), which is system-wide) of one of them (0.0: none yet), and
``plain[h]`` the latest time one of them became a tuple a new SYN's timestamp cannot reopen:
released by a connection without timestamps, or live when its worker died (the target may
still hold it ESTABLISHED).  A claim increments live[h]; a release decrements it (if the tuple
was claimed), raises released[h] and, for a connection without timestamps, plain[h].  Every
store is one aligned machine word written by the only live writer, so a SIGKILL between two
stores leaves at worst one count that is too high: a false "busy", which costs one port skip.

The slot of a tuple is a hash of its addresses and target port plus its client port, so the
ports a worker cycles through towards one target lie side by side in each array: at a high
connection rate they keep a few pages of the block resident, not every page of it.

A new incarnation calls ``adopt(now, time_wait_s)``: every slot still counted live (tuples of
the dead worker) becomes "released now", the counts restart from zero, and for the next
``time_wait_s`` the allocator asks ``busy(key, since)`` before it claims a tuple.  Hash
collisions only ever make a free tuple look busy (the allocator takes the next port), never
the reverse.  ``reusable(key, since, before)`` answers the allocator's RFC 6191 question for
a busy tuple (engine/core/rewrite.py, reuse): released before ``before`` by a connection with
timestamps, and nothing in its slot live or "plain" since ``since``; a SYN with a TS option,
whose TSval comes from the clock all processes share (engine/tcpseq.ts_clock), then reopens
it at the target.  With SLOTS = 2**18 and tens of thousands of tuples in the horizon a few percent
of claims skip one port, during the first minute after a restart only.
"""

from __future__ import annotations

import mmap
import struct

__all__ = ["HISTORY_SLOTS", "TupleHistory"]

HISTORY_SLOTS = 1 << 18
"""Filter slots per worker: 5 MiB of shared memory (4 + 8 + 8 bytes a slot)."""
_HEADER = struct.Struct("=q")
_HEADER_BYTES = 8

Key = tuple[int, int, int, int]


class TupleHistory:
    """One worker's tuple history (see the module docstring).  Create in the supervisor
    before forking (``create``); every incarnation of the worker uses the inherited object."""

    def __init__(self, block: mmap.mmap, slots: int) -> None:
        if slots & (slots - 1) or slots <= 0:
            raise ValueError(f"slots {slots} is not a power of two")
        self._map = block
        self._buf = buf = memoryview(block)
        self.slots = slots
        self._mask = slots - 1
        self._live = buf[_HEADER_BYTES : _HEADER_BYTES + 4 * slots].cast("i")
        self._released = buf[_HEADER_BYTES + 4 * slots : _HEADER_BYTES + 12 * slots].cast("d")
        self._plain = buf[_HEADER_BYTES + 12 * slots : _HEADER_BYTES + 20 * slots].cast("d")
        self.inherited_until: float | None = None
        """Until then ``busy`` must be asked before a claim (set by ``adopt``)."""
        self.inherited = 0
        """Slots the last ``adopt`` carried over from the previous incarnation."""

    @classmethod
    def create(cls, slots: int = HISTORY_SLOTS) -> TupleHistory:
        # Anonymous shared memory, inherited by every worker forked later (no name, nothing
        # for multiprocessing's resource tracker): it reads as zeros, and a page is
        # allocated only once written.
        if slots & (slots - 1) or slots <= 0:
            raise ValueError(f"slots {slots} is not a power of two")
        return cls(mmap.mmap(-1, _HEADER_BYTES + 20 * slots), slots)

    @property
    def block(self) -> memoryview:
        """The whole shared block (layout in the module docstring): the compiled engine's
        allocator reads and writes it in place, with the same slot hash (``_slot``)."""
        return self._buf

    @property
    def incarnations(self) -> int:
        """How many workers adopted this history so far."""
        return int(_HEADER.unpack_from(self._buf, 0)[0])

    def _slot(self, key: Key) -> int:
        # A hash of the addresses and the target port, plus the client port: the ports of one
        # (client ip, target) sit side by side, so the few thousand a worker cycles through
        # touch a few pages of each array, not every page (and never collide with each other).
        cip, port, tip, tport = key
        h = ((cip << 16) * 0x9E3779B97F4A7C15) ^ ((tip << 16 | tport) * 0xC2B2AE3D27D4EB4F)
        h ^= h >> 31
        return ((h ^ (h >> 17)) + port) & self._mask

    # -- the allocator's side (engine/core/rewrite.py TupleAllocator) ----------------------------

    def record_live(self, key: Key) -> None:
        self._live[self._slot(key)] += 1

    def record_released(self, key: Key, now: float, was_live: bool, reusable: bool = False) -> None:
        """``reusable``: the connection had timestamps, so a newer TSval reopens the tuple."""
        h = self._slot(key)
        if was_live and self._live[h] > 0:
            self._live[h] -= 1
        if self._released[h] < now:
            self._released[h] = now
        if not reusable and self._plain[h] < now:
            self._plain[h] = now

    def busy(self, key: Key, since: float) -> bool:
        """The tuple may be in use by the target: live, or released at or after ``since``."""
        h = self._slot(key)
        released = self._released[h]
        return self._live[h] > 0 or (released != 0.0 and released >= since)

    def reusable(self, key: Key, since: float, before: float) -> bool:
        """A busy tuple a SYN with a TS option reopens (RFC 6191): released before
        ``before`` with timestamps, nothing in its slot live or without them since ``since``."""
        h = self._slot(key)
        plain = self._plain[h]
        return self._live[h] == 0 and self._released[h] < before and (plain == 0.0 or plain < since)

    # -- a new incarnation --------------------------------------------------------------------

    def adopt(self, now: float, time_wait_s: float) -> int:
        """Take over from the previous incarnation: its live tuples count as released now.
        Returns the number of slots that keep a tuple out of use (0 for the first worker)."""
        buf = self._buf
        n = _HEADER.unpack_from(buf, 0)[0]
        _HEADER.pack_into(buf, 0, n + 1)
        self.inherited = 0
        self.inherited_until = None
        if not n:
            return 0
        # A plain loop over the slots (a few ms for 2**18 of them, once per restart).
        live, rel, plain = self._live, self._released, self._plain
        for h in [h for h, count in enumerate(live) if count]:
            if live[h] > 0:
                if rel[h] < now:
                    rel[h] = now
                if plain[h] < now:
                    plain[h] = now
            live[h] = 0
        horizon = now - time_wait_s
        carried = sum(1 for r in rel if r != 0.0 and r >= horizon)
        self.inherited = carried
        self.inherited_until = now + time_wait_s if carried else None
        return carried

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        self._live.release()
        self._released.release()
        self._plain.release()
        self._buf.release()
        self._map.close()
