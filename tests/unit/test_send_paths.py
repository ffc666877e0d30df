"""engine/io/send.py picks its batch implementation once: the C extension, else ctypes, else one
sendto per packet, logging a fallback once (the real sends are tests/netns/test_send_batch.py)."""

from __future__ import annotations

import logging
import sys

import pytest

from engine.io import send


@pytest.fixture
def no_fastio(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.io

    monkeypatch.setitem(sys.modules, "engine.io._fastio", None)  # import raises ImportError
    monkeypatch.delattr(engine.io, "_fastio", raising=False)
    monkeypatch.setattr(send, "_fallback_logged", False)


def test_best_available_is_the_extension_when_built() -> None:
    fastio = pytest.importorskip("engine.io._fastio")
    path, fn = send._batch_sender(None)
    assert (path, fn) == ("fastio", fastio.send_raw_batch)


def test_without_the_extension_ctypes_is_used_and_said_once(
    no_fastio: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=send.log.name)
    assert send._batch_sender(None)[0] == "ctypes"
    assert send._batch_sender(None)[0] == "ctypes"
    lines = [r.getMessage() for r in caplog.records if "raw send" in r.getMessage()]
    assert len(lines) == 1
    assert "engine.io._fastio is not built" in lines[0] and "ctypes sendmmsg" in lines[0]


def test_without_sendmmsg_it_is_one_sendto_per_packet(
    no_fastio: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(send, "_ctypes_sendmmsg", lambda: None)
    caplog.set_level(logging.INFO, logger=send.log.name)
    assert send._batch_sender(None) == ("sendto", None)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "one sendto per packet" in warned[0].getMessage()


def test_an_explicit_fastio_request_fails_loudly_when_not_built(no_fastio: None) -> None:
    with pytest.raises(ImportError):
        send._batch_sender("fastio")
