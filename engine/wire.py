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

Theory of operation
-------------------
Two byte streams share one TCP connection per channel:

* tcpcopy -> intercept: one 14-byte handshake record (all zero but ``type`` = version), then
  14-byte client records (spec §1.2).  ``ClientStreamDecoder`` is intercept's reader.
* intercept -> tcpcopy: fixed-size response records (64 bytes, or 192 with the payload
  build), either as a plain stream or batched in frames ``!H count`` + records (spec §1.4).
  ``FrameDecoder`` cuts the stream into records; ``decode_response_record`` turns one record
  into a ``TcpPacket``; ``ResponseStreamDecoder`` chains the two for tcpcopy's worker.

Decoders are push parsers: ``feed`` takes any split of the stream (a byte at a time, many
frames at once) and keeps incomplete trailing bytes for the next call.  A framing error
desynchronises the stream for good, so a decoder that raised ``DecodeError`` raises again on
every later ``feed``: the caller closes the connection (as C tcpcopy does, spec §1.4).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from engine.errors import DecodeError
from engine.packet import TcpPacket

__all__ = [
    "CLIENT_RECORD",
    "CLIENT_RECORD_BYTES",
    "CLIENT_RECORD_MIN_BYTES",
    "INTERNAL_VERSION",
    "TYPE_CLIENT_ADD",
    "TYPE_CLIENT_DEL",
    "HANDSHAKE",
    "RESPONSE_RECORD_BYTES",
    "PAYLOAD_RECORD_BYTES",
    "COMB_MAX",
    "COMB_MAX_PAYLOAD",
    "MAX_RESPONSE_TCP_HEADER_BYTES",
    "MAX_PAYLOAD_IN_RECORD_BYTES",
    "FRAME_COUNT",
    "ClientRecord",
    "encode_client_record",
    "client_add",
    "client_del",
    "ClientStreamDecoder",
    "encode_response_record",
    "decode_response_record",
    "encode_frame",
    "max_records_per_frame",
    "FrameDecoder",
    "ResponseStreamDecoder",
    "DecodeError",
]

# --- tcpcopy -> intercept (spec §1.2) -------------------------------------------------------

#: msg_clt_t: clt_ip, clt_port, type, target_ip, target_port, all NBO, packed.
CLIENT_RECORD = struct.Struct("!IHHIH")
CLIENT_RECORD_BYTES = CLIENT_RECORD.size  # 14
#: The pre-version record size (MSG_CLT_MIN_SIZE): intercept reads the handshake in 8 + 6.
CLIENT_RECORD_MIN_BYTES = 8
_HANDSHAKE_HEAD = struct.Struct("!IHH")  # clt_ip, clt_port, type(=version) of the first 8 bytes

INTERNAL_VERSION = 6
TYPE_CLIENT_ADD = 1
TYPE_CLIENT_DEL = 2
HANDSHAKE = CLIENT_RECORD.pack(0, 0, INTERNAL_VERSION, 0, 0)

# --- intercept -> tcpcopy (spec §1.3-§1.4) ---------------------------------------------------

IP_HEADER_BYTES = 20  # only the fixed IPv4 header travels; IP options are dropped (§1.3)
TCP_HEADER_MIN_BYTES = 20
MAX_RESPONSE_TCP_HEADER_BYTES = 44  # 20 + MAX_OPTION_LEN 24
MAX_PAYLOAD_IN_RECORD_BYTES = 128  # MAX_PAYLOAD_LEN
RESPONSE_RECORD_BYTES = IP_HEADER_BYTES + MAX_RESPONSE_TCP_HEADER_BYTES  # 64
PAYLOAD_RECORD_BYTES = RESPONSE_RECORD_BYTES + MAX_PAYLOAD_IN_RECORD_BYTES  # 192
COMB_MAX = 16  # COMB_MAX_NUM, default build
COMB_MAX_PAYLOAD = 6  # COMB_MAX_NUM, --with-resp-payload build
FRAME_COUNT = struct.Struct("!H")

_TCP_OFFSET_IN_RECORD = IP_HEADER_BYTES  # always 20, whatever IHL says (§1.3, §6 item 2)
_OPTIONS_OFFSET_IN_RECORD = _TCP_OFFSET_IN_RECORD + TCP_HEADER_MIN_BYTES
_IPPROTO_TCP = 6
_IP_DF = 0x4000

# IPv4 fixed header + TCP fixed header, as one struct so a record decodes in one call:
# ver_ihl tos tot_len id frag_off ttl proto csum saddr daddr | sport dport seq ack
# doff_res flags window csum urg
_IP_TCP = struct.Struct("!BBHHHBBHIIHHIIBBHHH")
_IP_HEAD = struct.Struct("!BBH5xB")  # ver_ihl, tos, tot_len, ..., proto (offset 9)
_ZEROS = bytes(PAYLOAD_RECORD_BYTES)


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """One 14-byte msg_clt_t, fields in wire order (addresses as 32-bit ints, spec §1.2)."""

    client_ip: int
    client_port: int
    type: int
    target_ip: int
    target_port: int


def encode_client_record(rec: ClientRecord) -> bytes:
    """The 14 wire bytes of ``rec`` (``struct.error`` if a field is out of range)."""
    return CLIENT_RECORD.pack(
        rec.client_ip, rec.client_port, rec.type, rec.target_ip, rec.target_port
    )


def client_add(client_ip: int, client_port: int, target_ip: int, target_port: int) -> bytes:
    """A CLIENT_ADD record: sent before the SYN, with the client as sent to the target (§1.2)."""
    return CLIENT_RECORD.pack(client_ip, client_port, TYPE_CLIENT_ADD, target_ip, target_port)


def client_del(client_ip: int, client_port: int, target_ip: int, target_port: int) -> bytes:
    """A CLIENT_DEL record.  C tcpcopy 1.0 never sends one and C intercept only logs it (§1.2)."""
    return CLIENT_RECORD.pack(client_ip, client_port, TYPE_CLIENT_DEL, target_ip, target_port)


class ClientStreamDecoder:
    """intercept's reader of one tcpcopy connection (spec §1.2).

    ``feed(data)`` returns the complete records after the handshake, in order.  Unknown
    ``type`` values are returned as they are, for the caller to log (C logs
    ``unknown msg type``).  ``version`` is None until the handshake is complete; a version
    other than INTERNAL_VERSION is accepted (C only warns), so the caller should log it.
    """

    __slots__ = ("_buf", "_error", "version")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: DecodeError | None = None
        self.version: int | None = None

    @property
    def handshake_done(self) -> bool:
        return self.version is not None

    @property
    def pending_bytes(self) -> int:
        """Bytes held back (an incomplete handshake or record)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[ClientRecord]:
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        if self.version is None:
            if len(buf) < CLIENT_RECORD_MIN_BYTES:
                return []
            # §1.2 step 2: the first 8 bytes are the old record format; a non-zero client
            # ip/port means an old tcpcopy, which C intercept in effect disconnects.
            clt_ip, clt_port, version = _HANDSHAKE_HEAD.unpack_from(buf, 0)
            if clt_ip or clt_port:
                self._error = DecodeError(
                    f"client too old for intercept (first record ip={clt_ip:#x} port={clt_port})"
                )
                raise self._error
            if len(buf) < CLIENT_RECORD_BYTES:
                return []
            # §1.2 step 3: no hard version check; the remaining 6 bytes are ignored.
            self.version = version
            del buf[:CLIENT_RECORD_BYTES]
        usable = len(buf) - len(buf) % CLIENT_RECORD_BYTES
        if not usable:
            return []
        out = [ClientRecord(*t) for t in CLIENT_RECORD.iter_unpack(memoryview(buf)[:usable])]
        del buf[:usable]
        return out


# --- response records ------------------------------------------------------------------------


def encode_response_record(ip_packet: bytes, with_payload: bool = False) -> bytes:
    """Build intercept's response record from a captured IPv4/TCP packet (spec §1.3).

    ``ip_packet`` starts at the IP header and may be cut short by the capture snaplen.
    Raises ``DecodeError`` for what C intercept drops before routing (spec §2.2 steps 3-4):
    not IPv4, not TCP, ``ihl*4 < 20`` or ``doff*4 < 20``, or too short to hold the IP header
    and a 20-byte TCP header.  Any bytes-like object is accepted (e.g. a memoryview past L2).
    """
    if type(ip_packet) is not bytes:
        ip_packet = bytes(ip_packet)
    n = len(ip_packet)
    if n < IP_HEADER_BYTES:
        raise DecodeError(f"response packet of {n} bytes is shorter than an IPv4 header")
    ver_ihl, _tos, tot_len, proto = _IP_HEAD.unpack_from(ip_packet, 0)
    ihl_bytes = (ver_ihl & 0x0F) * 4
    if ver_ihl >> 4 != 4 or proto != _IPPROTO_TCP or ihl_bytes < IP_HEADER_BYTES:
        raise DecodeError(f"not an IPv4/TCP header (ver_ihl={ver_ihl:#x} proto={proto})")
    if n < ihl_bytes + TCP_HEADER_MIN_BYTES:
        raise DecodeError(f"response packet of {n} bytes holds no complete TCP header")
    doff_bytes = (ip_packet[ihl_bytes + 12] >> 4) * 4
    if doff_bytes < TCP_HEADER_MIN_BYTES:
        raise DecodeError(f"TCP data offset {doff_bytes} < 20")
    # The TCP header (with options) is copied doff*4 bytes, truncated to 44 (§1.3); we also
    # stop at the end of what was captured instead of copying whatever lies beyond it.
    tcp_end = ihl_bytes + min(doff_bytes, MAX_RESPONSE_TCP_HEADER_BYTES)
    head = ip_packet[:IP_HEADER_BYTES] + ip_packet[ihl_bytes:tcp_end]
    if not with_payload:
        return head + _ZEROS[: RESPONSE_RECORD_BYTES - len(head)]
    # Payload variant (§1.3): L bytes are copied straight after the TCP header, at record
    # offset 20 + doff*4, only when 1 <= L <= 128.  QUIRK fixed: C copies L bytes even when
    # doff*4 > 44 runs them past the 192-byte record; we stop at the record's end (and at
    # the end of the captured bytes).
    payload_len = tot_len - ihl_bytes - doff_bytes
    if 1 <= payload_len <= MAX_PAYLOAD_IN_RECORD_BYTES:
        dst = IP_HEADER_BYTES + doff_bytes  # >= len(head): the gap (lost options) stays zero
        src = ihl_bytes + doff_bytes
        chunk = ip_packet[src : src + min(payload_len, PAYLOAD_RECORD_BYTES - dst)]
        head = head + _ZEROS[: dst - len(head)] + chunk
    return head + _ZEROS[: PAYLOAD_RECORD_BYTES - len(head)]


def decode_response_record(rec: bytes) -> TcpPacket:
    """One 64- or 192-byte response record -> ``TcpPacket`` (spec §1.3, §6 item 2).

    The TCP header is read at offset 20 whatever IHL says (the C tcpcopy QUIRK of reading it
    at ``ihl*4`` is not copied); options stop at the record's TCP area (44 bytes).
    ``data_len`` is the payload length the IP header declares; ``payload`` holds the bytes the
    payload variant carries (empty in 64-byte records or when L > 128).
    """
    if type(rec) is not bytes:
        rec = bytes(rec)  # slices below become the packet's immutable options/payload
    n = len(rec)
    if n != RESPONSE_RECORD_BYTES and n != PAYLOAD_RECORD_BYTES:
        raise DecodeError(f"response record of {n} bytes (expected 64 or 192)")
    (
        ver_ihl,
        tos,
        tot_len,
        ip_id,
        frag_off,
        ttl,
        proto,
        _ip_csum,
        saddr,
        daddr,
        sport,
        dport,
        seq,
        ack,
        doff_res,
        flags,
        window,
        _tcp_csum,
        urgent,
    ) = _IP_TCP.unpack_from(rec, 0)
    ihl_bytes = (ver_ihl & 0x0F) * 4
    doff_bytes = (doff_res >> 4) * 4
    if ver_ihl >> 4 != 4 or ihl_bytes < IP_HEADER_BYTES or proto != _IPPROTO_TCP:
        raise DecodeError(f"response record without an IPv4/TCP header (ver_ihl={ver_ihl:#x})")
    if doff_bytes < TCP_HEADER_MIN_BYTES:
        raise DecodeError(f"response record with TCP data offset {doff_bytes} < 20")
    tcp_area_end = _TCP_OFFSET_IN_RECORD + min(doff_bytes, MAX_RESPONSE_TCP_HEADER_BYTES)
    data_len = tot_len - ihl_bytes - doff_bytes
    if data_len < 0:
        data_len = 0
    payload = b""
    if n == PAYLOAD_RECORD_BYTES and 1 <= data_len <= MAX_PAYLOAD_IN_RECORD_BYTES:
        start = _TCP_OFFSET_IN_RECORD + doff_bytes
        payload = rec[start : start + data_len]
    # Positional arguments (TcpPacket's field order) are ~3x faster than keywords on this
    # per-record path; test_wire checks every field by name.
    return TcpPacket(
        saddr,
        daddr,
        sport,
        dport,
        seq,
        ack,
        flags,
        window,
        rec[_OPTIONS_OFFSET_IN_RECORD:tcp_area_end],
        payload,
        data_len,
        ip_id,
        ttl,
        tos,
        bool(frag_off & _IP_DF),
        urgent,
    )


# --- framing (spec §1.4) ---------------------------------------------------------------------


def max_records_per_frame(record_bytes: int) -> int:
    """COMB_MAX_NUM of the build that uses ``record_bytes`` records (16, or 6 with payload)."""
    return COMB_MAX_PAYLOAD if record_bytes == PAYLOAD_RECORD_BYTES else COMB_MAX


def encode_frame(records: Sequence[bytes]) -> bytes:
    """``!H count`` + the records.  ``ValueError`` for a frame a C tcpcopy would reject:
    no records, mixed or unknown record sizes, or more than COMB_MAX_NUM records."""
    count = len(records)
    if count == 0:
        raise ValueError("a frame holds at least one record")  # C intercept never sends 0
    size = len(records[0])
    if size != RESPONSE_RECORD_BYTES and size != PAYLOAD_RECORD_BYTES:
        raise ValueError(f"record of {size} bytes (expected 64 or 192)")
    if count > max_records_per_frame(size):
        raise ValueError(f"{count} records > {max_records_per_frame(size)} per frame")
    body = b"".join(records)
    if len(body) != count * size:
        raise ValueError("records of different sizes in one frame")
    return FRAME_COUNT.pack(count) + body


class FrameDecoder:
    """tcpcopy's reader of intercept's stream: bytes in, fixed-size records out (spec §1.4).

    ``combined=True`` (the default build): frames ``!H count`` + count records, with
    ``1 <= count <= max_count`` (COMB_MAX, or COMB_MAX_PAYLOAD for 192-byte records), else
    ``DecodeError`` (C tcpcopy logs ``num:%d > threshold`` and closes the connection).
    ``combined=False``: a plain stream of records.  ``frames`` counts complete frames.
    """

    __slots__ = ("record_bytes", "combined", "max_count", "frames", "_buf", "_error")

    def __init__(
        self,
        record_bytes: int = RESPONSE_RECORD_BYTES,
        combined: bool = True,
        max_count: int | None = None,
    ) -> None:
        if record_bytes <= 0:
            raise ValueError(f"record_bytes must be positive, not {record_bytes}")
        self.record_bytes = record_bytes
        self.combined = combined
        self.max_count = max_records_per_frame(record_bytes) if max_count is None else max_count
        self.frames = 0
        self._buf = bytearray()
        self._error: DecodeError | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete frame/record held for the next ``feed`` (0 = on a boundary)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """The complete records in ``data`` plus what was held back, in stream order."""
        frames = self.feed_frames(data)
        if len(frames) == 1:
            return frames[0]
        return [rec for frame in frames for rec in frame]

    def feed_frames(self, data: bytes) -> list[list[bytes]]:
        """Like ``feed`` but keeps the frame boundaries (non-combined: one record per frame)."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        size = self.record_bytes
        avail = len(buf)
        out: list[list[bytes]] = []
        pos = 0
        if not self.combined:
            usable = avail - avail % size
            if usable:
                raw = bytes(buf[:usable])
                out = [[raw[i : i + size]] for i in range(0, usable, size)]
                pos = usable
        else:
            max_count = self.max_count
            while avail - pos >= 2:
                count = (buf[pos] << 8) | buf[pos + 1]
                if count == 0 or count > max_count:
                    self._error = DecodeError(
                        f"frame of {count} records (allowed 1..{max_count}) at stream offset +{pos}"
                    )
                    raise self._error
                end = pos + 2 + count * size
                if end > avail:
                    break
                raw = bytes(buf[pos + 2 : end])
                out.append([raw[i : i + size] for i in range(0, count * size, size)])
                pos = end
        if pos:
            del buf[:pos]
            self.frames += len(out)
        return out


class ResponseStreamDecoder:
    """tcpcopy's side in one object: ``FrameDecoder`` + ``decode_response_record``.

    ``feed(data) -> list[TcpPacket]``.  Framing errors raise ``DecodeError`` (close the
    connection); a single record that does not decode does not desynchronise the stream, so
    it is skipped and counted in ``bad_records`` instead.
    """

    __slots__ = ("framer", "bad_records")

    def __init__(self, record_bytes: int = RESPONSE_RECORD_BYTES, combined: bool = True) -> None:
        self.framer = FrameDecoder(record_bytes, combined)
        self.bad_records = 0

    @property
    def pending_bytes(self) -> int:
        return self.framer.pending_bytes

    def feed(self, data: bytes) -> list[TcpPacket]:
        out = []
        for rec in self.framer.feed(data):
            try:
                out.append(decode_response_record(rec))
            except DecodeError:
                self.bad_records += 1
        return out
