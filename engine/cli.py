"""tcpcopy-mp command line: C tcpcopy's flags (spec §4.1) plus long names (docs/cli-contract.md).

Flag values are taken as strings by argparse and validated here, so every mistake becomes
one line `tcpcopy-mp: -x: <what is wrong>` on stderr and exit status 2, never a traceback.
A `--config FILE` (TOML, keys = long flag names) supplies defaults; the command line wins.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from collections.abc import Sequence

from engine import __version__
from engine.config import (
    CONNECTIONS_MAX,
    INTERCEPT_PORT_DEFAULT,
    ReplayConfig,
    SessionConfig,
    load_config_file,
    parse_float,
    parse_host_port,
    parse_int,
    parse_intercepts,
    parse_ipv4,
)
from engine.errors import ConfigError, DecodeError

PROG = "tcpcopy-mp"
EXIT_USAGE = 2
EXIT_RUNTIME = 1
TIMEOUT_DEFAULT_S = 600
"""spec §4.1 -t: also what a negative value means."""
KEEPALIVE_EXTRA_S = 120
"""spec §4.1 -k: default t + 120."""
RAND_SHIFT_RANGE = 512
"""spec §3.1: rand_port_shifted is drawn once in 0..511."""
PCAP_SUFFIXES = (".pcap", ".cap", ".pcapng", ".dmp")
WORKERS_MAX = 1024


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the contract: one stderr line naming the flag, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Replicate live (or pcap) TCP client traffic to a test server, "
        "TCPCopy 1.0 compatible.",
        allow_abbrev=False,
        add_help=False,
        epilog="tcpcopy-mp doctor [run flags] [--live SECONDS] [--json]  (setup checks)",
    )
    a = p.add_argument
    a("-h", "--help", action="help", help="show this help and exit")
    a("-v", "--version", action="version", version=f"{PROG} version:{__version__}")
    g = p.add_argument_group("replication")
    g.add_argument(
        "-x",
        "--transfer",
        metavar="SPEC",
        help="[srcIP:]srcPort-targetIP:targetPort[,...] (required)",
    )
    g.add_argument(
        "-s", "--intercepts", metavar="IP[:PORT],...", help="intercept addresses (required)"
    )
    g.add_argument(
        "-p",
        "--intercept-port",
        metavar="PORT",
        help=f"default intercept port ({INTERCEPT_PORT_DEFAULT})",
    )
    g.add_argument("-C", "--connections", metavar="N", help="connections per intercept, 1-16 (2)")
    g.add_argument(
        "--secret-file",
        metavar="FILE",
        help="shared secret (first line; mode 600): authenticate every intercept channel "
        "(extended protocol; intercept-mp --secret-file)",
    )
    g.add_argument("-c", "--clients", metavar="LIST", help="fake client addresses, e.g. 198.19.1.x")
    g.add_argument("-n", "--replicas", metavar="N", help="copies of every session (1-1023)")
    g.add_argument("-r", "--sample", metavar="PCT", help="percentage of sessions replicated (100)")
    g.add_argument("-f", "--port-shift", metavar="F", help="client port shift factor (0-255)")
    g.add_argument(
        "-H", "--localhost-ip", metavar="IP", help="replace client source 127.0.0.1 by IP"
    )
    g.add_argument(
        "-W",
        "--no-wait",
        action="store_true",
        default=None,
        help="do not wait for responses before sending the next request",
    )
    g.add_argument(
        "-O",
        "--only-syn",
        action="store_true",
        default=None,
        help="only replay sessions whose SYN was captured",
    )
    g.add_argument("-M", "--mtu", metavar="BYTES", help="MTU (1500)")
    g.add_argument("-D", "--mss", metavar="BYTES", help="MSS of faked SYNs (1460)")
    g.add_argument("-R", "--rtt", metavar="MS", help="initial RTT in ms")
    g.add_argument("-t", "--timeout", metavar="S", help="session timeout in s (600)")
    g.add_argument(
        "-k", "--keepalive-timeout", metavar="S", help="idle session timeout in s (timeout + 120)"
    )
    g.add_argument("-m", "--memory-limit", metavar="MB", help="RSS limit in MB (2048)")
    g.add_argument(
        "-g",
        "--gradual",
        action="store_true",
        default=None,
        help="ramp replication up 1%% per second",
    )
    g.add_argument(
        "-L",
        "--lonely",
        action="store_true",
        default=None,
        help="accepted; intercept connections are always re-made",
    )
    g.add_argument("-U", "--pool-size", metavar="KB", help="accepted for compatibility; ignored")
    g.add_argument("-P", "--pid-file", metavar="FILE", help="write the process id to FILE")
    g.add_argument(
        "-d", "--daemon", action="store_true", default=None, help="run in the background"
    )
    c = p.add_argument_group("capture")
    c.add_argument(
        "-i", "--interface", metavar="DEV|FILE", help="capture device(s), or a pcap file (offline)"
    )
    c.add_argument(
        "--capture", choices=("raw", "packet"), help="raw socket (default) or AF_PACKET on -i"
    )
    c.add_argument("-F", "--filter", metavar="BPF", help="accepted; the -x map selects the packets")
    c.add_argument("-B", "--buffer", metavar="MB", help="capture buffer in MB (64)")
    c.add_argument("-S", "--snaplen", metavar="BYTES", help="accepted for compatibility; ignored")
    o = p.add_argument_group("offline")
    o.add_argument(
        "--pcap", metavar="FILE", action="append", help="replay this pcap file (repeatable)"
    )
    o.add_argument("-a", "--accelerate", metavar="N", help="replay speed factor (1)")
    o.add_argument("-I", "--idle-threshold", metavar="MS", help="skip gaps longer than MS")
    o.add_argument("-T", "--replays", metavar="N", help="passes over the file(s) (1)")
    r = p.add_argument_group("process and reporting")
    r.add_argument("--workers", metavar="N", help="worker processes (default: the number of CPUs)")
    r.add_argument("--config", metavar="FILE", help="TOML file of flag values (flags win)")
    r.add_argument("--metrics", metavar="ADDR:PORT", help="Prometheus endpoint")
    r.add_argument("-l", "--log", metavar="FILE", help="log file (stderr)")
    r.add_argument("--log-format", choices=("text", "json"), help="log line format (text)")
    r.add_argument("--stats-interval", metavar="S", help="statistics log period in s (30)")
    r.add_argument("--summary-json", metavar="FILE", help="write the final counters there on exit")
    return p


# --------------------------------------------------------------------------------------------
# --config FILE: TOML keys are long flag names


def _config_path(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _apply_config_file(parser: argparse.ArgumentParser, path: str) -> None:
    values = load_config_file(path)
    by_long: dict[str, argparse.Action] = {}
    for action in parser._actions:  # noqa: SLF001 (argparse has no public listing)
        for opt in action.option_strings:
            if opt.startswith("--"):
                by_long[opt[2:]] = action
    defaults: dict[str, object] = {}
    for key, value in values.items():
        action = by_long.get(str(key).replace("_", "-"))
        if action is None or action.dest in ("help", "version", "config"):
            raise ConfigError(f"--config {path}", f"unknown key {key!r}")
        if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
            if not isinstance(value, bool):
                raise ConfigError(f"--config {path}", f"{key} must be true or false")
            defaults[action.dest] = value or None
        elif isinstance(action, argparse._AppendAction):  # noqa: SLF001
            defaults[action.dest] = (
                [str(v) for v in value] if isinstance(value, list) else [str(value)]
            )
        else:
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            defaults[action.dest] = str(value).lower() if isinstance(value, bool) else str(value)
    parser.set_defaults(**defaults)


# --------------------------------------------------------------------------------------------
# flags -> ReplayConfig


def _is_file_like(text: str) -> bool:
    return "/" in text or text.lower().endswith(PCAP_SUFFIXES)


def _check_pcap(where: str, path: str) -> None:
    """Open the file now, so a missing or non-pcap file is a usage error, not a crash later."""
    from engine.pcapfile import open_pcap

    try:
        reader = open_pcap(path)
    except DecodeError as exc:
        raise ConfigError(where, str(exc)) from None
    except OSError as exc:
        raise ConfigError(where, f"cannot open {path}: {exc.strerror or exc}") from None
    close = getattr(reader, "close", None)
    if close is not None:
        close()


def build_config(args: argparse.Namespace) -> ReplayConfig:
    """Validate every flag value and build the frozen configuration (ConfigError on error)."""
    from engine import capture, rewrite

    missing = [
        f
        for f, v in (("-x/--transfer", args.transfer), ("-s/--intercepts", args.intercepts))
        if not v
    ]
    if missing:
        raise ConfigError(missing[0], "is required")

    transfers = rewrite.parse_transfer(args.transfer)
    intercept_port = INTERCEPT_PORT_DEFAULT
    if args.intercept_port is not None:
        intercept_port = parse_int("-p", args.intercept_port, 1, 65535)
    intercepts = parse_intercepts(args.intercepts, intercept_port)

    connections = 2
    if args.connections is not None:
        # spec §4.1: C clamps (0 -> 1, > 11 -> 11); we clamp to 1..16 and reject non-numbers.
        connections = min(max(parse_int("-C", args.connections), 1), CONNECTIONS_MAX)

    intercept_secret = None
    if args.secret_file is not None:
        from engine.secret import load_secret_file

        intercept_secret = load_secret_file("--secret-file", args.secret_file)

    pool: tuple[int, ...] = ()
    if args.clients is not None:
        pool = rewrite.parse_client_pool(args.clients, exclude=[t.target_ip for t in transfers])

    replicas = 1
    if args.replicas is not None:
        # spec §4.1: -n N means N copies in all; 0 and 1 both mean "just the session".
        replicas = max(1, parse_int("-n", args.replicas, 0, 1023))

    sample = 100
    if args.sample is not None:
        # spec §4.1: 0 means all; C's 7-bit wrap of 150 -> 22 is a QUIRK: we refuse > 100.
        sample = parse_int("-r", args.sample, 0, 100) or 100

    port_shift = 0
    if args.port_shift is not None:
        # spec §3.15: an 8-bit field in C (values >= 256 wrap); we refuse them instead.
        port_shift = parse_int("-f", args.port_shift, 0, 255)

    localhost_ip = 0
    if args.localhost_ip is not None:
        localhost_ip = parse_ipv4("-H", args.localhost_ip)

    mtu = 1500 if args.mtu is None else parse_int("-M", args.mtu, 576, 65535)
    mss = 1460 if args.mss is None else parse_int("-D", args.mss, 88, 65495)
    rtt_ms = 0 if args.rtt is None else parse_int("-R", args.rtt, 0, 65535)

    timeout_s = TIMEOUT_DEFAULT_S if args.timeout is None else parse_int("-t", args.timeout)
    if timeout_s < 0:
        timeout_s = TIMEOUT_DEFAULT_S  # spec §4.1: negative -> 600
    if timeout_s == 0:
        raise ConfigError("-t", "0 would end every session at once; give seconds > 0")
    keepalive_s = timeout_s + KEEPALIVE_EXTRA_S
    if args.keepalive_timeout is not None:
        k = parse_int("-k", args.keepalive_timeout)
        keepalive_s = k if k > 0 else keepalive_s  # spec §4.1: <= 0 means the default

    memory_mb = 2048 if args.memory_limit is None else parse_int("-m", args.memory_limit, 1)
    if args.pool_size is not None:
        parse_int("-U", args.pool_size, 0)
    if args.snaplen is not None:
        parse_int("-S", args.snaplen, 0)
    buffer_bytes = 64 * 1024 * 1024
    if args.buffer is not None:
        buffer_bytes = parse_int("-B", args.buffer, 1, 4096) * 1024 * 1024

    # Capture: -i FILE / --pcap FILE -> offline; -i DEV[,DEV] -> live.
    pcap_files = list(args.pcap or [])
    interfaces: list[str] = []
    if args.interface:
        iface = args.interface.strip()
        if os.path.isfile(iface) or (_is_file_like(iface) and "," not in iface):
            pcap_files.insert(0, iface)
        else:
            interfaces = [d.strip() for d in iface.split(",") if d.strip()]
            if not interfaces:
                raise ConfigError("-i", "no capture device given")
            for dev in interfaces:
                if dev != "any" and not capture.device_exists(dev):
                    raise ConfigError("-i", f"no such network device or pcap file: {dev!r}")
    for path in pcap_files:
        _check_pcap("--pcap" if path in (args.pcap or []) else "-i", path)
    if pcap_files:
        mode = "offline"
        if args.capture is not None:
            raise ConfigError("--capture", "cannot be combined with a pcap file (offline replay)")
    elif args.capture is not None:
        mode = args.capture
    else:
        # Naming a device asks for capture on it: AF_PACKET.  Without -i, the C default.
        mode = "packet" if interfaces else "raw"

    accelerate = 1.0 if args.accelerate is None else parse_float("-a", args.accelerate, 0.0)
    idle_ms = 0 if args.idle_threshold is None else parse_int("-I", args.idle_threshold, 0)
    replays = 1 if args.replays is None else parse_int("-T", args.replays, 1)

    # design §3: one capture process feeds N workers; the default uses every CPU.
    workers = min(os.cpu_count() or 1, WORKERS_MAX)
    if args.workers is not None:
        workers = parse_int("--workers", args.workers, 1, WORKERS_MAX)
    metrics = None if args.metrics is None else parse_host_port("--metrics", args.metrics)
    stats_s = 30.0
    if args.stats_interval is not None:
        stats_s = parse_float("--stats-interval", args.stats_interval, 0.0)
    for flag, path in (
        ("--summary-json", args.summary_json),
        ("-l", args.log),
        ("-P", args.pid_file),
    ):
        if path:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise ConfigError(flag, f"directory {parent} does not exist")

    session = SessionConfig(
        transfers=transfers,
        client_pool=pool,
        replicas=replicas,
        port_shift=port_shift,
        sample_percent=sample,
        rand_shift=random.SystemRandom().randrange(RAND_SHIFT_RANGE),
        mtu=mtu,
        mss=mss,
        wait_response=not args.no_wait,
        fake_handshake=not args.only_syn,
        session_timeout_s=float(timeout_s),
        keepalive_timeout_s=float(keepalive_s),
        **({"rtt_initial_s": rtt_ms / 1000.0} if rtt_ms > 0 else {}),
        worker_index=0,
        worker_count=1,
        # Not yet SessionConfig fields; the rewrite/session layer reads them from here.
        extra={"gradual": bool(args.gradual), "localhost_ip": localhost_ip},
    )
    return ReplayConfig(
        session=session,
        intercepts=intercepts,
        connections=connections,
        capture=mode,
        interfaces=tuple(interfaces),
        pcap_files=tuple(pcap_files),
        accelerate=accelerate,
        idle_threshold_s=idle_ms / 1000.0,
        replays=replays,
        capture_buffer_bytes=buffer_bytes,
        capture_filter=args.filter or "",
        workers=workers,
        metrics=metrics,
        log_path=args.log,
        log_format=args.log_format or "text",
        stats_interval_s=stats_s,
        summary_json=args.summary_json,
        memory_limit_mb=memory_mb,
        daemon=bool(args.daemon),
        lonely=bool(args.lonely),
        gradual=bool(args.gradual),
        localhost_ip=localhost_ip,
        intercept_secret=intercept_secret,
    )


# --------------------------------------------------------------------------------------------


def _usage_error(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return EXIT_USAGE


def _daemonize() -> None:
    """-d: detach (double fork, new session, stdio to /dev/null), as C's daemonize()."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "doctor":
        from engine.doctor import main as doctor_main

        return doctor_main(args_list[1:])
    parser = build_parser()
    try:
        config_path = _config_path(args_list)
        if config_path:
            _apply_config_file(parser, config_path)
        args = parser.parse_args(args_list)
        cfg = build_config(args)
    except _UsageError as exc:
        return _usage_error(str(exc))
    except ConfigError as exc:
        return _usage_error(str(exc))

    from engine.logs import setup_logging

    try:
        logger = setup_logging(cfg.log_path, cfg.log_format)
    except OSError as exc:
        return _usage_error(f"-l: cannot open {cfg.log_path}: {exc.strerror or exc}")
    if cfg.daemon:
        _daemonize()
    if args.pid_file:
        try:
            with open(args.pid_file, "w", encoding="ascii") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as exc:
            return _usage_error(f"-P: cannot write {args.pid_file}: {exc.strerror or exc}")
    _log_ignored(logger, cfg, args)

    # Every worker count, 1 included, runs the supervisor's multi-process engine: one code path.
    from engine.supervisor import run

    try:
        return run(cfg)
    except ConfigError as exc:  # raised at start-up: --metrics cannot listen
        logger.error("%s", exc)
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except PermissionError as exc:
        logger.error("%s (tcpcopy-mp needs root or CAP_NET_RAW)", exc)
        print(f"{PROG}: {exc.strerror or exc}: needs root or CAP_NET_RAW", file=sys.stderr)
        return EXIT_RUNTIME
    except OSError as exc:
        logger.error("%s", exc)
        print(f"{PROG}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_RUNTIME


def _log_ignored(logger: logging.Logger, cfg: ReplayConfig, args: argparse.Namespace) -> None:
    """Say which compatibility flags have no effect, so nobody tunes a dead knob."""
    if cfg.capture_filter:
        logger.info("-F is accepted for compatibility; the -x map selects the packets")
    if cfg.capture == "raw" and cfg.interfaces:
        logger.info("-i is used by --capture packet only; the raw socket sees every device")
    for flag, value in (("-U", args.pool_size), ("-S", args.snaplen)):
        if value is not None:
            logger.info("%s is accepted for compatibility and has no effect", flag)


if __name__ == "__main__":
    sys.exit(main())
