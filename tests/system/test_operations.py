"""Operations of the multi-process engine: --metrics, systemd notifications, SIGHUP log
reopening in every process, the final summary line and the classic stats line.

The supervisor runs in a forked child exactly as `tcpcopy-mp` runs it, with the sender seam of
tests/system/test_supervisor.py (UDP to a fake target, a fake intercept, all on 127.0.0.1).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import __version__
from engine.app import cli
from engine.io.engines import compiled_table_class
from engine.io.logs import setup_logging
from engine.proc.supervisor import Supervisor
from tests.system.test_supervisor import PCAP, TARGET_IP, FakeWorld, UdpSender

FORK = multiprocessing.get_context("fork")
DEADLINE_S = 30.0
ENDLESS = ["-a", "0.05", "-T", "100000"]  # the file over and over: always busy


def _child(cfg, target, log_path: str, fmt: str, notify_path: str | None) -> None:
    if notify_path:
        os.environ["NOTIFY_SOCKET"] = notify_path
    setup_logging(log_path, fmt)
    os._exit(Supervisor(cfg, sender_factory=lambda i: UdpSender(i, target)).run())


class Run:
    def __init__(self, proc, log: Path) -> None:
        self.proc = proc
        self.log = log
        self.seen: set[int] = set()

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def children(self) -> list[psutil.Process]:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen.update(k.pid for k in kids)
        return kids

    def wait_exit(self, deadline_s: float = DEADLINE_S) -> int:
        self.proc.join(deadline_s)
        assert self.proc.exitcode is not None, f"supervisor still running\n{self.text()}"
        return self.proc.exitcode


def wait_for(predicate: Callable[[], object], what: str, run: Run, deadline_s: float = DEADLINE_S):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}\n{run.text()[-4000:]}")


@pytest.fixture
def world():
    w = FakeWorld()
    yield w
    w.close()


@pytest.fixture
def start(tmp_path, world):
    runs: list[Run] = []

    def start_run(extra: list[str], fmt: str = "text", notify_path: str | None = None) -> Run:
        log = tmp_path / f"tcpcopy-{len(runs)}.log"
        argv = ["-x", f"80-{TARGET_IP}:8080", "-s", world.intercept, "-i", str(PCAP),
                "--workers", "2", "--stats-interval", "0.3", *extra]  # fmt: skip
        cfg = cli.build_config(cli.build_parser().parse_args(argv))
        proc = FORK.Process(
            target=_child, args=(cfg, world.target_addr, str(log), fmt, notify_path)
        )
        proc.start()
        run = Run(proc, log)
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_endpoint_survives_worker_restarts(start):
    port = _free_port()
    run = start([*ENDLESS, "--metrics", f"127.0.0.1:{port}"])

    def scraped():
        try:
            return _scrape(port)
        except OSError:
            return None

    first = wait_for(
        lambda: (
            (m := scraped())
            and m[("tcpcopy_packets_captured_total", ())] > 0
            and m[("tcpcopy_rss_bytes", ())] > 0
            and m
        ),
        "a scrape with captured packets and the memory measure",
        run,
    )
    assert first[("tcpcopy_rss_bytes", ())] > 1024 * 1024  # the watchdog's tree measure (PSS)
    assert ("tcpcopy_sessions_active", (("worker", "1"),)) in first
    # The engine that runs (--engine auto: the compiled one when it is built).
    engine = "compiled" if compiled_table_class()[0] is not None else "python"
    info = [k for k in first if k[0] == "tcpcopy_build_info"]
    assert info == [("tcpcopy_build_info", (("engine", engine), ("version", __version__)))]
    assert first[info[0]] == 1
    # Kill a worker while scraping: the restart forks with the HTTP thread alive.
    victim = wait_for(
        lambda: [k for k in run.children() if k.name() == "tcmp-worker0"], "worker 0", run
    )[0]
    victim.kill()
    after = wait_for(
        lambda: (m := scraped()) and m[("tcpcopy_worker_restarts_total", ())] == 1 and m,
        "the restart in the metrics",
        run,
    )
    assert (
        after[("tcpcopy_packets_captured_total", ())]
        >= first[("tcpcopy_packets_captured_total", ())]
    )
    # Only the supervisor listens on the metrics port: no child inherited the socket.
    for proc in [psutil.Process(run.proc.pid), *run.children()]:
        listening = [
            c for c in proc.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port
        ]
        assert bool(listening) == (proc.pid == run.proc.pid), proc
    os.kill(run.proc.pid, signal.SIGTERM)
    assert run.wait_exit() == 0, run.text()
    with pytest.raises(OSError):
        _scrape(port)  # the endpoint is gone with the process


def test_metrics_port_in_use_is_one_line_and_status_1(tmp_path):
    err = tmp_path / "stderr"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["-x", f"80-{TARGET_IP}:8080", "-s", "127.0.0.1", "-i", str(PCAP),
                "--metrics", f"127.0.0.1:{port}", "-l", str(tmp_path / "log")]  # fmt: skip
        pid = os.fork()
        if pid == 0:  # the CLI as a user runs it, stderr to a file
            code = 99
            try:
                fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 2)
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                code = cli.main(argv)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1
    lines = err.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcpcopy-mp: --metrics: cannot listen"), lines


def test_ready_after_every_child_reported_then_stopping(start, tmp_path):
    path = str(tmp_path / "notify.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    rx.settimeout(DEADLINE_S)
    try:
        run = start(ENDLESS, notify_path=path)
        first = rx.recv(4096).decode()
        assert first.startswith("READY=1\nSTATUS=replicating: capture and 2 worker(s) up"), first
        text = run.text()
        # Workers report in after they tried their intercept connections.
        ready_at = text.index("ready: replicating")
        assert text.index("worker 0: intercept") < ready_at, text
        assert text.index("worker 1: intercept") < ready_at, text
        status = rx.recv(4096).decode()  # with the next stats line
        assert status.startswith("STATUS=active "), status
        os.kill(run.proc.pid, signal.SIGTERM)
        messages = []
        while not any("STOPPING=1" in m for m in messages):
            messages.append(rx.recv(4096).decode())
        assert "STATUS=stopping: stopped by SIGTERM" in messages[-1]
        assert run.wait_exit() == 0
    finally:
        rx.close()


def test_sighup_reopens_the_log_in_every_process(start, tmp_path):
    run = start(ENDLESS)
    wait_for(lambda: "ready: replicating" in run.text(), "ready", run)
    rotated = tmp_path / "rotated.log"
    os.rename(run.log, rotated)  # logrotate's move ...
    os.kill(run.proc.pid, signal.SIGHUP)  # ... then HUP
    expected = [
        "[info] SIGHUP: log file reopened",
        "[info] capture: SIGHUP: log file reopened",
        "[info] worker 0: SIGHUP: log file reopened",
        "[info] worker 1: SIGHUP: log file reopened",
    ]
    wait_for(lambda: all(e in run.text() for e in expected), "every process in the new log", run)
    os.kill(run.proc.pid, signal.SIGTERM)
    assert run.wait_exit() == 0
    new = run.text()
    assert "tcpcopy-mp exits: stopped by SIGTERM" in new
    engine = "compiled" if compiled_table_class()[0] is not None else "python"
    assert f"tcpcopy-mp exits: stopped by SIGTERM ({engine} engine)" in new
    assert "worker 0: tcpcopy-mp exits" in new and "capture: capture exits" in new
    assert "SIGHUP" not in rotated.read_text()  # nothing was written to the old file after
    assert f"tcpcopy-mp starts: {engine} engine, " in rotated.read_text()


def test_final_summary_and_stats_lines_text(start):
    run = start(["-W"])  # one pass: the replay ends by itself
    assert run.wait_exit(60) == 0, run.text()
    lines = run.text().splitlines()
    summary = [ln for ln in lines if "[info] summary: " in ln]
    assert len(summary) == 1, lines[-20:]
    # 25 connections in the capture, all closed by FIN; every payload byte acked.
    assert "summary: sessions 25 (closed 25), requests sent " in summary[0]
    assert ", fidelity 100.00 % (" in summary[0] and "drops: pure_ack " in summary[0]
    # The periodic stats block keeps C tcpcopy's names.
    text = run.text()
    for label in ("active:", "conns:", "resp:", "unsend:", "all clt:", "total captured packets:"):
        assert f"[info] {label}" in text or f",{label}" in text, label


def test_final_summary_json(start):
    run = start(["-W"], fmt="json")
    assert run.wait_exit(60) == 0, run.text()
    objects = [orjson.loads(ln) for ln in run.text().splitlines()]
    summaries = [o for o in objects if o["msg"] == "summary"]
    assert len(summaries) == 1
    s = summaries[0]["summary"]
    assert s["sessions"] == 25 and s["sessions_by_outcome"] == {"closed": 25}
    assert s["fidelity_pct"] == 100.0 and s["requests_sent"] > 0
    assert s["client_bytes_acked"] == s["client_bytes_captured"] > 0
    assert set(s["drops"]) and all(v > 0 for v in s["drops"].values())
    stats = [o for o in objects if o["msg"] == "stats"]
    assert stats and stats[-1]["final"] is True and "all clt" in stats[-1]["stats"]
