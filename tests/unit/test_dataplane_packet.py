"""The compiled packet codec (engine/dataplane/packet.pyx) against its specification,
engine/codec/packet.py: the same fields, the same built bytes, the same rejects.

Both sides get the same input: random packets (built, then cut, bent and flipped), random
bytes, random option strings, and every packet of the real captures in the shared data
directory.  A packet the Python parser refuses with a ``DecodeError`` must get the compiled
parser's error code for the same rule (``REJECT_PREFIX``); one it accepts must come out as an
equal ``TcpPacket`` and ``TcpOptions``, and rebuild to the same bytes.

The compiled module is required here: tests/setup.sh installs the compiler, so a missing
build is a failure, not a skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine import dataplane
from engine.codec import packet as P  # noqa: N812 - as in the fuzz harness
from engine.codec.pcapfile import open_pcap
from tests.paths import CONTROL_PCAP, ONLINE_HTTP_PCAP, TARGET_SIDE_PCAP

assert dataplane.packet is not None, dataplane.UNAVAILABLE
D = dataplane.packet
ROOT = Path(__file__).resolve().parents[2]

# dp_error code -> how engine/codec/packet.py's DecodeError for the same rule begins.
REJECT_PREFIX = {
    1: "IPv4 header truncated",
    2: "not IPv4",
    3: "bad IPv4 header length",
    4: "not TCP",
    5: "non-first IPv4 fragment",
    6: "TCP header truncated",
    7: "bad TCP data offset",
    8: "TCP options truncated",
    9: "IPv4 tot_len",
}


def python_parse(buf: bytes) -> tuple[str | None, P.TcpPacket | None]:
    try:
        return None, P.parse_ip(buf)
    except P.DecodeError as e:
        return str(e), None


def assert_same_parse(buf: bytes) -> int:
    """Both parsers on ``buf``; returns the compiled code."""
    error, want = python_parse(buf)
    code, got, opts = D.decode_ip(buf)
    if error is not None:
        assert code != 0, f"Python rejects ({error}), compiled accepts {got}"
        assert error.startswith(REJECT_PREFIX[code]), (code, D.ERROR_NAMES[code], error)
        return code
    assert code == 0, f"compiled rejects ({D.ERROR_NAMES[code]}), Python accepts {want}"
    assert got == want
    assert want is not None
    assert opts == P.parse_options(want.options)
    # Rebuilt from the parsed fields: the same wire bytes on both sides.
    assert D.build_fields(*_build_args(want)) == P.build(want)
    return 0


def _build_args(p: P.TcpPacket) -> tuple:
    return (p.src, p.dst, p.sport, p.dport, p.seq, p.ack, p.flags, p.window, p.options,
            p.payload, p.ip_id, p.ttl, p.tos, p.df, p.urgent, p.ip_options)  # fmt: skip


def batch_of(frames: list[bytes]) -> tuple[bytes, np.ndarray, np.ndarray]:
    offsets = np.zeros(len(frames), np.uint32)
    lengths = np.array([len(f) for f in frames], np.uint32)
    if frames:
        offsets[1:] = np.cumsum(lengths)[:-1]
    return b"".join(frames), offsets, lengths


def record_packet(buf: bytes, rec: np.void) -> P.TcpPacket:
    """A parse_batch record (a numpy row) as the TcpPacket engine.codec.packet would make."""
    at, ihl, doff = int(rec["offset"]), int(rec["ip_header_bytes"]), int(rec["tcp_header_bytes"])
    assert int(rec["family"]) == 4 and bytes(rec["src"][:12]) == b"\0" * 10 + b"\xff\xff"
    return P.TcpPacket(
        int.from_bytes(bytes(rec["src"][12:]), "big"),
        int.from_bytes(bytes(rec["dst"][12:]), "big"),
        int(rec["sport"]), int(rec["dport"]), int(rec["seq"]), int(rec["ack"]), int(rec["flags"]),
        int(rec["window"]), buf[at + ihl + 20 : at + ihl + doff],
        buf[at + ihl + doff : at + ihl + doff + int(rec["payload_bytes"])], int(rec["data_len"]),
        int(rec["ip_id"]), int(rec["ttl"]), int(rec["tos"]), bool(rec["df"]), int(rec["urgent"]),
        buf[at + 20 : at + ihl],
    )  # fmt: skip


def record_options(rec: np.void) -> P.TcpOptions:
    present = int(rec["opt_present"])
    sack = [int(x) for x in rec["opt_sack"]]
    return P.TcpOptions(
        mss=int(rec["opt_mss"]) if present & 1 else None,
        wscale=int(rec["opt_wscale"]) if present & 2 else None,
        sack_permitted=bool(present & 4),
        sack=tuple((sack[2 * j], sack[2 * j + 1]) for j in range(int(rec["opt_sack_blocks"]))),
        timestamp=(int(rec["opt_ts_val"]), int(rec["opt_ts_ecr"])) if present & 8 else None,
    )


def assert_same_batch(frames: list[bytes]) -> None:
    """parse_batch + build_batch over all ``frames`` at once, against engine.codec.packet."""
    buf, offsets, lengths = batch_of(frames)
    recs = np.empty(len(frames), D.PACKET_DTYPE)
    good = D.parse_batch(buf, offsets, lengths, recs)
    out = bytearray(sum(len(f) + 120 for f in frames))  # padding can add up to 3+3 bytes
    built = np.empty(len(frames), np.int32)
    used = D.build_batch(recs, buf, out, built)
    at = 0
    accepted = 0
    for i, frame in enumerate(frames):
        error, want = python_parse(frame)
        rec = recs[i]
        if error is not None:
            assert int(rec["error"]) != 0 and error.startswith(REJECT_PREFIX[int(rec["error"])])
            assert built[i] == -int(rec["error"])
            continue
        accepted += 1
        assert want is not None and int(rec["error"]) == 0
        assert record_packet(buf, rec) == want
        assert record_options(rec) == P.parse_options(want.options)
        wire = P.build(want)
        assert built[i] == len(wire) and bytes(out[at : at + len(wire)]) == wire
        at += len(wire)
    assert good == accepted and used == at


# -- random packets ----------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
option_lists = st.lists(
    st.one_of(
        st.builds(lambda v: P.build_options(mss=v), u16),
        st.builds(lambda v: bytes((1, 3, 3, v)), u8),
        st.just(b"\x04\x02"),
        st.builds(lambda a, b: P.build_options(timestamp=(a, b)), u32, u32),
        st.builds(lambda bl: P.build_options(sack=bl), st.lists(st.tuples(u32, u32), max_size=4)),
        st.binary(max_size=6),
        st.sampled_from([b"\x00", b"\x01", b"\x08\x0a", b"\x05\x0a", b"\x02\x01", b"\xfe"]),
    ),
    max_size=6,
).map(lambda parts: b"".join(parts)[:40])


@st.composite
def wire_packets(draw: st.DrawFn) -> bytes:
    """A packet engine.codec.packet builds, then possibly cut, padded, or with bytes replaced."""
    opts = draw(option_lists)
    ip_opts = draw(st.sampled_from([b"", b"\x01\x01\x01\x00", b"\x94\x04\x00\x00"]))
    payload = draw(st.binary(max_size=64))
    wire = bytearray(
        P.build_fields(
            draw(u32), draw(u32), draw(u16), draw(u16), draw(u32), draw(u32), draw(u8),
            draw(u16), opts, payload, draw(u16), draw(u8), draw(u8), draw(st.booleans()),
            draw(u16), ip_opts,
        )
    )  # fmt: skip
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, min(len(wire) - 1, 63)))
        wire[at] = draw(u8)  # version/ihl, tot_len, frag, proto, doff, options...
    if draw(st.booleans()):
        wire[2:4] = draw(u16).to_bytes(2, "big")  # a tot_len that lies
    cut = draw(st.integers(0, len(wire) + 8))
    if cut < len(wire):
        del wire[cut:]
    else:
        wire += draw(st.binary(min_size=cut - len(wire), max_size=cut - len(wire)))
    return bytes(wire)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(wire_packets())
def test_random_packets_parse_and_rebuild_the_same(buf: bytes) -> None:
    assert_same_parse(buf)


@settings(max_examples=1000)
@given(st.binary(max_size=80))
@example(b"")
@example(b"\x45" + b"\x00" * 19)
@example(bytes.fromhex("4500002800000000400600000a0000010a000002") + b"\x00" * 12 + b"\x40")
def test_random_bytes_reject_the_same(buf: bytes) -> None:
    assert_same_parse(buf)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(wire_packets(), max_size=12))
def test_batches_parse_and_rebuild_like_the_python_engine(frames: list[bytes]) -> None:
    assert_same_batch(frames)


@settings(max_examples=1000)
@given(st.one_of(option_lists, st.binary(max_size=40)))
@example(b"\x05\x22" + bytes(range(32)))  # four SACK blocks, the most that fit
@example(b"\x03\x03\xff")  # a window scale above 14 is 14
@example(b"\x02\x04\x05\xb4\x02\x04\x01\x00")  # the last valid MSS wins
def test_options_walk_the_same(raw: bytes) -> None:
    assert D.parse_options(raw) == P.parse_options(raw)


def test_options_longer_than_a_header_are_refused() -> None:
    with pytest.raises(ValueError, match="max 40"):
        D.parse_options(b"\x01" * 41)


@settings(max_examples=1000)
@given(st.binary(max_size=200), u32, u32)
@example(b"", 0, 0)
@example(b"\x00" * 7, 0, 0)  # all-zero words: 0xFFFF
@example(b"\xff\xff", 0, 0)  # a non-zero sum that is 0 mod 0xFFFF: 0
@example(b"\xff\xff\xff\xff\xff", 0xFFFFFFFF, 0xFFFFFFFF)
def test_checksums_agree(data: bytes, src: int, dst: int) -> None:
    assert D.checksum(data) == P.checksum(data)
    assert D.tcp_checksum(src, dst, data) == P.tcp_checksum(src, dst, data)


def _python_build(*args: object) -> bytes | str:
    try:
        return P.build_fields(*args)  # type: ignore[arg-type]
    except ValueError:
        return "ValueError"


def _compiled_build(*args: object) -> bytes | str:
    try:
        return D.build_fields(*args)
    except ValueError:
        return "ValueError"


wide = st.one_of(u32, st.integers(-2, 2**33))


@settings(max_examples=1000)
@given(
    st.tuples(wide, wide, st.one_of(u16, wide), u16, wide, u32, st.one_of(u8, wide), u16),
    st.binary(max_size=44),
    st.one_of(st.binary(max_size=100), st.integers(65400, 65600).map(lambda n: b"x" * n)),
    st.tuples(st.one_of(u16, wide), st.one_of(u8, wide), u8, st.booleans(), u16),
    st.binary(max_size=44),
)
def test_build_fields_same_bytes_or_same_refusal(
    head: tuple, opts: bytes, payload: bytes, tail: tuple, ip_opts: bytes
) -> None:
    args = (*head, opts, payload, *tail, ip_opts)
    assert _compiled_build(*args) == _python_build(*args)


def test_build_into_a_small_buffer_is_refused_and_writes_at_the_offset() -> None:
    args = (1, 2, 3, 4, 5, 6, P.ACK, 100, b"", b"abc", 7, 64, 0, True)
    wire = P.build_fields(*args)
    out = bytearray(len(wire) + 5)
    assert D.build_into(out, 5, *args) == len(wire) and bytes(out[5:]) == wire
    with pytest.raises(ValueError, match="too small"):
        D.build_into(bytearray(len(wire) - 1), 0, *args)
    with pytest.raises(ValueError, match="outside"):
        D.build_into(out, len(out) + 1, *args)


def test_compiled_parse_ip_raises_decode_error_with_the_code() -> None:
    with pytest.raises(P.DecodeError, match="not_tcp") as info:
        D.parse_ip(bytes.fromhex("4500002800000000401100000a0000010a000002") + bytes(20))
    assert info.value.code == 4  # type: ignore[attr-defined]


# -- every length of a real packet, and the real captures ---------------------------------


def capture_packets(path: Path) -> list[bytes]:
    out = []
    with open_pcap(str(path)) as reader:
        for _ts, _wire_len, frame in reader:
            out.append(frame[P.l2_offset(frame, reader.linktype) :])
    return out


@pytest.fixture(scope="module")
def captured() -> list[bytes]:
    frames = []
    for path in (ONLINE_HTTP_PCAP, TARGET_SIDE_PCAP, CONTROL_PCAP):
        assert path.is_file(), f"shared capture {path} is missing"
        frames += capture_packets(path)
    assert len(frames) > 100
    return frames


def test_every_captured_packet_parses_and_rebuilds_the_same(captured: list[bytes]) -> None:
    codes = [assert_same_parse(f) for f in captured]
    assert codes.count(0) > 100  # the captures are TCP: most packets are accepted


def test_the_captures_as_one_batch(captured: list[bytes]) -> None:
    assert_same_batch(captured)


def test_every_truncation_of_captured_packets(captured: list[bytes]) -> None:
    with_data = [f for f in captured if len(f) > 60][:20]
    assert with_data
    for frame in with_data:
        seen = {assert_same_parse(frame[:n]) for n in range(len(frame) + 1)}
        assert {0, 1, 6}.issubset(seen)


def test_batch_entries_outside_the_buffer_are_range_errors(captured: list[bytes]) -> None:
    frame = captured[0]
    recs = np.empty(3, D.PACKET_DTYPE)
    offsets = np.array([0, len(frame), 2**32 - 1], np.uint32)
    lengths = np.array([len(frame), 1, 2], np.uint32)
    assert D.parse_batch(frame, offsets, lengths, recs) == (1 if D.decode_ip(frame)[0] == 0 else 0)
    assert [int(e) for e in recs["error"][1:]] == [10, 10]
    assert list(recs["offset"]) == list(offsets)
    with pytest.raises(ValueError, match="records"):
        D.parse_batch(frame, offsets, lengths, np.empty(2, D.PACKET_DTYPE))
    with pytest.raises(TypeError):
        D.parse_batch(frame, offsets, lengths, np.empty(3, np.uint8))


def test_an_edited_record_cannot_point_the_builder_outside_the_buffer(
    captured: list[bytes],
) -> None:
    good = [f for f in captured if D.decode_ip(f)[0] == 0][:1]
    buf, offsets, lengths = batch_of(good * 2)
    recs = np.empty(2, D.PACKET_DTYPE)
    assert D.parse_batch(buf, offsets, lengths, recs) == 2
    recs["payload_bytes"][1] = 60000  # a rewrite step gone wrong
    built = np.empty(2, np.int32)
    out = bytearray(2 * 70000)
    assert D.build_batch(recs, buf, out, built) == built[0] > 0
    assert built[1] == -10


def test_rewritten_records_build_like_the_python_engine(captured: list[bytes]) -> None:
    """The path a worker will take: parse a batch, rewrite fields in the array, build."""
    frames = [f for f in captured if D.decode_ip(f)[0] == 0]
    buf, offsets, lengths = batch_of(frames)
    recs = np.empty(len(frames), D.PACKET_DTYPE)
    D.parse_batch(buf, offsets, lengths, recs)
    target = P.ip_from_str("198.18.9.9")
    recs["dst"][:, 12:] = np.frombuffer(target.to_bytes(4, "big"), np.uint8)
    recs["dport"] = 8080
    recs["seq"] += np.uint32(1000)  # wraps modulo 2**32 like tcpseq
    out = bytearray(len(buf) + 8 * len(frames))
    built = np.empty(len(frames), np.int32)
    used = D.build_batch(recs, buf, out, built)
    at = 0
    for frame, n in zip(frames, built, strict=True):
        pkt = P.parse_ip(frame)
        pkt.dst, pkt.dport, pkt.seq = target, 8080, (pkt.seq + 1000) & 0xFFFFFFFF
        wire = P.build(pkt)
        assert bytes(out[at : at + n]) == wire
        at += int(n)
    assert used == at


# -- the per-packet code is C only ----------------------------------------------------------


def test_per_packet_lines_make_no_python_calls(tmp_path: Path) -> None:
    """``cython -a``: every line of the ``dp_*`` functions, of every function or method
    declared ``nogil`` and inside a ``with nogil:`` block has score 0 (no Python C-API
    call; design §10)."""
    cython = shutil.which("cython", path=str(Path(sys.executable).parent))
    assert cython, "cython is not installed in this environment"
    src_dir = ROOT / "engine" / "dataplane"
    checked = 0
    for pyx in sorted(src_dir.glob("*.pyx")):
        out_c = tmp_path / pyx.with_suffix(".c").name
        src = str(pyx.relative_to(ROOT))
        cmd = [cython, "-a", "-3", "-I", str(ROOT), src, "-o", str(out_c)]
        subprocess.run(cmd, cwd=ROOT, check=True, timeout=300)
        html = out_c.with_suffix(".html").read_text()
        score = {
            int(m[2]): int(m[1])
            for m in re.finditer(
                r'class="cython line score-(\d+)"[^>]*>.{0,12}?<span class="">(\d+)</span>', html
            )
        }
        lines = pyx.read_text().splitlines()
        hot: list[int] = []
        block_indent = -1
        signature = -1  # indent of a cdef signature still being read, up to its ":"
        for no, line in enumerate(lines, 1):
            indent = len(line) - len(line.lstrip())
            if signature >= 0:
                if line.rstrip().endswith(":"):
                    block_indent = signature if "nogil" in line else -1
                    signature = -1
                continue
            if line.strip() and block_indent >= 0 and indent <= block_indent:
                block_indent = -1
            if re.match(r"cdef \S+ dp_\w+\(", line):
                block_indent = 0
                continue  # the signature line carries the function's own set-up
            if re.match(r"\s*cdef (inline )?[\w*]+( \w+)* \w+\(", line) and block_indent < 0:
                if line.rstrip().endswith(":"):
                    if "nogil" in line:
                        block_indent = indent
                else:
                    signature = indent
                continue
            if line.strip() == "with nogil:":
                block_indent = indent
                continue
            if block_indent >= 0 and line.strip():
                hot.append(no)
        yellow = [f"{pyx.name}:{n}: {lines[n - 1].strip()}" for n in hot if score.get(n, 0)]
        assert not yellow, "Python calls on the per-packet path:\n" + "\n".join(yellow)
        checked += len(hot)
    assert checked > 150


def test_without_the_compiled_module_the_package_says_why() -> None:
    """The fallback: a Python where the extension is missing imports engine.dataplane all
    the same, with AVAILABLE False and the reason (the pure-Python engine runs)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'engine.dataplane.packet':\n"
        "            raise ImportError('no compiled module here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from engine import dataplane\n"
        "print(dataplane.AVAILABLE, dataplane.packet)\n"
        "print(dataplane.UNAVAILABLE)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    first, reason = proc.stdout.splitlines()
    assert first == "False None"
    assert "no compiled module here" in reason and "python3-dev" in reason


def test_parse_records_reads_a_real_ring_in_place(captured: list[bytes]) -> None:
    """engine.io.ring.Ring written by its producer side, read by parse_records straight from
    the shared memory (its record area, wrap marks and all): the same packets the consumer
    side pops, parsed the same."""
    import mmap

    from engine.io import ring as ring_mod

    frames = captured[:300]
    buf, offsets, lengths = batch_of(frames)
    ring = ring_mod.Ring.create(8 << 10, 2048)  # wraps every few batches
    block = mmap.mmap(ring.spec()[0], 0)  # a second mapping of the ring's memfd
    shared = memoryview(block)
    area = shared[ring_mod._HEADER_BYTES :]
    view = b""
    try:
        recs = np.empty(64, D.PACKET_DTYPE)
        pushed = 0
        while pushed < len(frames):
            n = ring.push_frames(
                memoryview(buf), offsets[pushed : pushed + 40], lengths[pushed : pushed + 40], 1.0
            )
            assert n > 0
            peek = ring_mod.Ring.attach(ring.spec())
            peek._tail_mine = ring._tail()
            pos, count, nbytes = peek.peek_records(64)
            peek.close()
            assert count == n
            walked, good = D.parse_records(area, ring.capacity, pos, nbytes, recs, count)
            assert walked == n
            popped = ring.pop_packets(n)
            assert len(popped) == n
            assert good == sum(1 for _ts, data in popped if python_parse(data)[0] is None)
            view = bytes(area)
            for k, (_ts, data) in enumerate(popped):
                error, want = python_parse(data)
                if error is None:
                    assert record_packet(view, recs[k]) == want
                else:
                    assert error.startswith(REJECT_PREFIX[int(recs[k]["error"])])
            pushed += n
    finally:
        del view
        area.release()
        shared.release()
        block.close()
        ring.close()
    with pytest.raises(ValueError, match="ring of"):
        D.parse_records(b"\0" * 64, 128, 0, 16, np.empty(1, D.PACKET_DTYPE), 1)


def test_a_record_header_that_does_not_fit_ends_the_walk() -> None:
    ring = bytearray(256)
    ring[0:4] = (300).to_bytes(4, sys.byteorder)  # record 0 claims more than the area
    recs = np.empty(2, D.PACKET_DTYPE)
    assert D.parse_records(ring, 256, 0, 256, recs, 2) == (0, 0)
    ring[0:4] = (0).to_bytes(4, sys.byteorder)  # an empty packet, then a truncated one
    ring[16:20] = (4).to_bytes(4, sys.byteorder)
    assert D.parse_records(ring, 256, 0, 40, recs, 2) == (2, 0)
    assert [int(e) for e in recs["error"]] == [1, 1]  # both too short for an IP header


def test_batches_allocate_no_python_objects_per_packet(captured: list[bytes]) -> None:
    """100,000+ packets through parse_batch and build_batch: the interpreter's allocated
    block count does not grow with the packets (design §5: no object per packet)."""
    frames = [f for f in captured if D.decode_ip(f)[0] == 0][:256]
    buf, offsets, lengths = batch_of(frames)
    recs = np.empty(len(frames), D.PACKET_DTYPE)
    out = bytearray(len(buf) + 8 * len(frames))
    built = np.empty(len(frames), np.int32)
    rounds = 100_000 // len(frames) + 1

    def run() -> None:
        for _ in range(rounds):
            D.parse_batch(buf, offsets, lengths, recs)
            D.build_batch(recs, buf, out, built)

    run()  # warm: caches, interned names
    before = sys.getallocatedblocks()
    run()
    grown = sys.getallocatedblocks() - before
    assert rounds * len(frames) >= 100_000
    assert grown < 10, f"{grown} blocks more after {rounds * len(frames)} packets"


def _python_split(pkt: P.TcpPacket, mtu: int) -> list[bytes] | str:
    try:
        return [P.build(p) for p in P.split_mtu(pkt, mtu)]
    except ValueError as e:  # DecodeError is a ValueError: the exact type is compared
        return type(e).__name__


def _compiled_split(pkt: P.TcpPacket, mtu: int) -> list[bytes] | str:
    try:
        return D.split_build(*_build_args(pkt), data_len=pkt.data_len, mtu=mtu)
    except ValueError as e:
        return type(e).__name__


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([0, P.SYN, P.FIN | P.ACK, P.PSH | P.ACK, P.SYN | P.FIN | P.PSH | P.ACK, 0xFF]),
    u32,
    u16,
    st.one_of(option_lists, st.binary(min_size=41, max_size=48)),
    st.sampled_from([b"", b"\x01\x01\x01\x00", b"\x01" * 44]),
    st.integers(0, 5000),
    st.integers(-1, 200),
    st.one_of(st.integers(-10, 200), st.integers(40, 1600), st.integers(60000, 70000)),
)
@example(P.SYN | P.FIN, 0xFFFFFFFF, 0xFFFF, b"", b"", 3000, 0, 1500)  # seq and ip_id wrap
@example(0, 0, 0, b"", b"", 0, 0, 30)  # no data, headers larger than the MTU
def test_mtu_split_builds_the_same_pieces(
    flags: int, seq: int, ip_id: int, opts: bytes, ip_opts: bytes, size: int, cut: int, mtu: int
) -> None:
    payload = bytes(i & 0xFF for i in range(size))
    pkt = P.TcpPacket(
        1, 2, 3, 4, seq, 6, flags, 100, opts, payload, ip_id=ip_id, ip_options=ip_opts
    )
    if cut >= 0:
        pkt.data_len = size + cut  # a capture cut short by cut bytes (0: whole)
    assert _compiled_split(pkt, mtu) == _python_split(pkt, mtu)


def test_exercise_reports_the_parse_code(captured: list[bytes]) -> None:
    for frame in [*captured[:50], b"", b"E", captured[0][:30]]:
        assert D.exercise(frame) == D.decode_ip(frame)[0]


def test_another_compiled_module_can_cimport_the_declarations(
    tmp_path: Path, captured: list[bytes]
) -> None:
    """packet.pxd is the interface later compiled modules build on: a module that cimports
    it compiles, links against the installed extension at import, and parses the same."""
    import importlib.util
    import sysconfig

    (tmp_path / "probe.pyx").write_text(
        "# cython: language_level=3\n"
        "from engine.dataplane.packet cimport dp_packet, dp_parse_ipv4_tcp, DP_IPV4_MAPPED_AT\n"
        "def probe(const unsigned char[::1] b):\n"
        "    cdef dp_packet p\n"
        "    if b.shape[0] == 0:\n"
        "        return -1, 0, 0\n"
        "    code = dp_parse_ipv4_tcp(&b[0], b.shape[0], &p)\n"
        "    return code, p.sport, p.src[DP_IPV4_MAPPED_AT]\n"
    )
    cython = shutil.which("cython", path=str(Path(sys.executable).parent))
    assert cython
    subprocess.run([cython, "-3", "-I", str(ROOT), "probe.pyx"], cwd=tmp_path, check=True)
    so = tmp_path / ("probe" + sysconfig.get_config_var("EXT_SUFFIX"))
    include = sysconfig.get_paths()["include"]
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O1", f"-I{include}", "probe.c", "-o", str(so)],
        cwd=tmp_path, check=True,
    )  # fmt: skip
    spec = importlib.util.spec_from_file_location("probe", so)
    assert spec is not None and spec.loader is not None
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    for frame in captured[:50]:
        code, pkt, _ = D.decode_ip(frame)
        want = (code, pkt.sport, pkt.src >> 24) if pkt else code
        got = probe.probe(frame)
        assert (got if pkt else got[0]) == want


def test_the_builder_refuses_a_family_it_cannot_write_yet(captured: list[bytes]) -> None:
    """The structs carry a family for IPv6; until it is written, such a record is refused
    (never built as IPv4 from the wrong bytes)."""
    good = [f for f in captured if D.decode_ip(f)[0] == 0][:2]
    buf, offsets, lengths = batch_of(good)
    recs = np.empty(2, D.PACKET_DTYPE)
    assert D.parse_batch(buf, offsets, lengths, recs) == 2
    recs["family"][1] = 6
    built = np.empty(2, np.int32)
    used = D.build_batch(recs, buf, bytearray(len(buf) + 16), built)
    assert built[0] == used > 0 and D.ERROR_NAMES[-int(built[1])] == "family"


# -- link layer (engine.codec.packet.l2_offset) -------------------------------------------------

L2_REJECT_PREFIXES = {
    19: ("Ethernet header truncated", "802.1Q header truncated", "Linux SLL header truncated",
         "Linux SLL2 header truncated"),
    20: ("not IPv4",),
    21: ("unsupported link type",),
}  # fmt: skip
LINKTYPES = [P.DLT_EN10MB, P.DLT_RAW, P.DLT_LINUX_SLL, P.DLT_LINUX_SLL2, P.DLT_IPV4, 12, 14, 0, 105]


def assert_same_l2(frame: bytes, linktype: int) -> None:
    try:
        want: int | str = P.l2_offset(frame, linktype)
    except P.DecodeError as e:
        want = str(e)
    try:
        got = D.l2_offset(frame, linktype)
    except P.DecodeError as e:
        assert isinstance(want, str), f"compiled refuses ({e}), Python gives {want}"
        assert want.startswith(L2_REJECT_PREFIXES[e.code]), (e, want)  # type: ignore[attr-defined]
        return
    assert got == want


@settings(max_examples=1000)
@given(
    st.sampled_from(LINKTYPES),
    st.one_of(
        st.binary(max_size=24),
        st.tuples(
            st.binary(min_size=12, max_size=20),
            st.sampled_from([b"\x08\x00", b"\x81\x00", b"\x86\xdd", b""]),
            st.sampled_from([b"", b"\x00\x01\x08\x00", b"\x00\x01\x86\xdd", b"\x00"]),
        ).map(lambda t: b"".join(t)),
    ),
)
def test_link_layer_offsets_agree(linktype: int, frame: bytes) -> None:
    assert_same_l2(frame, linktype)


def test_captured_frames_as_one_batch_with_their_link_type() -> None:
    for path in (ONLINE_HTTP_PCAP, TARGET_SIDE_PCAP, CONTROL_PCAP):
        with open_pcap(str(path)) as reader:
            frames = [frame for _ts, _n, frame in reader]
        frames += [frames[0][:10], frames[0][:13] + b"\x86"]  # cut, and not IPv4
        buf, offsets, lengths = batch_of(frames)
        recs = np.empty(len(frames), D.PACKET_DTYPE)
        good = D.parse_batch(buf, offsets, lengths, recs, reader.linktype)
        accepted = 0
        for i, frame in enumerate(frames):
            assert_same_l2(frame, reader.linktype)
            try:
                want = P.parse_ip(frame[P.l2_offset(frame, reader.linktype) :])
            except P.DecodeError:
                assert int(recs[i]["error"]) != 0
                continue
            accepted += 1
            assert record_packet(buf, recs[i]) == want
        assert good == accepted > 0
        assert [D.ERROR_NAMES[int(e)] for e in recs["error"][-2:]] == [
            "l2_truncated",
            "l2_not_ipv4",
        ]
