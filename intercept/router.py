"""intercept's route table and delayed SYN/RST buffer (spec §1.5), pure.

CONTRACT:
- ``Router(delay_s=30.0, max_routes_per_conn=None)``; connections are opaque hashable ids.
- ``add_route(client_ip, client_port, target_ip, target_port, conn, now) -> list[bytes]``:
  the latest CLIENT_ADD wins; returns delayed records for that tuple (in order) to send to conn.
- ``route(record: bytes, now) -> object | None``: the conn for a response record (64/192 B,
  keyed by the record's (daddr, dport, saddr, sport)); when None and the record is SYN or RST,
  it is kept (FIFO per tuple, dropped 30 s after the tuple's list was created).
- ``remove_connection(conn)``: forget its routes.  ``expire(now)``: drop old delayed lists.
- counters: ``stats`` dict (routed, unrouted, delayed, delayed_flushed, delayed_expired, adds).

Theory of operation
-------------------
A response is routed to the tcpcopy connection that sent the latest CLIENT_ADD for its
(client ip, client port, target ip, target port) (spec §1.5, §6 item 3).  The key is that exact
tuple in a dict: the C table's 32-bit hash key and its collisions are a QUIRK we do not copy
(``route_key_c`` reproduces the C formula for documentation and tests only).  With ``dnat``
the target ip is left out of the key, as C's TC_DNAT build does, because a NAT in front of the
target makes its replies come from another address.

The CLIENT_ADD (TCP) and the SYN (raw IP) leave tcpcopy together, so the target's SYN-ACK can
reach intercept before the route exists.  Unrouted SYN or RST records therefore wait in a FIFO
per tuple; the list lives ``delay_s`` (30 s, C's OUTPUT_INTERVAL) from its creation, and
``add_route`` hands its records back to be sent first.  Any other unrouted response is dropped
and counted (C logs ``fd is null after session is created``).

Routes are only forgotten with their connection (tcpcopy 1.0 sends no CLIENT_DEL).  C bounds
its table by evicting the least recently used item of a full hash slot; we bound it per
connection instead when ``max_routes_per_conn`` is set: the least recently used route of that
connection is evicted and counted (``route_evicted``).  ``max_delayed_records`` bounds the
delay buffer as a whole (C's is unbounded); records over it are dropped (``delayed_dropped``).
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from collections.abc import Hashable

from engine.errors import DecodeError

__all__ = ["DELAY_S", "MAX_DELAYED_RECORDS", "RouteKey", "Router", "route_key_c"]

DELAY_S = 30.0  # OUTPUT_INTERVAL: lifetime of a tuple's delayed list (spec §1.5, §2.3)
MAX_DELAYED_RECORDS = 65536  # all tuples together; ours, C has no bound

_SYN = 0x02
_RST = 0x04
_TCP_FLAGS_OFFSET = 20 + 13  # TCP is always at offset 20 in a record (spec §1.3)
# saddr, daddr (IP offsets 12, 16) then sport, dport (TCP offsets 0, 2) of a response record
_RECORD_TUPLE = struct.Struct("!12xIIHH")

RouteKey = tuple[int, int, int, int]  # (client_ip, client_port, target_ip or 0, target_port)

_MISSING = object()


def route_key_c(
    client_ip: int, client_port: int, target_ip: int, target_port: int, dnat: bool = False
) -> int:
    """C intercept's 32-bit route key (spec §1.5, LE-raw: NBO fields read as x86 integers).

    Arguments are the usual ints (address = value of the 4 network-order bytes).  For
    documentation and tests only: the Router keys by the exact tuple.
    """
    ci = int.from_bytes(client_ip.to_bytes(4, "big"), "little")
    ti = 0 if dnat else int.from_bytes(target_ip.to_bytes(4, "big"), "little")
    cp = int.from_bytes(client_port.to_bytes(2, "big"), "little")
    tp = int.from_bytes(target_port.to_bytes(2, "big"), "little")
    return ((cp << 16) + ci + cp + ti + (tp << 24) + (tp << 8) + tp) & 0xFFFFFFFF


class _DelayedList:
    __slots__ = ("created", "records")

    def __init__(self, created: float) -> None:
        self.created = created
        self.records: list[bytes] = []


class Router:
    """Route table + delayed SYN/RST buffer of one intercept (see the module docstring)."""

    def __init__(
        self,
        delay_s: float = DELAY_S,
        max_routes_per_conn: int | None = None,
        *,
        dnat: bool = False,
        max_delayed_records: int = MAX_DELAYED_RECORDS,
    ) -> None:
        if max_routes_per_conn is not None and max_routes_per_conn < 1:
            raise ValueError(f"max_routes_per_conn must be >= 1, not {max_routes_per_conn}")
        self.delay_s = delay_s
        self.max_routes_per_conn = max_routes_per_conn
        self.dnat = dnat
        self.max_delayed_records = max_delayed_records
        self._routes: dict[RouteKey, Hashable] = {}
        # conn -> its keys, least recently used first (drives removal and the per-conn limit)
        self._conn_routes: dict[Hashable, OrderedDict[RouteKey, None]] = {}
        self._delayed: dict[RouteKey, _DelayedList] = {}
        # delayed lists in creation order; `now` never goes back, so the oldest is leftmost
        self._delay_order: deque[tuple[RouteKey, _DelayedList]] = deque()
        self._delayed_count = 0
        self.stats: dict[str, int] = {
            "adds": 0,
            "routed": 0,
            "unrouted": 0,
            "delayed": 0,
            "delayed_flushed": 0,
            "delayed_expired": 0,
            "delayed_dropped": 0,
            "route_evicted": 0,
        }

    # --- queries ---------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of routes."""
        return len(self._routes)

    @property
    def delayed_records(self) -> int:
        """Records waiting in the delay buffer."""
        return self._delayed_count

    def key(self, client_ip: int, client_port: int, target_ip: int, target_port: int) -> RouteKey:
        return (client_ip, client_port, 0 if self.dnat else target_ip, target_port)

    def lookup(
        self, client_ip: int, client_port: int, target_ip: int, target_port: int
    ) -> Hashable | None:
        return self._routes.get(self.key(client_ip, client_port, target_ip, target_port))

    def routes_of(self, conn: Hashable) -> list[RouteKey]:
        """The keys routed to ``conn``, least recently used first."""
        return list(self._conn_routes.get(conn, ()))

    # --- inputs ----------------------------------------------------------------------------

    def add_route(
        self,
        client_ip: int,
        client_port: int,
        target_ip: int,
        target_port: int,
        conn: Hashable,
        now: float,
    ) -> list[bytes]:
        """A CLIENT_ADD from ``conn``: route the tuple there (the latest add wins, §1.5) and
        return the tuple's delayed SYN/RST records, oldest first, to send to ``conn`` now."""
        if conn is None:
            raise ValueError("conn must not be None")
        self.stats["adds"] += 1
        key = (client_ip, client_port, 0 if self.dnat else target_ip, target_port)
        old = self._routes.get(key, _MISSING)
        if old is not conn and old is not _MISSING:
            del self._conn_routes[old][key]
            if not self._conn_routes[old]:
                del self._conn_routes[old]
        self._routes[key] = conn
        keys = self._conn_routes.get(conn)
        if keys is None:
            keys = self._conn_routes[conn] = OrderedDict()
        keys[key] = None
        keys.move_to_end(key)
        limit = self.max_routes_per_conn
        if limit is not None and len(keys) > limit:
            evicted, _ = keys.popitem(last=False)
            del self._routes[evicted]
            self.stats["route_evicted"] += 1
        return self._take_delayed(key, now)

    def _take_delayed(self, key: RouteKey, now: float) -> list[bytes]:
        # router_add ends with delay_table_snd (§1.5): flush this tuple's waiting records.
        delayed = self._delayed.pop(key, None)
        if delayed is None:
            return []
        records = delayed.records
        self._delayed_count -= len(records)
        delayed.records = []  # its entry in _delay_order is now an empty husk
        if now - delayed.created >= self.delay_s:
            self.stats["delayed_expired"] += len(records)  # expire() was not called in time
            return []
        self.stats["delayed_flushed"] += len(records)
        return records

    def route(self, record: bytes, now: float) -> Hashable | None:
        """The connection for a response record, or None (delayed if SYN/RST, else dropped)."""
        if len(record) < _TCP_FLAGS_OFFSET + 1:
            raise DecodeError(f"response record of {len(record)} bytes is too short to route")
        saddr, daddr, sport, dport = _RECORD_TUPLE.unpack_from(record, 0)
        # router_update is fed (daddr, dest, saddr, source): the response goes to the client.
        key = (daddr, dport, 0 if self.dnat else saddr, sport)
        conn = self._routes.get(key, _MISSING)
        if conn is not _MISSING:
            self.stats["routed"] += 1
            if self.max_routes_per_conn is not None:
                self._conn_routes[conn].move_to_end(key)
            return conn
        if record[_TCP_FLAGS_OFFSET] & (_SYN | _RST):
            self._delay(key, bytes(record), now)
        else:
            self.stats["unrouted"] += 1
        return None

    def delay_record(self, record: bytes, now: float) -> None:
        """An unrouted SYN/RST record found by a batch router (engine/dataplane/responses):
        into the delay table as ``route`` puts it."""
        saddr, daddr, sport, dport = _RECORD_TUPLE.unpack_from(record, 0)
        self._delay((daddr, dport, 0 if self.dnat else saddr, sport), bytes(record), now)

    def _delay(self, key: RouteKey, record: bytes, now: float) -> None:
        if self._delayed_count >= self.max_delayed_records:
            self.expire(now)
            if self._delayed_count >= self.max_delayed_records:
                self.stats["delayed_dropped"] += 1
                return
        delayed = self._delayed.get(key)
        if delayed is not None and now - delayed.created >= self.delay_s:
            self._drop_delayed(key, delayed)
            delayed = None
        if delayed is None:
            delayed = self._delayed[key] = _DelayedList(now)
            self._delay_order.append((key, delayed))
        delayed.records.append(record)
        self._delayed_count += 1
        self.stats["delayed"] += 1

    def _drop_delayed(self, key: RouteKey, delayed: _DelayedList) -> None:
        del self._delayed[key]
        self.stats["delayed_expired"] += len(delayed.records)
        self._delayed_count -= len(delayed.records)
        delayed.records = []

    def remove_connection(self, conn: Hashable) -> int:
        """Forget every route to ``conn`` (its channel closed); returns how many."""
        keys = self._conn_routes.pop(conn, None)
        if not keys:
            return 0
        routes = self._routes
        for key in keys:
            del routes[key]
        return len(keys)

    def expire(self, now: float) -> int:
        """Drop delayed lists created ``delay_s`` or more ago; returns the records dropped."""
        order = self._delay_order
        dropped = 0
        while order and now - order[0][1].created >= self.delay_s:
            key, delayed = order.popleft()
            if self._delayed.get(key) is delayed:
                dropped += len(delayed.records)
                self._drop_delayed(key, delayed)
        return dropped
