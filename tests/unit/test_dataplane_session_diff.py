"""Differential test: the compiled session (engine.dataplane.engine.Session) against TcpSession.

Both get the same random inputs: captured client packets (real or missing handshake, data
reordered, lost, duplicated, overlapping, cut by the snaplen, larger than the MTU, FIN, RST,
stray sequence numbers), response records (SYN-ACKs with and without window scaling and
timestamps, ACKs of what was sent or of nothing, data of any length, zero windows, FIN, RST)
and clock steps with handle_timer, plus the calls the table makes (route down and back, ring
loss, end of input, half-open shedding).  After every step both must have sent the same
packets (bytes), raised the same events, counted the same counters, and agree on the timer,
the state and what is still unsent.  The Python engine is the specification.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.codec import packet
from engine.codec.packet import ACK, FIN, PSH, RST, SYN, URG, TcpPacket
from engine.core.config import SessionConfig
from engine.core.session import TcpSession
from tests.unit.conftest import compiled_session_class
from tests.unit.link import FAKE_CLIENT, ONLINE, ORIG_CLIENT, TARGET

M32 = 0xFFFFFFFF
DIFF_EXAMPLES = int(os.environ.get("TCPCOPY_MP_DIFF_EXAMPLES", "400"))
"""Examples per run (each a whole session of up to STEPS_MAX steps); a long run sets
TCPCOPY_MP_DIFF_EXAMPLES."""
STEPS_MAX = 80
C2O = (ORIG_CLIENT[0], ONLINE[0], ORIG_CLIENT[1], ONLINE[1])
T2C = (TARGET[0], FAKE_CLIENT[0], TARGET[1], FAKE_CLIENT[1])


def _configs() -> st.SearchStrategy[SessionConfig]:
    return st.builds(
        SessionConfig,
        mtu=st.sampled_from([576, 700, 1500]),
        mss=st.sampled_from([536, 1400]),
        wait_response=st.booleans(),
        fake_handshake=st.booleans(),
        reconnect=st.booleans(),
        reconnect_budget=st.integers(0, 3),
        response_wait_max_s=st.sampled_from([0.05, 1.0]),
        linger_s=st.sampled_from([0.5, 6.0]),
        session_timeout_s=st.sampled_from([5.0, 600.0]),
        keepalive_timeout_s=st.sampled_from([3.0, 720.0]),
        rtt_initial_s=st.sampled_from([0.001, 0.02]),
        fin_wait_timeout_s=st.sampled_from([2.0, 60.0]),
    )


class Model:
    """What the random inputs are drawn relative to: the client's stream and the target's."""

    def __init__(self, data: st.DataObject) -> None:
        draw = data.draw
        self.draw = draw
        self.isn = draw(st.integers(0, M32), label="client isn")
        self.online_isn = draw(st.integers(0, M32), label="online isn")
        self.tisn = draw(st.integers(0, M32), label="target isn")
        self.ts = draw(st.none() | st.integers(0, M32), label="client TS")
        self.wscale = draw(st.none() | st.integers(0, 15), label="client wscale")
        self.stream = 0  # client bytes generated so far
        self.read = 0  # response bytes the online client had read
        self.ip_id = draw(st.integers(0, 0xFFFF))
        self.sent: list[TcpPacket] = []  # what the Python session sent
        self.tnxt = 0  # target bytes sent after its SYN
        self.t_ts = draw(st.none() | st.integers(0, M32), label="target TS")
        self.t_wscale = draw(st.none() | st.integers(0, 14), label="target wscale")
        self.tos = draw(st.sampled_from([0, 0x10, 0xB8]), label="client tos")
        self.df = draw(st.booleans(), label="client df")
        self.last_client: list[TcpPacket] = []
        self.last_response: TcpPacket | None = None

    def _synack(self, ack: int) -> TcpPacket:
        draw = self.draw
        flags = SYN | ACK | draw(st.sampled_from([0] * 5 + [RST]))
        window = draw(st.sampled_from([29200, 29200, 0, 1000, 65535]))
        syn_opts = packet.build_options(
            mss=1460,
            wscale=self.t_wscale,
            timestamp=None if self.t_ts is None else (self.t_ts, 0),
        )
        return TcpPacket(*T2C, self.tisn & M32, ack, flags, window, syn_opts)

    def _cpkt(self, seq: int, flags: int, payload: bytes = b"", **kw) -> TcpPacket:
        self.ip_id = (self.ip_id + 1) & 0xFFFF
        opts = b""
        if self.ts is not None:
            self.ts = (self.ts + self.draw(st.integers(0, 3))) & M32
            opts = packet.build_options(timestamp=(self.ts, 1234))
        return TcpPacket(
            *C2O,
            seq=seq & M32,
            ack=(self.online_isn + 1 + self.read) & M32 if flags & ACK else 0,
            flags=flags,
            window=kw.pop("window", 502),
            options=kw.pop("options", opts),
            payload=payload,
            ip_id=self.ip_id,
            ttl=kw.pop("ttl", 61),
            tos=self.tos,
            df=self.df,
            **kw,
        )

    def client_packet(self) -> TcpPacket:
        draw = self.draw
        kind = draw(
            st.sampled_from(
                ["data"] * 10
                + ["read"] * 4
                + ["ack", "ack", "dup", "dup"]
                + ["syn", "fin", "rst", "old", "stray"]
            ),
            label="client kind",
        )
        base = self.isn + 1
        if kind == "dup" and self.last_client:
            return draw(st.sampled_from(self.last_client))
        if kind == "read":
            self.read += draw(st.integers(0, 3000))
            kind = "data"
        if kind == "syn":
            opts = packet.build_options(
                mss=draw(st.sampled_from([None, 0, 536, 1460])),
                wscale=None if self.wscale is None else min(self.wscale, 14),
                sack_permitted=draw(st.booleans()),
                timestamp=None if self.ts is None else (self.ts, 0),
            )
            flags = SYN | draw(st.sampled_from([0, 0, 0, ACK, 0x40 | 0x80]))
            return self._cpkt(self.isn, flags, options=opts, window=64240)
        if kind == "ack":
            return self._cpkt(base + draw(st.integers(0, self.stream)), ACK)
        if kind == "fin":
            at = draw(st.integers(max(self.stream - 50, 0), self.stream + 20))
            return self._cpkt(base + at, FIN | ACK)
        if kind == "rst":
            at = draw(st.integers(max(self.stream - 50, 0), self.stream + 20))
            return self._cpkt(base + at, RST | draw(st.sampled_from([0, ACK])))
        if kind == "stray":
            return self._cpkt(draw(st.integers(0, M32)), ACK | PSH, b"z" * draw(st.integers(1, 40)))
        n = draw(st.integers(1, 3000) if draw(st.booleans()) else st.integers(1, 200))
        if kind == "old":
            at = draw(st.integers(max(self.stream - 4000, -5), self.stream))
        else:
            # mostly the next bytes; sometimes ahead (a hole: the segment before was lost)
            at = self.stream + draw(st.sampled_from([0, 0, 0, 0, 0, 1, 100, 3000]))
            self.stream = max(self.stream, at + n)
        payload = bytes((at + i) & 0xFF for i in range(n))
        kw: dict = {}
        if draw(st.integers(0, 9)) == 0:  # cut by the snaplen
            kw["data_len"] = n
            payload = payload[: draw(st.integers(0, n - 1))]
        flags = ACK | draw(st.sampled_from([PSH, PSH, 0, PSH | FIN, URG]))
        if draw(st.integers(0, 9)) == 0:
            flags &= ~ACK
        window = draw(st.sampled_from([502, 502, 0, 65535]))
        if draw(st.integers(0, 9)) == 0:  # IP options: the MTU split counts them
            kw["ip_options"] = b"\x01" * draw(st.sampled_from([4, 8, 40]))
        return self._cpkt(base + at, flags, payload, window=window, **kw)

    def observe(self, raws: list[bytes]) -> None:
        for raw in raws:
            self.sent.append(packet.parse_ip(raw))
        del self.sent[:-40]

    def answer(self, n: int) -> TcpPacket:
        """n bytes of answer in order, acking what was sent last."""
        last = self.sent[-1] if self.sent else None
        ack = 0
        if last is not None:
            ack = (last.seq + len(last.payload) + (1 if last.flags & (SYN | FIN) else 0)) & M32
        acked = [p.ack for p in self.sent if p.flags & ACK and not p.flags & (RST | SYN)]
        seq = acked[-1] if acked else (self.tisn + 1 + self.tnxt) & M32  # what it expects
        self.tnxt = (seq + n - self.tisn - 1) & M32
        opts = b""
        if self.t_ts is not None:
            self.t_ts = (self.t_ts + 1) & M32
            opts = packet.build_options(timestamp=(self.t_ts, 0))
        return TcpPacket(*T2C, seq, ack, PSH | ACK, 29200, opts, data_len=n)

    def request(self, read: int) -> TcpPacket:
        """The client's next request after reading ``read`` more bytes of answer."""
        self.read += read
        n = self.draw(st.integers(1, 300))
        at = self.stream
        self.stream += n
        payload = bytes((at + i) & 0xFF for i in range(n))
        return self._cpkt(self.isn + 1 + at, PSH | ACK, payload)

    def response(self, handshaking: bool) -> TcpPacket:
        draw = self.draw
        if handshaking and draw(st.integers(0, 3)):
            syn = next((p for p in reversed(self.sent) if p.flags & SYN), None)
            if syn is not None:
                self.tisn = draw(st.sampled_from([self.tisn, self.tisn, self.tisn + 99999]))
                self.tnxt = 0
                return self._synack((syn.seq + 1) & M32)
        kind = draw(
            st.sampled_from(
                ["ack"] * 8 + ["data"] * 8 + ["dup"] * 4 + ["synack"] * 3 + ["fin", "rst", "odd"]
            ),
            label="response kind",
        )
        acks = [((p.seq + len(p.payload) + (1 if p.flags & (SYN | FIN) else 0)) & M32)
                for p in self.sent[-4:]]  # fmt: skip
        how = draw(st.integers(0, 9))
        if acks and how < 6:
            ack = acks[-1]  # what was sent last: the usual answer
        elif acks and how < 9:
            ack = draw(st.sampled_from(acks))
        else:
            ack = draw(st.integers(0, M32))
        if kind == "rst" and draw(st.integers(0, 2)):
            kind = "ack"  # a reset ends the connection: rarer than the rest
        window = draw(st.sampled_from([29200, 29200, 0, 1, 100, 1000, 65535]))
        opts = b""
        if self.t_ts is not None:
            self.t_ts = (self.t_ts + draw(st.integers(0, 5))) & M32
            opts = packet.build_options(timestamp=(self.t_ts, 0))
            if draw(st.integers(0, 9)) == 0:  # two TS options: tcpseq.tsval reads the first
                other = draw(st.integers(0, M32))
                opts += packet.build_options(timestamp=(other, 0))
        tseq = self.tisn + 1 + self.tnxt
        if kind == "dup" and self.last_response is not None:
            return self.last_response  # the same record again (a duplicate ACK, data again)
        if kind == "synack":
            return self._synack(ack)
        if kind == "ack":
            seq = tseq + draw(st.sampled_from([0, 0, 0, -10, 5, 70000]))
            return TcpPacket(*T2C, seq & M32, ack, ACK, window, opts)
        if kind == "data":
            n = draw(st.integers(1, 4000) | st.integers(1, 300))
            seq = tseq + draw(st.sampled_from([0, 0, 0, 0, -n, 1000, -100, 2**31]))
            self.tnxt += n if seq == tseq else 0
            flags = ACK | draw(st.sampled_from([0, PSH, FIN]))
            return TcpPacket(*T2C, seq & M32, ack, flags, window, opts,
                             data_len=n)  # fmt: skip
        if kind == "fin":
            return TcpPacket(*T2C, tseq & M32, ack, FIN | ACK, window, opts)
        if kind == "rst":
            flags = RST | draw(st.sampled_from([0, ACK]))
            return TcpPacket(*T2C, tseq & M32, ack, flags, window)
        flags = draw(st.integers(0, 0xFF))
        if draw(st.integers(0, 3)):
            flags &= ~RST
        n = draw(st.integers(0, 100))
        return TcpPacket(*T2C, draw(st.integers(0, M32)), ack, flags, window,
                         opts, data_len=n)  # fmt: skip


def _state_of(s) -> tuple:
    events = []
    while (e := s.next_event()) is not None:
        events.append(e)
    counters = {k: v for k, v in dict(s.counters.items()).items() if v}
    return (
        events,
        counters,
        s.get_timer(),
        int(s.state),
        s.outcome,
        s.unsend,
        s.held_bytes,
        s.lingering,
        s.finished,
        s.half_open,
        s.end_seq,
        s.ts_last,
        s.syn_seq,
    )


@pytest.fixture(scope="module")
def compiled() -> type:
    return compiled_session_class()


@settings(
    max_examples=DIFF_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(cfg=_configs(), data=st.data())
def test_compiled_session_matches_the_python_session(compiled, cfg, data):
    m = Model(data)
    now = data.draw(st.floats(0.0, 1e6, allow_nan=False), label="start")
    py = TcpSession(cfg, client=FAKE_CLIENT, target=TARGET, online=ONLINE, now=now)
    cc = compiled(cfg, client=FAKE_CLIENT, target=TARGET, online=ONLINE, now=now)

    def settle(where: str) -> None:
        out_py = py.packets_to_send(now)
        out_cc = cc.packets_to_send(now)
        assert out_cc == out_py, f"{where}: packets differ"
        m.observe(out_py)
        assert _state_of(cc) == _state_of(py), f"{where}: state differs"

    start = data.draw(st.sampled_from(["syn", "data", "handshake", "handshake"]), label="start")
    if start != "data":
        first = m._cpkt(m.isn, SYN, options=b"", window=64240)
        if data.draw(st.booleans()):
            first = TcpPacket(
                *C2O,
                m.isn,
                0,
                SYN,
                64240,
                packet.build_options(
                    mss=1460,
                    wscale=None if m.wscale is None else min(m.wscale, 14),
                    sack_permitted=True,
                    timestamp=None if m.ts is None else (m.ts, 0),
                ),
                ip_id=m.ip_id,
            )
        py.receive_client(first, now)
        cc.receive_client(first, now)
    if start == "handshake":  # the SYN-ACK, then a request (faked handshake without a SYN)
        if data.draw(st.booleans()):
            third = m._cpkt(m.isn + 1, ACK)
            py.receive_client(third, now)
            cc.receive_client(third, now)
        p = m.request(0)
        py.receive_client(p, now)
        cc.receive_client(p, now)
        settle("start (syn)")
        now += 0.001
        p = m.response(True)
        py.receive_response(p, now)
        cc.receive_response(p, now)
        settle("start (syn-ack)")

    steps = data.draw(st.integers(1, STEPS_MAX), label="steps")
    for step in range(steps):
        action = data.draw(
            st.sampled_from(
                ["client"] * 6 + ["response"] * 6 + ["exchange"] * 3 + ["clock"] * 4 + ["table"]
            ),
            label=f"step {step}",
        )
        if action == "client":
            # one packet, or a few in one batch (a SYN captured after the data it carries)
            for _ in range(data.draw(st.sampled_from([1, 1, 1, 2, 3]), label="batch")):
                p = m.client_packet()
                m.last_client = [*m.last_client[-5:], p]
                if py.lingering and py.is_later_data(p):
                    # What the table does with later data on an ended session: a new session
                    # if may_continue allows it (not fed here), else the packet is dropped.
                    assert cc.is_later_data(p)
                    assert py.may_continue(p, now) == cc.may_continue(p, now)
                    continue
                py.receive_client(p, now)
                cc.receive_client(p, now)
        elif action == "response":
            p = m.response(py.state < 2)
            m.last_response = p
            for _ in range(3 if data.draw(st.integers(0, 7)) == 0 else 1):  # duplicate ACKs
                py.receive_response(p, now)
                cc.receive_response(p, now)
        elif action == "exchange":
            # An answer shorter or longer than the online one, then the next request: the
            # request gate's rules (bytes, quiet, max wait, -W) decide when it goes.
            n = data.draw(st.integers(1, 3000), label="answer")
            p = m.answer(n)
            py.receive_response(p, now)
            cc.receive_response(p, now)
            settle(f"step {step} (answer)")
            now += data.draw(st.sampled_from([0.0, 0.0005, 0.003, 0.05]), label="think")
            py.handle_timer(now)
            cc.handle_timer(now)
            settle(f"step {step} (think)")
            p = m.request(data.draw(st.integers(0, 2 * n), label="online answer"))
            m.last_client = [*m.last_client[-5:], p]
            py.receive_client(p, now)
            cc.receive_client(p, now)
        elif action == "clock":
            how = data.draw(st.sampled_from(["timer"] * 4 + ["small"] * 4 + ["big", "silence"]))
            if how == "silence":  # the target says nothing: timer after timer
                for i in range(data.draw(st.integers(2, 12), label="timers")):
                    t = py.get_timer()
                    if t is None:
                        break
                    now = max(now, t)
                    py.handle_timer(now)
                    cc.handle_timer(now)
                    settle(f"step {step} (timer {i})")
                continue
            t = py.get_timer()
            if how == "timer" and t is not None and t > now:
                now = t
            else:
                now += data.draw(
                    st.floats(0.0, 0.05) if how == "small" else st.floats(0.0, 30.0),
                    label="dt",
                )
            py.handle_timer(now)
            cc.handle_timer(now)
        else:
            call = data.draw(
                st.sampled_from(
                    ["down", "up", "up", "gap", "gap", "end", "shed", "later", "later"]
                ),
                label="table call",
            )
            if call in ("down", "up"):
                py.handle_route_down(call == "down", now)
                cc.handle_route_down(call == "down", now)
            elif call == "gap":
                due = now + data.draw(st.floats(0.0, 2.0))
                assert py.expedite_gap(due) == cc.expedite_gap(due)
            elif call == "end":
                assert py.end_input(now) == cc.end_input(now)
            elif call == "shed":
                if py.half_open:
                    py.shed_half_open(now)
                    cc.shed_half_open(now)
            else:
                p = m.client_packet()
                assert py.is_later_data(p) == cc.is_later_data(p)
                if py.is_later_data(p):
                    assert py.may_continue(p, now) == cc.may_continue(p, now)
        settle(f"step {step} ({action})")
