"""intercept-mp's options: the schema of every flag and ``[intercept]`` key (design §4, §8).

One frozen dataclass, read by the command line (intercept/cli.py) and by the config reference
generator (engine/app/configdoc.py), which must not import a program.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from engine.codec import wire
from engine.codec.packet import ip_from_str
from engine.core.config import SCHED_CHOICES, Choice, Converter, Text, option, schema_fields
from engine.errors import ConfigError, DecodeError

MAX_PASS_IPS = 32  # spec §4.2 -x
MAX_DEVICES = 32  # spec §4.2 -i
FILTER_MAX_CHARS = 4095  # spec §4.2, C: filter length < 4096
DEFAULT_DAEMON_LOG = "error_intercept.log"  # C: <prefix>logs/error_intercept.log
MISSING_FILTER = "please set filter (-F param) for capturing packets"  # spec §2.1
MAX_ROUTES_PER_CONN_DEFAULT = 1_000_000  # a hostile client cannot grow the table past this


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


def _out_path(text: str) -> str:
    """A file we will write later: its directory must exist now (fail before start-up)."""
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"directory {parent} does not exist")
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


_PCAP = "pcap (advanced) mode"
_NFQ = "NFQUEUE (traditional) mode"
_SRV = "server"
_PROC = "process"
INTERCEPT_SECTIONS = (_PCAP, _NFQ, _SRV, _PROC)


@dataclass(frozen=True)
class InterceptOptions:
    """The validated command line; every field but ``mode`` is a flag and a TOML key of the
    ``[intercept]`` table (the schema: engine/core/config.py ``option()``)."""

    mode: str
    """Either "nfqueue" or "pcap", chosen from the flags given (module docstring)."""
    devices: tuple[str, ...] = option(
        (),
        short="-i",
        long="--interfaces",
        parse=Converter(_device_list, "device list (≤ 32)", "list"),
        metavar="DEV[,DEV...]",
        help="capture devices (default: all but 'any'), up to 32",
        section=_PCAP,
        shown_default="all but any",
    )
    """-i: devices the pcap mode captures responses on."""
    filter_expr: str | None = option(
        None,
        short="-F",
        long="--filter",
        parse=Converter(_filter, "BPF (< 4096 chars)"),
        metavar="BPF",
        help="BPF filter picking the responses, e.g. 'tcp and src port 8080' "
        "(required in this mode)",
        section=_PCAP,
        shown_default="required (pcap mode)",
    )
    """-F: BPF filter picking the target's responses, e.g. `tcp and src port 8080`."""
    pass_ips: tuple[int, ...] = option(
        (),
        short="-x",
        long="--pass",
        parse=Converter(_ip_list, "IPv4 list (≤ 32)", "list"),
        dest="pass_ips",
        metavar="IP[,IP...]",
        help="destination IPs whose responses are ACCEPTed, not intercepted",
        section=_NFQ,
    )
    """-x: responses to these destination IPs are ACCEPTed; the others are read and DROPped."""
    queue_maxlen: int | None = option(
        None,
        short="-q",
        long="--queue-maxlen",
        parse=Converter(_int_in(0, 2**31 - 1, "queue length"), "integer ≥ 0", "int"),
        metavar="N",
        help="NFQUEUE max length (8192; <= 1024: the kernel's 1024, as C)",
        section=_NFQ,
        shown_default=8192,
    )
    """-q: NFQUEUE maximum length in packets.  Without it 8192, not the kernel's 1024: the
    replayed packets come in batches and the target answers each batch at once, so a short
    pause of intercept-mp would overflow 1024 and lose responses (each stalls its session
    until a retransmission).  A value <= 1024 gives the kernel's default, 1024, as C does
    (it ignores such values).  Queued packets hold their buffers in the kernel until the
    verdict: about 20 MB when 8192 are waiting."""
    queue_num: int = option(
        0,
        long="--queue-num",
        parse=Converter(_int_in(0, 65535, "queue number"), "integer 0..65535", "int"),
        metavar="N",
        help="NFQUEUE number to bind (selects this mode; default 0)",
        section=_NFQ,
    )
    """--queue-num: NFQUEUE number to bind; giving it selects the NFQUEUE mode."""
    install_rule: tuple[int, ...] = option(
        (),
        long="--install-rule",
        parse=Converter(_port_list, "port list", "list"),
        metavar="SPORT[,SPORT...]",
        help="add the iptables NFQUEUE rule for these source ports at start and remove it at exit",
        section=_NFQ,
    )
    """--install-rule: the iptables OUTPUT rule sending these source ports to the queue is
    added at start and removed at exit."""
    combine: int = option(
        wire.COMB_MAX,
        short="-n",
        long="--combine",
        parse=Converter(_int_in(0, wire.COMB_MAX, "combine count"), "integer 0..16", "int"),
        metavar="N",
        help="max records per frame, 1..16 (0 = 1; default 16)",
        section=_SRV,
        cli_default=wire.COMB_MAX,
    )
    """-n: most response records per frame sent to tcpcopy (0 = 1)."""
    port: int = option(
        36524,
        short="-p",
        long="--port",
        parse=Converter(_int_in(1, 65535, "port"), "integer 1..65535", "int"),
        help="listen port for tcpcopy (default 36524)",
        section=_SRV,
        cli_default=36524,
    )
    """-p: TCP port tcpcopy connects to."""
    bind: str = option(
        "0.0.0.0",
        short="-b",
        long="--bind",
        parse=Converter(_ipv4_text, "IPv4 address"),
        metavar="IP",
        help="listen address (default all)",
        section=_SRV,
        cli_default="0.0.0.0",
    )
    """-b: address the listen socket binds (0.0.0.0 = all)."""
    delay_table_size: int = option(
        65536,
        short="-s",
        long="--delay-table-size",
        parse=Converter(_int_in(0, 2**32 - 1, "size"), "integer 0..2³²-1", "int"),
        metavar="N",
        help="accepted for C compatibility (unused)",
        section=_SRV,
        cli_default=65536,
    )
    """-s: accepted for C compatibility (C's delay-table hash size); no effect."""
    docker_map: tuple[int, int] | None = option(
        None,
        short="-D",
        long="--docker-map",
        parse=Converter(_docker_map, "A-B (two IPv4)"),
        metavar="A-B",
        help="rewrite response daddr A to B before routing",
        section=_SRV,
    )
    """-D: a response to address A is routed as if sent to B (docker/NAT)."""
    protect: bool = option(
        False,
        short="-c",
        long="--protect",
        action="store_true",
        help="accepted for C compatibility (single builds only; no effect)",
        section=_SRV,
        cli_default=False,
    )
    """-c: accepted for C compatibility (single builds' connection protection); no effect."""
    secret: bytes | None = option(
        None,
        long="--secret-file",
        dest="secret_file",
        parse=Text("path"),
        metavar="FILE",
        help="shared secret (first line; mode 600): tcpcopy-mp must prove it (extended "
        "protocol, docs/protocol.md); unauthenticated peers are refused",
        section=_SRV,
        repr=False,
    )
    """--secret-file: file whose first line is the shared secret (mode 600); tcpcopy-mp must
    prove it (extended protocol, design §6), unauthenticated peers are refused."""
    allow_compat: bool = option(
        False,
        long="--allow-compat",
        action="store_true",
        help="with --secret-file: still accept C-format (compat) tcpcopy, which cannot "
        "authenticate",
        section=_SRV,
        cli_default=False,
    )
    """--allow-compat: with --secret-file, still accept C-format tcpcopy (no authentication)."""
    max_routes_per_conn: int | None = option(
        MAX_ROUTES_PER_CONN_DEFAULT,
        long="--max-routes-per-conn",
        parse=Converter(_int_in(0, 2**31 - 1, "route count"), "integer ≥ 0", "int"),
        metavar="N",
        help="routes kept per tcpcopy connection, least recently used evicted "
        f"(default {MAX_ROUTES_PER_CONN_DEFAULT:,}; 0 = no limit)",
        section=_SRV,
        cli_default=MAX_ROUTES_PER_CONN_DEFAULT,
    )
    """--max-routes-per-conn: routes kept per tcpcopy connection, least recently used
    evicted; 0 = no limit (None in the field)."""
    engine: str = option(
        "auto",
        long="--engine",
        parse=Choice("auto", "compiled", "python"),
        help="NFQUEUE response path: auto (compiled if built, else python), compiled, python",
        section=_PROC,
        cli_default="auto",
    )
    """--engine: how NFQUEUE mode handles the target's responses.  ``compiled``: the
    Cython extension engine.dataplane.responses reads, parses, encodes and routes a read
    batch in C (intercept/fastroute.py), the fast path, -x and -D included; asking for it in
    the pcap mode, or when it is not built, is a configuration error.
    ``python``: the pure-Python path (intercept/sources/nfqueue.py, intercept/router.py),
    the specification.  ``auto``: compiled in NFQUEUE mode when built, else python (a
    logged notice names why when it is not built).  The start line, the exit line and
    --summary-json (``engine``) name the path that runs."""
    sched: str = option(
        "batch",
        long="--sched",
        parse=Choice(*SCHED_CHOICES),
        help="CPU scheduling policy: batch (SCHED_BATCH, default) or inherit",
        section=_PROC,
        cli_default="batch",
    )
    """--sched: intercept-mp's CPU scheduling policy (engine/io/sched.py).  ``batch``: under
    the normal policy it switches to SCHED_BATCH, so being woken by a response never
    preempts the target's server that is still answering: the server finishes its burst and
    one loop pass reads and frames it, which means fewer, fuller frames (fewer wake-ups of
    tcpcopy-mp too).  Its fair share of the CPU is unchanged (so is its nice value).  Started
    under another policy (``chrt``), it keeps it.  ``inherit``: the policy it was started
    with.  The start line and --summary-json (``sched``: this option, ``sched_policy``: the
    policy it ran under) say which policy runs."""
    log_path: str | None = option(
        None,
        short="-l",
        long="--log",
        dest="log_path",
        parse=Text("path"),
        metavar="FILE",
        help="log file (default stderr; error_intercept.log with -d)",
        section=_PROC,
        shown_default="stderr",
    )
    """-l: log file (stderr when not given; error_intercept.log with -d)."""
    log_format: str = option(
        "text",
        long="--log-format",
        parse=Choice("text", "json"),
        section=_PROC,
        cli_default="text",
    )
    """--log-format: text (classic lines) or json (one object per line)."""
    log_level: str = option(
        "info",
        long="--log-level",
        parse=Choice("debug", "info", "notice", "warn", "error"),
        section=_PROC,
        cli_default="info",
    )
    """--log-level: least severe level logged."""
    daemon: bool = option(
        False,
        short="-d",
        long="--daemon",
        action="store_true",
        help="run in the background",
        section=_PROC,
        cli_default=False,
    )
    """-d: run in the background."""
    pid_file: str | None = option(
        None,
        short="-P",
        long="--pid-file",
        parse=Converter(_out_path, "path"),
        metavar="FILE",
        help="write the process id here",
        section=_PROC,
    )
    """-P: the process id is written there (and removed at exit)."""
    summary_json: str | None = option(
        None,
        long="--summary-json",
        parse=Converter(_out_path, "path"),
        metavar="FILE",
        help="write the final counters there as one JSON object on exit",
        section=_PROC,
    )
    """--summary-json: the final counters are written there as one JSON object on exit."""
    metrics: str | None = option(
        None,
        long="--metrics",
        parse=Converter(_metrics_addr, "HOST:PORT"),
        metavar="HOST:PORT",
        help="serve Prometheus metrics (intercept_*) on this address, e.g. 127.0.0.1:9101",
        section=_PROC,
    )
    """--metrics HOST:PORT: Prometheus endpoint (intercept_* metrics)."""
    user: str | None = None
    """--user: run as this user after start-up (engine/io/privileges.py); command line only."""
    group: str | None = None
    """--group: with --user, this group."""


INTERCEPT_OPTIONS = schema_fields(InterceptOptions)
