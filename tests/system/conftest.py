"""Fixtures of the system tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.system import pairs

NETNS_ADDRESS = "198.18.200.1"
"""The address of the ``netns`` fixture's loopback (a /24: every 198.18.200.x is local)."""

needs_root_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
)


@pytest.fixture(autouse=True)
def _close_socketpairs() -> Iterator[None]:
    """Close every ``pairs.socketpair()`` end the test made, passed or failed."""
    yield
    pairs.close_all()


@pytest.fixture
def netns() -> Iterator[str]:
    """A private network namespace, its loopback up with 198.18.200.1/24; its name."""
    name = f"tcmp-cli-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(
            ["ip", "-n", name, "addr", "add", f"{NETNS_ADDRESS}/24", "dev", "lo"], check=True
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
