"""The compiled FrameReader (engine/dataplane/frames.pxi) against its specification,
engine/io/channel.py RecordFeed (wire.FrameDecoder.feed_records, then receive_records): the
same hostile streams cut at the same read boundaries give the same record counts, the same
DecodeError (message included, and again on every later feed), the same ``frames`` and
``pending_bytes``, and tables with the same counters and the same packets out."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.codec import packet, wire
from engine.codec.packet import ACK, FIN, PSH, RST, SYN, TcpPacket
from engine.core.config import SessionConfig
from engine.core.rewrite import TransferEntry
from engine.errors import DecodeError
from engine.io.batch import SendBuffer
from engine.io.channel import RecordFeed
from tests.unit.engines import compiled
from tests.unit.link import ONLINE, TARGET

pytestmark = pytest.mark.skipif(compiled is None, reason="engine.dataplane is not compiled")

XFER = (TransferEntry(ONLINE[0], ONLINE[1], TARGET[0], TARGET[1]),)
CLIENT = packet.ip_from_str("198.19.1.10")
M32 = 0xFFFFFFFF


def _table() -> Any:
    assert compiled is not None
    table = compiled.Table(SessionConfig(transfers=XFER, fake_handshake=True))
    # Two flows whose first request is out (fake handshake: SYN then data), so records land.
    for port in (40000, 40001):
        for flags, seq, payload in ((SYN, 999, b""), (ACK | PSH, 1000, b"GET / HTTP/1.1\r\n\r\n")):
            p = TcpPacket(CLIENT, ONLINE[0], port, ONLINE[1], seq, 0 if flags == SYN else 7001,
                          flags, 65535, b"", payload)  # fmt: skip
            table.receive_client(packet.parse_ip(packet.build(p)), 1.0)
    return table


def _drained(table: Any) -> list[bytes]:
    buf, out = SendBuffer(nbytes=1 << 16, max_packets=64), []
    while True:
        _routes, n = table.drain_into(buf)
        if not n:
            return out
        out += buf.packets(n)


def _record(kind: int, port: int, ack: int, with_payload: bool, junk: bytes) -> bytes:
    size = wire.PAYLOAD_RECORD_BYTES if with_payload else wire.RESPONSE_RECORD_BYTES
    if kind == 0:
        return (junk * size)[:size] if junk else bytes(size)
    flags = (SYN | ACK, ACK, ACK | PSH, ACK | FIN, RST)[kind % 5]
    p = TcpPacket(TARGET[0], CLIENT, TARGET[1], port, 5000, ack, flags, 65535, b"",
                  b"x" * (kind * 7 % 30))  # fmt: skip
    rec = bytearray(wire.encode_response_record(packet.build(p), with_payload))
    for i, b in enumerate(junk[:3]):
        rec[(b * 7 + i) % size] ^= b  # some records do not decode
    return bytes(rec)


records_st = st.lists(
    st.tuples(
        st.integers(0, 5), st.sampled_from([40000, 40001, 40002]),
        st.integers(0, M32), st.binary(max_size=4),
    ),
    min_size=1, max_size=40,
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    recs=records_st,
    with_payload=st.booleans(),
    combined=st.booleans(),
    groups=st.lists(st.integers(1, 20), min_size=1, max_size=12),
    lie=st.one_of(st.none(), st.tuples(st.integers(0, 10_000), st.integers(0, 255))),
    cuts=st.lists(st.integers(1, 700), min_size=1, max_size=30),
)
def test_frame_reader_is_record_feed(recs, with_payload, combined, groups, lie, cuts):
    size = wire.PAYLOAD_RECORD_BYTES if with_payload else wire.RESPONSE_RECORD_BYTES
    records = [_record(k, port, ack, with_payload, junk) for k, port, ack, junk in recs]
    if combined:
        stream, at, gi = bytearray(), 0, 0
        limit = wire.max_records_per_frame(size)
        while at < len(records):
            k = min(groups[gi % len(groups)], limit)
            stream += wire.encode_frame(records[at : at + k])
            at, gi = at + k, gi + 1
    else:
        stream = bytearray(b"".join(records))
    stream += b"\x00\x05"[: len(cuts) % 3]  # a cut count at the end, now and then
    if lie is not None:
        stream[lie[0] % len(stream)] ^= lie[1]  # a frame count may lie now

    ref_table, dut_table = _table(), _table()
    ref = RecordFeed(size, combined, ref_table.receive_records)
    dut = dut_table.frame_reader(size, combined)
    read = bytearray(1024)  # one read buffer, overwritten by every read (as the channel's)
    pos, ci = 0, 0
    while pos < len(stream):
        n = min(cuts[ci % len(cuts)], len(stream) - pos, len(read))
        read[:n] = stream[pos : pos + n]
        pos, ci = pos + n, ci + 1
        got = want = None
        try:
            want = ref.feed(memoryview(read), n, 2.0)
        except DecodeError as exc:
            want = f"error: {exc}"
        try:
            got = dut.feed(read, n, 2.0)
        except DecodeError as exc:
            got = f"error: {exc}"
        read[:n] = b"\xa5" * n  # what the reader holds, it copied
        assert got == want
        assert dut.pending_bytes == ref.decoder.pending_bytes
        assert dut.frames == ref.decoder.frames
        if isinstance(got, str):
            with pytest.raises(DecodeError, match="stream offset"):
                dut.feed(b"\x00\x01", 2, 2.0)  # every later feed raises again
            break
    assert Counter(dut_table.counters) == Counter(ref_table.counters)
    assert _drained(dut_table) == _drained(ref_table)


def test_frame_reader_frames_across_reads_and_limits():
    assert compiled is not None
    table = _table()
    size = wire.RESPONSE_RECORD_BYTES
    rec = _record(2, 40000, 1019, False, b"")
    stream = wire.encode_frame([rec] * 3) + wire.encode_frame([rec])
    reader = table.frame_reader(size, True)
    assert (reader.record_bytes, reader.combined, reader.max_count) == (size, True, wire.COMB_MAX)
    # byte by byte: a frame is fed by the read that completes it
    fed = [reader.feed(stream[i : i + 1], 1, 2.0) for i in range(len(stream))]
    assert fed == [0] * (2 + 3 * size - 1) + [3] + [0] * (2 + size - 1) + [1]
    assert (reader.frames, reader.pending_bytes) == (2, 0)
    with pytest.raises(ValueError, match="bytes of a 2-byte buffer"):
        reader.feed(b"\x00\x01", 3, 2.0)
    with pytest.raises(ValueError, match="record_bytes must be positive"):
        table.frame_reader(0, True)
    # a count of 0 or past the limit: the message of wire.FrameDecoder, no record of the read
    before = Counter(table.counters)
    bad = wire.encode_frame([rec]) + b"\x00\x11" + rec * 17
    with pytest.raises(DecodeError, match=r"frame of 17 records \(allowed 1\.\.16\) at stream "
                       r"offset \+66"):  # fmt: skip
        reader.feed(bad, len(bad), 2.0)
    assert Counter(table.counters) == before
    assert reader.pending_bytes == len(bad)
