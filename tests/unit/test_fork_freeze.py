"""The supervisor freezes what it holds right before it forks (gc.freeze): a full collection
in a child then leaves the inherited objects' pages shared instead of copying them.

The child is a real fork through ``Supervisor._spawn``; in it, a full collection is run and
the child's private dirty memory (/proc/self/smaps_rollup) read before and after.  Without
the freeze the collection writes into the header of every object this test process holds
(several MB of pages copied); with it, nearly nothing.
"""

from __future__ import annotations

import gc
import os
import threading
from types import SimpleNamespace

from engine.io.control import ControlBlock
from engine.proc.supervisor import WORKER, Supervisor, _Child

COPIED_MAX_KB = 1024


def private_dirty_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1])
    raise AssertionError("no Private_Dirty in smaps_rollup")


def test_a_full_collection_in_a_forked_child_copies_no_inherited_page() -> None:
    read_end, write_end = os.pipe()

    def child_main(_child: _Child) -> int:
        before = private_dirty_kb()
        gc.collect()
        os.write(write_end, f"{gc.get_freeze_count()} {private_dirty_kb() - before}".encode())
        return 0

    stub = SimpleNamespace(
        control=ControlBlock(1), _scrape_lock=threading.Lock(), _child_main=child_main
    )
    child = _Child(WORKER, 0, 1)
    gc.collect()
    try:
        Supervisor._spawn(stub, child, 0.0)  # type: ignore[arg-type]
        _pid, status = os.waitpid(child.pid, 0)
        frozen, copied_kb = (int(x) for x in os.read(read_end, 100).split())
    finally:
        gc.unfreeze()
        os.close(read_end)
        os.close(write_end)
    assert os.waitstatus_to_exitcode(status) == 0
    assert frozen > 10_000  # what this process held at the fork
    assert copied_kb < COPIED_MAX_KB, f"{copied_kb} KB copied by a collection in the child"
