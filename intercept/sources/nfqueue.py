"""Traditional mode: the target's responses arrive through NFQUEUE (spec §2.1, design §2).

Theory of operation
-------------------
intercept-mp runs on the target; an iptables rule on OUTPUT (``--sport PORT -j NFQUEUE``)
hands every response to our queue.  Per packet (spec §2.1): a ``daddr`` in the ``-x`` pass
list is ACCEPTed and goes out normally; anything else is DROPped and its headers go to the
tcpcopy that owns the session (through the ``receive`` callback: the server's
``receive_ip_packets``).

The queue's netlink fd sits in the server's selectors loop.  netfilterqueue binds the queue
(copy mode, range, queue length, buffer size); the data path is ours, so the per-packet cost
is a few struct unpacks instead of a library Packet object and a verdict syscall each:

* read: one recvmmsg(2) takes up to ``BATCH_MAX_PACKETS`` netlink messages (engine.io._fastio;
  without it, a bounded loop of recv), so a flood never starves the tcpcopy sockets; ENOBUFS
  (the kernel telling us the netlink socket overflowed) is counted as ``queue_overruns``;
* parse: each NFQNL_MSG_PACKET message gives its packet id (NFQA_PACKET_HDR) and the first
  ``COPY_RANGE_BYTES`` of the packet (NFQA_PAYLOAD): the largest IPv4 + TCP headers, all a
  record needs;
* verdicts: NFQNL_MSG_VERDICT_BATCH sets one verdict for every queued packet with an id up to
  the one given (the kernel's nfqnl_recv_verdict_batch), so a read batch costs one verdict
  message per run of equal verdicts: one DROP for a batch of responses, plus one ACCEPT per
  run of pass-list packets.  Verdicts go out before the records are routed, as before.
The compiled path (``--engine``, intercept/fastroute.py): with ``compiled`` (a
``CompiledPath``: the route table of engine/dataplane/responses.pyx and the server's
``receive_response_batch``) the read, the parse, the record encode and the routing of a
batch run in one C call (``ResponseTable.recv``), the -x pass list and its verdict runs
included; Python sends the verdicts and takes the records per connection.  The result is
the one described above, packet for packet (tests/unit/test_intercept_compiled.py).
``-q``: without it the queue holds QUEUE_MAXLEN packets, not the kernel's 1024: tcpcopy-mp
sends a batch of packets in one sendmmsg, the target answers all of them at once, and a queue
of 1024 overflows whenever intercept-mp is off the CPU for ~10 ms at 100,000 responses/s; each
response lost there (a SYN-ACK mostly) stalls its session until a retransmission, 1 s later.
C ignores -q values <= 1024 (the kernel default); so do we: such a value gives the kernel's
1024, and a C command line behaves as it does with C (spec §2.1).  The rule helpers below print
the exact rule a user needs and add/remove it for ``--install-rule``, tagged with a comment so
we only ever delete ours.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import subprocess
import warnings
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import NamedTuple, Protocol

from engine.io.logs import NOTICE
from intercept.errors import RuleError

__all__ = [
    "COPY_RANGE_BYTES",
    "QUEUE_MAXLEN",
    "QUEUE_MAXLEN_DEFAULT",
    "RULE_COMMENT",
    "CompiledPath",
    "NfqueueSource",
    "RuleError",
    "install_rules",
    "read_queue_dropped",
    "remove_rules",
    "rule_command",
    "rule_spec",
]

log = logging.getLogger("intercept.sources.nfqueue")

#: 60-byte IP header + 60-byte TCP header (C copies 64, which loses the TCP options of a
#: response that carries IP options; 120 = REP_RCV_BUF_SIZE - 14 never does).
COPY_RANGE_BYTES = 120
QUEUE_MAXLEN_DEFAULT = 1024  # the kernel's default; C ignores -q values <= this (spec §2.1)
QUEUE_MAXLEN = 8192
"""The queue's length without -q.  A queued packet holds its buffer in the target's kernel until
the verdict (one MTU-sized segment at most: the queue does not take GSO packets whole), so a
full queue is about 20 MB there, and only while intercept-mp is behind."""
#: Netlink receive buffer (C asks for 16 MiB; needs root for SO_RCVBUFFORCE, as we are).
SOCK_RCVBUF_BYTES = 16 * 1024 * 1024
BATCH_MAX_PACKETS = 256
#: One queued packet's message: headers and attributes (< 200 bytes) + COPY_RANGE_BYTES.
NETLINK_RECV_BYTES = 2048
RULE_COMMENT = "intercept-mp"
NF_QUEUE_PROC = "/proc/net/netfilter/nfnetlink_queue"


# -- netlink (linux/netlink.h, linux/netfilter/nfnetlink{,_queue}.h) -----------------------------

_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid (host order)
_NFGEN = struct.Struct("!BBH")  # nfgenmsg: family, version, res_id (queue number, big endian)
_NLA = struct.Struct("=HH")  # nlattr: len, type
_VERDICT_HDR = struct.Struct("!II")  # nfqnl_msg_verdict_hdr: verdict, packet id
_NLMSG_HDR_BYTES = _NLMSG.size + _NFGEN.size
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_PAYLOAD = 10
NLM_F_REQUEST = 1
NF_DROP, NF_ACCEPT = 0, 1
_PACKET_MSG_TYPE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET


def parse_queue_messages(buf: bytes) -> Iterator[tuple[int, bytes | None]]:
    """(packet id, payload) of every NFQNL_MSG_PACKET message in one netlink datagram.

    A message without a payload attribute yields None (it still needs its verdict); other
    message types (errors, acks) and a truncated tail are skipped.
    """
    n = len(buf)
    pos = 0
    while pos + _NLMSG_HDR_BYTES <= n:
        mlen, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(buf, pos)
        if mlen < _NLMSG.size or pos + mlen > n:
            return
        end = pos + mlen
        if mtype == _PACKET_MSG_TYPE:
            pid = None
            payload = None
            a = pos + _NLMSG_HDR_BYTES
            while a + 4 <= end:
                alen, atype = _NLA.unpack_from(buf, a)
                if alen < 4 or a + alen > end:
                    break
                atype &= _NLA_TYPE_MASK
                if atype == NFQA_PACKET_HDR and alen >= 8:
                    pid = int.from_bytes(buf[a + 4 : a + 8], "big")
                elif atype == NFQA_PAYLOAD:
                    payload = buf[a + 4 : a + alen]
                a += (alen + 3) & ~3
            if pid is not None:
                yield pid, payload
        pos += (mlen + 3) & ~3


def verdict_batch_message(queue_num: int, verdict: int, last_id: int) -> bytes:
    """NFQNL_MSG_VERDICT_BATCH: ``verdict`` for every queued packet with id <= last_id."""
    attr = _NLA.pack(4 + _VERDICT_HDR.size, NFQA_VERDICT_HDR) + _VERDICT_HDR.pack(verdict, last_id)
    mtype = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, queue_num) + attr
    return _NLMSG.pack(_NLMSG.size + len(body), mtype, NLM_F_REQUEST, 0, 0) + body


def _parse_datagrams_py(msgs: list[bytes]) -> list[tuple[int, bytes | None]]:
    return [entry for buf in msgs for entry in parse_queue_messages(buf)]


try:
    from engine.io._fastio import parse_nfqueue as _parse_datagrams  # type: ignore[attr-defined]
except ImportError:  # the C extension is optional; same results, more Python per packet
    _parse_datagrams = _parse_datagrams_py


def _recv_batch_fallback(sock: socket.socket, limit: int, bufsize: int) -> list[bytes] | int:
    """engine.io._fastio.recv_batch's contract with one recv per message."""
    out: list[bytes] = []
    while len(out) < limit:
        try:
            out.append(sock.recv(bufsize))
        except BlockingIOError:
            break
        except OSError as e:
            if e.errno == errno.ENOBUFS and not out:
                return -errno.ENOBUFS
            if e.errno == errno.ENOBUFS:
                break  # report the overrun on the next call
            raise
    return out


class ResponseTable(Protocol):
    """What the source uses of engine.dataplane.responses.ResponseTable."""

    entries_seen: int
    last_id: int
    packets: int
    pass_accepted: int
    has_pass_list: bool

    def recv(self, fd: int) -> int: ...

    def set_pass(self, ips: Iterable[int]) -> None: ...

    def verdict_runs(self) -> list[tuple[int, int]]: ...

    def receive_datagrams(self, datagrams: list[bytes]) -> int: ...


class CompiledPath(NamedTuple):
    """The compiled response path (intercept/cli.py builds it): the route table that reads
    and routes a batch, and the server's ``receive_response_batch`` that takes it."""

    table: ResponseTable
    receive: Callable[[ResponseTable, float], None]


class NfqueueSource:
    """An NFQUEUE bound to ``queue_num`` pushing responses into ``receive``; a ``PacketSource``."""

    def __init__(
        self,
        receive: Callable[[list[bytes], float], None],
        counters: MutableMapping[str, int],
        queue_num: int = 0,
        *,
        pass_ips: Iterable[int] = (),
        queue_maxlen: int | None = None,
        compiled: CompiledPath | None = None,
    ) -> None:
        from netfilterqueue import COPY_PACKET, NetfilterQueue  # optional dependency (live)

        self.name = f"nfqueue:{queue_num}"
        self.receive = receive  # the server's receive_ip_packets(packets, now)
        self.counters = counters  # the server's counters, which these sources add to
        self.queue_num = queue_num
        self.pass_ips = frozenset(ip.to_bytes(4, "big") for ip in pass_ips)
        self.compiled = compiled
        if compiled is not None and self.pass_ips:
            compiled.table.set_pass(pass_ips)
        maxlen = QUEUE_MAXLEN
        if queue_maxlen is not None and queue_maxlen > QUEUE_MAXLEN_DEFAULT:
            maxlen = queue_maxlen
        elif queue_maxlen is not None:
            maxlen = QUEUE_MAXLEN_DEFAULT
            log.info("-q %d <= %d: the kernel's default queue length", queue_maxlen, maxlen)
        self.queue_maxlen = maxlen
        self._kernel_dropped_base: int | None = None
        self._nfq = NetfilterQueue()
        with warnings.catch_warnings():
            # It warns when the kernel caps the buffer below what we asked; not fatal.
            warnings.simplefilter("ignore", RuntimeWarning)
            self._nfq.bind(
                queue_num,
                _library_callback,
                max_len=maxlen,
                mode=COPY_PACKET,
                range=COPY_RANGE_BYTES,
                sock_len=SOCK_RCVBUF_BYTES,
            )
        # fromfd dups the fd: closing our socket object never closes the library's fd.
        self._sock = socket.fromfd(self._nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
        self._sock.setblocking(False)
        self._backlog = False
        self._kernel_dropped_base = read_queue_dropped(queue_num)
        try:
            from engine.io._fastio import recv_batch  # type: ignore[attr-defined]

            self._recv = lambda: recv_batch(
                self._sock.fileno(), BATCH_MAX_PACKETS, NETLINK_RECV_BYTES
            )
        except ImportError:
            log.info("engine.io._fastio is not built: NFQUEUE reads one recv per packet")
            self._recv = lambda: _recv_batch_fallback(
                self._sock, BATCH_MAX_PACKETS, NETLINK_RECV_BYTES
            )

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def has_backlog(self) -> bool:
        return self._backlog

    def on_readable(self, now: float) -> None:
        if self.compiled is not None:
            self._on_readable_compiled(self.compiled.table, now)
            return
        try:
            msgs = self._recv()
        except OSError as e:
            log.error("NFQUEUE %d recv failed: %s", self.queue_num, e.strerror or e)
            self._backlog = False
            return
        if isinstance(msgs, int):
            # ENOBUFS: one per overflow episode; the packets lost are in the kernel's
            # user_dropped column, which poll_stats folds into queue_dropped.
            self.counters["queue_overruns"] += 1
            self._backlog = True  # more is waiting behind the overrun
            return
        self._backlog = len(msgs) >= BATCH_MAX_PACKETS
        if msgs:
            self.receive_messages(msgs, now)

    def receive_messages(self, msgs: list[bytes], now: float) -> None:
        """One read batch: verdicts first (one per run of equal verdicts), then the records."""
        entries = _parse_datagrams(msgs)
        if not entries:
            return
        queue = self.queue_num
        pass_ips = self.pass_ips
        if not pass_ips:
            # The usual case: every packet is a response to drop (spec §2.1), one verdict.
            self._send_verdicts([verdict_batch_message(queue, NF_DROP, entries[-1][0])])
            responses = [p for _, p in entries if p is not None]
        else:
            responses = []
            verdicts: list[bytes] = []
            run_verdict = -1
            run_last = 0
            passed = 0
            for pid, payload in entries:
                if payload is not None and payload[16:20] in pass_ips:
                    verdict = NF_ACCEPT  # -x pass list: the real client gets its answer
                    passed += 1
                else:
                    verdict = NF_DROP  # never reaches the fake client (spec §2.1)
                    if payload is not None:
                        responses.append(payload)
                if verdict != run_verdict and run_verdict >= 0:
                    verdicts.append(verdict_batch_message(queue, run_verdict, run_last))
                run_verdict, run_last = verdict, pid
            verdicts.append(verdict_batch_message(queue, run_verdict, run_last))
            self._send_verdicts(verdicts)
            if passed:
                self.counters["pass_accepted"] += passed
        if responses:
            self.receive(responses, now)

    def _on_readable_compiled(self, table: ResponseTable, now: float) -> None:
        try:
            n = table.recv(self._sock.fileno())
        except OSError as e:
            log.error("NFQUEUE %d recv failed: %s", self.queue_num, e.strerror or e)
            self._backlog = False
            return
        if n < 0:  # -ENOBUFS, as on_readable's
            self.counters["queue_overruns"] += 1
            self._backlog = True
            return
        self._backlog = n >= BATCH_MAX_PACKETS
        if n:
            self._compiled_batch(now)

    def receive_messages_compiled(self, msgs: list[bytes], now: float) -> None:
        """``receive_messages`` through the compiled path (the batch ``recv`` would read)."""
        assert self.compiled is not None
        self.compiled.table.receive_datagrams(msgs)
        self._compiled_batch(now)

    def _compiled_batch(self, now: float) -> None:
        # receive_messages: the verdicts (one DROP up to the last packet message, or the
        # runs of -x), then the records, already encoded and routed per connection in C.
        assert self.compiled is not None
        table = self.compiled.table
        if not table.entries_seen:
            return
        queue = self.queue_num
        if table.has_pass_list:
            self._send_verdicts(
                [verdict_batch_message(queue, v, i) for v, i in table.verdict_runs()]
            )
            if table.pass_accepted:
                self.counters["pass_accepted"] += table.pass_accepted
        else:
            self._send_verdicts([verdict_batch_message(queue, NF_DROP, table.last_id)])
        if table.packets:
            self.compiled.receive(table, now)

    def _send_verdicts(self, verdicts: list[bytes]) -> None:
        try:
            if len(verdicts) == 1:
                self._sock.send(verdicts[0])
            else:
                self._sock.sendmsg(verdicts)  # netlink: one datagram of several messages
        except OSError as e:
            # The packets stay queued until the next verdict covers them (ids only grow);
            # logged, never fatal.
            log.error("NFQUEUE %d verdict failed: %s", self.queue_num, e.strerror or e)

    def poll_stats(self) -> None:
        """Fold the kernel's queue_dropped + user_dropped for our queue into the counter."""
        dropped = read_queue_dropped(self.queue_num)
        if dropped is None or self._kernel_dropped_base is None:
            return
        delta = dropped - self._kernel_dropped_base
        if delta > 0:
            self.counters["queue_dropped"] += delta
            self._kernel_dropped_base = dropped

    def close(self) -> None:
        try:
            self._sock.close()
        finally:
            self._nfq.unbind()


def _library_callback(pkt) -> None:
    # Never called: we read the socket ourselves and never hand messages to the library.
    # Should it ever be, the response must still not reach the fake client.
    pkt.drop()


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
    return [*spec, "-j", "NFQUEUE", "--queue-num", str(queue_num)]


def rule_command(sport: int | str, queue_num: int) -> str:
    """The command line a user runs by hand (what intercept-mp prints at start-up)."""
    return f"iptables -I OUTPUT -p tcp --sport {sport} -j NFQUEUE --queue-num {queue_num}"


def _iptables(action: str, sport: int, queue_num: int) -> subprocess.CompletedProcess:
    cmd = ["iptables", "-w", "5", action, "OUTPUT", *rule_spec(sport, queue_num)]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuleError("--install-rule", f"cannot run iptables: {e}") from None


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
                    "--install-rule",
                    f"iptables -I failed for --sport {sport}: "
                    f"{msg[-1] if msg else f'exit status {res.returncode}'}",
                    sport,
                )
            log.log(
                NOTICE, "installed: %s (comment %s)", rule_command(sport, queue_num), RULE_COMMENT
            )
        else:
            log.log(NOTICE, "already installed, adopted: %s", rule_command(sport, queue_num))
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
            log.log(NOTICE, "removed the NFQUEUE rule for --sport %d", sport)
