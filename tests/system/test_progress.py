"""Offline progress (engine/io/report.py Progress): a live line on a terminal, plain log lines
elsewhere.  The supervisor runs exactly as `tcpcopy-mp -i FILE` runs it, with the sender seam
of tests/system/test_supervisor.py (UDP to a fake target on 127.0.0.1, a fake intercept on
loopback): nothing leaves the loopback device.  The terminal is a real pseudo-terminal
(os.forkpty): the supervisor's stderr is its slave side, this test reads the master side.
"""

from __future__ import annotations

import errno
import os
import re
import select
import sys
import time
from pathlib import Path

import pytest

from engine.app import cli
from engine.io.logs import setup_logging
from engine.proc.supervisor import Supervisor
from tests.system.test_supervisor import PCAP, TARGET_IP, FakeWorld, UdpSender

# The 17 ms capture stretched to ~3 s (-a 0.006): several redraws at ~2 per second.
SLOW = ["-a", "0.006", "-W"]
RUN_DEADLINE_S = 60.0
TTY_LINE = re.compile(
    r"\r\x1b\[Kreplay +(\d+\.\d)% \| (\d+) packets read \| \d+ sessions active \| "
    r"(?:\d+|\?) pkt/s \| ETA (?:\d+:\d\d:\d\d|\?)"
)


@pytest.fixture
def world():
    w = FakeWorld()
    yield w
    w.close()


def _config(world: FakeWorld, extra: list[str]):
    argv = ["-x", f"80-{TARGET_IP}:8080", "-s", world.intercept, "-i", str(PCAP),
            "--workers", "2", *SLOW, *extra]  # fmt: skip
    return cli.build_config(cli.build_parser().parse_args(argv))


def _run_supervisor(cfg, world: FakeWorld, log_path: str | None) -> None:
    """The child's whole life: log set-up as the CLI does it, the supervisor, exit."""
    code = 1
    try:
        # pytest replaced sys.stderr by its capture object; the CLI process has the real fd 2.
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        setup_logging(log_path)
        target = world.target_addr
        code = Supervisor(cfg, sender_factory=lambda i: UdpSender(i, target)).run()
    finally:
        os._exit(code)


def _read_until_exit(fd: int, pid: int, deadline_s: float) -> tuple[bytes, int]:
    """Everything written to the terminal until the child exits (bounded)."""
    out = bytearray()
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError as exc:  # EIO: the slave side is closed, the child is gone
                if exc.errno != errno.EIO:
                    raise
                data = b""
            if not data:
                break
            out += data
    else:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    return bytes(out), os.waitstatus_to_exitcode(status)


def test_on_a_terminal_progress_redraws_one_line(world, tmp_path):
    cfg = _config(world, [])
    log_path = str(tmp_path / "tcpcopy.log")
    pid, fd = os.forkpty()
    if pid == 0:
        _run_supervisor(cfg, world, log_path)
    try:
        out, code = _read_until_exit(fd, pid, RUN_DEADLINE_S)
    finally:
        os.close(fd)
    text = out.decode(errors="replace").replace("\r\n", "\n")  # the tty's ONLCR
    log = Path(log_path).read_text()
    assert code == 0, f"{text}\n{log}"
    lines = TTY_LINE.findall(text)
    assert len(lines) >= 3, text  # redrawn while the replay ran (~3 s at ~2/s)
    percents = [float(p) for p, _ in lines]
    assert percents == sorted(percents), percents
    assert percents[-1] == 100.0 and percents[0] < 100.0, percents
    assert int(lines[-1][1]) == 340  # every record of the file was read
    # One line redrawn in place: no newline between two redraws, one at the very end.
    assert text.rstrip("\n").count("\n") == 0 and text.endswith("\n"), repr(text[-200:])
    # The log (a file here) has no progress lines: the terminal shows them.
    assert "progress:" not in log and "offline replay is complete" in log


def test_without_a_terminal_progress_is_a_plain_log_line(world, tmp_path):
    cfg = _config(world, ["--stats-interval", "0.5"])
    err = tmp_path / "stderr.txt"
    pid = os.fork()
    if pid == 0:
        fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
        _run_supervisor(cfg, world, None)  # logs to stderr: a file, not a terminal
    end = time.monotonic() + RUN_DEADLINE_S
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError(f"supervisor still running\n{err.read_text()}")
    text = err.read_text()
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "\r" not in text
    progress = [ln for ln in text.splitlines() if "[info] progress: replay " in ln]
    assert len(progress) >= 3, text  # every 0.5 s (--stats-interval < 10 s) over ~3 s
    assert re.search(r"progress: replay 100\.0% \| 340 packets read", progress[-1]), progress
