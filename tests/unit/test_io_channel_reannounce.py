"""engine/io/channel.py re-announcing (issue 10 item 1) against an in-process fake intercept."""

from __future__ import annotations

import selectors
import time

import pytest

from engine.codec import wire
from engine.io.channel import InterceptChannels, per_record
from tests.unit.test_io_channel import FakeIntercept, Route, pump

ROUTES = [Route(0xC6130100 + i, 40000 + i, 0xC6120203, 8080) for i in range(5)]
RECORDS = {wire.client_add(r.client_ip, r.client_port, r.target_ip, r.target_port) for r in ROUTES}
REC = wire.CLIENT_RECORD_BYTES


def records(buf: bytes) -> list[bytes]:
    assert buf[:REC] == wire.HANDSHAKE  # always the first record on a connection (spec §1.1)
    body = buf[REC:]
    return [body[i : i + REC] for i in range(0, len(body), REC)]


@pytest.fixture
def setup():
    icpt = FakeIntercept()
    sel = selectors.DefaultSelector()
    live = list(ROUTES)
    edges: list[bool] = []
    chans = InterceptChannels(
        [("127.0.0.1", icpt.port)],
        2,
        sel,
        per_record(lambda pkt, now: None),
        live_routes=lambda: live,
        on_route_down=lambda down, now: edges.append(down),
    )
    yield icpt, sel, chans, edges
    chans.close()
    icpt.close()
    sel.close()


def test_first_connect_announces_the_live_sessions_after_the_handshake(setup):
    icpt, sel, chans, edges = setup
    chans.start(time.monotonic())
    pump(sel, chans, icpt, lambda: chans.connected == 2 and len(icpt.conns) == 2)
    pump(sel, chans, icpt, lambda: all(len(b) >= REC for b in icpt.received.values()))
    # Sessions started before any intercept was reachable (counted route_unannounced) get
    # their route now, after the handshake record.
    got = [r for b in icpt.received.values() for r in records(bytes(b))]
    assert set(got) == RECORDS
    assert edges == []  # no intercept was ever lost


def test_intercept_restart_reannounces_every_live_session_and_reports_both_edges(setup):
    icpt, sel, chans, edges = setup
    chans.start(time.monotonic())
    pump(sel, chans, icpt, lambda: chans.connected == 2 and len(icpt.conns) == 2)
    before = chans.counters["sessions_reannounced"]
    for conn in icpt.conns:  # the intercept dies: every connection of it is gone
        conn.close()
    pump(sel, chans, icpt, lambda: chans.counters["channel_disconnects"] == 2)
    assert edges == [True]
    pump(sel, chans, icpt, lambda: chans.connected == 2 and len(icpt.conns) == 4)
    pump(sel, chans, icpt, lambda: edges == [True, False])
    pump(
        sel,
        chans,
        icpt,
        lambda: (
            sum(len(icpt.received[i]) for i in (2, 3)) >= 2 * REC + len(ROUTES) * REC
            and chans.counters["sessions_reannounced"] - before >= len(ROUTES)
        ),
    )
    new = [r for i in (2, 3) for r in records(bytes(icpt.received[i]))]
    assert set(new) == RECORDS  # every live route reached the new connections
    assert chans.counters["route_records_sent"] >= chans.counters["sessions_reannounced"]


def test_a_lost_connection_moves_its_routes_to_the_survivor_at_once(setup):
    icpt, sel, chans, edges = setup
    chans.start(time.monotonic())
    pump(sel, chans, icpt, lambda: chans.connected == 2 and len(icpt.conns) == 2)
    pump(sel, chans, icpt, lambda: sum(len(b) for b in icpt.received.values()) >= 7 * REC)
    sizes = {i: len(b) for i, b in icpt.received.items()}
    icpt.conns[0].close()
    pump(sel, chans, icpt, lambda: len(icpt.received[1]) >= sizes[1] + len(ROUTES) * REC)
    moved = records(bytes(icpt.received[1]))[(sizes[1] - REC) // REC :]
    assert set(moved) == RECORDS
    assert chans.connected == 1 and len(icpt.conns) == 2  # before the reconnect (0.5 s)
    assert edges == []  # the intercept stayed reachable
