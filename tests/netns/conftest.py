"""Fixtures of the netns tier: a fresh testbed per test, torn down also on failure.

The machinery is testbed/netns.py (bench/demo.py uses it too).  When a test fails, the
tails of every process log of its testbed (tcpcopy-mp, intercept-mp, nginx, redis, tcpdump)
are printed in the report's captured output.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import netns as tbm

NETNS_PROBLEMS = tbm.preflight_problems()
SKIP_NO_NETNS = pytest.mark.skipif(
    bool(NETNS_PROBLEMS), reason="netns tier: " + "; ".join(NETNS_PROBLEMS)
)


def programs_missing() -> str | None:
    """Why the programs under test cannot run yet (None when both CLIs exist)."""
    for module in ("engine/app/cli.py", "intercept/cli.py"):
        if not (tbm.REPO_ROOT / module).exists():
            return f"{module} not written yet"
    for binary in (tbm.TCPCOPY_BIN, tbm.INTERCEPT_BIN):
        if not binary.exists():
            return f"{binary} not installed (pip install -e .)"
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def testbed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tbm.Testbed]:
    if NETNS_PROBLEMS:
        pytest.skip("netns tier: " + "; ".join(NETNS_PROBLEMS))
    tb = tbm.Testbed(tmp_path / "testbed")
    tb.start()
    try:
        yield tb
    finally:
        tb.close()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            for proc in tb.procs:
                print(f"\n----- {proc.name} (pid {proc.pid}, rc {proc.popen.returncode}) -----")
                print(proc.tail(40))
            for role, server in tb.nginx.items():
                err = server.dir / "error.log"
                if err.exists() and err.stat().st_size:
                    print(f"\n----- nginx-{role} error.log -----")
                    print("\n".join(err.read_text(errors="replace").splitlines()[-20:]))


@pytest.fixture
def programs() -> None:
    """Skip while tcpcopy-mp / intercept-mp are not written yet (a broken one still fails)."""
    why = programs_missing()
    if why:
        pytest.skip(why)
