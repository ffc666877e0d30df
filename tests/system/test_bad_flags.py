"""Every flag of both programs with a bad value -> exit status 2 and exactly one stderr line
that names the flag, never a traceback (docs/cli-contract.md).

The flag list is read from the argparse parsers themselves: a new flag without a case here
fails ``test_every_flag_has_bad_value_cases``.  Each case runs the installed command as a
subprocess; all of them fail on validation before any socket is opened (no root needed).
The cases run 4 at a time in one module fixture (about 250 processes), and each test
looks up its result.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine.app import cli as tcpcopy_cli
from intercept import cli as intercept_cli

BIN_DIR = Path(sys.executable).parent
TCPCOPY = str(BIN_DIR / "tcpcopy-mp")
INTERCEPT = str(BIN_DIR / "intercept-mp")
# tcpcopy-mp needs -x and -s; a flag's bad value must be refused before anything starts.
TCPCOPY_BASE = ["-x", "80-198.18.2.3:8080", "-s", "198.18.2.4"]
# intercept-mp needs -F (else it stops with the C message before validating --log, --user,
# --secret-file).  Port 1: a flag that is not validated up front must not take 36524 from a
# test running beside this one while it runs until the timeout below.
INTERCEPT_BASE = ["-F", "tcp and src port 1", "-p", "1"]
TIMEOUT_S = 15
NO_DIR = "/nonexistent-dir/x"

# Bad values per flag (keyed by the long option).  Classes: out of range, not a number,
# bad IP, bad list, bad choice.  A flag whose every string is valid has an empty tuple
# (only its missing-argument cases run) and must say why.
TCPCOPY_BAD: dict[str, tuple[str, ...]] = {
    "--transfer": ("80", "80-198.18.2.3", "80-198.18.2.300:8080", "99999-198.18.2.3:8080",
                   "80-198.18.2.3:8080,,81-198.18.2.3:81", "http-198.18.2.3:8080"),
    "--intercepts": ("intercept.example", "198.18.2.4:70000", "198.18.2.4,", "1.2.3.²"),
    "--intercept-port": ("0", "65536", "port", "-1"),
    "--connections": ("two", "1.5"),
    "--clients": ("198.19.1.*", "198.19.1", "198.19.1.1,,198.19.1.2", "300.1.1.1"),
    "--replicas": ("1024", "x", "-1"),
    "--sample": ("101", "half", "-5"),
    "--port-shift": ("256", "-1", "f"),
    "--localhost-ip": ("localhost", "1.2.3", "1.1.1.256", "1.1.1.²"),
    "--mtu": ("jumbo", "100", "65536"),
    "--mss": ("87", "65496", "big"),
    "--rtt": ("-1", "65536", "fast"),
    "--timeout": ("0", "soon"),
    "--keepalive-timeout": ("later", "1.5"),
    "--memory-limit": ("0", "lots"),
    "--pool-size": ("-1", "big"),
    "--pid-file": (NO_DIR,),
    "--interface": ("no-such-dev0", "eth0,,eth1", "/nonexistent.pcap"),
    "--capture": ("pcap", ""),
    "--filter": ("tcp and and", "ether host 02:00:00:00:00:01"),
    "--buffer": ("0", "4097", "big"),
    "--ring-size": ("0", "1025", "big"),
    "--snaplen": ("-1", "big"),
    "--output-interface": ("no-such-dev0",),
    "--pcap": ("/nonexistent.pcap", "/etc/hostname"),
    "--accelerate": ("0", "fast", "nan", "-2"),
    "--idle-threshold": ("-1", "long"),
    "--replays": ("0", "many"),
    "--offline-tail": ("0", "-1", "long", "nan"),
    "--reconnect-budget": ("-1", "1000001", "many"),
    "--workers": ("0", "1025", "all"),
    "--engine": ("fast", "", "C"),
    "--sched": ("fifo", "", "BATCH"),
    "--backlog-max-bytes": ("-1", "big", "1.5"),
    "--config": ("/nonexistent.toml",),
    "--metrics": ("127.0.0.1:http", "127.0.0.1:0", "1.2.3:9100", "127.0.0.1:65536"),
    "--log": (NO_DIR,),
    "--log-format": ("xml",),
    "--stats-interval": ("0", "often", "-1"),
    "--summary-json": (NO_DIR,),
    "--secret-file": ("/nonexistent-secret",),
    "--user": ("no-such-user-zz", "4294967296"),
    "--group": ("no-such-group-zz", "4294967296"),
}  # fmt: skip
INTERCEPT_BAD: dict[str, tuple[str, ...]] = {
    "--interfaces": ("eth0,,eth1", ",".join(f"d{i}" for i in range(33))),
    "--filter": (" ", "t" * 4096),
    "--pass": ("300.1.1.1", "1.2.3", ",".join(f"198.18.0.{i}" for i in range(33))),
    "--queue-maxlen": ("many", "-1"),
    "--queue-num": ("70000", "-1", "q"),
    "--install-rule": ("80,0", "80,,81", "http"),
    "--combine": ("17", "-1", "all"),
    "--port": ("0", "65536", "http"),
    "--bind": ("1.2.3", "010.0.0.1", "host"),
    "--delay-table-size": ("-5", "big"),
    "--docker-map": ("198.18.0.1", "198.18.0.1-x"),
    "--secret-file": ("/nonexistent-secret",),
    "--max-routes-per-conn": ("-1", "many"),
    "--engine": ("fast", "", "C"),
    "--sched": ("fifo", "", "BATCH"),
    "--log": (NO_DIR,),
    "--log-format": ("xml",),
    "--log-level": ("loud",),
    "--pid-file": (NO_DIR,),
    "--summary-json": (NO_DIR,),
    "--metrics": ("127.0.0.1:http", "1.2.3:9100"),
    "--config": ("/nonexistent.toml",),
    "--user": ("no-such-user-zz", "4294967296"),
    "--group": ("no-such-group-zz", "4294967296"),
}

PROGRAMS = {
    "tcpcopy-mp": (TCPCOPY, TCPCOPY_BASE, tcpcopy_cli.build_parser, TCPCOPY_BAD),
    "intercept-mp": (INTERCEPT, INTERCEPT_BASE, intercept_cli._build_parser, INTERCEPT_BAD),
}


def _actions(prog: str) -> list[argparse.Action]:
    parser = PROGRAMS[prog][2]()
    return [a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")]


def _long(action: argparse.Action) -> str:
    return next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])


def _cases() -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    """(program, case id, argv after the base, names the line may use for the flag)."""
    out = []
    for prog in PROGRAMS:
        bad = PROGRAMS[prog][3]
        for action in _actions(prog):
            names = tuple(action.option_strings)
            long = _long(action)
            if action.nargs == 0:
                # A switch given a value.
                out.append((prog, f"{long}=yes", (f"{long}=yes",), names))
                continue
            for opt in action.option_strings:
                out.append((prog, f"{opt} <missing>", (opt,), names))  # value missing at the end
            out.append((prog, f"{long}=--", (f"{long}=--",), names))  # argparse hands [] on
            for value in bad.get(long, ()):
                out.append((prog, f"{long} {value[:20]!r}", (long, value), names))
        for unknown in ("--no-such-flag", "-Z"):
            out.append((prog, unknown, (unknown,), (unknown,)))
    return out


CASES = _cases()


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, str], subprocess.CompletedProcess]:
    def run(case):
        prog, cid, argv, _ = case
        binary, base = PROGRAMS[prog][0], PROGRAMS[prog][1]
        try:
            proc = subprocess.run(
                [binary, *base, *argv],
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            proc = subprocess.CompletedProcess(
                e.cmd, -9, "", f"TIMEOUT: started instead of failing: {e.stderr!r}"
            )
        return (prog, cid), proc

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(run, CASES))


def test_every_flag_has_bad_value_cases() -> None:
    """A flag added to a parser needs its bad values here (or an explicit empty tuple)."""
    for prog, (_, _, _, bad) in PROGRAMS.items():
        value_flags = {_long(a) for a in _actions(prog) if a.nargs != 0}
        assert value_flags - set(bad) == set(), f"{prog}: flags without bad-value cases"
        assert set(bad) - value_flags == set(), f"{prog}: cases for flags that do not exist"


@pytest.mark.parametrize(
    ("prog", "cid", "argv", "names"), CASES, ids=[f"{c[0]} {c[1]}" for c in CASES]
)
def test_bad_flag_is_exit_2_and_one_line_naming_it(results, prog, cid, argv, names) -> None:
    proc = results[(prog, cid)]
    err = proc.stderr
    assert "Traceback" not in err, err
    assert proc.returncode == 2, f"exit {proc.returncode}: {err[-600:]}"
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith(f"{prog}: "), err
    assert any(n in err for n in names), f"the line does not name {names}: {err!r}"
    assert proc.stdout == ""
