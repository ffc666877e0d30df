"""Configuration: one schema of frozen dataclasses (TOML keys + flags -> these objects).

``SessionConfig`` is what the pure core (session.py, shard.py, rewrite.py) reads.  It imports
nothing but the standard library's data helpers so pure modules may import it.
The CLI/TOML layer (``ReplayConfig`` and the parsers) lives below it in this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Behaviour of the simulated client TCP stack (spec §3, design §5)."""

    transfers: tuple = ()
    """-x: tuple of rewrite.TransferEntry; the first entry matching (dst ip, dst port) wins."""
    client_pool: tuple[int, ...] = ()
    """-c: fake client addresses (ints); empty = keep the captured client address."""
    replicas: int = 1
    """-n: copies of every session (1 = just the session itself)."""
    port_shift: int = 0
    """-f: port shift factor (0 = off)."""
    sample_percent: int = 100
    """-r: percentage of flows replicated (decided once per flow)."""
    rand_shift: int = 0
    """The 0..511 random offset of -f/-n port formulas (drawn once at start by the CLI)."""
    mtu: int = 1500
    """-M: packets larger than this are split before sending."""
    mss: int = 1460
    """-D: MSS option of a faked SYN."""
    wait_response: bool = True
    """Not -W: hold a new request until the previous response is complete."""
    fake_handshake: bool = True
    """Not -O: a flow whose SYN was not captured starts with a faked handshake."""
    session_timeout_s: float = 600.0
    """-t: a session with no response for this long while work is pending is obsolete."""
    keepalive_timeout_s: float = 720.0
    """-k: an idle session (nothing pending) with no response for this long is obsolete."""
    handshake_timeout_s: float = 3.0
    """A connection attempt not established after this long fails (SYN retransmitted inside)."""
    linger_s: float = 6.0
    """A finished session lingers this long to RST stray responses (spec §3.9)."""
    rtt_initial_s: float = 0.001
    """-R (ms in the flag): RTT assumed before one is measured."""
    response_wait_max_s: float = 3.0
    """A held request is released after this long even if its response never completed."""
    time_wait_s: float = 60.0
    """A (client ip, port, target) tuple is not reused for this long after its session ends."""
    worker_index: int = 0
    """This shard's index (for port allocation that never collides across workers)."""
    worker_count: int = 1
    """Number of shards."""
    max_sessions: int = 0
    """0 = unlimited; otherwise new sessions beyond this are refused and counted."""
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    """Free-form knobs for experiments; not part of the stable schema."""
