"""-x transfer map, -c client pool, -r sampling, -n replicas, -f port shift.  (pure)

CONTRACT (spec §3.1, §3.3, §3.4, §3.15):
- ``TransferEntry(online_ip, online_port, target_ip, target_port, online_mac, target_mac)``
  (online_ip 0 = any local address); ``parse_transfer(spec) -> tuple[TransferEntry, ...]``
  raises ``ConfigError("-x", ...)``; ``match_transfer(entries, dst_ip, dst_port)`` first match.
- ``parse_client_pool(spec, exclude=()) -> tuple[int, ...]`` (``x`` wildcard = .1-.254,
  target IPs excluded, at most 4096; ConfigError("-c", ...)).
- ``sample_keep(saddr, sport, percent) -> bool``: the spec §3.3 LE-raw formula, per flow.
- ``replica_port(orig_port, i, rand_shift)`` / ``shift_port(port, factor, rand_shift)``.
- ``TupleAllocator``: chooses the (client ip, client port) each replayed connection uses
  toward its target so that no two live flows share (client ip, port, target ip, port) and no
  tuple is reused within ``time_wait_s`` of its last use (the target's TIME_WAIT).

Addresses are ints: the 32-bit value of the four network-order bytes (1.2.3.4 == 0x01020304),
the same convention as engine.codec.packet.  This module carries its own strict dotted-quad parser
so that it does not depend on packet.py for configuration parsing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from engine.codec import link
from engine.codec.packet import ip_from_str
from engine.codec.tcpseq import TS_CLOCK_HZ, after, ts_clock
from engine.errors import ConfigError, DecodeError

__all__ = [
    "LOCALHOST_IP",
    "MAX_CLIENT_IPS",
    "PORT_MAX",
    "PORT_MIN_UNPRIVILEGED",
    "SynInfo",
    "TransferEntry",
    "TupleAllocator",
    "choose_client_ip",
    "gap",
    "match_transfer",
    "parse_client_pool",
    "parse_transfer",
    "replica_port",
    "sample_keep",
    "shift_port",
    "spill_order",
    "targets_localhost",
]

MAX_CLIENT_IPS = 4096
"""spec §3.15: at most 4096 -c addresses (M_IP_NUM)."""
PORT_MIN_UNPRIVILEGED = 1024
"""TupleAllocator never hands out a port below this."""
PORT_MAX = 65535
LOCALHOST_IP = 0x7F000001
"""127.0.0.1; a -x target equal to it sets C's ``target_localhost`` (spec §3.1, §3.3 step 3)."""
MAC_TEXT_LEN = link.MAC_TEXT_LEN
RAND_SHIFT_MAX = 511
"""spec §3.1: rand_port_shifted is drawn from 0..511."""
REPLICAS_MAX = 1023
"""spec §3.4/§4.1: -n is a 10-bit field."""
PORT_SHIFT_FACTOR_MAX = 255
"""spec §3.15: -f is an 8-bit field."""


# --------------------------------------------------------------------------------------------
# Small strict parsers (ASCII only; int("²") and friends must not sneak through).


def _parse_ip(text: str) -> int | None:
    """Dotted quad -> int, or None: ``packet.ip_from_str``'s strict rule (leading zeros are
    refused: inet_aton reads them as octal, so "010.0.0.1" would mean 8.0.0.1 to C tools)."""
    try:
        return ip_from_str(text)
    except DecodeError:
        return None


def _parse_port(text: str) -> int | None:
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        return None
    port = int(text)
    return port if 1 <= port <= PORT_MAX else None


# --------------------------------------------------------------------------------------------
# -x transfer map (spec §3.1)


@dataclass(frozen=True, slots=True)
class TransferEntry:
    """One ``-x`` item: traffic to online_ip:online_port is replayed to target_ip:target_port."""

    online_ip: int
    """0 = any local address (the srcIP part was omitted)."""
    online_port: int
    target_ip: int
    target_port: int
    online_mac: bytes | None = None
    """--pcap-send: source MAC of frames sent for this entry (spec §3.2)."""
    target_mac: bytes | None = None
    """--pcap-send: destination MAC of frames sent for this entry."""


def _transfer_error(entry: str, what: str) -> ConfigError:
    return ConfigError("-x", f"bad entry {entry!r}: {what}")


def _split_mac(entry: str, side: str, text: str) -> tuple[str, bytes | None]:
    if "@" not in text:
        return text, None
    addr, mac_text = text.split("@", 1)
    mac = link.mac_from_text(mac_text)
    if mac is None:
        raise _transfer_error(
            entry,
            f"{side} MAC {mac_text!r} is not {MAC_TEXT_LEN} characters of the form "
            "xx:xx:xx:xx:xx:xx",
        )
    return addr, mac


def _parse_transfer_entry(entry: str) -> TransferEntry:
    if entry.count("-") != 1:
        raise _transfer_error(
            entry,
            "expected exactly one '-' between [srcIP:]srcPort and targetIP:targetPort "
            "(MACs are written with ':')",
        )
    online_text, target_text = entry.split("-")
    online_text, online_mac = _split_mac(entry, "source", online_text)
    target_text, target_mac = _split_mac(entry, "target", target_text)
    # spec §3.1: with --pcap-send both sides need a MAC.  A MAC on one side only cannot build
    # a frame, so it is refused here whatever the send mode.
    if (online_mac is None) != (target_mac is None):
        raise _transfer_error(entry, "give a MAC on both sides or on neither")

    if ":" in online_text:
        ip_text, port_text = online_text.rsplit(":", 1)
        online_ip = _parse_ip(ip_text)
        if online_ip is None:
            raise _transfer_error(entry, f"source IP {ip_text!r} is not a dotted-quad IPv4")
    else:
        online_ip, port_text = 0, online_text  # spec §3.1: no srcIP = any local address
    online_port = _parse_port(port_text)
    if online_port is None:
        raise _transfer_error(entry, f"source port {port_text!r} is not in 1..65535")

    if ":" not in target_text:
        raise _transfer_error(entry, f"target {target_text!r} must be targetIP:targetPort")
    ip_text, port_text = target_text.rsplit(":", 1)
    target_ip = _parse_ip(ip_text)
    if target_ip is None:
        raise _transfer_error(entry, f"target IP {ip_text!r} is not a dotted-quad IPv4")
    if target_ip == 0:
        raise _transfer_error(entry, "target IP 0.0.0.0 cannot receive traffic")
    target_port = _parse_port(port_text)
    if target_port is None:
        raise _transfer_error(entry, f"target port {port_text!r} is not in 1..65535")
    return TransferEntry(online_ip, online_port, target_ip, target_port, online_mac, target_mac)


def parse_transfer(spec: str) -> tuple[TransferEntry, ...]:
    """Parse ``[srcIP:]srcPort[@MAC]-targetIP:targetPort[@MAC][,...]`` (spec §3.1).

    Entries keep their order because the first match wins.  Whitespace around entries is
    ignored.  Raises ConfigError("-x", one line naming the bad entry).
    """
    if not spec.strip():
        raise ConfigError("-x", "the transfer map is empty; expected [srcIP:]srcPort-IP:port")
    entries = []
    for position, raw in enumerate(spec.split(","), 1):
        entry = raw.strip()
        if not entry:
            raise ConfigError("-x", f"entry {position} is empty (stray ',')")
        entries.append(_parse_transfer_entry(entry))
    return tuple(entries)


def match_transfer(
    entries: Iterable[TransferEntry], dst_ip: int, dst_port: int
) -> TransferEntry | None:
    """The first entry whose online side matches (dst_ip, dst_port); online_ip 0 = any ip."""
    for entry in entries:
        if entry.online_port == dst_port and (entry.online_ip == 0 or entry.online_ip == dst_ip):
            return entry
    return None


def targets_localhost(entries: Iterable[TransferEntry]) -> bool:
    """C's ``target_localhost`` flag: some target is 127.0.0.1 (spec §3.1, §3.3 step 3)."""
    return any(entry.target_ip == LOCALHOST_IP for entry in entries)


# --------------------------------------------------------------------------------------------
# -c client pool (spec §3.15)


def _pool_error(item: str, what: str) -> ConfigError:
    return ConfigError("-c", f"bad item {item!r}: {what}")


def _expand_pool_item(item: str) -> Iterable[int]:
    if "*" in item:
        raise _pool_error(item, "'*' is not supported; end the address with 'x' for .1-.254")
    if item.endswith(("x", "X")):
        prefix = item[:-1]
        base = _parse_ip(prefix + "0") if prefix.endswith(".") else None
        if base is None:
            raise _pool_error(item, "only the last octet may be 'x', as in 198.19.1.x")
        return range(base + 1, base + 255)  # spec §3.15: .1-.254
    ip = _parse_ip(item)
    if ip is None:
        raise _pool_error(item, "not a dotted-quad IPv4 address")
    if ip == 0:
        raise _pool_error(item, "0.0.0.0 is not a usable client address")
    return (ip,)


def parse_client_pool(spec: str, exclude: Iterable[int] = ()) -> tuple[int, ...]:
    """Parse the -c list: comma-separated IPs, ``a.b.c.x`` = a.b.c.1-a.b.c.254 (spec §3.15).

    Addresses in ``exclude`` (the -x target IPs) are skipped, as C does; duplicates are dropped
    keeping the first occurrence.  Unlike C, which silently stops at 4096, more than
    ``MAX_CLIENT_IPS`` addresses is an error: silently ignoring part of a flag hides mistakes.
    An empty result (everything excluded) is an error too.
    """
    if not spec.strip():
        raise ConfigError("-c", "the client address list is empty")
    excluded = set(exclude)
    seen: dict[int, None] = {}
    for position, raw in enumerate(spec.split(","), 1):
        item = raw.strip()
        if not item:
            raise ConfigError("-c", f"item {position} is empty (stray ',')")
        for ip in _expand_pool_item(item):
            if ip not in excluded:
                seen.setdefault(ip, None)
        if len(seen) > MAX_CLIENT_IPS:
            raise _pool_error(item, f"the list passes {MAX_CLIENT_IPS} client addresses here")
    if not seen:
        raise ConfigError("-c", "no client address is left: every one given is a -x target")
    return tuple(seen)


_MASK64 = (1 << 64) - 1


def _mix64(value: int) -> int:
    """splitmix64's finaliser: a fixed, well-spread 64-bit integer hash."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def choose_client_ip(orig_ip: int, pool: Sequence[int], salt: int = 0) -> int:
    """The pool address that stands in for ``orig_ip`` (sticky, deterministic).

    C hands out pool addresses round-robin in first-seen order (spec §3.15).  That needs one
    shared cursor; our worker processes each see a share of the flows and must agree on the
    mapping without sharing state (and it should survive restarts and not depend on arrival
    order), so we use a fixed hash of the address instead.  ``salt`` gives replica i (-n) its
    own sticky mapping (salt=i), the role of C's ``A_i`` term in the replica address formula
    (spec §3.4).  Empty pool: the captured address is kept.
    """
    if not pool:
        return orig_ip
    return pool[_mix64(((salt & 0xFFFFFFFF) << 32) | (orig_ip & 0xFFFFFFFF)) % len(pool)]


def spill_order(sticky_ip: int, pool: Sequence[int]) -> list[int]:
    """The other pool addresses, in the order a connection of ``sticky_ip`` spills onto them
    when ``sticky_ip`` has no free tuple: the addresses that follow it in the pool, wrapping.

    A fixed function of the pool, so every worker (and every incarnation of it) spills a
    client onto the same addresses; workers never collide on them because each owns its own
    port class.  An address not in the pool (no -c) has nowhere to spill: [].
    """
    try:
        i = pool.index(sticky_ip)
    except ValueError:
        return []
    return [*pool[i + 1 :], *pool[:i]]


# --------------------------------------------------------------------------------------------
# -r sampling (spec §3.3 step 7)


def sample_keep(saddr: int, sport: int, percent: int) -> bool:
    """Whether a flow from saddr:sport is replicated under ``-r percent``.

    Exactly C's LE-raw formula (spec §3.3 step 7): the network-order address bytes read as a
    little-endian u32 plus the network-order port read as a little-endian u16.  Pass the
    rewritten (-c) saddr and the original (un-shifted) port.  ``percent`` outside 1..99 keeps
    every flow (0 and 100 mean "all" in C; config rejects other values).
    """
    if not 0 < percent < 100:
        return True
    saddr_le = int.from_bytes(saddr.to_bytes(4, "big"), "little")
    sport_le = ((sport & 0xFF) << 8) | ((sport >> 8) & 0xFF)  # byteswap16
    k = (sport_le + saddr_le) & 0xFFFF
    k = ((k >> 8) + (k & 0xFF)) % 100
    return k < percent


# --------------------------------------------------------------------------------------------
# -f / -n port formulas (spec §3.4, §3.15)
#
# These reproduce C's values exactly.  They can yield ports below 1024, even 0 (for example
# gap(p, a) with p + a >= 65536 and a >= 64512), and -f with F >= 32 maps every port to the
# same value; C sends those as they are.  We treat the result only as a *preferred* port:
# TupleAllocator moves it into its own range (>= 1024) and resolves the collisions.


def gap(port: int, offset: int) -> int:
    """spec §3.4: ``(p + a) if p + a < 65536 else (1024 + a)``, truncated to 16 bits."""
    total = port + offset
    return (total if total < 65536 else PORT_MIN_UNPRIVILEGED + offset) & 0xFFFF


def shift_port(port: int, factor: int, rand_shift: int) -> int:
    """-f: ``gap(port, (factor << 11) + rand_shift)``; factor 0 = unchanged (spec §3.15).

    QUIRK (spec §3.15, §4.1): C stores -f in 8 bits, so 256 silently becomes 0.  We take
    factor 0..255 only; the config layer rejects larger values instead of wrapping them.
    """
    if not 0 <= factor <= PORT_SHIFT_FACTOR_MAX:
        raise ValueError(f"port shift factor {factor} is not in 0..{PORT_SHIFT_FACTOR_MAX}")
    if not 0 <= rand_shift <= RAND_SHIFT_MAX:
        raise ValueError(f"rand_shift {rand_shift} is not in 0..{RAND_SHIFT_MAX}")
    if factor == 0:
        return port  # the random offset is not applied either
    return gap(port, (factor << 11) + rand_shift)


def replica_port(orig_port: int, i: int, rand_shift: int) -> int:
    """-n: the client port of replica i (1..1022): ``gap(orig_port, A_i)`` (spec §3.4).

    ``A_i = ((2*i - 1) << 5) + rand_shift``.  ``orig_port`` is the port after any -f shift;
    apply ``shift_port`` to the result again to match C when -f is also set (spec §3.4).
    """
    if not 1 <= i < REPLICAS_MAX:
        raise ValueError(f"replica index {i} is not in 1..{REPLICAS_MAX - 1}")
    if not 0 <= rand_shift <= RAND_SHIFT_MAX:
        raise ValueError(f"rand_shift {rand_shift} is not in 0..{RAND_SHIFT_MAX}")
    return gap(orig_port, ((2 * i - 1) << 5) + rand_shift)


# --------------------------------------------------------------------------------------------
# Tuple allocation (design §9 "Testbed facts")
#
# Theory of operation.  C TCPCopy keeps the captured (or formula-shifted) client ip:port and
# refuses a SYN whose key is still live, so at ~10 k conn/s from one load generator it lost up
# to 28 % of sessions; the target also keeps every replayed 4-tuple in TIME_WAIT for 60 s, so
# reusing it within that time fails as well.  We therefore allocate the client side of every
# replayed connection:
#
# * A tuple (client ip, port, target ip, target port) is *occupied* while a live flow uses it
#   and for ``time_wait_s`` after release (quarantine); otherwise it is free.
# * ``_state`` maps each occupied tuple to None (live) or its release time (quarantined).
#   Release times go into a deque in time order, so expiry is a pop from the left, done lazily
#   at each call: O(1) amortised, and memory is bounded by the flows of the last time_wait_s.
#   Time never runs backwards inside the allocator (``_clock`` = max seen), which keeps the
#   deque sorted; a backwards step only lengthens a quarantine, which is the safe side.
# * Worker w of W only hands out ports with port % W == w, so separate worker processes can
#   never pick the same tuple, even for the same client ip and target, with no shared state.
# * The preferred port (the captured one) is used when free: the common case is one dict
#   lookup.  Otherwise a per-(client ip, target) cursor walks this worker's ports in order,
#   like a kernel's ephemeral port search.  A per-group count of occupied tuples answers
#   "exhausted" in O(1) instead of scanning 64 k ports on every SYN under overload.
# * A restarted worker starts with an empty table, yet the target still holds the dead
#   incarnation's tuples (TIME_WAIT, or ESTABLISHED for a connection it never closed).  An
#   optional ``history`` (engine/io/tuple_history.py: shared memory that survives a SIGKILL) is
#   told every claim and release; while its ``inherited_until`` lies ahead, a tuple it calls
#   ``busy`` is skipped like a quarantined one (counted in ``stats["inherited_hits"]``).
#
# No tuple ceiling (sustained short connections from few client addresses).  One address has
# ~64.5 k ports toward a target; with a 60 s quarantine that caps one client address at ~1 k
# new connections/s however idle the rest of the -c pool is.  Two ways past it, in order:
# * Spill: when the sticky address (``choose_client_ip``) has no free tuple, the next pool
#   addresses (``spill_order``: a fixed order, so every worker spills a client the same way;
#   each still keeps to its own port class) are tried for a free one.  The target then sees
#   one client as several addresses (``stats["spilled"]``).
# * Reuse (RFC 6191), unless ``strict``: a quarantined tuple is handed out again when the
#   target's kernel will take the new SYN on its TIME_WAIT (Linux tcp_timewait_state_process):
#   the SYN carries a TS option, the old connection had timestamps on (the target answered
#   with TS) and the SYN's TSval (engine/tcpseq.ts_clock at ``now``) is after the last TSval
#   the old connection sent; or, failing that (no TS in the SYN, or a target with
#   net.ipv4.tcp_timestamps=0), the SYN's sequence number is after the old connection's last
#   one.  Our sessions never translate seq numbers, so that second test is the captured
#   ISN's luck (about one quarantined tuple in two passes it): the allocator looks for one
#   that passes.  ``release`` records, per quarantined tuple, the old connection's end seq
#   and last TSval (``_closed``); a tuple released without them is never reused.  After a
#   worker restart the shared history stands in for that memory, for TS-bearing SYNs only
#   (tuple_history.reusable: released by the dead incarnation, with timestamps, and not
#   live when it died).  Reuse is the last resort after spilling (``stats["reused"]``).


REUSE_PROBES_MAX = 256
"""Quarantined tuples of one address looked at per reuse attempt.  The acceptance test passes
for nearly every tuple (TS) or about one in two (seq): far fewer probes find one, and a bound
keeps a refused SYN from walking 64 k ports."""


CLAIM_BUSY_PROBES_MAX = 256
"""Ports looked at per claim while the shared history is consulted (after a restart)."""


class SynInfo(NamedTuple):
    """What the target's TIME_WAIT will judge in a new connection's first SYN."""

    seq: int
    """The SYN's sequence number (the captured ISN, or first data seq - 1 for a faked SYN)."""
    ts: bool
    """Whether it carries a TS option (then with TSval ``ts_clock(now)``)."""


class _Group:
    """Occupancy of one (client ip, target ip, target port) within this worker's ports."""

    __slots__ = ("occupied", "cursor", "spill")

    def __init__(self) -> None:
        self.occupied = 0
        self.cursor = 0
        self.spill = 0  # where in spill_order the last spill of this address succeeded


class TupleAllocator:
    """Hands out client (ip, port) pairs for replayed connections; see the comment above.

    ``allocate`` returns None when no port is free (the caller counts the flow and drops it).
    ``stats`` counts ``allocated``, ``collisions`` (the preferred tuple was live),
    ``quarantine_hits`` (it was in its time-wait quarantine), ``exhausted`` (no free port)
    and ``inherited_hits`` (ports skipped because ``history`` said a previous incarnation of
    this worker may have left them in use at the target), ``spilled`` (given a free tuple of
    another pool address than the sticky one) and ``reused`` (given a quarantined tuple the
    target's TIME_WAIT accepts, RFC 6191).

    ``pool``: the -c addresses, for spilling (``spill_order``); ``strict``: never reuse a
    quarantined tuple (targets that do not follow RFC 6191).

    ``history``: ``record_live(key)``, ``record_released(key, now, was_live, reusable)``,
    ``busy(key, since) -> bool``, ``reusable(key, since, before) -> bool`` and the attribute
    ``inherited_until`` (float or None); keys are (client ip, port, target ip, target port).
    """

    def __init__(
        self,
        time_wait_s: float,
        worker_index: int = 0,
        worker_count: int = 1,
        history: object | None = None,
        *,
        pool: Sequence[int] = (),
        strict: bool = False,
    ) -> None:
        span = PORT_MAX - PORT_MIN_UNPRIVILEGED + 1
        if not 1 <= worker_count <= span:
            raise ValueError(f"worker_count {worker_count} is not in 1..{span}")
        if not 0 <= worker_index < worker_count:
            raise ValueError(f"worker_index {worker_index} is not in 0..{worker_count - 1}")
        if time_wait_s < 0:
            raise ValueError(f"time_wait_s {time_wait_s} is negative")
        self.time_wait_s = float(time_wait_s)
        self.worker_index = worker_index
        self.worker_count = worker_count
        # This worker's ports: _first, _first + W, ... (_slots of them), all in 1024..65535.
        self._first = PORT_MIN_UNPRIVILEGED + (worker_index - PORT_MIN_UNPRIVILEGED) % worker_count
        self._slots = (PORT_MAX - self._first) // worker_count + 1
        self._state: dict[tuple[int, int, int, int], float | None] = {}
        self._expiry: deque[tuple[float, tuple[int, int, int, int]]] = deque()
        self._groups: dict[tuple[int, int, int], _Group] = {}
        # Quarantined tuples that may be reused: key -> (the old connection's end seq, its
        # last TSval or None when it had no timestamps).
        self._closed: dict[tuple[int, int, int, int], tuple[int, int | None]] = {}
        self._clock = float("-inf")
        self.history = history
        self.pool = tuple(pool)
        self.strict = strict
        self._spill: dict[int, list[int]] = {}
        self.stats = {
            "allocated": 0,
            "collisions": 0,
            "quarantine_hits": 0,
            "exhausted": 0,
            "inherited_hits": 0,
            "spilled": 0,
            "reused": 0,
        }

    # -- public -------------------------------------------------------------------------------

    @property
    def ports_per_client(self) -> int:
        """How many ports this worker can use per (client ip, target)."""
        return self._slots

    def __len__(self) -> int:
        """Tuples tracked now (live + quarantined, as of the last call's ``now``)."""
        return len(self._state)

    @property
    def live_count(self) -> int:
        return sum(1 for state in self._state.values() if state is None)

    @property
    def quarantined_count(self) -> int:
        return sum(1 for state in self._state.values() if state is not None)

    def owns_port(self, port: int) -> bool:
        """Whether ``port`` is one this allocator may return."""
        return (
            PORT_MIN_UNPRIVILEGED <= port <= PORT_MAX
            and port % self.worker_count == self.worker_index
        )

    def preferred(self, port: int) -> int:
        """The port of this worker's class that stands in for ``port``.

        Ports below 1024 (the -f/-n formulas can produce them) are first lifted by 1024, so
        distinct low ports stay distinct; then the nearest port of the class is taken (ties go
        down).
        """
        if port < PORT_MIN_UNPRIVILEGED:
            port += PORT_MIN_UNPRIVILEGED
        return self._port_at(self._index_near(port))

    def is_free(
        self, client_ip: int, port: int, target_ip: int, target_port: int, now: float
    ) -> bool:
        self._expire(now)
        return (client_ip, port, target_ip, target_port) not in self._state

    def allocate(
        self,
        client_ip: int,
        preferred_port: int,
        target_ip: int,
        target_port: int,
        now: float,
        fallback_ips: Sequence[int] = (),
        syn: SynInfo | None = None,
    ) -> tuple[int, int] | None:
        """Claim a tuple toward target_ip:target_port; returns (client_ip, port) or None.

        The preferred port (moved into this worker's class) is tried first, then the other
        ports of client_ip, then those of each ``fallback_ips`` address in turn, then those
        of the pool addresses client_ip spills onto (``spill_order``).  If none is free and
        ``syn`` says what the new connection's SYN carries, a quarantined tuple that the
        target's TIME_WAIT accepts for that SYN is reused (not when ``strict``).  None means
        every tuple is live, or quarantined and not reusable.
        """
        self._expire(now)
        if preferred_port < PORT_MIN_UNPRIVILEGED:
            preferred_port += PORT_MIN_UNPRIVILEGED
        start = self._index_near(preferred_port)
        first_choice = self._state.get(
            (client_ip, self._port_at(start), target_ip, target_port), False
        )
        if first_choice is None:
            self.stats["collisions"] += 1
        elif first_choice is not False:
            self.stats["quarantine_hits"] += 1
        busy = self._inherited_busy(now)
        for ip in (client_ip, *fallback_ips):
            port = self._claim(ip, start, target_ip, target_port, busy)
            if port is not None:
                return self._claimed(ip, port, target_ip, target_port)
        spill = self._spill_ips(client_ip) if self.pool else ()
        if spill:
            # Start where this address last spilled successfully: the addresses before that
            # were full then and mostly still are.
            group = self._group_for((client_ip, 0, target_ip, target_port))
            n = len(spill)
            for k in range(n):
                j = (group.spill + k) % n
                ip = spill[j]
                port = self._claim(ip, start, target_ip, target_port, busy)
                if port is not None:
                    group.spill = j
                    self.stats["spilled"] += 1
                    return self._claimed(ip, port, target_ip, target_port)
        if syn is not None and not self.strict:
            for ip in (client_ip, *fallback_ips, *spill):
                got = self._reuse(ip, target_ip, target_port, syn, now, busy)
                if got is not None:
                    port, reused = got
                    if reused:
                        self.stats["reused"] += 1
                    return self._claimed(ip, port, target_ip, target_port)
        self.stats["exhausted"] += 1
        return None

    def _claimed(self, ip: int, port: int, target_ip: int, target_port: int) -> tuple[int, int]:
        self.stats["allocated"] += 1
        if self.history is not None:
            self.history.record_live((ip, port, target_ip, target_port))  # type: ignore[attr-defined]
        return ip, port

    def _spill_ips(self, client_ip: int) -> list[int]:
        spill = self._spill.get(client_ip)
        if spill is None:
            spill = self._spill[client_ip] = spill_order(client_ip, self.pool)
        return spill

    def release(
        self,
        client_ip: int,
        port: int,
        target_ip: int,
        target_port: int,
        now: float,
        end_seq: int | None = None,
        ts_last: int | None = None,
    ) -> None:
        """The flow on this tuple ended: quarantine the tuple for ``time_wait_s``.

        ``end_seq``: the seq after the last one the flow sent (FIN included), None if
        unknown; ``ts_last``: the last TSval it sent, None if it had no timestamps.  With
        either, the tuple may be reused before its quarantine ends (RFC 6191, see above).

        Releasing a tuple that was never allocated quarantines it too (the target has seen it);
        releasing a quarantined tuple restarts its quarantine.  A port outside this worker's
        class is ignored: this allocator can never hand it out.
        """
        self._expire(now)
        if not self.owns_port(port):
            return
        key = (client_ip, port, target_ip, target_port)
        was_live = key in self._state and self._state[key] is None
        if key not in self._state:
            self._group_for(key).occupied += 1
        self._state[key] = self._clock
        if end_seq is None and ts_last is None:
            self._closed.pop(key, None)
        else:
            self._closed[key] = (-1 if end_seq is None else end_seq, ts_last)
        if self.history is not None:
            self.history.record_released(key, self._clock, was_live, ts_last is not None)  # type: ignore[attr-defined]
        self._expiry.append((self._clock, key))

    # -- internals ------------------------------------------------------------------------------

    def _port_at(self, index: int) -> int:
        return self._first + index * self.worker_count

    def _index_near(self, port: int) -> int:
        index = (port - self._first + (self.worker_count - 1) // 2) // self.worker_count
        return min(max(index, 0), self._slots - 1)

    def _group_for(self, key: tuple[int, int, int, int]) -> _Group:
        group_key = (key[0], key[2], key[3])
        group = self._groups.get(group_key)
        if group is None:
            group = self._groups[group_key] = _Group()
        return group

    def _inherited_busy(self, now: float) -> object | None:
        """The history's ``busy`` test while the inherited horizon lasts, else None."""
        history = self.history
        if history is None:
            return None
        until = history.inherited_until  # type: ignore[attr-defined]
        if until is None or now >= until:
            return None
        since = self._clock - self.time_wait_s
        stats = self.stats
        test = history.busy  # type: ignore[attr-defined]

        def busy(key: tuple[int, int, int, int]) -> bool:
            if test(key, since):
                stats["inherited_hits"] += 1
                return True
            return False

        return busy

    def _claim(
        self,
        client_ip: int,
        start: int,
        target_ip: int,
        target_port: int,
        busy: object | None = None,
    ) -> int | None:
        state = self._state
        port = self._port_at(start)
        key = (client_ip, port, target_ip, target_port)
        if key not in state and (busy is None or not busy(key)):  # type: ignore[operator]
            state[key] = None
            self._group_for(key).occupied += 1
            return port
        group = self._group_for(key)
        if group.occupied >= self._slots:
            return None
        # A free slot exists (occupied < slots), so without ``busy`` this ends within one
        # lap.  With it, every free port may be one the history calls busy (a worker that
        # restarted while its predecessor had the address full): look at CLAIM_BUSY_PROBES_MAX
        # ports and leave the cursor where the look ended, so the next SYN looks further on
        # instead of at the same busy ports again (spill and reuse take over meanwhile).
        index = group.cursor
        probes = self._slots if busy is None else min(self._slots, CLAIM_BUSY_PROBES_MAX)
        for _ in range(probes):
            port = self._port_at(index)
            index = index + 1 if index + 1 < self._slots else 0
            key = (client_ip, port, target_ip, target_port)
            if key not in state and (busy is None or not busy(key)):  # type: ignore[operator]
                state[key] = None
                group.occupied += 1
                group.cursor = index
                return port
        group.cursor = index
        return None

    def _reuse(
        self,
        client_ip: int,
        target_ip: int,
        target_port: int,
        syn: SynInfo,
        now: float,
        busy: object | None = None,
    ) -> tuple[int, bool] | None:
        """A quarantined tuple of client_ip the target's TIME_WAIT accepts ``syn`` on
        (RFC 6191), now live, as (port, True); a free port met on the way as (port, False);
        or None.  Walks the group's ports from its cursor, so the tuples quarantined longest
        ago come first, at most REUSE_PROBES_MAX of them."""
        state, closed, history = self._state, self._closed, self.history
        ts_now = ts_clock(now) if syn.ts else None
        inherited = (
            history is not None
            and syn.ts
            and history.inherited_until is not None  # type: ignore[attr-defined]
            and now < history.inherited_until  # type: ignore[attr-defined]
        )
        group = self._groups.get((client_ip, target_ip, target_port))
        if group is None:
            if busy is None:
                return None  # nothing quarantined (and _claim found no free port: none)
            group = self._group_for((client_ip, 0, target_ip, target_port))
        since = self._clock - self.time_wait_s
        index = group.cursor
        slots = self._slots
        for _ in range(min(slots, REUSE_PROBES_MAX)):
            port = self._port_at(index)
            index = index + 1 if index + 1 < slots else 0
            key = (client_ip, port, target_ip, target_port)
            reused = True
            if key in state:
                rec = closed.get(key)
                if rec is None:
                    continue  # live, or released without what the test needs
                end_seq, ts_last = rec
                if not (
                    (ts_now is not None and ts_last is not None and after(ts_now, ts_last))
                    or (end_seq >= 0 and after(syn.seq, end_seq))
                ):
                    continue
                del closed[key]
            elif busy is None or not busy(key):  # type: ignore[operator]
                # Free after all: the claim's look is bounded while the history is asked.
                reused = False
                group.occupied += 1
            elif inherited and history.reusable(key, since, now - 1.0 / TS_CLOCK_HZ):  # type: ignore[union-attr]
                # The dead incarnation's tuple: reusable by the TS test alone, once the TS
                # clock has moved past its release.
                group.occupied += 1
            else:
                continue
            state[key] = None
            group.cursor = index
            return port, reused
        return None

    def _expire(self, now: float) -> None:
        if now > self._clock:
            self._clock = now
        horizon = self._clock - self.time_wait_s
        expiry, state = self._expiry, self._state
        while expiry and expiry[0][0] <= horizon:
            released_at, key = expiry.popleft()
            # Skip stale entries: the tuple was released again later (or already expired).
            if key in state and state[key] == released_at:
                del state[key]
                self._closed.pop(key, None)
                group_key = (key[0], key[2], key[3])
                group = self._groups[group_key]
                group.occupied -= 1
                if group.occupied == 0:
                    del self._groups[group_key]
