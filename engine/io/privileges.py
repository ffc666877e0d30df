"""Least privilege: both programs give up root after start-up and keep two capabilities.

Theory of operation
-------------------
tcpcopy-mp needs CAP_NET_RAW (the capture socket, the raw send socket) and CAP_NET_ADMIN
(SO_RCVBUFFORCE/SO_SNDBUFFORCE for -B and the send buffer); intercept-mp needs CAP_NET_ADMIN
(bind an NFQUEUE, run ``iptables`` for --install-rule) and CAP_NET_RAW (pcap).  Nothing else.
Started as root, each program calls ``enter_least_privilege`` once, single-threaded, before it
forks or starts a thread:

1. ``prctl(PR_SET_KEEPCAPS, 1)``: setuid() away from 0 would otherwise clear the permitted set;
2. every capability but the two leaves the bounding set (``PR_CAPBSET_DROP``), so nothing this
   process or an exec'd child does can ever regain it;
3. ``setgroups`` (the user's groups), ``setgid``, ``setuid``: real, effective and saved ids all
   become the unprivileged user's, so root cannot come back through the saved uid either;
4. ``capset``: effective = permitted = inheritable = {NET_RAW, NET_ADMIN};
5. ``PR_CAP_AMBIENT_RAISE`` for both: a program we exec (iptables, which removes the
   --install-rule rule at exit) gets them too.  Forked children (restarted workers, the
   capture process) inherit every capability set through fork() anyway;
6. ``PR_SET_NO_NEW_PRIVS``: no setuid binary or file capability can raise us again;
7. ``PR_SET_DUMPABLE, 1``: the kernel marks a process that changed credentials non-dumpable,
   which would make its children's /proc/PID/smaps unreadable to the supervisor (the -m
   watchdog sums their PSS).  Safe: ptrace and /proc access by another process of the same
   user still need a superset of our permitted capabilities, which that process lacks.

Why this point (and not after the sockets are open): the supervisor creates its shared
memory (rings, counter, control and tuple-history blocks: memfds and anonymous mappings that
its children inherit) and then forks children that use it; dropping first, with the two
capabilities kept, means every object is created by the user that uses it (the counter
block can also be opened by name, through /proc, by that user), and a restarted child
(which only ever runs as that user) can still open raw/AF_PACKET sockets if it needs to.

Files.  What was opened before the drop stays usable (the -l log file, the --pid-file write).
Files the program touches *later* are opened here first, as root (``KeptFiles``): the pcap
files of an offline replay (the capture process reads them through a dup of the descriptor)
and a --summary-json whose directory the new user cannot write (the file is created now and
rewritten in place at exit).  A -l log file whose directory the new user cannot write cannot
be reopened on SIGHUP after the drop: we say so at start-up, and the reopen keeps the old file.

Who we become: ``--user NAME`` (and ``--group NAME``); by default user ``tcpcopy`` if it
exists (the packaged systemd/tcpcopy-mp.sysusers creates it), else ``nobody`` with group
``nogroup`` (or nobody's own group).  ``nobody`` works but is shared with other daemons,
which could then signal our processes; a dedicated user avoids that.  ``--user root`` keeps
root (with a warning).  Not started as root (systemd ``User=tcpcopy`` with
``AmbientCapabilities``), there is nothing to drop: we only trim any capability beyond the
two, make sure the ambient set carries them, and warn when one is missing.

Config and secret files: ``check_file_permissions`` (shared by --config and --secret-file)
refuses a file another local user could change.
"""

from __future__ import annotations

import ctypes
import dataclasses
import grp
import logging
import os
import pwd
import stat
import sys
from collections.abc import Callable, Iterable, Sequence

from engine.errors import ConfigError

__all__ = [
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "DEFAULT_USER",
    "KEEP_CAPS_MASK",
    "CapState",
    "KeptFiles",
    "Target",
    "cap_names",
    "check_file_permissions",
    "check_open_file",
    "drop_privileges",
    "enter_least_privilege",
    "parse_status",
    "read_status",
    "resolve_target",
    "write_kept",
    "write_summary",
]

log = logging.getLogger("tcpcopy")

# linux/capability.h
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
KEEP_CAPS = (CAP_NET_ADMIN, CAP_NET_RAW)
KEEP_CAPS_MASK = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)
CAP_LAST_CAP_FALLBACK = 40  # CAP_CHECKPOINT_RESTORE (5.9); the kernel's own value wins
CAP_LAST_CAP_PATH = "/proc/sys/kernel/cap_last_cap"
_CAP_NAMES = {
    0: "CAP_CHOWN",
    1: "CAP_DAC_OVERRIDE",
    2: "CAP_DAC_READ_SEARCH",
    3: "CAP_FOWNER",
    5: "CAP_KILL",
    6: "CAP_SETGID",
    7: "CAP_SETUID",
    8: "CAP_SETPCAP",
    10: "CAP_NET_BIND_SERVICE",
    12: "CAP_NET_ADMIN",
    13: "CAP_NET_RAW",
    19: "CAP_SYS_PTRACE",
    21: "CAP_SYS_ADMIN",
}
_LINUX_CAPABILITY_VERSION_3 = 0x20080522  # two 32-bit words per set

# linux/prctl.h
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_RAISE = 2

DEFAULT_USER = "tcpcopy"
"""Created by systemd/tcpcopy-mp.sysusers; the drop target when it exists."""
FALLBACK_USER = "nobody"
FALLBACK_GROUP = "nogroup"


class _CapHeader(ctypes.Structure):
    """struct __user_cap_header_struct (linux/capability.h)."""

    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    """struct __user_cap_data_struct: one 32-bit word of each set (version 3 uses two)."""

    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


# --------------------------------------------------------------------------------------------
# reading capabilities (pure parsing + /proc)


@dataclasses.dataclass(frozen=True)
class CapState:
    """Ids and capability sets of one process, as /proc/PID/status shows them."""

    uids: tuple[int, ...]  # real, effective, saved, filesystem
    gids: tuple[int, ...]
    inheritable: int
    permitted: int
    effective: int
    bounding: int
    ambient: int
    no_new_privs: bool | None  # None: the kernel does not report it


_STATUS_CAP_KEYS = {
    "CapInh": "inheritable",
    "CapPrm": "permitted",
    "CapEff": "effective",
    "CapBnd": "bounding",
    "CapAmb": "ambient",
}


def parse_status(text: str) -> CapState:
    """/proc/PID/status text -> CapState (ValueError if a needed line is missing or bad)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    try:
        uids = tuple(int(v) for v in fields["Uid"].split())
        gids = tuple(int(v) for v in fields["Gid"].split())
        caps = {name: int(fields[key], 16) for key, name in _STATUS_CAP_KEYS.items()}
    except KeyError as exc:
        raise ValueError(f"no {exc.args[0]} line in the status text") from None
    nnp = fields.get("NoNewPrivs")
    return CapState(uids=uids, gids=gids, no_new_privs=None if nnp is None else nnp == "1", **caps)


def read_status(pid: int | str = "self") -> CapState:
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        return parse_status(f.read())


def cap_names(mask: int) -> list[str]:
    """['CAP_NET_ADMIN', 'CAP_NET_RAW'] for 0x3000; unnamed bits as 'cap_N'."""
    return [_CAP_NAMES.get(b, f"cap_{b}") for b in range(mask.bit_length()) if mask >> b & 1]


# --------------------------------------------------------------------------------------------
# file permissions (--config, --secret-file)


def check_file_permissions(
    where: str, path: str, st: os.stat_result, *, group_writable_ok: bool = True
) -> None:
    """Refuse (ConfigError, one line naming the file and its mode) a file another local user
    could change: not a regular file, owned by neither root nor us, world-writable, or
    group-writable by a group other than root's or our own (any group write when
    ``group_writable_ok`` is False: the secret file).  Call it on ``os.fstat`` of the open
    file, so a path swapped between the check and the read cannot slip another file in."""
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(where, f"{path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    euid = os.geteuid()
    if st.st_uid not in (0, euid):
        raise ConfigError(
            where,
            f"{path} (mode {mode:04o}) is owned by uid {st.st_uid}, not by root or by us ({euid})",
        )
    group_ok = group_writable_ok and st.st_gid in (0, os.getegid())
    if mode & stat.S_IWOTH or (mode & stat.S_IWGRP and not group_ok):
        raise ConfigError(
            where, f"{path} is writable by other users (mode {mode:04o}); chmod go-w it"
        )


def check_open_file(where: str, path: str, fileno: int, *, group_writable_ok: bool = True) -> None:
    """``check_file_permissions`` on an open file (--config calls this on its open file)."""
    check_file_permissions(where, path, os.fstat(fileno), group_writable_ok=group_writable_ok)


# --------------------------------------------------------------------------------------------
# who we become


@dataclasses.dataclass(frozen=True)
class Target:
    """The unprivileged identity to switch to."""

    user: str
    uid: int
    gid: int
    group: str
    groups: tuple[int, ...]  # supplementary groups (the user's, from the group database)


def _lookup_user(flag: str, name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, ValueError, OverflowError):  # OverflowError: an id beyond uid_t
        raise ConfigError(flag, f"no such user: {name!r}") from None


def _lookup_group(flag: str, name: str) -> grp.struct_group:
    try:
        return grp.getgrgid(int(name)) if name.isdigit() else grp.getgrnam(name)
    except (KeyError, ValueError, OverflowError):  # OverflowError: an id beyond gid_t
        raise ConfigError(flag, f"no such group: {name!r}") from None


def resolve_target(
    user: str | None, group: str | None, *, euid: int | None = None
) -> Target | None:
    """Whom to become: None means "stay as we are" (not root, or --user root).

    ConfigError("--user"/"--group", ...) for a name that does not exist, or for a switch to
    another user when we are not root (only root can change users).
    """
    euid = os.geteuid() if euid is None else euid
    if user is None:
        if euid != 0:
            if group is not None:
                raise ConfigError("--group", "changing the group needs root")
            return None
        try:
            pw = pwd.getpwnam(DEFAULT_USER)
        except KeyError:
            pw = _lookup_user("--user", FALLBACK_USER)
            if group is None:
                try:
                    group = grp.getgrnam(FALLBACK_GROUP).gr_name
                except KeyError:
                    group = None  # nobody's own primary group
    else:
        pw = _lookup_user("--user", user)
    gr = _lookup_group("--group", group) if group is not None else None
    gid = gr.gr_gid if gr is not None else pw.pw_gid
    if pw.pw_uid == 0 and gid == 0:
        return None  # --user root: keep root (the caller warns)
    if euid != 0:
        if pw.pw_uid != euid:
            raise ConfigError(
                "--user", f"switching to user {pw.pw_name!r} needs root (we run as uid {euid})"
            )
        return None
    try:
        groups = tuple(sorted(set(os.getgrouplist(pw.pw_name, gid))))
    except OSError:
        groups = (gid,)
    group_name = gr.gr_name if gr is not None else _group_name(gid)
    return Target(pw.pw_name, pw.pw_uid, gid, group_name, groups)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def unreadable_for(target: Target, checks: Sequence[tuple[str, int]]) -> str | None:
    """The first path of `checks` (path, os.access mode) that `target` could not access, or
    None.  Asked in a forked child that becomes the user, so path traversal, groups and ACLs
    get the kernel's own answer.  Root only; call before any thread is started."""
    if not checks:
        return None
    pid = os.fork()
    if pid == 0:
        code = 255
        try:
            os.setgroups(list(target.groups))
            os.setgid(target.gid)
            os.setuid(target.uid)
            code = next((i for i, (p, m) in enumerate(checks) if not os.access(p, m)), 254)
        finally:
            os._exit(min(code, 255))
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 254:
        return None
    return checks[code][0] if 0 <= code < len(checks) else "(the check failed)"


def user_can_access(target: Target, path: str, mode: int) -> bool:
    """Whether `target` could ``os.access(path, mode)`` (``unreadable_for``)."""
    return unreadable_for(target, [(path, mode)]) is None


def program_paths() -> list[tuple[str, int]]:
    """What a process of ours reads or execs after the drop: the interpreter, the standard
    library, the installed packages (orjson's directory) and the project's own code."""
    import sysconfig
    from importlib.util import find_spec

    rx = os.R_OK | os.X_OK
    paths = [(sys.executable, os.X_OK), (sysconfig.get_paths()["stdlib"], rx)]
    # orjson's location without importing it (JSON logs import it when they need it).
    spec = find_spec("orjson")
    if spec is not None and spec.origin:
        paths.append((os.path.dirname(os.path.dirname(os.path.abspath(spec.origin))), rx))
    paths.append((os.path.dirname(os.path.dirname(os.path.abspath(__file__))), rx))
    return paths


# --------------------------------------------------------------------------------------------
# files opened before the drop


class KeptFiles:
    """Descriptors opened as root before the drop for files used after it (module docstring).

    Inputs (pcap files): ``opener(path)`` returns a fresh reader over a dup of the kept
    descriptor, rewound (the -T passes read a file again); ``sizes`` has their byte sizes.
    Outputs (--summary-json): ``write(path, data)`` rewrites the kept file in place.
    """

    def __init__(self) -> None:
        self.inputs: dict[str, int] = {}
        self.outputs: dict[str, int] = {}
        self.sizes: dict[str, int] = {}

    def keep_input(self, path: str) -> None:
        if path not in self.inputs:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self.inputs[path] = fd
            self.sizes[path] = os.fstat(fd).st_size

    def keep_output(self, path: str, target: Target) -> None:
        """Create `path` now (empty) and hand it to `target`, so it can rewrite it later."""
        if path not in self.outputs:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            os.fchown(fd, target.uid, target.gid)
            self.outputs[path] = fd

    def opener(self, path: str) -> object:
        """A PcapReader over the kept descriptor of `path` (open_pcap when not kept)."""
        from engine.codec.pcapfile import PcapReader, open_pcap

        fd = self.inputs.get(path)
        if fd is None:
            return open_pcap(path)
        dup = os.dup(fd)
        os.lseek(dup, 0, os.SEEK_SET)
        stream = os.fdopen(dup, "rb")
        try:
            return PcapReader(stream, path)
        except BaseException:
            stream.close()
            raise

    def write(self, path: str, data: bytes) -> bool:
        """Rewrite the kept output `path` with `data`; False when `path` is not kept."""
        fd = self.outputs.get(path)
        if fd is None:
            return False
        os.ftruncate(fd, 0)
        view = memoryview(data)
        offset = 0
        while offset < len(view):
            offset += os.pwrite(fd, view[offset:], offset)
        return True

    def close(self) -> None:
        for fd in [*self.inputs.values(), *self.outputs.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.inputs.clear()
        self.outputs.clear()


KEPT = KeptFiles()
"""The process's kept files (one drop per process)."""


def write_kept(path: str, data: bytes) -> bool:
    """Write a --summary-json through its kept descriptor; False: not kept, write it as usual."""
    return KEPT.write(path, data)


def write_summary(path: str, values: dict[str, object]) -> None:
    """tcpcopy-mp's --summary-json: engine.io.logs.write_json_atomic (temporary file + rename),
    or, when the file was kept because the new user cannot write its directory, in place."""
    from engine.io.logs import json_bytes, write_json_atomic

    if not write_kept(path, json_bytes(values)):
        write_json_atomic(path, values)


# --------------------------------------------------------------------------------------------
# the drop


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(libc: ctypes.CDLL, option: int, arg2: int = 0, arg3: int = 0) -> int:
    res = libc.prctl(
        ctypes.c_int(option),
        ctypes.c_ulong(arg2),
        ctypes.c_ulong(arg3),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return int(res)


def _capset(libc: ctypes.CDLL, effective: int, permitted: int, inheritable: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = effective >> shift & 0xFFFFFFFF
        data[i].permitted = permitted >> shift & 0xFFFFFFFF
        data[i].inheritable = inheritable >> shift & 0xFFFFFFFF
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _cap_last_cap() -> int:
    try:
        with open(CAP_LAST_CAP_PATH, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return CAP_LAST_CAP_FALLBACK


def _raise_ambient(libc: ctypes.CDLL, mask: int) -> None:
    for cap in KEEP_CAPS:
        if mask >> cap & 1:
            _prctl(libc, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)


def drop_privileges(target: Target) -> CapState:
    """Become `target` keeping only CAP_NET_RAW and CAP_NET_ADMIN (steps 1-7 of the module
    docstring); returns the resulting state.  Root and single-threaded only; OSError if a
    step fails (the caller must then exit: half-dropped is not a state to run in)."""
    libc = _libc()
    _prctl(libc, PR_SET_KEEPCAPS, 1)
    for cap in range(_cap_last_cap() + 1):
        if cap not in KEEP_CAPS and _prctl(libc, PR_CAPBSET_READ, cap) == 1:
            _prctl(libc, PR_CAPBSET_DROP, cap)
    os.setgroups(list(target.groups))
    os.setgid(target.gid)
    os.setuid(target.uid)
    _capset(libc, KEEP_CAPS_MASK, KEEP_CAPS_MASK, KEEP_CAPS_MASK)
    _raise_ambient(libc, KEEP_CAPS_MASK)
    _prctl(libc, PR_SET_KEEPCAPS, 0)
    _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
    _prctl(libc, PR_SET_DUMPABLE, 1)
    state = read_status()
    if 0 in state.uids or 0 in state.gids or state.permitted & ~KEEP_CAPS_MASK:
        raise OSError(0, f"privileges not dropped as intended: {state}")
    return state


def _trim_unprivileged(libc: ctypes.CDLL, state: CapState) -> CapState:
    """Not root: keep at most the two capabilities, carried in the ambient set."""
    keep = state.permitted & KEEP_CAPS_MASK
    if state.permitted & ~KEEP_CAPS_MASK or state.inheritable != keep:
        # Lowering permitted is always allowed; raising inheritable within permitted too
        # (CAP_SETPCAP is only needed beyond the bounding set, and ours are in it).
        _capset(libc, keep, keep, keep & state.bounding)
    try:
        _raise_ambient(libc, keep & state.bounding)
    except OSError:
        pass  # an old kernel without ambient capabilities: only iptables exec is affected
    _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
    return read_status()


def enter_least_privilege(
    prog: str,
    target: Target | None,
    logger: logging.Logger,
    *,
    needed: int = KEEP_CAPS_MASK,
    needed_for: str = "",
) -> CapState | None:
    """The CLIs' one call, after the root-only start-up and before any fork or thread.

    Root with a target: drop to it.  Root without one (--user root): stay, with a warning.
    Not root: trim to the two capabilities; warn about any of `needed` that is missing (what
    it is needed for: `needed_for`).  Returns the resulting state (None: no /proc to read).
    Raises OSError when a drop step fails.
    """
    libc = _libc()
    if os.geteuid() == 0:
        if target is None:
            logger.warning(
                "%s keeps running as root (--user root): every process of it has every "
                "privilege; without --user it would switch to user %r (or nobody) with only "
                "CAP_NET_RAW and CAP_NET_ADMIN",
                prog,
                DEFAULT_USER,
            )
            return None
        blocked = unreadable_for(target, program_paths())
        if blocked:
            # Python runs code it reads later (lazy imports): as a user who cannot read it,
            # it would fail later and piecemeal.  Staying root, loudly, beats a half-working replay.
            logger.warning(
                "%s keeps running as root: user %s cannot read %s (the Python installation "
                "or the program, needed after the switch).  Install them where %s can read "
                "them, or give --user root to keep root knowingly",
                prog,
                target.user,
                blocked,
                target.user,
            )
            return None
        state = drop_privileges(target)
        logger.info(
            "dropped root: running as user %s (uid %d), group %s (gid %d), capabilities %s",
            target.user,
            target.uid,
            target.group,
            target.gid,
            "+".join(cap_names(state.effective)) or "none",
        )
        return state
    try:
        state = _trim_unprivileged(libc, read_status())
    except (OSError, ValueError) as exc:
        logger.warning("cannot read or trim our capabilities: %s", exc)
        return None
    missing = needed & ~state.effective
    if missing:
        logger.warning(
            "running as uid %d without %s%s: start as root or grant it (systemd: "
            "AmbientCapabilities=CAP_NET_RAW CAP_NET_ADMIN; or setcap)",
            os.geteuid(),
            " and ".join(cap_names(missing)),
            f" ({needed_for})" if needed_for else "",
        )
    return state


def warn_unreachable_log(
    logger: logging.Logger, target: Target | None, log_path: str | None
) -> None:
    """-l: warn at start-up when `target` could not reopen the log file (SIGHUP after
    logrotate moved it): the directory must be writable by the user for that."""
    if target is None or not log_path:
        return
    directory = os.path.dirname(os.path.abspath(log_path)) or "/"
    if not user_can_access(target, directory, os.W_OK | os.X_OK):
        logger.warning(
            "-l %s: the directory %s is not writable by user %s, so a log reopen (SIGHUP, "
            "e.g. after logrotate) cannot create a new file there; logging continues to the "
            "file opened now.  Fix: chown %s %s (or --user)",
            log_path,
            directory,
            target.user,
            target.user,
            directory,
        )


def keep_files(
    target: Target | None, inputs: Iterable[str] = (), outputs: Iterable[str] = ()
) -> KeptFiles:
    """Open now, as root, the files used after the drop (``KEPT``): every input (pcap) file,
    and each output the target user could not create itself.  OSError if one cannot be
    opened (the caller reports it like any start-up error)."""
    if target is None:
        return KEPT
    for path in inputs:
        KEPT.keep_input(path)
    for path in outputs:
        directory = os.path.dirname(os.path.abspath(path)) or "/"
        # A missing directory is the flag check's business (or the write's error at exit).
        if os.path.isdir(directory) and not user_can_access(target, directory, os.W_OK | os.X_OK):
            try:
                KEPT.keep_output(path, target)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot create {path}: {exc.strerror}") from None
    return KEPT


def pcap_sources_factory(kept: KeptFiles) -> Callable[[object, object], list]:
    """Supervisor ``sources_factory`` for an offline replay whose files were kept: the files
    are read through the kept descriptors, their sizes measured before the drop."""

    def build(cfg: object, prefilter: object) -> list:
        from engine.io import capture

        paths = list(cfg.pcap_files)  # type: ignore[attr-defined]
        src = capture.build_sources(cfg, prefilter, opener=kept.opener)[0]
        if all(p in kept.sizes for p in paths):
            src.counters["offline_bytes_total"] = sum(kept.sizes[p] for p in paths) * max(
                1,
                cfg.replays,  # type: ignore[attr-defined]
            )
        return [src]

    return build
