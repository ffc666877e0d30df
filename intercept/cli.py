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
from dataclasses import dataclass, field

from engine import notify, wire
from engine.errors import ConfigError, DecodeError
from engine.logs import reopen_logs, setup_logging
from engine.packet import ip_from_str

__all__ = ["InterceptOptions", "parse_args", "main", "version_string"]

PROG = "intercept-mp"
LOGGER_NAME = "intercept"
MAX_PASS_IPS = 32  # spec §4.2 -x
MAX_DEVICES = 32  # spec §4.2 -i
FILTER_MAX_CHARS = 4095  # spec §4.2: < 4096
DEFAULT_DAEMON_LOG = "error_intercept.log"  # C: <prefix>logs/error_intercept.log
MISSING_FILTER = "please set filter (-F param) for capturing packets"  # spec §2.1
MAX_ROUTES_PER_CONN_DEFAULT = 1_000_000  # a hostile client cannot grow the table past this


def version_string() -> str:
    try:
        from importlib.metadata import version

        ours = version("tcpcopy-mp")
    except Exception:  # noqa: BLE001 - not installed: fall back to the source tree's
        from engine import __version__ as ours
    return f"{PROG} version:{ours} (compat 1.0, protocol {wire.INTERNAL_VERSION})"


@dataclass(frozen=True)
class InterceptOptions:
    """The validated command line."""

    mode: str  # "nfqueue" | "pcap"
    devices: tuple[str, ...] = ()
    filter_expr: str | None = None
    pass_ips: tuple[int, ...] = ()
    queue_maxlen: int | None = None
    queue_num: int = 0
    install_rule: tuple[int, ...] = ()
    combine: int = wire.COMB_MAX
    port: int = 36524
    bind: str = "0.0.0.0"
    delay_table_size: int = 65536
    docker_map: tuple[int, int] | None = None
    protect: bool = False
    log_path: str | None = None
    log_format: str = "text"
    log_level: str = "info"
    daemon: bool = False
    pid_file: str | None = None
    summary_json: str | None = None
    secret: bytes | None = field(default=None, repr=False)  # --secret-file (design §6)
    allow_compat: bool = False
    max_routes_per_conn: int | None = MAX_ROUTES_PER_CONN_DEFAULT  # None = no limit
    metrics: str | None = None  # --metrics HOST:PORT (Prometheus endpoint)


# --- argument types: each raises ArgumentTypeError with a message argparse prefixes ------------
# with "argument -x/--pass: ", so the user's one line names the flag.


def _int_in(lo: int, hi: int, what: str):
    def conv(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{what} {value} is outside {lo}..{hi}")
        return value

    conv.__name__ = what
    return conv


def _ipv4(text: str) -> int:
    try:
        return ip_from_str(text.strip())
    except DecodeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ipv4_text(text: str) -> str:
    _ipv4(text)
    return text.strip()


def _ip_list(text: str) -> tuple[int, ...]:
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("empty address list")
    if len(items) > MAX_PASS_IPS:
        raise argparse.ArgumentTypeError(f"{len(items)} addresses, at most {MAX_PASS_IPS}")
    return tuple(_ipv4(t) for t in items)


def _device_list(text: str) -> tuple[str, ...]:
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"empty device name in {text!r}")
    if len(items) > MAX_DEVICES:
        raise argparse.ArgumentTypeError(f"{len(items)} devices, at most {MAX_DEVICES}")
    return tuple(items)


def _port_list(text: str) -> tuple[int, ...]:
    conv = _int_in(1, 65535, "port")
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"empty port in {text!r}")
    return tuple(dict.fromkeys(conv(t) for t in items))


def _filter(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("empty filter")
    if len(text) > FILTER_MAX_CHARS:
        raise argparse.ArgumentTypeError(f"filter of {len(text)} characters (max 4095)")
    return text


def _metrics_addr(text: str) -> str:
    from metrics.exporter import parse_metrics_addr

    try:
        parse_metrics_addr(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(e.message) from None
    return text


def _docker_map(text: str) -> tuple[int, int]:
    parts = text.split("-")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not A-B (two IPv4 addresses)")
    return _ipv4(parts[0]), _ipv4(parts[1])


class _Parser(argparse.ArgumentParser):
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
    g = p.add_argument_group("pcap (advanced) mode")
    g.add_argument(
        "-i",
        "--interfaces",
        type=_device_list,
        metavar="DEV[,DEV...]",
        help="capture devices (default: all but 'any'), up to 32",
    )
    g.add_argument(
        "-F",
        "--filter",
        type=_filter,
        metavar="BPF",
        help="BPF filter picking the responses, e.g. 'tcp and src port 8080' "
        "(required in this mode)",
    )
    g = p.add_argument_group("NFQUEUE (traditional) mode")
    g.add_argument(
        "--queue-num",
        type=_int_in(0, 65535, "queue number"),
        metavar="N",
        help="NFQUEUE number to bind (selects this mode; default 0)",
    )
    g.add_argument(
        "-x",
        "--pass",
        dest="pass_ips",
        type=_ip_list,
        metavar="IP[,IP...]",
        help="destination IPs whose responses are ACCEPTed, not intercepted",
    )
    g.add_argument(
        "-q",
        "--queue-maxlen",
        type=_int_in(0, 2**31 - 1, "queue length"),
        metavar="N",
        help="NFQUEUE max length (<= 1024 keeps the kernel default)",
    )
    g.add_argument(
        "--install-rule",
        type=_port_list,
        metavar="SPORT[,SPORT...]",
        help="add the iptables NFQUEUE rule for these source ports at start and remove it at exit",
    )
    g = p.add_argument_group("server")
    g.add_argument(
        "-p",
        "--port",
        type=_int_in(1, 65535, "port"),
        default=36524,
        help="listen port for tcpcopy (default 36524)",
    )
    g.add_argument(
        "-b",
        "--bind",
        type=_ipv4_text,
        default="0.0.0.0",
        metavar="IP",
        help="listen address (default all)",
    )
    g.add_argument(
        "-n",
        "--combine",
        type=_int_in(0, wire.COMB_MAX, "combine count"),
        default=wire.COMB_MAX,
        metavar="N",
        help="max records per frame, 1..16 (0 = 1; default 16)",
    )
    g.add_argument(
        "-s",
        "--delay-table-size",
        type=_int_in(0, 2**32 - 1, "size"),
        default=65536,
        metavar="N",
        help="accepted for C compatibility (unused)",
    )
    g.add_argument(
        "-D",
        "--docker-map",
        type=_docker_map,
        metavar="A-B",
        help="rewrite response daddr A to B before routing",
    )
    g.add_argument(
        "-c",
        "--protect",
        action="store_true",
        help="accepted for C compatibility (single builds only; no effect)",
    )
    g.add_argument(
        "--secret-file",
        metavar="FILE",
        help="shared secret (first line; mode 600): tcpcopy-mp must prove it (extended "
        "protocol, docs/protocol.md); unauthenticated peers are refused",
    )
    g.add_argument(
        "--allow-compat",
        action="store_true",
        help="with --secret-file: still accept C-format (compat) tcpcopy, which cannot "
        "authenticate",
    )
    g.add_argument(
        "--max-routes-per-conn",
        type=_int_in(0, 2**31 - 1, "route count"),
        default=MAX_ROUTES_PER_CONN_DEFAULT,
        metavar="N",
        help="routes kept per tcpcopy connection, least recently used evicted "
        f"(default {MAX_ROUTES_PER_CONN_DEFAULT:,}; 0 = no limit)",
    )
    g = p.add_argument_group("process")
    g.add_argument(
        "-l",
        "--log",
        dest="log_path",
        metavar="FILE",
        help="log file (default stderr; error_intercept.log with -d)",
    )
    g.add_argument("--log-format", choices=("text", "json"), default="text")
    g.add_argument(
        "--log-level", choices=("debug", "info", "notice", "warn", "error"), default="info"
    )
    g.add_argument("-d", "--daemon", action="store_true", help="run in the background")
    g.add_argument("-P", "--pid-file", metavar="FILE", help="write the process id here")
    g.add_argument(
        "--summary-json",
        metavar="FILE",
        help="write the final counters there as one JSON object on exit",
    )
    g.add_argument(
        "--metrics",
        type=_metrics_addr,
        metavar="HOST:PORT",
        help="serve Prometheus metrics (intercept_*) on this address, e.g. 127.0.0.1:9101",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> InterceptOptions:
    """Parse and validate; exits 2 with one line on any bad flag (argparse's ``exit``)."""
    parser = _build_parser()
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
    secret = None
    if a.secret_file is not None:
        from engine.secret import load_secret_file

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
        metrics=a.metrics,
    )


_LEVELS = {"debug": 10, "info": 20, "notice": 25, "warn": 30, "error": 40}


def _fail(log: logging.Logger, message: str) -> int:
    """A start-up failure: logged, and also one line on stderr when the log is a file."""
    log.error("%s", message)
    if any(getattr(h, "path", None) for h in log.handlers):  # engine.logs' file handler
        print(f"{PROG}: {message}", file=sys.stderr)
    return 1


def _daemonize() -> None:
    """Classic double fork; stdio to /dev/null (the log is a file by then)."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


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
    logging.addLevelName(25, "NOTICE")
    try:
        return _run(opts, log)
    except Exception as e:  # noqa: BLE001 - a bug: one line for the user, details at debug
        log.debug("internal error", exc_info=True)
        return _fail(log, f"internal error: {type(e).__name__}: {e}")


def _run(opts: InterceptOptions, log: logging.Logger) -> int:
    # Imported here so --help/--version and flag errors never need the live packages.
    from intercept.router import Router
    from intercept.server import InterceptServer

    server = InterceptServer(
        Router(max_routes_per_conn=opts.max_routes_per_conn),
        bind_ip=opts.bind,
        port=opts.port,
        combine=opts.combine,
        docker_map=opts.docker_map,
        secret=opts.secret,
        allow_compat=opts.allow_compat,
    )
    installed: list[int] = []
    pid_written = False
    exporter = None
    # Until the loop installs its own handlers, a SIGTERM/SIGINT still ends us cleanly (the
    # iptables rule removed): the stop is remembered and run() returns at once.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: server.request_stop(f"signal {signum}"))
    try:
        try:
            host, port = server.listen()
        except OSError as e:
            return _fail(log, f"-p: cannot listen on {opts.bind}:{opts.port}: {e.strerror or e}")
        source = None
        if opts.mode == "nfqueue":
            from intercept import nfqueue

            try:
                source = nfqueue.NfqueueSource(
                    server,
                    opts.queue_num,
                    pass_ips=opts.pass_ips,
                    queue_maxlen=opts.queue_maxlen,
                )
            except (OSError, RuntimeError) as e:
                return _fail(log, f"--queue-num: cannot bind NFQUEUE {opts.queue_num}: {e}")
            except ImportError:
                return _fail(log, "NFQUEUE mode needs the NetfilterQueue package")
            server.add_source(source)
            sports = opts.install_rule or ("PORT",)
            for sport in sports:
                log.log(25, "needs: %s", nfqueue.rule_command(sport, opts.queue_num))
            if opts.install_rule:
                try:
                    installed = nfqueue.install_rules(opts.install_rule, opts.queue_num)
                except nfqueue.RuleError as e:
                    return _fail(log, str(e))
        else:
            from intercept import pcap

            try:
                source = pcap.PcapSource(server, opts.devices, opts.filter_expr or "")
            except pcap.PcapError as e:
                return _fail(log, str(e))
            except ImportError:
                return _fail(log, "pcap mode needs the python-libpcap package")
            server.add_source(source)
        if opts.daemon:
            _daemonize()
        if opts.pid_file:
            try:
                with open(opts.pid_file, "w", encoding="ascii") as f:
                    f.write(f"{os.getpid()}\n")
                pid_written = True
            except OSError as e:
                return _fail(log, f"-P: cannot write {opts.pid_file}: {e.strerror or e}")
        if opts.metrics:
            # After the daemon fork: a thread does not survive fork().
            from intercept.exporter import start_intercept_exporter

            try:
                exporter = start_intercept_exporter(
                    opts.metrics, server, opts.queue_num if opts.mode == "nfqueue" else None
                )
            except ConfigError as e:
                return _fail(log, str(e))
        if hasattr(source, "start"):
            source.start()
        _install_sighup()
        log.log(
            25,
            "%s started: %s mode on %s, listening on %s:%d, %s",
            version_string(),
            opts.mode,
            source.name if source else "-",
            host,
            port,
            _auth_mode(opts),
        )
        notify.ready(f"{opts.mode} mode on {source.name if source else '-'}, port {port}")
        reason = server.run()
        notify.stopping(f"stopping ({reason})")
        log.log(25, "%s stopping (%s)", PROG, reason)
        server.log_final_stats()
        if opts.summary_json:
            _write_summary(opts.summary_json, server, log)
        return 0
    finally:
        if exporter is not None:
            exporter.shutdown()
            exporter.server_close()
        if installed:
            from intercept import nfqueue

            nfqueue.remove_rules(installed, opts.queue_num)
        server.close()
        if pid_written and opts.pid_file:
            try:
                os.unlink(opts.pid_file)
            except OSError:
                pass


def _auth_mode(opts: InterceptOptions) -> str:
    if opts.secret is None:
        return "no authentication (compat peers only)"
    if opts.allow_compat:
        return "extended peers must prove --secret-file; compat peers allowed (--allow-compat)"
    return "extended peers must prove --secret-file; compat peers refused"


def _write_summary(path: str, server, log: logging.Logger) -> None:  # noqa: ANN001
    """The final counters (+ the router's, prefixed ``router_``) as one flat JSON object."""
    import orjson

    values: dict[str, object] = dict(server.counters)
    values.update({f"router_{k}": v for k, v in server.router.stats.items()})
    values["router_routes"] = len(server.router)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(values, option=orjson.OPT_SORT_KEYS) + b"\n")
        os.replace(tmp, path)
    except OSError as e:
        log.error("--summary-json: cannot write %s: %s", path, e.strerror or e)


def _install_sighup() -> None:
    # logrotate's "move then HUP": reopen the log file; anything else would kill us.
    signal.signal(signal.SIGHUP, lambda signum, frame: reopen_logs(LOGGER_NAME))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
