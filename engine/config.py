"""Configuration: one schema of frozen dataclasses (TOML keys + flags -> these objects).

``SessionConfig`` is what the pure core (session.py, shard.py, rewrite.py) reads.  It imports
nothing but the standard library's data helpers so pure modules may import it.
The CLI/TOML layer (``ReplayConfig`` and the parsers) lives below it in this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Behaviour of the simulated client TCP stack (spec §3, design §5)."""

    transfers: tuple = ()
    """-x: tuple of rewrite.TransferEntry; the first entry matching (dst ip, dst port) wins."""
    client_pool: tuple[int, ...] = ()
    """-c: fake client addresses (ints); empty = keep the captured client address."""
    replicas: int = 1
    """-n: copies of every session (1 = just the session itself)."""
    port_shift: int = 0
    """-f: port shift factor (0 = off)."""
    sample_percent: int = 100
    """-r: percentage of flows replicated (decided once per flow)."""
    rand_shift: int = 0
    """The 0..511 random offset of -f/-n port formulas (drawn once at start by the CLI)."""
    mtu: int = 1500
    """-M: packets larger than this are split before sending."""
    mss: int = 1460
    """-D: MSS option of a faked SYN."""
    wait_response: bool = True
    """Not -W: hold a new request until the previous response is complete."""
    fake_handshake: bool = True
    """Not -O: a flow whose SYN was not captured starts with a faked handshake."""
    session_timeout_s: float = 600.0
    """-t: a session with no response for this long while work is pending is obsolete."""
    keepalive_timeout_s: float = 720.0
    """-k: an idle session (nothing pending) with no response for this long is obsolete."""
    handshake_timeout_s: float = 3.0
    """A connection attempt not established after this long fails (SYN retransmitted inside)."""
    linger_s: float = 6.0
    """A finished session lingers this long to RST stray responses (spec §3.9)."""
    rtt_initial_s: float = 0.001
    """-R (ms in the flag): RTT assumed before one is measured."""
    response_wait_max_s: float = 3.0
    """A held request is released after this long even if its response never completed."""
    time_wait_s: float = 60.0
    """A (client ip, port, target) tuple is not reused for this long after its session ends."""
    worker_index: int = 0
    """This shard's index (for port allocation that never collides across workers)."""
    worker_count: int = 1
    """Number of shards."""
    max_sessions: int = 0
    """0 = unlimited; otherwise new sessions beyond this are refused and counted."""
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    """Free-form knobs for experiments; not part of the stable schema."""
    fin_wait_timeout_s: float = 60.0
    """After the client's FIN was sent, wait this long for the target's FIN (Linux's
    tcp_fin_timeout); then the session ends with a RST."""


# --------------------------------------------------------------------------------------------
# The replay process's configuration (CLI + TOML layer), design §8.  Everything below is
# built by engine/cli.py; the pure core only ever sees SessionConfig above.
# --------------------------------------------------------------------------------------------

from engine.errors import ConfigError  # noqa: E402  (kept below SessionConfig on purpose)

INTERCEPT_PORT_DEFAULT = 36524
"""spec §1.1: intercept's default listen port (`-p`)."""
INTERCEPTS_MAX = 32
"""spec §1.1: MAX_REAL_SERVERS."""
CONNECTIONS_MAX = 16
"""-C upper bound (C: 11, MAX_CONN_NUM); intercept keeps up to 16 per tcpcopy (spec §1.6)."""


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """Everything one tcpcopy-mp run needs besides the session engine's own SessionConfig."""

    session: SessionConfig
    """What the session table (pure core) reads."""
    intercepts: tuple[tuple[str, int], ...]
    """-s: (dotted-quad IPv4, port) of every intercept, in the order given."""
    connections: int = 2
    """-C: connections per intercept (1..16)."""
    capture: str = "raw"
    """raw (IPPROTO_TCP raw socket, the C default) | packet (AF_PACKET on -i) | offline."""
    interfaces: tuple[str, ...] = ()
    """-i: capture devices for `packet` capture (empty or "any" = every device)."""
    pcap_files: tuple[str, ...] = ()
    """--pcap / -i FILE: files replayed in order (offline)."""
    accelerate: float = 1.0
    """-a: offline replay speed factor."""
    idle_threshold_s: float = 0.0
    """-I (ms in the flag): offline gaps longer than this are skipped; 0 = off."""
    replays: int = 1
    """-T: offline passes over the file(s)."""
    capture_buffer_bytes: int = 64 * 1024 * 1024
    """-B (MB in the flag): kernel receive buffer of the capture socket."""
    capture_filter: str = ""
    """-F: accepted for C compatibility; the -x pre-filter decides what is replayed."""
    workers: int = 1
    """--workers: worker processes (this version runs one)."""
    metrics: tuple[str, int] | None = None
    """--metrics ADDR:PORT for the Prometheus endpoint."""
    log_path: str | None = None
    """-l: log file (None = stderr)."""
    log_format: str = "text"
    """--log-format text|json."""
    stats_interval_s: float = 30.0
    """--stats-interval: period of the statistics log line (spec §3.18)."""
    summary_json: str | None = None
    """--summary-json: the final counters are written there as one JSON object on exit."""
    memory_limit_mb: int = 2048
    """-m: RSS limit checked every 60 s (spec §3.17)."""
    daemon: bool = False
    """-d: run in the background."""
    lonely: bool = False
    """-L: accepted; intercept connections are always re-made."""
    gradual: bool = False
    """-g: ramp sampling up by 1 %/s (spec §3.14)."""
    localhost_ip: int = 0
    """-H: replaces a 127.0.0.1 client source (spec §3.3 step 3); 0 = off."""
    intercept_secret: bytes | None = field(default=None, repr=False)
    """--secret-file's secret: every intercept channel uses the authenticated extended
    handshake (design §6); None = the compat handshake."""


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
    if lo is not None and value < lo or hi is not None and value > hi:
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
    """A dotted-quad IPv4 address as the int of its 4 network-order bytes."""
    parts = text.strip().split(".")
    # isascii: str.isdigit() also accepts digits int() refuses ("²"), and other scripts.
    if len(parts) != 4 or not all(p.isascii() and p.isdigit() and len(p) <= 3 for p in parts):
        raise ConfigError(where, f"{text!r} is not a dotted-quad IPv4 address")
    octets = [int(p) for p in parts]
    if any(o > 255 for o in octets):
        raise ConfigError(where, f"{text!r} is not a dotted-quad IPv4 address")
    return int.from_bytes(bytes(octets), "big")


def parse_intercepts(spec: str, default_port: int = INTERCEPT_PORT_DEFAULT) -> tuple:
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


def load_config_file(path: str) -> dict:
    """Read a TOML file of flag values (keys = long flag names, `-` or `_`).

    Keys may sit at the top level or under a `[tcpcopy]` table.  Returns the raw mapping;
    unknown keys are reported by the CLI, which knows the flags.  ConfigError("--config").
    """
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path}: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8; tomllib lets this one through
        raise ConfigError("--config", f"{path}: not UTF-8 text (byte {exc.start})") from None
    section = data.get("tcpcopy", data)
    if not isinstance(section, dict):
        raise ConfigError("--config", f"{path}: [tcpcopy] must be a table")
    return {k: v for k, v in section.items() if not (k == "tcpcopy" and isinstance(v, dict))}
