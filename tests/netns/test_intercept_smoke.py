"""intercept-mp against a real kernel: NFQUEUE (traditional) and pcap (advanced) smoke tests.

Two namespaces of our own per test (not the shared testbed: these tests need only a veth):

    peer 198.18.100.1 (vp) ──veth── (vt) 198.18.100.2 target (TCP server :8080, nothing :8081)

The target routes the fake clients (198.19.0.0/16) back to the peer.  The peer plays tcpcopy:
it holds the compat control connection to intercept-mp and sends raw SYNs from fake clients.
Traditional: intercept-mp runs in the target with ``--install-rule`` and must DROP the
responses (a counter in the peer proves none arrive) and stream their headers to us.
Advanced: intercept-mp runs in the peer (the "assistant", ip_forward=0) and captures them.
Synchronisation is by polling with deadlines (kernel queue counters, log lines, the stream).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from engine.codec import wire
from engine.codec.packet import ACK, RST, SYN, TcpPacket, build, build_options, ip_from_str
from testbed.netns import Proc, delete_netns, in_netns, netns_socket, wait_until

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

REPO = Path(__file__).resolve().parents[2]
INTERCEPT_BIN = REPO / ".venv" / "bin" / "intercept-mp"
PYTHON = REPO / ".venv" / "bin" / "python"
PEER_IP = "198.18.100.1"
TARGET_IP = "198.18.100.2"
FAKE_NET = "198.19.0.0/16"
HTTP_PORT = 8080
CLOSED_PORT = 8081  # nothing listens: the target answers a SYN with RST|ACK
CTRL_PORT = 36524
READY_S = 15.0
STREAM_S = 5.0

_seq = iter(range(1000))


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


class Pair:
    """Two namespaces joined by a veth; everything is removed by close(), also half-built."""

    def __init__(self, workdir: Path) -> None:
        tag = f"ic{os.getpid()}{next(_seq)}"
        self.peer = f"{tag}p"
        self.target = f"{tag}t"
        self.workdir = workdir
        self.procs: list[Proc] = []

    def build(self) -> Pair:
        for ns in (self.peer, self.target):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            for key in ("net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter"):
                sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}=0")
            # The peer is also the advanced mode's assistant: responses must die there.
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        sh("ip", "-n", self.peer, "link", "add", "vp", "type", "veth", "peer", "name", "vt",
           "netns", self.target)  # fmt: skip
        sh("ip", "-n", self.peer, "addr", "add", f"{PEER_IP}/24", "dev", "vp")
        sh("ip", "-n", self.target, "addr", "add", f"{TARGET_IP}/24", "dev", "vt")
        sh("ip", "-n", self.peer, "link", "set", "vp", "up")
        sh("ip", "-n", self.target, "link", "set", "vt", "up")
        sh("ip", "-n", self.target, "route", "add", FAKE_NET, "via", PEER_IP, "dev", "vt")
        # Leak counter: any packet for a fake client that reaches the peer.
        sh("ip", "netns", "exec", self.peer, "iptables", "-w", "-t", "raw", "-A", "PREROUTING",
           "-d", FAKE_NET)  # fmt: skip
        return self

    def close(self) -> None:
        for proc in self.procs:
            proc.stop(timeout=5)
        for ns in (self.peer, self.target):
            delete_netns(ns)

    def spawn(self, ns: str, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, ns, argv, self.workdir / f"{name}.out")
        self.procs.append(proc)
        return proc

    def counters(self, ns: str, table: str) -> list[tuple[int, str]]:
        out = sh("ip", "netns", "exec", ns, "iptables-save", "-c", "-t", table).stdout
        return [
            (int(m.group(1)), m.group(2))
            for m in re.finditer(r"^\[(\d+):\d+\]\s+(-A .*)$", out, re.M)
        ]

    def leaked_to_peer(self) -> int:
        return sum(n for n, rule in self.counters(self.peer, "raw") if FAKE_NET in rule)

    def queue_state(self) -> tuple[int, int]:
        """(packets waiting for a verdict, last packet id) of NFQUEUE 0 in the target."""
        out = sh("ip", "netns", "exec", self.target, "cat",
                 "/proc/net/netfilter/nfnetlink_queue").stdout  # fmt: skip
        for line in out.splitlines():
            cols = line.split()
            if cols and cols[0] == "0":
                return int(cols[2]), int(cols[7])
        return 0, 0

    def start_http(self) -> None:
        www = self.workdir / "www"
        www.mkdir(exist_ok=True)
        (www / "hello.txt").write_text("hello\n")
        self.spawn(self.target, "http", [str(PYTHON), "-m", "http.server", "--bind", TARGET_IP,
                                         "--directory", str(www), str(HTTP_PORT)])  # fmt: skip
        wait_until(lambda: self.listening(self.target, HTTP_PORT), READY_S, what="http server")

    def listening(self, ns: str, port: int) -> bool:
        out = sh("ip", "netns", "exec", ns, "ss", "-Hltn", f"sport = :{port}").stdout
        return bool(out.strip())


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    try:
        p.build()
        yield p
    finally:
        p.close()


def start_intercept(pair: Pair, ns: str, args: list[str]) -> tuple[Proc, Path, Path]:
    log = pair.workdir / "intercept.log"
    summary = pair.workdir / "summary.json"
    proc = pair.spawn(ns, "intercept-mp", [str(INTERCEPT_BIN), *args, "-l", str(log),
                                            "--summary-json", str(summary)])  # fmt: skip

    def started() -> bool:
        if not proc.alive():
            raise AssertionError(f"intercept-mp exited: {proc.output()} {read(log)}")
        return " started: " in read(log)

    wait_until(started, READY_S, what="intercept-mp start-up line")
    return proc, log, summary


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


class Control:
    """The tcpcopy side of one compat connection (spec §1.2, §1.4), opened inside ``ns``."""

    def __init__(self, ns: str, ip: str, port: int = CTRL_PORT) -> None:
        self.sock = netns_socket(ns)
        self.sock.settimeout(STREAM_S)
        self.sock.connect((ip, port))
        self.sock.sendall(wire.HANDSHAKE)
        self.frames = wire.FrameDecoder()
        self.records: list[TcpPacket] = []

    def add(self, cip: str, cport: int, tip: str, tport: int) -> None:
        self.sock.sendall(wire.client_add(ip_from_str(cip), cport, ip_from_str(tip), tport))

    def wait_record(self, match: Callable[[TcpPacket], bool], what: str) -> TcpPacket:
        deadline = time.monotonic() + STREAM_S
        while True:
            for rec in self.records:
                if match(rec):
                    return rec
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no record for {what}; got {self.records}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            assert data, "intercept-mp closed the control connection"
            for frame in self.frames.feed_frames(data):
                assert 1 <= len(frame) <= wire.COMB_MAX
                self.records += [wire.decode_response_record(r) for r in frame]

    def close(self) -> None:
        self.sock.close()


def send_syn(ns: str, src: str, sport: int, dst: str, dport: int, seq: int) -> None:
    """A raw SYN from a fake client (IP_HDRINCL; checksums computed by engine.codec.packet)."""
    pkt = build(
        TcpPacket(
            src=ip_from_str(src),
            dst=ip_from_str(dst),
            sport=sport,
            dport=dport,
            seq=seq,
            flags=SYN,
            window=64240,
            options=build_options(mss=1460),
        )
    )

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
            s.sendto(pkt, (dst, 0))

    in_netns(ns, send)


def reply_to(client: str, port: int, flags: int) -> Callable[[TcpPacket], bool]:
    cip = ip_from_str(client)
    return lambda p: p.dst == cip and p.dport == port and p.flags & flags == flags


def http_get(ns: str) -> bytes:
    sock = netns_socket(ns)
    with sock:
        sock.settimeout(STREAM_S)
        sock.connect((TARGET_IP, HTTP_PORT))
        sock.sendall(b"GET /hello.txt HTTP/1.0\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def thread_policies(pid: int) -> set[int]:
    """The scheduling policies of every thread of ``pid``."""
    return {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def stop_and_summary(proc: Proc, log: Path, summary: Path) -> dict:
    rc = proc.stop(signal.SIGTERM, timeout=10)
    assert rc == 0, f"intercept-mp exit status {rc}: {read(log)}"
    text = read(log)
    assert re.search(r"\[notice\] total resp packs:\d+, all:\d+, route:\d+, sock write cnt:", text)
    assert re.search(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \+\d{3} \[notice\] ", text, re.M)
    return orjson.loads(summary.read_bytes())


@pytest.mark.parametrize("engine", ["python", "compiled"])
def test_nfqueue_routes_drops_and_flushes_delayed(pair: Pair, engine: str) -> None:
    """Both response paths (--engine): routed, pass list, delayed RST and SYN-ACK."""
    if engine == "compiled":
        from intercept.fastroute import compiled_available

        built, why = compiled_available()
        if not built:
            pytest.skip(why)
    pair.start_http()
    proc, log, summary = start_intercept(
        pair,
        pair.target,
        ["--queue-num", "0", "--install-rule", f"{HTTP_PORT},{CLOSED_PORT}", "-x", PEER_IP,
         "-b", TARGET_IP, "--engine", engine],
    )  # fmt: skip
    assert f", engine {engine}, sched batch" in read(log)
    assert thread_policies(proc.pid) == {os.SCHED_BATCH}  # --sched's default
    rules = sh("ip", "netns", "exec", pair.target, "iptables-save", "-t", "filter").stdout
    for port in (HTTP_PORT, CLOSED_PORT):
        assert re.search(rf"--sport {port} .*intercept-mp.*-j NFQUEUE --queue-num 0", rules)
    assert f"iptables -I OUTPUT -p tcp --sport {HTTP_PORT} -j NFQUEUE --queue-num 0" in read(log)

    ctl = Control(pair.peer, TARGET_IP)
    try:
        # 1. Routed: CLIENT_ADD, then the SYN; the SYN-ACK comes back as a record.
        ctl.add("198.19.1.5", 40000, TARGET_IP, HTTP_PORT)
        send_syn(pair.peer, "198.19.1.5", 40000, TARGET_IP, HTTP_PORT, seq=1000)
        synack = ctl.wait_record(reply_to("198.19.1.5", 40000, SYN | ACK), "the SYN-ACK")
        assert (synack.src, synack.sport) == (ip_from_str(TARGET_IP), HTTP_PORT)
        assert synack.ack == 1001
        assert synack.options  # MSS at least: the TCP options travel in the record

        # 2. The pass list: the peer's own connection is ACCEPTed and works end to end.
        assert http_get(pair.peer).endswith(b"hello\n")

        # 3. Delayed RST: the response is queued before its CLIENT_ADD exists.
        _, last_id = pair.queue_state()
        send_syn(pair.peer, "198.19.1.6", 40001, TARGET_IP, CLOSED_PORT, seq=5000)
        wait_until(lambda: pair.queue_state() == (0, last_id + 1), READY_S,
                   what="the RST's verdict")  # fmt: skip
        assert not [r for r in ctl.records if r.dport == 40001]
        ctl.add("198.19.1.6", 40001, TARGET_IP, CLOSED_PORT)
        rst = ctl.wait_record(reply_to("198.19.1.6", 40001, RST), "the delayed RST")
        assert rst.sport == CLOSED_PORT and rst.ack == 5001

        # 4. Delayed SYN-ACK, same order.
        _, last_id = pair.queue_state()
        send_syn(pair.peer, "198.19.1.7", 40002, TARGET_IP, HTTP_PORT, seq=7000)
        wait_until(lambda: pair.queue_state()[1] > last_id and pair.queue_state()[0] == 0,
                   READY_S, what="the SYN-ACK's verdict")  # fmt: skip
        ctl.add("198.19.1.7", 40002, TARGET_IP, HTTP_PORT)
        late = ctl.wait_record(reply_to("198.19.1.7", 40002, SYN | ACK), "the delayed SYN-ACK")
        assert late.ack == 7001

        # Nothing for a fake client ever left the target.
        assert pair.leaked_to_peer() == 0
        queued = [n for n, rule in pair.counters(pair.target, "filter") if "NFQUEUE" in rule]
        assert sum(queued) >= 3
    finally:
        ctl.close()

    values = stop_and_summary(proc, log, summary)
    assert values["routes_added"] == 3
    assert values["responses_delayed"] >= 2
    assert values["responses_delayed_flushed"] >= 2
    assert values["pass_accepted"] >= 2  # SYN-ACK, data and FIN of the HTTP exchange
    assert values["responses_forwarded"] >= 3
    assert values["engine"] == engine
    assert values["sched"] == "batch" and values["sched_policy"] == "batch"
    assert values["channels_accepted"] == 1
    rules = sh("ip", "netns", "exec", pair.target, "iptables-save", "-t", "filter").stdout
    assert "intercept-mp" not in rules, "the NFQUEUE rules were not removed at exit"


BURST = 3000
"""Responses the target sends while intercept-mp is stopped: more than the kernel's queue
length (1024), fewer than intercept-mp's own (8192)."""


def send_syns(ns: str, dst: str, dport: int, count: int) -> None:
    """``count`` raw SYNs from distinct fake clients, from one socket."""
    pkts = [
        build(TcpPacket(src=ip_from_str(f"198.19.{2 + i // 250}.{1 + i % 250}"),
                        dst=ip_from_str(dst), sport=41000 + i % 1000, dport=dport, seq=i,
                        flags=SYN, window=64240, options=build_options(mss=1460)))
        for i in range(count)
    ]  # fmt: skip

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
            for pkt in pkts:
                s.sendto(pkt, (dst, 0))

    in_netns(ns, send)


@pytest.mark.parametrize(
    ("queue_args", "held"), [([], BURST), (["-q", "1024"], 1024)], ids=["default", "q1024"]
)
def test_nfqueue_holds_a_burst_while_intercept_is_stopped(
    pair: Pair, queue_args: list[str], held: int
) -> None:
    """The target answers a burst while intercept-mp is off the CPU (here: stopped): the
    queue keeps every response by default; with -q <= 1024 (C's meaning: the kernel's
    default) it keeps 1024 and the kernel drops the rest, counted as queue_dropped."""
    # SYN-ACKs, one per SYN (RSTs would not do: the kernel sends them from one socket whose
    # send buffer the queued ones fill); none sent again, so the count is exact.
    sh("ip", "netns", "exec", pair.target, "sysctl", "-qw", "net.ipv4.tcp_synack_retries=0")
    pair.start_http()
    proc, log, summary = start_intercept(
        pair, pair.target,
        ["--queue-num", "0", "--install-rule", str(HTTP_PORT), "-b", TARGET_IP, *queue_args],
    )  # fmt: skip

    def queue() -> tuple[int, int]:
        """(waiting, dropped) of NFQUEUE 0 in the target."""
        out = sh("ip", "netns", "exec", pair.target, "cat",
                 "/proc/net/netfilter/nfnetlink_queue").stdout  # fmt: skip
        for line in out.splitlines():
            cols = line.split()
            if cols and cols[0] == "0":
                return int(cols[2]), int(cols[5]) + int(cols[6])
        return 0, 0

    _, dropped0 = queue()
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        send_syns(pair.peer, TARGET_IP, HTTP_PORT, BURST)
        try:
            wait_until(lambda: sum(queue()) - dropped0 == BURST, READY_S)
        except TimeoutError:
            raise AssertionError(f"(waiting, dropped) {queue()}, before {dropped0}") from None
        waiting, dropped = queue()
        assert (waiting, dropped - dropped0) == (held, BURST - held)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    wait_until(lambda: queue()[0] == 0, READY_S, what="intercept-mp's verdicts")
    assert pair.leaked_to_peer() == 0
    values = stop_and_summary(proc, log, summary)
    assert values["packets_captured"] == held
    from intercept.fastroute import compiled_available

    assert values["engine"] == ("compiled" if compiled_available()[0] else "python")  # auto
    assert values["queue_dropped"] == BURST - held
    if queue_args:
        assert "-q 1024 <= 1024: the kernel's default queue length" in read(log)


def test_old_client_is_disconnected_and_version_mismatch_warned(pair: Pair) -> None:
    proc, log, summary = start_intercept(
        pair, pair.target, ["--queue-num", "3", "-b", TARGET_IP, "--sched", "inherit"]
    )
    assert thread_policies(proc.pid) == {os.sched_getscheduler(0)}  # as started
    sock = netns_socket(pair.peer)
    with sock:
        sock.settimeout(STREAM_S)
        sock.connect((TARGET_IP, CTRL_PORT))
        sock.sendall(wire.client_add(ip_from_str("198.19.1.5"), 40000, 0, 0))  # no handshake
        assert sock.recv(100) == b""  # closed by intercept-mp, nothing sent
    newer = netns_socket(pair.peer)
    with newer:
        newer.settimeout(STREAM_S)
        newer.connect((TARGET_IP, CTRL_PORT))
        newer.sendall(wire.CLIENT_RECORD.pack(0, 0, 7, 0, 0))
        wait_until(lambda: "not compatible,client:7,intercept:6" in read(log), READY_S,
                   what="the version warning")  # fmt: skip
    values = stop_and_summary(proc, log, summary)
    assert values["channels_old_client"] == 1
    assert values["channels_accepted"] == 2
    assert values["sched"] == "inherit"
    assert values["sched_policy"] == {os.SCHED_OTHER: "normal", os.SCHED_BATCH: "batch"}.get(
        os.sched_getscheduler(0)
    )


def test_pcap_mode_captures_routes_and_rewrites(pair: Pair) -> None:
    pair.start_http()
    proc, log, summary = start_intercept(
        pair,
        pair.peer,
        ["-i", "vp", "-F", f"tcp and src port {HTTP_PORT}", "-b", PEER_IP,
         "-D", "198.19.1.9-198.19.1.8"],
    )  # fmt: skip
    ctl = Control(pair.peer, PEER_IP)
    try:
        ctl.add("198.19.1.5", 40000, TARGET_IP, HTTP_PORT)
        # the pcap reader threads started after --sched: they inherit SCHED_BATCH
        assert thread_policies(proc.pid) == {os.SCHED_BATCH}
        send_syn(pair.peer, "198.19.1.5", 40000, TARGET_IP, HTTP_PORT, seq=1000)
        synack = ctl.wait_record(reply_to("198.19.1.5", 40000, SYN | ACK), "the SYN-ACK")
        assert synack.ack == 1001 and synack.src == ip_from_str(TARGET_IP)
        # -D: the response to .9 is routed as if it were addressed to .8.
        ctl.add("198.19.1.8", 40003, TARGET_IP, HTTP_PORT)
        send_syn(pair.peer, "198.19.1.9", 40003, TARGET_IP, HTTP_PORT, seq=3000)
        mapped = ctl.wait_record(reply_to("198.19.1.8", 40003, SYN | ACK), "the -D SYN-ACK")
        assert mapped.ack == 3001
    finally:
        ctl.close()
    values = stop_and_summary(proc, log, summary)
    assert values["docker_rewritten"] >= 1
    assert values["responses_forwarded"] >= 2


def test_missing_device_fails_with_one_line(pair: Pair) -> None:
    res = sh("ip", "netns", "exec", pair.peer, str(INTERCEPT_BIN), "-i", "nosuch0", "-F", "tcp",
             "-b", PEER_IP, check=False)  # fmt: skip
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "-i" in lines[0] and "nosuch0" in lines[0], res.stderr


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
