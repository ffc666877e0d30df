"""Fuzz targets: one function per input surface, shared by the Hypothesis properties
(``test_fuzz_props.py``), the atheris harness (``run_fuzz.py``) and the CI loop
(``test_fuzz_ci.py``).

Theory of operation
-------------------
Every target takes one ``bytes`` input and either returns (the input was handled: decoded,
or refused with the module's documented error) or raises.  Any exception that escapes is a
bug: an undocumented exception type, or an ``AssertionError`` from an invariant checked here
(a decoder whose result depends on how the stream was split, a parsed field out of range, a
session engine that raised, counted an internal error, emitted a malformed packet or never
let its sessions end).  The input's leading bytes are parameters (link type, record size,
split points, configuration); the rest is the body, so a byte-level mutator (atheris,
Hypothesis' ``binary()``, the CI loop's random damage) explores both.

``SEEDS`` holds real inputs cut from the captures in the shared data directory (every frame,
the golden control streams, pcap heads); the mutators start from them so that they reach the
deep paths (a parsed packet, a routed record, an established session) and not only the
"too short" errors.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import math
import os
import random
import shutil
import struct
import tempfile
from collections.abc import Callable
from functools import lru_cache

from engine.codec import wire
from engine.codec.packet import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    TcpPacket,
    build,
    build_options,
    l2_offset,
    parse_ip,
    parse_options,
    set_timestamp,
    tcp_checksum,
)
from engine.codec.pcapfile import PCAPNG_MAGIC, PcapReader
from engine.core.config import SessionConfig
from engine.core.rewrite import TransferEntry
from engine.core.session import DropReason, drop_key
from engine.core.table import SessionTable
from engine.errors import ConfigError, DecodeError
from intercept.router import Router
from tests.paths import CONTROL_PCAP, ONLINE_HTTP_PCAP, TARGET_SIDE_PCAP

__all__ = ["INTERNAL_ERROR_KEY", "SEEDS", "TARGETS", "Reader", "seeds"]

M32 = 0xFFFFFFFF
INTERNAL_ERROR_KEY = drop_key(DropReason.INTERNAL_ERROR)
INTERCEPT_PORT = 36524  # the port of the control capture (its README)
LINKTYPES = (1, 113, 276, 101, 228, 12, 14)  # every link type l2_offset knows (+ 1 unknown)


class Reader:
    """Reads parameters off the front of a fuzz input; past the end everything is 0."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.data)

    def u8(self) -> int:
        if self.pos < len(self.data):
            self.pos += 1
            return self.data[self.pos - 1]
        return 0

    def uint(self, n: int) -> int:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return int.from_bytes(chunk.ljust(n, b"\0"), "big")

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk

    def choice(self, seq):
        return seq[self.u8() % len(seq)]


def _splits(body: bytes, seed: int) -> list[bytes]:
    """``body`` cut into chunks of 0..(about 2 records) bytes, deterministic in ``seed``."""
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(body):
        n = rng.choice((0, 1, 2, 13, 14, 15, 63, 64, 66, 130, 191, 192, 194, 1000))
        out.append(body[i : i + n])
        i += n
    return out


def _one_line(exc: Exception) -> None:
    text = str(exc)
    assert text and "\n" not in text, f"error message is not one line: {text!r}"


# --- (1) packet decoding -------------------------------------------------------------------------


def _check_packet(p: TcpPacket, buf: bytes) -> None:
    for name, value, hi in (
        ("src", p.src, M32), ("dst", p.dst, M32), ("sport", p.sport, 0xFFFF),
        ("dport", p.dport, 0xFFFF), ("seq", p.seq, M32), ("ack", p.ack, M32),
        ("flags", p.flags, 0xFF), ("window", p.window, 0xFFFF), ("ip_id", p.ip_id, 0xFFFF),
        ("ttl", p.ttl, 0xFF), ("tos", p.tos, 0xFF), ("urgent", p.urgent, 0xFFFF),
    ):  # fmt: skip
        assert 0 <= value <= hi, f"{name}={value}"
    assert len(p.options) <= 40 and len(p.options) % 4 == 0
    assert len(p.ip_options) <= 40 and len(p.ip_options) % 4 == 0
    assert 0 <= len(p.payload) <= p.data_len, (len(p.payload), p.data_len)
    # The parse is the same from a memoryview (the capture path hands those in).
    assert parse_ip(memoryview(buf)) == p
    opts = parse_options(p.options)
    if opts.wscale is not None:
        assert 0 <= opts.wscale <= 14
    stamped = set_timestamp(p.options, 0x1_0000_0001, 7)
    assert len(stamped) == len(p.options)
    # build() reproduces what parse_ip() kept; parsing it again gives the same packet.
    raw = build(p)
    q = parse_ip(raw)
    assert tcp_checksum(q.src, q.dst, raw[20 + len(p.ip_options) :]) == 0
    p.data_len = len(p.payload)
    assert q == p, (q, p)


def fuzz_packet(data: bytes) -> None:
    """l2_offset + parse_ip + parse_options on one captured frame of any link type."""
    r = Reader(data)
    linktype = r.choice((*LINKTYPES, 0))
    frame = r.rest()
    parse_options(frame[:60])  # best effort: never raises on any bytes
    try:
        off = l2_offset(frame, linktype)
    except DecodeError as e:
        _one_line(e)
        off = 0  # decode the frame as raw IP anyway: more parse_ip coverage
    assert 0 <= off <= 20
    buf = frame[off:]
    try:
        p = parse_ip(buf)
    except DecodeError as e:
        _one_line(e)
        return
    _check_packet(p, buf)


# --- (2) the wire protocol ------------------------------------------------------------------------


def fuzz_client_stream(data: bytes) -> None:
    """intercept's side: ClientStreamDecoder under any split, then Router.add_route."""
    r = Reader(data)
    seed = r.u8()
    body = r.rest()
    whole = wire.ClientStreamDecoder()
    try:
        expected, error = whole.feed(body), None
    except DecodeError as e:
        _one_line(e)
        expected, error = None, e
    split = wire.ClientStreamDecoder()
    got: list[wire.ClientRecord] = []
    raised = None
    try:
        for chunk in _splits(body, seed):
            got += split.feed(chunk)
    except DecodeError as e:
        raised = e
    if error is not None:
        assert raised is not None and str(raised) == str(error)
        try:  # a desynchronised decoder stays failed
            split.feed(b"")
        except DecodeError:
            pass
        else:
            raise AssertionError("decoder accepted input after a framing error")
        return
    assert raised is None and got == expected, (got, expected)
    assert split.pending_bytes == whole.pending_bytes
    if len(body) >= wire.CLIENT_RECORD_BYTES:
        assert split.version == body[6] << 8 | body[7]
    assert split.pending_bytes == (len(body) if split.version is None else (len(body) - 14) % 14)
    router = Router(max_routes_per_conn=1 + seed % 4)
    for i, rec in enumerate(expected):
        assert 0 <= rec.client_port <= 0xFFFF and 0 <= rec.type <= 0xFFFF
        if rec.type == wire.TYPE_CLIENT_ADD:
            router.add_route(
                rec.client_ip, rec.client_port, rec.target_ip, rec.target_port, i % 3, float(i)
            )
            assert (
                router.lookup(rec.client_ip, rec.client_port, rec.target_ip, rec.target_port)
                == i % 3
            )
    assert len(router) == sum(len(router.routes_of(c)) for c in range(3))


def _check_record_packet(p: TcpPacket, rec: bytes) -> None:
    assert len(p.options) <= wire.MAX_RESPONSE_TCP_HEADER_BYTES - 20
    assert p.data_len >= 0
    assert len(p.payload) <= wire.MAX_PAYLOAD_IN_RECORD_BYTES
    if len(rec) == wire.RESPONSE_RECORD_BYTES:
        assert p.payload == b""
    assert (p.sport, p.dport) == struct.unpack_from("!HH", rec, 20)
    parse_options(p.options)


def fuzz_response_stream(data: bytes) -> None:
    """tcpcopy's side: FrameDecoder / ResponseStreamDecoder / decode_response_record under
    any split, and intercept's Router.route on every record."""
    r = Reader(data)
    mode = r.u8()
    seed = r.u8()
    size = wire.PAYLOAD_RECORD_BYTES if mode & 1 else wire.RESPONSE_RECORD_BYTES
    combined = not mode & 2
    body = r.rest()
    whole = wire.FrameDecoder(size, combined)
    try:
        expected, error = whole.feed_frames(body), None
    except DecodeError as e:
        _one_line(e)
        expected, error = None, e
    framer = wire.FrameDecoder(size, combined)
    stream = wire.ResponseStreamDecoder(size, combined)
    got: list[list[bytes]] = []
    packets: list[TcpPacket] = []
    raised = None
    try:
        for chunk in _splits(body, seed):
            got += framer.feed_frames(chunk)
            packets += stream.feed(chunk)
    except DecodeError as e:
        raised = e
    if error is not None:
        # (The message's offset counts from the decoder's buffer, so it depends on the split.)
        assert raised is not None, "a bad frame count went unnoticed under one split"
        return
    assert raised is None
    assert got == expected, "frames depend on how the stream was split"
    assert framer.pending_bytes == whole.pending_bytes == stream.pending_bytes
    records = [rec for frame in expected for rec in frame]
    bad = 0
    decoded: list[TcpPacket] = []
    for frame in expected:
        assert 1 <= len(frame) <= wire.max_records_per_frame(size) or not combined
        for rec in frame:
            assert len(rec) == size
            try:
                p = wire.decode_response_record(rec)
            except DecodeError as e:
                _one_line(e)
                bad += 1
                continue
            _check_record_packet(p, rec)
            decoded.append(p)
    assert stream.bad_records == bad and packets == decoded
    # Re-framing the records gives the same bytes back (what intercept would have sent).
    if combined and expected:
        assert (
            b"".join(wire.encode_frame(f) for f in expected)
            == body[: len(body) - whole.pending_bytes]
        )
    # intercept's Router on the same records: every record of an added tuple is routed to
    # its connection; the rest are delayed (SYN/RST) or counted unrouted.
    router = Router(delay_s=1.0, max_delayed_records=8)
    added: dict[tuple[int, int, int, int], int] = {}
    now = 0.0
    for i, rec in enumerate(records):
        saddr, daddr, sport, dport = struct.unpack_from("!12xIIHH", rec)
        key = (daddr, dport, saddr, sport)
        if seed & (1 << (i % 8)):
            flushed = router.add_route(*key, i & 1, now)
            assert all(len(f) == size for f in flushed)
            added[key] = i & 1
        assert router.route(rec, now) == added.get(key)
        now += (seed % 5) * 0.3
        router.expire(now)
        assert 0 <= router.delayed_records <= 8
    s = router.stats
    assert s["routed"] + s["unrouted"] + s["delayed"] + s["delayed_dropped"] == len(records)


def fuzz_response_record(data: bytes) -> None:
    """intercept's encode_response_record on any captured packet, decoded back by tcpcopy."""
    r = Reader(data)
    with_payload = bool(r.u8() & 1)
    pkt = r.rest()
    try:
        rec = wire.encode_response_record(pkt, with_payload)
    except DecodeError as e:
        _one_line(e)
        return
    assert len(rec) == (wire.PAYLOAD_RECORD_BYTES if with_payload else wire.RESPONSE_RECORD_BYTES)
    p = wire.decode_response_record(rec)  # what intercept accepts, tcpcopy must decode
    _check_record_packet(p, rec)
    ihl = (pkt[0] & 15) * 4
    sport, dport, seq, ack = struct.unpack_from("!HHII", pkt, ihl)
    assert (p.sport, p.dport, p.seq, p.ack, p.flags) == (sport, dport, seq, ack, pkt[ihl + 13])


# --- (3) pcap files -------------------------------------------------------------------------------


def fuzz_pcap(data: bytes) -> None:
    """PcapReader over any file contents, each record through l2_offset + parse_ip."""
    try:
        reader = PcapReader(io.BytesIO(data), "fuzz.pcap")
    except DecodeError as e:
        _one_line(e)
        if len(data) >= 4 and int.from_bytes(data[:4], "little") == PCAPNG_MAGIC:
            assert "pcapng" in str(e)
        return
    assert int.from_bytes(data[:4], "little") != PCAPNG_MAGIC
    n = 0
    try:
        for ts, wire_len, frame in reader:
            n += 1
            assert math.isfinite(ts) and ts >= 0
            assert wire_len >= len(frame) and len(frame) <= 262_144
            try:
                parse_ip(frame[l2_offset(frame, reader.linktype) :])
            except DecodeError as e:
                _one_line(e)
    except DecodeError as e:
        _one_line(e)
    assert reader.records == n and reader.truncated_tail in (0, 1)


# --- (4) the session engine -----------------------------------------------------------------------

_ONLINE = (0xC6120102, 80)  # 198.18.1.2:80
_TARGET = (0xC6120203, 8080)  # 198.18.2.3:8080
_CLIENTS = ((0xC612010A, 51000), (0xC612010A, 51001), (0xC612010B, 40000), (0x7F000001, 1))
_POOL = (0xC613010A, 0xC613010B)
_DTS = (0.0, 0.0005, 0.001, 0.01, 0.04, 0.05, 0.2, 0.5, 1.0, 3.0, 6.0, 30.0, 61.0, 700.0)
_FLAG_SETS = (
    ACK, PSH | ACK, FIN | ACK, RST, RST | ACK, SYN, SYN | ACK, FIN | PSH | ACK, 0, FIN, 0x20,
    0xFF, ACK | 0xC0, SYN | FIN, SYN | RST,
)  # fmt: skip
_MAX_ACTIONS = 48
_QUIESCE_S = 3000.0  # > keepalive 720 s + fin_wait 60 s + linger 6 s + handshake retries


def _options(r: Reader, syn: bool) -> bytes:
    kind = r.u8() % 6
    if kind == 0:
        return b""
    if kind == 1:
        return build_options(timestamp=(r.uint(4), r.uint(4)))
    if kind == 2 and syn:
        return build_options(
            mss=r.uint(2), wscale=r.u8() % 15, sack_permitted=True, timestamp=(r.uint(4), 0)
        )
    if kind == 3:
        return build_options(mss=r.uint(2) % 2000)
    raw = r.take(r.u8() % 41)  # garbage options, padded like parse_ip would see them
    return raw + b"\0" * (-len(raw) % 4)


class _SessionSim:
    """A SessionTable fed from a fuzz input: scripted client packets, a loose target."""

    def __init__(self, r: Reader) -> None:
        self.r = r
        knobs = r.u8()
        self.wild = bool(knobs & 0x80)  # time may go backwards, data_len anything
        self.cfg = SessionConfig(
            transfers=(TransferEntry(_ONLINE[0], _ONLINE[1], _TARGET[0], _TARGET[1]),),
            client_pool=_POOL if knobs & 1 else (),
            replicas=1 + (knobs >> 1) % 3,
            wait_response=not knobs & 8,
            fake_handshake=not knobs & 16,
            mtu=(576, 1500, 9000)[(knobs >> 5) % 3],
            sample_percent=50 if knobs & 0x40 and knobs & 4 else 100,
            port_shift=3 if knobs & 4 else 0,
            rand_shift=17,
            max_sessions=0 if knobs & 2 else 5,
        )
        self.table = SessionTable(self.cfg)
        self.now = 1000.0
        self.isn = [r.uint(4) for _ in _CLIENTS]
        self.seq = [(i + 1) & M32 for i in self.isn]
        self.online_isn = r.uint(4)
        self.announced: set[tuple[int, int]] = set()
        # fake client tuple -> [target isn, target snd_nxt offset, last seq+len we sent]
        self.peers: dict[tuple[int, int], list[int]] = {}

    def client_packet(self) -> TcpPacket:
        r = self.r
        c = r.u8() % len(_CLIENTS)
        ip, port = _CLIENTS[c]
        how = r.u8()
        flags = _FLAG_SETS[how % len(_FLAG_SETS)]
        if flags & SYN:
            seq = self.isn[c] if how & 0x40 else r.uint(4)
        elif how & 0x80:
            seq = r.uint(4)
        else:
            seq = (self.seq[c] + (r.u8() - 128) * (1 if how & 0x40 else 97)) & M32
        size = r.choice((0, 0, 1, 10, 100, 536, 1448, 1460, 2000, 9000, 20000))
        payload = bytes([65 + c]) * size
        data_len = size
        if self.wild and how & 0x20:
            # Any 16-bit length, even one shorter than the payload (parse_ip never makes
            # those); more than 65535 cannot be declared by an IPv4 header at all.
            data_len = r.uint(2)
        elif how & 0x20:
            data_len = size + r.uint(2) % (65535 - 80 - size) if size < 65000 else size
            payload = payload[: r.u8()]  # a snaplen-truncated capture
        if not flags & SYN and seq == self.seq[c]:
            self.seq[c] = (seq + data_len + (1 if flags & FIN else 0)) & M32
        ack = (self.online_isn + 1 + r.uint(2) * (r.u8() % 3)) & M32
        opts = _options(r, bool(flags & SYN))
        return TcpPacket(
            ip, _ONLINE[0] if how % 7 else r.uint(4), port, _ONLINE[1] if how % 11 else r.u8(),
            seq, ack, flags, r.uint(2), opts, payload, data_len,
            ip_id=r.uint(2), ttl=r.u8(), tos=r.u8(), df=bool(how & 1), urgent=r.uint(2) * (how & 1),
        )  # fmt: skip

    def response(self) -> TcpPacket | None:
        r = self.r
        if not self.peers:
            return None
        key = r.choice(sorted(self.peers))
        peer = self.peers[key]
        how = r.u8()
        flags = _FLAG_SETS[how % len(_FLAG_SETS)]
        if how & 0x80:
            seq, ack = r.uint(4), r.uint(4)
        else:
            seq = (peer[0] + (0 if flags & SYN else 1) + peer[1]) & M32
            ack = (peer[2] + (r.u8() - 200 if how & 0x40 else 0)) & M32
        data_len = r.choice((0, 0, 0, 1, 100, 1448, 4000, 65000))
        if self.wild and how & 0x20:
            data_len = r.uint(2)
        if not how & 0x80 and not flags & (SYN | RST):
            peer[1] += data_len + (1 if flags & FIN else 0)
        return TcpPacket(
            _TARGET[0], key[0], _TARGET[1], key[1], seq, ack, flags,
            r.uint(2), _options(r, bool(flags & SYN)), b"", data_len,
        )  # fmt: skip

    def drain(self) -> None:
        routes, raws = self.table.drain()
        for route in routes:
            assert (route.target_ip, route.target_port) == _TARGET
            self.announced.add((route.client_ip, route.client_port))
        for raw in raws:
            p = parse_ip(raw)  # everything we send parses back, checksums valid
            # (wild mode may declare data_len < payload, which split_mtu trusts: no MTU check)
            assert self.wild or len(raw) <= self.cfg.mtu, (len(raw), self.cfg.mtu)
            assert tcp_checksum(p.src, p.dst, raw[20 + len(p.ip_options) :]) == 0
            assert (p.dst, p.dport) == _TARGET
            key = (p.src, p.sport)
            assert key in self.announced, "a packet went out before its route (design §6)"
            peer = self.peers.setdefault(key, [self.r.uint(4), 0, 0])
            end = (p.seq + len(p.payload) + (1 if p.flags & (SYN | FIN) else 0)) & M32
            if ((end - peer[2]) & M32) < 1 << 31 or not peer[2]:
                peer[2] = end

    def timers(self, until: float) -> None:
        t = self.table
        for _ in range(10_000):
            deadline = t.get_timer()
            if deadline is None or deadline > until:
                break
            self.now = max(self.now, deadline)
            t.handle_timer(self.now)
            self.drain()
        else:
            raise AssertionError(
                f"timer loop does not converge at {self.now} (get_timer={deadline})"
            )
        self.now = max(self.now, until)

    def run(self) -> None:
        r, t = self.r, self.table
        for _ in range(_MAX_ACTIONS):
            if not r.more():
                break
            op = r.u8() % 8
            if op < 3:
                t.receive_client(self.client_packet(), self.now)
            elif op < 6:
                p = self.response()
                if p is not None:
                    t.receive_response(p, self.now)
            elif op == 6 or not self.wild:
                self.timers(self.now + r.choice(_DTS))
            else:
                # wild: a timer call at an arbitrary time, even one in the past
                self.now = max(0.0, self.now + (r.u8() - 128) * 0.7)
                t.handle_timer(self.now)
            self.drain()
        if self.wild:
            return
        assert t.counters[INTERNAL_ERROR_KEY] == 0, dict(t.counters)
        # Left alone, every session ends: the idle, FIN-wait and linger timers bound them all.
        self.timers(self.now + _QUIESCE_S)
        assert t.active == 0, f"{t.active} sessions never ended"
        assert t.unsend == 0
        assert t.counters[INTERNAL_ERROR_KEY] == 0, dict(t.counters)


def fuzz_session(data: bytes) -> None:
    """SessionTable (and every TcpSession) fed an arbitrary scripted exchange.

    ``TcpSession.strict`` is left as in production (False): an exception inside a session
    is caught there and counted as an internal error, which the simulation asserts is 0.
    Set ``TcpSession.strict = True`` to see the traceback of a reproducer instead.
    """
    _SessionSim(Reader(data)).run()


# --- (5) flags and the TOML config ----------------------------------------------------------------

_VALUES = (
    "", " ", "0", "1", "-1", "2", "16", "17", "100", "101", "255", "256", "576", "1023", "1024",
    "65535", "65536", "4294967296", "1e3", "0x10", "nan", "inf", "-0", "1.5", "²", "٣",
    "198.18.2.4", "198.18.2.4:36524", "198.18.2.4:0", "010.1.1.1", "1.2.3", "1.2.3.4.5",
    "198.19.1.x", "198.19.1.1-198.19.1.9", "80-198.18.2.3:8080", "198.18.1.2:80-198.18.2.3:8080",
    "80-198.18.2.3:8080,", ",", "-x", "--", "eth0", "any", "lo", "a,b", "text", "json", "raw",
    "packet", "127.0.0.1:9100", ":9100", "tcp and src port 8080", "A-B", "1.1.1.1-2.2.2.2",
)  # fmt: skip


@lru_cache(maxsize=1)
def _scratch_dir() -> str:
    """A private directory for path-valued flags (fuzzed names never leave it)."""
    # tmpfs when there is one: rewriting a file on this machine's /tmp costs ~2 ms.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    d = tempfile.mkdtemp(prefix="tcpcopy-fuzz-", dir=shm)
    atexit.register(shutil.rmtree, d, True)
    with open(os.path.join(d, "text.pcap"), "w") as f:
        f.write("GET / HTTP/1.0\r\n\r\n")
    with open(ONLINE_HTTP_PCAP, "rb") as src, open(os.path.join(d, "real.pcap"), "wb") as f:
        f.write(src.read(4096))
    os.mkdir(os.path.join(d, "dir.pcap"))
    return d


def _value(r: Reader, path: bool) -> str:
    mode = r.u8()
    if mode < 96:
        text = _VALUES[mode % len(_VALUES)]
    else:
        text = r.take(r.u8() % 24).decode("utf-8", "surrogateescape")
        text = text.replace("\0", "")  # argv strings cannot hold NUL
    if path:
        # Fuzzed names stay inside the scratch directory (no /dev/stdin, no real files).
        # (No newline: a message quotes a path as given, and "\n" in a file name would be a
        # second stderr line; reported, not worth an escape in every message.)
        name = text.replace("/", "_").replace("..", "_").replace("\n", "_").replace("\r", "_")
        name = name or "missing"
        return os.path.join(_scratch_dir(), name if mode & 1 else r.choice(
            ("text.pcap", "real.pcap", "dir.pcap", "none/x.pcap", name + ".pcap")
        ))  # fmt: skip
    return text


_PATH_DESTS = {"interface", "pcap", "log", "pid_file", "summary_json", "config", "log_path"}


def _argv(r: Reader, parser: argparse.ArgumentParser, base: list[str]) -> list[str]:
    flags = [
        a for a in parser._actions
        if a.option_strings and a.dest not in ("help", "version")
    ]  # fmt: skip
    argv = list(base) if r.u8() & 1 else []
    for _ in range(r.u8() % 6):
        action = r.choice(flags)
        opt = r.choice(action.option_strings)
        if action.nargs == 0:
            argv.append(opt)
        elif r.u8() % 16 == 0:
            argv.append(opt)  # value missing (or the next flag taken as it)
        else:
            path = action.dest in _PATH_DESTS or (
                any(k in action.dest for k in ("file", "path", "json", "dir"))
            )  # a new path flag (e.g. --secret-file, opened while parsing) stays in scratch
            if action.dest in ("interface", "interfaces"):
                path = bool(r.u8() & 1)  # a device name or a pcap file
            value = _value(r, path)
            argv += [f"{opt}={value}"] if opt.startswith("--") and r.u8() & 1 else [opt, value]
    if r.u8() % 8 == 0:
        argv.append(r.choice(("--no-such-flag", "-Z", "stray", "-")))
    return argv


def _toml(r: Reader, parser: argparse.ArgumentParser) -> str:
    longs = sorted({o[2:] for a in parser._actions for o in a.option_strings if o[:2] == "--"})
    lines = []
    if r.u8() & 1:
        lines.append("[tcpcopy]")
    for _ in range(r.u8() % 5):
        key = r.choice([*longs, "no-such-key", "config", "help"])
        kind = r.u8() % 6
        if kind == 0:
            value = r.choice(("true", "false", "0", "-3", "1.5", "[1, 2]", '["a", "b"]', "{}"))
        elif kind == 1:
            value = r.take(r.u8() % 16).decode("utf-8", "replace")  # raw TOML, maybe broken
        else:
            value = '"' + _value(r, False).replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


@lru_cache(maxsize=1)
def _tcpcopy_parser_and_defaults() -> tuple[argparse.ArgumentParser, list, dict]:
    from engine.app import cli

    p = cli.build_parser()
    return p, [(a, a.default) for a in p._actions], dict(p._defaults)


def _tcpcopy_parser() -> argparse.ArgumentParser:
    """One parser for every input (building one costs ~1 ms, 10x the parse): the defaults
    a --config file set on it (``set_defaults``) are put back first."""
    p, actions, defaults = _tcpcopy_parser_and_defaults()
    for action, default in actions:
        action.default = default
    p._defaults = dict(defaults)
    return p


def fuzz_tcpcopy_cli(data: bytes) -> None:
    """engine.app.cli: argv (and a --config TOML) -> ReplayConfig, ConfigError or a usage error."""
    from engine.app import cli

    r = Reader(data)
    parser = _tcpcopy_parser()
    argv = _argv(r, parser, ["-x", "80-198.18.2.3:8080", "-s", "198.18.2.4"])
    if r.u8() % 4 == 0:
        conf = os.path.join(_scratch_dir(), f"conf-{os.getpid()}.toml")
        with open(conf, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(_toml(r, parser))
        argv += ["--config", conf]
    try:
        path = cli._config_path(argv)
        if path:
            cli._apply_config_file(parser, path)
        cfg = cli.build_config(parser.parse_args(argv))
    except (ConfigError, cli._UsageError) as e:
        _one_line(e)
        return
    assert cfg.session.replicas >= 1 and 1 <= cfg.connections <= 16
    assert 1 <= cfg.session.sample_percent <= 100 and cfg.intercepts


@lru_cache(maxsize=1)
def _intercept_parser_and_defaults() -> tuple[argparse.ArgumentParser, list, dict]:
    from intercept import cli

    p = cli._build_parser()
    return p, [(a, a.default) for a in p._actions], dict(p._defaults)


def fuzz_intercept_cli(data: bytes) -> None:
    """intercept.cli.parse_args: options, or exit status 2 with one line on stderr."""
    from intercept import cli

    # Building the parser (argparse + gettext + package metadata for --version) costs ~2 ms,
    # 10x the parse: reuse one, with the defaults a --config file set on it put back first,
    # and hand it to parse_args only for this call (the module is left as it was, so later
    # tests in the same process get fresh parsers).
    parser, actions, defaults = _intercept_parser_and_defaults()
    for action, default in actions:
        action.default = default
    parser._defaults = dict(defaults)
    r = Reader(data)
    argv = _argv(r, parser, ["-F", "tcp and src port 8080"])
    err = io.StringIO()
    build = cli._build_parser
    cli._build_parser = lambda: parser
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            opts = cli.parse_args(argv)
    except SystemExit as e:
        assert e.code == 2, (argv, e.code, err.getvalue())
        text = err.getvalue()  # one "\n"-terminated line (splitlines would also cut at \x1c)
        assert text.endswith("\n") and text.count("\n") == 1, (argv, text)
        return
    finally:
        cli._build_parser = build
    assert err.getvalue() == ""
    assert opts.mode in ("pcap", "nfqueue") and 1 <= opts.combine <= 16


TARGETS: dict[str, Callable[[bytes], None]] = {
    "packet": fuzz_packet,
    "client_stream": fuzz_client_stream,
    "response_stream": fuzz_response_stream,
    "response_record": fuzz_response_record,
    "pcap": fuzz_pcap,
    "session": fuzz_session,
    "tcpcopy_cli": fuzz_tcpcopy_cli,
    "intercept_cli": fuzz_intercept_cli,
}


# --- seeds from the real captures -----------------------------------------------------------------


def _frames(path) -> list[bytes]:
    with open(path, "rb") as f:
        return [frame for _, _, frame in PcapReader(f, str(path))]


def _control_streams() -> tuple[list[bytes], list[bytes]]:
    """The golden tcpcopy->intercept and intercept->tcpcopy byte streams, per connection."""
    up: dict[int, bytearray] = {}
    down: dict[int, bytearray] = {}
    for frame in _frames(CONTROL_PCAP):
        p = parse_ip(frame[l2_offset(frame, 1) :])
        if p.dport == INTERCEPT_PORT:
            up.setdefault(p.sport, bytearray()).extend(p.payload)
        elif p.sport == INTERCEPT_PORT:
            down.setdefault(p.dport, bytearray()).extend(p.payload)
    return [bytes(v) for v in up.values()], [bytes(v) for v in down.values()]


def _session_seeds(wanted: int = 12, tries: int = 1500) -> list[bytes]:
    """Scripts that complete a handshake ("conns"): rare in random bytes (~1 in 60), so
    they are searched once (deterministically, ~1 s) to give the mutators a head start."""
    rng = random.Random(7)
    out: list[bytes] = []
    for _ in range(tries):
        data = rng.randbytes(256)
        sim = _SessionSim(Reader(data))
        sim.run()
        if sim.table.counters["conns"]:
            out.append(data)
            if len(out) == wanted:
                break
    return out


@lru_cache(maxsize=1)
def seeds() -> dict[str, list[bytes]]:
    """Seed inputs per target (parameter bytes + a real body)."""
    online, target = _frames(ONLINE_HTTP_PCAP), _frames(TARGET_SIDE_PCAP)
    up, down = _control_streams()
    with open(ONLINE_HTTP_PCAP, "rb") as f:
        pcap = f.read()
    ip_packets = [fr[14:] for fr in online[:40] + target[:40]]
    nano = bytearray(pcap[:3000])
    nano[:4] = (0xA1B23C4D).to_bytes(4, "little")
    swapped = bytearray(pcap[:24])
    swapped[:4] = (0xA1B2C3D4).to_bytes(4, "big")
    records = [wire.encode_response_record(p) for p in ip_packets[:20]]
    return {
        "packet": [b"\x00" + fr for fr in online[:60] + target[:60]]
        + [b"\x03" + p for p in ip_packets[:20]],
        "client_stream": [bytes([i]) + s for i, s in enumerate(up)]
        + [b"\x07" + s[:100] for s in up],
        "response_stream": [bytes([0, i * 37]) + s[:3000] for i, s in enumerate(down)]
        + [b"\x02\x05" + b"".join(records)]
        + [b"\x03\x09" + b"".join(wire.encode_response_record(p, True) for p in ip_packets[:12])],
        "response_record": [b"\x00" + p for p in ip_packets[:30]]
        + [b"\x01" + p for p in ip_packets[30:60]],
        "pcap": [pcap[:2000], pcap[:5000], bytes(nano), bytes(swapped) + pcap[24:600],
                 PCAPNG_MAGIC.to_bytes(4, "little") + bytes(28), pcap[:23], pcap[:40]],
        "session": _session_seeds(),
        "tcpcopy_cli": [bytes([i, 3, i * 7, i * 11, 200, 5]) for i in range(24)],
        "intercept_cli": [bytes([i, 3, i * 7, i * 11, 200, 5]) for i in range(24)],
    }  # fmt: skip


SEEDS = seeds
