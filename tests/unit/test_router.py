"""intercept/router.py: routing by the latest CLIENT_ADD, the delayed SYN/RST buffer (spec §1.5)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.codec.wire import ClientStreamDecoder, FrameDecoder, encode_response_record
from engine.errors import DecodeError
from intercept.fastroute import CompiledRouter, compiled_available
from intercept.router import Router as PyRouter
from intercept.router import route_key_c
from tests.unit.test_wire import control_streams, ip, make_packet

SYN, RST, ACK, PSH = 0x02, 0x04, 0x10, 0x08
CLIENT = ("198.19.1.10", 40000)
TARGET = ("198.18.2.3", 8080)
TUPLE = (ip(CLIENT[0]), CLIENT[1], ip(TARGET[0]), TARGET[1])


def response(
    flags: int,
    client=CLIENT,
    target=TARGET,
    seq: int = 1,
    with_payload: bool = False,
) -> bytes:
    """The record intercept builds for a target -> client packet."""
    pkt = make_packet(
        src=target[0], sport=target[1], dst=client[0], dport=client[1], flags=flags, seq=seq
    )
    return encode_response_record(pkt, with_payload)


@pytest.fixture(params=["python", "compiled"], scope="module")
def router_cls(request: pytest.FixtureRequest) -> type[PyRouter]:
    """Every test runs on the specification and on its compiled twin."""
    if request.param == "python":
        return PyRouter
    ok, why = compiled_available()
    if not ok:
        pytest.skip(why)
    return CompiledRouter


# --- the C route key (documentation of the QUIRK we do not copy) ------------------------------


def c_key_from_bytes(cip: str, cport: int, tip: str, tport: int, dnat: bool = False) -> int:
    """Spec §1.5's formula, with the NBO fields read as x86 (little-endian) integers."""
    (ci,) = struct.unpack("<I", ipaddress.IPv4Address(cip).packed)
    (ti,) = (0,) if dnat else struct.unpack("<I", ipaddress.IPv4Address(tip).packed)
    (cp,) = struct.unpack("<H", struct.pack("!H", cport))
    (tp,) = struct.unpack("<H", struct.pack("!H", tport))
    return ((cp << 16) + ci + cp + ti + (tp << 24) + (tp << 8) + tp) % 2**32


@pytest.mark.parametrize(
    "case",
    [
        ("62.135.200.7", 40000, "61.135.233.160", 8080),
        ("198.19.1.10", 40000, "198.18.2.3", 8080),
        ("255.255.255.255", 65535, "255.255.255.255", 65535),
        ("0.0.0.0", 0, "0.0.0.0", 0),
    ],
)
def test_route_key_c_matches_spec_formula(case):
    cip, cport, tip, tport = case
    ints = (ip(cip), cport, ip(tip), tport)
    assert route_key_c(*ints) == c_key_from_bytes(*case)
    assert route_key_c(*ints, dnat=True) == c_key_from_bytes(*case, dnat=True)
    assert 0 <= route_key_c(*ints) < 2**32


def test_c_key_collisions_do_not_mix_routes(router_cls):
    # Adding 1 to the first byte of the client ip and taking 1 from the first byte of the
    # target ip keeps C's LE-raw sum: two tuples, one 32-bit key.
    a = (ip("198.19.1.10"), 40000, ip("198.18.2.3"), 8080)
    b = (ip("199.19.1.10"), 40000, ip("197.18.2.3"), 8080)
    assert route_key_c(*a) == route_key_c(*b)
    router = router_cls()
    router.add_route(*a, conn="A", now=0)
    router.add_route(*b, conn="B", now=0)
    assert router.route(response(ACK, ("198.19.1.10", 40000), ("198.18.2.3", 8080)), 1) == "A"
    assert router.route(response(ACK, ("199.19.1.10", 40000), ("197.18.2.3", 8080)), 1) == "B"


# --- routing ----------------------------------------------------------------------------------


def test_latest_client_add_wins(router_cls):
    router = router_cls()
    assert router.add_route(*TUPLE, conn="A", now=0) == []
    assert router.route(response(ACK), 1) == "A"
    assert router.add_route(*TUPLE, conn="B", now=2) == []
    assert router.route(response(ACK), 3) == "B"
    assert router.routes_of("A") == [] and router.routes_of("B") == [TUPLE]
    assert router.add_route(*TUPLE, conn="B", now=4) == []  # a refresh, not a second route
    assert len(router) == 1 and router.routes_of("B") == [TUPLE]
    assert router.lookup(*TUPLE) == "B"
    assert router.stats["adds"] == 3 and router.stats["routed"] == 2
    assert router.remove_connection("A") == 0


def test_route_needs_the_exact_tuple(router_cls):
    router = router_cls()
    router.add_route(*TUPLE, conn="A", now=0)
    assert router.route(response(ACK, client=("198.19.1.10", 40001)), 1) is None
    assert router.route(response(ACK, client=("198.19.1.11", 40000)), 1) is None
    assert router.route(response(ACK, target=("198.18.2.3", 8081)), 1) is None
    assert router.route(response(ACK, target=("198.18.2.4", 8080)), 1) is None
    assert router.stats["unrouted"] == 4 and router.stats["routed"] == 0


def test_dnat_leaves_the_target_ip_out(router_cls):
    router = router_cls(dnat=True)
    router.add_route(*TUPLE, conn="A", now=0)
    assert router.route(response(ACK, target=("198.18.9.9", 8080)), 1) == "A"
    assert router.route(response(ACK, target=("198.18.9.9", 8081)), 1) is None
    assert router.lookup(TUPLE[0], TUPLE[1], 12345, TUPLE[3]) == "A"


def test_unrouted_non_syn_rst_dropped_and_counted(router_cls):
    router = router_cls()
    for flags in (ACK, ACK | PSH, ACK | 0x01):
        assert router.route(response(flags), 0) is None
    assert router.stats["unrouted"] == 3 and router.stats["delayed"] == 0
    assert router.add_route(*TUPLE, conn="A", now=1) == []


def test_delayed_syn_rst_flushed_in_order_on_add(router_cls):
    router = router_cls()
    synack1 = response(SYN | ACK, seq=1)
    rst = response(RST, seq=2)
    synack2 = response(SYN | ACK, seq=3, with_payload=True)
    data = response(ACK | PSH, seq=4)
    other = response(SYN | ACK, client=("198.19.1.10", 40001))
    assert router.route(synack1, 0.0) is None
    assert router.route(rst, 0.5) is None
    assert router.route(data, 0.6) is None  # not kept
    assert router.route(other, 0.7) is None
    assert router.route(synack2, 1.0) is None
    assert router.delayed_records == 4
    assert router.stats["delayed"] == 4 and router.stats["unrouted"] == 1
    assert router.add_route(*TUPLE, conn="A", now=2.0) == [synack1, rst, synack2]
    assert router.stats["delayed_flushed"] == 3 and router.delayed_records == 1
    assert router.add_route(*TUPLE, conn="B", now=3.0) == []  # flushed once only
    assert router.route(synack1, 4.0) == "B"  # now routed, not delayed
    assert router.add_route(TUPLE[0], 40001, TUPLE[2], TUPLE[3], conn="C", now=5.0) == [other]
    assert router.expire(100.0) == 0  # the flushed lists left nothing to expire
    assert router.stats["delayed_expired"] == 0


def test_delayed_list_lives_30s_from_its_creation(router_cls):
    router = router_cls()
    first, second = response(SYN | ACK, seq=1), response(RST, seq=2)
    router.route(first, 100.0)
    router.route(second, 120.0)  # joins the list created at 100
    assert router.expire(129.9) == 0 and router.delayed_records == 2
    assert router.expire(130.0) == 2
    assert router.delayed_records == 0 and router.stats["delayed_expired"] == 2
    assert router.add_route(*TUPLE, conn="A", now=130.1) == []


def test_expired_list_not_flushed_even_without_expire_call(router_cls):
    router = router_cls(delay_s=30.0)
    router.route(response(SYN | ACK), 0.0)
    assert router.add_route(*TUPLE, conn="A", now=30.0) == []
    assert router.stats["delayed_expired"] == 1 and router.delayed_records == 0
    assert router.expire(1000.0) == 0


def test_late_record_starts_a_fresh_list(router_cls):
    router = router_cls(delay_s=10.0)
    old, new = response(SYN | ACK, seq=1), response(SYN | ACK, seq=2)
    router.route(old, 0.0)
    router.route(new, 15.0)  # the list from t=0 is dead: `new` starts another
    assert router.stats["delayed_expired"] == 1
    assert router.expire(20.0) == 0  # the stale order entry of the dead list is skipped
    assert router.add_route(*TUPLE, conn="A", now=24.0) == [new]


def test_delay_buffer_bound(router_cls):
    router = router_cls(max_delayed_records=2)
    a = response(SYN | ACK, client=("198.19.1.1", 1000))
    b = response(SYN | ACK, client=("198.19.1.2", 1000))
    c = response(SYN | ACK, client=("198.19.1.3", 1000))
    router.route(a, 0.0)
    router.route(b, 10.0)
    router.route(c, 20.0)
    assert router.stats["delayed_dropped"] == 1 and router.delayed_records == 2
    router.route(c, 30.0)  # a's list expires to make room
    assert router.stats["delayed_expired"] == 1 and router.delayed_records == 2
    assert router.add_route(ip("198.19.1.3"), 1000, ip(TARGET[0]), 8080, "A", 31) == [c]


def test_remove_connection(router_cls):
    router = router_cls()
    other = (ip("198.19.1.11"), 40000, ip(TARGET[0]), 8080)
    router.add_route(*TUPLE, conn="A", now=0)
    router.add_route(*other, conn="A", now=0)
    router.add_route(ip("198.19.1.12"), 1, ip(TARGET[0]), 8080, conn="B", now=0)
    assert router.remove_connection("A") == 2
    assert router.route(response(ACK), 1) is None
    assert router.route(response(SYN | ACK), 1) is None  # delayed again, for a new add
    assert router.route(response(ACK, client=("198.19.1.12", 1)), 1) == "B"
    assert len(router) == 1 and router.routes_of("A") == []
    assert router.add_route(*TUPLE, conn="C", now=2) == [response(SYN | ACK)]


def test_moved_route_leaves_no_empty_connection_behind(router_cls):
    router = router_cls()
    router.add_route(*TUPLE, conn="A", now=0)
    router.add_route(*TUPLE, conn="B", now=1)
    assert router.remove_connection("A") == 0
    assert router.route(response(ACK), 2) == "B"


def test_per_connection_route_limit_evicts_least_recently_used(router_cls):
    router = router_cls(max_routes_per_conn=2)
    keys = [(ip("198.19.1.10"), port, ip(TARGET[0]), 8080) for port in (1, 2, 3, 4)]
    router.add_route(*keys[0], conn="A", now=0)
    router.add_route(*keys[1], conn="A", now=1)
    router.add_route(*keys[0], conn="B", now=1)  # other connections have their own limit
    router.add_route(*keys[0], conn="A", now=1)
    router.add_route(*keys[2], conn="A", now=2)  # keys[1] is the oldest of A
    assert router.stats["route_evicted"] == 1
    assert router.lookup(*keys[1]) is None and router.routes_of("A") == [keys[0], keys[2]]
    # a routed response counts as use: keys[0] is used, so keys[2] goes next
    assert router.route(response(ACK, client=("198.19.1.10", 1)), 3) == "A"
    router.add_route(*keys[3], conn="A", now=4)
    assert router.routes_of("A") == [keys[0], keys[3]] and router.stats["route_evicted"] == 2
    assert router.lookup(*keys[2]) is None


def test_bad_arguments(router_cls):
    with pytest.raises(ValueError):
        router_cls(max_routes_per_conn=0)
    with pytest.raises(ValueError):
        router_cls().add_route(*TUPLE, conn=None, now=0)
    with pytest.raises(DecodeError):
        router_cls().route(bytes(33), 0)


def test_falsy_connection_ids_route(router_cls):
    router = router_cls()
    router.add_route(*TUPLE, conn=0, now=0)
    assert router.route(response(ACK), 1) == 0 and router.stats["routed"] == 1


@given(st.binary(max_size=200), st.floats(0, 1e6))
def test_route_any_bytes(router_cls, data, now):
    router = router_cls()
    try:
        assert router.route(data, now) is None
    except DecodeError:
        assert len(data) < 34
        return
    assert router.stats["unrouted"] + router.stats["delayed"] == 1


# --- golden: the real capture replayed through the router ------------------------------------


def test_golden_capture_every_response_routed_to_its_connection(router_cls):
    """Replay both connections of the C capture in time order: each CLIENT_ADD adds a route for
    the connection that sent it, and every response record intercept sent on a connection must
    route to that connection at that moment."""
    events = []  # (time, order, conn, direction, chunk)
    for conn, dirs in control_streams().items():
        for direction in ("c2i", "i2c"):
            for order, (ts, chunk) in enumerate(dirs[direction]):
                events.append((ts, direction == "i2c", order, conn, direction, chunk))
    events.sort()
    router = router_cls()
    clients = {}
    frames = {}
    routed = 0
    for ts, _resp, _order, conn, direction, chunk in events:
        if direction == "c2i":
            dec = clients.setdefault(conn, ClientStreamDecoder())
            for rec in dec.feed(chunk):
                assert router.add_route(*_tuple(rec), conn=conn, now=ts) == []
        else:
            for rec in frames.setdefault(conn, FrameDecoder()).feed(chunk):
                assert router.route(rec, ts) == conn
                routed += 1
    assert routed > 100
    assert router.stats["routed"] == routed and router.stats["unrouted"] == 0
    assert router.stats["delayed"] == 0
    assert sum(len(router.routes_of(conn)) for conn in clients) == len(router) > 0


def _tuple(rec):
    return rec.client_ip, rec.client_port, rec.target_ip, rec.target_port
