"""Fixtures of the system tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.system import pairs


@pytest.fixture(autouse=True)
def _close_socketpairs() -> Iterator[None]:
    """Close every ``pairs.socketpair()`` end the test made, passed or failed."""
    yield
    pairs.close_all()
