"""Signals for a selector loop: the self-pipe every loop of both programs uses (design §5).

A signal handler only queues the signal number (or calls the loop's own one-line handler);
``signal.set_wakeup_fd`` writes a byte into the write end of a socket pair, so the loop's
``select`` wakes at once instead of at its next timer.  The loop registers ``reader`` with its
selector, calls ``drain()`` when it is readable and handles ``pop()`` outside the handler.

Also here: ``daemonize``, the classic double fork both programs' ``-d`` use.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Iterable

Handler = Callable[[int, object], None]


class SignalPipe:
    """Route ``signals`` to a queue (or to ``handler``) and wake a selector through a pipe."""

    def __init__(
        self,
        signals: Iterable[int],
        handler: Handler | None = None,
        ignore_sigpipe: bool = False,
    ) -> None:
        self.signals = tuple(signals)
        self.pending: list[int] = []
        self._handler: Handler = handler if handler is not None else self._queue
        self._ignore_sigpipe = ignore_sigpipe
        self.reader: socket.socket | None = None
        self._writer: socket.socket | None = None
        self._old_wakeup = -1
        self._old_handlers: dict[int, object] = {}

    def _queue(self, signum: int, frame: object) -> None:
        self.pending.append(signum)

    def install(self) -> socket.socket:
        """Create the pair, point the wake-up fd at it, install the handlers; returns the
        read end for the loop's selector."""
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._old_handlers = {s: signal.signal(s, self._handler) for s in self.signals}
        if self._ignore_sigpipe:
            # spec §1.7 QUIRK: C dies on SIGPIPE; sends use MSG_NOSIGNAL, and a stray SIGPIPE
            # from anything else must not kill the process either.
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        return self.reader

    def wake(self) -> None:
        """Wake the loop from outside a signal (another thread, a stop request)."""
        if self._writer is not None:
            try:
                self._writer.send(b"\0")
            except (BlockingIOError, OSError):
                pass

    def drain(self) -> None:
        """Empty the read end (the loop was woken; the queue says why)."""
        if self.reader is None:
            return
        try:
            while self.reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def pop(self) -> int | None:
        """The oldest queued signal, or None."""
        return self.pending.pop(0) if self.pending else None

    def close(self, restore_handlers: bool = False) -> None:
        """Stop waking through the pair and close it; ``restore_handlers`` also puts back the
        dispositions found at ``install`` (a loop that may run again in the same process)."""
        if self.reader is None:
            return
        signal.set_wakeup_fd(self._old_wakeup if restore_handlers else -1)
        if restore_handlers:
            for s, old in self._old_handlers.items():
                signal.signal(s, old)  # type: ignore[arg-type]
        self.reader.close()
        assert self._writer is not None
        self._writer.close()
        self.reader = self._writer = None

    def reset_in_child(self) -> None:
        """In a forked child: default dispositions, no wake-up fd, the inherited pair closed
        (the child installs its own)."""
        signal.set_wakeup_fd(-1)
        for s in self.signals:
            signal.signal(s, signal.SIG_DFL)
        for sock in (self.reader, self._writer):
            if sock is not None:
                sock.close()
        self.reader = self._writer = None


def daemonize() -> None:
    """-d: detach (double fork, new session, stdio to /dev/null), as C's daemonize()."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)
