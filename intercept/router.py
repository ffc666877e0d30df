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
"""
