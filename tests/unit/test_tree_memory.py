"""The -m watchdog's view of the process tree (engine/proc/supervisor.py ``tree_memory_bytes``):
every descendant found, through /proc/PID/task/TID/children or, where a kernel has no such
files, through each process's parent in /proc/PID/stat; both give the same tree."""

from __future__ import annotations

import os
import signal
import subprocess

from engine.proc import supervisor


def test_both_ways_find_every_descendant_and_the_tree_counts_them() -> None:
    # A child with two children of its own; "ready" is printed once both are forked.
    child = subprocess.Popen(
        ["sh", "-c", "sleep 60 & sleep 60 & echo ready; wait"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        me = os.getpid()
        by_stat = set(supervisor._descendants_by_stat(me))
        found = set(supervisor._descendants(me))
        assert child.pid in by_stat
        grandchildren = by_stat - {child.pid}
        assert len([p for p in grandchildren if _parent(p) == child.pid]) == 2
        assert {child.pid} | {p for p in grandchildren if _parent(p) == child.pid} <= found
        assert found == by_stat
        alone = supervisor.tree_memory_bytes(child.pid)
        assert alone > 0
        assert supervisor.tree_memory_bytes(me) > alone  # this process and its tree
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[1])
