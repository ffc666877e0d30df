"""Logging set-up for tcpcopy-mp (and intercept-mp): the classic text line or JSON lines.

Text lines keep the C tools' shape (`2025/06/18 12:00:01 +123 [notice] msg`, spec §3.18) so C
users' log greps keep working; JSON lines (orjson) carry the same message plus any `extra`
fields, one object per line, for log shippers.  `reopen_logs()` is called on SIGHUP so
logrotate's "move then HUP" works.  A log file that cannot be written (full disk) never stops
the program nor floods stderr: see _ReopenableFileHandler.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import time
from collections.abc import Callable

LOGGER_NAME = "tcpcopy"
NOTICE = 25
"""syslog's notice, between info and warn (intercept-mp's start, stop and rule lines)."""

# C TCPCopy's level names, so a text line reads like the C log.
_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "crit",
}

# LogRecord attributes that are not user `extra` fields (JSON output copies the rest).
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
}


def _level_name(levelno: int) -> str:
    return _LEVEL_NAMES.get(levelno, logging.getLevelName(levelno).lower())


class TextFormatter(logging.Formatter):
    """`YYYY/MM/DD HH:MM:SS +mmm [level] msg` (local time, milliseconds after the +)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(record.created))
        millis = int(record.msecs)
        line = f"{stamp} +{millis:03d} [{_level_name(record.levelno)}] {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (epoch seconds), level, logger, msg, plus extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": _level_name(record.levelno),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        obj.update(
            (key, value)
            for key, value in record.__dict__.items()
            if key not in _STANDARD_ATTRS and not key.startswith("_")
        )
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        import orjson  # imported by JSON logging only

        return orjson.dumps(obj, default=str).decode()


LOG_WRITE_ERROR_REPORT_INTERVAL_S = 60.0
"""A log file that cannot be written (disk full, I/O error) is reported on stderr at most this
often, one line each time, instead of logging's default traceback per record."""


class _ReopenableFileHandler(logging.StreamHandler):
    """A file handler whose file can be reopened (SIGHUP after logrotate moved it).

    Every line is one unbuffered write(2), so a failing write loses exactly that line (no
    half-flushed buffer that reappears later) and the count of lost lines is exact.  A write
    error never reaches the caller: the replay must go on when its log disk is full.  The
    first failure, and then at most one per LOG_WRITE_ERROR_REPORT_INTERVAL_S, prints one
    line on stderr; when writing works again, the file gets one line saying how many lines
    were lost.
    """

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.clock = clock
        self.lost_lines = 0  # since the last successful write
        self.lost_reason = ""
        self._torn = False  # a short write left a partial line in the file
        self._next_report = float("-inf")
        super().__init__(open(path, "ab", buffering=0))  # noqa: SIM115

    def reopen(self) -> None:
        self.acquire()
        try:
            new = open(self.path, "ab", buffering=0)  # noqa: SIM115
            old, self.stream = self.stream, new
            old.close()
        finally:
            self.release()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + self.terminator).encode("utf-8", "replace")
        except Exception:
            self.handleError(record)
            return
        try:
            if self.lost_lines:
                # After a short write the file ends mid-line: end it before the notice.
                self._write(b"\n" * self._torn + self._lost_notice(record))
                self.lost_lines = 0
                self._torn = False
            self._write(line)
        except OSError as exc:
            self._write_failed(exc)

    def _write(self, data: bytes) -> None:
        written = self.stream.write(data)
        if written is not None and written < len(data):
            # A short write means the disk filled up mid-line; the rest would fail anyway.
            self._torn = written > 0 or self._torn
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def _lost_notice(self, record: logging.LogRecord) -> bytes:
        notice = logging.LogRecord(
            record.name,
            logging.WARNING,
            __file__,
            0,
            "log file %s: %d line(s) could not be written (%s) and are lost",
            (self.path, self.lost_lines, self.lost_reason),
            None,
        )
        return (self.format(notice) + self.terminator).encode("utf-8", "replace")

    def _write_failed(self, exc: OSError) -> None:
        self.lost_lines += 1
        self.lost_reason = exc.strerror or str(exc)
        now = self.clock()
        if now < self._next_report:
            return
        self._next_report = now + LOG_WRITE_ERROR_REPORT_INTERVAL_S
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
        try:
            sys.stderr.write(
                f"{prog}[{os.getpid()}]: cannot write the log file {self.path}: "
                f"{self.lost_reason}; {self.lost_lines} line(s) lost so far; still running "
                f"(reported at most every {LOG_WRITE_ERROR_REPORT_INTERVAL_S:g} s)\n"
            )
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.acquire()
        try:
            if self.stream and not self.stream.closed:
                self.stream.close()
        finally:
            self.release()
        super().close()


def setup_logging(
    path: str | None = None,
    fmt: str = "text",
    level: int = logging.INFO,
    name: str = LOGGER_NAME,
) -> logging.Logger:
    """Configure the `name` logger: to `path` (appended) or stderr, in `fmt` text|json.

    Raises OSError when the file cannot be opened (spec §4.1: a bad -l is fatal at start-up);
    the CLI turns it into a one-line error.
    """
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    handler: logging.Handler
    handler = _ReopenableFileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def reopen_logs(name: str = LOGGER_NAME) -> None:
    """Reopen file handlers of the `name` logger (SIGHUP); stderr handlers are left alone."""
    for handler in logging.getLogger(name).handlers:
        if isinstance(handler, _ReopenableFileHandler):
            try:
                handler.reopen()
            except OSError as exc:
                # Keep logging to the old file rather than dying on a rotation mishap (after
                # the privilege drop the log directory may not be writable), but say so.
                logging.getLogger(name).warning(
                    "SIGHUP: cannot reopen the log file (%s); still writing to the old one",
                    exc.strerror or exc,
                )


class RateLimiter:
    """Allows one event per key every `interval_s` seconds (send-error and loss log lines).

    `allow(key, now)` returns (allowed, suppressed_since_last_allowed) so the line that does
    get logged can say how many were swallowed.
    """

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._next: dict[object, float] = {}
        self._suppressed: dict[object, int] = {}

    def allow(self, key: object, now: float) -> tuple[bool, int]:
        if now >= self._next.get(key, float("-inf")):
            self._next[key] = now + self.interval_s
            return True, self._suppressed.pop(key, 0)
        self._suppressed[key] = self._suppressed.get(key, 0) + 1
        return False, 0


def json_bytes(values: dict[str, object]) -> bytes:
    """One JSON object and a newline, keys sorted (--summary-json's form)."""
    import orjson

    return orjson.dumps(values, default=str, option=orjson.OPT_SORT_KEYS) + b"\n"


def write_json_atomic(path: str, values: dict[str, object]) -> None:
    """One JSON object, written to a temporary file and renamed so readers never see half."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(json_bytes(values))
    os.replace(tmp, path)


def is_json(handler: logging.Handler) -> bool:
    """Whether ``handler`` writes JSON lines (--log-format json): a stats record then carries
    its values as one object instead of the C text lines."""
    return isinstance(handler.formatter, JsonFormatter)
