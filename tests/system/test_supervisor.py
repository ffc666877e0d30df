"""The multi-process engine (engine/proc/supervisor.py): capture -> rings -> workers, restarts,
heartbeats, the memory watchdog, graceful stop.  No privileges needed.

The supervisor runs in a forked child of pytest, exactly as `tcpcopy-mp` runs it, except for
one seam: a worker's sender is a UDP socket to this test's *fake target* on 127.0.0.1, which
answers like a minimal TCP server (SYN-ACK, ACKs, FIN-ACK) through the *fake intercept*, a
real TCP listener on 127.0.0.1 speaking the intercept protocol: a response goes back on the
connection that sent the flow's latest CLIENT_ADD, so it reaches the worker that owns the
flow.  Nothing leaves the loopback device.
"""

from __future__ import annotations

import multiprocessing
import os
import selectors
import signal
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import psutil
import pytest

from engine.app import cli
from engine.codec import packet, wire
from engine.errors import DecodeError
from engine.io.logs import setup_logging
from engine.proc.capture import flow_worker
from engine.proc.supervisor import Supervisor
from metrics.counters import CounterBlock
from tests.paths import ONLINE_HTTP_PCAP

FORK = multiprocessing.get_context("fork")
PCAP = ONLINE_HTTP_PCAP
ONLINE = (packet.ip_from_str("198.18.1.2"), 80)
TARGET_IP = "198.18.2.3"  # only ever written into packets; they go to the fake target
TARGET_ISN = 5000
WORKERS = 2


def pcap_client_packets() -> list[tuple[int, int, int]]:
    """(src ip, src port, tcp flags) of every client->online:80 packet, decoded with struct."""
    data = PCAP.read_bytes()
    off, out = 24, []
    while off + 16 <= len(data):
        caplen = struct.unpack_from("<I", data, off + 8)[0]
        ip = data[off + 16 + 14 : off + 16 + caplen]
        ihl = (ip[0] & 0x0F) * 4
        src, dst = struct.unpack_from("!II", ip, 12)
        sport, dport = struct.unpack_from("!HH", ip, ihl)
        if (dst, dport) == ONLINE:
            out.append((src, sport, ip[ihl + 13]))
        off += 16 + caplen
    return out


def expected_syns_per_worker(workers: int) -> Counter[int]:
    return Counter(
        flow_worker(ip, port, workers)
        for ip, port, flags in pcap_client_packets()
        if flags & (packet.SYN | packet.ACK) == packet.SYN
    )


# --------------------------------------------------------------------------------------------
# The fake world: intercept (TCP) + target (UDP from the workers' senders), one thread.


class FakeWorld:
    def __init__(self, respond: bool = True) -> None:
        self.respond = respond
        self.sel = selectors.DefaultSelector()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        self.sel.register(self.udp, selectors.EVENT_READ, "udp")
        self.routes: dict[tuple[int, int, int, int], socket.socket] = {}
        self.adds: list[tuple[int, tuple[int, int, int, int]]] = []  # (conn peer port, route)
        self.sent: list[tuple[int, packet.TcpPacket]] = []  # (worker, packet) as sent
        self.pending: list[tuple[packet.TcpPacket, bytes]] = []  # answers without a route yet
        self.lock = threading.Lock()
        self._next_seq: dict[tuple[int, int], int] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def intercept(self) -> str:
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    @property
    def target_addr(self) -> tuple[str, int]:
        return self.udp.getsockname()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.sel.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.sel.select(0.05):
                if key.data == "accept":
                    conn, _addr = self.listener.accept()
                    conn.setblocking(True)
                    self.sel.register(conn, selectors.EVENT_READ, wire.ClientStreamDecoder())
                elif key.data == "udp":
                    self._on_udp()
                else:
                    self._on_client_records(key.fileobj, key.data)  # type: ignore[arg-type]
            if self.pending:
                self._retry_pending()

    def _on_client_records(self, conn: socket.socket, decoder: wire.ClientStreamDecoder) -> None:
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        try:
            # A worker killed by the test may have gone between the recv and here.
            peer = conn.getpeername()[1] if data else None
        except OSError:
            peer = None
        if peer is None:
            self.sel.unregister(conn)
            conn.close()
            return
        try:
            records = decoder.feed(data)
        except DecodeError:
            return
        with self.lock:
            for rec in records:
                if rec.type == wire.TYPE_CLIENT_ADD:
                    route = (rec.client_ip, rec.client_port, rec.target_ip, rec.target_port)
                    self.routes[route] = conn
                    self.adds.append((peer, route))

    def _on_udp(self) -> None:
        while True:
            try:
                data = self.udp.recv(65536)
            except BlockingIOError:
                return
            worker, pkt = data[0], packet.parse_ip(data[1:])
            with self.lock:
                self.sent.append((worker, pkt))
            if self.respond:
                self._answer(pkt)

    def _answer(self, p: packet.TcpPacket) -> None:
        """A minimal TCP server: SYN-ACK, ACK data, FIN-ACK a FIN; nothing for RST/ACK."""
        if p.flags & packet.RST:
            return
        key = (p.src, p.sport)
        end = (p.seq + p.data_len + (1 if p.flags & (packet.SYN | packet.FIN) else 0)) & 0xFFFFFFFF
        if p.flags & packet.SYN:
            self._next_seq[key] = TARGET_ISN
            flags = packet.SYN | packet.ACK
        elif p.flags & packet.FIN:
            flags = packet.FIN | packet.ACK
        elif p.data_len:
            flags = packet.ACK
        else:
            return
        seq = self._next_seq.get(key, TARGET_ISN + 1)
        self._next_seq[key] = seq + 1 if flags & (packet.SYN | packet.FIN) else seq
        resp = packet.TcpPacket(
            p.dst, p.src, p.dport, p.sport, seq=seq, ack=end, flags=flags, window=65535,
            options=packet.build_options(mss=1460) if flags & packet.SYN else b"",
        )  # fmt: skip
        record = wire.encode_response_record(packet.build(resp))
        with self.lock:
            conn = self.routes.get((p.src, p.sport, p.dst, p.dport))
        if conn is None:
            # The CLIENT_ADD (TCP) may not have been read yet: the race intercept handles by
            # holding SYN responses briefly (spec §1.5).  Retried after the next reads.
            self.pending.append((p, record))
            return
        self._deliver(conn, record)

    def _retry_pending(self) -> None:
        pending, self.pending = self.pending, []
        for p, record in pending:
            with self.lock:
                conn = self.routes.get((p.src, p.sport, p.dst, p.dport))
            if conn is None:
                self.pending.append((p, record))
            else:
                self._deliver(conn, record)

    def _deliver(self, conn: socket.socket, record: bytes) -> None:
        try:
            conn.sendall(wire.encode_frame([record]))
        except OSError:
            pass


class UdpSender:
    """A worker's sender: every packet to the fake target, tagged with the worker index."""

    def __init__(self, index: int, addr: tuple[str, int]) -> None:
        self.index = index
        self.addr = addr
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.counters: Counter[str] = Counter()

    def send(self, pkt: bytes) -> bool:
        self.sock.sendto(bytes([self.index]) + pkt, self.addr)
        self.counters["send_packets"] += 1
        self.counters["send_bytes"] += len(pkt)
        return True

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------------------------
# Running the supervisor in a forked child, and cleaning up after it.


def _supervisor_child(cfg, target_addr, block, log_path, kw) -> None:
    setup_logging(str(log_path))
    sup = Supervisor(cfg, sender_factory=lambda i: UdpSender(i, target_addr), counters=block, **kw)
    os._exit(sup.run())


class Run:
    def __init__(self, proc, block: CounterBlock, log: Path, summary: Path) -> None:
        self.proc = proc
        self.block = block
        self.log = log
        self.summary_path = summary
        self.seen: set[int] = set()

    def children(self) -> list[psutil.Process]:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen.update(k.pid for k in kids)
        return kids

    def named(self, name: str) -> list[psutil.Process]:
        out = []
        for k in self.children():
            try:
                if k.name() == name:
                    out.append(k)
            except psutil.NoSuchProcess:
                pass
        return out

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def summary(self) -> dict:
        return orjson.loads(self.summary_path.read_bytes())

    def wait_exit(self, deadline_s: float) -> int:
        self.proc.join(deadline_s)
        assert self.proc.exitcode is not None, f"supervisor still running\n{self.log_text()}"
        return self.proc.exitcode


def alive(proc: psutil.Process) -> bool:
    """Whether ``proc`` still runs (a zombie, or one reaped while we look, does not)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_for(predicate: Callable[[], object], deadline_s: float, what: str, run: Run) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}\n{run.log_text()[-4000:]}")


@pytest.fixture
def world():
    w = FakeWorld()
    yield w
    w.close()


@pytest.fixture
def start(tmp_path, world):
    runs: list[Run] = []
    blocks: list[CounterBlock] = []

    def start_run(extra: list[str], **kw) -> Run:
        log, summary = tmp_path / f"tcpcopy-{len(runs)}.log", tmp_path / f"summary-{len(runs)}.json"
        argv = ["-x", f"80-{TARGET_IP}:8080", "-s", world.intercept, "-i", str(PCAP),
                "--workers", str(WORKERS), "--summary-json", str(summary),
                "--stats-interval", "0.2", *extra]  # fmt: skip
        cfg = cli.build_config(cli.build_parser().parse_args(argv))
        block = CounterBlock.create(workers=cfg.workers)
        blocks.append(block)
        proc = FORK.Process(target=_supervisor_child, args=(cfg, world.target_addr, block, log, kw))
        proc.start()
        run = Run(proc, block, log, summary)
        runs.append(run)
        return run

    yield start_run
    for run in runs:
        run.children()
        if run.proc.exitcode is None:
            run.proc.kill()
            run.proc.join(10)
        for pid in run.seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for block in blocks:
        block.close()
        block.unlink()


# --------------------------------------------------------------------------------------------


def test_offline_replay_shards_flows_and_ends_when_every_worker_is_idle(start, world):
    run = start(["-n", "2", "-W"])
    assert run.wait_exit(60) == 0, run.log_text()
    s = run.summary()
    assert s["exit_reason"] == "offline replay is complete", run.log_text()
    client = pcap_client_packets()
    syns = expected_syns_per_worker(WORKERS)
    assert sum(syns.values()) == 25  # README: ab -n 20, then ab -k -c 5
    assert s["capture_accepted"] == len(client) and s["ring_dropped"] == 0
    assert s["syn cnt"] == 25 and s["active"] == 0 and s["workers"] == WORKERS
    # Every captured packet was handled by the worker its flow hashes to, and only there.
    per_flow = Counter(flow_worker(ip, port, WORKERS) for ip, port, _ in client)
    for w in range(WORKERS):
        assert s["per_worker"][w]["syn cnt"] == syns[w]
        assert s["per_worker"][w]["all clt"] == per_flow[w]
    # Both replicas (-n 2) of a flow come from that worker: a replayed tuple is sent by one
    # worker only, each worker sent SYNs for 2 x its flows, and the allocator gave each
    # worker its own port class (worker_index/worker_count reached the session table).
    senders: dict[tuple[int, int], set[int]] = {}
    syn_tuples: dict[int, set[tuple[int, int]]] = {w: set() for w in range(WORKERS)}
    for w, p in world.sent:
        senders.setdefault((p.src, p.sport), set()).add(w)
        if p.flags & packet.SYN:
            syn_tuples[w].add((p.src, p.sport))
    assert all(len(ws) == 1 for ws in senders.values())
    for w in range(WORKERS):
        assert len(syn_tuples[w]) == 2 * syns[w]
        assert all(port % WORKERS == w for _ip, port in syn_tuples[w])
    assert s["route_announced"] == 50 and not world.pending
    assert s["ended_closed"] == 50, s
    # The stats line aggregates every process.
    assert "total captured packets:340" in run.log_text()
    assert f"syn cnt:25,all clt:{len(client)}" in run.log_text()


def test_killed_worker_is_restarted_and_its_sessions_are_counted_lost(start, world):
    # -T: the file is replayed over and over, so sessions are always active.
    run = start(["-a", "0.05", "-T", "100000"])

    def worker0_busy() -> bool:
        return run.block.snapshot()["workers"][0]["active"] > 0 and bool(run.named("tcmp-worker0"))

    wait_for(worker0_busy, 30, "worker 0 to hold sessions", run)
    (victim,) = run.named("tcmp-worker0")
    victim.send_signal(signal.SIGKILL)

    def restarted() -> bool:
        again = run.named("tcmp-worker0")
        return (
            run.block.snapshot()["totals"]["worker_restarts"] == 1
            and len(again) == 1
            and again[0].pid != victim.pid
        )

    wait_for(restarted, 20, "worker 0 to be restarted", run)
    lost = run.block.snapshot()["totals"]["sessions_lost"]
    assert lost > 0
    assert f"worker 0 (pid {victim.pid}) killed by SIGKILL; restarting it ({lost} session" in (
        run.log_text()
    )
    # The restarted worker works: it gets its flows' packets again.
    wait_for(lambda: run.block.snapshot()["workers"][0]["all clt"] > 0, 20, "worker 0 input", run)
    kids = run.children()
    os.kill(run.proc.pid, signal.SIGTERM)
    assert run.wait_exit(20) == 0, run.log_text()
    s = run.summary()
    assert s["exit_reason"] == "stopped by SIGTERM"
    assert s["worker_restarts"] == 1 and s["sessions_lost"] == lost
    assert s["supervisor"]["sessions_lost"] == lost
    assert s["capture_packets"] > 340  # several passes were captured
    assert not [k for k in kids if alive(k)]


def test_silent_worker_is_killed_and_restarted(start):
    run = start(["-a", "0.05", "-T", "100000"], heartbeat_timeout_s=1.0)
    wait_for(lambda: run.named("tcmp-worker1"), 20, "worker 1", run)
    (victim,) = run.named("tcmp-worker1")
    victim.suspend()  # SIGSTOP: alive, but its loop is frozen
    wait_for(lambda: run.block.snapshot()["totals"]["worker_restarts"] == 1, 20, "the restart", run)
    assert f"worker 1 (pid {victim.pid}) silent for" in run.log_text()
    wait_for(lambda: run.named("tcmp-worker1"), 20, "the new worker 1", run)
    os.kill(run.proc.pid, signal.SIGTERM)
    assert run.wait_exit(20) == 0, run.log_text()
    assert run.summary()["worker_restarts"] == 1


@pytest.mark.parametrize("choice", ["batch", "inherit"])
def test_workers_run_under_the_sched_policy_and_the_others_as_started(start, choice):
    started = os.sched_getscheduler(0)  # what the forked supervisor starts with
    want = os.SCHED_BATCH if choice == "batch" and started == os.SCHED_OTHER else started
    run = start(["-a", "0.05", "-T", "100000", "--sched", choice])
    snap = lambda: run.block.snapshot()["workers"]  # noqa: E731

    # Both workers in their loop (they hold sessions): past their start, where the policy is set.
    wait_for(lambda: all(row["active"] > 0 for row in snap()), 30, "both workers busy", run)
    workers = [p for i in range(WORKERS) for p in run.named(f"tcmp-worker{i}")]
    assert len(workers) == WORKERS
    assert [os.sched_getscheduler(p.pid) for p in workers] == [want] * WORKERS
    (capture,) = run.named("tcmp-capture")
    assert os.sched_getscheduler(capture.pid) == started
    assert os.sched_getscheduler(run.proc.pid) == started
    os.kill(run.proc.pid, signal.SIGTERM)
    assert run.wait_exit(20) == 0, run.log_text()
    assert run.summary()["sched"] == choice
    assert f"worker(s) (--sched {choice})" in run.log_text()


def test_memory_watchdog_sheds_then_stops_with_one_clear_line(start):
    limit_mb = 100
    usage = FORK.RawValue("q", 95 * 1024 * 1024)  # 95 %: shed from the first check
    run = start(
        ["-a", "0.05", "-T", "100000", "-m", str(limit_mb)],
        memory_usage=lambda: usage.value,
        watchdog_interval_s=0.05,
    )
    totals = lambda: run.block.snapshot()["totals"]  # noqa: E731
    # The capture sheds whole sessions (engine/core/shed.py): none reaches a worker.
    wait_for(lambda: totals()["shed_sessions_memory"] >= 25, 30, "sessions to be shed", run)
    assert "new sessions are refused" in run.log_text()
    assert totals()["send syn"] == 0  # shedding was on before the first packet
    assert totals()["drop_shed"] >= totals()["shed_sessions_memory"]
    assert totals()["all clt"] == 0 and totals()["sessions refused"] == 0
    usage.value = 50 * 1024 * 1024  # below 80 %: accepted again
    wait_for(lambda: totals()["send syn"] > 0, 30, "sessions after shedding", run)
    assert "new sessions are accepted again" in run.log_text()
    usage.value = 120 * 1024 * 1024
    assert run.wait_exit(30) == 1, run.log_text()
    s = run.summary()
    assert s["exit_reason"] == "memory limit exceeded (-m)"
    assert s["shed_sessions_memory"] >= 25 and s["rss_bytes"] == 120 * 1024 * 1024
    lines = [ln for ln in run.log_text().splitlines() if "memory limit exceeded" in ln]
    assert lines and "120 MB in use" in lines[0] and f"limit -m {limit_mb} MB" in lines[0]


def test_real_memory_measure_enforces_a_tiny_limit(start):
    run = start(["-a", "0.05", "-T", "100000", "-m", "1"], watchdog_interval_s=0.1)
    assert run.wait_exit(30) == 1, run.log_text()
    s = run.summary()
    assert s["exit_reason"] == "memory limit exceeded (-m)"
    # The measure is the tree's PSS: several MB for a supervisor and three children.
    assert s["rss_bytes"] > 5 * 1024 * 1024
    assert "limit -m 1 MB; stopping" in run.log_text()
