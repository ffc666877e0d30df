"""Reading classic pcap files (offline replay, spec §3.16).  (pure: takes a binary file object)

Theory of operation: a pcap file is a 24-byte global header (magic, version, snaplen,
linktype) followed by records of a 16-byte header (seconds, sub-second, captured length,
wire length) and the captured bytes.  The magic tells the byte order and whether the
sub-second field counts microseconds or nanoseconds.  pcapng files (magic 0x0A0D0D0A) are a
different format: we refuse them with a one-line error that says how to convert.

Every defect is a ``DecodeError`` naming the byte offset, never a traceback.  A record cut
off by the end of the file (a capture that was killed) ends the iteration after counting
it in ``truncated_tail`` (its offset in ``truncated_at``, its bytes in ``truncated_bytes``),
because everything before it is still good data.  A record header that cannot be right
(a length above libpcap's bound, a sub-second field of a second or more) raises: the rest
of the file cannot be trusted, and the offline source stops the replay there.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

from engine.errors import DecodeError

__all__ = [
    "PCAP_GLOBAL_HEADER",
    "PCAP_RECORD_HEADER",
    "PcapReader",
    "corrupt_record",
    "open_pcap",
]

PCAP_GLOBAL_HEADER_BYTES = 24
PCAP_RECORD_HEADER_BYTES = 16
PCAP_MAX_RECORD_BYTES = 262_144  # libpcap's own upper bound for one record
PCAPNG_MAGIC = 0x0A0D0D0A

# magic as read little-endian -> (byte order, ticks per second)
_MAGICS = {
    0xA1B2C3D4: ("<", 1_000_000),
    0xD4C3B2A1: (">", 1_000_000),
    0xA1B23C4D: ("<", 1_000_000_000),
    0x4D3CB2A1: (">", 1_000_000_000),
}

PCAP_GLOBAL_HEADER = {order: struct.Struct(order + "IHHiIII") for order in "<>"}
PCAP_RECORD_HEADER = {order: struct.Struct(order + "IIII") for order in "<>"}


class PcapReader:
    """Iterate ``(ts_seconds, wire_len, frame)`` over the records of a pcap stream.

    ``frame`` is the captured bytes (``len(frame) < wire_len`` when the capture was
    truncated by its snaplen).  ``linktype`` and ``snaplen`` come from the global header.
    """

    def __init__(self, stream: BinaryIO, name: str = "<pcap>") -> None:
        self.name = name
        self._stream = stream
        head = stream.read(PCAP_GLOBAL_HEADER_BYTES)
        if len(head) < 4:
            raise DecodeError(f"{name}: not a pcap file (empty or shorter than 4 bytes)")
        (magic,) = struct.unpack_from("<I", head)
        if magic == PCAPNG_MAGIC:
            raise DecodeError(
                f"{name}: pcapng is not supported; convert it with "
                f"'editcap -F pcap {name} out.pcap' or 'tcpdump -r {name} -w out.pcap'"
            )
        if magic not in _MAGICS:
            raise DecodeError(f"{name}: not a pcap file (magic 0x{magic:08x} at offset 0)")
        if len(head) < PCAP_GLOBAL_HEADER_BYTES:
            raise DecodeError(f"{name}: pcap global header cut short at offset {len(head)}")
        self._order, self.ticks_per_s = _MAGICS[magic]
        _, major, _minor, _tz, _sigfigs, self.snaplen, linktype = PCAP_GLOBAL_HEADER[
            self._order
        ].unpack(head)
        if major != 2:
            raise DecodeError(f"{name}: unsupported pcap version {major} at offset 4")
        # The upper 16 bits may carry FCS information (pcap-linktype(7)); the type is below.
        self.linktype = linktype & 0xFFFF
        self.nanosecond = self.ticks_per_s == 1_000_000_000
        self.records = 0
        self.truncated_tail = 0
        self.truncated_at = 0
        self.truncated_bytes = 0
        self._offset = PCAP_GLOBAL_HEADER_BYTES

    def __iter__(self) -> Iterator[tuple[float, int, bytes]]:
        rec = PCAP_RECORD_HEADER[self._order]
        read = self._stream.read
        ticks = self.ticks_per_s
        while True:
            head = read(PCAP_RECORD_HEADER_BYTES)
            if not head:
                return
            if len(head) < PCAP_RECORD_HEADER_BYTES:
                self._cut(len(head))
                return
            sec, frac, caplen, wire_len = rec.unpack(head)
            if caplen > PCAP_MAX_RECORD_BYTES or frac >= ticks:
                raise DecodeError(corrupt_record(self.name, self._offset, caplen, frac))
            frame = read(caplen)
            if len(frame) < caplen:
                self._cut(PCAP_RECORD_HEADER_BYTES + len(frame))
                return
            self._offset += PCAP_RECORD_HEADER_BYTES + caplen
            self.records += 1
            yield sec + frac / ticks, max(wire_len, caplen), frame

    @property
    def big_endian(self) -> bool:
        """The records' byte order (from the magic)."""
        return self._order == ">"

    def readinto(self, buf: bytearray | memoryview) -> int:
        """The raw bytes of the records, from where the iteration would go on, for a caller
        that walks them itself (engine/dataplane/capture.pyx ``PcapWalker``); 0 at the end.
        It then keeps ``offset``, ``records`` and the cut with ``walked``."""
        return self._stream.readinto(buf)  # type: ignore[attr-defined,no-any-return]

    def walked(self, offset: int, records: int, cut_bytes: int = 0) -> None:
        """What a caller that walked the records found: the end of the last whole record,
        their number, and the bytes of a record cut by the end of the file (0: none)."""
        self._offset = offset
        self.records = records
        if cut_bytes:
            self._cut(cut_bytes)

    def close(self) -> None:
        """Close the stream the reader was given (it owns it); closing twice is harmless."""
        self._stream.close()

    def __enter__(self) -> PcapReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def offset(self) -> int:
        """Byte offset of the next record header (the end of the last whole record)."""
        return self._offset

    def _cut(self, got: int) -> None:
        self.truncated_tail += 1
        self.truncated_at = self._offset
        self.truncated_bytes = got


def corrupt_record(name: str, offset: int, caplen: int, frac: int) -> str:
    """The one line for a record header that cannot be right (a caplen above libpcap's
    bound, a sub-second field of a second or more) at byte ``offset``."""
    return f"{name}: corrupt record header at offset {offset} (caplen {caplen}, sub-second {frac})"


def open_pcap(path: str) -> PcapReader:
    """Open a pcap file for reading; ``DecodeError``/``OSError`` carry one-line messages."""
    stream = open(path, "rb")  # noqa: SIM115 - the reader owns the stream
    try:
        return PcapReader(stream, path)
    except BaseException:
        stream.close()
        raise
