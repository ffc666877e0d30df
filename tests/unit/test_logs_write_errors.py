"""engine/io/logs.py: a log file that cannot be written never stops or floods the program.

/dev/full fails every write with ENOSPC, exactly like a full log disk.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.io import logs

NAME = "tcpcopy-test-logs"


def file_handler(lg: logging.Logger) -> logging.Handler:
    # pytest's log capture may add its own handlers next to ours.
    (handler,) = (h for h in lg.handlers if isinstance(h, logs._ReopenableFileHandler))
    return handler


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    lg = logs.setup_logging("/dev/full", name=NAME)
    yield lg
    for handler in list(lg.handlers):
        lg.removeHandler(handler)
        handler.close()


def test_full_disk_is_one_stderr_line_not_a_traceback_per_record(
    logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = file_handler(logger)
    now = [100.0]
    handler.clock = lambda: now[0]  # type: ignore[attr-defined]
    for i in range(5):
        logger.info("line %d", i)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err, err
    (line,) = err.splitlines()
    assert "cannot write the log file /dev/full" in line
    assert "No space left on device" in line and "1 line(s) lost" in line
    assert handler.lost_lines == 5  # type: ignore[attr-defined]

    # Still failing a report interval later: one more line, with the running count.
    now[0] += logs.LOG_WRITE_ERROR_REPORT_INTERVAL_S
    logger.warning("again")
    (line,) = capsys.readouterr().err.splitlines()
    assert "6 line(s) lost so far" in line


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_writes_resume_with_a_count_of_the_lost_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    lg = logs.setup_logging("/dev/full", fmt=fmt, name=NAME)
    try:
        handler = file_handler(lg)
        lg.info("lost 1")
        lg.info("lost 2")
        # The disk has room again (here: logrotate's SIGHUP reopens at a working path).
        target = tmp_path / "tcpcopy.log"
        handler.path = str(target)  # type: ignore[attr-defined]
        logs.reopen_logs(NAME)
        lg.info("back")
        lg.info("and on")
    finally:
        for h in list(lg.handlers):
            lg.removeHandler(h)
            h.close()
    lines = target.read_text().splitlines()
    assert len(lines) == 3, lines
    if fmt == "json":
        notice, back, on = (json.loads(x) for x in lines)
        assert notice["level"] == "warn"
        assert "2 line(s) could not be written (No space left on device)" in notice["msg"]
        assert (back["msg"], on["msg"]) == ("back", "and on")
    else:
        assert "[warn] log file " in lines[0] and "2 line(s) could not be written" in lines[0]
        assert lines[1].endswith("[info] back") and lines[2].endswith("[info] and on")
    assert capsys.readouterr().err.count("\n") == 1  # the first failure, reported once


def test_a_working_file_gets_every_line_unbuffered(tmp_path: Path) -> None:
    path = tmp_path / "ok.log"
    lg = logs.setup_logging(str(path), name=NAME)
    try:
        lg.info("one")
        # Unbuffered: on disk at once (a crash loses nothing already logged).
        assert path.read_text().endswith("[info] one\n")
        lg.info("two %s", "more")
        assert path.read_text().splitlines()[1].endswith("[info] two more")
    finally:
        for h in list(lg.handlers):
            lg.removeHandler(h)
            h.close()


class _ShortThenFull:
    """A file that takes `room` more bytes, then fails with ENOSPC (like a filling disk)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.data = bytearray()
        self.closed = False

    def write(self, b: bytes) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = min(self.room, len(b))
        self.data += b[:n]
        self.room -= n
        return n

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_a_line_torn_by_a_short_write_is_ended_before_the_notice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lg = logs.setup_logging(str(tmp_path / "x.log"), name=NAME)
    try:
        handler = file_handler(lg)
        fake = _ShortThenFull(room=7)
        handler.stream.close()  # type: ignore[attr-defined]  # the real file, replaced
        handler.stream = fake  # type: ignore[attr-defined]
        lg.info("first line, torn")
        lg.info("second line, lost")
        fake.room = 10_000  # room again
        lg.info("third")
    finally:
        for h in list(lg.handlers):
            lg.removeHandler(h)
            h.close()
    lines = fake.data.decode().splitlines()
    assert len(lines) == 3 and len(lines[0]) == 7, lines  # the torn start, ended
    assert "2 line(s) could not be written" in lines[1] and lines[2].endswith("[info] third")
    assert len(capsys.readouterr().err.splitlines()) == 1
