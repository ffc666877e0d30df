"""What the supervisor tells a human: the stats block, the final summary line and the offline
progress display.

Both read the counter block's totals (metrics.counters.CounterBlock.snapshot()["totals"]), so
they cost nothing on the data path.

* ``final_summary(totals)``: sessions (total and by outcome), requests sent, the replay
  fidelity (client bytes the target acknowledged over client bytes captured, design §7) and
  the drops by reason, non-zero only; ``summary_text`` makes it the one text log line.
* ``Progress``: an offline replay's progress.  On a terminal it redraws one line in place
  (``\\r`` + erase-to-end) about twice a second; elsewhere (a pipe, a file, systemd's journal)
  it logs a plain line every PLAIN_INTERVAL_S instead, because carriage returns make a mess of
  a log.  The percentage is file bytes consumed over the file sizes times -T (the capture
  process counts both): the packet total of a pcap file is not known without reading it all.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import Mapping
from typing import IO, Any

from metrics.counters import DROP_REASONS, OUTCOMES, SHED_REASONS

__all__ = [
    "Progress",
    "final_summary",
    "progress_fields",
    "progress_text",
    "stats_lines",
    "summary_text",
]

TTY_INTERVAL_S = 0.5
"""Terminal redraw period (about 2 per second: fast enough to look live, cheap)."""
PLAIN_INTERVAL_S = 10.0
"""Period of the plain progress line when stderr is not a terminal (or --stats-interval if
that is shorter)."""
RATE_WINDOW_S = 5.0
"""Replay rate and ETA are measured over this trailing window (a smooth but current rate)."""
_CLEAR_LINE = "\r\x1b[K"  # carriage return + ANSI "erase to end of line"


# -- the final summary ------------------------------------------------------------------------


def fidelity_percent(totals: Mapping[str, int]) -> float | None:
    """client_bytes_acked / client_bytes_captured x 100 (None before any byte was captured)."""
    captured = int(totals.get("client_bytes_captured", 0))
    if captured <= 0:
        return None
    return 100.0 * int(totals.get("client_bytes_acked", 0)) / captured


def final_summary(totals: Mapping[str, int]) -> dict[str, Any]:
    """The exit summary as one flat-ish JSON-able object (zero entries left out)."""
    outcomes = {o: int(totals.get("ended_" + o, 0)) for o in OUTCOMES}
    drops = {r: int(totals.get("drop_" + r, 0)) for r in DROP_REASONS}
    # Packets the capture dropped before any session saw them (a full ring) are loss the
    # byte fidelity cannot see: name them with the other drops so the summary stays honest.
    drops["ring_full"] = int(totals.get("ring_dropped", 0))
    fidelity = fidelity_percent(totals)
    shed = {r: int(totals.get("shed_sessions_" + r, 0)) for r in SHED_REASONS}
    return {
        "sessions": sum(outcomes.values()),
        "sessions_by_outcome": {k: v for k, v in outcomes.items() if v},
        "sessions_active": int(totals.get("active", 0)),
        "requests_sent": int(totals.get("requests", 0)),
        "client_bytes_captured": int(totals.get("client_bytes_captured", 0)),
        "client_bytes_acked": int(totals.get("client_bytes_acked", 0)),
        "fidelity_pct": None if fidelity is None else round(fidelity, 2),
        "drops": {k: v for k, v in drops.items() if v},
        # Whole sessions not replicated under overload (engine/core/shed.py), by reason.
        "sessions_shed": {k: v for k, v in shed.items() if v},
        # Offline backpressure: how much later than its schedule the file was replayed.
        "offline_slowed_s": round(int(totals.get("offline_paused_ms", 0)) / 1000, 3),
        # Client tuples beyond a client's own fake address: spilled over the -c pool, or
        # reused in the target's TIME_WAIT (RFC 6191).
        "tuples_spilled": int(totals.get("tuples_spilled", 0)),
        "tuples_reused": int(totals.get("tuples_reused", 0)),
    }


def summary_text(summary: Mapping[str, Any]) -> str:
    """The summary as the one human log line."""
    by_outcome = ", ".join(f"{k} {v}" for k, v in summary["sessions_by_outcome"].items())
    fidelity = summary["fidelity_pct"]
    fidelity_text = (
        "n/a (no client payload captured)"
        if fidelity is None
        else f"{fidelity:.2f} % ({summary['client_bytes_acked']} of "
        f"{summary['client_bytes_captured']} client bytes acked)"
    )
    drops = ", ".join(f"{k} {v}" for k, v in summary["drops"].items()) or "none"
    if summary["drops"].get("ring_full"):
        fidelity_text += " of the packets that reached a worker"
    shed = summary.get("sessions_shed") or {}
    shed_text = (
        f", sessions shed under overload {sum(shed.values())} ("
        + ", ".join(f"{k} {v}" for k, v in shed.items())
        + ")"
        if shed
        else ""
    )
    return (
        f"summary: sessions {summary['sessions']}"
        + (f" ({by_outcome})" if by_outcome else "")
        + (f", {summary['sessions_active']} still active" if summary["sessions_active"] else "")
        + shed_text
        + (
            f", offline replay slowed by {summary['offline_slowed_s']:.1f} s (workers behind)"
            if summary.get("offline_slowed_s")
            else ""
        )
        + f", requests sent {summary['requests_sent']}, fidelity {fidelity_text}, drops: {drops}"
        + (
            f", client tuples spilled {summary.get('tuples_spilled', 0)}"
            f" reused {summary.get('tuples_reused', 0)}"
            if summary.get("tuples_spilled") or summary.get("tuples_reused")
            else ""
        )
    )


# -- offline progress -------------------------------------------------------------------------


def progress_fields(
    totals: Mapping[str, int], rate_pps: float | None, eta_s: float | None
) -> dict[str, Any]:
    read = int(totals.get("offline_bytes_read", 0))
    total = int(totals.get("offline_bytes_total", 0))
    percent = min(100.0, 100.0 * read / total) if total > 0 else None
    return {
        "percent": None if percent is None else round(percent, 1),
        "packets_read": int(totals.get("offline_records", 0)),
        "packets_replayed": int(totals.get("offline_packets", 0)),
        "sessions_active": int(totals.get("active", 0)),
        "rate_pps": None if rate_pps is None else round(rate_pps, 1),
        "eta_s": None if eta_s is None else round(eta_s, 1),
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def progress_text(fields: Mapping[str, Any]) -> str:
    percent = fields["percent"]
    rate = fields["rate_pps"]
    return (
        f"replay {'?' if percent is None else f'{percent:5.1f}'}% | "
        f"{fields['packets_read']} packets read | "
        f"{fields['sessions_active']} sessions active | "
        f"{'?' if rate is None else f'{rate:.0f}'} pkt/s | "
        f"ETA {_duration(fields['eta_s'])}"
    )


class Progress:
    """Renders progress from successive totals; ``update`` when ``due``, ``finish`` once.

    ``tty``: redraw one line on ``stream``; otherwise log through ``log`` every
    ``plain_interval_s``.  On a terminal a log line would land after the half-drawn progress
    line, so ``attach`` adds a filter to the log handlers writing to ``stream`` that erases
    the progress line first (it is redrawn on the next update).
    """

    def __init__(
        self,
        log: logging.Logger,
        *,
        stream: IO[str] | None = None,
        tty: bool | None = None,
        plain_interval_s: float = PLAIN_INTERVAL_S,
    ) -> None:
        self.log = log
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            try:
                tty = self.stream.isatty()
            except (AttributeError, ValueError, OSError):
                tty = False
        self.tty = tty
        self.interval_s = TTY_INTERVAL_S if tty else plain_interval_s
        self._next = float("-inf")
        self._samples: deque[tuple[float, int, int]] = deque()  # (now, records, bytes)
        self._shown = False  # a progress line is on the terminal, not yet ended
        self._filters: list[tuple[logging.Handler, logging.Filter]] = []

    def attach(self) -> None:
        if not self.tty:
            return
        for handler in self.log.handlers:
            if getattr(handler, "stream", None) is self.stream:
                flt = _ClearProgressLine(self)
                handler.addFilter(flt)
                self._filters.append((handler, flt))

    def detach(self) -> None:
        for handler, flt in self._filters:
            handler.removeFilter(flt)
        self._filters.clear()

    def due(self, now: float) -> bool:
        return now >= self._next

    def next_due(self) -> float:
        return self._next

    def update(self, totals: Mapping[str, int], now: float) -> str:
        self._next = now + self.interval_s
        text, fields = self._render(totals, now)
        if self.tty:
            self._write(_CLEAR_LINE + text)
            self._shown = True
        else:
            self.log.info("progress: %s", text, extra={"progress": fields})
        return text

    def finish(self, totals: Mapping[str, int], now: float) -> None:
        """The last state, then end the line (terminal) so what follows starts clean."""
        text, fields = self._render(totals, now)
        if self.tty:
            self._write(_CLEAR_LINE + text + "\n")
            self._shown = False
        else:
            self.log.info("progress: %s", text, extra={"progress": fields})
        self.detach()

    def clear(self) -> None:
        """Erase the progress line (before something else is written to the terminal)."""
        if self._shown:
            self._shown = False
            self._write(_CLEAR_LINE)

    def _render(self, totals: Mapping[str, int], now: float) -> tuple[str, dict[str, Any]]:
        records = int(totals.get("offline_records", 0))
        done = int(totals.get("offline_bytes_read", 0))
        samples = self._samples
        samples.append((now, records, done))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW_S:
            samples.popleft()
        rate = eta = None
        t0, r0, b0 = samples[0]
        if now > t0:
            rate = (records - r0) / (now - t0)
            byte_rate = (done - b0) / (now - t0)
            total = int(totals.get("offline_bytes_total", 0))
            if total > 0 and byte_rate > 0:
                eta = max(0.0, total - done) / byte_rate
            elif total > 0 and done >= total:
                eta = 0.0
        fields = progress_fields(totals, rate, eta)
        return progress_text(fields), fields

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self.tty = False  # the terminal went away: fall back to log lines


class _ClearProgressLine(logging.Filter):
    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear()
        return True


# spec §3.18: the C statistics lines, labels unchanged so C users can read them, plus unsend.
# Each value is looked up under the C label, its snake_case form, then the listed aliases.
_STATS_LAYOUT: tuple[tuple[tuple[str, tuple[str, ...]], ...], ...] = (
    (("active", ()), ("rel", ("released",)), ("obs del", ("obsolete",)), ("tw", ("linger",))),
    (("conns", ()), ("resp", ("responses",)), ("c-resp", ("resp_cont",))),
    (("resp fin", ()), ("resp rst", ())),
    (("send", ("sent",)), ("send content", ())),
    (("send syn", ()), ("fin", ("send_fin",)), ("reset", ("send_rst",))),
    (("reconnect", ()), ("for no syn", ("fake_syn",)), ("reannounced", ("sessions_reannounced",))),
    (("retransmit", ()),),
    (("recv packs after retransmission", ()),),
    (("syn cnt", ()), ("all clt", ()), ("clt cont", ())),
    (("total cont retransmit", ()), ("frag", ("capture_fragment",))),
    (("total captured packets", ("capture_packets",)),),
    (
        ("no tuple", ("drop_no_tuple",)),
        ("tuples spilled", ("tuples_spilled",)),
        ("tuples reused", ("tuples_reused",)),
    ),
    (
        ("unsend", ()),
        ("ring dropped", ()),
        ("route unannounced", ()),
        ("send errors", ()),
        ("intercept conns", ("channels_connected",)),
    ),
)


def _lookup(values: dict[str, object], label: str, aliases: tuple[str, ...]) -> object:
    snake = label.replace(" ", "_").replace("-", "_")
    for name in (label, snake, *aliases):
        if name in values:
            return values[name]
    return 0


def stats_lines(values: dict[str, object]) -> list[str]:
    """The periodic statistics block (spec §3.18) from a summary() mapping."""
    return [
        ",".join(f"{label}:{_lookup(values, label, aliases)}" for label, aliases in line)
        for line in _STATS_LAYOUT
    ]
