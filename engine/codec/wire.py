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
- Extended (ours, design §6, docs/protocol.md): ``EXT_HELLO`` (14 bytes, type 0x4558);
  ``ExtendedClientHandshake(secret, client_nonce)`` (tcpcopy: ``feed(data) -> bytes to
  send``, ``done``, ``take_leftover()``; raises ``HandshakeRefused``/``ProofMismatch``/
  ``DecodeError``); ``InterceptStreamDecoder(secret, server_nonce, allow_compat=False)``
  (intercept: compat or extended, ``feed(data) -> list[ClientRecord]``, ``take_output()``,
  ``mode``, ``refused``, ``refuse_code``).  Nonces come from the caller (pure module).

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
from typing import cast

# Only the fixed IPv4 header travels; IP options are dropped (§1.3).
from engine.codec.packet import IP_HEADER_BYTES, TcpPacket
from engine.errors import DecodeError

__all__ = [
    "CLIENT_RECORD",
    "CLIENT_RECORD_BYTES",
    "CLIENT_RECORD_MIN_BYTES",
    "COMB_MAX",
    "COMB_MAX_PAYLOAD",
    "EXT_HELLO",
    "EXT_HELLO_TYPE",
    "EXT_INTERCEPT_CONTEXT",
    "EXT_KIND_ACCEPT",
    "EXT_KIND_CHALLENGE",
    "EXT_KIND_PROOF",
    "EXT_KIND_REFUSE",
    "EXT_MAC_BYTES",
    "EXT_MAGIC",
    "EXT_NONCE_BYTES",
    "EXT_PROOF_MSG",
    "EXT_SERVER_MSG",
    "EXT_TCPCOPY_CONTEXT",
    "EXT_VERSION",
    "FRAME_COUNT",
    "HANDSHAKE",
    "INTERNAL_VERSION",
    "MAX_PAYLOAD_IN_RECORD_BYTES",
    "MAX_RESPONSE_TCP_HEADER_BYTES",
    "PAYLOAD_RECORD_BYTES",
    "REFUSE_BAD_PROOF",
    "REFUSE_MALFORMED",
    "REFUSE_NO_SECRET",
    "REFUSE_REASONS",
    "REFUSE_VERSION",
    "RESPONSE_RECORD_BYTES",
    "TYPE_CLIENT_ADD",
    "TYPE_CLIENT_DEL",
    "ClientRecord",
    "ClientStreamDecoder",
    "DecodeError",
    "ExtendedClientHandshake",
    "FrameDecoder",
    "HandshakeRefused",
    "InterceptStreamDecoder",
    "ProofMismatch",
    "ResponseStreamDecoder",
    "client_add",
    "client_del",
    "decode_response_record",
    "encode_accept",
    "encode_challenge",
    "encode_client_record",
    "encode_frame",
    "encode_proof",
    "encode_refuse",
    "encode_response_record",
    "ext_mac",
    "max_records_per_frame",
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

OUT_BUFFER_MAX_BYTES = 4 * 1024 * 1024
"""Either end of the channel stops queueing records for a peer whose unsent output exceeds
this (tcpcopy's intercept channels, the intercept's tcpcopy connections)."""
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

    def __init__(self, version: int | None = None) -> None:
        # ``version`` given: the handshake was already consumed (the extended handshake's
        # InterceptStreamDecoder hands over the stream after it), records start at once.
        self._buf = bytearray()
        self._error: DecodeError | None = None
        self.version: int | None = version

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


# --- the extended handshake (ours; design §6, docs/protocol.md) -----------------------------
#
# Theory of operation
# -------------------
# tcpcopy-mp with --secret-file opens every channel with an *extended hello* instead of the
# version record.  The hello is a 14-byte client record like the compat handshake, so a C
# intercept reads it as one (zero ip/port, "version" EXT_HELLO_TYPE: it only logs
# "not compatible" and waits for 14-byte records, spec §1.2 step 3), while intercept-mp sees
# the type and runs a mutual challenge/response:
#
#   tcpcopy   -> intercept  HELLO      14 B  record(0, 0, 0x4558 'EX', 'TCMP', EXT_VERSION)
#   intercept -> tcpcopy    CHALLENGE  40 B  'TCMP' 1 EXT_VERSION 0 | server nonce (32)
#   tcpcopy   -> intercept  PROOF      72 B  'TCMP' 2 0 0 | client nonce (32) | client MAC (32)
#   intercept -> tcpcopy    ACCEPT     40 B  'TCMP' 3 0 0 | intercept MAC (32)
#                       or  REFUSE     40 B  'TCMP' 4 code 0 | 32 zero bytes, then close
#
# MAC = HMAC-SHA256(secret, server nonce || client nonce || context), with one context string
# per direction so one side's proof can never be replayed as the other's; fresh random nonces
# on both sides make every proof single-use.  The nonces are drawn by the I/O layer and passed
# in (this module stays pure).  After ACCEPT both directions are exactly the compat streams
# (14-byte client records; frames of response records), so the router and the framing code
# are shared.  A C intercept never answers the hello: tcpcopy-mp's handshake deadline expires
# and it says so; it never falls back to compat, which would let anyone downgrade the channel.

#: The hello's ``type`` (the field that carries the version in the compat handshake).
EXT_HELLO_TYPE = 0x4558  # 'EX'
EXT_MAGIC = b"TCMP"
EXT_VERSION = 1
EXT_NONCE_BYTES = 32
EXT_MAC_BYTES = 32  # SHA-256
#: tcpcopy's first record: clt_ip 0, clt_port 0, type 'EX', target_ip 'TCMP', target_port 1.
EXT_HELLO = CLIENT_RECORD.pack(0, 0, EXT_HELLO_TYPE, int.from_bytes(EXT_MAGIC, "big"), EXT_VERSION)
#: intercept -> tcpcopy: magic, kind, code, reserved (0), body (nonce, MAC or zeros).
EXT_SERVER_MSG = struct.Struct("!4sBBH32s")  # 40 bytes
#: tcpcopy -> intercept: magic, kind (PROOF), flags (0), reserved (0), client nonce, MAC.
EXT_PROOF_MSG = struct.Struct("!4sBBH32s32s")  # 72 bytes
EXT_KIND_CHALLENGE = 1
EXT_KIND_PROOF = 2
EXT_KIND_ACCEPT = 3
EXT_KIND_REFUSE = 4
REFUSE_BAD_PROOF = 1
REFUSE_NO_SECRET = 2
REFUSE_VERSION = 3
REFUSE_MALFORMED = 4
REFUSE_REASONS = {
    REFUSE_BAD_PROOF: "wrong secret (the proof does not verify)",
    REFUSE_NO_SECRET: "the intercept has no secret configured",
    REFUSE_VERSION: "unsupported extended protocol version",
    REFUSE_MALFORMED: "malformed handshake",
}
EXT_TCPCOPY_CONTEXT = b"tcpcopy-mp ext1 tcpcopy proof"
EXT_INTERCEPT_CONTEXT = b"tcpcopy-mp ext1 intercept proof"
_EXT_MAGIC_INT = int.from_bytes(EXT_MAGIC, "big")
_ZERO_BODY = bytes(EXT_MAC_BYTES)


class HandshakeRefused(DecodeError):
    """The intercept answered the extended hello or proof with REFUSE (``code``)."""

    def __init__(self, code: int) -> None:
        self.code = code
        reason = REFUSE_REASONS.get(code, f"unknown refusal code {code}")
        super().__init__(f"refused by the intercept: {reason}")


class ProofMismatch(DecodeError):
    """The intercept's ACCEPT does not carry a valid proof: it does not hold the secret."""


def ext_mac(secret: bytes, server_nonce: bytes, client_nonce: bytes, context: bytes) -> bytes:
    """HMAC-SHA256(secret, server_nonce || client_nonce || context) (fixed-size nonces, so
    the concatenation is unambiguous).  hashlib and hmac are imported here, by the process
    that authenticates a channel: the others never map OpenSSL's libcrypto."""
    import hashlib
    import hmac

    return hmac.new(secret, server_nonce + client_nonce + context, hashlib.sha256).digest()


def _same_mac(mac: bytes, expected: bytes) -> bool:
    """A comparison in constant time (hmac.compare_digest)."""
    import hmac

    return hmac.compare_digest(mac, expected)


def encode_challenge(server_nonce: bytes) -> bytes:
    _check_len("server nonce", server_nonce, EXT_NONCE_BYTES)
    return EXT_SERVER_MSG.pack(EXT_MAGIC, EXT_KIND_CHALLENGE, EXT_VERSION, 0, server_nonce)


def encode_proof(client_nonce: bytes, mac: bytes) -> bytes:
    _check_len("client nonce", client_nonce, EXT_NONCE_BYTES)
    _check_len("MAC", mac, EXT_MAC_BYTES)
    return EXT_PROOF_MSG.pack(EXT_MAGIC, EXT_KIND_PROOF, 0, 0, client_nonce, mac)


def encode_accept(mac: bytes) -> bytes:
    _check_len("MAC", mac, EXT_MAC_BYTES)
    return EXT_SERVER_MSG.pack(EXT_MAGIC, EXT_KIND_ACCEPT, 0, 0, mac)


def encode_refuse(code: int) -> bytes:
    return EXT_SERVER_MSG.pack(EXT_MAGIC, EXT_KIND_REFUSE, code, 0, _ZERO_BODY)


def _check_len(what: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ValueError(f"{what} of {len(value)} bytes (expected {size})")


class ExtendedClientHandshake:
    """tcpcopy's side of the extended handshake (send ``EXT_HELLO`` first).

    ``feed(data) -> bytes`` returns what to send back (the PROOF once the CHALLENGE is in,
    else ``b""``).  ``done`` turns True on a valid ACCEPT; the bytes that followed it are the
    start of the frame stream (``take_leftover``).  Raises ``HandshakeRefused`` (REFUSE),
    ``ProofMismatch`` (ACCEPT without the right intercept MAC) or ``DecodeError`` (anything
    that is not this protocol, e.g. a C intercept's frame); every later ``feed`` raises again.
    Any split.
    """

    __slots__ = ("secret", "client_nonce", "server_nonce", "done", "_buf", "_error")

    def __init__(self, secret: bytes, client_nonce: bytes) -> None:
        if not secret:
            raise ValueError("empty secret")
        _check_len("client nonce", client_nonce, EXT_NONCE_BYTES)
        self.secret = bytes(secret)
        self.client_nonce = bytes(client_nonce)
        self.server_nonce: bytes | None = None
        self.done = False
        self._buf = bytearray()
        self._error: DecodeError | None = None

    hello = EXT_HELLO

    def feed(self, data: bytes) -> bytes:
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        if self.done:
            return b""
        try:
            return self._advance()
        except DecodeError as e:
            self._error = e
            raise

    def _advance(self) -> bytes:
        buf = self._buf
        out = b""
        size = EXT_SERVER_MSG.size
        if self.server_nonce is None:
            if len(buf) < size:
                return out
            nonce = self._take(EXT_KIND_CHALLENGE)
            self.server_nonce = nonce
            mac = ext_mac(self.secret, nonce, self.client_nonce, EXT_TCPCOPY_CONTEXT)
            out = encode_proof(self.client_nonce, mac)
        if len(buf) < size:
            return out
        mac = self._take(EXT_KIND_ACCEPT)
        expected = ext_mac(self.secret, self.server_nonce, self.client_nonce, EXT_INTERCEPT_CONTEXT)
        if not _same_mac(mac, expected):
            raise ProofMismatch(
                "the intercept's proof does not verify: it does not hold our secret"
            )
        self.done = True
        return out

    def _take(self, want_kind: int) -> bytes:
        buf = self._buf
        magic, kind, code, _reserved, body = EXT_SERVER_MSG.unpack_from(buf, 0)
        if magic != EXT_MAGIC:
            raise DecodeError(
                f"not an extended intercept answer (starts {bytes(buf[:8]).hex()}; "
                "a C intercept or an intercept-mp without extended support?)"
            )
        if kind == EXT_KIND_REFUSE:
            raise HandshakeRefused(code)
        if kind != want_kind:
            raise DecodeError(f"extended handshake message of kind {kind}, expected {want_kind}")
        if kind == EXT_KIND_CHALLENGE and code != EXT_VERSION:
            raise DecodeError(f"the intercept speaks extended version {code}, we {EXT_VERSION}")
        del buf[: EXT_SERVER_MSG.size]
        return cast(bytes, body)

    def take_leftover(self) -> bytes:
        """After ``done``: the bytes received past the ACCEPT (the frame stream's start)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data


class InterceptStreamDecoder:
    """intercept-mp's reader of one tcpcopy connection: compat or extended handshake, then
    the 14-byte client records (spec §1.2, design §6).

    ``secret`` None: every peer is compat (C behaviour; an extended hello is REFUSEd with
    REFUSE_NO_SECRET).  With a secret: extended peers must prove it; compat peers (which cannot
    authenticate) are accepted only with ``allow_compat``.  ``server_nonce`` is this
    connection's fresh 32 random bytes.

    ``feed(data) -> list[ClientRecord]`` (records only once the handshake succeeded);
    ``take_output()`` returns what to send the peer (CHALLENGE, ACCEPT or REFUSE).  After a
    refusal ``refused`` holds the reason (``refuse_code`` the wire code, None for a compat
    peer, which gets nothing), later input is ignored, and the caller closes the connection.
    ``mode`` is "compat" or "extended" once the first record tells; ``version`` is the compat
    handshake's version.  An old (pre-version) client raises ``DecodeError`` as in
    ``ClientStreamDecoder``.  Extended peers may pipeline records after the proof; they are
    only returned once it verified.  The outcome does not depend on how input is split.
    """

    __slots__ = (
        "secret",
        "allow_compat",
        "server_nonce",
        "client_nonce",
        "mode",
        "refused",
        "refuse_code",
        "_phase",
        "_buf",
        "_out",
        "_records",
        "_error",
    )

    _FIRST, _HELLO, _PROOF, _OPEN, _REFUSED = range(5)

    def __init__(
        self, secret: bytes | None, server_nonce: bytes, allow_compat: bool = False
    ) -> None:
        if secret is not None and not secret:
            raise ValueError("empty secret")
        _check_len("server nonce", server_nonce, EXT_NONCE_BYTES)
        self.secret = secret
        self.allow_compat = allow_compat or secret is None
        self.server_nonce = bytes(server_nonce)
        self.client_nonce: bytes | None = None
        self.mode: str | None = None
        self.refused: str | None = None
        self.refuse_code: int | None = None
        self._phase = self._FIRST
        self._buf = bytearray()
        self._out = bytearray()
        self._records: ClientStreamDecoder | None = None
        self._error: DecodeError | None = None

    @property
    def handshake_done(self) -> bool:
        """True once records flow (compat handshake read, or extended proof verified)."""
        return self._records is not None and self._records.version is not None

    @property
    def version(self) -> int | None:
        """The compat handshake's version (None before it, and for extended peers)."""
        if self.mode != "compat" or self._records is None:
            return None
        return self._records.version

    @property
    def pending_bytes(self) -> int:
        return len(self._buf) + (self._records.pending_bytes if self._records else 0)

    def take_output(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def feed(self, data: bytes) -> list[ClientRecord]:
        if self._error is not None:
            raise self._error
        if self._phase == self._REFUSED:
            return []  # a refused peer's further bytes are read and dropped
        if self._records is not None:
            return self._records.feed(data)
        buf = self._buf
        buf += data
        if self._phase == self._FIRST:
            if len(buf) < CLIENT_RECORD_MIN_BYTES:
                return []
            clt_ip, clt_port, kind = _HANDSHAKE_HEAD.unpack_from(buf, 0)
            if clt_ip or clt_port:  # §1.2 step 2: an old client, same as compat
                self._error = DecodeError(
                    f"client too old for intercept (first record ip={clt_ip:#x} port={clt_port})"
                )
                raise self._error
            if kind != EXT_HELLO_TYPE:
                self.mode = "compat"
                if not self.allow_compat:
                    self._refuse(None, "compat (unauthenticated) tcpcopy while a secret is set")
                    return []
                self._records = ClientStreamDecoder()
                rest = bytes(buf)
                buf.clear()
                return self._records.feed(rest)
            self.mode = "extended"
            self._phase = self._HELLO
        if self._phase == self._HELLO:
            if len(buf) < CLIENT_RECORD_BYTES:
                return []
            _ip, _port, _kind, magic, ext_version = CLIENT_RECORD.unpack_from(buf, 0)
            del buf[:CLIENT_RECORD_BYTES]
            if magic != _EXT_MAGIC_INT:
                self._refuse(REFUSE_MALFORMED, "extended hello without the TCMP magic")
                return []
            if ext_version != EXT_VERSION:
                self._refuse(REFUSE_VERSION, f"extended version {ext_version} (we speak 1)")
                return []
            if self.secret is None:
                self._refuse(REFUSE_NO_SECRET, "extended hello but no --secret-file here")
                return []
            self._out += encode_challenge(self.server_nonce)
            self._phase = self._PROOF
        if self._phase == self._PROOF:
            if len(buf) < EXT_PROOF_MSG.size:
                return []
            magic, kind, _flags, _reserved, client_nonce, mac = EXT_PROOF_MSG.unpack_from(buf, 0)
            del buf[: EXT_PROOF_MSG.size]
            if magic != EXT_MAGIC or kind != EXT_KIND_PROOF:
                self._refuse(REFUSE_MALFORMED, "the message after the challenge is no proof")
                return []
            assert self.secret is not None
            expected = ext_mac(self.secret, self.server_nonce, client_nonce, EXT_TCPCOPY_CONTEXT)
            if not _same_mac(mac, expected):
                self._refuse(REFUSE_BAD_PROOF, "wrong secret (HMAC does not verify)")
                return []
            self.client_nonce = client_nonce
            self._out += encode_accept(
                ext_mac(self.secret, self.server_nonce, client_nonce, EXT_INTERCEPT_CONTEXT)
            )
            self._phase = self._OPEN
            self._records = ClientStreamDecoder(version=INTERNAL_VERSION)
            rest = bytes(buf)
            buf.clear()
            return self._records.feed(rest)
        return []

    def _refuse(self, code: int | None, reason: str) -> None:
        self.refused = reason
        self.refuse_code = code
        self._phase = self._REFUSED
        self._buf.clear()
        if code is not None:
            self._out += encode_refuse(code)


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

    def feed_records(self, data: bytes | bytearray | memoryview) -> bytes:
        """Like ``feed`` but the complete records come back as one bytes, back to back
        (frame counts removed): what a batch call decodes in place (``len // record_bytes``
        records).  Same errors as ``feed``."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        size = self.record_bytes
        avail = len(buf)
        pos = 0
        if not self.combined:
            pos = avail - avail % size
            out = bytes(buf[:pos])
        else:
            pieces: list[bytes | bytearray] = []
            max_count = self.max_count
            frames = 0
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
                pieces.append(buf[pos + 2 : end])
                frames += 1
                pos = end
            out = b"".join(pieces)
            self.frames += frames
        if pos:
            del buf[:pos]
            if not self.combined:
                self.frames += pos // size
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
