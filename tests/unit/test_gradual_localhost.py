"""-g (gradual ramp) and -H (localhost source) in the session table, and their config checks.

C 1.0 (spec §3.3 steps 3 and 6, tc_session.c tc_check_ingress_pack_needed):
  -H: a captured source 127.0.0.1 is replaced by the -H address before -c and -r see it
      (only when no target is 127.0.0.1);
  -g: the -r percentage becomes 1 until the first packet is let through, then
      ``seconds since + 1``, up to 100; the -r sampling key decides as usual.
"""

from __future__ import annotations

import pytest

from engine.app import arguments
from engine.codec import packet
from engine.codec.packet import SYN
from engine.core.config import SessionConfig
from engine.core.rewrite import LOCALHOST_IP, TransferEntry, choose_client_ip, sample_keep
from engine.core.session import DropReason, TcpSession, drop_key
from engine.core.table import SessionTable
from engine.errors import ConfigError
from tests.unit.engines import ENGINES, table_class
from tests.unit.link import ONLINE, ORIG_CLIENT, TARGET, Client, TableLink

XFER = (TransferEntry(ONLINE[0], ONLINE[1], TARGET[0], TARGET[1]),)
REQ = b"GET / HTTP/1.1\r\n\r\n"
H_ADDR = packet.ip_from_str("198.18.0.9")
POOL = (packet.ip_from_str("198.19.1.10"), packet.ip_from_str("198.19.1.11"))
SAMPLED_OUT = drop_key(DropReason.SAMPLED_OUT)


TABLE: dict[int, type] = {0: SessionTable}


@pytest.fixture(autouse=True, params=ENGINES)
def engine(request, monkeypatch):
    monkeypatch.setattr(TcpSession, "strict", True)
    monkeypatch.setitem(TABLE, 0, table_class(request.param))
    return request.param


def mk(**kw) -> TableLink:
    kw.setdefault("transfers", XFER)
    return TableLink(TABLE[0](SessionConfig(**kw)))


def sample_key(ip: int, port: int) -> int:
    """The flow's -r key (0..99): kept under percentage p exactly when key < p."""
    return next(p for p in range(1, 101) if sample_keep(ip, port, p)) - 1


def ports_by_key(ip: int = ORIG_CLIENT[0]) -> dict[int, int]:
    """{key: a client port with that key}, for every key 0..99."""
    found: dict[int, int] = {}
    for port in range(20000, 60000):
        found.setdefault(sample_key(ip, port), port)
        if len(found) == 100:
            return found
    raise AssertionError("no port for some key")


def start_flow(tl: TableLink, port: int, ip: int = ORIG_CLIENT[0]) -> list:
    c = Client(addr=(ip, port))
    return [p for p in tl.client(c.syn()) if p.flags & SYN]


# --- -g ---------------------------------------------------------------------------------------


def test_ramp_is_one_percent_until_the_first_flow_is_kept():
    keys = ports_by_key()
    tl = mk(gradual=True)
    tl.now = 50.0
    assert start_flow(tl, keys[1]) == []  # 1 %: only key 0 passes, however late
    assert start_flow(tl, keys[50]) == []
    assert tl.table.counters[SAMPLED_OUT] == 2
    assert len(start_flow(tl, keys[0])) == 1  # the ramp starts here (C's start_pt)
    tl.now = 50.9
    assert start_flow(tl, keys[2]) == []  # still the first second: 1 %


def test_ramp_adds_one_percent_per_second_and_reaches_all():
    keys = ports_by_key()
    tl = mk(gradual=True)
    tl.now = 10.0
    assert len(start_flow(tl, keys[0])) == 1
    tl.now = 10.0 + 9.5  # second 10 of the ramp: 10 %
    assert len(start_flow(tl, keys[9])) == 1
    assert start_flow(tl, keys[10]) == []
    tl.now = 10.0 + 49.0  # 50 %
    assert len(start_flow(tl, keys[49])) == 1
    assert start_flow(tl, keys[50]) == []
    tl.now = 10.0 + 99.0  # 100 %: everything, from now on
    assert len(start_flow(tl, keys[99])) == 1
    tl.now = 10.0 + 5.0  # a clock step back: the ramp is over for good (6 % would refuse it)
    assert len(start_flow(tl, keys[90])) == 1
    assert tl.table.counters[SAMPLED_OUT] == 2


def test_flow_left_out_by_the_ramp_joins_at_its_next_data_segment():
    keys = ports_by_key()
    tl = mk(gradual=True)
    assert len(start_flow(tl, keys[0])) == 1
    c = Client(addr=(ORIG_CLIENT[0], keys[30]))
    assert tl.client(c.syn(), c.ack(), c.data(REQ)) == []
    assert tl.table.active == 1
    tl.now = 31.0  # 32 %: key 30 is in; its next request starts a faked handshake
    out = tl.client(c.data(REQ))
    assert [(p.flags, p.sport) for p in out] == [(SYN, keys[30])]
    assert tl.table.active == 2


def test_without_gradual_the_table_samples_by_r_only():
    keys = ports_by_key()
    tl = mk(sample_percent=20)
    assert len(start_flow(tl, keys[19])) == 1
    assert start_flow(tl, keys[20]) == []
    tl2 = mk()
    assert all(len(start_flow(tl2, keys[k])) == 1 for k in (1, 50, 99))


# --- -H ---------------------------------------------------------------------------------------


def test_localhost_source_is_replaced_by_h():
    tl = mk(localhost_ip=H_ADDR)
    (syn,) = start_flow(tl, 40001, ip=LOCALHOST_IP)
    assert syn.src == H_ADDR and (syn.dst, syn.dport) == TARGET
    assert (tl.routes[0].client_ip, tl.routes[0].client_port) == (H_ADDR, 40001)
    (other,) = start_flow(tl, 40002)  # any other source is untouched
    assert other.src == ORIG_CLIENT[0]


def test_h_address_is_what_c_and_r_see():
    tl = mk(localhost_ip=H_ADDR, client_pool=POOL)
    (syn,) = start_flow(tl, 40001, ip=LOCALHOST_IP)
    assert syn.src == choose_client_ip(H_ADDR, POOL)
    # -r decides on the -H address: a port kept for H but not for 127.0.0.1 is kept.
    port = next(
        p
        for p in range(20000, 60000)
        if sample_keep(H_ADDR, p, 30) and not sample_keep(LOCALHOST_IP, p, 30)
    )
    tl2 = mk(localhost_ip=H_ADDR, sample_percent=30)
    (syn2,) = start_flow(tl2, port, ip=LOCALHOST_IP)
    assert syn2.src == H_ADDR


def test_without_h_a_localhost_source_stays():
    tl = mk()
    (syn,) = start_flow(tl, 40001, ip=LOCALHOST_IP)
    assert syn.src == LOCALHOST_IP


# --- the command line -------------------------------------------------------------------------

RUN = ["-x", "80-198.18.2.3:8080", "-s", "198.18.2.4"]


def test_flags_reach_the_session_config():
    cfg = arguments.parse_config([*RUN, "-g", "-H", "198.18.0.9"])
    assert cfg.session.gradual and cfg.session.localhost_ip == H_ADDR
    assert cfg.gradual and cfg.localhost_ip == H_ADDR
    plain = arguments.parse_config(RUN)
    assert not plain.session.gradual and plain.session.localhost_ip == 0


@pytest.mark.parametrize("r", ["0", "100"])
def test_gradual_with_r_meaning_all_is_accepted(r):
    assert arguments.parse_config([*RUN, "-g", "-r", r]).session.gradual


def test_gradual_with_r_is_refused_naming_the_flag():
    with pytest.raises(ConfigError) as err:
        arguments.parse_config([*RUN, "-g", "-r", "50"])
    assert str(err.value).startswith("-g: cannot be combined with -r")


def test_h_with_a_localhost_target_is_refused():
    with pytest.raises(ConfigError) as err:
        arguments.parse_config(["-x", "80-127.0.0.1:8080", "-s", "198.18.2.4", "-H", "198.18.0.9"])
    assert str(err.value).startswith("-H: has no effect when a -x target is 127.0.0.1")


def test_config_file_values_are_refused_naming_the_line(tmp_path):
    conf = tmp_path / "g.toml"
    conf.write_text("sample = 40\ngradual = true\n")
    with pytest.raises(ConfigError) as err:
        arguments.parse_config([*RUN, "--config", str(conf)])
    assert str(err.value).startswith(f"{conf}:2: key 'gradual' (-g): cannot be combined")
