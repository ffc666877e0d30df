"""intercept/sources/nfqueue.py's own netlink codec: queued-packet messages in, batch verdicts out.

Golden bytes are written out field by field from linux/netlink.h and
linux/netfilter/nfnetlink_queue.h (not produced by the code under test); the live behaviour
(drops, the pass list, delayed records) is tests/netns/test_intercept_smoke.py's.
"""

from __future__ import annotations

import struct

import pytest

from intercept.server import InterceptServer
from intercept.sources import nfqueue as nq


def _attr(atype: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), atype) + value
    return raw + b"\0" * (-len(raw) % 4)


def _packet_msg(pid: int, payload: bytes | None, extra: bytes = b"") -> bytes:
    # nfqnl_msg_packet_hdr: packet_id (be32), hw_protocol (be16), hook (u8), + pad
    attrs = _attr(1, struct.pack("!IHB", pid, 0x0800, 3) + b"\0") + extra
    if payload is not None:
        attrs += _attr(10, payload)
    body = struct.pack("!BBH", 2, 0, 7) + attrs
    return struct.pack("=IHHII", 16 + len(body), (3 << 8) | 0, 0, 0, 0) + body


def test_packet_messages_give_id_and_payload() -> None:
    ip = bytes(range(40))
    mark = _attr(3, struct.pack("!I", 5))  # NFQA_MARK, skipped
    odd = bytes(range(41))  # payload of odd length: attribute padding must be skipped
    buf = _packet_msg(17, ip, mark) + _packet_msg(18, odd) + _packet_msg(19, None)
    assert list(nq.parse_queue_messages(buf)) == [(17, ip), (18, odd), (19, None)]


def test_other_messages_and_truncated_tails_are_skipped() -> None:
    err = struct.pack("=IHHII", 36, 2, 0, 0, 0) + bytes(20)  # NLMSG_ERROR
    good = _packet_msg(5, b"\x45" + bytes(39))
    assert list(nq.parse_queue_messages(err + good)) == [(5, b"\x45" + bytes(39))]
    assert list(nq.parse_queue_messages(good[:-3])) == []
    assert list(nq.parse_queue_messages(b"")) == []
    bad_len = struct.pack("=IHHII", 4, 0x300, 0, 0, 0) + bytes(8)  # nlmsg_len < header
    assert list(nq.parse_queue_messages(bad_len)) == []


def test_verdict_batch_golden_bytes() -> None:
    msg = nq.verdict_batch_message(queue_num=258, verdict=nq.NF_DROP, last_id=0x01020304)
    expected = (
        struct.pack("=IHHII", 32, 0x0303, 1, 0, 0)  # len, NFNL_SUBSYS_QUEUE<<8|VERDICT_BATCH
        + bytes([0, 0, 1, 2])  # nfgenmsg: AF_UNSPEC, NFNETLINK_V0, res_id 258 big endian
        + struct.pack("=HH", 12, 2)  # NFQA_VERDICT_HDR
        + bytes([0, 0, 0, 0, 1, 2, 3, 4])  # verdict NF_DROP, id (both big endian)
    )
    assert msg == expected


class _FakeSock:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(bytes(data))
        return len(data)

    def sendmsg(self, buffers: list[bytes]) -> int:
        self.sent.append(b"".join(buffers))
        return sum(map(len, buffers))


def _ip(daddr: bytes) -> bytes:
    return b"\x45" + bytes(15) + daddr + bytes(20)


PARSERS = ["python", "fastio"]


def _parser(name: str):
    if name == "python":
        return nq._parse_datagrams_py
    return pytest.importorskip("engine.io._fastio").parse_nfqueue


@pytest.mark.parametrize("name", PARSERS)
def test_both_parsers_agree(name: str) -> None:
    ip = bytes(range(40))
    mark = _attr(3, struct.pack("!I", 5))
    err = struct.pack("=IHHII", 36, 2, 0, 0, 0) + bytes(20)
    datagrams = [
        _packet_msg(17, ip, mark) + _packet_msg(18, bytes(range(41))),
        err + _packet_msg(0xFFFFFFFE, None),
        _packet_msg(20, ip)[:-3],  # truncated: skipped
        b"",
    ]
    expected = [(17, ip), (18, bytes(range(41))), (0xFFFFFFFE, None)]
    assert _parser(name)(datagrams) == expected


@pytest.fixture(params=PARSERS)
def source(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> nq.NfqueueSource:
    monkeypatch.setattr(nq, "_parse_datagrams", _parser(request.param))
    # The codec and the batching without a kernel queue: the object is built by hand.
    src = nq.NfqueueSource.__new__(nq.NfqueueSource)
    src.counters = InterceptServer().counters
    src.queue_num = 4
    src.pass_ips = frozenset({bytes([198, 18, 1, 10])})
    src._sock = _FakeSock()
    received: list[bytes] = []
    src.receive = lambda pkts, now: received.extend(pkts)
    src.received = received  # type: ignore[attr-defined]
    return src


def _verdicts(sent: list[bytes]) -> list[tuple[int, int]]:
    out = []
    for datagram in sent:
        pos = 0
        while pos < len(datagram):
            mlen = struct.unpack_from("=I", datagram, pos)[0]
            out.append(struct.unpack_from("!II", datagram, pos + 24))
            pos += mlen
    return out


def test_one_drop_verdict_per_batch_of_responses(source: nq.NfqueueSource) -> None:
    resp = [_ip(bytes([198, 19, 0, i])) for i in range(5)]
    source.receive_messages([_packet_msg(100 + i, p) for i, p in enumerate(resp)], 1.0)
    assert _verdicts(source._sock.sent) == [(nq.NF_DROP, 104)]
    assert len(source._sock.sent) == 1
    assert source.received == resp  # type: ignore[attr-defined]


def test_pass_list_runs_get_their_own_accept(source: nq.NfqueueSource) -> None:
    fake, real = bytes([198, 19, 0, 1]), bytes([198, 18, 1, 10])
    daddrs = [fake, fake, real, real, fake, real]
    source.receive_messages([_packet_msg(10 + i, _ip(d)) for i, d in enumerate(daddrs)], 1.0)
    assert _verdicts(source._sock.sent) == [
        (nq.NF_DROP, 11),
        (nq.NF_ACCEPT, 13),
        (nq.NF_DROP, 14),
        (nq.NF_ACCEPT, 15),
    ]
    assert len(source._sock.sent) == 1  # one datagram carries all four
    assert source.counters["pass_accepted"] == 3
    assert source.received == [_ip(fake)] * 3  # type: ignore[attr-defined]


def test_without_a_pass_list_one_drop_covers_the_batch(source: nq.NfqueueSource) -> None:
    source.pass_ips = frozenset()
    fake, real = bytes([198, 19, 0, 1]), bytes([198, 18, 1, 10])
    source.receive_messages([_packet_msg(30, _ip(real)), _packet_msg(31, _ip(fake))], 1.0)
    assert _verdicts(source._sock.sent) == [(nq.NF_DROP, 31)]
    assert source.received == [_ip(real), _ip(fake)]  # type: ignore[attr-defined]


def test_a_message_without_payload_is_dropped_not_routed(source: nq.NfqueueSource) -> None:
    source.receive_messages([_packet_msg(7, None)], 1.0)
    assert _verdicts(source._sock.sent) == [(nq.NF_DROP, 7)]
    assert source.received == []  # type: ignore[attr-defined]
