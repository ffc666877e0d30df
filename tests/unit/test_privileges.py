"""engine/io/privileges.py: the pure parts (status parsing, names, file-permission checks,
target resolution as a non-root caller).  No privileges needed."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.io import privileges as pv

STATUS = """Name:\ttcmp-worker0
Umask:\t0027
State:\tS (sleeping)
Uid:\t65534\t65534\t65534\t65534
Gid:\t65534\t65534\t65534\t65534
Groups:\t65534
CapInh:\t0000000000003000
CapPrm:\t0000000000003000
CapEff:\t0000000000003000
CapBnd:\t0000000000003000
CapAmb:\t0000000000003000
NoNewPrivs:\t1
"""


def test_parse_status_reads_ids_and_every_capability_set() -> None:
    st = pv.parse_status(STATUS)
    assert st.uids == (65534,) * 4 and st.gids == (65534,) * 4
    want = (1 << pv.CAP_NET_ADMIN) | (1 << pv.CAP_NET_RAW)
    assert want == pv.KEEP_CAPS_MASK == 0x3000
    for mask in (st.inheritable, st.permitted, st.effective, st.bounding, st.ambient):
        assert mask == want
    assert st.no_new_privs is True


def test_parse_status_root_full_set_and_missing_lines() -> None:
    text = STATUS.replace("65534", "0").replace(
        "CapEff:\t0000000000003000", "CapEff:\t000001ffffffffff"
    )
    st = pv.parse_status(text.replace("NoNewPrivs:\t1\n", ""))
    assert st.uids == (0, 0, 0, 0)
    assert st.effective == (1 << 41) - 1
    assert st.no_new_privs is None
    with pytest.raises(ValueError, match="CapBnd"):
        pv.parse_status("\n".join(line for line in STATUS.splitlines() if "CapBnd" not in line))


def test_read_status_of_this_process_matches_os_ids() -> None:
    st = pv.read_status()
    assert st.uids[1] == os.geteuid() and st.gids[1] == os.getegid()


def test_cap_names() -> None:
    assert pv.cap_names(0x3000) == ["CAP_NET_ADMIN", "CAP_NET_RAW"]
    assert pv.cap_names(0) == []
    assert pv.cap_names(1 << 40) == ["cap_40"]


def _stat(tmp_path, mode: int, name: str = "f"):
    path = tmp_path / name
    path.write_text("x = 1\n")
    os.chmod(path, mode)
    return str(path), os.stat(path)


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640, 0o400])
def test_permission_check_accepts_files_only_we_can_change(tmp_path, mode: int) -> None:
    path, st = _stat(tmp_path, mode)
    pv.check_file_permissions("--config", path, st)


@pytest.mark.parametrize("mode", [0o666, 0o602, 0o646])
def test_permission_check_refuses_world_writable_naming_file_and_mode(tmp_path, mode: int) -> None:
    path, st = _stat(tmp_path, mode)
    with pytest.raises(ConfigError) as info:
        pv.check_file_permissions("--config", path, st)
    text = str(info.value)
    assert path in text and f"mode {mode:04o}" in text and "\n" not in text
    assert text.startswith("--config")


def test_group_write_ok_only_for_our_group_or_roots(tmp_path) -> None:
    path, st = _stat(tmp_path, 0o664)
    assert st.st_gid == os.getegid()  # created by us: our group
    pv.check_file_permissions("--config", path, st)
    foreign = os.stat_result((*st[:5], st.st_gid + 12345, *st[6:]))
    with pytest.raises(ConfigError, match="mode 0664"):
        pv.check_file_permissions("--config", path, foreign)
    # The secret file allows no group write at all.
    with pytest.raises(ConfigError, match="writable by other users"):
        pv.check_file_permissions("--secret-file", path, st, group_writable_ok=False)


def test_permission_check_refuses_foreign_owner_and_non_files(tmp_path) -> None:
    path, st = _stat(tmp_path, 0o600)
    other = 12346 if os.geteuid() == 12345 else 12345
    foreign = os.stat_result((*st[:4], other, *st[5:]))
    with pytest.raises(ConfigError, match=f"owned by uid {other}"):
        pv.check_file_permissions("--config", path, foreign)
    with pytest.raises(ConfigError, match="not a regular file"):
        pv.check_file_permissions("--config", str(tmp_path), os.stat(tmp_path))


def test_check_open_file_uses_the_open_descriptor(tmp_path) -> None:
    path, _ = _stat(tmp_path, 0o666)
    with open(path, "rb") as f, pytest.raises(ConfigError, match="mode 0666"):
        pv.check_open_file("--config", path, f.fileno())


def test_resolve_target_as_non_root() -> None:
    me = pwd.getpwuid(1000).pw_name if _uid_exists(1000) else None
    # Not root: no switch by default; naming ourselves is fine; another user is an error.
    assert pv.resolve_target(None, None, euid=4242) is None
    with pytest.raises(ConfigError, match=r"--user.*needs root"):
        pv.resolve_target("root", "nogroup" if _group_exists("nogroup") else "0", euid=4242)
    with pytest.raises(ConfigError, match="--group"):
        pv.resolve_target(None, "root", euid=4242)
    if me is not None:
        assert pv.resolve_target(me, None, euid=1000) is None


def test_resolve_target_as_root_defaults_and_errors() -> None:
    t = pv.resolve_target(None, None, euid=0)
    assert t is not None and t.uid != 0
    expected = pv.DEFAULT_USER if _user_exists(pv.DEFAULT_USER) else pv.FALLBACK_USER
    assert t.user == expected
    assert pv.resolve_target("root", None, euid=0) is None  # --user root keeps root
    with pytest.raises(ConfigError, match="no such user: 'no-such-user-x'"):
        pv.resolve_target("no-such-user-x", None, euid=0)
    with pytest.raises(ConfigError, match="no such group"):
        pv.resolve_target("nobody", "no-such-group-x", euid=0)


def test_kept_output_is_rewritten_in_place(tmp_path) -> None:
    kept = pv.KeptFiles()
    me = pv.Target("me", os.geteuid(), os.getegid(), "g", (os.getegid(),))
    path = str(tmp_path / "summary.json")
    kept.keep_output(path, me)
    assert os.path.getsize(path) == 0
    assert kept.write(path, b'{"a": 1, "long": "xxxxxxxx"}\n')
    assert kept.write(path, b'{"a": 2}\n')  # shorter: the old tail is gone
    assert Path(path).read_bytes() == b'{"a": 2}\n'
    assert not kept.write(str(tmp_path / "other"), b"x")
    kept.close()


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _uid_exists(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


# --- tests/readable_install.py: what the least-privilege netns test copies ----------------------


def test_readable_install_keeps_requirements_of_the_wanted_extras_only() -> None:
    from tests.readable_install import _requirement_names

    reqs = [
        "psutil>=5.9",
        'pytest>=8; extra == "test"',
        'NetfilterQueue>=1.1 ; extra == "live"',
        'tomli; python_version < "3.11"',
    ]
    assert _requirement_names(reqs, ("live",)) == ["psutil", "NetfilterQueue", "tomli"]
    assert _requirement_names(reqs, ()) == ["psutil", "tomli"]


def test_readable_install_copies_every_runtime_distribution() -> None:
    from tests.readable_install import project_packages, project_scripts, required_distributions

    names = {d.metadata["Name"].lower().replace("_", "-") for d in required_distributions()}
    assert {"psutil", "numpy", "orjson", "prometheus-client"} <= names
    assert not {"pytest", "ruff", "matplotlib"} & names  # test and bench extras stay out
    assert {"engine", "intercept", "metrics"} <= set(project_packages())
    assert set(project_scripts()) == {"tcpcopy-mp", "intercept-mp"}


def test_readable_install_finds_the_directory_others_cannot_enter() -> None:
    from tests.readable_install import hidden_top

    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        base.chmod(0o755)
        (base / "home" / "me" / "py").mkdir(parents=True)
        assert hidden_top(base / "home" / "me" / "py") is None
        (base / "home").chmod(0o700)
        assert hidden_top(base / "home" / "me" / "py") == (str(base / "home"), "me")
    finally:
        (base / "home").chmod(0o755)
        shutil.rmtree(base)
