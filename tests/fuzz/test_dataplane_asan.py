"""CI entry of the sanitizer fuzzer of the compiled data plane (tests/fuzz/dataplane_asan.py):
one sanitizer build of engine/dataplane/*.pyx (shared by the tests of this module), then
50,000 mutated packets through its Python entry points, compared with engine/codec/packet.py;
20,000 mutated TPACKET_V3 blocks through the compiled capture walk, compared with the Python
walk; 30,000 inputs of intercept response records through the compiled session table's
``receive_records``, 30,000 of intercept reads (framed streams whose counts may lie) through
its ``frame_reader`` and 30,000 of captured client packets of live sessions through its
``receive_client_ips`` (tests/fuzz/engine_targets.py), compared with the Python table;
30,000 pcap files around mutated packets through the compiled record walk of an offline
replay (``--target pcap``), compared with PcapFileSource's Python path; 30,000 netlink read
batches through intercept-mp's compiled response path (``--target responses``), compared
with the Python parser, record encode and Router.  The
long runs (>= 1 M inputs each) are the same script with ``--runs 1000000``
(tests/fuzz/README.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("dataplane_asan.py")
RUNS = 50_000
BLOCK_RUNS = 20_000
ENGINE_RUNS = 30_000


@pytest.fixture(scope="module")
def asan_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sanitizer build, made once (with a one-input run that checks it loads)."""
    build_dir = tmp_path_factory.mktemp("dataplane-asan-build")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--runs", "1", "--build-dir", str(build_dir),
         "--artifacts", str(build_dir)],
        capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return build_dir


def _run(build_dir: Path, artifacts: Path, target: str, runs: int, unit: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--target", target, "--runs", str(runs),
         "--build-dir", str(build_dir), "--prebuilt", "--artifacts", str(artifacts)],
        capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    m = re.search(rf"^dataplane asan: (\d+) {unit} in [\d.]+ s \(\d+/s\), 0 findings$", out, re.M)
    assert m is not None and int(m.group(1)) == runs, out[-2000:]
    assert "AddressSanitizer" not in out and "runtime error" not in out
    assert not list(artifacts.glob("crash-*"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sanitizer_build_survives_50k_inputs(asan_build: Path, tmp_path: Path) -> None:
    _run(asan_build, tmp_path, "packet", RUNS, "inputs")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sanitizer_build_of_the_block_walk_survives_20k_blocks(
    asan_build: Path, tmp_path: Path
) -> None:
    _run(asan_build, tmp_path, "block", BLOCK_RUNS, "blocks")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("target", ["records", "client", "frames"])
def test_sanitizer_build_of_the_session_table_survives_30k_inputs(
    asan_build: Path, tmp_path: Path, target: str
) -> None:
    _run(asan_build, tmp_path, target, ENGINE_RUNS, "inputs")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sanitizer_build_of_the_pcap_walk_survives_30k_files(
    asan_build: Path, tmp_path: Path
) -> None:
    _run(asan_build, tmp_path, "pcap", ENGINE_RUNS, "inputs")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sanitizer_build_of_the_response_path_survives_30k_batches(
    asan_build: Path, tmp_path: Path
) -> None:
    _run(asan_build, tmp_path, "responses", ENGINE_RUNS, "inputs")
