"""The systemd units (systemd/*.service) and the NFQUEUE rule helper (systemd/intercept-mp-rule).

* `systemd-analyze verify` on copies of both units whose ExecStart/ExecStartPre/ExecStopPost
  point at this checkout's installed scripts (verify insists that they exist): no error and
  no warning (verify reports a bad value as a warning with status 0, so its output counts).
* the committed units' keys, read with a small parser: Type=notify, the unprivileged user and
  its two capabilities, the sandbox, reload by SIGHUP, the rule helper run as root ("+").
* the helper adds exactly the rule `intercept-mp --install-rule` adds (iptables -C with
  intercept.sources.nfqueue.rule_spec finds it) and removes it again, in a network namespace of its
  own (root only).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from intercept.sources.nfqueue import rule_spec

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
VENV_BIN = ROOT / ".venv" / "bin"
RULE_HELPER = UNITS / "intercept-mp-rule"
INSTALLED_BIN = "/usr/local/bin/"
INSTALLED_HELPER = "/usr/local/lib/tcpcopy-mp/intercept-mp-rule"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
CAPS = {"CAP_NET_RAW", "CAP_NET_ADMIN"}


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}} (a key may repeat; comments and blanks skipped)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: key outside a section: {line}"
        assert "=" in line and not line.endswith("\\"), f"{path.name}: not KEY=VALUE: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}: {values}"
    return values[0]


@pytest.mark.parametrize("name", ["tcpcopy-mp", "intercept-mp"])
def test_committed_units_have_the_hardening_and_lifecycle_keys(name):
    unit = parse_unit(UNITS / f"{name}.service")
    svc = unit["Service"]
    expect = {
        "Type": "notify",
        "NotifyAccess": "main",
        "User": "tcpcopy",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "Restart": "on-failure",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "LogsDirectory": name,
    }
    for key, value in expect.items():
        assert one(unit, "Service", key) == value, key
    assert set(one(unit, "Service", "AmbientCapabilities").split()) == CAPS
    assert set(one(unit, "Service", "CapabilityBoundingSet").split()) == CAPS
    assert set(one(unit, "Service", "RestrictAddressFamilies").split()) == {
        "AF_INET", "AF_INET6", "AF_UNIX", "AF_PACKET", "AF_NETLINK",
    }  # fmt: skip
    start = one(unit, "Service", "ExecStart").split()
    assert start[0] == f"{INSTALLED_BIN}{name}"
    assert f"/var/log/{name}/" in " ".join(start)  # the log lives in LogsDirectory=
    assert "-d" not in start and "--daemon" not in start  # Type=notify needs the main pid
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert "ExecStartPre" not in svc or name == "intercept-mp"


def test_tcpcopy_unit_reads_the_production_config_and_stops_through_the_supervisor():
    unit = parse_unit(UNITS / "tcpcopy-mp.service")
    start = one(unit, "Service", "ExecStart").split()
    assert start[start.index("--config") + 1] == "/etc/tcpcopy-mp/prod.toml"
    # Only the supervisor gets SIGTERM: it stops the workers (and must not restart them).
    assert one(unit, "Service", "KillMode") == "mixed"


def test_intercept_unit_adds_and_removes_the_rule_as_root():
    unit = parse_unit(UNITS / "intercept-mp.service")
    pre = one(unit, "Service", "ExecStartPre").split()
    post = one(unit, "Service", "ExecStopPost").split()
    assert pre[0] == f"+{INSTALLED_HELPER}" and pre[1] == "add"
    assert post[0] == f"+{INSTALLED_HELPER}" and post[1] == "del"
    assert pre[2:] == post[2:] == ["${INTERCEPT_PORTS}", "${INTERCEPT_QUEUE}"]
    start = one(unit, "Service", "ExecStart").split()
    assert start[1:3] == ["--queue-num", "${INTERCEPT_QUEUE}"]  # the same queue as the rule
    assert "--install-rule" not in start  # the helper owns the rule, also after a crash


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (systemd)")
def test_systemd_analyze_verify_is_clean(tmp_path):
    for binary in ("tcpcopy-mp", "intercept-mp"):
        assert (VENV_BIN / binary).exists(), f"{binary} not installed (pip install -e .)"
    units = []
    for name in ("tcpcopy-mp", "intercept-mp"):
        text = (UNITS / f"{name}.service").read_text()
        text = text.replace(INSTALLED_HELPER, str(RULE_HELPER))
        text = text.replace(INSTALLED_BIN, f"{VENV_BIN}/")
        assert INSTALLED_BIN not in text
        path = tmp_path / f"{name}.service"
        path.write_text(text)
        units.append(str(path))
    res = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 0 and out == "", out


def test_systemd_analyze_verify_does_report_a_broken_unit(tmp_path):
    """The check above can fail: a bad value is reported (as a warning, status 0)."""
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze not installed (systemd)")
    text = (UNITS / "tcpcopy-mp.service").read_text().replace(INSTALLED_BIN, f"{VENV_BIN}/")
    path = tmp_path / "tcpcopy-mp.service"
    path.write_text(text.replace("Type=notify", "Type=notifyy"))
    res = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert "notifyy" in res.stdout + res.stderr


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=check)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace, iptables)")
@pytest.mark.skipif(shutil.which("iptables") is None, reason="iptables not installed")
def test_rule_helper_adds_the_install_rule_rule_and_removes_it():
    ns = f"tcsd{os.getpid()}-{uuid.uuid4().hex[:6]}"
    _sh("ip", "netns", "add", ns)
    try:

        def in_ns(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
            return _sh("ip", "netns", "exec", ns, *argv, check=check)

        def present(port: int, queue: int) -> bool:
            spec = rule_spec(port, queue)
            return in_ns("iptables", "-w", "5", "-C", "OUTPUT", *spec, check=False).returncode == 0

        in_ns(str(RULE_HELPER), "add", "8080,6379", "3")
        in_ns(str(RULE_HELPER), "add", "8080", "3")  # idempotent: still one rule
        rules = in_ns("iptables-save", "-t", "filter").stdout
        assert rules.count("--sport 8080") == 1 and rules.count("--sport 6379") == 1, rules
        assert present(8080, 3) and present(6379, 3) and not present(8080, 0)
        in_ns(str(RULE_HELPER), "del", "8080,6379", "3")
        assert not present(8080, 3) and not present(6379, 3)
        in_ns(str(RULE_HELPER), "del", "8080", "3")  # nothing left: still success
        bad = in_ns(str(RULE_HELPER), "add", "80;reboot", check=False)
        assert bad.returncode == 2 and "bad port" in bad.stderr
        assert "NFQUEUE" not in in_ns("iptables-save", "-t", "filter").stdout
    finally:
        _sh("ip", "netns", "delete", ns, check=False)
