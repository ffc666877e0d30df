"""CI entry of the fuzzers: every target of tests/fuzz/targets.py for >= 100,000 inputs.

Each target runs as ``tests/fuzz/run_fuzz.py TARGET --runs 100000`` in its own process (two
at a time: the CI machine has 2 cores).  The fast decoders run under atheris (coverage-
guided); the session engine and the two command lines run the random-mutation loop, which
is 2-3x faster for them than instrumented atheris and keeps the whole test near 2.5 minutes on
an idle machine
(tests/fuzz/README.md has the measured times).  Zero crashes: a crash fails the test with
the target's traceback and the saved reproducer.
"""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

import pytest

from tests.fuzz.run_fuzz import MAX_LEN

RUNS = 100_000
RUN_FUZZ = Path(__file__).with_name("run_fuzz.py")
CPU_BUDGET_S = 480.0
"""~4 minutes on both cores of the CI machine (measured: ~300 CPU-s).  CPU time, not wall
time, is bounded, so a loaded machine does not fail the test; WALL_LIMIT_S catches hangs."""
WALL_LIMIT_S = 900.0
HAVE_ATHERIS = find_spec("atheris") is not None
# Slowest first, so the two lanes finish together.
PLAN = [
    ("session", "mutate"),
    ("tcpcopy_cli", "mutate"),
    ("response_stream", "atheris"),
    ("intercept_cli", "mutate"),
    ("pcap", "atheris"),
    ("client_stream", "atheris"),
    ("packet", "atheris"),
    ("response_record", "atheris"),
]
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second", re.M)
_MUTATE = re.compile(r"^fuzz \w+: (\d+) inputs in ([\d.]+) s", re.M)


def _run(target: str, engine: str, artifacts: Path) -> tuple[str, str, int, str, float]:
    if engine == "atheris" and not HAVE_ATHERIS:
        engine = "mutate"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(RUN_FUZZ), target, "--runs", str(RUNS), "--engine", engine,
         "--seed", "1", "--artifacts", str(artifacts)],
        capture_output=True, text=True, timeout=WALL_LIMIT_S, check=False,
    )  # fmt: skip
    return target, engine, proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.timeout(WALL_LIMIT_S + 60)
def test_every_target_survives_100k_inputs(tmp_path: Path) -> None:
    assert sorted(t for t, _ in PLAN) == sorted(MAX_LEN), "a fuzz target is missing from PLAN"
    t0 = time.monotonic()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _run(*job, tmp_path), PLAN))
    elapsed = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    print(f"all targets: {elapsed:.0f} s wall, {cpu:.0f} s CPU")
    failures = []
    for target, engine, rc, out, dt in results:
        if rc != 0:
            failures.append(f"--- {target} ({engine}) exit {rc} after {dt:.0f} s:\n{out[-4000:]}")
            continue
        m = _DONE.search(out) if engine == "atheris" else _MUTATE.search(out)
        assert m is not None, f"{target}: no final count in\n{out[-2000:]}"
        assert int(m.group(1)) >= RUNS, f"{target}: only {m.group(1)} inputs"
        print(f"{target:16} {engine:8} {int(m.group(1)):>7} inputs {dt:6.1f} s")
    assert not failures, "\n".join(failures)
    assert not list(tmp_path.glob("crash-*")), "a crash reproducer was written"
    assert cpu < CPU_BUDGET_S, f"fuzzing took {cpu:.0f} CPU-s ({elapsed:.0f} s wall)"
