"""The compiled session engine's targets of tests/fuzz/dataplane_asan.py (``ENGINE_TARGETS``).

Each target keeps two tables alive between inputs: the compiled ``engine.dataplane.engine
.Table`` (the sanitizer build) and the Python ``SessionTable`` behind engine/io/batch.py's
adapter (the specification of the batch calls).  Both are opened with a few clients that
completed a handshake and sent data, so most hostile input lands on live sessions; every
``RESET_EVERY`` inputs (and after a framing error) both are closed and opened again.

``records``: intercept response records (64-byte compat records and 192-byte records with
payload) answering the live sessions (SYN-ACK, ACKs, data, FIN, RST) plus the record of the
mutated captured packet, then byte-mutated; laid out as a framed stream (``!H count`` +
records) or a plain one, cut at random read boundaries and fed through wire.py's
``FrameDecoder.feed_records`` to ``receive_records`` (now and then with a partial record
left over, or an odd ``record_bytes``).  Both tables must consume the same bytes and count
the same records that do not decode.  Then both drain and their timers run.

``frames``: the same kind of stream, with counts made to lie, cut into reads that are each
a heap block of exactly their size, through the compiled ``Table.frame_reader`` and through
engine/io/channel.py's RecordFeed (wire.py's decoder, then ``receive_records``) into the
Python table: the same record counts or the same error per read, the same held bytes.

``client``: captured client IPv4 packets of the live flows (SYN, data with options, ACK,
FIN, RST) mutated (tests/fuzz/run_fuzz.py's mutations), with the mutated captured packet,
in one exact-size buffer with some offsets and lengths out of range, through
``receive_client_ips``; both tables must refuse the same number.  Then ``drain_into`` (a
small send buffer, so drains loop), SYN-ACK records for what was sent (so new flows reach
the established state) and timers at a moving clock.
"""

from __future__ import annotations

import random
from array import array
from typing import Any

from engine.codec import packet, wire
from engine.codec.packet import ACK, FIN, PSH, RST, SYN, TcpPacket
from engine.core.config import SessionConfig
from engine.core.rewrite import TransferEntry
from engine.core.table import SessionTable
from engine.errors import DecodeError
from engine.io.batch import PyBatchTable, SendBuffer
from tests.fuzz.responses_target import responses_target

ONLINE = (packet.ip_from_str("198.18.1.2"), 80)
TARGET = (packet.ip_from_str("198.18.2.3"), 8080)
CLIENTS = [packet.ip_from_str(f"198.18.1.{10 + i}") for i in range(4)]
XFER = (TransferEntry(ONLINE[0], ONLINE[1], TARGET[0], TARGET[1]),)
RESET_EVERY = 2048
MAX_LEN = 1600
M32 = 0xFFFFFFFF
OPTS = packet.build_options(mss=1460, sack_permitted=True, timestamp=(100, 0), wscale=7)
DATA_OPTS = packet.build_options(timestamp=(101, 5), sack=[(7, 9)])


def _mutate_bytes(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    from tests.fuzz.run_fuzz import _mutate

    return _mutate(rng, data, pool, MAX_LEN)


class Tables:
    """The compiled table and the Python reference, opened with live sessions."""

    def __init__(self, dataplane: Any, rng: random.Random) -> None:
        self.engine = dataplane.engine
        self.rng = rng
        self.sendbuf = SendBuffer(nbytes=1 << 16, max_packets=8)
        self.inputs = 0
        self.dut: Any = None
        self.open()

    def open(self) -> None:
        rng = self.rng
        if self.dut is not None:
            self.dut.close()
        cfg = SessionConfig(
            transfers=XFER,
            fake_handshake=rng.random() < 0.3,
            wait_response=rng.random() < 0.7,
            reconnect=rng.random() < 0.5,
        )
        self.dut = self.engine.Table(cfg)
        self.ref = PyBatchTable(SessionTable(cfg))
        self.now = 1000.0
        self.inputs = 0
        self.flows = [(ip, 40000 + k, rng.randrange(M32 + 1)) for k, ip in enumerate(CLIENTS)]
        self.sent: list[bytes] = []  # what the compiled table sent (the target's view)
        syns = [self.client_pkt(f, SYN, seq_off=-1, options=OPTS) for f in self.flows]
        self.client(syns)
        self.drain()
        self.respond_synacks()
        self.client([self.client_pkt(f, ACK | PSH, payload=b"GET / HTTP/1.1\r\n\r\n")
                     for f in self.flows])  # fmt: skip
        self.drain()

    def client_pkt(self, flow: tuple[int, int, int], flags: int, seq_off: int = 0,
                   payload: bytes = b"", options: bytes = b"") -> bytes:  # fmt: skip
        ip, port, isn = flow
        seq = (isn + 1 + seq_off) & M32
        p = TcpPacket(ip, ONLINE[0], port, ONLINE[1], seq, 7001 if flags != SYN else 0,
                      flags, 65535, options, payload)  # fmt: skip
        return packet.build(p)

    def client(self, raws: list[bytes], bad_spans: int = 0) -> None:
        """raws in one exact-size buffer through receive_client_ips on both tables."""
        rng = self.rng
        lengths = array("q", map(len, raws))
        offsets = array("q", [0] * len(raws))
        at = 0
        for i, n in enumerate(lengths):
            offsets[i] = at
            at += n
        buf = bytearray(b"".join(raws))
        for _ in range(bad_spans):
            if raws:
                j = rng.randrange(len(raws))
                offsets[j] = rng.choice((at, at - 1, -1, 2**40, rng.randrange(at + 1)))
                lengths[j] = rng.choice((0, 1, 20, 40, -1, 2**40, rng.randrange(at + 2)))
        got = self.dut.receive_client_ips(buf, offsets, lengths, len(raws), self.now)
        want = self.ref.receive_client_ips(buf, offsets, lengths, len(raws), self.now)
        assert got == want, f"receive_client_ips: compiled refused {got}, Python {want}"

    def records(self, blob: bytes, record_bytes: int) -> None:
        before = self.counts()
        got = self.dut.receive_records(blob, self.now, record_bytes)
        want = self.ref.receive_records(blob, self.now, record_bytes)
        assert got == want, f"receive_records: compiled consumed {got}, Python {want}"
        after = self.counts()
        assert after[0] - before[0] == after[1] - before[1], (
            f"records that do not decode: compiled {after[0] - before[0]}, "
            f"Python {after[1] - before[1]} (record_bytes {record_bytes})"
        )

    def counts(self) -> tuple[int, int]:
        key = "response_decode_errors"
        return self.dut.counters[key], self.ref.counters[key]

    def drain(self) -> None:
        """drain_into on both until empty; what the compiled table sent is kept."""
        for table, keep in ((self.dut, True), (self.ref, False)):
            while True:
                _routes, n = table.drain_into(self.sendbuf)
                if not n:
                    break
                if keep:
                    self.sent += self.sendbuf.packets(n)
        del self.sent[:-64]

    def timers(self) -> None:
        self.now += self.rng.choice((0.0, 0.001, 0.05, 0.5, 3.0, 70.0))
        for table in (self.dut, self.ref):
            when = table.get_timer()
            if when is not None and when <= self.now:
                table.handle_timer(self.now)
        if self.rng.random() < 0.02:
            for table in (self.dut, self.ref):
                table.note_capture_loss(self.now)

    def answers(self, limit: int = 8) -> list[TcpPacket]:
        """Responses of the target to what the compiled table sent (headers only)."""
        rng = self.rng
        out = []
        for raw in self.sent[-limit:]:
            try:
                p = packet.parse_ip(raw)
            except Exception:
                continue
            end = (p.seq + len(p.payload) + (1 if p.flags & (SYN | FIN) else 0)) & M32
            if p.flags & SYN:
                flags, opts = (
                    SYN | ACK,
                    packet.build_options(mss=1460, wscale=7, timestamp=(9000, 100)),
                )
            else:
                flags = rng.choice((ACK,) * 6 + (ACK | PSH,) * 3 + (ACK | FIN, RST, RST | ACK))
                opts = rng.choice((b"", packet.build_options(timestamp=(9001, 101))))
            out.append(TcpPacket(p.dst, p.src, p.dport, p.sport, rng.randrange(M32 + 1)
                                 if rng.random() < 0.1 else 5000, end, flags,
                                 rng.choice((0, 512, 65535)), opts,
                                 bytes(rng.choice((0, 0, 10, 100, 1400)))))  # fmt: skip
        return out

    def respond_synacks(self) -> None:
        recs = [wire.encode_response_record(packet.build(a)) for a in self.answers(16)
                if a.flags & SYN]  # fmt: skip
        if recs:
            self.records(b"".join(recs), wire.RESPONSE_RECORD_BYTES)
        self.sent.clear()

    def tick(self) -> None:
        self.inputs += 1
        if self.inputs >= RESET_EVERY:
            self.open()


_STATE: dict[str, Any] = {}


def _tables(dataplane: Any, rng: random.Random, name: str) -> Tables:
    t = _STATE.get(name)
    if t is None:
        t = _STATE[name] = Tables(dataplane, rng)
    t.tick()
    return t


def _mutate_record(rng: random.Random, rec: bytes) -> bytes:
    """Byte edits of a record that keep its size: header fields the decoder reads first."""
    buf = bytearray(rec)
    for _ in range(rng.choice((0, 1, 1, 2, 3, 6))):
        op = rng.randrange(6)
        if op == 0:
            buf[0] = rng.choice((0x45, 0x46, 0x4F, 0x44, 0x40, 0x55, 0x00, rng.randrange(256)))
        elif op == 1:
            buf[32] = rng.choice((0x50, 0x00, 0x40, 0xB0, 0xF0, 0x60, rng.randrange(256)))
        elif op == 2:
            buf[2:4] = rng.choice((0, 20, 40, 59, 60, 188, 189, 0xFFFF,
                                   rng.randrange(65536))).to_bytes(2, "big")  # fmt: skip
        elif op == 3:
            buf[9] = rng.choice((6, 6, 17, 0, rng.randrange(256)))
        elif op == 4:
            at = rng.randrange(40, min(len(buf), 64))
            buf[at] = rng.choice((0, 1, 2, 3, 4, 5, 8, 10, 34, 40, 255, rng.randrange(256)))
        else:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    return bytes(buf)


def records_target(dataplane: Any, rng: random.Random, data: bytes) -> None:
    t = _tables(dataplane, rng, "records")
    if t.dut.active < 2:
        t.open()  # the records have ended the sessions: new ones, so records keep landing
    if rng.random() < 0.3:
        t.client([t.client_pkt(rng.choice(t.flows), ACK | PSH, seq_off=18, payload=b"y" * 30)])
    with_payload = rng.random() < 0.3
    size = wire.PAYLOAD_RECORD_BYTES if with_payload else wire.RESPONSE_RECORD_BYTES
    recs = _mutated_records(t, rng, data, size)
    combined = rng.random() < 0.7
    dec = wire.FrameDecoder(size, combined=combined)
    stream = _framed(rng, recs, size, combined)
    if rng.random() < 0.1 and stream:
        stream[rng.randrange(len(stream))] ^= 1 << rng.randrange(8)  # a count may lie
    pos = 0
    while pos < len(stream):
        cut = min(len(stream), pos + rng.choice((1, 7, 64, 66, 130, 1000, len(stream))))
        try:
            blob = dec.feed_records(bytes(stream[pos:cut]))
        except DecodeError:
            break  # the worker closes the channel: what came before was fed
        pos = cut
        if rng.random() < 0.1:
            blob += bytes(rng.randrange(1, size))  # a partial record: not consumed
        record_bytes = size
        if rng.random() < 0.03:
            record_bytes = rng.choice((1, 20, 63, 65, 128, 191, 193, 256))
        t.records(blob, record_bytes)
    t.drain()
    t.timers()


def _mutated_records(t: Tables, rng: random.Random, data: bytes, size: int) -> list[bytes]:
    """Records of ``size`` bytes answering the live sessions, plus the mutated packet's (when
    it makes one) or a random one, each mutated, in random order."""
    with_payload = size == wire.PAYLOAD_RECORD_BYTES
    recs = [wire.encode_response_record(packet.build(a), with_payload)
            for a in t.answers(rng.randrange(1, 8))]  # fmt: skip
    try:
        recs.append(wire.encode_response_record(data, with_payload))
    except Exception:
        pass  # a captured packet too broken to make a record of: the others go
    if not recs or rng.random() < 0.2:
        recs.append(bytes(rng.randrange(256) for _ in range(size)))
    recs = [_mutate_record(rng, r) for r in recs]
    rng.shuffle(recs)
    return recs


def _framed(rng: random.Random, recs: list[bytes], size: int, combined: bool) -> bytearray:
    """The records as an intercept connection sends them: in frames of a random count
    (combined) or back to back."""
    if not combined:
        return bytearray(b"".join(recs))
    stream = bytearray()
    at, limit = 0, wire.max_records_per_frame(size)
    while at < len(recs):
        k = rng.randrange(1, limit + 1)
        stream += wire.encode_frame(recs[at : at + k])
        at += k
    return stream


def _hostile_stream(t: Tables, rng: random.Random, data: bytes, size: int,
                    combined: bool) -> bytearray:  # fmt: skip
    """Records answering the live sessions plus the mutated packet's, mutated, framed (or
    not), then maybe a lying byte: what an intercept connection could deliver."""
    stream = _framed(rng, _mutated_records(t, rng, data, size), size, combined)
    for _ in range(rng.choice((0, 0, 0, 1, 2))):
        at = rng.randrange(len(stream))
        stream[at] = rng.choice((0, 1, 0xFF, rng.randrange(256), stream[at] ^ 0x80))
    if rng.random() < 0.2:
        stream += bytes(rng.randrange(1, 3))  # a count cut at the end
    return stream


def frames_target(dataplane: Any, rng: random.Random, data: bytes) -> None:
    """A connection's reads through the compiled ``Table.frame_reader`` (frames.pxi) and
    through channel.py's RecordFeed into the Python table: per read the same record count
    or the same DecodeError, the same ``frames`` and ``pending_bytes``, the same records
    that do not decode.  Each read is a heap block of exactly its size (sometimes with
    ``n`` short of it), so a read past ``n`` or past the block is a report."""
    import numpy as np

    from engine.io.channel import RecordFeed

    t = _tables(dataplane, rng, "frames")
    if t.dut.active < 2:
        t.open()
    size = wire.PAYLOAD_RECORD_BYTES if rng.random() < 0.3 else wire.RESPONSE_RECORD_BYTES
    combined = rng.random() < 0.8
    stream = _hostile_stream(t, rng, data, size, combined)
    dut = t.dut.frame_reader(size, combined)
    ref = RecordFeed(size, combined, t.ref.receive_records)
    pos = 0
    while pos < len(stream):
        cut = min(len(stream), pos + rng.choice((1, 2, 3, 7, 64, 66, 130, 1000, len(stream))))
        chunk = bytes(stream[pos:cut])
        pos = cut
        extra = rng.choice((0, 0, 0, 1, 5))
        block = np.empty(len(chunk) + extra, np.uint8)
        block[: len(chunk)] = np.frombuffer(chunk, np.uint8)
        if extra:
            block[len(chunk) :] = 0xA5  # past n: must not be read as data
        before = t.counts()
        try:
            want: int | str = ref.feed(chunk, len(chunk), t.now)
        except DecodeError as exc:
            want = f"error: {exc}"
        try:
            got: int | str = dut.feed(block, len(chunk), t.now)
        except DecodeError as exc:
            got = f"error: {exc}"
        after = t.counts()
        assert got == want, f"frame_reader: compiled {got!r}, RecordFeed {want!r}"
        assert (dut.frames, dut.pending_bytes) == (
            ref.decoder.frames,
            ref.decoder.pending_bytes,
        ), "frame_reader: frames/pending_bytes differ from wire.FrameDecoder's"
        assert after[0] - before[0] == after[1] - before[1], (
            f"records that do not decode: compiled {after[0] - before[0]}, "
            f"Python {after[1] - before[1]}"
        )
        if isinstance(got, str):
            break  # the worker closes the channel
    t.drain()
    t.timers()


def client_target(dataplane: Any, rng: random.Random, data: bytes) -> None:
    t = _tables(dataplane, rng, "client")
    templates = []
    for flow in rng.sample(t.flows, rng.randrange(1, len(t.flows) + 1)):
        kind = rng.randrange(6)
        if kind == 0:
            templates.append(t.client_pkt(flow, SYN, seq_off=-1, options=OPTS))
        elif kind == 1:
            templates.append(t.client_pkt(flow, ACK | PSH, seq_off=rng.choice((0, 18, 1000)),
                                          payload=bytes(rng.choice((1, 100, 1460, 3000))),
                                          options=DATA_OPTS))  # fmt: skip
        elif kind == 2:
            templates.append(t.client_pkt(flow, ACK, seq_off=18))
        elif kind == 3:
            templates.append(t.client_pkt(flow, ACK | FIN, seq_off=18))
        elif kind == 4:
            templates.append(t.client_pkt(flow, RST, seq_off=18))
        else:
            templates.append(t.client_pkt(flow, ACK | PSH, seq_off=18, payload=b"x" * 40,
                                          options=OPTS))  # fmt: skip
    raws = [_mutate_bytes(rng, r, templates) if rng.random() < 0.8 else r for r in templates]
    raws.append(data)
    rng.shuffle(raws)
    t.client(raws, bad_spans=rng.choice((0, 0, 0, 1, 2)))
    t.drain()
    if rng.random() < 0.5:
        recs = [wire.encode_response_record(packet.build(a)) for a in t.answers(4)]
        t.records(b"".join(recs), wire.RESPONSE_RECORD_BYTES)
        t.drain()
    if rng.random() < 0.05:  # new flows (a client port reused with a new ISN)
        k = rng.randrange(len(t.flows))
        ip, port, _isn = t.flows[k]
        t.flows[k] = (ip, port, rng.randrange(M32 + 1))
    t.timers()


# -- pcap: the compiled record walk of an offline replay --------------------------------------

PCAP_MAGICS = (0xA1B2C3D4, 0xA1B23C4D, 0xA1B2C3D4, 0x0A0D0D0A, 0x12345678)
PCAP_LINKTYPES = (1, 1, 1, 113, 276, 101, 12, 14, 228, 9)


def _pcap_frame(rng: random.Random, ip: bytes, linktype: int) -> bytes:
    etype = rng.choice((0x0800,) * 6 + (0x86DD, 0x0806, rng.randrange(1 << 16)))
    et = etype.to_bytes(2, "big")
    if linktype == 1:
        if rng.random() < 0.2:
            return b"\x02" * 12 + b"\x81\x00\x00\x07" + et + ip
        return b"\x02" * 12 + et + ip
    if linktype == 113:
        return bytes(14) + et + ip
    if linktype == 276:
        return et + bytes(18) + ip
    return ip


def pcap_file(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """A pcap file (either byte order, micro or nano seconds, any link type the reader
    knows and some it does not) whose records carry the mutated packet and others, with
    lying record headers now and then (caplen past the file or above the bound, a sub-second
    field of a second, wire length below caplen), cut at a random place sometimes."""
    import struct

    order = rng.choice("<>")
    magic = rng.choice(PCAP_MAGICS)
    nano = magic == 0xA1B23C4D
    linktype = rng.choice(PCAP_LINKTYPES)
    out = bytearray(struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype))
    if rng.random() < 0.02:
        out[4:6] = struct.pack(order + "H", rng.choice((1, 3)))
    ticks = 10**9 if nano else 10**6
    sec, frac = rng.randrange(1 << 31), 0
    ips = [data] + [rng.choice(pool) for _ in range(rng.randrange(0, 12))]
    rng.shuffle(ips)
    for ip in ips:
        frame = _pcap_frame(rng, ip, linktype)
        step = rng.choice((0, 1, 10, 1000, 10**5, ticks, 3 * ticks, -1000))
        frac += step
        sec, frac = sec + frac // ticks, frac % ticks
        caplen, wire, f = len(frame), len(frame) + rng.choice((0,) * 9 + (40,)), frac
        lie = rng.random()
        if lie < 0.02:
            caplen = rng.choice((262_145, 1 << 31, (1 << 32) - 1, caplen + 1 + rng.randrange(64)))
        elif lie < 0.04:
            f = rng.choice((ticks, ticks + 1, (1 << 32) - 1))
        elif lie < 0.06:
            wire = rng.randrange(caplen + 1)
        out += struct.pack(order + "IIII", sec & 0xFFFFFFFF, f, caplen, wire & 0xFFFFFFFF)
        out += frame
    if rng.random() < 0.2:
        del out[rng.randrange(len(out) + 1) :]
    return bytes(out)


class PcapReplays:
    """Two capture processes over their own rings: the compiled walk and the Python path;
    each input is a new file source on both."""

    def __init__(self) -> None:
        import atexit
        import logging

        from engine.io.logs import LOGGER_NAME
        from engine.io.ring import Ring
        from engine.proc.capture import CaptureProcess
        from testbed.blocks import Control, make_filter

        # A cut file's warning, once per input, is not what the run is about.
        logging.getLogger(LOGGER_NAME).setLevel(logging.ERROR)
        self.pool = [p for p in _seed_packets() if p and p[0] >> 4 == 4]
        self.filters = [make_filter(drop_pure_acks=False) for _ in range(2)]
        self.rings = [[Ring.create(4096) for _ in range(2)] for _ in range(2)]
        self.clock = 0.0
        self.procs = [
            CaptureProcess(
                [], rings, 576, control=Control(), clock=lambda: self.clock, compiled=compiled
            )
            for rings, compiled in zip(self.rings, (False, True), strict=True)
        ]
        atexit.register(self.close)

    def close(self) -> None:
        for rings in self.rings:
            for ring in rings:
                ring.close()

    def run(self, rng: random.Random, data: bytes) -> None:
        from io import BytesIO

        from engine.codec.pcapfile import PcapReader
        from engine.io.capture import PcapFileSource, ReplayPacer

        accelerate = rng.choice((1.0, 16.0, 1e6))
        idle = rng.choice((0.0, 0.0, 0.5))
        replays = rng.choice((1, 1, 2))
        steps = [(rng.choice((0.0, 0.0005, 0.01, 1.0)), rng.choice((0, 2, 32)))
                 for _ in range(rng.randrange(1, 12))] + [(1e7, 32)] * 3  # fmt: skip
        start = self.clock = self.clock + 1.0
        results = []
        for proc, flt, compiled in zip(self.procs, self.filters, (False, True), strict=True):

            def opener(path: str) -> PcapReader:
                return PcapReader(BytesIO(data), path)

            src = PcapFileSource(["f.pcap"], ReplayPacer(accelerate, idle), replays, flt,
                                 opener=opener, walkable=True)  # fmt: skip
            proc.sources = [src]
            proc._walkers = {}
            proc._paused_since = None
            if compiled:
                walker = proc._walker(src)
                assert walker is not None
                # A buffer of the file's size: a read past it meets a red zone.
                src.use_walker(walker, max(1, len(data) - 24))
            now = self.clock = start
            src.start(now)
            got: list[object] = []
            for step, pops in steps:
                now = self.clock = now + step
                for _ in range(16):
                    due = src.next_deadline()
                    if due is None or due > now:
                        break
                    proc._read(src, now)
                for ring in proc.rings:
                    got.append(ring.pop_packets(pops))
            for ring in proc.rings:
                got.append(ring.pop_packets(ring.capacity))
            got += [
                +src.counters,
                +flt.counters,
                +proc.counters,
                src.error,
                src.exhausted,
                [(r.dropped, r.oversize, r.loss_marks) for r in proc.rings],
            ]
            results.append(got)
            src.close()
        assert results[0] == results[1], "the compiled pcap walk and the Python path differ"


def pcap_target(dataplane: Any, rng: random.Random, data: bytes) -> None:
    """``pcap``: a pcap file around the mutated packet (``pcap_file``) replayed by a capture
    process through the compiled walk (engine/dataplane/capture.pyx ``PcapWalker``, its file
    buffer exactly the records' size) and by one through PcapFileSource's Python path, on
    the same clock: the same ring contents, drops, loss marks, counters and error."""
    replays = _STATE.get("pcap")
    if replays is None:
        replays = _STATE["pcap"] = PcapReplays()
    replays.run(rng, pcap_file(rng, data, replays.pool))


def _seed_packets() -> list[bytes]:
    from tests.fuzz.dataplane_asan import seeds

    return seeds()


TARGETS = {
    "responses": responses_target,
    "records": records_target,
    "client": client_target,
    "frames": frames_target,
    "pcap": pcap_target,
}
