"""Writing files so that a reader never sees half of one, and errors that name the file.

``write_atomically`` is the one atomic write of the project, for the local store's objects
(``storage.local``) and for the coordinator's spools, markers and PGDATA files alike: a
temporary file beside the target (``<temp_prefix><name>-<random>``, so that a directory's
readers can skip it by its prefix), written, optionally fsynced with its directory, then renamed
over the target, or hard-linked onto it for a create-if-absent. Each caller says which mode the
file gets and whether it is fsynced, and why (at the call site).

An ``OSError`` from a write on a file descriptor (``ENOSPC``, ``EFBIG``) or from ``fsync`` names
no file, and one from a temporary file names a file the operator never gave: ``naming`` makes
either name the file that was asked for, so that the CLI's one-line error says where.

It lives in ``storage`` because that is the lowest layer: the local store needs it, and the
coordinator sits above the store. Standard library only, and only modules the CLI has loaded
anyway: wal-fetch's served path imports this module.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

TEMP_PREFIX = ".cloud-dump-tmp-"
# Flags of every temporary file: a new file, never one that exists under its name (another
# writer's, or a symbolic link someone left there), and not inherited by the helpers this
# process may be spawning meanwhile.
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_UMASK_MODE = 0o666  # what ``open()`` asks for: the umask then decides
# Of the target's name, in the temporary one: enough to see what it is for, short enough that
# prefix, name and random part stay within NAME_MAX (255 bytes) for any target name.
_NAME_CHARS = 64


def write_atomically(
    path: Path,
    data: bytes | str | Callable[[IO[bytes]], object],
    *,
    mode: int | None = 0o600,
    sync: bool = True,
    temp_prefix: str = TEMP_PREFIX,
    exclusive: bool = False,
) -> bool:
    """Replace ``path`` with ``data`` so that it appears whole or not at all.

    ``data``: bytes; text, encoded as ``open()`` in text mode would (the locale's encoding;
    UTF-8 in UTF-8 mode), so that ``Path.read_text()`` reads it back unchanged; or a function
    that writes the content to the binary file it is given (a stream, or an assembly of parts,
    too large to hold in memory; it may also set extended attributes on ``f.fileno()``).

    ``mode``: the file's permission bits exactly (set with ``fchmod``: ``open()`` applies the
    umask); to keep an existing file's mode, pass what ``stat`` gives for it. None: 0666 less
    the umask, as ``open()`` creates a file.

    ``sync``: fsync the file before the rename and its directory after it, so that after a
    crash the name never points at unwritten blocks. False: a crash may leave the old file, the
    new one, or (on some file systems) an empty one; callers say why that is acceptable.

    ``temp_prefix``: how the temporary file's name starts (readers of the directory skip it by
    this prefix). Its random part keeps writers on different hosts sharing one directory (a
    network mount) apart. It is removed again whatever happens.

    ``exclusive``: create ``path`` only if it does not exist (a hard link, which fails if the
    name is taken: atomic, unlike a check followed by a rename). Returns False when it was
    taken; True when the file was written.

    Raises ``OSError`` naming ``path`` (never the temporary file); a directory fsync that fails
    after the rename names the directory.
    """
    tmp = path.with_name(f"{temp_prefix}{path.name[:_NAME_CHARS]}-{os.urandom(8).hex()}")
    with naming(path, replacing=True):
        fd = os.open(tmp, _TEMP_FLAGS, _UMASK_MODE if mode is None else mode)
        try:
            try:
                if mode is not None:
                    os.fchmod(fd, mode)
                if callable(data):
                    with os.fdopen(fd, "wb", closefd=False) as f:
                        data(f)
                else:
                    # Anything but text as it is: a worker's staged payload is a bytearray
                    # (workers.staging).
                    raw = data.encode(_text_encoding()) if isinstance(data, str) else data
                    write_all(fd, raw)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if exclusive:
                try:
                    path.hardlink_to(tmp)
                except FileExistsError:
                    return False
                finally:
                    tmp.unlink()
            else:
                tmp.replace(path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    if sync:
        fsync_dir(path.parent)
    return True


def move(source: Path, destination: Path) -> None:
    """Rename ``source`` onto ``destination``; across file systems (a ``--spool-dir`` elsewhere)
    copy it beside ``destination`` first (mode 0600, not fsynced), so that it still appears
    whole. Raises ``OSError``; a failed copy names ``destination``."""
    try:
        source.replace(destination)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        write_atomically(destination, source.read_bytes(), sync=False)
        source.unlink()


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable (a rename or a new file in it).

    Raises ``OSError`` naming ``path``.
    """
    with naming(path):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd``: a write may take only part of it (a disk filling up, a
    signal). Raises ``OSError`` as ``os.write`` does (naming no file)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@contextlib.contextmanager
def naming(path: Path, *, replacing: bool = False) -> Iterator[None]:
    """Re-raise an ``OSError`` that names no file as the same error naming ``path``.

    ``replacing``: also one that names another file (a temporary file beside ``path``, a name
    the operator never gave, in a directory that may not even exist). An error without an errno
    (raised with a message alone) is re-raised unchanged.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno is None or (exc.filename is not None and not replacing):
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def _text_encoding() -> str:
    """The encoding ``open()`` uses for text when given none."""
    import locale  # only text needs it

    return locale.getpreferredencoding(False)
