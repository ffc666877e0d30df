"""Live benchmark: tcpcopy-mp beside C TCPCopy 1.0, same testbed, same scenarios, one table.

    sudo bash bench/run.sh [--quick] [--peer c|none]     (set-up, then this script)
    sudo .venv/bin/python bench/bench_live.py [--quick] [--workers 1,2] [--scenarios a,b]

Theory of operation
-------------------
One namespace testbed (testbed/netns.py: client → online nginx :80, target nginx :8080)
is built once, in the traditional mode: the target routes the fake clients (198.19.0.0/16) via
the online host and an intercept on the target takes the responses from NFQUEUE queue 0.  Both
implementations run in that same mode: tcpcopy-mp with intercept-mp ``--queue-num 0
--install-rule 8080``, and C tcpcopy 1.0 (live build: raw-socket capture, raw IP send) with
C intercept 1.0 built ``--traditional`` from the unmodified sources (bench/cref.py; the
benchmark adds the NFQUEUE rule that intercept expects the user to add).  Only one intercept
holds queue 0 at a time: each run starts its own intercept and stops it afterwards.

Every run (scenario x replicator) has its own fake-client pool 198.19.<10+run>.x, so no
replayed 4-tuple of one run meets the target's TIME_WAIT of an earlier one (design §9), and
its own URL prefix /b<run>/, so the two access logs can be counted per run.  Replicators:
tcpcopy-mp with each ``--workers`` value of --workers (default 1,2), and C tcpcopy (one
process) unless ``--peer none``.

A live run: start the intercept and the replicator, wait until a probe request is replicated
(capture, channels and replay all up), sample the CPU times of both process trees, drive the
load from the client namespace with wrk (a Lua script adds pacing, a request cap,
``Connection: close`` and a JSON summary), wait until the target's count reaches the online
count or stops growing, sample the CPU times again, stop both (SIGTERM: tcpcopy-mp writes
--summary-json, C tcpcopy its closing statistics).  Memory is the sum of RSS (and of PSS)
over the replicator's tree, sampled every MEM_SAMPLE_INTERVAL_S by a thread.

Load shapes:
- keep-alive: wrk -t 2 -c N, as fast as it goes (N = 10, 50, 200);
- short connections (one request each, ``Connection: close``), c10, as fast as they go, from
  the client's one address or from 64 addresses 198.18.1.100-163.  wrk cannot bind a source
  address, so for the 64-address runs the client namespace source-NATs new connections
  round-robin over the 64 addresses (iptables ``statistic --mode nth``, one rule per address
  with every = 64 - i: rule i takes 1/(64-i) of what rules 0..i-1 left, i.e. 1/64 of the
  total).  Conntrack's TIME_WAIT timeout there is cut to CONNTRACK_TIME_WAIT_S so the
  connection rate does not fill its table;
- sustained short connections from one address: paced at 2 k conn/s for 80 s whatever
  --duration says, longer than the target's 60 s TIME_WAIT, so a replicator that can use a
  client tuple only once per TIME_WAIT (~64.5 k connections per minute and fake address)
  shows it (issue 15: a 10 s run stays under that ceiling);
- optional (``--scenarios``): short connections paced at 5 k / 10 k conn/s by the Lua
  ``delay()`` hook (a per-thread schedule of send slots on CLOCK_MONOTONIC via LuaJIT's ffi);
- offline: the online side of a wrk run (keep-alive c10 from one address, or short
  connections c10 from 64 addresses) is recorded once with tcpdump on the online host's
  client-side interface, with no replicator running; then each replicator replays that pcap at
  ``-a OFFLINE_ACCEL`` (tcpcopy-mp ``--pcap FILE -a 16``, C's offline build ``-i FILE -a 16``)
  to the same target.  The online count is the number of requests in the pcap; the rate is
  the target's replicated requests over the span of their access-log timestamps (so start-up
  and C's 120 s end-of-file wait are not counted); CPU is the replicator's whole-life usage
  (wait4's rusage, which includes every child it reaped) minus what it had used when the first
  replicated request arrived (start-up).  C waits OFFLINE_TAIL_TIMEOUT (120 s) after the end
  of the file before it exits: it is stopped with SIGTERM once the target's count settled.

The rates: "target req/s" of a live run is the target's count over wrk's run time, the
replicated throughput; on a 2-CPU machine the load generator, both nginx, the replicator and
the intercept share the CPUs, so a replicator that costs less CPU also lets wrk go faster.
Host CPU busy % and the 1-minute load average before each run are recorded: anything else
running on the machine skews the figures.

Output: bench/results/<timestamp>.json/.md/.png and copies named latest.*; the markdown table is
printed for the README's Performance section.  Optionally (default on in a full run) a py-spy
profile of tcpcopy-mp (--workers 1) under short connections from one address and under
keep-alive c50: raw collapsed stacks in bench/results/profile-<timestamp>-<scenario>.txt and
the top frames in the JSON ("profiles") and markdown.

Every load is bounded in time (wrk -d) and count (the Lua cap), every replay by the pcap's
size and a deadline; all traffic stays in the namespaces (198.18.0.0/15; fake clients
198.19.0.0/16), and everything is torn down at the end, also on Ctrl-C (exit 130) or an error.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import cref  # noqa: E402
from testbed import netns as tbm  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
WRK_BIN = shutil.which("wrk") or "/usr/bin/wrk"
PYSPY_BIN = tbm.VENV_BIN / "py-spy"

TRANSFER = f"{tbm.ONLINE_HTTP_PORT}-{tbm.TARGET_IP}:{tbm.TARGET_HTTP_PORT}"
WRK_THREADS = 2
FULL_DURATION_S = 10
QUICK_DURATION_S = 3
PROFILE_DURATION_S = 10
RECORD_DURATION_S = 2
"""Seconds of wrk load recorded for each offline pcap (quick: QUICK_RECORD_DURATION_S)."""
QUICK_RECORD_DURATION_S = 1
OFFLINE_ACCEL = 16
OFFLINE_MAX_S = 90.0
"""A replay still going after this long is stopped (its count so far is reported)."""
TCPDUMP_BUFFER_KIB = 65536
MEM_SAMPLE_INTERVAL_S = 0.5
SETTLE_POLL_S = 0.25
SETTLE_QUIET_S = 3.0
"""After the load, the target's count unchanged this long means replication is over."""
SETTLE_MAX_S = 15.0
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
WRK_GRACE_S = 30.0
"""wrk gets its -d plus this before it is killed (it normally ends on its own at -d)."""
WRK_CAP_FACTOR = 3
"""The Lua request cap per thread: this many times the paced count (or KEEPALIVE_CAP)."""
KEEPALIVE_CAP_PER_THREAD = 5_000_000
PACING_SLACK_MS = 50
"""A paced thread that fell behind catches up at most this much (no unbounded burst)."""
POOL_FIRST = 10
"""Run i uses the fake clients 198.19.(POOL_FIRST + i).x."""
EXTRA_CLIENT_IPS = tuple(f"198.18.1.{100 + i}" for i in range(64))
CONNTRACK_TIME_WAIT_S = 2
TOP_FRAMES = 15
OURS, C = "ours", "c"


# ---------------------------------------------------------------------------------------------
# scenarios and replicators


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    kind: str
    """"keepalive", "short" (one request per connection, Connection: close) or "offline"."""
    connections: int
    """wrk -c: concurrent connections (offline: of the recorded run)."""
    rate_per_s: int = 0
    """Offered requests (= connections for "short") per second; 0 = as fast as possible."""
    client_ips: int = 1
    close: bool = False
    """Connection: close (one request per connection)."""
    duration_s: int = 0
    """Seconds of load of a live run; 0 = the run's --duration."""
    differ: bool = False
    """Request testbed/netns.py's DIFFER_PREFIX URLs, whose bodies differ in length on
    the target (shorter, longer, equal: docs/replay.md), cycling through them."""

    def path(self, prefix: str) -> str:
        """The URL path of the run's requests up to the part wrk or the script varies."""
        return f"{tbm.DIFFER_PREFIX}{prefix}/req" if self.differ else f"/{prefix}/req"

    def needle(self, prefix: str) -> str:
        """What marks the run's requests in an access log."""
        return f" {tbm.DIFFER_PREFIX}{prefix}/" if self.differ else f" /{prefix}/"

    def describe(self) -> str:
        addrs = "1 client address" if self.client_ips == 1 else f"{self.client_ips} addresses"
        if self.kind == "offline":
            what = "short conns" if self.close else "keep-alive"
            return (
                f"offline replay -a {OFFLINE_ACCEL} of a pcap: {what}, c{self.connections}, {addrs}"
            )
        if self.kind == "keepalive":
            differ = ", target bodies of other lengths" if self.differ else ""
            pace = f"{self.rate_per_s // 1000} k req/s offered" if self.rate_per_s else "unpaced"
            return f"keep-alive, {self.connections} conns, {pace}{differ}"
        rate = f"{self.rate_per_s // 1000} k/s offered" if self.rate_per_s else "unpaced"
        during = f", for {self.duration_s} s" if self.duration_s else ""
        return f"short conns, c{self.connections}, {rate}, {addrs}{during}"

    def load(self) -> str:
        """The short 'load' column of the table."""
        if self.kind == "offline":
            return f"pcap -a {OFFLINE_ACCEL}"
        if self.rate_per_s and self.kind == "keepalive":
            return f"c{self.connections} {self.rate_per_s // 1000} k/s" + (
                " other lengths" if self.differ else ""
            )
        if self.rate_per_s:
            during = f", {self.duration_s} s" if self.duration_s else ""
            return f"{self.rate_per_s // 1000} k/s x{self.client_ips} addr{during}"
        if self.close:
            return f"c{self.connections} x{self.client_ips} addr"
        return f"c{self.connections}" + (" other lengths" if self.differ else "")


SCENARIOS = (
    Scenario("ka-c10", "keepalive", 10),
    Scenario("ka-c50", "keepalive", 50),
    Scenario("ka-c200", "keepalive", 200),
    Scenario("ka-c50-5k-differ", "keepalive", 50, 5000, differ=True),
    Scenario("short-c10-1ip", "short", 10, 0, 1, close=True),
    Scenario("short-c10-64ip", "short", 10, 0, 64, close=True),
    Scenario("sustained-2k-1ip", "short", 16, 2000, 1, close=True, duration_s=80),
    Scenario("offline-ka", "offline", 10, 0, 1, close=False),
    Scenario("offline-short", "offline", 10, 0, 64, close=True),
)
EXTRA_SCENARIOS = (
    Scenario("short-5k-1ip", "short", 128, 5000, 1, close=True),
    Scenario("short-10k-1ip", "short", 256, 10000, 1, close=True),
    Scenario("short-5k-64ip", "short", 128, 5000, 64, close=True),
    Scenario("short-10k-64ip", "short", 256, 10000, 64, close=True),
    Scenario("ka-c50-differ", "keepalive", 50, differ=True),
)
"""Not in the default set (--scenarios): the paced short-connection loads of earlier runs, and
ka-c50-differ unpaced (it measures the replicator's throughput more than its pace)."""
PROFILE_SCENARIOS = ("short-c10-1ip", "ka-c50")


@dataclasses.dataclass(frozen=True)
class Replicator:
    impl: str
    """OURS or C."""
    workers: int = 1

    def label(self) -> str:
        return f"tcpcopy-mp w{self.workers}" if self.impl == OURS else "C tcpcopy 1.0"


def say(msg: str) -> None:
    print(f"bench: {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# wrk


_WRK_LUA = """-- generated by bench/bench_live.py: pacing, a request cap and a JSON summary for wrk
local RATE_PER_THREAD = {rate_per_thread}
local CAP_PER_THREAD = {cap_per_thread}
local SLACK_MS = {slack_ms}
{close_header}
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local interval_ms, next_ms, responses = 0, 0, 0
function init(args)
  if RATE_PER_THREAD > 0 then
    interval_ms = 1000 / RATE_PER_THREAD
    next_ms = now_ms()
  end
end
if RATE_PER_THREAD > 0 then
  -- Every request of this thread takes the next send slot; wrk waits the returned ms.
  function delay()
    local now = now_ms()
    if next_ms < now - SLACK_MS then next_ms = now - SLACK_MS end
    next_ms = next_ms + interval_ms
    local wait = next_ms - now
    if wait <= 0 then return 0 end
    return math.floor(wait + 0.5)
  end
end
{differ_request}
function response(status, headers, body)
  responses = responses + 1
  if responses >= CAP_PER_THREAD then wrk.thread:stop() end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{{"wrk": true, "requests": %d, "duration_us": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, ' ..
    '"latency_mean_ms": %.3f, "latency_p99_ms": %.3f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean / 1000, latency:percentile(99) / 1000))
end
"""


def wrk_script(path: Path, scenario: Scenario, duration_s: int) -> Path:
    if scenario.rate_per_s:
        rate_per_thread = scenario.rate_per_s / WRK_THREADS
        cap = int(rate_per_thread * duration_s * WRK_CAP_FACTOR) + 1000
    else:
        rate_per_thread, cap = 0, KEEPALIVE_CAP_PER_THREAD
    close = 'wrk.headers["Connection"] = "close"' if scenario.close else ""
    differ = ""
    if scenario.differ:
        # The URI's last digit picks the body length (testbed DIFFER_BODY_BYTES).
        differ = (
            "local sent = 0\n"
            "function request()\n"
            "  sent = sent + 1\n"
            "  return wrk.format(nil, wrk.path .. (sent % 10))\n"
            "end"
        )
    path.write_text(
        _WRK_LUA.format(
            rate_per_thread=rate_per_thread,
            cap_per_thread=cap,
            slack_ms=PACING_SLACK_MS,
            close_header=close,
            differ_request=differ,
        )
    )
    return path


def wrk_argv(tb: tbm.Testbed, script: Path, scenario: Scenario, duration_s: int, prefix: str):
    url = f"http://{tbm.ONLINE_CLIENT_SIDE_IP}:{tbm.ONLINE_HTTP_PORT}{scenario.path(prefix)}"
    return [
        "ip", "netns", "exec", tb.ns("client"), WRK_BIN,
        "-t", str(WRK_THREADS), "-c", str(scenario.connections), "-d", f"{duration_s}s",
        "-s", str(script), url,
    ]  # fmt: skip


def parse_wrk(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith('{"wrk"'):
            return json.loads(line)
    raise tbm.TestbedError(f"wrk printed no summary: {stdout[-500:]}")


# ---------------------------------------------------------------------------------------------
# the 64 client addresses (client namespace)


def add_client_addresses(tb: tbm.Testbed) -> None:
    for ip in EXTRA_CLIENT_IPS:
        tb.ip("client", "addr", "add", f"{ip}/24", "dev", tbm.CLIENT_IFACE)


def install_snat(tb: tbm.Testbed) -> None:
    """New connections to :80 leave the client with one of the 64 addresses, round-robin."""
    tb.run(
        "client", "sysctl", "-q", "-w",
        f"net.netfilter.nf_conntrack_tcp_timeout_time_wait={CONNTRACK_TIME_WAIT_S}",
        check=False,
    )  # fmt: skip
    n = len(EXTRA_CLIENT_IPS)
    rules = ["*nat"]
    for i, ip in enumerate(EXTRA_CLIENT_IPS):
        rules.append(
            f"-A POSTROUTING -o {tbm.CLIENT_IFACE} -p tcp --dport {tbm.ONLINE_HTTP_PORT} "
            f"-m statistic --mode nth --every {n - i} --packet 0 -j SNAT --to-source {ip}"
        )
    rules.append("COMMIT\n")
    proc = subprocess.run(
        ["ip", "netns", "exec", tb.ns("client"), "iptables-restore", "-w", "--noflush"],
        input="\n".join(rules), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if proc.returncode != 0:
        raise tbm.TestbedError(f"iptables-restore (SNAT rules): {proc.stderr.strip()}")
    # The sysctl exists only once conntrack runs in the namespace: set it again now.
    tb.run(
        "client", "sysctl", "-q", "-w",
        f"net.netfilter.nf_conntrack_tcp_timeout_time_wait={CONNTRACK_TIME_WAIT_S}",
        check=False,
    )  # fmt: skip


def remove_snat(tb: tbm.Testbed) -> None:
    tb.run("client", "iptables", "-w", "-t", "nat", "-F", "POSTROUTING", check=False)


# ---------------------------------------------------------------------------------------------
# measuring


class LogCounter:
    """Counts access-log lines containing ``needle``, written after the counter was made, and
    keeps the first and last $msec of them (the replay span of an offline run)."""

    MSEC_FIELD = tbm.ACCESS_LOG_FIELDS.index("msec")

    def __init__(self, path: Path, needle: str):
        self.path = path
        self.needle = needle.encode()
        try:
            self.offset = path.stat().st_size
        except FileNotFoundError:
            self.offset = 0
        self.total = 0
        self.first_msec: float | None = None
        self.last_msec: float | None = None

    def count(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.total
        end = data.rfind(b"\n") + 1  # a half-written last line waits for the next call
        for line in data[:end].splitlines():
            if self.needle not in line:
                continue
            self.total += 1
            fields = line.split()
            try:
                msec = float(fields[self.MSEC_FIELD])
            except (IndexError, ValueError):
                continue
            if self.first_msec is None:
                self.first_msec = msec
            self.last_msec = msec
        self.offset += end
        return self.total

    def span_s(self) -> float | None:
        if self.first_msec is None or self.last_msec is None:
            return None
        return self.last_msec - self.first_msec


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu(pid: int) -> dict[int, float]:
    """utime + stime (s) of every live process of the tree, by pid."""
    out = {}
    for proc in process_tree(pid):
        try:
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two samples (a child born in between counts from zero; one
    that died in between is lost: the table notes worker restarts via the summary)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def process_names(pid: int) -> dict[int, str]:
    """pid → process name (the supervisor names its children, e.g. by role) for the tree."""
    names = {}
    for proc in process_tree(pid):
        try:
            names[proc.pid] = proc.name()
        except psutil.NoSuchProcess:
            pass
    return names


def cpu_by_name(
    before: dict[int, float], after: dict[int, float], names: dict[int, str]
) -> dict[str, float]:
    out: dict[str, float] = {}
    for pid, t in after.items():
        name = names.get(pid, f"pid {pid}")
        out[name] = round(out.get(name, 0.0) + t - before.get(pid, 0.0), 3)
    return out


def _pss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def tree_mem(pid: int, by_process: dict[str, int] | None = None) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) over the tree (PSS falls back to RSS where unreadable);
    ``by_process`` gets each process's PSS by name."""
    rss = pss = 0
    for proc in process_tree(pid):
        try:
            r = proc.memory_info().rss
            name = proc.name()
        except psutil.NoSuchProcess:
            continue
        rss += r
        p = _pss_bytes(proc.pid)
        pss += r if p is None else p
        if by_process is not None:
            key = name if name not in by_process else f"{name} ({proc.pid})"
            by_process[key] = r if p is None else p
    return rss, pss


class MemSampler:
    """Peaks of the summed RSS and PSS of a process tree, sampled every MEM_SAMPLE_INTERVAL_S
    (RSS counts a page shared by forked processes once per process, PSS splits it)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak_by_process: dict[str, int] = {}
        """Each process's PSS in the sample where the summed PSS peaked."""
        self.peak_rss, self.peak_pss = tree_mem(pid, self.peak_by_process)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mem-sampler", daemon=True)

    def _sample(self) -> None:
        by_process: dict[str, int] = {}
        rss, pss = tree_mem(self.pid, by_process)
        self.peak_rss = max(self.peak_rss, rss)
        if pss > self.peak_pss:
            self.peak_pss = pss
            self.peak_by_process = by_process

    def peak_mb_by_process(self) -> dict[str, float]:
        return {k: round(v / 2**20, 1) for k, v in self.peak_by_process.items()}

    def _run(self) -> None:
        while not self._stop.wait(MEM_SAMPLE_INTERVAL_S):
            self._sample()

    def __enter__(self) -> MemSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def host_busy_s() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def settle(online: LogCounter, target: LogCounter, tcpcopy: tbm.Proc) -> tuple[int, int, float]:
    """Poll until the target's count reaches the online one, or stops growing for
    SETTLE_QUIET_S, or SETTLE_MAX_S passed; returns (online, target, seconds waited)."""
    started = last_change = time.monotonic()
    last = -1
    while True:
        now = time.monotonic()
        on, tg = online.count(), target.count()
        if tg != last:
            last, last_change = tg, now
        if (
            tg >= on
            or not tcpcopy.alive()
            or now - last_change >= SETTLE_QUIET_S
            or now - started >= SETTLE_MAX_S
        ):
            return on, tg, now - started
        time.sleep(SETTLE_POLL_S)


def ours_drops(summary: dict | None) -> dict[str, int]:
    """tcpcopy-mp's dropped input by reason (--summary-json: drop_<reason>, ring_dropped)."""
    if not summary:
        return {}
    out = {
        k[len("drop_") :]: int(v)
        for k, v in summary.items()
        if k.startswith("drop_") and isinstance(v, int | float) and v
    }
    if summary.get("ring_dropped"):
        out["ring_full"] = int(summary["ring_dropped"])
    if summary.get("capture_kernel_dropped"):  # the kernel's packet ring was full
        out["kernel_ring_full"] = int(summary["capture_kernel_dropped"])
    for key in ("sessions_lost", "sessions refused"):
        if summary.get(key):
            out[key.replace(" ", "_")] = int(summary[key])
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


OURS_SUMMARY_KEYS = (
    "capture_packets",
    "capture_accepted",
    "conns",
    "requests",
    "requests_held",
    "gate_bytes",
    "gate_quiet",
    "gate_max_wait",
    "reconnect",
    "port reuse",
    "unsend",
    "reset",
    "retransmit",
    "worker_restarts",
    "tuples_spilled",
    "tuples_reused",
    "exit_reason",
    "workers",
)


def ours_counters(summary: dict | None) -> dict[str, Any]:
    if not summary:
        return {}
    return {k: summary[k] for k in OURS_SUMMARY_KEYS if k in summary}


# ---------------------------------------------------------------------------------------------
# one run


@dataclasses.dataclass
class Context:
    tb: tbm.Testbed
    workdir: Path
    duration_s: int
    record_s: int
    workers_flag: bool
    cref: cref.CReference | None
    run_index: int = 0
    recordings: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def next_run(self) -> int:
        self.run_index += 1
        return self.run_index


class Intercept:
    """The intercept of one run: intercept-mp (it installs and removes its NFQUEUE rule) or the
    C intercept --traditional build (the benchmark adds and deletes the rule around it)."""

    def __init__(self, ctx: Context, impl: str, run: int):
        self.ctx = ctx
        self.impl = impl
        self.rule_added = False
        tb = ctx.tb
        if impl == OURS:
            self.proc = tb.start_intercept(
                name=f"intercept-mp-b{run:02d}",
                summary=ctx.workdir / f"intercept-b{run:02d}.json",
            )
            return
        assert ctx.cref is not None
        tb.run("target", "iptables", "-w", "-I", *cref.nfqueue_rule(tbm.TARGET_HTTP_PORT))
        self.rule_added = True
        self.log = ctx.workdir / f"c-intercept-b{run:02d}.log"
        self.proc = tb.spawn(
            "target",
            f"c-intercept-b{run:02d}",
            cref.intercept_argv(ctx.cref, tbm.INTERCEPT_PORT, self.log),
        )

        def listening() -> bool:
            if not self.proc.alive():
                raise tbm.TestbedError(
                    f"C intercept exited at start (rc={self.proc.popen.returncode}):\n"
                    f"{self.proc.tail()}\n{_tail(self.log)}"
                )
            return tb._listening("target", tbm.INTERCEPT_PORT)

        try:
            tbm.wait_until(listening, READY_TIMEOUT_S, what="C intercept listening")
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> int | None:
        rc = self.proc.stop(signal.SIGTERM, timeout=STOP_TIMEOUT_S)
        if self.rule_added:
            self.ctx.tb.run(
                "target", "iptables", "-w", "-D", *cref.nfqueue_rule(tbm.TARGET_HTTP_PORT),
                check=False,
            )  # fmt: skip
            self.rule_added = False
        # No rule of either intercept may survive into the next run (queue 0 is shared): one
        # left behind (an intercept-mp that had to be killed) is deleted here, and said.
        tb = self.ctx.tb
        try:
            tbm.wait_until(
                lambda: "NFQUEUE" not in tb.run("target", "iptables-save").stdout,
                5,
                what="the NFQUEUE rule gone",
            )
        except TimeoutError:
            for line in tb.run("target", "iptables-save", "-t", "filter").stdout.splitlines():
                if line.startswith("-A ") and "NFQUEUE" in line:
                    say(f"  deleting a left-over rule: {line}")
                    tb.run("target", "sh", "-c", f"iptables -w -D {line[3:]}", check=False)
        return rc


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def start_live_replicator(
    ctx: Context, rep: Replicator, run: int, pool: str
) -> tuple[tbm.Proc, Path]:
    """The replicator of a live run; returns (process, its --summary-json or its C log)."""
    tb = ctx.tb
    if rep.impl == OURS:
        args = ["-x", TRANSFER, "-s", tbm.TARGET_IP, "-c", pool]
        if ctx.workers_flag:
            args += ["--workers", str(rep.workers)]
        elif rep.workers != 1:
            raise tbm.TestbedError("tcpcopy-mp has no --workers flag yet")
        summary = ctx.workdir / f"tcpcopy-b{run:02d}.json"
        return tb.start_tcpcopy(args, name=f"tcpcopy-b{run:02d}", summary=summary), summary
    assert ctx.cref is not None
    log = ctx.workdir / f"c-tcpcopy-b{run:02d}.log"
    argv = cref.tcpcopy_live_argv(ctx.cref, TRANSFER, tbm.TARGET_IP, pool, log)
    return tb.spawn("online", f"c-tcpcopy-b{run:02d}", argv), log


def base_result(ctx: Context, scenario: Scenario, rep: Replicator, run: int) -> dict[str, Any]:
    return {
        "scenario": scenario.name,
        "description": scenario.describe(),
        "kind": scenario.kind,
        "replicator": rep.label(),
        "impl": rep.impl,
        "workers": rep.workers,
        "status": "failed",
        "run": run,
        "client_pool": f"198.19.{POOL_FIRST + run}.x",
        "offered_rate_per_s": scenario.rate_per_s or None,
        "wrk_connections": scenario.connections,
        "client_addresses": scenario.client_ips,
        "loadavg_1m_before": round(os.getloadavg()[0], 2),
    }


def finish_result(result: dict[str, Any], rep: Replicator, out_file: Path) -> None:
    """Drops by reason and counters from tcpcopy-mp's --summary-json or C tcpcopy's log."""
    if rep.impl == OURS:
        summary = tbm.read_summary(out_file)
        result["drops"] = ours_drops(summary)
        result["tcpcopy_counters"] = ours_counters(summary)
        # intercept-mp's NFQUEUE drops: target responses lost before they were read
        ic = tbm.read_summary(out_file.parent / f"intercept-b{result['run']:02d}.json")
        if ic and ic.get("queue_dropped"):
            result["drops"]["intercept_queue"] = int(ic["queue_dropped"])
    else:
        parsed = cref.parse_log(out_file)
        result["drops"] = dict(sorted(parsed["warnings"].items(), key=lambda kv: -kv[1]))
        result["tcpcopy_counters"] = parsed["stats"]


def per_1k(cpu_s: float | None, n: int) -> float | None:
    return round(1000 * cpu_s / n, 4) if cpu_s is not None and n else None


def wait_probe(tb: tbm.Testbed, proc: tbm.Proc, prefix: str) -> int:
    """Send one-request probes (``prefix<n>``) from the client until one shows up in the
    target's log (capture, channels and replay all up); returns the probes sent.  Like
    Testbed.wait_replicating, but reads only the log's new lines (the benchmark's logs grow
    to millions of lines)."""
    target = LogCounter(tb.nginx["target"].dir / "access.log", f" {prefix}")
    sent = 0

    def replicated() -> bool:
        nonlocal sent
        if not proc.alive():
            raise tbm.TestbedError(
                f"{proc.name} exited (rc={proc.popen.returncode}):\n{proc.tail()}"
            )
        if target.count():
            return True
        tbm.http_get(tb.ns("client"), tbm.ONLINE_CLIENT_SIDE_IP, tbm.ONLINE_HTTP_PORT,
                     f"{prefix}{sent}")  # fmt: skip
        sent += 1
        return False

    tbm.wait_until(replicated, READY_TIMEOUT_S, interval=0.2, what=f"{proc.name} replicating")
    return sent


def run_live(ctx: Context, scenario: Scenario, rep: Replicator) -> dict[str, Any]:
    tb = ctx.tb
    run = ctx.next_run()
    prefix = f"b{run:02d}"
    result = base_result(ctx, scenario, rep, run)
    duration_s = scenario.duration_s or ctx.duration_s
    result["duration_s"] = duration_s
    if rep.impl == OURS and rep.workers != 1 and not ctx.workers_flag:
        result["error"] = "tcpcopy-mp has no --workers flag yet"
        return result
    intercept = proc = None
    out_file = ctx.workdir / "none"
    snat = False
    t_setup = time.monotonic()
    try:
        intercept = Intercept(ctx, rep.impl, run)
        proc, out_file = start_live_replicator(ctx, rep, run, result["client_pool"])
        wait_probe(tb, proc, f"/probe-{prefix}/")
        result["setup_s"] = round(time.monotonic() - t_setup, 2)
        if scenario.client_ips > 1:
            install_snat(tb)
            snat = True
        script = wrk_script(ctx.workdir / f"wrk-{prefix}.lua", scenario, duration_s)
        online = LogCounter(tb.nginx["online"].dir / "access.log", scenario.needle(prefix))
        target = LogCounter(tb.nginx["target"].dir / "access.log", scenario.needle(prefix))
        names = process_names(proc.pid)
        cpu0, icpu0, host0 = tree_cpu(proc.pid), tree_cpu(intercept.pid), host_busy_s()
        t0 = time.monotonic()
        with MemSampler(proc.pid) as mem:
            wrk_proc = subprocess.run(
                wrk_argv(tb, script, scenario, duration_s, prefix),
                capture_output=True, text=True, timeout=duration_s + WRK_GRACE_S,
            )  # fmt: skip
            load_s = time.monotonic() - t0
            cpu_load_end = tree_cpu(proc.pid)
            n_online, n_target, settle_s = settle(online, target, proc)
            cpu1, icpu1, host1 = tree_cpu(proc.pid), tree_cpu(intercept.pid), host_busy_s()
        elapsed = time.monotonic() - t0
        wrk = parse_wrk(wrk_proc.stdout)
        wrk_s = wrk["duration_us"] / 1e6 or load_s
        tc_cpu, ic_cpu = cpu_delta(cpu0, cpu1), cpu_delta(icpu0, icpu1)
        result.update(
            online_requests=n_online,
            target_requests=n_target,
            ratio=round(n_target / n_online, 5) if n_online else None,
            achieved_rate_per_s=round(n_online / wrk_s, 1) if wrk_s else None,
            target_rate_per_s=round(n_target / wrk_s, 1) if wrk_s else None,
            wrk=wrk,
            load_s=round(load_s, 2),
            settle_s=round(settle_s, 2),
            # How long the target needed after the load ended (None: it never caught up).
            target_done_after_load_s=round(settle_s, 2) if n_target >= n_online else None,
            tcpcopy_cpu_s=round(tc_cpu, 3),
            tcpcopy_processes=len(cpu1),
            intercept_cpu_s=round(ic_cpu, 3),
            tcpcopy_cpu_pct_during_load=round(100 * cpu_delta(cpu0, cpu_load_end) / load_s, 1),
            tcpcopy_cpu_by_process=cpu_by_name(cpu0, cpu1, names),
            host_cpu_busy_pct=round(
                100 * (host1 - host0) / (elapsed * (psutil.cpu_count() or 1)), 1
            ),
            peak_rss_mb=round(mem.peak_rss / 2**20, 1),
            peak_pss_mb=round(mem.peak_pss / 2**20, 1),
            peak_pss_mb_by_process=mem.peak_mb_by_process(),
            cpu_s_per_1k=per_1k(tc_cpu, n_target),
            cpu_s_per_1k_with_intercept=per_1k(tc_cpu + ic_cpu, n_target),
        )
        if not proc.alive():
            result["error"] = f"{rep.label()} exited during the load (rc={proc.popen.returncode})"
        elif not intercept.proc.alive():
            result["error"] = f"the intercept exited during the load:\n{intercept.proc.tail(5)}"
        else:
            result["status"] = "ok"
    except Exception as exc:
        result["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if proc is not None:
            result["log_tail"] = proc.tail(12)
    finally:
        t_stop = time.monotonic()
        if snat:
            remove_snat(tb)
        if proc is not None:
            result["tcpcopy_exit"] = proc.stop(signal.SIGTERM, timeout=STOP_TIMEOUT_S)
        if intercept is not None:
            result["intercept_exit"] = intercept.stop()
        result["stop_s"] = round(time.monotonic() - t_stop, 2)
    finish_result(result, rep, out_file)
    return result


# ---------------------------------------------------------------------------------------------
# offline: the recording, then the replays


def pcap_requests(path: Path, port: int) -> dict[str, Any]:
    """Client requests (TCP segments to ``port`` whose payload starts with an HTTP method) and
    the time span of an Ethernet/SLL pcap (wrk writes each request in one segment)."""
    data = path.read_bytes()
    if len(data) < 24:
        return {"packets": 0, "requests": 0, "duration_s": 0.0}
    endian = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    nano = data[:4] in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    l2 = {1: 14, 113: 16}.get(struct.unpack_from(endian + "I", data, 20)[0], 14)
    rec = struct.Struct(endian + "IIII")
    off, packets, requests, first, last = 24, 0, 0, None, 0.0
    while off + rec.size <= len(data):
        sec, frac, caplen, _ = rec.unpack_from(data, off)
        body = off + rec.size
        if body + caplen > len(data):
            break
        ts = sec + frac / (1e9 if nano else 1e6)
        first = ts if first is None else first
        last = ts
        packets += 1
        ip = data[body + l2 : body + caplen]
        if len(ip) >= 40 and ip[0] >> 4 == 4 and ip[9] == 6:
            ihl = (ip[0] & 0x0F) * 4
            tcp = ip[ihl:]
            if len(tcp) >= 20 and int.from_bytes(tcp[2:4], "big") == port:
                payload = tcp[(tcp[12] >> 4) * 4 :]
                requests += sum(payload.count(m) for m in (b"GET /", b"POST /", b"HEAD /"))
        off = body + caplen
    return {"packets": packets, "requests": requests, "duration_s": round(last - (first or 0), 3)}


def record_pcap(ctx: Context, scenario: Scenario) -> dict[str, Any]:
    """tcpdump on the online host's client side during a wrk run, no replicator running."""
    tb = ctx.tb
    tag = scenario.name.removeprefix("offline-")
    path = ctx.workdir / f"rec-{tag}.pcap"
    prefix = f"rec-{tag}"
    argv = [tbm.TCPDUMP_BIN, "-i", tbm.ONLINE_CLIENT_IFACE, "-n", "-U", "-s", "0",
            "-B", str(TCPDUMP_BUFFER_KIB), "-Z", "root", "-w", str(path),
            f"tcp port {tbm.ONLINE_HTTP_PORT}"]  # fmt: skip
    dump = tb.spawn("online", f"tcpdump-{tag}", argv)
    snat = False
    try:
        tbm.wait_until(
            lambda: "listening on" in dump.output() or not dump.alive(), 15, what="tcpdump"
        )
        if not dump.alive():
            raise tbm.TestbedError(f"tcpdump exited: {dump.tail(3)}")
        if scenario.client_ips > 1:
            install_snat(tb)
            snat = True
        live = dataclasses.replace(scenario, kind="short" if scenario.close else "keepalive")
        script = wrk_script(ctx.workdir / f"wrk-{prefix}.lua", live, ctx.record_s)
        online = LogCounter(tb.nginx["online"].dir / "access.log", f" /{prefix}/")
        proc = subprocess.run(
            wrk_argv(tb, script, live, ctx.record_s, prefix),
            capture_output=True, text=True, timeout=ctx.record_s + WRK_GRACE_S,
        )  # fmt: skip
        wrk = parse_wrk(proc.stdout)
        n_online = online.count()
    finally:
        if snat:
            remove_snat(tb)
        # tcpdump ends at SIGTERM without writing what its buffer still holds: stop it once
        # the file stopped growing.
        sizes: list[int] = []

        def written() -> bool:
            sizes.append(path.stat().st_size if path.exists() else 0)
            return len(sizes) > 3 and sizes[-1] == sizes[-4]

        try:
            tbm.wait_until(written, 10, interval=0.2, what="tcpdump writing the last packets")
        except TimeoutError:
            pass
        dump.stop(signal.SIGTERM, timeout=10)
    m = re.search(r"(\d+) packets dropped by kernel", dump.output())
    info = pcap_requests(path, tbm.ONLINE_HTTP_PORT)
    info.update(
        path=str(path),
        prefix=f"/{prefix}/",
        online_requests=n_online,
        wrk=wrk,
        tcpdump_kernel_drops=int(m.group(1)) if m else None,
        bytes=path.stat().st_size,
    )
    return info


def reap(proc: tbm.Proc, timeout: float) -> tuple[int | None, float | None]:
    """Wait for ``proc`` with wait4: (exit code, user+system CPU s of it and every child it
    reaped); (None, None) if it is still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            return proc.popen.returncode, None
        if pid == proc.pid:
            proc.popen.returncode = os.waitstatus_to_exitcode(status)
            return proc.popen.returncode, ru.ru_utime + ru.ru_stime
        if time.monotonic() >= deadline:
            return None, None
        time.sleep(0.05)


def start_offline_replicator(
    ctx: Context, rep: Replicator, run: int, pool: str, pcap: Path
) -> tuple[tbm.Proc, Path]:
    tb = ctx.tb
    if rep.impl == OURS:
        args = ["--pcap", str(pcap), "-a", str(OFFLINE_ACCEL), "-x", TRANSFER,
                "-s", tbm.TARGET_IP, "-c", pool]  # fmt: skip
        if ctx.workers_flag:
            args += ["--workers", str(rep.workers)]
        summary = ctx.workdir / f"tcpcopy-b{run:02d}.json"
        return tb.start_tcpcopy(args, name=f"tcpcopy-b{run:02d}", summary=summary), summary
    assert ctx.cref is not None
    log = ctx.workdir / f"c-tcpcopy-b{run:02d}.log"
    argv = cref.tcpcopy_offline_argv(
        ctx.cref, pcap, OFFLINE_ACCEL, TRANSFER, tbm.TARGET_IP, pool, log
    )
    return tb.spawn("online", f"c-tcpcopy-b{run:02d}", argv), log


def run_offline(ctx: Context, scenario: Scenario, rep: Replicator) -> dict[str, Any]:
    tb = ctx.tb
    run = ctx.next_run()
    result = base_result(ctx, scenario, rep, run)
    rec = ctx.recordings.get(scenario.name)
    if rec is None or not rec.get("requests"):
        result["error"] = f"no recording: {rec.get('error') if rec else 'not made'}"
        return result
    result.update(
        accel=OFFLINE_ACCEL,
        pcap_requests=rec["requests"],
        offered_rate_per_s=round(OFFLINE_ACCEL * rec["requests"] / rec["duration_s"], 1)
        if rec["duration_s"]
        else None,
    )
    intercept = proc = None
    out_file = ctx.workdir / "none"
    exited = False
    rc = cpu_total = None
    try:
        intercept = Intercept(ctx, rep.impl, run)
        target = LogCounter(tb.nginx["target"].dir / "access.log", f" {rec['prefix']}")
        icpu0, host0 = tree_cpu(intercept.pid), host_busy_s()
        t0 = time.monotonic()
        proc, out_file = start_offline_replicator(
            ctx, rep, run, result["client_pool"], Path(rec["path"])
        )
        expected = rec["requests"]
        cpu_at_first: dict[int, float] | None = None
        cpu_at_end: dict[int, float] | None = None
        first_at = last_change = None
        last = 0
        with MemSampler(proc.pid) as mem:
            while True:
                now = time.monotonic()
                if not exited:
                    rc, cpu_total = reap(proc, 0)
                    exited = rc is not None
                n = target.count()
                if n and cpu_at_first is None:
                    first_at = now
                    cpu_at_first = tree_cpu(proc.pid) if not exited else {}
                if n != last:
                    last, last_change = n, now
                if n >= expected:
                    break
                if first_at is None:
                    if exited or now - t0 >= READY_TIMEOUT_S:
                        raise tbm.TestbedError(
                            f"no replayed request reached the target (exited={exited})"
                        )
                elif now - (last_change or now) >= (1.0 if exited else SETTLE_QUIET_S):
                    break
                if now - t0 >= OFFLINE_MAX_S:
                    result["note"] = f"stopped after {OFFLINE_MAX_S:.0f} s"
                    break
                time.sleep(0.1)
            wall_s = time.monotonic() - t0
            icpu1, host1 = tree_cpu(intercept.pid), host_busy_s()
            # The replay's window ends here, as a live run's does (its shutdown is not in it).
            if not exited and cpu_at_first is not None:
                cpu_at_end = tree_cpu(proc.pid)
            self_exit = exited
            if not exited:
                proc.send_signal(signal.SIGTERM)
                rc, cpu_total = reap(proc, STOP_TIMEOUT_S)
                if rc is None:
                    proc.popen.kill()
                    rc, cpu_total = reap(proc, 10)
        n_target = target.count()
        span = target.span_s()
        if cpu_at_end is not None and cpu_at_first is not None:
            cpu: float | None = cpu_delta(cpu_at_first, cpu_at_end)
        else:  # it ended by itself first: its whole life's rusage, less its start-up
            cpu = None if cpu_total is None else cpu_total - sum((cpu_at_first or {}).values())
        exit_cpu = (
            None
            if cpu_total is None or cpu_at_end is None
            else max(0.0, cpu_total - sum(cpu_at_end.values()))
        )
        ic_cpu = cpu_delta(icpu0, icpu1)
        result.update(
            online_requests=expected,
            target_requests=n_target,
            ratio=round(n_target / expected, 5),
            target_rate_per_s=round(n_target / span, 1) if span else None,
            replay_span_s=round(span, 3) if span else None,
            wall_s=round(wall_s, 2),
            exited_by_itself=self_exit,
            startup_s=round(first_at - t0, 2) if first_at is not None else None,
            tcpcopy_cpu_s=None if cpu is None else round(cpu, 3),
            tcpcopy_cpu_total_s=None if cpu_total is None else round(cpu_total, 3),
            tcpcopy_cpu_exit_s=None if exit_cpu is None else round(exit_cpu, 3),
            intercept_cpu_s=round(ic_cpu, 3),
            host_cpu_busy_pct=round(
                100 * (host1 - host0) / (wall_s * (psutil.cpu_count() or 1)), 1
            ),
            peak_rss_mb=round(mem.peak_rss / 2**20, 1),
            peak_pss_mb=round(mem.peak_pss / 2**20, 1),
            peak_pss_mb_by_process=mem.peak_mb_by_process(),
            cpu_s_per_1k=per_1k(cpu, n_target),
            cpu_s_per_1k_with_intercept=per_1k(None if cpu is None else cpu + ic_cpu, n_target),
            tcpcopy_exit=rc,
        )
        result["status"] = "ok"
    except Exception as exc:
        result["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if proc is not None:
            result["log_tail"] = proc.tail(12)
    finally:
        if proc is not None and proc.popen.returncode is None:
            proc.stop(signal.SIGTERM, timeout=STOP_TIMEOUT_S)
        if intercept is not None:
            result["intercept_exit"] = intercept.stop()
    finish_result(result, rep, out_file)
    return result


# ---------------------------------------------------------------------------------------------
# the profile run


FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def summarize_collapsed(path: Path, names: dict[int, str]) -> dict[str, Any]:
    """Self and inclusive sample shares from py-spy's raw (collapsed) output."""
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    per_proc: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        # --subprocesses prefixes the chain of processes (parent first): the last is the one
        # sampled.
        proc_label = "?"
        while frames and frames[0].startswith("process "):
            m = re.match(r"process (\d+)", frames[0])
            pid = int(m.group(1)) if m else 0
            proc_label = names.get(pid, f"pid {pid}")
            frames = frames[1:]
        funcs = []
        for frame in frames:
            m = FRAME_RE.match(frame.strip())
            if not m:
                continue  # thread labels and the like
            file = m.group("file")
            short = "/".join(Path(file).parts[-2:])
            funcs.append(f"{m.group('func')} ({short})")
        if not funcs:
            continue
        total += n
        per_proc[proc_label] += n
        self_n[f"{proc_label}: {funcs[-1]}"] += n
        for func in set(funcs):
            incl_n[f"{proc_label}: {func}"] += n

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(TOP_FRAMES)]

    return {
        "samples": total,
        "by_process_pct": share(per_proc),
        "top_self_pct": share(self_n),
        "top_inclusive_pct": share(incl_n),
    }


def run_profile(ctx: Context, scenario: Scenario, workers: int, out: Path) -> dict[str, Any]:
    """tcpcopy-mp under ``scenario`` with py-spy sampling its whole tree (not in the table:
    py-spy's pauses slow it down)."""
    tb = ctx.tb
    run = ctx.next_run()
    prefix = f"b{run:02d}"
    intercept = tcpcopy = wrk_proc = None
    snat = False
    try:
        intercept = Intercept(ctx, OURS, run)
        pool = f"198.19.{POOL_FIRST + run}.x"
        tcpcopy, _ = start_live_replicator(ctx, Replicator(OURS, workers), run, pool)
        wait_probe(tb, tcpcopy, f"/probe-{prefix}/")
        if scenario.client_ips > 1:
            install_snat(tb)
            snat = True
        names = process_names(tcpcopy.pid)
        script = wrk_script(ctx.workdir / f"wrk-{prefix}.lua", scenario, PROFILE_DURATION_S + 2)
        online = LogCounter(tb.nginx["online"].dir / "access.log", scenario.needle(prefix))
        wrk_proc = subprocess.Popen(
            wrk_argv(tb, script, scenario, PROFILE_DURATION_S + 2, prefix),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        tbm.wait_until(lambda: online.count() > 0, 10, what="load reaching the online server")
        spy = subprocess.run(
            [str(PYSPY_BIN), "record", "--pid", str(tcpcopy.pid), "--subprocesses", "--native",
             "-d", str(PROFILE_DURATION_S), "--format", "raw", "-o", str(out)],
            capture_output=True, text=True, timeout=PROFILE_DURATION_S + 60,
        )  # fmt: skip
        if spy.returncode != 0 or not out.exists():
            raise tbm.TestbedError(f"py-spy failed: {(spy.stderr or spy.stdout).strip()[-300:]}")
        summary = summarize_collapsed(out, names)
        summary.update(
            scenario=scenario.name, workers=workers, client_pool=pool, file=out.name, status="ok"
        )
        return summary
    except Exception as exc:
        return {"status": "failed", "error": str(exc).splitlines()[0] if str(exc) else repr(exc)}
    finally:
        if wrk_proc is not None and wrk_proc.poll() is None:
            wrk_proc.terminate()
            try:
                wrk_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                wrk_proc.kill()
                wrk_proc.wait(timeout=10)
        if snat:
            remove_snat(tb)
        if tcpcopy is not None:
            tcpcopy.stop(signal.SIGTERM, timeout=STOP_TIMEOUT_S)
        if intercept is not None:
            intercept.stop()


# ---------------------------------------------------------------------------------------------
# reporting


TARGETS = {
    "ka-c10": (0.999, 1.0),
    "ka-c50": (0.999, 1.0),
    "ka-c200": (0.999, 1.0),
    "short-c10-1ip": (0.99, 1.0),
    "short-c10-64ip": (0.99, 1.0),
    "offline-ka": (0.999, 1.0),
    "offline-short": (0.999, 1.0),
}
"""The compiled data plane's targets by scenario (issue 19): (replicated ratio, target req/s
vs C); every one also wants CPU per 1,000 replicated requests at most CPU_VS_C_MAX of C's and
a peak PSS at most PSS_VS_C_MAX x C's or PSS_FLOOR_MB, whichever is larger."""
CPU_VS_C_MAX = 1.0
PSS_VS_C_MAX = 2.0
PSS_FLOOR_MB = 64.0


def _fmt(value: Any, spec: str = "", suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{suffix}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def compare(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per scenario: the C run, tcpcopy-mp's best --workers (highest target req/s) and the
    ratios of that best run to C; also marks each tcpcopy-mp run with its ratios to C."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["scenario"] for r in runs):
        rows = [r for r in runs if r["scenario"] == name and r["status"] == "ok"]
        c_run = next((r for r in rows if r["impl"] == C), None)
        ours = [r for r in rows if r["impl"] == OURS]
        for r in ours:
            if c_run is not None:
                r["rate_vs_c"] = _ratio(r.get("target_rate_per_s"), c_run.get("target_rate_per_s"))
                r["cpu_vs_c"] = _ratio(r.get("cpu_s_per_1k"), c_run.get("cpu_s_per_1k"))
                r["cpu_with_intercept_vs_c"] = _ratio(
                    r.get("cpu_s_per_1k_with_intercept"), c_run.get("cpu_s_per_1k_with_intercept")
                )
        best = max(ours, key=lambda r: r.get("target_rate_per_s") or 0, default=None)
        entry: dict[str, Any] = {"best_workers": best["workers"] if best else None}
        if best is not None:
            best["best"] = True
            entry.update(
                ratio=best.get("ratio"),
                rate_vs_c=best.get("rate_vs_c"),
                cpu_vs_c=best.get("cpu_vs_c"),
            )
            want = TARGETS.get(name)
            if want is not None:
                min_ratio, min_vs_c = want
                checks = {"replicated": (best.get("ratio") or 0) >= min_ratio}
                if min_vs_c is not None and c_run is not None:
                    checks["rate_vs_c"] = (
                        best.get("rate_vs_c") is not None and best["rate_vs_c"] >= min_vs_c
                    )
                if best.get("cpu_vs_c") is not None:
                    checks["cpu_vs_c"] = best["cpu_vs_c"] <= CPU_VS_C_MAX
                pss_bound = None
                if c_run is not None and c_run.get("peak_pss_mb") is not None:
                    pss_bound = max(PSS_VS_C_MAX * c_run["peak_pss_mb"], PSS_FLOOR_MB)
                    if best.get("peak_pss_mb") is not None:
                        checks["pss"] = best["peak_pss_mb"] <= pss_bound
                entry["targets"] = {
                    "min_ratio": min_ratio,
                    "min_rate_vs_c": min_vs_c,
                    "max_pss_mb": None if pss_bound is None else round(pss_bound, 1),
                }
                entry["met"] = checks
        if c_run is not None:
            entry["c_ratio"] = c_run.get("ratio")
            entry["c_target_rate_per_s"] = c_run.get("target_rate_per_s")
        out[name] = entry
    return out


def _drops_text(drops: dict[str, int] | None, limit: int = 3) -> str:
    if not drops:
        return "none"
    items = list(drops.items())
    text = ", ".join(f"{k} {v:,}" for k, v in items[:limit])
    if len(items) > limit:
        text += f", +{len(items) - limit} more"
    return text.replace("|", "/")


def _done_text(r: dict[str, Any]) -> str:
    """The "target done after load" cell: seconds, or that it had not caught up."""
    if "target_done_after_load_s" not in r:
        return "-"  # offline, or a run from before the column
    done = r["target_done_after_load_s"]
    return f"not in {r.get('settle_s', 0):.0f} s" if done is None else f"{done:.1f} s"


def markdown(report: dict[str, Any]) -> str:
    host = report["host"]
    peer = "C TCPCopy 1.0 beside tcpcopy-mp" if report["peer"] == C else "tcpcopy-mp only"
    lines = [
        f"Measured {report['started'][:16].replace('T', ' ')} UTC on {host['cpus']} CPUs "
        f"(kernel {host['kernel']}, Python {host['python']}), {peer}. Mode: traditional for "
        "both (intercept-mp, and C intercept 1.0 built `--traditional`, on NFQUEUE queue 0 on "
        "the target; C tcpcopy 1.0 live build: raw-socket capture, raw IP send; its offline "
        f"build `-i FILE -a {OFFLINE_ACCEL}` for the pcap rows). {report['duration_s']} s of "
        "wrk load per live run (a row whose load names its seconds: that long); the offline "
        "rows replay a pcap of "
        f"{report['record_s']} s of the online side at -a {OFFLINE_ACCEL}. Load generator, "
        "both nginx, the replicator and the intercept share these CPUs.",
        "",
        "| scenario | load | replicator | online req | target req | replicated | target done "
        "after load | target req/s | vs C | CPU s / 1k repl. (+intercept) | CPU vs C "
        "| peak RSS (PSS) MB | drops by reason |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    scen = {s.name: s for s in (*SCENARIOS, *EXTRA_SCENARIOS)}
    for r in report["runs"]:
        s = scen.get(r["scenario"])
        load = s.load() if s else "?"
        label = r["replicator"] + (" \\*" if r.get("best") else "")
        if r["status"] != "ok":
            lines.append(
                f"| {r['scenario']} | {load} | {label} | failed: "
                f"{str(r.get('error', '?'))[:70].replace('|', '/')} |||||||||"
            )
            continue
        ratio = r.get("ratio")
        lines.append(
            f"| {r['scenario']} | {load} | {label} "
            f"| {r['online_requests']:,} | {r['target_requests']:,} "
            f"| {_fmt(None if ratio is None else 100 * ratio, '.2f', ' %')} "
            f"| {_done_text(r)} "
            f"| {_fmt(r.get('target_rate_per_s'), ',.0f')} "
            f"| {_fmt(r.get('rate_vs_c'), '.2f', 'x')} "
            f"| {_fmt(r.get('cpu_s_per_1k'), '.3f')} "
            f"({_fmt(r.get('cpu_s_per_1k_with_intercept'), '.3f')}) "
            f"| {_fmt(r.get('cpu_vs_c'), '.2f', 'x')} "
            f"| {r['peak_rss_mb']:.0f} ({r['peak_pss_mb']:.0f}) "
            f"| {_drops_text(r.get('drops'))} |"
        )
    lines += [
        "",
        "\\* tcpcopy-mp's best `--workers` for the scenario (highest target req/s). "
        '"target done after load": seconds from the end of the wrk load until the target\'s '
        "count reached the online one (polled every 0.25 s). "
        '"target req/s": replicated requests per second of wrk\'s run time (live) or over the '
        "span of the target's access-log timestamps (offline). \"vs C\": that rate over C's; "
        "\"CPU vs C\": the replicator's CPU per 1,000 replicated requests over C's. RSS sums "
        "every process of the replicator (shared pages once per process), PSS splits shared "
        "pages. Drops: tcpcopy-mp's `--summary-json` (drop reasons, `ring_full`, "
        "`kernel_ring_full`: the capture's packet ring) and "
        "intercept-mp's (`intercept_queue`: responses the target's NFQUEUE dropped); C: its log's "
        "warning lines by message.",
    ]
    comp = report.get("comparison") or {}
    rows = [(n, e) for n, e in comp.items() if e.get("met")]
    if rows:
        lines += ["", "| target (issue 19) | best workers | checks |", "|---|---:|---|"]
        for name, e in rows:
            t = e["targets"]
            want = f"≥ {100 * t['min_ratio']:g} %"
            if t["min_rate_vs_c"]:
                want += f", ≥ {t['min_rate_vs_c']:g}x C's req/s"
            want += f", CPU ≤ {CPU_VS_C_MAX:g}x C"
            if t.get("max_pss_mb") is not None:
                want += f", PSS ≤ {t['max_pss_mb']:.0f} MB"
            checks = ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in e["met"].items())
            lines.append(f"| {name}: {want} | {e['best_workers']} | {checks} |")
    recs = report.get("recordings") or {}
    if recs:
        lines += [""]
        for name, rec in recs.items():
            if rec.get("requests"):
                lines.append(
                    f"- {name}: pcap of {rec['requests']:,} requests ({rec['packets']:,} packets, "
                    f"{rec['duration_s']:.1f} s, {rec['online_requests']:,} in the online log, "
                    f"tcpdump kernel drops {_fmt(rec.get('tcpdump_kernel_drops'))})"
                )
            else:
                lines.append(f"- {name}: recording failed: {rec.get('error')}")
    for prof in report.get("profiles") or []:
        if prof.get("status") == "ok":
            lines += [
                "",
                f"py-spy profile of tcpcopy-mp (--workers {prof['workers']}) under "
                f"{prof['scenario']}, {prof['samples']} samples; by process: "
                + ", ".join(f"{k} {v} %" for k, v in prof["by_process_pct"]),
                "",
                "| top self frames | % |",
                "|---|---:|",
            ]
            lines += [f"| `{k}` | {v} |" for k, v in prof["top_self_pct"][:10]]
        else:
            lines += ["", f"py-spy profile failed: {prof.get('error')}"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> str | None:
    """Two bar charts (replicated %, target req/s) by scenario and replicator; returns why not
    if matplotlib is missing (pip install -e '.[bench]')."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install -e '.[bench]'): no plot"
    runs = report["runs"]
    scenarios = list(dict.fromkeys(r["scenario"] for r in runs))
    labels = list(dict.fromkeys(r["replicator"] for r in runs))
    fig, axes = plt.subplots(2, 1, figsize=(12, 7.5), sharex=True)
    width = 0.8 / max(1, len(labels))
    for l_i, label in enumerate(labels):
        xs, ratios, rates, failed_x = [], [], [], []
        for s_i, name in enumerate(scenarios):
            match = [r for r in runs if r["scenario"] == name and r["replicator"] == label]
            x = s_i + (l_i - (len(labels) - 1) / 2) * width
            if not match:
                continue
            if match[0]["status"] != "ok":
                failed_x.append(x)
                continue
            xs.append(x)
            ratios.append(100 * (match[0].get("ratio") or 0))
            rates.append(match[0].get("target_rate_per_s") or 0)
        axes[0].bar(xs, ratios, width, label=label)
        axes[1].bar(xs, rates, width, label=label)
        for x in failed_x:
            for ax in axes:
                ax.text(x, 0, "failed", rotation=90, ha="center", va="bottom", fontsize=8)
    axes[0].set_ylabel("replicated / online requests (%)")
    axes[0].set_ylim(0, 105)
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=len(labels), fontsize=9)
    axes[0].set_title(
        f"tcpcopy-mp vs C TCPCopy 1.0, traditional mode, {report['host']['cpus']} CPUs, "
        f"{report['duration_s']} s per live run ({report['started'][:10]})"
    )
    axes[1].set_ylabel("target (replicated) req/s")
    axes[1].set_xticks(range(len(scenarios)))
    axes[1].set_xticklabels(scenarios, rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_results(report: dict[str, Any], out_dir: Path, stamp: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    (out_dir / f"{stamp}.md").write_text(md)
    problem = plot(report, out_dir / f"{stamp}.png")
    if problem:
        say(problem)
    for suffix in (".json", ".md", ".png"):
        src = out_dir / f"{stamp}{suffix}"
        if src.exists():
            shutil.copyfile(src, out_dir / f"latest{suffix}")
    print()
    print(md)
    return json_path


# ---------------------------------------------------------------------------------------------
# main


def has_workers_flag() -> bool:
    proc = subprocess.run(
        [str(tbm.TCPCOPY_BIN), "--help"], capture_output=True, text=True, timeout=30
    )
    return "--workers" in proc.stdout


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_live.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_DURATION_S} s per run, no profile")
    p.add_argument("--duration", type=int, help="seconds of load per live run")
    p.add_argument("--workers", default="1,2", help="tcpcopy-mp worker counts (default 1,2)")
    p.add_argument(
        "--peer",
        choices=(C, "none"),
        default=C,
        help="c (default): also run C TCPCopy 1.0 on every scenario; none: tcpcopy-mp only",
    )
    p.add_argument(
        "--c-build-dir",
        type=Path,
        default=cref.DEFAULT_CACHE,
        help=f"where the C reference is built once (default {cref.DEFAULT_CACHE})",
    )
    all_names = [s.name for s in (*SCENARIOS, *EXTRA_SCENARIOS)]
    p.add_argument(
        "--scenarios",
        default=",".join(s.name for s in SCENARIOS),
        help="comma-separated subset of: " + ", ".join(all_names),
    )
    prof = p.add_mutually_exclusive_group()
    prof.add_argument("--profile", dest="profile", action="store_true", default=None)
    prof.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, pcaps)")
    args = p.parse_args(argv)
    known = {s.name: s for s in (*SCENARIOS, *EXTRA_SCENARIOS)}
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        p.error(f"--scenarios: unknown scenario {bad[0] if bad else '(none given)'!r}")
    args.scenario_list = [known[n] for n in names]
    try:
        args.worker_list = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        p.error(f"--workers: not a comma-separated list of integers: {args.workers!r}")
    if not args.worker_list or any(w < 1 for w in args.worker_list):
        p.error("--workers: give worker counts of at least 1")
    if args.duration is None:
        args.duration = QUICK_DURATION_S if args.quick else FULL_DURATION_S
    if args.duration < 1:
        p.error("--duration must be at least 1")
    args.record_s = QUICK_RECORD_DURATION_S if args.quick else RECORD_DURATION_S
    if args.profile is None:
        args.profile = not args.quick
    return args


def replicators(args: argparse.Namespace) -> list[Replicator]:
    reps = [Replicator(OURS, w) for w in args.worker_list]
    if args.peer == C:
        reps.append(Replicator(C))
    return reps


def run(args: argparse.Namespace, workdir: Path) -> int:
    started = datetime.datetime.now(datetime.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    workers_flag = has_workers_flag()
    if not workers_flag:
        say("tcpcopy-mp --help shows no --workers: runs with more than 1 worker will fail")
    c_ref = None
    if args.peer == C:
        say(f"building the C reference (once) in {args.c_build_dir} ...")
        c_ref = cref.build(args.c_build_dir)
    tb = tbm.Testbed(workdir / "testbed", with_redis=False, with_assistant=False)
    runs: list[dict[str, Any]] = []
    try:
        say("building the namespace testbed ...")
        tb.start(tbm.TRADITIONAL)
        add_client_addresses(tb)
        ctx = Context(tb, workdir, args.duration, args.record_s, workers_flag, c_ref)
        for scenario in args.scenario_list:
            if scenario.kind == "offline":
                say(f"recording {scenario.name}: {scenario.describe()} ...")
                try:
                    rec = record_pcap(ctx, scenario)
                except Exception as exc:
                    rec = {"error": str(exc).splitlines()[0] if str(exc) else repr(exc)}
                ctx.recordings[scenario.name] = rec
                say(
                    f"  {rec.get('requests', 0)} requests, {rec.get('packets', 0)} packets, "
                    f"tcpdump kernel drops {rec.get('tcpdump_kernel_drops')}"
                    if "error" not in rec
                    else f"  failed: {rec['error']}"
                )
            for rep in replicators(args):
                say(f"{scenario.name} ({scenario.describe()}), {rep.label()} ...")
                one = run_offline if scenario.kind == "offline" else run_live
                r = one(ctx, scenario, rep)
                runs.append(r)
                if r["status"] == "ok":
                    say(
                        f"  online {r['online_requests']} target {r['target_requests']} "
                        f"({100 * (r['ratio'] or 0):.2f} %), {r.get('target_rate_per_s')} req/s "
                        f"at the target; CPU {r['tcpcopy_cpu_s']} s (+ intercept "
                        f"{r['intercept_cpu_s']} s); drops {_drops_text(r.get('drops'))}"
                    )
                else:
                    say(f"  failed: {r.get('error')}")
        profiles = []
        if args.profile:
            for name in PROFILE_SCENARIOS:
                scenario = next(s for s in SCENARIOS if s.name == name)
                say(f"profiling tcpcopy-mp --workers 1 under {scenario.name} with py-spy ...")
                args.out.mkdir(parents=True, exist_ok=True)
                profile = run_profile(
                    ctx, scenario, 1, args.out / f"profile-{stamp}-{scenario.name}.txt"
                )
                if profile.get("status") != "ok":
                    say(f"  profile failed: {profile.get('error')}")
                profiles.append(profile)
        recordings = {
            k: {kk: vv for kk, vv in v.items() if kk != "wrk"} for k, v in ctx.recordings.items()
        }
        report = {
            "started": started.isoformat(timespec="seconds"),
            "quick": args.quick,
            "duration_s": args.duration,
            "record_s": args.record_s,
            "offline_accel": OFFLINE_ACCEL,
            "mode": tbm.TRADITIONAL,
            "peer": args.peer,
            "c_reference": None
            if c_ref is None
            else {k: str(v) for k, v in dataclasses.asdict(c_ref).items()},
            "host": {
                "cpus": psutil.cpu_count(),
                "kernel": platform.release(),
                "python": platform.python_version(),
                "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            },
            "tcpcopy_has_workers_flag": workers_flag,
            "client_leak_packets": tb.client_leak_packets(),
            "recordings": recordings,
            "runs": runs,
            "comparison": compare(runs),
            "profiles": profiles,
            "elapsed_s": round((datetime.datetime.now(datetime.UTC) - started).total_seconds(), 1),
        }
    finally:
        say("tearing down the testbed ...")
        tb.close()
    path = write_results(report, args.out, stamp)
    say(f"results: {path} (+ latest.json, latest.md, latest.png); took {report['elapsed_s']} s")
    if report["client_leak_packets"]:
        say(f"WARNING: {report['client_leak_packets']} target packets reached the client")
    return 0 if any(r["status"] == "ok" for r in runs) else 1


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problems = tbm.preflight_problems()
    for binary in (tbm.TCPCOPY_BIN, tbm.INTERCEPT_BIN, Path(WRK_BIN)):
        if not Path(binary).exists():
            problems.append(f"{binary} missing (run: sudo bash tests/setup.sh)")
    if any(s.kind == "offline" for s in args.scenario_list) and not Path(tbm.TCPDUMP_BIN).exists():
        problems.append(f"{tbm.TCPDUMP_BIN} missing (the offline scenarios record with it)")
    if args.profile and not PYSPY_BIN.exists():
        problems.append(f"{PYSPY_BIN} missing (pip install -e '.[bench]', or --no-profile)")
    if problems:
        say("cannot run: " + "; ".join(problems))
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="tcpcopy-mp-bench-"))
    os.chmod(workdir, 0o755)
    try:
        return run(args, workdir)
    except KeyboardInterrupt:
        say("interrupted; everything was torn down")
        return 130
    except cref.CBuildError as exc:
        say(f"error: {exc} (or --peer none)")
        return 1
    except (tbm.TestbedError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
        say(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        return 1
    finally:
        if args.keep:
            say(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
