"""The C TCPCopy 1.0 reference for the live benchmark: build it, start it, read its log.

Theory of operation
-------------------
The C sources are unmodified upstream snapshots in ``<repo>/../shared/anchor`` (a comparator
only: this module runs the programs, it copies nothing from them).  ``build.sh`` there builds
the three default variants into a cache directory (idempotent: a second call only checks):

* ``tcpcopy-live/objs/tcpcopy``: raw-socket capture and raw IP send (the default build);
* ``tcpcopy-offline/objs/tcpcopy``: ``./configure --offline``, ``-i FILE`` pcap replay;
* ``intercept/objs/intercept``: the default "advanced" build (pcap capture on an assistant).

The benchmark compares like with like: tcpcopy-mp's intercept-mp runs in the NFQUEUE
("traditional") mode on the target, so the C intercept is also built in that mode, from the
same unmodified tarball with its own ``./configure --traditional`` (on kernels >= 3.5 that
selects NFQUEUE queue 0 through libnetfilter_queue, spec §0/§2.1), into
``<cache>/intercept-traditional``.  The C intercept adds no iptables rule itself: the
benchmark inserts ``OUTPUT -p tcp --sport 8080 -j NFQUEUE --queue-num 0`` on the target while
it runs and deletes it afterwards.

C tcpcopy's log (``-l``) has its statistics block (spec §3.18) every 30 s and at exit, plus
one warning line per dropped or abandoned packet or session; ``parse_log`` turns it into the
last values of every ``name:number`` of the block and a count of warning and error lines by
message (numbers stripped), which the table shows as the C side's "drops by reason".
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_SH = REPO_ROOT.parent / "shared" / "anchor" / "build.sh"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "tcpcopy-c"
"""build.sh's own default output directory (its tarballs build there once per machine)."""
INTERCEPT_TARBALL_GLOB = "intercept-*.tar.gz"
TRADITIONAL_DIR = "intercept-traditional"
BUILD_TIMEOUT_S = 600
NFQ_HEADER = Path("/usr/include/libnetfilter_queue/libnetfilter_queue.h")


class CBuildError(RuntimeError):
    """The C reference could not be built (the message says which step and where its log is)."""


@dataclasses.dataclass(frozen=True)
class CReference:
    tcpcopy_live: Path
    tcpcopy_offline: Path
    intercept_traditional: Path
    build_dir: Path


def build(cache: Path = DEFAULT_CACHE) -> CReference:
    """Build (or find already built) the C programs the benchmark runs."""
    if not BUILD_SH.exists():
        raise CBuildError(
            f"{BUILD_SH} not found: the C reference sources live in shared/ beside the checkout "
            "(or run with --peer none)"
        )
    cache.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["bash", str(BUILD_SH), str(cache)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise CBuildError(f"{BUILD_SH} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    ref = CReference(
        tcpcopy_live=cache / "tcpcopy-live" / "objs" / "tcpcopy",
        tcpcopy_offline=cache / "tcpcopy-offline" / "objs" / "tcpcopy",
        intercept_traditional=_build_traditional_intercept(cache),
        build_dir=cache,
    )
    for path in (ref.tcpcopy_live, ref.tcpcopy_offline, ref.intercept_traditional):
        if not os.access(path, os.X_OK):
            raise CBuildError(f"{path} missing after the build")
    return ref


def _build_traditional_intercept(cache: Path) -> Path:
    """intercept ``./configure --traditional`` (NFQUEUE on the target), unmodified sources."""
    out = cache / TRADITIONAL_DIR
    binary = out / "objs" / "intercept"
    if os.access(binary, os.X_OK):
        return binary
    if not NFQ_HEADER.exists():
        raise CBuildError(
            f"{NFQ_HEADER} missing: apt-get install libnetfilter-queue-dev (tests/setup.sh does)"
        )
    tarballs = sorted(BUILD_SH.parent.glob(INTERCEPT_TARBALL_GLOB))
    if not tarballs:
        raise CBuildError(f"no {INTERCEPT_TARBALL_GLOB} beside {BUILD_SH}")
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True, timeout=60)
    out.mkdir(parents=True)
    subprocess.run(
        ["tar", "-xzf", str(tarballs[-1]), "-C", str(out), "--strip-components=1"],
        check=True, timeout=120,
    )  # fmt: skip
    log = out / "build.log"
    with open(log, "wb") as f:
        for argv in (["./configure", "--traditional"], ["make", f"-j{os.cpu_count() or 1}"]):
            rc = subprocess.run(
                argv, cwd=out, stdout=f, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S
            ).returncode
            if rc != 0:
                raise CBuildError(f"C intercept --traditional: {argv[0]} failed, see {log}")
    return binary


# ---------------------------------------------------------------------------------------------
# argv


def tcpcopy_live_argv(
    ref: CReference, transfer: str, intercept_ip: str, pool: str, log: Path
) -> list[str]:
    """C tcpcopy in the foreground (no -d: the benchmark samples and stops it by pid)."""
    return [str(ref.tcpcopy_live), "-x", transfer, "-s", intercept_ip, "-c", pool, "-l", str(log)]


def tcpcopy_offline_argv(
    ref: CReference, pcap: Path, accel: int, transfer: str, intercept_ip: str, pool: str, log: Path
) -> list[str]:
    return [
        str(ref.tcpcopy_offline), "-i", str(pcap), "-a", str(accel), "-x", transfer,
        "-s", intercept_ip, "-c", pool, "-l", str(log),
    ]  # fmt: skip


def intercept_argv(ref: CReference, port: int, log: Path) -> list[str]:
    return [str(ref.intercept_traditional), "-p", str(port), "-l", str(log)]


def nfqueue_rule(sport: int) -> list[str]:
    """The rule the C intercept needs (it adds none itself), for iptables -I / -D OUTPUT."""
    return ["OUTPUT", "-p", "tcp", "--sport", str(sport), "-j", "NFQUEUE", "--queue-num", "0"]


# ---------------------------------------------------------------------------------------------
# the log

_LINE_RE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \+\d+ \[(?P<level>\w+)\] (?P<msg>.*)$")
_PAIR_RE = re.compile(r"([a-z][a-z \-]*?)\s*:\s*(\d+)")
_NUM_RE = re.compile(r"[-+]?\d+")
STAT_FIRST_WORDS = (
    "active:", "conns:", "resp fin:", "send:", "send syn:", "reconnect:", "retransmit:",
    "recv packs", "syn cnt:", "total cont", "total captured", "user time", "sys  time",
    "max memory",
)  # fmt: skip
"""Lines of the statistics block (spec §3.18) and of the resource check (§3.17)."""
STOP_MESSAGES = ("sig ",)
"""Warning lines that are the benchmark's own SIGTERM, not a fault."""


def parse_log(path: Path) -> dict[str, object]:
    """{"stats": last value of every statistics counter, "warnings": {message: count}}."""
    stats: dict[str, int] = {}
    warnings: dict[str, int] = {}
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return {"stats": stats, "warnings": warnings}
    for line in text.splitlines():
        m = _LINE_RE.match(line)
        if not m:
            continue
        msg = m.group("msg").strip()
        if msg.startswith(STAT_FIRST_WORDS):
            for name, value in _PAIR_RE.findall(msg):
                stats[name.strip()] = int(value)
        elif msg.startswith(STOP_MESSAGES):
            continue
        elif m.group("level") in ("warn", "error", "crit", "alert", "emerg") or msg.startswith(
            "wait for prev packet timeout"
        ):
            key = _NUM_RE.sub("N", msg)[:60]
            warnings[key] = warnings.get(key, 0) + 1
    return {"stats": stats, "warnings": warnings}
