"""intercept-mp's --metrics endpoint: InterceptCollector over the server's counters (design §7).

The HTTP server runs in a daemon thread (prometheus_client); the event loop keeps mutating
``server.counters`` in the main thread.  A scrape copies the dict (the GIL keeps every value
whole) and never writes to it, so the loop stays the only writer.

The kernel's NFQUEUE drops (``/proc/net/netfilter/nfnetlink_queue``: queue_dropped +
user_dropped of our queue, ``nfqueue.read_queue_dropped``) are read afresh at every scrape:
the loop only folds them into ``counters["queue_dropped"]`` with its 30 s stats line, which
is too coarse for a 1 s scrape.  The exported value counts from the moment the exporter
started (the queue's earlier drops belong to earlier runs) and never goes backwards, and it
is never below what the loop has folded, so the stats line and the series agree.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["QueueDropReader", "start_intercept_exporter"]


class QueueDropReader:
    """Monotonic kernel NFQUEUE drops of one queue since construction (None if not listed)."""

    def __init__(self, queue_num: int, read: Callable[[int], int | None] | None = None) -> None:
        if read is None:
            from intercept.sources.nfqueue import read_queue_dropped

            read = read_queue_dropped
        self.queue_num = queue_num
        self._read = read
        self._base = read(queue_num)
        self._last = 0
        self._lock = threading.Lock()  # concurrent scrapes (one thread per request)

    def dropped(self) -> int | None:
        now = self._read(self.queue_num)
        with self._lock:
            if now is None:
                return None
            if self._base is None:  # the queue appeared after we started
                self._base = now
            self._last = max(self._last, now - self._base)
            return self._last


def counters_fn(
    counters: dict[str, int], queue: QueueDropReader | None
) -> Callable[[], dict[str, int]]:
    """What InterceptCollector reads at each scrape."""

    def values() -> dict[str, int]:
        out = dict(counters)
        if queue is not None:
            kernel = queue.dropped()
            if kernel is not None:
                out["queue_dropped"] = max(out.get("queue_dropped", 0), kernel)
        return out

    return values


def start_intercept_exporter(addr: str, server: Any, queue_num: int | None = None) -> Any:
    """Serve ``server.counters`` (+ NFQUEUE ``queue_num``'s kernel drops) on ``addr``.

    Returns the HTTP server (``shutdown()`` + ``server_close()`` stop it); ConfigError naming
    --metrics if it cannot listen.
    """
    from metrics.exporter import InterceptCollector, make_registry, start_exporter

    queue = QueueDropReader(queue_num) if queue_num is not None else None
    registry = make_registry(InterceptCollector(counters_fn(server.counters, queue)))
    return start_exporter(addr, registry)
