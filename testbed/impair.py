"""A userspace netem stand-in for the fault tests: loss, delay with jitter, reordering.

    python -m testbed.impair --queue 7 --loss 0.01 --delay-ms 5 --jitter-ms 5 \
        --reorder 0.25 --reorder-corr 0.5 --duration 120

Why: the testbed's kernel has no sch_netem (``tc qdisc add ... netem`` fails with "Specified
qdisc kind is unknown"), so the test sends the packets to impair into an NFQUEUE (an iptables
rule in the namespace, with --queue-bypass so nothing stalls if this process is gone) and
this process gives the verdicts: each packet is dropped with probability ``loss``; otherwise
it is held ``delay ± jitter`` ms (uniform) and then accepted, except that a ``reorder``
fraction (correlated like netem's) is accepted at once and so overtakes the held ones.  A
dropped packet is silent to its sender (the verdict comes after sendto() returned), exactly
like a netem loss on the wire.

Bounded: exits by itself after --duration seconds (or on SIGTERM/SIGINT), accepting whatever
it still holds, and prints one JSON line with its counts last.  Prints {"ready": true} once
bound.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
import select
import signal
import sys
import time

from netfilterqueue import NetfilterQueue

MAX_QUEUE_LEN = 8192
SIGNAL_POLL_S = 0.2


class Impairer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.loss = args.loss
        self.delay_s = args.delay_ms / 1000.0
        self.jitter_s = args.jitter_ms / 1000.0
        self.reorder = args.reorder
        self.corr = args.reorder_corr
        self.rng = random.Random(args.seed)
        self.held: list[tuple[float, int, object]] = []
        self.seq = itertools.count()
        self.last_u = self.rng.random()
        self.counts = {"packets": 0, "dropped": 0, "delayed": 0, "immediate": 0}

    def on_packet(self, pkt: object) -> None:
        self.counts["packets"] += 1
        if self.rng.random() < self.loss:
            self.counts["dropped"] += 1
            pkt.drop()  # type: ignore[attr-defined]
            return
        u = self.corr * self.last_u + (1.0 - self.corr) * self.rng.random()
        self.last_u = u
        if u < self.reorder:
            self.counts["immediate"] += 1
            pkt.accept()  # type: ignore[attr-defined]
            return
        delay = max(0.0, self.delay_s + self.rng.uniform(-self.jitter_s, self.jitter_s))
        pkt.retain()  # type: ignore[attr-defined]
        heapq.heappush(self.held, (time.monotonic() + delay, next(self.seq), pkt))
        self.counts["delayed"] += 1

    def release_due(self, now: float) -> None:
        while self.held and self.held[0][0] <= now:
            _, _, pkt = heapq.heappop(self.held)
            pkt.accept()  # type: ignore[attr-defined]

    def release_all(self) -> None:
        while self.held:
            _, _, pkt = heapq.heappop(self.held)
            pkt.accept()  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="impair")
    p.add_argument("--queue", type=int, required=True)
    p.add_argument("--loss", type=float, default=0.0, help="drop probability (0-1)")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--reorder", type=float, default=0.0, help="fraction sent at once (0-1)")
    p.add_argument("--reorder-corr", type=float, default=0.0)
    p.add_argument("--duration", type=float, default=120.0, help="seconds, then exit")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    imp = Impairer(args)
    nfq = NetfilterQueue()
    nfq.bind(args.queue, imp.on_packet, max_len=MAX_QUEUE_LEN)
    fd = nfq.get_fd()
    print(json.dumps({"ready": True}), flush=True)
    end = time.monotonic() + args.duration
    try:
        while not stop:
            now = time.monotonic()
            if now >= end:
                break
            wake = min(end, now + SIGNAL_POLL_S, imp.held[0][0] if imp.held else end)
            # select() is restarted after a signal (PEP 475): the stop flag is looked at
            # every SIGNAL_POLL_S at least.
            readable, _, _ = select.select([fd], [], [], max(0.0, wake - now))
            if readable:
                nfq.run(block=False)
            imp.release_due(time.monotonic())
    finally:
        imp.release_all()
        nfq.unbind()
        print(json.dumps(imp.counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
