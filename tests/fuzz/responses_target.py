"""``--target responses`` of tests/fuzz/dataplane_asan.py: intercept-mp's compiled NFQUEUE
response path (engine/dataplane/responses.pyx, ``ResponseTable.receive_datagrams``).

Each input (a mutated captured packet) becomes a read batch of netlink datagrams: queued-packet
messages carrying the packet (cut to the copy range or not), other captured packets and
random bytes as payloads, messages without a payload or without a packet header, error
messages, and then the datagram bytes themselves are mutated (flips, u16/u32 pokes into
lengths, a truncated tail), each datagram a bytes object of exactly its size.  The compiled
table and the Python specification (intercept/sources/nfqueue.py's parser,
wire.encode_response_record, intercept/router.py's Router with connections named by the
table's slots, the source's -x pass list and the server's -D rewrite, set now and then on the
input's own destination) must agree: packet messages, the last id, the verdict runs,
packets, invalid, routed, unrouted, passed, rewritten, each slot's records, the delayed
SYN/RST records, the routes and their LRU order.  Between
inputs routes are added (for the tuples of the packets just seen, so responses route),
moved, and slots removed; the per-slot limit is small so evictions happen all the time.
"""

from __future__ import annotations

import random
import struct
from typing import Any

SLOTS = 4
LIMIT = 3
RESET_EVERY = 4096
_state: dict[str, Any] = {}


def _attr(atype: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), atype) + value
    return raw + b"\0" * (-len(raw) % 4)


def _message(pid: int, payload: bytes | None, header: bool = True) -> bytes:
    attrs = _attr(1, struct.pack("!IHB", pid, 0x0800, 3) + b"\0") if header else b""
    attrs += _attr(3, b"\0\0\0\5")
    if payload is not None:
        attrs += _attr(10, payload)
    body = struct.pack("!BBH", 2, 0, 7) + attrs
    return struct.pack("=IHHII", 16 + len(body), 0x300, 0, 0, 0) + body


def _poke(rng: random.Random, buf: bytearray) -> None:
    if not buf:
        return
    kind = rng.randrange(3)
    pos = rng.randrange(len(buf))
    if kind == 0:
        buf[pos] ^= 1 << rng.randrange(8)
    elif kind == 1 and pos + 2 <= len(buf):
        value = rng.choice((0, 3, 4, 7, 0xFFFF, rng.randrange(65536)))
        buf[pos : pos + 2] = struct.pack("=H", value)
    elif pos + 4 <= len(buf):
        value = rng.choice((0, 15, 16, 20, 2**32 - 1, rng.randrange(2**32)))
        buf[pos : pos + 4] = struct.pack("=I", value)


def _datagrams(rng: random.Random, data: bytes, recent: list[bytes]) -> list[bytes]:
    out = []
    for _ in range(rng.randrange(1, 5)):
        buf = bytearray()
        for _ in range(rng.randrange(0, 8)):
            kind = rng.randrange(10)
            pid = rng.randrange(2**32)
            if kind == 0:
                buf += struct.pack("=IHHII", 36, 2, 0, 0, 0) + bytes(20)  # NLMSG_ERROR
            elif kind == 1:
                buf += _message(pid, None)
            elif kind == 2:
                buf += _message(pid, data, header=False)
            elif kind == 3:
                buf += _message(pid, bytes(rng.randrange(256) for _ in range(rng.randrange(64))))
            elif kind <= 5 and recent:
                buf += _message(pid, rng.choice(recent)[: rng.choice((120, 120, 40, 60))])
            else:
                buf += _message(pid, data[: rng.choice((120, 120, len(data), 20, 39))])
        for _ in range(rng.choice((0, 0, 1, 2, 4))):
            _poke(rng, buf)
        if buf and rng.random() < 0.2:
            del buf[rng.randrange(len(buf)) :]
        out.append(bytes(buf))
    return out


def _reference(
    router: Any, msgs: list[bytes], now: float, pass_ips: frozenset[bytes], docker: Any
) -> dict[str, Any]:
    from engine.codec import wire
    from engine.errors import DecodeError
    from intercept.sources import nfqueue as nq

    entries = nq._parse_datagrams_py(msgs)
    slots: dict[int, bytearray] = {}
    order: list[int] = []
    delayed = bytearray()
    invalid = routed = unrouted = packets = passed = rewritten = 0
    runs: list[tuple[int, int]] = []
    for pid, payload in entries:
        verdict = nq.NF_DROP
        if pass_ips and payload is not None and payload[16:20] in pass_ips:
            verdict = nq.NF_ACCEPT  # NfqueueSource.receive_messages' pass list
            passed += 1
        if pass_ips:
            if runs and runs[-1][0] == verdict:
                runs[-1] = (verdict, pid)
            else:
                runs.append((verdict, pid))
        if payload is None or verdict == nq.NF_ACCEPT:
            continue
        packets += 1
        if docker is not None and payload[16:20] == docker[0]:
            payload = payload[:16] + docker[1] + payload[20:]  # InterceptServer's -D
            rewritten += 1
        try:
            rec = wire.encode_response_record(payload)
        except DecodeError:
            invalid += 1
            continue
        before = router.stats["routed"]
        slot = router.route(rec, now)
        if slot is not None:
            routed += router.stats["routed"] - before
            if slot not in slots:
                slots[slot] = bytearray()
                order.append(slot)
            slots[slot] += rec
        elif rec[33] & 0x06:
            delayed += rec
        else:
            unrouted += 1
    return {
        "entries": len(entries),
        "last_id": entries[-1][0] if entries else -1,
        "packets": packets,
        "invalid": invalid,
        "routed": routed,
        "unrouted": unrouted,
        "slots": [(s, bytes(slots[s])) for s in order],
        "delayed": bytes(delayed),
        "runs": runs,
        "passed": passed,
        "rewritten": rewritten,
    }


def responses_target(dataplane: Any, rng: random.Random, data: bytes) -> None:
    from intercept.router import Router

    st = _state
    if not st or st["n"] % RESET_EVERY == 0 or rng.random() < 0.001:
        table = dataplane.responses.ResponseTable(limit=LIMIT, dnat=rng.random() < 0.3)
        st["table"] = table
        st["router"] = Router(max_routes_per_conn=LIMIT, dnat=table.dnat)
        st["recent"] = []
        st["n"] = 0
        # -x and -D now and then, on this input's daddr so that they apply
        daddr = data[16:20] if len(data) >= 20 else b"\xc6\x13\x01\x05"
        other = bytes(rng.randrange(256) for _ in range(4))
        pass_ips = [daddr, other][: rng.randrange(3)] if rng.random() < 0.4 else []
        st["pass"] = frozenset(pass_ips)
        table.set_pass([int.from_bytes(ip, "big") for ip in pass_ips])
        st["docker"] = None
        if rng.random() < 0.3:
            st["docker"] = (daddr if rng.random() < 0.7 else other, other)
            table.set_docker(*(int.from_bytes(ip, "big") for ip in st["docker"]))
    st["n"] += 1
    table, router, recent = st["table"], st["router"], st["recent"]
    now = float(st["n"])
    msgs = _datagrams(rng, data, recent)
    want = _reference(router, msgs, now, st["pass"], st["docker"])
    got_n = table.receive_datagrams(msgs)
    got = {
        "entries": got_n,
        "last_id": table.last_id,
        "packets": table.packets,
        "invalid": table.invalid,
        "routed": table.routed,
        "unrouted": table.unrouted,
        "slots": table.take_slots(),
        "delayed": table.take_delayed(),
        "runs": table.verdict_runs(),
        "passed": table.pass_accepted,
        "rewritten": table.docker_rewritten,
    }
    assert table.entries_seen == got_n and table.delayed_count * 64 == len(got["delayed"])
    assert got == want, f"compiled {got} != python {want}"
    # Routes for the tuples of this input's packets (responses: target -> client), moves,
    # removals; then both tables must hold the same routes in the same LRU order.
    if len(data) >= 24:
        saddr, daddr = struct.unpack_from("!II", data, 12)
        ihl = (data[0] & 15) * 4
        if len(data) >= ihl + 4:
            sport, dport = struct.unpack_from("!HH", data, ihl)
            slot = rng.randrange(SLOTS)
            evicted = table.add(daddr, dport, saddr, sport, slot)
            before = router.stats["route_evicted"]
            router.add_route(daddr, dport, saddr, sport, slot, now)
            assert evicted == router.stats["route_evicted"] - before
        recent.append(data)
        del recent[:-16]
    if rng.random() < 0.02:
        slot = rng.randrange(SLOTS)
        assert table.remove_slot(slot) == router.remove_connection(slot)
    assert len(table) == len(router)
    for slot in range(SLOTS):
        assert table.routes_of(slot) == router.routes_of(slot), slot
