"""Issue 15 live: sustained short connections from one client address, longer than the
target's TIME_WAIT, replicate with no tuple ceiling.

wrk in the client namespace opens one connection per request (``Connection: close``: the
servers close first, so the *target* keeps every replayed 4-tuple in TIME_WAIT for 60 s) from
the client's one address, paced at LOAD_RATE_PER_S for LOAD_S seconds (bounded in time by
wrk -d and in count by a per-thread cap in its Lua script).  One fake address has 64,512
ports, so after ~32 s the replay needs more than the target's TIME_WAIT leaves free:

* with a 254-address pool (``-c 198.19.1.x``) the connections spill onto other addresses;
* with a single fake address the allocator reuses tuples the target holds in TIME_WAIT, and
  the target's own kernel decides (RFC 6191: the SYN's TSval is newer than the TIME_WAIT's);
  its PAWS-in-TIME_WAIT counter (TcpExtPAWSTimewait) must stay at 0;
* the same with net.ipv4.tcp_timestamps=0 on the target: only a SYN whose seq is after the
  old connection's end reopens a TIME_WAIT tuple, so the allocator picks such ports.

Both must replicate >= 99 % of the online requests with no ``no_tuple`` drop.  The old
allocator (a sticky address and a strict 60 s quarantine) replicated ~64.5 k connections per
minute from one client address and failed both.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from testbed import netns as tbm
from tests.netns.conftest import SKIP_NO_NETNS

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    SKIP_NO_NETNS,
    pytest.mark.usefixtures("programs"),
]

TRANSFER = f"{tbm.ONLINE_HTTP_PORT}-{tbm.TARGET_IP}:{tbm.TARGET_HTTP_PORT}"
LOAD_S = 80
"""Longer than the target's 60 s TIME_WAIT by a margin (the issue asks >= 75 s)."""
LOAD_RATE_PER_S = 2100
"""Offered connections per second (the issue asks >= 2 k/s).  Twice the ~1,075/s one fake
address sustains under a strict 60 s quarantine, and within what 2 shared CPUs replicate."""
WRK_THREADS = 2
WRK_CONNECTIONS = 16
WRK_GRACE_S = 30
REPLICATED_MIN = 0.99
SETTLE_QUIET_S = 5.0
SETTLE_MAX_S = 60.0
WORKERS = 2

# Pacing and a request cap for wrk: each thread takes the next send slot of its schedule
# (CLOCK_MONOTONIC through LuaJIT's ffi); a thread that fell behind catches up by 50 ms at most.
_WRK_LUA = """
local RATE, CAP = {rate_per_thread}, {cap_per_thread}
wrk.headers["Connection"] = "close"
local ffi = require("ffi")
ffi.cdef[[ typedef struct {{ long s; long ns; }} tc15_ts; int clock_gettime(int, tc15_ts *); ]]
local ts = ffi.new("tc15_ts")
local function now_ms()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.s) * 1000 + tonumber(ts.ns) / 1e6
end
local next_ms, done_n = 0, 0
function init(args) next_ms = now_ms() end
function delay()
  local now = now_ms()
  if next_ms < now - 50 then next_ms = now - 50 end
  next_ms = next_ms + 1000 / RATE
  local wait = next_ms - now
  if wait <= 0 then return 0 end
  return math.floor(wait + 0.5)
end
function response(status, headers, body)
  done_n = done_n + 1
  if done_n >= CAP then wrk.thread:stop() end
end
"""


def count_prefix(log: Path, prefix: str) -> int:
    needle = f" /{prefix}/".encode()
    try:
        with open(log, "rb") as f:
            return sum(1 for line in f if needle in line)
    except FileNotFoundError:
        return 0


def nstat(tb: tbm.Testbed, role: str, name: str) -> int:
    out = tb.run(role, "nstat", "-asz", name, check=False).stdout
    m = re.search(rf"^{name}\s+(\d+)", out, re.M)
    return int(m.group(1)) if m else 0


def time_wait_from(tb: tbm.Testbed, role: str, net: str) -> int:
    out = tb.run(role, "ss", "-tanH", "state", "time-wait", "dst", net, check=False).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def run_sustained(
    tb: tbm.Testbed, tmp_path: Path, pool: str, prefix: str, target_timestamps: bool = True
) -> dict:
    """The load, the replication and tcpcopy-mp's summary; asserts the replication."""
    tb.tcpcopy_workers = WORKERS
    if not target_timestamps:
        tb.run("target", "sysctl", "-qw", "net.ipv4.tcp_timestamps=0")
    tb.set_mode(tbm.ADVANCED)
    tb.start_intercept(summary=tmp_path / "intercept-summary.json")
    summary_path = tmp_path / "tcpcopy-summary.json"
    tcpcopy = tb.start_tcpcopy(["-x", TRANSFER, "-c", pool], summary=summary_path)
    tb.wait_replicating(tcpcopy)
    paws0 = nstat(tb, "target", "TcpExtPAWSTimewait")
    script = tmp_path / "paced-close.lua"
    per_thread = LOAD_RATE_PER_S / WRK_THREADS
    script.write_text(
        _WRK_LUA.format(rate_per_thread=per_thread, cap_per_thread=int(per_thread * LOAD_S) + 1)
    )
    url = f"http://{tbm.ONLINE_CLIENT_SIDE_IP}:{tbm.ONLINE_HTTP_PORT}/{prefix}/r"
    wrk = subprocess.Popen(
        ["ip", "netns", "exec", tb.ns("client"), "wrk", "-t", str(WRK_THREADS),
         "-c", str(WRK_CONNECTIONS), "-d", f"{LOAD_S}s", "-s", str(script), url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    # Mid-run (past the first 60 s): the target holds the replayed tuples in TIME_WAIT.
    time_wait = 0
    deadline = time.monotonic() + LOAD_S + WRK_GRACE_S
    sample_at = time.monotonic() + 65.0
    while wrk.poll() is None and time.monotonic() < deadline:
        if not time_wait and time.monotonic() >= sample_at:
            time_wait = time_wait_from(tb, "target", tbm.FAKE_CLIENT_NET)
        time.sleep(0.5)  # the load's own pace: wrk runs for LOAD_S
    if wrk.poll() is None:
        wrk.kill()
    wrk_out = wrk.communicate()[0]
    online_log = tb.nginx["online"].dir / "access.log"
    target_log = tb.nginx["target"].dir / "access.log"
    online = count_prefix(online_log, prefix)
    # Settled: the target's count reached the online one, or stopped growing.
    last, quiet_since, end = -1, time.monotonic(), time.monotonic() + SETTLE_MAX_S
    while time.monotonic() < end:
        target = count_prefix(target_log, prefix)
        if target >= online:
            break
        if target != last:
            last, quiet_since = target, time.monotonic()
        elif time.monotonic() - quiet_since >= SETTLE_QUIET_S:
            break
        time.sleep(0.25)
    target = count_prefix(target_log, prefix)
    rc = tcpcopy.stop(signal.SIGTERM, timeout=30)
    summary = tbm.read_summary(summary_path) or {}
    drops = {k: v for k, v in summary.items() if k.startswith("drop_") and v}
    report = (
        f"online {online} (wrk: {wrk_out.strip().splitlines()[-3:]}), target {target} "
        f"({100 * target / max(online, 1):.2f} %), TIME_WAIT from fake clients at 65 s "
        f"{time_wait}, drops {json.dumps(drops)}, spilled "
        f"{summary.get('tuples_spilled')}, reused {summary.get('tuples_reused')}"
    )
    print(f"tuple ceiling ({pool}): {report}")
    assert rc == 0, report
    assert online >= 0.9 * LOAD_RATE_PER_S * LOAD_S, f"the load fell short: {report}"
    assert target >= REPLICATED_MIN * online, report
    assert summary.get("drop_no_tuple", 0) == 0, report
    assert time_wait > 0, f"the target held no TIME_WAIT: the test did not test reuse. {report}"
    assert nstat(tb, "target", "TcpExtPAWSTimewait") == paws0, report
    return summary


@pytest.mark.timeout(300)
def test_sustained_short_connections_from_one_address_spill_over_the_pool(
    testbed: tbm.Testbed, tmp_path: Path
) -> None:
    summary = run_sustained(testbed, tmp_path, "198.19.1.x", "spill")
    assert summary["tuples_spilled"] > 0
    assert summary["tuples_reused"] == 0  # 254 addresses: no TIME_WAIT tuple was needed
    addrs = {r.remote_addr for r in tbm.with_prefix(testbed.access_log("target"), "/spill/")}
    assert len(addrs) > 1 and all(a.startswith("198.19.1.") for a in addrs)


@pytest.mark.timeout(300)
def test_sustained_short_connections_on_one_fake_address_reuse_time_wait(
    testbed: tbm.Testbed, tmp_path: Path
) -> None:
    summary = run_sustained(testbed, tmp_path, "198.19.1.7", "reuse")
    # Past 64,512 connections the tuples came out of the target's TIME_WAIT, and its kernel
    # took every SYN (the replication figure above).
    assert summary["tuples_reused"] > 10_000
    addrs = {r.remote_addr for r in tbm.with_prefix(testbed.access_log("target"), "/reuse/")}
    assert addrs == {"198.19.1.7"}


@pytest.mark.timeout(300)
def test_one_fake_address_and_a_target_without_timestamps_reuse_by_sequence_number(
    testbed: tbm.Testbed, tmp_path: Path
) -> None:
    """net.ipv4.tcp_timestamps=0 on the target: its TIME_WAIT takes a SYN only when its seq is
    after the old connection's end, so only such ports are reused (about one in two)."""
    summary = run_sustained(testbed, tmp_path, "198.19.1.7", "plain", target_timestamps=False)
    assert summary["tuples_reused"] > 10_000
