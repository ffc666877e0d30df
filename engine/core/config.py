"""Configuration: one schema of frozen dataclasses (TOML keys + flags -> these objects).

``SessionConfig`` is what the pure core (session.py, table.py, rewrite.py) reads;
``ReplayConfig`` is the whole run's.  This module is the schema only: the dataclasses, the
value parsers their fields name, and the walk over them.  It imports nothing but the standard
library's data helpers and engine.errors, so pure modules may import it.  Built on it, in
other modules: engine/app/options.py (the argparse options and the TOML loader of both
programs), engine/app/arguments.py (tcpcopy-mp's command line -> ReplayConfig),
engine/app/configdoc.py (docs/config.md).

Theory of operation (design §8): the schema is the dataclass fields themselves.  Every
user-facing field carries ``dataclasses.field(metadata=...)`` made by ``option()``: its short
flag (C letter), long flag, TOML key, value parser (a ``Value``), flag-unit default and unit,
help text and section; its docstring (read from the source with ``ast``) is the meaning shown
in docs/config.md.  From that one place:

* ``options.add_schema_arguments`` generates the argparse options of both programs;
* ``options.read_config_file`` loads a TOML file's ``[tcpcopy]`` / ``[intercept]`` table,
  checks every key and the TOML type of its value, and remembers the line of each key
  (tomllib gives none);
* ``configdoc.reference()`` (``python -m engine.app.configdoc --reference``) writes
  docs/config.md.

TOML key rule: the long flag without its leading ``--``, every ``-`` replaced by ``_``
(``--keepalive-timeout`` -> ``keepalive_timeout``).  Values from the file go through the same
validation as the flag's text; the command line overrides the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from engine.codec.packet import ip_from_str
from engine.errors import ConfigError, DecodeError

BYTES_PER_MB = 1024 * 1024
"""The unit of the memory figures (-m, the stats line's rss)."""
BACKLOG_MAX_BYTES_DEFAULT = 256 * BYTES_PER_MB
"""--backlog-max-bytes default: a worker's held captured data before new sessions are shed."""

INTERCEPT_PORT_DEFAULT = 36524
"""spec §1.1: intercept's default listen port (`-p`)."""
INTERCEPTS_MAX = 32
"""spec §1.1: MAX_REAL_SERVERS."""
CONNECTIONS_MAX = 16
"""-C upper bound (C: 11, MAX_CONN_NUM); intercept keeps up to 16 per tcpcopy (spec §1.6)."""


def worker_connections(connections: int, workers: int, index: int) -> int:
    """Worker ``index``'s share of -C, the connections per intercept of the whole tcpcopy-mp
    (C's are those of its one process): spread as evenly as they go, the lower indexes
    taking the remainder, and at least one per worker (a worker's responses come back on
    its own connections).  2 over 1 worker: 2; over 2: 1 and 1; 3 over 2: 2 and 1."""
    share, extra = divmod(max(connections, 1), max(workers, 1))
    return max(1, share + (1 if index < extra else 0))


# --------------------------------------------------------------------------------------------
# Value parsers: text of a flag (or a TOML value made text) -> value, ConfigError(where, ...)


def parse_int(where: str, text: object, lo: int | None = None, hi: int | None = None) -> int:
    """An integer flag value within [lo, hi]; ConfigError(where, ...) otherwise."""
    if isinstance(text, bool):
        raise ConfigError(where, f"expected an integer, not {text!r}")
    if isinstance(text, int):
        value = text
    else:
        try:
            value = int(str(text).strip(), 10)
        except ValueError:
            raise ConfigError(where, f"expected an integer, not {text!r}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ConfigError(where, f"{value} is out of range ({bounds})")
    return value


def parse_float(where: str, text: object, lo_exclusive: float | None = None) -> float:
    """A number flag value, > lo_exclusive when given; ConfigError(where, ...) otherwise."""
    if isinstance(text, bool):
        raise ConfigError(where, f"expected a number, not {text!r}")
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(where, f"expected a number, not {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(where, f"expected a finite number, not {text!r}")
    if lo_exclusive is not None and value <= lo_exclusive:
        raise ConfigError(where, f"{text} must be greater than {lo_exclusive:g}")
    return value


def parse_ipv4(where: str, text: str) -> int:
    """A dotted-quad IPv4 address as the int of its 4 network-order bytes: the one strict
    rule of ``packet.ip_from_str`` (no leading zero, which inet_aton would read as octal),
    after trimming surrounding blanks; the error names ``where``."""
    try:
        return ip_from_str(text.strip())
    except DecodeError as e:
        reason = str(e).partition(": ")[2]
        raise ConfigError(where, f"{text!r} is not a dotted-quad IPv4 address ({reason})") from None


def parse_intercepts(
    spec: str, default_port: int = INTERCEPT_PORT_DEFAULT
) -> tuple[tuple[str, int], ...]:
    """-s `ip[:port],...` (spec §1.1): a missing port or port 0 means `default_port` (-p).

    Returns ((ip_text, port), ...) with duplicates removed; ConfigError("-s", ...).
    """
    if not spec or not spec.strip():
        raise ConfigError("-s", "no intercept address given; expected ip[:port][,...]")
    out: list[tuple[str, int]] = []
    for position, raw in enumerate(spec.split(","), 1):
        item = raw.strip()
        if not item:
            raise ConfigError("-s", f"item {position} is empty (stray ',')")
        host, sep, port_text = item.partition(":")
        try:
            parse_ipv4("-s", host)
        except ConfigError:
            raise ConfigError(
                "-s", f"{item!r}: {host!r} is not a dotted-quad IPv4 address"
            ) from None
        port = default_port
        if sep:
            if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
                raise ConfigError("-s", f"{item!r}: port {port_text!r} is not in 0..65535")
            port = int(port_text) or default_port
        if (host, port) not in out:
            out.append((host, port))
    if len(out) > INTERCEPTS_MAX:
        raise ConfigError("-s", f"{len(out)} intercepts given; at most {INTERCEPTS_MAX}")
    return tuple(out)


def parse_host_port(where: str, text: str) -> tuple[str, int]:
    """`ADDR:PORT` (ADDR may be empty = all addresses) for --metrics."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        host, port_text = "", text.strip()
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) <= 65535:
        raise ConfigError(where, f"{text!r}: expected ADDR:PORT with a port in 1..65535")
    if host:
        parse_ipv4(where, host)
    return host or "0.0.0.0", int(port_text)


class Value:
    """How one flag's text becomes a value; ``toml`` is the TOML shape a file must give.

    toml: "text" (a string), "list" (a string or an array, joined with ","), "int",
    "number" (int or float), "bool", "paths" (a string or an array of strings, repeatable flag).
    """

    toml = "text"
    doc = "text"

    def __call__(self, where: str, text: Any) -> Any:
        return text


class Text(Value):
    def __init__(self, doc: str = "text", toml: str = "text") -> None:
        self.doc, self.toml = doc, toml


class Flag(Value):
    toml, doc = "bool", "true/false"

    def __call__(self, where: str, text: Any) -> Any:
        return bool(text)


class Int(Value):
    toml = "int"

    def __init__(self, lo: int | None = None, hi: int | None = None) -> None:
        self.lo, self.hi = lo, hi
        self.doc = "integer" + (
            f" {lo}..{hi}" if hi is not None else f" ≥ {lo}" if lo is not None else ""
        )

    def __call__(self, where: str, text: Any) -> int:
        return parse_int(where, text, self.lo, self.hi)


class Number(Value):
    toml = "number"

    def __init__(self, gt: float | None = None) -> None:
        self.gt = gt
        self.doc = "number" + (f" > {gt:g}" if gt is not None else "")

    def __call__(self, where: str, text: Any) -> float:
        return parse_float(where, text, self.gt)


class Choice(Value):
    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.doc = "one of " + ", ".join(choices)

    def __call__(self, where: str, text: Any) -> str:
        if text not in self.choices:
            wanted = ", ".join(repr(c) for c in self.choices)
            raise ConfigError(where, f"invalid choice: {text!r} (choose from {wanted})")
        return str(text)


class IPv4(Value):
    doc = "IPv4 address"

    def __call__(self, where: str, text: Any) -> int:
        return parse_ipv4(where, text)


class HostPort(Value):
    doc = "ADDR:PORT"

    def __call__(self, where: str, text: Any) -> tuple[str, int]:
        return parse_host_port(where, text)


class Converter(Value):
    """An argparse ``type=`` callable (intercept-mp's converters, which word their own errors)
    used for a TOML value too: its ArgumentTypeError becomes ConfigError(where, message)."""

    def __init__(self, conv: Callable[[str], Any], doc: str, toml: str = "text") -> None:
        self.conv, self.doc, self.toml = conv, doc, toml

    def __call__(self, where: str, text: Any) -> Any:
        import argparse

        try:
            return self.conv(text)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise ConfigError(where, str(exc)) from None


def option(
    default: Any = MISSING,
    *,
    long: str,
    short: str | None = None,
    parse: Value | None = None,
    help: str = "",
    section: str,
    unit: str | None = None,
    shown_default: Any = MISSING,
    metavar: str | None = None,
    dest: str | None = None,
    action: str | None = None,
    cli_default: Any = None,
    factory: Any = MISSING,
    repr: bool = True,
    flag_default: Any = MISSING,
) -> Any:
    """A dataclass field that is also a flag and a TOML key (the schema entry).

    ``shown_default`` is the default in the flag's unit for docs/config.md (the field's own
    default when not given); ``cli_default`` is what argparse stores when the flag is absent
    (None = "not given", which the program resolves); ``flag_default`` is the value in the
    flag's unit a program takes when the option is absent, when ``shown_default`` is only a
    description of it ("off").
    """
    parse = parse if parse is not None else Flag() if action == "store_true" else Text()
    meta = {
        "short": short,
        "long": long,
        "key": long.removeprefix("--").replace("-", "_"),
        "dest": dest or long.removeprefix("--").replace("-", "_"),
        "parse": parse,
        "unit": unit,
        "section": section,
        "help": help,
        "metavar": metavar,
        "action": action,
        "cli_default": cli_default,
        "default": default if shown_default is MISSING else shown_default,
        # The value a program uses when the flag is absent, in the flag's unit: the shown
        # default when it is a value, else the field's own default; None when the shown
        # default only describes what the program resolves ("CPU count", "timeout + 120").
        "flag_default": (
            flag_default
            if flag_default is not MISSING
            else default
            if shown_default is MISSING
            else None
            if isinstance(shown_default, str)
            else shown_default
        ),
    }
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta, repr=repr)
    return field(default=default, metadata=meta, repr=repr)


# --------------------------------------------------------------------------------------------
# The session engine's configuration (pure core)


_REPL = "replication"
_CAPT = "capture"
_OFFL = "offline"
_PROC = "process and reporting"

SCHED_CHOICES = ("batch", "inherit")
"""--sched of both programs (engine/io/sched.py applies it)."""

TCPCOPY_SECTIONS = (_REPL, _CAPT, _OFFL, _PROC)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Behaviour of the simulated client TCP stack (spec §3, design §5)."""

    transfers: tuple[Any, ...] = option(
        (),
        short="-x",
        long="--transfer",
        parse=Text("[srcIP:]srcPort-targetIP:targetPort[,...]", "list"),
        metavar="SPEC",
        help="[srcIP:]srcPort-targetIP:targetPort[,...] (required)",
        section=_REPL,
        shown_default="required",
    )
    """-x: the transfer map; a tuple of rewrite.TransferEntry, the first entry matching the
    captured packet's (dst ip, dst port) wins and names the target ip:port."""
    client_pool: tuple[int, ...] = option(
        (),
        short="-c",
        long="--clients",
        parse=Text("IPv4 list, `x` = 1..254", "list"),
        metavar="LIST",
        help="fake client addresses, e.g. 198.19.1.x; a client address whose own fake "
        "address has no free port spills onto the next ones (the target then sees that "
        "client as several addresses)",
        section=_REPL,
        shown_default="captured address",
    )
    """-c: fake client addresses (ints); empty = keep the captured client address.  Each
    captured client address stands in as one pool address (a fixed hash); when that address
    has no free port toward the target (64,512 ports, each kept out of use for the target's
    60 s TIME_WAIT after its connection: ~1,075 new connections/s), its connections spill onto
    the next pool addresses, so the target then sees one client as several addresses
    (counted as tuples_spilled).  With one address (or none), a port still in TIME_WAIT is
    reused the way the target's kernel accepts it (RFC 6191; see strict_time_wait).  A pool
    of N addresses sustains ~N x 1,075 new connections/s without reuse."""
    localhost_ip: int = option(
        0,
        short="-H",
        long="--localhost-ip",
        parse=IPv4(),
        metavar="IP",
        help="replace client source 127.0.0.1 by IP",
        section=_REPL,
        shown_default="off",
        flag_default=0,
    )
    """-H: a captured client source of 127.0.0.1 is replaced by this address (spec §3.3
    step 3), before -c and -r see it; 0 = off.  Refused when a -x target is 127.0.0.1 (C then
    ignores -H: its target_localhost mode keeps the 127.0.0.1 sources)."""
    replicas: int = option(
        1,
        short="-n",
        long="--replicas",
        parse=Int(0, 1023),
        metavar="N",
        help="copies of every session (1-1023)",
        section=_REPL,
    )
    """-n: copies of every session (1 = just the session itself; 0 also means 1)."""
    port_shift: int = option(
        0,
        short="-f",
        long="--port-shift",
        parse=Int(0, 255),
        metavar="F",
        help="client port shift factor (0-255)",
        section=_REPL,
    )
    """-f: port shift factor (0 = off)."""
    sample_percent: int = option(
        100,
        short="-r",
        long="--sample",
        parse=Int(0, 100),
        unit="%",
        metavar="PCT",
        help="percentage of sessions replicated (100)",
        section=_REPL,
    )
    """-r: percentage of flows replicated (decided once per flow; 0 means 100)."""
    gradual: bool = option(
        False,
        short="-g",
        long="--gradual",
        action="store_true",
        help="ramp replication up 1%% per second (not with -r)",
        section=_REPL,
    )
    """-g: ramp the share of replicated flows up by 1 % per second (spec §3.3 step 6, §3.14):
    a new flow is kept when its -r sampling key (C's formula) is below the seconds since the
    ramp started + 1, until that reaches 100 %.  As in C the ramp starts at the first flow
    let through at 1 % (each worker ramps its own flows); a flow left out is reconsidered at
    its next data segment.  C's ramp replaces -r, so -g with -r below 100 is refused."""
    rand_shift: int = 0
    """The 0..511 random offset of -f/-n port formulas (drawn once at start by the CLI)."""
    mtu: int = option(
        1500,
        short="-M",
        long="--mtu",
        parse=Int(576, 65535),
        unit="bytes",
        metavar="BYTES",
        help="MTU (1500)",
        section=_REPL,
    )
    """-M: packets larger than this are split before sending."""
    mss: int = option(
        1460,
        short="-D",
        long="--mss",
        parse=Int(88, 65495),
        unit="bytes",
        metavar="BYTES",
        help="MSS of faked SYNs (1460)",
        section=_REPL,
    )
    """-D: MSS option of a faked SYN."""
    wait_response: bool = option(
        True,
        short="-W",
        long="--no-wait",
        action="store_true",
        help="do not wait for responses before sending the next request",
        section=_REPL,
        shown_default=False,
    )
    """Not -W: hold a new request until the previous response is complete."""
    fake_handshake: bool = option(
        True,
        short="-O",
        long="--only-syn",
        action="store_true",
        help="only replay sessions whose SYN was captured",
        section=_REPL,
        shown_default=False,
    )
    """Not -O: a flow whose SYN was not captured starts with a faked handshake."""
    reconnect: bool = option(
        True,
        long="--no-reconnect",
        action="store_true",
        help="never reconnect a session the target closed or reset with requests unsent",
        section=_REPL,
        shown_default=False,
    )
    """Not --no-reconnect: when the target closes or resets a connection while captured
    requests are still unsent (or a hole in the capture is given up), the session opens a new
    connection (faked handshake) that starts at the next request boundary (spec §3.8
    reconstruct_sess).  Turn it off for protocols with connection state (a database login,
    a TLS session): there a request on a new connection is refused anyway."""
    reconnect_budget: int = option(
        8,
        long="--reconnect-budget",
        parse=Int(0, 1_000_000),
        metavar="N",
        help="reconnects one session may make (8)",
        section=_REPL,
    )
    """At most this many reconnects per session; one more is refused (counted as
    reconnect_refused_budget) and the session ends.  A reconnected connection that the target
    closes or resets before sending any response data is never reconnected again
    (reconnect_refused_unanswered), whatever the budget."""
    session_timeout_s: float = option(
        600.0,
        short="-t",
        long="--timeout",
        parse=Int(),
        unit="s",
        metavar="S",
        help="session timeout in s (600)",
        section=_REPL,
        shown_default=600,
    )
    """-t: a session with no response for this long while work is pending is obsolete
    (a negative value means 600)."""
    keepalive_timeout_s: float = option(
        720.0,
        short="-k",
        long="--keepalive-timeout",
        parse=Int(),
        unit="s",
        metavar="S",
        help="idle session timeout in s (timeout + 120)",
        section=_REPL,
        shown_default="timeout + 120",
    )
    """-k: an idle session (nothing pending) with no response for this long is obsolete
    (a value <= 0 means the default)."""
    handshake_timeout_s: float = 3.0
    """A connection attempt not established after this long fails (SYN retransmitted inside)."""
    linger_s: float = 6.0
    """A finished session lingers this long to RST stray responses (spec §3.9)."""
    rtt_initial_s: float = option(
        0.001,
        short="-R",
        long="--rtt",
        parse=Int(0, 65535),
        unit="ms",
        metavar="MS",
        help="initial RTT in ms",
        section=_REPL,
        shown_default="0 (= 1 ms)",
        flag_default=0,
    )
    """-R (ms in the flag): RTT assumed before one is measured."""
    response_wait_max_s: float = 3.0
    """A held request is released after this long even if its response never completed."""
    time_wait_s: float = 60.0
    """A (client ip, port, target) tuple is not reused for this long after its session ends
    (unless the target's TIME_WAIT accepts the new SYN: see strict_time_wait)."""
    strict_time_wait: bool = option(
        False,
        long="--strict-time-wait",
        action="store_true",
        help="never reuse a client port still in the target's TIME_WAIT (for targets "
        "without RFC 6191)",
        section=_REPL,
    )
    """--strict-time-wait: a (fake client ip, port) toward a target is never reused within
    60 s of its last connection.  By default, when no free one is left (after spilling over
    the -c pool), one is reused the way Linux accepts a SYN on a tuple in TIME_WAIT (RFC 6191,
    tcp_timewait_state_process): the SYN carries a TS option whose TSval (our 1 kHz clock)
    is newer than the old connection's, or, when the SYN has no TS option or the target
    runs with net.ipv4.tcp_timestamps=0, its sequence number is after the old connection's
    (we never change the captured seq numbers, so the port is chosen among those where that
    holds, about one in two).  Set this for a target that refuses such SYNs (some
    middleboxes and other kernels): connections beyond the ceiling are then refused and
    counted as no_tuple."""
    worker_index: int = 0
    """This shard's index (for port allocation that never collides across workers)."""
    worker_count: int = 1
    """Number of shards."""
    max_sessions: int = 0
    """0 = unlimited; otherwise new sessions beyond this are refused and counted."""
    backlog_max_bytes: int = option(
        BACKLOG_MAX_BYTES_DEFAULT,
        long="--backlog-max-bytes",
        parse=Int(0),
        unit="bytes",
        metavar="BYTES",
        help="byte budget of the captured data a worker holds unsent (256 MiB; 0 = none)",
        section=_REPL,
    )
    """--backlog-max-bytes: per worker, the payload bytes its sessions may hold captured and
    not yet sent (requests waiting for the target).  Past it a packet that would start a new
    session starts none: the flow is shed whole (counted ``shed_sessions_backlog``, exported
    as ``shed{reason="backlog"}``) and its later packets are dropped until its FIN/RST or 60 s
    idle; sessions already running keep going.  0 = no budget (only -m bounds the memory)."""
    fin_wait_timeout_s: float = 60.0
    """After the client's FIN was sent, wait this long for the target's FIN (Linux's
    tcp_fin_timeout); then the session ends with a RST."""


# --------------------------------------------------------------------------------------------
# The replay process's configuration (CLI + TOML layer), design §8.  Everything below is
# built by engine/app/cli.py; the pure core only ever sees SessionConfig above.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """Everything one tcpcopy-mp run needs besides the session engine's own SessionConfig."""

    session: SessionConfig
    """What the session table (pure core) reads."""
    intercepts: tuple[tuple[str, int], ...] = option(
        short="-s",
        long="--intercepts",
        parse=Text("ip[:port] list", "list"),
        metavar="IP[:PORT],...",
        help="intercept addresses (required)",
        section=_REPL,
        shown_default="required",
    )
    """-s: (dotted-quad IPv4, port) of every intercept, in the order given (at most 32)."""
    intercept_port: int = option(
        INTERCEPT_PORT_DEFAULT,
        short="-p",
        long="--intercept-port",
        parse=Int(1, 65535),
        metavar="PORT",
        help=f"default intercept port ({INTERCEPT_PORT_DEFAULT})",
        section=_REPL,
    )
    """-p: port of every -s entry that names none (or port 0)."""
    connections: int = option(
        2,
        short="-C",
        long="--connections",
        parse=Int(),
        metavar="N",
        help="connections per intercept, 1-16 (2), spread over the workers (at least one each)",
        section=_REPL,
    )
    """-C: connections per intercept of the whole tcpcopy-mp, as C's per process (clamped to
    1..16), spread over the workers by ``worker_connections``: each worker has at least
    one, so --workers above -C makes --workers connections.  Fewer connections per worker
    mean fewer, larger reads: intercept writes one segment per connection per loop pass."""
    secret_file: str | None = option(
        None,
        long="--secret-file",
        parse=Text("path"),
        metavar="FILE",
        help="shared secret (first line; mode 600): authenticate every intercept channel "
        "(extended protocol; intercept-mp --secret-file)",
        section=_REPL,
    )
    """--secret-file: file whose first line is the secret shared with intercept-mp (mode
    600); every channel then uses the authenticated extended handshake."""
    capture: str = option(
        "raw",
        long="--capture",
        parse=Choice("raw", "packet"),
        help="raw: packets to this host on every device; packet: AF_PACKET on -i DEV",
        section=_CAPT,
        shown_default="raw (packet with -i DEV)",
    )
    """raw (the C default's scope: the TCP packets addressed to this host, from every device) |
    packet (every frame of -i DEV) | offline (set by a pcap file).  Both live modes read an
    AF_PACKET TPACKET_V3 mmap ring (a block of packets per wake-up, the BPF filter in the
    kernel); where that is unavailable they fall back, logged once, to recv on an IPPROTO_TCP
    raw socket (raw) or an AF_PACKET socket (packet)."""
    interfaces: tuple[str, ...] = option(
        (),
        short="-i",
        long="--interface",
        parse=Text("device list or pcap file", "list"),
        metavar="DEV|FILE",
        help="capture device(s), or a pcap file (offline)",
        section=_CAPT,
        shown_default="every device",
    )
    """-i: capture devices for `packet` capture (empty or "any" = every device); a pcap
    file name here means offline replay of that file."""
    capture_filter: str = option(
        "",
        short="-F",
        long="--filter",
        metavar="BPF",
        help="pcap filter expression (tcpdump syntax); a packet must match it and -x",
        section=_CAPT,
        shown_default=None,
    )
    """-F: a pcap filter expression (tcpdump syntax), compiled by libpcap for the IP header
    and run in the kernel after the -x selection: a packet is replayed only when both keep
    it (every capture mode; offline replay applies it to the file's packets).  IP and TCP
    primitives (host, net, port, portrange, ip[...] and tcp[...] tests); link-layer ones
    (ether, vlan) are refused, since the filter starts at the IP header on every device, and
    `len`/`greater`/`less` count the link header on AF_PACKET capture.  Host names are
    resolved once, at start.  Example: `not src net 10.1.0.0/16` leaves that subnet's
    clients out of the copy."""
    capture_buffer_bytes: int = option(
        4 * 1024 * 1024,
        short="-B",
        long="--buffer",
        parse=Int(1, 4096),
        unit="MB",
        metavar="MB",
        help="capture buffer in MB (4)",
        section=_CAPT,
        shown_default=4,
    )
    """-B (MB in the flag): the capture's kernel buffer: the TPACKET_V3 ring (blocks of
    128 KiB; mapped in the capture process only, so its pages are in that process's memory),
    or SO_RCVBUF of the socket it falls back to.  It holds what arrives while the capture
    process is off the CPU: 4 MB is 32 blocks, at least 1 s of packets at low rates (a
    block is handed over 32 ms after its first packet) and about 20,000 packets of 100
    bytes (a frame takes about 200 bytes of the ring) at high ones.  C's -B (16 MB) sizes
    the buffer of its pcap build; its default build reads a raw socket whose buffer the
    kernel caps at net.core.rmem_max (about 0.4 MB of packets by default)."""
    ring_bytes: int | None = option(
        None,
        long="--ring-size",
        parse=Int(1, 1024),
        unit="MB",
        metavar="MB",
        help="each worker's packet ring in MB (derived from the load)",
        section=_CAPT,
        shown_default="derived",
    )
    """--ring-size (MB in the flag): the shared-memory ring that carries a worker's share of
    the captured packets from the capture process to it (its pages are committed at start).
    A packet takes its own length in it plus 16 bytes of header, padded to 8 bytes (about
    120 bytes for a typical 100-byte packet; 2 MB hold some 17,000 of them, 1,365 of the
    largest).  Derived when not given: live capture, the worker's share of 2 MB (or of half
    of -B if larger) between 1 and 2 MB: 2 MB for one worker, 1 MB each for more (with -B
    4).  A worker's ring holds what arrives while that worker is off the CPU (the kernel
    ring, -B, what arrives while the capture process is), and each of N workers gets 1/N of
    the packets; on 2 CPUs the benchmark's loads dropped nothing in one 2 MB ring nor in two
    of 1 MB (docs/memory.md); offline replay, 3 MB:
    the file waits while a ring is half full, so a ring needs room for one read batch of
    1,024 of the largest packets (-M) past its pause mark.  Never less than two of the
    largest packets."""
    snaplen: int | None = option(
        None,
        short="-S",
        long="--snaplen",
        parse=Int(0),
        unit="bytes",
        metavar="BYTES",
        help="accepted for compatibility; ignored",
        section=_CAPT,
    )
    """-S: accepted for C compatibility (pcap snaplen); no effect."""
    output_interface: str | None = option(
        None,
        short="-o",
        long="--output-interface",
        metavar="DEV",
        help="send the replayed packets as Ethernet frames on DEV (link layer), not through "
        "this host's IP layer",
        section=_CAPT,
        shown_default="off (raw IP socket)",
    )
    """-o: link-layer send (C's --pcap-send, chosen at run time): every replayed packet leaves
    as an Ethernet frame on DEV through a packet socket, so this host's routing, OUTPUT
    rules, conntrack and rp_filter are not involved.  The next hop's MAC is the -x entry's
    `@MAC` when given (`port@srcMAC-ip:port@dstMAC`, as C), else the kernel's neighbour
    entry for the target or the gateway of its route on DEV, probed at start when absent
    and re-read every 5 s; the source MAC is DEV's (or the -x entry's).  Packets larger
    than DEV's MTU are split."""
    pcap_files: tuple[str, ...] = option(
        (),
        long="--pcap",
        parse=Text("path (repeatable; array in TOML)", "paths"),
        metavar="FILE",
        action="append",
        help="replay this pcap file (repeatable)",
        section=_OFFL,
        shown_default=None,
    )
    """--pcap / -i FILE: files replayed in order (offline)."""
    accelerate: float = option(
        1.0,
        short="-a",
        long="--accelerate",
        parse=Number(0.0),
        metavar="N",
        help="replay speed factor (1)",
        section=_OFFL,
    )
    """-a: offline replay speed factor."""
    idle_threshold_s: float = option(
        0.0,
        short="-I",
        long="--idle-threshold",
        parse=Int(0),
        unit="ms",
        metavar="MS",
        help="skip gaps longer than MS",
        section=_OFFL,
        shown_default="0 (off)",
        flag_default=0,
    )
    """-I (ms in the flag): offline gaps longer than this are skipped; 0 = off."""
    replays: int = option(
        1,
        short="-T",
        long="--replays",
        parse=Int(1),
        metavar="N",
        help="passes over the file(s) (1)",
        section=_OFFL,
    )
    """-T: offline passes over the file(s)."""
    offline_tail_s: float = option(
        10.0,
        long="--offline-tail",
        parse=Number(0.0),
        unit="s",
        metavar="S",
        help="after the input ends, close what sends nothing for S s (10)",
        section=_OFFL,
    )
    """Offline: once the input has ended (the last file read and the worker's ring empty),
    sessions still open get until no packet was sent for this long, then each is ended with
    a RST to the target and counted (``ended_offline_end``) and the program exits with its
    summary.  C waits a fixed 120 s (OFFLINE_TAIL_TIMEOUT).  After the end of the file a
    session can only be waiting for the target (a held request goes after at most 3 s, a
    SYN is retried within the 3 s handshake timeout, so a session still working sends at
    least every 3 s and keeps the tail open) or for client packets that will never come
    (a lone SYN, an idle keep-alive connection): 10 s without a packet sent is over three
    of the longest waits of a working session, and waiting longer only delays the summary."""
    workers: int = option(
        1,
        long="--workers",
        parse=Int(1, 1024),
        metavar="N",
        help="worker processes (default: the number of CPUs)",
        section=_PROC,
        shown_default="CPU count",
    )
    """--workers: worker processes, each owning a shard of the sessions."""
    engine: str = option(
        "auto",
        long="--engine",
        parse=Choice("auto", "compiled", "python"),
        help="session engine: auto (compiled if built, else python), compiled, python",
        section=_PROC,
    )
    """--engine: which session engine the workers run.  ``compiled``: the Cython extension
    engine.dataplane.engine (built by the normal install when a C compiler is present), the
    fast path; ``python``: the pure-Python engine (engine/core), the specification, 25-35x
    slower per input (bench/bench_engine.py); ``auto``: compiled when it is built, else
    python with a logged notice naming why.  ``compiled`` when it is not built is a
    configuration error.  The start log line, the exit line, --summary-json (``engine``) and
    /metrics (``tcpcopy_build_info``) name the engine that runs."""
    sched: str = option(
        "batch",
        long="--sched",
        parse=Choice(*SCHED_CHOICES),
        help="workers' CPU scheduling policy: batch (SCHED_BATCH) or inherit",
        section=_PROC,
    )
    """--sched: the workers' CPU scheduling policy (engine/io/sched.py).  ``batch``: a worker
    running under the normal policy switches to SCHED_BATCH, so its wake-ups (a frame of
    responses, a ring batch) never preempt the task running on that CPU, the production
    server first of all; it still gets its fair share (the nice value is unchanged), and it
    reads more per wake-up.  A worker started under another policy (``chrt``) keeps it.
    ``inherit``: the policy tcpcopy-mp was started with.  The capture process and the
    supervisor keep the policy they were started with.  A refused switch is logged by the
    worker, which then runs as started.  The start line and --summary-json (``sched``) name
    this option."""
    metrics: tuple[str, int] | None = option(
        None,
        long="--metrics",
        parse=HostPort(),
        metavar="ADDR:PORT",
        help="Prometheus endpoint",
        section=_PROC,
    )
    """--metrics ADDR:PORT for the Prometheus endpoint."""
    log_path: str | None = option(
        None,
        short="-l",
        long="--log",
        parse=Text("path"),
        metavar="FILE",
        help="log file (stderr)",
        section=_PROC,
        shown_default="stderr",
        dest="log",
    )
    """-l: log file (None = stderr)."""
    log_format: str = option(
        "text",
        long="--log-format",
        parse=Choice("text", "json"),
        help="log line format (text)",
        section=_PROC,
    )
    """--log-format: text (the classic lines) or json (one object per line)."""
    stats_interval_s: float = option(
        30.0,
        long="--stats-interval",
        parse=Number(0.0),
        unit="s",
        metavar="S",
        help="statistics log period in s (30)",
        section=_PROC,
        shown_default=30,
    )
    """--stats-interval: period of the statistics log line (spec §3.18)."""
    summary_json: str | None = option(
        None,
        long="--summary-json",
        parse=Text("path"),
        metavar="FILE",
        help="write the final counters there on exit",
        section=_PROC,
    )
    """--summary-json: the final counters are written there as one JSON object on exit."""
    memory_limit_mb: int = option(
        2048,
        short="-m",
        long="--memory-limit",
        parse=Int(1),
        unit="MB",
        metavar="MB",
        help="RSS limit in MB (2048)",
        section=_REPL,
    )
    """-m: RSS limit checked every 60 s (spec §3.17); exceeding it ends the run."""
    daemon: bool = option(
        False,
        short="-d",
        long="--daemon",
        action="store_true",
        help="run in the background",
        section=_REPL,
    )
    """-d: run in the background."""
    lonely: bool = option(
        False,
        short="-L",
        long="--lonely",
        action="store_true",
        help="accepted; intercept connections are always re-made",
        section=_REPL,
    )
    """-L: accepted; intercept connections are always re-made."""
    pool_size_kb: int | None = option(
        None,
        short="-U",
        long="--pool-size",
        parse=Int(0),
        unit="KB",
        metavar="KB",
        help="accepted for compatibility; ignored",
        section=_REPL,
    )
    """-U: accepted for C compatibility (session pool block size); no effect."""
    pid_file: str | None = option(
        None,
        short="-P",
        long="--pid-file",
        parse=Text("path"),
        metavar="FILE",
        help="write the process id to FILE",
        section=_REPL,
    )
    """-P: the process id is written there at start."""
    intercept_secret: bytes | None = field(default=None, repr=False)
    """--secret-file's secret: every intercept channel uses the authenticated extended
    handshake (design §6); None = the compat handshake."""

    @property
    def gradual(self) -> bool:
        """-g (a SessionConfig field: the session table applies it)."""
        return self.session.gradual

    @property
    def localhost_ip(self) -> int:
        """-H (a SessionConfig field: the session table applies it)."""
        return self.session.localhost_ip


# --------------------------------------------------------------------------------------------
# The schema, walked


def schema_fields(cls: type) -> list[Field[Any]]:
    """The user-facing fields of a config dataclass, in order; a nested SessionConfig field
    (ReplayConfig.session) is expanded in place."""
    out: list[Field[Any]] = []
    for f in fields(cls):
        if "long" in f.metadata:
            out.append(f)
        elif f.name == "session":
            out.extend(schema_fields(SessionConfig))
    return out
