"""The testbed itself works (needs root; no tcpcopy-mp/intercept-mp involved).

Every safety property the acceptance tests rely on is checked with a positive control: the
client-namespace leak counter is shown to count, and the target's probe packet is shown to
leave the target, before we assert that nothing reached the client.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest

from testbed import netns as tbm
from tests.netns.conftest import SKIP_NO_NETNS

# -- pure helpers (no privileges) ---------------------------------------------------------------


def _rec(
    conn: int, n: int, uri: str, addr: str = "198.18.1.10", port: int = 40000
) -> tbm.AccessRecord:
    return tbm.AccessRecord(addr, port, conn, n, "GET", uri, 80, 200, 3, 1.0, "-")


def test_parse_access_line_roundtrip() -> None:
    line = (
        '198.19.1.7 40001 12 3 POST /upload/big 1048716 200 3 1795315217.009 "/x/body/0000000001"'
    )
    rec = tbm.parse_access_line(line)
    assert rec == tbm.AccessRecord(
        "198.19.1.7",
        40001,
        12,
        3,
        "POST",
        "/upload/big",
        1048716,
        200,
        3,
        1795315217.009,
        "/x/body/0000000001",
    )
    assert tbm.parse_access_line("garbage line") is None


def test_compare_replication_detects_missing_extra_and_reordering() -> None:
    online = [_rec(1, 1, "/ka/0/0"), _rec(1, 2, "/ka/0/1"), _rec(2, 1, "/sc/0", port=40001)]
    same = [_rec(7, 1, "/ka/0/0", "198.19.1.1"), _rec(7, 2, "/ka/0/1", "198.19.1.1")]
    assert tbm.compare_replication(online, same, "/ka/").exact

    reordered = [_rec(7, 1, "/ka/0/1", "198.19.1.1"), _rec(7, 2, "/ka/0/0", "198.19.1.1")]
    report = tbm.compare_replication(online, reordered, "/ka/")
    assert not report.exact and report.unmapped_target_connections == 1

    split = [_rec(7, 1, "/ka/0/0", "198.19.1.1"), _rec(8, 1, "/ka/0/1", "198.19.1.1", 3)]
    report = tbm.compare_replication(online, split, "/ka/")
    assert report.order_mismatches == [(["/ka/0/0", "/ka/0/1"], ["/ka/0/0"])]

    dup = [*same, _rec(9, 1, "/ka/0/0", "198.19.1.2")]
    report = tbm.compare_replication(online, dup, "/ka/")
    assert report.extra == ["/ka/0/0"] and not report.exact

    report = tbm.compare_replication(online, same[:1], "/ka/")
    assert report.missing == ["/ka/0/1"] and report.ratio == 0.5


def test_parse_commandstats() -> None:
    info = (
        b"# Commandstats\r\ncmdstat_set:calls=2000,usec=1,usec_per_call=0.1\r\n"
        b"cmdstat_config|get:calls=2\r\n"
    )
    assert tbm.parse_commandstats(info) == {"set": 2000, "config|get": 2}


# -- the live testbed --------------------------------------------------------------------------


@pytest.mark.netns
@SKIP_NO_NETNS
@pytest.mark.timeout(120)
def test_topology_and_sysctls(testbed: tbm.Testbed) -> None:
    for role in tbm.ROLES:
        assert "default" not in testbed.routes(role), f"{role} has a default route"
        assert testbed.run(role, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
        assert (
            testbed.run(role, "sysctl", "-n", "net.ipv4.conf.all.rp_filter").stdout.strip() == "0"
        )
    assert (
        testbed.run(
            "target", "sysctl", "-n", f"net.ipv4.conf.{tbm.TARGET_IFACE}.rp_filter"
        ).stdout.strip()
        == "0"
    )
    # The bridge lives in sw, not in the root namespace.
    assert tbm.BRIDGE in testbed.ip("sw", "link", "show", "type", "bridge").stdout
    names = testbed.ip("sw", "link", "show", "master", tbm.BRIDGE).stdout
    assert "p-online" in names and "p-target" in names and "p-assistant" in names


@pytest.mark.netns
@SKIP_NO_NETNS
@pytest.mark.timeout(120)
def test_client_reaches_online_nginx_and_online_reaches_target(testbed: tbm.Testbed) -> None:
    status, body = tbm.http_get(testbed.ns("client"), tbm.ONLINE_CLIENT_SIDE_IP, 80, "/hello/1")
    assert (status, body) == (200, b"ok\n")
    status, _ = tbm.http_get(testbed.ns("online"), tbm.TARGET_IP, tbm.TARGET_HTTP_PORT, "/hello/2")
    assert status == 200
    assert [r.uri for r in testbed.access_log("online")] == ["/hello/1"]
    target_log = testbed.access_log("target")
    assert [(r.uri, r.remote_addr) for r in target_log] == [("/hello/2", tbm.ONLINE_SERVER_SIDE_IP)]
    assert tbm.can_connect(testbed.ns("online"), tbm.TARGET_IP, tbm.REDIS_PORT)
    # The client has no route to the server subnet at all.
    with pytest.raises(OSError):  # noqa: PT012 - the socket is made and closed in the block
        sock = tbm.netns_socket(testbed.ns("client"))
        try:
            sock.settimeout(2)
            sock.connect((tbm.TARGET_IP, tbm.TARGET_HTTP_PORT))
        finally:
            sock.close()


@pytest.mark.netns
@SKIP_NO_NETNS
@pytest.mark.timeout(120)
def test_target_route_to_fake_clients_follows_the_mode(testbed: tbm.Testbed) -> None:
    assert f"{tbm.FAKE_CLIENT_NET} via {tbm.ONLINE_SERVER_SIDE_IP}" in testbed.routes("target")
    testbed.set_mode(tbm.ADVANCED)
    routes = testbed.routes("target")
    assert f"{tbm.FAKE_CLIENT_NET} via {tbm.ASSISTANT_IP}" in routes
    assert tbm.ONLINE_SERVER_SIDE_IP not in routes


def _add_counter(tb: tbm.Testbed, role: str) -> None:
    tb.run(
        role,
        "iptables",
        "-w",
        "-t",
        "raw",
        "-A",
        "PREROUTING",
        "-s",
        tbm.TARGET_IP,
        "-d",
        tbm.FAKE_CLIENT_NET,
    )


def _counter(tb: tbm.Testbed, role: str) -> int:
    return sum(
        p
        for p, _, rule in tb.iptables_counters(role)
        if tbm.FAKE_CLIENT_NET in rule and tbm.TARGET_IP in rule
    )


@pytest.mark.netns
@SKIP_NO_NETNS
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", [tbm.TRADITIONAL, tbm.ADVANCED])
def test_target_packets_never_reach_the_client(testbed: tbm.Testbed, mode: str) -> None:
    # Positive control: the client's leak counter does count (online → client from 198.18.2.2).
    assert testbed.client_leak_packets() == 0
    tbm.send_udp(testbed.ns("online"), tbm.ONLINE_SERVER_SIDE_IP, tbm.CLIENT_IP, 9, b"control")
    tbm.wait_until(lambda: testbed.client_leak_packets() == 1, 5, what="client leak counter = 1")

    testbed.set_mode(mode)
    hop = "online" if mode == tbm.TRADITIONAL else "assistant"
    _add_counter(testbed, hop)
    for i in range(5):
        tbm.send_udp(testbed.ns("target"), None, f"198.19.1.{i + 1}", 9, b"response-like")
    # The packets really left the target towards the next hop ...
    tbm.wait_until(lambda: _counter(testbed, hop) == 5, 5, what=f"5 packets counted at {hop}")
    # ... and went no further: the client still counts only the control packet.
    assert testbed.client_leak_packets() == 1
    with pytest.raises(OSError):  # and the target has no route to the client at all
        tbm.send_udp(testbed.ns("target"), None, tbm.CLIENT_IP, 9, b"x")


@pytest.mark.netns
@SKIP_NO_NETNS
@pytest.mark.timeout(120)
def test_loadgen_against_online(testbed: tbm.Testbed) -> None:
    ka = testbed.loadgen("keepalive", "--connections", "10", "--requests", "200")
    sc = testbed.loadgen("short", "--requests", "50")
    post = testbed.loadgen("post", "--size", "1048576", "--seed", "7", "--tag", "t1")
    get = testbed.loadgen("get", "--path", tbm.BIG_FILE_PATH)
    assert (ka["ok"], ka["failed"], sc["ok"], sc["failed"]) == (200, 0, 50, 0)
    log = testbed.access_log("online")
    groups = tbm.group_by_connection(tbm.with_prefix(log, "/ka/"))
    assert sorted(groups.values()) == sorted(
        [[f"/ka/{c}/{i}" for i in range(20)] for c in range(10)]
    )
    short = tbm.group_by_connection(tbm.with_prefix(log, "/sc/"))
    assert len(short) == 50 and all(len(v) == 1 for v in short.values())
    # The POST body arrived intact (nginx kept it in a file) and the big GET is complete.
    (upload,) = tbm.with_prefix(log, "/upload/")
    assert testbed.body_file_sha256("online", upload) in (post["sha256"], None)
    if tbm.NGINX_ECHO_MODULE.exists():
        assert testbed.body_file_sha256("online", upload) == post["sha256"]
    assert upload.request_length > 1048576
    (big,) = tbm.with_prefix(log, tbm.BIG_FILE_PATH)
    assert big.body_bytes_sent == tbm.BIG_FILE_BYTES == get["bytes_received"]
    assert get["sha256"] == hashlib.sha256(tbm.big_file_content()).hexdigest()


@pytest.mark.netns
@SKIP_NO_NETNS
@pytest.mark.timeout(120)
def test_preopen_loadgen_waits_for_go(testbed: tbm.Testbed) -> None:
    lg = testbed.spawn_loadgen(
        "preopen", "--connections", "4", "--requests", "20", "--go-timeout", "30"
    )
    assert '"ready": true' in lg.popen.stdout.readline()
    log = testbed.access_log("online")
    assert sorted(r.uri for r in log) == sorted(f"/mid/{c}/0" for c in range(4))
    out, _ = lg.popen.communicate("go\n", timeout=60)
    summary = tbm.json.loads(out.strip().splitlines()[-1])
    assert (summary["ok"], summary["failed"]) == (20, 0)
    groups = tbm.group_by_connection(tbm.with_prefix(testbed.access_log("online"), "/mid/"))
    assert sorted(groups.values()) == sorted(
        [[f"/mid/{c}/{i}" for i in range(5)] for c in range(4)]
    )


@pytest.mark.netns
@SKIP_NO_NETNS
@pytest.mark.timeout(120)
def test_redis_benchmark_counts(testbed: tbm.Testbed) -> None:
    testbed.redis_benchmark("-n", "500", "-c", "5", "-t", "set,get", "-q")
    testbed.redis_benchmark("-n", "480", "-c", "5", "-t", "incr", "-P", "16", "-q")
    stats = testbed.redis_stats("online")
    assert (stats["set"], stats["get"], stats["incr"]) == (500, 500, 480)
    assert "set" not in testbed.redis_stats("target")


@pytest.mark.netns
@SKIP_NO_NETNS
@pytest.mark.timeout(120)
def test_tcpdump_capture_is_complete(testbed: tbm.Testbed, tmp_path: Path) -> None:
    pcap = tmp_path / "cap.pcap"
    dump = testbed.start_tcpdump(pcap)
    res = testbed.loadgen("short", "--requests", "30", "--rate", "100")
    assert res["ok"] == 30
    tbm.wait_until(
        lambda: (s := tbm.summarize_pcap(pcap, 80)).syns_to_port == 30 and s.fins_to_port == 30,
        10,
        what="30 SYNs and 30 client FINs in the pcap",
    )
    assert dump.stop(tbm.signal.SIGINT) == 0
    summary = tbm.summarize_pcap(pcap, 80)
    assert summary.syns_to_port == 30
    # 30 connections paced at 100/s span at least 0.29 s of capture time.
    assert 0.25 < summary.duration_s < 5


@pytest.mark.netns
@SKIP_NO_NETNS
@pytest.mark.timeout(60)
def test_close_removes_namespaces_and_stale_ones(tmp_path: Path) -> None:
    tb = tbm.Testbed(tmp_path / "tb", with_redis=False).start()
    names = set(tb.namespaces.values())
    pids = [p.pid for p in tb.procs]
    assert names <= set(tbm.list_netns())
    tb.close()
    tb.close()  # idempotent
    assert not names & set(tbm.list_netns())
    assert all(not tbm._pid_alive(p) or tbm._is_zombie(p) for p in pids)

    dead_pid = _dead_pid()
    stale = f"tc{dead_pid}-1-sw"
    tbm._sh(["ip", "netns", "add", stale])
    try:
        assert stale in tbm.cleanup_stale_namespaces()
        assert stale not in tbm.list_netns()
    finally:
        tbm.delete_netns(stale)


def _dead_pid() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) - 1
    while tbm._pid_alive(pid):
        pid -= 1
    return pid


def _spoofed_syn(src: str, dst: str, sport: int, dport: int) -> bytes:
    """An IPv4 TCP SYN with valid checksums, as tcpcopy-mp would send it for a fake client."""
    import struct

    def csum(data: bytes) -> int:
        if len(data) % 2:
            data += b"\0"
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return ~total & 0xFFFF

    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x02, 65535, 0, 0)
    tcp = (
        tcp[:16]
        + struct.pack("!H", csum(s + d + struct.pack("!BBH", 0, 6, len(tcp)) + tcp))
        + tcp[18:]
    )
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, s, d)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return ip + tcp


@pytest.mark.netns
@SKIP_NO_NETNS
@pytest.mark.timeout(120)
def test_spoofed_fake_client_syn_is_answered_towards_the_route(testbed: tbm.Testbed) -> None:
    """What tcpcopy-mp relies on: a raw packet from online with a 198.19.x source passes the
    target's rp_filter, and the target's SYN-ACK leaves towards the online host."""
    testbed.run(
        "target", "iptables", "-w", "-t", "raw", "-A", "PREROUTING", "-s", tbm.FAKE_CLIENT_NET
    )
    testbed.run("target", "iptables", "-w", "-t", "raw", "-A", "OUTPUT", "-d", tbm.FAKE_CLIENT_NET)
    _add_counter(testbed, "online")

    def send() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            sock.sendto(_spoofed_syn("198.19.1.1", tbm.TARGET_IP, 40000, 8080), (tbm.TARGET_IP, 0))
        finally:
            sock.close()

    tbm.in_netns(testbed.ns("online"), send)

    def counts() -> tuple[int, int]:
        rows = testbed.iptables_counters("target")
        inbound = sum(p for p, _, r in rows if "PREROUTING" in r)
        outbound = sum(p for p, _, r in rows if "OUTPUT" in r)
        return inbound, outbound

    tbm.wait_until(lambda: counts()[0] == 1 and counts()[1] >= 1, 5, what="SYN in, SYN-ACK out")
    tbm.wait_until(lambda: _counter(testbed, "online") >= 1, 5, what="SYN-ACK at online")
    assert testbed.client_leak_packets() == 0
