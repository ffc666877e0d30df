"""Offline replays that must end, and pcap files that must be judged (issue: hostile inputs).

The supervisor runs in a forked child exactly as `tcpcopy-mp -i FILE` runs it, with the
sender seam of tests/system/test_supervisor.py (UDP to a fake target on 127.0.0.1, a fake
intercept on loopback): nothing leaves the loopback device.  The refused-at-start case runs
the installed command itself (it fails before anything is sent).  Every run is bounded.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from engine.app import cli
from engine.io.logs import setup_logging
from engine.proc.supervisor import Supervisor
from tests.system.test_supervisor import TARGET_IP, FakeWorld, UdpSender

RUN_DEADLINE_S = 40.0
ONLINE_IP = bytes([198, 18, 1, 2])
CLIENT_IP = bytes([198, 19, 7, 1])


# -- pcap files built byte by byte ----------------------------------------------------------


def global_header(linktype: int = 1, snaplen: int = 65535) -> bytes:
    return struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, linktype)


def frame(sport: int, flags: int, seq: int, payload: bytes = b"") -> bytes:
    """Ethernet + IPv4 + TCP, client -> online:80 (checksums are never checked on capture)."""
    tcp = struct.pack("!HHIIBBHHH", sport, 80, seq, 0, 5 << 4, flags, 65535, 0, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, CLIENT_IP, ONLINE_IP)
    return b"\x00" * 12 + b"\x08\x00" + ip + tcp


def record(data: bytes, t: float, caplen: int | None = None) -> bytes:
    sec, usec = int(t), int((t % 1) * 1_000_000)
    n = len(data) if caplen is None else caplen
    return struct.pack("<IIII", sec, usec, n, len(data)) + data


SYN = 0x02
ACK = 0x10
PSH = 0x08


def lone_syn(snaplen: int = 65535) -> bytes:
    return global_header(snaplen=snaplen) + record(frame(40001, SYN, 1000), 1.0)


def one_request() -> list[bytes]:
    """A whole small session's client side: SYN, ACK, a request (3 records)."""
    return [
        record(frame(40002, SYN, 2000), 1.0),
        record(frame(40002, ACK, 2001), 1.001),
        record(frame(40002, ACK | PSH, 2001, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"), 1.002),
    ]


# -- running the supervisor ------------------------------------------------------------------


@pytest.fixture
def world():
    w = FakeWorld()
    yield w
    w.close()


def run_offline(world: FakeWorld, tmp_path: Path, pcap: Path, *extra: str) -> tuple[int, str, dict]:
    """(exit status, stderr, --summary-json) of one bounded offline run."""
    summary = tmp_path / "summary.json"
    argv = ["-x", f"80-{TARGET_IP}:8080", "-s", world.intercept, "-i", str(pcap),
            "--workers", "2", "--summary-json", str(summary), *extra]  # fmt: skip
    cfg = cli.build_config(cli.build_parser().parse_args(argv))
    err = tmp_path / "stderr.txt"
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 2)
            os.close(fd)
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            setup_logging(None)
            target = world.target_addr
            code = Supervisor(cfg, sender_factory=lambda i: UdpSender(i, target)).run()
        finally:
            os._exit(code)
    while time.monotonic() - started < RUN_DEADLINE_S:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)  # polling a child's exit (bounded by the deadline)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError(f"still running after {RUN_DEADLINE_S} s\n{err.read_text()}")
    text = err.read_text()
    took = time.monotonic() - started
    print(f"OFFLINE-RESULT {pcap.name} status={os.waitstatus_to_exitcode(status)} {took:.1f}s")
    return os.waitstatus_to_exitcode(status), text, orjson.loads(summary.read_bytes())


def lines(text: str, pattern: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.search(pattern, ln)]


# -- replays that end ------------------------------------------------------------------------


@pytest.mark.parametrize("snaplen", [65535, 0], ids=["lone-syn", "lone-syn-snaplen-0"])
def test_a_lone_syn_replay_ends_after_its_tail(world, tmp_path, snaplen):
    pcap = tmp_path / f"lone-syn-{snaplen}.pcap"
    pcap.write_bytes(lone_syn(snaplen))
    started = time.monotonic()
    code, text, s = run_offline(world, tmp_path, pcap, "--offline-tail", "2")
    took = time.monotonic() - started
    assert code == 0, text
    assert s["syn cnt"] == 1  # the SYN was replayed...
    assert s["ended_offline_end"] == 1, s  # ...and its session closed and counted at the end
    assert s["active"] == 0
    assert "offline replay is complete" in s["exit_reason"]
    assert len(lines(text, r"offline input ended .* 1 session still open closed")) == 1, text
    assert 2.0 <= took < 20.0, took  # the tail (2 s), not forever


def test_a_whole_session_replay_ends_without_waiting_for_the_tail(world, tmp_path):
    """A session that ends by itself (the target answers) does not count as offline_end."""
    pcap = tmp_path / "whole.pcap"
    fin = record(frame(40002, ACK | 0x01, 2031), 1.003)
    pcap.write_bytes(global_header() + b"".join(one_request()) + fin)
    code, text, s = run_offline(world, tmp_path, pcap, "--offline-tail", "30")
    assert code == 0, text
    assert s["requests"] >= 1
    assert s.get("ended_offline_end", 0) == 0, s
    assert s["uptime_s"] < 25, s  # not the 30 s tail: the session finished


# -- files judged ----------------------------------------------------------------------------


def test_a_file_cut_inside_its_last_record_replays_the_whole_ones_and_warns_once(world, tmp_path):
    whole = one_request()
    last = record(frame(40003, SYN, 3000), 1.01)
    cut_at = 24 + sum(len(r) for r in whole)
    pcap = tmp_path / "cut.pcap"
    pcap.write_bytes(global_header() + b"".join(whole) + last[:30])  # tcpdump killed mid-write
    code, text, s = run_offline(world, tmp_path, pcap, "--offline-tail", "1")
    assert code == 0, text
    warned = lines(text, rf"cut inside its last record at byte offset {cut_at}\b")
    assert len(warned) == 1, text
    assert s["capture_file_cut"] == 1
    assert s["offline_records"] == 3  # the whole records, all of them
    assert s["offline_bytes_read"] == pcap.stat().st_size  # the progress reaches 100 %
    assert s["syn cnt"] == 1


def test_a_corrupt_record_header_stops_the_replay_non_zero_with_its_offset(world, tmp_path):
    whole = one_request()
    bad_at = 24 + sum(len(r) for r in whole)
    corrupt = struct.pack("<IIII", 2, 0, 2**31, 60) + b"\x00" * 60
    pcap = tmp_path / "corrupt.pcap"
    pcap.write_bytes(global_header() + b"".join(whole) + corrupt + record(frame(1, SYN, 1), 3))
    code, text, s = run_offline(world, tmp_path, pcap, "--offline-tail", "1")
    assert code != 0, text
    errors = lines(text, r"\[error\]")
    assert len(errors) == 1, text
    assert f"corrupt record header at offset {bad_at}" in errors[0], errors
    assert "Traceback" not in text
    assert s["offline_records"] == 3  # what came before it was read and replayed
    assert s["syn cnt"] == 1
    assert s["capture_file_error"] == 1
    assert "broken input file" in s["exit_reason"]


def test_an_unknown_link_type_is_refused_at_start_in_one_line(tmp_path):
    pcap = tmp_path / "dead.pcap"
    pcap.write_bytes(global_header(linktype=0xDEAD) + b"".join(one_request()))
    exe = Path(sys.executable).with_name("tcpcopy-mp")
    proc = subprocess.run(
        [str(exe), "-x", f"80-{TARGET_IP}:8080", "-s", "127.0.0.1", "-i", str(pcap)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert str(pcap) in err[0] and "link type 57005 (0xdead)" in err[0], err
    assert "Traceback" not in proc.stderr
