"""The supervisor freezes what it holds right before it forks (gc.freeze): a full collection
in a child then leaves the inherited objects' pages shared instead of copying them.

The child is a real fork through ``Supervisor._spawn``, from a fresh interpreter that has
imported the runtime modules as the supervisor has (not from this test process, whose own
state after a long test session is not the supervisor's); in it, a full collection is run and
the child's private dirty memory (/proc/self/smaps_rollup) read before and after.  Without
the freeze the collection writes into the header of every inherited object (several MB of
pages copied); with it, nearly nothing.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.paths import REPO_ROOT

COPIED_MAX_KB = 1024


CHILD = textwrap.dedent(
    """
    import gc
    import os
    import threading
    from types import SimpleNamespace

    import engine.proc.capture, engine.proc.worker, engine.app.cli  # what the supervisor holds
    from engine.io.control import ControlBlock
    from engine.proc.supervisor import WORKER, Supervisor, _Child


    def private_dirty_kb():
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Private_Dirty:"):
                    return int(line.split()[1])
        raise AssertionError("no Private_Dirty in smaps_rollup")


    read_end, write_end = os.pipe()


    def child_main(_child):
        before = private_dirty_kb()
        gc.collect()
        os.write(write_end, f"{gc.get_freeze_count()} {private_dirty_kb() - before}".encode())
        return 0


    stub = SimpleNamespace(
        control=ControlBlock(1), _scrape_lock=threading.Lock(), _child_main=child_main
    )
    child = _Child(WORKER, 0, 1)
    gc.collect()
    Supervisor._spawn(stub, child, 0.0)
    _pid, status = os.waitpid(child.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    print(os.read(read_end, 100).decode())
    """
)


def test_a_full_collection_in_a_forked_child_copies_no_inherited_page() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    frozen, copied_kb = (int(x) for x in out.split())
    assert frozen > 10_000  # what the supervisor held at the fork
    assert copied_kb < COPIED_MAX_KB, f"{copied_kb} KB copied by a collection in the child"
