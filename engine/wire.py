"""The tcpcopy <-> intercept wire protocol, compat mode = C TCPCopy 1.0 byte for byte.  (pure)

CONTRACT (spec §1.2-§1.4):
- CLIENT_RECORD = struct.Struct("!IHHIH") (14 bytes); TYPE_CLIENT_ADD = 1, TYPE_CLIENT_DEL = 2,
  INTERNAL_VERSION = 6; HANDSHAKE = the 14-byte version record.
- ``ClientRecord(client_ip, client_port, type, target_ip, target_port)`` frozen dataclass;
  ``encode_client_record(rec) -> bytes``; ``client_add(cip, cport, tip, tport) -> bytes``.
- ``ClientStreamDecoder().feed(data) -> list[ClientRecord]``: intercept's side; consumes the
  handshake first (8 then 6 bytes, spec §1.2; ``.version`` is set after it) and raises
  ``DecodeError`` for an "old client" (non-zero ip/port in the first 8 bytes). Any split.
- RESPONSE_RECORD_BYTES = 64, PAYLOAD_RECORD_BYTES = 192, COMB_MAX = 16, COMB_MAX_PAYLOAD = 6.
- ``encode_response_record(ip_packet: bytes, with_payload=False) -> bytes``: from a captured
  IP packet (may be truncated by snaplen): 20 IP bytes as captured, the TCP header copied
  ``doff*4`` bytes truncated to 44, zero fill; payload variant per spec §1.3 (bounded, no
  overrun).
- ``decode_response_record(rec: bytes) -> TcpPacket``: TCP at offset 20 whatever IHL says,
  options bounded by the record, ``data_len`` from tot_len - ihl*4 - doff*4 (clamped >= 0),
  ``payload`` from the payload variant when present.
- ``encode_frame(records: Sequence[bytes]) -> bytes`` = ``!H count`` + records.
- ``FrameDecoder(record_bytes=64, combined=True).feed(data) -> list[bytes]`` (records);
  raises ``DecodeError`` on count 0 or count > COMB_MAX (6 for 192-byte records).
"""
