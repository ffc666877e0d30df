"""What both doctors share (tcpcopy-mp doctor, intercept-mp doctor): findings, the host.

A check reads the host (files under /proc, ``ip route get``, ``iptables -S``, ``ss``) through
a ``Host`` object and returns ``Finding``s; parsing each command's output is done by small
pure functions here, so the unit tests feed them text.  The programs' own checks live in
engine/app/doctor.py and intercept/doctor.py.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import shlex
import subprocess
from collections.abc import Iterable, Sequence

from engine.io.privileges import CAP_NET_ADMIN, CAP_NET_RAW

EXIT_OK = 0
EXIT_FAIL = 1


OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"
_LABELS = {OK: "[ok]", INFO: "[info]", WARN: "[warn]", FAIL: "[FAIL]"}

CAP_NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_NET_RAW: "CAP_NET_RAW"}

CONNTRACK_WARN_RATIO = 0.8
"""conntrack table fuller than this: new replayed connections will soon be dropped."""
CONNTRACK_FAIL_RATIO = 0.95
COMMAND_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------------------------
# findings


@dataclasses.dataclass(frozen=True, slots=True)
class Finding:
    """One check's verdict: ``severity`` is ok | info | warn | fail."""

    severity: str
    check: str
    message: str
    fix: str = ""

    def line(self) -> str:
        text = f"{_LABELS[self.severity]} {self.check}: {self.message}"
        return f"{text} — fix: {self.fix}" if self.fix else text

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def exit_status(findings: Iterable[Finding]) -> int:
    """0 when no finding failed, 1 otherwise (warnings do not fail the doctor)."""
    return EXIT_FAIL if any(f.severity == FAIL for f in findings) else EXIT_OK


def render_text(findings: Sequence[Finding]) -> str:
    return "".join(f.line() + "\n" for f in findings)


def render_json(findings: Sequence[Finding], tool: str) -> str:
    return json.dumps(
        {
            "tool": tool,
            "status": exit_status(findings),
            "findings": [f.as_dict() for f in findings],
        },
        sort_keys=True,
    )


# ---------------------------------------------------------------------------------------------
# reading the host


@dataclasses.dataclass(frozen=True, slots=True)
class CommandResult:
    rc: int
    out: str
    err: str


class Host:
    """What a check may read.  ``SystemHost`` reads this machine; unit tests pass a fake."""

    def read(self, path: str) -> str | None:
        """The text of ``path``, or None if it does not exist or cannot be read."""
        raise NotImplementedError

    def run(self, argv: Sequence[str]) -> CommandResult:
        """Run a command to completion (rc 127 with the reason in ``err`` if it cannot run)."""
        raise NotImplementedError

    def pid_cmdline(self, pid: int) -> str:
        text = self.read(f"/proc/{pid}/cmdline") or ""
        return text.replace("\0", " ").strip()


class SystemHost(Host):
    def read(self, path: str) -> str | None:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return None

    def run(self, argv: Sequence[str]) -> CommandResult:
        try:
            proc = subprocess.run(
                list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
            )
        except FileNotFoundError:
            return CommandResult(127, "", f"{argv[0]}: command not found")
        except (OSError, subprocess.TimeoutExpired) as exc:
            return CommandResult(127, "", f"{argv[0]}: {exc}")
        return CommandResult(proc.returncode, proc.stdout, proc.stderr)


# ---------------------------------------------------------------------------------------------
# pure parsers of what the host says


def parse_int_text(text: str | None) -> int | None:
    """A /proc/sys value such as ``"1\\n"``; None if absent or not an integer."""
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def parse_cap_eff(status_text: str) -> int | None:
    """The CapEff bit mask of a /proc/PID/status text."""
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)\s*$", status_text, re.M)
    return int(m.group(1), 16) if m else None


def sysctl_key(*parts: str) -> str:
    """The sysctl(8) name of /proc/sys/net/ipv4/conf/<dev>/... : a '.' inside a device name
    (eth0.100) is written '/' there, because '.' separates the levels."""
    return ".".join(p.replace(".", "/") for p in parts)


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """What ``ip route get ADDR`` answered."""

    kind: str
    """unicast | local | broadcast | multicast | unreachable"""
    dev: str = ""
    via: str = ""
    src: str = ""
    reason: str = ""
    """For ``unreachable``: the kernel's words (``Network is unreachable`` ...)."""

    @property
    def reachable(self) -> bool:
        return self.kind != "unreachable"

    def describe(self) -> str:
        if not self.reachable:
            return self.reason or "no route"
        hop = f"via {self.via} " if self.via else ""
        return f"{self.kind} {hop}dev {self.dev}".replace("unicast ", "")


_UNREACHABLE_TYPES = ("unreachable", "blackhole", "prohibit", "throw")


def parse_route_get(rc: int, out: str, err: str) -> Route:
    """``ip route get ADDR``: a non-zero status (``RTNETLINK answers: Network is unreachable``)
    or an unreachable/blackhole/prohibit route type means packets to ADDR cannot leave."""
    if rc != 0:
        reason = err.strip().splitlines()[-1] if err.strip() else f"exit status {rc}"
        return Route("unreachable", reason=reason.removeprefix("RTNETLINK answers: "))
    tokens = out.split()
    if not tokens:
        return Route("unreachable", reason="empty answer from ip route get")
    kind = "unicast"
    if tokens[0] in _UNREACHABLE_TYPES:
        return Route("unreachable", reason=f"{tokens[0]} route")
    if tokens[0] in ("local", "broadcast", "multicast", "anycast"):
        kind = tokens[0]
    fields = {}
    for key in ("dev", "via", "src"):
        if key in tokens:
            i = tokens.index(key)
            if i + 1 < len(tokens):
                fields[key] = tokens[i + 1]
    return Route(kind, **fields)


def parse_addr_show(text: str) -> list[tuple[str, int, int]]:
    """``ip -o -4 addr show`` → [(device, address, prefix length)]."""
    out = []
    for line in text.splitlines():
        tokens = line.split()
        if len(tokens) < 4 or tokens[2] != "inet":
            continue
        dev = tokens[1].rstrip(":").split("@", 1)[0]
        try:
            iface = ipaddress.ip_interface(tokens[3])
        except ValueError:
            continue
        out.append((dev, int(iface.ip), iface.network.prefixlen))
    return out


def parse_link_mtu(text: str) -> int | None:
    """The ``mtu N`` of ``ip -o link show dev DEV``."""
    m = re.search(r"\bmtu (\d+)\b", text)
    return int(m.group(1)) if m else None


@dataclasses.dataclass(frozen=True, slots=True)
class NfqueueRule:
    """One ``-j NFQUEUE`` (or legacy ``-j QUEUE``) rule of an ``iptables -S`` listing."""

    chain: str
    sports: tuple[tuple[int, int], ...] | None
    """Source port ranges it matches; None = any source port."""
    negated: bool
    """``! --sport``: matches every port *but* these."""
    protocol: str
    """``tcp``, or ``""`` when the rule matches every protocol."""
    queue_lo: int
    queue_hi: int
    """``--queue-balance lo:hi`` spreads over a range; otherwise lo == hi."""
    text: str

    def matches_port(self, port: int) -> bool:
        if self.protocol not in ("", "tcp", "6"):
            return False
        if self.sports is None:
            return True
        inside = any(lo <= port <= hi for lo, hi in self.sports)
        return inside != self.negated

    def uses_queue(self, queue_num: int) -> bool:
        return self.queue_lo <= queue_num <= self.queue_hi


def _port_ranges(text: str) -> tuple[tuple[int, int], ...] | None:
    ranges = []
    for part in text.split(","):
        lo, _, hi = part.partition(":")
        try:
            a = int(lo) if lo else 0
            b = int(hi) if hi else (65535 if _ else a)
        except ValueError:
            return None
        ranges.append((a, b))
    return tuple(ranges)


def parse_nfqueue_rules(text: str, chain: str = "OUTPUT") -> list[NfqueueRule]:
    """The NFQUEUE rules of ``chain``, in order, from ``iptables -S`` output."""
    rules = []
    for line in text.splitlines():
        try:
            tokens = shlex.split(line)
        except ValueError:
            continue
        if len(tokens) < 2 or tokens[0] != "-A" or tokens[1] != chain:
            continue
        if "-j" not in tokens:
            continue
        target = tokens[tokens.index("-j") + 1] if tokens.index("-j") + 1 < len(tokens) else ""
        if target not in ("NFQUEUE", "QUEUE"):
            continue
        sports: tuple[tuple[int, int], ...] | None = None
        negated = False
        protocol = ""
        queue_lo = queue_hi = 0
        i = 2
        while i < len(tokens):
            tok = tokens[i]
            nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
            if tok == "!" and nxt in ("--sport", "--source-port", "--sports", "--source-ports"):
                negated = True
            elif tok == "-p":
                protocol = nxt.lower()
            elif tok in ("--sport", "--source-port", "--sports", "--source-ports"):
                sports = _port_ranges(nxt)
            elif tok == "--queue-num":
                queue_lo = queue_hi = int(nxt) if nxt.isdigit() else 0
            elif tok == "--queue-balance":
                lo, _, hi = nxt.partition(":")
                if lo.isdigit() and hi.isdigit():
                    queue_lo, queue_hi = int(lo), int(hi)
            i += 1
        rules.append(NfqueueRule(chain, sports, negated, protocol, queue_lo, queue_hi, line))
    return rules


@dataclasses.dataclass(frozen=True, slots=True)
class Listener:
    """One listening TCP socket from ``ss -Hltnp``."""

    address: str
    port: int
    users: tuple[tuple[str, int], ...]
    """(process name, pid) of every process holding it."""


_SS_USER = re.compile(r'\("([^"]*)",pid=(\d+),fd=\d+\)')


def parse_ss_listeners(text: str) -> list[Listener]:
    out = []
    for line in text.splitlines():
        tokens = line.split()
        # State Recv-Q Send-Q Local:Port Peer:Port [users:(...)]; -H drops the header.
        if len(tokens) < 5:
            continue
        local = tokens[3]
        addr, sep, port = local.rpartition(":")
        if not sep or not port.isdigit():
            continue
        users = tuple((name, int(pid)) for name, pid in _SS_USER.findall(line))
        out.append(Listener(addr.strip("[]"), int(port), users))
    return out


def covering_network(addresses: Iterable[int]) -> str:
    """The smallest CIDR block holding every address (``198.19.1.x`` → 198.19.1.0/24)."""
    ips = sorted(set(addresses))
    if not ips:
        raise ValueError("no address")
    lo, hi = ips[0], ips[-1]
    for prefix in range(32, -1, -1):
        net = ipaddress.ip_network((lo, prefix), strict=False)
        if ipaddress.ip_address(hi) in net:
            return str(net)
    return "0.0.0.0/0"


# ---------------------------------------------------------------------------------------------
# checks shared by both doctors


def capabilities(host: Host) -> int | None:
    return parse_cap_eff(host.read("/proc/self/status") or "")


def check_capabilities(host: Host, needed: dict[int, str], prog: str) -> Finding:
    """``needed``: capability bit → why.  Root without the bits (a container) fails too."""
    eff = capabilities(host)
    if eff is None:
        return Finding(WARN, "capabilities", "cannot read CapEff from /proc/self/status")
    missing = [bit for bit in needed if not eff >> bit & 1]
    have = ", ".join(CAP_NAMES[b] for b in needed if eff >> b & 1)
    if not missing:
        return Finding(OK, "capabilities", f"{have} present")
    names = ",".join(CAP_NAMES[b].lower() for b in needed)
    why = "; ".join(f"{CAP_NAMES[b]} ({needed[b]})" for b in missing)
    return Finding(
        FAIL,
        "capabilities",
        f"missing {why}",
        f"run {prog} as root, or: setcap {names}+ep $(readlink -f $(command -v python3))",
    )


def route_get(host: Host, address: str) -> Route:
    res = host.run(["ip", "route", "get", address])
    return parse_route_get(res.rc, res.out, res.err)


def sysctl_int(host: Host, *parts: str) -> int | None:
    return parse_int_text(host.read("/proc/sys/" + "/".join(parts)))


def local_addresses(host: Host) -> list[tuple[str, int, int]]:
    return parse_addr_show(host.run(["ip", "-o", "-4", "addr", "show"]).out)


def device_mtu(host: Host, dev: str) -> int | None:
    res = host.run(["ip", "-o", "link", "show", "dev", dev])
    return parse_link_mtu(res.out) if res.rc == 0 else None


def check_conntrack(host: Host) -> Finding:
    count = sysctl_int(host, "net", "netfilter", "nf_conntrack_count")
    limit = sysctl_int(host, "net", "netfilter", "nf_conntrack_max")
    if count is None or not limit:
        return Finding(OK, "conntrack", "not loaded (no table to fill)")
    ratio = count / limit
    text = f"{count} of {limit} entries in use ({ratio:.0%})"
    fix = f"sysctl -w net.netfilter.nf_conntrack_max={max(limit * 2, count * 2)}"
    if ratio >= CONNTRACK_FAIL_RATIO:
        return Finding(FAIL, "conntrack", f"{text}: new connections are being dropped", fix)
    if ratio >= CONNTRACK_WARN_RATIO:
        return Finding(WARN, "conntrack", f"{text}: close to full", fix)
    return Finding(OK, "conntrack", text)
