"""intercept-mp's authenticated (extended) channel, design §6 and docs/protocol.md.

The server loop runs in this process over ``socketpair``s (no network): the peer side plays
tcpcopy-mp with the real client state machine (``wire.ExtendedClientHandshake``), scripted
step by step from the loop's own passes (``ScriptedSource``).  The command-line part runs the
installed console scripts for the ``--secret-file`` checks (no traffic).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.codec import wire
from engine.codec.packet import SYN, ip_from_str
from intercept.cli import parse_args
from intercept.config import MAX_ROUTES_PER_CONN_DEFAULT
from intercept.router import Router
from intercept.server import InterceptServer
from testbed.netns import in_netns

from .conftest import NETNS_ADDRESS, needs_root_netns
from .pairs import socketpair
from .test_intercept_cli import TARGET, ScriptedSource, burst, read_frames, response, routed

REPO = Path(__file__).resolve().parents[2]
INTERCEPT_BIN = REPO / ".venv" / "bin" / "intercept-mp"
TCPCOPY_BIN = REPO / ".venv" / "bin" / "tcpcopy-mp"
SECRET = b"s3cret-shared-by-both-ends"
CLIENT = "198.19.1.5"
SCRIPT_DEADLINE_S = 10.0
ADD = wire.client_add(ip_from_str(CLIENT), 40000, ip_from_str(TARGET), 8080)


# --- the peer (tcpcopy-mp's side), driven from loop passes -------------------------------------


class Peer:
    """One end of a socketpair attached to the server as a tcpcopy connection."""

    def __init__(self, server: InterceptServer, name: str = "198.18.0.9:40001") -> None:
        ours, self.sock = socketpair()
        self.sock.setblocking(False)
        server.attach_channel(ours, name)
        self.inbox = bytearray()
        self.eof = False

    def pull(self) -> None:
        while not self.eof:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except ConnectionResetError:
                self.eof = True
                return
            if not data:
                self.eof = True
            self.inbox += data


def handshake_steps(peer: Peer, secret: bytes, outcome: dict) -> list[Callable]:
    """Steps that run the client side: hello, then proof on the challenge, then the answer.
    ``outcome`` gets "open" (and "leftover") or "error" (the exception)."""
    client = wire.ExtendedClientHandshake(secret, os.urandom(32))

    def hello(server: InterceptServer, now: float) -> None:
        peer.sock.sendall(client.hello)

    def answer(server: InterceptServer, now: float) -> bool:
        peer.pull()
        if not peer.inbox:
            return peer.eof  # nothing yet: retry next pass, unless the server closed
        data = bytes(peer.inbox)
        peer.inbox.clear()
        try:
            reply = client.feed(data)
        except wire.DecodeError as e:
            outcome["error"] = e
            return True
        if reply:
            peer.sock.sendall(reply)
        if client.done:
            outcome["open"] = True
            peer.inbox += client.take_leftover()
            return True
        return False

    return [hello, answer]


def until_closed(peer: Peer) -> Callable:
    """The server shut its side (refusal): we see EOF, close ours, and wait for the server to
    drop the channel."""

    def step(server: InterceptServer, now: float) -> bool:
        peer.pull()
        if peer.eof and peer.sock.fileno() >= 0:
            peer.sock.close()
        return peer.eof and not server.channels

    return step


class TimedScript(ScriptedSource):
    """ScriptedSource bounded by wall-clock time instead of loop passes: the handshake
    deadlines are checked once a second, and the loop spins meanwhile."""

    def __init__(self, server: InterceptServer, steps: list[Callable]) -> None:
        super().__init__(server, steps)
        self.deadline = time.monotonic() + SCRIPT_DEADLINE_S

    def on_readable(self, now: float) -> None:
        assert time.monotonic() < self.deadline, f"script stuck at {self.steps[:1]}"
        self.passes = 0
        super().on_readable(now)


def run(server: InterceptServer, steps: list[Callable]) -> None:
    server.add_source(TimedScript(server, steps))
    assert server.run() == "script done"


@pytest.fixture
def server() -> Iterator[InterceptServer]:
    srv = InterceptServer(Router(), secret=SECRET)
    yield srv
    srv.close()


# --- who gets in ------------------------------------------------------------------------------


def test_right_secret_accepted_then_client_add_and_responses_flow(server) -> None:
    peer = Peer(server)
    outcome: dict = {}
    steps = handshake_steps(peer, SECRET, outcome)
    steps += [
        lambda s, now: peer.sock.sendall(ADD),
        routed(CLIENT, 40000),
        burst(CLIENT, 40000, 3),
    ]
    run(server, steps)
    assert outcome == {"open": True}
    c = server.counters
    assert (c["auth_ok"], c["auth_refused"], c["compat_accepted"]) == (1, 0, 0)
    dec = wire.FrameDecoder()
    frames = dec.feed_frames(bytes(peer.inbox)) + read_frames(peer.sock, dec)
    assert [wire.decode_response_record(r).seq for f in frames for r in f] == [0, 1, 2]


def test_wrong_secret_refused_nothing_routed(server) -> None:
    peer = Peer(server)
    outcome: dict = {}
    steps = handshake_steps(peer, b"not-the-secret-at-all!", outcome)
    run(server, [*steps, until_closed(peer)])
    assert isinstance(outcome.get("error"), wire.HandshakeRefused)
    assert outcome["error"].code == wire.REFUSE_BAD_PROOF
    c = server.counters
    assert (c["auth_refused"], c["auth_ok"], c["routes_added"]) == (1, 0, 0)
    assert len(server.router) == 0


def test_compat_client_refused_without_allow_compat(server) -> None:
    peer = Peer(server)
    peer.sock.sendall(wire.HANDSHAKE + ADD)
    # A SYN-ACK for its flow arrives: it must not be routed to the refused peer.
    syn = lambda s, now: s.receive_ip_packet(response(CLIENT, 40000, SYN), now)  # noqa: E731
    run(server, [syn, until_closed(peer)])
    assert peer.inbox == b""  # a compat peer gets no bytes at all, just the close
    c = server.counters
    assert (c["compat_refused"], c["compat_accepted"], c["routes_added"]) == (1, 0, 0)
    assert len(server.router) == 0


def test_compat_client_accepted_with_allow_compat() -> None:
    server = InterceptServer(Router(), secret=SECRET, allow_compat=True)
    try:
        peer = Peer(server)
        peer.sock.sendall(wire.HANDSHAKE + ADD)
        run(server, [routed(CLIENT, 40000), burst(CLIENT, 40000, 2)])
        frames = read_frames(peer.sock)
        assert [wire.decode_response_record(r).seq for f in frames for r in f] == [0, 1]
        assert server.counters["compat_accepted"] == 1
        assert server.counters["compat_refused"] == 0
    finally:
        server.close()


def test_without_a_secret_compat_works_and_extended_is_told_why() -> None:
    server = InterceptServer(Router())
    try:
        compat = Peer(server, "198.18.0.8:1")
        compat.sock.sendall(wire.HANDSHAKE + ADD)
        ext = Peer(server, "198.18.0.9:1")
        outcome: dict = {}
        steps = handshake_steps(ext, SECRET, outcome)
        run(server, [routed(CLIENT, 40000), *steps, until_closed_one(ext)])
        assert outcome["error"].code == wire.REFUSE_NO_SECRET
        c = server.counters
        assert (c["compat_accepted"], c["auth_refused"]) == (1, 1)
    finally:
        server.close()


def until_closed_one(peer: Peer) -> Callable:
    def step(server: InterceptServer, now: float) -> bool:
        peer.pull()
        if peer.eof and peer.sock.fileno() >= 0:
            peer.sock.close()
        return peer.eof and len(server.channels) == 1

    return step


def test_idle_peer_is_closed_at_the_handshake_deadline() -> None:
    server = InterceptServer(Router(), secret=SECRET, handshake_timeout_s=0.1)
    try:
        peer = Peer(server)
        peer.sock.sendall(wire.EXT_HELLO[:5])  # starts, then says nothing more
        run(server, [until_closed(peer)])
        assert server.counters["handshake_timeouts"] == 1
    finally:
        server.close()


def test_refusals_logged_once_per_peer_address(server) -> None:
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("intercept.server")
    logger.addHandler(handler)
    try:
        peers = [Peer(server, f"198.18.0.7:{port}") for port in (1000, 1001, 1002)]
        for p in peers:
            p.sock.sendall(wire.HANDSHAKE)
        run(server, [until_closed_all(peers)])
    finally:
        logger.removeHandler(handler)
    assert server.counters["compat_refused"] == 3
    refused = [line for line in lines if "refused" in line]
    assert len(refused) == 1 and "198.18.0.7:1000" in refused[0], lines


def until_closed_all(peers: list[Peer]) -> Callable:
    def step(server: InterceptServer, now: float) -> bool:
        for p in peers:
            p.pull()
            if p.eof and p.sock.fileno() >= 0:
                p.sock.close()
        return all(p.eof for p in peers) and not server.channels

    return step


@pytest.mark.netns
@needs_root_netns
def test_bind_address_is_honoured(netns: str) -> None:
    """In a private namespace where 198.18.200.1 and .2 are both local, a server bound to .2
    accepts there and not on .1."""
    bound = "198.18.200.2"  # NETNS_ADDRESS is .1
    server = InterceptServer(Router(), bind_ip=bound, port=0)
    try:
        host, port = in_netns(netns, server.listen)  # the socket lives in the namespace
        assert host == bound

        def connect(ip: str) -> int:
            with socket.socket() as s:
                s.settimeout(2)
                return s.connect_ex((ip, port))

        assert in_netns(netns, lambda: connect(NETNS_ADDRESS)) != 0  # not listening there
        assert in_netns(netns, lambda: connect(bound)) == 0
    finally:
        server.close()


# --- the command line --------------------------------------------------------------------------


def write_secret(path: Path, text: str = "  " + SECRET.decode() + "\nsecond line\n",
                 mode: int = 0o600) -> Path:  # fmt: skip
    path.write_text(text)
    path.chmod(mode)
    return path


def test_secret_file_first_line_stripped(tmp_path: Path) -> None:
    opts = parse_args(["-F", "tcp", "--secret-file", str(write_secret(tmp_path / "s"))])
    assert opts.secret == SECRET and not opts.allow_compat
    assert "s3cret" not in repr(opts)  # never printed with the options
    opts = parse_args(
        ["-F", "tcp", "--secret-file", str(write_secret(tmp_path / "s")), "--allow-compat"]
    )
    assert opts.allow_compat
    assert parse_args(["-F", "tcp"]).secret is None


def test_max_routes_per_conn_flag() -> None:
    assert parse_args(["-F", "tcp"]).max_routes_per_conn == MAX_ROUTES_PER_CONN_DEFAULT
    assert parse_args(["-F", "tcp", "--max-routes-per-conn", "10"]).max_routes_per_conn == 10
    assert parse_args(["-F", "tcp", "--max-routes-per-conn", "0"]).max_routes_per_conn is None


def bad_secret_files(tmp_path: Path) -> list[tuple[str, Path, str]]:
    cases = [
        ("world-writable", write_secret(tmp_path / "ww", mode=0o602), "writable by other"),
        ("group-writable", write_secret(tmp_path / "gw", mode=0o620), "writable by other"),
        ("world-readable", write_secret(tmp_path / "wr", mode=0o644), "readable by every"),
        ("short", write_secret(tmp_path / "short", "tooshort\n"), "at least 16"),
        ("empty", write_secret(tmp_path / "empty", "\n"), "at least 16"),
        ("missing", tmp_path / "nope", "cannot open"),
        ("directory", tmp_path, "not a regular file"),
    ]
    if os.geteuid() == 0:
        other = write_secret(tmp_path / "other")
        os.chown(other, 12345, 12345)
        cases.append(("foreign owner", other, "owned by uid 12345"))
    return cases


def test_bad_secret_file_is_one_line_exit_2(tmp_path: Path) -> None:
    for what, path, message in bad_secret_files(tmp_path):
        for argv in (
            [str(INTERCEPT_BIN), "-F", "tcp", "--secret-file", str(path)],
            [str(TCPCOPY_BIN), "-x", "80-198.18.0.2:80", "-s", "198.18.0.3",
             "--secret-file", str(path)],
        ):  # fmt: skip
            res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            lines = res.stderr.splitlines()
            assert res.returncode == 2, (what, argv[0], res.stderr)
            assert len(lines) == 1 and "--secret-file" in lines[0], (what, res.stderr)
            assert message in lines[0], (what, lines[0])
            assert "Traceback" not in res.stderr


def test_tcpcopy_secret_file_reaches_the_config(tmp_path: Path) -> None:
    from engine.app.cli import build_config, build_parser

    path = write_secret(tmp_path / "s")
    args = build_parser().parse_args(
        ["-x", "80-198.18.0.2:80", "-s", "198.18.0.3", "--secret-file", str(path)]
    )
    cfg = build_config(args)
    assert cfg.intercept_secret == SECRET
    assert "s3cret" not in repr(cfg)
    args = build_parser().parse_args(["-x", "80-198.18.0.2:80", "-s", "198.18.0.3"])
    assert build_config(args).intercept_secret is None
