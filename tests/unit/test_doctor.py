"""The doctors' pure parts: parsers of what the host says, finding lines, and the checks'
decisions on a fake host (canned /proc files and command outputs; nothing is run)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import pytest

from engine.app import doctor as d
from engine.codec.packet import ip_from_str
from engine.errors import ConfigError
from engine.io import hostcheck as hc
from intercept import doctor as idoc

# -- findings ---------------------------------------------------------------------------------


def test_finding_lines_and_exit_status():
    ok = hc.Finding("ok", "capabilities", "CAP_NET_RAW present")
    warn = hc.Finding("warn", "mtu", "close", "ip link set dev eth0 mtu 1500")
    fail = hc.Finding("fail", "route", "no route", "ip route add 198.19.1.0/24 dev eth0")
    assert ok.line() == "[ok] capabilities: CAP_NET_RAW present"
    assert warn.line() == "[warn] mtu: close — fix: ip link set dev eth0 mtu 1500"
    assert fail.line() == "[FAIL] route: no route — fix: ip route add 198.19.1.0/24 dev eth0"
    assert hc.exit_status([ok, warn]) == 0
    assert hc.exit_status([ok, warn, fail]) == 1
    assert hc.render_text([ok, fail]) == ok.line() + "\n" + fail.line() + "\n"
    obj = json.loads(hc.render_json([ok, fail], d.PROG))
    assert obj["status"] == 1
    assert obj["findings"][1] == {
        "severity": "fail",
        "check": "route",
        "message": "no route",
        "fix": "ip route add 198.19.1.0/24 dev eth0",
    }


# -- parsers ----------------------------------------------------------------------------------

STATUS = "Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t0000000000003000\n"


def test_cap_eff():
    eff = hc.parse_cap_eff(STATUS)
    assert eff == 0x3000
    assert eff >> hc.CAP_NET_ADMIN & 1 and eff >> hc.CAP_NET_RAW & 1
    assert hc.parse_cap_eff("Name:\tx\n") is None


def test_route_get_variants():
    r = hc.parse_route_get(
        0, "198.19.1.1 via 198.18.2.2 dev eth0 src 198.18.2.3 uid 0 \n    cache \n", ""
    )
    assert (r.kind, r.via, r.dev, r.src, r.reachable) == (
        "unicast", "198.18.2.2", "eth0", "198.18.2.3", True,
    )  # fmt: skip
    assert r.describe() == "via 198.18.2.2 dev eth0"
    r = hc.parse_route_get(0, "198.18.2.3 dev eth0 src 198.18.2.2 uid 0 \n    cache \n", "")
    assert (r.kind, r.via, r.dev) == ("unicast", "", "eth0")
    r = hc.parse_route_get(0, "local 198.18.2.3 dev lo src 198.18.2.3 uid 0 \n", "")
    assert (r.kind, r.dev) == ("local", "lo")
    r = hc.parse_route_get(2, "", "RTNETLINK answers: Network is unreachable\n")
    assert not r.reachable and r.reason == "Network is unreachable"
    assert not hc.parse_route_get(0, "blackhole 198.19.1.1 uid 0\n", "").reachable


def test_addr_show_and_link_mtu():
    text = (
        "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"
        "2: eth0    inet 198.18.2.3/24 brd 198.18.2.255 scope global eth0\\  valid_lft forever\n"
        "5: vlan10@eth0    inet 198.18.9.1/30 scope global vlan10\n"
    )
    assert hc.parse_addr_show(text) == [
        ("lo", ip_from_str("127.0.0.1"), 8),
        ("eth0", ip_from_str("198.18.2.3"), 24),
        ("vlan10", ip_from_str("198.18.9.1"), 30),
    ]
    link = "2: eth0@if3: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 9000 qdisc noqueue state UP"
    assert hc.parse_link_mtu(link) == 9000
    assert hc.parse_link_mtu("") is None


IPTABLES_S = """-P OUTPUT ACCEPT
-A OUTPUT -p tcp -m tcp --sport 8080 -m comment --comment intercept-mp -j NFQUEUE --queue-num 0
-A OUTPUT -p tcp -m tcp --sport 6379 -j ACCEPT
-A OUTPUT -p tcp -m multiport --sports 9000:9010,9100 -j NFQUEUE --queue-balance 2:3
-A OUTPUT -p udp -m udp --sport 53 -j NFQUEUE --queue-num 0
-A INPUT -p tcp -m tcp --dport 8080 -j NFQUEUE --queue-num 0
"""
NEGATED = "-A OUTPUT -p tcp -m tcp ! --sport 22 -j NFQUEUE --queue-num 5 --queue-bypass\n"


def test_nfqueue_rules():
    rules = hc.parse_nfqueue_rules(IPTABLES_S + NEGATED, "OUTPUT")
    assert len(rules) == 4  # the ACCEPT rule and the INPUT rule are not NFQUEUE/OUTPUT
    r8080, rmulti, rudp, rneg = rules
    assert r8080.sports == ((8080, 8080),) and (r8080.queue_lo, r8080.queue_hi) == (0, 0)
    assert r8080.matches_port(8080) and not r8080.matches_port(80)
    assert r8080.uses_queue(0) and not r8080.uses_queue(1)
    assert rmulti.matches_port(9005) and rmulti.matches_port(9100) and not rmulti.matches_port(9011)
    assert rmulti.uses_queue(3) and not rmulti.uses_queue(0)
    assert rneg.negated and rneg.matches_port(8080) and not rneg.matches_port(22)
    assert not rudp.matches_port(53)  # udp: never a TCP response
    legacy = hc.parse_nfqueue_rules("-A OUTPUT -p tcp --sport 80 -j QUEUE\n")
    assert legacy[0].matches_port(80) and legacy[0].uses_queue(0)


def test_ss_listeners():
    text = (
        'LISTEN 0      5        198.18.2.3:36524      0.0.0.0:*    users:(("intercept-mp",'
        "pid=4242,fd=3))\n"
        'LISTEN 0      511         0.0.0.0:8080       0.0.0.0:*    users:(("nginx",pid=7,fd=6),'
        '("nginx",pid=8,fd=6))\n'
        "LISTEN 0      128           [::]:22             [::]:*\n"
    )
    ls = hc.parse_ss_listeners(text)
    assert [(x.address, x.port) for x in ls] == [
        ("198.18.2.3", 36524),
        ("0.0.0.0", 8080),
        ("::", 22),
    ]
    assert ls[0].users == (("intercept-mp", 4242),)
    assert ls[1].users == (("nginx", 7), ("nginx", 8))
    assert ls[2].users == ()


def test_small_helpers():
    assert hc.parse_int_text("1\n") == 1 and hc.parse_int_text(None) is None
    assert hc.parse_int_text("x") is None
    assert hc.sysctl_key("net", "ipv4", "conf", "eth0.100", "rp_filter") == (
        "net.ipv4.conf.eth0/100.rp_filter"
    )
    pool = [ip_from_str(f"198.19.1.{i}") for i in range(1, 255)]
    assert hc.covering_network(pool) == "198.19.1.0/24"
    assert hc.covering_network([ip_from_str("198.19.1.7")]) == "198.19.1.7/32"
    assert hc.covering_network([ip_from_str("198.19.1.7"), ip_from_str("198.19.2.7")]) == (
        "198.19.0.0/22"
    )
    assert idoc.parse_nfqueue_status("    0  31337     0 2  120     4     1       99  1\n") == {
        0: (31337, 0, 4, 1)
    }
    assert idoc._filter_ports("tcp and (src port 8080 or src port 6379)") == (8080, 6379)
    assert idoc._filter_ports("tcp port 80") == (80,)


# -- checks on a fake host ----------------------------------------------------------------------


class FakeHost(hc.Host):
    def __init__(self, files: dict[str, str], commands: dict[tuple[str, ...], tuple]):
        self.files = files
        self.commands = commands
        self.ran: list[tuple[str, ...]] = []

    def read(self, path: str) -> str | None:
        return self.files.get(path)

    def run(self, argv: Sequence[str]) -> hc.CommandResult:
        key = tuple(argv)
        self.ran.append(key)
        rc, out, err = self.commands.get(key, (1, "", "not faked"))
        return hc.CommandResult(rc, out, err)


ADDRS = (
    "1: lo    inet 127.0.0.1/8 scope host lo\n"
    "2: eth0    inet 198.18.2.3/24 brd 198.18.2.255 scope global eth0\n"
)
ROUTE_OK = (0, "198.19.1.1 via 198.18.2.2 dev eth0 src 198.18.2.3 uid 0\n", "")
NO_ROUTE = (2, "", "RTNETLINK answers: Network is unreachable\n")


def target_host(**over) -> FakeHost:
    files = {
        "/proc/self/status": "CapEff:\t000001ffffffffff\n",
        "/proc/sys/net/ipv4/conf/all/rp_filter": "0\n",
        "/proc/sys/net/ipv4/conf/eth0/rp_filter": "0\n",
        "/proc/sys/net/netfilter/nf_conntrack_count": "10\n",
        "/proc/sys/net/netfilter/nf_conntrack_max": "1000\n",
    }
    files.update(over.pop("files", {}))
    commands = {
        ("ip", "-o", "-4", "addr", "show"): (0, ADDRS, ""),
        ("ss", "-Hltnp", "sport = :36524"): (0, "", ""),
        ("iptables", "-w", "5", "-t", "filter", "-S", "OUTPUT"): (0, IPTABLES_S, ""),
        ("iptables", "-w", "5", "-t", "mangle", "-S", "OUTPUT"): (0, "-P OUTPUT ACCEPT\n", ""),
        ("iptables", "-w", "5", "-t", "raw", "-S", "OUTPUT"): (0, "-P OUTPUT ACCEPT\n", ""),
    }
    for i in (1, 85, 170, 254):
        commands[("ip", "route", "get", f"198.19.1.{i}")] = ROUTE_OK
    commands.update(over.pop("commands", {}))
    return FakeHost(files, commands)


def by_check(findings: list[hc.Finding]) -> dict[str, hc.Finding]:
    return {f.check: f for f in findings}


def traditional(*extra: str) -> idoc.InterceptDoctorOptions:
    opts, _ = idoc.parse_args(
        ["--queue-num", "0", "--target-port", "8080", "-c", "198.19.1.x", *extra]
    )
    return opts


def test_intercept_traditional_healthy():
    findings = idoc.intercept_checks(target_host(), traditional())
    assert all(f.severity == "ok" for f in findings), hc.render_text(findings)
    assert "NFQUEUE rule --sport 8080" in by_check(findings)


def test_intercept_missing_rule_names_the_command():
    findings = idoc.intercept_checks(target_host(), traditional("--target-port", "8081"))
    f = by_check(findings)["NFQUEUE rule --sport 8081"]
    assert f.severity == "fail"
    assert f.fix == "iptables -I OUTPUT -p tcp --sport 8081 -j NFQUEUE --queue-num 0"
    # The wrong queue number is a different mistake with a different fix.
    opts, _ = idoc.parse_args(["--queue-num", "1", "--target-port", "8080", "-c", "198.19.1.x"])
    f = by_check(idoc.intercept_checks(target_host(), opts))["NFQUEUE rule --sport 8080"]
    assert f.severity == "fail" and "queue 0" in f.message and "--queue-num 0" in f.fix
    # The first matching rule takes the packet: raw's catch-all to queue 5 shadows filter's.
    host = target_host(
        commands={("iptables", "-w", "5", "-t", "raw", "-S", "OUTPUT"): (0, NEGATED, "")}
    )
    f = by_check(idoc.intercept_checks(host, traditional()))["NFQUEUE rule --sport 8080"]
    assert f.severity == "fail" and "raw OUTPUT sends port 8080 to queue 5" in f.message


def test_intercept_install_rule_before_start_is_fine():
    opts, _ = idoc.parse_args(["--install-rule", "8081", "-c", "198.19.1.x"])
    f = by_check(idoc.intercept_checks(target_host(), opts))["NFQUEUE rule --sport 8081"]
    assert f.severity == "ok" and "--install-rule" in f.message


def test_intercept_pool_route_missing():
    cmds = {("ip", "route", "get", f"198.19.1.{i}"): NO_ROUTE for i in (1, 85, 170, 254)}
    findings = idoc.intercept_checks(target_host(commands=cmds), traditional())
    f = by_check(findings)["route for the client pool"]
    assert f.severity == "fail" and "Network is unreachable" in f.message
    assert f.fix.startswith("ip route add 198.19.1.0/24 dev eth0")
    # rp_filter=0: no rp_filter complaint on top.
    assert by_check(findings)["rp_filter"].severity == "ok"


def test_rp_filter_strict_is_a_warning_on_the_route_device_and_a_failure_elsewhere():
    files = {"/proc/sys/net/ipv4/conf/eth0/rp_filter": "1\n"}
    f = by_check(idoc.intercept_checks(target_host(files=files), traditional()))["rp_filter eth0"]
    assert f.severity == "warn" and "strict" in f.message
    assert f.fix == "sysctl -w net.ipv4.conf.eth0.rp_filter=2"
    # The pool's route leaves through another device: the SYNs arriving on eth0 are dropped.
    other = (0, "198.19.1.1 dev dummy0 src 198.18.2.3 uid 0\n", "")
    cmds = {("ip", "route", "get", f"198.19.1.{i}"): other for i in (1, 85, 170, 254)}
    files["/proc/sys/net/ipv4/conf/all/rp_filter"] = "1\n"
    host = target_host(files=files, commands=cmds)
    f = by_check(idoc.intercept_checks(host, traditional()))["rp_filter eth0"]
    assert f.severity == "fail" and "dummy0" in f.message
    assert f.fix == "sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.eth0.rp_filter=2"


def test_listen_port_held_by_someone_else_and_by_intercept():
    other = 'LISTEN 0 5 0.0.0.0:36524 0.0.0.0:* users:(("nc",pid=99,fd=3))\n'
    host = target_host(commands={("ss", "-Hltnp", "sport = :36524"): (0, other, "")})
    f = by_check(idoc.intercept_checks(host, traditional()))["listen port 36524"]
    assert f.severity == "fail" and "nc (pid 99)" in f.message
    ours = 'LISTEN 0 5 198.18.2.3:36524 0.0.0.0:* users:(("python3",pid=98,fd=3))\n'
    host = target_host(
        commands={("ss", "-Hltnp", "sport = :36524"): (0, ours, "")},
        files={"/proc/98/cmdline": "/venv/bin/python\0/venv/bin/intercept-mp\0--queue-num\0"},
    )
    f = by_check(idoc.intercept_checks(host, traditional()))["listen port 36524"]
    assert f.severity == "ok" and "pid 98" in f.message


def test_advanced_ip_forward_and_devices():
    opts, _ = idoc.parse_args(["-i", "eth0", "-F", "tcp and src port 8080", "-c", "198.19.1.x"])
    assert opts.mode == "pcap" and opts.target_ports == (8080,)
    files = {"/proc/sys/net/ipv4/ip_forward": "1\n"}
    cmds = {("ip", "-o", "link", "show", "dev", "eth0"): (0, "2: eth0: <UP> mtu 1500\n", "")}
    findings = by_check(idoc.intercept_checks(target_host(files=files, commands=cmds), opts))
    assert findings["ip_forward"].severity == "fail"
    assert findings["ip_forward"].fix == "sysctl -w net.ipv4.ip_forward=0"
    assert findings["capture devices"].severity == "ok"
    files = {
        "/proc/sys/net/ipv4/ip_forward": "0\n",
        "/proc/sys/net/ipv4/conf/eth0/forwarding": "1\n",
    }
    findings = by_check(idoc.intercept_checks(target_host(files=files, commands=cmds), opts))
    assert findings["ip_forward"].severity == "fail"
    assert findings["ip_forward"].fix == "sysctl -w net.ipv4.conf.eth0.forwarding=0"
    opts, _ = idoc.parse_args(["-i", "nosuch0", "-F", "tcp"])
    findings = by_check(idoc.intercept_checks(target_host(files=files, commands=cmds), opts))
    assert (
        findings["capture devices"].severity == "fail"
        and "nosuch0" in findings["capture devices"].message
    )


def test_intercept_doctor_flags():
    with pytest.raises(ConfigError):
        idoc.parse_args(["--queue-num", "0", "-F", "tcp"])
    with pytest.raises(ConfigError):
        idoc.parse_args(["--target-port", "0"])
    opts, as_json = idoc.parse_args(["--install-rule", "80,8080", "--target-port", "80", "--json"])
    assert opts.target_ports == (80, 8080) and as_json and opts.mode == "nfqueue"


# -- tcpcopy-mp doctor's static checks ------------------------------------------------------------

ONLINE_ADDRS = (
    "2: cli0    inet 198.18.1.2/24 scope global cli0\n"
    "3: srv0    inet 198.18.2.2/24 scope global srv0\n"
)


def online_host(mtu: int = 1500, **over) -> FakeHost:
    files = {
        "/proc/self/status": "CapEff:\t0000000000002000\n",
        "/proc/sys/net/ipv4/conf/all/rp_filter": "0\n",
        "/proc/sys/net/ipv4/conf/srv0/rp_filter": "0\n",
    }
    files.update(over.pop("files", {}))
    commands = {
        ("ip", "-o", "-4", "addr", "show"): (0, ONLINE_ADDRS, ""),
        ("ip", "route", "get", "198.18.2.3"): (0, "198.18.2.3 dev srv0 src 198.18.2.2 uid 0\n", ""),
        ("ip", "-o", "link", "show", "dev", "srv0"): (
            0,
            f"3: srv0@if2: <UP> mtu {mtu} qdisc\n",
            "",
        ),
    }
    commands.update(over.pop("commands", {}))
    return FakeHost(files, commands)


def tcpcopy_inputs(pool: str = "198.19.1.x", mtu: int = 1500) -> d.TcpcopyInputs:
    from engine.core.rewrite import parse_client_pool

    return d.TcpcopyInputs(
        targets=((ip_from_str("198.18.2.3"), 8080),),
        intercepts=(("198.18.2.3", 36524),),
        pool=parse_client_pool(pool),
        pool_spec=pool,
        mtu=mtu,
    )


def no_probe(ip: str, port: int) -> hc.Finding:
    return hc.Finding("ok", f"intercept {ip}:{port}", "faked")


def test_tcpcopy_checks_healthy_and_broken():
    findings = d.tcpcopy_checks(online_host(), tcpcopy_inputs(), probe=no_probe)
    assert all(f.severity == "ok" for f in findings), hc.render_text(findings)
    names = [f.check for f in findings]
    assert names[:3] == ["capabilities", "rp_filter", "route to target 198.18.2.3:8080"]
    # No CAP_NET_RAW.
    host = online_host(files={"/proc/self/status": "CapEff:\t0000000000000000\n"})
    f = by_check(d.tcpcopy_checks(host, tcpcopy_inputs(), probe=no_probe))["capabilities"]
    assert f.severity == "fail" and "CAP_NET_RAW" in f.message
    # No route to the target.
    host = online_host(commands={("ip", "route", "get", "198.18.2.3"): NO_ROUTE})
    f = by_check(d.tcpcopy_checks(host, tcpcopy_inputs(), probe=no_probe))[
        "route to target 198.18.2.3:8080"
    ]
    assert f.severity == "fail" and f.fix.startswith("ip route add 198.18.2.3/32")
    # -M above the device MTU.
    f = by_check(d.tcpcopy_checks(online_host(mtu=1400), tcpcopy_inputs(), probe=no_probe))["mtu"]
    assert f.severity == "fail" and "1400" in f.message and f.fix.startswith("tcpcopy-mp -M 1400")


def test_tcpcopy_pool_with_target_and_own_address():
    inp = tcpcopy_inputs("198.18.2.3,198.18.2.2,198.19.1.5")
    findings = [
        f for f in d.tcpcopy_checks(online_host(), inp, probe=no_probe) if f.check == "client pool"
    ]
    assert {f.severity for f in findings} == {"warn"}
    text = hc.render_text(findings)
    assert "target address(es) 198.18.2.3" in text and "own address(es) 198.18.2.2" in text


@pytest.mark.parametrize(("count", "severity"), [("10", "ok"), ("850", "warn"), ("990", "fail")])
def test_conntrack_levels(count: str, severity: str):
    host = FakeHost(
        {
            "/proc/sys/net/netfilter/nf_conntrack_count": count,
            "/proc/sys/net/netfilter/nf_conntrack_max": "1000",
        },
        {},
    )
    f = hc.check_conntrack(host)
    assert f.severity == severity
    if severity != "ok":
        assert f.fix == "sysctl -w net.netfilter.nf_conntrack_max=2000"
    assert hc.check_conntrack(FakeHost({}, {})).severity == "ok"  # not loaded


def test_live_probe_refuses_without_a_pool():
    inp = d.TcpcopyInputs(targets=((ip_from_str("198.18.2.3"), 80),), intercepts=())
    sent: list[bytes] = []
    findings = d.live_probe(inp, 1.0, send=lambda pkt, dst: sent.append(pkt))
    assert [f.severity for f in findings] == ["fail"] and "-c" in findings[0].fix
    assert sent == []  # nothing may be sent from a real client's address


def test_tcpcopy_doctor_usage_errors(capsys):
    assert d.main(["--live", "0", "-x", "80-198.18.2.3:8080", "-s", "198.18.2.3"]) == 2
    assert "--live" in capsys.readouterr().err
    assert d.main(["-c", "198.19.1.x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-x" in err[0]


# -- -o DEV and -F ------------------------------------------------------------------------------

ARP_SRV0 = (
    "IP address       HW type     Flags       HW address            Mask     Device\n"
    "198.18.2.3       0x1         0x2         02:aa:bb:cc:dd:03     *        srv0\n"
)
ROUTE_SRV0 = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    "srv0\t000212C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
)


def link_host(arp: str = ARP_SRV0, mtu: str = "1500", hatype: str = "1") -> FakeHost:
    return online_host(
        files={
            "/sys/class/net/srv0/type": hatype + "\n",
            "/sys/class/net/srv0/mtu": mtu + "\n",
            "/sys/class/net/srv0/address": "02:aa:bb:cc:dd:02\n",
            "/proc/net/arp": arp,
            "/proc/net/route": ROUTE_SRV0,
            "/proc/sys/net/netfilter/nf_conntrack_count": "990\n",
            "/proc/sys/net/netfilter/nf_conntrack_max": "1000\n",
        },
        commands={
            ("iptables", "-w", "-S", "OUTPUT"): (
                0,
                "-P OUTPUT ACCEPT\n-A OUTPUT -d 198.18.2.3/32 -p tcp -m tcp --dport 8080 -j DROP\n",
                "",
            )
        },
    )


def link_inputs(**kw) -> d.TcpcopyInputs:
    kw.setdefault("target_macs", ((ip_from_str("198.18.2.3"), None),))
    return dataclasses.replace(tcpcopy_inputs(), output_interface="srv0", **kw)


def test_output_device_checks_device_mtu_neighbour_and_the_bypassed_ip_layer():
    findings = d.tcpcopy_checks(link_host(), link_inputs(), probe=no_probe)
    checks = by_check(findings)
    assert all(f.severity == "ok" for f in findings), hc.render_text(findings)
    assert "MAC 02:aa:bb:cc:dd:02, MTU 1500" in checks["output device srv0"].message
    assert "02:aa:bb:cc:dd:03 (neighbour table)" in checks["next hop of 198.18.2.3"].message
    bypass = checks["ip layer bypassed"].message
    assert "1 DROP/REJECT rule(s) in OUTPUT" in bypass and "conntrack 990 of 1000" in bypass
    # The raw IP path's checks are not made: a full conntrack table is no failure with -o.
    assert "conntrack" not in checks and "route to target 198.18.2.3:8080" not in checks


def test_output_device_failures_name_the_fix():
    probed: list[int] = []
    findings = d.tcpcopy_checks(
        link_host(arp=""), link_inputs(), probe=no_probe, neighbour_probe=probed.append
    )
    f = by_check(findings)["next hop of 198.18.2.3"]
    assert f.severity == "fail" and "after a probe" in f.message and "port@SRCMAC" in f.fix
    assert probed == [ip_from_str("198.18.2.3")]
    # A MAC given in -x needs no neighbour entry.
    inp = link_inputs(target_macs=((ip_from_str("198.18.2.3"), bytes.fromhex("021122334455")),))
    f = by_check(d.tcpcopy_checks(link_host(arp=""), inp, probe=no_probe))["next hop of 198.18.2.3"]
    assert f.severity == "ok" and "02:11:22:33:44:55 (from -x)" in f.message
    f = by_check(d.tcpcopy_checks(link_host(mtu="1400"), link_inputs(), probe=no_probe))["mtu"]
    assert f.severity == "warn" and "split" in f.message
    f = by_check(d.tcpcopy_checks(link_host(hatype="772"), link_inputs(), probe=no_probe))[
        "output device srv0"
    ]
    assert f.severity == "fail" and "not an Ethernet device" in f.message
    inp = dataclasses.replace(link_inputs(), output_interface="nosuch0")
    f = by_check(d.tcpcopy_checks(link_host(), inp, probe=no_probe))["output device nosuch0"]
    assert f.severity == "fail" and "no such network device" in f.message


def test_capture_filter_size_and_live_sample():
    from engine.codec.packet import TcpPacket, build

    inp = dataclasses.replace(
        tcpcopy_inputs(),
        capture_filter="not src host 198.18.1.11",
        transfer_pairs=((0, 80),),
    )
    f = d.check_capture_filter(inp)
    assert f.severity == "ok" and "instructions from libpcap" in f.message
    assert "in the kernel with the -x selection" in f.message

    def pkt(src: str) -> bytes:
        return build(
            TcpPacket(ip_from_str(src), ip_from_str("198.18.1.2"), 4000, 80, 1, 1, 0x18, 100)
        )

    sample = [pkt("198.18.1.10")] * 3 + [pkt("198.18.1.11")]
    f = d.check_capture_filter(inp, sample, 2.0)
    assert f.check == "capture filter sample"
    assert "of 4 packet(s) the -x selection captured in 2 s, -F " in f.message
    assert f.message.endswith("keeps 3 (75%)")
    f = d.check_capture_filter(inp, [pkt("198.18.1.11")], 2.0)
    assert f.severity == "warn"
