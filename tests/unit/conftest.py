"""Fixtures shared by the unit tests: the session engines the session tests run against."""

from __future__ import annotations

import pytest

from engine.core.session import TcpSession

SESSION_ENGINES = ("python", "compiled")
"""The pure-Python session (the specification) and the compiled one (engine.dataplane)."""


def compiled_session_class() -> type:
    """engine.dataplane.engine.Session, or a skip naming why it is not there."""
    from engine import dataplane

    if not dataplane.AVAILABLE:
        pytest.skip(dataplane.UNAVAILABLE)
    try:
        from engine.dataplane.engine import Session
    except ImportError as exc:
        pytest.skip(f"engine.dataplane.engine is not compiled ({exc})")
    return Session


@pytest.fixture(params=SESSION_ENGINES)
def session_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> type:
    """The session class of one engine: TcpSession, or the compiled Session wrapper with the
    same public API.  Tests marked ``reference_only`` run with the Python engine only; the
    Python session is strict (an internal error raises)."""
    monkeypatch.setattr(TcpSession, "strict", True)
    if request.param == "python":
        return TcpSession
    if request.node.get_closest_marker("reference_only"):
        pytest.skip("reference-only: exercises the Python engine's internals")
    return compiled_session_class()
