"""--sched (engine/io/sched.py): the scheduling policy of a data-plane thread.

Each case runs in a thread of its own: the policy is per thread, so the test process keeps
its own whatever the case sets.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

from engine.io import sched

_SET = os.sched_setscheduler  # (one test replaces os.sched_setscheduler)


def in_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a new thread that starts under the normal policy (whatever the test
    process runs under)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            _SET(0, os.SCHED_OTHER, os.sched_param(0))
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_batch_switches_the_normal_policy_to_sched_batch() -> None:
    def case() -> tuple[str, sched.Applied, int]:
        before = sched.policy_name()
        return before, sched.apply("batch"), os.sched_getscheduler(0)

    mine = os.sched_getscheduler(0)
    before, applied, policy = in_thread(case)
    assert before == "normal"
    assert applied == sched.Applied("batch")
    assert policy == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == mine  # the test's own thread is untouched


def test_threads_started_after_the_switch_inherit_it() -> None:
    def case() -> int:
        sched.apply("batch")
        box: list[int] = []
        t = threading.Thread(target=lambda: box.append(os.sched_getscheduler(0)))
        t.start()
        t.join()
        return box[0]

    assert in_thread(case) == os.SCHED_BATCH


def test_inherit_changes_nothing() -> None:
    def case() -> tuple[sched.Applied, int]:
        return sched.apply("inherit"), os.sched_getscheduler(0)

    applied, policy = in_thread(case)
    assert applied == sched.Applied("normal")
    assert policy == os.SCHED_OTHER


def test_another_policy_chosen_by_the_user_is_kept_with_a_note() -> None:
    def case() -> tuple[sched.Applied, int]:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # as `chrt -i 0` would
        return sched.apply("batch"), os.sched_getscheduler(0)

    applied, policy = in_thread(case)
    assert policy == os.SCHED_IDLE
    assert applied.policy == "idle" and not applied.refused
    assert applied.note == "started under the idle policy, which it keeps"


def test_batch_already_is_not_a_note() -> None:
    def case() -> sched.Applied:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        return sched.apply("batch")

    assert in_thread(case) == sched.Applied("batch")


def test_a_refused_switch_is_reported_and_leaves_the_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(pid: int, policy: int, param: object) -> None:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "sched_setscheduler", refuse)

    def case() -> tuple[sched.Applied, int]:
        return sched.apply("batch"), os.sched_getscheduler(0)

    applied, policy = in_thread(case)
    assert policy == os.SCHED_OTHER
    assert applied.refused and applied.policy == "normal"
    assert applied.note == "sched_setscheduler(SCHED_BATCH) failed: Operation not permitted"


def test_an_unknown_choice_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="--sched: 'fifo' is not one of batch, inherit"):
        sched.apply("fifo")
