"""Link-layer send (-o DEV) and the capture filter (-F), end to end in the testbed.

-o: the online namespace's OUTPUT chain drops every TCP packet to the target's replay port,
which is exactly the path the raw IP socket takes; with -o the frames leave on the device
underneath, so the replay still arrives, and the DROP rule's own counter proves the packets
never went through OUTPUT.

-F: a second client address sends its own requests; ``not src host`` that address leaves
them out of the target's log while the first address's requests all arrive.
"""

from __future__ import annotations

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

SHORT_CONNECTIONS = 600
KEEPALIVE_REQUESTS = 1400
REQUIRED_RATIO = 0.999
DEADLINE_S = 60.0
SECOND_CLIENT_IP = "198.18.1.11"
DROP_RULE = ["OUTPUT", "-p", "tcp", "-d", tbm.TARGET_IP, "--dport", str(tbm.TARGET_HTTP_PORT)]


def _drop_rule_packets(tb: tbm.Testbed) -> int:
    rows = tb.iptables_counters("online", "filter")
    hits = [pkts for pkts, _, rule in rows if f"--dport {tbm.TARGET_HTTP_PORT}" in rule]
    assert hits, rows
    return sum(hits)


@pytest.mark.timeout(200)
def test_link_send_bypasses_the_output_chain(testbed: tbm.Testbed, tmp_path: Path) -> None:
    """The raw IP path is dropped by OUTPUT; -o srv0 still replicates >= 99.9 % of 600
    one-request connections and 1,400 keep-alive requests, and the rule counts 0 packets."""
    testbed.run("online", "iptables", "-w", "-A", *DROP_RULE, "-j", "DROP")
    _, tcpcopy = tbm.start_pair(
        testbed,
        tmp_path,
        ["-x", tbm.TRANSFER_HTTP, "-c", "198.19.3.x", "-o", tbm.ONLINE_SERVER_IFACE],
    )
    sc = testbed.loadgen("short", "--requests", str(SHORT_CONNECTIONS), "--rate", "200")
    ka = testbed.loadgen(
        "keepalive", "--connections", "10", "--requests", str(KEEPALIVE_REQUESTS), "--rate", "700"
    )
    assert sc["failed"] == 0 and ka["failed"] == 0, (sc, ka)
    online = {p: len(tbm.with_prefix(testbed.access_log("online"), p)) for p in ("/sc/", "/ka/")}
    assert online == {"/sc/": SHORT_CONNECTIONS, "/ka/": KEEPALIVE_REQUESTS}, online
    seen = {p: testbed.wait_target_count(p, n, timeout=DEADLINE_S) for p, n in online.items()}
    summary = tbm.stop_tcpcopy(testbed, tcpcopy, tmp_path)
    print(f"-o: online {online}, target {seen}, sent {summary.get('send_packets')} frames")
    for prefix, n in online.items():
        assert seen[prefix] >= REQUIRED_RATIO * n, f"{prefix}: {seen}\n{tbm.diag(testbed)}"
        report = tbm.compare_replication(
            testbed.access_log("online"), testbed.access_log("target"), prefix
        )
        assert not report.extra and not report.order_mismatches, report.summary()
    assert _drop_rule_packets(testbed) == 0, "replayed packets went through OUTPUT"
    assert summary.get("send_packets", 0) > 0 and summary.get("send_errors", 0) == 0, summary
    assert testbed.client_leak_packets() == 0


@pytest.mark.timeout(200)
@pytest.mark.parametrize("capture", ["raw", "packet"])
def test_capture_filter_leaves_one_client_out(
    testbed: tbm.Testbed, tmp_path: Path, capture: str
) -> None:
    """-F 'not src host B': none of client B's 300 connections reach the target; client A's
    300 connections and 700 keep-alive requests do (>= 99.9 %)."""
    testbed.ip("client", "addr", "add", f"{SECOND_CLIENT_IP}/24", "dev", tbm.CLIENT_IFACE)
    args = ["-x", tbm.TRANSFER_HTTP, "-c", "198.19.4.x", "-F", f"not src host {SECOND_CLIENT_IP}"]
    if capture == "packet":
        args += ["-i", tbm.ONLINE_CLIENT_IFACE]
    _, tcpcopy = tbm.start_pair(testbed, tmp_path, args)
    a_short = testbed.loadgen(
        "short", "--requests", "300", "--rate", "200", "--prefix", "fa",
        "--source", tbm.CLIENT_IP,
    )  # fmt: skip
    b_short = testbed.loadgen(
        "short", "--requests", "300", "--rate", "200", "--prefix", "fb",
        "--source", SECOND_CLIENT_IP,
    )  # fmt: skip
    a_ka = testbed.loadgen(
        "keepalive", "--connections", "5", "--requests", "700", "--rate", "500",
        "--prefix", "fk", "--source", tbm.CLIENT_IP,
    )  # fmt: skip
    assert all(r["failed"] == 0 for r in (a_short, b_short, a_ka)), (a_short, b_short, a_ka)
    online = testbed.access_log("online")
    assert {r.remote_addr for r in tbm.with_prefix(online, "/fb/")} == {SECOND_CLIENT_IP}
    expected = {"/fa/": 300, "/fk/": 700}
    seen = {p: testbed.wait_target_count(p, n, timeout=DEADLINE_S) for p, n in expected.items()}
    # Client B's requests were sent before client A's keep-alive load, which all arrived:
    # anything of B's still on its way would have arrived by now.
    summary = tbm.stop_tcpcopy(testbed, tcpcopy, tmp_path)
    # The combined -x/-F program ran in the kernel (no fall-back to filtering in Python).
    assert summary.get("capture_kernel_filter_failed", 0) == 0, summary
    assert summary.get("capture_filter_excluded", 0) == 0, summary
    target = testbed.access_log("target")
    print(f"-F ({capture}): expected {expected}, target {seen}, client B at the target: "
          f"{len(tbm.with_prefix(target, '/fb/'))} of 300")  # fmt: skip
    for prefix, n in expected.items():
        assert seen[prefix] >= REQUIRED_RATIO * n, f"{prefix}: {seen}\n{tbm.diag(testbed)}"
    assert tbm.with_prefix(target, "/fb/") == [], "-F did not leave client B out"
    assert testbed.client_leak_packets() == 0
