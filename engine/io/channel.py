"""The worker's connections to intercept-mp / C intercept (spec §1.1-§1.4, §1.7).

Theory of operation
-------------------
For every intercept in -s we keep -C TCP connections.  Each one walks

    IDLE --connect()--> CONNECTING --writable, SO_ERROR 0--> CONNECTED --EOF/error--> IDLE

and on reaching CONNECTED sends the 14-byte version handshake before anything else (§1.1).
Every CLIENT_ADD goes to *every* intercept that has a connected connection, on one of its
connections chosen round-robin (§1.2): intercept routes a flow's responses to the connection
that delivered its latest CLIENT_ADD, so which one we pick does not matter, spreading them
does.  Responses arrive as combined frames (`!H count` + 64-byte records, §1.4).  Each read
lands in one preallocated buffer and goes to the connection's frame reader in one call: by
default wire.py's FrameDecoder, whose complete records of the read go to ``on_records`` back
to back (the session table decodes them where they lie); a compiled table's
``frame_reader`` (engine/dataplane) walks the frames and the records in the read buffer
itself, with the same errors and counts.

Differences from C, on purpose (spec §1.7 QUIRKs):
* A lost or refused connection is retried with exponential backoff (0.5 s doubling to 10 s),
  always: C exits when every intercept is gone unless -L, and even with -L retries only every
  12 s.  -L is accepted for compatibility.
* Sends use MSG_NOSIGNAL: in C a CLIENT_ADD written to a connection the peer closed raises
  SIGPIPE, which shuts tcpcopy down.
* A start-up connect failure is not fatal (C exits); the worker logs it and we keep trying.
* Writes never block the loop: what the kernel does not take waits in a per-connection buffer;
  a buffer that grows past OUT_BUFFER_MAX_BYTES means the intercept is stuck, and the
  connection is dropped and re-made.

Authentication (design §6, docs/protocol.md).  With a secret (--secret-file) a connection
opens with the extended hello instead of the version record and walks
CONNECTING -> AUTHENTICATING -> CONNECTED: it is used (CLIENT_ADDs, frames) only once the
intercept answered our challenge response with its own valid proof, so both ends hold the
secret.  A refusal, a wrong proof, an answer that is not the protocol (a C intercept) or no
answer within AUTH_TIMEOUT_S is logged plainly and retried with the usual backoff; we never
fall back to the unauthenticated compat handshake, which would let anyone downgrade us.

Re-announcing (issue 10).  An intercept forgets the routes of a connection when it closes
(and a restarted intercept knows none), so the responses of every session that started before
would be unrouted until the session gave up.  Therefore, whenever a connection to an
intercept is made (again), and whenever one of its connections is lost while others stay up,
the intercept is due a re-announce: in the next ``handle_timer`` the worker's live routes
(``live_routes()``) are sent to it as CLIENT_ADD records, spread over its connected
connections, one write per connection, counted in ``sessions_reannounced``.  C does not do
this (spec §1.7): its sessions stall until they time out.  ``on_route_down(down, now)`` is
told when some intercept that was connected has no connection left (down=True), and again
once every such intercept is connected and has been sent the routes (down=False): the
worker's sessions then suspend, and later resume, their retransmission limit.

Acknowledgements.  intercept sends small frames, one segment per loop pass, and we answer
with data only when a session starts (CLIENT_ADD).  Left to itself the kernel ACKs every read
that empties such a connection (quick-ACK mode), and that ACK's trip through intercept's TCP
stack runs in the worker and costs more than the read (in the offline keep-alive bench, 12 to
18 % of the worker's CPU).  So every read that got bytes sets TCP_QUICKACK to 0 again
(delayed-ACK mode ends at the next delayed-ACK timeout): the kernel then ACKs once two small
segments, or more than a segment's worth of bytes, came in since its last ACK, or when the
timer runs out, which keeps intercept's send window open just as well.  The compiled wait
(engine/dataplane/pump.pxi) does the same.

I/O is driven by the worker's selector: every socket is registered with a callback
`(mask, now)` as its selector key's data; timers (connect timeouts, reconnects) are exposed as
`get_timer()` / `handle_timer(now)`.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from engine.codec import wire
from engine.codec.wire import OUT_BUFFER_MAX_BYTES
from engine.errors import DecodeError
from engine.io.logs import LOGGER_NAME, RateLimiter

log = logging.getLogger(LOGGER_NAME)

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 10.0
BACKOFF_RESET_AFTER_S = 10.0
"""A connection that stayed up this long resets the backoff when it later fails."""
CONNECT_TIMEOUT_S = 3.0
"""A connect that has not completed by then is abandoned and retried (a silent peer would
otherwise hold it for the kernel's ~2 minutes of SYN retries)."""
READ_BYTES = 65536
READS_PER_EVENT_MAX = 64
CONNECT_FAIL_LOG_INTERVAL_S = 30.0
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 30, 10, 3
AUTH_TIMEOUT_S = 5.0
"""The extended handshake must complete within this (a C intercept never answers it)."""

IDLE, CONNECTING, AUTHENTICATING, CONNECTED = "idle", "connecting", "authenticating", "connected"

RecordsHandler = Callable[[bytes, float, int], int]
"""on_records(records, now, record_bytes) -> bytes consumed: the complete records of one read,
back to back (engine/io/batch.py ``receive_records``)."""


class FrameReader(Protocol):
    """A connection's reads in: ``feed(buf, n, now)`` takes ``buf[:n]`` and returns how many
    records it handed on; a bad frame raises ``DecodeError`` (then, and on every later
    feed: the connection is closed)."""

    def feed(self, buf: memoryview | bytes, n: int, now: float) -> int: ...


FrameReaderFactory = Callable[[int, bool], FrameReader]
"""frame_reader(record_bytes, combined) -> a new connection's FrameReader."""


class RecordFeed:
    """The default FrameReader: wire.FrameDecoder, then ``on_records`` with the complete
    records of the read (the specification of a compiled table's ``frame_reader``)."""

    __slots__ = ("decoder", "on_records", "record_bytes")

    def __init__(self, record_bytes: int, combined: bool, on_records: RecordsHandler) -> None:
        self.decoder = wire.FrameDecoder(record_bytes=record_bytes, combined=combined)
        self.on_records = on_records
        self.record_bytes = record_bytes

    def feed(self, buf: memoryview | bytes, n: int, now: float) -> int:
        records = self.decoder.feed_records(buf[:n])
        if not records:
            return 0
        self.on_records(records, now, self.record_bytes)
        return len(records) // self.record_bytes


class _Conn:
    """One TCP connection to one intercept (one of its -C slots)."""

    __slots__ = (
        "owner",
        "slot",
        "sock",
        "state",
        "out",
        "decoder",
        "handshake",
        "deadline",
        "backoff_s",
        "up_since",
        "registered_mask",
    )

    def __init__(self, owner: _Intercept, slot: int) -> None:
        self.owner = owner
        self.slot = slot
        self.sock: socket.socket | None = None
        self.state = IDLE
        self.out = bytearray()
        self.decoder: FrameReader | None = None
        self.handshake: wire.ExtendedClientHandshake | None = None  # AUTHENTICATING only
        # IDLE: reconnect time; CONNECTING: connect timeout; AUTHENTICATING: handshake timeout
        self.deadline: float | None = 0.0
        self.backoff_s = BACKOFF_MIN_S
        self.up_since: float | None = None
        self.registered_mask = 0


class _Intercept:
    def __init__(self, host: str, port: int, connections: int) -> None:
        self.host = host
        self.port = port
        self.conns = [_Conn(self, i) for i in range(connections)]
        self.rr = 0  # round-robin cursor for CLIENT_ADD (spec §1.2)
        self.was_connected = False
        self.reannounce_due = False

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    def connected(self) -> int:
        return sum(1 for c in self.conns if c.state == CONNECTED)


class InterceptChannels:
    """All connections of one worker to all intercepts.

    `on_records(records, now, record_bytes)` receives the complete response records of each
    read, back to back, in one call (it decodes them, and counts those that do not decode);
    with `frame_reader` (a compiled table's) each connection's reads go to a reader it makes
    instead (module docstring), and `on_records` is not called.

    counters: channel_connects, channel_disconnects, channel_connect_failures,
    channel_frame_errors, channel_overflows, route_announced, route_unannounced,
    route_records_sent, responses_received (records handed on), sessions_reannounced
    (CLIENT_ADD records sent again for live sessions, see "Re-announcing"); with a secret also
    channel_auth_ok, channel_auth_refused, channel_auth_bad_proof, channel_auth_failures
    (no answer in time, or not the extended protocol).

    `secret`: the --secret-file bytes (None = compat handshake, as C); `nonce_source(n)`
    returns n random bytes (tests may pin it).  `live_routes()` returns the routes of the
    worker's live sessions and `on_route_down(down, now)` follows the intercepts' reachability
    (module docstring, "Re-announcing"); both optional.
    """

    def __init__(
        self,
        intercepts: Sequence[tuple[str, int]],
        connections: int,
        selector: selectors.BaseSelector,
        on_records: RecordsHandler,
        *,
        record_bytes: int = 64,  # wire.RESPONSE_RECORD_BYTES (192 with payload)
        combined: bool = True,
        secret: bytes | None = None,
        nonce_source: Callable[[int], bytes] = os.urandom,
        live_routes: Callable[[], Iterable[object]] | None = None,
        on_route_down: Callable[[bool, float], None] | None = None,
        frame_reader: FrameReaderFactory | None = None,
    ) -> None:
        if not intercepts:
            raise ValueError("no intercept")
        self.intercepts = [_Intercept(h, p, max(1, connections)) for h, p in intercepts]
        self.selector = selector
        self.on_records = on_records
        self.record_bytes = record_bytes
        self.combined = combined
        self.secret = secret or None
        self.nonce_source = nonce_source
        self.counters: Counter[str] = Counter()
        self._fail_log = RateLimiter(CONNECT_FAIL_LOG_INTERVAL_S)
        self.live_routes = live_routes
        self.on_route_down = on_route_down
        self.frame_reader = frame_reader
        self.route_down = False
        self._work_at: float | None = None  # a re-announce (or the route-down check) is due
        # Every read lands here (a recv of READ_BYTES allocated and shrank a new bytes object
        # per read: a measurable share of a busy worker's time).
        self._read_view = memoryview(bytearray(READ_BYTES))

    # -- public -----------------------------------------------------------------------------

    @property
    def connected(self) -> int:
        """Number of connections (over all intercepts) that are up."""
        return sum(i.connected() for i in self.intercepts)

    def start(self, now: float) -> None:
        for icpt in self.intercepts:
            for conn in icpt.conns:
                self._connect(conn, now)

    def announce(self, route: object, now: float) -> bool:
        """Send CLIENT_ADD for `route` (client_ip, client_port, target_ip, target_port)."""
        record = wire.client_add(
            route.client_ip,  # type: ignore[attr-defined]
            route.client_port,  # type: ignore[attr-defined]
            route.target_ip,  # type: ignore[attr-defined]
            route.target_port,  # type: ignore[attr-defined]
        )
        return self.announce_record(record, now)

    def announce_record(self, record: bytes, now: float) -> bool:
        """Send one client record to every connected intercept; True if at least one took it."""
        delivered = False
        for icpt in self.intercepts:
            n = len(icpt.conns)
            for step in range(n):
                conn = icpt.conns[(icpt.rr + step) % n]
                if conn.state != CONNECTED:
                    continue
                icpt.rr = (conn.slot + 1) % n
                if self._send(conn, record, now):
                    delivered = True
                    self.counters["route_records_sent"] += 1
                break
        self.counters["route_announced" if delivered else "route_unannounced"] += 1
        return delivered

    def announce_batch(self, routes: Sequence[object], now: float) -> int:
        """``announce`` for many routes with one write per connection; returns how many
        routes at least one intercept took.  Same spreading and counters as ``announce``."""
        client_add = wire.client_add
        records = [
            client_add(r.client_ip, r.client_port, r.target_ip, r.target_port)  # type: ignore[attr-defined]
            for r in routes
        ]
        delivered = [False] * len(records)
        for icpt in self.intercepts:
            conns = icpt.conns
            n = len(conns)
            live = [c for c in conns if c.state == CONNECTED]
            if not live:
                continue
            # The round-robin of announce, without the sends: connection per record.
            plan: dict[int, list[int]] = {}
            rr = icpt.rr
            for i in range(len(records)):
                for step in range(n):
                    conn = conns[(rr + step) % n]
                    if conn.state == CONNECTED:
                        rr = (conn.slot + 1) % n
                        plan.setdefault(conn.slot, []).append(i)
                        break
            icpt.rr = rr
            for slot, idx in plan.items():
                conn = conns[slot]
                if conn.state != CONNECTED:
                    continue  # failed meanwhile (an earlier write of this batch)
                if self._send(conn, b"".join([records[i] for i in idx]), now):
                    self.counters["route_records_sent"] += len(idx)
                    for i in idx:
                        delivered[i] = True
        ok = sum(delivered)
        self.counters["route_announced"] += ok
        if ok < len(records):
            self.counters["route_unannounced"] += len(records) - ok
        return ok

    def get_timer(self) -> float | None:
        deadlines = [
            c.deadline
            for i in self.intercepts
            for c in i.conns
            if c.state != CONNECTED and c.deadline is not None
        ]
        if self._work_at is not None:
            deadlines.append(self._work_at)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        if self._work_at is not None and self._work_at <= now:
            self._work_at = None
            for icpt in self.intercepts:
                if icpt.reannounce_due:
                    self._reannounce(icpt, now)
            if self.route_down and not self._any_down():
                self.route_down = False
                if self.on_route_down is not None:
                    self.on_route_down(False, now)
        for icpt in self.intercepts:
            for conn in icpt.conns:
                if conn.deadline is None or conn.deadline > now:
                    continue
                if conn.state == IDLE:
                    self._connect(conn, now)
                elif conn.state == CONNECTING:
                    self._fail(conn, now, "connect timed out", was_connect=True)
                elif conn.state == AUTHENTICATING:
                    self.counters["channel_auth_failures"] += 1
                    self._fail(
                        conn,
                        now,
                        f"did not answer the extended hello within {AUTH_TIMEOUT_S:g} s (a C "
                        "intercept, or one without --secret-file support?); not falling back "
                        "to the unauthenticated protocol",
                        auth=logging.WARNING,
                    )

    def close(self) -> None:
        for icpt in self.intercepts:
            for conn in icpt.conns:
                self._close_socket(conn)
                conn.state = IDLE
                conn.deadline = None

    # -- re-announcing (module docstring) --------------------------------------------------

    def _schedule(self, icpt: _Intercept, now: float) -> None:
        icpt.reannounce_due = True
        if self._work_at is None or now < self._work_at:
            self._work_at = now

    def _any_down(self) -> bool:
        return any(i.was_connected and not i.connected() for i in self.intercepts)

    def _reannounce(self, icpt: _Intercept, now: float) -> None:
        icpt.reannounce_due = False
        conns = [c for c in icpt.conns if c.state == CONNECTED]
        routes = list(self.live_routes()) if self.live_routes is not None else []
        if not conns or not routes:
            return
        batches = [bytearray() for _ in conns]
        for i, route in enumerate(routes):
            batches[i % len(conns)] += wire.client_add(
                route.client_ip,  # type: ignore[attr-defined]
                route.client_port,  # type: ignore[attr-defined]
                route.target_ip,  # type: ignore[attr-defined]
                route.target_port,  # type: ignore[attr-defined]
            )
        sent = 0
        for conn, batch in zip(conns, batches, strict=True):
            if batch and conn.state == CONNECTED and self._send(conn, bytes(batch), now):
                sent += len(batch) // wire.CLIENT_RECORD_BYTES
        self.counters["sessions_reannounced"] += sent
        self.counters["route_records_sent"] += sent
        log.info(
            "intercept %s: %d live session(s) announced again on %d connection(s)",
            icpt.name,
            sent,
            len(conns),
        )

    # -- connection state machine -----------------------------------------------------------

    def _connect(self, conn: _Conn, now: float) -> None:
        icpt = conn.owner
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        conn.sock = sock
        conn.state = CONNECTING
        conn.deadline = now + CONNECT_TIMEOUT_S
        err = sock.connect_ex((icpt.host, icpt.port))
        if err not in (0, errno.EINPROGRESS):
            self._fail(conn, now, errno.errorcode.get(err, str(err)), was_connect=True)
            return
        self._register(conn, selectors.EVENT_WRITE)

    def _on_connected(self, conn: _Conn, now: float) -> None:
        sock = conn.sock
        assert sock is not None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _set_keepalive(sock)
        if self.secret is not None:
            # design §6: the extended hello replaces the version record; the connection is
            # used only once the intercept proved the secret as well (_authenticate).
            conn.out.clear()
            conn.state = AUTHENTICATING
            conn.deadline = now + AUTH_TIMEOUT_S
            nonce = self.nonce_source(wire.EXT_NONCE_BYTES)
            conn.handshake = wire.ExtendedClientHandshake(self.secret, nonce)
            self._send(conn, wire.EXT_HELLO, now)
            return
        self._open(conn, now)
        # The version handshake is the first record on every connection (spec §1.1, §1.2).
        self._send(conn, wire.HANDSHAKE, now)

    def _open(self, conn: _Conn, now: float) -> None:
        """The connection is usable: CLIENT_ADDs go out on it, frames come in."""
        conn.state = CONNECTED
        conn.deadline = None
        conn.up_since = now
        if self.frame_reader is not None:
            conn.decoder = self.frame_reader(self.record_bytes, self.combined)
        else:
            conn.decoder = RecordFeed(self.record_bytes, self.combined, self.on_records)
        conn.out.clear()
        self.counters["channel_connects"] += 1
        icpt = conn.owner
        if icpt.connected() == 1:
            log.info("intercept %s: connected", icpt.name)
        icpt.was_connected = True
        # Queued after the handshake record (the caller sends it next): see "Re-announcing".
        self._schedule(icpt, now)

    def _fail(
        self,
        conn: _Conn,
        now: float,
        reason: str,
        *,
        was_connect: bool = False,
        auth: int = 0,
    ) -> None:
        """Close and schedule a reconnect.  ``auth``: a failed extended handshake, logged
        (at that level) as "intercept X <reason>", rate-limited like connect failures."""
        icpt = conn.owner
        was_up = conn.state == CONNECTED
        self._close_socket(conn)
        conn.state = IDLE
        conn.out.clear()
        conn.decoder = None
        conn.handshake = None
        if conn.up_since is not None and now - conn.up_since >= BACKOFF_RESET_AFTER_S:
            conn.backoff_s = BACKOFF_MIN_S
        conn.up_since = None
        conn.deadline = now + conn.backoff_s
        retry_in = conn.backoff_s
        conn.backoff_s = min(conn.backoff_s * 2, BACKOFF_MAX_S)
        if auth:
            allowed, suppressed = self._fail_log.allow((icpt.name, "auth"), now)
            if allowed:
                more = f" ({suppressed} more)" if suppressed else ""
                log.log(
                    auth, "intercept %s %s; retrying in %.1f s%s", icpt.name, reason, retry_in, more
                )
        elif was_connect:
            self.counters["channel_connect_failures"] += 1
            allowed, suppressed = self._fail_log.allow(icpt.name, now)
            if allowed:
                more = f" ({suppressed} more failures)" if suppressed else ""
                log.warning(
                    "intercept %s: cannot connect: %s; retrying in %.1f s%s",
                    icpt.name,
                    reason,
                    retry_in,
                    more,
                )
        else:
            self.counters["channel_disconnects"] += 1
            left = icpt.connected()
            if was_up and left:
                self._schedule(icpt, now)  # its routes on this connection are gone
            elif was_up and not self.route_down:
                self.route_down = True
                if self.on_route_down is not None:
                    self.on_route_down(True, now)
            log.warning(
                "intercept %s: connection %d lost: %s; %d of %d left, reconnecting in %.1f s",
                icpt.name,
                conn.slot,
                reason,
                left,
                len(icpt.conns),
                retry_in,
            )

    def _close_socket(self, conn: _Conn) -> None:
        if conn.sock is None:
            return
        if conn.registered_mask:
            try:
                self.selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conn.registered_mask = 0
        conn.sock.close()
        conn.sock = None

    def _register(self, conn: _Conn, mask: int) -> None:
        if conn.sock is None or mask == conn.registered_mask:
            return
        callback = _Callback(self, conn)
        if conn.registered_mask:
            self.selector.modify(conn.sock, mask, callback)
        else:
            self.selector.register(conn.sock, mask, callback)
        conn.registered_mask = mask

    # -- I/O --------------------------------------------------------------------------------

    def _send(self, conn: _Conn, data: bytes, now: float) -> bool:
        """Queue `data` on a connected connection; False if the connection failed meanwhile."""
        sock = conn.sock
        assert sock is not None
        if conn.out:
            conn.out += data
        else:
            try:
                sent = sock.send(data, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._fail(conn, now, _err_name(exc))
                return False
            if sent < len(data):
                conn.out += data[sent:]
        if len(conn.out) > OUT_BUFFER_MAX_BYTES:
            self.counters["channel_overflows"] += 1
            self._fail(conn, now, f"intercept not reading ({len(conn.out)} bytes queued)")
            return False
        self._register(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0))
        return True

    def _flush(self, conn: _Conn, now: float) -> None:
        sock = conn.sock
        assert sock is not None
        while conn.out:
            try:
                sent = sock.send(conn.out, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                break
            except OSError as exc:
                self._fail(conn, now, _err_name(exc))
                return
            del conn.out[:sent]
        self._register(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0))

    def _authenticate(self, conn: _Conn, data: bytes, now: float) -> bytes | None:
        """Feed the extended handshake; returns the bytes past it once the connection is
        open (the start of the frame stream), None while handshaking or after a failure."""
        hs = conn.handshake
        assert hs is not None
        try:
            reply = hs.feed(data)
        except wire.HandshakeRefused as exc:
            if exc.code == wire.REFUSE_BAD_PROOF:
                self.counters["channel_auth_refused"] += 1
                self._fail(conn, now, "refused our secret", auth=logging.ERROR)
            elif exc.code == wire.REFUSE_NO_SECRET:
                self.counters["channel_auth_refused"] += 1
                why = "refused the extended hello: it has no --secret-file"
                self._fail(conn, now, why, auth=logging.ERROR)
            else:
                self.counters["channel_auth_failures"] += 1
                self._fail(conn, now, str(exc), auth=logging.ERROR)
            return None
        except wire.ProofMismatch:
            self.counters["channel_auth_bad_proof"] += 1
            why = "did not prove the secret (its proof does not verify)"
            self._fail(conn, now, why, auth=logging.ERROR)
            return None
        except DecodeError as exc:
            self.counters["channel_auth_failures"] += 1
            self._fail(
                conn, now, f"does not speak the extended protocol: {exc}", auth=logging.ERROR
            )
            return None
        if reply:
            if not self._send(conn, reply, now):
                return None
        if not hs.done:
            return None
        conn.handshake = None
        self.counters["channel_auth_ok"] += 1
        self._open(conn, now)
        return hs.take_leftover()

    def _read(self, conn: _Conn, now: float) -> None:
        sock = conn.sock
        assert sock is not None
        view = self._read_view
        for _ in range(READS_PER_EVENT_MAX):
            try:
                n = sock.recv_into(view)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(conn, now, _err_name(exc))
                return
            # Into the one read buffer: what the reader keeps, it copies before the next read.
            if n:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
                except OSError:
                    pass  # "Acknowledgements": a saving only, never a failure
            else:
                if conn.state == AUTHENTICATING:
                    self.counters["channel_auth_failures"] += 1
                    why = "closed the connection during the extended handshake"
                    self._fail(conn, now, why, auth=logging.WARNING)
                else:
                    self._fail(conn, now, "closed by intercept")
                return
            drained = n < READ_BYTES
            data: bytes | memoryview = view
            if conn.handshake is not None:
                rest = self._authenticate(conn, bytes(view[:n]), now)
                if rest is None:
                    if conn.state != AUTHENTICATING or drained:
                        return  # failed, or waiting for the rest of the handshake
                    continue
                data, n = rest, len(rest)
            decoder = conn.decoder
            assert decoder is not None
            try:
                records = decoder.feed(data, n, now)
            except DecodeError as exc:
                # spec §1.4: a bad frame count is fatal for that connection in C too.
                self.counters["channel_frame_errors"] += 1
                self._fail(conn, now, f"bad frame: {exc}")
                return
            if records:
                self.counters["responses_received"] += records
            if drained:
                return

    # -- the worker's compiled wait (engine/proc/worker.py, "The compiled wait") -----------

    def compiled_reads(self, reader_type: type) -> tuple[list[int], list[object]]:
        """The connections a compiled wait may read itself, as ``_read`` would (connected,
        authenticated, their reader a ``reader_type``): their fds and readers."""
        fds: list[int] = []
        readers: list[object] = []
        for icpt in self.intercepts:
            for conn in icpt.conns:
                if (
                    conn.state == CONNECTED
                    and conn.sock is not None
                    and conn.handshake is None
                    and type(conn.decoder) is reader_type
                ):
                    fds.append(conn.sock.fileno())
                    readers.append(conn.decoder)
        return fds, readers

    def read_failed(self, fd: int, err: int, now: float) -> None:
        """A compiled wait's read of connection ``fd`` found its end (``err`` 0) or the error
        ``err``: what ``_read`` does then."""
        conn = self._conn_of(fd)
        if conn is None:
            return
        if err:
            self._fail(conn, now, errno.errorcode.get(err, os.strerror(err)))
        else:
            self._fail(conn, now, "closed by intercept")

    def frame_failed(self, fd: int, exc: Exception, now: float) -> None:
        """A compiled wait's read of connection ``fd`` held a bad frame: as ``_read``."""
        conn = self._conn_of(fd)
        if conn is None:
            return
        self.counters["channel_frame_errors"] += 1
        self._fail(conn, now, f"bad frame: {exc}")

    def _conn_of(self, fd: int) -> _Conn | None:
        for icpt in self.intercepts:
            for conn in icpt.conns:
                if conn.sock is not None and conn.sock.fileno() == fd:
                    return conn
        return None

    def _on_event(self, conn: _Conn, mask: int, now: float) -> None:
        if conn.state == CONNECTING:
            assert conn.sock is not None
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(conn, now, errno.errorcode.get(err, str(err)), was_connect=True)
            else:
                self._on_connected(conn, now)
            return
        if conn.state != CONNECTED and conn.state != AUTHENTICATING:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(conn, now)
        if conn.state in (CONNECTED, AUTHENTICATING) and mask & selectors.EVENT_READ:
            self._read(conn, now)


class _Callback:
    """Selector key data: `key.data(mask, now)` dispatches to the owning connection."""

    __slots__ = ("channels", "conn")

    def __init__(self, channels: InterceptChannels, conn: _Conn) -> None:
        self.channels = channels
        self.conn = conn

    def __call__(self, mask: int, now: float) -> None:
        self.channels._on_event(self.conn, mask, now)


def _err_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc))


def _set_keepalive(sock: socket.socket) -> None:
    """Detect a dead intercept host even when no responses flow (C has no heartbeat, §1.1)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    except OSError:
        pass


def per_record(on_response: Callable[[object, float], None]) -> RecordsHandler:
    """An ``on_records`` that decodes each record and calls ``on_response(pkt, now)`` (records
    that do not decode are skipped): for callers without a session table's batch call."""

    def on_records(records: bytes, now: float, record_bytes: int) -> int:
        count = len(records) // record_bytes
        for i in range(count):
            try:
                pkt = wire.decode_response_record(
                    records[i * record_bytes : (i + 1) * record_bytes]
                )
            except DecodeError:
                continue
            on_response(pkt, now)
        return count * record_bytes

    return on_records
