"""``tcpcopy-mp doctor``: check the online host's setup and name the exact fix.

Theory of operation
-------------------
C TCPCopy's users mostly fail on routing, not on the program: the target has no route for the
fake clients, the NFQUEUE rule is missing, rp_filter drops spoofed SYNs, the assistant forwards
responses.  No C tool says which.  A doctor is a list of checks; each reads the host (files
under /proc, ``ip route get``, ``iptables -S``, ``ss``) through a ``Host`` object and returns
``Finding`` s: a severity, what is wrong and the command that fixes it.  Parsing of every
command's output is done by small pure functions below, so the unit tests feed them text.

``--live SECONDS`` walks C TCPCopy's troubleshooting tree for real (its README: "does the SYN
reach the target? does the SYN-ACK reach intercept? is there a RST right after the SYN?"):
announce one fake client with CLIENT_ADD on a compat connection to each ``-s`` intercept
(spec §1.2), send one SYN from a ``-c`` pool address to each ``-x`` target on a raw socket,
and wait for the response record (spec §1.3/§1.4).  SYN-ACK = the whole path works (the probe
connection is then reset); RST = nothing listens on the target port; nothing = the target's
route/NFQUEUE rule/intercept is wrong, and the finding says what to run on the target.

The intercept side (``intercept-mp doctor``) lives in intercept/doctor.py and shares the
Finding type, the Host and the parsers here.
"""

from __future__ import annotations

import dataclasses
import errno
import random
import re
import select
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence

from engine import EXIT_USAGE
from engine import PROG as TCPCOPY_PROG
from engine.codec import wire
from engine.codec.link import ARPHRD_ETHER
from engine.codec.packet import ACK, RST, SYN, TcpPacket, build, build_options, ip_to_str
from engine.errors import ConfigError, DecodeError
from engine.io.hostcheck import (
    CAP_NET_RAW,
    EXIT_OK,
    FAIL,
    INFO,
    OK,
    WARN,
    Finding,
    Host,
    Route,
    SystemHost,
    check_capabilities,
    check_conntrack,
    device_mtu,
    exit_status,
    local_addresses,
    parse_int_text,
    render_json,
    render_text,
    route_get,
    sysctl_int,
)

__all__ = ["TcpcopyInputs", "live_probe", "main", "probe_intercept", "tcpcopy_checks"]

PROG = f"{TCPCOPY_PROG} doctor"
CONNECT_TIMEOUT_S = 2.0
"""-s probe: a connect() to the intercept port that takes longer is a firewall or wrong IP."""
HANDSHAKE_HOLD_S = 0.3
"""After our version handshake a compat intercept stays silent and keeps the connection open
(spec §1.2: it closes only clients too old for it); a non-intercept server usually answers or
closes within this time."""
LIVE_TARGETS_MAX = 8
"""--live probes at most this many distinct -x targets (one SYN each: bounded by design)."""
PROBE_PORT_RANGE = (32768, 60999)
"""Client ports of the probe: Linux's ephemeral range, like a real client's."""
PROBE_WINDOW = 64240
PROBE_MSS_MAX = 1460
PROBE_WSCALE = 7


# ---------------------------------------------------------------------------------------------
# tcpcopy-mp doctor: the static checks


@dataclasses.dataclass(frozen=True, slots=True)
class TcpcopyInputs:
    """What the checks need from a run's command line."""

    targets: tuple[tuple[int, int], ...]
    """-x: (target ip, target port), distinct, in order."""
    intercepts: tuple[tuple[str, int], ...]
    """-s: (ip text, port)."""
    pool: tuple[int, ...] = ()
    """-c as given (target IPs *not* removed, so the doctor can say they are there)."""
    pool_spec: str = ""
    mtu: int = 1500
    mss: int = 1460
    output_interface: str | None = None
    """-o DEV: replayed packets leave as frames on DEV (engine/io/send.py LinkSender)."""
    target_macs: tuple[tuple[int, bytes | None], ...] = ()
    """-x: (target ip, its @MAC or None), distinct targets in order (used with -o)."""
    capture_filter: str = ""
    """-F as given."""
    transfer_pairs: tuple[tuple[int, int], ...] = ()
    """-x: (online ip, online port) of every entry: the capture's selection."""
    capture: str = "raw"
    interfaces: tuple[str, ...] = ()
    transfers: tuple = ()
    """-x as parsed (rewrite.TransferEntry): what the link sender of --live resolves."""


def _check_rp_filter_online(host: Host, devs: Sequence[str]) -> Finding:
    all_v = sysctl_int(host, "net", "ipv4", "conf", "all", "rp_filter")
    parts = [f"all={all_v}"]
    for dev in devs:
        parts.append(f"{dev}={sysctl_int(host, 'net', 'ipv4', 'conf', dev, 'rp_filter')}")
    # Sending spoofed sources is not filtered by rp_filter (it applies to received packets);
    # what matters is the target's setting: intercept-mp doctor checks it there.
    return Finding(
        OK,
        "rp_filter",
        f"{', '.join(parts)} (only the target's rp_filter can drop the replayed SYNs; "
        "run intercept-mp doctor there)",
    )


def _check_target_route(host: Host, ip: int, port: int) -> tuple[Finding, Route]:
    name = f"route to target {ip_to_str(ip)}:{port}"
    route = route_get(host, ip_to_str(ip))
    if not route.reachable:
        return (
            Finding(
                FAIL,
                name,
                f"{route.describe()}: replayed packets cannot be sent",
                f"ip route add {ip_to_str(ip)}/32 via GATEWAY dev DEVICE "
                "(the gateway/device that reaches the target)",
            ),
            route,
        )
    if route.kind == "local":
        return (
            Finding(
                WARN,
                name,
                "the target is an address of this host: replayed packets and their responses "
                "never leave it, and the responses reach this host's TCP stack",
                "replay to a separate test server",
            ),
            route,
        )
    return Finding(OK, name, route.describe()), route


def _check_mtu(host: Host, mtu: int, devs: Sequence[str]) -> Finding:
    mtus = {dev: device_mtu(host, dev) for dev in devs}
    known = {d: m for d, m in mtus.items() if m}
    if not known:
        return Finding(WARN, "mtu", f"-M {mtu}: cannot read the MTU of {', '.join(devs) or '-'}")
    low = {d: m for d, m in known.items() if m < mtu}
    if low:
        dev, dev_mtu = min(low.items(), key=lambda kv: kv[1])
        return Finding(
            FAIL,
            "mtu",
            f"-M {mtu} is larger than the MTU {dev_mtu} of {dev}, the way to the target: "
            "full-size replayed segments are refused (EMSGSIZE, DF set)",
            f"tcpcopy-mp -M {dev_mtu} ...  (or: ip link set dev {dev} mtu {mtu})",
        )
    listing = ", ".join(f"{d} {m}" for d, m in known.items())
    return Finding(OK, "mtu", f"-M {mtu} fits the device MTU ({listing})")


def _check_pool(host: Host, inp: TcpcopyInputs) -> list[Finding]:
    if not inp.pool:
        return [
            Finding(
                INFO,
                "client pool",
                "no -c: replayed connections keep the real client addresses, so the target "
                "must route responses for every real client to intercept (or NFQUEUE-drop them)",
                "",
            )
        ]
    out = []
    targets = {ip for ip, _ in inp.targets}
    clash = sorted(set(inp.pool) & targets)
    if clash:
        out.append(
            Finding(
                WARN,
                "client pool",
                f"-c {inp.pool_spec} contains the target address(es) "
                f"{', '.join(ip_to_str(i) for i in clash)}; they are skipped",
                f"-c {_pool_without(inp.pool, clash)}",
            )
        )
    own = {addr: dev for dev, addr, _ in local_addresses(host)}
    mine = sorted(a for a in inp.pool if a in own)
    if mine:
        out.append(
            Finding(
                WARN,
                "client pool",
                f"-c {inp.pool_spec} contains this host's own address(es) "
                f"{', '.join(ip_to_str(a) for a in mine)}: that works only in traditional "
                "mode (intercept drops the responses on the target); in advanced mode the "
                "target's route for them would also divert this host's own traffic",
                "use fake addresses, e.g. -c 198.19.1.x (from 198.18.0.0/15, never used)",
            )
        )
    if not out:
        out.append(
            Finding(
                OK,
                "client pool",
                f"-c {inp.pool_spec}: {len(inp.pool)} address(es), none a target or local",
            )
        )
    return out


def _pool_without(pool: Sequence[int], drop: Iterable[int]) -> str:
    gone = set(drop)
    kept = [ip_to_str(a) for a in pool if a not in gone]
    if len(kept) > 4:
        return f"{','.join(kept[:3])},...  (or another /24)"
    return ",".join(kept) or "198.19.1.x"


def probe_intercept(ip: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> Finding:
    """Connect, send the compat version handshake, and check the peer keeps quiet and open."""
    name = f"intercept {ip}:{port}"
    start_fix = (
        f"on {ip}: intercept-mp --queue-num 0 --install-rule TARGET_PORT (traditional) "
        f"or intercept-mp -i DEV -F 'tcp and src port TARGET_PORT' (advanced); "
        f"check with: intercept-mp doctor"
    )
    try:
        sock = socket.create_connection((ip, port), timeout=timeout)
    except ConnectionRefusedError:
        return Finding(FAIL, name, "connection refused: intercept-mp is not running", start_fix)
    except TimeoutError:
        return Finding(
            FAIL,
            name,
            f"no answer within {timeout:.0f} s (a firewall drops port {port}, or wrong address)",
            f"on {ip}: iptables -I INPUT -p tcp --dport {port} -j ACCEPT; and check -s",
        )
    except OSError as exc:
        return Finding(FAIL, name, f"cannot connect: {exc.strerror or exc}", start_fix)
    with sock:
        try:
            sock.sendall(wire.HANDSHAKE)
            readable, _, _ = select.select([sock], [], [], HANDSHAKE_HOLD_S)
            data = sock.recv(4096) if readable else None
        except OSError as exc:
            return Finding(
                FAIL, name, f"the connection broke after the handshake: {exc}", start_fix
            )
    if data is None:
        return Finding(OK, name, "accepts the compat handshake (version 6) and stays open")
    if data == b"":
        return Finding(
            FAIL,
            name,
            "closed the connection after our version-6 (compat) handshake: not a compatible "
            "intercept, or one started with --secret-file that refuses compat peers",
            f"run intercept-mp (or C intercept 1.0) on {ip}:{port}; with --secret-file, "
            "also --allow-compat for this check",
        )
    return Finding(
        FAIL,
        name,
        f"answered our handshake with {len(data)} bytes ({data[:16]!r}): another service "
        f"listens there, not intercept",
        f"point -s at the intercept's address:port (intercept-mp -p {port})",
    )


def tcpcopy_checks(
    host: Host,
    inp: TcpcopyInputs,
    probe: Callable[[str, int], Finding] = probe_intercept,
    neighbour_probe: Callable[[int], None] | None = None,
) -> list[Finding]:
    """The static checks of a run's command line (``neighbour_probe``: see check_output)."""
    findings = [
        check_capabilities(host, {CAP_NET_RAW: "raw sockets to capture and send"}, "tcpcopy-mp")
    ]
    devs: list[str] = []
    route_findings = []
    if inp.output_interface is None:
        for ip, port in inp.targets:
            finding, route = _check_target_route(host, ip, port)
            route_findings.append(finding)
            if route.reachable and route.dev and route.dev not in devs:
                devs.append(route.dev)
        findings.append(_check_rp_filter_online(host, devs))
    findings += route_findings
    findings += [probe(ip, port) for ip, port in inp.intercepts]
    findings += _check_pool(host, inp)
    if inp.output_interface is None:
        findings.append(check_conntrack(host))
        if devs:
            findings.append(_check_mtu(host, inp.mtu, devs))
    else:
        findings += check_output(host, inp, neighbour_probe)
    if inp.capture_filter:
        findings.append(check_capture_filter(inp))
    return findings


# ---------------------------------------------------------------------------------------------
# -o DEV (link-layer send) and -F (capture filter)

NEIGHBOUR_WAIT_S = 1.0
"""How long the doctor waits for a probed neighbour entry to appear."""


def check_output(
    host: Host,
    inp: TcpcopyInputs,
    neighbour_probe: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[Finding]:
    """-o DEV: the device (Ethernet, its MAC and MTU), each target's next-hop MAC, and what
    is no longer on the replay path.  ``neighbour_probe(addr)`` asks the kernel to resolve an
    absent entry (None: report it absent without probing)."""
    from engine.codec import link

    dev = inp.output_interface or ""
    name = f"output device {dev}"
    base = f"/sys/class/net/{dev}"
    hatype = parse_int_text(host.read(f"{base}/type"))
    mtu = parse_int_text(host.read(f"{base}/mtu"))
    mac = link.mac_from_text((host.read(f"{base}/address") or "").strip())
    if hatype is None or mtu is None:
        return [Finding(FAIL, name, "no such network device", "ip -o link show  (pick one)")]
    if hatype != ARPHRD_ETHER or mac is None:
        return [
            Finding(
                FAIL,
                name,
                f"not an Ethernet device (type {hatype}): frames need a MAC header",
                "-o DEV must name the Ethernet device that reaches the target",
            )
        ]
    findings = [Finding(OK, name, f"Ethernet, MAC {link.mac_to_text(mac)}, MTU {mtu}")]
    if mtu < inp.mtu:
        findings.append(
            Finding(
                WARN,
                "mtu",
                f"-M {inp.mtu} is larger than {dev}'s MTU {mtu}: larger packets are split to "
                f"{mtu} bytes before they are sent",
                f"tcpcopy-mp -M {mtu} ...  (or: ip link set dev {dev} mtu {inp.mtu})",
            )
        )
    else:
        findings.append(Finding(OK, "mtu", f"-M {inp.mtu} fits {dev}'s MTU {mtu}"))
    routes = link.parse_proc_route(host.read("/proc/net/route") or "")
    macs = dict(inp.target_macs)
    hops = {ip: link.next_hop(routes, ip, dev) for ip, _ in inp.targets if macs.get(ip) is None}

    def neighbours() -> dict[int, bytes]:
        return link.resolve_macs(hops, link.parse_proc_arp(host.read("/proc/net/arp") or ""), dev)

    found = neighbours()
    missing = [ip for ip in hops if ip not in found]
    if missing and neighbour_probe is not None:
        for ip in missing:
            neighbour_probe(hops[ip])
        deadline = clock() + NEIGHBOUR_WAIT_S
        while missing and clock() < deadline:
            time.sleep(0.05)
            found = neighbours()
            missing = [ip for ip in hops if ip not in found]
    for ip, _ in dict.fromkeys(inp.targets):
        check = f"next hop of {ip_to_str(ip)}"
        given = macs.get(ip)
        if given is not None:
            findings.append(Finding(OK, check, f"{link.mac_to_text(given)} (from -x)"))
            continue
        hop = hops[ip]
        via = "on the link" if hop == ip else f"via gateway {ip_to_str(hop)}"
        if ip in found:
            findings.append(
                Finding(OK, check, f"{via}: {link.mac_to_text(found[ip])} (neighbour table)")
            )
        else:
            findings.append(
                Finding(
                    FAIL,
                    check,
                    f"{via}: no neighbour entry for {ip_to_str(hop)} on {dev}"
                    + (" after a probe" if neighbour_probe is not None else ""),
                    f"check that {ip_to_str(hop)} answers ARP on {dev} (arping -I {dev} "
                    f"{ip_to_str(hop)}), or give the MACs in -x: port@SRCMAC-ip:port@DSTMAC",
                )
            )
    findings.append(_check_bypassed(host, dev))
    return findings


def _check_bypassed(host: Host, dev: str) -> Finding:
    """With -o the replay does not go through this host's IP layer: say what no longer
    matters (OUTPUT rules that drop, the conntrack table's fill level)."""
    res = host.run(["iptables", "-w", "-S", "OUTPUT"])
    dropping = [
        line
        for line in (res.out if res.rc == 0 else "").splitlines()
        if re.search(r"-j (DROP|REJECT)\b", line)
    ]
    count = sysctl_int(host, "net", "netfilter", "nf_conntrack_count")
    limit = sysctl_int(host, "net", "netfilter", "nf_conntrack_max")
    parts = [f"{len(dropping)} DROP/REJECT rule(s) in OUTPUT"]
    parts.append(f"conntrack {count} of {limit}" if count is not None and limit else "conntrack")
    return Finding(
        OK,
        "ip layer bypassed",
        f"frames on {dev} skip this host's routing, OUTPUT chain, conntrack and rp_filter: "
        f"{' and '.join(parts)} do not apply to the replay",
    )


def check_capture_filter(
    inp: TcpcopyInputs, sample: Sequence[bytes] | None = None, seconds: float = 0.0
) -> Finding:
    """-F: the compiled program's size with the -x selection; with a live ``sample`` (the
    packets the -x selection kept in ``seconds``), how many -F keeps of them."""
    from engine.codec import bpf
    from engine.io.pcapfilter import compile_filter

    name = "capture filter"
    try:
        user = compile_filter(inp.capture_filter)
    except ConfigError as exc:
        return Finding(FAIL, name, str(exc), "fix the -F expression (tcpdump syntax, IP level)")
    pairs = inp.transfer_pairs or tuple((0, port) for _, port in inp.targets)
    try:
        total = len(bpf.capture_program(pairs, bpf.NET_BASE, user=user.program))
        where = f"{total} in the kernel with the -x selection (at most {bpf.BPF_MAXINSNS})"
    except bpf.ProgramTooLarge:
        where = "too large with the -x selection: the capture filters in Python"
    text = f"-F {user.expression!r}: {len(user.program)} instructions from libpcap, {where}"
    if sample is None:
        return Finding(OK, name, text)
    kept = sum(1 for ip in sample if user.matches(ip))
    share = f" ({kept / len(sample):.0%})" if sample else ""
    severity = WARN if sample and not kept else OK
    return Finding(
        severity,
        "capture filter sample",
        f"of {len(sample)} packet(s) the -x selection captured in {seconds:g} s, "
        f"-F {user.expression!r} keeps {kept}{share}",
        "the filter leaves out every packet: check the expression" if severity == WARN else "",
    )


def capture_sample(inp: TcpcopyInputs, seconds: float) -> list[bytes]:
    """The IPv4 packets the run's -x selection captures during ``seconds`` (bounded)."""
    from engine.io import capture

    prefilter = capture.TransferFilter.for_transfers(inp.transfers)
    if inp.capture == "packet":
        devs = [d for d in inp.interfaces if d != "any"] or [None]
        src = capture.open_live_source(devs[0], prefilter, 4 << 20)
    else:
        src = capture.open_live_source(None, prefilter, 4 << 20, host_only=True)
    out: list[bytes] = []
    deadline = time.monotonic() + seconds
    try:
        while (left := deadline - time.monotonic()) > 0 and len(out) < LIVE_SAMPLE_MAX:
            fd = src.fileno()
            if fd is not None:
                select.select([fd], [], [], min(left, 0.1))
            out += [ip for _, ip in src.read_batch(time.monotonic())]
    finally:
        src.close()
    return out[:LIVE_SAMPLE_MAX]


LIVE_SAMPLE_S = 3.0
"""--live with -F: the sample lasts at most this long."""
LIVE_SAMPLE_MAX = 10_000
"""--live with -F: at most this many packets are sampled."""


# ---------------------------------------------------------------------------------------------
# --live: one real replay connection attempt per target


def _sender_for(inp: TcpcopyInputs) -> Callable[[bytes, str], None]:
    """The probe SYN goes out the way the run sends: raw IP, or frames on -o DEV."""
    if inp.output_interface is None:
        return _raw_send

    def send_frame(pkt: bytes, dst: str) -> None:
        from engine.io import send

        try:
            sender = send.LinkSender(inp.output_interface or "", inp.transfers)
        except ConfigError as exc:
            raise OSError(errno.EHOSTUNREACH, str(exc)) from None
        try:
            if not sender.send(pkt):
                raise OSError(errno.EHOSTUNREACH, f"frame to {dst} refused (see the log)")
        finally:
            sender.close()

    return send_frame


def _raw_send(pkt: bytes, dst: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        s.sendto(pkt, (dst, 0))


def _target_fix(tport: int, pool_spec: str) -> str:
    return (
        f"on the target: intercept-mp doctor --queue-num 0 --target-port {tport} "
        f"-c {pool_spec}  (traditional; it checks the pool route, the NFQUEUE rule and "
        f"rp_filter); or on the assistant: intercept-mp doctor -i DEV -F 'tcp and src port "
        f"{tport}' -c {pool_spec} (advanced; and on the target: ip route get <pool address> "
        f"must go via the assistant)"
    )


def live_probe(
    inp: TcpcopyInputs,
    seconds: float,
    rng: random.Random | None = None,
    send: Callable[[bytes, str], None] = _raw_send,
) -> list[Finding]:
    """Announce + SYN + wait for the response record, once per -x target (see the header)."""
    if not inp.pool:
        return [
            Finding(
                FAIL,
                "live probe",
                "needs a -c pool: the probe SYN must come from a fake client address, never "
                "from a real client",
                "add -c 198.19.1.x (or your pool) to the doctor command",
            )
        ]
    rng = rng or random.SystemRandom()
    targets = {ip for ip, _ in inp.targets}
    pool = [a for a in inp.pool if a not in targets] or list(inp.pool)
    findings = []
    for tip, tport in list(dict.fromkeys(inp.targets))[:LIVE_TARGETS_MAX]:
        findings.append(_probe_target(inp, tip, tport, rng.choice(pool), rng, seconds, send))
    return findings


def _probe_target(
    inp: TcpcopyInputs,
    tip: int,
    tport: int,
    cip: int,
    rng: random.Random,
    seconds: float,
    send: Callable[[bytes, str], None],
) -> Finding:
    name = f"live probe {ip_to_str(tip)}:{tport}"
    cport = rng.randint(*PROBE_PORT_RANGE)
    isn = rng.getrandbits(32)
    who = f"{ip_to_str(cip)}:{cport}"
    # Step 1: announce (spec §1.2: CLIENT_ADD goes to every intercept before the SYN).
    conns: dict[socket.socket, tuple[str, int]] = {}
    problems = []
    announce = wire.HANDSHAKE + wire.client_add(cip, cport, tip, tport)
    for ip, port in inp.intercepts:
        try:
            sock = socket.create_connection((ip, port), timeout=CONNECT_TIMEOUT_S)
            sock.sendall(announce)
            conns[sock] = (ip, port)
        except OSError as exc:
            problems.append(f"{ip}:{port} {exc.strerror or exc}")
    try:
        if not conns:
            return Finding(
                FAIL,
                name,
                f"step 1 (announce the fake client): no intercept reachable "
                f"({'; '.join(problems)})",
                "start intercept-mp on the -s host(s); check with: intercept-mp doctor",
            )
        # Step 2: the SYN, as a replayed client's (spec §3.11: MSS, SACK, window scale).
        syn = TcpPacket(
            src=cip,
            dst=tip,
            sport=cport,
            dport=tport,
            seq=isn,
            flags=SYN,
            window=PROBE_WINDOW,
            options=build_options(
                mss=min(inp.mss, PROBE_MSS_MAX, inp.mtu - 40),
                sack_permitted=True,
                wscale=PROBE_WSCALE,
            ),
            ip_id=rng.getrandbits(16),
        )
        try:
            send(build(syn), ip_to_str(tip))
        except OSError as exc:
            return Finding(
                FAIL,
                name,
                f"step 2 (send the SYN from {who}): {exc.strerror or exc}",
                "run as root (CAP_NET_RAW); an EPERM with root means this host's iptables "
                "OUTPUT rejects spoofed sources: iptables -S OUTPUT",
            )
        # Step 3: the response record (spec §1.3), from whichever intercept captured it.
        rec, src, closed = _wait_record(conns, cip, cport, tip, tport, seconds)
        reset = rec is None or not rec.flags & RST
        if reset:
            _send_reset(send, cip, cport, tip, tport, isn, rng)
        if rec is None:
            extra = f"; {', '.join(closed)} closed the connection" if closed else ""
            return Finding(
                FAIL,
                name,
                f"CLIENT_ADD sent, SYN {who} → {ip_to_str(tip)}:{tport} sent, but no SYN-ACK "
                f"record within {seconds:g} s{extra}: either the SYN does not reach the target "
                "(its rp_filter/firewall), or the target has no route for the pool to the "
                "intercept host, or the NFQUEUE rule / the intercept's capture is missing",
                _target_fix(tport, inp.pool_spec or ip_to_str(cip)),
            )
        via = f"{src[0]}:{src[1]}"
        if rec.flags & RST:
            return Finding(
                FAIL,
                name,
                f"the target answered the SYN with RST (record via {via}): nothing listens on "
                f"{ip_to_str(tip)}:{tport}, or a firewall there rejects it",
                f"on the target: ss -ltn 'sport = :{tport}' must list the service; start it "
                "or correct -x",
            )
        if rec.flags & (SYN | ACK) == SYN | ACK and rec.ack == (isn + 1) & 0xFFFFFFFF:
            return Finding(
                OK,
                name,
                f"SYN from {who} answered by SYN-ACK, record delivered by intercept {via} "
                "(probe connection reset)",
            )
        return Finding(
            WARN,
            name,
            f"unexpected response record (flags {rec.flags:#04x}, ack {rec.ack}, expected "
            f"SYN-ACK ack {(isn + 1) & 0xFFFFFFFF}) via {via}: a stale connection on the "
            f"target for {who}?",
            "run the probe again (it uses a new port)",
        )
    finally:
        for sock in conns:
            sock.close()


def _wait_record(
    conns: dict[socket.socket, tuple[str, int]],
    cip: int,
    cport: int,
    tip: int,
    tport: int,
    seconds: float,
) -> tuple[TcpPacket | None, tuple[str, int], list[str]]:
    decoders = {s: wire.ResponseStreamDecoder() for s in conns}
    open_socks = list(conns)
    closed: list[str] = []
    deadline = time.monotonic() + seconds
    while open_socks:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        readable, _, _ = select.select(open_socks, [], [], left)
        for sock in readable:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                open_socks.remove(sock)
                closed.append("{}:{}".format(*conns[sock]))
                continue
            try:
                records = decoders[sock].feed(data)
            except DecodeError:
                open_socks.remove(sock)
                closed.append("{}:{} (bad frame)".format(*conns[sock]))
                continue
            for rec in records:
                # spec §1.5: a record is routed by the tuple we announced.
                if (rec.src, rec.sport, rec.dst, rec.dport) == (tip, tport, cip, cport):
                    return rec, conns[sock], closed
    return None, ("", 0), closed


def _send_reset(
    send: Callable[[bytes, str], None],
    cip: int,
    cport: int,
    tip: int,
    tport: int,
    isn: int,
    rng: random.Random,
) -> None:
    """Tear the probe down on the target (a half-open connection would linger there)."""
    rst = TcpPacket(
        src=cip,
        dst=tip,
        sport=cport,
        dport=tport,
        seq=(isn + 1) & 0xFFFFFFFF,
        flags=RST,
        window=0,
        ip_id=rng.getrandbits(16),
    )
    try:
        send(build(rst), ip_to_str(tip))
    except OSError:
        pass  # nothing more to do: the target's SYN-ACK retries time out by themselves


# ---------------------------------------------------------------------------------------------
# command line


def _split_doctor_flags(argv: Sequence[str]) -> tuple[list[str], bool, float | None]:
    """Take --json and --live SECONDS out; the rest is a run's command line."""
    rest: list[str] = []
    as_json = False
    live: float | None = None
    it = iter(argv)
    for arg in it:
        if arg == "--json":
            as_json = True
        elif arg == "--live" or arg.startswith("--live="):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            try:
                live = float(value) if value is not None else None
            except ValueError:
                live = None
            if live is None or not 0 < live <= 60:
                raise ConfigError("--live", f"{value!r}: give seconds in (0, 60]")
        else:
            rest.append(arg)
    return rest, as_json, live


USAGE = (
    "usage: tcpcopy-mp doctor -x SPEC -s IP[:PORT],... [-c POOL] [-M MTU] [other run flags] "
    "[--live SECONDS] [--json]"
)


def inputs_from_args(argv: Sequence[str]) -> TcpcopyInputs:
    """Validate a run's command line with the run's own parser (ConfigError on a mistake)."""
    from engine.app import arguments
    from engine.core import rewrite

    parser = arguments.build_parser()
    try:
        path = arguments.config_path(argv)
        if path:
            arguments.apply_config_file(parser, path)
        args = parser.parse_args(list(argv))
    except arguments.UsageError as exc:
        raise ConfigError("doctor", str(exc)) from None
    cfg = arguments.build_config(args)
    pool: tuple[int, ...] = ()
    if args.clients:
        pool = rewrite.parse_client_pool(args.clients)  # targets kept: the doctor reports them
    targets = tuple(dict.fromkeys((t.target_ip, t.target_port) for t in cfg.session.transfers))
    return TcpcopyInputs(
        targets=targets,
        intercepts=tuple(cfg.intercepts),
        pool=pool,
        pool_spec=args.clients or "",
        mtu=cfg.session.mtu,
        mss=cfg.session.mss,
        output_interface=cfg.output_interface,
        target_macs=tuple(
            dict.fromkeys((t.target_ip, t.target_mac) for t in cfg.session.transfers)
        ),
        capture_filter=cfg.capture_filter,
        transfer_pairs=tuple((t.online_ip, t.online_port) for t in cfg.session.transfers),
        capture=cfg.capture,
        interfaces=cfg.interfaces,
        transfers=tuple(cfg.session.transfers),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return EXIT_OK
    try:
        rest, as_json, live = _split_doctor_flags(args)
        inp = inputs_from_args(rest)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from engine.io.send import probe_neighbour

    findings = tcpcopy_checks(SystemHost(), inp, neighbour_probe=probe_neighbour)
    if live is not None:
        if inp.capture_filter and inp.capture != "offline":
            try:
                sample = capture_sample(inp, min(live, LIVE_SAMPLE_S))
                findings.append(check_capture_filter(inp, sample, min(live, LIVE_SAMPLE_S)))
            except OSError as exc:
                findings.append(
                    Finding(WARN, "capture filter sample", f"no live sample: {exc.strerror or exc}")
                )
        findings += live_probe(inp, live, send=_sender_for(inp))
    sys.stdout.write(render_json(findings, PROG) + "\n" if as_json else render_text(findings))
    sys.stdout.flush()
    return exit_status(findings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
