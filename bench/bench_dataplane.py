"""Micro-benchmark of the packet codec: parse + rewrite + build, compiled vs Python.

The same packets go through both: the client packets of bench_engine.py's synthetic
connections (SYN with options, handshake ACK, requests, FIN) followed by every packet of the
real captures in the shared data directory.  Per packet both sides do what a worker does to
a captured segment before the session logic: parse the IPv4/TCP headers, walk the TCP
options, change the destination and the sequence number, and build the packet with fresh
checksums.

- Python: ``packet.parse_ip`` + ``packet.parse_options`` + ``packet.build_fields`` per
  packet (engine/codec/packet.py, the specification).
- compiled: ``dataplane.packet.parse_batch`` over a batch of packets lying in one buffer (a
  ring batch), one numpy assignment per field to rewrite, ``build_batch`` into one output
  buffer (what sendmmsg sends).

Both outputs are compared byte for byte before anything is timed.  It reports; it does not
assert.  Usage:
    .venv/bin/python bench/bench_dataplane.py [--connections 2000] [--batch 256] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import client_packets

from engine import dataplane
from engine.codec import packet
from engine.codec.pcapfile import open_pcap

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TARGET = packet.ip_from_str("198.18.2.2")
SEQ_SHIFT = 12345


def captured_packets() -> list[bytes]:
    out = []
    for path in sorted(SHARED_DATA.glob("*.pcap")):
        reader = open_pcap(str(path))
        for _ts, _n, frame in reader:
            out.append(frame[packet.l2_offset(frame, reader.linktype) :])
    return out


def python_pass(frames: list[bytes]) -> list[bytes]:
    parse_ip, parse_options, build_fields = (
        packet.parse_ip,
        packet.parse_options,
        packet.build_fields,
    )
    out = []
    for frame in frames:
        try:
            p = parse_ip(frame)
        except packet.DecodeError:
            continue
        parse_options(p.options)
        out.append(
            build_fields(
                p.src,
                TARGET,
                p.sport,
                p.dport,
                (p.seq + SEQ_SHIFT) & 0xFFFFFFFF,
                p.ack,
                p.flags,
                p.window,
                p.options,
                p.payload,
                p.ip_id,
                p.ttl,
                p.tos,
                p.df,
                p.urgent,
                p.ip_options,
            )
        )
    return out


class CompiledPass:
    """Batches laid out once (as a ring holds them); ``run`` parses, rewrites and builds."""

    def __init__(self, frames: list[bytes], batch: int) -> None:
        assert dataplane.packet is not None, dataplane.UNAVAILABLE
        self.dp = dataplane.packet
        self.batches = []
        for i in range(0, len(frames), batch):
            group = frames[i : i + batch]
            lengths = np.array([len(f) for f in group], np.uint32)
            offsets = np.zeros(len(group), np.uint32)
            offsets[1:] = np.cumsum(lengths)[:-1]
            self.batches.append((b"".join(group), offsets, lengths))
        self.recs = np.empty(batch, self.dp.PACKET_DTYPE)
        self.out = bytearray(batch * 65536 // 16 + 65536)
        self.built = np.empty(batch, np.int32)
        self.target = np.frombuffer(TARGET.to_bytes(4, "big"), np.uint8)

    def run(self, keep: bool = False) -> list[bytes]:
        dp, recs, out, built = self.dp, self.recs, self.out, self.built
        kept = []
        for buf, offsets, lengths in self.batches:
            n = len(offsets)
            dp.parse_batch(buf, offsets, lengths, recs)
            view = recs[:n]
            view["dst"][:, 12:] = self.target
            view["seq"] += np.uint32(SEQ_SHIFT)
            dp.build_batch(view, buf, out, built[:n])
            if keep:
                at = 0
                for length in built[:n]:
                    if length > 0:
                        kept.append(bytes(out[at : at + length]))
                        at += int(length)
        return kept


def best_rate(fn, count: int, repeat: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return count / best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256, help="packets per parse_batch call")
    ap.add_argument("--repeat", type=int, default=5, help="best of this many passes")
    ap.add_argument("--json", help="also write the result to this file")
    a = ap.parse_args()
    if a.connections < 1 or a.batch < 1 or a.repeat < 1:
        ap.error("--connections, --batch and --repeat must be >= 1")
    frames = [f for i in range(a.connections) for f in client_packets(i, a.requests)]
    frames += captured_packets()
    compiled = CompiledPass(frames, a.batch)
    want = python_pass(frames)
    assert compiled.run(keep=True) == want, "compiled and Python outputs differ"
    py_rate = best_rate(lambda: python_pass(frames), len(frames), a.repeat)
    c_rate = best_rate(compiled.run, len(frames), a.repeat)
    result = {
        "packets": len(frames),
        "built": len(want),
        "batch": a.batch,
        "python_packets_per_s": round(py_rate),
        "compiled_packets_per_s": round(c_rate),
        "ratio": round(c_rate / py_rate, 1),
        "bytes_out": sum(len(w) for w in want),
    }
    for k, v in result.items():
        print(f"{k:24s} {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
