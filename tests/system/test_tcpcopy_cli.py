"""The installed `tcpcopy-mp` command as a user runs it: help, version, flag errors.

Contract (docs/cli-contract.md): a bad flag or value -> exactly one stderr line that names the
flag, exit status 2, no traceback.  These cases fail before any socket is opened, so they need
no privileges and send nothing.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

import engine
from tests.paths import ONLINE_HTTP_PCAP
from tests.system.conftest import needs_root_netns

BIN = Path(sys.executable).with_name("tcpcopy-mp")
if not BIN.exists():
    BIN = Path(shutil.which("tcpcopy-mp") or "tcpcopy-mp")
GOOD = ["-x", "80-198.18.2.3:8080", "-s", "198.18.2.4"]
PCAP = str(ONLINE_HTTP_PCAP)


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def assert_usage_error(proc: subprocess.CompletedProcess, flag: str) -> None:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tcpcopy-mp: "), lines[0]
    assert flag in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_help_lists_every_contract_flag():
    proc = run("--help")
    assert proc.returncode == 0
    for flag in (
        "--transfer", "--intercepts", "--intercept-port", "--connections", "--clients",
        "--replicas", "--sample", "--port-shift", "--localhost-ip", "--no-wait", "--only-syn",
        "--mtu", "--mss", "--rtt", "--timeout", "--keepalive-timeout", "--memory-limit",
        "--gradual", "--lonely", "--daemon", "--interface", "--capture", "--filter", "--pcap",
        "--accelerate", "--idle-threshold", "--replays", "--workers", "--config", "--metrics",
        "--log", "--log-format", "--stats-interval", "--summary-json",
        "-x", "-s", "-p", "-C", "-c", "-n", "-r", "-f", "-H", "-W", "-O", "-M", "-D", "-R",
        "-t", "-k", "-m", "-g", "-L", "-U", "-P", "-d", "-i", "-F", "-B", "-S", "-a", "-I",
        "-T", "-l",
    ):  # fmt: skip
        assert f"{flag} " in proc.stdout or f"{flag}," in proc.stdout, flag


@pytest.mark.parametrize("flag", ["-v", "--version"])
def test_version(flag):
    proc = run(flag)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"tcpcopy-mp version:{engine.__version__}"


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["-x", "80", "-s", "198.18.2.4"], "-x"),
        (["-x", "80-198.18.2.3", "-s", "198.18.2.4"], "-x"),
        (["-x", "80-198.18.2.300:8080", "-s", "198.18.2.4"], "-x"),
        (["-x", "99999-198.18.2.3:8080", "-s", "198.18.2.4"], "-x"),
        (["-x", "80-198.18.2.3:8080", "-s", "intercept.example"], "-s"),
        (["-x", "80-198.18.2.3:8080", "-s", "198.18.2.4:70000"], "-s"),
        (["-x", "80-198.18.2.3:8080", "-s", "198.18.2.4,"], "-s"),
        ([*GOOD, "-c", "198.19.1.*"], "-c"),
        ([*GOOD, "-c", "198.19.1"], "-c"),
        ([*GOOD, "-C", "two"], "-C"),
        ([*GOOD, "-r", "101"], "-r"),
        ([*GOOD, "-r", "half"], "-r"),
        ([*GOOD, "-r", "-5"], "-r"),
        ([*GOOD, "-n", "1024"], "-n"),
        ([*GOOD, "-n", "x"], "-n"),
        ([*GOOD, "-M", "jumbo"], "-M"),
        ([*GOOD, "-M", "100"], "-M"),
        ([*GOOD, "-a", "0"], "-a"),
        ([*GOOD, "-a", "fast"], "-a"),
        ([*GOOD, "-p", "0"], "-p"),
        ([*GOOD, "-f", "256"], "-f"),
        ([*GOOD, "-H", "localhost"], "-H"),
        ([*GOOD, "-T", "0"], "-T"),
        ([*GOOD, "-I", "-1"], "-I"),
        ([*GOOD, "--stats-interval", "0"], "--stats-interval"),
        ([*GOOD, "--workers", "0"], "--workers"),
        ([*GOOD, "--metrics", "127.0.0.1:http"], "--metrics"),
        ([*GOOD, "--log-format", "xml"], "--log-format"),
        ([*GOOD, "--capture", "pcap"], "--capture"),
        ([*GOOD, "-i", "no-such-dev0"], "-i"),
        ([*GOOD, "--summary-json", "/no/such/dir/s.json"], "--summary-json"),
        (["-s", "198.18.2.4"], "-x"),
        (["-x", "80-198.18.2.3:8080"], "-s"),
        ([*GOOD, "--no-such-flag"], "--no-such-flag"),
        ([*GOOD, "-C"], "-C"),
    ],
)
def test_bad_flag_value_is_one_line_exit_2(args, flag):
    assert_usage_error(run(*args), flag)


def test_offline_missing_file(tmp_path):
    missing = tmp_path / "missing.pcap"
    proc = run(*GOOD, "--pcap", str(missing))
    assert_usage_error(proc, "--pcap")
    assert str(missing) in proc.stderr
    assert_usage_error(run(*GOOD, "-i", str(missing)), "-i")


def test_offline_file_that_is_not_a_pcap(tmp_path):
    text = tmp_path / "capture.pcap"
    text.write_text("GET / HTTP/1.0\r\n\r\n")
    proc = run(*GOOD, "--pcap", str(text))
    assert_usage_error(proc, "--pcap")
    assert "pcap" in proc.stderr
    assert_usage_error(run(*GOOD, "-i", str(text)), "-i")
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    assert_usage_error(run(*GOOD, "--pcap", str(empty)), "--pcap")


def test_config_file_supplies_values_and_flags_win(tmp_path):
    conf = tmp_path / "tcpcopy.toml"
    conf.write_text('transfer = "80-198.18.2.3:8080"\nintercepts = "198.18.2.4"\nsample = 150\n')
    # -x/-s come from the file (no "required" error); the file's bad -r is reported ...
    assert_usage_error(run("--config", str(conf)), "-r")
    # ... and the command line overrides it, so the next error is the command line's -C.
    assert_usage_error(run("--config", str(conf), "-r", "50", "-C", "x"), "-C")
    conf.write_text('transfer = "80-198.18.2.3:8080"\nno_such_key = 1\n')
    assert_usage_error(run("--config", str(conf)), "no_such_key")
    conf.write_text("transfer = \n")
    assert_usage_error(run("--config", str(conf)), "--config")


def test_doctor_takes_the_run_flags_and_names_a_missing_one():
    proc = run("doctor")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "-x" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------------------------
# Signals and the summary, inside a throw-away network namespace (root only): the replayer
# runs with raw sockets there, talks to nothing outside it, and must stop cleanly on SIGTERM.


def _have_session_table() -> bool:
    try:
        from engine.core.table import SessionTable  # noqa: F401
    except ImportError:
        return False
    return True


def _wait_for(predicate, deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.netns
@needs_root_netns
@pytest.mark.skipif(
    not _have_session_table(), reason="engine.core.table.SessionTable not there yet"
)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully_and_writes_summary(netns, tmp_path, signum):
    summary = tmp_path / "summary.json"
    logfile = tmp_path / "tcpcopy.log"
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, str(BIN),
         "-x", "80-198.18.200.3:8080", "-s", "198.18.200.4",  # nothing listens: refused
         "-l", str(logfile), "--summary-json", str(summary), "--stats-interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        # The stats line proves the loop is running (after the start-up intercept wait).
        assert _wait_for(
            lambda: logfile.exists() and "total captured packets:" in logfile.read_text(), 15
        ), logfile.read_text() if logfile.exists() else "no log"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    data = orjson.loads(summary.read_bytes())
    assert data["exit_reason"] == f"stopped by {signal.Signals(signum).name}"
    assert data["channel_connect_failures"] >= 1
    assert data["channels_connected"] == 0
    assert "cannot connect" in logfile.read_text()
