"""CI entry of the sanitizer fuzzer of the compiled data plane (tests/fuzz/dataplane_asan.py):
a sanitizer build of engine/dataplane/*.pyx, then 50,000 mutated packets through its Python
entry points, compared with engine/codec/packet.py, and 20,000 mutated TPACKET_V3 blocks
through the compiled capture walk, compared with the Python walk.  The long runs (>= 1 M
inputs each) are the same script with ``--runs 1000000`` (tests/fuzz/README.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("dataplane_asan.py")
RUNS = 50_000
BLOCK_RUNS = 20_000


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sanitizer_build_survives_50k_inputs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--runs", str(RUNS), "--artifacts", str(tmp_path)],
        capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    m = re.search(r"^dataplane asan: (\d+) inputs in [\d.]+ s \(\d+/s\), 0 findings$", out, re.M)
    assert m is not None and int(m.group(1)) == RUNS, out[-2000:]
    assert "AddressSanitizer" not in out and "runtime error" not in out
    assert not list(tmp_path.glob("crash-*"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sanitizer_build_of_the_block_walk_survives_20k_blocks(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--target", "block", "--runs", str(BLOCK_RUNS),
         "--artifacts", str(tmp_path)],
        capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    m = re.search(r"^dataplane asan: (\d+) blocks in [\d.]+ s \(\d+/s\), 0 findings$", out, re.M)
    assert m is not None and int(m.group(1)) == BLOCK_RUNS, out[-2000:]
    assert "AddressSanitizer" not in out and "runtime error" not in out
    assert not list(tmp_path.glob("crash-*"))
