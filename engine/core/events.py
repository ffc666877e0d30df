"""What the session engine reports: drop reasons, outcomes and events.  (pure)

The vocabulary shared by the sans-IO core (engine/core/session.py, engine/core/table.py) and
everything that counts or shows it (metrics/counters.py labels ``reason`` and ``outcome`` from these
enums), so a counter module needs no session engine to know its label sets.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

__all__ = [
    "DROP_KEYS",
    "OBSOLETE_OUTCOMES",
    "DropReason",
    "Event",
    "Outcome",
    "RouteNeeded",
    "SessionEnded",
    "drop_key",
]


class DropReason(enum.Enum):
    """Why an input was not used; the value is the Prometheus label ``reason``."""

    NO_TRANSFER = "no_transfer"  # table: no -x entry matches the destination
    SAMPLED_OUT = "sampled_out"  # table: -r decided against this flow
    NO_SESSION = "no_session"  # table: a packet without payload and no session (spec §3.6)
    NO_SYN = "no_syn"  # table: -O and the flow's SYN was not captured
    SESSION_LIMIT = "session_limit"  # table: max_sessions reached
    NO_TUPLE = "no_tuple"  # table: every (client ip, port) toward the target is in use
    CLIENT_SYN_ACK = "client_syn_ack"  # table: a SYN-ACK from the client side
    UNKNOWN_RESPONSE = "unknown_response"  # table: a response for no session
    PURE_ACK = "pure_ack"  # captured pure ACK of an established session (spec §3.3 step 8)
    CLIENT_RETRANSMIT = "client_retransmit"  # captured data already sent or stored
    SYN_RETRANSMIT = "syn_retransmit"  # the captured SYN again
    SYN_CONFLICT = "syn_conflict"  # a SYN with another seq reached this session
    OLD_SEGMENT = "old_segment"  # captured before the connection's ISN
    AFTER_FIN = "after_fin"  # captured data beyond the client's FIN
    SESSION_CLOSED = "session_closed"  # a client packet after the session ended
    UNEXPECTED_RESPONSE = "unexpected_response"  # before the handshake completed (gets RST)
    STRAY_RESPONSE = "stray_response"  # after the session ended (gets RST unless harmless)
    BAD_ACK = "bad_ack"  # a response acking data never sent
    OUT_OF_WINDOW = "out_of_window"  # response data far beyond anything we could receive
    CLIENT_OUT_OF_WINDOW = "client_out_of_window"  # captured client seq far beyond the stream
    INTERNAL_ERROR = "internal_error"  # a bug: the input was dropped, the session aborted


DROP_KEYS = {reason: "drop_" + reason.value for reason in DropReason}
"""The Counter key of each DropReason (``drop_<value>``)."""


def drop_key(reason: DropReason) -> str:
    """The Counter key under which drops for ``reason`` are counted."""
    return DROP_KEYS[reason]


class Outcome(enum.StrEnum):
    """How a session ended (SessionEnded.outcome; counted as ``ended_<value>``)."""

    CLOSED = "closed"  # FINs exchanged
    TARGET_CLOSED = "target_closed"  # the target closed first; we ACKed and sent RST (§3.8)
    TARGET_RESET = "target_reset"
    CLIENT_RESET = "client_reset"
    REFUSED = "refused"  # RST in answer to our SYN
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    RETRANSMIT_LIMIT = "retransmit_limit"
    RECONNECT_LIMIT = "reconnect_limit"
    TIMEOUT = "timeout"  # -t: no response while work was pending
    IDLE = "idle"  # -k: idle keepalive session
    FIN_WAIT_TIMEOUT = "fin_wait_timeout"
    ABORTED = "aborted"  # internal error
    OFFLINE_END = "offline_end"  # still open when an offline replay's input and tail ended
    SHED_HALF_OPEN = "shed_half_open"  # memory pressure: the client sent only its SYN


OBSOLETE_OUTCOMES = frozenset(
    {
        Outcome.HANDSHAKE_TIMEOUT,
        Outcome.RETRANSMIT_LIMIT,
        Outcome.TIMEOUT,
        Outcome.IDLE,
        Outcome.FIN_WAIT_TIMEOUT,
    }
)


class RouteNeeded(NamedTuple):
    """Announce (CLIENT_ADD) this client->target route before the SYN goes out (§6 item 1)."""

    client_ip: int
    client_port: int
    target_ip: int
    target_port: int


class SessionEnded(NamedTuple):
    """The session ended with this Outcome (its value); it lingers, then is finished."""

    outcome: str


Event = RouteNeeded | SessionEnded
"""Outcomes C counts as obsolete sessions (``obs del``, spec §3.18): a timer ended them."""
