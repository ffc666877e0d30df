"""Socketpairs closed by the test's teardown (tests/system/conftest.py), so that no test
leaves a socket to the garbage collector, whichever way it ends."""

from __future__ import annotations

import socket

_open: list[socket.socket] = []


def socketpair() -> tuple[socket.socket, socket.socket]:
    """``socket.socketpair()``, both ends closed after the test (closing twice is harmless)."""
    ours, peer = socket.socketpair()
    _open.extend((ours, peer))
    return ours, peer


def close_all() -> None:
    while _open:
        _open.pop().close()
