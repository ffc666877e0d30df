"""TcpSession: the sans-IO simulated client TCP stack for one replayed connection.  (pure)

CONTRACT (design §5):
    s = TcpSession(config, client=(ip, port), target=(ip, port), online=(ip, port), now=now)
    s.receive_client(pkt, now)     # a captured client packet (already rewritten: src/sport =
                                   #   the fake client, dst/dport = the target)
    s.receive_response(pkt, now)   # a decoded response record (TcpPacket, data_len declared)
    s.handle_timer(now)
    s.packets_to_send(now) -> list[bytes]   # wire bytes, checksums done, each <= mtu
    s.get_timer() -> float | None           # absolute deadline (monotonic seconds)
    s.next_event() -> Event | None          # RouteNeeded before any SYN; SessionEnded
    s.finished -> bool                      # may be removed from the table (linger over)
    s.unsend -> int                         # captured client segments not yet sent
    s.counters: collections.Counter         # spec §3.18 names + drops by DropReason
"""
