"""Idle memory of a tcpcopy-mp process tree: RSS and PSS per process and summed (psutil
``memory_full_info``), after the tree has started and settled with no traffic.

    sudo .venv/bin/python bench/mem_idle.py [--workers 2] [--settle 5] [-- EXTRA ARGS]
    sudo .venv/bin/python bench/mem_idle.py --tree=/path/to/other/checkout   # a "before"

tcpcopy-mp runs in a network namespace of its own (``unshare -n``, lo up; nothing leaves
it) with the default live capture (the TPACKET_V3 ring, -B 4) and -x 80-198.18.0.2:80; no
intercept answers, which costs nothing at idle.  RSS counts a page shared by forked
processes once per process; PSS splits it between them, so the PSS sum is the tree's real
footprint (the kernel's packet ring included once, wherever it is mapped).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


def top_mappings(pid: int, count: int) -> list[tuple[float, str]]:
    """The ``count`` mappings of a process with the largest PSS, as (MB, what): a file's
    name, or the kernel's label ([heap], [anon], /dev/shm names, the packet socket)."""
    found: list[tuple[float, str]] = []
    what = ""
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split()
                if head and "-" in head[0] and not head[0].endswith(":"):
                    what = head[5] if len(head) > 5 else "[anon]"
                    what = what.rsplit("/", 1)[-1]
                elif head and head[0] == "Pss:":
                    found.append((int(head[1]) / 1024, what))
    except OSError:
        return []
    merged: dict[str, float] = {}
    for mb, name in found:
        merged[name] = merged.get(name, 0.0) + mb
    return sorted(((mb, n) for n, mb in merged.items()), reverse=True)[:count]


def tree_figures(pid: int, maps: int = 0) -> dict[str, dict[str, Any]]:
    root = psutil.Process(pid)
    out: dict[str, dict[str, Any]] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
            name = proc.name()
        except psutil.Error:
            continue
        row: dict[str, Any] = {"rss_mb": info.rss / MB, "pss_mb": info.pss / MB}
        if maps:
            row["maps"] = [(round(mb, 1), n) for mb, n in top_mappings(proc.pid, maps)]
        out[f"{name} ({proc.pid})"] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=REPO, help="checkout to run (default: this)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds idle before measuring")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument(
        "--maps", type=int, default=0, metavar="N", help="also each process's N largest mappings"
    )
    ap.add_argument("extra", nargs="*", help="more tcpcopy-mp arguments (after --)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("needs root (a network namespace and a packet socket)")
    launch = (
        "import sys; sys.path.insert(0, sys.argv.pop(1)); "
        "from engine.app.cli import main; sys.exit(main())"
    )
    argv = [sys.executable, "-c", launch, str(a.tree.resolve()),
            "-x", "80-198.18.0.2:80", "-s", "127.0.0.1", "--workers", str(a.workers),
            "-l", os.devnull, *a.extra]  # fmt: skip
    shell = "ip link set lo up && exec " + " ".join(f"'{x}'" for x in argv)
    proc = subprocess.Popen(["unshare", "-n", "sh", "-c", shell], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            kids = psutil.Process(proc.pid).children()
            if len(kids) >= a.workers + 1:
                break
            if proc.poll() is not None:
                print(f"mem_idle: tcpcopy-mp exited {proc.returncode}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        time.sleep(a.settle)
        figures = tree_figures(proc.pid, a.maps)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    total = {
        "rss_mb": round(sum(f["rss_mb"] for f in figures.values()), 1),
        "pss_mb": round(sum(f["pss_mb"] for f in figures.values()), 1),
    }
    if a.json:
        print(json.dumps({"processes": figures, "total": total}))
        return 0
    for name, f in figures.items():
        print(f"{name:28s} RSS {f['rss_mb']:7.1f} MB   PSS {f['pss_mb']:7.1f} MB")
        for mb, what in f.get("maps", []):
            print(f"    {mb:7.1f} MB  {what}")
    print(f"{'tree':28s} RSS {total['rss_mb']:7.1f} MB   PSS {total['pss_mb']:7.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
