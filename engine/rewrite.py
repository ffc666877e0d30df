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
"""
