"""Live benchmark: replication ratio and CPU cost of tcpcopy-mp under offered load, by scenario.

    sudo bash bench/run.sh [--quick]          (set-up, then this script)
    sudo .venv/bin/python bench/bench_live.py [--quick] [--workers 1,2] [--scenarios a,b]

Theory of operation
-------------------
One namespace testbed (tests/netns/testbed.py: client → online nginx :80, target nginx :8080,
traditional mode: intercept-mp with NFQUEUE on the target) is built once.  intercept-mp runs for
the whole benchmark; tcpcopy-mp is started afresh for every (scenario, --workers) run, each run
with its own fake-client pool 198.19.<10+run>.x, so no replayed 4-tuple of one run can meet the
target's TIME_WAIT of an earlier one (design §9), and with its own URL prefix /b<run>/, so the
servers' access logs can be counted per run.

A run: start tcpcopy-mp, wait until a probe request is replicated (capture, channels and replay
all up), sample the CPU times of tcpcopy-mp's process tree and of intercept-mp, drive the load
from the client namespace with wrk (a Lua script adds pacing, a request cap, `Connection: close`
and a JSON summary), wait until the target's count reaches the online count or stops growing,
sample the CPU times again, stop tcpcopy-mp (SIGTERM: it writes --summary-json).  Peak RSS is
the sum of RSS over tcpcopy-mp's tree, sampled every RSS_SAMPLE_INTERVAL_S by a thread.

Load shapes:
- keep-alive: wrk -t 2 -c N, as fast as it goes (N = 10, 50, 200);
- short connections (one request each, `Connection: close`) paced at 5 k and 10 k conn/s by
  the Lua ``delay()`` hook (a per-thread schedule of send slots, CLOCK_MONOTONIC via LuaJIT's
  ffi), from the client's one address, or from 64 addresses 198.18.1.100-163.  wrk cannot bind
  a source address, so for the 64-address runs the client namespace source-NATs new
  connections round-robin over the 64 addresses (iptables ``statistic --mode nth``, one rule
  per address with every = 64 - i: rule i takes 1/(64-i) of what rules 0..i-1 left, i.e.
  1/64 of the total).  Conntrack's TIME_WAIT timeout there is cut to CONNTRACK_TIME_WAIT_S so
  10 k conn/s do not fill its table.

The real achieved rate is reported next to the offered one: on a 2-CPU machine the load
generator, both nginx, tcpcopy-mp and intercept-mp share the CPUs, so the generator falls short
of the offered rate when the replicator is busy (host CPU busy % is reported too).

Output: bench/results/<timestamp>.json/.md/.png and copies named latest.*; the markdown table is
printed for the README's Performance section.  Optionally (default on in a full run) a py-spy
profile of tcpcopy-mp under the 10 k conn/s one-address load: raw collapsed stacks in
bench/results/profile-<timestamp>.txt and the top frames in the JSON and markdown.

Every load is bounded in time (wrk -d) and count (the Lua cap), all traffic stays in the
namespaces (198.18.0.0/15; fake clients 198.19.0.0/16), and everything is torn down at the
end, also on Ctrl-C (exit 130) or an error.
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

from tests.netns import testbed as tbm  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
WRK_BIN = shutil.which("wrk") or "/usr/bin/wrk"
PYSPY_BIN = tbm.VENV_BIN / "py-spy"

TRANSFER = f"{tbm.ONLINE_HTTP_PORT}-{tbm.TARGET_IP}:{tbm.TARGET_HTTP_PORT}"
WRK_THREADS = 2
FULL_DURATION_S = 10
QUICK_DURATION_S = 3
PROFILE_DURATION_S = 10
RSS_SAMPLE_INTERVAL_S = 0.5
SETTLE_POLL_S = 0.25
SETTLE_QUIET_S = 3.0
"""After the load, the target's count unchanged this long means replication is over."""
SETTLE_MAX_S = 30.0
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


# ---------------------------------------------------------------------------------------------
# scenarios


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    kind: str
    """"keepalive" or "short" (one request per connection, Connection: close)."""
    connections: int
    """wrk -c: concurrent connections."""
    rate_per_s: int = 0
    """Offered requests (= connections for "short") per second; 0 = as fast as possible."""
    client_ips: int = 1

    def describe(self) -> str:
        if self.kind == "keepalive":
            return f"keep-alive, {self.connections} conns, unpaced"
        addrs = "1 client address" if self.client_ips == 1 else f"{self.client_ips} addresses"
        return f"short conns, {self.rate_per_s // 1000} k/s offered, {addrs}"


SCENARIOS = (
    Scenario("ka-c10", "keepalive", 10),
    Scenario("ka-c50", "keepalive", 50),
    Scenario("ka-c200", "keepalive", 200),
    Scenario("short-5k-1ip", "short", 128, 5000, 1),
    Scenario("short-10k-1ip", "short", 256, 10000, 1),
    Scenario("short-5k-64ip", "short", 128, 5000, 64),
    Scenario("short-10k-64ip", "short", 256, 10000, 64),
)
PROFILE_SCENARIO = "short-10k-1ip"


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
    close = 'wrk.headers["Connection"] = "close"' if scenario.kind == "short" else ""
    path.write_text(
        _WRK_LUA.format(
            rate_per_thread=rate_per_thread,
            cap_per_thread=cap,
            slack_ms=PACING_SLACK_MS,
            close_header=close,
        )
    )
    return path


def wrk_argv(tb: tbm.Testbed, script: Path, scenario: Scenario, duration_s: int, prefix: str):
    url = f"http://{tbm.ONLINE_CLIENT_SIDE_IP}:{tbm.ONLINE_HTTP_PORT}/{prefix}/req"
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
    """Counts access-log lines containing ``needle``, written after the counter was made."""

    def __init__(self, path: Path, needle: str):
        self.path = path
        self.needle = needle.encode()
        try:
            self.offset = path.stat().st_size
        except FileNotFoundError:
            self.offset = 0
        self.total = 0

    def count(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.total
        end = data.rfind(b"\n") + 1  # a half-written last line waits for the next call
        self.total += data.count(self.needle, 0, end)
        self.offset += end
        return self.total


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


def tree_rss(pid: int) -> int:
    total = 0
    for proc in process_tree(pid):
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class RssSampler:
    """Peak of the summed RSS of a process tree, sampled every RSS_SAMPLE_INTERVAL_S."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = tree_rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_INTERVAL_S):
            self.peak = max(self.peak, tree_rss(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, tree_rss(self.pid))


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


SUMMARY_KEYS = (
    "capture_packets",
    "capture_accepted",
    "conns",
    "requests",
    "port reuse",
    "unsend",
    "reset",
    "retransmit",
    "rss_bytes",
)


def summary_counters(summary: dict | None) -> dict[str, Any]:
    if not summary:
        return {}
    out = {k: summary[k] for k in SUMMARY_KEYS if k in summary}
    out.update({k: v for k, v in summary.items() if "drop" in k and isinstance(v, int | float)})
    for key in ("exit_reason", "workers"):
        if key in summary:
            out[key] = summary[key]
    return out


# ---------------------------------------------------------------------------------------------
# one run


@dataclasses.dataclass
class Context:
    tb: tbm.Testbed
    workdir: Path
    intercept: tbm.Proc
    duration_s: int
    workers_flag: bool
    run_index: int = 0

    def next_run(self) -> int:
        self.run_index += 1
        return self.run_index


def ensure_intercept(ctx: Context) -> None:
    if not ctx.intercept.alive():
        say(f"intercept-mp had exited (rc={ctx.intercept.popen.returncode}); restarting it")
        ctx.intercept = ctx.tb.start_intercept(name=f"intercept-mp-{ctx.run_index}")


def start_tcpcopy(ctx: Context, workers: int, run: int) -> tuple[tbm.Proc, Path, str]:
    pool = f"198.19.{POOL_FIRST + run}.x"
    args = ["-x", TRANSFER, "-s", tbm.TARGET_IP, "-c", pool]
    if ctx.workers_flag:
        args += ["--workers", str(workers)]
    elif workers != 1:
        raise tbm.TestbedError("tcpcopy-mp has no --workers flag yet")
    summary = ctx.workdir / f"tcpcopy-b{run:02d}.json"
    proc = ctx.tb.start_tcpcopy(args, name=f"tcpcopy-b{run:02d}", summary=summary)
    return proc, summary, pool


def run_one(ctx: Context, scenario: Scenario, workers: int) -> dict[str, Any]:
    tb = ctx.tb
    run = ctx.next_run()
    prefix = f"b{run:02d}"
    result: dict[str, Any] = {
        "scenario": scenario.name,
        "description": scenario.describe(),
        "workers": workers,
        "status": "failed",
        "prefix": f"/{prefix}/",
        "offered_rate_per_s": scenario.rate_per_s or None,
        "wrk_connections": scenario.connections,
        "client_addresses": scenario.client_ips,
        "duration_s": ctx.duration_s,
        "loadavg_1m_before": round(os.getloadavg()[0], 2),
    }
    if workers != 1 and not ctx.workers_flag:
        result["error"] = "tcpcopy-mp has no --workers flag yet"
        return result
    ensure_intercept(ctx)
    tcpcopy, summary_path, pool = start_tcpcopy(ctx, workers, run)
    result["client_pool"] = pool
    snat = False
    try:
        tb.wait_replicating(tcpcopy, timeout=READY_TIMEOUT_S, prefix=f"/probe-{prefix}/")
        if scenario.client_ips > 1:
            install_snat(tb)
            snat = True
        script = wrk_script(ctx.workdir / f"wrk-{prefix}.lua", scenario, ctx.duration_s)
        online = LogCounter(tb.nginx["online"].dir / "access.log", f" /{prefix}/")
        target = LogCounter(tb.nginx["target"].dir / "access.log", f" /{prefix}/")
        names = process_names(tcpcopy.pid)
        cpu0, icpu0, host0 = tree_cpu(tcpcopy.pid), tree_cpu(ctx.intercept.pid), host_busy_s()
        t0 = time.monotonic()
        with RssSampler(tcpcopy.pid) as rss:
            proc = subprocess.run(
                wrk_argv(tb, script, scenario, ctx.duration_s, prefix),
                capture_output=True, text=True, timeout=ctx.duration_s + WRK_GRACE_S,
            )  # fmt: skip
            load_s = time.monotonic() - t0
            cpu_load_end = tree_cpu(tcpcopy.pid)
            n_online, n_target, settle_s = settle(online, target, tcpcopy)
            cpu1, icpu1, host1 = tree_cpu(tcpcopy.pid), tree_cpu(ctx.intercept.pid), host_busy_s()
        elapsed = time.monotonic() - t0
        wrk = parse_wrk(proc.stdout)
        wrk_s = wrk["duration_us"] / 1e6 or load_s
        tc_cpu, ic_cpu = cpu_delta(cpu0, cpu1), cpu_delta(icpu0, icpu1)
        alive = tcpcopy.alive()
        result.update(
            online_requests=n_online,
            target_requests=n_target,
            ratio=round(n_target / n_online, 4) if n_online else None,
            achieved_rate_per_s=round(n_online / wrk_s, 1) if wrk_s else None,
            wrk=wrk,
            load_s=round(load_s, 2),
            settle_s=round(settle_s, 2),
            tcpcopy_cpu_s=round(tc_cpu, 3),
            tcpcopy_processes=len(cpu1),
            intercept_cpu_s=round(ic_cpu, 3),
            tcpcopy_cpu_pct_during_load=round(100 * cpu_delta(cpu0, cpu_load_end) / load_s, 1),
            tcpcopy_cpu_by_process=cpu_by_name(cpu0, cpu1, names),
            host_cpu_busy_pct=round(
                100 * (host1 - host0) / (elapsed * (psutil.cpu_count() or 1)), 1
            ),
            peak_rss_mb=round(rss.peak / 2**20, 1),
            cpu_s_per_1k=round(1000 * tc_cpu / n_target, 4) if n_target else None,
            cpu_s_per_1k_with_intercept=(
                round(1000 * (tc_cpu + ic_cpu) / n_target, 4) if n_target else None
            ),
        )
        if not alive:
            result["error"] = f"tcpcopy-mp exited during the load (rc={tcpcopy.popen.returncode})"
        else:
            result["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - one failed run is reported, the others go on
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        result["error"] = first
        result["log_tail"] = tcpcopy.tail(12)
    finally:
        if snat:
            remove_snat(tb)
        rc = tcpcopy.stop(signal.SIGTERM, timeout=STOP_TIMEOUT_S)
    result["tcpcopy_exit"] = rc
    result["tcpcopy_counters"] = summary_counters(tbm.read_summary(summary_path))
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
    ensure_intercept(ctx)
    tcpcopy, _, pool = start_tcpcopy(ctx, workers, run)
    wrk_proc = spy = None
    try:
        tb.wait_replicating(tcpcopy, timeout=READY_TIMEOUT_S, prefix=f"/probe-{prefix}/")
        names = process_names(tcpcopy.pid)
        script = wrk_script(ctx.workdir / f"wrk-{prefix}.lua", scenario, PROFILE_DURATION_S + 2)
        online = LogCounter(tb.nginx["online"].dir / "access.log", f" /{prefix}/")
        wrk_proc = subprocess.Popen(
            wrk_argv(tb, script, scenario, PROFILE_DURATION_S + 2, prefix),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        tbm.wait_until(lambda: online.count() > 0, 10, what="load reaching the online server")
        spy = subprocess.run(
            [str(PYSPY_BIN), "record", "--pid", str(tcpcopy.pid), "--subprocesses",
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
    except Exception as exc:  # noqa: BLE001 - the profile is optional
        return {"status": "failed", "error": str(exc).splitlines()[0] if str(exc) else repr(exc)}
    finally:
        if wrk_proc is not None and wrk_proc.poll() is None:
            wrk_proc.terminate()
            try:
                wrk_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                wrk_proc.kill()
        tcpcopy.stop(signal.SIGTERM, timeout=STOP_TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# reporting


def _fmt(value: Any, spec: str = "", suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{suffix}"


def markdown(report: dict[str, Any]) -> str:
    host = report["host"]
    lines = [
        f"Measured {report['started'][:16].replace('T', ' ')} UTC on {host['cpus']} CPUs "
        f"(kernel {host['kernel']}, Python {host['python']}), traditional mode (intercept-mp "
        f"with NFQUEUE on the target), {report['duration_s']} s of load per run; load "
        f"generator, both nginx, tcpcopy-mp and intercept-mp share these CPUs.",
        "",
        "| scenario | workers | offered | achieved/s | online req | target req | ratio "
        "| tcpcopy CPU s | intercept CPU s | CPU s / 1k repl. | peak RSS MB | ring drops |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        offered = (
            f"{r['offered_rate_per_s'] // 1000} k/s x{r['client_addresses']} addr"
            if r.get("offered_rate_per_s")
            else f"c={r['wrk_connections']} unpaced"
        )
        if r["status"] != "ok":
            lines.append(
                f"| {r['scenario']} | {r['workers']} | {offered} | failed: "
                f"{r.get('error', '?')[:60]} |||||||||"
            )
            continue
        ratio = r["ratio"]
        drops = r.get("tcpcopy_counters", {}).get("ring_dropped")
        lines.append(
            f"| {r['scenario']} | {r['workers']} | {offered} "
            f"| {_fmt(r['achieved_rate_per_s'], ',.0f')} "
            f"| {r['online_requests']:,} | {r['target_requests']:,} "
            f"| {_fmt(None if ratio is None else 100 * ratio, '.1f', ' %')} "
            f"| {r['tcpcopy_cpu_s']:.2f} | {r['intercept_cpu_s']:.2f} "
            f"| {_fmt(r['cpu_s_per_1k'], '.3f')} | {r['peak_rss_mb']:.0f} "
            f"| {_fmt(drops, ',')} |"
        )
    prof = report.get("profile")
    if prof and prof.get("status") == "ok":
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
    elif prof:
        lines += ["", f"py-spy profile failed: {prof.get('error')}"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> str | None:
    """Two bar charts (ratio, CPU s per 1k) by scenario and worker count; None if matplotlib
    is missing (pip install -e '.[bench]')."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install -e '.[bench]'): no plot"
    runs = report["runs"]
    scenarios = list(dict.fromkeys(r["scenario"] for r in runs))
    worker_counts = sorted({r["workers"] for r in runs})
    fig, axes = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    width = 0.8 / max(1, len(worker_counts))
    for w_i, workers in enumerate(worker_counts):
        xs, ratios, costs, failed_x = [], [], [], []
        for s_i, name in enumerate(scenarios):
            match = [r for r in runs if r["scenario"] == name and r["workers"] == workers]
            x = s_i + (w_i - (len(worker_counts) - 1) / 2) * width
            if not match or match[0]["status"] != "ok":
                failed_x.append(x)
                continue
            xs.append(x)
            ratios.append(100 * (match[0]["ratio"] or 0))
            costs.append(match[0]["cpu_s_per_1k"] or 0)
        label = f"--workers {workers}"
        axes[0].bar(xs, ratios, width, label=label)
        axes[1].bar(xs, costs, width, label=label)
        for x in failed_x:
            for ax in axes:
                ax.text(x, 0, "failed", rotation=90, ha="center", va="bottom", fontsize=8)
    axes[0].set_ylabel("replicated / online requests (%)")
    axes[0].set_ylim(0, 105)
    axes[0].legend()
    axes[0].set_title(
        f"tcpcopy-mp live replication, {report['host']['cpus']} CPUs, "
        f"{report['duration_s']} s per run ({report['started'][:10]})"
    )
    axes[1].set_ylabel("tcpcopy-mp CPU s per 1,000 replicated")
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
    p.add_argument("--duration", type=int, help="seconds of load per run")
    p.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    p.add_argument(
        "--scenarios",
        default=",".join(s.name for s in SCENARIOS),
        help="comma-separated subset of: " + ", ".join(s.name for s in SCENARIOS),
    )
    prof = p.add_mutually_exclusive_group()
    prof.add_argument("--profile", dest="profile", action="store_true", default=None)
    prof.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = p.parse_args(argv)
    known = {s.name: s for s in SCENARIOS}
    try:
        args.scenario_list = [known[n.strip()] for n in args.scenarios.split(",") if n.strip()]
        args.worker_list = [int(w) for w in args.workers.split(",") if w.strip()]
    except (KeyError, ValueError) as exc:
        p.error(f"bad --scenarios/--workers value: {exc}")
    if args.duration is None:
        args.duration = QUICK_DURATION_S if args.quick else FULL_DURATION_S
    if args.duration < 1:
        p.error("--duration must be at least 1")
    if args.profile is None:
        args.profile = not args.quick
    return args


def run(args: argparse.Namespace, workdir: Path) -> int:
    started = datetime.datetime.now(datetime.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    workers_flag = has_workers_flag()
    if not workers_flag:
        say("tcpcopy-mp --help shows no --workers: runs with more than 1 worker will fail")
    tb = tbm.Testbed(workdir / "testbed", with_redis=False, with_assistant=False)
    try:
        say("building the namespace testbed ...")
        tb.start(tbm.TRADITIONAL)
        add_client_addresses(tb)
        intercept = tb.start_intercept(summary=workdir / "intercept-summary.json")
        ctx = Context(tb, workdir, intercept, args.duration, workers_flag)
        runs = []
        for scenario in args.scenario_list:
            for workers in args.worker_list:
                say(f"{scenario.name} ({scenario.describe()}), --workers {workers} ...")
                r = run_one(ctx, scenario, workers)
                runs.append(r)
                if r["status"] == "ok":
                    say(
                        f"  online {r['online_requests']} target {r['target_requests']} "
                        f"ratio {100 * (r['ratio'] or 0):.1f} % at {r['achieved_rate_per_s']}/s; "
                        f"tcpcopy {r['tcpcopy_cpu_s']} CPU s, intercept {r['intercept_cpu_s']}"
                    )
                else:
                    say(f"  failed: {r.get('error')}")
        profile = None
        if args.profile:
            scenario = next(s for s in SCENARIOS if s.name == PROFILE_SCENARIO)
            say(f"profiling tcpcopy-mp --workers 1 under {scenario.name} with py-spy ...")
            args.out.mkdir(parents=True, exist_ok=True)
            profile = run_profile(ctx, scenario, 1, args.out / f"profile-{stamp}.txt")
            if profile.get("status") != "ok":
                say(f"  profile failed: {profile.get('error')}")
        report = {
            "started": started.isoformat(timespec="seconds"),
            "quick": args.quick,
            "duration_s": args.duration,
            "mode": tbm.TRADITIONAL,
            "host": {
                "cpus": psutil.cpu_count(),
                "kernel": platform.release(),
                "python": platform.python_version(),
                "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            },
            "tcpcopy_has_workers_flag": workers_flag,
            "client_leak_packets": tb.client_leak_packets(),
            "runs": runs,
            "profile": profile,
        }
    finally:
        say("tearing down the testbed ...")
        tb.close()
    path = write_results(report, args.out, stamp)
    say(f"results: {path} (+ latest.json, latest.md, latest.png)")
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
