"""The worker's batch interface to a session table, and the Python engine's side of it.

Theory of operation
-------------------
The worker talks to its session table in batches only: one call per capture batch, per
intercept read and per drain.  The compiled engine (``engine.dataplane.engine.Table``)
implements these calls in C over the buffers it is handed; the Python engine
(``engine.core.table.SessionTable``) has only the per-packet contract, so ``PyBatchTable``
wraps it and loops over the per-packet calls.  That loop is the specification of each batch
call: the compiled table must have the same effect as it (same packets out, same counters).

    receive_client_ips(buf, offsets, lengths, n, now) -> int
        ``n`` captured IPv4 packets, packet ``i`` at ``buf[offsets[i]:offsets[i] +
        lengths[i]]``; returns how many did not parse (bounds included: a packet reaching
        past ``buf`` does not parse).  The worker counts them (``capture_parse_errors``).
    receive_ring(mem, capacity, pos, nbytes, now) -> int
        The packets of a shared-memory ring (engine/io/ring.py), read where they lie:
        ``mem`` is the ring's record area of ``capacity`` bytes, and the records from byte
        ``pos`` over ``nbytes`` bytes (``Ring.peek_records``) are ``[length u32 | flags u32
        | timestamp f64 | data | pad to 8]`` (native byte order), with a wrap mark where one
        did not fit before the end (``ring.record_step`` walks them).  A header that does
        not fit the area or the bytes ends the walk and counts as one packet that did not
        parse.  Returns how many did not parse.
    receive_records(buf, now, record_bytes=64) -> int
        Intercept response records back to back (frame counts already removed: wire.py
        FrameDecoder.feed_records); decodes ``len(buf) // record_bytes`` of them in place
        and returns the bytes consumed.  A record that does not decode is skipped and
        counted in the table's ``response_decode_errors``.
    drain_into(sendbuf) -> (routes, n)
        ``drain()``'s routes, and its packets written back to back from ``sendbuf.data[0]``
        with their lengths in ``sendbuf.lengths[:n]``.  What does not fit (bytes or count)
        stays queued: the caller calls again until ``n`` is 0 (routes come with the first
        call that has them, always before the packets they announce).

Optional: ``frame_reader(record_bytes, combined)`` -> a reader of one intercept connection's
reads (engine/io/channel.py ``FrameReader``): ``feed(buf, n, now)`` walks the frames of
``buf[:n]`` and feeds their records to the table in one call; its specification is
channel.py ``RecordFeed`` (wire.FrameDecoder.feed_records, then ``receive_records``).

Everything else (``counters``, ``active``, timers, ``live_routes`` ...) is the table's own.
"""

from __future__ import annotations

import mmap
from array import array
from collections.abc import Sequence
from typing import Any

from engine.codec import packet, wire
from engine.errors import DecodeError
from engine.io.ring import RECORD_WRAP, record_step

__all__ = ["BATCH_CALLS", "PyBatchTable", "SendBuffer", "as_batch"]

BATCH_CALLS = ("receive_client_ips", "receive_ring", "receive_records", "drain_into")
"""What a table must offer to be driven without an adapter."""


SEND_BUFFER_BYTES = 4 << 20
SEND_BUFFER_PACKETS = 4096


class SendBuffer:
    """Where a drain writes its packets: ``data`` (bytes back to back from offset 0) and
    ``lengths`` (one u32 per packet), preallocated once per worker and reused.

    ``data`` is a private anonymous mapping, not a bytearray (which zero-fills, so every
    page of it is memory from the start): a page is memory once a drain has written that
    far, and most drains write a few hundred KiB at most of the 4 MiB."""

    __slots__ = ("data", "lengths", "view")

    def __init__(
        self, nbytes: int = SEND_BUFFER_BYTES, max_packets: int = SEND_BUFFER_PACKETS
    ) -> None:
        if nbytes < 65535 or max_packets < 1:
            raise ValueError(f"send buffer too small: {nbytes} bytes, {max_packets} packets")
        self.data = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
        self.lengths = array("I", bytes(4 * max_packets))
        self.view = memoryview(self.data)

    def packets(self, n: int) -> list[bytes]:
        """The first ``n`` packets as bytes (tests and the paths without a buffer send)."""
        out, off, view = [], 0, self.view
        for length in self.lengths[:n]:
            out.append(bytes(view[off : off + length]))
            off += length
        return out


class PyBatchTable:
    """The batch calls over a table that has only the per-packet contract (module doc)."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self._pending: list[bytes] = []
        # A table whose ``counters`` is built on each access (the compiled one) takes no
        # increment: the records that did not decode are then kept here and added on read.
        self._live_counters = getattr(table, "counters", None) is getattr(table, "counters", 0)
        self._decode_errors = 0

    @property
    def counters(self) -> Any:
        counters = self.table.counters
        if self._decode_errors:
            counters["response_decode_errors"] += self._decode_errors
        return counters

    def __getattr__(self, name: str) -> Any:
        return getattr(self.table, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("table", "_pending", "_live_counters", "_decode_errors"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.table, name, value)

    def receive_client_ips(
        self, buf: Any, offsets: Sequence[int], lengths: Sequence[int], n: int, now: float
    ) -> int:
        view = memoryview(buf)
        size = len(view)
        receive, parse = self.table.receive_client, packet.parse_ip
        errors = 0
        for i in range(n):
            off, length = offsets[i], lengths[i]
            if off < 0 or length < 0 or off + length > size:
                errors += 1
                continue
            try:
                pkt = parse(bytes(view[off : off + length]))
            except DecodeError:
                errors += 1
                continue
            receive(pkt, now)
        return errors

    def receive_ring(self, mem: Any, capacity: int, pos: int, nbytes: int, now: float) -> int:
        view = memoryview(mem)
        if capacity < 8 or capacity > len(view) or not 0 <= pos < capacity:
            raise ValueError(f"bad ring geometry: {capacity} bytes from {pos}")
        receive, parse = self.table.receive_client, packet.parse_ip
        errors = used = 0
        while used < nbytes:
            step, start, length, _flags = record_step(view, capacity, pos + used, nbytes - used)
            if step < 0:
                errors += 1
                break
            used += step
            if length == RECORD_WRAP:
                continue
            try:
                pkt = parse(bytes(view[start : start + length]))
            except DecodeError:
                errors += 1
                continue
            receive(pkt, now)
        return errors

    def receive_records(
        self, buf: Any, now: float, record_bytes: int = wire.RESPONSE_RECORD_BYTES
    ) -> int:
        view = memoryview(buf)
        count = len(view) // record_bytes
        receive, decode = self.table.receive_response, wire.decode_response_record
        bad = 0
        for i in range(count):
            try:
                pkt = decode(bytes(view[i * record_bytes : (i + 1) * record_bytes]))
            except DecodeError:
                bad += 1
                continue
            receive(pkt, now)
        if bad:
            if self._live_counters:
                self.table.counters["response_decode_errors"] += bad
            else:
                self._decode_errors += bad
        return count * record_bytes

    def drain_into(self, sendbuf: SendBuffer) -> tuple[list[Any], int]:
        routes: list[Any] = []
        if not self._pending:
            routes, self._pending = self.table.drain()
        pending = self._pending
        data, lengths = sendbuf.view, sendbuf.lengths
        cap, max_n = len(data), len(lengths)
        off = n = 0
        for pkt in pending:
            size = len(pkt)
            if n == max_n or off + size > cap:
                break
            data[off : off + size] = pkt
            lengths[n] = size
            off += size
            n += 1
        self._pending = pending[n:] if n < len(pending) else []
        return routes, n


def as_batch(table: Any) -> Any:
    """``table`` itself when it has every batch call, else a PyBatchTable around it."""
    if all(hasattr(table, name) for name in BATCH_CALLS):
        return table
    return PyBatchTable(table)
