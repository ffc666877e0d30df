"""-F: a tcpdump-syntax capture filter, compiled by libpcap (spec §3.2, C's --pcap-capture).

Theory of operation
-------------------
libpcap's own compiler turns the expression into a classic BPF program (``pcap_compile`` on
a dead handle, through ctypes: python-libpcap exposes neither the program nor the
compiler's error text).  It is compiled for raw IPv4 (DLT_RAW: the IP header at offset 0),
which is what every capture mode can place it on: engine/codec/bpf.py moves its loads onto the
IP header the -x program found (offset 0 on the IPPROTO_TCP socket, the skb's network
header on AF_PACKET, 4 bytes further behind a VLAN tag) and runs it after the -x selection,
so a packet is kept only when both accept it.  Link-layer primitives (``ether host``,
``vlan``) do not compile for raw IP: the error says so, naming -F.

Where a program cannot run in the kernel (a socket the filter could not be attached to,
the pcap files of an offline replay after their link header is stripped), ``matches(ip)``
runs the same program on the packet through libpcap's interpreter (``pcap_offline_filter``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from engine.errors import ConfigError

DLT_RAW = 12
"""Linux's DLT_RAW: packets that start with their IP header."""
SNAPLEN = 262_144
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF

Insn = tuple[int, int, int, int]


class _BpfInsn(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint32),
    ]


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_BpfInsn))]


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _PktHdr(ctypes.Structure):
    _fields_ = [("ts", _Timeval), ("caplen", ctypes.c_uint32), ("len", ctypes.c_uint32)]


_lib: ctypes.CDLL | None = None


def _libpcap() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        import ctypes.util  # (subprocess, shutil, tempfile: only with -F)

        name = ctypes.util.find_library("pcap") or "libpcap.so.0.8"
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            raise ConfigError("-F", f"needs libpcap ({exc})") from None
        lib.pcap_open_dead.restype = ctypes.c_void_p
        lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.pcap_compile.restype = ctypes.c_int
        lib.pcap_compile.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(_BpfProgram),
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_uint32,
        ]
        lib.pcap_geterr.restype = ctypes.c_char_p
        lib.pcap_geterr.argtypes = [ctypes.c_void_p]
        lib.pcap_close.argtypes = [ctypes.c_void_p]
        lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
        lib.pcap_offline_filter.restype = ctypes.c_int
        lib.pcap_offline_filter.argtypes = [
            ctypes.POINTER(_BpfProgram),
            ctypes.POINTER(_PktHdr),
            ctypes.c_char_p,
        ]
        _lib = lib
    return _lib


class CaptureFilter:
    """A compiled -F expression: ``program`` (IP header at offset 0) and ``matches(ip)``."""

    def __init__(self, expression: str, program: Sequence[Insn]) -> None:
        self.expression = expression
        self.program: tuple[Insn, ...] = tuple(program)
        n = len(self.program)
        self._insns = (_BpfInsn * n)(*(_BpfInsn(*ins) for ins in self.program))
        self._prog = _BpfProgram(n, ctypes.cast(self._insns, ctypes.POINTER(_BpfInsn)))
        self._hdr = _PktHdr()
        self._run = _libpcap().pcap_offline_filter

    def matches(self, ip: bytes) -> bool:
        """True when the program keeps the IPv4 packet ``ip`` (libpcap's interpreter)."""
        hdr = self._hdr
        hdr.caplen = hdr.len = len(ip)
        return bool(self._run(ctypes.byref(self._prog), ctypes.byref(hdr), bytes(ip)))

    def __repr__(self) -> str:
        return f"CaptureFilter({self.expression!r}, {len(self.program)} instructions)"


def compile_filter(expression: str) -> CaptureFilter:
    """Compile -F for raw IPv4 packets; ConfigError("-F", libpcap's message) when it fails."""
    text = expression.strip()
    if not text:
        raise ConfigError("-F", "the filter expression is empty")
    lib = _libpcap()
    handle = lib.pcap_open_dead(DLT_RAW, SNAPLEN)
    if not handle:
        raise ConfigError("-F", "libpcap could not open a compiler handle")
    prog = _BpfProgram()
    try:
        try:
            raw = text.encode("ascii")
        except UnicodeEncodeError:
            raise ConfigError("-F", f"{text!r}: a filter expression is ASCII") from None
        if lib.pcap_compile(handle, ctypes.byref(prog), raw, 1, PCAP_NETMASK_UNKNOWN) != 0:
            err = (lib.pcap_geterr(handle) or b"does not compile").decode("utf-8", "replace")
            raise ConfigError("-F", f"{text!r}: {err}")
        insns = [
            (prog.bf_insns[i].code, prog.bf_insns[i].jt, prog.bf_insns[i].jf, prog.bf_insns[i].k)
            for i in range(prog.bf_len)
        ]
        lib.pcap_freecode(ctypes.byref(prog))
    finally:
        lib.pcap_close(handle)
    return CaptureFilter(text, insns)
