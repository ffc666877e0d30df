"""SessionTable: the sessions of one worker, their timers, and response lookup.  (pure)

CONTRACT:
    t = SessionTable(config: SessionConfig)
    t.receive_client(pkt: TcpPacket, now)    # an ORIGINAL captured client->online packet
    t.receive_response(pkt: TcpPacket, now)  # a decoded response record
    t.handle_timer(now);  t.get_timer() -> float | None
    t.drain() -> tuple[list[ClientRoute], list[bytes]]
        # routes to announce (CLIENT_ADD), then packets to send; the shell sends all routes
        # of one drain before any packet of it.
    t.counters: Counter; t.active: int; t.unsend: int
"""
