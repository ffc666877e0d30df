"""-g live: the replicated share of new sessions ramps up by 1 % per second (spec §3.3 step 6).

One-request sessions at a steady pace; afterwards each online session's -r sampling key
(C's formula on its -c address and original port, engine/core/rewrite.py) is set against the ramp
at the time nginx logged it: kept exactly when key < seconds since the ramp start + 1.  The
ramp starts at the first session let through at 1 %, which must therefore have key 0.
Sessions within ``SLACK_S`` of their threshold are not judged (nginx's log time is not the
moment tcpcopy-mp saw the SYN); everything else must match, in both directions.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.codec.packet import ip_from_str
from engine.core.rewrite import choose_client_ip, parse_client_pool, sample_keep
from testbed import netns as tbm
from tests.netns.conftest import SKIP_NO_NETNS

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    SKIP_NO_NETNS,
    pytest.mark.usefixtures("programs"),
]

POOL_SPEC = "198.19.1.x"
SESSIONS = 600
RATE_PER_S = 25
SLACK_S = 1.5
DEADLINE_S = 60.0


def sample_key(ip: int, port: int) -> int:
    return next(p for p in range(1, 101) if sample_keep(ip, port, p)) - 1


@pytest.mark.timeout(240)
def test_gradual_ramp_follows_c_formula(testbed: tbm.Testbed, tmp_path: Path) -> None:
    testbed.tcpcopy_workers = 1  # one session table: one ramp
    pool = parse_client_pool(POOL_SPEC, exclude=[ip_from_str(tbm.TARGET_IP)])
    _, tcpcopy = tbm.start_pair(
        testbed, tmp_path, ["-x", tbm.TRANSFER_HTTP, "-c", POOL_SPEC, "-g"], probe=False
    )
    load = testbed.loadgen(
        "sessions",
        "--requests", str(SESSIONS),
        "--per-conn", "1",
        "--rate", str(RATE_PER_S),
        "--prefix", "gr",
    )  # fmt: skip
    assert load["ok"] == SESSIONS, load
    online = {r.uri: r for r in tbm.with_prefix(testbed.access_log("online"), "/gr/")}
    assert len(online) == SESSIONS
    keys = {
        uri: sample_key(choose_client_ip(ip_from_str(r.remote_addr), pool), r.remote_port)
        for uri, r in online.items()
    }

    def replicated() -> set[str]:
        return {r.uri for r in tbm.with_prefix(testbed.access_log("target"), "/gr/")}

    def expected_now() -> tuple[float, set[str], set[str]]:
        got = replicated()
        t0 = min(online[u].msec for u in got)
        keep, drop = set(), set()
        for uri, r in online.items():
            if r.msec < t0:
                continue
            threshold = r.msec - t0 + 1  # kept when key < int(threshold)
            if keys[uri] < threshold - SLACK_S:
                keep.add(uri)
            elif keys[uri] >= threshold + SLACK_S:
                drop.add(uri)
        return t0, keep, drop

    try:
        tbm.wait_until(
            lambda: bool(replicated()) and expected_now()[1] <= replicated(),
            DEADLINE_S,
            interval=0.5,
            what="every session the ramp covers replicated",
        )
    finally:
        summary = tbm.stop_tcpcopy(testbed, tcpcopy, tmp_path)
    got = replicated()
    t0, keep, drop = expected_now()
    first = min(got, key=lambda u: online[u].msec)
    assert keys[first] == 0, f"the ramp started at a key-{keys[first]} session\n{tbm.diag(testbed)}"
    assert len(keep) >= 10 and len(drop) >= 100, (len(keep), len(drop))
    wrongly_kept = sorted(got & drop)
    assert not wrongly_kept, (
        f"replicated above the ramp: {[(u, keys[u], online[u].msec - t0) for u in wrongly_kept]}"
    )
    assert keep <= got
    sampled_out = {k: v for k, v in summary.items() if "sampled_out" in k}
    assert sampled_out and all(v > 0 for v in sampled_out.values()), sampled_out
    print(
        f"ramp: {len(got)}/{SESSIONS} sessions replicated over "
        f"{max(r.msec for r in online.values()) - t0:.1f} s after its start; "
        f"judged {len(keep)} kept and {len(drop)} left out"
    )
