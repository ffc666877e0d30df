"""``intercept-mp``: the command line (spec §4.2, design §8) and the process lifecycle.

Mode selection (design §8): ``--queue-num N`` runs the NFQUEUE (traditional) mode, as do
``-x``, ``-q`` or ``--install-rule`` without ``-F``; otherwise the pcap (advanced) mode runs
and needs ``-F`` like C's default build (spec §2.1).

Exit status: 0 after SIGTERM/SIGINT (a final stats line is logged), 2 for any bad flag (one
line on stderr naming it, never a traceback), 1 when start-up fails at run time (port in
use, no capture device, NFQUEUE not bindable, iptables refused the rule).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from engine.app.options import (
    OneLineArgumentParser,
    add_schema_arguments,
    config_path,
    read_config_file,
)
from engine.codec import wire
from engine.errors import ConfigError
from engine.io import notify
from engine.io.logs import NOTICE, reopen_logs, setup_logging
from engine.io.sigloop import daemonize
from intercept import PROG
from intercept.config import (
    _PROC,
    DEFAULT_DAEMON_LOG,
    INTERCEPT_OPTIONS,
    INTERCEPT_SECTIONS,
    MISSING_FILTER,
    InterceptOptions,
)
from intercept.errors import InterceptError, StartError

__all__ = ["INTERCEPT_SECTIONS", "InterceptOptions", "main", "parse_args", "version_string"]

LOGGER_NAME = "intercept"


def version_string() -> str:
    try:
        from importlib.metadata import version

        ours = version("tcpcopy-mp")
    except Exception:
        from engine import __version__ as ours
    return f"{PROG} version:{ours} (compat 1.0, protocol {wire.INTERNAL_VERSION})"


class _Parser(OneLineArgumentParser):
    """argparse with one-line errors (no usage block): ``intercept-mp: <flag>: message``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Capture the target's responses and stream their headers to tcpcopy "
        "(TCPCopy 1.0 intercept, wire-compatible).",
        epilog="pcap mode: intercept-mp -i eth0 -F 'tcp and src port 8080'   "
        "NFQUEUE mode: intercept-mp --queue-num 0 --install-rule 8080",
    )
    p.add_argument("-v", "--version", action="version", version=version_string())
    groups = add_schema_arguments(p, INTERCEPT_OPTIONS, INTERCEPT_SECTIONS)
    groups[_PROC].add_argument(
        "--config", metavar="FILE", help="TOML file: its [intercept] table (flags win)"
    )
    groups[_PROC].add_argument(
        "--user",
        metavar="NAME",
        help="run as this user after start-up, keeping only CAP_NET_ADMIN and CAP_NET_RAW "
        "(default when root: tcpcopy if it exists, else nobody; 'root' keeps root)",
    )
    groups[_PROC].add_argument(
        "--group", metavar="NAME", help="with --user: this group (default: the user's)"
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> InterceptOptions:
    """Parse and validate; exits 2 with one line on any bad flag (argparse's ``exit``)."""
    parser = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    path = config_path(argv)
    if path:
        # The file's values become the parser's defaults, so a flag given overrides them;
        # each is checked now by the flag's own converter (errors name the file line).
        try:
            values = read_config_file(path, "intercept", INTERCEPT_OPTIONS).typed(INTERCEPT_OPTIONS)
        except ConfigError as e:
            parser.exit(2, f"{PROG}: {e}\n")
        parser.set_defaults(**values)
    a = parser.parse_args(argv)
    nfqueue_flags = [
        flag
        for flag, given in (
            ("--queue-num", a.queue_num is not None),
            ("-x", a.pass_ips is not None),
            ("-q", a.queue_maxlen is not None),
            ("--install-rule", a.install_rule is not None),
        )
        if given
    ]
    if a.filter is not None or a.interfaces is not None:
        if nfqueue_flags:
            # C: -x/-q do not exist in the pcap build, nor -i/-F in the traditional one.
            parser.error(f"{nfqueue_flags[0]}: NFQUEUE mode only; it cannot be used with -i/-F")
        mode = "pcap"
    else:
        mode = "nfqueue" if nfqueue_flags else "pcap"
    if mode == "pcap" and a.filter is None:
        parser.exit(2, f"{MISSING_FILTER}\n")
    from engine.io.privileges import resolve_target

    try:
        resolve_target(a.user, a.group)  # a bad --user/--group is a usage error, now
    except ConfigError as e:
        parser.exit(2, f"{PROG}: {e}\n")
    secret = None
    if a.secret_file is not None:
        from engine.io.secret import load_secret_file

        try:
            secret = load_secret_file("--secret-file", a.secret_file)
        except ConfigError as e:
            parser.exit(2, f"{PROG}: {e}\n")
    return InterceptOptions(
        mode=mode,
        devices=a.interfaces or (),
        filter_expr=a.filter,
        pass_ips=a.pass_ips or (),
        queue_maxlen=a.queue_maxlen,
        queue_num=a.queue_num or 0,
        install_rule=a.install_rule or (),
        combine=max(1, a.combine),
        port=a.port,
        bind=a.bind,
        delay_table_size=a.delay_table_size,
        docker_map=a.docker_map,
        protect=a.protect,
        log_path=a.log_path,
        log_format=a.log_format,
        log_level=a.log_level,
        daemon=a.daemon,
        # Absolute: the daemon chdirs to / before it writes them.
        pid_file=os.path.abspath(a.pid_file) if a.pid_file else None,
        summary_json=os.path.abspath(a.summary_json) if a.summary_json else None,
        secret=secret,
        allow_compat=a.allow_compat,
        max_routes_per_conn=a.max_routes_per_conn or None,
        engine=_check_engine(parser, a.engine, mode),
        sched=a.sched,
        metrics=a.metrics,
        user=a.user,
        group=a.group,
    )


def _check_engine(parser: argparse.ArgumentParser, engine: str, mode: str) -> str:
    """--engine compiled where the compiled response path cannot run: one line, exit 2."""
    if engine != "compiled":
        return engine
    if mode != "nfqueue":
        parser.error("--engine: compiled is the NFQUEUE response path, not for the pcap mode")
    from intercept.fastroute import compiled_available

    built, why = compiled_available()
    if not built:
        parser.error(f"--engine: the compiled response path is not available: {why}")
    return engine


def resolve_engine(opts: InterceptOptions) -> tuple[str, str]:
    """("compiled" | "python", why auto did not take the compiled path or "")."""
    if opts.engine == "python":
        return "python", ""
    if opts.mode != "nfqueue":
        return "python", ""  # auto: the compiled path is NFQUEUE's (no notice)
    from intercept.fastroute import compiled_available

    built, why = compiled_available()
    return ("compiled", "") if built else ("python", why)


_LEVELS = {"debug": 10, "info": 20, "notice": NOTICE, "warn": 30, "error": 40}


def _fail(log: logging.Logger, message: str) -> int:
    """A start-up failure: logged, and also one line on stderr when the log is a file."""
    log.error("%s", message)
    if any(getattr(h, "path", None) for h in log.handlers):  # engine.io.logs' file handler
        print(f"{PROG}: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "doctor":
        from intercept.doctor import main as doctor_main

        return doctor_main(args[1:])
    opts = parse_args(args)
    log_path = opts.log_path
    if opts.daemon and log_path is None:
        log_path = DEFAULT_DAEMON_LOG
    if log_path is not None:
        log_path = os.path.abspath(log_path)  # the daemon chdirs to /
    try:
        log = setup_logging(log_path, opts.log_format, _LEVELS[opts.log_level], LOGGER_NAME)
    except OSError as e:
        print(f"{PROG}: -l: cannot open log file {log_path}: {e.strerror or e}", file=sys.stderr)
        return 2
    logging.addLevelName(NOTICE, "NOTICE")
    try:
        return _run(opts, log)
    except Exception as e:
        log.debug("internal error", exc_info=True)
        return _fail(log, f"internal error: {type(e).__name__}: {e}")


def _run(opts: InterceptOptions, log: logging.Logger) -> int:
    """Start in phases, serve, stop; a failed phase is one line (``_fail``) and exit 1."""
    life = _Lifecycle(opts, log)
    try:
        life.start()
        return life.serve()
    except InterceptError as e:
        return _fail(log, str(e))
    finally:
        life.close()


class _Lifecycle:
    """intercept-mp's run, phase by phase (each phase raises an ``InterceptError`` naming the
    flag concerned; ``close`` undoes whatever was done, in reverse order):

    1. ``listen``: the tcpcopy port (-b, -p);
    2. ``open_source``: the NFQUEUE queue or the pcap handles (-i, -F, --queue-num);
    3. ``install_rules``: --install-rule's iptables rules (NFQUEUE mode);
    4. ``detach``: -d's double fork, then -P's pid file;
    5. ``drop_privileges``: least privilege (engine/io/privileges.py), before any thread;
    6. ``start_exporter``: --metrics (a thread, so after the fork and the drop);
    then ``serve`` runs the loop until a signal, and writes the summary.
    """

    def __init__(self, opts: InterceptOptions, log: logging.Logger) -> None:
        # Imported here so --help/--version and flag errors never need the live packages.
        from intercept.router import Router
        from intercept.server import InterceptServer

        self.opts = opts
        self.log = log
        self.engine, why = resolve_engine(opts)
        if why:
            log.log(NOTICE, "--engine auto: the python response path runs: %s", why)
        router: Router
        if self.engine == "compiled":
            from intercept.fastroute import CompiledRouter
            from intercept.sources import nfqueue

            router = CompiledRouter(
                max_routes_per_conn=opts.max_routes_per_conn,
                recv_max=nfqueue.BATCH_MAX_PACKETS,
                recv_bytes=nfqueue.NETLINK_RECV_BYTES,
            )
            if opts.docker_map:
                router.table.set_docker(*opts.docker_map)  # the server's -D, done in C
        else:
            router = Router(max_routes_per_conn=opts.max_routes_per_conn)
        self.server = InterceptServer(
            router,
            bind_ip=opts.bind,
            port=opts.port,
            combine=opts.combine,
            docker_map=opts.docker_map,
            secret=opts.secret,
            allow_compat=opts.allow_compat,
        )
        self.address: tuple[str, int] = (opts.bind, opts.port)
        self.source: Any = None
        self.installed: list[int] = []
        self.pid_written = False
        self.exporter: Any = None
        self.sched = "normal"  # the policy set_sched leaves
        # Until the loop installs its own handlers, a SIGTERM/SIGINT still ends us cleanly
        # (the iptables rule removed): the stop is remembered and run() returns at once.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.server.request_stop(f"signal {signum}"))

    def start(self) -> None:
        self.set_sched()
        self.listen()
        self.open_source()
        self.install_rules()
        self.detach()
        self.drop_privileges()
        self.start_exporter()

    def set_sched(self) -> None:
        """--sched, before any thread or fork (both inherit it): engine/io/sched.py."""
        from engine.io import sched

        applied = sched.apply(self.opts.sched)
        self.sched = applied.policy
        if applied.note:
            self.log.log(
                logging.WARNING if applied.refused else logging.INFO,
                "--sched %s: %s; intercept-mp runs under the %s policy",
                self.opts.sched,
                applied.note,
                applied.policy,
            )

    def listen(self) -> None:
        opts = self.opts
        try:
            self.address = self.server.listen()
        except OSError as e:
            raise StartError(
                "-p", f"cannot listen on {opts.bind}:{opts.port}: {e.strerror or e}"
            ) from None

    def open_source(self) -> None:
        opts = self.opts
        if opts.mode == "nfqueue":
            from intercept.sources import nfqueue

            compiled = None
            if self.engine == "compiled":
                table = self.server.router.table  # type: ignore[attr-defined]
                compiled = nfqueue.CompiledPath(table, self.server.receive_response_batch)
            try:
                self.source = nfqueue.NfqueueSource(
                    self.server.receive_ip_packets,
                    self.server.counters,
                    opts.queue_num,
                    pass_ips=opts.pass_ips,
                    queue_maxlen=opts.queue_maxlen,
                    compiled=compiled,
                )
            except (OSError, RuntimeError) as e:
                raise StartError(
                    "--queue-num", f"cannot bind NFQUEUE {opts.queue_num}: {e}"
                ) from None
            except ImportError:
                raise StartError("", "NFQUEUE mode needs the NetfilterQueue package") from None
            for sport in opts.install_rule or ("PORT",):
                self.log.log(NOTICE, "needs: %s", nfqueue.rule_command(sport, opts.queue_num))
        else:
            from intercept.sources import pcap

            try:
                self.source = pcap.PcapSource(
                    self.server.receive_ip_packets,
                    self.server.counters,
                    opts.devices,
                    opts.filter_expr or "",
                )
            except ImportError:
                raise StartError("", "pcap mode needs the python-libpcap package") from None
        self.server.add_source(self.source)

    def install_rules(self) -> None:
        if self.opts.mode != "nfqueue" or not self.opts.install_rule:
            return
        from intercept.sources import nfqueue

        self.installed = nfqueue.install_rules(self.opts.install_rule, self.opts.queue_num)

    def detach(self) -> None:
        opts = self.opts
        if opts.daemon:
            daemonize()
        if opts.pid_file:
            try:
                with open(opts.pid_file, "w", encoding="ascii") as f:
                    f.write(f"{os.getpid()}\n")
                self.pid_written = True
            except OSError as e:
                raise StartError("-P", f"cannot write {opts.pid_file}: {e.strerror or e}") from None

    def drop_privileges(self) -> None:
        """Least privilege: the listener, the queue or pcap handles and the rule are in place;
        before the threads (metrics, pcap readers), which a drop would not reach (capabilities
        are per thread).  iptables at exit runs with the ambient CAP_NET_ADMIN."""
        from engine.io import privileges

        opts, log = self.opts, self.log
        try:
            target = privileges.resolve_target(opts.user, opts.group)
            privileges.keep_files(target, outputs=[opts.summary_json] if opts.summary_json else ())
            privileges.warn_unreachable_log(log, target, _log_file_of(log))
            nfq = opts.mode == "nfqueue"
            privileges.enter_least_privilege(
                PROG,
                target,
                log,
                needed=1 << (privileges.CAP_NET_ADMIN if nfq else privileges.CAP_NET_RAW),
                needed_for="NFQUEUE and iptables" if nfq else "pcap capture",
            )
        except (OSError, ConfigError) as e:
            raise StartError("", f"cannot drop privileges: {e}") from None

    def start_exporter(self) -> None:
        opts = self.opts
        if not opts.metrics:
            return
        # After the daemon fork: a thread does not survive fork().
        from intercept.exporter import start_intercept_exporter

        try:
            self.exporter = start_intercept_exporter(
                opts.metrics, self.server, opts.queue_num if opts.mode == "nfqueue" else None
            )
        except ConfigError as e:
            raise StartError(e.where, e.message) from None

    def serve(self) -> int:
        opts, log, server, source = self.opts, self.log, self.server, self.source
        if hasattr(source, "start"):
            source.start()
        _install_sighup()
        host, port = self.address
        log.log(
            NOTICE,
            "%s started: %s mode on %s, listening on %s:%d, %s, engine %s, sched %s",
            version_string(),
            opts.mode,
            source.name if source else "-",
            host,
            port,
            _auth_mode(opts),
            self.engine,
            self.sched,
        )
        notify.ready(f"{opts.mode} mode on {source.name if source else '-'}, port {port}")
        reason = server.run()
        notify.stopping(f"stopping ({reason})")
        log.log(NOTICE, "%s stopping (%s), engine %s", PROG, reason, self.engine)
        server.log_final_stats()
        if opts.summary_json:
            _write_summary(opts.summary_json, server, log, self.engine, opts.sched, self.sched)
        return 0

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.shutdown()
            self.exporter.server_close()
        if self.installed:
            from intercept.sources import nfqueue

            nfqueue.remove_rules(self.installed, self.opts.queue_num)
        self.server.close()
        if self.pid_written and self.opts.pid_file:
            try:
                os.unlink(self.opts.pid_file)
            except OSError:
                pass


def _auth_mode(opts: InterceptOptions) -> str:
    if opts.secret is None:
        return "no authentication (compat peers only)"
    if opts.allow_compat:
        return "extended peers must prove --secret-file; compat peers allowed (--allow-compat)"
    return "extended peers must prove --secret-file; compat peers refused"


def _write_summary(
    path: str,
    server,
    log: logging.Logger,
    engine: str = "python",
    sched: str = "batch",
    policy: str = "normal",
) -> None:
    """The final counters (+ the router's, prefixed ``router_``, the response path,
    ``engine``, --sched, ``sched``, and the policy it ran under, ``sched_policy``) as one
    flat JSON object."""
    import orjson

    values: dict[str, object] = dict(server.counters)
    values["engine"] = engine
    values["sched"] = sched
    values["sched_policy"] = policy
    values.update({f"router_{k}": v for k, v in server.router.stats.items()})
    values["router_routes"] = len(server.router)
    from engine.io.privileges import write_kept

    data = orjson.dumps(values, option=orjson.OPT_SORT_KEYS) + b"\n"
    tmp = f"{path}.tmp"
    try:
        if write_kept(path, data):  # kept at the drop: the new user cannot write its directory
            return
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        log.error("--summary-json: cannot write %s: %s", path, e.strerror or e)


def _log_file_of(log: logging.Logger) -> str | None:
    """The log file of `log` (engine.io.logs' file handler), None for stderr."""
    for handler in log.handlers:
        path = getattr(handler, "path", None)
        if path:
            return str(path)
    return None


def _install_sighup() -> None:
    # logrotate's "move then HUP": reopen the log file; anything else would kill us.
    signal.signal(signal.SIGHUP, lambda signum, frame: reopen_logs(LOGGER_NAME))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
