"""The compiled twin of ``Router``: the routes in engine.dataplane.responses' C table.

Theory of operation
-------------------
``CompiledRouter`` is a ``Router`` (intercept/router.py, the specification) whose route table
lives in a ``ResponseTable`` (engine/dataplane/responses.pyx): the same adds (the latest
wins), the same per-connection LRU and limit (``route_evicted``), the same
``remove_connection``, lookups and stats.  The delay table of SYN/RST records stays
Router's, in Python (it is rare).  Connections are opaque objects to the router and small
ints ("slots") to the C table: a connection gets a slot at its first add and gives it back
in ``remove_connection``.

The table is also what the NFQUEUE source reads with (``ResponseTable.recv``): one call
parses a read batch, encodes and routes every record in C and leaves the records per slot;
the server takes them per connection (``InterceptServer.receive_response_batch``) and hands
the unrouted SYN/RST records to ``delay_record``.  ``conn_at`` maps slots back.

``compiled_available()`` says whether the extension is built (``--engine``, intercept/cli.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Hashable
from typing import Any

from engine.errors import DecodeError
from intercept.router import DELAY_S, MAX_DELAYED_RECORDS, RouteKey, Router

__all__ = ["COMPILED_MODULE", "CompiledRouter", "compiled_available"]

COMPILED_MODULE = "engine.dataplane.responses"
_SYN_RST = 0x02 | 0x04
_TCP_FLAGS_OFFSET = 20 + 13


def _module() -> Any:
    return importlib.import_module(COMPILED_MODULE)


def compiled_available() -> tuple[bool, str]:
    """(True, "") when the compiled response path is built, else (False, why not)."""
    try:
        _module()
    except ImportError as exc:
        return False, f"{COMPILED_MODULE} is not built ({exc})"
    return True, ""


class CompiledRouter(Router):
    """``Router`` with its routes in C (module docstring); raises ImportError when the
    extension is not built."""

    def __init__(
        self,
        delay_s: float = DELAY_S,
        max_routes_per_conn: int | None = None,
        *,
        dnat: bool = False,
        max_delayed_records: int = MAX_DELAYED_RECORDS,
        recv_max: int = 256,
        recv_bytes: int = 2048,
    ) -> None:
        super().__init__(
            delay_s, max_routes_per_conn, dnat=dnat, max_delayed_records=max_delayed_records
        )
        self.table = _module().ResponseTable(
            limit=max_routes_per_conn or 0, dnat=dnat, recv_max=recv_max, bufsize=recv_bytes
        )
        self.conn_at: list[Hashable | None] = []  # slot -> connection
        self._slot_of: dict[Hashable, int] = {}
        self._free_slots: list[int] = []

    def __len__(self) -> int:
        return len(self.table)

    def lookup(
        self, client_ip: int, client_port: int, target_ip: int, target_port: int
    ) -> Hashable | None:
        slot = self.table.lookup(client_ip, client_port, target_ip, target_port)
        return None if slot < 0 else self.conn_at[slot]

    def routes_of(self, conn: Hashable) -> list[RouteKey]:
        slot = self._slot_of.get(conn)
        return [] if slot is None else self.table.routes_of(slot)

    def _slot(self, conn: Hashable) -> int:
        slot = self._slot_of.get(conn)
        if slot is None:
            if self._free_slots:
                slot = self._free_slots.pop()
                self.conn_at[slot] = conn
            else:
                slot = len(self.conn_at)
                self.conn_at.append(conn)
            self._slot_of[conn] = slot
        return slot

    def add_route(
        self,
        client_ip: int,
        client_port: int,
        target_ip: int,
        target_port: int,
        conn: Hashable,
        now: float,
    ) -> list[bytes]:
        if conn is None:
            raise ValueError("conn must not be None")
        self.stats["adds"] += 1
        if self.table.add(client_ip, client_port, target_ip, target_port, self._slot(conn)):
            self.stats["route_evicted"] += 1
        key = (client_ip, client_port, 0 if self.dnat else target_ip, target_port)
        return self._take_delayed(key, now)

    def route(self, record: bytes, now: float) -> Hashable | None:
        if len(record) < _TCP_FLAGS_OFFSET + 1:
            raise DecodeError(f"response record of {len(record)} bytes is too short to route")
        slot = self.table.route(bytes(record))
        if slot >= 0:
            self.stats["routed"] += 1
            return self.conn_at[slot]
        if record[_TCP_FLAGS_OFFSET] & _SYN_RST:
            self.delay_record(record, now)
        else:
            self.stats["unrouted"] += 1
        return None

    def remove_connection(self, conn: Hashable) -> int:
        slot = self._slot_of.pop(conn, None)
        if slot is None:
            return 0
        removed: int = self.table.remove_slot(slot)
        self.conn_at[slot] = None
        self._free_slots.append(slot)
        return removed
