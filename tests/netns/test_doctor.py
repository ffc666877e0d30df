"""The doctors against the real testbed: break one thing at a time, check that the doctor names
it and its fix, then (where a fix is a command) run that fix and check the doctor is content
and the live probe works again.

``tcpcopy-mp doctor`` runs in the online namespace, ``intercept-mp doctor`` in the target's
(traditional) or the assistant's (advanced).  The live probe sends one SYN (and one RST) from
a 198.19.1.x pool address to the target only; the client namespace's leak counter proves
nothing of it reaches a real client.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from intercept.sources.nfqueue import rule_spec
from testbed import netns as tbm
from tests.netns.conftest import SKIP_NO_NETNS

pytestmark = [
    pytest.mark.netns,
    SKIP_NO_NETNS,
    pytest.mark.usefixtures("programs"),
]

POOL = "198.19.1.x"
POOL_NET = "198.19.1.0/24"
TRANSFER = f"{tbm.ONLINE_HTTP_PORT}-{tbm.TARGET_IP}:{tbm.TARGET_HTTP_PORT}"
LIVE_S = "3"
TRADITIONAL_ARGS = ["--queue-num", "0", "--target-port", str(tbm.TARGET_HTTP_PORT), "-c", POOL]
ADVANCED_ARGS = ["-i", tbm.ASSISTANT_IFACE, "-F", f"tcp and src port {tbm.TARGET_HTTP_PORT}",
                 "-c", POOL]  # fmt: skip
BANNER_SERVER = (
    "import socket,sys\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(5)\n"
    "while True:\n"
    "    c,_=s.accept(); c.sendall(b'SSH-2.0-NotAnIntercept\\r\\n'); c.close()\n"
)


@pytest.fixture
def tb(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tbm.Testbed]:
    bed = tbm.Testbed(tmp_path / "testbed", with_redis=False)
    bed.start()
    try:
        yield bed
    finally:
        bed.close()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            for proc in bed.procs:
                print(f"\n----- {proc.name} (rc {proc.popen.returncode}) -----\n{proc.tail(30)}")


# -- helpers ----------------------------------------------------------------------------------


class Report:
    def __init__(self, rc: int, obj: dict, stderr: str) -> None:
        self.rc = rc
        self.findings = obj["findings"]
        self.status = obj["status"]
        self.stderr = stderr

    def get(self, check: str) -> dict:
        hits = [f for f in self.findings if f["check"] == check]
        assert hits, f"no finding {check!r} in:\n{self}"
        return hits[0]

    def severities(self) -> set[str]:
        return {f["severity"] for f in self.findings}

    def __str__(self) -> str:
        return "\n".join(
            f"[{f['severity']}] {f['check']}: {f['message']} -- fix: {f['fix']}"
            for f in self.findings
        )


def doctor(tb: tbm.Testbed, role: str, binary: Path, args: list[str]) -> Report:
    proc = tb.run(role, str(binary), "doctor", *args, "--json", check=False, timeout=60)
    assert proc.returncode in (0, 1), f"rc {proc.returncode}: {proc.stdout} {proc.stderr}"
    obj = json.loads(proc.stdout)
    assert obj["status"] == proc.returncode
    return Report(proc.returncode, obj, proc.stderr)


def tcpcopy_doctor(tb: tbm.Testbed, *extra: str, live: bool = True, intercept: str = "") -> Report:
    args = ["-x", TRANSFER, "-s", intercept or tb.intercept_address(), "-c", POOL, *extra]
    if live:
        args += ["--live", LIVE_S]
    return doctor(tb, "online", tbm.TCPCOPY_BIN, args)


def intercept_doctor(
    tb: tbm.Testbed, role: str = "target", args: list[str] | None = None
) -> Report:
    return doctor(tb, role, tbm.INTERCEPT_BIN, TRADITIONAL_ARGS if args is None else args)


LIVE_CHECK = f"live probe {tbm.TARGET_IP}:{tbm.TARGET_HTTP_PORT}"


def assert_healthy(report: Report) -> None:
    assert report.rc == 0 and report.severities() <= {"ok", "info"}, str(report)


def apply_fix(tb: tbm.Testbed, role: str, fix: str) -> None:
    """Run a finding's fix command (its part before any explanation in parentheses)."""
    command = fix.split("  (", 1)[0]
    tb.run(role, *shlex.split(command))


def syn_recv_from_pool(tb: tbm.Testbed) -> int:
    out = tb.run("target", "ss", "-tnH", "state", "syn-recv", "src", tbm.TARGET_IP, check=False)
    return sum(1 for line in out.stdout.splitlines() if "198.19." in line)


# -- the healthy testbed ------------------------------------------------------------------------


def test_healthy_traditional_testbed_is_all_ok(tb: tbm.Testbed) -> None:
    tb.start_intercept()
    report = tcpcopy_doctor(tb)
    assert_healthy(report)
    live = report.get(LIVE_CHECK)
    assert "answered by SYN-ACK" in live["message"], live
    # The probe reset its connection on the target, and nothing reached a real client.
    tbm.wait_until(lambda: syn_recv_from_pool(tb) == 0, 5.0, what="the probe's RST")
    assert tb.client_leak_packets() == 0
    assert_healthy(intercept_doctor(tb))
    # The text form: one line per check, exit status 0.
    text = tb.run("target", str(tbm.INTERCEPT_BIN), "doctor", *TRADITIONAL_ARGS, check=False)
    lines = text.stdout.splitlines()
    assert text.returncode == 0 and lines, text.stderr
    assert all(line.startswith(("[ok] ", "[info] ")) for line in lines), text.stdout
    assert any(line.startswith("[ok] NFQUEUE rule --sport 8080: ") for line in lines)


# -- one thing broken at a time -------------------------------------------------------------------


def test_target_without_a_route_for_the_pool(tb: tbm.Testbed) -> None:
    tb.start_intercept()
    tb.ip("target", "route", "del", tbm.FAKE_CLIENT_NET)
    report = intercept_doctor(tb)
    route = report.get("route for the client pool")
    assert report.rc == 1 and route["severity"] == "fail", str(report)
    assert "unreachable" in route["message"].lower()
    assert route["fix"].startswith(f"ip route add {POOL_NET} dev {tbm.TARGET_IFACE}")
    live = tcpcopy_doctor(tb)
    assert live.rc == 1 and live.get(LIVE_CHECK)["severity"] == "fail"
    assert "no SYN-ACK record" in live.get(LIVE_CHECK)["message"]
    assert "intercept-mp doctor" in live.get(LIVE_CHECK)["fix"]
    # The fix, applied as printed, repairs the replay path.
    apply_fix(tb, "target", route["fix"])
    assert_healthy(intercept_doctor(tb))
    assert_healthy(tcpcopy_doctor(tb))
    assert tb.client_leak_packets() == 0


def test_nfqueue_rule_deleted(tb: tbm.Testbed) -> None:
    tb.start_intercept()
    tb.run("target", "iptables", "-w", "5", "-D", "OUTPUT", *rule_spec(tbm.TARGET_HTTP_PORT, 0))
    report = intercept_doctor(tb)
    rule = report.get(f"NFQUEUE rule --sport {tbm.TARGET_HTTP_PORT}")
    assert report.rc == 1 and rule["severity"] == "fail", str(report)
    assert rule["fix"] == "iptables -I OUTPUT -p tcp --sport 8080 -j NFQUEUE --queue-num 0"
    live = tcpcopy_doctor(tb)
    assert live.rc == 1 and "no SYN-ACK record" in live.get(LIVE_CHECK)["message"]
    apply_fix(tb, "target", rule["fix"])
    assert_healthy(intercept_doctor(tb))
    assert_healthy(tcpcopy_doctor(tb))
    assert tb.client_leak_packets() == 0


def test_strict_rp_filter_on_the_target(tb: tbm.Testbed) -> None:
    tb.start_intercept()
    key = f"net.ipv4.conf.{tbm.TARGET_IFACE}.rp_filter"
    tb.run("target", "sysctl", "-qw", f"{key}=1")
    # Strict, but the pool's route leaves through the interface the SYNs arrive on: the SYNs
    # pass, so this is a warning, and the live probe indeed still works.
    report = intercept_doctor(tb)
    rp = report.get(f"rp_filter {tbm.TARGET_IFACE}")
    assert rp["severity"] == "warn" and rp["fix"] == f"sysctl -w {key}=2", str(report)
    live = tcpcopy_doctor(tb)
    assert live.get(LIVE_CHECK)["severity"] == "ok", str(live)
    # Now the pool's route leaves through another device: strict drops the spoofed SYNs.
    # (A veth pair inside the target: the dummy driver is not always available.)
    tb.ip("target", "link", "add", "side0", "type", "veth", "peer", "name", "side1")
    for dev in ("side0", "side1"):
        tb.ip("target", "link", "set", dev, "up")
    tb.ip("target", "route", "replace", tbm.FAKE_CLIENT_NET, "dev", "side0")
    report = intercept_doctor(tb)
    rp = report.get(f"rp_filter {tbm.TARGET_IFACE}")
    assert report.rc == 1 and rp["severity"] == "fail", str(report)
    assert "side0" in rp["message"] and rp["fix"] == f"sysctl -w {key}=2"
    live = tcpcopy_doctor(tb)
    assert live.rc == 1 and "no SYN-ACK record" in live.get(LIVE_CHECK)["message"]
    apply_fix(tb, "target", rp["fix"])
    assert_healthy(intercept_doctor(tb))
    assert tcpcopy_doctor(tb).get(LIVE_CHECK)["severity"] == "ok"


def test_ip_forward_on_the_assistant(tb: tbm.Testbed) -> None:
    tb.set_mode(tbm.ADVANCED)
    tb.start_intercept()
    assert_healthy(intercept_doctor(tb, "assistant", ADVANCED_ARGS))
    assert_healthy(tcpcopy_doctor(tb))  # -s is the assistant in this mode
    tb.run("assistant", "sysctl", "-qw", "net.ipv4.ip_forward=1")
    report = intercept_doctor(tb, "assistant", ADVANCED_ARGS)
    fwd = report.get("ip_forward")
    assert report.rc == 1 and fwd["severity"] == "fail", str(report)
    assert fwd["fix"] == "sysctl -w net.ipv4.ip_forward=0"
    apply_fix(tb, "assistant", fwd["fix"])
    assert_healthy(intercept_doctor(tb, "assistant", ADVANCED_ARGS))


def test_intercept_not_running(tb: tbm.Testbed) -> None:
    report = tcpcopy_doctor(tb)
    assert report.rc == 1, str(report)
    static = report.get(f"intercept {tbm.TARGET_IP}:{tbm.INTERCEPT_PORT}")
    assert static["severity"] == "fail" and "connection refused" in static["message"]
    assert "intercept-mp" in static["fix"]
    live = report.get(LIVE_CHECK)
    assert live["severity"] == "fail" and "step 1" in live["message"]
    # On the target: the port is free (fine) and the rule is missing (that is what is wrong).
    target = intercept_doctor(tb)
    assert target.get(f"listen port {tbm.INTERCEPT_PORT}")["severity"] == "ok"
    assert target.get(f"NFQUEUE rule --sport {tbm.TARGET_HTTP_PORT}")["severity"] == "fail"
    assert syn_recv_from_pool(tb) == 0 and tb.client_leak_packets() == 0


def test_nothing_listens_on_the_target_port(tb: tbm.Testbed) -> None:
    tb.start_intercept()
    tb.nginx["target"].proc.stop()
    tbm.wait_until(
        lambda: not tb._listening("target", tbm.TARGET_HTTP_PORT), 10.0, what="nginx gone"
    )
    report = tcpcopy_doctor(tb)
    live = report.get(LIVE_CHECK)
    assert report.rc == 1 and live["severity"] == "fail", str(report)
    assert "answered the SYN with RST" in live["message"]
    assert f"sport = :{tbm.TARGET_HTTP_PORT}" in live["fix"]


def test_another_service_on_the_intercept_port(tb: tbm.Testbed) -> None:
    tb.spawn("target", "banner", [str(tbm.PYTHON), "-c", BANNER_SERVER, tbm.TARGET_IP,
                                   str(tbm.INTERCEPT_PORT)])  # fmt: skip
    tbm.wait_until(
        lambda: tb._listening("target", tbm.INTERCEPT_PORT), 10.0, what="the banner server"
    )
    target = intercept_doctor(tb)
    port = target.get(f"listen port {tbm.INTERCEPT_PORT}")
    assert port["severity"] == "fail" and "held by python" in port["message"], str(target)
    report = tcpcopy_doctor(tb, live=False)
    static = report.get(f"intercept {tbm.TARGET_IP}:{tbm.INTERCEPT_PORT}")
    assert static["severity"] == "fail" and "another service" in static["message"], str(report)


# -- -o DEV and -F ---------------------------------------------------------------------------


def test_link_send_and_capture_filter(tb: tbm.Testbed) -> None:
    """With OUTPUT dropping the raw IP path: -o srv0 makes the doctor check the device, its
    MTU and the target's neighbour entry, say the IP layer is bypassed, and the live probe
    goes out as a frame and is answered; -F reports its program and what it keeps of a live
    sample (client traffic sent while the doctor samples)."""
    tb.start_intercept()
    tb.run("online", "iptables", "-w", "-A", "OUTPUT", "-p", "tcp", "-d", tbm.TARGET_IP,
           "--dport", str(tbm.TARGET_HTTP_PORT), "-j", "DROP")  # fmt: skip
    blocked = tcpcopy_doctor(tb)
    assert "answered" not in blocked.get(LIVE_CHECK)["message"], str(blocked)
    second = "198.18.1.11"
    tb.ip("client", "addr", "add", f"{second}/24", "dev", tbm.CLIENT_IFACE)
    loads = [
        tb.spawn_loadgen("short", "--requests", "150", "--rate", "30", "--prefix", prefix,
                         "--source", src, "--deadline", "20", name=f"loadgen-{prefix}")
        for prefix, src in (("da", tbm.CLIENT_IP), ("db", second))
    ]  # fmt: skip
    report = tcpcopy_doctor(tb, "-o", tbm.ONLINE_SERVER_IFACE, "-F", f"not src host {second}")
    for lg in loads:
        lg.stop()
    assert_healthy(report)
    assert "MTU 1500" in report.get(f"output device {tbm.ONLINE_SERVER_IFACE}")["message"]
    assert "(neighbour table)" in report.get(f"next hop of {tbm.TARGET_IP}")["message"]
    assert "1 DROP/REJECT rule(s) in OUTPUT" in report.get("ip layer bypassed")["message"]
    assert "answered by SYN-ACK" in report.get(LIVE_CHECK)["message"], str(report)
    sample = report.get("capture filter sample")["message"]
    m = re.search(r"of (\d+) packet\(s\) the -x selection captured in 3 s, .* keeps (\d+)", sample)
    assert m and 0 < int(m.group(2)) < int(m.group(1)), sample
    assert "instructions from libpcap" in report.get("capture filter")["message"]
    assert tb.client_leak_packets() == 0
