"""Writing files so that a reader never sees half of one: atomic writes and moves.

A temporary file beside the target (named ``TEMP_PREFIX...``, so that spools skip it), written,
optionally fsynced with its directory, then renamed over the target. Errors name the target.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from pathlib import Path

# --- moving and writing files --------------------------------------------------------------------

TEMP_PREFIX = ".cloud-dump-tmp-"


def move(source: Path, destination: Path) -> None:
    """Rename ``source`` onto ``destination``; across file systems (a ``--spool-dir`` elsewhere)
    copy it beside ``destination`` first, so that it still appears whole."""
    try:
        source.replace(destination)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        write_atomically(destination, source.read_bytes(), sync=False)
        source.unlink()


def write_atomically(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write ``path`` (mode 0600) so that it appears whole or not at all.

    A temp file beside it is renamed over it; with ``sync`` the file is fsynced before the rename
    and the directory after it, so the name never points at unwritten blocks after a crash.
    """
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise _naming_target(exc, path) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise _naming_target(exc, path) from exc
        raise
    if sync:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _naming_target(exc: OSError, path: Path) -> OSError:
    """``exc`` naming ``path``, the file asked for, not the temporary file beside it (a name
    the operator never gave, for a directory that may not even exist)."""
    return type(exc)(exc.errno, exc.strerror, str(path))
