"""The compiled data plane (design §4-§5): the per-packet path in Cython.

Built by ``pip install`` from the ``.pyx`` files here (Cython is a build requirement; gcc and
the Python headers come from tests/setup.sh).  The build is optional: where it could not be
compiled, ``AVAILABLE`` is False, ``UNAVAILABLE`` says why, and the pure-Python engine
(engine/codec/packet.py and the session engine), which is the specification of everything here,
is what runs.  Set ``TCPCOPY_MP_REQUIRE_DATAPLANE=1`` for the install to fail instead.

Modules:

- ``packet`` (packet.pxd / packet.pyx): IPv4/TCP parse in place with bounds checks, TCP
  options, link-layer offsets, the Internet checksum, and a builder into a caller's buffer
  (whole or split to an MTU); batch entry points over numpy arrays (``parse_batch``,
  ``parse_records`` on a shared-memory ring, ``build_batch``).
- ``capture`` (capture.pyx): the capture process's per-packet path: the TPACKET_V3 block
  walk, the -x prefilter, the flow hash, the shed gate (``Gate``) and the copy into the
  workers' rings (``BlockWalker``); engine/proc/capture.py uses it when it is here.
- ``engine`` (engine.pyx and its include files): the session engine in C.  hmap.pxi, an
  open-addressing hash map; rewrite.pxi, the -x/-c/-r/-n/-f rules and the TupleAllocator
  (engine/core/rewrite.py; it shares engine/io/tuple_history.py's block bit for bit);
  table.pxi, the session table (engine/core/table.py) as ``Table``, with the worker's batch
  calls (``receive_client_ips``, ``receive_ring``, ``receive_records``, ``drain_into``);
  counters.pxi and session.pxi, the session state machine (engine/core/session.py);
  pump.pxi, ``Pump``: a worker wake-up's ring batches, timers, drain and sendmmsg in one
  call (engine/proc/worker.py's loop is its specification).
- ``responses`` (responses.pyx): intercept-mp's NFQUEUE response path: the netlink read
  batch, the response record encode and the route table (``ResponseTable``), used through
  intercept/fastroute.py with ``--engine`` auto or compiled.
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["AVAILABLE", "UNAVAILABLE", "capture", "packet"]

packet: ModuleType | None
capture: ModuleType | None
try:
    from engine.dataplane import capture, packet
except ImportError as exc:  # not compiled here: the pure-Python engine is the fallback
    packet = capture = None
    UNAVAILABLE = f"engine.dataplane is not compiled ({exc}); reinstall with gcc and python3-dev"
else:
    UNAVAILABLE = ""

AVAILABLE = packet is not None and capture is not None
