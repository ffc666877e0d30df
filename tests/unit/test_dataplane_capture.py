"""The compiled capture walk (engine/dataplane/capture.pyx) against the Python one it is the
twin of (engine/io/capture.py parse_block, TransferFilter, engine/proc/capture.py
dispatch_frames, engine/core/shed.py FlowGate): the same TPACKET_V3 blocks through both must
give the same ring contents (data, timestamps, loss marks), the same worker for every packet,
the same drops and the same counters, whatever the blocks hold: non-IPv4 frames, fragments,
frames cut short, frames the -x rule leaves out, shed flows, aggregates larger than -M, full
rings, and blocks that lie about their frames."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import dataplane
from engine.codec import packet
from engine.codec.pcapfile import open_pcap
from engine.core.shed import FlowGate
from engine.io.capture import PACKET_OUTGOING
from engine.proc.capture import FLOW_HASH_MULTIPLIER, flow_worker
from testbed.blocks import (
    ACK,
    BLOCK,
    CORRUPTIONS,
    FIN,
    PSH,
    RST,
    SYN,
    Frame,
    Walk,
    corrupt,
    eth,
    make_block,
    tcp_ip,
)
from tests.paths import CONTROL_PCAP, ONLINE_HTTP_PCAP, TARGET_SIDE_PCAP

pytestmark = pytest.mark.skipif(not dataplane.AVAILABLE, reason=dataplane.UNAVAILABLE)


def run_walk(
    compiled: bool,
    blocks: list[tuple[bytearray, float, bool]],
    *,
    pops: list[int] | None = None,
    ring_bytes: int,
    **kw: Any,
) -> dict[str, Any]:
    """Every block (its bytes, the clock, the memory flag) read by a capture process through
    one walk, each followed by ``pops[i]`` packets taken from every ring (a consumer, so a
    ring that was full takes packets again); returns what came out."""
    buf = bytearray(max(len(b) for b, _t, _m in blocks))
    walk = Walk(compiled, buf, ring_bytes=ring_bytes, **kw)
    try:
        out: list[list[tuple[float, bytes]]] = [[] for _ in walk.rings]
        for i, (data, now, memory) in enumerate(blocks):
            buf[: len(data)] = data
            walk.read(now, memory)
            for got, popped in zip(out, walk.pop(pops[i] if pops else 0), strict=True):
                got.extend(popped)
        for got, popped in zip(out, walk.pop(ring_bytes), strict=True):
            got.extend(popped)
        return {"rings": out, **walk.state()}
    finally:
        walk.close()


def both(blocks: list[tuple[bytearray, float, bool]], **kw: Any) -> dict[str, Any]:
    want = run_walk(False, blocks, **kw)
    got = run_walk(True, blocks, **kw)
    for key in want:
        assert got[key] == want[key], key
    return want


SETTINGS = {"block_bytes": BLOCK, "workers": 3, "ring_bytes": 32768, "mtu": 1500}


def one_block(frames: list[Frame]) -> bytearray:
    buf = bytearray(BLOCK)
    make_block(frames, buf, 0)
    return buf


@pytest.mark.parametrize("kernel_filtered", [True, False])
@pytest.mark.parametrize("host_only", [True, False])
def test_every_frame_kind_gives_the_same_rings_and_counters(kernel_filtered, host_only):
    udp = tcp_ip("198.19.0.1", 1000, ACK, b"u", proto=17)
    ipv6 = bytearray(tcp_ip("198.19.0.1", 1000, ACK, b"6"))
    ipv6[0] = 0x60
    frames = [
        Frame(eth(tcp_ip("198.19.0.1", 1000, SYN))),
        Frame(eth(tcp_ip("198.19.0.1", 1000, PSH | ACK, b"GET / HTTP/1.1\r\n\r\n"))),
        Frame(eth(tcp_ip("198.19.0.2", 2000, PSH | ACK, b"x" * 40, options=b"\x01" * 4))),
        Frame(eth(udp)),
        Frame(eth(bytes(ipv6))),
        Frame(eth(tcp_ip("198.19.0.3", 3000, ACK, b"f", frag=0x2001))),  # non-first fragment
        Frame(eth(tcp_ip("198.19.0.4", 4000, PSH | ACK, b"cut")), wire_extra=100),
        Frame(eth(tcp_ip("198.19.0.5", 5000, PSH | ACK, b"other", dport=81))),  # not -x
        Frame(eth(tcp_ip("198.19.0.6", 6000, PSH | ACK, b"any", dst="198.18.9.9", dport=8080))),
        Frame(eth(tcp_ip("198.19.0.7", 7000, ACK))),  # pure ACK
        Frame(eth(tcp_ip("198.19.0.8", 8000, PSH | ACK, b"o")), PACKET_OUTGOING),
        Frame(eth(tcp_ip("198.19.0.9", 9000, PSH | ACK, b"b")), 1),  # broadcast
        Frame(eth(tcp_ip("198.19.0.1", 1000, FIN | ACK))),
        Frame(eth(tcp_ip("198.19.0.2", 2000, PSH | ACK, b"z" * 3000))),  # a GRO aggregate
        Frame(eth(bytes(20) + bytes(6))),  # IPv4 version 0, short
    ]
    out = both([(one_block(frames), 1.0, False)], kernel_filtered=kernel_filtered,
               host_only=host_only, **SETTINGS)  # fmt: skip
    assert sum(len(r) for r in out["rings"]) >= 4
    assert out["source"]["capture_truncated"] == 1
    if not kernel_filtered:
        f = out["filter"]
        assert f["capture_fragment"] == 1 and f["capture_not_matched"] == 1
        assert f["capture_pure_ack_dropped"] == 1 and f["capture_not_tcp"] >= 3
    assert out["proc"]["capture_split"] == 1


def test_each_packet_goes_to_the_worker_flow_worker_names():
    pkts = [tcp_ip(f"198.19.{i % 5}.{i % 7}", 1000 + i, PSH | ACK, b"q") for i in range(40)]
    out = both([(one_block([Frame(eth(p)) for p in pkts]), 1.0, False)],
               kernel_filtered=True, host_only=False, **SETTINGS)  # fmt: skip
    for w, ring in enumerate(out["rings"]):
        for _ts, data in ring:
            q = packet.parse_ip(data)
            assert flow_worker(q.src, q.sport, 3) == w
    assert sum(len(r) for r in out["rings"]) == 40
    assert dataplane.capture.flow_worker(0xC6130001, 1000, 3, FLOW_HASH_MULTIPLIER) == (
        flow_worker(0xC6130001, 1000, 3)
    )


def test_shedding_drops_the_same_flows_whole():
    # Memory short from the second block on: new flows are shed, known ones go on.
    first = [Frame(eth(tcp_ip("198.19.0.1", 1000 + i, SYN))) for i in range(4)]
    second = [Frame(eth(tcp_ip("198.19.0.1", 1000 + i, PSH | ACK, b"d"))) for i in range(8)]
    third = [Frame(eth(tcp_ip("198.19.0.1", 1000 + i, FIN | ACK))) for i in range(8)]
    out = both(
        [(one_block(first), 1.0, False), (one_block(second), 2.0, True),
         (one_block(third), 3.0, False)],
        kernel_filtered=True, host_only=False, **SETTINGS,
    )  # fmt: skip
    assert out["proc"]["shed_sessions_memory"] == 4
    assert out["proc"]["drop_shed"] == 8
    assert out["known"] == {} and out["shed"] == {}


def test_a_full_ring_drops_and_marks_the_same_packets():
    pkts = [Frame(eth(tcp_ip("198.19.0.1", 1000, PSH | ACK, bytes([i]) * 50))) for i in range(30)]
    out = both([(one_block(pkts), 1.0, False), (one_block(pkts[:5]), 2.0, False)],
               pops=[4, 0], kernel_filtered=True, host_only=False, block_bytes=BLOCK,
               workers=1, ring_bytes=16 * 112, max_packet=512, mtu=1500)  # fmt: skip
    assert out["dropped"] == [14 + 1] and out["loss_marks"] == [1]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_block_that_lies_is_read_to_its_first_bad_frame_by_both(how):
    rng = random.Random(how)
    for _ in range(30):
        pkts = [Frame(eth(tcp_ip("198.19.0.1", 1000 + i, PSH | ACK, b"x" * i))) for i in range(9)]
        buf = bytearray(BLOCK)
        heads = make_block(pkts, buf, 0)
        corrupt(buf, heads, how, rng)
        both([(buf, 1.0, False)], kernel_filtered=rng.random() < 0.5, host_only=False,
             **SETTINGS)  # fmt: skip


def test_the_shared_captures_through_both_walks():
    frames: list[Frame] = []
    for path in (ONLINE_HTTP_PCAP, TARGET_SIDE_PCAP, CONTROL_PCAP):
        with open_pcap(str(path)) as reader:
            for _ts, _n, frame in reader:
                try:
                    off = packet.l2_offset(frame, reader.linktype)
                except packet.DecodeError:
                    continue
                frames.append(Frame(eth(frame[off:])))
    assert len(frames) > 100
    blocks = []
    at = 0
    while at < len(frames):
        buf = bytearray(BLOCK)
        heads = make_block(frames[at : at + 200], buf, 0)
        blocks.append((buf, 1.0 + len(blocks) * 0.01, False))
        at += max(1, len(heads))
    for kernel_filtered in (True, False):
        for workers in (1, 2, 4):
            out = both(blocks, kernel_filtered=kernel_filtered, host_only=False,
                       block_bytes=BLOCK, workers=workers, ring_bytes=1 << 20,
                       mtu=1500)  # fmt: skip
            assert sum(len(r) for r in out["rings"]) > 0


# -- random blocks -------------------------------------------------------------------------

FLAG_CHOICES = (SYN, SYN | ACK, ACK, PSH | ACK, FIN | ACK, RST, RST | ACK, FIN, 0)


@st.composite
def frames_strategy(draw: Any) -> Frame:
    kind = draw(st.sampled_from(("tcp",) * 6 + ("udp", "frag", "short", "other", "big")))
    ip = f"198.19.0.{draw(st.integers(1, 3))}"
    port = draw(st.integers(1000, 1003))
    flags = draw(st.sampled_from(FLAG_CHOICES))
    payload = b"p" * draw(st.sampled_from((0, 0, 1, 100, 700)))
    if kind == "udp":
        data = tcp_ip(ip, port, flags, payload, proto=17)
    elif kind == "frag":
        data = tcp_ip(ip, port, flags, payload, frag=draw(st.sampled_from((0x2000, 0x10))))
    elif kind == "short":
        data = tcp_ip(ip, port, flags, payload)[: draw(st.integers(0, 40))]
    elif kind == "other":
        data = tcp_ip(ip, port, flags, payload, dport=draw(st.sampled_from((81, 8080))))
    elif kind == "big":
        data = tcp_ip(ip, port, flags | ACK, b"G" * draw(st.integers(1400, 3500)))
    else:
        data = tcp_ip(ip, port, flags, payload)
    pkttype = draw(st.sampled_from((0, 0, 0, 0, 1, PACKET_OUTGOING)))
    cut = draw(st.sampled_from((0,) * 9 + (64,)))
    return Frame(eth(data), pkttype, wire_extra=cut)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.lists(
        st.tuples(
            st.lists(frames_strategy(), max_size=24),
            st.booleans(),  # memory short
            st.sampled_from(("", "", "", "next", "snaplen", "num_pkts", "first", "macnet")),
            st.floats(0.0, 200.0),  # clock step
            st.sampled_from((0, 0, 3, 64)),  # packets a consumer takes after the block
        ),
        min_size=1,
        max_size=8,
    ),
    workers=st.integers(1, 3),
    ring_bytes=st.sampled_from((3072, 4096, 8192)),
    mtu=st.sampled_from((576, 1500)),
    kernel_filtered=st.booleans(),
    host_only=st.booleans(),
    drop_pure_acks=st.booleans(),
    seed=st.integers(0, 1 << 16),
)
def test_random_blocks_through_both_walks(
    blocks, workers, ring_bytes, mtu, kernel_filtered, host_only, drop_pure_acks, seed
):
    rng = random.Random(seed)
    now = 0.0
    data = []
    pops = []
    for frames, memory, how, step, pop in blocks:
        pops.append(pop)
        buf = bytearray(BLOCK)
        heads = make_block(frames, buf, 0)
        corrupt(buf, heads, how, rng)
        now += step
        data.append((buf, now, memory))
    both(data, pops=pops, block_bytes=BLOCK, workers=workers, ring_bytes=ring_bytes, mtu=mtu,
         kernel_filtered=kernel_filtered, host_only=host_only,
         drop_pure_acks=drop_pure_acks)  # fmt: skip


# -- the gate alone ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    batches=st.lists(
        st.tuples(
            st.lists(st.tuples(st.integers(0, 7), st.sampled_from(FLAG_CHOICES)), max_size=30),
            st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),  # ring fills
            st.booleans(),  # memory
            st.floats(0.0, 40.0),  # clock step
        ),
        max_size=12,
    ),
    vectorize=st.booleans(),
)
def test_the_compiled_gate_decides_as_flowgate(batches, vectorize):
    want_c: Counter[str] = Counter()
    got_c: Counter[str] = Counter()
    ref = FlowGate(3, counters=want_c)
    ref.vectorize = vectorize
    gate = dataplane.capture.Gate(3, counters=got_c)
    now = 0.0
    for pkts, fills, memory, step in batches:
        now += step
        assert gate.update(fills, memory) == ref.update(fills, memory)
        keys = np.array([k for k, _f in pkts], dtype=np.uint64)
        flags = np.array([f for _k, f in pkts], dtype=np.uint8)
        workers = np.array([k % 3 for k, _f in pkts], dtype=np.uint64)
        a = ref.admit(keys, flags, workers, now)
        b = gate.admit(keys, flags, workers, now)
        # None is "every packet goes in" (FlowGate may also say so with a mask of True)
        everyone = [True] * len(pkts)
        assert (everyone if a is None else a.tolist()) == (everyone if b is None else b.tolist())
        assert gate.known == ref.known and gate.shed == ref.shed
        assert +got_c == +want_c


def test_the_gate_tables_grow_and_expire():
    gate = dataplane.capture.Gate(1)
    keys = np.arange(100_000, dtype=np.uint64) * np.uint64(65537)
    zeros = np.zeros(len(keys), dtype=np.uint64)
    assert gate.admit(keys, np.full(len(keys), ACK, np.uint8), zeros, 1.0) is None
    assert len(gate.known) == 100_000
    ends = np.full(50_000, FIN, np.uint8)
    gate.admit(keys[::2], ends, zeros[::2], 2.0)
    known = gate.known
    assert len(known) == 50_000 and all(int(k) in known for k in keys[1::2][:100].tolist())
    gate.expire(1000.0)
    assert gate.known == {}
