"""The two session engines side by side: the same inputs must give the same outputs.

Hypothesis drives a reference ``engine.core.table.SessionTable`` (per-packet calls: the
specification) and a table under test with the same random client packets, response records
and clock steps, and after every step requires the same ``drain()`` (routes, then packet
bytes, in order), the same counters, ``active``/``unsend``/``lingering``/``held_bytes`` and
``get_timer()``.
The table under test is the compiled ``engine.dataplane.engine.Table`` (skipped with the
reason when it is not built) and, always, a second Python table behind engine/io/batch.py's
adapter, which checks the harness and the batch calls' semantics at once.

The traffic comes from a small model of clients (so most of it is valid TCP that reaches the
interesting states: handshakes, held requests, flow control, retransmissions, FIN/RST,
linger, reconnects) and of the target (it answers what the reference sent: SYN-ACKs with or
without window scaling and timestamps, ACKs, zero windows, data, FIN, RST), plus a share of
mutations: capture loss, reordering, duplicates, flows adopted mid-stream (no SYN), port
reuse with a new ISN, mangled fields and bytes, and table-level events (route down, end of
input, shedding, capture loss notes).  The table under test is fed through its batch calls
(``receive_client_ips``, ``receive_records``, ``drain_into``; engine/io/batch.py's adapter
provides them over a table that lacks them) or its per-packet calls, drawn per step; the
reference always through its per-packet calls.

Profiles: ``TCPCOPY_ENGINE_DIFF=long`` runs 5,000 examples per test (``ci``, the default: 200).
A difference fails with the step list that led to it (Hypothesis shrinks it) and the first
differing output.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.codec import packet, wire
from engine.codec.packet import ACK, FIN, PSH, RST, SYN, TcpPacket
from engine.core.config import SessionConfig
from engine.core.rewrite import TransferEntry
from engine.core.table import SessionTable
from engine.errors import DecodeError
from engine.io.batch import PyBatchTable, SendBuffer, as_batch
from engine.io.engines import compiled_table_class
from metrics.counters import ALIASES, ENGINE_FIRST, ENGINE_KEYS, CounterBlock

M32 = 0xFFFFFFFF
ONLINE = (packet.ip_from_str("198.18.1.2"), 80)
TARGET = (packet.ip_from_str("198.18.2.3"), 8080)
CLIENTS = [packet.ip_from_str(f"198.18.1.{10 + i}") for i in range(3)]
XFER = (TransferEntry(ONLINE[0], ONLINE[1], TARGET[0], TARGET[1]),)
POOL = (packet.ip_from_str("198.19.1.10"),)

settings.register_profile(
    "engine-diff-ci",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "engine-diff-long",
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LONG = os.environ.get("TCPCOPY_ENGINE_DIFF") == "long"
PROFILE = "engine-diff-long" if LONG else "engine-diff-ci"
pytestmark = pytest.mark.timeout(3600 if LONG else 300)
STEPS_MAX = 60


# -- the model of the clients -----------------------------------------------------------------


@dataclass
class Flow:
    """One captured client connection (client ip, port) -> ONLINE."""

    ip: int
    port: int
    isn: int
    seq: int
    online_isn: int
    read: int = 0
    ts: int | None = None
    wscale: int | None = 7
    window: int = 502
    ip_id: int = 100
    synced: bool = False  # a SYN was sent (else: adopted mid-stream)
    closed: bool = False
    held: list[bytes] = field(default_factory=list)  # captured, not yet delivered (reorder)

    def pkt(self, flags: int, payload: bytes = b"", **kw: Any) -> TcpPacket:
        opts = kw.pop("options", None)
        if opts is None:
            opts = packet.build_options(timestamp=(self.ts, 0)) if self.ts is not None else b""
            if self.ts is not None:
                self.ts = (self.ts + 1) & M32
        self.ip_id = (self.ip_id + 1) & 0xFFFF
        return TcpPacket(
            self.ip,
            ONLINE[0],
            self.port,
            ONLINE[1],
            kw.pop("seq", self.seq) & M32,
            kw.pop("ack", self.online_isn + 1 + self.read) & M32,
            flags,
            kw.pop("window", self.window),
            opts,
            payload,
            ip_id=self.ip_id,
            ttl=61,
            df=True,
        )


@dataclass
class Peer:
    """The target's side of one fake client tuple, learnt from what the reference sent."""

    isn: int
    rcv_nxt: int | None = None
    snd_nxt: int = 0
    ts: int | None = None  # the target's TS clock (None: no timestamps)
    ts_recent: int = 0
    synacked: bool = False


@dataclass
class World:
    cfg: SessionConfig
    flows: dict[tuple[int, int], Flow] = field(default_factory=dict)
    peers: dict[tuple[int, int], Peer] = field(default_factory=dict)
    now: float = 0.0
    log: list[str] = field(default_factory=list)

    def observe(self, wire_bytes: list[bytes]) -> None:
        for raw in wire_bytes:
            try:
                p = packet.parse_ip(raw)
            except DecodeError:
                continue
            key = (p.src, p.sport)
            peer = self.peers.get(key)
            if p.flags & SYN:
                if peer is None or peer.rcv_nxt != (p.seq + 1) & M32:
                    isn = (5_000_000 + p.sport * 7919 + len(self.peers) * 104729) & M32
                    peer = Peer(isn=isn, snd_nxt=(isn + 1) & M32)
                    self.peers[key] = peer
                peer.rcv_nxt = (p.seq + 1) & M32
            elif peer is None or peer.rcv_nxt is None:
                continue
            ts = packet.parse_options(p.options).timestamp
            if ts is not None:
                peer.ts_recent = ts[0]
            if not p.flags & SYN and p.seq == peer.rcv_nxt and (p.payload or p.flags & FIN):
                peer.rcv_nxt = (p.seq + len(p.payload) + (1 if p.flags & FIN else 0)) & M32


def record_of(p: TcpPacket, n: int) -> bytes:
    """The 64-byte intercept record of a response carrying ``n`` bytes of data."""
    full = TcpPacket(
        p.src, p.dst, p.sport, p.dport, p.seq, p.ack, p.flags, p.window, p.options, bytes(n)
    )
    return wire.encode_response_record(packet.build(full))


# -- the two sides -----------------------------------------------------------------------------


class Pair:
    """The reference table and the table under test, fed the same inputs."""

    def __init__(self, cfg: SessionConfig, make_test: Any) -> None:
        self.ref = SessionTable(cfg)
        self.dut = make_test(cfg)
        self.sendbuf = SendBuffer(nbytes=1 << 16, max_packets=8)  # small: drains loop
        self.step = 0

    def client(self, raws: list[bytes], batch: bool) -> None:
        ref_errors = 0
        for raw in raws:
            try:
                pkt = packet.parse_ip(raw)
            except DecodeError:
                ref_errors += 1
                continue
            self.ref.receive_client(pkt, self.now)
        if batch:
            lengths = array("I", map(len, raws))
            offsets = array("I", [sum(lengths[:i]) for i in range(len(raws))])
            errors = self.dut.receive_client_ips(
                b"".join(raws), offsets, lengths, len(raws), self.now
            )
        else:
            errors = 0
            for raw in raws:
                try:
                    pkt = packet.parse_ip(raw)
                except DecodeError:
                    errors += 1
                    continue
                self.dut.receive_client(pkt, self.now)
        assert errors == ref_errors, "client packets that do not parse"

    def responses(self, records: list[bytes], batch: bool) -> None:
        bad = 0
        for rec in records:
            try:
                pkt = wire.decode_response_record(rec)
            except DecodeError:
                bad += 1
                continue
            self.ref.receive_response(pkt, self.now)
        if bad:
            self.ref.counters["response_decode_errors"] += bad
        if batch:
            blob = b"".join(records)
            assert self.dut.receive_records(blob, self.now) == len(blob)
        else:
            for rec in records:
                try:
                    pkt = wire.decode_response_record(rec)
                except DecodeError:
                    self.dut.counters["response_decode_errors"] += 1
                    continue
                self.dut.receive_response(pkt, self.now)

    def drain(self, batch: bool) -> list[bytes]:
        routes, out = self.ref.drain()
        if batch:
            got_routes: list[Any] = []
            got: list[bytes] = []
            while True:
                r, n = self.dut.drain_into(self.sendbuf)
                got_routes += r
                got += self.sendbuf.packets(n)
                if not n:
                    break
        else:
            got_routes, got = self.dut.drain()
        assert [tuple(r) for r in got_routes] == [tuple(r) for r in routes], "drain: routes"
        for i, (a, b) in enumerate(zip(out, got, strict=False)):
            assert b == a, (
                f"drain: packet {i} of {len(out)}\n ref {describe(a)}\n got {describe(b)}"
            )
        assert len(got) == len(out), f"drain: {len(got)} packets, the reference {len(out)}"
        return list(out)

    def compare(self) -> None:
        ref, dut = self.ref, self.dut
        assert _counters(dut.counters) == _counters(ref.counters), "counters"
        assert (dut.active, dut.unsend, dut.lingering) == (ref.active, ref.unsend, ref.lingering)
        assert dut.held_bytes == ref.held_bytes, "held_bytes"
        assert dut.get_timer() == ref.get_timer(), "get_timer"

    now = 0.0


SHELL_KEYS = {"response_decode_errors"}
"""Counted by whoever decodes the records: the harness in per-packet steps (the compiled
table's ``counters`` is a snapshot that takes no increments), the table in batch steps."""


def _counters(c: Counter) -> dict[str, int]:
    return {
        str(getattr(k, "name", k)): int(v) for k, v in c.items() if v and str(k) not in SHELL_KEYS
    }


def describe(raw: bytes) -> str:
    try:
        p = packet.parse_ip(raw)
    except DecodeError as exc:
        return f"unparsable ({exc}): {raw.hex()}"
    return (
        f"{packet.ip_to_str(p.src)}:{p.sport} > {packet.ip_to_str(p.dst)}:{p.dport} "
        f"flags={p.flags:#x} seq={p.seq} ack={p.ack} win={p.window} len={len(p.payload)} "
        f"opts={p.options.hex()} id={p.ip_id} ttl={p.ttl}"
    )


# -- the steps -----------------------------------------------------------------------------


PAYLOADS = st.sampled_from([1, 10, 100, 536, 1000, 1460, 1461, 3000])
CLOCK = st.sampled_from([0.0, 0.0005, 0.002, 0.01, 0.05, 0.2, 0.5, 1.0, 3.0, 7.0, 61.0])


def client_packets(data: st.DataObject, w: World) -> tuple[list[bytes], str]:
    """One step of the client side: mostly valid TCP from the model, sometimes mutated."""
    kind = data.draw(
        st.sampled_from(
            [
                "syn",
                "syn",
                "ack",
                "data",
                "data",
                "data",
                "fin",
                "rst",
                "adopt",
                "reuse",
                "dup",
                "release",
                "mangle",
            ]
        )
    )
    slot = data.draw(st.integers(0, 2))
    key = (CLIENTS[slot], 40000 + slot)
    flow = w.flows.get(key)
    if kind in ("syn", "reuse", "adopt") or flow is None:
        isn = data.draw(st.integers(0, M32))
        flow = Flow(
            ip=key[0],
            port=key[1],
            isn=isn,
            seq=(isn + 1) & M32,
            online_isn=data.draw(st.integers(0, M32)),
            ts=data.draw(st.sampled_from([None, 100, 0xFFFFFFF0])),
            wscale=data.draw(st.sampled_from([None, 0, 7, 14])),
            window=data.draw(st.sampled_from([0, 1, 502, 65535])),
        )
        w.flows[key] = flow
        if kind == "adopt":
            size = data.draw(PAYLOADS)
            p = flow.pkt(PSH | ACK, bytes(size))
            flow.seq = (flow.seq + size) & M32
            return [packet.build(p)], f"adopt {slot} len={size}"
        opts = packet.build_options(
            mss=data.draw(st.sampled_from([536, 1460])),
            sack_permitted=True,
            timestamp=(flow.ts, 0) if flow.ts is not None else None,
            wscale=flow.wscale,
        )
        flow.synced = True
        p = flow.pkt(SYN, options=opts, seq=flow.isn, ack=0, window=64240)
        return [packet.build(p)], f"syn {slot} isn={flow.isn}"
    if kind == "ack":
        flow.read += data.draw(st.sampled_from([0, 0, 1, 100, 5000]))
        return [packet.build(flow.pkt(ACK))], f"ack {slot} read={flow.read}"
    if kind == "data":
        size = data.draw(PAYLOADS)
        p = packet.build(flow.pkt(PSH | ACK, bytes([slot + 1]) * size))
        flow.seq = (flow.seq + size) & M32
        fate = data.draw(st.sampled_from(["send", "send", "send", "lose", "hold"]))
        if fate == "lose":
            return [], f"data {slot} len={size} lost"
        if fate == "hold":
            flow.held.append(p)
            return [], f"data {slot} len={size} held"
        return [p], f"data {slot} len={size}"
    if kind == "fin":
        p = flow.pkt(FIN | ACK)
        flow.seq = (flow.seq + 1) & M32
        return [packet.build(p)], f"fin {slot}"
    if kind == "rst":
        return [packet.build(flow.pkt(RST | ACK))], f"rst {slot}"
    if kind == "dup":
        p = flow.pkt(PSH | ACK, b"d" * 10, seq=(flow.seq - 10) & M32)
        return [packet.build(p)] * 2, f"dup {slot}"
    if kind == "release":
        held, flow.held = flow.held, []
        if data.draw(st.booleans()):
            held.reverse()
        return held, f"release {slot} {len(held)} held"
    # mangle: a field or a byte of a valid packet changed
    raw = bytearray(packet.build(flow.pkt(PSH | ACK, b"m" * 20)))
    where = data.draw(st.integers(0, len(raw) - 1))
    raw[where] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    return [bytes(raw)], f"mangle {slot} byte {where}"


def response_records(data: st.DataObject, w: World) -> tuple[list[bytes], str]:
    """One step of the target side: an answer to what the reference sent, sometimes off."""
    live = sorted(k for k, p in w.peers.items() if p.rcv_nxt is not None)
    if not live:
        return [], "no response (nothing sent yet)"
    key = data.draw(st.sampled_from(live))
    peer = w.peers[key]
    kind = data.draw(
        st.sampled_from(
            ["synack", "ack", "ack", "zero", "data", "data", "fin", "rst", "junk", "ts2"]
        )
    )
    if not peer.synacked and kind not in ("rst", "junk"):
        kind = "synack"

    def pkt(flags: int, seq: int, ack: int, window: int, opts: bytes | None = None) -> TcpPacket:
        if opts is None:
            opts = b""
            if peer.ts is not None:
                peer.ts = (peer.ts + 1) & M32
                opts = packet.build_options(timestamp=(peer.ts, peer.ts_recent))
        return TcpPacket(
            TARGET[0], key[0], TARGET[1], key[1], seq & M32, ack & M32, flags, window, opts
        )

    rcv = peer.rcv_nxt or 0
    if kind == "synack":
        peer.ts = data.draw(st.sampled_from([None, 9000]))
        wscale = data.draw(st.sampled_from([None, 0, 2, 7, 14]))
        opts = packet.build_options(
            mss=1460,
            sack_permitted=True,
            timestamp=(peer.ts, peer.ts_recent) if peer.ts is not None else None,
            wscale=wscale,
        )
        peer.synacked = True
        p = pkt(SYN | ACK, peer.isn, rcv, data.draw(st.sampled_from([0, 1000, 29200])), opts)
        recs = [record_of(p, 0)]
        return recs * data.draw(st.integers(1, 2)), f"synack {key[1]} ws={wscale}"
    if kind in ("ack", "zero"):
        window = 0 if kind == "zero" else data.draw(st.sampled_from([1, 512, 29200, 65535]))
        back = data.draw(st.sampled_from([0, 0, 0, 1, 100]))
        return [record_of(pkt(ACK, peer.snd_nxt, rcv - back, window), 0)], f"{kind} {key[1]}"
    if kind == "data":
        n = data.draw(st.sampled_from([1, 100, 1460, 3000]))
        p = pkt(PSH | ACK, peer.snd_nxt, rcv, 29200)
        peer.snd_nxt = (peer.snd_nxt + n) & M32
        return [record_of(p, n)], f"data {key[1]} n={n}"
    if kind == "fin":
        p = pkt(FIN | ACK, peer.snd_nxt, rcv, 29200)
        peer.snd_nxt = (peer.snd_nxt + 1) & M32
        return [record_of(p, 0)], f"fin {key[1]}"
    if kind == "rst":
        return [record_of(pkt(RST | ACK, peer.snd_nxt, rcv, 0, b""), 0)], f"rst {key[1]}"
    if kind == "ts2":  # two timestamp options: the first one counts (tcpseq.tsval)
        first, second = data.draw(st.integers(0, M32)), data.draw(st.integers(0, M32))
        opts = packet.build_options(timestamp=(first, peer.ts_recent))
        opts += packet.build_options(timestamp=(second, peer.ts_recent))
        return [record_of(pkt(ACK, peer.snd_nxt, rcv, 29200, opts), 0)], f"ts2 {key[1]}"
    rec = bytearray(record_of(pkt(ACK, peer.snd_nxt, rcv, 29200), 0))
    where = data.draw(st.integers(0, len(rec) - 1))
    rec[where] = data.draw(st.integers(0, 255))
    return [bytes(rec)], f"junk {key[1]} byte {where}"


def run(data: st.DataObject, make_test: Any, check: Any = None) -> None:
    """Random steps for both tables, compared after each (and ``check(pair)`` if given)."""
    cfg = SessionConfig(
        transfers=XFER,
        client_pool=data.draw(st.sampled_from([(), POOL])),
        replicas=data.draw(st.integers(1, 3)),
        fake_handshake=data.draw(st.booleans()),
        wait_response=data.draw(st.sampled_from([True, True, False])),
        reconnect=data.draw(st.booleans()),
        mss=data.draw(st.sampled_from([0, 536])) or SessionConfig().mss,
    )
    w = World(cfg)
    pair = Pair(cfg, make_test)
    pair.now = w.now = 1000.0
    steps = data.draw(st.integers(1, STEPS_MAX))
    log = w.log
    try:
        for _ in range(steps):
            batch = data.draw(st.booleans())
            what = data.draw(
                st.sampled_from(["client"] * 5 + ["response"] * 4 + ["clock"] * 2 + ["table"])
            )
            if what == "client":  # one capture batch: up to 3 steps of the clients
                raws = []
                for _ in range(data.draw(st.integers(1, 3))):
                    more, text = client_packets(data, w)
                    log.append(f"t={pair.now:.4f} client {text}")
                    raws += more
                pair.client(raws, batch)
            elif what == "response":  # one intercept read: up to 3 answers
                recs = []
                for _ in range(data.draw(st.integers(1, 3))):
                    more, text = response_records(data, w)
                    log.append(f"t={pair.now:.4f} response {text}")
                    recs += more
                pair.responses(recs, batch)
            elif what == "clock":
                timer = pair.ref.get_timer()
                if timer is not None and data.draw(st.booleans()):
                    pair.now = max(pair.now, timer)
                else:
                    pair.now += data.draw(CLOCK)
                log.append(f"t={pair.now:.4f} timers")
                pair.ref.handle_timer(pair.now)
                pair.dut.handle_timer(pair.now)
            else:
                event = data.draw(
                    st.sampled_from(
                        [
                            "route_down",
                            "route_up",
                            "end_input",
                            "shed",
                            "loss",
                            "refuse",
                            "accept",
                            "forget",
                            "expire",
                        ]
                    )
                )
                log.append(f"t={pair.now:.4f} table {event}")
                for t in (pair.ref, pair.dut):
                    _table_event(t, event, pair.now)
            w.observe(pair.drain(batch))
            pair.compare()
            if check is not None:
                check(pair)
    except AssertionError as exc:
        steps_text = "\n  ".join(log)
        raise AssertionError(f"{exc}\nafter steps:\n  {steps_text}\nconfig: {cfg}") from None


def _table_event(t: Any, event: str, now: float) -> None:
    if event in ("route_down", "route_up"):
        t.set_route_down(event == "route_down", now)
    elif event == "end_input":
        t.end_input(now)
    elif event == "shed":
        t.shed_half_open(now)
    elif event == "loss":
        t.note_capture_loss(now)
    elif event in ("refuse", "accept"):
        t.refuse_new = event == "refuse"
    elif event == "forget":
        t.forget_ended(now)
    else:
        t.expire_refused(now)


# -- the tests ---------------------------------------------------------------------------------


def _python_behind_the_adapter(cfg: SessionConfig) -> Any:
    return PyBatchTable(SessionTable(cfg))


@settings(settings.get_profile(PROFILE))
@given(st.data())
def test_python_engine_through_the_batch_adapter_matches_itself(data: st.DataObject) -> None:
    """The harness and the batch calls' specification: a Python table behind the adapter,
    fed by batch or per-packet calls, is the reference exactly."""
    run(data, _python_behind_the_adapter)


COMPILED, WHY_NOT = compiled_table_class()


@pytest.mark.skipif(COMPILED is None, reason=f"the compiled engine is not built: {WHY_NOT}")
@settings(settings.get_profile(PROFILE))
@given(st.data())
def test_compiled_engine_matches_the_python_engine(data: st.DataObject) -> None:
    run(data, lambda cfg: as_batch(COMPILED(cfg)))


@pytest.mark.skipif(COMPILED is None, reason=f"the compiled engine is not built: {WHY_NOT}")
@settings(settings.get_profile(PROFILE))
@given(st.data())
def test_compiled_engine_counting_in_a_shared_row_matches_the_python_engine(
    data: st.DataObject,
) -> None:
    """The compiled table counting straight into a worker's row of the shared counter block
    (no flush): after every step the row holds what flushing the reference's Counter into a
    row gives, slot for slot, and its seqlock is even (no call left it busy)."""
    block = CounterBlock.create(workers=1)
    ref_block = CounterBlock.create(workers=1)
    tables: list[Any] = []
    row = block.worker_row(0)

    def make(cfg: SessionConfig) -> Any:
        table = COMPILED(cfg)
        view = block.counting_row(row, table.counter_names)
        assert view is not None, "the compiled table's counters are not ENGINE_KEYS"
        table.attach_counters(view, ENGINE_FIRST)
        tables.append(table)
        return as_batch(table)

    def check(pair: Pair) -> None:
        ref_block.from_counter(row, pair.ref.counters)
        got = block.snapshot()["workers"][0]
        want = ref_block.snapshot()["workers"][0]
        for key in ENGINE_KEYS:
            if key not in SHELL_KEYS:
                slot = ALIASES.get(key, key)
                assert got[slot] == want[slot], f"counter row: {slot}"
        assert block.read()[row][0] % 2 == 0, "counter row: seqlock left odd"

    try:
        run(data, make, check)
    finally:
        for table in tables:
            table.close()
        for b in (block, ref_block):
            b.close()
            b.unlink()


def _two_ts_options_exchange(make_test: Any, batch: bool) -> None:
    """A session with timestamps; the target's ACK carries two TS options: the data sent
    next echoes the first one's TSval (tcpseq.tsval), on both sides."""
    cfg = SessionConfig(transfers=XFER)
    pair = Pair(cfg, make_test)
    pair.now = 1000.0
    w = World(cfg)
    flow = Flow(ip=CLIENTS[0], port=40000, isn=1000, seq=1001, online_isn=7000, ts=100)
    opts = packet.build_options(mss=1460, sack_permitted=True, timestamp=(100, 0), wscale=7)
    flow.ts = 101
    pair.client([packet.build(flow.pkt(SYN, options=opts, seq=1000, ack=0))], batch)
    w.observe(pair.drain(batch))
    (key,) = w.peers
    peer = w.peers[key]
    synack_opts = packet.build_options(
        mss=1460, sack_permitted=True, timestamp=(9000, peer.ts_recent), wscale=7
    )
    synack = TcpPacket(
        TARGET[0], key[0], TARGET[1], key[1], peer.isn, peer.rcv_nxt or 0, SYN | ACK,
        29200, synack_opts,
    )  # fmt: skip
    pair.responses([record_of(synack, 0)], batch)
    w.observe(pair.drain(batch))
    pair.client([packet.build(flow.pkt(ACK))], batch)
    w.observe(pair.drain(batch))
    two = packet.build_options(timestamp=(9001, 0)) + packet.build_options(timestamp=(9002, 0))
    ack = TcpPacket(
        TARGET[0], key[0], TARGET[1], key[1], peer.snd_nxt, peer.rcv_nxt or 0, ACK, 29200, two
    )
    pair.responses([record_of(ack, 0)], batch)
    w.observe(pair.drain(batch))
    pair.client([packet.build(flow.pkt(PSH | ACK, b"x" * 10))], batch)
    (sent,) = pair.drain(batch)
    assert packet.parse_options(packet.parse_ip(sent).options).timestamp[1] == 9001
    pair.compare()


@pytest.mark.parametrize("batch", [False, True])
def test_two_timestamp_options_in_a_response_python(batch: bool) -> None:
    _two_ts_options_exchange(_python_behind_the_adapter, batch)


@pytest.mark.skipif(COMPILED is None, reason=f"the compiled engine is not built: {WHY_NOT}")
@pytest.mark.parametrize("batch", [False, True])
def test_two_timestamp_options_in_a_response(batch: bool) -> None:
    _two_ts_options_exchange(lambda cfg: as_batch(COMPILED(cfg)), batch)


def test_the_long_profile_runs_at_least_5000_examples() -> None:
    assert settings.get_profile("engine-diff-long").max_examples >= 5000
    assert settings.get_profile("engine-diff-ci").max_examples >= 200


def test_the_harness_sees_a_difference() -> None:
    """A table under test that drops one packet of a drain is caught (the test can fail)."""

    class Lossy(PyBatchTable):
        def drain(self) -> tuple[list[Any], list[bytes]]:
            routes, out = self.table.drain()
            return routes, out[1:]

        def drain_into(self, sendbuf: SendBuffer) -> tuple[list[Any], int]:
            routes, out = self.drain()
            for i, p in enumerate(out[: len(sendbuf.lengths)]):
                off = sum(sendbuf.lengths[:i])
                sendbuf.data[off : off + len(p)] = p
                sendbuf.lengths[i] = len(p)
            return routes, len(out)

    cfg = SessionConfig(transfers=XFER)
    pair = Pair(cfg, lambda c: Lossy(SessionTable(c)))
    flow = Flow(ip=CLIENTS[0], port=40000, isn=1000, seq=1001, online_isn=7000)
    syn = flow.pkt(SYN, options=packet.build_options(mss=1460), seq=1000, ack=0)
    pair.client([packet.build(syn)], batch=False)
    with pytest.raises(AssertionError, match="drain"):
        pair.drain(batch=False)


def test_records_and_ips_packing() -> None:
    """record_of gives 64-byte records whose data_len is the response's, and the struct of a
    slot header is what the ring writes (a guard for the batch calls' buffers)."""
    p = TcpPacket(TARGET[0], POOL[0], TARGET[1], 40000, 1, 2, PSH | ACK, 100, b"")
    rec = record_of(p, 1234)
    assert len(rec) == wire.RESPONSE_RECORD_BYTES
    assert wire.decode_response_record(rec).data_len == 1234
    assert struct.calcsize("=IId") == 16
