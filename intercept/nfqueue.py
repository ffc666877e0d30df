"""Traditional mode: the target's responses arrive through NFQUEUE (spec §2.1, design §2).

Theory of operation
-------------------
intercept-mp runs on the target; an iptables rule on OUTPUT (``--sport PORT -j NFQUEUE``)
hands every response to our queue.  Per packet (spec §2.1): a ``daddr`` in the ``-x`` pass
list is ACCEPTed and goes out normally; anything else is DROPped and its headers go to the
tcpcopy that owns the session (``InterceptServer.receive_ip_packet``).

The queue's netlink fd sits in the server's selectors loop.  ``NetfilterQueue.run_socket``
reads until its socket says EAGAIN; we hand it a small reader object that stops after
``BATCH_MAX_PACKETS`` messages (so a flood never starves the tcpcopy sockets) and counts
ENOBUFS (the kernel telling us the netlink socket overflowed).  The kernel copies only
``COPY_RANGE_BYTES`` of each packet: the largest IPv4 + TCP headers, all a record needs.

``-q``: C ignores values <= 1024 (the kernel default); we keep that, so a C command line
behaves the same (spec §2.1).  The rule helpers below print the exact rule a user needs and
add/remove it for ``--install-rule``, tagged with a comment so we only ever delete ours.
"""

from __future__ import annotations

import errno
import logging
import socket
import subprocess
import warnings
from collections.abc import Iterable

from intercept.server import InterceptServer

__all__ = [
    "COPY_RANGE_BYTES",
    "QUEUE_MAXLEN_DEFAULT",
    "RULE_COMMENT",
    "NfqueueSource",
    "RuleError",
    "rule_spec",
    "rule_command",
    "install_rules",
    "remove_rules",
    "read_queue_dropped",
]

log = logging.getLogger("intercept.nfqueue")

#: 60-byte IP header + 60-byte TCP header (C copies 64, which loses the TCP options of a
#: response that carries IP options; 120 = REP_RCV_BUF_SIZE - 14 never does).
COPY_RANGE_BYTES = 120
QUEUE_MAXLEN_DEFAULT = 1024  # the kernel's default; C ignores -q values <= this (spec §2.1)
#: Netlink receive buffer (C asks for 16 MiB; needs root for SO_RCVBUFFORCE, as we are).
SOCK_RCVBUF_BYTES = 16 * 1024 * 1024
BATCH_MAX_PACKETS = 256
NETLINK_RECV_BYTES = 4096  # netfilterqueue's own BufferSize
RULE_COMMENT = "intercept-mp"
NF_QUEUE_PROC = "/proc/net/netfilter/nfnetlink_queue"


class RuleError(Exception):
    """iptables failed; str() is the one line the user sees."""


class _BoundedReader:
    """What ``run_socket`` reads from: at most ``limit`` messages, then a fake EAGAIN."""

    __slots__ = ("sock", "left", "exhausted", "overruns")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.left = 0
        self.exhausted = False
        self.overruns = 0

    def recv(self, bufsize: int) -> bytes:
        while True:
            if self.left <= 0:
                self.exhausted = True
                raise BlockingIOError(errno.EAGAIN, "batch limit")
            try:
                data = self.sock.recv(bufsize)
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    # The kernel dropped messages for us: count and go on reading.
                    self.overruns += 1
                    continue
                raise
            self.left -= 1
            return data


class NfqueueSource:
    """An NFQUEUE bound to ``queue_num``, feeding ``server`` (a ``PacketSource``)."""

    def __init__(
        self,
        server: InterceptServer,
        queue_num: int = 0,
        *,
        pass_ips: Iterable[int] = (),
        queue_maxlen: int | None = None,
    ) -> None:
        from netfilterqueue import COPY_PACKET, NetfilterQueue  # optional dependency (live)

        self.name = f"nfqueue:{queue_num}"
        self.server = server
        self.queue_num = queue_num
        self.pass_ips = frozenset(ip.to_bytes(4, "big") for ip in pass_ips)
        maxlen = QUEUE_MAXLEN_DEFAULT
        if queue_maxlen is not None and queue_maxlen > QUEUE_MAXLEN_DEFAULT:
            maxlen = queue_maxlen
        elif queue_maxlen is not None:
            log.info("-q %d <= %d: kernel default queue length kept", queue_maxlen, maxlen)
        self.queue_maxlen = maxlen
        self._now = 0.0
        self._last_overruns = 0
        self._kernel_dropped_base: int | None = None
        self._nfq = NetfilterQueue()
        with warnings.catch_warnings():
            # It warns when the kernel caps the buffer below what we asked; not fatal.
            warnings.simplefilter("ignore", RuntimeWarning)
            self._nfq.bind(
                queue_num,
                self._on_packet,
                max_len=maxlen,
                mode=COPY_PACKET,
                range=COPY_RANGE_BYTES,
                sock_len=SOCK_RCVBUF_BYTES,
            )
        # fromfd dups the fd: closing our socket object never closes the library's fd.
        self._sock = socket.fromfd(self._nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
        self._sock.setblocking(False)
        self._reader = _BoundedReader(self._sock)
        self._backlog = False
        self._kernel_dropped_base = read_queue_dropped(queue_num)

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def has_backlog(self) -> bool:
        return self._backlog

    def on_readable(self, now: float) -> None:
        self._now = now
        reader = self._reader
        reader.left = BATCH_MAX_PACKETS
        reader.exhausted = False
        try:
            self._nfq.run_socket(reader)
        except OSError as e:
            log.error("NFQUEUE %d recv failed: %s", self.queue_num, e.strerror or e)
        self._backlog = reader.exhausted
        if reader.overruns != self._last_overruns:
            # One ENOBUFS per overflow episode; the packets lost are in the kernel's
            # user_dropped column, which poll_stats folds into queue_dropped.
            self.server.counters["queue_overruns"] += reader.overruns - self._last_overruns
            self._last_overruns = reader.overruns

    def _on_packet(self, pkt) -> None:  # noqa: ANN001 - netfilterqueue.Packet
        # Never raise from here: netfilterqueue's C callback would swallow it badly and the
        # packet would stay queued without a verdict.
        try:
            payload = pkt.get_payload()
            if payload[16:20] in self.pass_ips:
                pkt.accept()  # -x pass list: the real client gets its answer (spec §2.1)
                self.server.counters["pass_accepted"] += 1
                return
            pkt.drop()  # the response must never reach the fake client (spec §2.1)
            self.server.receive_ip_packet(payload, self._now)
        except Exception as e:  # noqa: BLE001 - see above
            log.error("NFQUEUE packet handling failed: %s", e)
            try:
                pkt.drop()
            except RuntimeError:
                pass  # verdict already given

    def poll_stats(self) -> None:
        """Fold the kernel's queue_dropped + user_dropped for our queue into the counter."""
        dropped = read_queue_dropped(self.queue_num)
        if dropped is None or self._kernel_dropped_base is None:
            return
        delta = dropped - self._kernel_dropped_base
        if delta > 0:
            self.server.counters["queue_dropped"] += delta
            self._kernel_dropped_base = dropped

    def close(self) -> None:
        try:
            self._sock.close()
        finally:
            self._nfq.unbind()


def read_queue_dropped(queue_num: int, path: str = NF_QUEUE_PROC) -> int | None:
    """queue_dropped + user_dropped of ``queue_num`` from /proc (None if not listed).

    Columns: queue number, peer portid, queue total, copy mode, copy range, queue dropped,
    user dropped, id sequence, 1.
    """
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                cols = line.split()
                if len(cols) >= 7 and cols[0].isdigit() and int(cols[0]) == queue_num:
                    return int(cols[5]) + int(cols[6])
    except (OSError, ValueError):
        return None
    return None


# --- the iptables rule -----------------------------------------------------------------------


def rule_spec(sport: int, queue_num: int, comment: bool = True) -> list[str]:
    """The rule body after the chain name: responses from ``sport`` go to our queue."""
    spec = ["-p", "tcp", "--sport", str(sport)]
    if comment:
        spec += ["-m", "comment", "--comment", RULE_COMMENT]
    return spec + ["-j", "NFQUEUE", "--queue-num", str(queue_num)]


def rule_command(sport: int | str, queue_num: int) -> str:
    """The command line a user runs by hand (what intercept-mp prints at start-up)."""
    return f"iptables -I OUTPUT -p tcp --sport {sport} -j NFQUEUE --queue-num {queue_num}"


def _iptables(action: str, sport: int, queue_num: int) -> subprocess.CompletedProcess:
    cmd = ["iptables", "-w", "5", action, "OUTPUT", *rule_spec(sport, queue_num)]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuleError(f"--install-rule: cannot run iptables: {e}") from None


def install_rules(sports: Iterable[int], queue_num: int) -> list[int]:
    """Insert one rule per source port; returns the ports installed (for ``remove_rules``).

    A rule already present (a previous run killed with SIGKILL) is adopted, not duplicated.
    On a failure the rules inserted so far are removed before ``RuleError`` is raised.
    """
    done: list[int] = []
    for sport in sports:
        if _iptables("-C", sport, queue_num).returncode != 0:
            res = _iptables("-I", sport, queue_num)
            if res.returncode != 0:
                remove_rules(done, queue_num)
                msg = (res.stderr or res.stdout).strip().splitlines()
                raise RuleError(
                    f"--install-rule: iptables -I failed for --sport {sport}: "
                    f"{msg[-1] if msg else f'exit status {res.returncode}'}"
                )
            log.log(25, "installed: %s (comment %s)", rule_command(sport, queue_num), RULE_COMMENT)
        else:
            log.log(25, "already installed, adopted: %s", rule_command(sport, queue_num))
        done.append(sport)
    return done


def remove_rules(sports: Iterable[int], queue_num: int) -> None:
    """Delete the rules ``install_rules`` inserted (errors are logged, never raised)."""
    for sport in sports:
        try:
            res = _iptables("-D", sport, queue_num)
        except RuleError as e:
            log.error("%s", e)
            continue
        if res.returncode != 0:
            log.error(
                "could not remove the NFQUEUE rule for --sport %d: %s",
                sport,
                (res.stderr or res.stdout).strip(),
            )
        else:
            log.log(25, "removed the NFQUEUE rule for --sport %d", sport)
