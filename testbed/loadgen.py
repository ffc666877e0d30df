"""Bounded HTTP/1.1 load generators for the netns testbed (run inside the client namespace).

    python -m testbed.loadgen keepalive --connections 20 --requests 2000   # /ka/<c>/<i>
    python -m testbed.loadgen short --requests 500                         # /sc/<i>
    python -m testbed.loadgen preopen --connections 20 --requests 200      # /mid/<c>/<i>
    python -m testbed.loadgen post --size 1048576                          # POST /upload/<tag>
    python -m testbed.loadgen get --path /big.bin                          # one big GET

Every mode is bounded in count (the flags) and in time (--deadline; what is not done by then
counts as failed), and prints one JSON summary line last: {"ok", "failed", "errors", ...}.
Every path is unique, so the tests can match the online server's log with the target's.
``--rate`` spreads requests over time (0 = as fast as the server answers); sleeping for pacing
is the load's shape, not synchronisation.

preopen: opens the connections, does request 0 on each, prints {"ready": true}, then waits
for a line on stdin (the "go" signal, bounded by --go-timeout) before sending the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

SOCKET_TIMEOUT_S = 15.0
MAX_ERRORS_REPORTED = 10
READ_CHUNK_BYTES = 256 * 1024


class HttpError(Exception):
    pass


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    bytes_received: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def success(self, nbytes: int) -> None:
        with self.lock:
            self.ok += 1
            self.bytes_received += nbytes

    def failure(self, what: str, count: int = 1) -> None:
        with self.lock:
            self.failed += count
            if len(self.errors) < MAX_ERRORS_REPORTED:
                self.errors.append(what)


class Pacer:
    """Request k is due at start + k / rate (rate 0: no pacing)."""

    def __init__(self, rate: float):
        self.rate = rate
        self.start = time.monotonic()

    def wait_turn(self, k: int, deadline: float) -> bool:
        if self.rate <= 0:
            return time.monotonic() < deadline
        due = self.start + k / self.rate
        now = time.monotonic()
        if due >= deadline:
            return False
        if due > now:
            time.sleep(due - now)
        return True


class HttpConnection:
    """A minimal blocking HTTP/1.1 client connection (Content-Length and chunked bodies)."""

    source: str | None = None
    """The local address every connection binds to (``--source``; None: the kernel's pick)."""

    def __init__(self, host: str, port: int, timeout: float = SOCKET_TIMEOUT_S):
        src = (self.source, 0) if self.source else None
        self.sock = socket.create_connection((host, port), timeout=timeout, source_address=src)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(READ_CHUNK_BYTES)
        if not data:
            raise HttpError("connection closed by server")
        self.buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exact(self, n: int, digest: hashlib._Hash | None) -> int:
        got = 0
        while got < n:
            if not self.buf:
                self._fill()
            take = self.buf[: n - got]
            self.buf = self.buf[len(take) :]
            if digest is not None:
                digest.update(take)
            got += len(take)
        return got

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        close: bool = False,
        digest: hashlib._Hash | None = None,
    ) -> tuple[int, int, bool]:
        """Send one request, read the whole response. Returns (status, body bytes, server
        closes)."""
        head = [f"{method} {path} HTTP/1.1", "Host: online", "User-Agent: tcpcopy-mp-loadgen"]
        if body or method == "POST":
            head += ["Content-Type: application/octet-stream", f"Content-Length: {len(body)}"]
        if close:
            head.append("Connection: close")
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body)
        status_line = self._line()
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HttpError(f"bad status line {status_line[:60]!r}")
        status = int(parts[1])
        headers = {}
        while True:
            line = self._line()
            if not line:
                break
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        server_closes = headers.get(b"connection", b"").lower() == b"close"
        if method == "HEAD" or status in (204, 304):
            return status, 0, server_closes
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            total = 0
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():  # trailers
                        pass
                    break
                total += self._exact(size, digest)
                self._line()
            return status, total, server_closes
        if b"content-length" in headers:
            return status, self._exact(int(headers[b"content-length"]), digest), server_closes
        raise HttpError("response without length")


def _finish(mode: str, tally: Tally, started: float, **extra: object) -> dict:
    return {
        "mode": mode,
        "ok": tally.ok,
        "failed": tally.failed,
        "bytes_received": tally.bytes_received,
        "errors": tally.errors,
        "elapsed_s": round(time.monotonic() - started, 3),
        **extra,
    }


def _run_threads(target: Callable[..., None], args_list: list[tuple]) -> None:
    threads = [threading.Thread(target=target, args=args) for args in args_list]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _paced_pool(
    count: int,
    concurrency: int,
    pacer: Pacer,
    deadline: float,
    late: Callable[[int], None],
    job: Callable[[int], None],
) -> None:
    """``job(k)`` for k in range(count) on ``concurrency`` threads, each one at its pacing turn
    k; ``late(k)`` instead for those whose turn falls after ``deadline``."""
    indices = iter(range(count))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                k = next(indices, None)
            if k is None:
                return
            if pacer.wait_turn(k, deadline):
                job(k)
            else:
                late(k)

    _run_threads(worker, [() for _ in range(concurrency)])


def _paced_requests(
    conn: HttpConnection,
    c: int,
    first: int,
    total: int,
    turn: Callable[[int], int],
    path: Callable[[int], str],
    pacer: Pacer,
    deadline: float,
    tally: Tally,
) -> None:
    """GET ``path(i)`` for i in first..total-1 on connection ``c``, each at its pacing turn
    ``turn(i)``, until the deadline or the first error; closes ``conn`` and counts the
    requests not done as failed."""
    done = first
    try:
        for i in range(first, total):
            if not pacer.wait_turn(turn(i), deadline):
                break
            status, nbytes, _ = conn.request("GET", path(i))
            if status != 200:
                raise HttpError(f"status {status}")
            tally.success(nbytes)
            done += 1
    except (OSError, HttpError, ValueError) as exc:
        tally.failure(f"conn {c} req {done}: {exc}", 0)
    finally:
        conn.close()
        if total - done:
            tally.failure(f"conn {c}: {total - done} not done", total - done)


def run_keepalive(args: argparse.Namespace) -> dict:
    """N connections, requests spread round-robin: path /<prefix>/<conn>/<i>."""
    started = time.monotonic()
    deadline = started + args.deadline
    tally, pacer = Tally(), Pacer(args.rate)
    n_conn = args.connections
    per_conn = [
        args.requests // n_conn + (1 if c < args.requests % n_conn else 0) for c in range(n_conn)
    ]

    def worker(c: int) -> None:
        try:
            conn = HttpConnection(args.host, args.port)
        except OSError as exc:
            tally.failure(f"conn {c}: connect: {exc}", per_conn[c])
            return
        _paced_requests(
            conn, c, 0, per_conn[c],
            lambda i: i * n_conn + c, lambda i: f"/{args.prefix}/{c}/{i}",
            pacer, deadline, tally,
        )  # fmt: skip

    _run_threads(worker, [(c,) for c in range(n_conn)])
    return _finish("keepalive", tally, started, connections=n_conn)


def run_short(args: argparse.Namespace) -> dict:
    """One request per connection: path /<prefix>/<i>; ``--concurrency`` connections at a time."""
    started = time.monotonic()
    deadline = started + args.deadline
    tally, pacer = Tally(), Pacer(args.rate)

    def late(i: int) -> None:
        tally.failure(f"req {i}: deadline", 1)

    def job(i: int) -> None:
        try:
            conn = HttpConnection(args.host, args.port)
            try:
                status, nbytes, _ = conn.request(
                    "GET", f"/{args.prefix}/{i}", close=args.server_close
                )
            finally:
                conn.close()
            if status != 200:
                raise HttpError(f"status {status}")
            tally.success(nbytes)
        except (OSError, HttpError, ValueError) as exc:
            tally.failure(f"req {i}: {exc}")

    _paced_pool(args.requests, args.concurrency, pacer, deadline, late, job)
    return _finish("short", tally, started)


def run_sessions(args: argparse.Namespace) -> dict:
    """``--requests`` connections of ``--per-conn`` requests each: /<prefix>/<conn>/<i>."""
    started = time.monotonic()
    deadline = started + args.deadline
    tally, pacer = Tally(), Pacer(args.rate)

    def late(c: int) -> None:
        tally.failure(f"conn {c}: deadline", args.per_conn)

    def job(c: int) -> None:
        done = 0
        try:
            conn = HttpConnection(args.host, args.port)
            try:
                for i in range(args.per_conn):
                    last = i == args.per_conn - 1
                    status, nbytes, _ = conn.request(
                        "GET", f"/{args.prefix}/{c}/{i}", close=last and args.server_close
                    )
                    if status != 200:
                        raise HttpError(f"status {status}")
                    tally.success(nbytes)
                    done += 1
            finally:
                conn.close()
        except (OSError, HttpError, ValueError) as exc:
            tally.failure(f"conn {c} req {done}: {exc}", args.per_conn - done)

    _paced_pool(args.requests, args.concurrency, pacer, deadline, late, job)
    return _finish("sessions", tally, started)


def run_preopen(args: argparse.Namespace) -> dict:
    """Open connections, one request each, say ready, wait for "go" on stdin, send the rest."""
    started = time.monotonic()
    deadline = started + args.deadline
    tally = Tally()
    n_conn = args.connections
    per_conn = max(1, args.requests // n_conn)
    conns: list[HttpConnection | None] = []
    for c in range(n_conn):
        try:
            conn = HttpConnection(args.host, args.port)
            status, nbytes, _ = conn.request("GET", f"/{args.prefix}/{c}/0")
            if status != 200:
                raise HttpError(f"status {status}")
            tally.success(nbytes)
            conns.append(conn)
        except (OSError, HttpError, ValueError) as exc:
            tally.failure(f"conn {c} req 0: {exc}", per_conn)
            conns.append(None)
    print(json.dumps({"ready": True, "opened": sum(c is not None for c in conns)}), flush=True)
    go_deadline = time.monotonic() + args.go_timeout
    got_go = False
    while time.monotonic() < go_deadline:
        readable, _, _ = select.select(
            [sys.stdin], [], [], max(0.0, go_deadline - time.monotonic())
        )
        if readable:
            got_go = bool(sys.stdin.readline())
            break
    if not got_go:
        for conn in conns:
            if conn is not None:
                conn.close()
        tally.failure("no go signal", sum(per_conn - 1 for c in conns if c is not None))
        return _finish("preopen", tally, started, go=False)
    go_at = time.monotonic()
    pacer = Pacer(args.rate)

    def worker(c: int, conn: HttpConnection) -> None:
        _paced_requests(
            conn, c, 1, per_conn,
            lambda i: (i - 1) * n_conn + c, lambda i: f"/{args.prefix}/{c}/{i}",
            pacer, deadline, tally,
        )  # fmt: skip

    _run_threads(worker, [(c, conn) for c, conn in enumerate(conns) if conn])
    return _finish(
        "preopen", tally, started, go=True, after_go_s=round(time.monotonic() - go_at, 3)
    )


def post_body(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def run_post(args: argparse.Namespace) -> dict:
    """One POST of ``--size`` deterministic bytes to /upload/<tag>; reports the body's sha256."""
    started = time.monotonic()
    tally = Tally()
    body = post_body(args.size, args.seed)
    try:
        conn = HttpConnection(args.host, args.port)
        try:
            status, nbytes, _ = conn.request("POST", f"/upload/{args.tag}", body=body)
        finally:
            conn.close()
        if status != 200:
            raise HttpError(f"status {status}")
        tally.success(nbytes)
    except (OSError, HttpError, ValueError) as exc:
        tally.failure(f"post: {exc}")
    return _finish("post", tally, started, sha256=hashlib.sha256(body).hexdigest(), size=len(body))


def run_get(args: argparse.Namespace) -> dict:
    """One GET of ``--path`` (e.g. the 10 MB file); reports length and sha256 of the body."""
    started = time.monotonic()
    tally = Tally()
    digest = hashlib.sha256()
    try:
        conn = HttpConnection(args.host, args.port)
        try:
            status, nbytes, _ = conn.request("GET", args.path, digest=digest)
        finally:
            conn.close()
        if status != 200:
            raise HttpError(f"status {status}")
        tally.success(nbytes)
    except (OSError, HttpError, ValueError) as exc:
        tally.failure(f"get: {exc}")
    return _finish("get", tally, started, sha256=digest.hexdigest())


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default="198.18.1.2")
    common.add_argument("--port", type=int, default=80)
    common.add_argument("--deadline", type=float, default=60.0, help="seconds for the whole run")
    common.add_argument("--rate", type=float, default=0.0, help="requests (or connections)/s")
    common.add_argument("--source", default=None, help="local address of every connection")
    parser = argparse.ArgumentParser(prog="loadgen", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)

    p = sub.add_parser("keepalive", parents=[common])
    p.add_argument("--connections", type=int, default=20)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--prefix", default="ka")
    p.set_defaults(func=run_keepalive)

    p = sub.add_parser("short", parents=[common])
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--prefix", default="sc")
    p.add_argument(
        "--client-close",
        dest="server_close",
        action="store_false",
        help="the client closes first (default: Connection: close, the server does)",
    )
    p.set_defaults(func=run_short)

    p = sub.add_parser("sessions", parents=[common])
    p.add_argument("--requests", type=int, default=200, help="number of connections")
    p.add_argument("--per-conn", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--prefix", default="ss")
    p.add_argument("--client-close", dest="server_close", action="store_false")
    p.set_defaults(func=run_sessions)

    p = sub.add_parser("preopen", parents=[common])
    p.add_argument("--connections", type=int, default=20)
    p.add_argument("--requests", type=int, default=200, help="total, including the first ones")
    p.add_argument("--prefix", default="mid")
    p.add_argument("--go-timeout", type=float, default=60.0)
    p.set_defaults(func=run_preopen)

    p = sub.add_parser("post", parents=[common])
    p.add_argument("--size", type=int, default=1024 * 1024)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tag", default="big")
    p.set_defaults(func=run_post)

    p = sub.add_parser("get", parents=[common])
    p.add_argument("--path", default="/big.bin")
    p.set_defaults(func=run_get)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    HttpConnection.source = args.source
    summary = args.func(args)
    print(json.dumps(summary), flush=True)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
