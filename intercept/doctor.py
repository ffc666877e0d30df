"""``intercept-mp doctor``: check the target (traditional) or assistant (advanced) host.

Theory of operation
-------------------
The same machinery as ``tcpcopy-mp doctor`` (engine/app/doctor.py: ``Finding``, ``Host``, the
parsers); only the checks differ.  The command line is the run's, with ``doctor`` in front:
``-i``/``-F`` select the advanced (pcap) checks, anything else the traditional (NFQUEUE) ones.
Two additions, because a run does not need them but the checks do: ``--target-port PORTS``
(the replayed service's port; also taken from ``--install-rule`` and from ``src port N`` in
``-F``) and ``-c/--clients POOL`` (tcpcopy-mp's ``-c``; intercept-mp's own ``-c``, a no-op
kept for C compatibility, is not needed by a doctor).

Why each check (spec §2.1, §5.1, design §2):

- traditional, on the target: the target's TCP answers a fake client only if (1) rp_filter
  lets the spoofed SYN in on the interface it arrives on, (2) a route for the pool exists
  (the routing decision comes *before* the OUTPUT hook, so without it the SYN-ACK dies before
  NFQUEUE sees it), and (3) the ``--sport PORT -j NFQUEUE --queue-num N`` rule hands the
  responses to intercept-mp's queue N;
- advanced, on the assistant: ``ip_forward`` must be 0, or the responses routed here are
  forwarded on towards the fake (or real) clients; the capture devices must exist;
- both: the listen port (36524) is free or already ours; the capabilities.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from engine import EXIT_USAGE
from engine.codec.packet import ip_to_str
from engine.errors import ConfigError
from engine.io.hostcheck import (
    CAP_NET_ADMIN,
    CAP_NET_RAW,
    FAIL,
    INFO,
    OK,
    WARN,
    Finding,
    Host,
    Listener,
    SystemHost,
    check_capabilities,
    check_conntrack,
    covering_network,
    exit_status,
    local_addresses,
    parse_nfqueue_rules,
    parse_ss_listeners,
    render_json,
    render_text,
    route_get,
    sysctl_int,
    sysctl_key,
)
from intercept import PROG as INTERCEPT_PROG
from intercept.errors import UsageError

__all__ = ["InterceptDoctorOptions", "intercept_checks", "main", "parse_args"]

PROG = f"{INTERCEPT_PROG} doctor"
NFQUEUE_TABLES = ("raw", "mangle", "filter")
"""An NFQUEUE target works in the OUTPUT chain of any of these; a locally generated packet
meets them in this order, and the first NFQUEUE rule that matches takes it."""
POOL_SAMPLES_MAX = 4


class InterceptDoctorOptions:
    """What the checks need from the command line."""

    def __init__(
        self,
        mode: str,
        queue_num: int = 0,
        target_ports: tuple[int, ...] = (),
        install_rule: tuple[int, ...] = (),
        pool: tuple[int, ...] = (),
        pool_spec: str = "",
        devices: tuple[str, ...] = (),
        filter_expr: str | None = None,
        port: int = 36524,
        bind: str = "0.0.0.0",
    ) -> None:
        self.mode = mode  # "nfqueue" (traditional) | "pcap" (advanced)
        self.queue_num = queue_num
        self.target_ports = target_ports
        self.install_rule = install_rule
        self.pool = pool
        self.pool_spec = pool_spec
        self.devices = devices
        self.filter_expr = filter_expr
        self.port = port
        self.bind = bind


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError("doctor", message)


def _ports(text: str) -> tuple[int, ...]:
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise argparse.ArgumentTypeError(f"{item!r} is not a port 1..65535")
        out.append(int(item))
    return tuple(dict.fromkeys(out))


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Check this host's setup for intercept-mp; prints one line per check.",
        allow_abbrev=False,
    )
    a = p.add_argument
    a("--queue-num", type=int, metavar="N", help="NFQUEUE number (traditional; default 0)")
    a("--install-rule", type=_ports, metavar="SPORT[,SPORT]", help="as the run's; ports checked")
    a("--target-port", type=_ports, metavar="PORT[,PORT]", help="the target service's port(s)")
    a("-c", "--clients", metavar="POOL", help="tcpcopy-mp's -c pool (e.g. 198.19.1.x)")
    a("-i", "--interfaces", metavar="DEV[,DEV]", help="capture devices (advanced)")
    a("-F", "--filter", metavar="BPF", help="capture filter (advanced)")
    a("-p", "--port", type=int, default=36524, help="listen port (36524)")
    a("-b", "--bind", default="0.0.0.0", metavar="IP", help="listen address")
    a("--json", action="store_true", help="one JSON object instead of lines")
    # The rest of the run's flags, accepted so "doctor" can be put in front of a command line.
    for flags, kw in (
        (("-x", "--pass"), {}),
        (("-q", "--queue-maxlen"), {}),
        (("-n", "--combine"), {}),
        (("-s", "--delay-table-size"), {}),
        (("-D", "--docker-map"), {}),
        (("-l", "--log"), {}),
        (("--log-format",), {}),
        (("--log-level",), {}),
        (("-P", "--pid-file"), {}),
        (("--summary-json",), {}),
    ):
        a(*flags, help=argparse.SUPPRESS, **kw)
    a("--secret-file", help=argparse.SUPPRESS)
    a("--max-routes-per-conn", help=argparse.SUPPRESS)
    a("-d", "--daemon", action="store_true", help=argparse.SUPPRESS)
    a("--allow-compat", action="store_true", help=argparse.SUPPRESS)
    return p


def _filter_ports(expr: str) -> tuple[int, ...]:
    """``tcp and src port 8080`` → (8080,); a bare ``port N`` counts when no ``src port``."""
    src = re.findall(r"\bsrc\s+port\s+(\d+)", expr)
    ports = src or re.findall(r"\bport\s+(\d+)", expr)
    return tuple(dict.fromkeys(int(p) for p in ports if 0 < int(p) <= 65535))


def parse_args(argv: Sequence[str]) -> tuple[InterceptDoctorOptions, bool]:
    """(options, --json); ConfigError on a bad flag."""
    from engine.core.rewrite import parse_client_pool

    try:
        a = _build_parser().parse_args(list(argv))
    except UsageError as exc:
        raise ConfigError(exc.where, exc.message) from None
    advanced = a.interfaces is not None or a.filter is not None
    if advanced and (a.queue_num is not None or a.install_rule):
        raise ConfigError("--queue-num", "NFQUEUE mode only; it cannot be used with -i/-F")
    pool = parse_client_pool(a.clients) if a.clients else ()
    ports = list(a.target_port or ()) + list(a.install_rule or ())
    if a.filter:
        ports += _filter_ports(a.filter)
    devices = tuple(d.strip() for d in (a.interfaces or "").split(",") if d.strip())
    return (
        InterceptDoctorOptions(
            mode="pcap" if advanced else "nfqueue",
            queue_num=a.queue_num or 0,
            target_ports=tuple(dict.fromkeys(ports)),
            install_rule=tuple(a.install_rule or ()),
            pool=pool,
            pool_spec=a.clients or "",
            devices=devices,
            filter_expr=a.filter,
            port=a.port,
            bind=a.bind,
        ),
        a.json,
    )


# ---------------------------------------------------------------------------------------------
# checks


def _is_intercept(host: Host, name: str, pid: int) -> bool:
    if name == "intercept-mp":
        return True
    cmdline = host.pid_cmdline(pid)
    return "intercept-mp" in cmdline or "intercept.cli" in cmdline


def _listeners(host: Host, port: int) -> list[Listener]:
    res = host.run(["ss", "-Hltnp", f"sport = :{port}"])
    return [x for x in parse_ss_listeners(res.out) if x.port == port]


def check_listen_port(host: Host, opts: InterceptDoctorOptions) -> tuple[Finding, bool]:
    """(finding, intercept-mp is running here)."""
    name = f"listen port {opts.port}"
    holders = _listeners(host, opts.port)
    if not holders:
        return Finding(OK, name, "free: intercept-mp can listen there"), False
    ours, others = [], []
    for lst in holders:
        for user in lst.users or (("?", 0),):
            (ours if user[1] and _is_intercept(host, *user) else others).append((lst, user))
    if others:
        lst, (pname, pid) = others[0]
        who = f"{pname} (pid {pid})" if pid else "another process"
        return (
            Finding(
                FAIL,
                name,
                f"held by {who} on {lst.address}:{opts.port}: intercept-mp cannot listen",
                f"stop {pname if pid else 'it'}, or run intercept-mp -p OTHER_PORT and "
                f"tcpcopy-mp -s IP:OTHER_PORT",
            ),
            bool(ours),
        )
    lst, (_, pid) = ours[0]
    return Finding(OK, name, f"intercept-mp (pid {pid}) listens on {lst.address}"), True


def parse_nfqueue_status(text: str) -> dict[int, tuple[int, int, int, int]]:
    """/proc/net/netfilter/nfnetlink_queue → {queue: (portid, waiting, queue_dropped,
    user_dropped)}; the columns are queue, peer portid, queue total, copy mode, copy range,
    queue dropped, user dropped, last id, 1."""
    out = {}
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 7 and all(c.isdigit() for c in cols[:7]):
            out[int(cols[0])] = (int(cols[1]), int(cols[2]), int(cols[5]), int(cols[6]))
    return out


def check_nfqueue_rules(host: Host, opts: InterceptDoctorOptions, running: bool) -> list[Finding]:
    from intercept.sources.nfqueue import rule_command

    q = opts.queue_num
    if not opts.target_ports:
        return [
            Finding(
                WARN,
                "NFQUEUE rule",
                "no target port given, so the rule cannot be checked",
                f"intercept-mp doctor --queue-num {q} --target-port PORT ...",
            )
        ]
    rules = []
    for table in NFQUEUE_TABLES:
        res = host.run(["iptables", "-w", "5", "-t", table, "-S", "OUTPUT"])
        if res.rc == 127:
            return [Finding(WARN, "NFQUEUE rule", f"cannot run iptables: {res.err.strip()}")]
        if res.rc == 0:
            rules += [(table, r) for r in parse_nfqueue_rules(res.out, "OUTPUT")]
    findings = []
    for port in opts.target_ports:
        name = f"NFQUEUE rule --sport {port}"
        matching = [(t, r) for t, r in rules if r.matches_port(port)]
        if matching and matching[0][1].uses_queue(q):
            table, rule = matching[0]
            findings.append(Finding(OK, name, f"{table} OUTPUT: {rule.text.strip()}"))
        elif matching:
            table, rule = matching[0]
            findings.append(
                Finding(
                    FAIL,
                    name,
                    f"{table} OUTPUT sends port {port} to queue {rule.queue_lo}, but "
                    f"intercept-mp binds --queue-num {q}",
                    f"intercept-mp --queue-num {rule.queue_lo} ...  (or: {rule_command(port, q)})",
                )
            )
        elif port in opts.install_rule and not running:
            findings.append(
                Finding(OK, name, "not present yet: intercept-mp --install-rule adds it at start")
            )
        else:
            findings.append(
                Finding(
                    FAIL,
                    name,
                    f"no OUTPUT rule queues the responses from port {port} to queue {q}: they "
                    "go back towards the fake clients and intercept-mp never sees them",
                    rule_command(port, q),
                )
            )
    status = parse_nfqueue_status(host.read("/proc/net/netfilter/nfnetlink_queue") or "")
    if q in status:
        portid, _, qdrop, udrop = status[q]
        if qdrop or udrop:
            findings.append(
                Finding(
                    WARN,
                    f"NFQUEUE {q}",
                    f"bound (portid {portid}); the kernel dropped {qdrop} responses (queue full) "
                    f"and {udrop} (netlink buffer full)",
                    "intercept-mp -q 65536 ...  (a longer queue)",
                )
            )
        else:
            findings.append(Finding(OK, f"NFQUEUE {q}", f"bound (portid {portid}), no drops"))
    elif running:
        findings.append(
            Finding(
                WARN,
                f"NFQUEUE {q}",
                "intercept-mp runs here but no process binds this queue (another --queue-num, "
                "or pcap mode?)",
                f"intercept-mp --queue-num {q} ...",
            )
        )
    return findings


def _pool_samples(pool: Sequence[int]) -> list[int]:
    if len(pool) <= POOL_SAMPLES_MAX:
        return list(pool)
    step = (len(pool) - 1) / (POOL_SAMPLES_MAX - 1)
    return list(dict.fromkeys(pool[round(i * step)] for i in range(POOL_SAMPLES_MAX)))


def _main_device(host: Host) -> str:
    devs = [dev for dev, _, _ in local_addresses(host) if dev != "lo"]
    return devs[0] if devs else "DEV"


def check_pool_route(host: Host, opts: InterceptDoctorOptions) -> tuple[list[Finding], str]:
    """(findings, device the pool's route leaves through: '' if none)."""
    if not opts.pool:
        return [
            Finding(
                WARN,
                "route for the client pool",
                "no -c given, so the route for tcpcopy-mp's fake clients cannot be checked",
                "intercept-mp doctor ... -c 198.19.1.x (tcpcopy-mp's -c)",
            )
        ], ""
    net = covering_network(opts.pool)
    findings, dev = [], ""
    bad = []
    for addr in _pool_samples(opts.pool):
        route = route_get(host, ip_to_str(addr))
        if not route.reachable:
            bad.append((addr, route.describe()))
        elif route.kind == "local":
            findings.append(
                Finding(
                    FAIL,
                    "route for the client pool",
                    f"{ip_to_str(addr)} is an address of this host: the target would answer "
                    "itself, not the replay",
                    "give tcpcopy-mp a -c pool of unused addresses, e.g. 198.19.1.x",
                )
            )
        else:
            dev = dev or route.dev
    if bad:
        addr, why = bad[0]
        findings.append(
            Finding(
                FAIL,
                "route for the client pool",
                f"ip route get {ip_to_str(addr)}: {why}: the target cannot send its SYN-ACK to "
                "a fake client (routing comes before the NFQUEUE rule), so nothing is replayed",
                f"ip route add {net} dev {_main_device(host)}  (or via the online host)",
            )
        )
    elif not findings:
        route = route_get(host, ip_to_str(opts.pool[0]))
        findings.append(
            Finding(
                OK, "route for the client pool", f"{ip_to_str(opts.pool[0])}: {route.describe()}"
            )
        )
    return findings, dev


def check_rp_filter(host: Host, pool_dev: str) -> list[Finding]:
    """rp_filter=1 (strict) drops a spoofed SYN unless the route back to its source leaves
    through the interface it came in on; the kernel uses max(all, DEV)."""
    all_v = sysctl_int(host, "net", "ipv4", "conf", "all", "rp_filter") or 0
    devs = list(dict.fromkeys(dev for dev, _, _ in local_addresses(host) if dev != "lo"))
    findings, fine = [], []
    for dev in devs:
        dev_v = sysctl_int(host, "net", "ipv4", "conf", dev, "rp_filter") or 0
        eff = max(all_v, dev_v)
        name = f"rp_filter {dev}"
        fix_parts = [f"{sysctl_key('net', 'ipv4', 'conf', dev, 'rp_filter')}=2"]
        if all_v == 1:
            fix_parts.insert(0, "net.ipv4.conf.all.rp_filter=2")
        fix = "sysctl -w " + " ".join(fix_parts)
        shown = f"{eff} (all={all_v}, {dev}={dev_v})"
        if eff == 1 and pool_dev == dev:
            findings.append(
                Finding(
                    WARN,
                    name,
                    f"{shown} strict: spoofed SYNs arriving on {dev} pass only because the "
                    f"pool's route also leaves through {dev}; loose (2) or 0 is safer",
                    fix,
                )
            )
        elif eff == 1:
            where = f"leaves through {pool_dev}" if pool_dev else "is unknown or missing"
            findings.append(
                Finding(
                    FAIL,
                    name,
                    f"{shown} strict: the fake clients' SYNs arriving on {dev} are dropped, "
                    f"because the route back to the pool {where}",
                    fix,
                )
            )
        else:
            fine.append(f"{dev}={eff}")
    if fine:
        findings.append(
            Finding(
                OK,
                "rp_filter",
                f"{', '.join(fine)} (0 off / 2 loose: spoofed client sources are accepted)",
            )
        )
    return findings


def check_capture_devices(host: Host, opts: InterceptDoctorOptions) -> list[Finding]:
    findings = []
    if not opts.filter_expr:
        findings.append(
            Finding(
                FAIL,
                "capture filter",
                "no -F: the pcap mode needs a filter that picks only the responses",
                "intercept-mp -i DEV -F 'tcp and src port TARGET_PORT'",
            )
        )
    missing = []
    for dev in opts.devices:
        if dev != "any" and host.run(["ip", "-o", "link", "show", "dev", dev]).rc != 0:
            missing.append(dev)
    if missing:
        findings.append(
            Finding(
                FAIL,
                "capture devices",
                f"no such device: {', '.join(missing)}",
                "ip -br link  (then -i the device the target's responses arrive on)",
            )
        )
    elif opts.devices:
        findings.append(Finding(OK, "capture devices", ", ".join(opts.devices)))
    return findings


def check_ip_forward(host: Host, opts: InterceptDoctorOptions) -> Finding:
    fwd = sysctl_int(host, "net", "ipv4", "ip_forward")
    name = "ip_forward"
    if fwd == 1:
        return Finding(
            FAIL,
            name,
            "1: the responses the target routes here are forwarded on, towards the clients "
            "(spec §5.1: the assistant must black-hole them)",
            "sysctl -w net.ipv4.ip_forward=0",
        )
    devs = opts.devices or tuple(dict.fromkeys(d for d, _, _ in local_addresses(host) if d != "lo"))
    on = [d for d in devs if sysctl_int(host, "net", "ipv4", "conf", d, "forwarding") == 1]
    if on:
        return Finding(
            FAIL,
            name,
            f"forwarding is on for {', '.join(on)}: responses arriving there are forwarded on",
            "sysctl -w "
            + " ".join(f"{sysctl_key('net', 'ipv4', 'conf', d, 'forwarding')}=0" for d in on),
        )
    if fwd is None:
        return Finding(WARN, name, "cannot read /proc/sys/net/ipv4/ip_forward")
    return Finding(OK, name, "0: responses routed here stop here (black hole)")


def check_pool_not_local(host: Host, opts: InterceptDoctorOptions) -> Finding | None:
    if not opts.pool:
        return None
    own = {addr for _, addr, _ in local_addresses(host)}
    mine = [a for a in opts.pool if a in own]
    if mine:
        return Finding(
            FAIL,
            "client pool",
            f"{ip_to_str(mine[0])} is an address of this host: its TCP stack would answer the "
            "target's responses with RSTs",
            "give tcpcopy-mp a -c pool of unused addresses, e.g. 198.19.1.x",
        )
    return Finding(OK, "client pool", f"-c {opts.pool_spec}: no address of this host")


def _advanced_route_note(host: Host, opts: InterceptDoctorOptions) -> Finding:
    addrs = local_addresses(host)
    mine = [ip_to_str(a) for d, a, _ in addrs if d in opts.devices] or [
        ip_to_str(a) for d, a, _ in addrs if d != "lo"
    ]
    here = mine[0] if mine else "THIS_HOST"
    sample = ip_to_str(opts.pool[0]) if opts.pool else "POOL_ADDRESS"
    net = covering_network(opts.pool) if opts.pool else "POOL/24"
    return Finding(
        INFO,
        "target route (check on the target)",
        f"on the target, ip route get {sample} must say 'via {here}'",
        f"on the target: ip route add {net} via {here}",
    )


def intercept_checks(host: Host, opts: InterceptDoctorOptions) -> list[Finding]:
    findings: list[Finding] = []
    if opts.mode == "nfqueue":
        findings.append(
            check_capabilities(host, {CAP_NET_ADMIN: "NFQUEUE and iptables"}, "intercept-mp")
        )
        listen, running = check_listen_port(host, opts)
        findings.append(listen)
        findings += check_nfqueue_rules(host, opts, running)
        route_findings, pool_dev = check_pool_route(host, opts)
        findings += route_findings
        findings += check_rp_filter(host, pool_dev)
        findings.append(check_conntrack(host))
    else:
        findings.append(check_capabilities(host, {CAP_NET_RAW: "pcap capture"}, "intercept-mp"))
        listen, _ = check_listen_port(host, opts)
        findings.append(listen)
        findings += check_capture_devices(host, opts)
        findings.append(check_ip_forward(host, opts))
        local = check_pool_not_local(host, opts)
        if local is not None:
            findings.append(local)
        findings.append(_advanced_route_note(host, opts))
    return findings


def main(argv: Sequence[str]) -> int:
    try:
        opts, as_json = parse_args(argv)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    findings = intercept_checks(SystemHost(), opts)
    text = render_json(findings, PROG) + "\n" if as_json else render_text(findings)
    sys.stdout.write(text)
    sys.stdout.flush()
    return exit_status(findings)
