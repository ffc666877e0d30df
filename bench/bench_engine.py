"""Micro-benchmark of the session engines: client packets + response records per second.

One process, no sockets: synthetic HTTP-like connections (SYN, handshake ACK, a request,
a response, FIN) go through the batch calls a worker makes (engine/io/batch.py) --
``receive_client_ips`` of the captured bytes (one buffer per step of a group of
connections), ``drain_into`` a send buffer (packet building, checksums), and on the way back
the records as one ``receive_records``.  ``--engine python`` runs the Python engine (its
batch calls are the adapter's loop over parse_ip / receive_client / decode_response_record /
receive_response / drain), ``--engine compiled`` the compiled one, ``both`` (the default)
the same traffic through each, then the ratio of their rates and whether their counters
are the same (issue target: compiled >= 20x python).  A scripted target answers every
packet the engine sends.  The time spent in the scripted target is measured separately and
reported, so the engine's own rate is not flattered or penalised by it.

It reports; it does not assert.  Usage:
    .venv/bin/python bench/bench_engine.py [--engine python|compiled|both] [--connections 5000]
        [--requests 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from array import array
from itertools import accumulate
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.codec import packet, wire
from engine.codec.packet import ACK, FIN, PSH, SYN, TcpPacket
from engine.core.config import SessionConfig
from engine.core.rewrite import parse_client_pool, parse_transfer
from engine.io.batch import SendBuffer
from engine.io.engines import build_table, compiled_table_class

CLIENT_NET = packet.ip_from_str("198.18.1.0")
ONLINE = (packet.ip_from_str("198.18.1.2"), 80)
REQUEST = b"GET /index.html HTTP/1.1\r\nHost: online\r\nUser-Agent: bench\r\n\r\n"
RESPONSE_BYTES = 612
TARGET_ISN = 5_000_000
ONLINE_ISN = 9_000_000


def client_packets(i: int, requests: int) -> list[bytes]:
    """The captured packets of connection i (wire bytes, as capture hands them over)."""
    src = CLIENT_NET + 10 + (i % 200)
    sport = 20000 + (i // 200) % 40000
    isn = 1000 + i * 7919
    seq = isn + 1
    ack = ONLINE_ISN + 1
    mk = packet.build
    base = dict(src=src, dst=ONLINE[0], sport=sport, dport=ONLINE[1], window=502)
    out = [
        mk(TcpPacket(**base, seq=isn, flags=SYN, options=packet.build_options(mss=1460))),
        mk(TcpPacket(**base, seq=seq, ack=ack, flags=ACK)),
    ]
    for _ in range(requests):
        out.append(mk(TcpPacket(**base, seq=seq, ack=ack, flags=PSH | ACK, payload=REQUEST)))
        seq += len(REQUEST)
        ack += RESPONSE_BYTES
    out.append(mk(TcpPacket(**base, seq=seq, ack=ack, flags=FIN | ACK)))
    return out


class ScriptedTarget:
    """Answers what the engine sends, as header-only records (what intercept delivers)."""

    def __init__(self) -> None:
        self.next_seq: dict[tuple[int, int], int] = {}

    def answer(self, raw: bytes) -> list[bytes]:
        p = packet.parse_ip(raw)
        key = (p.src, p.sport)
        out = []

        def rec(seq: int, ack: int, flags: int, n: int = 0) -> bytes:
            r = TcpPacket(
                src=p.dst,
                dst=p.src,
                sport=p.dport,
                dport=p.sport,
                seq=seq,
                ack=ack,
                flags=flags,
                window=29200,
                payload=b"\0" * n,
            )
            return wire.encode_response_record(packet.build(r))

        if p.flags & SYN:
            self.next_seq[key] = TARGET_ISN + 1
            out.append(rec(TARGET_ISN, p.seq + 1, SYN | ACK))
        elif p.flags & FIN:
            nxt = self.next_seq.pop(key, TARGET_ISN + 1)
            out.append(rec(nxt, p.seq + p.data_len + 1, FIN | ACK))
        elif p.data_len:
            nxt = self.next_seq.get(key, TARGET_ISN + 1)
            out.append(rec(nxt, p.seq + p.data_len, PSH | ACK, RESPONSE_BYTES))
            self.next_seq[key] = nxt + RESPONSE_BYTES
        return out


def prepared(flows: list[list[bytes]], batch: int) -> list[list[tuple[bytes, array, array]]]:
    """Per group of ``batch`` connections, per step: (buffer, offsets, lengths) of the step's
    captured packets, built before the clock starts (what a ring batch hands over)."""
    out = []
    for start in range(0, len(flows), batch):
        group = flows[start : start + batch]
        steps = []
        for step in range(max(len(f) for f in group)):
            pkts = [f[step] for f in group if step < len(f)]
            lengths = array("I", map(len, pkts))
            offsets = array("I", accumulate(lengths, initial=0))
            steps.append((b"".join(pkts), offsets, lengths))
        out.append(steps)
    return out


def run(engine: str, connections: int, requests: int, batch: int) -> dict:
    cfg = SessionConfig(
        transfers=parse_transfer("80-198.18.2.3:8080"),
        client_pool=parse_client_pool("198.19.1.x"),
        time_wait_s=60.0,
    )
    table = build_table(engine, cfg)
    sendbuf = SendBuffer()
    target = ScriptedTarget()
    flows = [client_packets(i, requests) for i in range(connections)]
    groups = prepared(flows, batch)
    n_client = sum(len(f) for f in flows)
    n_response = n_sent = 0
    target_s = 0.0
    now = 1000.0
    t0 = time.perf_counter()
    # Connections run in overlapping batches: step k sends packet k of every flow in the
    # batch, as one receive_client_ips; each drain is drain_into the send buffer, and the
    # target's answers come back as one receive_records.
    for steps in groups:
        for buf, offsets, lengths in steps:
            table.receive_client_ips(buf, offsets, lengths, len(lengths), now)
            for _round in range(4):  # let answers and the engine's reactions settle
                _routes, n = table.drain_into(sendbuf)
                if not n:
                    break
                n_sent += n
                t1 = time.perf_counter()
                records = b"".join(r for raw in sendbuf.packets(n) for r in target.answer(raw))
                target_s += time.perf_counter() - t1
                table.receive_records(records, now)
                n_response += len(records) // wire.RESPONSE_RECORD_BYTES
            now += 0.001
            deadline = table.get_timer()
            if deadline is not None and deadline <= now:
                table.handle_timer(now)
    # Let delayed ACKs, lingering and time-waits run out.
    for _ in range(20):
        now += 1.0
        table.handle_timer(now)
        while True:
            _routes, n = table.drain_into(sendbuf)
            if not n:
                break
            n_sent += n
    total_s = time.perf_counter() - t0
    engine_s = total_s - target_s
    c = table.counters
    return {
        "engine": engine,
        "connections": connections,
        "requests_per_connection": requests,
        "client_packets": n_client,
        "response_records": n_response,
        "packets_sent": n_sent,
        "seconds_total": round(total_s, 3),
        "seconds_scripted_target": round(target_s, 3),
        "seconds_engine": round(engine_s, 3),
        "engine_inputs_per_s": round((n_client + n_response) / engine_s),
        "engine_connections_per_s": round(connections / engine_s),
        "requests_sent": c.get("send content", 0),
        "bytes_captured": c.get("client_bytes_captured", 0),
        "bytes_acked": c.get("client_bytes_acked", 0),
        "counters": {str(k): int(v) for k, v in sorted(c.items(), key=str) if v},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connections", type=int, default=5000)
    ap.add_argument("--requests", type=int, default=1)
    ap.add_argument("--batch", type=int, default=100, help="connections in flight together")
    ap.add_argument(
        "--engine",
        choices=("python", "compiled", "both"),
        default="both",
        help="the session engine(s) to run the traffic through (both: and their ratio)",
    )
    ap.add_argument("--json", help="also write the result to this file")
    args = ap.parse_args()
    engines = ["python", "compiled"] if args.engine == "both" else [args.engine]
    if "compiled" in engines and compiled_table_class()[0] is None:
        print(f"bench_engine: --engine: {compiled_table_class()[1]}", file=sys.stderr)
        return 2
    results = {e: run(e, args.connections, args.requests, args.batch) for e in engines}
    for result in results.values():
        for k, v in result.items():
            if k != "counters":
                print(f"{k:28s} {v}")
        print()
    out: dict = {"results": results}
    if len(results) == 2:
        py, cc = results["python"], results["compiled"]
        out["ratio_compiled_to_python"] = round(
            cc["engine_inputs_per_s"] / py["engine_inputs_per_s"], 2
        )
        out["same_counters"] = py["counters"] == cc["counters"]
        print(f"{'compiled / python':28s} {out['ratio_compiled_to_python']}x inputs/s")
        print(f"{'same counters':28s} {out['same_counters']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
