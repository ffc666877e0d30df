"""intercept-mp as a user runs it (flags, errors, exit codes), plus its loop driven in-process.

The first part runs the installed console script: no privileges, no traffic.  The second
drives ``InterceptServer.run`` in this process over a ``socketpair`` (no network at all)
with a scripted packet source, to pin down the frame batching of spec §2.4 and the
slow-peer bound; the real-kernel paths are in tests/netns/test_intercept_smoke.py.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import pytest

from engine.codec import wire
from engine.codec.packet import ACK, RST, SYN, TcpPacket, build, ip_from_str
from intercept.cli import parse_args
from intercept.router import Router
from intercept.server import InterceptServer
from tests.system.pairs import socketpair

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin" / "intercept-mp"


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


# --- the command line ---------------------------------------------------------------------------


def test_help_lists_every_flag() -> None:
    res = run_cli("--help")
    assert res.returncode == 0
    for flag in ("-i", "-F", "-x", "-q", "--queue-num", "--install-rule", "-n", "-p", "-b",
                 "-s", "-D", "-c", "-l", "--log-format", "-d", "-v"):  # fmt: skip
        assert f" {flag}" in res.stdout, flag


@pytest.mark.parametrize("flag", ["-v", "--version"])
def test_version(flag: str) -> None:
    res = run_cli(flag)
    assert res.returncode == 0
    expected = f"intercept-mp version:{version('tcpcopy-mp')} (compat 1.0, protocol 6)"
    assert res.stdout.strip() == expected


def test_pcap_mode_without_filter_is_the_c_error() -> None:
    for args in ((), ("-i", "eth0"), ("-p", "36524")):
        res = run_cli(*args)
        assert res.returncode == 2
        assert res.stderr == "please set filter (-F param) for capturing packets\n"


BAD_FLAGS = [
    (["-p", "0"], "-p"),
    (["-p", "65536"], "-p"),
    (["--port", "http"], "-p"),
    (["-b", "1.2.3"], "-b"),
    (["-b", "010.0.0.1"], "-b"),
    (["-n", "17"], "-n"),
    (["-n", "-1"], "-n"),
    (["-x", "300.1.1.1"], "-x"),
    (["-x", ",".join(f"198.18.0.{i}" for i in range(33))], "-x"),
    (["-q", "many"], "-q"),
    (["--queue-num", "70000"], "--queue-num"),
    (["--install-rule", "80,0"], "--install-rule"),
    (["--install-rule", "80,,81"], "--install-rule"),
    (["-D", "198.18.0.1"], "-D"),
    (["-D", "198.18.0.1-x"], "-D"),
    (["-s", "-5"], "-s"),
    (["-F", " "], "-F"),
    (["-F", "t" * 4096], "-F"),
    (["-i", "eth0,,eth1"], "-i"),
    (["--log-format", "xml"], "--log-format"),
    (["-F", "tcp", "-x", "198.18.0.1"], "-x"),
    (["-i", "eth0", "-F", "tcp", "--queue-num", "1"], "--queue-num"),
    (["-t", "5"], "-t"),  # C's getopt has t: but no handler (spec §2.6): rejected as there
    (["-p"], "-p"),
]


@pytest.mark.parametrize(("args", "flag"), BAD_FLAGS, ids=[" ".join(a)[:30] for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_naming_it(args: list[str], flag: str) -> None:
    res = run_cli(*args)
    assert res.returncode == 2, res
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert flag in lines[0], lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_unwritable_log_is_one_line(tmp_path: Path) -> None:
    res = run_cli("-F", "tcp", "-l", str(tmp_path / "no" / "such" / "dir.log"))
    assert res.returncode == 2
    assert len(res.stderr.splitlines()) == 1 and "-l" in res.stderr


def test_port_in_use_is_one_line_exit_1() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        res = run_cli("-F", "tcp", "-i", "lo", "-b", "127.0.0.1", "-p", str(port))
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "-p: cannot listen on 127.0.0.1:" in lines[0], res.stderr


def test_mode_selection() -> None:
    assert parse_args(["-F", "tcp and src port 80"]).mode == "pcap"
    assert parse_args(["--queue-num", "2"]).mode == "nfqueue"
    assert parse_args(["-x", "198.18.0.1"]).mode == "nfqueue"
    assert parse_args(["-q", "2048"]).mode == "nfqueue"
    opts = parse_args(["--install-rule", "8080,8081,8080"])
    assert opts.mode == "nfqueue" and opts.install_rule == (8080, 8081) and opts.queue_num == 0
    assert parse_args(["-F", "tcp", "-n", "0"]).combine == 1  # 0 = every record alone
    assert parse_args(["-F", "tcp", "-D", "198.18.0.1-198.18.0.2"]).docker_map == (
        ip_from_str("198.18.0.1"),
        ip_from_str("198.18.0.2"),
    )


# --- the loop, in-process ----------------------------------------------------------------------

TARGET = "198.18.100.2"


def response(client: str, cport: int, flags: int = ACK, seq: int = 1) -> bytes:
    """A target response (full IP packet) to a fake client."""
    return build(
        TcpPacket(
            src=ip_from_str(TARGET),
            dst=ip_from_str(client),
            sport=8080,
            dport=cport,
            seq=seq,
            ack=99,
            flags=flags,
            payload=b"x" * 100,
        )
    )


class ScriptedSource:
    """A PacketSource whose fd is a pipe kept readable while steps remain; each pass runs
    the next step (``step(server, now) -> bool``; False = retry next pass).  When the script
    is done it stops the server."""

    name = "script"

    def __init__(self, server: InterceptServer, steps: list[Callable]) -> None:
        self.server = server
        self.steps = list(steps)
        self.r, self.w = os.pipe()
        os.write(self.w, b"!")
        self.passes = 0

    def fileno(self) -> int:
        return self.r

    has_backlog = False

    def on_readable(self, now: float) -> None:
        self.passes += 1
        assert self.passes < 10_000, "script stuck"
        if self.steps and self.steps[0](self.server, now) is not False:
            self.steps.pop(0)
        if not self.steps:
            os.read(self.r, 1)
            self.server.request_stop("script done")

    def poll_stats(self) -> None:
        pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def serve(
    steps: list[Callable], peer_bytes: bytes, **server_kw
) -> tuple[InterceptServer, socket.socket]:
    """Run the loop with one channel (a socketpair) whose peer already sent ``peer_bytes``."""
    server = InterceptServer(Router(), **server_kw)
    ours, theirs = socketpair()
    theirs.sendall(peer_bytes)
    server.attach_channel(ours, "socketpair")
    server.add_source(ScriptedSource(server, steps))
    assert server.run() == "script done"
    return server, theirs


def read_frames(sock: socket.socket, dec: wire.FrameDecoder | None = None) -> list[list[bytes]]:
    """Every complete frame the peer can read now; with no ``dec`` given the stream must end
    on a frame boundary."""
    strict = dec is None
    dec = dec or wire.FrameDecoder()
    sock.setblocking(False)
    frames: list[list[bytes]] = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            break
        if not data:
            break
        frames += dec.feed_frames(data)
    if strict:
        assert dec.pending_bytes == 0, "the stream ended inside a frame"
    return frames


def routed(client: str, cport: int) -> Callable:
    return lambda server, now: (
        server.router.lookup(ip_from_str(client), cport, ip_from_str(TARGET), 8080) is not None
    )


def burst(client: str, cport: int, count: int) -> Callable:
    def step(server: InterceptServer, now: float) -> None:
        for i in range(count):
            server.receive_ip_packet(response(client, cport, seq=i), now)

    return step


HELLO = wire.HANDSHAKE + wire.client_add(
    ip_from_str("198.19.1.5"), 40000, ip_from_str(TARGET), 8080
)


@pytest.mark.parametrize(("combine", "sizes"), [(16, [16, 16, 8]), (4, [4] * 10), (1, [1] * 40)])
def test_one_pass_burst_becomes_full_frames(combine: int, sizes: list[int]) -> None:
    server, peer = serve([routed("198.19.1.5", 40000), burst("198.19.1.5", 40000, 40)],
                         HELLO, combine=combine)  # fmt: skip
    frames = read_frames(peer)
    assert [len(f) for f in frames] == sizes
    seqs = [wire.decode_response_record(r).seq for f in frames for r in f]
    assert seqs == list(range(40))  # in capture order
    assert server.counters["frames_sent"] == len(sizes)
    assert server.counters["responses_forwarded"] == 40
    server.close()


def test_records_of_separate_passes_are_not_held_back() -> None:
    # Three passes with 2 records each: each pass's records leave at the end of that pass.
    steps = [routed("198.19.1.5", 40000)] + [burst("198.19.1.5", 40000, 2)] * 3
    server, peer = serve(steps, HELLO)
    assert [len(f) for f in read_frames(peer)] == [2, 2, 2]
    server.close()


def test_delayed_syn_and_rst_flushed_on_client_add_unrouted_dropped() -> None:
    server = InterceptServer(Router())
    ours, peer = socketpair()
    server.attach_channel(ours, "socketpair")

    def before(server: InterceptServer, now: float) -> None:
        server.receive_ip_packet(response("198.19.1.6", 40001, SYN | ACK, seq=7), now)
        server.receive_ip_packet(response("198.19.1.6", 40001, RST, seq=8), now)
        server.receive_ip_packet(response("198.19.1.6", 40001, ACK, seq=9), now)  # no route
        peer.sendall(wire.HANDSHAKE + wire.client_add(ip_from_str("198.19.1.6"), 40001,
                                                      ip_from_str(TARGET), 8080))  # fmt: skip

    server.add_source(ScriptedSource(server, [before, routed("198.19.1.6", 40001)]))
    server.run()
    frames = read_frames(peer)
    got = [wire.decode_response_record(r) for f in frames for r in f]
    assert [(p.seq, p.flags) for p in got] == [(7, SYN | ACK), (8, RST)]
    c = server.counters
    assert (c["responses_delayed"], c["responses_delayed_flushed"], c["responses_unrouted"]) == (
        2,
        2,
        1,
    )
    server.close()


def test_slow_peer_is_bounded_and_framing_survives() -> None:
    # The peer reads nothing while 20000 records (1.3 MB) are routed to it: the loop must not
    # block, the buffer stays under its bound, the excess is dropped and counted, and the
    # bytes the kernel took followed by what still waits are whole frames.
    bound = 64 * 1024
    steps = [routed("198.19.1.5", 40000)] + [burst("198.19.1.5", 40000, 1000)] * 20
    server, peer = serve(steps, HELLO, out_buffer_max_bytes=bound)
    c = server.counters
    assert c["responses_dropped_slow"] > 0
    assert c["responses_forwarded"] + c["responses_dropped_slow"] == 20000
    ch = next(iter(server.channels.values()))
    assert 0 < len(ch.outbuf) <= bound
    dec = wire.FrameDecoder()
    frames = read_frames(peer, dec)
    frames += dec.feed_frames(bytes(ch.outbuf))
    assert dec.pending_bytes == 0
    seqs = [wire.decode_response_record(r).seq for f in frames for r in f]
    assert len(seqs) == c["responses_forwarded"]
    assert seqs[:100] == list(range(100))  # the first burst went out whole, in order
    server.close()


def test_old_client_closed_and_unknown_type_survives() -> None:
    server = InterceptServer(Router())
    old_ours, old_peer = socketpair()
    ok_ours, ok_peer = socketpair()
    server.attach_channel(old_ours, "old")
    server.attach_channel(ok_ours, "ok")
    old_peer.sendall(wire.client_add(ip_from_str("198.19.1.5"), 40000, 0, 0))
    ok_peer.sendall(wire.HANDSHAKE + wire.CLIENT_RECORD.pack(0, 0, 9, 0, 0) + HELLO[14:])
    steps = [routed("198.19.1.5", 40000), lambda s, now: len(s.channels) == 1]
    server.add_source(ScriptedSource(server, steps))
    server.run()
    assert server.counters["channels_old_client"] == 1
    assert old_peer.recv(10) == b""  # closed, and nothing was ever sent
    assert next(iter(server.channels.values())).peer == "ok"
    server.close()


def test_periodic_stats_line_uses_the_c_names() -> None:
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("intercept.server")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        steps = [
            routed("198.19.1.5", 40000),
            burst("198.19.1.5", 40000, 3),
            lambda s, now: any(m.startswith("total resp packs:3, all:3") for m in messages),
        ]
        server, _peer = serve(steps, HELLO, stats_interval_s=0.01)
    finally:
        logger.removeHandler(handler)
    line = next(m for m in messages if m.startswith("total resp packs:3"))
    assert "route:1, sock write cnt:1, unrouted:0, delayed:0" in line
    server.close()
