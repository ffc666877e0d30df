"""InterceptChannels.announce_batch == announce per route: the same CLIENT_ADD bytes on the
same connections (round-robin, spec §1.2) and the same counters, in one write per connection."""

from __future__ import annotations

import selectors
import time

from engine.codec import wire
from engine.io.channel import InterceptChannels, per_record
from tests.unit.test_io_channel import FakeIntercept, Route, pump


def _announce(batched: bool, n: int) -> tuple[list[bytes], dict[str, int]]:
    icpt = FakeIntercept()
    sel = selectors.DefaultSelector()
    chans = InterceptChannels([("127.0.0.1", icpt.port)], 2, sel, per_record(lambda pkt, now: None))
    try:
        chans.start(time.monotonic())
        pump(sel, chans, icpt, lambda: chans.connected == 2 and len(icpt.conns) == 2)
        routes = [Route(0xC6130100 + i, 40000 + i, 0xC6120203, 8080) for i in range(n)]
        if batched:
            assert chans.announce_batch(routes, time.monotonic()) == n
        else:
            for r in routes:
                assert chans.announce(r, time.monotonic())
        total = 14 * (2 + n)  # two handshakes, then the CLIENT_ADDs spread over both
        pump(sel, chans, icpt, lambda: sum(len(b) for b in icpt.received.values()) == total)
        # Connections in accept order; the bytes each got after its handshake.
        bodies = [bytes(icpt.received[i][14:]) for i in range(len(icpt.conns))]
        return bodies, {k: v for k, v in chans.counters.items() if k.startswith("route")}
    finally:
        chans.close()
        icpt.close()
        sel.close()


def test_batch_spreads_and_counts_like_single_announces() -> None:
    one_bodies, one_counts = _announce(False, 5)
    many_bodies, many_counts = _announce(True, 5)
    assert sorted(many_bodies) == sorted(one_bodies)
    assert sorted(len(b) // 14 for b in many_bodies) == [2, 3]
    assert (
        many_counts
        == one_counts
        == {
            "route_announced": 5,
            "route_records_sent": 5,
        }
    )
    records = sorted(b[i : i + 14] for b in many_bodies for i in range(0, len(b), 14))
    expected = sorted(
        wire.client_add(0xC6130100 + i, 40000 + i, 0xC6120203, 8080) for i in range(5)
    )
    assert records == expected


def test_batch_without_a_connection_counts_every_route_unannounced() -> None:
    sel = selectors.DefaultSelector()
    # Nothing listens on this port of the loopback: never connected.
    chans = InterceptChannels([("127.0.0.1", 9)], 2, sel, per_record(lambda pkt, now: None))
    try:
        routes = [Route(0xC6130100 + i, 40000 + i, 0xC6120203, 8080) for i in range(3)]
        assert chans.announce_batch(routes, time.monotonic()) == 0
        assert chans.counters["route_unannounced"] == 3
        assert chans.counters["route_announced"] == 0
    finally:
        chans.close()
        sel.close()
