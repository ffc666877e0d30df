"""The CPU scheduling policy of a data-plane process (``--sched`` of both programs).

A replay is a chain of small wake-ups: the target's server answers, intercept-mp is woken
by the NFQUEUE packet and writes a frame, the worker is woken by the frame and sends the next
requests.  Under the normal policy (SCHED_OTHER) every one of those wake-ups may preempt the
task that is running on that CPU, often the very server whose answers are still coming: one
frame then carries one or two records, and every record costs a wake-up, a context switch and
an acknowledgement on the channel.  Under SCHED_BATCH a woken process waits for the running
task to block or use up its slice instead of preempting it; it still gets its fair share of
the CPU (the nice value is unchanged).  So the server finishes its burst, intercept-mp reads
the burst in one pass, and the worker reads one frame for what it would have taken several
wake-ups to read.  It is also what a tool that runs beside a production server should do:
its wake-ups never preempt that server.  On the bench's offline keep-alive replay with two
workers, three runs each way in the same hour: CPU per 1,000 requests 0.0096-0.0106 s under
the normal policy and 0.0082-0.0087 s under batch, 56-60 k against 65-73 k requests per
second (README, "How it differs").

``batch`` (the default) switches a process that runs under the normal policy to SCHED_BATCH;
a process started under another one (``chrt``: real-time, idle, or batch already) keeps it.
``inherit`` leaves the policy as started.  The policy is per thread: it is set before the
process starts its threads, which inherit it.  Setting it needs no privilege; where it is
refused (a seccomp filter), the caller logs why and the process runs as started.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from engine.core.config import SCHED_CHOICES

__all__ = ["SCHED_CHOICES", "Applied", "apply", "policy_name"]

_NAMES = {
    os.SCHED_OTHER: "normal",
    os.SCHED_BATCH: "batch",
    os.SCHED_IDLE: "idle",
    os.SCHED_FIFO: "fifo",
    os.SCHED_RR: "rr",
}


def policy_name(pid: int = 0) -> str:
    """The scheduling policy of ``pid`` (0: the calling thread) as a short name."""
    policy = os.sched_getscheduler(pid)
    return _NAMES.get(policy & 0xFF, str(policy))  # (without SCHED_RESET_ON_FORK)


class Applied(NamedTuple):
    """What ``apply`` did."""

    policy: str
    """The policy the thread runs under now (``policy_name``)."""
    note: str | None = None
    """Why ``batch`` did not switch it (None when it did, or was not asked to)."""
    refused: bool = False
    """The switch was tried and refused (a warning); else a note is only information."""


def apply(choice: str) -> Applied:
    """Apply ``--sched choice`` to the calling thread (threads it starts later inherit it):
    ``batch`` switches the normal policy to SCHED_BATCH and keeps any other one (with a
    note); a refused switch leaves the policy as it was (``refused``, the note names the
    error); ``inherit`` changes nothing."""
    if choice not in SCHED_CHOICES:
        raise ValueError(f"--sched: {choice!r} is not one of {', '.join(SCHED_CHOICES)}")
    current = policy_name()
    if choice == "inherit" or current == "batch":
        return Applied(current)
    if current != "normal":
        return Applied(current, f"started under the {current} policy, which it keeps")
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as e:
        return Applied(current, f"sched_setscheduler(SCHED_BATCH) failed: {e.strerror or e}", True)
    return Applied(policy_name())
