"""engine.core.rewrite: -x grammar, -c pool, -r sampling, -f/-n port formulas, tuple allocation.

The formulas and the allocator are checked on both engines (tests/unit/engines.py)."""

from __future__ import annotations

import ipaddress
import random
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.rewrite import (
    LOCALHOST_IP,
    MAX_CLIENT_IPS,
    TransferEntry,
    choose_client_ip,
    parse_client_pool,
    parse_transfer,
    targets_localhost,
)
from engine.errors import ConfigError
from tests.unit.engines import ENGINES, rewrite_module


def ip(text: str) -> int:
    """Independent of the module under test: the stdlib's parser."""
    return int(ipaddress.IPv4Address(text))


def dotted(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


ONLINE = ip("198.18.0.2")
TARGET = ip("198.18.1.2")
TARGET2 = ip("198.18.1.3")
CLIENT = ip("198.19.1.7")


# --------------------------------------------------------------------------------------------
# -x grammar


def test_transfer_with_source_ip():
    (entry,) = parse_transfer("198.18.0.2:80-198.18.1.2:8080")
    assert entry == TransferEntry(ONLINE, 80, TARGET, 8080, None, None)


@pytest.mark.parametrize("engine", ENGINES)
def test_transfer_without_source_ip_is_a_wildcard(engine):
    rw = rewrite_module(engine)
    (entry,) = parse_transfer("80-198.18.1.2:8080")
    assert entry.online_ip == 0
    assert rw.match_transfer((entry,), ip("198.18.0.99"), 80) is entry
    assert rw.match_transfer((entry,), ONLINE, 80) is entry
    assert rw.match_transfer((entry,), ONLINE, 81) is None


def test_transfer_several_entries_keep_order_and_ignore_spaces():
    entries = parse_transfer(" 198.18.0.2:80-198.18.1.2:8080 , 443-198.18.1.3:8443,22-1.2.3.4:2222")
    assert entries == (
        TransferEntry(ONLINE, 80, TARGET, 8080),
        TransferEntry(0, 443, TARGET2, 8443),
        TransferEntry(0, 22, ip("1.2.3.4"), 2222),
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_first_match_wins(engine):
    rw = rewrite_module(engine)
    specific_first = parse_transfer("198.18.0.2:80-198.18.1.2:8080,80-198.18.1.3:9090")
    assert rw.match_transfer(specific_first, ONLINE, 80).target_ip == TARGET
    assert rw.match_transfer(specific_first, ip("198.18.0.9"), 80).target_ip == TARGET2
    # A wildcard listed first shadows the specific entry after it.
    wildcard_first = parse_transfer("80-198.18.1.3:9090,198.18.0.2:80-198.18.1.2:8080")
    assert rw.match_transfer(wildcard_first, ONLINE, 80).target_ip == TARGET2
    # The source ip must match exactly when given.
    only_specific = parse_transfer("198.18.0.2:80-198.18.1.2:8080")
    assert rw.match_transfer(only_specific, ip("198.18.0.3"), 80) is None
    assert rw.match_transfer((), ONLINE, 80) is None


def test_transfer_mac_forms():
    (entry,) = parse_transfer("198.18.0.2:80@aa:bb:cc:dd:ee:ff-198.18.1.2:8080@11:22:33:44:55:66")
    assert entry.online_mac == bytes([0xAA, 0xBB, 0xCC, 0xDD, 0xEE, 0xFF])
    assert entry.target_mac == bytes([0x11, 0x22, 0x33, 0x44, 0x55, 0x66])
    assert (entry.online_ip, entry.online_port, entry.target_ip, entry.target_port) == (
        ONLINE,
        80,
        TARGET,
        8080,
    )
    (wild,) = parse_transfer("80@AA:BB:CC:DD:EE:0F-198.18.1.2:8080@00:00:00:00:00:01")
    assert wild.online_ip == 0
    assert wild.online_mac == bytes([0xAA, 0xBB, 0xCC, 0xDD, 0xEE, 0x0F])
    assert wild.target_mac == bytes(5) + b"\x01"


def test_transfer_entry_is_frozen():
    (entry,) = parse_transfer("80-198.18.1.2:8080")
    with pytest.raises(AttributeError):
        entry.target_port = 1  # type: ignore[misc]


def test_targets_localhost():
    assert targets_localhost(parse_transfer("80-198.18.1.2:8080,81-127.0.0.1:8081"))
    assert not targets_localhost(parse_transfer("127.0.0.1:80-198.18.1.2:8080"))
    assert ip("127.0.0.1") == LOCALHOST_IP


BAD_TRANSFERS = [
    # (spec, text the one-line message must contain)
    ("", "empty"),
    ("   ", "empty"),
    ("80", "'80'"),  # no '-'
    ("80-198.18.1.2:80-5", "exactly one '-'"),
    ("80-198.18.1.2", "targetIP:targetPort"),
    ("0-198.18.1.2:80", "source port '0'"),
    ("65536-198.18.1.2:80", "source port '65536'"),
    ("-198.18.1.2:80", "source port ''"),
    ("8x-198.18.1.2:80", "source port '8x'"),
    ("\u00b2-198.18.1.2:80", "source port"),  # a unicode digit int() would reject
    ("80-198.18.1.2:0", "target port '0'"),
    ("80-198.18.1.2:65536", "target port '65536'"),
    ("80-198.18.1.2:", "target port ''"),
    ("80-198.18.1.256:80", "target IP '198.18.1.256'"),
    ("80-198.18.1:80", "target IP '198.18.1'"),
    ("80-host.example:80", "target IP"),
    ("80-0.0.0.0:80", "0.0.0.0"),
    ("1.2.3:80-198.18.1.2:80", "source IP '1.2.3'"),
    ("010.0.0.1:80-198.18.1.2:80", "source IP '010.0.0.1'"),  # octal to inet_aton
    ("1.2.3.4.5:80-198.18.1.2:80", "source IP"),
    ("1.2.3.-4:80-198.18.1.2:80", "exactly one '-'"),
    ("80-198.18.1.2:80,", "entry 2 is empty"),
    (",80-198.18.1.2:80", "entry 1 is empty"),
    ("80@aa:bb:cc:dd:ee-198.18.1.2:80@11:22:33:44:55:66", "source MAC 'aa:bb:cc:dd:ee'"),
    ("80@aa:bb:cc:dd:ee:ff-198.18.1.2:80@11:22:33:44:55", "target MAC"),
    ("80@gg:bb:cc:dd:ee:ff-198.18.1.2:80@11:22:33:44:55:66", "source MAC"),
    ("80@aabb:cc:dd:ee:ff:-198.18.1.2:80@11:22:33:44:55:66", "source MAC"),
    ("80@aa:bb:cc:dd:ee:ff-198.18.1.2:80", "both sides"),
    ("80-198.18.1.2:80@11:22:33:44:55:66", "both sides"),
    ("80@aa-bb-cc-dd-ee-ff-198.18.1.2:80@11:22:33:44:55:66", "MACs are written with ':'"),
]


@pytest.mark.parametrize(("spec", "needle"), BAD_TRANSFERS)
def test_transfer_errors_are_one_clear_line(spec, needle):
    with pytest.raises(ConfigError) as info:
        parse_transfer(spec)
    err = info.value
    assert err.where == "-x"
    assert needle in err.message
    assert "\n" not in str(err)
    assert str(err).startswith("-x: ")


def test_transfer_error_names_the_bad_entry_among_good_ones():
    with pytest.raises(ConfigError) as info:
        parse_transfer("80-198.18.1.2:8080,81-198.18.1.999:8081,82-198.18.1.2:8082")
    assert "'81-198.18.1.999:8081'" in info.value.message
    assert "82-" not in info.value.message


ips = st.integers(min_value=1, max_value=0xFFFFFFFF)
ports = st.integers(min_value=1, max_value=65535)
macs = st.binary(min_size=6, max_size=6)


@st.composite
def transfer_entries(draw):
    online_ip = draw(st.one_of(st.just(0), ips))
    with_mac = draw(st.booleans())
    return TransferEntry(
        online_ip,
        draw(ports),
        draw(ips),
        draw(ports),
        draw(macs) if with_mac else None,
        draw(macs) if with_mac else None,
    )


def format_entry(entry: TransferEntry) -> str:
    def side(prefix: str, mac: bytes | None) -> str:
        return prefix if mac is None else prefix + "@" + ":".join(f"{b:02x}" for b in mac)

    online = str(entry.online_port)
    if entry.online_ip:
        online = f"{dotted(entry.online_ip)}:{online}"
    target = f"{dotted(entry.target_ip)}:{entry.target_port}"
    return side(online, entry.online_mac) + "-" + side(target, entry.target_mac)


@given(st.lists(transfer_entries(), min_size=1, max_size=5))
def test_transfer_round_trip(entries):
    assert parse_transfer(",".join(format_entry(e) for e in entries)) == tuple(entries)


@given(st.text(alphabet="0123456789.:-,@abcdefx* \u00b2", max_size=60))
def test_transfer_any_text_parses_or_raises_config_error(text):
    try:
        entries = parse_transfer(text)
    except ConfigError as err:
        assert err.where == "-x"
    else:
        assert entries and all(1 <= e.online_port <= 65535 for e in entries)


# --------------------------------------------------------------------------------------------
# -c pool


def test_pool_x_wildcard_expands_to_1_through_254():
    pool = parse_client_pool("198.19.1.x")
    assert pool == tuple(ip(f"198.19.1.{n}") for n in range(1, 255))


def test_pool_keeps_order_and_drops_duplicates():
    pool = parse_client_pool("198.19.2.9, 198.19.1.x,198.19.1.5 ,198.19.2.9,198.19.3.1")
    assert pool[0] == ip("198.19.2.9")
    assert pool[1:255] == tuple(ip(f"198.19.1.{n}") for n in range(1, 255))
    assert pool[255:] == (ip("198.19.3.1"),)


def test_pool_skips_excluded_target_ips():
    pool = parse_client_pool("198.19.1.x,198.19.2.1", exclude=[ip("198.19.1.7"), ip("198.19.2.1")])
    assert len(pool) == 253
    assert ip("198.19.1.7") not in pool
    assert ip("198.19.2.1") not in pool


def test_pool_cap_is_4096_addresses():
    sixteen_nets = ",".join(f"198.19.{n}.x" for n in range(16))  # 16 * 254 = 4064
    singles = [f"198.19.200.{n}" for n in range(1, MAX_CLIENT_IPS - 16 * 254 + 1)]
    assert len(parse_client_pool(sixteen_nets + "," + ",".join(singles))) == MAX_CLIENT_IPS
    with pytest.raises(ConfigError) as info:
        parse_client_pool(sixteen_nets + "," + ",".join(singles) + ",198.19.201.1")
    assert info.value.where == "-c"
    assert "4096" in info.value.message
    assert "'198.19.201.1'" in info.value.message
    # The cap applies after duplicates and exclusions are removed.
    assert len(parse_client_pool(",".join(["198.19.1.x"] * 40))) == 254
    excluded = set(range(ip("198.19.16.1"), ip("198.19.16.255")))
    assert len(parse_client_pool(sixteen_nets + ",198.19.16.x", exclude=excluded)) == 16 * 254


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("", "empty"),
        ("*", "'*'"),
        ("198.19.1.*", "'*'"),
        ("x", "last octet"),
        ("198.19.x.x", "last octet"),
        ("198.19.1x", "last octet"),
        ("198.19.x.1", "dotted-quad"),
        ("198.19.1.300", "dotted-quad"),
        ("0.0.0.0", "0.0.0.0"),
        ("198.19.1.1,,198.19.1.2", "item 2 is empty"),
    ],
)
def test_pool_errors(spec, needle):
    with pytest.raises(ConfigError) as info:
        parse_client_pool(spec)
    assert info.value.where == "-c"
    assert needle in info.value.message
    assert "\n" not in str(info.value)


def test_pool_that_is_all_targets_is_an_error():
    with pytest.raises(ConfigError, match="no client address is left"):
        parse_client_pool("198.18.1.2", exclude=(TARGET,))


@given(st.text(alphabet="0123456789.,xX* ", max_size=40))
def test_pool_any_text_parses_or_raises_config_error(text):
    try:
        pool = parse_client_pool(text)
    except ConfigError as err:
        assert err.where == "-c"
    else:
        assert 1 <= len(pool) <= MAX_CLIENT_IPS
        assert len(set(pool)) == len(pool)
        assert 0 not in pool


# --------------------------------------------------------------------------------------------
# choose_client_ip


@pytest.mark.parametrize("engine", ENGINES)
def test_choose_client_ip_empty_pool_keeps_address(engine):
    rw = rewrite_module(engine)
    assert rw.choose_client_ip(CLIENT, ()) == CLIENT


@pytest.mark.parametrize("engine", ENGINES)
def test_choose_client_ip_is_sticky_and_spread(engine):
    rw = rewrite_module(engine)
    pool = parse_client_pool("198.19.1.1,198.19.1.2,198.19.1.3,198.19.1.4")
    counts = dict.fromkeys(pool, 0)
    for n in range(8000):
        orig = ip("10.0.0.0") + n
        chosen = rw.choose_client_ip(orig, pool)
        assert chosen in pool
        assert rw.choose_client_ip(orig, pool) == chosen
        counts[chosen] += 1
    # 8000 addresses over 4: a fair hash gives 2000 each; sd ~ 39, so 1700..2300 is ~7 sd.
    assert all(1700 <= c <= 2300 for c in counts.values()), counts


@pytest.mark.parametrize("engine", ENGINES)
def test_choose_client_ip_salt_gives_replicas_their_own_mapping(engine):
    rw = rewrite_module(engine)
    pool = parse_client_pool("198.19.1.x")
    origs = [ip("10.0.0.0") + n for n in range(200)]
    base = [rw.choose_client_ip(o, pool) for o in origs]
    salted = [rw.choose_client_ip(o, pool, salt=1) for o in origs]
    assert salted == [rw.choose_client_ip(o, pool, salt=1) for o in origs]
    # With 254 choices, a salt-independent mapping would agree on all 200; ~1 agree by chance.
    assert sum(a == b for a, b in zip(base, salted, strict=True)) < 20


def test_choose_client_ip_agrees_across_processes():
    """Worker processes must agree: no dependence on PYTHONHASHSEED or process state."""
    pool = parse_client_pool("198.19.1.x,198.19.2.x")
    origs = [ip("172.16.0.0") + 7919 * n for n in range(50)]
    here = [choose_client_ip(o, pool, salt=n % 3) for n, o in enumerate(origs)]
    code = (
        "from engine.core.rewrite import choose_client_ip, parse_client_pool\n"
        "pool = parse_client_pool('198.19.1.x,198.19.2.x')\n"
        f"origs = {origs!r}\n"
        "print([choose_client_ip(o, pool, salt=n % 3) for n, o in enumerate(origs)])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={"PYTHONHASHSEED": "12345"},
    )
    assert out.stdout.strip() == repr(here)


# --------------------------------------------------------------------------------------------
# -r sampling (spec §3.3 step 7)


def k_by_bytes(saddr: int, sport: int) -> int:
    """The formula restated on bytes: the first two address bytes and the two port bytes,
    each pair read as a little-endian u16 (what the C code does on x86)."""
    (addr_lo,) = struct.unpack("<H", struct.pack("!I", saddr)[:2])
    (port_le,) = struct.unpack("<H", struct.pack("!H", sport))
    k16 = (addr_lo + port_le) & 0xFFFF
    return ((k16 >> 8) + (k16 & 0xFF)) % 100


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("addr", "port", "k"),
    [
        # bytes c6 13 01 07 -> LE low16 0x13c6; port 80 = 00 50 -> LE 0x5000;
        # 0x13c6 + 0x5000 = 0x63c6; 0x63 + 0xc6 = 99 + 198 = 297; 297 % 100 = 97.
        ("198.19.1.7", 80, 97),
        # 01 02 03 04 -> 0x0201; port 65535 -> 0xffff; sum 0x10200 & 0xffff = 0x0200 -> 2 + 0.
        ("1.2.3.4", 65535, 2),
        # 0a 00 ff ff -> 0x000a; port 0x1234 -> 0x3412; 0x341c -> 0x34 + 0x1c = 52 + 28 = 80.
        ("10.0.255.255", 0x1234, 80),
        # 00 00 00 00 + port 0x0100 -> LE 0x0001 -> 0 + 1 = 1.
        ("0.0.0.0", 256, 1),
    ],
)
def test_sample_keep_hand_derived_values(engine, addr, port, k):
    rw = rewrite_module(engine)
    saddr = ip(addr)
    assert k_by_bytes(saddr, port) == k
    if k > 0:
        assert rw.sample_keep(saddr, port, k) is False  # dropped when k >= percent
    assert rw.sample_keep(saddr, port, k + 1) is True
    # 0 and 100 mean "replicate everything".
    assert rw.sample_keep(saddr, port, 0) is True
    assert rw.sample_keep(saddr, port, 100) is True


@pytest.mark.parametrize("engine", ENGINES)
@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 65535), st.integers(1, 99))
def test_sample_keep_matches_formula_and_is_monotone(engine, saddr, sport, percent):
    rw = rewrite_module(engine)
    keep = rw.sample_keep(saddr, sport, percent)
    assert keep == (k_by_bytes(saddr, sport) < percent)
    # The decision depends on the flow only, and a larger percentage keeps a superset.
    assert rw.sample_keep(saddr, sport, percent) == keep
    if keep:
        assert rw.sample_keep(saddr, sport, min(percent + 1, 100))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("percent", [1, 10, 30, 50, 90, 99])
def test_sample_keep_fraction_is_near_percent(engine, percent):
    rw = rewrite_module(engine)
    # Exact share under a uniform 16-bit key, from the formula's definition.
    exact = sum(((v >> 8) + (v & 0xFF)) % 100 < percent for v in range(65536)) / 65536
    assert abs(exact - percent / 100) < 0.02
    rng = random.Random(percent)
    flows = [
        (ip("198.19.0.0") + rng.randrange(65536), rng.randrange(1024, 65536)) for _ in range(20000)
    ]
    kept = sum(rw.sample_keep(a, p, percent) for a, p in flows) / len(flows)
    assert abs(kept - exact) < 0.015  # sd of the mean ~ 0.0035


# --------------------------------------------------------------------------------------------
# -f / -n formulas


@pytest.mark.parametrize("engine", ENGINES)
def test_gap(engine):
    rw = rewrite_module(engine)
    assert rw.gap(80, 32) == 112
    assert rw.gap(65503, 32) == 65535  # p + a = 65535 stays
    assert rw.gap(65504, 32) == 1056  # p + a = 65536 -> 1024 + a
    assert rw.gap(2000, 64512) == 0  # (1024 + 64512) & 0xffff: C really yields port 0


@pytest.mark.parametrize("engine", ENGINES)
def test_shift_port(engine):
    rw = rewrite_module(engine)
    assert rw.shift_port(80, 0, 300) == 80  # F = 0: no shift, no random offset either
    assert rw.shift_port(80, 1, 0) == 80 + 2048
    assert rw.shift_port(64000, 1, 5) == 1024 + 2048 + 5  # 64000 + 2053 >= 65536
    assert rw.shift_port(1000, 2, 511) == 1000 + 4096 + 511
    # F >= 32 makes the offset >= 65536, so every port lands on 1024 + r (spec §3.15).
    assert {rw.shift_port(p, 32, 77) for p in (1, 80, 40000, 65535)} == {1024 + 77}
    assert rw.shift_port(80, 255, 0) == (1024 + (255 << 11)) & 0xFFFF


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("factor", "rand"), [(256, 0), (-1, 0), (1, 512), (1, -1)])
def test_shift_port_rejects_out_of_range(engine, factor, rand):
    rw = rewrite_module(engine)
    with pytest.raises(ValueError):
        rw.shift_port(80, factor, rand)


@pytest.mark.parametrize("engine", ENGINES)
def test_replica_port(engine):
    rw = rewrite_module(engine)
    # A_i = ((2i - 1) << 5) + r: 32 + r, 96 + r, 160 + r, ...
    assert rw.replica_port(80, 1, 0) == 80 + 32
    assert rw.replica_port(80, 2, 0) == 80 + 96
    assert rw.replica_port(80, 3, 7) == 80 + 160 + 7
    assert rw.replica_port(65500, 1, 10) == 1024 + 42  # 65500 + 42 >= 65536
    assert rw.replica_port(2000, 1008, 32) == 0  # A = 2015 * 32 + 32 = 64512
    assert rw.replica_port(80, 1022, 511) == (1024 + (2043 << 5) + 511) & 0xFFFF


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("i", "rand"), [(0, 0), (1023, 0), (1, 512)])
def test_replica_port_rejects_out_of_range(engine, i, rand):
    rw = rewrite_module(engine)
    with pytest.raises(ValueError):
        rw.replica_port(80, i, rand)


@pytest.mark.parametrize("engine", ENGINES)
@given(ports, st.integers(0, 511), st.integers(1, 50))
def test_replica_ports_are_distinct_without_wrap(engine, port, rand, n):
    rw = rewrite_module(engine)
    got = [rw.replica_port(port, i, rand) for i in range(1, n + 1)]
    if port + ((2 * n - 1) << 5) + rand < 65536:
        assert len(set(got)) == n
        assert all(p > port for p in got)


# --------------------------------------------------------------------------------------------
# TupleAllocator


@pytest.mark.parametrize("engine", ENGINES)
def test_allocator_uses_preferred_port_when_free(engine):
    rw = rewrite_module(engine)
    alloc = rw.TupleAllocator(60.0)
    assert alloc.allocate(CLIENT, 40000, TARGET, 8080, now=0.0) == (CLIENT, 40000)
    assert alloc.stats == {
        "allocated": 1,
        "collisions": 0,
        "quarantine_hits": 0,
        "exhausted": 0,
        "inherited_hits": 0,
        "spilled": 0,
        "reused": 0,
    }
    assert alloc.live_count == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_allocator_never_shares_a_live_tuple(engine):
    rw = rewrite_module(engine)
    alloc = rw.TupleAllocator(60.0)
    first = alloc.allocate(CLIENT, 40000, TARGET, 8080, now=0.0)
    second = alloc.allocate(CLIENT, 40000, TARGET, 8080, now=0.0)
    assert first != second and second is not None
    assert second[0] == CLIENT and 1024 <= second[1] <= 65535
    assert alloc.stats["collisions"] == 1
    # Another target (or client ip) is another tuple: the preferred port is fine there.
    assert alloc.allocate(CLIENT, 40000, TARGET2, 8080, now=0.0) == (CLIENT, 40000)
    assert alloc.allocate(CLIENT, 40000, TARGET, 8081, now=0.0) == (CLIENT, 40000)
    assert alloc.allocate(CLIENT + 1, 40000, TARGET, 8080, now=0.0) == (CLIENT + 1, 40000)
    assert alloc.live_count == 5


@pytest.mark.parametrize("engine", ENGINES)
def test_allocator_many_flows_same_preferred_port_all_distinct(engine):
    rw = rewrite_module(engine)
    alloc = rw.TupleAllocator(60.0)
    got = [alloc.allocate(CLIENT, 50000, TARGET, 8080, now=1.0) for _ in range(3000)]
    assert None not in got
    assert len(set(got)) == 3000
    assert alloc.stats["collisions"] == 2999


@pytest.mark.parametrize("engine", ENGINES)
def test_allocator_quarantine_with_fake_clock(engine):
    rw = rewrite_module(engine)
    alloc = rw.TupleAllocator(60.0)
    assert alloc.allocate(CLIENT, 40000, TARGET, 8080, now=100.0) == (CLIENT, 40000)
    alloc.release(CLIENT, 40000, TARGET, 8080, now=110.0)
    assert alloc.live_count == 0 and alloc.quarantined_count == 1
    # Within 60 s of the release the tuple is not handed out again.
    assert not alloc.is_free(CLIENT, 40000, TARGET, 8080, now=169.9)
    again = alloc.allocate(CLIENT, 40000, TARGET, 8080, now=169.9)
    assert again is not None and again[1] != 40000
    assert alloc.stats["quarantine_hits"] == 1
    alloc.release(*again, TARGET, 8080, now=169.9)
    # At release + 60 s it is free again; the target's TIME_WAIT is over.
    assert alloc.is_free(CLIENT, 40000, TARGET, 8080, now=170.0)
    assert alloc.allocate(CLIENT, 40000, TARGET, 8080, now=170.0) == (CLIENT, 40000)


@pytest.mark.parametrize("engine", ENGINES)
def test_allocator_clock_going_backwards_does_not_shorten_quarantine(engine):
    rw = rewrite_module(engine)
    alloc = rw.TupleAllocator(10.0)
    alloc.allocate(CLIENT, 40000, TARGET, 8080, now=100.0)
    alloc.release(CLIENT, 40000, TARGET, 8080, now=50.0)  # clock stepped back: counts as 100
    assert not alloc.is_free(CLIENT, 40000, TARGET, 8080, now=105.0)
    assert not alloc.is_free(CLIENT, 40000, TARGET, 8080, now=109.9)
    assert alloc.is_free(CLIENT, 40000, TARGET, 8080, now=110.0)


@pytest.mark.parametrize("engine", ENGINES)
def test_allocator_release_of_unknown_or_quarantined_tuple(engine):
    rw = rewrite_module(engine)
    alloc = rw.TupleAllocator(10.0)
    alloc.release(CLIENT, 40000, TARGET, 8080, now=0.0)  # never allocated: target saw it
    assert not alloc.is_free(CLIENT, 40000, TARGET, 8080, now=5.0)
    alloc.release(CLIENT, 40000, TARGET, 8080, now=5.0)  # restarts the quarantine
    assert not alloc.is_free(CLIENT, 40000, TARGET, 8080, now=14.9)
    assert alloc.is_free(CLIENT, 40000, TARGET, 8080, now=15.0)
    assert len(alloc) == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_allocator_zero_time_wait(engine):
    rw = rewrite_module(engine)
    alloc = rw.TupleAllocator(0.0)
    alloc.allocate(CLIENT, 40000, TARGET, 8080, now=1.0)
    alloc.release(CLIENT, 40000, TARGET, 8080, now=1.0)
    alloc.release(CLIENT, 40000, TARGET, 8080, now=1.0)
    assert alloc.allocate(CLIENT, 40000, TARGET, 8080, now=1.0) == (CLIENT, 40000)
    assert len(alloc) == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_allocator_memory_is_bounded_by_time_wait(engine):
    rw = rewrite_module(engine)
    alloc = rw.TupleAllocator(60.0)
    for n in range(5000):
        got = alloc.allocate(CLIENT + n % 7, 30000 + n % 500, TARGET, 8080, now=n * 0.01)
        assert got is not None
        alloc.release(*got, TARGET, 8080, now=n * 0.01)
    assert len(alloc) == 5000  # all within the last 60 s
    assert alloc.is_free(CLIENT, 1, TARGET, 8080, now=49.99 + 60.0)
    assert len(alloc) == 0
    if engine == "python":  # its internals are emptied too (the compiled one's are C)
        assert len(alloc._expiry) == 0
        assert alloc._groups == {}


@pytest.mark.parametrize("engine", ENGINES)
def test_allocator_ports_never_below_1024_nor_above_65535(engine):
    rw = rewrite_module(engine)
    alloc = rw.TupleAllocator(60.0)
    for preferred in (0, 1, 80, 1023, 65535, 70000):
        _, port = alloc.allocate(CLIENT, preferred, TARGET, 8080, now=0.0)
        assert 1024 <= port <= 65535
    # Distinct low ports stay distinct (lifted by 1024) rather than all piling on 1024.
    assert alloc.allocate(CLIENT, 5, TARGET2, 80, now=0.0) == (CLIENT, 1029)
    assert alloc.allocate(CLIENT, 6, TARGET2, 80, now=0.0) == (CLIENT, 1030)


@pytest.mark.parametrize("engine", ENGINES)
def test_allocator_preferred_moves_to_nearest_port_of_the_class(engine):
    rw = rewrite_module(engine)
    alloc = rw.TupleAllocator(60.0, worker_index=1, worker_count=4)
    assert alloc.preferred(30001) == 30001
    assert alloc.preferred(30002) == 30001
    assert alloc.preferred(30003) == 30001  # tie between 30001 and 30005 goes down
    assert alloc.preferred(30004) == 30005
    assert alloc.preferred(100) == 1125  # lifted to 1124, nearest of class 1 is 1125
    assert alloc.preferred(70000) == 65533
    top = rw.TupleAllocator(60.0, worker_index=0, worker_count=4)
    assert top.preferred(65535) == 65532
    assert top.preferred(1024) == 1024
    assert alloc.owns_port(30001) and not alloc.owns_port(30002) and not alloc.owns_port(1021)


@pytest.mark.parametrize("engine", ENGINES)
def test_residue_classes_give_disjoint_tuples_across_workers(engine):
    rw = rewrite_module(engine)
    workers = [rw.TupleAllocator(60.0, worker_index=w, worker_count=4) for w in range(4)]
    per_worker = []
    for w, alloc in enumerate(workers):
        got = set()
        for n in range(600):
            # Every worker sees the same client ip and the same preferred ports.
            result = alloc.allocate(CLIENT, 30000 + n % 300, TARGET, 8080, now=0.0)
            assert result is not None
            assert result[1] % 4 == w
            assert 1024 <= result[1] <= 65535
            got.add(result)
        assert len(got) == 600
        per_worker.append(got)
    for a in range(4):
        for b in range(a + 1, 4):
            assert per_worker[a].isdisjoint(per_worker[b])


@pytest.mark.parametrize("engine", ENGINES)
def test_exhaustion_returns_none_and_counts(engine):
    rw = rewrite_module(engine)
    # 64512 / 16128 = 4 ports per class.
    alloc = rw.TupleAllocator(30.0, worker_index=3, worker_count=16128)
    assert alloc.ports_per_client == 4
    got = {alloc.allocate(CLIENT, 40000, TARGET, 8080, now=0.0) for _ in range(4)}
    assert None not in got and len(got) == 4
    assert all(alloc.owns_port(port) for _, port in got)
    assert alloc.allocate(CLIENT, 40000, TARGET, 8080, now=0.0) is None
    assert alloc.stats["exhausted"] == 1
    # A fallback client address has its own ports.
    assert alloc.allocate(CLIENT, 40000, TARGET, 8080, now=0.0, fallback_ips=(CLIENT + 1,)) == (
        CLIENT + 1,
        alloc.preferred(40000),
    )
    # Releasing does not help until the quarantine is over.
    _, port = sorted(got)[0]
    alloc.release(CLIENT, port, TARGET, 8080, now=1.0)
    assert alloc.allocate(CLIENT, 40000, TARGET, 8080, now=30.9) is None
    assert alloc.allocate(CLIENT, 40000, TARGET, 8080, now=31.0) == (CLIENT, port)
    assert alloc.stats["exhausted"] == 2


@pytest.mark.parametrize("engine", ENGINES)
def test_exhaustion_of_a_whole_port_range(engine):
    rw = rewrite_module(engine)
    alloc = rw.TupleAllocator(60.0)
    ports_got = []
    for _ in range(65535 - 1024 + 1):
        got = alloc.allocate(CLIENT, 33333, TARGET, 8080, now=0.0)
        assert got is not None
        ports_got.append(got[1])
    assert sorted(ports_got) == list(range(1024, 65536))
    assert alloc.allocate(CLIENT, 33333, TARGET, 8080, now=0.0) is None


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("time_wait", "index", "count"),
    [(-1.0, 0, 1), (60.0, 0, 0), (60.0, 4, 4), (60.0, -1, 4), (60.0, 0, 64513)],
)
def test_allocator_rejects_bad_arguments(engine, time_wait, index, count):
    rw = rewrite_module(engine)
    with pytest.raises(ValueError):
        rw.TupleAllocator(time_wait, worker_index=index, worker_count=count)


# Model-based check: small port classes so that collisions, quarantine and exhaustion are all
# reached; the model is the definition ("free = not live and not released < tw ago").
TW_S = 10.0
MODEL_WORKERS = 32256  # 2 ports per class
CLASS_PORTS: dict[int, list[int]] = {}
for _port in range(1024, 65536):
    CLASS_PORTS.setdefault(_port % MODEL_WORKERS, []).append(_port)
alloc_op = st.tuples(
    st.just("alloc"),
    st.integers(0, 1),  # client ip
    st.integers(0, 70000),  # preferred port
    st.integers(0, 2),  # target (mostly the first: more pressure on its ports)
    st.booleans(),  # with a fallback ip
)
op = st.one_of(
    alloc_op,
    alloc_op,
    st.tuples(st.just("release_live"), st.integers(0, 10_000)),
    # A tuple never allocated: one of the class's two ports, or (2) a port outside the class.
    st.tuples(st.just("release_any"), st.integers(0, 1), st.integers(0, 2)),
    st.tuples(st.just("tick"), st.floats(-3.0, 12.0)),
)


@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=200, deadline=None)
@given(st.integers(0, MODEL_WORKERS - 1), st.lists(op, max_size=80))
def test_allocator_against_model(engine, worker_index, ops):
    rw = rewrite_module(engine)
    alloc = rw.TupleAllocator(TW_S, worker_index=worker_index, worker_count=MODEL_WORKERS)
    class_ports = CLASS_PORTS[worker_index]
    targets = [(TARGET, 8080), (TARGET, 8080), (TARGET2, 8080)]
    model: dict[tuple[int, int, int, int], float | None] = {}
    now = 0.0
    clock = float("-inf")  # like the allocator: the largest `now` seen in a call so far

    def free(key):
        state = model.get(key, "absent")
        return state == "absent" or (state is not None and state + TW_S <= clock)

    for step in ops:
        if step[0] == "tick":
            now += step[1]
            continue
        if step[0] != "release_live" or any(v is None for v in model.values()):
            clock = max(clock, now)  # the allocator only learns the time from its calls
        if step[0] == "alloc":
            _, c, pref, t, fallback = step
            cip, (tip, tport) = CLIENT + c, targets[t]
            candidates = [cip] + ([CLIENT + 5] if fallback else [])
            result = alloc.allocate(cip, pref, tip, tport, now, fallback_ips=candidates[1:])
            any_free = any(free((i, p, tip, tport)) for i in candidates for p in class_ports)
            if result is None:
                assert not any_free
                continue
            rip, rport = result
            assert rip in candidates and rport in class_ports
            assert free((rip, rport, tip, tport))
            if free((cip, alloc.preferred(pref), tip, tport)):
                assert result == (cip, alloc.preferred(pref))
            model[(rip, rport, tip, tport)] = None
        elif step[0] == "release_live":
            live = sorted(k for k, v in model.items() if v is None)
            if live:
                key = live[step[1] % len(live)]
                alloc.release(*key, now)
                model[key] = clock
        else:
            _, c, which = step
            port = class_ports[which] if which < 2 else class_ports[0] + 1
            key = (CLIENT + c, port, TARGET, 8080)
            alloc.release(*key, now)
            model[key] = clock
        for key in list(model):
            if free(key):
                del model[key]
        assert alloc.live_count == sum(v is None for v in model.values())
