"""engine.io.notify: sd_notify datagrams reach a socket named like systemd names it."""

from __future__ import annotations

import os
import socket

import pytest

from engine.io import notify


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_path_socket_gets_ready_and_status(tmp_path):
    path = str(tmp_path / "notify")
    with _receiver(path) as rx:
        env = {"NOTIFY_SOCKET": path}
        assert notify.ready("2 workers up", env=env)
        assert rx.recv(4096) == b"READY=1\nSTATUS=2 workers up"
        assert notify.status("line\nbreak", env=env)
        assert rx.recv(4096) == b"STATUS=line break"
        assert notify.stopping(env=env)
        assert rx.recv(4096) == b"STOPPING=1"


def test_abstract_socket_with_at_sign():
    name = f"tcpcopy-mp-test-{os.getpid()}"
    with _receiver(b"\0" + name.encode()) as rx:
        assert notify.notify("READY=1", env={"NOTIFY_SOCKET": "@" + name})
        assert rx.recv(4096) == b"READY=1"


@pytest.mark.parametrize("value", [None, "", "relative/path", "vsock:2:1234"])
def test_without_a_usable_socket_nothing_is_sent(value):
    env = {} if value is None else {"NOTIFY_SOCKET": value}
    assert notify.notify_socket_address(env) is None
    assert notify.ready(env=env) is False


def test_a_vanished_socket_is_not_an_error(tmp_path):
    assert notify.ready(env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_status_is_truncated_to_one_short_line(tmp_path):
    path = str(tmp_path / "notify")
    with _receiver(path) as rx:
        notify.status("x" * 1000, env={"NOTIFY_SOCKET": path})
        assert rx.recv(4096) == b"STATUS=" + b"x" * notify.STATUS_MAX_CHARS
