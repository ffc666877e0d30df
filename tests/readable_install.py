"""An installation of tcpcopy-mp that the unprivileged user can read, for least-privilege tests.

Theory of operation
-------------------
Started as root, both programs drop to the default user (tcpcopy, else nobody) only when that
user can read the interpreter, the standard library, the installed packages and the program
(engine/io/privileges.py ``program_paths``); otherwise they stay root, with a warning.  A
checkout's ``.venv`` lives wherever the checkout does, often under a 0700 directory (a
``mktemp -d``, a home directory), and its interpreter may live under a 0700 ``/root`` (a
pyenv).  Testing the drop from there would only ever test the "stays root" fallback.

``ReadableInstall.create`` therefore builds, in a fresh world-readable directory under /tmp, a
venv (``python -m venv --without-pip``) holding copies of what the programs import: the
project's packages from the checkout and the files of every installed distribution they need
(the runtime requirements plus the ``live`` extra, and theirs, read with importlib.metadata
from this test run's environment: no network, no build), plus the two console scripts.  Its
interpreter is the first of this Python's base interpreter, ``/usr/bin/python3.X`` and
``/usr/local/bin/python3.X`` (same minor version, so the compiled packages fit) that the
unprivileged user can execute and whose standard library it can read, as asked of the kernel
by ``privileges.unreadable_for`` in a child that became that user.  When none is (a pyenv
under /root and no system Python of that version), the base interpreter is used and
``wrap(argv)`` runs each program in a private mount namespace where the unreadable top
directory is replaced by a 0755 tmpfs holding only the interpreter's directory: what a normal
installation looks like to the unprivileged user.  ``close()`` deletes the directory.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

from engine.io import privileges

REPO_ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("live",)
"""Optional dependency groups the programs import at run time (NFQUEUE, libpcap)."""
_REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


class InstallError(RuntimeError):
    """The readable installation could not be made (the message says which step)."""


@dataclasses.dataclass
class ReadableInstall:
    root: Path
    python: str
    """The venv's interpreter."""
    bin_dir: Path
    cover: tuple[str, str] | None
    """(unreadable top directory, its entry holding the base interpreter), or None."""

    @classmethod
    def create(cls, target: privileges.Target) -> ReadableInstall:
        base = "/tmp" if os.path.isdir("/tmp") else None
        root = Path(tempfile.mkdtemp(prefix="tcpcopy-mp-readable-", dir=base))
        try:
            os.chmod(root, 0o755)
            blocked = privileges.unreadable_for(target, [(str(root), os.R_OK | os.X_OK)])
            if blocked:
                raise InstallError(f"user {target.user} cannot enter {root}")
            interpreter, cover = choose_interpreter(target)
            venv = root / "venv"
            _run([interpreter, "-m", "venv", "--without-pip", str(venv)])
            python = str(venv / "bin" / "python")
            site = Path(
                _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
            )
            for dist in required_distributions():
                copy_distribution(dist, site)
            for package in project_packages():
                shutil.copytree(
                    REPO_ROOT / package,
                    site / package,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                )
            for name, entry in project_scripts().items():
                write_script(venv / "bin" / name, python, entry)
            _make_world_readable(root)
            self = cls(root, python, venv / "bin", cover)
            if cover is None:
                checks = [(python, os.X_OK), (str(site), os.R_OK | os.X_OK)]
                checks += [(str(self.bin(n)), os.R_OK | os.X_OK) for n in project_scripts()]
                blocked = privileges.unreadable_for(target, checks)
                if blocked:
                    raise InstallError(f"user {target.user} still cannot read {blocked}")
            return self
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise

    def bin(self, name: str) -> Path:
        return self.bin_dir / name

    def wrap(self, argv: list[str], save_dir: Path) -> list[str]:
        """``argv`` as it must run for the unprivileged user to reach the interpreter."""
        if self.cover is None:
            return argv
        top, entry = self.cover
        save_dir.mkdir(parents=True, exist_ok=True)
        script = (
            'set -e; s=$1; t=$2; e=$3; shift 3; mount --rbind "$t/$e" "$s"; '
            'mount -t tmpfs -o mode=0755 tmpfs "$t"; mkdir "$t/$e"; mount --move "$s" "$t/$e"; '
            'exec "$@"'
        )
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                str(save_dir), top, entry, *argv]  # fmt: skip

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise InstallError(f"{' '.join(argv)}: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return proc.stdout.strip()


def choose_interpreter(target: privileges.Target) -> tuple[str, tuple[str, str] | None]:
    """(interpreter, cover): a Python of this minor version the user can run, else this
    Python's base interpreter with the directory to cover (see the module docstring)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    candidates = list(
        dict.fromkeys([base, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"])
    )
    probe = (
        "import sys, sysconfig, venv; "
        "print('%d.%d' % sys.version_info[:2]); print(sysconfig.get_paths()['stdlib'])"
    )
    for exe in candidates:
        if not os.access(exe, os.X_OK):
            continue
        proc = subprocess.run([exe, "-c", probe], capture_output=True, text=True, timeout=60)
        lines = proc.stdout.split()
        if proc.returncode != 0 or len(lines) != 2 or lines[0] != version:
            continue
        checks = [(exe, os.X_OK), (os.path.realpath(exe), os.X_OK), (lines[1], os.R_OK | os.X_OK)]
        if privileges.unreadable_for(target, checks) is None:
            return exe, None
    cover = hidden_top(Path(os.path.realpath(sys.base_prefix)))
    if cover is None:
        raise InstallError(f"no Python {version} that user {target.user} can run")
    return base, cover


def hidden_top(prefix: Path) -> tuple[str, str] | None:
    """(top directory others cannot traverse, its entry on the way to ``prefix``), or None."""
    for parent in reversed(prefix.parents):
        if parent == Path("/"):
            continue
        if not parent.stat().st_mode & stat.S_IXOTH:
            return str(parent), prefix.relative_to(parent).parts[0]
    return None


def _pyproject() -> dict:
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def project_packages() -> list[str]:
    """The project's top-level package folders (a subpackage such as engine.dataplane is
    copied with its parent)."""
    return sorted({p.split(".")[0] for p in _pyproject()["tool"]["setuptools"]["packages"]})


def project_scripts() -> dict[str, str]:
    return dict(_pyproject()["project"]["scripts"])


def _requirement_names(reqs: list[str], extras: tuple[str, ...]) -> list[str]:
    names = []
    for req in reqs:
        m = _EXTRA_MARKER.search(req)
        if m and m.group(1) not in extras:
            continue
        name = _REQ_NAME.match(req)
        if name:
            names.append(name.group(1))
    return names


def required_distributions() -> list[metadata.Distribution]:
    """The installed distributions the programs need: the project's requirements (with
    EXTRAS) and, recursively, theirs (without extras); ones not installed are skipped (an
    environment marker excluded them)."""
    pyproject = _pyproject()["project"]
    todo = list(pyproject["dependencies"])
    for extra in EXTRAS:
        todo += pyproject.get("optional-dependencies", {}).get(extra, [])
    names = _requirement_names(todo, ())
    seen: dict[str, metadata.Distribution] = {}
    while names:
        name = names.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = dist
        names += _requirement_names(list(dist.requires or []), ())
    return list(seen.values())


def copy_distribution(dist: metadata.Distribution, site: Path) -> None:
    """Copy a distribution's files (its RECORD) that live in site-packages into ``site``."""
    for rel in dist.files or []:
        if rel.parts and rel.parts[0] == "..":
            continue  # console scripts and the like, outside site-packages
        src = Path(str(dist.locate_file(rel)))
        if not src.is_file():
            continue
        dst = site / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def write_script(path: Path, python: str, entry: str) -> None:
    module, _, func = entry.partition(":")
    path.write_text(f"#!{python}\nimport sys\nfrom {module} import {func}\n\nsys.exit({func}())\n")
    path.chmod(0o755)


def _make_world_readable(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = Path(dirpath, d)
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | 0o555)
        for f in filenames:
            p = Path(dirpath, f)
            if not p.is_symlink():
                mode = p.stat().st_mode
                p.chmod(mode | 0o444 | (0o111 if mode & 0o100 else 0))
