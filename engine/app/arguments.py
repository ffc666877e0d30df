"""tcpcopy-mp's command line -> ReplayConfig: the parser, the --config file, the checks.

C tcpcopy's flags (spec §4.1) plus long names (docs/cli-contract.md).  Flag values are taken
as strings by argparse and validated here, so every mistake becomes one line
`tcpcopy-mp: -x: <what is wrong>` on stderr and exit status 2, never a traceback.  The options
are generated from the schema in engine/core/config.py (field metadata of ReplayConfig and
SessionConfig).  A `--config FILE` (TOML `[tcpcopy]` table, keys = long flag names with
`-` -> `_`) supplies values; the command line wins.

Shared by the run (engine/app/cli.py) and its doctor (engine/app/doctor.py), which validates a run's
command line with the run's own parser; neither imports the other for it.
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Sequence

from engine import PROG, __version__
from engine.app.options import (
    ArgValues,
    OneLineArgumentParser,
    add_schema_arguments,
    config_path,
    read_config_file,
)
from engine.core.config import (
    CONNECTIONS_MAX,
    TCPCOPY_SECTIONS,
    ReplayConfig,
    SessionConfig,
    parse_intercepts,
    schema_fields,
)
from engine.errors import ConfigError, DecodeError

__all__ = [
    "PROG",
    "TCPCOPY_OPTIONS",
    "UsageError",
    "apply_config_file",
    "build_config",
    "build_parser",
    "config_path",
    "parse_config",
]

KEEPALIVE_EXTRA_S = 120
"""spec §4.1 -k: default t + 120."""
RAND_SHIFT_RANGE = 512
"""spec §3.1: rand_port_shifted is drawn once in 0..511."""
PCAP_SUFFIXES = (".pcap", ".cap", ".pcapng", ".dmp")
WORKERS_MAX = 1024
TCPCOPY_OPTIONS = schema_fields(ReplayConfig)
"""Every tcpcopy-mp option: the schema fields of ReplayConfig and its SessionConfig."""


class UsageError(Exception):
    """An argparse-level mistake (unknown flag, missing value): one line for stderr."""


class _Parser(OneLineArgumentParser):
    """argparse with one-line errors (the contract: one stderr line naming the flag, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser, generated from the schema (engine/core/config.py field metadata)."""
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
    groups = add_schema_arguments(p, TCPCOPY_OPTIONS, TCPCOPY_SECTIONS)
    groups[TCPCOPY_SECTIONS[-1]].add_argument(
        "--config", metavar="FILE", help="TOML file of flag values (flags win)"
    )
    # engine/io/privileges.py: started as root, we switch to this user after start-up.
    groups[TCPCOPY_SECTIONS[-1]].add_argument(
        "--user",
        metavar="NAME",
        help="run as this user after start-up, keeping only CAP_NET_RAW and CAP_NET_ADMIN "
        "(default when root: tcpcopy if it exists, else nobody; 'root' keeps root)",
    )
    groups[TCPCOPY_SECTIONS[-1]].add_argument(
        "--group", metavar="NAME", help="with --user: this group (default: the user's)"
    )
    return p


# --------------------------------------------------------------------------------------------
# --config FILE: the [tcpcopy] table; keys = long flag names with '-' -> '_' (engine/core/config.py)


def apply_config_file(parser: argparse.ArgumentParser, path: str) -> None:
    """Read the file now (unknown keys and wrong TOML types fail here, naming the line);
    its values are checked by build_config like flags, and only where no flag was given."""
    parser.set_defaults(_config_file=read_config_file(path, "tcpcopy", TCPCOPY_OPTIONS))


# --------------------------------------------------------------------------------------------
# flags -> ReplayConfig


def _is_file_like(text: str) -> bool:
    return "/" in text or text.lower().endswith(PCAP_SUFFIXES)


def _check_pcap(where: str, path: str) -> None:
    """Open the file now, so a missing or non-pcap file is a usage error, not a crash later."""
    from engine.codec.pcapfile import open_pcap

    try:
        reader = open_pcap(path)
    except DecodeError as exc:
        raise ConfigError(where, str(exc)) from None
    except OSError as exc:
        raise ConfigError(where, f"cannot open {path}: {exc.strerror or exc}") from None
    with reader:
        linktype = reader.linktype
    from engine.codec import packet
    from engine.io.capture import unsupported_linktype

    if linktype not in packet.LINKTYPES:
        raise ConfigError(where, f"{path}: {unsupported_linktype(linktype)}")


def build_config(args: argparse.Namespace) -> ReplayConfig:
    """Validate every flag value and build the frozen configuration (ConfigError on error).

    Values of a --config file (``apply_config_file``) fill the options no flag gave; each is
    parsed by its schema field's parser, and an error names the flag or the file line.
    """
    from engine.core import rewrite
    from engine.io import capture

    v = ArgValues(args, TCPCOPY_OPTIONS, getattr(args, "_config_file", None))
    missing = [
        f
        for f, value in (("-x/--transfer", args.transfer), ("-s/--intercepts", args.intercepts))
        if not value
    ]
    if missing:
        raise ConfigError(missing[0], "is required")

    with v.located("transfers"):
        transfers = rewrite.parse_transfer(args.transfer)
    intercept_port = v.get("intercept_port")
    with v.located("intercepts"):
        intercepts = parse_intercepts(args.intercepts, intercept_port)

    # spec §4.1: C clamps (0 -> 1, > 11 -> 11); we clamp to 1..16 and reject non-numbers.
    connections = min(max(v.get("connections"), 1), CONNECTIONS_MAX)

    intercept_secret = None
    secret_file = v.get("secret_file")
    if secret_file is not None:
        from engine.io.secret import load_secret_file

        with v.located("secret_file"):
            intercept_secret = load_secret_file("--secret-file", secret_file)

    pool: tuple[int, ...] = ()
    if args.clients is not None:
        with v.located("client_pool"):
            pool = rewrite.parse_client_pool(args.clients, exclude=[t.target_ip for t in transfers])

    # spec §4.1: -n N means N copies in all; 0 and 1 both mean "just the session".
    replicas = max(1, v.get("replicas"))
    # spec §4.1: 0 means all; C's 7-bit wrap of 150 -> 22 is a QUIRK: we refuse > 100.
    sample = v.get("sample_percent") or 100
    gradual = bool(v.get("gradual"))
    if gradual and sample < 100:
        # spec §3.3 step 6: C's ramp overwrites the -r percentage; -r would be ignored.
        raise ConfigError(
            v.where("gradual"), "cannot be combined with -r: the ramp replaces -r (up to 100 %)"
        )
    # spec §3.15: an 8-bit field in C (values >= 256 wrap); we refuse them instead.
    port_shift = v.get("port_shift")
    localhost_ip = v.get("localhost_ip")
    if localhost_ip and rewrite.targets_localhost(transfers):
        # spec §3.3 step 3: with a 127.0.0.1 target C keeps 127.0.0.1 sources; -H is unused.
        raise ConfigError(
            v.where("localhost_ip"),
            "has no effect when a -x target is 127.0.0.1 (sources stay 127.0.0.1)",
        )

    mtu = v.get("mtu")
    mss = v.get("mss")
    rtt_ms = v.get("rtt_initial_s")

    timeout_s = v.get("session_timeout_s")
    if timeout_s < 0:
        timeout_s = v.default("session_timeout_s")  # spec §4.1: negative -> 600
    if timeout_s == 0:
        raise ConfigError(
            v.where("session_timeout_s"), "0 would end every session at once; give seconds > 0"
        )
    keepalive_s = timeout_s + KEEPALIVE_EXTRA_S
    k = v.get("keepalive_timeout_s")
    if k is not None:
        keepalive_s = k if k > 0 else keepalive_s  # spec §4.1: <= 0 means the default

    memory_mb = v.get("memory_limit_mb")
    pool_size_kb = v.get("pool_size_kb")
    snaplen = v.get("snaplen")
    buffer_bytes = v.get("capture_buffer_bytes") * 1024 * 1024
    ring_mb = v.get("ring_bytes")

    # Capture: -i FILE / --pcap FILE -> offline; -i DEV[,DEV] -> live.
    pcap_given = list(args.pcap or [])
    pcap_files = list(pcap_given)
    interfaces: list[str] = []
    if args.interface:
        iface = args.interface.strip()
        if os.path.isfile(iface) or (_is_file_like(iface) and "," not in iface):
            pcap_files.insert(0, iface)
        else:
            interfaces = [d.strip() for d in iface.split(",") if d.strip()]
            if not interfaces:
                raise ConfigError(v.where("interfaces"), "no capture device given")
            for dev in interfaces:
                if dev != "any" and not capture.device_exists(dev):
                    raise ConfigError(
                        v.where("interfaces"), f"no such network device or pcap file: {dev!r}"
                    )
    for path in pcap_files:
        _check_pcap(v.where("pcap_files" if path in pcap_given else "interfaces"), path)
    chosen = v.get("capture")
    if pcap_files:
        mode = "offline"
        if chosen is not None:
            raise ConfigError(
                v.where("capture"), "cannot be combined with a pcap file (offline replay)"
            )
    elif chosen is not None:
        mode = chosen
    else:
        # Naming a device asks for capture on it: AF_PACKET.  Without -i, the C default.
        mode = "packet" if interfaces else "raw"
    output_interface = v.get("output_interface")
    if output_interface is not None:
        output_interface = output_interface.strip()
        if not output_interface or not capture.device_exists(output_interface):
            raise ConfigError(
                v.where("output_interface"), f"no such network device: {output_interface!r}"
            )
    capture_filter = (v.get("capture_filter") or "").strip()
    if capture_filter:
        from engine.io.pcapfilter import compile_filter

        with v.located("capture_filter"):
            compile_filter(capture_filter)  # a bad expression fails here, naming -F

    accelerate = v.get("accelerate")
    idle_ms = v.get("idle_threshold_s")
    replays = v.get("replays")
    offline_tail_s = v.get("offline_tail_s")

    # design §3: one capture process feeds N workers; the default uses every CPU.
    workers = v.get("workers", min(os.cpu_count() or 1, WORKERS_MAX))
    engine = v.get("engine")
    if engine == "compiled":
        from engine.io.engines import resolve_engine

        resolve_engine(engine, v.where("engine"))  # not built: one line naming --engine
    metrics = v.get("metrics")
    stats_s = v.get("stats_interval_s")
    log_format = v.get("log_format")
    for name in ("summary_json", "log_path", "pid_file"):
        path = v.get(name)
        if path:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise ConfigError(v.where(name), f"directory {parent} does not exist")

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
        reconnect=not args.no_reconnect,
        reconnect_budget=v.get("reconnect_budget"),
        session_timeout_s=float(timeout_s),
        keepalive_timeout_s=float(keepalive_s),
        **({"rtt_initial_s": rtt_ms / 1000.0} if rtt_ms > 0 else {}),
        gradual=gradual,
        localhost_ip=localhost_ip,
        strict_time_wait=bool(v.get("strict_time_wait")),
        backlog_max_bytes=v.get("backlog_max_bytes"),
        worker_index=0,
        worker_count=1,
    )
    return ReplayConfig(
        session=session,
        intercepts=intercepts,
        intercept_port=intercept_port,
        connections=connections,
        secret_file=secret_file,
        capture=mode,
        interfaces=tuple(interfaces),
        capture_filter=capture_filter,
        capture_buffer_bytes=buffer_bytes,
        ring_bytes=None if ring_mb is None else ring_mb * 1024 * 1024,
        snaplen=snaplen,
        output_interface=output_interface,
        pcap_files=tuple(pcap_files),
        accelerate=accelerate,
        idle_threshold_s=idle_ms / 1000.0,
        replays=replays,
        offline_tail_s=offline_tail_s,
        workers=workers,
        engine=engine,
        sched=v.get("sched"),
        metrics=metrics,
        log_path=args.log,
        log_format=log_format,
        stats_interval_s=float(stats_s),
        summary_json=args.summary_json,
        memory_limit_mb=memory_mb,
        daemon=bool(args.daemon),
        lonely=bool(args.lonely),
        pool_size_kb=pool_size_kb,
        pid_file=args.pid_file,
        intercept_secret=intercept_secret,
    )


def parse_config(argv: Sequence[str]) -> ReplayConfig:
    """A run's command line (with its --config file) -> ReplayConfig, as main() does it.

    ConfigError for a bad value; UsageError for an argparse-level mistake.
    """
    parser = build_parser()
    path = config_path(argv)
    if path:
        apply_config_file(parser, path)
    return build_config(parser.parse_args(list(argv)))
