"""Fuzz the compiled data plane under AddressSanitizer and UndefinedBehaviorSanitizer.

    .venv/bin/python tests/fuzz/dataplane_asan.py --runs 1000000 [--seed 1] [--build-dir D]
    .venv/bin/python tests/fuzz/dataplane_asan.py --target block --runs 1000000

Theory of operation
-------------------
1. Build: every ``engine/dataplane/*.pyx`` is compiled again, by cython and gcc directly,
   with ``-fsanitize=address,undefined`` (UBSan made fatal) into a temporary directory: the
   installed extension is left alone.
2. Run: the script starts itself again as a worker with libasan and libubsan preloaded (a
   Python that was not built with ASan must load the runtime first), ``PYTHONMALLOC=malloc``
   (so every Python allocation is a malloc block with red zones, not a slice of a pymalloc
   arena) and leak checks off (the interpreter keeps memory until exit).  The worker loads
   the instrumented modules under their real names before anything imports
   ``engine.dataplane``, checks that the ASan runtime is mapped, and fuzzes.
3. Inputs: random mutations (tests/fuzz/run_fuzz.py's) of seeds cut from the real captures
   (IP packets, and some whole frames) and of packets with every option kind.  Each input
   goes through ``exercise`` (a heap copy
   of exactly its size, so a read one byte past the end hits a red zone; parse, option walk,
   checksum, link-layer offsets, rebuild into a block of exactly the built size), through
   ``l2_offset`` at a random link type and ``decode_ip``, both compared
   with engine/codec/packet.py (same fields, same rejects: a difference is a finding too) and, when
   it parses, through ``split_build`` at a random MTU compared with ``split_mtu``; every
   256 inputs the whole group goes through ``parse_batch`` (with some offsets and lengths
   pointing outside the buffer), ``build_batch`` into an output of exactly the needed size,
   and ``scan_records``/``parse_records`` over the same packets laid out as a ring's records
   (random size and start, some lengths and wrap marks hostile).
4. ``--target block`` (engine/dataplane/capture.pyx): TPACKET_V3 blocks built from the same
   captured packets (random pkttypes, frames cut short, aggregates larger than -M), then
   made to lie (tp_next_offset 0, unaligned or past the block; tp_snaplen past the block;
   num_pkts larger than the chain; offset_to_first_pkt anywhere; tp_mac/tp_net at random;
   random u32/u16 pokes into frame headers; byte flips; the buffer cut short), each in a
   heap block of exactly its size, read by a capture process through the compiled walk and
   by one through the Python walk (testbed/blocks.py): the same ring contents, drops, loss
   marks and counters, or it is a finding.  Rings are drained at random, so they also run
   full; the clock and the memory flag move, so the gate sheds and expires flows.
   The module names a hook for the session engine's entry points (``ENGINE_TARGETS``):
   empty until engine/dataplane has that module.

A sanitizer report aborts the worker (its report is on stderr) and the script exits non-zero;
so does a mismatch, with the input saved under ``--artifacts``.  On success the last line is
``dataplane asan: N inputs in T s (R/s), 0 findings``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATAPLANE = REPO / "engine" / "dataplane"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
CFLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fno-strict-aliasing", "-fPIC", "-Wall",
          "-Wno-unused-function", *SANITIZE]  # fmt: skip
BATCH = 256
LINKTYPES = (1, 101, 113, 228, 276, 12, 0)
MAX_LEN = 1600
PROGRESS_EVERY = 50_000  # a progress line of the engine targets (long runs)


def build(out_dir: Path) -> list[Path]:
    """Compile every dataplane module with the sanitizers into ``out_dir``."""
    cython = shutil.which("cython", path=str(Path(sys.executable).parent)) or "cython"
    include = sysconfig.get_paths()["include"]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    built = []
    for pyx in sorted(DATAPLANE.glob("*.pyx")):
        c_file = out_dir / (pyx.stem + ".c")
        so_file = out_dir / (pyx.stem + suffix)
        # cython names the module from the package (engine.dataplane.<stem>).
        subprocess.run([cython, "-3", str(pyx), "-o", str(c_file)], check=True)
        subprocess.run(
            ["gcc", "-shared", *CFLAGS, f"-I{include}", str(c_file), "-o", str(so_file)],
            check=True,
        )
        built.append(so_file)
    return built


def runtime_libraries() -> list[str]:
    libs = []
    for name in ("libasan.so", "libubsan.so"):
        path = subprocess.run(
            ["gcc", f"-print-file-name={name}"], capture_output=True, text=True, check=True
        ).stdout.strip()
        if not os.path.isabs(path):
            raise SystemExit(f"dataplane asan: gcc has no {name} (install gcc's libasan/libubsan)")
        libs.append(path)
    return libs


def seeds() -> list[bytes]:
    from engine.codec import packet as P
    from engine.codec.pcapfile import open_pcap
    from tests.paths import CONTROL_PCAP, ONLINE_HTTP_PCAP, TARGET_SIDE_PCAP

    out = []
    for path in (ONLINE_HTTP_PCAP, TARGET_SIDE_PCAP, CONTROL_PCAP):
        with open_pcap(str(path)) as reader:
            for k, (_ts, _n, frame) in enumerate(reader):
                if k % 4 == 0:
                    out.append(frame)  # whole frames too: the link-layer readers' seeds
                try:
                    out.append(frame[P.l2_offset(frame, reader.linktype) :])
                except P.DecodeError:
                    pass
    opts = P.build_options(mss=1460, wscale=7, sack_permitted=True, timestamp=(1, 2))
    sack = P.build_options(timestamp=(3, 4), sack=[(5, 6), (7, 8), (9, 10)])
    for o in (opts, sack, b"\x01" * 40, b"\x05\x22" + bytes(32)):
        out.append(P.build_fields(1, 2, 3, 4, 5, 6, P.ACK, 7, o, b"data", 8, 64, 0, True))
    out.append(
        P.build_fields(1, 2, 3, 4, 5, 6, P.SYN, 7, opts, b"", 8, 64, 0, True, 0, b"\x01" * 40)
    )
    return out


def load_instrumented(build_dir: Path) -> object:
    """Put the sanitizer builds in sys.modules under their real names, then import."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    # packet first: the others cimport it.  A module's init may import the package, whose
    # __init__ then imports the installed build of a module not loaded yet: each module is
    # put on the package too, so both lookups reach the instrumented one.
    files = sorted(build_dir.glob("*" + suffix), key=lambda f: (f.name[:7] != "packet.", f.name))
    for so_file in files:
        stem = so_file.name[: -len(suffix)]
        name = "engine.dataplane." + stem
        spec = importlib.util.spec_from_file_location(name, so_file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        package = sys.modules.get("engine.dataplane")
        if package is not None:
            setattr(package, stem, module)
    from engine import dataplane

    for so_file in files:
        stem = so_file.name[: -len(suffix)]
        module = sys.modules["engine.dataplane." + stem]
        setattr(dataplane, stem, module)
        assert Path(str(module.__file__)).parent == build_dir, f"{module.__file__} not instrumented"
    assert dataplane.packet is not None
    maps = Path("/proc/self/maps").read_text()
    assert "libasan" in maps, "the ASan runtime is not loaded"
    return dataplane.packet


def fuzz(build_dir: Path, runs: int, seed: int, artifacts: Path) -> int:
    import numpy as np

    from engine.codec import packet as P
    from tests.fuzz.run_fuzz import _mutate

    D = load_instrumented(build_dir)
    rng = random.Random(seed)
    pool = seeds()
    group: list[bytes] = []
    t0 = time.monotonic()
    for i in range(runs):
        data = pool[i] if i < len(pool) else _mutate(rng, rng.choice(pool), pool, MAX_LEN)
        try:
            D.exercise(data)
            code, got, opts = D.decode_ip(data)
            try:
                want = P.parse_ip(data)
            except P.DecodeError as e:
                assert code != 0, f"Python rejects ({e}), compiled accepts"
            else:
                assert code == 0 and got == want, f"compiled {D.ERROR_NAMES[code]} / {got}"
                assert opts == P.parse_options(want.options)
                _split(D, P, want, rng.choice((60, 576, 1500, 1500, rng.randrange(-2, 2000))))
            D.parse_options(data[:40])
            _l2(D, P, data, rng.choice(LINKTYPES))
            group.append(data)
            if len(group) == BATCH:
                _batch(D, np, rng, group)
                group.clear()
        except Exception:
            path = artifacts / f"crash-dataplane-{hashlib.sha1(data).hexdigest()}"
            path.write_bytes(data)
            print(f"dataplane asan: finding on input {i} (saved as {path})", file=sys.stderr)
            raise
        if i % 64 == 0 and len(pool) < 4096:
            pool.append(data)
    dt = time.monotonic() - t0
    print(f"dataplane asan: {runs} inputs in {dt:.1f} s ({runs / dt:.0f}/s), 0 findings")
    return 0


def _l2(D, P, frame: bytes, linktype: int) -> None:  # type: ignore[no-untyped-def]
    """l2_offset against engine.codec.packet.l2_offset (same offset, or both refuse)."""
    try:
        want: object = P.l2_offset(frame, linktype)
    except P.DecodeError:
        want = "DecodeError"
    try:
        got: object = D.l2_offset(frame, linktype)
    except P.DecodeError:
        got = "DecodeError"
    assert got == want, f"link type {linktype}: compiled {got} / Python {want}"


def _split(D, P, pkt, mtu: int) -> None:  # type: ignore[no-untyped-def]
    """split_build against engine.codec.packet.split_mtu + build (same pieces or same refusal)."""
    args = (pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.seq, pkt.ack, pkt.flags, pkt.window,
            pkt.options, pkt.payload, pkt.ip_id, pkt.ttl, pkt.tos, pkt.df, pkt.urgent,
            pkt.ip_options)  # fmt: skip
    try:
        want: object = [P.build(p) for p in P.split_mtu(pkt, mtu)]
    except ValueError as e:
        want = type(e).__name__
    try:
        got: object = D.split_build(*args, data_len=pkt.data_len, mtu=mtu)
    except ValueError as e:
        got = type(e).__name__
    assert got == want, f"split at MTU {mtu}: compiled {got!r:.200} / Python {want!r:.200}"


def _batch(D, np, rng: random.Random, group: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    """parse_batch and build_batch on one exact-size buffer, some entries out of range."""
    size = sum(len(g) for g in group)
    buf = np.empty(size, np.uint8)  # its own malloc block: the end is a red zone
    offsets = np.empty(len(group), np.uint32)
    lengths = np.empty(len(group), np.uint32)
    at = 0
    for j, g in enumerate(group):
        buf[at : at + len(g)] = np.frombuffer(g, np.uint8)
        offsets[j], lengths[j] = at, len(g)
        at += len(g)
    for _ in range(4):
        j = rng.randrange(len(group))
        offsets[j] = rng.choice((size, size - 1, 2**32 - 1, rng.randrange(size + 1)))
        lengths[j] = rng.choice((0, 1, 40, 2**32 - 1, rng.randrange(size + 2)))
    recs = np.empty(len(group), D.PACKET_DTYPE)
    good = D.parse_batch(buf, offsets, lengths, recs, rng.choice(LINKTYPES))
    assert good == int(np.count_nonzero(recs["error"] == 0))
    good = D.parse_batch(buf, offsets, lengths, recs)
    need = int(
        np.where(
            recs["error"] == 0,
            recs["ip_header_bytes"].astype(np.int64)
            + recs["tcp_header_bytes"]
            + recs["payload_bytes"],
            0,
        ).sum()
    )
    out = np.empty(max(need, 1), np.uint8)[:need]
    built = np.empty(len(group), np.int32)
    assert D.build_batch(recs, buf, out, built) == need
    # The same group as a ring's records (engine/io/ring.py's layout, wrap marks and all) in
    # an area of random size that ends exactly at its last byte, from a random start; some
    # lengths are random and some wrap marks are where none belongs.  scan_records walks it
    # as the consumer does and parse_records reads it in place, over what was published and
    # over more than that.
    capacity = rng.choice((64, 256, 2048, 8192)) + 8 * rng.randrange(8)
    area = np.zeros(capacity, np.uint8)
    start = rng.randrange(2**63) // 8 * 8
    used = 0
    count = rng.randrange(len(group))
    for k in range(count):
        data = group[k][: rng.choice((capacity // 2 - 16, 1500))]
        size = 16 + -(-len(data) // 8) * 8
        pos = (start + used) % capacity
        if size > capacity - pos:
            area[pos : pos + 4] = np.frombuffer(b"\xff" * 4, np.uint8)
            used += capacity - pos
            pos = 0
        if size > capacity or used + size > capacity:
            break
        length = len(data) if rng.random() < 0.9 else rng.choice((rng.randrange(2**32), 2**32 - 1))
        area[pos : pos + 4] = np.frombuffer(length.to_bytes(4, sys.byteorder), np.uint8)
        area[pos + 16 : pos + 16 + len(data)] = np.frombuffer(data, np.uint8)
        used += size
    avail = used if rng.random() < 0.7 else rng.randrange(capacity + 1)
    _n, nbytes, _marks, _bad = D.scan_records(area, capacity, start, avail, len(group))
    D.parse_records(area, capacity, start % capacity, nbytes, recs, len(group))
    D.parse_records(area, capacity, rng.randrange(capacity), rng.randrange(2**40), recs, len(group))


def _engine_target(name: str) -> Callable[[object, random.Random, bytes], None]:
    def run(dataplane: object, rng: random.Random, data: bytes) -> None:
        # Imported here: engine.* must not load before the instrumented modules are in place.
        from tests.fuzz.engine_targets import TARGETS

        TARGETS[name](dataplane, rng, data)

    return run


ENGINE_TARGETS: dict[str, Callable[[object, random.Random, bytes], None]] = {
    name: _engine_target(name) for name in ("records", "client", "frames", "pcap", "responses")
}
"""The session engine's compiled entry points (engine/dataplane/engine.pyx's Table), in
tests/fuzz/engine_targets.py: name -> ``fuzz(dataplane, rng, data)``, fed mutated packets
like the packet target (``fuzz_engine``); each name is a --target.  ``records``: intercept
response records through ``receive_records``; ``frames``: an intercept connection's reads
(framed streams, counts that lie) through ``Table.frame_reader``; ``client``: captured
client packets of live sessions through ``receive_client_ips``, then ``drain_into`` and the
timers; ``pcap``: pcap files around the packets through capture.pyx's record walk
(``PcapWalker``), compared with PcapFileSource's Python path; ``responses``: netlink read
batches around the packets through intercept-mp's compiled NFQUEUE response path
(responses.pyx's ``ResponseTable``), compared with the Python parser, record encode and
Router (tests/fuzz/responses_target.py)."""


def fuzz_engine(build_dir: Path, name: str, runs: int, seed: int, artifacts: Path) -> int:
    """An ENGINE_TARGETS entry over mutated packets, under the sanitizers."""
    from tests.fuzz.run_fuzz import _mutate

    load_instrumented(build_dir)
    from engine import dataplane

    engine = getattr(dataplane, "engine", None)
    assert engine is not None and Path(engine.__file__).parent == build_dir
    target = ENGINE_TARGETS[name]
    rng = random.Random(seed)
    pool = seeds()
    t0 = time.monotonic()
    for i in range(runs):
        data = pool[i] if i < len(pool) else _mutate(rng, rng.choice(pool), pool, MAX_LEN)
        try:
            target(dataplane, rng, data)
        except Exception:
            path = artifacts / f"crash-{name}-{hashlib.sha1(data).hexdigest()}"
            path.write_bytes(data)
            print(f"dataplane asan: finding on input {i} (saved as {path})", file=sys.stderr)
            raise
        if (i + 1) % PROGRESS_EVERY == 0 and i + 1 < runs:
            dt = time.monotonic() - t0
            print(f"dataplane asan: progress: {i + 1} inputs in {dt:.1f} s, 0 findings",
                  flush=True)  # fmt: skip
    dt = time.monotonic() - t0
    print(f"dataplane asan: {runs} inputs in {dt:.1f} s ({runs / dt:.0f}/s), 0 findings")
    return 0


BLOCK_BYTES = 1 << 13


def block_seeds(rng: random.Random) -> list[bytes]:
    """Blocks of the captured packets, some frames outgoing, broadcast or cut short, some
    packets larger than the -M of the run (576)."""
    from testbed.blocks import Frame, eth, make_block

    packets = [p for p in seeds() if p and p[0] >> 4 == 4]
    out = []
    for k in range(64):
        frames = []
        for _ in range(rng.randrange(1, 40)):
            pkttype = rng.choice((0, 0, 0, 0, 1, 4))
            frames.append(Frame(eth(rng.choice(packets)), pkttype,
                                wire_extra=rng.choice((0,) * 9 + (64,))))  # fmt: skip
        buf = bytearray(BLOCK_BYTES)
        make_block(frames, buf, 0, BLOCK_BYTES)
        out.append(bytes(buf))
        if k % 8 == 0:
            out.append(bytes(buf[: rng.randrange(0, BLOCK_BYTES)]))
    return out


def mutate_block(rng: random.Random, data: bytes) -> bytes:
    """A few lies told by the block (see the module docstring)."""
    from testbed.blocks import CORRUPTIONS, corrupt

    buf = bytearray(data)
    heads = []
    if len(buf) >= 20:
        first = int.from_bytes(buf[16:20], sys.byteorder)
        off = first
        while off >= 0 and off + 60 <= len(buf) and len(heads) < 64:
            heads.append(off)
            step = int.from_bytes(buf[off : off + 4], sys.byteorder)
            if step == 0:
                break
            off += step
    for _ in range(rng.choice((1, 1, 2, 3))):
        op = rng.randrange(5)
        if op == 0 and len(buf) >= 20:
            corrupt(buf, heads, rng.choice(CORRUPTIONS), rng)
        elif op == 1 and heads:
            at = rng.choice(heads) + rng.randrange(0, 60, 2)
            width = rng.choice((2, 4)) if at + 4 <= len(buf) else 2
            value = rng.choice((0, 1, 2, 3, 4, 15, 16, 48, 60, 0x7FFF, 0xFFFF, 2**31, 2**32 - 1,
                                rng.randrange(2**32)))  # fmt: skip
            buf[at : at + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        elif op == 2 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif op == 3 and buf:
            del buf[rng.randrange(len(buf)) :]
        elif len(buf) >= 4:
            at = rng.randrange(len(buf) - 3)
            buf[at : at + 4] = rng.randrange(2**32).to_bytes(4, "little")
    return bytes(buf)


def fuzz_blocks(build_dir: Path, runs: int, seed: int, artifacts: Path) -> int:
    import numpy as np

    from testbed.blocks import Walk

    load_instrumented(build_dir)
    from engine import dataplane

    assert dataplane.capture is not None
    assert Path(dataplane.capture.__file__).parent == build_dir
    rng = random.Random(seed)
    pool = block_seeds(rng)
    settings = {
        "block_bytes": BLOCK_BYTES, "workers": 3, "ring_bytes": 2048, "max_packet": 576,
        "mtu": 576,
    }  # fmt: skip
    walks = {}
    for kernel in (True, False):
        for host_only in (False, True):
            walks[kernel, host_only] = tuple(
                Walk(c, bytearray(BLOCK_BYTES), kernel_filtered=kernel, host_only=host_only,
                     **settings)
                for c in (False, True)
            )  # fmt: skip
    now = 0.0
    t0 = time.monotonic()
    findings = 0
    try:
        for i in range(runs):
            data = pool[i] if i < len(pool) else mutate_block(rng, rng.choice(pool))
            data = data[: len(data) // 4 * 4]
            # A heap block of exactly the input's size: a read past it is an ASan report.
            buf = np.empty(len(data), np.uint8)
            buf[:] = np.frombuffer(data, np.uint8)
            ref, walk = walks[rng.random() < 0.5, rng.random() < 0.3]
            now += rng.choice((0.0, 0.001, 0.5, 2.0, 70.0))
            memory = rng.random() < 0.1
            try:
                for w in (ref, walk):
                    w.src.set_buffer(buf)
                    w.read(now, memory)
                take = rng.choice((0, 8, 64))
                assert walk.pop(take) == ref.pop(take), "ring contents differ"
                got, want = walk.state(), ref.state()
                if i % 16:  # the flow tables (copied out whole) are compared less often
                    del got["known"], got["shed"], want["known"], want["shed"]
                assert got == want, f"compiled {got} / Python {want}"
            except Exception:
                findings += 1
                path = artifacts / f"crash-block-{hashlib.sha1(data).hexdigest()}"
                path.write_bytes(data)
                print(f"dataplane asan: finding on block {i} (saved as {path})", file=sys.stderr)
                raise
            finally:
                for w in (ref, walk):
                    w.src.set_buffer(bytearray(BLOCK_BYTES))
            if i % 32 == 0 and len(pool) < 1024:
                pool.append(data)
    finally:
        for pair in walks.values():
            for w in pair:
                w.close()
    dt = time.monotonic() - t0
    print(f"dataplane asan: {runs} blocks in {dt:.1f} s ({runs / dt:.0f}/s), {findings} findings")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1_000_000)
    ap.add_argument("--target", choices=("packet", "block", *ENGINE_TARGETS), default="packet",
                    help="packet.pyx's entry points, or capture.pyx's block walk")  # fmt: skip
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--build-dir", type=Path, help="keep the sanitizer build here")
    ap.add_argument("--prebuilt", action="store_true",
                    help="reuse the sanitizer build already in --build-dir")  # fmt: skip
    ap.add_argument("--artifacts", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.runs < 1:
        ap.error("--runs must be >= 1")
    sys.path.insert(0, str(REPO))
    if a.worker:
        if a.target == "block":
            return fuzz_blocks(a.build_dir, a.runs, a.seed, a.artifacts)
        if a.target in ENGINE_TARGETS:
            return fuzz_engine(a.build_dir, a.target, a.runs, a.seed, a.artifacts)
        return fuzz(a.build_dir, a.runs, a.seed, a.artifacts)
    a.artifacts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dataplane-asan-") as tmp:
        build_dir = a.build_dir or Path(tmp)
        build_dir.mkdir(parents=True, exist_ok=True)
        if a.prebuilt:
            if a.build_dir is None or not list(build_dir.glob("*.so")):
                ap.error("--prebuilt needs a --build-dir that holds a sanitizer build")
        else:
            t0 = time.monotonic()
            built = build(build_dir.resolve())
            print(f"dataplane asan: built {len(built)} module(s) in {time.monotonic() - t0:.0f} s")
        env = dict(os.environ)
        env.update(
            LD_PRELOAD=":".join(runtime_libraries()),
            ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1",
            UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
            PYTHONMALLOC="malloc",
        )
        cmd = [sys.executable, __file__, "--worker", "--runs", str(a.runs), "--seed", str(a.seed),
               "--target", a.target,
               "--build-dir", str(build_dir.resolve()),
               "--artifacts", str(a.artifacts)]  # fmt: skip
        rc = subprocess.run(cmd, env=env, check=False).returncode
        if rc != 0:
            print(f"dataplane asan: FAILED (worker exit status {rc}; the report is above)")
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
