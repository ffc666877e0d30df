"""The real CLIs refuse a --config or --secret-file another local user could change: one
stderr line naming the file and its mode, exit status 2 (engine/io/privileges.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from testbed import netns as tbm

BINS = {"tcpcopy-mp": tbm.TCPCOPY_BIN, "intercept-mp": tbm.INTERCEPT_BIN}
# Flags that would otherwise be a valid start (the refusal must come first, before any socket).
BASE_ARGS = {
    "tcpcopy-mp": ["-x", "80-198.18.2.3:8080", "-s", "198.18.2.3", "-i", "/nonexistent.pcap"],
    "intercept-mp": ["-F", "tcp and src port 8080", "-i", "lo"],
}


def run(prog: str, *args: str) -> subprocess.CompletedProcess:
    # In an empty network namespace: should a refusal regress, nothing can leave.
    isolate = ["unshare", "-n"] if os.geteuid() == 0 else []
    return subprocess.run(
        [*isolate, str(BINS[prog]), *args], capture_output=True, text=True, timeout=20, check=False
    )


def one_line_refusal(proc: subprocess.CompletedProcess, prog: str, *words: str) -> str:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"{prog}: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def write(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("prog", sorted(BINS))
@pytest.mark.parametrize("mode", [0o666, 0o646])
def test_world_writable_config_is_refused(tmp_path: Path, prog: str, mode: int) -> None:
    conf = write(tmp_path / "c.toml", "", mode)
    line = one_line_refusal(run(prog, "--config", str(conf), *BASE_ARGS[prog]), prog, str(conf))
    assert f"mode {mode:04o}" in line


@pytest.mark.parametrize("prog", sorted(BINS))
def test_group_writable_config_of_our_group_is_accepted(tmp_path: Path, prog: str) -> None:
    conf = write(tmp_path / "c.toml", "", 0o664)
    proc = run(prog, "--config", str(conf), "--no-such-flag")
    # Past the config check: the error is now about the unknown flag, not the file.
    assert proc.returncode == 2 and "c.toml" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("prog", sorted(BINS))
def test_world_writable_secret_is_refused(tmp_path: Path, prog: str) -> None:
    secret = write(tmp_path / "secret", "0123456789abcdef0123456789\n", 0o602)
    proc = run(prog, "--secret-file", str(secret), *BASE_ARGS[prog])
    one_line_refusal(proc, prog, str(secret), "mode 0602", "--secret-file")


@pytest.mark.parametrize("prog", sorted(BINS))
def test_unknown_user_is_a_usage_error(prog: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (a valid start in an empty network namespace)")
    args = BASE_ARGS[prog]
    if prog == "tcpcopy-mp":  # a start that is valid up to --user
        args = [*args[:-1], str(tbm.REPO_ROOT.parent / "shared" / "data" / "online-http.pcap")]
        if not Path(args[-1]).exists():
            pytest.skip("no sample pcap")
    one_line_refusal(run(prog, "--user", "no-such-user-x", *args), prog, "--user")
