"""The supervisor: forks the capture process and N workers, and keeps them running (design §3).

Theory of operation
-------------------
A gunicorn-style arbiter.  ``Supervisor.run`` builds everything the children share before it
forks: the counter block (metrics.counters.CounterBlock: one row per process), the control
block (engine/io/control.py: heartbeats, "capture done", "shed"), one ring per worker
(engine/io/ring.py, slots sized from -M), one tuple history per worker (engine/io/tuple_history.py:
a restarted worker does not reuse the tuples its dead predecessor left at the target), the
capture sources and one raw send socket per worker (so a missing CAP_NET_RAW is one clear
error at start, and a restarted child inherits the same socket).  Then it forks the capture
process (engine/proc/capture.py) and the workers (engine/proc/worker.py) with os.fork and runs
one loop:

* signal handlers only queue (signal.set_wakeup_fd wakes the loop): SIGTERM/SIGINT stop
  gracefully, SIGHUP reopens the log and is forwarded to the children, SIGCHLD reaps;
* reaping: a dead worker is restarted at once (after a backoff if it died young); its row of
  the counter block is retired first, which adds the sessions it still held (its last
  published ``active``) to ``sessions_lost`` and keeps every counter sum monotonic.  A dead
  live capture process is restarted too; an offline one is not (it would replay the file
  from the start again): the replay ends with what was read, status 1;
* heartbeats: every child writes time.monotonic() at least every ~0.5 s; one silent for more
  than HEARTBEAT_TIMEOUT_S is SIGKILLed (and then restarted by the reaper);
* memory watchdog (-m): the tree's memory (PSS, below) is measured every
  WATCHDOG_INTERVAL_S and estimated in between every WATCHDOG_FAST_S from the processes'
  RSS growth since that measure (one read of /proc/PID/statm each: a SYN flood grew the
  tree by ~40 MB/s, through the whole 90-100 % band between two 2 s measures).  Above
  SHED_FRACTION of the limit the "shed" flag goes up: the capture refuses new sessions
  (``shed_sessions_memory``), the workers refuse new flows too (the SYNs already in their
  rings, taken in before the capture began shedding, start no session: shard.py
  ``refuse_new``) and give up their half-open sessions (``ended_shed_half_open``), which
  stops the growth; below SHED_RESUME_FRACTION (exact
  measures only) it comes down.  Above the limit, the last resort, confirmed by an exact
  measure, the replay stops with one line on stderr and status 1;
* the periodic stats line (spec §3.18 names) is printed from the counter block's totals;
* offline, the replay is complete when the capture process is done and every worker has
  finished (its ring empty, no session left);
* stop: SIGTERM to every child, SIGKILL to those still there after STOP_DEADLINE_S; then the
  final stats line, the one-line summary (engine/io/report.py) and --summary-json (the block's
  totals, same keys as the single-process summary, plus per-process rows);
* systemd (Type=notify, engine/io/notify.py): READY=1 once the capture process and every worker
  have written their first heartbeat of their own (so they booted, and the workers tried
  their intercept connections), STATUS= with each stats line, STOPPING=1 at the stop;
* offline, the progress display (engine/io/report.py Progress) from the capture's file counters;
* --metrics: a Prometheus endpoint served from a thread of this process (see "Metrics and
  fork" below).

Metrics and fork.  The exporter's HTTP thread reads the counter block (TcpcopyCollector over
``CounterBlock.snapshot``) while this process keeps forking (restarts).  fork() copies only
the forking thread: a lock the HTTP thread held at that instant would stay held forever in
the child.  Every snapshot therefore runs under ``_scrape_lock``, and ``_spawn`` holds that
lock across fork(), so no child is ever born in the middle of a scrape; the locks the HTTP
thread takes outside it (the registry's, the socket server's) are never used by a child, and
the logging module re-initialises its own locks at fork.  The child closes its copy of the
listening socket at once, so a port is never held by a process that does not serve it.  A
separate exporter process would avoid the thread but need its own supervision (heartbeat,
restart, memory accounting) and its reads of a row being retired would race with the fold
that the block's in-process lock makes atomic; the thread is the simpler safe choice.

Memory measure.  The sum of the processes' PSS (proportional set size), which counts a page
shared by k processes as 1/k in each: forked children share the parent's pages copy-on-write
and map the same rings, so summing their RSS would count the interpreter N+2 times (about
25 MB each) and each touched ring page up to twice.  PSS includes the touched pages of the
shared-memory blocks, so those are counted once.  Where PSS is unreadable, RSS is used.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import os
import selectors
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from engine import EXIT_RUNTIME, PROG
from engine.core.config import BYTES_PER_MB, ReplayConfig, worker_connections
from engine.io import notify
from engine.io.control import CAPTURE_SLOT, ControlBlock
from engine.io.engines import build_table, resolve_engine
from engine.io.logs import LOGGER_NAME, is_json, reopen_logs
from engine.io.report import stats_lines
from engine.io.sigloop import SignalPipe

log = logging.getLogger(LOGGER_NAME)

HEARTBEAT_TIMEOUT_S = 10.0
"""A child whose heartbeat is older than this is killed and restarted."""
STOP_DEADLINE_S = 5.0
"""After SIGTERM, children get this long to write their last counters and exit."""
WATCHDOG_INTERVAL_S = 2.0
"""Exact memory (PSS) measure period (C checks every 60 s, spec §3.17)."""
WATCHDOG_FAST_S = 0.1
"""Memory estimate period between exact measures (RSS growth: cheap, see the docstring)."""
SHED_FRACTION = 0.90
SHED_RESUME_FRACTION = 0.80
LOOP_WAKE_S = 0.5
"""The loop looks at heartbeats at least this often."""
READY_POLL_S = 0.05
"""Until every child reported in, the loop looks this often (READY=1 is sent promptly)."""
RESTART_YOUNG_S = 1.0
"""A child that dies sooner than this after its start is restarted after a backoff..."""
RESTART_BACKOFF_MIN_S = 0.1
RESTART_BACKOFF_MAX_S = 10.0
"""...doubling from MIN to MAX, so a child that cannot start does not spin the CPU."""

_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1

CAPTURE = "capture"
WORKER = "worker"


@dataclasses.dataclass
class _Child:
    role: str
    index: int  # worker index; 0 for the capture process
    slot: int  # control block slot = counter block row (capture 0, worker i -> 1 + i)
    pid: int = 0
    started_at: float = 0.0
    alive: bool = False
    finished: bool = False  # offline: done for good, not to be restarted
    restart_at: float | None = None
    backoff_s: float = 0.0
    killed_silent: bool = False
    spawn_beat: float = 0.0  # the heartbeat value the supervisor wrote at the fork

    @property
    def name(self) -> str:
        return "capture" if self.role == CAPTURE else f"worker {self.index}"


class Supervisor:
    """Runs the multi-process engine for `cfg` until stopped; ``run()`` returns the status.

    Test seams: `sender_factory(worker_index)` makes a worker's sender (default: a RawSender),
    `sources_factory(cfg, prefilter)` the capture sources (default: capture.build_sources),
    `channels_factory(selector, on_records)` a worker's intercept channels, `counters` an
    existing CounterBlock with cfg.workers worker rows (the caller then owns it),
    `memory_usage()` the bytes the watchdog compares with -m.
    """

    def __init__(
        self,
        cfg: ReplayConfig,
        *,
        sender_factory: Callable[[int], object] | None = None,
        sources_factory: Callable[[ReplayConfig, object], list] | None = None,
        channels_factory: Callable[..., object] | None = None,
        counters: Any = None,
        memory_usage: Callable[[], int] | None = None,
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
        stop_deadline_s: float = STOP_DEADLINE_S,
        watchdog_interval_s: float = WATCHDOG_INTERVAL_S,
        ring_capacity: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.workers = max(1, cfg.workers)
        # --engine: resolved once here, so the children (forked) all run the same one.
        self.engine, self.engine_notice = resolve_engine(cfg.engine)
        self.sender_factory = sender_factory
        self.sources_factory = sources_factory
        self.channels_factory = channels_factory
        self.block = counters
        self._own_block = counters is None
        if counters is not None and counters.workers != self.workers:
            raise ValueError(
                f"counter block has {counters.workers} worker rows, not {self.workers}"
            )
        self.memory_usage = memory_usage or tree_memory_bytes
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.stop_deadline_s = stop_deadline_s
        self.watchdog_interval_s = watchdog_interval_s
        # The fast estimate (module docstring): the last exact measure and the tree's RSS
        # then; with a memory_usage seam (tests) the seam is asked every time.
        self._seam_memory = memory_usage is not None
        self._exact_bytes = 0
        self._rss_at_exact = 0
        self.memory_peak_bytes = 0
        self._shed_estimated = False  # the shed flag was raised by an estimate, unconfirmed
        self.ring_capacity = ring_capacity
        self.clock = clock
        self.control: ControlBlock | None = None
        self.rings: list = []
        self.histories: list = []
        self.sources: list = []
        self.senders: list = []
        self.prefilter: Any = None
        self.children: list[_Child] = []
        self.exit_reason = ""
        self.exit_code = 0
        self.capture_restarts = 0
        self._capture_lost = False
        self._input_error = False  # offline: the capture stopped at a broken file
        self.started_at = 0.0
        self._stopping = False
        self._signals = SignalPipe(
            (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD), ignore_sigpipe=True
        )
        self._sel: selectors.BaseSelector | None = None
        self._pid = os.getpid()
        self.exporter: Any = None  # the --metrics HTTP server (server_address: bound address)
        self._scrape_lock = threading.Lock()  # see "Metrics and fork" in the module docstring
        self.ready = False  # READY=1 was sent (every child reported in)
        self.progress: Any = None  # engine.io.report.Progress for an offline replay

    # -- set-up -----------------------------------------------------------------------------

    def _setup(self) -> None:
        from engine.io import capture
        from engine.io.capture import build_sources
        from engine.io.ring import Ring
        from engine.io.tuple_history import TupleHistory
        from engine.proc.capture import ring_bytes, ring_max_packet
        from metrics.counters import CounterBlock

        cfg = self.cfg
        self._pid = os.getpid()
        if self.block is None:
            self.block = CounterBlock.create(workers=self.workers)
        self._start_exporter()  # first: a busy --metrics port fails before anything is built
        self.control = ControlBlock(self.workers)
        max_packet = ring_max_packet(cfg.session.mtu)
        capacity = self.ring_capacity or ring_bytes(cfg)
        self.rings = [Ring.create(capacity, max_packet) for _ in range(self.workers)]
        log.info(
            "rings: %d x %.1f MB of records, packets up to %d bytes (%s)",
            self.workers,
            capacity / BYTES_PER_MB,
            max_packet,
            "--ring-size" if cfg.ring_bytes else "derived from the load",
        )
        self.histories = [TupleHistory.create() for _ in range(self.workers)]
        self.prefilter = capture.TransferFilter.for_transfers(
            cfg.session.transfers, cfg.capture_filter
        )
        if cfg.capture_filter:
            log.info(
                "-F %r: %d instructions, run after the -x selection",
                cfg.capture_filter,
                len(self.prefilter.user_program),
            )
        make_sources = self.sources_factory or build_sources
        self.sources = list(make_sources(cfg, self.prefilter))
        if self.sender_factory is None:
            from engine.io.send import build_senders

            self.senders = build_senders(self.workers, cfg)
        else:
            self.senders = [self.sender_factory(i) for i in range(self.workers)]
        self.children = [_Child(CAPTURE, 0, CAPTURE_SLOT)] + [
            _Child(WORKER, i, ControlBlock.worker_slot(i)) for i in range(self.workers)
        ]

    def _start_exporter(self) -> None:
        """--metrics: serve the counter block (ConfigError naming --metrics if it cannot bind)."""
        if self.cfg.metrics is None:
            return
        from engine import __version__
        from metrics.exporter import (
            BuildInfoCollector,
            TcpcopyCollector,
            make_registry,
            start_exporter,
        )

        host, port = self.cfg.metrics
        registry = make_registry(
            TcpcopyCollector(self._scrape_snapshot),
            BuildInfoCollector(engine=self.engine, version=__version__),
        )
        self.exporter = start_exporter(f"{host}:{port}", registry)
        bound = self.exporter.server_address
        log.info("Prometheus metrics on http://%s:%d/metrics", bound[0], bound[1])

    def _scrape_snapshot(self) -> dict[str, Any]:
        """The HTTP thread's read of the counter block (under the fork guard)."""
        assert self.block is not None
        with self._scrape_lock:
            return self.block.snapshot()

    def _stop_exporter(self) -> None:
        if self.exporter is not None:
            self.exporter.shutdown()
            self.exporter.server_close()
            self.exporter = None

    def _teardown(self) -> None:
        self._stop_exporter()
        for sender in self.senders:
            close = getattr(sender, "close", None)
            if close is not None:
                close()
        for src in self.sources:
            src.close()
        for ring in self.rings:
            ring.close()
        self.rings = []
        for history in self.histories:
            history.close()
        self.histories = []
        if self.block is not None and self._own_block:
            self.block.close()
            self.block.unlink()
        self._signals.close()
        if self._sel is not None:
            self._sel.close()

    def _install_signal_handlers(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._signals.install(), selectors.EVENT_READ)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        cfg = self.cfg
        try:
            self._setup()
        except BaseException:
            self._teardown()
            raise
        try:
            self._install_signal_handlers()
            now = self.clock()
            self.started_at = now
            if self.engine_notice:
                log.warning(
                    "--engine auto: running the Python engine (several times slower): %s",
                    self.engine_notice,
                )
            log.info(
                "tcpcopy-mp starts: %s engine, capture %s, %d worker(s) (--sched %s), "
                "%d intercept(s) x %d connection(s), -x %d entr%s",
                self.engine,
                cfg.capture,
                self.workers,
                cfg.sched,
                len(cfg.intercepts),
                sum(
                    worker_connections(cfg.connections, self.workers, i)
                    for i in range(self.workers)
                ),
                len(cfg.session.transfers),
                "y" if len(cfg.session.transfers) == 1 else "ies",
            )
            if cfg.capture == "offline":
                from engine.io.report import PLAIN_INTERVAL_S, Progress

                self.progress = Progress(
                    log, plain_interval_s=min(PLAIN_INTERVAL_S, cfg.stats_interval_s)
                )
                self.progress.attach()
            # One memory check before any child exists: a tree already above 90 % of -m
            # starts shedding before the first packet is captured, not one interval later.
            self._watchdog()
            for child in self.children:
                self._spawn(child, now)
            self._loop()
        finally:
            notify.stopping(f"stopping: {self.exit_reason or 'start-up failed'}")
            self._stop_children()
            summary = self.summary()
            if self.progress is not None and self.block is not None:
                self.progress.finish(self.block.snapshot()["totals"], self.clock())
            self.log_stats(final=True)
            self.log_final_summary()
            log.info("tcpcopy-mp exits: %s (%s engine)", self.exit_reason, self.engine)
            if cfg.summary_json:
                from engine.io.privileges import write_summary  # in place if kept at the drop

                try:
                    write_summary(cfg.summary_json, summary)
                except OSError as exc:
                    log.error("--summary-json %s: %s", cfg.summary_json, exc.strerror or exc)
            self._teardown()
        return self.exit_code

    def _loop(self) -> None:
        assert self._sel is not None
        now = self.clock()
        next_stats = now + self.cfg.stats_interval_s
        next_watchdog = now
        next_fast = now
        while True:
            self._handle_signals()
            self._reap(now)
            if self._stopping:
                return
            if self._offline_complete():
                if self._input_error:
                    self.stop("a broken input file; the replay is incomplete", EXIT_RUNTIME)
                elif self._capture_lost:
                    self.stop("offline capture died; the replay is incomplete", EXIT_RUNTIME)
                else:
                    self.stop("offline replay is complete")
                return
            for child in self.children:
                if child.restart_at is not None and child.restart_at <= now:
                    self._spawn(child, now)
            self._check_heartbeats(now)
            if now >= next_watchdog:
                next_watchdog = now + self.watchdog_interval_s
                next_fast = now + WATCHDOG_FAST_S
                self._watchdog()
                if self._stopping:
                    return
            elif now >= next_fast:
                next_fast = now + WATCHDOG_FAST_S
                self._watchdog_fast()
                if self._stopping:
                    return
            if now >= next_stats:
                next_stats = now + self.cfg.stats_interval_s
                self.log_stats()
            if not self.ready and self._all_reported_in():
                self._notify_ready()
            if self.progress is not None and self.progress.due(now):
                assert self.block is not None
                self.progress.update(self.block.snapshot()["totals"], now)
            wake = min(
                [now + LOOP_WAKE_S, next_stats, next_watchdog, next_fast]
                + [c.restart_at for c in self.children if c.restart_at is not None]
                + ([self.progress.next_due()] if self.progress is not None else [])
                + ([now + READY_POLL_S] if not self.ready else [])
            )
            for _key, _mask in self._sel.select(max(0.0, wake - now)):
                self._signals.drain()
            now = self.clock()

    def stop(self, reason: str, code: int = 0) -> None:
        if not self._stopping:
            self._stopping = True
            self.exit_reason = reason
            self.exit_code = code

    def _handle_signals(self) -> None:
        while (signum := self._signals.pop()) is not None:
            if signum == signal.SIGHUP:
                reopen_logs()
                log.info("SIGHUP: log file reopened")
                self._signal_children(signal.SIGHUP)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.stop(f"stopped by {signal.Signals(signum).name}")
            # SIGCHLD only wakes the loop; _reap looks at every child.

    def _all_reported_in(self) -> bool:
        """Every child wrote a heartbeat of its own since its fork (or has finished)."""
        assert self.control is not None
        return all(
            c.finished or (c.alive and self.control.last_beat(c.slot) > c.spawn_beat)
            for c in self.children
        )

    def _notify_ready(self) -> None:
        self.ready = True
        text = f"replicating: capture and {self.workers} worker(s) up"
        log.info("ready: %s", text)
        notify.ready(text)

    def _signal_children(self, signum: int) -> None:
        for child in self.children:
            if child.alive:
                try:
                    os.kill(child.pid, signum)
                except ProcessLookupError:
                    pass

    def _offline_complete(self) -> bool:
        capture, workers = self.children[0], self.children[1:]
        return capture.finished and all(w.finished for w in workers)

    # -- children ---------------------------------------------------------------------------

    def _spawn(self, child: _Child, now: float) -> None:
        assert self.control is not None
        child.restart_at = None
        child.killed_silent = False
        self.control.beat(child.slot, now)  # start-up time counts against the heartbeat
        child.spawn_beat = self.control.last_beat(child.slot)
        # What this process holds now outlives the fork in the child: in the collector's
        # permanent generation, a collection in the child never writes to those objects'
        # headers, so their pages stay shared with this process instead of being copied.
        gc.freeze()
        # No fork in the middle of a scrape ("Metrics and fork"); released on both sides.
        self._scrape_lock.acquire()
        try:
            pid = os.fork()
        finally:
            self._scrape_lock.release()
        if pid == 0:
            code = EXIT_RUNTIME
            try:
                code = self._child_main(child)
            except BaseException:
                try:
                    log.exception("%s crashed", child.name)
                except BaseException:
                    pass
            finally:
                os._exit(code)
        child.pid = pid
        child.alive = True
        child.started_at = now
        log.info("%s started (pid %d)", child.name, pid)

    def _reap(self, now: float) -> None:
        for child in self.children:
            if not child.alive:
                continue
            try:
                pid, status = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = child.pid, 0
            if pid == 0:
                continue
            child.alive = False
            self._on_child_exit(child, os.waitstatus_to_exitcode(status), now)

    def _on_child_exit(self, child: _Child, code: int, now: float) -> None:
        assert self.control is not None and self.block is not None
        how = f"exited with status {code}" if code >= 0 else f"killed by {_signame(-code)}"
        if self._stopping:
            log.info("%s (pid %d) %s", child.name, child.pid, how)
            return
        done = self.control.capture_done
        if child.role == CAPTURE:
            if code == 0 and done:
                child.finished = True
                log.info("capture (pid %d) finished: offline capture is complete", child.pid)
                return
            self.block.retire(self.block.capture_row)
            if self.cfg.capture == "offline":
                # Restarting would replay the file from its first packet again.
                from engine.proc.capture import EXIT_INPUT_ERROR

                if code == EXIT_INPUT_ERROR:  # the capture logged the file's defect
                    self._input_error = True
                    log.warning("the offline replay ends with the packets read before it")
                else:
                    log.error(
                        "capture (pid %d) %s; the offline replay ends with the packets read so far",
                        child.pid,
                        how,
                    )
                self.control.mark_capture_done()
                child.finished = True
                self._capture_lost = True
                return
            self.capture_restarts += 1
            log.warning("capture (pid %d) %s; restarting it", child.pid, how)
            self._schedule_restart(child, now)
            return
        if code == 0 and done:
            child.finished = True
            log.info("%s (pid %d) finished", child.name, child.pid)
            return
        from metrics.counters import WORKER_RESTARTS

        row = self.block.worker_row(child.index)
        dead = self.block.retire(row)
        lost = max(0, int(dead.get("active", 0)))
        self.block.writer(self.block.supervisor_row).add(WORKER_RESTARTS)
        log.warning(
            "%s (pid %d) %s; restarting it (%d session%s lost)",
            child.name,
            child.pid,
            how,
            lost,
            "" if lost == 1 else "s",
        )
        self._schedule_restart(child, now)

    def _schedule_restart(self, child: _Child, now: float) -> None:
        if now - child.started_at < RESTART_YOUNG_S:
            child.backoff_s = min(
                max(child.backoff_s * 2, RESTART_BACKOFF_MIN_S), RESTART_BACKOFF_MAX_S
            )
        else:
            child.backoff_s = 0.0
        child.restart_at = now + child.backoff_s

    def _check_heartbeats(self, now: float) -> None:
        assert self.control is not None
        for child in self.children:
            if not child.alive or child.killed_silent:
                continue
            silent_s = now - max(self.control.last_beat(child.slot), child.started_at)
            if silent_s > self.heartbeat_timeout_s:
                log.warning(
                    "%s (pid %d) silent for %.1f s (heartbeat timeout %.1f s): killing it",
                    child.name,
                    child.pid,
                    silent_s,
                    self.heartbeat_timeout_s,
                )
                child.killed_silent = True
                try:
                    os.kill(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _stop_children(self) -> None:
        """SIGTERM every child, SIGKILL what is left after the deadline, reap all."""
        self._stopping = True
        if not self.children:
            return
        self._signal_children(signal.SIGTERM)
        deadline = self.clock() + self.stop_deadline_s
        while any(c.alive for c in self.children):
            now = self.clock()
            self._reap(now)
            if not any(c.alive for c in self.children):
                break
            if now >= deadline:
                for child in self.children:
                    if child.alive:
                        log.warning(
                            "%s (pid %d) still running %.1f s after SIGTERM: SIGKILL",
                            child.name,
                            child.pid,
                            self.stop_deadline_s,
                        )
                        try:
                            os.kill(child.pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                for child in self.children:
                    if child.alive:
                        try:
                            os.waitpid(child.pid, 0)
                        except ChildProcessError:
                            pass
                        child.alive = False
                break
            if self._sel is not None:
                for _ in self._sel.select(min(LOOP_WAKE_S, max(0.0, deadline - now))):
                    self._signals.drain()
            else:
                time.sleep(0.01)  # no wake-up fd (set-up failed): a plain reap poll

    # -- what runs in a child ---------------------------------------------------------------

    def _child_main(self, child: _Child) -> int:
        # Back to default dispositions: the child installs its own handlers.
        self._signals.reset_in_child()
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        if self.exporter is not None:
            # The HTTP thread did not survive the fork; its listening socket must not either.
            self.exporter.socket.close()
            self.exporter = None
        self.progress = None
        _prctl_pdeathsig(signal.SIGTERM)
        if os.getppid() != self._pid:  # the supervisor died before the prctl took effect
            return EXIT_RUNTIME
        short = "tcmp-capture" if child.role == CAPTURE else f"tcmp-worker{child.index}"
        _prctl_set_name(short)
        log.addFilter(_Prefix(f"{child.name}: "))
        if child.role == CAPTURE:
            return self._capture_main()
        return self._worker_main(child.index)

    def _capture_main(self) -> int:
        from engine.io.ring import Ring
        from engine.proc.capture import CaptureProcess

        for sender in self.senders:
            close = getattr(sender, "close", None)
            if close is not None:
                close()
        rings = [Ring.attach(r.spec()) for r in self.rings]
        # An engine switch set to "python" selects the Python walk; otherwise the compiled
        # one runs where engine.dataplane is built.
        python_engine = getattr(self.cfg, "engine", None) == "python"
        proc = CaptureProcess(
            self.sources,
            rings,
            self.cfg.session.mtu,
            prefilter_counters=self.prefilter.counters,
            counters=self.block,
            control=self.control,
            clock=self.clock,
            compiled=False if python_engine else None,
        )
        proc.install_signal_handlers()
        return proc.run()

    def _worker_main(self, index: int) -> int:
        from engine.io import sched
        from engine.io.ring import Ring
        from engine.proc.worker import RingSource, WorkerProcess

        # First, so that any thread the worker starts inherits it (engine/io/sched.py).
        applied = sched.apply(self.cfg.sched)
        if applied.note:
            log.log(
                logging.WARNING if applied.refused else logging.INFO,
                "worker %d: --sched %s: %s; it runs under the %s policy",
                index,
                self.cfg.sched,
                applied.note,
                applied.policy,
            )
        for src in self.sources:
            src.close()
        for i, sender in enumerate(self.senders):
            close = getattr(sender, "close", None)
            if i != index and close is not None:
                close()
        # -C is the whole tree's (C's per process): this worker keeps its share of it.
        share = worker_connections(self.cfg.connections, self.workers, index)
        cfg = dataclasses.replace(self.cfg, connections=share)
        session = dataclasses.replace(cfg.session, worker_index=index, worker_count=self.workers)
        history = self.histories[index] if self.histories else None
        if history is not None:
            carried = history.adopt(self.clock(), session.time_wait_s)
            if carried:
                log.info(
                    "%d tuple slot(s) its previous incarnation used stay out of use for "
                    "%.0f s (the target may still hold them)",
                    carried,
                    session.time_wait_s,
                )
        table = build_table(self.engine, session, history)
        source = RingSource(Ring.attach(self.rings[index].spec()), self.control)
        source.on_loss = table.note_capture_loss
        kw: dict[str, Any] = {"clock": self.clock}
        if self.channels_factory is not None:
            kw["channels"] = self.channels_factory
        worker = WorkerProcess(
            index,
            cfg,
            table,
            source,
            self.senders[index],
            counters=self.block,
            control=self.control,
            **kw,
        )
        worker.install_signal_handlers()
        # Ctrl-C reaches the whole process group; the supervisor decides and sends SIGTERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return worker.run()
        finally:
            worker.flush_counters()
            worker.close()

    # -- memory watchdog --------------------------------------------------------------------

    def _tree_pids(self) -> list[int]:
        return [self._pid, *(c.pid for c in self.children if c.alive)]

    def _watchdog_fast(self) -> None:
        """The estimate between exact measures: the last one plus the RSS grown since."""
        if self._seam_memory:
            self._watchdog()
            return
        used = self._exact_bytes + rss_sum(self._tree_pids()) - self._rss_at_exact
        limit = self.cfg.memory_limit_mb * BYTES_PER_MB
        if used > limit:
            self._watchdog()  # exit is the last resort: only on an exact measure
        elif used > SHED_FRACTION * limit and not self.control.shed:  # type: ignore[union-attr]
            self._judge_memory(used, exact=False)

    def _watchdog(self) -> None:
        used = int(self.memory_usage())
        if not self._seam_memory:
            self._exact_bytes = used
            self._rss_at_exact = rss_sum(self._tree_pids())
        self._judge_memory(used, exact=True)

    def _judge_memory(self, used: int, exact: bool) -> None:
        from metrics.counters import RSS_BYTES

        assert self.control is not None and self.block is not None
        limit_mb = self.cfg.memory_limit_mb
        limit = limit_mb * BYTES_PER_MB
        self.memory_peak_bytes = max(self.memory_peak_bytes, used)
        self.block.writer(self.block.supervisor_row).set(RSS_BYTES, used)
        if used > limit and exact:
            message = (
                f"memory limit exceeded: {used // BYTES_PER_MB} MB in use by "
                f"{1 + sum(c.alive for c in self.children)} processes, limit -m {limit_mb} MB; "
                "stopping"
            )
            log.error("%s", message)
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)
            self.stop("memory limit exceeded (-m)", EXIT_RUNTIME)
        elif used > SHED_FRACTION * limit:
            if exact:
                self._shed_estimated = False
            if not self.control.shed:
                self.control.shed = True
                self._shed_estimated = not exact
                log.warning(
                    "memory %d MB%s is above %d %% of -m %d MB: new sessions are refused at "
                    "the capture (shed_sessions_memory) and half-open ones given up",
                    used // BYTES_PER_MB,
                    "" if exact else " (estimated)",
                    round(SHED_FRACTION * 100),
                    limit_mb,
                )
        elif (
            exact
            and self.control.shed
            # An estimate counts pages shared by several processes once in each: a flag it
            # raised comes down at the first exact measure that does not confirm it.
            and (used < SHED_RESUME_FRACTION * limit or self._shed_estimated)
        ):
            self.control.shed = False
            log.info(
                "memory %d MB is below %d %% of -m %d MB: new sessions are accepted again",
                used // BYTES_PER_MB,
                round(SHED_RESUME_FRACTION * 100),
                limit_mb,
            )

    # -- reporting --------------------------------------------------------------------------

    def summary(self) -> dict[str, object]:
        """The merged counters of every process (the single-process summary's keys) plus
        per-process rows (non-zero values only) under per_worker / capture / supervisor."""
        out: dict[str, object] = {}
        if self.block is not None:
            snap = self.block.snapshot()
            out.update(snap["totals"])
            out["per_worker"] = [_nonzero(row) for row in snap["workers"]]
            out["capture"] = _nonzero(snap["capture"])
            out["supervisor"] = _nonzero(snap["supervisor"])
        out["workers"] = self.workers
        out["engine"] = self.engine
        out["sched"] = self.cfg.sched
        out["capture_restarts"] = self.capture_restarts
        out["shedding"] = bool(self.control is not None and self.control.shed)
        out["uptime_s"] = round(self.clock() - self.started_at, 3) if self.started_at else 0.0
        out["memory_peak_mb"] = round(self.memory_peak_bytes / BYTES_PER_MB, 1)
        out["exit_reason"] = self.exit_reason
        return out

    def log_stats(self, final: bool = False) -> None:
        if self.block is None:
            return

        values = self.summary()
        if self.ready and not final:
            notify.status(_status_text(values))
        if any(is_json(h) for h in log.handlers):
            log.info("stats", extra={"stats": values, "final": final})
            return
        for line in stats_lines(values):
            log.info("%s", line)

    def log_final_summary(self) -> None:
        """One line (text) or one JSON object (json): sessions, requests, fidelity, drops."""
        if self.block is None:
            return
        from engine.io.report import final_summary, summary_text

        summary = final_summary(self.block.snapshot()["totals"])
        if any(is_json(h) for h in log.handlers):
            log.info("summary", extra={"summary": summary})
        else:
            log.info("%s", summary_text(summary))


def run(cfg: ReplayConfig) -> int:
    """The CLI's entry point: the multi-process engine for cfg (OSError at set-up escapes)."""
    return Supervisor(cfg).run()


# --------------------------------------------------------------------------------------------


def tree_memory_bytes(pid: int | None = None) -> int:
    """PSS (RSS where unreadable) summed over a process and all its descendants, from
    /proc (smaps_rollup, statm): no psutil in the process tree."""
    root = os.getpid() if pid is None else pid
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for proc in [root, *_descendants(root)]:
        try:
            with open(f"/proc/{proc}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
            continue
        except (OSError, IndexError, ValueError):
            pass
        try:
            with open(f"/proc/{proc}/statm", "rb") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue  # it exited meanwhile
    return total


def _descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``: /proc/PID/task/TID/children of each of its threads, or,
    on a kernel built without those files (CONFIG_PROC_CHILDREN), each process's parent read
    from /proc/*/stat."""
    if not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"):
        return _descendants_by_stat(pid)
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children", "rb") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def _descendants_by_stat(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])  # after "(comm)": state ppid
        except (OSError, ValueError, IndexError):
            continue  # it exited meanwhile
        children.setdefault(ppid, []).append(int(name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def rss_sum(pids: list[int]) -> int:
    """The resident bytes of these processes, one /proc/PID/statm read each (no psutil:
    this runs ten times a second); a process that is gone counts 0."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


def _status_text(values: dict[str, object]) -> str:
    """systemd's STATUS= line: what `systemctl status tcpcopy-mp` shows."""
    from engine.io.report import fidelity_percent

    fidelity = fidelity_percent(values)  # type: ignore[arg-type]
    return (
        f"active {values.get('active', 0)}, sessions {values.get('conns', 0)}, "
        f"requests {values.get('requests', 0)}, fidelity "
        + ("n/a" if fidelity is None else f"{fidelity:.1f} %")
    )


def _nonzero(row: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in row.items() if v}


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _Prefix(logging.Filter):
    """Prefixes a child's log messages with its role ("worker 2: ...")."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"{self.prefix}{record.msg}"
        return True


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _prctl_pdeathsig(signum: int) -> None:
    """The kernel sends `signum` to this child when the supervisor dies (even by SIGKILL)."""
    try:
        _libc().prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _prctl_set_name(name: str) -> None:
    """The process name `ps`/`top` show (15 bytes at most)."""
    try:
        _libc().prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass
