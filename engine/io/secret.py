"""``--secret-file``: the shared secret of the extended intercept channel (design §6).

Both tcpcopy-mp and intercept-mp read it here, with the same checks, so a file one of them
accepts the other accepts too.  The secret is the file's first line with surrounding
whitespace stripped (so ``echo``/``base64`` output with its newline works); the bytes are used
as the HMAC-SHA256 key as they are.

Least privilege: a secret that another local user can change, or that belongs to someone who
is neither root nor us, is refused, as is one any local user can read (ssh refuses private
keys for the same reason).  The checks run on the opened file (``fstat``), so a swap of the
path between check and read cannot slip another file in.
"""

from __future__ import annotations

import os
import stat

from engine.errors import ConfigError
from engine.io.privileges import check_file_permissions

__all__ = ["SECRET_FILE_MAX_BYTES", "SECRET_MIN_BYTES", "load_secret_file"]

SECRET_MIN_BYTES = 16
"""A shorter secret could be guessed offline from one observed handshake (nonces and MACs
travel in clear)."""
SECRET_FILE_MAX_BYTES = 4096
"""Only the first line counts; we read no more than this."""
_HINT = "e.g. head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE"


def load_secret_file(where: str, path: str) -> bytes:
    """The secret in ``path``; ``ConfigError(where, ...)`` (one line) for anything wrong."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(where, f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        # Shared with --config (engine/io/privileges.py); a secret allows no group write at all.
        check_file_permissions(where, path, st, group_writable_ok=False)
        mode = stat.S_IMODE(st.st_mode)
        if mode & stat.S_IROTH:
            raise ConfigError(
                where, f"{path} is readable by every user (mode {mode:04o}); chmod 600 it"
            )
        data = os.read(fd, SECRET_FILE_MAX_BYTES)
    except OSError as exc:
        raise ConfigError(where, f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    secret = data.split(b"\n", 1)[0].strip()
    if len(secret) < SECRET_MIN_BYTES:
        raise ConfigError(
            where,
            f"{path}: the secret (first line) has {len(secret)} bytes, at least "
            f"{SECRET_MIN_BYTES} are needed ({_HINT})",
        )
    return secret
