"""The worker loop: the thin I/O shell around one SessionTable (design §3, §5).

Theory of operation
-------------------
One `selectors` loop owns every file descriptor of the worker:

* the source's fd (the ring's eventfd) -> one batch call per ring batch: the ring's slots
  read in place (``table.receive_ring``), or the packets of any other source packed into one
  buffer (``table.receive_client_ips``); a source without an fd (a paced file) has its next
  due time as one more timer;
* intercept connections (channel.py) -> one call per read: the compiled table's frame reader
  walks the frames and records in the read buffer (``table.frame_reader``); the Python
  engine's gets the complete records of the read back to back (``table.receive_records``);
* a self-pipe woken by signals (signal.set_wakeup_fd), so SIGTERM/SIGINT/SIGHUP interrupt the
  wait at once instead of at the next timer;
* timers: the table's next deadline, the channel's reconnects, the offline pacing, the stats
  line and the memory check -> one select timeout.

Twice per wake-up the table is drained: after the intercept responses (they release held
requests, so they leave before the capture batch is even parsed), and after the capture
batches and timers.  A drain announces its routes first (CLIENT_ADD to every intercept, spec
§1.2: before the SYN they announce; one write per connection), then sends its packets in one
raw sendmmsg batch (engine/io/send.py): ``table.drain_into`` writes the packets into the
worker's one preallocated SendBuffer and the sender sends them from there.

The table is either engine (engine/io/engines.py): the compiled one has the batch calls
itself, the Python one gets them from engine/io/batch.py's adapter, which loops over its
per-packet calls and is the specification of what each batch call does.
Offline tail: once every source is exhausted (an offline replay's input ended), the loop
stops when the table is empty, or when no session sent a packet for ``offline_tail_s``
(ReplayConfig explains the 10 s default): the sessions still open (a lone SYN, an idle
keep-alive connection: they wait for client packets that will never come) are then ended
with a RST, counted as ``ended_offline_end`` and logged in one line, so a replay always
ends with its summary.

The compiled wake-up.  With the compiled table, a worker's ring as its one source and the
raw sender on its sendmmsg path (the normal worker process), what follows the responses in
a wake-up (the ring's batches, the table's due timers, the drain and its sendmmsg) is one
call, ``Pump.run`` (engine/dataplane/pump.pxi): the same steps in the same order as the
loop's Python, without a Python call between them.  It comes back for routes to announce
(announced here, then ``Pump.drain`` sends the drain) and for a packet the kernel refused
(the sender sends the rest of the drain and counts the refusal).  Every other flush (after
the responses, the offline tail's RSTs, the shed half-open sessions) is ``Pump.drain``: the
table's drain and its sendmmsg in one call.  The Python steps stay the
specification and run for every other source, table and sender, or with
TCPCOPY_MP_PUMP=0 (for comparisons).

The compiled wait.  With the pump, the loop's own epoll selector and the real intercept
channels, the loop does not call select itself between its Python deadlines: ``Pump.wait``
waits on the selector's epoll fd until the nearest of them (the stats line, the memory
check, the channels' timers, the offline tail, the ring's own deadline, the refusal log, the
collector's freeze) and does itself, without coming back here, what the loop would do for a
wake-up on the intercept connections alone: each connected connection read as
channel.py ``_read`` reads it (its frames into the table through its FrameReader), the drain
and its sendmmsg after them, then the table's due timers and the drain again, as
``_pump_wakeup`` does when no ring batch is due; and a timeout of the table's timer alone
runs the timers and the drain.  The ring's eventfd ends it after that wait's connection
reads and their drain, as the loop's wake-up on its ring (its batches then read here, by
``_pump_wakeup``).  It comes back for everything else, consuming nothing of it: a signal, a
writable or failing socket, any other fd (the loop's select then sees those events as it
would have), a connection's end, error or bad frame (handled
here as ``_read`` handles them), routes to announce and a refused packet (the pump's
hand-backs), and its deadline.  So under a steady flow of responses the worker's user-space
time per wake-up is the pump's, not this loop's.  Once the input ended (an offline replay's
"Offline tail" below), it also comes back after a step that left the table empty, and notes
when its steps last sent (``Pump.sent_at``): the tail then starts from that wake-up, as it
starts from the loop's wake-up that sent.

`now` is time.monotonic() read once per wake-up.  Nothing here decides TCP behaviour; that
is the pure core's job, which this loop only feeds and drains.

The capture side runs in its own process (engine/proc/capture.py): in tcpcopy-mp a
worker's one source is its ring (``RingSource`` below, whose fd is the ring's eventfd);
any object with the engine/io/capture.py source interface will do (the unit tests feed
packets directly).  `_on_ip_packets` is where the packets of such a source enter; a source
with ``receive_into(table, now)`` (RingSource) hands its batch to the table itself.

The worker process (``WorkerProcess``)
--------------------------------------
In the multi-process engine a worker process is the Worker above, unchanged: its capture
source is a
``RingSource`` (the consumer side of this worker's shared-memory ring, see engine/io/ring.py),
which offers the engine/io/capture.py source interface:

* ``fileno()`` is the ring's eventfd, rung by the producer on empty -> non-empty;
* ``next_deadline()`` is never more than ``RING_IDLE_POLL_S`` away (a wake-up can be missed,
  ring.py explains why), and is "now" while a backlog remains (the eventfd is only rung on
  empty -> non-empty, so a consumer that stopped early must come back by itself);
* ``read_batch(now)`` pops a batch;
* ``exhausted`` is true once the capture process marked an offline replay done and the ring
  is empty: Worker then stops by itself when its table has no session left.

Every ``read_batch`` (so at least every RING_IDLE_POLL_S) also calls ``tick(now)``:
``WorkerProcess`` uses it to write its heartbeat and to flush its counters into its row of
the shared CounterBlock every COUNTER_FLUSH_INTERVAL_S (the compiled table's own counters are
not flushed: it counts straight into the row, ``CounterBlock.counting_row``).  The
watchdog's "shed" flag is the capture process's to follow (engine/core/shed.py): it sheds
whole sessions before they reach a ring, where a worker refusing its flows would cut sessions
already admitted.  A worker follows it in two ways: while it is up, the SYNs already in its
ring start no session (engine/core/table.py ``refuse_new``: the capture took them in before
it began shedding, and at 10 k SYNs/s a full ring is 8 k sessions, ~32 MB), and every
SHED_SWEEP_INTERVAL_S it gives up its half-open sessions (the client sent a SYN and nothing
after it: what a SYN flood leaves, ``shed_half_open``), which are the memory a flood holds.
The row's ``active`` gauge is what the supervisor counts as lost if this process dies.  The stats
line is the supervisor's job, so ``log_stats`` only flushes.

Memory given back.  Ended sessions are freed by Python, but glibc keeps the freed heap
(most of a session's ~4 KB) mapped, so a worker that held 100 k sessions stays that large
after they are gone and the watchdog keeps seeing it.  When TRIM_AFTER_SESSIONS sessions
left the table since the last time, ``malloc_trim(0)`` hands the free pages back (measured:
470 -> 253 MB after 100 k sessions ended, the rest being their tuples' TIME_WAIT quarantine,
which expires after 60 s); at most every TRIM_INTERVAL_S.
"""

from __future__ import annotations

import gc
import logging
import os
import selectors
import signal
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate

from engine.codec.wire import RESPONSE_RECORD_BYTES
from engine.core.config import BYTES_PER_MB, ReplayConfig
from engine.io.batch import SendBuffer, as_batch
from engine.io.channel import InterceptChannels
from engine.io.logs import LOGGER_NAME, RateLimiter, is_json, reopen_logs
from engine.io.report import stats_lines
from engine.io.ring import RING_IDLE_POLL_S, Ring, record_layout
from engine.io.send import RawSender
from engine.io.sigloop import SignalPipe
from metrics.counters import COUNTER_FLUSH_INTERVAL_S, ENGINE_FIRST

log = logging.getLogger(LOGGER_NAME)

STARTUP_CONNECT_WAIT_S = 3.0
"""Capture starts once an intercept is connected or after this long (then routes are counted
as unannounced until one connects)."""
NO_TUPLE_LOG_INTERVAL_S = 10.0
"""At most one "refused: no free client tuple" warning per worker this often."""
MEMORY_CHECK_INTERVAL_S = 60.0
"""spec §3.17: the resource check runs every 60 s."""
GC_THRESHOLDS = (50_000, 20, 100)
"""The cyclic collector's generation thresholds in a worker (Python's default: 700, 10, 10).
Sessions, segments and packets are allocated by the hundred thousand and form no cycles
(bench/bench_engine.py, 5,000 connections x 3 requests, left 88 unreachable objects, all from
start-up); collecting the young generation every 700 allocations cost 8 % of the engine's
rate on short connections and 11 % on keep-alive sessions with a backlog of held requests
(same-process micro-benchmarks, gc defaults vs these)."""
PUMP_ENV = "TCPCOPY_MP_PUMP"
"""Set to 0: the wake-up path in Python even where the compiled one applies (comparisons)."""
PUMP_ROUTES = 1
PUMP_SEND_ERROR = 2
PUMP_WAIT_EVENTS = 3
PUMP_WAIT_DUE = 4
PUMP_WAIT_READ_END = 5
PUMP_WAIT_FRAME_ERROR = 6
PUMP_WAIT_RING = 7
"""engine/dataplane/pump.pxi's statuses (its PUMP_ROUTES, ..., PUMP_WAIT_FRAME_ERROR)."""
GC_FREEZE_INTERVAL_S = 1.0
REFUSAL_LOG_INTERVAL_S = 10.0
"""At most one log line per this interval about reconnects the sessions refused."""
REFUSAL_CHECK_INTERVAL_S = 1.0
"""How often the loop looks for refused reconnects: the compiled table builds its counters on
each read, so not on every wake-up."""
_REFUSAL_KEYS = (
    "reconnect_refused_off",
    "reconnect_refused_budget",
    "reconnect_refused_unanswered",
)
"""Every this long the worker moves what the collector tracks into its permanent generation
(gc.freeze): a collection then walks at most this long's survivors.  Without it, a full
collection in a table holding a backlog of 200,000 segments took 150-300 ms (micro-benchmark;
gc defaults), longer than a ring of 8,192 slots lasts at 40,000 packets/s: a worker that far
behind would overflow its ring at every full pass, each drop a hole.  The price, cycles among
frozen objects never being freed, is what the line above measured: none from the engine."""


class Worker:
    """Runs one SessionTable against capture sources, intercept channels and a sender.

    `table` follows the table.SessionTable contract (wrapped in engine/io/batch.py's adapter
    unless it has the batch calls); `sources` the io/capture.py interface; `sender` has
    send_buffer(sendbuf, n), send_batch(list[bytes]) or send(bytes), and counters;
    `channels` is built here unless given (a factory `channels(selector, on_records)` lets
    tests inject a fake; ``on_records(blob, now, record_bytes)`` takes a read's records).
    """

    def __init__(
        self,
        cfg: ReplayConfig,
        table: object,
        sources: Sequence[object],
        sender: object,
        *,
        prefilter_counters: Counter[str] | None = None,
        channels: Callable[[selectors.BaseSelector, Callable], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        memory_rss: Callable[[], int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.table = as_batch(table)
        self.sendbuf = SendBuffer()
        self.sources = list(sources)
        self.sender = sender
        self.clock = clock
        self.sel = selectors.DefaultSelector()
        if channels is None:
            self.channels = InterceptChannels(
                cfg.intercepts,
                cfg.connections,
                self.sel,
                self._on_records,
                secret=cfg.intercept_secret,
                live_routes=self._live_routes,
                on_route_down=self._on_route_down,
                # A compiled table reads each connection's frames itself (one call per read).
                frame_reader=getattr(self.table, "frame_reader", None),
            )
        else:
            self.channels = channels(self.sel, self._on_records)
        self.counters: Counter[str] = Counter()
        self.prefilter_counters = (
            prefilter_counters if prefilter_counters is not None else Counter()
        )
        self.memory_rss = memory_rss or _rss_bytes
        self.exit_reason = ""
        self.exit_code = 0
        self._stop = False
        self._signals = SignalPipe(
            (signal.SIGTERM, signal.SIGINT, signal.SIGHUP), ignore_sigpipe=True
        )
        self.started_at = 0.0
        # Offline tail (ReplayConfig.offline_tail_s): once every source is exhausted, the
        # time by which open sessions must have sent something, and the send count then.
        self._tail_at: float | None = None
        self._tail_sent = -1
        self._input_error = False
        self._no_tuple_seen = 0
        self._no_tuple_log = RateLimiter(NO_TUPLE_LOG_INTERVAL_S)
        self._refusals_logged = 0
        self._refusal_log = RateLimiter(REFUSAL_LOG_INTERVAL_S)
        self._pump: object | None = None
        self._reader_type: type = type(None)
        self._ring_events: list = []
        self._wait_sent: tuple[int, float] | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def stop(self, reason: str, code: int = 0) -> None:
        if not self._stop:
            self._stop = True
            self.exit_reason = reason
            self.exit_code = code

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: graceful stop; SIGHUP: reopen logs; all woken through a self-pipe
        (SIGPIPE ignored: spec §1.7 QUIRK)."""
        self.sel.register(self._signals.install(), selectors.EVENT_READ, self._on_wakeup)

    def _on_wakeup(self, mask: int, now: float) -> None:
        self._signals.drain()

    def _handle_signals(self) -> None:
        while (signum := self._signals.pop()) is not None:
            if signum == signal.SIGHUP:
                reopen_logs()
                log.info("SIGHUP: log file reopened")
            else:
                self.stop(f"stopped by {signal.Signals(signum).name}")

    def run(self) -> int:
        """The loop; returns the exit code (0 after a graceful stop)."""
        now = self.clock()
        self.started_at = now
        self.channels.start(now)
        self._wait_for_intercept(now)
        now = self.clock()
        for src in self.sources:
            fd = src.fileno()
            if fd is not None:
                self.sel.register(fd, selectors.EVENT_READ, _SourceCallback(self, src))
            elif hasattr(src, "start"):
                src.start(now)
        next_stats = now + self.cfg.stats_interval_s
        next_memory = now + MEMORY_CHECK_INTERVAL_S
        # Everything built so far (modules, config, sockets) lives as long as the process:
        # keep it out of the cyclic collector's full passes, which otherwise walk it again
        # and again while sessions churn (a pause that delays every held request).
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        next_freeze = now + GC_FREEZE_INTERVAL_S
        next_refusals = now
        table, channels, sources, select = self.table, self.channels, self.sources, self.sel.select
        pump = self._pump = self._make_pump()
        wait_fd = self._wait_fd(pump)
        drain_first = True
        while not self._stop:
            # The nearest deadline (a None is no timer), without building a sequence per pass.
            deadline = next_stats if next_stats < next_memory else next_memory
            for d in (channels.get_timer(), self._tail_at):
                if d is not None and d < deadline:
                    deadline = d
            for src in sources:
                d = src.next_deadline()
                if d is not None and d < deadline:
                    deadline = d
            if wait_fd >= 0 and not drain_first and deadline > now:
                # The compiled wait (module docstring): back here for Python's work only.
                if next_refusals < deadline:
                    deadline = next_refusals
                if next_freeze < deadline:
                    deadline = next_freeze
                events, drain_first = self._wait(pump, wait_fd, deadline, select)
                now = self.clock()
            else:
                d = table.get_timer()
                if d is not None and d < deadline:
                    deadline = d
                events = select(deadline - now if deadline > now else 0.0)
                now = self.clock()
            if self._signals.pending:
                self._handle_signals()
            # Responses first, drained at once: they open the request gate of held sessions,
            # so their round trip sets the replay's pace and must not wait behind a capture
            # batch.  Then the capture batches and timers, drained together.  Each drain is
            # one sendmmsg (routes announced first).  When only capture batches woke us and
            # the channels' timers did not run since the last drain, nothing can be waiting
            # to leave before them: no first drain.
            captured = []
            for key, mask in events:
                if type(key.data) is _SourceCallback:
                    captured.append(key.data.src)
                else:
                    drain_first = True
                    key.data(mask, now)
            if drain_first:
                drain_first = False
                self._flush(now)
            if pump is not None:
                self._pump_wakeup(pump, now, bool(captured))
            else:
                self._capture_wakeup(captured, now)
            if now >= next_refusals:
                next_refusals = now + REFUSAL_CHECK_INTERVAL_S
                self._log_refusals(now)
            timer = channels.get_timer()
            if timer is not None and timer <= now:
                channels.handle_timer(now)  # a reconnect may wake sessions (set_route_down)
                drain_first = True
            if now >= next_stats:
                next_stats = now + self.cfg.stats_interval_s
                self.log_stats(now)
            if now >= next_freeze:
                next_freeze = now + GC_FREEZE_INTERVAL_S
                gc.freeze()
            if now >= next_memory:
                next_memory = now + MEMORY_CHECK_INTERVAL_S
                self._check_memory()
            if self._offline_done(now):
                if self._input_error:  # single-process engine: a file source's error
                    self.stop("a broken input file; the replay is incomplete", 1)
                else:
                    self.stop("offline replay is complete")
        self.log_stats(self.clock(), final=True)
        log.info("tcpcopy-mp exits: %s", self.exit_reason)
        return self.exit_code

    def close(self) -> None:
        self.channels.close()
        if self._pump is not None:
            self._pump.close()  # type: ignore[attr-defined]
            self._pump = None
        for src in self.sources:
            src.close()
        close = getattr(self.sender, "close", None)
        if close is not None:
            close()
        self._signals.close()
        self.sel.close()

    def _wait_for_intercept(self, start: float) -> None:
        """Give the intercepts a moment to accept us before the first SYN needs a route."""
        deadline = start + STARTUP_CONNECT_WAIT_S
        now = start
        while not self._stop and not self.channels.connected and now < deadline:
            timer = self.channels.get_timer()
            wake = deadline if timer is None else min(deadline, timer)
            for key, mask in self.sel.select(max(0.0, wake - now)):
                key.data(mask, now)
            now = self.clock()
            self._handle_signals()
            timer = self.channels.get_timer()
            if timer is not None and timer <= now:
                self.channels.handle_timer(now)
        if not self.channels.connected and not self._stop:
            names = ", ".join(f"{h}:{p}" for h, p in self.cfg.intercepts)
            log.warning(
                "no intercept reachable at %s after %.0f s; capturing anyway and still "
                "retrying; sessions started meanwhile are counted as route_unannounced",
                names,
                STARTUP_CONNECT_WAIT_S,
            )

    def _offline_done(self, now: float) -> bool:
        """The input ended and every session finished, or the tail ran out (module
        docstring, "Offline tail"): then the sessions still open are ended and counted."""
        if not self.sources:
            return False
        for src in self.sources:  # once per wake-up: a loop, not all() over a generator
            if not getattr(src, "exhausted", False):
                return False
        for src in self.sources:
            error = getattr(src, "error", None)
            if error and not self._input_error:
                self._input_error = True
                log.error("%s", error)
        table = self.table
        if table.active == 0:  # type: ignore[attr-defined]
            return True
        sent = table.sent  # type: ignore[attr-defined]
        if sent != self._tail_sent:  # a session still works: the tail starts again
            self._tail_sent = sent
            at = now
            if self._wait_sent is not None and self._wait_sent[0] == sent:
                at = self._wait_sent[1]  # sent last by a compiled wait's step, then
            self._tail_at = at + self.cfg.offline_tail_s
        if self._tail_at is None or now < self._tail_at:
            return False
        ended = table.end_input(now)  # type: ignore[attr-defined]
        self._flush(now)  # their RSTs free the target's side
        table.forget_ended(now)  # type: ignore[attr-defined]
        if ended:
            log.warning(
                "offline input ended and nothing was sent for %.0f s (--offline-tail): "
                "%d session%s still open closed (ended_offline_end)",
                self.cfg.offline_tail_s,
                ended,
                "" if ended == 1 else "s",
            )
        return True

    # -- data path --------------------------------------------------------------------------

    def _make_pump(self) -> object | None:
        """The compiled wake-up path (module docstring, "The compiled wake-up") when every
        part it replaces is the one it was written for, else None (the loop above)."""
        if os.environ.get(PUMP_ENV, "1") == "0" or len(self.sources) != 1:
            return None
        src, sender = self.sources[0], self.sender
        if type(src) is not RingSource or type(sender) is not RawSender:
            return None
        if sender.batch_path != "fastio":
            return None
        try:
            from engine.dataplane.engine import Pump, Table
        except ImportError:
            return None
        table = self.table
        if type(table) is not Table:
            return None
        on_loss = src.on_loss
        if on_loss is not None and on_loss != table.note_capture_loss:
            return None
        return Pump(
            table,
            src.ring,
            record_layout(),
            sender.sock.fileno(),
            sender.counters,
            src.batch_max,
            on_loss is not None,
        )

    def _wait_fd(self, pump: object | None) -> int:
        """The selector's epoll fd for the compiled wait (module docstring, "The compiled
        wait"), or -1: the loop's select."""
        if pump is None or self.clock is not time.monotonic:
            return -1
        if type(self.sel) is not selectors.EpollSelector:
            return -1
        if not hasattr(self.channels, "compiled_reads"):
            return -1
        from engine.dataplane.engine import FrameReader

        self._reader_type = FrameReader
        # The loop's event for the ring (PUMP_WAIT_RING): the wake-up on it, as select's.
        key = self.sel.get_map().get(self.sources[0].fileno())  # type: ignore[attr-defined]
        if key is None:
            return -1
        self._ring_events = [(key, selectors.EVENT_READ)]
        return self.sel.fileno()

    def _exhausted(self) -> bool:
        """Every source's input ended (``_offline_done``'s first test)."""
        return bool(self.sources) and all(getattr(s, "exhausted", False) for s in self.sources)

    def _wait(
        self,
        pump: object,
        epfd: int,
        deadline: float,
        select: Callable,
        at: float | None = None,
    ) -> tuple[list, bool]:
        """One compiled wait (``Pump.wait``) until ``deadline`` or Python's work; returns the
        events for the loop and whether a drain must come first (records were read and not
        drained).  ``at``: Pump.wait's fixed clock (tests)."""
        channels = self.channels
        fds, readers = channels.compiled_reads(self._reader_type)  # type: ignore[attr-defined]
        idle = self._exhausted()  # the replay is over once the table is empty
        status = pump.wait(epfd, deadline, fds, readers, at, idle)  # type: ignore[attr-defined]
        mark = pump.sent_mark  # type: ignore[attr-defined]
        if mark >= 0:
            # When the wait's steps last sent: the offline tail starts there, as it starts
            # at the loop's wake-up that sent (``_offline_done``).
            self._wait_sent = (mark, pump.sent_at)  # type: ignore[attr-defined]
        responses = pump.responses  # type: ignore[attr-defined]
        if responses:
            channels.counters["responses_received"] += responses  # type: ignore[attr-defined]
        if status == PUMP_WAIT_RING:
            return self._ring_events, False
        if status == PUMP_WAIT_EVENTS:
            return select(0.0), False
        if status == PUMP_WAIT_DUE or status == 0:
            return [], False
        now = self.clock() if at is None else at
        if status == PUMP_WAIT_READ_END:
            channels.read_failed(pump.wait_fd, pump.wait_errno, now)  # type: ignore[attr-defined]
            return [], True
        if status == PUMP_WAIT_FRAME_ERROR:
            channels.frame_failed(pump.wait_fd, pump.wait_error, now)  # type: ignore[attr-defined]
            return [], True
        self._pump_back(pump, status, now)
        return [], False

    def _capture_wakeup(self, fired: Sequence[object], now: float) -> None:
        """What the loop does after the responses: a batch of each source whose fd woke us
        (``fired``), one of each source now due, the table's due timers, one drain (the
        specification of ``_pump_wakeup``)."""
        for src in fired:
            self._read_source(src, now)
        for src in self.sources:
            due = src.next_deadline()  # type: ignore[attr-defined]
            if due is not None and due <= now:
                self._read_source(src, now)
        table = self.table
        timer = table.get_timer()
        if timer is not None and timer <= now:
            table.handle_timer(now)
        self._flush(now)

    def _pump_wakeup(self, pump: object, now: float, fired: bool) -> None:
        """What the loop does after the responses, in one compiled call: the ring's batches
        (two when its eventfd fired and a backlog remains, one when its deadline is due),
        the table's timers, the drain and its send; back here for routes to announce and a
        refused packet."""
        src = self.sources[0]
        if fired:
            reads = 2
        else:
            due = src.next_deadline()
            reads = 1 if due is not None and due <= now else 0
        status = src.pump(pump, now, reads)  # type: ignore[attr-defined]
        errors = pump.errors  # type: ignore[attr-defined]
        if errors:
            self.counters["capture_parse_errors"] += errors
        if status:
            self._pump_back(pump, status, now)

    def _pump_back(self, pump: object, status: int, now: float) -> None:
        """What a pump call handed back: routes to announce before its drain goes on, a
        refused packet for the sender (which sends the rest and counts the refusal)."""
        while status == PUMP_ROUTES:
            self._send(pump.take_routes(), 0, now)  # type: ignore[attr-defined]
            status = pump.drain()  # type: ignore[attr-defined]
        if status == PUMP_SEND_ERROR:
            self._flush_python(now)

    def _read_source(self, src: object, now: float) -> None:
        """One batch of ``src`` into the table: in place when the source can (a ring)."""
        receive_into = getattr(src, "receive_into", None)
        if receive_into is not None:
            errors = receive_into(self.table, now)
            if errors:
                self.counters["capture_parse_errors"] += errors
        else:
            self._on_ip_packets(src.read_batch(now), now)  # type: ignore[attr-defined]

    def _on_ip_packets(self, batch: Iterable[tuple[float, bytes]], now: float) -> None:
        """Captured IPv4 packets (already past the -x pre-filter) into the session table:
        packed into one buffer, one batch call."""
        ips = [ip for _ts, ip in batch]
        if not ips:
            return
        lengths = array("I", map(len, ips))
        offsets = array("I", accumulate(lengths, initial=0))
        errors = self.table.receive_client_ips(b"".join(ips), offsets, lengths, len(ips), now)
        if errors:
            self.counters["capture_parse_errors"] += errors

    def _on_records(
        self, blob: bytes, now: float, record_bytes: int = RESPONSE_RECORD_BYTES
    ) -> int:
        """The complete response records of one intercept read into the table."""
        return int(self.table.receive_records(blob, now, record_bytes))

    def _live_routes(self) -> list[object]:
        """For a (re)made intercept connection: every live session's route (channel.py
        "Re-announcing")."""
        live = getattr(self.table, "live_routes", None)
        return live() if live is not None else []

    def _on_route_down(self, down: bool, now: float) -> None:
        set_down = getattr(self.table, "set_route_down", None)
        if set_down is not None:
            set_down(down, now)
        log.log(
            logging.WARNING if down else logging.INFO,
            "%s",
            "an intercept is unreachable: sessions keep their state and retransmit until it is "
            "back (no retransmission limit meanwhile)"
            if down
            else "every intercept is back: live sessions were announced again and resume",
        )

    def _flush(self, now: float) -> None:
        """The table drained and sent: in one compiled call when the pump is there."""
        pump = self._pump
        if pump is not None:
            status = pump.drain()  # type: ignore[attr-defined]
            if status:
                self._pump_back(pump, status, now)
            return
        self._flush_python(now)

    def _flush_python(self, now: float) -> None:
        sendbuf = self.sendbuf
        while True:
            routes, n = self.table.drain_into(sendbuf)
            self._send(routes, n, now)
            if not n:
                return

    def _send(self, routes: list[object], n: int, now: float) -> None:
        if routes:
            # If no intercept takes the CLIENT_ADD, the SYN still goes out: C would not start
            # the session at all (spec §1.2), but a target that sees the SYN is more useful
            # (its SYN-ACK may still reach an intercept that reconnects); channel.py counts
            # route_unannounced so the loss is visible.
            announce_batch = getattr(self.channels, "announce_batch", None)
            if announce_batch is not None:
                announce_batch(routes, now)
            else:
                announce = self.channels.announce
                for route in routes:
                    announce(route, now)
        if not n:
            return
        send_buffer = getattr(self.sender, "send_buffer", None)
        if send_buffer is not None:
            send_buffer(self.sendbuf, n)
            return
        packets = self.sendbuf.packets(n)
        send_batch = getattr(self.sender, "send_batch", None)
        if send_batch is not None:
            send_batch(packets)
        else:
            send = self.sender.send
            for pkt in packets:
                send(pkt)

    # -- reporting --------------------------------------------------------------------------

    def _log_refusals(self, now: float) -> None:
        """Reconnects the sessions refused since the last line (rate-limited)."""
        c = getattr(self.table, "counters", None)
        if c is None:
            return
        total = c["reconnect_refused_off"] + c["reconnect_refused_budget"]
        total += c["reconnect_refused_unanswered"]
        if total == self._refusals_logged or not self._refusal_log.allow("refused", now)[0]:
            return
        by = ", ".join(f"{k.removeprefix('reconnect_refused_')} {c[k]}" for k in _REFUSAL_KEYS)
        log.warning(
            "%d reconnect(s) refused since the last report (in all: %s); those sessions "
            "ended with their requests unsent (see --no-reconnect, --reconnect-budget)",
            total - self._refusals_logged,
            by,
        )
        self._refusals_logged = total

    def _check_memory(self) -> None:
        """spec §3.17, on the current RSS (C checks the peak, which never comes back down)."""
        limit = self.cfg.memory_limit_mb * BYTES_PER_MB
        rss = self.memory_rss()
        if rss > limit:
            log.error(
                "occupies too much memory, limit:%d MB, rss:%d MB",
                self.cfg.memory_limit_mb,
                rss // BYTES_PER_MB,
            )
            self.stop("memory limit exceeded (-m)", code=1)

    def summary(self, now: float | None = None) -> dict[str, object]:
        """The final counters as one flat JSON-able object (--summary-json)."""
        if now is None:
            now = self.clock()
        out: dict[str, object] = {}
        for key, value in self.table.counters.items():
            out[_key(key)] = value
        out["active"] = self.table.active
        out["unsend"] = self.table.unsend
        out.update(self.prefilter_counters)
        for src in self.sources:
            for key, value in src.counters.items():
                out[key] = out.get(key, 0) + value  # type: ignore[operator]
        out.update(self.counters)
        out.update(self.sender.counters)
        out.update(self.channels.counters)
        out["channels_connected"] = self.channels.connected
        out["uptime_s"] = round(now - self.started_at, 3)
        out["exit_reason"] = self.exit_reason
        return out

    def warn_no_tuple(self, now: float) -> None:
        """Connections refused for want of a free client tuple are logged, rate-limited,
        with the fix: they are rare (spill over the -c pool, RFC 6191 reuse), so loud."""
        total = int(self.table.counters.get("drop_no_tuple", 0))  # type: ignore[attr-defined]
        new = total - self._no_tuple_seen
        if new <= 0:
            return
        allowed, _ = self._no_tuple_log.allow("no_tuple", now)
        if not allowed:
            return
        self._no_tuple_seen = total
        pool = len(self.cfg.session.client_pool)
        log.warning(
            "%d new connection(s) refused (no_tuple, %d in all): every client port toward "
            "the target is in use or in its TIME_WAIT%s; give -c a larger pool of fake "
            "client addresses (each adds ~1,075 new connections/s)%s",
            new,
            total,
            f" on all {pool} -c address(es)" if pool else " (no -c: the captured address)",
            "" if not self.cfg.session.strict_time_wait else " or drop --strict-time-wait",
        )

    def log_stats(self, now: float, final: bool = False) -> None:
        self.warn_no_tuple(now)
        values = self.summary(now)
        if any(isinstance(h, logging.Handler) and is_json(h) for h in log.handlers):
            log.info("stats", extra={"stats": values, "final": final})
            return
        for line in stats_lines(values):
            log.info("%s", line)


class _SourceCallback:
    __slots__ = ("worker", "src")

    def __init__(self, worker: Worker, src: object) -> None:
        self.worker = worker
        self.src = src

    def __call__(self, mask: int, now: float) -> None:
        self.worker._read_source(self.src, now)


def _key(key: object) -> str:
    name = getattr(key, "name", None)  # DropReason enums
    return str(name if isinstance(name, str) else key)


def _rss_bytes() -> int:
    """This process's resident bytes (/proc/self/statm; 0 where unreadable)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


# The worker process: a Worker fed from its shared-memory ring.

RING_BATCH_MAX_PACKETS = 1024
"""Packets taken from the ring per read_batch (timers and responses are not starved)."""
SHED_SWEEP_INTERVAL_S = 0.5
"""While the watchdog sheds: how often the half-open sessions are given up."""
TRIM_AFTER_SESSIONS = 1000
"""Sessions removed from the table since the last trim that make the next one worth it."""
TRIM_INTERVAL_S = 2.0
"""malloc_trim at most this often (it walks the heap: milliseconds for hundreds of MB)."""


class RingSource:
    """The capture-source interface (engine/io/capture.py) over a ring's consumer side."""

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
        self._area: memoryview | None = None  # the ring's record area, for receive_into
        # Called with `now` when a batch held a packet the capture marked "packets of this
        # ring were dropped just before me" (ring.RECORD_FLAG_LOSS_BEFORE).
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

    def receive_into(self, table: object, now: float) -> int:
        """``read_batch``'s batch handed to ``table.receive_ring`` where it lies in the ring
        (no copy); returns the packets that did not parse."""
        ring = self.ring
        ring.clear_wakeup()
        pos, _count, nbytes = ring.peek_records(self.batch_max)
        self._after_read(now, nbytes)  # before the batch, as read_batch's caller sees it
        errors = 0
        if nbytes:  # records, or a wrap mark alone
            if self._area is None:
                self._area = ring.record_area
            try:
                errors = table.receive_ring(  # type: ignore[attr-defined]
                    self._area, ring.capacity, pos, nbytes, now
                )
            finally:
                ring.release(nbytes)
        return int(errors)

    def pump(self, pump: object, now: float, reads: int) -> int:
        """``reads`` batches (0-2: a second one only while a backlog remains), the table's
        due timers, its drain and the send, in one compiled call (engine/dataplane/pump.pxi):
        ``receive_into``'s bookkeeping around it, done once.  Returns the pump's status."""
        if reads:
            self._last_read = now
            if self.tick is not None:
                self.tick(now)  # before the batch, as receive_into does
        status = int(pump.run(now, reads))  # type: ignore[attr-defined]
        if reads:
            self._backlog = bool(pump.backlog)  # type: ignore[attr-defined]
            self._loss_marks = self.ring.loss_marks  # the pump noted a loss on the table
        return status

    def read_batch(self, now: float) -> list[tuple[float, bytes]]:
        ring = self.ring
        # Clear first: a push after our pop rings again, so nothing is slept through.
        ring.clear_wakeup()
        items = ring.pop_packets(self.batch_max)
        self._after_read(now)
        return items

    def _after_read(self, now: float, held: int = 0) -> None:
        """What follows every read: loss marks, the backlog test, the tick; ``held`` bytes
        were taken in place and are not released yet (they are not a backlog)."""
        ring = self.ring
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
        self._backlog = len(ring) > held
        if self.tick is not None:
            self.tick(now)

    def close(self) -> None:
        if self._area is not None:
            self._area.release()
            self._area = None
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
        # The compiled table counts straight into this row: flushes leave its slots alone.
        self._table_counts_in_row = False
        attach = getattr(self.table, "attach_counters", None)
        if counters is not None and attach is not None:
            names = self.table.counter_names  # type: ignore[attr-defined]
            view = counters.counting_row(self.row, names)  # type: ignore[attr-defined]
            if view is not None:
                attach(view, ENGINE_FIRST)
                self._table_counts_in_row = True

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
            # Checked at most every TRIM_INTERVAL_S whether it trims or not: the compiled
            # table builds its counters on each read, and this runs once per ring batch.
            self._next_trim = now + TRIM_INTERVAL_S
            released = self.table.counters["rel"]  # type: ignore[attr-defined]
            if released - self._released_at_trim >= TRIM_AFTER_SESSIONS:
                self._released_at_trim = released
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
            {} if self._table_counts_in_row else table.counters,  # type: ignore[attr-defined]
            self.sender.counters,  # type: ignore[attr-defined]
            self.channels.counters,  # type: ignore[attr-defined]
            self.counters,
            {
                "active": table.active,  # type: ignore[attr-defined]
                "unsend": table.unsend,  # type: ignore[attr-defined]
                "channels_connected": self.channels.connected,  # type: ignore[attr-defined]
            },
        )

    def close(self) -> None:
        super().close()
        if self._table_counts_in_row:
            # The table lets go of the shared row (the block cannot close while it is held);
            # its counts stay in the table, and a later flush writes them as any table's.
            self._table_counts_in_row = False
            self.table.close()  # type: ignore[attr-defined]

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
