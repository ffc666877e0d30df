"""A bounded SYN flood for the netns testbed (run inside the client namespace).

    python -m testbed.synflood --count 200000 --rate 10000 --sources 50

Raw IPv4/TCP SYNs to the online server (198.18.1.2:80) from ``--sources`` addresses of
198.19.200.0/24 (test addresses that answer nothing: no namespace owns them), each address
walking its own source ports, with correct checksums.  Bounded in count (--count) and in time
(--deadline: what is not sent by then is not sent), paced in batches to --rate packets/s
(sleeping for pacing is the load's shape, not synchronisation).  Prints one JSON line last:
{"sent", "errors", "seconds", "rate"}.  Only addresses of 198.18.0.0/15 are ever used.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
import time

from engine.codec import packet

BATCH = 200
FLOOD_NET = ipaddress.ip_network("198.19.200.0/24")
TEST_NET = ipaddress.ip_network("198.18.0.0/15")


def syn(src: int, dst: int, sport: int, dport: int, seq: int) -> bytes:
    return packet.build(
        packet.TcpPacket(
            src=src,
            dst=dst,
            sport=sport,
            dport=dport,
            seq=seq,
            flags=packet.SYN,
            window=64240,
            options=packet.build_options(mss=1460),
        )
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="synflood")
    p.add_argument("--count", type=int, default=200_000)
    p.add_argument("--rate", type=float, default=10_000.0, help="SYNs per second")
    p.add_argument("--sources", type=int, default=50)
    p.add_argument("--host", default="198.18.1.2")
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--deadline", type=float, default=60.0)
    args = p.parse_args(argv)
    dst_addr = ipaddress.ip_address(args.host)
    if dst_addr not in TEST_NET or not 1 <= args.sources <= 250:
        print("synflood: test addresses (198.18.0.0/15) and 1..250 sources only", file=sys.stderr)
        return 2
    dst = int(dst_addr)
    sources = [int(FLOOD_NET.network_address) + 1 + i for i in range(args.sources)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        from engine.io import _fastio  # type: ignore[attr-defined]

        send_batch = _fastio.send_raw_batch
    except ImportError:
        send_batch = None
    started = time.monotonic()
    end = started + args.deadline
    sent = errors = 0
    i = 0
    while i < args.count and time.monotonic() < end:
        n = min(BATCH, args.count - i)
        batch = []
        for k in range(i, i + n):
            src = sources[k % len(sources)]
            sport = 1024 + (k // len(sources)) % 60000
            batch.append(syn(src, dst, sport, args.port, (k * 7919) & 0xFFFFFFFF))
        if send_batch is not None:
            start = 0
            while start < len(batch):
                ok, err = send_batch(sock.fileno(), batch, start)
                sent += ok
                start += ok
                if err:
                    errors += 1
                    start += 1
        else:
            for data in batch:
                try:
                    sock.sendto(data, (args.host, 0))
                    sent += 1
                except OSError:
                    errors += 1
        i += n
        due = started + i / args.rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    seconds = time.monotonic() - started
    sock.close()
    out = {"sent": sent, "errors": errors, "seconds": round(seconds, 2),
           "rate": round(sent / seconds) if seconds else 0}  # fmt: skip
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
