"""The configuration schema (engine/core/config.py): flags, TOML keys and docs/config.md agree.

No privileges and no traffic: configurations are built in-process (what main() does before
it opens anything) or the real CLIs are run on files that fail at validation.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.app import cli
from engine.codec.packet import ip_from_str
from engine.core.config import ReplayConfig
from intercept import cli as icli
from intercept.config import INTERCEPT_OPTIONS
from tests.paths import ONLINE_HTTP_PCAP

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "config"
BIN_DIR = Path(sys.executable).parent
PROGRAMS = {"tcpcopy": cli.TCPCOPY_OPTIONS, "intercept": INTERCEPT_OPTIONS}
SECRET = b"0123456789abcdef0123456789abcdef"


def run(prog: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN_DIR / prog), *args], capture_output=True, text=True, timeout=30, cwd=REPO
    )


def schema_keys(table: str) -> set[str]:
    return {f.metadata["key"] for f in PROGRAMS[table]}


# --- the documented value of every key: TOML value -> what the built config holds ------------
# Each entry: key -> (what the config holds, what the TOML value documents).


def _ip_port_list(value: Any, default_port: int) -> tuple:
    items = value if isinstance(value, list) else value.split(",")
    out = []
    for item in items:
        host, _, port = item.partition(":")
        out.append((host, int(port) if port else default_port))
    return tuple(out)


def _transfers(value: Any) -> list[tuple[int, int]]:
    items = value if isinstance(value, list) else value.split(",")
    out = []
    for item in items:
        _, target = item.split("-")
        ip, port = target.split(":")
        out.append((ip_from_str(ip), int(port)))
    return out


def _pool(value: str) -> set[int]:
    out: set[int] = set()
    for item in value.split(","):
        if item.endswith(".x"):
            out |= {ip_from_str(f"{item[:-2]}.{i}") for i in range(1, 255)}
        else:
            out.add(ip_from_str(item))
    return out


def _host_port(value: str) -> tuple[str, int]:
    host, port = value.rsplit(":", 1)
    return host, int(port)


Check = tuple[Callable[[Any], Any], Callable[[Any, dict], Any]]

TCPCOPY_EXPECT: dict[str, Check] = {
    "transfer": (
        lambda c: [(t.target_ip, t.target_port) for t in c.session.transfers],
        lambda v, t: _transfers(v),
    ),
    "intercepts": (
        lambda c: c.intercepts,
        lambda v, t: _ip_port_list(v, t.get("intercept_port", 36524)),
    ),
    "intercept_port": (lambda c: c.intercept_port, lambda v, t: v),
    "connections": (lambda c: c.connections, lambda v, t: min(max(v, 1), 16)),
    "secret_file": (lambda c: (c.secret_file, c.intercept_secret), lambda v, t: (v, SECRET)),
    "clients": (lambda c: set(c.session.client_pool), lambda v, t: _pool(v)),
    "replicas": (lambda c: c.session.replicas, lambda v, t: max(v, 1)),
    "sample": (lambda c: c.session.sample_percent, lambda v, t: v or 100),
    "port_shift": (lambda c: c.session.port_shift, lambda v, t: v),
    "localhost_ip": (lambda c: c.localhost_ip, lambda v, t: ip_from_str(v)),
    "no_wait": (lambda c: c.session.wait_response, lambda v, t: not v),
    "only_syn": (lambda c: c.session.fake_handshake, lambda v, t: not v),
    "mtu": (lambda c: c.session.mtu, lambda v, t: v),
    "mss": (lambda c: c.session.mss, lambda v, t: v),
    "rtt": (lambda c: c.session.rtt_initial_s, lambda v, t: v / 1000 if v else 0.001),
    "timeout": (lambda c: c.session.session_timeout_s, lambda v, t: float(v if v > 0 else 600)),
    "keepalive_timeout": (
        lambda c: c.session.keepalive_timeout_s,
        lambda v, t: float(v if v > 0 else t.get("timeout", 600) + 120),
    ),
    "memory_limit": (lambda c: c.memory_limit_mb, lambda v, t: v),
    "gradual": (lambda c: c.gradual, lambda v, t: v),
    "strict_time_wait": (lambda c: c.session.strict_time_wait, lambda v, t: v),
    "no_reconnect": (lambda c: c.session.reconnect, lambda v, t: not v),
    "reconnect_budget": (lambda c: c.session.reconnect_budget, lambda v, t: v),
    "lonely": (lambda c: c.lonely, lambda v, t: v),
    "pool_size": (lambda c: c.pool_size_kb, lambda v, t: v),
    "pid_file": (lambda c: c.pid_file, lambda v, t: v),
    "daemon": (lambda c: c.daemon, lambda v, t: v),
    "capture": (lambda c: c.capture, lambda v, t: v),
    "interface": (lambda c: c.interfaces, lambda v, t: tuple(v.split(","))),
    "filter": (lambda c: c.capture_filter, lambda v, t: v),
    "buffer": (lambda c: c.capture_buffer_bytes, lambda v, t: v * 1024 * 1024),
    "ring_size": (lambda c: c.ring_bytes, lambda v, t: v * 1024 * 1024),
    "snaplen": (lambda c: c.snaplen, lambda v, t: v),
    "output_interface": (lambda c: c.output_interface, lambda v, t: v),
    "pcap": (lambda c: list(c.pcap_files), lambda v, t: v if isinstance(v, list) else [v]),
    "accelerate": (lambda c: c.accelerate, lambda v, t: float(v)),
    "idle_threshold": (lambda c: c.idle_threshold_s, lambda v, t: v / 1000),
    "replays": (lambda c: c.replays, lambda v, t: v),
    "offline_tail": (lambda c: c.offline_tail_s, lambda v, t: float(v)),
    "workers": (lambda c: c.workers, lambda v, t: v),
    "engine": (lambda c: c.engine, lambda v, t: v),
    "sched": (lambda c: c.sched, lambda v, t: v),
    "backlog_max_bytes": (lambda c: c.session.backlog_max_bytes, lambda v, t: v),
    "metrics": (lambda c: c.metrics, lambda v, t: _host_port(v)),
    "log": (lambda c: c.log_path, lambda v, t: v),
    "log_format": (lambda c: c.log_format, lambda v, t: v),
    "stats_interval": (lambda c: c.stats_interval_s, lambda v, t: float(v)),
    "summary_json": (lambda c: c.summary_json, lambda v, t: v),
}

INTERCEPT_EXPECT: dict[str, Check] = {
    "interfaces": (
        lambda o: o.devices,
        lambda v, t: tuple(v) if isinstance(v, list) else tuple(v.split(",")),
    ),
    "filter": (lambda o: o.filter_expr, lambda v, t: v),
    "pass": (
        lambda o: o.pass_ips,
        lambda v, t: tuple(ip_from_str(x) for x in (v if isinstance(v, list) else v.split(","))),
    ),
    "queue_maxlen": (lambda o: o.queue_maxlen, lambda v, t: v),
    "queue_num": (lambda o: (o.mode, o.queue_num), lambda v, t: ("nfqueue", v)),
    "install_rule": (lambda o: o.install_rule, lambda v, t: tuple(v)),
    "combine": (lambda o: o.combine, lambda v, t: max(v, 1)),
    "port": (lambda o: o.port, lambda v, t: v),
    "bind": (lambda o: o.bind, lambda v, t: v),
    "delay_table_size": (lambda o: o.delay_table_size, lambda v, t: v),
    "docker_map": (
        lambda o: o.docker_map,
        lambda v, t: tuple(ip_from_str(x) for x in v.split("-")),
    ),
    "protect": (lambda o: o.protect, lambda v, t: v),
    "secret_file": (lambda o: o.secret, lambda v, t: SECRET),
    "allow_compat": (lambda o: o.allow_compat, lambda v, t: v),
    "max_routes_per_conn": (lambda o: o.max_routes_per_conn, lambda v, t: v or None),
    "engine": (lambda o: o.engine, lambda v, t: v),
    "sched": (lambda o: o.sched, lambda v, t: v),
    "log": (lambda o: o.log_path, lambda v, t: v),
    "log_format": (lambda o: o.log_format, lambda v, t: v),
    "log_level": (lambda o: o.log_level, lambda v, t: v),
    "daemon": (lambda o: o.daemon, lambda v, t: v),
    "pid_file": (lambda o: o.pid_file, lambda v, t: os.path.abspath(v)),
    "summary_json": (lambda o: o.summary_json, lambda v, t: os.path.abspath(v)),
    "metrics": (lambda o: o.metrics, lambda v, t: v),
}

EXPECT = {"tcpcopy": TCPCOPY_EXPECT, "intercept": INTERCEPT_EXPECT}


def load(table: str, path: Path) -> Any:
    if table == "tcpcopy":
        return cli.parse_config(["--config", str(path)])
    return icli.parse_args(["--config", str(path)])


def check_values(table: str, cfg: Any, values: dict) -> None:
    for key, value in values.items():
        actual, expected = EXPECT[table][key]
        assert actual(cfg) == expected(value, values), (table, key, value)


# --- the reference -------------------------------------------------------------------------


def test_reference_matches_committed_docs():
    proc = subprocess.run(
        [sys.executable, "-m", "engine.app.configdoc", "--reference"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=True,
    )
    assert proc.stdout == (REPO / "docs" / "config.md").read_text(encoding="utf-8")


def test_reference_documents_every_key_and_flag():
    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    for table, options in PROGRAMS.items():
        assert f"`[{table}]`" in text
        for f in options:
            m = f.metadata
            row = next((line for line in text.splitlines() if f"| `{m['key']}` |" in line), None)
            assert row is not None, m["key"]
            assert f"`{m['long']}`" in text
            meaning = re.split(r"(?<!\\)\|", row)[-2].strip()
            assert len(meaning) > 10, (m["key"], row)  # a docstring made it there


def test_expectations_cover_the_whole_schema():
    # A new key must get a documented-value check here (and an entry in example.toml).
    for table in PROGRAMS:
        assert set(EXPECT[table]) == schema_keys(table), table


# --- the shipped files ---------------------------------------------------------------------


def config_files() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.toml"))


def test_config_dir_has_the_documented_files():
    names = {p.name for p in config_files()}
    assert {"example.toml", "prod.toml", "intercept.toml"} <= names


@pytest.mark.parametrize("path", config_files(), ids=lambda p: p.name)
def test_every_key_of_every_config_file_loads_with_its_documented_value(path: Path):
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    tables = [t for t in PROGRAMS if t in data]
    assert tables, f"{path.name}: no [tcpcopy] or [intercept] table"
    for table in tables:
        assert set(data[table]) <= schema_keys(table)
        check_values(table, load(table, path), data[table])


def test_prod_is_the_design_card_deployment():
    data = tomllib.loads((CONFIG_DIR / "prod.toml").read_text(encoding="utf-8"))["tcpcopy"]
    assert data["workers"] == 8 and data["log_format"] == "json"
    for key in ("transfer", "intercepts", "clients", "metrics", "log", "memory_limit", "timeout"):
        assert key in data, key
    assert data["metrics"].startswith("127.0.0.1:")
    cfg = cli.parse_config(["--workers", "8", "--config", str(CONFIG_DIR / "prod.toml")])
    assert cfg.workers == 8
    for ip, _ in cfg.intercepts:
        assert ip.startswith("198.18.")
    assert all(t.target_ip >> 17 == ip_from_str("198.18.0.0") >> 17 for t in cfg.session.transfers)
    assert all(ip >> 16 == ip_from_str("198.19.0.0") >> 16 for ip in cfg.session.client_pool)


def test_intercept_toml_is_the_traditional_mode():
    opts = icli.parse_args(["--config", str(CONFIG_DIR / "intercept.toml")])
    assert opts.mode == "nfqueue"


def _example_lines() -> list[str]:
    return (CONFIG_DIR / "example.toml").read_text(encoding="utf-8").splitlines()


KEY_LINE = re.compile(r"^(# )?([a-z_]+) = (.+)$")


def _example_keys() -> dict[str, dict[str, tuple[bool, Any]]]:
    """{table: {key: (commented, value)}} of example.toml, commented-out keys included."""
    out: dict[str, dict[str, tuple[bool, Any]]] = {}
    table = ""
    for line in _example_lines():
        if line.startswith("["):
            table = line.strip("[]")
            out[table] = {}
            continue
        m = KEY_LINE.match(line)
        if m and table:
            value = tomllib.loads(f"v = {m.group(3)}")["v"]
            out[table][m.group(2)] = (bool(m.group(1)), value)
    return out


def test_example_documents_every_key_with_a_comment():
    keys = _example_keys()
    for table in PROGRAMS:
        assert set(keys[table]) == schema_keys(table), table
    lines = _example_lines()
    for i, line in enumerate(lines):
        m = KEY_LINE.match(line)
        if m and m.group(2) in schema_keys("tcpcopy") | schema_keys("intercept"):
            above = lines[i - 1]
            assert above.startswith("# ") and not KEY_LINE.match(above), line
            assert len(above) > 12, line


NFQUEUE_KEYS = {"pass", "queue_maxlen", "queue_num", "install_rule"}


def _resource(table: str, key: str, value: Any, tmp_path: Path) -> tuple[Any, dict]:
    """A commented key's value made loadable here (a file or a device that exists) and the
    other keys it needs."""
    base: dict[str, Any] = {}
    if key == "secret_file":
        secret = tmp_path / "secret"
        secret.write_bytes(SECRET + b"\n")
        secret.chmod(0o600)
        value = str(secret)
    elif key in ("interface", "output_interface"):
        value = "lo"
    elif key == "pcap":
        value = [str(ONLINE_HTTP_PCAP)]
    if table == "tcpcopy":
        base = {"transfer": "80-198.18.0.20:8080", "intercepts": "198.18.0.30"}
    elif key not in NFQUEUE_KEYS | {"filter"}:
        base = {"filter": "tcp and src port 8080"}  # the pcap mode needs one
    return value, base


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


@pytest.mark.parametrize("table", list(PROGRAMS))
def test_every_example_key_loads_alone(table: str, tmp_path: Path):
    """Each key of example.toml, the commented ones too, on its own: its documented value."""
    for key, (_commented, value) in _example_keys()[table].items():
        value, base = _resource(table, key, value, tmp_path)
        if table == "tcpcopy" and key in ("transfer", "intercepts"):
            base = {k: v for k, v in base.items() if k != key}
        values = {**base, key: value}
        conf = tmp_path / f"{table}-{key}.toml"
        conf.write_text(
            f"[{table}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())
        )
        check_values(table, load(table, conf), values)


def test_cli_overrides_the_file(tmp_path: Path):
    conf = tmp_path / "c.toml"
    conf.write_text(
        '[tcpcopy]\ntransfer = "80-198.18.0.20:8080"\nintercepts = "198.18.0.30"\n'
        "workers = 3\nno_wait = true\n"
    )
    cfg = cli.parse_config(["--config", str(conf), "--workers", "5"])
    assert cfg.workers == 5 and cfg.session.wait_response is False
    assert cli.parse_config(["--config", str(conf)]).workers == 3
    conf.write_text('[intercept]\nfilter = "tcp"\nport = 4000\n')
    assert icli.parse_args(["--config", str(conf), "-p", "4001"]).port == 4001
    assert icli.parse_args(["--config", str(conf)]).port == 4000


# --- errors: one line, file:line or the key, exit status 2 ---------------------------------


def _good_tcpcopy(tmp_path: Path) -> list[str]:
    return [
        "[tcpcopy]",
        'transfer = "80-198.18.0.20:8080"',
        'intercepts = ["198.18.0.30"]',
        "workers = 2",
        f'log = "{tmp_path / "tcpcopy.log"}"',
        'log_format = "json"',
    ]


def _good_intercept(tmp_path: Path) -> list[str]:
    return [
        "[intercept]",
        'filter = "tcp and src port 8080"',
        f'log = "{tmp_path / "intercept.log"}"',
        "port = 36524",
    ]


def _one_line_exit_2(proc: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in proc.stderr
    return lines[0]


BAD = {
    # what is wrong: (replace line 3 (workers / port) with, the words the error must have)
    "key": ("foo = 1", ["unknown key 'foo' in [{table}]"]),
    "type": ('{key} = "eight"', ["key '{key}'", "eight"]),
    "value": ("{key} = 0", ["key '{key}'"]),
}


@pytest.mark.parametrize("what", list(BAD))
@pytest.mark.parametrize("table", list(PROGRAMS))
def test_bad_file_entry_is_one_line_with_file_and_line(table: str, what: str, tmp_path: Path):
    good = _good_tcpcopy(tmp_path) if table == "tcpcopy" else _good_intercept(tmp_path)
    prog, key = ("tcpcopy-mp", "workers") if table == "tcpcopy" else ("intercept-mp", "port")
    conf = tmp_path / "x.toml"
    conf.write_text("\n".join(good) + "\n")
    # The good file validates (so the bad one fails at validation, before any socket).
    load(table, conf)
    line, words = BAD[what]
    bad = list(good)
    bad[3] = line.format(key=key)
    conf.write_text("\n".join(bad) + "\n")
    needles = [w.format(table=table, key=key) for w in words]
    message = _one_line_exit_2(run(prog, "--config", str(conf)), prog, f"{conf}:4: ", *needles)
    assert not (tmp_path / f"{table}.log").exists(), message


@pytest.mark.parametrize("prog", ["tcpcopy-mp", "intercept-mp"])
def test_toml_syntax_error_keeps_tomllib_position(prog: str, tmp_path: Path):
    conf = tmp_path / "broken.toml"
    conf.write_text("[tcpcopy]\nworkers = = 2\n")
    message = _one_line_exit_2(run(prog, "--config", str(conf)), prog, str(conf))
    assert "line 2" in message


def test_value_error_of_a_bad_file_names_the_key_and_flag(tmp_path: Path):
    conf = tmp_path / "x.toml"
    conf.write_text('transfer = "80-198.18.0.20:8080"\n\nintercepts = "198.18.0.30:99999"\n')
    with pytest.raises(cli.ConfigError) as err:
        cli.parse_config(["--config", str(conf)])
    assert str(err.value).startswith(f"{conf}:3: key 'intercepts' (-s): ")


# --- every flag of spec §4.1 / §4.2 is accepted ---------------------------------------------

GOOD_RUN = ["-x", "80-198.18.2.3:8080", "-s", "198.18.2.4"]

# spec §4.1 table: flag, a valid value (None = no value), what the config then holds.
TCPCOPY_FLAGS: list[tuple[str, str | None, Callable[[ReplayConfig], bool]]] = [
    ("-x", "81-198.18.2.3:8081", lambda c: c.session.transfers[0].target_port == 8081),
    ("-c", "198.19.1.x", lambda c: len(c.session.client_pool) == 254),
    ("-H", "198.18.0.9", lambda c: c.localhost_ip == ip_from_str("198.18.0.9")),
    ("-s", "198.18.2.5:36530", lambda c: c.intercepts == (("198.18.2.5", 36530),)),
    ("-p", "36600", lambda c: c.intercepts == (("198.18.2.4", 36600),)),
    ("-C", "4", lambda c: c.connections == 4),
    ("-n", "3", lambda c: c.session.replicas == 3),
    ("-f", "2", lambda c: c.session.port_shift == 2),
    ("-r", "50", lambda c: c.session.sample_percent == 50),
    ("-g", None, lambda c: c.gradual),
    ("-W", None, lambda c: not c.session.wait_response),
    ("-O", None, lambda c: not c.session.fake_handshake),
    ("-L", None, lambda c: c.lonely),
    ("-M", "1400", lambda c: c.session.mtu == 1400),
    ("-D", "1300", lambda c: c.session.mss == 1300),
    ("-R", "20", lambda c: c.session.rtt_initial_s == 0.02),
    ("-U", "2", lambda c: c.pool_size_kb == 2),
    ("-m", "512", lambda c: c.memory_limit_mb == 512),
    ("-t", "60", lambda c: c.session.session_timeout_s == 60.0),
    ("-k", "90", lambda c: c.session.keepalive_timeout_s == 90.0),
    ("-l", "{tmp}/t.log", lambda c: c.log_path.endswith("/t.log")),
    ("-P", "{tmp}/t.pid", lambda c: c.pid_file.endswith("/t.pid")),
    ("-d", None, lambda c: c.daemon),
    ("-i", "lo", lambda c: c.interfaces == ("lo",) and c.capture == "packet"),
    ("-i", str(ONLINE_HTTP_PCAP), lambda c: c.capture == "offline"),
    ("-F", "tcp dst port 80", lambda c: c.capture_filter == "tcp dst port 80"),
    ("-B", "16", lambda c: c.capture_buffer_bytes == 16 << 20),
    ("-S", "1500", lambda c: c.snaplen == 1500),
    ("-o", "lo", lambda c: c.output_interface == "lo"),
    ("-a", "2", lambda c: c.accelerate == 2.0),
    ("-I", "100", lambda c: c.idle_threshold_s == 0.1),
    ("-T", "3", lambda c: c.replays == 3),
]


def test_tcpcopy_flag_table_is_the_spec_list():
    listed = {f for f, _, _ in TCPCOPY_FLAGS} | {"-h", "-v"}
    spec = {"-x", "-c", "-H", "-s", "-p", "-C", "-n", "-f", "-r", "-g", "-W", "-O", "-L", "-M",
            "-D", "-R", "-U", "-m", "-t", "-k", "-l", "-P", "-d", "-h", "-v", "-i", "-F", "-B",
            "-S", "-o", "-a", "-I", "-T"}  # fmt: skip
    assert listed == spec


@pytest.mark.parametrize(
    ("flag", "value", "holds"), TCPCOPY_FLAGS, ids=[f"{f} {v}"[:20] for f, v, _ in TCPCOPY_FLAGS]
)
def test_every_tcpcopy_flag_is_accepted(flag, value, holds, tmp_path: Path):
    argv = list(GOOD_RUN)
    if flag in ("-x", "-s"):
        argv.remove(argv[argv.index(flag) + 1])
        argv.remove(flag)
    argv.append(flag)
    if value is not None:
        argv.append(value.format(tmp=tmp_path))
    assert holds(cli.parse_config(argv)), argv


# spec §4.2 table: flag, a valid value, the other flags it needs, what the options hold.
INTERCEPT_FLAGS: list[tuple[str, str | None, list[str], Callable[[Any], bool]]] = [
    ("-i", "lo", ["-F", "tcp"], lambda o: o.devices == ("lo",)),
    ("-F", "tcp and src port 8080", [], lambda o: o.filter_expr == "tcp and src port 8080"),
    ("-x", "198.18.0.40", [], lambda o: o.mode == "nfqueue" and len(o.pass_ips) == 1),
    ("-q", "2048", [], lambda o: o.mode == "nfqueue" and o.queue_maxlen == 2048),
    ("-n", "8", ["-F", "tcp"], lambda o: o.combine == 8),
    ("-p", "36600", ["-F", "tcp"], lambda o: o.port == 36600),
    ("-b", "198.18.0.2", ["-F", "tcp"], lambda o: o.bind == "198.18.0.2"),
    ("-s", "1024", ["-F", "tcp"], lambda o: o.delay_table_size == 1024),
    ("-D", "198.18.0.50-198.18.0.51", ["-F", "tcp"], lambda o: o.docker_map is not None),
    ("-c", None, ["-F", "tcp"], lambda o: o.protect),
    ("-l", "{tmp}/i.log", ["-F", "tcp"], lambda o: o.log_path.endswith("/i.log")),
    ("-P", "{tmp}/i.pid", ["-F", "tcp"], lambda o: o.pid_file.endswith("/i.pid")),
    ("-d", None, ["-F", "tcp"], lambda o: o.daemon),
]


def test_intercept_flag_table_is_the_spec_list():
    listed = {f for f, _, _, _ in INTERCEPT_FLAGS} | {"-h", "-v"}
    assert listed == set(
        ["-i", "-F", "-x", "-q", "-n", "-p", "-b", "-s", "-D", "-c", "-l", "-P", "-d", "-h", "-v"]
    )


@pytest.mark.parametrize(
    ("flag", "value", "needs", "holds"), INTERCEPT_FLAGS, ids=[f for f, *_ in INTERCEPT_FLAGS]
)
def test_every_intercept_flag_is_accepted(flag, value, needs, holds, tmp_path: Path):
    argv = [*needs, flag] + ([] if value is None else [value.format(tmp=tmp_path)])
    assert holds(icli.parse_args(argv)), argv


@pytest.mark.parametrize("prog", ["tcpcopy-mp", "intercept-mp"])
@pytest.mark.parametrize("flag", ["-h", "-v"])
def test_help_and_version_print_and_exit_0(prog: str, flag: str):
    proc = run(prog, flag)
    assert proc.returncode == 0 and proc.stderr == ""
    assert ("usage:" in proc.stdout) if flag == "-h" else (f"{prog} version:" in proc.stdout)
