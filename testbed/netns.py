"""The network-namespace testbed (design §9): machinery shared by tests/netns and bench/demo.py.

Theory of operation
-------------------
One ``Testbed`` builds five network namespaces named ``tc<pid>-<seq>-<role>``::

    client 198.18.1.10 ── 198.18.1.2 online 198.18.2.2 ──┐
                                                          sw (bridge br0)
                             target 198.18.2.3 ──────────┤
                          assistant 198.18.2.4 ──────────┘

Every veth is created directly inside its namespaces (``ip -n NS link add ... netns PEER``), so
nothing, not even a transient interface name, appears in the root namespace, and two test
sessions never collide.  No namespace has a default route; the target has one extra route for
the fake clients (198.19.0.0/16): via the online host in traditional mode (intercept-mp queues
and drops the responses there via NFQUEUE) or via the assistant in advanced mode (ip_forward=0
there black-holes them after intercept-mp's pcap has seen them).

Servers: a real nginx in online (:80) and target (:8080), each with its own prefix dir and an
access log whose fields (``ACCESS_LOG_FIELDS``) are what the acceptance tests compare; a real
redis-server in online and target (:6379, plus a unix socket so the tests can read INFO without
generating TCP traffic that tcpcopy-mp would replicate).

Safety nets: the client namespace counts (raw PREROUTING) every packet from the server subnet
or addressed to a fake client; that counter must stay 0.  Teardown kills every process still in
our namespaces (by pid, from ``ip netns pids``) and deletes the namespaces, tolerating "already
gone"; ``Testbed.start`` first removes leftovers of crashed earlier runs (namespaces of this
pattern whose creating pid is dead).

Synchronisation is always polling a condition with a deadline (``wait_until``), never a sleep.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = REPO_ROOT / ".venv" / "bin"
PYTHON = VENV_BIN / "python"
TCPCOPY_BIN = VENV_BIN / "tcpcopy-mp"
INTERCEPT_BIN = VENV_BIN / "intercept-mp"
NGINX_BIN = Path("/usr/sbin/nginx")
NGINX_ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
REDIS_SERVER_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_BENCHMARK_BIN = shutil.which("redis-benchmark") or "/usr/bin/redis-benchmark"
TCPDUMP_BIN = shutil.which("tcpdump") or "/usr/bin/tcpdump"
PGBENCH_BIN = shutil.which("pgbench") or "/usr/bin/pgbench"
PSQL_BIN = shutil.which("psql") or "/usr/bin/psql"


def postgres_bin_dir() -> Path | None:
    """Debian's server binaries (postgresql-NN: initdb, postgres), the newest version."""
    dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: p.parts[-3])
    return dirs[-1].parent if dirs else None


ROLES = ("client", "online", "target", "assistant", "sw")
NS_NAME_RE = re.compile(r"^tc(\d+)-(\d+)-(client|online|target|assistant|sw)$")

# Addresses (design §9; everything stays in 198.18.0.0/15).
CLIENT_IP = "198.18.1.10"
ONLINE_CLIENT_SIDE_IP = "198.18.1.2"
ONLINE_SERVER_SIDE_IP = "198.18.2.2"
TARGET_IP = "198.18.2.3"
ASSISTANT_IP = "198.18.2.4"
CLIENT_NET = "198.18.1.0/24"
SERVER_NET = "198.18.2.0/24"
FAKE_CLIENT_NET = "198.19.0.0/16"

# Interface names inside the namespaces.
CLIENT_IFACE = "eth0"  # in client
ONLINE_CLIENT_IFACE = "cli0"  # in online, towards the client
ONLINE_SERVER_IFACE = "srv0"  # in online, towards the bridge
TARGET_IFACE = "eth0"  # in target
ASSISTANT_IFACE = "eth0"  # in assistant
BRIDGE = "br0"  # in sw

ONLINE_HTTP_PORT = 80
TARGET_HTTP_PORT = 8080
REDIS_PORT = 6379
POSTGRES_PORT = 5432
POSTGRES_USER = "postgres"
"""The Debian package's system user: the server refuses to run as root."""

DIFFER_PREFIX = "/differ/"
DIFFER_BODY_BYTES = {
    # The last digit of the URI (and that digit + 5) picks the body.  The target's is much
    # shorter, shorter over several segments, equal, much longer, one byte shorter than the
    # online server's: in all a deficit, which a running byte count never makes up.
    "online": {"0": 300, "1": 3000, "2": 40, "3": 40, "4": 41},
    "target": {"0": 30, "1": 2000, "2": 40, "3": 400, "4": 40},
}
"""/differ/... on the two nginx: the same URLs, bodies of other lengths (a migrated server)."""
INTERCEPT_PORT = 36524

# tcpcopy-mp's -x specs of the tests: online port -> the target's address and port.
TRANSFER_HTTP = f"{ONLINE_HTTP_PORT}-{TARGET_IP}:{TARGET_HTTP_PORT}"
TRANSFER_REDIS = f"{REDIS_PORT}-{TARGET_IP}:{REDIS_PORT}"
TRANSFER_PG = f"{POSTGRES_PORT}-{TARGET_IP}:{POSTGRES_PORT}"

BIG_FILE_PATH = "/big.bin"
BIG_FILE_BYTES = 10 * 1024 * 1024
BIG_FILE_SEED = 20240601

TRADITIONAL = "traditional"
ADVANCED = "advanced"

READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0

ACCESS_LOG_FIELDS = (
    "remote_addr",
    "remote_port",
    "connection",
    "connection_requests",
    "request_method",
    "uri",
    "request_length",
    "status",
    "body_bytes_sent",
    "msec",
    "request_body_file",
)
# nginx log_format line; $request_body_file is quoted so an absent file ("-") stays one field.
_LOG_FORMAT = " ".join(
    f'"${name}"' if name == "request_body_file" else f"${name}" for name in ACCESS_LOG_FIELDS
)

_seq = itertools.count(1)


class TestbedError(RuntimeError):
    """The testbed could not be built or a step in it failed (message says which)."""


# ---------------------------------------------------------------------------------------------
# small helpers


def poll(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Call ``predicate`` every ``interval`` s until it returns a truthy value or ``timeout``
    passed; returns its last value (the one wait helper of the netns tier: the callers assert
    or raise on what it returns)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; return it, or raise TimeoutError."""
    value = poll(predicate, timeout, interval)
    if not value:
        raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
    return value


def preflight_problems() -> list[str]:
    """What is missing to run the netns tier here (empty list = ready)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root")
    for tool in ("ip", "iptables", "iptables-save", "ss", "sysctl"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found")
    if not NGINX_BIN.exists():
        problems.append(f"{NGINX_BIN} not found (apt install nginx-light)")
    if not Path(REDIS_SERVER_BIN).exists():
        problems.append("redis-server not found")
    return problems


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sh(
    argv: Sequence[str], check: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise TestbedError(
            f"command failed ({proc.returncode}): {' '.join(argv)}: {proc.stderr.strip()}"
        )
    return proc


def list_netns() -> list[str]:
    out = _sh(["ip", "netns", "list"], check=False).stdout
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_netns_processes(ns: str) -> None:
    """Terminate (then kill) every process left inside namespace ``ns``, by pid."""
    pids_out = _sh(["ip", "netns", "pids", ns], check=False).stdout
    pids = [int(p) for p in pids_out.split() if p.isdigit() and int(p) != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def all_gone() -> bool:
        nonlocal pids
        pids = [p for p in pids if _pid_alive(p) and not _is_zombie(p)]
        return not pids

    poll(all_gone, 5.0)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def delete_netns(ns: str) -> None:
    """Kill what runs in ``ns`` and delete it; "already gone" is fine."""
    if ns not in list_netns():
        return
    _kill_netns_processes(ns)
    proc = _sh(["ip", "netns", "del", ns], check=False)
    if proc.returncode != 0 and "No such file" not in proc.stderr:
        raise TestbedError(f"ip netns del {ns}: {proc.stderr.strip()}")


def cleanup_stale_namespaces() -> list[str]:
    """Delete namespaces of our pattern whose creating process is dead (crashed earlier runs)."""
    removed = []
    for ns in list_netns():
        m = NS_NAME_RE.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            delete_netns(ns)
            removed.append(ns)
    return removed


_scratch_seq = itertools.count(900)


@contextmanager
def scratch_netns(*commands: Sequence[str]) -> Iterator[str]:
    """A network namespace of its own for one test (named like the testbed's, so a crashed
    run's is found by cleanup_stale_namespaces): made, set up by running each of ``commands``
    inside it, and deleted on the way out, also when the set-up fails.  Yields its name."""
    name = f"tc{os.getpid()}-{next(_scratch_seq)}-sw"
    _sh(["ip", "netns", "add", name])
    try:
        for cmd in commands:
            _sh(["ip", "netns", "exec", name, *cmd])
        yield name
    finally:
        delete_netns(name)


def raw_tcp_receiver(ns: str, timeout: float = 2.0) -> socket.socket:
    """A raw IPPROTO_TCP socket in ``ns`` that sees every TCP packet arriving there, with a
    16 MiB receive buffer (forced: a burst of sends must not overflow it) and ``timeout``."""

    def make() -> socket.socket:
        rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
        rx.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 16 * 1024 * 1024)
        rx.settimeout(timeout)
        return rx

    result: socket.socket = in_netns(ns, make)
    return result


# ---------------------------------------------------------------------------------------------
# doing things inside a namespace from this process (a thread that setns()es, then exits)

_CLONE_NEWNET = 0x40000000
_SO_RCVBUFFORCE = 33  # asm-generic/socket.h
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(ns: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a fresh thread that has joined network namespace ``ns``; return its result.

    Sockets created inside ``fn`` stay in ``ns`` for their whole life, whichever thread uses
    them later.  setns(CLONE_NEWNET) only affects the calling thread, and the thread exits.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def netns_socket(
    ns: str, family: int = socket.AF_INET, type_: int = socket.SOCK_STREAM
) -> socket.socket:
    return in_netns(ns, lambda: socket.socket(family, type_))


def can_connect(ns: str, ip: str, port: int, timeout: float = 1.0) -> bool:
    """One TCP connect from inside ``ns`` (closed at once); True if it was accepted."""
    sock = netns_socket(ns)
    try:
        sock.settimeout(timeout)
        sock.connect((ip, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def http_get(ns: str, ip: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One ``Connection: close`` GET from inside ``ns``; returns (status, body)."""
    sock = netns_socket(ns)
    try:
        sock.settimeout(timeout)
        sock.connect((ip, port))
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: testbed\r\nConnection: close\r\n\r\n".encode("ascii")
        )
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    finally:
        sock.close()
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


def send_udp(ns: str, src_ip: str | None, dst_ip: str, dst_port: int, payload: bytes) -> None:
    """Send one UDP datagram from inside ``ns`` (a testbed probe; dst must be a testbed address)."""

    def send() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if src_ip:
                sock.bind((src_ip, 0))
            sock.sendto(payload, (dst_ip, dst_port))
        finally:
            sock.close()

    in_netns(ns, send)


# ---------------------------------------------------------------------------------------------
# access logs


@dataclasses.dataclass(frozen=True, slots=True)
class AccessRecord:
    """One nginx access-log line (fields in ACCESS_LOG_FIELDS order)."""

    remote_addr: str
    remote_port: int
    connection: int
    connection_requests: int
    request_method: str
    uri: str
    request_length: int
    status: int
    body_bytes_sent: int
    msec: float
    request_body_file: str


def parse_access_line(line: str) -> AccessRecord | None:
    parts = line.split()
    if len(parts) != len(ACCESS_LOG_FIELDS):
        return None
    try:
        return AccessRecord(
            remote_addr=parts[0],
            remote_port=int(parts[1]),
            connection=int(parts[2]),
            connection_requests=int(parts[3]),
            request_method=parts[4],
            uri=parts[5],
            request_length=int(parts[6]),
            status=int(parts[7]),
            body_bytes_sent=int(parts[8]),
            msec=float(parts[9]),
            request_body_file=parts[10].strip('"'),
        )
    except ValueError:
        return None


def read_access_log(path: Path) -> list[AccessRecord]:
    """Every complete line of an access log (a half-written last line is ignored)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    records = []
    for line in text.splitlines():
        rec = parse_access_line(line)
        if rec is not None:
            records.append(rec)
    return records


def with_prefix(records: Iterable[AccessRecord], prefix: str) -> list[AccessRecord]:
    return [r for r in records if r.uri.startswith(prefix)]


def group_by_connection(records: Iterable[AccessRecord]) -> dict[tuple[str, int, int], list[str]]:
    """Paths per TCP connection, in request order.

    The key is (remote_addr, remote_port, $connection): $connection is nginx's own serial
    number (unique per nginx instance), so a client port reused later still gives a new key.
    """
    groups: dict[tuple[str, int, int], list[tuple[int, str]]] = {}
    for r in records:
        groups.setdefault((r.remote_addr, r.remote_port, r.connection), []).append(
            (r.connection_requests, r.uri)
        )
    return {k: [uri for _, uri in sorted(v)] for k, v in groups.items()}


@dataclasses.dataclass
class ReplicationReport:
    """How the target's requests compare with the online server's (same path prefix)."""

    online_requests: int
    target_requests: int
    missing: list[str]
    extra: list[str]
    order_mismatches: list[tuple[list[str], list[str]]]
    unmapped_target_connections: int

    @property
    def ratio(self) -> float:
        return self.target_requests / self.online_requests if self.online_requests else 0.0

    @property
    def exact(self) -> bool:
        return (
            self.online_requests == self.target_requests
            and not self.missing
            and not self.extra
            and not self.order_mismatches
            and not self.unmapped_target_connections
        )

    def summary(self) -> str:
        return (
            f"online={self.online_requests} target={self.target_requests} "
            f"missing={len(self.missing)} {self.missing[:5]} extra={len(self.extra)} "
            f"{self.extra[:5]} order_mismatches={len(self.order_mismatches)} "
            f"{self.order_mismatches[:2]} unmapped_target_conns={self.unmapped_target_connections}"
        )


def compare_replication(
    online: Sequence[AccessRecord], target: Sequence[AccessRecord], prefix: str
) -> ReplicationReport:
    """Compare requests whose path starts with ``prefix``: counts, paths and per-connection order.

    Connections are matched by their first path (every load-generator path is unique).
    """
    online = with_prefix(online, prefix)
    target = with_prefix(target, prefix)
    online_paths = [r.uri for r in online]
    target_paths = [r.uri for r in target]
    online_set, target_set = set(online_paths), set(target_paths)
    missing = sorted(online_set - target_set)
    extra = sorted(target_set - online_set)
    # Duplicates on the target are "extra" too.
    seen: set[str] = set()
    for p in target_paths:
        if p in seen:
            extra.append(p)
        seen.add(p)

    by_first = {paths[0]: paths for paths in group_by_connection(online).values()}
    mismatches = []
    unmapped = 0
    for paths in group_by_connection(target).values():
        original = by_first.get(paths[0])
        if original is None:
            unmapped += 1
        elif original != paths:
            mismatches.append((original, paths))
    return ReplicationReport(
        online_requests=len(online),
        target_requests=len(target),
        missing=missing,
        extra=extra,
        order_mismatches=mismatches,
        unmapped_target_connections=unmapped,
    )


# ---------------------------------------------------------------------------------------------
# processes


class Proc:
    """A long-running process inside a namespace; output goes to ``log_path``."""

    def __init__(self, name: str, ns: str, argv: Sequence[str], log_path: Path, **popen_kw: Any):
        self.name = name
        self.ns = ns
        self.argv = list(argv)
        self.log_path = log_path
        self.summary_path: Path | None = None
        """Where the program writes its --summary-json (if it was given one)."""
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.update(popen_kw.pop("env", {}) or {})
        popen_kw.setdefault("stdout", self._log)
        popen_kw.setdefault("stderr", subprocess.STDOUT)
        popen_kw.setdefault("stdin", subprocess.DEVNULL)
        # ip netns exec execs the program, so this pid is the program's own.
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", ns, *self.argv],
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,
            **popen_kw,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, sig: int) -> None:
        if self.alive():
            try:
                self.popen.send_signal(sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Signal, wait up to ``timeout``, then SIGKILL; close the log and the pipes the
        caller asked for (``stdin``/``stdout=PIPE``).  Returns the exit code of the first stop
        (None if it had to be killed)."""
        rc: int | None
        if self.alive():
            self.send_signal(sig)
            rc = self.wait(timeout)
            if rc is None:
                self.popen.kill()
                self.popen.wait(timeout=10)
        else:
            rc = self.popen.returncode
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr, self._log):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except OSError:
                    pass  # stdin's unread buffer: the process is gone (BrokenPipeError)
        return rc

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# redis (RESP over the server's unix socket: no TCP, so nothing for tcpcopy-mp to replicate)


def redis_command(unix_path: Path, *args: str, timeout: float = 5.0) -> bytes:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(unix_path))
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        sock.sendall(payload.encode())
        buf = b""
        while b"\r\n" not in buf:
            data = sock.recv(65536)
            if not data:
                raise TestbedError("redis closed the connection")
            buf += data
        first, _, rest = buf.partition(b"\r\n")
        if first.startswith(b"$"):
            length = int(first[1:])
            if length < 0:
                return b""
            while len(rest) < length + 2:
                data = sock.recv(65536)
                if not data:
                    raise TestbedError("redis closed the connection mid-reply")
                rest += data
            return rest[:length]
        if first.startswith(b"-"):
            raise TestbedError(f"redis error: {first[1:].decode(errors='replace')}")
        return first[1:]
    finally:
        sock.close()


def parse_commandstats(info: bytes) -> dict[str, int]:
    """INFO commandstats → {command: calls}."""
    stats = {}
    for line in info.decode(errors="replace").splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line[len("cmdstat_") :].partition(":")
            for field in fields.split(","):
                key, _, value = field.partition("=")
                if key == "calls":
                    stats[name] = int(value)
    return stats


# ---------------------------------------------------------------------------------------------
# pcap files (tcpdump output; just enough to count packets and read timestamps)


@dataclasses.dataclass
class PcapSummary:
    packets: int
    first_ts: float
    last_ts: float
    syns_to_port: int
    """Client SYNs (SYN without ACK) to the port: one per connection."""
    fins_to_port: int
    """Client FINs to the port: the connection's last client packet but its final ACK."""

    @property
    def duration_s(self) -> float:
        return self.last_ts - self.first_ts if self.packets else 0.0


def summarize_pcap(path: Path, port: int) -> PcapSummary:
    """Count packets and client SYNs to ``port`` in an Ethernet/SLL pcap; tolerates a torn tail."""
    import struct

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return PcapSummary(0, 0.0, 0.0, 0, 0)
    if len(data) < 24:
        return PcapSummary(0, 0.0, 0.0, 0, 0)
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise TestbedError(f"{path}: not a pcap file")
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    l2 = {1: 14, 113: 16, 101: 0, 12: 0}.get(linktype)
    if l2 is None:
        raise TestbedError(f"{path}: unsupported link type {linktype}")
    rec = struct.Struct(endian + "IIII")
    off, packets, syns, fins = 24, 0, 0, 0
    first = last = 0.0
    while off + rec.size <= len(data):
        sec, frac, caplen, _wirelen = rec.unpack_from(data, off)
        body_off = off + rec.size
        if body_off + caplen > len(data):
            break
        ts = sec + frac / (1e9 if nano else 1e6)
        if packets == 0:
            first = ts
        last = ts
        packets += 1
        ip = data[body_off + l2 : body_off + caplen]
        if len(ip) >= 20 and ip[0] >> 4 == 4 and ip[9] == 6:
            ihl = (ip[0] & 0x0F) * 4
            if len(ip) >= ihl + 14:
                dport = int.from_bytes(ip[ihl + 2 : ihl + 4], "big")
                flags = ip[ihl + 13]
                if dport == port and flags & 0x02 and not flags & 0x10:
                    syns += 1
                if dport == port and flags & 0x01:
                    fins += 1
        off = body_off + caplen
    return PcapSummary(packets, first, last, syns, fins)


# ---------------------------------------------------------------------------------------------
# the testbed


def _differ_map(role: str) -> str:
    sizes = DIFFER_BODY_BYTES[role]
    lines = [f'~{d}$ "{"d" * (sizes[d] - 1)}\\n";' for d in sorted(sizes)]
    lines += [f'~{int(d) + 5}$ "{"d" * (sizes[d] - 1)}\\n";' for d in sorted(sizes)]
    return "map $uri $differ_body {\n        " + "\n        ".join(lines) + "\n    }"


def _nginx_conf(prefix: Path, listen_port: int, role: str = "online") -> str:
    load = f"load_module {NGINX_ECHO_MODULE};\n" if NGINX_ECHO_MODULE.exists() else ""
    # /upload/ reads the whole body (echo_read_request_body) into a kept file so the tests can
    # hash what each server received; without the echo module it falls back to discarding it
    # (then only $request_length can be compared).
    upload = "echo_read_request_body; echo ok;" if load else 'return 200 "ok\\n";'
    return f"""{load}user root root;
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    log_format tc '{_LOG_FORMAT}';
    access_log {prefix}/access.log tc;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/tmp_proxy;
    fastcgi_temp_path {prefix}/tmp_fastcgi;
    uwsgi_temp_path {prefix}/tmp_uwsgi;
    scgi_temp_path {prefix}/tmp_scgi;
    keepalive_requests 100000;
    keepalive_timeout 900s;
    default_type application/octet-stream;
    {_differ_map(role)}
    server {{
        listen {listen_port} backlog=4096;
        location / {{ return 200 "ok\\n"; }}
        location {DIFFER_PREFIX} {{ return 200 $differ_body; }}
        location /upload/ {{
            client_max_body_size 32m;
            client_body_buffer_size 64k;
            client_body_in_file_only on;
            {upload}
        }}
        location = {BIG_FILE_PATH} {{ root {prefix}/html; }}
    }}
}}
"""


class Server:
    """A server process (nginx or redis) in one namespace with its own directory."""

    def __init__(self, proc: Proc, directory: Path):
        self.proc = proc
        self.dir = directory


class Testbed:
    """Build with ``start()``, tear down with ``close()`` (or use as a context manager)."""

    def __init__(self, workdir: Path, with_redis: bool = True, with_assistant: bool = True):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        self.with_redis = with_redis
        self.with_assistant = with_assistant
        self.tag = f"tc{os.getpid()}-{next(_seq)}"
        self.namespaces: dict[str, str] = {role: f"{self.tag}-{role}" for role in ROLES}
        self.procs: list[Proc] = []
        self.tcpcopy_workers: int | None = None
        """--workers given to every tcpcopy-mp this testbed starts (None: the default)."""
        self.nginx: dict[str, Server] = {}
        self.redis: dict[str, Server] = {}
        self.postgres: dict[str, Server] = {}
        self.mode: str | None = None
        self._created: list[str] = []
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ns(self, role: str) -> str:
        return self.namespaces[role]

    def start(self, mode: str = TRADITIONAL) -> Testbed:
        problems = preflight_problems()
        if problems:
            raise TestbedError("; ".join(problems))
        cleanup_stale_namespaces()
        try:
            self._build_network()
            self.set_mode(mode)
            self._install_leak_counters()
            self.nginx["online"] = self._start_nginx("online", ONLINE_HTTP_PORT)
            self.nginx["target"] = self._start_nginx("target", TARGET_HTTP_PORT)
            if self.with_redis:
                self.redis["online"] = self._start_redis("online")
                self.redis["target"] = self._start_redis("target")
            self._wait_servers_ready()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every process and delete every namespace; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for proc in reversed(self.procs):
            try:
                proc.stop(timeout=5.0)
            except Exception:
                pass
        for role in ROLES:
            try:
                delete_netns(self.ns(role))
            except Exception:
                pass
        for server in self.postgres.values():
            shutil.rmtree(server.dir, ignore_errors=True)

    # -- network --------------------------------------------------------------------------------

    def ip(self, role: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _sh(["ip", "-n", self.ns(role), *args], check=check)

    def run(
        self, role: str, *argv: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess:
        """Run a command to completion inside the namespace of ``role``."""
        return _sh(["ip", "netns", "exec", self.ns(role), *argv], check=check, timeout=timeout)

    def _veth(self, role_a: str, if_a: str, role_b: str, if_b: str) -> None:
        self.ip(
            role_a,
            "link",
            "add",
            if_a,
            "type",
            "veth",
            "peer",
            "name",
            if_b,
            "netns",
            self.ns(role_b),
        )

    def _build_network(self) -> None:
        roles = [r for r in ROLES if self.with_assistant or r != "assistant"]
        for role in roles:
            _sh(["ip", "netns", "add", self.ns(role)])
            self._created.append(role)
            self.ip(role, "link", "set", "lo", "up")
        self._veth("client", CLIENT_IFACE, "online", ONLINE_CLIENT_IFACE)
        self.ip("sw", "link", "add", BRIDGE, "type", "bridge", "stp_state", "0")
        self.ip("sw", "link", "set", BRIDGE, "up")
        ports = [("online", ONLINE_SERVER_IFACE, "p-online"), ("target", TARGET_IFACE, "p-target")]
        if self.with_assistant:
            ports.append(("assistant", ASSISTANT_IFACE, "p-assistant"))
        for role, iface, port in ports:
            self._veth("sw", port, role, iface)
            self.ip("sw", "link", "set", port, "master", BRIDGE)
            self.ip("sw", "link", "set", port, "up")
        addrs = [
            ("client", CLIENT_IFACE, CLIENT_IP),
            ("online", ONLINE_CLIENT_IFACE, ONLINE_CLIENT_SIDE_IP),
            ("online", ONLINE_SERVER_IFACE, ONLINE_SERVER_SIDE_IP),
            ("target", TARGET_IFACE, TARGET_IP),
        ]
        if self.with_assistant:
            addrs.append(("assistant", ASSISTANT_IFACE, ASSISTANT_IP))
        for role, iface, addr in addrs:
            self.ip(role, "addr", "add", f"{addr}/24", "dev", iface)
            self.ip(role, "link", "set", iface, "up")
        # Sysctls: rp_filter=0 everywhere (spoofed 198.19.x sources arrive at the target), no
        # forwarding anywhere (online and assistant must never route a target's packet on),
        # no IPv6 chatter in captures.
        ifaces = {
            "client": [CLIENT_IFACE],
            "online": [ONLINE_CLIENT_IFACE, ONLINE_SERVER_IFACE],
            "target": [TARGET_IFACE],
            "assistant": [ASSISTANT_IFACE],
            "sw": [BRIDGE],
        }
        for role in roles:
            settings = [
                "net.ipv4.ip_forward=0",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]
            settings += [f"net.ipv4.conf.{i}.rp_filter=0" for i in ifaces[role]]
            self.run(role, "sysctl", "-q", "-w", *settings)

    def set_mode(self, mode: str) -> None:
        """Point the target's route for the fake clients at the online host (traditional) or
        at the assistant (advanced)."""
        if mode == TRADITIONAL:
            via = ONLINE_SERVER_SIDE_IP
        elif mode == ADVANCED:
            if not self.with_assistant:
                raise TestbedError("advanced mode needs the assistant namespace")
            via = ASSISTANT_IP
        else:
            raise TestbedError(f"unknown mode {mode!r}")
        self.ip("target", "route", "replace", FAKE_CLIENT_NET, "via", via, "dev", TARGET_IFACE)
        self.mode = mode

    def routes(self, role: str) -> str:
        return self.ip(role, "route", "show").stdout

    # -- leak counters (client namespace) ---------------------------------------------------------

    LEAK_RULES = (("-s", SERVER_NET), ("-d", FAKE_CLIENT_NET))

    def _install_leak_counters(self) -> None:
        for flag, net in self.LEAK_RULES:
            self.run("client", "iptables", "-w", "-t", "raw", "-A", "PREROUTING", flag, net)

    def iptables_counters(self, role: str, table: str = "raw") -> list[tuple[int, int, str]]:
        """(packets, bytes, rule) for every rule of ``table`` in ``role``'s namespace."""
        out = self.run(role, "iptables-save", "-c", "-t", table).stdout
        rows = []
        for line in out.splitlines():
            m = re.match(r"^\[(\d+):(\d+)\]\s+(-A .*)$", line)
            if m:
                rows.append((int(m.group(1)), int(m.group(2)), m.group(3)))
        return rows

    def client_leak_packets(self) -> int:
        """Packets that reached the client namespace from the server subnet or addressed to a
        fake client (must stay 0: nothing of the replay may reach a real client)."""
        return sum(pkts for pkts, _, rule in self.iptables_counters("client", "raw"))

    # -- servers ---------------------------------------------------------------------------------

    def spawn(self, role: str, name: str, argv: Sequence[str], **popen_kw: Any) -> Proc:
        """Start a long-running process in ``role``'s namespace; stopped by close()."""
        log = self.workdir / f"{name}.log"
        proc = Proc(name, self.ns(role), argv, log, **popen_kw)
        self.procs.append(proc)
        return proc

    def _start_nginx(self, role: str, port: int) -> Server:
        prefix = self.workdir / f"nginx-{role}"
        for sub in ("html", "body", "logs"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        self._write_big_file(prefix / "html" / BIG_FILE_PATH.lstrip("/"))
        conf = prefix / "nginx.conf"
        conf.write_text(_nginx_conf(prefix, port, role))
        proc = self.spawn(
            role, f"nginx-{role}", [str(NGINX_BIN), "-p", str(prefix), "-c", str(conf)]
        )
        return Server(proc, prefix)

    def _write_big_file(self, path: Path) -> None:
        path.write_bytes(big_file_content())

    def _start_redis(self, role: str) -> Server:
        directory = self.workdir / f"redis-{role}"
        directory.mkdir(parents=True, exist_ok=True)
        argv = [
            REDIS_SERVER_BIN,
            "--port", str(REDIS_PORT),
            "--bind", "0.0.0.0",
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--dir", str(directory),
            "--unixsocket", str(directory / "redis.sock"),
            "--unixsocketperm", "700",
            "--maxclients", "4000",
            "--enable-debug-command", "local",  # DEBUG DIGEST over the unix socket
        ]  # fmt: skip
        proc = self.spawn(role, f"redis-{role}", argv)
        return Server(proc, directory)

    def start_postgres(self, role: str) -> Server:
        """A PostgreSQL server in ``role`` (online or target) on POSTGRES_PORT: a fresh cluster
        (initdb) in a directory of its own, trust authentication, run as the postgres user,
        its unix socket in that directory (set-up traffic never crosses the replicated port),
        every connection logged.  Returns once it accepts connections."""
        bindir = postgres_bin_dir()
        if bindir is None:
            raise TestbedError("PostgreSQL server binaries not installed (tests/setup.sh)")
        # Outside the (root-only) pytest tmp tree: the postgres user must reach it.
        directory = Path(tempfile.mkdtemp(prefix=f"{self.tag}-pg-{role}-", dir="/tmp"))
        os.chmod(directory, 0o755)
        shutil.chown(directory, POSTGRES_USER, POSTGRES_USER)
        data = directory / "data"
        as_postgres = ["setpriv", "--reuid", POSTGRES_USER, "--regid", POSTGRES_USER,
                       "--init-groups", "--"]  # fmt: skip
        _sh([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U",
             POSTGRES_USER, "-E", "UTF8", "--no-sync"], timeout=120.0)  # fmt: skip
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                f"listen_addresses = '*'\nport = {POSTGRES_PORT}\n"
                f"unix_socket_directories = '{directory}'\nmax_connections = 200\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "log_connections = on\nlogging_collector = off\n"
            )
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write("host all all 0.0.0.0/0 trust\n")
        proc = self.spawn(
            role, f"postgres-{role}", [*as_postgres, str(bindir / "postgres"), "-D", str(data)]
        )
        server = Server(proc, directory)
        self.postgres[role] = server
        ip = ONLINE_CLIENT_SIDE_IP if role == "online" else TARGET_IP

        def ready() -> bool:
            if not proc.alive():
                raise TestbedError(f"postgres-{role} exited at start:\n{proc.tail()}")
            return can_connect(self.ns(role), ip, POSTGRES_PORT, timeout=0.5)

        wait_until(ready, READY_TIMEOUT_S, what=f"postgres-{role} on {ip}:{POSTGRES_PORT}")
        return server

    def psql(self, role: str, sql: str, timeout: float = 60.0) -> str:
        """Run ``sql`` on ``role``'s PostgreSQL over its unix socket; the unaligned output."""
        sock = str(self.postgres[role].dir)
        return self.run(
            role, PSQL_BIN, "-h", sock, "-p", str(POSTGRES_PORT), "-U", POSTGRES_USER,
            "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-Atc", sql, timeout=timeout,
        ).stdout.strip()  # fmt: skip

    def pgbench_init(self, role: str, scale: int = 1) -> None:
        """pgbench's tables on ``role``'s server (over the unix socket: not replicated)."""
        sock = str(self.postgres[role].dir)
        self.run(role, PGBENCH_BIN, "-i", "-q", "-s", str(scale), "-h", sock,
                 "-p", str(POSTGRES_PORT), "-U", POSTGRES_USER, "postgres",
                 timeout=300.0)  # fmt: skip

    def pgbench(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """pgbench from the client namespace against the online server (replicated)."""
        argv = [PGBENCH_BIN, "-h", ONLINE_CLIENT_SIDE_IP, "-p", str(POSTGRES_PORT),
                "-U", POSTGRES_USER, *args, "postgres"]  # fmt: skip
        return self.run("client", *argv, timeout=timeout)

    def postgres_connections(self, role: str) -> list[str]:
        """The client addresses of every connection ``role``'s server received (its log)."""
        text = self.postgres[role].proc.output()
        return re.findall(r"connection received: host=([0-9.]+)", text)

    def _wait_servers_ready(self) -> None:
        checks = [
            ("online", ONLINE_CLIENT_SIDE_IP, ONLINE_HTTP_PORT, self.nginx["online"].proc),
            ("target", TARGET_IP, TARGET_HTTP_PORT, self.nginx["target"].proc),
        ]
        if self.with_redis:
            checks += [
                ("online", ONLINE_CLIENT_SIDE_IP, REDIS_PORT, self.redis["online"].proc),
                ("target", TARGET_IP, REDIS_PORT, self.redis["target"].proc),
            ]
        for role, ip, port, proc in checks:
            # Connect from inside the server's own namespace: nothing is replaying yet, and
            # the client namespace stays free of set-up traffic.
            def ready(role=role, ip=ip, port=port, proc=proc) -> bool:
                if not proc.alive():
                    raise TestbedError(f"{proc.name} exited at start:\n{proc.tail()}")
                return can_connect(self.ns(role), ip, port, timeout=0.5)

            wait_until(ready, READY_TIMEOUT_S, what=f"{proc.name} on {ip}:{port}")

    # -- reading servers ---------------------------------------------------------------------------

    def access_log(self, role: str) -> list[AccessRecord]:
        return read_access_log(self.nginx[role].dir / "access.log")

    def body_file_sha256(self, role: str, record: AccessRecord) -> str | None:
        """sha256 of the request body nginx kept for ``record`` (None if none was kept)."""
        if record.request_body_file in ("", "-"):
            return None
        path = Path(record.request_body_file)
        if not path.is_absolute():
            path = self.nginx[role].dir / path
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        except FileNotFoundError:
            return None

    def redis_stats(self, role: str) -> dict[str, int]:
        info = redis_command(self.redis[role].dir / "redis.sock", "INFO", "commandstats")
        return parse_commandstats(info)

    # -- the programs under test -------------------------------------------------------------------

    def start_intercept(
        self,
        extra: Sequence[str] = (),
        name: str = "intercept-mp",
        install_ports: Sequence[int] = (TARGET_HTTP_PORT,),
        summary: Path | None = None,
    ) -> Proc:
        """intercept-mp for the current mode: NFQUEUE on the target (traditional) or pcap on
        the assistant (advanced); waits until it listens on INTERCEPT_PORT."""
        if self.mode == ADVANCED:
            role, listen_ip = "assistant", ASSISTANT_IP
            ports = " or ".join(f"src port {p}" for p in install_ports)
            argv = [str(INTERCEPT_BIN), "-i", ASSISTANT_IFACE, "-F", f"tcp and ({ports})"]
        else:
            role, listen_ip = "target", TARGET_IP
            argv = [str(INTERCEPT_BIN), "--queue-num", "0", "--install-rule",
                    ",".join(str(p) for p in install_ports)]  # fmt: skip
        argv += ["-p", str(INTERCEPT_PORT)]
        if summary is not None:
            argv += ["--summary-json", str(summary)]
        argv += list(extra)
        proc = self.spawn(role, name, argv)
        proc.summary_path = summary

        def listening() -> bool:
            if not proc.alive():
                raise TestbedError(
                    f"{name} exited at start (rc={proc.popen.returncode}):\n{proc.tail()}"
                )
            return self._listening(role, INTERCEPT_PORT)

        wait_until(
            listening, READY_TIMEOUT_S, what=f"{name} listening on {listen_ip}:{INTERCEPT_PORT}"
        )
        if self.mode != ADVANCED:
            wait_until(
                lambda: "NFQUEUE" in self.run("target", "iptables-save", "-t", "filter").stdout,
                READY_TIMEOUT_S,
                what="intercept-mp's NFQUEUE rule",
            )
        return proc

    def intercept_address(self) -> str:
        return ASSISTANT_IP if self.mode == ADVANCED else TARGET_IP

    def start_tcpcopy(
        self, args: Sequence[str], name: str = "tcpcopy-mp", summary: Path | None = None
    ) -> Proc:
        """tcpcopy-mp in the online namespace with ``args`` (plus -s/--summary-json/-l if not
        given).  Does not wait: see ``wait_replicating``."""
        argv = [str(TCPCOPY_BIN), *args]
        if "-s" not in args and "--intercepts" not in args:
            argv += ["-s", self.intercept_address()]
        if "--workers" not in args and self.tcpcopy_workers is not None:
            argv += ["--workers", str(self.tcpcopy_workers)]
        if summary is not None:
            argv += ["--summary-json", str(summary)]
        proc = self.spawn("online", name, argv)
        proc.summary_path = summary
        return proc

    def _listening(self, role: str, port: int) -> bool:
        out = self.run(role, "ss", "-ltnH", f"sport = :{port}", check=False).stdout
        return bool(out.strip())

    def established_to(self, role: str, port: int) -> int:
        out = self.run(
            role, "ss", "-tnH", "state", "established", f"sport = :{port}", check=False
        ).stdout
        return len([line for line in out.splitlines() if line.strip()])

    def wait_replicating(
        self, tcpcopy: Proc, timeout: float = 30.0, prefix: str = "/probe/"
    ) -> int:
        """Send one-request probes (``prefix<n>``) from the client until one of them shows up
        in the target's log; returns the number of probes sent.  This is the readiness signal
        for tcpcopy-mp (capture up, channels to intercept up, replay working)."""
        counter = itertools.count()
        sent = 0

        def probe() -> bool:
            nonlocal sent
            if not tcpcopy.alive():
                raise TestbedError(
                    f"{tcpcopy.name} exited (rc={tcpcopy.popen.returncode}):\n{tcpcopy.tail()}"
                )
            if any(r.uri.startswith(prefix) for r in self.access_log("target")):
                return True
            http_get(self.ns("client"), ONLINE_CLIENT_SIDE_IP, ONLINE_HTTP_PORT,
                     f"{prefix}{next(counter)}")  # fmt: skip
            sent += 1
            return False

        wait_until(probe, timeout, interval=0.2, what=f"{tcpcopy.name} replicating a probe")
        return sent

    def wait_redis_replicating(self, tcpcopy: Proc, timeout: float = 30.0) -> None:
        """Send redis ECHO probes from the client until the target's redis counted one (the
        readiness signal when tcpcopy-mp replicates the redis port only)."""

        def probe_seen() -> bool:
            if not tcpcopy.alive():
                raise TestbedError(f"{tcpcopy.name} exited:\n{tcpcopy.tail()}")
            if self.redis_stats("target").get("echo", 0) > 0:
                return True
            self.redis_ping_from_client("ECHO", "probe")
            return False

        wait_until(probe_seen, timeout, interval=0.2, what="a replicated redis ECHO probe")

    def wait_target_count(
        self, prefix: str, expected: int, timeout: float = 60.0, role: str = "target"
    ) -> int:
        """Poll the target's access log until ``expected`` requests under ``prefix`` arrived or
        ``timeout`` passed; returns the count seen (the caller asserts)."""
        seen = 0

        def arrived() -> bool:
            nonlocal seen
            seen = len(with_prefix(self.access_log(role), prefix))
            return seen >= expected

        poll(arrived, timeout, interval=0.1)
        return seen

    def start_tcpdump(
        self,
        path: Path,
        role: str = "online",
        iface: str = ONLINE_CLIENT_IFACE,
        bpf: str = f"tcp port {ONLINE_HTTP_PORT}",
    ) -> Proc:
        """tcpdump writing ``path`` packet by packet (-U); returns once it is listening."""
        argv = [TCPDUMP_BIN, "-i", iface, "-n", "-U", "-s", "0", "-Z", "root", "-w", str(path), bpf]
        proc = self.spawn(role, f"tcpdump-{path.stem}", argv)

        def listening() -> bool:
            if not proc.alive():
                raise TestbedError(f"tcpdump exited at start:\n{proc.tail()}")
            return "listening on" in proc.output()

        wait_until(listening, READY_TIMEOUT_S, what="tcpdump listening")
        return proc

    def redis_ping_from_client(self, *args: str, timeout: float = 5.0) -> bytes:
        """One RESP command from the client namespace to the online redis (a probe that
        tcpcopy-mp replicates); returns the first reply line."""
        sock = netns_socket(self.ns("client"))
        try:
            sock.settimeout(timeout)
            sock.connect((ONLINE_CLIENT_SIDE_IP, REDIS_PORT))
            payload = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
            sock.sendall(payload.encode())
            buf = b""
            while b"\r\n" not in buf:
                data = sock.recv(4096)
                if not data:
                    break
                buf += data
            return buf.split(b"\r\n", 1)[0]
        finally:
            sock.close()

    # -- load ----------------------------------------------------------------------------------

    def loadgen(self, *args: str, timeout: float = 120.0, role: str = "client") -> dict:
        """Run testbed/loadgen.py in the client namespace to completion; its JSON summary."""
        argv = [str(PYTHON), "-m", "testbed.loadgen", *args]
        proc = subprocess.run(
            ["ip", "netns", "exec", self.ns(role), *argv],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        return _last_json(proc, "loadgen")

    def spawn_loadgen(self, *args: str, name: str = "loadgen") -> Proc:
        """Start a load generator in the client namespace with pipes (for the pre-opened mode)."""
        argv = [str(PYTHON), "-m", "testbed.loadgen", *args]
        return self.spawn(
            "client", name, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def redis_benchmark(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        argv = [REDIS_BENCHMARK_BIN, "-h", ONLINE_CLIENT_SIDE_IP, "-p", str(REDIS_PORT), *args]
        return self.run("client", *argv, timeout=timeout)


def _last_json(proc: subprocess.CompletedProcess, what: str) -> dict:
    for line in reversed(proc.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    raise TestbedError(
        f"{what} gave no JSON summary (rc={proc.returncode}): "
        f"{proc.stdout[-500:]} {proc.stderr[-1500:]}"
    )


def big_file_content() -> bytes:
    """The 10 MiB file served by both nginx (deterministic, so its sha256 can be derived)."""
    return random.Random(BIG_FILE_SEED).randbytes(BIG_FILE_BYTES)


def read_summary(path: Path) -> dict | None:
    """The --summary-json of a stopped program (None if it wrote none or it is not JSON)."""
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


# -- a replicating pair, for the tests and benchmarks ------------------------------------------


def diag(tb: Testbed) -> str:
    """Log tails and --summary-json of the programs under test, for assertion messages."""
    parts = []
    for proc in tb.procs:
        if proc.name.startswith(("tcpcopy", "intercept")):
            parts.append(f"--- {proc.name} (rc={proc.popen.returncode}) ---\n{proc.tail(25)}")
            summary = read_summary(proc.summary_path) if proc.summary_path else None
            if summary:
                nonzero = {k: v for k, v in summary.items() if v not in (0, None, "")}
                parts.append(f"--- {proc.name} --summary-json (non-zero) ---\n{nonzero}")
    return "\n".join(parts)


def start_pair(
    tb: Testbed,
    workdir: Path,
    tcpcopy_args: list[str],
    mode: str = TRADITIONAL,
    ports: tuple[int, ...] = (TARGET_HTTP_PORT,),
    probe: bool = True,
) -> tuple[Proc, Proc]:
    """intercept-mp for ``mode`` then tcpcopy-mp, their --summary-json in ``workdir``; returns
    once an HTTP probe was replicated (``probe``)."""
    tb.set_mode(mode)
    intercept = tb.start_intercept(install_ports=ports, summary=workdir / "intercept-summary.json")
    tcpcopy = tb.start_tcpcopy(tcpcopy_args, summary=workdir / "tcpcopy-summary.json")
    if probe:
        tb.wait_replicating(tcpcopy)
    return intercept, tcpcopy


def stop_tcpcopy(tb: Testbed, tcpcopy: Proc, workdir: Path) -> dict:
    """SIGTERM: tcpcopy-mp must exit 0 with a --summary-json object (the CLI contract); the
    object.  A broken contract is an AssertionError naming it, with ``diag``."""
    rc = tcpcopy.stop(signal.SIGTERM, timeout=20)
    summary = read_summary(workdir / "tcpcopy-summary.json")
    if rc != 0:
        raise AssertionError(f"tcpcopy-mp exited {rc} on SIGTERM\n{diag(tb)}")
    if summary is None:
        raise AssertionError(f"tcpcopy-mp wrote no --summary-json object\n{diag(tb)}")
    return summary
