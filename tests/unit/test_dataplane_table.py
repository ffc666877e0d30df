"""The compiled Table against SessionTable (the specification): the same random captured
packets, response records and clock steps give the same routes, packets (bytes), timers,
counters and gauges, after every step."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.codec import packet, wire
from engine.codec.packet import SYN
from engine.core.config import SessionConfig
from engine.core.rewrite import TransferEntry
from engine.core.table import SessionTable
from engine.errors import DecodeError
from engine.io.batch import PyBatchTable
from engine.io.ring import RECORD_WRAP, record_bytes
from tests.unit.engines import compiled
from tests.unit.link import ONLINE, TARGET, Client, Target

pytestmark = pytest.mark.skipif(compiled is None, reason="engine.dataplane is not compiled")

XFER = (TransferEntry(ONLINE[0], ONLINE[1], TARGET[0], TARGET[1]),)
POOL = (packet.ip_from_str("198.19.1.10"), packet.ip_from_str("198.19.1.11"))
FLOWS = 4
ORIG = packet.ip_from_str("198.18.9.1")
CONFIGS = {
    "plain": {},
    "pool-replicas": {"client_pool": POOL, "replicas": 2},
    "limits": {"max_sessions": 2, "backlog_max_bytes": 300, "worker_count": 32256},
    "shift-sample": {"port_shift": 3, "rand_shift": 17, "sample_percent": 60},
    "gradual-no-fake": {"gradual": True, "fake_handshake": False, "linger_s": 0.5},
}

client_op = st.one_of(
    st.tuples(st.sampled_from(["syn", "ack", "fin", "rst", "newsyn"]), st.integers(0, FLOWS - 1)),
    st.tuples(st.just("data"), st.integers(0, FLOWS - 1), st.integers(1, 3000)),
)
target_op = st.one_of(
    st.tuples(st.sampled_from(["synack", "tack", "tfin", "trst"]), st.integers(0, 7)),
    st.tuples(st.just("tdata"), st.integers(0, 7), st.integers(1, 5000)),
)
clock_op = st.tuples(st.just("tick"), st.floats(0.0, 3.0))
other_op = st.sampled_from(
    [("loss",), ("route_down",), ("route_up",), ("shed",), ("refuse",), ("admit",), ("forget",)]
)
ops = st.lists(
    st.one_of(client_op, client_op, target_op, target_op, clock_op, other_op), max_size=60
)


def nonzero(c: Counter) -> dict[str, int]:
    return {k: v for k, v in c.items() if v}


class Pair:
    def __init__(self, cfg: SessionConfig) -> None:
        self.py = SessionTable(cfg)
        self.c: Any = compiled.Table(cfg)
        self.now = 0.0
        self.targets: dict[tuple[int, int], Target] = {}
        self.order: list[tuple[int, int]] = []

    def both(self, name: str, *args):
        a = getattr(self.py, name)(*args)
        b = getattr(self.c, name)(*args)
        assert a == b, name
        return a

    def drain(self) -> None:
        routes, raws = self.py.drain()
        assert self.c.drain() == (routes, raws)
        for raw in raws:
            p = packet.parse_ip(raw)
            key = (p.src, p.sport)
            if key not in self.targets:
                self.targets[key] = Target(client=key, isn=7_000_000 + 1000 * len(self.order))
                self.order.append(key)
            self.targets[key].observe(p)

    def check(self) -> None:
        assert self.py.get_timer() == self.c.get_timer()
        assert nonzero(self.py.counters) == nonzero(self.c.counters)
        for name in ("active", "lingering", "unsend", "held_bytes"):
            assert getattr(self.py, name) == getattr(self.c, name), name
        assert self.py.live_routes() == self.c.live_routes()
        assert self.py.allocator.stats == self.c.allocator.stats


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CONFIGS)), ops)
def test_same_outputs_as_the_specification(config, steps):
    run_against_the_specification(config, steps)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CONFIGS)), ops, st.integers(1, 6))
def test_same_outputs_with_the_timer_items_renumbered(config, steps, limit):
    """The timer heap's items order a deadline's ties by a sequence number of a few bits,
    renumbered when they run out: here after a handful, and the timers fire as the
    specification's do."""
    compiled.Table.set_seq_limit(limit)  # (renumbered at every push once the heap has more)
    try:
        run_against_the_specification(config, steps)
    finally:
        compiled.Table.set_seq_limit(None)


def run_against_the_specification(config: str, steps: list) -> None:
    cfg = SessionConfig(transfers=XFER, **CONFIGS[config])
    baseline = compiled.live_allocations()[0]
    pair = Pair(cfg)
    clients = [
        Client(isn=1000 + 977 * i, addr=(packet.ip_from_str("198.18.7.1") + i, 30000 + i), ts=5)
        for i in range(FLOWS)
    ]
    for step in steps:
        kind = step[0]
        now = pair.now
        if kind in ("syn", "ack", "fin", "rst", "data", "newsyn"):
            c = clients[step[1]]
            if kind == "newsyn":  # the port reused by a new connection
                c = clients[step[1]] = Client(isn=c.isn + 100_003, addr=c.addr, ts=c.ts)
                kind = "syn"
            pkt = (
                c.data(bytes(step[2] % 251 for _ in range(step[2])))
                if kind == "data"
                else (getattr(c, kind)())
            )
            pair.both("receive_client", pkt, now)
        elif kind in ("synack", "tack", "tfin", "trst", "tdata"):
            if not pair.order:
                continue
            t = pair.targets[pair.order[step[1] % len(pair.order)]]
            if kind == "synack":
                pkt = t.synack()
            elif kind == "tack":
                pkt = t.ack()
            elif kind == "tfin":
                pkt = t.fin()
            elif kind == "trst":
                pkt = t.rst()
            else:
                pkt = t.send(step[2])
            pair.both("receive_response", pkt, now)
        elif kind == "tick":
            pair.now += step[1]
            while (t := pair.py.get_timer()) is not None and t <= pair.now:
                assert pair.c.get_timer() == t
                pair.both("handle_timer", t)
                pair.drain()
        elif kind == "loss":
            pair.both("note_capture_loss", now)
        elif kind in ("route_down", "route_up"):
            pair.both("set_route_down", kind == "route_down", now)
        elif kind == "shed":
            pair.both("shed_half_open", now)
        elif kind in ("refuse", "admit"):
            pair.py.refuse_new = pair.c.refuse_new = kind == "refuse"
            pair.both("expire_refused", now)
        elif kind == "forget":
            pair.both("forget_ended", now)
        pair.drain()
        pair.check()
    pair.both("end_input", pair.now)
    pair.drain()
    pair.check()
    pair.c = None  # a table going away frees every session it still holds
    assert compiled.live_allocations()[0] == baseline


def test_a_whole_flow_matches_byte_for_byte():
    """The smallest complete exchange, as a readable anchor for the property above."""
    pair = Pair(SessionConfig(transfers=XFER))
    c = Client(ts=1)
    for p in (c.syn(), c.ack(), c.data(b"GET / HTTP/1.1\r\n\r\n")):
        pair.both("receive_client", p, 0.0)
    pair.drain()
    (key,) = pair.order
    t = pair.targets[key]
    for p in (t.synack(), t.send(100), t.fin()):
        pair.both("receive_response", p, 0.001)
        pair.drain()
    pair.both("receive_client", c.fin(read=101), 0.002)
    pair.drain()
    pair.check()
    assert pair.c.counters["send content"] == 1 and pair.py.counters["conns"] == 1
    sent = [p for p in t.received if p.flags & SYN]
    assert len(sent) == 1


def test_lingering_sessions_answer_as_the_specification():
    """What a lingering session meets, kept as its record in the compiled table (one block
    of lingering_record_bytes each once drained): a late client ACK, a stray RST, stray
    data (a RST back), the target's FIN again, later data on the tuple (a new session), a
    graceful end's late segments, and its deadline; the same packets, counters and timers
    as the specification after every step."""
    pair = Pair(SessionConfig(transfers=XFER, linger_s=2.0))
    blocks, held = compiled.live_allocations()
    ca = Client(isn=11, addr=(ORIG + 1, 4001), ts=3)
    cb = Client(isn=22, addr=(ORIG + 2, 4002), ts=None)
    for c in (ca, cb):
        for p in (c.syn(), c.ack(), c.data(b"GET / HTTP/1.1\r\n\r\n")):
            pair.both("receive_client", p, 0.0)
    pair.drain()
    ta, tb = (pair.targets[k] for k in pair.order)
    for t in (ta, tb):
        pair.both("receive_response", t.synack(), 0.001)
        pair.drain()
        pair.both("receive_response", t.send(100), 0.002)
        pair.drain()
    pair.both("receive_response", ta.send(0, fin=True), 0.003)  # the target ends flow a
    pair.both("receive_client", cb.fin(read=100), 0.003)  # the client ends flow b
    pair.drain()
    pair.both("receive_response", tb.fin(), 0.004)
    pair.drain()
    pair.check()
    assert pair.c.lingering == pair.py.lingering == 2
    record = compiled.lingering_record_bytes()
    assert compiled.live_allocations() == (blocks + 2, held + 2 * record)
    steps = [
        ("receive_client", ca.ack(read=101)),
        ("receive_response", ta.rst()),
        ("receive_response", ta.send(10)),
        ("receive_response", ta.fin()),
        ("receive_response", tb.ack()),
        ("receive_response", tb.fin()),
        ("receive_response", tb.send(5)),
        ("receive_client", cb.ack(read=101)),
        ("receive_client", ca.data(b"GET /2 HTTP/1.1\r\n\r\n", read=101)),
    ]
    now = 0.01
    for name, p in steps:
        now += 0.01
        pair.both(name, p, now)
        pair.drain()
        pair.check()
    while (t := pair.py.get_timer()) is not None and t <= 10.0:
        assert pair.c.get_timer() == t
        pair.both("handle_timer", t)
        pair.drain()
        pair.check()
    assert pair.c.lingering == pair.py.lingering
    pair.both("forget_ended", 10.0)
    pair.drain()
    pair.check()
    pair.c = None
    assert compiled.live_allocations()[0] == blocks


# -- the batch calls: the same effect as the per-packet calls they loop over ---------------------


class SendBuf:
    """engine/io batch send buffer's shape: data (bytearray), view, lengths (u32 array)."""

    def __init__(self, nbytes: int, max_packets: int) -> None:
        self.data = bytearray(nbytes)
        self.view = memoryview(self.data)
        self.lengths = array("I", bytes(4 * max_packets))

    def packets(self, n: int) -> list[bytes]:
        out, off = [], 0
        for length in self.lengths[:n]:
            out.append(bytes(self.view[off : off + length]))
            off += length
        return out


def captured(clients: list[Client]) -> list[bytes]:
    pkts = []
    for c in clients:
        pkts += [c.syn(), c.ack(), c.data(b"GET /a HTTP/1.1\r\n\r\n"), c.data(b"x" * 700)]
    return [packet.build(p) for p in pkts]


def test_batch_calls_match_the_per_packet_calls():
    cfg = SessionConfig(transfers=XFER, client_pool=POOL, replicas=2)
    py, c = SessionTable(cfg), compiled.Table(cfg)
    clients = [Client(isn=100 + i, addr=(ORIG + i, 40000 + i), ts=3) for i in range(5)]
    raws = captured(clients)
    raws.insert(3, b"\x45\x00garbage")  # does not parse
    buf = b"".join(raws)
    offsets, off = [], 0
    for r in raws:
        offsets.append(off)
        off += len(r)
    lengths = [len(r) for r in raws] + [10]
    offsets.append(len(buf) - 5)  # reaches past the buffer
    errors = 0
    for r in raws:
        try:
            py.receive_client(packet.parse_ip(r), 1.0)
        except DecodeError:
            errors += 1
    assert c.receive_client_ips(buf, offsets, lengths, len(lengths), 1.0) == errors + 1
    routes, packets = py.drain()
    send = SendBuf(4000, 3)  # small: drain_into hands the packets out over several calls
    got_routes, got = [], []
    while True:
        r, n = c.drain_into(send)
        got_routes += r
        got += send.packets(n)
        if not n:
            break
    assert (got_routes, got) == (routes, packets) and len(packets) == 10
    assert nonzero(py.counters) == nonzero(c.counters)
    # The targets answer: records back to back (frame counts removed), one of them broken.
    records = []
    for raw in packets:
        p = packet.parse_ip(raw)
        t = Target(client=(p.src, p.sport))
        t.observe(p)
        for answer in (t.synack(), t.send(300)):
            records.append(wire.encode_response_record(packet.build(answer)))
    records.insert(2, bytes(64))  # version 0: not a record
    stream = b"".join(records) + b"\x45" * 10  # and the start of the next record
    for rec in records:
        try:
            py.receive_response(wire.decode_response_record(rec), 2.0)
        except DecodeError:
            py.counters["response_decode_errors"] += 1
    assert c.receive_records(stream, 2.0) == 64 * len(records)
    assert py.drain() == c.drain()
    assert nonzero(py.counters) == nonzero(c.counters)
    assert c.counters["response_decode_errors"] == 1


def test_ring_records_are_read_in_place_across_the_wrap():
    """receive_ring in C and in PyBatchTable (its specification) over the same records: a
    wrap mark before the third, and a header that does not fit ends the walk as one error."""
    cfg = SessionConfig(transfers=XFER)
    py, c = SessionTable(cfg), compiled.Table(cfg)
    raws = captured([Client(isn=7, addr=(ORIG, 41000), ts=None)])[:4]
    capacity = 1024
    sizes = [record_bytes(len(raw)) for raw in raws]
    pos = capacity - sizes[0] - sizes[1] - 8  # two records, then 8 bytes too few: a wrap mark
    mem = bytearray(capacity)
    at = pos
    for k, raw in enumerate(raws):
        if k == 2:
            struct.pack_into("=I", mem, at, RECORD_WRAP)
            at = 0
        struct.pack_into("=IId", mem, at, len(raw), 0, 0.0)
        mem[at + 16 : at + 16 + len(raw)] = raw
        at += sizes[k]
    struct.pack_into("=I", mem, at, capacity)  # a fifth header claims more than the area
    nbytes = sum(sizes) + 8 + 16
    for raw in raws:
        py.receive_client(packet.parse_ip(raw), 1.0)
    assert c.receive_ring(mem, capacity, pos, nbytes, 1.0) == 1
    assert PyBatchTable(SessionTable(cfg)).receive_ring(mem, capacity, pos, nbytes, 1.0) == 1
    assert py.drain() == c.drain()
    assert nonzero(py.counters) == nonzero(c.counters)
    with pytest.raises(ValueError, match="bad ring geometry"):
        c.receive_ring(mem, capacity, capacity, 8, 1.0)


# -- the per-packet code is C only ----------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
HOT_PREFIXES = ("tb", "ta", "rw", "th", "hm", "wr")
"""The table's (tb_), the allocator's (ta_), the rewrite rules' (rw_), the tuple history's
(th_), the hash map's (hm_) and the record decoder's (wr_) C functions."""


def test_table_rewrite_and_map_functions_make_no_python_calls(tmp_path: Path) -> None:
    """``cython -a``: every line of every ``nogil`` function or method of table.pxi,
    rewrite.pxi and hmap.pxi, and of every ``with nogil:`` block (the batch calls' loops),
    has score 0.  Excepted: the ``with gil:`` branches of the tuple history that call a
    Python object's methods (tests hand the allocator fake histories; a TupleHistory block
    never takes them)."""
    cython = shutil.which("cython", path=str(Path(sys.executable).parent))
    assert cython, "cython is not installed in this environment"
    out_c = tmp_path / "engine.c"
    cmd = [cython, "-a", "-3", "-I", str(ROOT), "engine/dataplane/engine.pyx", "-o", str(out_c)]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=300)
    prefixes = "|".join(HOT_PREFIXES)
    signature = re.compile(rf"\s*cdef (inline )?[\w*]+ ({prefixes})_\w+\(")
    checked = 0
    for name in ("table", "rewrite", "hmap"):
        html = (tmp_path / f"{name}.html").read_text()
        score = {
            int(m[2]): int(m[1])
            for m in re.finditer(
                r'class="cython line score-(\d+)"[^>]*>.{0,12}?<span class="">(\d+)</span>', html
            )
        }
        lines = (ROOT / "engine" / "dataplane" / f"{name}.pxi").read_text().splitlines()
        hot: list[int] = []
        block = gil = -1
        for no, line in enumerate(lines, 1):
            indent = len(line) - len(line.lstrip())
            text = line.strip()
            if text and block >= 0 and indent <= block:
                block = -1
            if text and gil >= 0 and indent <= gil:
                gil = -1
            if signature.match(line) and "nogil" in " ".join(lines[no - 1 : no + 4]):
                block = indent
                continue
            if text in ("with nogil:", "with gil:"):
                if text == "with nogil:":
                    block = indent
                else:
                    gil = indent
                continue
            if block >= 0 and gil < 0 and text and not text.startswith(("#", '"""')):
                hot.append(no)
        yellow = [f"{name}.pxi:{n}: {lines[n - 1].strip()}" for n in hot if score.get(n, 0)]
        assert not yellow, "Python calls on the per-packet path:\n" + "\n".join(yellow)
        checked += len(hot)
    assert checked > 900


def test_established_sessions_allocate_no_python_objects_per_packet():
    """100,000+ packets of established keep-alive sessions through the batch calls (client
    data in, records of the target's ACKs in, packets out into a send buffer): the
    interpreter's allocated block count does not grow with the packets."""
    flows = 64
    cfg = SessionConfig(transfers=XFER, wait_response=False)
    table = compiled.Table(cfg)
    clients = [Client(isn=10_000 * i, addr=(ORIG + i, 42000 + i), ts=None) for i in range(flows)]
    send = SendBuf(1 << 20, 1024)
    targets = []
    for c in clients:
        table.receive_client(c.syn(), 0.0)
        table.receive_client(c.ack(), 0.0)
        _, n = table.drain_into(send)
        (syn,) = [packet.parse_ip(r) for r in send.packets(n)]
        t = Target(client=(syn.src, syn.sport), ts=None)
        t.observe(syn)
        table.receive_response(t.synack(), 0.0)
        table.drain_into(send)
        targets.append(t)
    request = b"GET /k HTTP/1.1\r\n\r\n".ljust(100, b"x")
    data = [packet.build(c.data(request)) for c in clients]
    buf = bytearray(b"".join(data))
    offsets = array("q", [sum(map(len, data[:i])) for i in range(flows)])
    lengths = array("q", map(len, data))
    acks = bytearray(b"".join(wire.encode_response_record(packet.build(t.ack())) for t in targets))
    seqs = [c.seq - len(request) for c in clients]  # the first request's seq
    rounds = 100_000 // flows + 1
    state = {"now": 1.0, "k": 0}

    def run() -> None:
        for _ in range(rounds):
            k = state["k"]
            now = state["now"]
            for i in range(flows):
                seq = (seqs[i] + k * len(request)) & 0xFFFFFFFF
                struct.pack_into("!I", buf, offsets[i] + 24, seq)
                struct.pack_into("!I", acks, 64 * i + 28, (seq + len(request)) & 0xFFFFFFFF)
            assert table.receive_client_ips(buf, offsets, lengths, flows, now) == 0
            assert table.drain_into(send)[1] == flows
            table.receive_records(acks, now)
            table.drain_into(send)
            table.handle_timer(now)
            state["k"] = k + 1
            state["now"] = now + 0.001

    run()  # warm: caches, interned names, the C arrays at their size
    sent = table.counters["send content"]
    before = sys.getallocatedblocks()
    run()
    grown = sys.getallocatedblocks() - before
    assert table.counters["send content"] - sent == rounds * flows >= 100_000
    assert table.counters["retransmit"] == 0 and table.active == flows
    assert grown < 10, f"{grown} blocks more after {rounds * flows} packets"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 191), st.integers(0, 255)), min_size=0, max_size=12
    ),  # byte edits
    st.sampled_from([64, 192]),
    st.integers(0, 300),
)
def test_hostile_records_decode_like_wire_py(edits, record_bytes, extra):
    """Response records with random bytes edited (header fields, IHL, data offset, lengths):
    each is decoded or refused as wire.decode_response_record does, and what it does to the
    sessions is the same."""
    cfg = SessionConfig(transfers=XFER)
    py, c = SessionTable(cfg), compiled.Table(cfg)
    client = Client(ts=2)
    for p in (client.syn(), client.ack()):
        py.receive_client(p, 0.0)
        c.receive_client(p, 0.0)
    routes, raws = py.drain()
    assert c.drain() == (routes, raws)
    syn = packet.parse_ip(raws[0])
    t = Target(client=(syn.src, syn.sport))
    t.observe(syn)
    recs = []
    for p in (t.synack(), t.send(100 + extra), t.ack()):
        rec = bytearray(
            wire.encode_response_record(packet.build(p), with_payload=record_bytes == 192)
        )
        recs.append(rec)
    for at, value in edits:
        recs[at % 3][at % record_bytes] = value
    bad = 0
    for rec in recs:
        try:
            pkt = wire.decode_response_record(bytes(rec))
        except DecodeError:
            bad += 1
            continue
        py.receive_response(pkt, 0.01)
    assert c.receive_records(b"".join(recs), 0.01, record_bytes) == 3 * record_bytes
    assert py.drain() == c.drain()
    got = nonzero(c.counters)
    assert got.pop("response_decode_errors", 0) == bad
    assert got == nonzero(py.counters)


def test_indexes_give_memory_back_after_a_flood():
    """20,000 half-open sessions (a SYN flood the target never answers) grow the C maps and
    the timer heap; once they have timed out and their tuples left quarantine, the indexes
    hold a fiftieth of that or less."""
    cfg = SessionConfig(transfers=XFER, time_wait_s=1.0)
    table = compiled.Table(cfg)
    send = SendBuf(1 << 22, 4096)
    n = 20_000
    for i in range(n):
        c = Client(isn=i, addr=(ORIG + i // 1000, 1024 + i % 1000), ts=None)
        table.receive_client(c.syn(), 0.0)
        table.drain_into(send)
    flooded = table.index_bytes
    assert table.active == n and flooded > n * 32  # a slot or more per session and map
    now = 0.0
    while table.active and now < 600:
        now = max(now + 1.0, table.get_timer() or 0.0)
        table.handle_timer(now)
        table.drain_into(send)
    assert table.active == 0, f"{table.active} sessions left at {now} s"
    # One new session after the quarantine: the allocator expires the old tuples on its way.
    c = Client(isn=1, addr=(ORIG + 99, 5000), ts=None)
    table.receive_client(c.syn(), now + 10)
    table.drain_into(send)
    table.handle_timer(now + 10)
    after = table.index_bytes
    assert after * 50 < flooded, (flooded, after)


def drained(table: Any, send: SendBuf) -> list[packet.TcpPacket]:
    got = []
    while True:
        _routes, n = table.drain_into(send)
        if not n:
            return got
        got += [packet.parse_ip(raw) for raw in send.packets(n)]


BLOCK_HEADER_BYTES = 16  # engine/dataplane/session.pxi e_alloc's size header
LINGERING_SESSIONS = 100_000
LINGERING_SESSION_MAX_BYTES = 212
"""What a lingering session holds all told in the compiled engine (its record, table entry
and flow, map slots, timer item, the allocator's tuple state), measured by malloc."""
LINGERING_RECORD_MAX_BYTES = 64
"""What the table keeps of a lingering session's own state (session.pxi ELinger)."""


def test_lingering_sessions_are_kept_as_what_lingering_reads():
    """100 k short connections (request, answer and the target's FIN: ACK, then RST) end
    and linger (to answer stray responses): the C heap they hold, measured by malloc
    (compiled.heap_in_use), is at most LINGERING_SESSION_MAX_BYTES each, each session a
    record of LINGERING_RECORD_MAX_BYTES at most; once their linger is over and their
    tuples left quarantine, the indexes shrink and every record is freed."""
    cfg = SessionConfig(transfers=XFER, time_wait_s=1.0)
    table = compiled.Table(cfg)
    send = SendBuf(1 << 22, 8192)
    batch = 2_000

    def out() -> list[packet.TcpPacket]:
        return drained(table, send)

    blocks_before, bytes_before = compiled.live_allocations()
    before = compiled.heap_in_use()
    for first in range(0, LINGERING_SESSIONS, batch):
        clients = [
            Client(isn=7 * i, addr=(ORIG + i // 50_000, 1024 + i % 50_000), ts=5)
            for i in range(first, first + batch)
        ]
        for c in clients:
            table.receive_client(c.syn(), 0.0)
        targets = {}
        for p in out():
            t = targets[p.src, p.sport] = Target(client=(p.src, p.sport))
            t.observe(p)
        for t in targets.values():
            table.receive_response(t.synack(), 0.001)
        for c in clients:
            table.receive_client(c.ack(), 0.001)
            table.receive_client(c.data(b"GET / HTTP/1.1\r\n\r\n"), 0.001)
        for p in out():
            targets[p.src, p.sport].observe(p)
        for t in targets.values():
            table.receive_response(t.send(200, fin=True), 0.002)
        assert {p.flags for p in out()} == {0x10, 0x14}  # ACK, then RST|ACK
    # A second on: the timers set before the end (SYN, RTO) have fired, each session waits
    # on its linger deadline alone, as it does for most of its linger under load.
    table.handle_timer(1.0)
    assert out() == []
    assert table.heap_size == LINGERING_SESSIONS
    assert table.active == LINGERING_SESSIONS
    assert table.lingering == LINGERING_SESSIONS
    assert table.counters["ended_target_closed"] == LINGERING_SESSIONS
    held_at_peak = compiled.heap_in_use() - before
    per_session = held_at_peak / LINGERING_SESSIONS
    slab_at_peak = table.slab_bytes
    indexes = table.index_bytes
    assert per_session <= LINGERING_SESSION_MAX_BYTES, per_session
    record = compiled.lingering_record_bytes()
    assert record <= LINGERING_RECORD_MAX_BYTES
    blocks, held = compiled.live_allocations()
    assert blocks - blocks_before == LINGERING_SESSIONS  # one block each: its record
    assert held - bytes_before == LINGERING_SESSIONS * record
    # A stray answer on a lingering tuple still gets its RST.
    stray = table.counters["drop_stray_response"]
    table.receive_response(Target(client=(ORIG, 1024)).send(10), 1.5)
    assert [p.flags for p in out()] == [0x14]
    assert table.counters["drop_stray_response"] == stray + 1
    now = 0.002 + cfg.linger_s
    table.handle_timer(now)
    out()
    assert table.active == 0 and table.lingering == 0
    c = Client(isn=1, addr=(ORIG + 99, 5000), ts=None)  # past the quarantine: tuples expire
    table.receive_client(c.syn(), now + 10)
    out()
    table.handle_timer(now + 10)
    assert table.index_bytes * 50 < indexes, (indexes, table.index_bytes)
    assert slab_at_peak >= LINGERING_SESSIONS * 2 * 64  # an entry and a record each
    assert table.slab_bytes <= 2 * 65536  # its chunks went back with them (one is kept)
    table = None  # a table going away frees every session it still holds
    assert compiled.live_allocations()[0] == blocks_before
