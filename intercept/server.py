"""intercept-mp's event loop: the compat server for tcpcopy connections + the capture sources.

Theory of operation
-------------------
One process, one ``selectors`` loop, nothing blocks (design §3; C uses one epoll loop, spec
§2.3).  The loop watches:

* the listening socket (``-b``/``-p``, spec §1.1) and every accepted tcpcopy connection
  (a ``Channel``): bytes in go through ``ClientStreamDecoder``; each CLIENT_ADD becomes a
  route (``Router.add_route``) and the SYN/RST records that were waiting for it are queued
  to that channel straight away (spec §1.5);
* the packet sources (NFQUEUE or pcap, ``PacketSource``): every captured response is turned
  into a 64-byte record (spec §1.3), routed, and queued to its channel;
* a self-pipe for signals (SIGTERM/SIGINT stop the loop; the handlers only set a flag).

Batching (spec §2.4).  C keeps one aggregation buffer per fd, flushes it from a 2 ms timer
or when it holds ``cur_combined_num`` records, and adapts that threshold so that records of
one loop pass travel together.  We get the same effect more directly: records queued during
a loop pass wait in the channel's ``pending`` buffer; a full one (``combine`` records, at most
COMB_MAX = 16) becomes a frame at once (C's NUM_DRIVEN), and whatever is left becomes a
frame at the end of the pass.  So a record never waits longer than the pass that produced it
(well under C's 2 ms), frames are as large as the burst allows, and no timer or adaptive
threshold is needed; ``-n`` only caps the frame size.

The compiled response path (``--engine``, intercept/fastroute.py) hands a whole NFQUEUE read
batch in already encoded and routed (``receive_response_batch``): per connection, its
records are queued frame by frame (``_queue_records``) with the same bound, framing and
counters as record by record.

Slow peers.  Frames go into the channel's output buffer and are written with non-blocking
``send``; what the kernel does not take waits for EVENT_WRITE.  The buffer is bounded
(``OUT_BUFFER_MAX_BYTES``): records for a channel whose buffer is full are dropped and
counted (``responses_dropped_slow``), so one stuck tcpcopy never blocks the loop or grows
memory without bound.  Frames are whole in the buffer, so dropping never breaks framing.
A read/write error or EOF closes the channel and forgets its routes.  intercept never sends
anything but frames (spec §1.1) to a compat peer.

Authentication (design §6, docs/protocol.md).  Every channel reads through
``wire.InterceptStreamDecoder``: a compat peer (the 14-byte version record) is served as C
does, unless a secret is configured and ``allow_compat`` is off; a peer opening with the
extended hello must answer our challenge with an HMAC of the shared secret, and gets our own
proof back.  A refused peer gets the refusal code (extended) or nothing (compat), then we
shut our side and wait at most REFUSAL_LINGER_S for its EOF, reading and dropping its bytes,
so the refusal is not lost to a RST.  A channel that has not finished its handshake within
HANDSHAKE_TIMEOUT_S is closed, so an idle unauthenticated peer cannot hold a slot.  No record
of a channel is acted on before its handshake succeeded.  Refusals are counted and logged at
most once per peer address per AUTH_LOG_INTERVAL_S.

Garbage from an accepted peer.  A record of an unknown type is counted
(``client_records_bad``) and logged at most once per peer address per
AUTH_LOG_INTERVAL_S, the line saying how many were not logged since: without a secret any
peer can connect, and one line per bad record let a peer fill the target's disk.  A
connection that sent BAD_RECORDS_MAX bad records is closed and counted
(``channels_closed_bad_records``): a tcpcopy that speaks another protocol version has no use
for it either, and its routes are forgotten with it.  Bytes that do not frame at all
(``DecodeError``) close the connection at once, as before.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from engine.codec import wire
from engine.codec.packet import ip_to_str
from engine.codec.wire import OUT_BUFFER_MAX_BYTES
from engine.errors import DecodeError
from engine.io.logs import RateLimiter
from engine.io.sigloop import SignalPipe
from intercept.router import Router

__all__ = [
    "DEFAULT_PORT",
    "OUT_BUFFER_MAX_BYTES",
    "STATS_INTERVAL_S",
    "Channel",
    "InterceptServer",
    "PacketSource",
    "new_counters",
]

log = logging.getLogger("intercept.server")

NOTICE = 25  # C's [notice]; the stats and start-up lines use it
logging.addLevelName(NOTICE, "NOTICE")

DEFAULT_PORT = 36524  # SERVER_PORT (spec §1.1)
LISTEN_BACKLOG = 128  # C uses 5; a burst of -C connections from many workers needs more
RECV_CHUNK_BYTES = 65536
#: Per-channel output bound: ~64 k records (~4 s of a busy target) before we drop.
STATS_INTERVAL_S = 30.0  # OUTPUT_INTERVAL (spec §2.3)
EXPIRE_INTERVAL_S = 1.0  # how often the delay table drops lists older than 30 s
POLL_MAX_S = 0.5  # C's poll fallback (spec §2.3)
HANDSHAKE_TIMEOUT_S = 5.0  # ours: C waits forever for the version record
REFUSAL_LINGER_S = 1.0  # after a refusal: how long we wait for the peer's EOF
AUTH_LOG_INTERVAL_S = 60.0  # refusals are logged once per peer address per interval
BAD_RECORDS_MAX = 100
"""Records of an unknown type one connection may send before it is closed (module
docstring, "Garbage from an accepted peer")."""
_SYN_RST = 0x02 | 0x04
_RECORD_BYTES = wire.RESPONSE_RECORD_BYTES  # intercept sends 64-byte records only
_RECORD_FLAGS_OFFSET = 20 + 13  # TCP is at offset 20 in a record (spec §1.3)


def new_counters() -> dict[str, int]:
    """The counter dict (exported to Prometheus elsewhere; names are stable)."""
    return {
        "packets_captured": 0,  # every packet a source handed in (C "all")
        "packets_invalid": 0,  # not IPv4/TCP or a broken header (spec §2.2 steps 3-4)
        "responses_total": 0,  # valid responses (C "total resp packs")
        "responses_forwarded": 0,  # records queued to a channel
        "responses_unrouted": 0,  # no route and not SYN/RST: dropped
        "responses_delayed": 0,  # no route yet, SYN/RST: kept for a CLIENT_ADD
        "responses_delayed_flushed": 0,  # delayed records sent after their CLIENT_ADD
        "responses_dropped_slow": 0,  # channel's output buffer full
        "pass_accepted": 0,  # NFQUEUE: daddr in -x, ACCEPTed and not routed
        "docker_rewritten": 0,  # -D daddr rewrites
        "frames_sent": 0,  # frames handed to a channel (C "sock write cnt")
        "records_sent": 0,
        "bytes_sent": 0,  # bytes the kernel accepted on channels
        "routes_added": 0,  # CLIENT_ADD records (C "route")
        "client_records": 0,  # every 14-byte record after the handshake
        "channels_connected": 0,  # gauge
        "channels_accepted": 0,
        "channels_closed": 0,
        "channels_old_client": 0,  # first record from a pre-version tcpcopy: closed
        "auth_ok": 0,  # extended peers that proved the secret
        "auth_refused": 0,  # extended peers refused (wrong secret, none here, malformed)
        "compat_accepted": 0,  # compat (C-format) peers served
        "compat_refused": 0,  # compat peers refused: a secret is set, no --allow-compat
        "handshake_timeouts": 0,  # no complete handshake within HANDSHAKE_TIMEOUT_S
        "client_records_bad": 0,  # records of an unknown type (rate-limited warning per peer)
        "channels_closed_bad_records": 0,  # closed after BAD_RECORDS_MAX bad records
        "queue_dropped": 0,  # NFQUEUE: kernel queue_dropped + user_dropped (/proc)
        "queue_overruns": 0,  # NFQUEUE: ENOBUFS episodes on the netlink socket
        "capture_dropped": 0,  # pcap: reader thread backlog full
    }


class ResponseBatch(Protocol):
    """What ``receive_response_batch`` reads of engine.dataplane.responses.ResponseTable."""

    packets: int
    invalid: int
    routed: int
    unrouted: int
    delayed_count: int
    docker_rewritten: int

    def take_slots(self) -> list[tuple[int, bytes]]: ...

    def take_delayed(self) -> bytes: ...


class PacketSource(Protocol):
    """A capture source the loop polls (nfqueue.NfqueueSource, pcap.PcapSource)."""

    name: str

    def fileno(self) -> int:
        """The fd that becomes readable when packets wait."""
        ...

    def on_readable(self, now: float) -> None:
        """Handle a bounded batch of packets (call ``server.receive_ip_packet`` for each)."""
        ...

    @property
    def has_backlog(self) -> bool:
        """True when the last batch stopped at its bound with packets still waiting."""
        ...

    def poll_stats(self) -> None:
        """Refresh source counters (e.g. kernel queue drops) before a stats line."""
        ...

    def close(self) -> None: ...


class Channel:
    """One accepted tcpcopy connection."""

    __slots__ = (
        "sock",
        "fd",
        "peer",
        "decoder",
        "outbuf",
        "pending",
        "want_write",
        "closed",
        "version_checked",
        "opened",
        "refused",
        "deadline",
        "bad_records",
    )

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        decoder: wire.InterceptStreamDecoder | None = None,
        deadline: float | None = None,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.decoder = decoder or wire.InterceptStreamDecoder(None, bytes(wire.EXT_NONCE_BYTES))
        self.outbuf = bytearray()
        self.pending = bytearray()  # this pass's records, back to back (< combine of them)
        self.want_write = False
        self.closed = False
        self.version_checked = False
        self.opened = False  # handshake done: records are acted on
        self.refused = False  # refused: our side is shut, waiting for the peer's EOF
        self.deadline = deadline  # handshake (or refusal linger) deadline; None when open
        self.bad_records = 0  # records of an unknown type (BAD_RECORDS_MAX closes it)

    @property
    def host(self) -> str:
        return self.peer.rpartition(":")[0] or self.peer

    def __repr__(self) -> str:
        return f"Channel({self.peer}, fd={self.fd})"


class InterceptServer:
    """The loop; see the module docstring.  Not thread-safe: everything runs in ``run``."""

    def __init__(
        self,
        router: Router | None = None,
        *,
        bind_ip: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        combine: int = wire.COMB_MAX,
        docker_map: tuple[int, int] | None = None,
        stats_interval_s: float = STATS_INTERVAL_S,
        out_buffer_max_bytes: int = OUT_BUFFER_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
        secret: bytes | None = None,
        allow_compat: bool = False,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        nonce_source: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.router = router if router is not None else Router()
        self.bind_ip = bind_ip
        self.port = port
        # -n caps the frame size; C accepts 0 <= n < 16 (spec §2.4); 0 would mean "send
        # every record alone", which is what 1 does.
        self.combine = max(1, min(combine, wire.COMB_MAX))
        self._docker_from = docker_map[0].to_bytes(4, "big") if docker_map else None
        self._docker_to = docker_map[1].to_bytes(4, "big") if docker_map else None
        self.stats_interval_s = stats_interval_s
        self.out_buffer_max_bytes = out_buffer_max_bytes
        self.clock = clock
        # design §6: with a secret, peers must authenticate (compat ones only if allowed).
        self.secret = secret or None
        self.allow_compat = allow_compat
        self.handshake_timeout_s = handshake_timeout_s
        self.nonce_source = nonce_source
        self._auth_log = RateLimiter(AUTH_LOG_INTERVAL_S)
        self.counters = new_counters()
        self.channels: dict[int, Channel] = {}
        self.sources: list[PacketSource] = []
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._dirty: dict[Channel, None] = {}  # channels with pending records this pass
        self._stop_reason: str | None = None
        self._signals = SignalPipe((signal.SIGTERM, signal.SIGINT), self._on_signal)

    # --- set-up ------------------------------------------------------------------------------

    def listen(self) -> tuple[str, int]:
        """Open the listening socket (raises OSError); returns the bound address."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # spec §1.1
            sock.bind((self.bind_ip, self.port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self._sel.register(sock, selectors.EVENT_READ, self._on_accept)
        return sock.getsockname()

    def add_source(self, source: PacketSource) -> None:
        self.sources.append(source)
        self._sel.register(source.fileno(), selectors.EVENT_READ, source)

    def request_stop(self, reason: str = "stop requested") -> None:
        """Make ``run`` return after the current pass (safe from a signal handler)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._signals.wake()

    # --- captured responses (spec §2.2) ------------------------------------------------------

    def receive_ip_packet(self, packet: bytes, now: float) -> None:
        """One captured response, starting at its IPv4 header (maybe cut by the snaplen)."""
        c = self.counters
        c["packets_captured"] += 1
        if self._docker_from is not None and packet[16:20] == self._docker_from:
            # -D A-B (spec §2.2 step 6): daddr rewritten before routing, visible in the
            # record; the checksum is not fixed (tcpcopy never checks it).
            packet = packet[:16] + self._docker_to + packet[20:]
            c["docker_rewritten"] += 1
        try:
            record = wire.encode_response_record(packet)
        except DecodeError:
            c["packets_invalid"] += 1
            return
        c["responses_total"] += 1
        conn = self.router.route(record, now)
        if conn is None:
            if record[_RECORD_FLAGS_OFFSET] & _SYN_RST:
                c["responses_delayed"] += 1
            else:
                # C logs "fd is null after session is created" per packet; at debug level
                # here because a busy target would flood the log (the counter tells).
                c["responses_unrouted"] += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("fd is null after session is created: %s", _describe(record))
            return
        self._queue_record(conn, record)

    def receive_ip_packets(self, packets: Iterable[bytes], now: float) -> None:
        """``receive_ip_packet`` for a source's read batch: same routing and counters, the
        counters updated once per batch and the queueing inlined (the per-response cost
        is the record encode and the route lookup)."""
        c = self.counters
        encode, route = wire.encode_response_record, self.router.route
        docker_from, docker_to = self._docker_from, self._docker_to
        out_max, dirty = self.out_buffer_max_bytes, self._dirty
        combine_bytes = self.combine * _RECORD_BYTES
        debug = log.isEnabledFor(logging.DEBUG)
        n = invalid = delayed = unrouted = slow = forwarded = 0
        for packet in packets:
            n += 1
            if docker_from is not None and packet[16:20] == docker_from:
                packet = packet[:16] + docker_to + packet[20:]  # type: ignore[operator]
                c["docker_rewritten"] += 1
            try:
                record = encode(packet)
            except DecodeError:
                invalid += 1
                continue
            ch = route(record, now)
            if ch is None:
                if record[_RECORD_FLAGS_OFFSET] & _SYN_RST:
                    delayed += 1
                else:
                    unrouted += 1
                    if debug:
                        log.debug("fd is null after session is created: %s", _describe(record))
                continue
            if ch.closed:
                unrouted += 1
                continue
            pending = ch.pending
            if len(ch.outbuf) + len(pending) + len(record) > out_max:
                slow += 1
                continue
            pending += record
            forwarded += 1
            if len(pending) >= combine_bytes:
                self._frame_pending(ch)  # NUM_DRIVEN (spec §2.4)
            dirty[ch] = None
        self._count_batch(n, invalid, forwarded, delayed, unrouted, slow)

    def _count_batch(
        self, n: int, invalid: int, forwarded: int, delayed: int, unrouted: int, slow: int
    ) -> None:
        """A read batch's counters, once per batch (both response paths)."""
        c = self.counters
        c["packets_captured"] += n
        c["responses_total"] += n - invalid
        c["responses_forwarded"] += forwarded
        if invalid:
            c["packets_invalid"] += invalid
        if delayed:
            c["responses_delayed"] += delayed
        if unrouted:
            c["responses_unrouted"] += unrouted
        if slow:
            c["responses_dropped_slow"] += slow

    def _queue_record(self, ch: Channel, record: bytes) -> None:
        c = self.counters
        if ch.closed:
            c["responses_unrouted"] += 1
            return
        pending = ch.pending
        if len(ch.outbuf) + len(pending) + len(record) > self.out_buffer_max_bytes:
            c["responses_dropped_slow"] += 1
            return
        pending += record
        c["responses_forwarded"] += 1
        if len(pending) >= self.combine * _RECORD_BYTES:
            self._frame_pending(ch)  # NUM_DRIVEN (spec §2.4)
        self._dirty[ch] = None

    def receive_response_batch(self, table: ResponseBatch, now: float) -> None:
        """``receive_ip_packets`` for a batch the compiled response path
        (engine/dataplane/responses, intercept/fastroute.py) has already parsed, encoded and
        routed: the same counters, router stats and channel bytes, with Python per channel
        and per frame instead of per record."""
        c = self.counters
        router = self.router
        n = table.packets
        invalid = table.invalid
        rstats = router.stats
        if table.routed:
            rstats["routed"] += table.routed
        unrouted = table.unrouted
        if unrouted:
            rstats["unrouted"] += unrouted
        forwarded = slow = 0
        conn_at = router.conn_at  # type: ignore[attr-defined]
        dirty = self._dirty
        for slot, records in table.take_slots():
            ch = conn_at[slot]
            count = len(records) // _RECORD_BYTES
            if ch.closed:
                unrouted += count
                continue
            queued = self._queue_records(ch, records)
            if queued:
                forwarded += queued
                dirty[ch] = None
            slow += count - queued
        delayed = table.delayed_count
        if delayed:
            records = table.take_delayed()
            for i in range(0, len(records), _RECORD_BYTES):
                router.delay_record(records[i : i + _RECORD_BYTES], now)
        if table.docker_rewritten:
            c["docker_rewritten"] += table.docker_rewritten
        self._count_batch(n, invalid, forwarded, delayed, unrouted, slow)

    def _queue_records(self, ch: Channel, records: bytes) -> int:
        """Queue 64-byte records (back to back) to an open channel as that many
        ``_queue_record`` calls would, frame by frame; returns how many were queued (the
        rest are dropped as slow).  Once one is dropped, so is every later one: nothing
        leaves ``pending`` for ``outbuf`` before ``combine`` records are pending."""
        pending = ch.pending
        out_max = self.out_buffer_max_bytes
        combine_bytes = self.combine * _RECORD_BYTES
        size = len(records)
        pos = 0
        while pos < size:
            take = min(combine_bytes - len(pending), size - pos)
            # the j-th record of this run fits while outbuf + pending + j records <= out_max
            room = (out_max - len(ch.outbuf) - len(pending)) // _RECORD_BYTES * _RECORD_BYTES
            if room < take:
                if room > 0:
                    pending += records[pos : pos + room]
                    pos += room
                break
            pending += records[pos : pos + take]
            pos += take
            if len(pending) >= combine_bytes:
                self._frame_pending(ch)  # NUM_DRIVEN (spec §2.4)
        return pos // _RECORD_BYTES

    def _frame_pending(self, ch: Channel) -> None:
        pending = ch.pending
        step = self.combine * _RECORD_BYTES
        size = len(pending)
        count_of = wire.FRAME_COUNT.pack
        frames = 0
        for i in range(0, size, step):
            chunk = pending[i : i + step]
            ch.outbuf += count_of(len(chunk) // _RECORD_BYTES)
            ch.outbuf += chunk
            frames += 1
        self.counters["frames_sent"] += frames
        self.counters["records_sent"] += size // _RECORD_BYTES
        pending.clear()

    def _flush(self) -> None:
        """End of a loop pass: frame what is pending and write what the kernel takes."""
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = {}
        for ch in dirty:
            if ch.closed:
                continue
            if ch.pending:
                self._frame_pending(ch)  # TIME_DRIVEN, at the end of the pass
            if ch.outbuf and not ch.want_write:
                self._write(ch)

    def _write(self, ch: Channel) -> None:
        try:
            sent = ch.sock.send(ch.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            self._close_channel(ch, f"send error: {e.strerror or e}")
            return
        if sent:
            del ch.outbuf[:sent]
            self.counters["bytes_sent"] += sent
        want = bool(ch.outbuf)
        if want != ch.want_write:
            ch.want_write = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self._sel.modify(ch.sock, events, ch)

    # --- tcpcopy connections (spec §1.1, §1.2, §1.7) -----------------------------------------

    def _on_accept(self, mask: int, now: float) -> None:
        assert self._listener is not None
        for _ in range(64):  # bounded: a connection storm must not starve the loop
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE and friends: log and let the loop go on; the peer will retry.
                log.error("accept failed: %s", e.strerror or e)
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # spec §1.1
            self.attach_channel(sock, f"{addr[0]}:{addr[1]}")

    def attach_channel(self, sock: socket.socket, peer: str) -> Channel:
        """Serve an already connected stream socket as a tcpcopy connection (accept path;
        tests hand in one end of a socketpair)."""
        sock.setblocking(False)
        decoder = wire.InterceptStreamDecoder(
            self.secret, self.nonce_source(wire.EXT_NONCE_BYTES), self.allow_compat
        )
        ch = Channel(sock, peer, decoder, self.clock() + self.handshake_timeout_s)
        self.channels[ch.fd] = ch
        self._sel.register(sock, selectors.EVENT_READ, ch)
        self.counters["channels_accepted"] += 1
        self.counters["channels_connected"] = len(self.channels)
        log.info("tcpcopy connected from %s (fd %d)", ch.peer, ch.fd)
        return ch

    def _on_channel(self, ch: Channel, mask: int, now: float) -> None:
        if mask & selectors.EVENT_WRITE:
            self._write(ch)
            if ch.closed:
                return
        if not mask & selectors.EVENT_READ:
            return
        try:
            data = ch.sock.recv(RECV_CHUNK_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._close_channel(ch, f"recv error: {e.strerror or e}")
            return
        if not data:
            self._close_channel(ch, "closed by peer")
            return
        if ch.refused:
            return  # read and dropped until the peer's EOF (or REFUSAL_LINGER_S)
        try:
            records = ch.decoder.feed(data)
        except DecodeError as e:
            if not ch.decoder.handshake_done:
                self.counters["channels_old_client"] += 1
                log.error("client too old for intercept: %s", ch.peer)
            self._close_channel(ch, str(e))
            return
        if not ch.opened:
            self._handshake_progress(ch, now)
            if not ch.opened:
                return
        if not ch.version_checked and ch.decoder.version is not None:
            ch.version_checked = True
            if ch.decoder.version != wire.INTERNAL_VERSION:
                # Spec §1.2 step 3: no hard version check, only a warning.
                log.warning(
                    "not compatible,client:%d,intercept:%d (%s)",
                    ch.decoder.version,
                    wire.INTERNAL_VERSION,
                    ch.peer,
                )
        if records:
            self._receive_client_records(ch, records, now)

    def _handshake_progress(self, ch: Channel, now: float) -> None:
        """After a feed before the channel opened: send what the handshake wants sent, and
        note a success or a refusal (design §6)."""
        dec = ch.decoder
        out = dec.take_output()
        c = self.counters
        if dec.refused is not None:
            if dec.mode == "compat":
                c["compat_refused"] += 1
                self._log_peer(ch, "refused", logging.WARNING,
                               "refused compat (unauthenticated) tcpcopy %s: a secret is set "
                               "and --allow-compat is not", ch.peer)  # fmt: skip
            else:
                c["auth_refused"] += 1
                self._log_peer(ch, "refused", logging.WARNING, "refused tcpcopy %s: %s",
                               ch.peer, dec.refused)  # fmt: skip
            self._refuse(ch, out, now)
            return
        if out:
            ch.outbuf += out  # CHALLENGE or ACCEPT: always before any frame
            self._write(ch)
            if ch.closed:
                return
        if not dec.handshake_done:
            return
        ch.opened = True
        ch.deadline = None
        if dec.mode == "extended":
            c["auth_ok"] += 1
            log.info("tcpcopy %s authenticated (extended protocol %d)", ch.peer, wire.EXT_VERSION)
        else:
            c["compat_accepted"] += 1
            if self.secret is not None:
                self._log_peer(
                    ch,
                    "compat",
                    logging.WARNING,
                    "unauthenticated compat tcpcopy accepted from %s (--allow-compat)",
                    ch.peer,
                )

    def _log_peer(self, ch: Channel, kind: str, level: int, msg: str, *args: object) -> None:
        """One line per peer address and kind per AUTH_LOG_INTERVAL_S (a refused peer that
        retries every second must not flood the log)."""
        allowed, suppressed = self._auth_log.allow((ch.host, kind), self.clock())
        if allowed:
            if suppressed:
                msg += f" ({suppressed} more from {ch.host} not logged)"
            log.log(level, msg, *args)

    def _refuse(self, ch: Channel, refusal: bytes, now: float) -> None:
        """Send the refusal (if any), shut our side, and wait a little for the peer's EOF:
        closing with its bytes unread would send a RST that can destroy the refusal."""
        ch.refused = True
        ch.pending.clear()
        ch.outbuf.clear()
        ch.deadline = now + REFUSAL_LINGER_S
        try:
            if refusal:
                ch.sock.send(refusal)  # 40 bytes into an empty socket buffer
            ch.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self._close_channel(ch, f"refused ({e.strerror or e})")

    def _expire_handshakes(self, now: float) -> None:
        """Close channels whose handshake (or refusal linger) deadline passed."""
        for ch in list(self.channels.values()):
            if ch.deadline is None or ch.deadline > now or ch.closed:
                continue
            if ch.refused:
                self._close_channel(ch, "refused")
                continue
            self.counters["handshake_timeouts"] += 1
            self._log_peer(
                ch,
                "timeout",
                logging.WARNING,
                "tcpcopy %s sent no complete handshake within %.0f s: closed",
                ch.peer,
                self.handshake_timeout_s,
            )
            self._close_channel(ch, "handshake timeout")

    def _receive_client_records(
        self, ch: Channel, records: list[wire.ClientRecord], now: float
    ) -> None:
        c = self.counters
        c["client_records"] += len(records)
        for rec in records:
            if rec.type == wire.TYPE_CLIENT_ADD:
                c["routes_added"] += 1
                delayed = self.router.add_route(
                    rec.client_ip, rec.client_port, rec.target_ip, rec.target_port, ch, now
                )
                for record in delayed:
                    c["responses_delayed_flushed"] += 1
                    self._queue_record(ch, record)
            elif rec.type == wire.TYPE_CLIENT_DEL:
                log.debug(
                    "CLIENT_DEL %s:%d from %s", ip_to_str(rec.client_ip), rec.client_port, ch.peer
                )
            else:
                c["client_records_bad"] += 1
                ch.bad_records += 1
                self._log_peer(ch, "bad_record", logging.WARNING,
                               "unknown msg type:%u from %s", rec.type, ch.peer)  # fmt: skip
                if ch.bad_records >= BAD_RECORDS_MAX:
                    c["channels_closed_bad_records"] += 1
                    self._log_peer(ch, "bad_close", logging.WARNING,
                                   "tcpcopy connection %s sent %d records of an unknown type: "
                                   "closed (channels_closed_bad_records)",
                                   ch.peer, ch.bad_records)  # fmt: skip
                    self._close_channel(ch, f"{ch.bad_records} bad records")
                    return

    def _close_channel(self, ch: Channel, why: str) -> None:
        if ch.closed:
            return
        ch.closed = True
        try:
            self._sel.unregister(ch.sock)
        except (KeyError, ValueError):
            pass
        ch.sock.close()
        self.channels.pop(ch.fd, None)
        self._dirty.pop(ch, None)
        routes = self.router.remove_connection(ch)
        ch.pending.clear()
        ch.outbuf.clear()
        self.counters["channels_closed"] += 1
        self.counters["channels_connected"] = len(self.channels)
        log.info("tcpcopy connection %s closed (%s); %d routes forgotten", ch.peer, why, routes)

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> str:
        """Serve until ``request_stop`` or SIGTERM/SIGINT; returns the stop reason."""
        wake = self._signals.install()
        self._sel.register(wake, selectors.EVENT_READ, self._on_wake)
        clock = self.clock
        now = clock()
        next_stats = now + self.stats_interval_s
        next_expire = now + EXPIRE_INTERVAL_S
        try:
            while self._stop_reason is None:
                if any(src.has_backlog for src in self.sources):
                    timeout = 0.0
                else:
                    timeout = min(next_stats, next_expire) - now
                    timeout = min(max(timeout, 0.0), POLL_MAX_S)
                events = self._sel.select(timeout)
                now = clock()
                for key, mask in events:
                    data = key.data
                    if isinstance(data, Channel):
                        if not data.closed:
                            self._on_channel(data, mask, now)
                    elif callable(data):
                        data(mask, now)
                    else:
                        data.on_readable(now)
                for src in self.sources:
                    if src.has_backlog:
                        src.on_readable(now)
                self._flush()
                if now >= next_expire:
                    self.router.expire(now)
                    self._expire_handshakes(now)
                    next_expire = now + EXPIRE_INTERVAL_S
                if now >= next_stats:
                    self.log_stats()
                    next_stats = now + self.stats_interval_s
        finally:
            self._sel.unregister(wake)
            self._signals.close(restore_handlers=True)
        return self._stop_reason or "stopped"

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop_reason = f"signal {signal.Signals(signum).name}"

    def _on_wake(self, mask: int, now: float) -> None:
        self._signals.drain()

    # --- stats and shutdown ------------------------------------------------------------------

    def stats_line(self) -> str:
        """The C stats line (spec §2.5 names) plus ours."""
        c = self.counters
        return (
            f"total resp packs:{c['responses_total']}, all:{c['packets_captured']}, "
            f"route:{c['routes_added']}, sock write cnt:{c['frames_sent']}, "
            f"unrouted:{c['responses_unrouted']}, delayed:{c['responses_delayed']}, "
            f"forwarded:{c['responses_forwarded']}, dropped slow:{c['responses_dropped_slow']}, "
            f"pass:{c['pass_accepted']}, queue dropped:{c['queue_dropped']}, "
            f"channels:{c['channels_connected']}"
            + (
                f", auth ok:{c['auth_ok']}, auth refused:{c['auth_refused']}, "
                f"compat refused:{c['compat_refused']}"
                if self.secret is not None
                else ""
            )
        )

    def log_stats(self) -> None:
        for src in self.sources:
            try:
                src.poll_stats()
            except OSError:
                pass
        log.log(NOTICE, self.stats_line(), extra={"stats": dict(self.counters)})

    def log_final_stats(self) -> None:
        self.log_stats()
        r = self.router
        log.log(
            NOTICE,
            "route table: routes:%d, adds:%d, routed:%d, unrouted:%d; delay table: "
            "delayed:%d, flushed:%d, expired:%d, dropped:%d, waiting:%d",
            len(r),
            r.stats.get("adds", 0),
            r.stats.get("routed", 0),
            r.stats.get("unrouted", 0),
            r.stats.get("delayed", 0),
            r.stats.get("delayed_flushed", 0),
            r.stats.get("delayed_expired", 0),
            r.stats.get("delayed_dropped", 0),
            r.delayed_records,
            extra={"router": dict(r.stats)},
        )

    def close(self) -> None:
        """Close every socket and source (idempotent); a last flush of complete frames."""
        self._flush()
        for ch in list(self.channels.values()):
            if ch.outbuf:
                try:
                    ch.sock.send(ch.outbuf)  # best effort, non-blocking
                except OSError:
                    pass
            self._close_channel(ch, "intercept-mp stopping")
        for src in self.sources:
            try:
                self._sel.unregister(src.fileno())
            except (KeyError, ValueError, OSError):
                pass
            src.close()
        self.sources = []
        if self._listener is not None:
            try:
                self._sel.unregister(self._listener)
            except (KeyError, ValueError):
                pass
            self._listener.close()
        self._listener = None
        self._signals.close(restore_handlers=True)
        self._sel.close()


def _describe(record: bytes) -> str:
    try:
        pkt = wire.decode_response_record(record)
    except DecodeError:
        return "undecodable record"
    return (
        f"{ip_to_str(pkt.src)}:{pkt.sport} -> {ip_to_str(pkt.dst)}:{pkt.dport} flags {pkt.flags:#x}"
    )
