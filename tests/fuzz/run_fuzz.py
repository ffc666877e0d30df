"""Run one fuzz target of tests/fuzz/targets.py under atheris (libFuzzer), or under the
built-in random-mutation loop when atheris is missing or ``--engine mutate`` is given.

    .venv/bin/python tests/fuzz/run_fuzz.py TARGET --runs N [--seed S] [--engine atheris|mutate]
    .venv/bin/python tests/fuzz/run_fuzz.py --list

Both engines start from the seeds cut from the real captures (``targets.seeds()``).  A crash
(any exception escaping the target) prints the traceback and the reproducer's bytes (atheris
also writes ``crash-<sha1>`` under ``--artifacts``) and exits non-zero.  On success the last
line is ``fuzz TARGET: N inputs in T s (R/s), 0 crashes`` (mutate) or libFuzzer's
``Done N runs in S second(s)`` followed by its final statistics (atheris).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# Per-target input size bound: big enough for the seeds, small enough to stay fast.
MAX_LEN = {
    "packet": 1600,
    "client_stream": 700,
    "response_stream": 1600,
    "response_record": 400,
    "pcap": 6000,
    "session": 512,
    "tcpcopy_cli": 96,
    "intercept_cli": 96,
}


def _mutate(rng: random.Random, data: bytes, pool: list[bytes], max_len: int) -> bytes:
    """A few random edits of ``data``: flips, interesting bytes, cuts, inserts, splices."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 5, 8))):
        op = rng.randrange(8)
        n = len(buf)
        if op == 0 and n:
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[rng.randrange(n)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, 0x40, 0x45, 0x50, 0x0F))
        elif op == 2 and n:
            del buf[rng.randrange(n) :]
        elif op == 3 and n:
            i = rng.randrange(n)
            del buf[i : i + rng.randrange(1, 32)]
        elif op == 4:
            i = rng.randrange(n + 1)
            buf[i:i] = rng.randbytes(rng.randrange(1, 16))
        elif op == 5 and n >= 2:
            i = rng.randrange(n - 1)
            buf[i : i + 2] = rng.randrange(65536).to_bytes(2, "big")
        elif op == 6:
            other = rng.choice(pool)
            i, j = rng.randrange(n + 1), rng.randrange(len(other) + 1)
            buf = buf[:i] + other[j:]
        elif n >= 4:
            i = rng.randrange(n - 3)
            buf[i : i + 4] = rng.randrange(1 << 32).to_bytes(4, "big")
    return bytes(buf[:max_len])


def run_mutate(name: str, runs: int, seed: int, artifacts: str) -> int:
    from tests.fuzz import targets

    target = targets.TARGETS[name]
    seeds = targets.seeds()[name]
    rng = random.Random(seed)
    pool = list(seeds)
    max_len = MAX_LEN[name]
    t0 = time.monotonic()
    for i in range(runs):
        data = seeds[i] if i < len(seeds) else _mutate(rng, rng.choice(pool), pool, max_len)
        try:
            target(data)
        except Exception:
            traceback.print_exc()
            path = Path(artifacts, f"crash-{name}-{hashlib.sha1(data).hexdigest()}")
            path.write_bytes(data)
            shown = repr(data) if len(data) <= 200 else repr(data[:200]) + "..."
            print(f"fuzz {name}: crash on input {i} (saved as {path}): {shown}", file=sys.stderr)
            return 1
        if i % 64 == 0 and len(pool) < 4096:
            pool.append(data)  # keep some mutants: deeper mutations of mutations
    dt = time.monotonic() - t0
    print(f"fuzz {name}: {runs} inputs in {dt:.1f} s ({runs / dt:.0f}/s), 0 crashes")
    return 0


def run_atheris(name: str, runs: int, seed: int, artifacts: str) -> int:
    import atheris

    with atheris.instrument_imports(include=["engine", "intercept", "tests.fuzz"]):
        from tests.fuzz import targets
    assert set(targets.TARGETS) == set(MAX_LEN)
    target = targets.TARGETS[name]
    corpus = tempfile.mkdtemp(prefix=f"fuzz-{name}-")
    for i, data in enumerate(targets.seeds()[name]):
        Path(corpus, f"seed-{i:04d}").write_bytes(data)
    # libFuzzer ends the process itself after -runs (exit status 0); its last lines are
    # "Done N runs in S second(s)" and the -print_final_stats block.
    argv = [
        sys.argv[0],
        f"-runs={runs}",
        f"-seed={seed or 1}",
        f"-max_len={MAX_LEN[name]}",
        f"-artifact_prefix={artifacts.rstrip('/')}/",
        "-print_final_stats=1",
        corpus,
    ]
    atheris.Setup(argv, target)
    atheris.Fuzz()
    return 0  # not reached


def main() -> int:
    # tests.fuzz.targets is not imported here: atheris must instrument engine/intercept as
    # they are first imported (run_atheris), so the names come from MAX_LEN.
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", nargs="?", choices=sorted(MAX_LEN))
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--engine", choices=("atheris", "mutate", "auto"), default="auto")
    ap.add_argument("--artifacts", default=tempfile.gettempdir())
    ap.add_argument("--list", action="store_true", help="print the target names")
    a = ap.parse_args()
    if a.list or a.target is None:
        print("\n".join(sorted(MAX_LEN)))
        return 0 if a.list else 2
    engine = a.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
        except ImportError:
            engine = "mutate"
        else:
            engine = "atheris"
    os.makedirs(a.artifacts, exist_ok=True)
    if engine == "atheris":
        return run_atheris(a.target, a.runs, a.seed, a.artifacts)
    return run_mutate(a.target, a.runs, a.seed, a.artifacts)


if __name__ == "__main__":
    sys.exit(main())
