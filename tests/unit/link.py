"""An in-memory link for engine tests: a fake clock, a scripted client, a scripted target.

* ``Client`` makes captured client->online packets (the online server's side is only implied
  by the client's ack numbers: ``read=n`` = the client had read n response bytes).
* ``Target`` is the target's half of the connection: it learns from the packets we send
  (``observe``) and makes response records (header-only ``TcpPacket`` with ``data_len``, as
  intercept delivers them).
* ``Link`` drives one TcpSession on a fake clock: every packet the session sends is parsed
  back with ``packet.parse_ip``, checked (checksums, MTU, addresses) and handed to the target
  unless the test asks for a loss; ``run`` steps the clock from timer to timer.

Nothing here sleeps: time only moves when a test moves it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.codec import packet
from engine.codec.packet import ACK, FIN, PSH, RST, SYN, TcpPacket

M32 = 0xFFFFFFFF

ORIG_CLIENT = (packet.ip_from_str("198.18.1.10"), 51000)
ONLINE = (packet.ip_from_str("198.18.1.2"), 80)
FAKE_CLIENT = (packet.ip_from_str("198.19.1.10"), 51000)
TARGET = (packet.ip_from_str("198.18.2.3"), 8080)


def ts_option(tsval: int, tsecr: int) -> bytes:
    return packet.build_options(timestamp=(tsval, tsecr))


class Client:
    """Captured packets of one client connection to the online server."""

    def __init__(
        self,
        isn: int = 1000,
        online_isn: int = 70000,
        *,
        addr: tuple[int, int] = ORIG_CLIENT,
        online: tuple[int, int] = ONLINE,
        ts: int | None = None,
        wscale: int | None = 7,
        mss: int = 1460,
        window: int = 502,
        ip_id: int = 100,
    ) -> None:
        self.addr = addr
        self.online = online
        self.isn = isn
        self.seq = (isn + 1) & M32
        self.online_isn = online_isn
        self.ts = ts  # None: no TS option
        self.wscale = wscale
        self.mss = mss
        self.window = window
        self.ip_id = ip_id

    def _pkt(self, seq: int, ack: int, flags: int, payload: bytes = b"", **kw) -> TcpPacket:
        opts = kw.pop("options", None)
        if opts is None:
            opts = ts_option(self.ts, 0) if self.ts is not None else b""
            if self.ts is not None:
                self.ts += 1
        self.ip_id = (self.ip_id + 1) & 0xFFFF
        return TcpPacket(
            self.addr[0],
            self.online[0],
            self.addr[1],
            self.online[1],
            seq & M32,
            ack & M32,
            flags,
            kw.pop("window", self.window),
            opts,
            payload,
            ip_id=self.ip_id,
            ttl=kw.pop("ttl", 61),
            df=True,
        )

    def syn(self) -> TcpPacket:
        opts = packet.build_options(
            mss=self.mss,
            sack_permitted=True,
            timestamp=(self.ts, 0) if self.ts is not None else None,
            wscale=self.wscale,
        )
        return self._pkt(self.isn, 0, SYN, options=opts, window=64240)

    def online_ack(self, read: int) -> int:
        return (self.online_isn + 1 + read) & M32

    def ack(self, read: int = 0) -> TcpPacket:
        return self._pkt(self.seq, self.online_ack(read), ACK)

    def data(self, payload: bytes, read: int = 0, *, flags: int = PSH | ACK, **kw) -> TcpPacket:
        p = self._pkt(self.seq, self.online_ack(read), flags, payload, **kw)
        self.seq = (self.seq + len(payload) + (1 if flags & FIN else 0)) & M32
        return p

    def fin(self, read: int = 0) -> TcpPacket:
        p = self._pkt(self.seq, self.online_ack(read), FIN | ACK)
        self.seq = (self.seq + 1) & M32
        return p

    def rst(self, read: int = 0) -> TcpPacket:
        return self._pkt(self.seq, self.online_ack(read), RST | ACK)


class Target:
    """The target's side: learns from what we send, answers with response records."""

    def __init__(
        self,
        isn: int = 5_000_000,
        *,
        addr: tuple[int, int] = TARGET,
        client: tuple[int, int] = FAKE_CLIENT,
        window: int = 65535,
        wscale: int | None = 7,
        ts: int | None = 9000,
        mss: int = 1460,
    ) -> None:
        self.addr = addr
        self.client = client
        self.isn = isn
        self.snd_nxt = (isn + 1) & M32
        self.rcv_nxt: int | None = None  # next client seq expected
        self.window = window
        self.wscale = wscale
        self.ts = ts
        self.ts_recent = 0
        self.mss = mss
        self.received: list[TcpPacket] = []
        self.data = bytearray()
        self.ooo: dict[int, TcpPacket] = {}

    def observe(self, p: TcpPacket) -> None:
        """What the target would do with our packet's sequence space (in-order only)."""
        self.received.append(p)
        opts = packet.parse_options(p.options)
        if opts.timestamp is not None:
            self.ts_recent = opts.timestamp[0]
        if p.flags & SYN:
            self.rcv_nxt = (p.seq + 1) & M32
            return
        if self.rcv_nxt is None:
            return
        if p.payload or p.flags & FIN:
            self.ooo[p.seq] = p
        # Like a real receiver: in-order data is taken, out-of-order data waits for the hole.
        while (q := self.ooo.pop(self.rcv_nxt, None)) is not None:
            self.rcv_nxt = (self.rcv_nxt + len(q.payload) + (1 if q.flags & FIN else 0)) & M32
            self.data += q.payload

    def _opts(self) -> bytes:
        if self.ts is None:
            return b""
        self.ts += 1
        return ts_option(self.ts, self.ts_recent)

    def _pkt(self, seq: int, flags: int, n: int = 0, ack: int | None = None, **kw) -> TcpPacket:
        if ack is None:
            ack = self.rcv_nxt or 0
        return TcpPacket(
            self.addr[0],
            self.client[0],
            self.addr[1],
            self.client[1],
            seq & M32,
            ack & M32,
            flags,
            kw.pop("window", self.window),
            kw.pop("options", None) if "options" in kw else self._opts(),
            b"",
            data_len=n,
        )

    def synack(self, *, window: int = 29200, **kw) -> TcpPacket:
        opts = packet.build_options(
            mss=self.mss,
            sack_permitted=True,
            timestamp=(self.ts, self.ts_recent) if self.ts is not None else None,
            wscale=self.wscale,
        )
        return self._pkt(self.isn, SYN | ACK, options=opts, window=window, **kw)

    def ack(self, ack: int | None = None, **kw) -> TcpPacket:
        return self._pkt(self.snd_nxt, ACK, ack=ack, **kw)

    def send(self, n: int, *, fin: bool = False, **kw) -> TcpPacket:
        """Response data of n bytes (header only, like an intercept record)."""
        p = self._pkt(self.snd_nxt, PSH | ACK | (FIN if fin else 0), n, **kw)
        self.snd_nxt = (self.snd_nxt + n + (1 if fin else 0)) & M32
        return p

    def fin(self, **kw) -> TcpPacket:
        return self.send(0, fin=True, **kw)

    def rst(self, **kw) -> TcpPacket:
        return self._pkt(self.snd_nxt, RST | ACK, options=b"", **kw)


@dataclass
class Sent:
    at: float
    pkt: TcpPacket

    @property
    def flags(self) -> int:
        return self.pkt.flags


@dataclass
class Link:
    """One session, one target, a fake clock."""

    session: object
    target: Target
    now: float = 0.0
    mtu: int = 1500
    log: list[Sent] = field(default_factory=list)
    lose: int = 0
    """Lose the next n packets we send (the target never sees them)."""

    def client(self, *pkts: TcpPacket) -> list[TcpPacket]:
        for p in pkts:
            self.session.receive_client(p, self.now)
        return self.flush()

    def respond(self, *pkts: TcpPacket) -> list[TcpPacket]:
        for p in pkts:
            self.session.receive_response(p, self.now)
        return self.flush()

    def flush(self) -> list[TcpPacket]:
        out = []
        for raw in self.session.packets_to_send(self.now):
            out.append(self._check(raw))
        for p in out:
            self.log.append(Sent(self.now, p))
            if self.lose > 0:
                self.lose -= 1
            else:
                self.target.observe(p)
        return out

    def _check(self, raw: bytes) -> TcpPacket:
        assert len(raw) <= self.mtu, f"{len(raw)} bytes > mtu {self.mtu}"
        p = packet.parse_ip(raw)
        assert packet.checksum(raw[:20]) == 0, "bad IP checksum"
        assert packet.tcp_checksum(p.src, p.dst, raw[20:]) == 0, "bad TCP checksum"
        s = self.session
        assert (p.src, p.sport) == s.client and (p.dst, p.dport) == s.target
        return p

    def advance(self, dt: float) -> list[TcpPacket]:
        """Move the clock by dt, firing every timer on the way (in order)."""
        return self.run(self.now + dt)

    def run(self, until: float) -> list[TcpPacket]:
        out: list[TcpPacket] = []
        while True:
            t = self.session.get_timer()
            if t is None or t > until:
                break
            self.now = max(self.now, t)
            self.session.handle_timer(self.now)
            out += self.flush()
        self.now = until
        out += self.flush()
        return out

    def events(self) -> list:
        evs = []
        while (e := self.session.next_event()) is not None:
            evs.append(e)
        return evs


def flags_str(flags: int) -> str:
    return "".join(
        n for bit, n in ((SYN, "S"), (FIN, "F"), (RST, "R"), (PSH, "P"), (ACK, "A")) if flags & bit
    )


class TableLink:
    """A SessionTable on a fake clock, with one Target per fake client tuple."""

    def __init__(self, table, *, target_addr: tuple[int, int] = TARGET, **target_kw) -> None:
        self.table = table
        self.now = 0.0
        self.target_addr = target_addr
        self.target_kw = target_kw
        self.targets: dict[tuple[int, int], Target] = {}
        self.routes: list = []
        self.log: list[Sent] = []

    def target(self, client: tuple[int, int]) -> Target:
        return self.targets[client]

    def client(self, *pkts: TcpPacket) -> list[TcpPacket]:
        for p in pkts:
            self.table.receive_client(p, self.now)
        return self.drain()

    def respond(self, *pkts: TcpPacket) -> list[TcpPacket]:
        for p in pkts:
            self.table.receive_response(p, self.now)
        return self.drain()

    def drain(self) -> list[TcpPacket]:
        routes, raws = self.table.drain()
        self.routes += routes
        announced = {(r.client_ip, r.client_port) for r in self.routes}
        out = []
        for raw in raws:
            p = packet.parse_ip(raw)
            assert packet.tcp_checksum(p.src, p.dst, raw[20:]) == 0
            key = (p.src, p.sport)
            # design §6 item 1: a SYN never goes out before its route.
            assert key in announced
            if key not in self.targets:
                self.targets[key] = Target(addr=self.target_addr, client=key, **self.target_kw)
            self.targets[key].observe(p)
            self.log.append(Sent(self.now, p))
            out.append(p)
        return out

    def run(self, until: float) -> list[TcpPacket]:
        out: list[TcpPacket] = []
        while True:
            t = self.table.get_timer()
            if t is None or t > until:
                break
            self.now = max(self.now, t)
            self.table.handle_timer(self.now)
            out += self.drain()
        self.now = until
        return out


class MirrorTarget(Target):
    """A target that answers like the online server did: ``turns[k]`` = (the response
    segment sizes after the client's k-th data segment, whether the server then closed)."""

    def __init__(self, turns: list[tuple[list[int], bool]], **kw) -> None:
        super().__init__(**kw)
        self.turns = list(turns)
        self.fin_sent = False
        self.requests = 0

    def answer(self, p: TcpPacket) -> list[TcpPacket]:
        before = self.rcv_nxt
        self.observe(p)
        if p.flags & RST:
            return []
        if p.flags & SYN:
            return [self.synack()]
        out: list[TcpPacket] = []
        if p.payload and self.rcv_nxt != before:
            self.requests += 1
            sizes, fin = self.turns.pop(0) if self.turns else ([], False)
            out += [self.send(n) for n in sizes]
            if fin and not self.fin_sent:
                self.fin_sent = True
                out.append(self.fin())
        if p.flags & FIN and self.rcv_nxt != before:
            if self.fin_sent:
                out.append(self.ack())
            else:
                self.fin_sent = True
                out.append(self.fin())
        if p.payload and not out:
            out.append(self.ack())
        return out
