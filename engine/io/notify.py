"""sd_notify(3) without libsystemd: tell systemd (Type=notify) that we are ready, stopping, ...

systemd passes the address of its notification socket in $NOTIFY_SOCKET: a filesystem path, or
an abstract-namespace name written with a leading '@' (the kernel's leading NUL byte).  A
message is one AF_UNIX datagram of newline-separated ``KEY=VALUE`` lines (``READY=1``,
``STATUS=...``, ``STOPPING=1``, ``RELOADING=1``, ``MAINPID=...``).  Outside systemd the
variable is unset and every call is a cheap no-op, so callers never need to check.

systemd only accepts messages from the service's main process by default (NotifyAccess=main):
the supervisor and intercept-mp's main process send them; forked children never do.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["notify", "notify_socket_address", "ready", "status", "stopping"]

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
STATUS_MAX_CHARS = 200
"""STATUS= is shown by `systemctl status`; keep it to one short line."""


def notify_socket_address(env: Mapping[str, str] | None = None) -> str | bytes | None:
    """The address from $NOTIFY_SOCKET (bytes for an abstract socket), or None if unusable."""
    value = (os.environ if env is None else env).get(NOTIFY_SOCKET_ENV, "")
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace (sd_notify(3))
    if value.startswith("/"):
        return value
    return None  # unset, empty, or a vsock/relative address we do not speak


def notify(*lines: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``lines`` as one notification; True if it was sent, False outside systemd or on
    any error (a failed notification must never take the service down)."""
    address = notify_socket_address(env)
    if address is None or not lines:
        return False
    message = "\n".join(line.replace("\n", " ") for line in lines).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError:
        return False
    return True


def ready(status_text: str | None = None, env: Mapping[str, str] | None = None) -> bool:
    """READY=1 (start-up finished), with an optional STATUS= line."""
    lines = ["READY=1"]
    if status_text:
        lines.append(_status_line(status_text))
    return notify(*lines, env=env)


def status(status_text: str, env: Mapping[str, str] | None = None) -> bool:
    """STATUS=<one line> (what `systemctl status` shows)."""
    return notify(_status_line(status_text), env=env)


def stopping(status_text: str | None = None, env: Mapping[str, str] | None = None) -> bool:
    """STOPPING=1: the service began its shutdown."""
    lines = ["STOPPING=1"]
    if status_text:
        lines.append(_status_line(status_text))
    return notify(*lines, env=env)


def _status_line(text: str) -> str:
    return "STATUS=" + text.replace("\n", " ")[:STATUS_MAX_CHARS]
