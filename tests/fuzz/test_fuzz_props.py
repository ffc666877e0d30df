"""The fuzz targets as Hypothesis properties: part of the normal (fast) suite.

Each target of tests/fuzz/targets.py gets two properties: any bytes, and a real input (a
seed cut from the shared captures) with random damage.  The example counts are modest so
the file runs in seconds; tests/fuzz/test_fuzz_ci.py and tests/fuzz/run_fuzz.py run the
same targets for 100,000 and more inputs.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.codec.pcapfile import PCAPNG_MAGIC, PcapReader
from engine.core.session import TcpSession
from engine.errors import DecodeError
from tests.fuzz import targets

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = sorted(targets.TARGETS)


@pytest.fixture(autouse=True)
def production_strictness(monkeypatch):
    # As deployed: a session swallows its own exceptions and counts an internal error,
    # which the session target asserts stays 0.
    monkeypatch.setattr(TcpSession, "strict", False)


@st.composite
def damaged_seed(draw, name: str) -> bytes:
    """A real seed with a few byte edits, a cut and an insert."""
    buf = bytearray(draw(st.sampled_from(targets.seeds()[name])))
    for _ in range(draw(st.integers(0, 6))):
        if not buf:
            break
        i = draw(st.integers(0, len(buf) - 1))
        buf[i] = draw(st.integers(0, 255))
    if buf and draw(st.booleans()):
        del buf[draw(st.integers(0, len(buf))) :]
    if draw(st.booleans()):
        i = draw(st.integers(0, len(buf)))
        buf[i:i] = draw(st.binary(max_size=24))
    return bytes(buf)


@pytest.mark.parametrize("name", NAMES)
def test_seeds_pass(name: str) -> None:
    """The undamaged real inputs: the targets' invariants hold on real traffic."""
    for data in targets.seeds()[name]:
        targets.TARGETS[name](data)


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(data=st.data())
def test_any_bytes(name: str, data: st.DataObject) -> None:
    targets.TARGETS[name](data.draw(st.binary(max_size=400)))


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(data=st.data())
def test_damaged_real_input(name: str, data: st.DataObject) -> None:
    targets.TARGETS[name](data.draw(damaged_seed(name)))


def test_seeds_reach_the_deep_paths() -> None:
    """The seeds are real traffic, not errors: they parse, decode and start sessions."""
    from engine.codec.packet import l2_offset, parse_ip

    for data in targets.seeds()["packet"][:10]:
        parse_ip(data[1 + l2_offset(data[1:], 1) :])
    assert any(len(s) > 100 for s in targets.seeds()["client_stream"])
    assert len(targets.seeds()["session"]) >= 8
    for data in targets.seeds()["session"]:
        sim = targets._SessionSim(targets.Reader(data))
        sim.run()
        assert sim.table.counters["conns"] > 0  # a handshake completed


def test_pcapng_is_one_clear_decode_error() -> None:
    import io

    block = PCAPNG_MAGIC.to_bytes(4, "little") + bytes(24)
    with pytest.raises(DecodeError, match="pcapng is not supported; convert it") as e:
        PcapReader(io.BytesIO(block), "x.pcapng")
    assert "\n" not in str(e.value)
