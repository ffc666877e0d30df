"""The self-contained demo: live HTTP replication in a private namespace testbed.

    sudo bash bench/demo.sh            (set-up, then this script)
    sudo .venv/bin/python bench/demo.py [--keepalive 2000] [--connections 20] [--short 500]

It builds the testbed of testbed/netns.py (client → online nginx :80; target nginx :8080),
starts intercept-mp on the target (traditional mode: NFQUEUE) and tcpcopy-mp on the online host,
drives a bounded load from the client, waits (up to a deadline) for the copies to arrive, and
prints online vs target request counts and the replication ratio.  Everything it created is
torn down at the end, also on Ctrl-C or an error.  Exit status: 0 if the ratio is at least
99 %, 1 if not (or on an error), 2 if it cannot run here, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from testbed import netns as tbm  # noqa: E402

PASS_RATIO = 0.99
REPLICATION_DEADLINE_S = 60.0


def say(msg: str) -> None:
    print(f"demo: {msg}", flush=True)


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="demo.py", description="tcpcopy-mp live replication demo")
    p.add_argument("--keepalive", type=int, default=2000, help="keep-alive requests (default 2000)")
    p.add_argument(
        "--connections", type=int, default=20, help="keep-alive connections (default 20)"
    )
    p.add_argument("--short", type=int, default=500, help="one-request connections (default 500)")
    p.add_argument(
        "--rate", type=float, default=1000.0, help="keep-alive requests/s (default 1000)"
    )
    p.add_argument(
        "--short-rate", type=float, default=200.0, help="new connections/s (default 200)"
    )
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs) after the run")
    return p.parse_args(argv)


def row(label: str, online: int, target: int) -> str:
    ratio = f"{100.0 * target / online:6.1f} %" if online else "     - "
    return f"  {label:<22}{online:>8}{target:>8}   {ratio}"


def run(args: argparse.Namespace, workdir: Path) -> int:
    tb = tbm.Testbed(workdir, with_redis=False, with_assistant=False)
    try:
        say("building the namespace testbed (client, online, target, switch) ...")
        tb.start(tbm.TRADITIONAL)
        say("starting intercept-mp on the target (NFQUEUE on sport 8080) ...")
        tb.start_intercept(summary=workdir / "intercept-summary.json")
        transfer = f"{tbm.ONLINE_HTTP_PORT}-{tbm.TARGET_IP}:{tbm.TARGET_HTTP_PORT}"
        tcpcopy_args = ["-x", transfer, "-s", tbm.TARGET_IP, "-c", "198.19.1.x"]
        say(f"starting tcpcopy-mp on the online host: tcpcopy-mp {' '.join(tcpcopy_args)}")
        tcpcopy = tb.start_tcpcopy(tcpcopy_args, summary=workdir / "tcpcopy-summary.json")
        probes = tb.wait_replicating(tcpcopy)
        say(f"replication is live (after {probes} probe request(s))")

        say(f"load: {args.keepalive} keep-alive requests over {args.connections} connections ...")
        ka = tb.loadgen(
            "keepalive",
            "--connections", str(args.connections),
            "--requests", str(args.keepalive),
            "--rate", str(args.rate),
            "--deadline", "120",
        )  # fmt: skip
        say(f"load: {args.short} one-request connections ...")
        sc = tb.loadgen(
            "short",
            "--requests",
            str(args.short),
            "--rate",
            str(args.short_rate),
            "--deadline",
            "120",
        )
        if ka["failed"] or sc["failed"]:
            say(
                f"warning: the online server itself failed requests: {ka['errors'] or sc['errors']}"
            )

        say("waiting for the copies to reach the target ...")
        started = time.monotonic()
        tb.wait_target_count("/ka/", ka["ok"], timeout=REPLICATION_DEADLINE_S)
        tb.wait_target_count(
            "/sc/",
            sc["ok"],
            timeout=max(1.0, REPLICATION_DEADLINE_S - (time.monotonic() - started)),
        )
        rc = tcpcopy.stop(signal.SIGTERM, timeout=20)
        summary = tbm.read_summary(workdir / "tcpcopy-summary.json")

        online, target = tb.access_log("online"), tb.access_log("target")
        reports = {p: tbm.compare_replication(online, target, p) for p in ("/ka/", "/sc/")}
        total_on = sum(r.online_requests for r in reports.values())
        total_tg = sum(r.target_requests for r in reports.values())
        print()
        print(f"  {'':<22}{'online':>8}{'target':>8}   ratio")
        print(
            row(
                "keep-alive requests",
                reports["/ka/"].online_requests,
                reports["/ka/"].target_requests,
            )
        )
        print(
            row(
                "one-request conns",
                reports["/sc/"].online_requests,
                reports["/sc/"].target_requests,
            )
        )
        print(row("total", total_on, total_tg))
        ordered = all(not r.order_mismatches for r in reports.values())
        print(f"\n  per-connection order preserved: {'yes' if ordered else 'NO'}")
        print(f"  target packets that reached the client: {tb.client_leak_packets()}")
        print(f"  tcpcopy-mp exit status on SIGTERM: {rc}; summary written: {summary is not None}")
        ratio = total_tg / total_on if total_on else 0.0
        ok = ratio >= PASS_RATIO
        print(
            f"\n  replication ratio {100 * ratio:.1f} % -> {'PASS' if ok else 'FAIL'}"
            " (needs >= 99 %)\n"
        )
        if not ok:
            for proc in tb.procs:
                if proc.name.startswith(("tcpcopy", "intercept")):
                    print(f"----- {proc.name} log tail -----\n{proc.tail(15)}")
        return 0 if ok else 1
    finally:
        say("tearing down the testbed ...")
        tb.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problems = tbm.preflight_problems()
    for binary in (tbm.TCPCOPY_BIN, tbm.INTERCEPT_BIN):
        if not binary.exists():
            problems.append(f"{binary} missing (run: sudo bash tests/setup.sh)")
    if problems:
        say("cannot run: " + "; ".join(problems))
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Explicitly: a shell may start us with SIGINT ignored (background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="tcpcopy-mp-demo-"))
    try:
        return run(args, workdir)
    except KeyboardInterrupt:
        say("interrupted; everything was torn down")
        return 130
    except (tbm.TestbedError, TimeoutError, OSError) as exc:
        say(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        detail = "\n".join(str(exc).splitlines()[1:])
        if detail:
            print(detail)
        return 1
    finally:
        if args.keep:
            say(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
