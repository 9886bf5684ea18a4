"""Two Linux calls the ``os`` module lacks: ``sync_file_range`` to start write-back early, and
``syncfs`` to make a file system durable and hear of its write errors.

Why restore wants them (measured on bench-peers' data, 1.2 GB restored): the kernel keeps
everything written in the page cache until the final sync (with 24 GB of memory the dirty
thresholds are gigabytes away), so that sync wrote 1.2 GB after the last byte was extracted,
0.7-0.9 s of a 3.3 s restore. ``start_writeback`` every few MiB, as PostgreSQL's own
``fsync_pgdata`` does before it fsyncs (``pg_flush_data``), lets the disk write while the
archive is still being decompressed; the final sync then finds almost nothing left to do.

``sync(2)`` reports no error at all, so a restore that trusted it alone could say "restored"
over files the disk failed to write. ``syncfs(2)`` reports, since Linux 5.8, every write-back
error on the file system since the descriptor it is given was opened: restore calls it on the
descriptors holding its target directories, opened before it wrote anything.

Sources: sync_file_range(2), syncfs(2) ("ERRORS", and the Linux 5.8 note in "VERSIONS").
Elsewhere than Linux (or a C library without them) ``start_writeback`` does nothing and
``sync_filesystem`` falls back to ``os.sync()``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from typing import Any

# <linux/fs.h>: start write-out of dirty pages in the range, do not wait for it.
SYNC_FILE_RANGE_WRITE = 2
# Errors that mean "not supported here" (a file system or file kind without write-back).
_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP})


@functools.cache
def libc_function(name: str, *argtypes: Any) -> Any:
    """C library function ``name`` taking ``argtypes`` and returning an int; None if absent.
    Looked up once per signature (``coordinator.malloc`` uses it too)."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` of ``fd`` from ``offset`` (0: to the end of
    the file) to disk, without waiting for it. Durability still needs a sync afterwards.

    Raises ``OSError`` (naming no file) for an I/O error the kernel reports at once; does
    nothing where the call is not supported.
    """
    function = libc_function(
        "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
    )
    if function is None:
        return
    if function(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE) != 0:
        code = ctypes.get_errno()
        if code not in _UNSUPPORTED:
            raise OSError(code, os.strerror(code))


def sync_filesystem(fd: int) -> None:
    """Write everything dirty on the file system holding ``fd`` to disk and wait for it.

    Raises ``OSError`` (naming no file) when a write-back on that file system failed since
    ``fd`` was opened (Linux 5.8 and later); ``os.sync()`` where there is no ``syncfs``.
    """
    function = libc_function("syncfs", ctypes.c_int)
    if function is None:
        os.sync()
        return
    if function(fd) != 0:
        code = ctypes.get_errno()
        if code in _UNSUPPORTED:
            os.sync()
            return
        raise OSError(code, os.strerror(code))
