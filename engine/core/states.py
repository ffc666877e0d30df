"""The session's states and its one table of legal transitions (design §5).  (pure)

TcpSession (engine/core/session.py) moves between these only through ``_set_state``, which checks
``TRANSITIONS``; a move not in the table is a bug and raises.
"""

from __future__ import annotations

import enum

__all__ = ["TRANSITIONS", "State"]


class State(enum.IntEnum):
    """Session states; legal moves are in ``TRANSITIONS``, checked by TcpSession._set_state."""

    CLOSED = 0
    """Nothing sent on the current connection (new session, or reset for a reconnect)."""
    SYN_SENT = 1
    ESTABLISHED = 2
    FIN_WAIT = 3
    """The client's FIN was sent: waiting for the target's ACK and FIN."""
    LINGER = 4
    """Ended: stray responses get a RST (spec §3.9 sess_post_disp)."""
    FINISHED = 5
    """Linger over: the table may forget the session."""


TRANSITIONS: dict[State, frozenset[State]] = {
    State.CLOSED: frozenset({State.SYN_SENT, State.LINGER}),
    State.SYN_SENT: frozenset({State.ESTABLISHED, State.LINGER}),
    State.ESTABLISHED: frozenset({State.FIN_WAIT, State.CLOSED, State.LINGER}),
    State.FIN_WAIT: frozenset({State.LINGER}),
    State.LINGER: frozenset({State.FINISHED}),
    State.FINISHED: frozenset(),
}
